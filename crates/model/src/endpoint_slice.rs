use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::{IpFamily, ObjectName, Protocol};

/// An EndpointSlice in our own types, after validation at the source edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointSlice {
    pub name: ObjectName,
    /// The `kubernetes.io/service-name` label: the Service (in the slice's namespace) these endpoints back.
    pub service_name: String,
    /// `None` for FQDN slices, which a Service proxy ignores.
    pub address_family: Option<IpFamily>,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation, as written (RFC 3339).
    pub last_change_trigger_time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointPort {
    /// Matches the Service port name; empty for an unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Endpoint {
    /// `addresses[0]`: upstream uses only the first address of an endpoint.
    pub address: IpAddr,
    /// `conditions.ready`; an absent condition means ready.
    pub ready: bool,
    /// `conditions.serving`; absent means the same as ready.
    pub serving: bool,
    /// `conditions.terminating`; absent means false.
    pub terminating: bool,
    /// Shared: a cluster has few node and zone names and every endpoint names one (at 5,000 slices × 10
    /// endpoints, a string each is 2.4 MB; the endpoint itself shrinks from 120 to 72 bytes).
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// `hints.forZones`; `None` when the endpoint carries no zone hints. Shared with the endpoints selected
    /// from it.
    pub zone_hints: Option<Arc<BTreeSet<String>>>,
    /// `hints.forNodes`; `None` when the endpoint carries no node hints.
    pub node_hints: Option<Arc<BTreeSet<String>>>,
}

impl Endpoint {
    /// A ready endpoint on `node`, without hints.
    pub fn ready(address: IpAddr, node: Option<&str>) -> Self {
        Endpoint {
            address,
            ready: true,
            serving: true,
            terminating: false,
            node_name: node.map(Arc::from),
            zone: None,
            zone_hints: None,
            node_hints: None,
        }
    }
}
