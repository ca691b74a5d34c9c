//! Shared test helpers: compact builders for model objects, the reference scenarios, and a network namespace
//! with a real `nft` for the tests that go through the kernel.
#![allow(dead_code)]

pub mod arbitrary;
pub mod flow;
pub mod netns;
pub mod scale;
pub mod scenario;

use std::net::IpAddr;

use ipnet::IpNet;
use svcproxy_model::intent::build_intent;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, Intent, IntentConfig, IpFamily, LoadBalancerIngress,
    Node, ObjectName, Protocol, Service, ServicePort, ServiceType, SessionAffinity, TrafficPolicy,
};

pub const NODE: &str = "node-a";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

pub fn port(name: &str, protocol: Protocol, port: u16, node_port: Option<u16>) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
        node_port,
    }
}

pub fn service(ns: &str, name: &str, ty: ServiceType, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
    let mut s = Service::cluster_ip(ObjectName::new(ns, name), ip(cluster_ip), ports);
    s.service_type = ty;
    s
}

pub fn with_lb(mut s: Service, ips: &[&str]) -> Service {
    s.load_balancer_ingress = ips
        .iter()
        .map(|i| LoadBalancerIngress {
            ip: ip(i),
            ip_mode_proxy: false,
        })
        .collect();
    s
}

pub fn local_policies(mut s: Service, external: bool, internal: bool) -> Service {
    if external {
        s.external_traffic_policy = TrafficPolicy::Local;
    }
    if internal {
        s.internal_traffic_policy = TrafficPolicy::Local;
    }
    s
}

pub fn sticky(mut s: Service, timeout_seconds: u32) -> Service {
    s.session_affinity = SessionAffinity::ClientIP { timeout_seconds };
    s
}

/// A ready endpoint on `node`.
pub fn ep(addr: &str, node: &str) -> Endpoint {
    Endpoint::ready(ip(addr), Some(node))
}

pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, Protocol, u16)],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        name: ObjectName::new(ns, name),
        service_name: service.into(),
        address_family: Some(IpFamily::V4),
        ports: ports
            .iter()
            .map(|(name, protocol, port)| EndpointPort {
                name: (*name).into(),
                protocol: *protocol,
                port: *port,
            })
            .collect(),
        endpoints,
        last_change_trigger_time: None,
    }
}

pub fn state(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
    ClusterState {
        services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
        endpoint_slices: slices.into_iter().map(|s| (s.name.clone(), s)).collect(),
        node: Some(Node {
            name: NODE.into(),
            labels: [("topology.kubernetes.io/zone".to_string(), "zone-a".to_string())].into(),
            pod_cidrs: vec![net("10.244.0.0/24")],
            addresses: vec![ip("10.0.0.10")],
            being_deleted: false,
        }),
    }
}

pub fn intent_of(state: &ClusterState) -> Intent {
    build_intent(
        state,
        &IntentConfig {
            family: IpFamily::V4,
            node_name: NODE.into(),
        },
    )
}

/// The apiserver's own service, present in every reference dump.
pub fn kubernetes_service() -> (Service, EndpointSlice) {
    (
        service(
            "default",
            "kubernetes",
            ServiceType::ClusterIP,
            "10.96.0.1",
            vec![port("https", Protocol::Tcp, 443, None)],
        ),
        slice(
            "default",
            "kubernetes",
            "kubernetes",
            &[("https", Protocol::Tcp, 6443)],
            vec![Endpoint::ready(ip("10.0.0.10"), None)],
        ),
    )
}
