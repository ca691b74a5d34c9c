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
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Categorized {
    /// Endpoints for cluster-wide traffic policy (after topology and terminating fallback).
    pub cluster: Vec<EndpointInfo>,
    /// Node-local endpoints for the Local traffic policies (ready, or serving-terminating as a fallback).
    pub local: Vec<EndpointInfo>,
    /// Every endpoint some rule may send to: the union of the two sets above, in `ip:port` string order.
    pub all_reachable: Vec<EndpointInfo>,
    /// Somewhere in the cluster there is an endpoint that could take traffic. When false the service port
    /// rejects connections instead of dropping them.
    pub has_any_endpoints: bool,
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
    let mut out = Categorized::default();
    if needs.cluster {
        let mode = topology_mode(endpoints, node_name, zone);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, mode, node_name, zone))
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .cloned()
                .collect();
        }
        out.has_any_endpoints = !out.cluster.is_empty();
    }
    if needs.local {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .cloned()
            .collect();
        if out.local.is_empty() {
            out.local = endpoints
                .iter()
                .filter(|e| e.is_local && e.serving && e.terminating)
                .cloned()
                .collect();
        }
        if endpoints.iter().any(|e| e.ready || (e.serving && e.terminating)) {
            out.has_any_endpoints = true;
        }
    }
    out.all_reachable = match (needs.cluster, needs.local) {
        (true, false) => out.cluster.clone(),
        (false, true) => out.local.clone(),
        _ => {
            let mut union: Vec<EndpointInfo> = out.cluster.iter().chain(out.local.iter()).cloned().collect();
            union.sort_by_cached_key(ToString::to_string);
            union.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
            union
        }
    };
    // Filtered collections grow by doubling: 10 endpoints sat in room for 16. An intent is held for as long as
    // it is the applied one, and a sync builds the next beside it (5,000 services × 10 endpoints: 11.4 MB of
    // endpoint lists instead of 8.8).
    out.cluster.shrink_to_fit();
    out.local.shrink_to_fit();
    out.all_reachable.shrink_to_fit();
    out
}
