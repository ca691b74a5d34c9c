//! Node-level settings that shape the rendered rules (kube-proxy's iptables flags, where they apply).

use std::net::IpAddr;

use ipnet::IpNet;
use svcproxy_model::IpFamily;

use crate::rule_text::{push_decimal, push_ip};

/// How "traffic from a local pod" is recognised (upstream `--detect-local-mode`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalDetector {
    /// No detector: no ClusterIP masquerade rule (unless masquerade-all) and no pod short-circuit in eTP=Local
    /// external chains.
    #[default]
    None,
    /// Pod source CIDRs: the cluster CIDR (`ClusterCIDR` mode) or the node's pod CIDRs (`NodeCIDR` mode). Only
    /// the first CIDR of the rendered family is used: one iptables rule cannot say "not in any of these",
    /// and upstream's iptables mode likewise takes a single CIDR per family.
    Cidrs(Vec<IpNet>),
    /// Pods sit behind this bridge (`BridgeInterface` mode): `-i <bridge>`.
    BridgeInterface(String),
    /// Pod interfaces share this name prefix (`InterfaceNamePrefix` mode): `-i <prefix>+`.
    InterfaceNamePrefix(String),
}

impl LocalDetector {
    /// How local pod traffic is told apart in `family`, if this detector can tell.
    pub(crate) fn local_match(&self, family: IpFamily) -> Option<LocalMatch<'_>> {
        match self {
            LocalDetector::None => None,
            LocalDetector::Cidrs(cidrs) => cidrs
                .iter()
                .find(|c| family.contains(&c.addr()))
                .map(|c| LocalMatch::Source(c.trunc())),
            LocalDetector::BridgeInterface(name) => Some(LocalMatch::Interface(name)),
            LocalDetector::InterfaceNamePrefix(prefix) => Some(LocalMatch::InterfacePrefix(prefix)),
        }
    }

    /// The match selecting local pod traffic, e.g. `-s 10.244.0.0/16`; `None` when there is no detector.
    pub fn if_local(&self, family: IpFamily) -> Option<String> {
        self.local_match(family).map(|m| m.spelled(false))
    }

    /// The match selecting everything else, e.g. `! -s 10.244.0.0/16`.
    pub fn if_not_local(&self, family: IpFamily) -> Option<String> {
        self.local_match(family).map(|m| m.spelled(true))
    }
}

/// What tells local pod traffic apart in one family. Written straight into each rule that needs it: a full
/// render writes one per service port, and formatting the network each time was 2% of it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LocalMatch<'a> {
    /// `-s <network>`, the host bits cleared.
    Source(IpNet),
    /// `-i <bridge>`.
    Interface(&'a str),
    /// `-i <prefix>+`.
    InterfacePrefix(&'a str),
}

impl LocalMatch<'_> {
    /// Writes the match, negated with `! ` to select everything else.
    pub(crate) fn push(self, negated: bool, out: &mut String) {
        if negated {
            out.push_str("! ");
        }
        match self {
            LocalMatch::Source(net) => {
                out.push_str("-s ");
                push_ip(out, net.addr());
                out.push('/');
                push_decimal(out, u32::from(net.prefix_len()));
            }
            LocalMatch::Interface(name) => {
                out.push_str("-i ");
                out.push_str(name);
            }
            LocalMatch::InterfacePrefix(prefix) => {
                out.push_str("-i ");
                out.push_str(prefix);
                out.push('+');
            }
        }
    }

    fn spelled(self, negated: bool) -> String {
        let mut out = String::new();
        self.push(negated, &mut out);
        out
    }
}

/// Which local addresses accept NodePort traffic (upstream `--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every local address (`-m addrtype --dst-type LOCAL`).
    #[default]
    All,
    /// Only these node addresses, already resolved from the configured CIDRs by the caller.
    Ips(Vec<IpAddr>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("masquerade bit {0} is out of range (0..=31)")]
    MasqueradeBit(u8),
    #[error("interface name {0:?} is not a valid iptables interface match")]
    InterfaceName(String),
}

/// Everything besides the intent that decides the rendered rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    pub family: IpFamily,
    /// Bit of the packet mark that requests masquerading (upstream default 14).
    pub masquerade_bit: u8,
    /// Masquerade all ClusterIP traffic, not only traffic from outside the pod network.
    pub masquerade_all: bool,
    pub local_detector: LocalDetector,
    pub node_port_addresses: NodePortAddresses,
    /// Accept NodePorts on 127.0.0.0/8 (IPv4 only). Needs `route_localnet`, which opens the node to martian
    /// packets, so when on we also write the `KUBE-FIREWALL` anti-martian rule. Off by default (upstream
    /// defaults to on): the NodePort gate then excludes 127.0.0.0/8.
    pub localhost_node_ports: bool,
    /// The node's primary address in this family. A load-balancer source range containing it also admits the
    /// LB VIPs as sources, because node-to-VIP traffic on VIP-as-local-address LBs loops back with the VIP as
    /// source.
    pub node_ip: Option<IpAddr>,
    /// Drop forwarded packets in conntrack state INVALID. Must be off when `nf_conntrack_tcp_be_liberal` is
    /// on, as upstream does: the liberal mode exists to let such packets through.
    pub drop_invalid: bool,
    /// `MASQUERADE --random-fully` (iptables ≥ 1.6.2); avoids SNAT port collisions under load.
    pub random_fully: bool,
    /// Count packets in kube-proxy's nfacct objects ([`CT_STATE_INVALID_COUNTER`],
    /// [`LOCALHOST_NODEPORTS_COUNTER`]), as upstream does when it could create them: the INVALID drop carries
    /// an `nfacct` match, and with localhost NodePorts each NodePort gets a rule for 127.0.0.0/8 ahead of its
    /// general one. Only when the objects exist: an `nfacct` match naming a missing object fails the restore.
    pub packet_counters: bool,
}

/// The nfacct object counting the forwarded packets dropped as conntrack state INVALID.
pub const CT_STATE_INVALID_COUNTER: &str = "ct_state_invalid_dropped_pkts";
/// The nfacct object counting the packets accepted to localhost NodePorts.
pub const LOCALHOST_NODEPORTS_COUNTER: &str = "localhost_nps_accepted_pkts";

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            family: IpFamily::V4,
            masquerade_bit: 14,
            masquerade_all: false,
            local_detector: LocalDetector::None,
            node_port_addresses: NodePortAddresses::All,
            localhost_node_ports: false,
            node_ip: None,
            drop_invalid: true,
            random_fully: true,
            packet_counters: false,
        }
    }
}

impl RenderConfig {
    /// Rendering assumes a valid configuration; the binary calls this once at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.masquerade_bit > 31 {
            return Err(ConfigError::MasqueradeBit(self.masquerade_bit));
        }
        if let LocalDetector::BridgeInterface(name) | LocalDetector::InterfaceNamePrefix(name) =
            &self.local_detector
        {
            // IFNAMSIZ is 16 including the NUL; the prefix form gets a `+` appended but that does not count.
            let valid = !name.is_empty()
                && name.len() < 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b'/'));
            if !valid {
                return Err(ConfigError::InterfaceName(name.clone()));
            }
        }
        Ok(())
    }

    /// The mark as upstream writes it: Go's `%#08x`, which zero-pads the digits to eight and then prefixes
    /// `0x` (bit 14 → `0x00004000`). iptables-save later prints it as `0x4000`.
    pub fn masquerade_mark(&self) -> String {
        let mark = 1u32
            .checked_shl(u32::from(self.masquerade_bit))
            .expect("masquerade bit is checked by RenderConfig::validate");
        format!("0x{mark:08x}")
    }

    /// Localhost NodePorts take effect only for IPv4, and upstream turns them off when the NodePort addresses
    /// exclude IPv4 loopback.
    pub fn localhost_node_ports_active(&self) -> bool {
        self.localhost_node_ports
            && self.family == IpFamily::V4
            && match &self.node_port_addresses {
                NodePortAddresses::All => true,
                NodePortAddresses::Ips(ips) => ips.iter().any(|ip| ip.is_loopback() && ip.is_ipv4()),
            }
    }

    /// The loopback network of the family, which the NodePort gate excludes when localhost NodePorts are off.
    pub(crate) fn loopback_net(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1/128",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_is_go_hash_08x() {
        let mut cfg = RenderConfig::default();
        assert_eq!(cfg.masquerade_mark(), "0x00004000");
        cfg.masquerade_bit = 0;
        assert_eq!(cfg.masquerade_mark(), "0x00000001");
        cfg.masquerade_bit = 31;
        assert_eq!(cfg.masquerade_mark(), "0x80000000");
        cfg.masquerade_bit = 32;
        assert_eq!(cfg.validate(), Err(ConfigError::MasqueradeBit(32)));
    }

    #[test]
    fn detector_matches() {
        let d = LocalDetector::Cidrs(vec![
            "fd00:10::/64".parse().unwrap(),
            "10.244.1.7/16".parse().unwrap(),
        ]);
        assert_eq!(d.if_local(IpFamily::V4).as_deref(), Some("-s 10.244.0.0/16"));
        assert_eq!(
            d.if_not_local(IpFamily::V4).as_deref(),
            Some("! -s 10.244.0.0/16")
        );
        assert_eq!(d.if_not_local(IpFamily::V6).as_deref(), Some("! -s fd00:10::/64"));
        let none = LocalDetector::Cidrs(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(none.if_local(IpFamily::V6), None);
        let prefix = LocalDetector::InterfaceNamePrefix("veth".into());
        assert_eq!(prefix.if_not_local(IpFamily::V4).as_deref(), Some("! -i veth+"));
        assert_eq!(
            LocalDetector::BridgeInterface("cbr0".into())
                .if_local(IpFamily::V6)
                .as_deref(),
            Some("-i cbr0")
        );
    }

    #[test]
    fn interface_names_validated() {
        let mut cfg = RenderConfig {
            local_detector: LocalDetector::BridgeInterface("br 0".into()),
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
        cfg.local_detector = LocalDetector::InterfaceNamePrefix("a-very-long-name0".into());
        assert!(cfg.validate().is_err());
        cfg.local_detector = LocalDetector::InterfaceNamePrefix("cali".into());
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn localhost_node_ports_need_ipv4_loopback() {
        let mut cfg = RenderConfig {
            localhost_node_ports: true,
            ..Default::default()
        };
        assert!(cfg.localhost_node_ports_active());
        cfg.node_port_addresses = NodePortAddresses::Ips(vec!["10.0.0.10".parse().unwrap()]);
        assert!(!cfg.localhost_node_ports_active());
        cfg.node_port_addresses = NodePortAddresses::Ips(vec!["127.0.0.1".parse().unwrap()]);
        assert!(cfg.localhost_node_ports_active());
        cfg.family = IpFamily::V6;
        assert!(!cfg.localhost_node_ports_active());
    }
}
