//! The intent: what every service port must do on this node, after endpoint selection. Backends render it;
//! the verifier compares the kernel against it; explain shows it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::endpoint::endpoints_for_port;
use crate::topology::{Categorized, SelectionNeeds, categorize};
use crate::{
    ClusterState, EndpointInfo, EndpointSlice, IpFamily, ObjectName, Protocol, Service, ServicePortName,
    ServiceType, SessionAffinity, TrafficPolicy,
};

/// Node-level inputs to intent building that do not come from the API objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentConfig {
    pub family: IpFamily,
    /// This node's name, as endpoints' `nodeName` spells it.
    pub node_name: String,
}

/// Everything one service port needs on this node, for one IP family.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePortIntent {
    pub name: ServicePortName,
    pub service_type: ServiceType,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// Empty when unset, and also when any entry is a zero-length prefix (upstream treats `0.0.0.0/0` as "no
    /// restriction" and writes no firewall chain).
    pub source_ranges: Vec<IpNet>,
    pub session_affinity: SessionAffinity,
    /// externalTrafficPolicy is Local and the port is reachable from outside at all.
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// Set for every port of a LoadBalancer Service with externalTrafficPolicy Local, whatever this port's
    /// own addresses: upstream serves it per Service, and a load balancer may probe before it has an address.
    pub health_check_node_port: Option<u16>,
    /// With a health check: the addresses of this port's ready endpoints on this node (any traffic policy),
    /// which the health check counts once per address across the Service's ports, as upstream counts them.
    pub local_ready_ips: Vec<IpAddr>,
    /// UDP and SCTP ports only: serving endpoints no rule picks now (terminating while others are ready,
    /// left out by topology hints). New flows do not go to them, but flows they already have may finish, as
    /// upstream lets them: stale-flow cleanup leaves these alone, so a draining pod keeps its sessions.
    pub draining: Vec<SocketAddr>,
    pub endpoints: Categorized,
    /// Every endpoint of this port in any state; upstream sums these to decide large-cluster mode.
    pub total_endpoints: usize,
    /// Hash of everything above: two intents with equal hashes render identical rules.
    pub content_hash: u64,
}

impl ServicePortIntent {
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.load_balancer_ips.is_empty() || !self.external_ips.is_empty()
    }
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || self.external_policy_local
    }
    pub fn has_endpoints(&self) -> bool {
        self.endpoints.has_any_endpoints
    }
    /// Traffic to the cluster IP has somewhere to go.
    pub fn has_internal_endpoints(&self) -> bool {
        self.has_endpoints() && (!self.internal_policy_local || !self.endpoints.local.is_empty())
    }
    /// Traffic to the external addresses has somewhere to go.
    pub fn has_external_endpoints(&self) -> bool {
        self.has_endpoints() && (!self.external_policy_local || !self.endpoints.local.is_empty())
    }
    pub fn uses_cluster_chain(&self) -> bool {
        !self.endpoints.cluster.is_empty() && self.uses_cluster_endpoints()
    }
    pub fn uses_local_chain(&self) -> bool {
        !self.endpoints.local.is_empty() && self.uses_local_endpoints()
    }
    pub fn uses_external_chain(&self) -> bool {
        self.has_endpoints() && self.externally_accessible()
    }
    pub fn uses_firewall_chain(&self) -> bool {
        self.has_endpoints() && !self.load_balancer_ips.is_empty() && !self.source_ranges.is_empty()
    }

    fn seal(mut self) -> Self {
        self.content_hash = 0;
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        self.content_hash = h.finish();
        self
    }
}

/// Every proxied service port, in a stable order. A persistent map: a copy shares its tree with the
/// original, so an intent rebuilt after a few changes costs what changed (cloning a `BTreeMap` of 50,000 ports
/// took 16 ms, most of an endpoint change at that scale).
pub type ServicePorts = imbl::OrdMap<ServicePortName, Arc<ServicePortIntent>>;

/// The intent for one IP family: every proxied service port, in a stable order.
///
/// Each port's intent is shared: an intent rebuilt after a few changes keeps the unchanged ports of the one
/// before it, so building, holding and comparing successive intents costs what changed, not the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Intent {
    pub service_ports: ServicePorts,
}

/// A Service's health-check node port and how many ready endpoints it has on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub node_port: u16,
    pub local_ready_endpoints: usize,
}

impl Intent {
    /// Every Service with a health-check node port (LoadBalancer with externalTrafficPolicy Local), with the
    /// number of distinct addresses of ready endpoints on this node over all its ports: load balancers probe
    /// the node, not a port.
    pub fn health_checks(&self) -> BTreeMap<ObjectName, HealthCheck> {
        let mut ips: BTreeMap<&ObjectName, (u16, BTreeSet<IpAddr>)> = BTreeMap::new();
        for spi in self.service_ports.values() {
            let Some(node_port) = spi.health_check_node_port else {
                continue;
            };
            ips.entry(&spi.name.service)
                .or_insert_with(|| (node_port, BTreeSet::new()))
                .1
                .extend(spi.local_ready_ips.iter().copied());
        }
        ips.into_iter()
            .map(|(name, (node_port, ips))| {
                let hc = HealthCheck {
                    node_port,
                    local_ready_endpoints: ips.len(),
                };
                (name.clone(), hc)
            })
            .collect()
    }

    /// Sum of all endpoints of all service ports (upstream's large-cluster threshold input).
    pub fn total_endpoints(&self) -> usize {
        self.service_ports.values().map(|s| s.total_endpoints).sum()
    }
}

/// Builds the intent from the cluster state. Deterministic: the same state gives an identical intent, whatever
/// order the objects arrived in.
pub fn build_intent(state: &ClusterState, config: &IntentConfig) -> Intent {
    let mut slices_by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in state.endpoint_slices.values() {
        slices_by_service
            .entry((slice.name.namespace.as_str(), slice.service_name.as_str()))
            .or_default()
            .push(slice);
    }
    let zone = state.node.as_ref().and_then(|n| n.zone());
    let mut intent = Intent::default();
    for service in state.services.values() {
        let slices = slices_by_service
            .get(&(service.name.namespace.as_str(), service.name.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for spi in service_port_intents(service, slices, config, zone) {
            intent.service_ports.insert(spi.name.clone(), Arc::new(spi));
        }
    }
    intent
}

/// The intents of every port of one Service (none if the Service is not proxied in this family).
pub fn service_port_intents(
    service: &Service,
    slices: &[&EndpointSlice],
    config: &IntentConfig,
    zone: Option<&str>,
) -> Vec<ServicePortIntent> {
    if !service.is_proxied() {
        return Vec::new();
    }
    let family = config.family;
    let Some(cluster_ip) = service.cluster_ips.iter().copied().find(|ip| family.contains(ip)) else {
        return Vec::new();
    };
    let external_ips: Vec<IpAddr> = service
        .external_ips
        .iter()
        .copied()
        .filter(|ip| family.contains(ip))
        .collect();
    let load_balancer_ips: Vec<IpAddr> = service
        .load_balancer_ingress
        .iter()
        .filter(|i| !i.ip_mode_proxy && family.contains(&i.ip))
        .map(|i| i.ip)
        .collect();
    let mut source_ranges: Vec<IpNet> = service
        .load_balancer_source_ranges
        .iter()
        .copied()
        .filter(|n| family.contains(&n.addr()))
        .collect();
    if source_ranges.iter().any(|n| n.prefix_len() == 0) {
        source_ranges.clear();
    }
    let is_lb = service.service_type == ServiceType::LoadBalancer;
    let has_node_ports = matches!(
        service.service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );

    service
        .ports
        .iter()
        .map(|port| {
            let name = ServicePortName::new(service.name.clone(), port.name.clone(), port.protocol);
            let node_port = if has_node_ports {
                port.node_port.filter(|p| *p != 0)
            } else {
                None
            };
            let load_balancer_ips = if is_lb {
                load_balancer_ips.clone()
            } else {
                Vec::new()
            };
            let externally_accessible =
                node_port.is_some() || !load_balancer_ips.is_empty() || !external_ips.is_empty();
            let external_policy_local =
                service.external_traffic_policy == TrafficPolicy::Local && externally_accessible;
            let internal_policy_local = service.internal_traffic_policy == TrafficPolicy::Local;
            let all = endpoints_for_port(&name, slices.iter().copied(), family, &config.node_name);
            let needs = SelectionNeeds {
                cluster: !internal_policy_local || externally_accessible,
                local: internal_policy_local || external_policy_local,
            };
            let endpoints = categorize(&all, needs, &config.node_name, zone);
            let health_check_node_port = if is_lb && service.external_traffic_policy == TrafficPolicy::Local {
                service.health_check_node_port
            } else {
                None
            };
            let draining = if matches!(port.protocol, Protocol::Udp | Protocol::Sctp) {
                let picked: HashSet<SocketAddr> = endpoints
                    .cluster
                    .iter()
                    .chain(&endpoints.local)
                    .chain(endpoints.all_reachable())
                    .map(EndpointInfo::socket_addr)
                    .collect();
                all.iter()
                    .filter(|e| e.ready || e.serving)
                    .map(EndpointInfo::socket_addr)
                    .filter(|a| !picked.contains(a))
                    .collect()
            } else {
                Vec::new()
            };
            let local_ready_ips = if health_check_node_port.is_some() {
                all.iter()
                    .filter(|e| e.is_local && e.ready)
                    .map(|e| e.ip)
                    .collect()
            } else {
                Vec::new()
            };
            ServicePortIntent {
                name,
                service_type: service.service_type,
                cluster_ip,
                port: port.port,
                node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips,
                source_ranges: source_ranges.clone(),
                session_affinity: service.session_affinity,
                external_policy_local,
                internal_policy_local,
                health_check_node_port,
                local_ready_ips,
                draining,
                total_endpoints: all.len(),
                endpoints,
                content_hash: 0,
            }
            .seal()
        })
        .collect()
}
