//! Service and EndpointSlice manifests for the manifest-directory source.

/// One Service port: `name`, protocol, port, targetPort and an optional nodePort.
pub struct Port {
    pub name: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub target: u16,
    pub node_port: Option<u16>,
}

pub const HTTP: Port = Port {
    name: "http",
    protocol: "TCP",
    port: 80,
    target: 8080,
    node_port: None,
};

pub const DNS: Port = Port {
    name: "dns",
    protocol: "UDP",
    port: 53,
    target: 5353,
    node_port: None,
};

/// A Service and its one EndpointSlice. `spec_extra` are extra `spec:` lines (indented two spaces), `status` a
/// whole `status:` block or empty; `endpoints` are (address, nodeName), all ready.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    spec_extra: &str,
    status: &str,
    ports: &[Port],
    endpoints: &[(&str, &str)],
) -> String {
    let spec_ports: String = ports
        .iter()
        .map(|p| {
            let node_port = p
                .node_port
                .map(|n| format!(", nodePort: {n}"))
                .unwrap_or_default();
            format!(
                "  - {{name: {}, protocol: {}, port: {}, targetPort: {}{node_port}}}\n",
                p.name, p.protocol, p.port, p.target
            )
        })
        .collect();
    let slice_ports: String = ports
        .iter()
        .map(|p| {
            format!(
                "- {{name: {}, protocol: {}, port: {}}}\n",
                p.name, p.protocol, p.target
            )
        })
        .collect();
    let eps: String = endpoints
        .iter()
        .map(|(ip, node)| format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"))
        .collect();
    let endpoints_block = if eps.is_empty() {
        "endpoints: []\n".to_owned()
    } else {
        format!("endpoints:\n{eps}")
    };
    let spec_extra = if spec_extra.is_empty() {
        String::new()
    } else {
        format!("{}\n", spec_extra.trim_end())
    };
    let status = if status.is_empty() {
        String::new()
    } else {
        format!("{}\n", status.trim_end())
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {cluster_ip}
  ports:
{spec_ports}{spec_extra}{status}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
{slice_ports}{endpoints_block}"
    )
}

/// A `status:` block with one load-balancer ingress address.
pub fn lb_status(ip: &str) -> String {
    format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}")
}
