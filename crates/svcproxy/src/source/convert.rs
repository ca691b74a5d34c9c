//! The one place API objects become model objects. Everything is validated here, so a malformed object is
//! rejected with an error naming the object and the field, and nothing downstream has to cope with bad data.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use super::legacy_ip::{parse_cidr, parse_ip};
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use svcproxy_model::{
    Endpoint, EndpointPort, EndpointSlice, IpFamily, LoadBalancerIngress, Node, ObjectName, Protocol,
    Service, ServiceCidr, ServicePort, ServiceType, SessionAffinity, TrafficDistribution, TrafficPolicy,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const AUTOSCALER_DELETION_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// API default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// A rejected object: which one, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: invalid field {field}: {reason}")]
pub struct ConvertError {
    pub kind: &'static str,
    /// `namespace/name`, or whatever part of it is known.
    pub object: String,
    pub field: String,
    pub reason: String,
}

struct Ctx {
    kind: &'static str,
    object: String,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
        ConvertError {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn ip(&self, field: impl Into<String>, s: &str) -> Result<IpAddr, ConvertError> {
        parse_ip(s.trim()).ok_or_else(|| self.err(field, format!("{s:?} is not an IP address")))
    }

    fn cidr(&self, field: impl Into<String>, s: &str) -> Result<IpNet, ConvertError> {
        parse_cidr(s.trim()).ok_or_else(|| self.err(field, format!("{s:?} is not a CIDR")))
    }

    fn port(&self, field: impl Into<String>, p: i32) -> Result<u16, ConvertError> {
        match u16::try_from(p) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(self.err(field, format!("{p} is not a port number (1-65535)"))),
        }
    }

    fn protocol(&self, field: impl Into<String>, p: Option<&str>) -> Result<Protocol, ConvertError> {
        match p {
            None => Ok(Protocol::Tcp),
            Some(p) => Protocol::from_str(p).map_err(|e| self.err(field, e.to_string())),
        }
    }
}

/// RFC 1123 label: what the API allows for namespaces and EndpointSlice port names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what the API allows for most object names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Names end up in rule comments and chain-name hashes: anything the API would not accept is rejected here,
/// so no manifest can smuggle quotes, spaces or control characters into a transaction.
fn check_name(
    kind: &'static str,
    name: &ObjectName,
    object_rule: fn(&str) -> bool,
) -> Result<(), ConvertError> {
    let err = |field: &str, value: &str, what: &str| ConvertError {
        kind,
        object: name.to_string(),
        field: field.into(),
        reason: format!("{value:?} is not a valid {what}"),
    };
    if !is_dns_label(&name.namespace) {
        return Err(err(
            "metadata.namespace",
            &name.namespace,
            "namespace (RFC 1123 label)",
        ));
    }
    if !object_rule(&name.name) {
        return Err(err("metadata.name", &name.name, "name"));
    }
    Ok(())
}

/// Service names are RFC 1035 labels: RFC 1123 labels that start with a letter.
fn is_service_name(s: &str) -> bool {
    is_dns_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

fn object_name(
    kind: &'static str,
    meta: &ObjectMeta,
    default_namespace: &str,
) -> Result<ObjectName, ConvertError> {
    // An empty namespace is no namespace, as `kubectl apply` reads a manifest's `namespace: ""`.
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| default_namespace.to_string());
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Err(ConvertError {
            kind,
            object: format!("{namespace}/<unnamed>"),
            field: "metadata.name".into(),
            reason: "missing".into(),
        });
    };
    Ok(ObjectName::new(namespace, name))
}

/// Converts a Service. `default_namespace` applies when the object has none (manifests written for
/// `kubectl apply` often omit it).
pub fn service(svc: &core::Service, default_namespace: &str) -> Result<Service, ConvertError> {
    let name = object_name("Service", &svc.metadata, default_namespace)?;
    check_name("Service", &name, is_service_name)?;
    let cx = Ctx {
        kind: "Service",
        object: name.to_string(),
    };
    let Some(spec) = &svc.spec else {
        return Err(cx.err("spec", "missing"));
    };
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => return Err(cx.err("spec.type", format!("unknown type {other:?}"))),
    };

    let mut headless = false;
    let mut cluster_ips = Vec::new();
    let listed: Vec<(String, &String)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
            .collect(),
        (_, Some(ip)) => vec![("spec.clusterIP".to_string(), ip)],
        _ => Vec::new(),
    };
    for (field, ip) in listed {
        if ip == "None" {
            headless = true;
        } else if !ip.is_empty() {
            cluster_ips.push(cx.ip(field, ip)?);
        }
    }

    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    let spec_ports = spec.ports.as_deref().unwrap_or_default();
    for (i, p) in spec_ports.iter().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        // The API checks Service port names as RFC 1123 labels (up to 63 characters, digits only allowed); the
        // stricter IANA service-name rule is for container ports.
        if !name.is_empty() && !is_dns_label(&name) {
            return Err(cx.err(
                format!("spec.ports[{i}].name"),
                format!("{name:?} is not a valid port name"),
            ));
        }
        if name.is_empty() && spec_ports.len() > 1 {
            return Err(cx.err(
                format!("spec.ports[{i}].name"),
                "required when a Service has several ports",
            ));
        }
        let protocol = cx.protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?;
        if !seen.insert((name.clone(), protocol)) {
            return Err(cx.err(
                format!("spec.ports[{i}].name"),
                format!("duplicate port {name:?}/{protocol}"),
            ));
        }
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) => Some(cx.port(format!("spec.ports[{i}].nodePort"), np)?),
        };
        ports.push(ServicePort {
            name,
            protocol,
            port: cx.port(format!("spec.ports[{i}].port"), p.port)?,
            node_port,
        });
    }

    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| cx.ip(format!("spec.externalIPs[{i}]"), ip))
        .collect::<Result<Vec<_>, _>>()?;

    let load_balancer_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        // The API historically accepted padded entries; upstream trims them, and so does `Ctx::cidr`.
        .map(|(i, r)| cx.cidr(format!("spec.loadBalancerSourceRanges[{i}]"), r))
        .collect::<Result<Vec<_>, _>>()?;

    let policy = |field: &str, v: Option<&str>| match v {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(cx.err(
            field,
            format!("unknown policy {other:?} (expected Cluster or Local)"),
        )),
    };
    let external_traffic_policy = policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    let internal_traffic_policy = policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;

    let session_affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => SessionAffinity::None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout_seconds = match timeout {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t) => u32::try_from(t)
                    .ok()
                    .filter(|t| (1..=MAX_AFFINITY_TIMEOUT).contains(t))
                    .ok_or_else(|| {
                        cx.err(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} is outside 1-{MAX_AFFINITY_TIMEOUT}"),
                        )
                    })?,
            };
            SessionAffinity::ClientIP { timeout_seconds }
        }
        Some(other) => {
            return Err(cx.err(
                "spec.sessionAffinity",
                format!("unknown affinity {other:?} (expected None or ClientIP)"),
            ));
        }
    };

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) => Some(cx.port("spec.healthCheckNodePort", p)?),
    };

    let traffic_distribution = spec.traffic_distribution.as_deref().map(|t| match t {
        "PreferClose" => TrafficDistribution::PreferClose,
        "PreferSameZone" => TrafficDistribution::PreferSameZone,
        "PreferSameNode" => TrafficDistribution::PreferSameNode,
        other => TrafficDistribution::Other(other.to_string()),
    });

    let mut load_balancer_ingress = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // Hostname-only entries (some cloud load balancers) carry no address for the proxy to capture.
        let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let ip = cx.ip(format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
        // Only VIP mode (the default) asks the proxy to capture the address. A mode newer than this build is
        // treated as upstream treats it, as not VIP: that entry is left to the load balancer, and the rest of
        // the Service is still programmed.
        let ip_mode_proxy = match ing.ip_mode.as_deref() {
            None | Some("VIP") => false,
            Some("Proxy") => true,
            Some(other) => {
                tracing::warn!(
                    service = %name,
                    "status.loadBalancer.ingress[{i}].ipMode {other:?} is not known; not capturing {ip}"
                );
                true
            }
        };
        load_balancer_ingress.push(LoadBalancerIngress { ip, ip_mode_proxy });
    }

    Ok(Service {
        name,
        service_type,
        cluster_ips,
        headless,
        ports,
        external_ips,
        load_balancer_ingress,
        load_balancer_source_ranges,
        external_traffic_policy,
        internal_traffic_policy,
        session_affinity,
        health_check_node_port,
        traffic_distribution,
    })
}

/// Converts an EndpointSlice. Slices without the service-name label belong to no Service; they convert to a
/// slice with an empty service name that matches nothing, as upstream ignores them.
pub fn endpoint_slice(
    slice: &discovery::EndpointSlice,
    default_namespace: &str,
) -> Result<EndpointSlice, ConvertError> {
    let name = object_name("EndpointSlice", &slice.metadata, default_namespace)?;
    check_name("EndpointSlice", &name, is_dns_subdomain)?;
    let cx = Ctx {
        kind: "EndpointSlice",
        object: name.to_string(),
    };
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .unwrap_or_default();
    let address_family = match slice.address_type.as_str() {
        "IPv4" => Some(IpFamily::V4),
        "IPv6" => Some(IpFamily::V6),
        "FQDN" => None,
        other => return Err(cx.err("addressType", format!("unknown address type {other:?}"))),
    };

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = cx.protocol(format!("ports[{i}].protocol"), p.protocol.as_deref())?;
        // A port without a number means "all ports" in the API; a Service proxy cannot use it (upstream skips it).
        let port_name = p.name.clone().unwrap_or_default();
        if !port_name.is_empty() && !is_dns_label(&port_name) {
            return Err(cx.err(
                format!("ports[{i}].name"),
                format!("{port_name:?} is not a valid port name"),
            ));
        }
        let Some(port) = p.port else { continue };
        // The API does not range-check slice ports; upstream ignores an unusable one and keeps the others.
        let port = match cx.port(format!("ports[{i}].port"), port) {
            Ok(port) => port,
            Err(e) => {
                tracing::warn!("{e}; ignoring this port");
                continue;
            }
        };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }

    // Sized up front: grown one push at a time, the 50,000 endpoints of 5,000 slices took 11.5 MB instead of
    // 7.4, for as long as the slices are held.
    let mut endpoints = Vec::with_capacity(slice.endpoints.as_ref().map_or(0, Vec::len));
    let mut names = SharedNames::default();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let Some(first) = ep.addresses.first() else {
            continue;
        };
        let address = if address_family.is_some() {
            let ip = cx.ip(format!("endpoints[{i}].addresses[0]"), first)?;
            if Some(IpFamily::of(&ip)) != address_family {
                return Err(cx.err(
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{ip} does not match addressType {}", slice.address_type),
                ));
            }
            ip
        } else {
            continue;
        };
        let conditions = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        // Unset conditions read as upstream reads them: ready and serving unless said otherwise (not "serving
        // as ready": a terminating endpoint whose producer left `serving` out still takes fallback traffic).
        endpoints.push(Endpoint {
            address,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: names.share(ep.node_name.as_deref()),
            zone: names.share(ep.zone.as_deref()),
            // An empty hint list is no hint (upstream builds hint sets only from non-empty lists), which turns
            // topology off for the port instead of leaving this endpoint out.
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .filter(|z| !z.is_empty())
                .map(|z| Arc::new(z.iter().map(|z| z.name.clone()).collect())),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .filter(|n| !n.is_empty())
                .map(|n| Arc::new(n.iter().map(|n| n.name.clone()).collect())),
        });
    }

    Ok(EndpointSlice {
        name,
        service_name,
        address_family,
        ports,
        endpoints,
        last_change_trigger_time: slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .cloned(),
    })
}

/// A ServiceCIDR. Its ranges become a drop rule, so each must be a range (network address and prefix) the
/// way the API validates them: `10.96.0.1/12` is refused rather than guessed at.
pub fn service_cidr(object: &networking::ServiceCIDR) -> Result<ServiceCidr, ConvertError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let cx = Ctx {
        kind: "ServiceCIDR",
        object: name.clone(),
    };
    if !is_dns_subdomain(&name) {
        return Err(cx.err(
            "metadata.name",
            format!("{name:?} is not a valid name (RFC 1123 subdomain)"),
        ));
    }
    let cidrs = object
        .spec
        .as_ref()
        .and_then(|s| s.cidrs.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, text)| {
            let field = format!("spec.cidrs[{i}]");
            let cidr = cx.cidr(&field, text)?;
            if cidr.trunc() != cidr {
                return Err(cx.err(
                    field,
                    format!("{text:?} has host bits set (the range is {})", cidr.trunc()),
                ));
            }
            Ok(cidr)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceCidr {
        name: ObjectName::new("", name),
        cidrs,
    })
}

pub fn node(node: &core::Node) -> Result<Node, ConvertError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let cx = Ctx {
        kind: "Node",
        object: name.clone(),
    };
    if name.is_empty() {
        return Err(cx.err("metadata.name", "missing"));
    }
    let spec = node.spec.as_ref();
    let cidr_strings: Vec<(String, &String)> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(c) if !c.is_empty() => c
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c))
            .collect(),
        _ => spec
            .and_then(|s| s.pod_cidr.as_ref())
            .map(|c| vec![("spec.podCIDR".to_string(), c)])
            .unwrap_or_default(),
    };
    let pod_cidrs = cidr_strings
        .into_iter()
        .map(|(field, c)| cx.cidr(field, c))
        .collect::<Result<Vec<_>, _>>()?;
    // Every InternalIP before every ExternalIP, each kind in API order: the node's primary address of a
    // family is the first of these, as upstream picks it.
    let mut addresses = Vec::new();
    let status_addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for kind in ["InternalIP", "ExternalIP"] {
        for (i, a) in status_addresses.into_iter().flatten().enumerate() {
            if a.type_ == kind {
                addresses.push(cx.ip(format!("status.addresses[{i}].address"), &a.address)?);
            }
        }
    }
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_DELETION_TAINT));
    Ok(Node {
        name,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        pod_cidrs,
        addresses,
        being_deleted: node.metadata.deletion_timestamp.is_some() || tainted,
    })
}

/// The node and zone names of one slice's endpoints, each allocated once: a slice's endpoints sit on a few
/// nodes in fewer zones.
#[derive(Default)]
struct SharedNames(Vec<Arc<str>>);

impl SharedNames {
    fn share(&mut self, name: Option<&str>) -> Option<Arc<str>> {
        let name = name?;
        if let Some(known) = self.0.iter().find(|n| ***n == *name) {
            return Some(known.clone());
        }
        let new: Arc<str> = Arc::from(name);
        self.0.push(new.clone());
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, port_name: &str) -> core::Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": port_name, "port": 80}]}
        }))
        .unwrap()
    }

    #[test]
    fn an_empty_namespace_is_the_default_one() {
        let mut object = svc("web", "http");
        object.metadata.namespace = Some(String::new());
        assert_eq!(
            service(&object, "apps").unwrap().name,
            ObjectName::new("apps", "web")
        );
    }

    /// Text an author could put in a name: DNS-label characters mostly, so that valid names come up, with the
    /// characters that would end a quoted comment, split a restore line or start a shell expansion mixed in.
    fn author_text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex(
            "[a-z0-9.-]{0,6}[a-zA-Z0-9 .\t\n\"'\\;$`|&()*/:_é-]{0,3}[a-z0-9-]{0,6}",
        )
        .unwrap()
    }

    proptest::proptest! {
        /// Whatever a Service's names hold, it is either refused naming the field that holds the bad text, or
        /// everything of it that reaches a rule comment is made of the characters DNS names allow.
        #[test]
        fn a_service_name_is_refused_by_field_or_safe_in_a_comment(
            namespace in author_text(),
            name in author_text(),
            port_name in author_text(),
        ) {
            let mut object = svc(&name, &port_name);
            object.metadata.namespace = Some(namespace.clone());
            match service(&object, "default") {
                Ok(converted) => {
                    for port in &converted.ports {
                        let spn = format!("{}:{}", converted.name, port.name);
                        proptest::prop_assert!(
                            spn.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-./:".contains(&b)),
                            "{spn:?} was accepted"
                        );
                    }
                }
                Err(e) => {
                    let bad = match e.field.as_str() {
                        "metadata.namespace" => &namespace,
                        "metadata.name" => &name,
                        "spec.ports[0].name" => &port_name,
                        other => return Err(proptest::test_runner::TestCaseError::fail(format!("refused for {other}: {e}"))),
                    };
                    let says = if bad.is_empty() { "missing".to_string() } else { format!("{bad:?}") };
                    proptest::prop_assert!(e.to_string().contains(&says), "{e} does not say {says}");
                }
            }
        }
    }

    fn cidr_object(name: &str, cidrs: &[&str]) -> networking::ServiceCIDR {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"cidrs": cidrs}
        }))
        .unwrap()
    }

    #[test]
    fn a_service_cidr_names_each_range_and_refuses_what_is_not_one() {
        let ok = service_cidr(&cidr_object("kubernetes", &["10.96.0.0/12", "fd00:10:96::/112"])).unwrap();
        assert_eq!(ok.name, ObjectName::new("", "kubernetes"));
        let ranges: Vec<String> = ok.cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(ranges, ["10.96.0.0/12", "fd00:10:96::/112"]);
        assert!(service_cidr(&cidr_object("empty", &[])).unwrap().cidrs.is_empty());

        let e = service_cidr(&cidr_object("kubernetes", &["10.96.0.0/12", "10.100.0.1/16"])).unwrap_err();
        assert_eq!(
            (e.kind, e.object.as_str(), e.field.as_str()),
            ("ServiceCIDR", "kubernetes", "spec.cidrs[1]")
        );
        assert!(e.reason.contains("10.100.0.0/16"), "{e}");
        let e = service_cidr(&cidr_object("kubernetes", &["10.96.0.0/33"])).unwrap_err();
        assert_eq!(e.field, "spec.cidrs[0]", "{e}");
        let e = service_cidr(&cidr_object("kubernetes", &["10.96.0.0/12 } accept"])).unwrap_err();
        assert_eq!(e.field, "spec.cidrs[0]", "{e}");
        let e = service_cidr(&cidr_object("Bad Name", &["10.96.0.0/12"])).unwrap_err();
        assert_eq!(e.field, "metadata.name", "{e}");
    }

    #[test]
    fn names_that_would_break_a_rule_comment_are_rejected() {
        assert!(service(&svc("web", "http"), "default").is_ok());
        let e = service(&svc("web\" -j ACCEPT", "http"), "default").unwrap_err();
        assert_eq!(e.field, "metadata.name");
        let e = service(&svc("web", "a b"), "default").unwrap_err();
        assert_eq!(e.field, "spec.ports[0].name");
        assert!(
            service(&svc("Web", "http"), "default").is_err(),
            "upper case is not a DNS label"
        );
        // Port names are RFC 1123 labels, as the API checks them: long ones and digits-only ones are valid.
        for valid in ["http-metrics-port", "8080", "grpc--web", &"p".repeat(63)] {
            assert!(service(&svc("web", valid), "default").is_ok(), "{valid:?}");
        }
        for invalid in [&"p".repeat(64), "-http", "http-", "HTTP", "h_p"] {
            let e = service(&svc("web", invalid), "default").unwrap_err();
            assert_eq!(e.field, "spec.ports[0].name", "{invalid:?}");
        }
    }

    fn slice(value: serde_json::Value) -> discovery::EndpointSlice {
        let mut base = serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": []
        });
        for (k, v) in value.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn unset_conditions_read_as_upstream_reads_them() {
        let s = slice(serde_json::json!({"endpoints": [
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "terminating": true}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}}
        ]}));
        let eps = endpoint_slice(&s, "default").unwrap().endpoints;
        let conditions: Vec<(bool, bool, bool)> =
            eps.iter().map(|e| (e.ready, e.serving, e.terminating)).collect();
        // A terminating endpoint whose producer left `serving` out is serving: it takes fallback traffic.
        assert_eq!(
            conditions,
            [(true, true, false), (false, true, true), (false, false, true)]
        );
    }

    #[test]
    fn an_unusable_slice_port_is_skipped_and_the_rest_kept() {
        let s = slice(serde_json::json!({
            "ports": [{"name": "zero", "port": 0}, {"name": "big", "port": 70000}, {"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}]
        }));
        let converted = endpoint_slice(&s, "default").unwrap();
        let ports: Vec<(&str, u16)> = converted
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(ports, [("http", 8080)]);
        assert_eq!(converted.endpoints.len(), 1);
    }

    #[test]
    fn legacy_address_spellings_are_read_not_rejected() {
        let s = slice(serde_json::json!({"endpoints": [
            {"addresses": ["10.000.001.005"]}, {"addresses": ["::ffff:10.0.0.6"]}
        ]}));
        let eps = endpoint_slice(&s, "default").unwrap().endpoints;
        let ips: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(ips, ["10.0.1.5", "10.0.0.6"]);

        let svc: core::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}], "type": "LoadBalancer",
                     "externalIPs": ["192.168.001.010"], "loadBalancerSourceRanges": ["10.000.0.0/16"]}
        }))
        .unwrap();
        let svc = service(&svc, "default").unwrap();
        assert_eq!(svc.external_ips, ["192.168.1.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            svc.load_balancer_source_ranges,
            ["10.0.0.0/16".parse::<IpNet>().unwrap()]
        );
        let bad: core::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}], "externalIPs": ["10.0.0.256"]}
        }))
        .unwrap();
        assert_eq!(service(&bad, "default").unwrap_err().field, "spec.externalIPs[0]");
    }

    #[test]
    fn an_unknown_ip_mode_leaves_that_ingress_to_the_load_balancer() {
        let svc: core::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}], "type": "LoadBalancer"},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.1", "ipMode": "Tunnel"}, {"ip": "192.0.2.2"}
            ]}}
        }))
        .unwrap();
        let svc = service(&svc, "default").unwrap();
        let captured: Vec<String> = svc
            .load_balancer_ingress
            .iter()
            .filter(|i| !i.ip_mode_proxy)
            .map(|i| i.ip.to_string())
            .collect();
        assert_eq!(captured, ["192.0.2.2"]);
    }

    #[test]
    fn an_empty_hint_list_is_no_hint() {
        let s = slice(serde_json::json!({"endpoints": [
            {"addresses": ["10.0.0.1"], "hints": {"forZones": []}},
            {"addresses": ["10.0.0.2"], "hints": {"forZones": [{"name": "z1"}], "forNodes": []}}
        ]}));
        let eps = endpoint_slice(&s, "default").unwrap().endpoints;
        assert!(eps[0].zone_hints.is_none());
        assert_eq!(eps[1].zone_hints.as_deref().map(|z| z.len()), Some(1));
        assert!(eps[1].node_hints.is_none());
    }

    #[test]
    fn internal_addresses_come_before_external_ones() {
        let n: core::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "10.0.0.10"},
                {"type": "ExternalIP", "address": "2001:db8::7"},
                {"type": "InternalIP", "address": "fd00::10"}
            ]}
        }))
        .unwrap();
        let addresses: Vec<String> = node(&n)
            .unwrap()
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(addresses, ["10.0.0.10", "fd00::10", "203.0.113.7", "2001:db8::7"]);
    }

    #[test]
    fn endpoints_of_one_slice_share_their_node_and_zone_names() {
        let slice: discovery::EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "node-a", "zone": "z1"},
                {"addresses": ["10.0.0.2"], "nodeName": "node-b", "zone": "z1"},
                {"addresses": ["10.0.0.3"], "nodeName": "node-a", "zone": "z1"},
                {"addresses": ["10.0.0.4"]}
            ]
        }))
        .unwrap();
        let eps = endpoint_slice(&slice, "default").unwrap().endpoints;
        let node = |i: usize| eps[i].node_name.clone().unwrap();
        let zone = |i: usize| eps[i].zone.clone().unwrap();
        assert_eq!((&*node(0), &*node(1), &*node(2)), ("node-a", "node-b", "node-a"));
        assert!(Arc::ptr_eq(&node(0), &node(2)), "one allocation per name");
        assert!(!Arc::ptr_eq(&node(0), &node(1)));
        assert!(Arc::ptr_eq(&zone(0), &zone(1)) && Arc::ptr_eq(&zone(1), &zone(2)));
        assert_eq!(
            (eps[3].node_name.as_deref(), eps[3].zone.as_deref()),
            (None, None)
        );
    }
}
