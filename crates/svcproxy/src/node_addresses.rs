//! Which node addresses accept NodePort traffic (`--nodeport-addresses`), and the local addresses that
//! decision needs.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use svcproxy_iptables::config::NodePortAddresses;
use svcproxy_model::{IpFamily, Node};

/// The flag's meaning before local addresses are known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodePortSpec {
    /// Unset: every local address.
    #[default]
    All,
    /// Local addresses inside any of these CIDRs.
    Cidrs(Vec<IpNet>),
    /// The Node object's primary address of each family (upstream's `primary` keyword).
    Primary,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--nodeport-addresses: {0:?} is neither a CIDR nor \"primary\"")]
pub struct NodePortSpecError(String);

impl NodePortSpec {
    pub fn parse(values: &[String]) -> Result<Self, NodePortSpecError> {
        let values: Vec<&str> = values
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Ok(NodePortSpec::All);
        }
        if values == ["primary"] {
            return Ok(NodePortSpec::Primary);
        }
        values
            .iter()
            .map(|v| IpNet::from_str(v).map_err(|_| NodePortSpecError(v.to_string())))
            .collect::<Result<Vec<_>, _>>()
            .map(NodePortSpec::Cidrs)
    }

    /// Whether IPv4 NodePorts may be accepted on 127.0.0.1 (with localhost NodePorts on): every address, or a
    /// list whose IPv4 part includes the loopback network or is empty. `primary` is taken to exclude it.
    pub fn may_accept_ipv4_loopback(&self) -> bool {
        let loopback = IpAddr::from(std::net::Ipv4Addr::LOCALHOST);
        match self {
            NodePortSpec::All => true,
            NodePortSpec::Cidrs(cidrs) => {
                let v4: Vec<&IpNet> = cidrs.iter().filter(|c| c.addr().is_ipv4()).collect();
                v4.is_empty() || v4.iter().any(|c| c.contains(&loopback))
            }
            NodePortSpec::Primary => false,
        }
    }

    /// Resolves against this node's local addresses, as upstream does: the local addresses of `family` inside
    /// the CIDRs (`primary` being `node_ip`, the node's address of the family), except that a list with a
    /// zero-length prefix of the family, or with nothing of the family at all, means every local address. So
    /// `--nodeport-addresses 10.0.0.0/8` on a dual-stack node restricts IPv4 NodePorts and leaves IPv6 ones
    /// open (closing them would break a family the operator did not mention), and `primary` on a node with
    /// no address of a family (or no Node object) opens them on every address of that family.
    pub fn resolve(&self, family: IpFamily, local: &[IpAddr], node_ip: Option<IpAddr>) -> NodePortAddresses {
        let cidrs: Vec<IpNet> = match self {
            NodePortSpec::All => return NodePortAddresses::All,
            NodePortSpec::Cidrs(cidrs) => cidrs
                .iter()
                .copied()
                .filter(|c| family.contains(&c.addr()))
                .collect(),
            NodePortSpec::Primary => node_ip
                .filter(|ip| family.contains(ip) && !ip.is_loopback())
                .map(IpNet::from)
                .into_iter()
                .collect(),
        };
        if cidrs.is_empty() || cidrs.iter().any(|c| c.prefix_len() == 0) {
            return NodePortAddresses::All;
        }
        let mut ips: Vec<IpAddr> = local
            .iter()
            .copied()
            .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
            .collect();
        ips.sort();
        ips.dedup();
        NodePortAddresses::Ips(ips)
    }
}

/// The Node's first address of the family (every InternalIP comes before every ExternalIP, see
/// `source::convert::node`).
pub fn primary_ip(family: IpFamily, node: Option<&Node>) -> Option<IpAddr> {
    node.and_then(|n| n.addresses.iter().copied().find(|ip| family.contains(ip)))
}

/// Reads the addresses configured on this host's interfaces.
pub trait LocalAddresses: Send {
    fn addresses(&self) -> Vec<IpAddr>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemAddresses;

impl LocalAddresses for SystemAddresses {
    fn addresses(&self) -> Vec<IpAddr> {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return Vec::new();
        };
        addrs
            .filter_map(|a| a.address)
            .filter_map(|a| {
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect()
    }
}

/// A fixed list, for tests.
#[derive(Debug, Default, Clone)]
pub struct FixedAddresses(pub Vec<IpAddr>);

impl LocalAddresses for FixedAddresses {
    fn addresses(&self) -> Vec<IpAddr> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_resolves() {
        let local = [ip("10.0.0.10"), ip("192.168.1.5"), ip("127.0.0.1"), ip("fd00::1")];
        assert_eq!(NodePortSpec::parse(&[]).unwrap(), NodePortSpec::All);
        let spec = NodePortSpec::parse(&["10.0.0.0/8".into()]).unwrap();
        assert_eq!(
            spec.resolve(IpFamily::V4, &local, None),
            NodePortAddresses::Ips(vec![ip("10.0.0.10")])
        );
        let all = NodePortSpec::parse(&["0.0.0.0/0".into()]).unwrap();
        assert_eq!(all.resolve(IpFamily::V4, &local, None), NodePortAddresses::All);
        let node = Node {
            addresses: vec![ip("fd00::1"), ip("10.0.0.10")],
            ..Default::default()
        };
        let primary = NodePortSpec::parse(&["primary".into()]).unwrap();
        assert_eq!(
            primary.resolve(IpFamily::V4, &local, primary_ip(IpFamily::V4, Some(&node))),
            NodePortAddresses::Ips(vec![ip("10.0.0.10")])
        );
        assert!(NodePortSpec::parse(&["eth0".into()]).is_err());
    }

    #[test]
    fn a_family_the_list_does_not_name_keeps_every_address() {
        let local = [ip("10.0.0.10"), ip("fd00::1"), ip("fd00::2")];
        let v4_only = NodePortSpec::parse(&["10.0.0.0/24".into()]).unwrap();
        assert_eq!(
            v4_only.resolve(IpFamily::V4, &local, None),
            NodePortAddresses::Ips(vec![ip("10.0.0.10")])
        );
        assert_eq!(
            v4_only.resolve(IpFamily::V6, &local, None),
            NodePortAddresses::All
        );
        // A CIDR of the family that matches no local address is a restriction all the same.
        let elsewhere = NodePortSpec::parse(&["192.168.0.0/16".into(), "fd00::/64".into()]).unwrap();
        assert_eq!(
            elsewhere.resolve(IpFamily::V4, &local, None),
            NodePortAddresses::Ips(vec![])
        );

        let primary = NodePortSpec::Primary;
        let v4_node = Node {
            addresses: vec![ip("10.0.0.10")],
            ..Default::default()
        };
        assert_eq!(
            primary.resolve(IpFamily::V4, &local, primary_ip(IpFamily::V4, Some(&v4_node))),
            NodePortAddresses::Ips(vec![ip("10.0.0.10")])
        );
        assert_eq!(
            primary.resolve(IpFamily::V6, &local, primary_ip(IpFamily::V6, Some(&v4_node))),
            NodePortAddresses::All
        );
        assert!(!primary.may_accept_ipv4_loopback());
        assert!(NodePortSpec::All.may_accept_ipv4_loopback());
        assert!(!v4_only.may_accept_ipv4_loopback());
        let v6_only = NodePortSpec::parse(&["fd00::/64".into()]).unwrap();
        assert!(v6_only.may_accept_ipv4_loopback());
        let with_lo = NodePortSpec::parse(&["10.0.0.0/8".into(), "127.0.0.0/8".into()]).unwrap();
        assert!(with_lo.may_accept_ipv4_loopback());
        assert_eq!(
            primary.resolve(IpFamily::V4, &local, None),
            NodePortAddresses::All
        );
        // The primary address counts only while it is on this host.
        let moved = Node {
            addresses: vec![ip("10.0.0.99")],
            ..Default::default()
        };
        assert_eq!(
            primary.resolve(IpFamily::V4, &local, primary_ip(IpFamily::V4, Some(&moved))),
            NodePortAddresses::Ips(vec![])
        );
    }
}
