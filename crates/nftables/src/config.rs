//! Node-level settings that shape the rendered table (kube-proxy's flags, where they apply to nftables).

use std::net::IpAddr;

use ipnet::IpNet;
use svcproxy_model::IpFamily;
use thiserror::Error;

use crate::addr_text::prefix_set_text;
use crate::ruleset::Family;

/// How "traffic from a local pod" is recognised (upstream `--detect-local-mode`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalDetector {
    /// No detector: no ClusterIP masquerade rule (unless masquerade-all) and no pod short-circuit in the
    /// external chains of Local-policy services.
    #[default]
    None,
    /// Pod source CIDRs (cluster CIDR or the node's pod CIDRs). Unlike iptables, one nft match can test
    /// several prefixes at once, so every CIDR of the family is used.
    Cidrs(Vec<IpNet>),
    /// Pods sit behind this bridge.
    BridgeInterface(String),
    /// Pod interfaces share this name prefix.
    InterfaceNamePrefix(String),
}

/// Which local addresses accept NodePort traffic (upstream `--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every local address except loopback (`fib daddr type local`). Loopback is excluded because NodePorts
    /// on 127.0.0.1 need `route_localnet`, which opens the node to martian packets.
    #[default]
    All,
    /// Only these node addresses, already resolved from the configured CIDRs by the caller.
    Ips(Vec<IpAddr>),
}

/// How a policy chain picks one of its endpoints. Measured on 5,000 services × 10 endpoints; see
/// [`crate::dispatch`] for the figures behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchLayout {
    /// Upstream's shape: one chain per endpoint, and one rule with an anonymous
    /// `numgen random mod N vmap { 0 : goto …, … }` per policy chain, even for a single endpoint.
    NumgenVmap,
    /// One chain per endpoint; up to `max_endpoints` endpoints, a cascade of `numgen random mod k 0 goto …`
    /// rules, each taking its endpoint with probability 1/k of what is left (uniform overall), and a plain
    /// `goto` for the last or only one. No anonymous map, whose count is what makes the kernel's cost of
    /// adding rules grow with the table. Larger services use the vmap.
    Cascade { max_endpoints: usize },
    /// The same cascade, but each rule DNATs itself (`numgen random mod k 0 meta l4proto tcp dnat to …`), so
    /// there are no endpoint chains at all; hairpin traffic is recognised in postrouting instead (a DNATed
    /// connection whose source equals its new destination). Larger services use endpoint chains and the vmap.
    Direct { max_endpoints: usize },
    /// One rule per policy chain, `dnat ip to numgen random mod N offset B map @endpoints-K`, its endpoints
    /// being elements of one of the shared endpoint maps ([`crate::slots`]): an endpoint change is a change of
    /// map elements only, and the table has one rule per policy chain instead of one per endpoint. Chains with
    /// ClientIP affinity, which must remember the endpoint each client took, use the `Direct` cascade.
    Mapped,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("masquerade bit {0} is out of range (0..=31)")]
    MasqueradeBit(u8),
    #[error("interface name {0:?} is not a valid nft interface match")]
    InterfaceName(String),
    #[error("table name {0:?} is not a valid nft identifier")]
    TableName(String),
    #[error("cascade limit must be at least 1")]
    CascadeLimit,
}

/// Our table's name in production, in the `ip` and `ip6` families.
pub const TABLE_NAME: &str = "svcproxy";

/// Everything besides the intent that decides the rendered table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    pub family: IpFamily,
    /// The table's name; `svcproxy` in production, something else only in tests that share a namespace.
    pub table: String,
    /// Bit of the packet mark that requests masquerading (upstream default 14).
    pub masquerade_bit: u8,
    /// Masquerade all ClusterIP traffic, not only traffic from outside the pod network.
    pub masquerade_all: bool,
    pub local_detector: LocalDetector,
    pub node_port_addresses: NodePortAddresses,
    /// The node's primary address in this family. A load-balancer source range containing it also admits the
    /// LB VIPs as sources, because node-to-VIP traffic on VIP-as-local-address LBs loops back with the VIP as
    /// source.
    pub node_ip: Option<IpAddr>,
    /// Service CIDRs: traffic to an address inside them that is no ClusterIP is dropped, so clients of a
    /// deleted service fail fast instead of leaking to the default route.
    pub service_cidrs: Vec<IpNet>,
    pub dispatch: DispatchLayout,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            family: IpFamily::V4,
            table: TABLE_NAME.into(),
            masquerade_bit: 14,
            masquerade_all: false,
            local_detector: LocalDetector::None,
            node_port_addresses: NodePortAddresses::All,
            node_ip: None,
            service_cidrs: Vec::new(),
            dispatch: crate::dispatch::DEFAULT_LAYOUT,
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
            // IFNAMSIZ is 16 including the NUL; the name ends up inside a quoted string.
            let valid = !name.is_empty()
                && name.len() < 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'*' | b'/'));
            if !valid {
                return Err(ConfigError::InterfaceName(name.clone()));
            }
        }
        let valid_table = !self.table.is_empty()
            && self.table.len() < 64
            && self.table.starts_with(|c: char| c.is_ascii_alphabetic())
            && self
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_table {
            return Err(ConfigError::TableName(self.table.clone()));
        }
        if let DispatchLayout::Cascade { max_endpoints: 0 } | DispatchLayout::Direct { max_endpoints: 0 } =
            self.dispatch
        {
            return Err(ConfigError::CascadeLimit);
        }
        Ok(())
    }

    pub fn nft_family(&self) -> Family {
        match self.family {
            IpFamily::V4 => Family::Ip,
            IpFamily::V6 => Family::Ip6,
        }
    }

    /// The payload keyword for addresses: `ip saddr` / `ip6 saddr`.
    pub fn addr(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    pub fn addr_type(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }

    pub fn loopback(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1",
        }
    }

    /// The mark bit as `nft` prints a 32-bit mark: zero-padded to eight hex digits.
    pub fn mark(&self) -> String {
        format!("0x{:08x}", 1u32 << (self.masquerade_bit & 31))
    }

    fn detector_cidrs(&self) -> Vec<IpNet> {
        match &self.local_detector {
            LocalDetector::Cidrs(cidrs) => cidrs
                .iter()
                .filter(|c| self.family.contains(&c.addr()))
                .map(IpNet::trunc)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The match selecting local pod traffic (`ip saddr 10.244.0.0/16`); `None` without a detector.
    pub fn if_local(&self) -> Option<String> {
        self.detector_match(false)
    }

    /// The match selecting everything else (`ip saddr != 10.244.0.0/16`).
    pub fn if_not_local(&self) -> Option<String> {
        self.detector_match(true)
    }

    fn detector_match(&self, negate: bool) -> Option<String> {
        let op = if negate { "!= " } else { "" };
        match &self.local_detector {
            LocalDetector::None => None,
            LocalDetector::Cidrs(_) => {
                let cidrs = self.detector_cidrs();
                if cidrs.is_empty() {
                    return None;
                }
                Some(format!("{} saddr {op}{}", self.addr(), prefix_set_text(&cidrs)))
            }
            LocalDetector::BridgeInterface(name) => Some(format!("iifname {op}\"{name}\"")),
            LocalDetector::InterfaceNamePrefix(prefix) => Some(format!("iifname {op}\"{prefix}*\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_and_detector_text() {
        let mut cfg = RenderConfig {
            local_detector: LocalDetector::Cidrs(vec![
                "10.244.1.7/16".parse().unwrap(),
                "fd00:10::/64".parse().unwrap(),
            ]),
            ..Default::default()
        };
        assert_eq!(cfg.mark(), "0x00004000");
        assert_eq!(cfg.if_not_local().unwrap(), "ip saddr != 10.244.0.0/16");
        cfg.family = IpFamily::V6;
        assert_eq!(cfg.if_local().unwrap(), "ip6 saddr fd00:10::/64");
        cfg.local_detector = LocalDetector::InterfaceNamePrefix("veth".into());
        assert_eq!(cfg.if_not_local().unwrap(), "iifname != \"veth*\"");
        assert!(cfg.validate().is_ok());
        cfg.local_detector = LocalDetector::BridgeInterface("a\"b".into());
        assert!(cfg.validate().is_err());
        cfg.local_detector = LocalDetector::None;
        cfg.masquerade_bit = 32;
        assert_eq!(cfg.validate(), Err(ConfigError::MasqueradeBit(32)));
    }
}
