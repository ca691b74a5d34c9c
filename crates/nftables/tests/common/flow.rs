//! The packet-flow table: one cluster with every behaviour a Service proxy must have, and the packets that
//! exercise it with their expected outcome (endpoint set, masqueraded?, verdict).
//!
//! Node `node-a` is 10.0.0.10 with pods in 10.244.0.0/24 (cluster CIDR 10.244.0.0/16); 10.244.1.x and
//! 10.244.2.x are pods on other nodes.

use svcproxy_model::trace::{Origin, Packet, Verdict};
use svcproxy_model::{ClusterState, Protocol, ServiceType};
use svcproxy_nftables::{DispatchLayout, LocalDetector, NodePortAddresses, RenderConfig, Ruleset, trace};

use super::*;

pub const NODE_IP: &str = "10.0.0.10";
pub const LOCAL_POD: &str = "10.244.0.5";
pub const OUTSIDE: &str = "192.168.99.1";

pub fn flow_state() -> ClusterState {
    let tcp = |name: &str, p: u16, np: Option<u16>| port(name, Protocol::Tcp, p, np);
    let (k8s, k8s_slice) = kubernetes_service();
    let mut web = service(
        "flow",
        "web",
        ServiceType::ClusterIP,
        "10.96.1.1",
        vec![tcp("http", 80, None)],
    );
    web.ports.push(port("dns", Protocol::Udp, 53, None));
    let mut ext = service(
        "flow",
        "ext",
        ServiceType::ClusterIP,
        "10.96.1.4",
        vec![tcp("http", 80, None)],
    );
    ext.external_ips = vec![ip("192.0.2.10")];
    let mut lb = with_lb(
        service(
            "flow",
            "lb",
            ServiceType::LoadBalancer,
            "10.96.1.5",
            vec![tcp("http", 80, Some(30050))],
        ),
        &["192.0.2.50"],
    );
    lb.load_balancer_source_ranges = vec![net("203.0.113.0/24")];
    // Source ranges on a Service without endpoints: the firewall still drops whom the ranges leave out.
    let mut lb_idle = with_lb(
        service(
            "flow",
            "lb-idle",
            ServiceType::LoadBalancer,
            "10.96.1.12",
            vec![tcp("http", 80, Some(30120))],
        ),
        &["192.0.2.120"],
    );
    lb_idle.load_balancer_source_ranges = vec![net("203.0.113.0/24")];
    let etp_local = local_policies(
        with_lb(
            service(
                "flow",
                "etp-local",
                ServiceType::LoadBalancer,
                "10.96.1.6",
                vec![tcp("http", 80, Some(30060))],
            ),
            &["192.0.2.60"],
        ),
        true,
        false,
    );
    let etp_remote = local_policies(
        with_lb(
            service(
                "flow",
                "etp-remote",
                ServiceType::LoadBalancer,
                "10.96.1.7",
                vec![tcp("http", 80, Some(30070))],
            ),
            &["192.0.2.70"],
        ),
        true,
        false,
    );
    let services = vec![
        k8s,
        web,
        service(
            "flow",
            "empty",
            ServiceType::ClusterIP,
            "10.96.1.2",
            vec![tcp("http", 80, None)],
        ),
        service(
            "flow",
            "np",
            ServiceType::NodePort,
            "10.96.1.3",
            vec![tcp("http", 80, Some(30080))],
        ),
        ext,
        lb,
        lb_idle,
        etp_local,
        etp_remote,
        local_policies(
            service(
                "flow",
                "itp-local",
                ServiceType::ClusterIP,
                "10.96.1.8",
                vec![tcp("http", 80, None)],
            ),
            false,
            true,
        ),
        local_policies(
            service(
                "flow",
                "itp-remote",
                ServiceType::ClusterIP,
                "10.96.1.9",
                vec![tcp("http", 80, None)],
            ),
            false,
            true,
        ),
        sticky(
            service(
                "flow",
                "sticky",
                ServiceType::ClusterIP,
                "10.96.1.10",
                vec![tcp("http", 80, None)],
            ),
            600,
        ),
        service(
            "flow",
            "hairpin",
            ServiceType::ClusterIP,
            "10.96.1.11",
            vec![tcp("http", 80, None)],
        ),
    ];
    let http = [("http", Protocol::Tcp, 8080)];
    let slices = vec![
        k8s_slice,
        slice(
            "flow",
            "web-1",
            "web",
            &[("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 5353)],
            vec![ep("10.244.1.11", "node-b"), ep("10.244.2.12", "node-c")],
        ),
        slice("flow", "np-1", "np", &http, vec![ep("10.244.1.31", "node-b")]),
        slice("flow", "ext-1", "ext", &http, vec![ep("10.244.2.41", "node-c")]),
        slice("flow", "lb-1", "lb", &http, vec![ep("10.244.1.51", "node-b")]),
        slice(
            "flow",
            "etp-local-1",
            "etp-local",
            &http,
            vec![ep("10.244.0.61", NODE), ep("10.244.1.62", "node-b")],
        ),
        slice(
            "flow",
            "etp-remote-1",
            "etp-remote",
            &http,
            vec![ep("10.244.1.71", "node-b")],
        ),
        slice(
            "flow",
            "itp-local-1",
            "itp-local",
            &http,
            vec![ep("10.244.0.81", NODE), ep("10.244.2.82", "node-c")],
        ),
        slice(
            "flow",
            "itp-remote-1",
            "itp-remote",
            &http,
            vec![ep("10.244.2.91", "node-c")],
        ),
        slice(
            "flow",
            "sticky-1",
            "sticky",
            &http,
            vec![ep("10.244.1.101", "node-b"), ep("10.244.2.102", "node-c")],
        ),
        slice(
            "flow",
            "hairpin-1",
            "hairpin",
            &http,
            vec![ep("10.244.0.111", NODE)],
        ),
    ];
    state(services, slices)
}

/// Every dispatch layout, the default first; the last two switch to endpoint chains and vmaps above one
/// endpoint, so services mix both shapes.
pub const LAYOUTS: [DispatchLayout; 6] = [
    svcproxy_nftables::dispatch::DEFAULT_LAYOUT,
    DispatchLayout::Cascade { max_endpoints: 32 },
    DispatchLayout::NumgenVmap,
    DispatchLayout::Direct { max_endpoints: 32 },
    DispatchLayout::Direct { max_endpoints: 1 },
    DispatchLayout::Cascade { max_endpoints: 1 },
];

/// The reference runs' settings: ClusterCIDR detection, NodePorts on the node IP only.
pub fn flow_config(dispatch: DispatchLayout) -> RenderConfig {
    RenderConfig {
        local_detector: LocalDetector::Cidrs(vec![net("10.244.0.0/16")]),
        node_port_addresses: NodePortAddresses::Ips(vec![ip(NODE_IP)]),
        node_ip: Some(ip(NODE_IP)),
        dispatch,
        ..RenderConfig::default()
    }
}

pub struct Flow {
    pub what: &'static str,
    pub origin: Origin,
    pub source: &'static str,
    pub destination: &'static str,
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: &'static [&'static str],
    pub masquerade: bool,
    pub verdict: Verdict,
}

const fn f(
    what: &'static str,
    origin: Origin,
    source: &'static str,
    destination: &'static str,
    port: u16,
    (endpoints, masquerade, verdict): (&'static [&'static str], bool, Verdict),
) -> Flow {
    Flow {
        what,
        origin,
        source,
        destination,
        port,
        protocol: Protocol::Tcp,
        endpoints,
        masquerade,
        verdict,
    }
}

use Origin::{External, Host, Pod};
use Verdict::{Accept, Drop, Reject};

const WEB: &[&str] = &["10.244.1.11:8080", "10.244.2.12:8080"];
const ETP_ALL: &[&str] = &["10.244.0.61:8080", "10.244.1.62:8080"];

pub fn flows() -> Vec<Flow> {
    let mut v = vec![
        f(
            "clusterIP from a pod",
            Pod,
            LOCAL_POD,
            "10.96.1.1",
            80,
            (WEB, false, Accept),
        ),
        f(
            "clusterIP from the host is masqueraded",
            Host,
            NODE_IP,
            "10.96.1.1",
            80,
            (WEB, true, Accept),
        ),
        f(
            "clusterIP from outside is masqueraded",
            External,
            OUTSIDE,
            "10.96.1.1",
            80,
            (WEB, true, Accept),
        ),
        f(
            "undefined port of a clusterIP",
            Pod,
            LOCAL_POD,
            "10.96.1.1",
            81,
            (&[], false, Reject),
        ),
        f(
            "no endpoints: reject",
            Pod,
            LOCAL_POD,
            "10.96.1.2",
            80,
            (&[], false, Reject),
        ),
        f(
            "no endpoints from the host: reject",
            Host,
            NODE_IP,
            "10.96.1.2",
            80,
            (&[], false, Reject),
        ),
        f(
            "nodePort from outside",
            External,
            OUTSIDE,
            NODE_IP,
            30080,
            (&["10.244.1.31:8080"], true, Accept),
        ),
        f(
            "nodePort from the host",
            Host,
            NODE_IP,
            NODE_IP,
            30080,
            (&["10.244.1.31:8080"], true, Accept),
        ),
        f(
            "unused port of the node",
            External,
            OUTSIDE,
            NODE_IP,
            30099,
            (&[], false, Accept),
        ),
        f(
            "externalIP from outside",
            External,
            OUTSIDE,
            "192.0.2.10",
            80,
            (&["10.244.2.41:8080"], true, Accept),
        ),
        f(
            "externalIP from a pod",
            Pod,
            LOCAL_POD,
            "192.0.2.10",
            80,
            (&["10.244.2.41:8080"], true, Accept),
        ),
        f(
            "LB IP, allowed source",
            External,
            "203.0.113.7",
            "192.0.2.50",
            80,
            (&["10.244.1.51:8080"], true, Accept),
        ),
        f(
            "LB IP, blocked source",
            External,
            "198.51.100.7",
            "192.0.2.50",
            80,
            (&[], false, Drop),
        ),
        f(
            "LB IP without endpoints, allowed source: reject",
            External,
            "203.0.113.7",
            "192.0.2.120",
            80,
            (&[], false, Reject),
        ),
        f(
            "LB IP without endpoints, blocked source: dropped, not told",
            External,
            "198.51.100.7",
            "192.0.2.120",
            80,
            (&[], false, Drop),
        ),
        f(
            "LB IP without endpoints, blocked source on the host: dropped",
            Host,
            NODE_IP,
            "192.0.2.120",
            80,
            (&[], false, Drop),
        ),
        f(
            "LB nodePort without endpoints ignores source ranges: reject",
            External,
            "198.51.100.7",
            NODE_IP,
            30120,
            (&[], false, Reject),
        ),
        f(
            "LB nodePort ignores source ranges",
            External,
            "198.51.100.7",
            NODE_IP,
            30050,
            (&["10.244.1.51:8080"], true, Accept),
        ),
        f(
            "eTP Local: outside keeps its source, local endpoint only",
            External,
            OUTSIDE,
            "192.0.2.60",
            80,
            (&["10.244.0.61:8080"], false, Accept),
        ),
        f(
            "eTP Local nodePort",
            External,
            OUTSIDE,
            NODE_IP,
            30060,
            (&["10.244.0.61:8080"], false, Accept),
        ),
        f(
            "eTP Local: pods short-circuit to all endpoints",
            Pod,
            LOCAL_POD,
            "192.0.2.60",
            80,
            (ETP_ALL, false, Accept),
        ),
        f(
            "eTP Local: the host short-circuits, masqueraded",
            Host,
            NODE_IP,
            "192.0.2.60",
            80,
            (ETP_ALL, true, Accept),
        ),
        f(
            "eTP Local without local endpoints: drop",
            External,
            OUTSIDE,
            "192.0.2.70",
            80,
            (&[], false, Drop),
        ),
        f(
            "eTP Local nodePort without local endpoints: drop",
            External,
            OUTSIDE,
            NODE_IP,
            30070,
            (&[], false, Drop),
        ),
        f(
            "eTP Local without local endpoints, from a pod",
            Pod,
            LOCAL_POD,
            "192.0.2.70",
            80,
            (&["10.244.1.71:8080"], false, Accept),
        ),
        f(
            "iTP Local: local endpoint only",
            Pod,
            LOCAL_POD,
            "10.96.1.8",
            80,
            (&["10.244.0.81:8080"], false, Accept),
        ),
        f(
            "iTP Local without local endpoints: drop",
            Pod,
            LOCAL_POD,
            "10.96.1.9",
            80,
            (&[], false, Drop),
        ),
        f(
            "ClientIP affinity: first connection may go anywhere",
            Pod,
            LOCAL_POD,
            "10.96.1.10",
            80,
            (&["10.244.1.101:8080", "10.244.2.102:8080"], false, Accept),
        ),
        f(
            "hairpin: a pod reaching itself is masqueraded",
            Pod,
            "10.244.0.111",
            "10.96.1.11",
            80,
            (&["10.244.0.111:8080"], true, Accept),
        ),
        f(
            "not hairpin: another pod",
            Pod,
            LOCAL_POD,
            "10.96.1.11",
            80,
            (&["10.244.0.111:8080"], false, Accept),
        ),
        f(
            "kubernetes service from the host",
            Host,
            NODE_IP,
            "10.96.0.1",
            443,
            (&["10.0.0.10:6443"], true, Accept),
        ),
        f(
            "the host to the kubernetes endpoint directly, not through the Service, keeps its source",
            Host,
            NODE_IP,
            NODE_IP,
            6443,
            (&[], false, Accept),
        ),
    ];
    let mut udp = f(
        "UDP clusterIP port",
        Pod,
        LOCAL_POD,
        "10.96.1.1",
        53,
        (&["10.244.1.11:5353", "10.244.2.12:5353"], false, Accept),
    );
    udp.protocol = Protocol::Udp;
    v.push(udp);
    let mut wrong = f(
        "TCP to a UDP-only port: undefined",
        Pod,
        LOCAL_POD,
        "10.96.1.1",
        53,
        (&[], false, Reject),
    );
    wrong.protocol = Protocol::Tcp;
    v.push(wrong);
    v
}

/// Behaviour where we deliberately differ from upstream: host traffic to an eTP=Local external address
/// without local endpoints is short-circuited like pod traffic, where upstream drops it before DNAT.
pub fn host_to_local_policy_without_local_endpoints() -> Flow {
    f(
        "eTP Local without local endpoints, from the host",
        Host,
        NODE_IP,
        "192.0.2.70",
        80,
        (&["10.244.1.71:8080"], true, Accept),
    )
}

pub fn packet(flow: &Flow) -> Packet {
    Packet {
        origin: flow.origin,
        source: ip(flow.source),
        destination: ip(flow.destination),
        port: flow.port,
        protocol: flow.protocol,
    }
}

/// Runs every flow through the tracer and reports all mismatches at once.
pub fn check_flows(rs: &Ruleset, flows: &[Flow], label: &str) {
    let mut failures = Vec::new();
    for flow in flows {
        let t = trace(rs, &packet(flow), &[ip(NODE_IP)])
            .unwrap_or_else(|e| panic!("{label}: {}: {e}", flow.what));
        let want: Vec<String> = flow.endpoints.iter().map(|s| s.to_string()).collect();
        if t.endpoints != want || t.masquerade != flow.masquerade || t.verdict != flow.verdict {
            failures.push(format!(
                "{}: got {:?} masq={} {:?}, want {:?} masq={} {:?}\n  steps: {:#?}",
                flow.what, t.endpoints, t.masquerade, t.verdict, want, flow.masquerade, flow.verdict, t.steps
            ));
        }
    }
    assert!(failures.is_empty(), "{label}:\n{}", failures.join("\n"));
}
