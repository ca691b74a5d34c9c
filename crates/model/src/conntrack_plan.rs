//! Which connection-tracking entries are stale after a sync.
//!
//! The kernel keeps NAT decisions in conntrack: once a UDP or SCTP flow was DNAT-ed to an endpoint, every
//! later packet of that flow follows the recorded decision, not the rules. Neither protocol ends its flows
//! the way TCP does (a RST from a dead pod, a FIN), so a chatty client stays pinned to a deleted pod, or to
//! the un-translated service address it hit while the service had no endpoints, until the entry idles out,
//! which it never does while the client keeps sending. Deleting those entries lets the next packet go
//! through the current rules.
//!
//! The plan is a reconciler over a listing of the table rather than a diff of endpoint events, so it is
//! right after a restart and cannot miss a change that happened between two syncs. A flow is stale when its
//! original destination is a frontend of a UDP or SCTP service port (cluster IP, external IP or
//! load-balancer IP with the service port, or a node address with the NodePort) and its reply source is not
//! one of the endpoints that port may send to now. Compared with upstream kube-proxy:
//! - the NodePort match also requires the destination to be one of this node's addresses, so flows of
//!   other hosts that happen to use the same port number are left alone;
//! - a port with no endpoints at all is not skipped: every flow to it is stale, so clients stop being
//!   pinned to a pod that is gone;
//! - the reply source is compared as address *and* port, so a changed target port also releases old flows;
//! - SCTP is cleaned as well as UDP (its established timeout is days);
//! - [`stale_flows_since`] also releases flows to frontends that disappeared, which a pure listing cannot
//!   recognise because nothing marks an address as having been a service;
//! - "may send to" is, as upstream has it, any serving endpoint: the ones the rules pick, and those they no
//!   longer pick but that still serve (a pod terminating while others are ready, one the topology hints
//!   leave out), so a draining pod keeps the sessions it has while new ones go elsewhere.
//!
//! Flows of other protocols, flows to addresses that are no frontend, and flows whose reply source is a
//! current endpoint are never selected.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::{Intent, Protocol, ServicePortIntent};

/// The transport protocol of a tracked flow, as its IP protocol number says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FlowProtocol {
    Tcp,
    Udp,
    Sctp,
    /// Any other IP protocol number (ICMP, GRE, ...): listed so the table can be shown whole, never cleaned.
    Other(u8),
}

impl FlowProtocol {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const SCTP: u8 = 132;
    const DCCP: u8 = 33;
    const UDPLITE: u8 = 136;

    pub fn from_number(number: u8) -> Self {
        match number {
            Self::TCP => FlowProtocol::Tcp,
            Self::UDP => FlowProtocol::Udp,
            Self::SCTP => FlowProtocol::Sctp,
            other => FlowProtocol::Other(other),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            FlowProtocol::Tcp => Self::TCP,
            FlowProtocol::Udp => Self::UDP,
            FlowProtocol::Sctp => Self::SCTP,
            FlowProtocol::Other(n) => n,
        }
    }

    /// Whether the kernel identifies flows of this protocol by port numbers. Only such flows can be named by
    /// a plain address-and-port tuple; the others (ICMP's id/type/code, GRE's keys) need more.
    pub fn has_ports(self) -> bool {
        match self {
            FlowProtocol::Tcp | FlowProtocol::Udp | FlowProtocol::Sctp => true,
            FlowProtocol::Other(n) => n == Self::DCCP || n == Self::UDPLITE,
        }
    }

    /// The lower-case name the `conntrack` tool prints.
    pub fn name(self) -> String {
        match self {
            FlowProtocol::Tcp => "tcp".into(),
            FlowProtocol::Udp => "udp".into(),
            FlowProtocol::Sctp => "sctp".into(),
            FlowProtocol::Other(n) => format!("proto-{n}"),
        }
    }
}

impl From<Protocol> for FlowProtocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => FlowProtocol::Tcp,
            Protocol::Udp => FlowProtocol::Udp,
            Protocol::Sctp => FlowProtocol::Sctp,
        }
    }
}

/// One direction of a flow. Ports are 0 for protocols without ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FlowTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowTuple {
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        FlowTuple {
            src: src.ip(),
            dst: dst.ip(),
            src_port: src.port(),
            dst_port: dst.port(),
        }
    }

    pub fn src_addr(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.src_port)
    }

    pub fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dst_port)
    }
}

/// One conntrack entry, reduced to what stale-flow cleanup needs to recognise and to delete it.
///
/// `original` is the packet as the client sent it (before DNAT); `reply` is what the answer looks like, so
/// its source is where the kernel actually sends the flow: the chosen endpoint, or the service address
/// itself when nothing translated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FlowEntry {
    pub protocol: FlowProtocol,
    pub original: FlowTuple,
    pub reply: FlowTuple,
    /// Conntrack zone; the same tuple may exist once per zone, and a delete must name the right one.
    pub zone: u16,
    /// The kernel's id of this entry, when listed from the kernel. Deleting with it makes sure a newer entry
    /// that reuses the tuple after this one expired is left alone.
    pub id: Option<u32>,
}

impl FlowEntry {
    /// A zone-0 entry without kernel id: the shape tests and fakes build.
    pub fn new(protocol: FlowProtocol, original: FlowTuple, reply: FlowTuple) -> Self {
        FlowEntry {
            protocol,
            original,
            reply,
            zone: 0,
            id: None,
        }
    }
}

/// The `conntrack -L` layout, so logged entries can be compared with the tool's output by eye.
impl fmt::Display for FlowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.protocol.name())?;
        for t in [&self.original, &self.reply] {
            write!(f, " src={} dst={}", t.src, t.dst)?;
            if self.protocol.has_ports() {
                write!(f, " sport={} dport={}", t.src_port, t.dst_port)?;
            }
        }
        if self.zone != 0 {
            write!(f, " zone={}", self.zone)?;
        }
        Ok(())
    }
}

/// Service ports whose flows are cleaned. TCP is left to the protocol: a connection to a dead pod gets a RST
/// or times out, and killing live TCP connections because the endpoint set changed would be worse.
fn cleaned(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Udp | Protocol::Sctp)
}

/// Every UDP/SCTP frontend of an intent, with the endpoints a flow to it may legitimately be translated to.
#[derive(Debug, Default)]
struct Frontends {
    by_address: HashMap<(FlowProtocol, SocketAddr), HashSet<SocketAddr>>,
    by_node_port: HashMap<(FlowProtocol, u16), HashSet<SocketAddr>>,
    node_ips: HashSet<IpAddr>,
}

impl Frontends {
    fn new(node_ips: &[IpAddr]) -> Self {
        Frontends {
            node_ips: node_ips.iter().copied().collect(),
            ..Frontends::default()
        }
    }

    fn from_intent(intent: &Intent, node_ips: &[IpAddr]) -> Self {
        let mut f = Frontends::new(node_ips);
        for spi in intent.service_ports.values() {
            f.add(spi, &serving(spi));
        }
        f
    }

    /// Records the frontends of one port. Several ports may share a frontend (conflicting external IPs, a
    /// shared load-balancer address): a flow is then kept if any of them may send it where it goes.
    fn add(&mut self, spi: &ServicePortIntent, keep: &HashSet<SocketAddr>) {
        if !cleaned(spi.name.protocol) {
            return;
        }
        let protocol = FlowProtocol::from(spi.name.protocol);
        let addresses = std::iter::once(spi.cluster_ip)
            .chain(spi.external_ips.iter().copied())
            .chain(spi.load_balancer_ips.iter().copied());
        for ip in addresses {
            self.by_address
                .entry((protocol, SocketAddr::new(ip, spi.port)))
                .or_default()
                .extend(keep);
        }
        if let Some(node_port) = spi.node_port {
            self.by_node_port
                .entry((protocol, node_port))
                .or_default()
                .extend(keep);
        }
    }

    /// Adds, with no allowed endpoint, every frontend of `previous` that `self` does not have: the service
    /// port was deleted (or changed protocol or port), so nothing may still reach it through an old decision.
    fn add_removed(&mut self, previous: &Intent) {
        let mut gone = Frontends::new(&[]);
        for spi in previous.service_ports.values() {
            gone.add(spi, &HashSet::new());
        }
        for (key, _) in gone.by_address {
            self.by_address.entry(key).or_default();
        }
        for (key, _) in gone.by_node_port {
            self.by_node_port.entry(key).or_default();
        }
    }

    fn is_stale(&self, entry: &FlowEntry) -> bool {
        let dst = entry.original.dst_addr();
        let by_address = self.by_address.get(&(entry.protocol, dst));
        let by_node_port = if self.node_ips.contains(&dst.ip()) {
            self.by_node_port.get(&(entry.protocol, dst.port()))
        } else {
            None
        };
        let matched: Vec<&HashSet<SocketAddr>> = by_address.into_iter().chain(by_node_port).collect();
        if matched.is_empty() {
            return false;
        }
        let target = entry.reply.src_addr();
        !matched.iter().any(|keep| keep.contains(&target))
    }
}

/// Where a port's flows may go on: every endpoint any of its rules can pick, and the serving endpoints that
/// are draining.
fn serving(spi: &ServicePortIntent) -> HashSet<SocketAddr> {
    let e = &spi.endpoints;
    e.cluster
        .iter()
        .chain(&e.local)
        .chain(e.all_reachable())
        .map(|ep| ep.socket_addr())
        .chain(spi.draining.iter().copied())
        .collect()
}

/// The entries of `entries` (a listing of one family's table) that must be deleted so that every UDP/SCTP
/// flow to a frontend of `intent` goes to one of its current endpoints.
///
/// `node_ips` are the addresses NodePorts answer on (the resolved NodePort addresses, plus loopback when
/// localhost NodePorts are enabled); a flow to a NodePort number on any other address is not a NodePort flow.
pub fn stale_flows(entries: &[FlowEntry], intent: &Intent, node_ips: &[IpAddr]) -> Vec<FlowEntry> {
    select(entries, &Frontends::from_intent(intent, node_ips))
}

/// Like [`stale_flows`], and also every UDP/SCTP flow to a frontend that `previous` had and `current` no
/// longer has. Use it when the previously applied intent is known; after a restart [`stale_flows`] is all
/// there is, and flows to services deleted meanwhile then age out on their own.
pub fn stale_flows_since(
    entries: &[FlowEntry],
    previous: &Intent,
    current: &Intent,
    node_ips: &[IpAddr],
) -> Vec<FlowEntry> {
    let mut frontends = Frontends::from_intent(current, node_ips);
    frontends.add_removed(previous);
    select(entries, &frontends)
}

fn select(entries: &[FlowEntry], frontends: &Frontends) -> Vec<FlowEntry> {
    entries
        .iter()
        .filter(|e| frontends.is_stale(e))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Categorized;
    use crate::{EndpointInfo, ObjectName, ServicePortName, ServiceType, SessionAffinity};

    const NODE: &str = "192.168.1.10";
    const CLIENT: &str = "10.244.0.5";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(addr: &str) -> EndpointInfo {
        let sa: SocketAddr = addr.parse().unwrap();
        EndpointInfo {
            ip: sa.ip(),
            port: sa.port(),
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            zone_hints: None,
            node_hints: None,
        }
    }

    /// A service port; `endpoints` go into the cluster set, as for a plain Cluster-policy service.
    fn port(name: &str, protocol: Protocol, vip: &str, port: u16, endpoints: &[&str]) -> ServicePortIntent {
        let eps: Vec<EndpointInfo> = endpoints.iter().map(|e| ep(e)).collect();
        ServicePortIntent {
            name: ServicePortName::new(ObjectName::new("ns", name), "p", protocol),
            service_type: ServiceType::ClusterIP,
            cluster_ip: ip(vip),
            port,
            node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            session_affinity: SessionAffinity::None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: None,
            local_ready_ips: Vec::new(),
            draining: Vec::new(),
            endpoints: Categorized::new(eps.clone(), Vec::new(), !eps.is_empty()),
            total_endpoints: endpoints.len(),
            content_hash: 0,
        }
    }

    fn udp(name: &str, vip: &str, endpoints: &[&str]) -> ServicePortIntent {
        port(name, Protocol::Udp, vip, 53, endpoints)
    }

    fn intent(ports: Vec<ServicePortIntent>) -> Intent {
        Intent {
            service_ports: ports
                .into_iter()
                .map(|p| (p.name.clone(), std::sync::Arc::new(p)))
                .collect(),
        }
    }

    /// A flow from `client` to `dst` that the kernel sends to `target` (the reply comes from there).
    fn flow(protocol: FlowProtocol, client: &str, dst: &str, target: &str) -> FlowEntry {
        let client = SocketAddr::new(ip(client), 40000);
        let dst: SocketAddr = dst.parse().unwrap();
        let target: SocketAddr = target.parse().unwrap();
        FlowEntry::new(
            protocol,
            FlowTuple::new(client, dst),
            FlowTuple::new(target, client),
        )
    }

    fn udp_flow(dst: &str, target: &str) -> FlowEntry {
        flow(FlowProtocol::Udp, CLIENT, dst, target)
    }

    struct Case {
        name: &'static str,
        intent: Intent,
        flow: FlowEntry,
        stale: bool,
    }

    fn with_node_port(mut p: ServicePortIntent, node_port: u16) -> ServicePortIntent {
        p.service_type = ServiceType::NodePort;
        p.node_port = Some(node_port);
        p
    }

    fn cases() -> Vec<Case> {
        let dns = || udp("dns", "10.96.0.10", &["10.244.1.2:53"]);
        vec![
            Case {
                name: "flow to the current endpoint is kept",
                intent: intent(vec![dns()]),
                flow: udp_flow("10.96.0.10:53", "10.244.1.2:53"),
                stale: false,
            },
            Case {
                name: "endpoint replaced: flow to the old pod is stale",
                intent: intent(vec![dns()]),
                flow: udp_flow("10.96.0.10:53", "10.244.1.1:53"),
                stale: true,
            },
            Case {
                name: "target port changed: flow to the old port is stale",
                intent: intent(vec![dns()]),
                flow: udp_flow("10.96.0.10:53", "10.244.1.2:5353"),
                stale: true,
            },
            Case {
                name: "scaled to zero: flow to the dead pod is stale",
                intent: intent(vec![udp("dns", "10.96.0.10", &[])]),
                flow: udp_flow("10.96.0.10:53", "10.244.1.2:53"),
                stale: true,
            },
            Case {
                name: "zero to one: un-translated flow from the empty period is stale",
                intent: intent(vec![dns()]),
                flow: udp_flow("10.96.0.10:53", "10.96.0.10:53"),
                stale: true,
            },
            Case {
                name: "flow of another service to its own endpoint is untouched",
                intent: intent(vec![dns(), udp("other", "10.96.0.20", &["10.244.3.3:53"])]),
                flow: udp_flow("10.96.0.20:53", "10.244.3.3:53"),
                stale: false,
            },
            Case {
                name: "another port of the same address is untouched",
                intent: intent(vec![dns()]),
                flow: udp_flow("10.96.0.10:54", "10.244.9.9:54"),
                stale: false,
            },
            Case {
                name: "non-service flow is untouched",
                intent: intent(vec![dns()]),
                flow: udp_flow("8.8.8.8:53", "8.8.8.8:53"),
                stale: false,
            },
            Case {
                name: "TCP flow to a UDP frontend is untouched",
                intent: intent(vec![dns()]),
                flow: flow(FlowProtocol::Tcp, CLIENT, "10.96.0.10:53", "10.244.1.1:53"),
                stale: false,
            },
            Case {
                name: "TCP service is never cleaned",
                intent: intent(vec![port("web", Protocol::Tcp, "10.96.0.30", 80, &[])]),
                flow: flow(FlowProtocol::Tcp, CLIENT, "10.96.0.30:80", "10.244.1.1:80"),
                stale: false,
            },
            Case {
                name: "SCTP flow to a dead pod is stale",
                intent: intent(vec![port(
                    "sig",
                    Protocol::Sctp,
                    "10.96.0.40",
                    3868,
                    &["10.244.1.2:3868"],
                )]),
                flow: flow(FlowProtocol::Sctp, CLIENT, "10.96.0.40:3868", "10.244.1.1:3868"),
                stale: true,
            },
            Case {
                name: "NodePort on a node address to a dead pod is stale",
                intent: intent(vec![with_node_port(dns(), 30053)]),
                flow: udp_flow(&format!("{NODE}:30053"), "10.244.1.1:53"),
                stale: true,
            },
            Case {
                name: "NodePort on a node address to the current pod is kept",
                intent: intent(vec![with_node_port(dns(), 30053)]),
                flow: udp_flow(&format!("{NODE}:30053"), "10.244.1.2:53"),
                stale: false,
            },
            Case {
                name: "NodePort number on a non-node address is untouched",
                intent: intent(vec![with_node_port(dns(), 30053)]),
                flow: udp_flow("192.168.1.77:30053", "192.168.1.77:30053"),
                stale: false,
            },
            Case {
                name: "external IP flow to a dead pod is stale",
                intent: intent(vec![{
                    let mut p = dns();
                    p.external_ips = vec![ip("203.0.113.5")];
                    p
                }]),
                flow: udp_flow("203.0.113.5:53", "10.244.1.1:53"),
                stale: true,
            },
            Case {
                name: "load-balancer IP flow from before endpoints existed is stale",
                intent: intent(vec![{
                    let mut p = dns();
                    p.service_type = ServiceType::LoadBalancer;
                    p.load_balancer_ips = vec![ip("198.51.100.7")];
                    p
                }]),
                flow: udp_flow("198.51.100.7:53", "198.51.100.7:53"),
                stale: true,
            },
            Case {
                name: "node-local endpoint of a Local-policy port is kept",
                intent: intent(vec![{
                    let mut p = with_node_port(udp("loc", "10.96.0.50", &[]), 30054);
                    p.external_policy_local = true;
                    p.endpoints.local = vec![ep("10.244.0.9:53")];
                    p.endpoints.has_any_endpoints = true;
                    p
                }]),
                flow: udp_flow(&format!("{NODE}:30054"), "10.244.0.9:53"),
                stale: false,
            },
            Case {
                name: "IPv6 flow to a dead pod is stale",
                intent: intent(vec![udp("dns6", "fd00::a", &["[fd00:244::2]:53"])]),
                flow: flow(
                    FlowProtocol::Udp,
                    "fd00:244::5",
                    "[fd00::a]:53",
                    "[fd00:244::1]:53",
                ),
                stale: true,
            },
        ]
    }

    #[test]
    fn table() {
        let node_ips = [ip(NODE), ip("127.0.0.1")];
        for case in cases() {
            let got = stale_flows(&[case.flow], &case.intent, &node_ips);
            assert_eq!(!got.is_empty(), case.stale, "{}: {}", case.name, case.flow);
        }
    }

    #[test]
    fn selects_exactly_the_stale_entries_of_a_mixed_table() {
        let node_ips = [ip(NODE)];
        let all: Vec<(FlowEntry, bool)> = cases()
            .into_iter()
            .filter(|c| c.intent == intent(vec![udp("dns", "10.96.0.10", &["10.244.1.2:53"])]))
            .map(|c| (c.flow, c.stale))
            .collect();
        assert!(all.len() > 4, "the table has several cases for the plain service");
        let entries: Vec<FlowEntry> = all.iter().map(|(f, _)| *f).collect();
        let want: Vec<FlowEntry> = all.iter().filter(|(_, s)| *s).map(|(f, _)| *f).collect();
        let dns = intent(vec![udp("dns", "10.96.0.10", &["10.244.1.2:53"])]);
        assert_eq!(stale_flows(&entries, &dns, &node_ips), want);
    }

    #[test]
    fn shared_frontend_keeps_flows_to_either_ports_endpoints() {
        let mut a = udp("a", "10.96.0.10", &["10.244.1.1:53"]);
        let mut b = udp("b", "10.96.0.11", &["10.244.2.2:53"]);
        a.external_ips = vec![ip("203.0.113.5")];
        b.external_ips = vec![ip("203.0.113.5")];
        let i = intent(vec![a, b]);
        let to_a = udp_flow("203.0.113.5:53", "10.244.1.1:53");
        let to_b = udp_flow("203.0.113.5:53", "10.244.2.2:53");
        let dead = udp_flow("203.0.113.5:53", "10.244.9.9:53");
        assert_eq!(stale_flows(&[to_a, to_b, dead], &i, &[]), vec![dead]);
    }

    #[test]
    fn without_node_addresses_no_node_port_flow_is_touched() {
        let i = intent(vec![with_node_port(udp("dns", "10.96.0.10", &[]), 30053)]);
        let f = udp_flow(&format!("{NODE}:30053"), "10.244.1.1:53");
        assert!(stale_flows(&[f], &i, &[]).is_empty());
        assert_eq!(stale_flows(&[f], &i, &[ip(NODE)]), vec![f]);
    }

    #[test]
    fn removed_service_releases_its_flows_only_when_the_previous_intent_is_known() {
        let node_ips = [ip(NODE)];
        let gone = with_node_port(udp("gone", "10.96.0.99", &["10.244.1.1:53"]), 30099);
        let kept = udp("kept", "10.96.0.10", &["10.244.1.2:53"]);
        let previous = intent(vec![gone, kept.clone()]);
        let current = intent(vec![kept]);
        let to_gone = udp_flow("10.96.0.99:53", "10.244.1.1:53");
        let to_gone_np = udp_flow(&format!("{NODE}:30099"), "10.244.1.1:53");
        let to_kept = udp_flow("10.96.0.10:53", "10.244.1.2:53");
        let table = [to_gone, to_gone_np, to_kept];
        assert!(stale_flows(&table, &current, &node_ips).is_empty());
        assert_eq!(
            stale_flows_since(&table, &previous, &current, &node_ips),
            vec![to_gone, to_gone_np]
        );
    }

    #[test]
    fn protocol_change_releases_flows_of_the_old_protocol() {
        let previous = intent(vec![udp("dns", "10.96.0.10", &["10.244.1.2:53"])]);
        let current = intent(vec![port(
            "dns",
            Protocol::Tcp,
            "10.96.0.10",
            53,
            &["10.244.1.2:53"],
        )]);
        let f = udp_flow("10.96.0.10:53", "10.244.1.2:53");
        assert_eq!(stale_flows_since(&[f], &previous, &current, &[]), vec![f]);
    }

    #[test]
    fn display_matches_the_conntrack_tool_layout() {
        let f = udp_flow("10.96.0.10:53", "10.244.1.2:53");
        assert_eq!(
            f.to_string(),
            "udp src=10.244.0.5 dst=10.96.0.10 sport=40000 dport=53 \
             src=10.244.1.2 dst=10.244.0.5 sport=53 dport=40000"
        );
    }

    #[test]
    fn protocol_numbers_round_trip() {
        for n in 0..=u8::MAX {
            assert_eq!(FlowProtocol::from_number(n).number(), n);
        }
        assert_eq!(FlowProtocol::from(Protocol::Sctp).number(), 132);
        assert!(!FlowProtocol::Other(1).has_ports());
    }
}
