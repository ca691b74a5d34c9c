use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::{ObjectName, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum SessionAffinity {
    #[default]
    None,
    /// Sticky by client IP for `timeout_seconds` (API default 10800).
    ClientIP { timeout_seconds: u32 },
}

/// `spec.trafficDistribution`. The proxy itself only follows the hints the EndpointSlice controller writes from
/// it; we keep the value so status and explain can show why hints exist.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum TrafficDistribution {
    PreferClose,
    PreferSameZone,
    PreferSameNode,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct LoadBalancerIngress {
    pub ip: IpAddr,
    /// `ipMode: Proxy` means the load balancer delivers traffic to the node with the node as destination, so
    /// the proxy must not capture the VIP (upstream ignores such entries).
    pub ip_mode_proxy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePort {
    /// Empty for the single unnamed port a Service may have.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service as the proxy needs it. Produced by the sources after validation: every field here is well formed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Service {
    pub name: ObjectName,
    pub service_type: ServiceType,
    /// `spec.clusterIPs`; empty when the Service has no cluster IP.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ingress: Vec<LoadBalancerIngress>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub session_affinity: SessionAffinity,
    pub health_check_node_port: Option<u16>,
    pub traffic_distribution: Option<TrafficDistribution>,
}

impl Service {
    /// A ClusterIP service with the given ports and defaults everywhere else; handy for tests and examples.
    pub fn cluster_ip(name: ObjectName, ip: IpAddr, ports: Vec<ServicePort>) -> Self {
        Service {
            name,
            service_type: ServiceType::ClusterIP,
            cluster_ips: vec![ip],
            headless: false,
            ports,
            external_ips: Vec::new(),
            load_balancer_ingress: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            session_affinity: SessionAffinity::None,
            health_check_node_port: None,
            traffic_distribution: None,
        }
    }

    /// Whether the proxy programs anything for this Service at all. ExternalName services are DNS-only and
    /// headless ones have no virtual IP.
    pub fn is_proxied(&self) -> bool {
        self.service_type != ServiceType::ExternalName && !self.headless && !self.cluster_ips.is_empty()
    }
}
