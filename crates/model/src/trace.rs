//! The vocabulary both backends' packet tracers speak: a packet goes in, a trace comes out. One packet-flow
//! table can then be checked against the iptables rules, the nftables rules, upstream's dumps and the live
//! kernel alike.

use std::net::IpAddr;

use serde::Serialize;

use crate::Protocol;

/// Where a packet enters the node's netfilter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Origin {
    /// From a pod on this node (enters PREROUTING from a pod interface, then is forwarded).
    Pod,
    /// From a process on the node itself (OUTPUT).
    Host,
    /// From outside the node (enters PREROUTING from the node's uplink).
    External,
}

/// A new connection's first packet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Packet {
    pub origin: Origin,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// What finally happens to the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Verdict {
    /// Delivered (DNATed to an endpoint, or to the local address it was sent to).
    Accept,
    /// Silently dropped: the client times out.
    Drop,
    /// Rejected: the client sees "connection refused" / ICMP unreachable at once.
    Reject,
}

/// One rule the packet matched, in the order matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceStep {
    /// Table and chain (`nat/KUBE-SERVICES`, or `ip svcproxy/services`).
    pub chain: String,
    /// The rule as the ruleset spells it.
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub steps: Vec<TraceStep>,
    /// `ip:port` strings the packet may be DNATed to (all candidates of a probabilistic or numgen choice), in
    /// sorted order. Empty when it is not DNATed.
    pub endpoints: Vec<String>,
    /// The packet carries the masquerade mark when it leaves, i.e. its source is rewritten to the node.
    pub masquerade: bool,
    pub verdict: Verdict,
}
