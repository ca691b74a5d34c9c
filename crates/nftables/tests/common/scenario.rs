//! Reads the reference scenario manifests (Services and EndpointSlices as YAML) into model objects, applying
//! the same defaults and label filters as the API server and the proxy's watches.

use std::collections::BTreeMap;

use serde::Deserialize;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, IpFamily, LoadBalancerIngress, ObjectName, Protocol,
    Service, ServicePort, ServiceType, SessionAffinity, TrafficDistribution, TrafficPolicy,
};

use super::{ip, kubernetes_service, net, state};

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Doc {
    kind: String,
    metadata: Meta,
    spec: Spec,
    status: Status,
    address_type: String,
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Meta {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Spec {
    #[serde(rename = "type")]
    ty: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "externalIPs")]
    external_ips: Vec<String>,
    load_balancer_source_ranges: Vec<String>,
    external_traffic_policy: Option<String>,
    internal_traffic_policy: Option<String>,
    session_affinity: Option<String>,
    session_affinity_config: Option<AffinityConfig>,
    health_check_node_port: Option<u16>,
    traffic_distribution: Option<String>,
    ports: Vec<SvcPort>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct AffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<ClientIpConfig>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ClientIpConfig {
    timeout_seconds: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SvcPort {
    name: String,
    protocol: Option<String>,
    port: u16,
    node_port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Status {
    load_balancer: LbStatus,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LbStatus {
    ingress: Vec<Ingress>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Ingress {
    ip: Option<String>,
    ip_mode: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SlicePort {
    name: Option<String>,
    protocol: Option<String>,
    port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SliceEndpoint {
    addresses: Vec<String>,
    conditions: Conditions,
    node_name: Option<String>,
    zone: Option<String>,
    hints: Option<Hints>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Conditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Hints {
    for_zones: Option<Vec<Named>>,
    for_nodes: Option<Vec<Named>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Named {
    name: String,
}

fn protocol(p: &Option<String>) -> Protocol {
    p.as_deref().unwrap_or("TCP").parse().unwrap()
}

fn policy(p: &Option<String>) -> TrafficPolicy {
    match p.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    }
}

/// The objects a proxy's watches would deliver: minus those labelled for another proxy or headless.
pub fn scenario_state(yaml: &str) -> ClusterState {
    let docs: Vec<Doc> = serde_saphyr::from_multiple(yaml).unwrap();
    let (k8s_svc, k8s_slice) = kubernetes_service();
    let mut services = vec![k8s_svc];
    let mut slices = vec![k8s_slice];
    for doc in docs {
        let labels = &doc.metadata.labels;
        if labels.contains_key("service.kubernetes.io/service-proxy-name")
            || labels.contains_key("service.kubernetes.io/headless")
        {
            continue;
        }
        let name = ObjectName::new(doc.metadata.namespace.clone(), doc.metadata.name.clone());
        match doc.kind.as_str() {
            "Service" => services.push(service(name, doc)),
            "EndpointSlice" => slices.push(endpoint_slice(name, doc)),
            _ => {}
        }
    }
    state(services, slices)
}

fn service(name: ObjectName, doc: Doc) -> Service {
    let spec = doc.spec;
    let ty = match spec.ty.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => panic!("service type {other}"),
    };
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let cluster_ips = match spec.cluster_ip.as_deref() {
        Some(c) if c != "None" => vec![ip(c)],
        _ => Vec::new(),
    };
    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIP {
            timeout_seconds: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800),
        },
        _ => SessionAffinity::None,
    };
    Service {
        name,
        service_type: ty,
        cluster_ips,
        headless,
        ports: spec
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                protocol: protocol(&p.protocol),
                port: p.port,
                node_port: p.node_port,
            })
            .collect(),
        external_ips: spec.external_ips.iter().map(|i| ip(i)).collect(),
        load_balancer_ingress: doc
            .status
            .load_balancer
            .ingress
            .iter()
            .filter_map(|i| {
                let addr = ip(i.ip.as_deref()?);
                Some(LoadBalancerIngress {
                    ip: addr,
                    ip_mode_proxy: i.ip_mode.as_deref() == Some("Proxy"),
                })
            })
            .collect(),
        load_balancer_source_ranges: spec
            .load_balancer_source_ranges
            .iter()
            .map(|r| net(r.trim()))
            .collect(),
        external_traffic_policy: policy(&spec.external_traffic_policy),
        internal_traffic_policy: policy(&spec.internal_traffic_policy),
        session_affinity,
        health_check_node_port: spec.health_check_node_port,
        traffic_distribution: spec.traffic_distribution.map(|t| match t.as_str() {
            "PreferClose" => TrafficDistribution::PreferClose,
            other => TrafficDistribution::Other(other.to_string()),
        }),
    }
}

fn endpoint_slice(name: ObjectName, doc: Doc) -> EndpointSlice {
    let address_family = match doc.address_type.as_str() {
        "IPv4" => Some(IpFamily::V4),
        "IPv6" => Some(IpFamily::V6),
        _ => None,
    };
    let endpoints = if address_family.is_none() {
        Vec::new()
    } else {
        doc.endpoints
            .iter()
            .map(|e| {
                let ready = e.conditions.ready.unwrap_or(true);
                Endpoint {
                    address: ip(&e.addresses[0]),
                    ready,
                    serving: e.conditions.serving.unwrap_or(ready),
                    terminating: e.conditions.terminating.unwrap_or(false),
                    node_name: e.node_name.clone(),
                    zone: e.zone.clone(),
                    zone_hints: e
                        .hints
                        .as_ref()
                        .and_then(|h| h.for_zones.as_ref())
                        .map(|z| z.iter().map(|n| n.name.clone()).collect()),
                    node_hints: e
                        .hints
                        .as_ref()
                        .and_then(|h| h.for_nodes.as_ref())
                        .map(|z| z.iter().map(|n| n.name.clone()).collect()),
                }
            })
            .collect()
    };
    EndpointSlice {
        service_name: doc
            .metadata
            .labels
            .get("kubernetes.io/service-name")
            .cloned()
            .unwrap_or_default(),
        name,
        address_family,
        ports: doc
            .ports
            .iter()
            .filter_map(|p| {
                Some(EndpointPort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: protocol(&p.protocol),
                    port: p.port?,
                })
            })
            .collect(),
        endpoints,
        last_change_trigger_time: None,
    }
}
