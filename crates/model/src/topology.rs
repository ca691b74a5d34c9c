//! Endpoint selection: which endpoints a service port sends traffic to from this node.
//!
//! Follows upstream's categorisation: ready endpoints first, serving-terminating ones only when nothing is
//! ready (so a rolling update of every pod does not black-hole traffic), topology hints when every ready
//! endpoint carries them and one of them names this node or zone, and node-local sets for the Local traffic
//! policies. Hints never restrict the local set.

use serde::Serialize;

use crate::EndpointInfo;

/// What the hints let us do for a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TopologyMode {
    /// No usable hints: every ready endpoint in the cluster.
    None,
    /// Only endpoints hinted for this node's zone.
    PreferSameZone,
    /// Only endpoints hinted for this node.
    PreferSameNode,
}

/// The outcome of endpoint selection for one service port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Categorized {
    /// Endpoints for cluster-wide traffic policy (after topology and terminating fallback).
    pub cluster: Vec<EndpointInfo>,
    /// Node-local endpoints for the Local traffic policies (ready, or serving-terminating as a fallback).
    pub local: Vec<EndpointInfo>,
    reachable: Reachable,
    /// Somewhere in the cluster there is an endpoint that could take traffic. When false the service port
    /// rejects connections instead of dropping them.
    pub has_any_endpoints: bool,
}

/// Where the union of `cluster` and `local` is. Nearly always one of the two is the union (a ClusterIP
/// Service uses only `cluster`; with a Local policy the local endpoints are usually among the cluster
/// ones), and a copy of it would be the largest part of an intent (4 MB at 5,000 services × 10 endpoints).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
enum Reachable {
    #[default]
    Cluster,
    Local,
    Union(Vec<EndpointInfo>),
}

impl Categorized {
    /// From the two selections: the union is worked out here.
    /// Each list must be in `ip:port` string order without repeats, as selection leaves them.
    pub fn new(cluster: Vec<EndpointInfo>, local: Vec<EndpointInfo>, has_any_endpoints: bool) -> Self {
        let reachable = if local.is_empty() {
            Reachable::Cluster
        } else if cluster.is_empty() {
            Reachable::Local
        } else {
            let mut union: Vec<EndpointInfo> = cluster.iter().chain(local.iter()).cloned().collect();
            union.sort_by_cached_key(ToString::to_string);
            union.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
            if union == cluster {
                Reachable::Cluster
            } else if union == local {
                Reachable::Local
            } else {
                union.shrink_to_fit();
                Reachable::Union(union)
            }
        };
        Categorized {
            cluster,
            local,
            reachable,
            has_any_endpoints,
        }
    }

    /// Every endpoint some rule may send to: the union of `cluster` and `local`, in `ip:port` string order.
    pub fn all_reachable(&self) -> &[EndpointInfo] {
        match &self.reachable {
            Reachable::Cluster => &self.cluster,
            Reachable::Local => &self.local,
            Reachable::Union(union) => union,
        }
    }
}

/// As if the union were a field of its own, as it was before it was shared.
impl Serialize for Categorized {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Categorized", 4)?;
        s.serialize_field("cluster", &self.cluster)?;
        s.serialize_field("local", &self.local)?;
        s.serialize_field("all_reachable", self.all_reachable())?;
        s.serialize_field("has_any_endpoints", &self.has_any_endpoints)?;
        s.end()
    }
}

/// Which policy sets the caller needs; computing only those matches upstream's `hasAnyEndpoints` semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectionNeeds {
    pub cluster: bool,
    pub local: bool,
}

pub fn topology_mode(endpoints: &[EndpointInfo], node_name: &str, zone: Option<&str>) -> TopologyMode {
    let ready: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    let all_have_node_hints = ready.iter().all(|e| e.node_hints.is_some());
    if all_have_node_hints
        && ready
            .iter()
            .any(|e| e.node_hints.as_ref().is_some_and(|h| h.contains(node_name)))
    {
        return TopologyMode::PreferSameNode;
    }
    if let Some(zone) = zone {
        let all_have_zone_hints = ready.iter().all(|e| e.zone_hints.is_some());
        if all_have_zone_hints
            && ready
                .iter()
                .any(|e| e.zone_hints.as_ref().is_some_and(|h| h.contains(zone)))
        {
            return TopologyMode::PreferSameZone;
        }
    }
    TopologyMode::None
}

fn available_for_topology(e: &EndpointInfo, mode: TopologyMode, node_name: &str, zone: Option<&str>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => e.node_hints.as_ref().is_some_and(|h| h.contains(node_name)),
        TopologyMode::PreferSameZone => {
            zone.is_some_and(|z| e.zone_hints.as_ref().is_some_and(|h| h.contains(z)))
        }
    }
}

/// Selects endpoints for one service port. `endpoints` must be in `ip:port` string order (as
/// [`crate::endpoint::endpoints_for_port`] returns them); the output keeps that order.
pub fn categorize(
    endpoints: &[EndpointInfo],
    needs: SelectionNeeds,
    node_name: &str,
    zone: Option<&str>,
) -> Categorized {
    let mut cluster = Vec::new();
    let mut local = Vec::new();
    let mut has_any_endpoints = false;
    if needs.cluster {
        let mode = topology_mode(endpoints, node_name, zone);
        cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, mode, node_name, zone))
            .cloned()
            .collect();
        if cluster.is_empty() {
            cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .cloned()
                .collect();
        }
        has_any_endpoints = !cluster.is_empty();
    }
    if needs.local {
        local = endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .cloned()
            .collect();
        if local.is_empty() {
            local = endpoints
                .iter()
                .filter(|e| e.is_local && e.serving && e.terminating)
                .cloned()
                .collect();
        }
        if endpoints.iter().any(|e| e.ready || (e.serving && e.terminating)) {
            has_any_endpoints = true;
        }
    }
    // Filtered collections grow by doubling: 10 endpoints sat in room for 16. An intent is held for as long as
    // it is the applied one, and a sync builds the next beside it.
    cluster.shrink_to_fit();
    local.shrink_to_fit();
    Categorized::new(cluster, local, has_any_endpoints)
}
