use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::{EndpointSlice, IpFamily, ServicePortName};

/// One backend of one service port, merged from every slice that lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint runs on this node.
    pub is_local: bool,
    pub zone_hints: Option<Arc<BTreeSet<String>>>,
    pub node_hints: Option<Arc<BTreeSet<String>>>,
}

impl EndpointInfo {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// `ip:port`, or `[ip]:port` for IPv6: the form upstream hashes into endpoint chain names and sorts by.
impl fmt::Display for EndpointInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.socket_addr())
    }
}

/// Merges the slices of one Service into the endpoint list of one of its ports.
///
/// Matches upstream's endpoint cache: a slice port matches by name and protocol; ports without a number are
/// skipped; addresses of another family are ignored; the same `ip:port` listed twice (slices overlap while the
/// controller moves endpoints between them, or a pod's address is reused while the old pod is still terminating)
/// collapses into one, preferring a copy that is not terminating, then a local one; the result is
/// sorted by the `ip:port` *string*, byte-wise, because that order decides probabilities and chain order
/// upstream and we want identical rules.
pub fn endpoints_for_port<'a>(
    port: &ServicePortName,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    family: IpFamily,
    node_name: &str,
) -> Vec<EndpointInfo> {
    let mut by_addr: BTreeMap<String, EndpointInfo> = BTreeMap::new();
    for slice in slices {
        if slice.address_family != Some(family) {
            continue;
        }
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.port && p.protocol == port.protocol && p.port != 0)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if !family.contains(&ep.address) {
                continue;
            }
            let info = EndpointInfo {
                ip: ep.address,
                port: slice_port.port,
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                is_local: ep.node_name.as_deref() == Some(node_name) && !node_name.is_empty(),
                zone_hints: ep.zone_hints.clone(),
                node_hints: ep.node_hints.clone(),
            };
            // The live pod wins over a terminating one that held the address before it: upstream kept the
            // local copy first, which let a terminating pod on this node hide the address's new, ready owner
            // elsewhere until it was gone (and later switched to this order).
            let key = info.to_string();
            let rank = |e: &EndpointInfo| (!e.terminating, e.is_local);
            match by_addr.get(&key) {
                Some(existing) if rank(existing) >= rank(&info) => {}
                _ => {
                    by_addr.insert(key, info);
                }
            }
        }
    }
    // BTreeMap<String, _> iterates in byte-wise key order, which is exactly upstream's sort.
    by_addr.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endpoint, EndpointPort, ObjectName, Protocol};

    fn slice(name: &str, port_name: &str, port: u16, eps: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            name: ObjectName::new("ns", name),
            service_name: "svc".into(),
            address_family: Some(IpFamily::V4),
            ports: vec![EndpointPort {
                name: port_name.into(),
                protocol: Protocol::Tcp,
                port,
            }],
            endpoints: eps,
            last_change_trigger_time: None,
        }
    }

    fn spn(port: &str) -> ServicePortName {
        ServicePortName::new(ObjectName::new("ns", "svc"), port, Protocol::Tcp)
    }

    #[test]
    fn sorts_by_string_not_number() {
        let s = slice(
            "a",
            "p",
            11,
            vec![
                Endpoint::ready("10.1.1.1".parse().unwrap(), None),
                Endpoint::ready("10.1.1.11".parse().unwrap(), None),
            ],
        );
        let eps = endpoints_for_port(&spn("p"), [&s], IpFamily::V4, "n");
        let got: Vec<String> = eps.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.1.1.11:11", "10.1.1.1:11"]);
    }

    #[test]
    fn duplicates_across_slices_collapse_preferring_local() {
        let a = slice(
            "a",
            "p",
            80,
            vec![Endpoint::ready("10.0.0.1".parse().unwrap(), Some("other"))],
        );
        let b = slice(
            "b",
            "p",
            80,
            vec![Endpoint::ready("10.0.0.1".parse().unwrap(), Some("me"))],
        );
        for order in [[&a, &b], [&b, &a]] {
            let eps = endpoints_for_port(&spn("p"), order, IpFamily::V4, "me");
            assert_eq!(eps.len(), 1);
            assert!(eps[0].is_local);
        }
    }

    #[test]
    fn a_reused_address_goes_to_the_live_pod_not_the_terminating_one() {
        let mut ghost = Endpoint::ready("10.0.0.1".parse().unwrap(), Some("me"));
        (ghost.ready, ghost.serving, ghost.terminating) = (false, false, true);
        let a = slice("a", "p", 80, vec![ghost]);
        let b = slice(
            "b",
            "p",
            80,
            vec![Endpoint::ready("10.0.0.1".parse().unwrap(), Some("other"))],
        );
        for order in [[&a, &b], [&b, &a]] {
            let eps = endpoints_for_port(&spn("p"), order, IpFamily::V4, "me");
            assert_eq!(eps.len(), 1);
            assert!(eps[0].ready && !eps[0].terminating && !eps[0].is_local);
        }
    }

    #[test]
    fn port_matched_by_name_and_protocol() {
        let s = slice(
            "a",
            "http",
            8080,
            vec![Endpoint::ready("10.0.0.1".parse().unwrap(), None)],
        );
        assert!(endpoints_for_port(&spn("https"), [&s], IpFamily::V4, "n").is_empty());
        let udp = ServicePortName::new(ObjectName::new("ns", "svc"), "http", Protocol::Udp);
        assert!(endpoints_for_port(&udp, [&s], IpFamily::V4, "n").is_empty());
        assert_eq!(
            endpoints_for_port(&spn("http"), [&s], IpFamily::V4, "n")[0].port,
            8080
        );
    }

    #[test]
    fn other_family_and_fqdn_slices_ignored() {
        let mut s = slice(
            "a",
            "p",
            80,
            vec![Endpoint::ready("10.0.0.1".parse().unwrap(), None)],
        );
        assert!(endpoints_for_port(&spn("p"), [&s], IpFamily::V6, "n").is_empty());
        s.address_family = None;
        assert!(endpoints_for_port(&spn("p"), [&s], IpFamily::V4, "n").is_empty());
    }
}
