//! Names of everything in our table.
//!
//! Per-service objects are named `<kind>-<namespace>/<service>/<protocol>/<port>`, endpoint objects append
//! `__<ip>/<port>`. The table is ours alone, so no hash is needed to avoid clashes with other components, and
//! a name that reads as the service it belongs to makes `nft list` self-explaining. The longest possible name
//! (63-byte namespace and service, 15-byte port name, IPv6 endpoint) is about 205 bytes, inside nftables'
//! 255-byte limit, so names are never truncated.
//!
//! The owning Service can be read back from every per-service name (and from every element's comment), which
//! is how the planner groups objects into bounded transactions and how a read-back is attributed to services.

use std::net::IpAddr;

use svcproxy_model::{EndpointInfo, ServicePortName};

// Fixed objects.
pub const FILTER_PREROUTING: &str = "filter-prerouting";
pub const FILTER_INPUT: &str = "filter-input";
pub const FILTER_FORWARD: &str = "filter-forward";
pub const FILTER_OUTPUT: &str = "filter-output";
pub const FILTER_OUTPUT_POST_DNAT: &str = "filter-output-post-dnat";
pub const NAT_PREROUTING: &str = "nat-prerouting";
pub const NAT_OUTPUT: &str = "nat-output";
pub const NAT_POSTROUTING: &str = "nat-postrouting";
pub const SERVICES: &str = "services";
pub const MASQUERADING: &str = "masquerading";
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub const REJECT_CHAIN: &str = "reject-chain";

pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";
pub const HAIRPIN: &str = "hairpin";

/// Kinds of per-service objects, by name prefix.
const PREFIXES: [&str; 6] = [
    "service-",
    "local-",
    "external-",
    "firewall-",
    "endpoint-",
    "affinity-",
];

fn port_base(spn: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        spn.service.namespace,
        spn.service.name,
        spn.protocol.lower(),
        spn.port
    )
}

fn endpoint_base(spn: &ServicePortName, ep: &EndpointInfo) -> String {
    // `:` would end the name in nft's grammar, so IPv6 colons become dots.
    let ip = match ep.ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.to_string().replace(':', "."),
    };
    format!("{}__{ip}/{}", port_base(spn), ep.port)
}

/// Chain for cluster-wide traffic policy: picks among all cluster endpoints.
pub fn cluster_chain(spn: &ServicePortName) -> String {
    format!("service-{}", port_base(spn))
}

/// Chain for Local traffic policy: picks among node-local endpoints.
pub fn local_chain(spn: &ServicePortName) -> String {
    format!("local-{}", port_base(spn))
}

/// Entry chain for NodePort, externalIP and load-balancer traffic.
pub fn external_chain(spn: &ServicePortName) -> String {
    format!("external-{}", port_base(spn))
}

/// Source-range check of a load balancer.
pub fn firewall_chain(spn: &ServicePortName) -> String {
    format!("firewall-{}", port_base(spn))
}

pub fn endpoint_chain(spn: &ServicePortName, ep: &EndpointInfo) -> String {
    format!("endpoint-{}", endpoint_base(spn, ep))
}

/// Client addresses recently sent to this endpoint (ClientIP session affinity).
pub fn affinity_set(spn: &ServicePortName, ep: &EndpointInfo) -> String {
    format!("affinity-{}", endpoint_base(spn, ep))
}

/// The owner (`namespace/service`) of a per-service chain or set, from its name; `None` for fixed objects.
pub fn owner_of_object(name: &str) -> Option<String> {
    let rest = PREFIXES.iter().find_map(|p| name.strip_prefix(p))?;
    let mut parts = rest.splitn(3, '/');
    let (ns, svc, tail) = (parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || svc.is_empty() || tail.is_empty() {
        return None;
    }
    Some(format!("{ns}/{svc}"))
}

/// The owner of an element, from its comment (`namespace/service` or `namespace/service:port`).
pub fn owner_of_comment(comment: &str) -> String {
    owner_in_comment(comment).to_string()
}

/// [`owner_of_comment`] without a copy.
pub fn owner_in_comment(comment: &str) -> &str {
    comment.split(':').next().unwrap_or(comment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcproxy_model::{ObjectName, Protocol};

    #[test]
    fn names_and_owners() {
        let spn = ServicePortName::new(ObjectName::new("ns", "web"), "http", Protocol::Tcp);
        let ep = EndpointInfo {
            ip: "fd00::1".parse().unwrap(),
            port: 8080,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            zone_hints: None,
            node_hints: None,
        };
        assert_eq!(cluster_chain(&spn), "service-ns/web/tcp/http");
        assert_eq!(
            endpoint_chain(&spn, &ep),
            "endpoint-ns/web/tcp/http__fd00..1/8080"
        );
        assert_eq!(owner_of_object(&endpoint_chain(&spn, &ep)).unwrap(), "ns/web");
        assert_eq!(owner_of_object(&affinity_set(&spn, &ep)).unwrap(), "ns/web");
        assert_eq!(owner_of_object("service-endpoints-check"), None);
        assert_eq!(owner_of_object(SERVICES), None);
        assert_eq!(owner_of_comment("ns/web:http"), "ns/web");
        assert_eq!(owner_of_comment("ns/web"), "ns/web");
    }

    #[test]
    fn longest_names_fit_the_kernel_limit() {
        let long = "a".repeat(63);
        let spn = ServicePortName::new(ObjectName::new(&long, &long), "p".repeat(15), Protocol::Sctp);
        let ep = EndpointInfo {
            ip: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
            port: 65535,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            zone_hints: None,
            node_hints: None,
        };
        assert!(endpoint_chain(&spn, &ep).len() < 256);
        assert!(affinity_set(&spn, &ep).len() < 256);
    }
}
