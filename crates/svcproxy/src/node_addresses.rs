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

    /// Resolves against this node's addresses. A CIDR list that matches a zero-length prefix of the family
    /// means "everything", as upstream treats `0.0.0.0/0`.
    pub fn resolve(&self, family: IpFamily, local: &[IpAddr], node: Option<&Node>) -> NodePortAddresses {
        match self {
            NodePortSpec::All => NodePortAddresses::All,
            NodePortSpec::Cidrs(cidrs) => {
                let cidrs: Vec<&IpNet> = cidrs.iter().filter(|c| family.contains(&c.addr())).collect();
                if cidrs.iter().any(|c| c.prefix_len() == 0) {
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
            NodePortSpec::Primary => NodePortAddresses::Ips(primary_ip(family, node).into_iter().collect()),
        }
    }
}

/// The Node's first address of the family (InternalIP before ExternalIP, as the API orders them).
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
            primary.resolve(IpFamily::V4, &local, Some(&node)),
            NodePortAddresses::Ips(vec![ip("10.0.0.10")])
        );
        assert!(NodePortSpec::parse(&["eth0".into()]).is_err());
    }
}
