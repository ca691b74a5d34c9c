//! Endpoint selection, rule by rule, through the public intent builder.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use svcproxy_model::intent::build_intent;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, Intent, IntentConfig, IpFamily, LoadBalancerIngress,
    Node, ObjectName, Protocol, Service, ServicePort, ServicePortIntent, ServiceType, TrafficPolicy,
};

const NODE: &str = "node-a";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc() -> Service {
    Service::cluster_ip(
        ObjectName::new("ns", "web"),
        ip("10.96.0.10"),
        vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }],
    )
}

#[derive(Clone, Copy)]
struct Ep {
    ip: &'static str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    local: bool,
    zones: Option<&'static [&'static str]>,
    nodes: Option<&'static [&'static str]>,
}

const fn ep(ip: &'static str) -> Ep {
    Ep {
        ip,
        ready: Some(true),
        serving: None,
        terminating: None,
        local: false,
        zones: None,
        nodes: None,
    }
}

fn to_endpoint(e: Ep) -> Endpoint {
    // Absent conditions: ready unless said otherwise, and serving as ready (the converter reads an absent
    // `serving` as true; the cases here that care spell it out).
    let ready = e.ready.unwrap_or(true);
    Endpoint {
        address: ip(e.ip),
        ready,
        serving: e.serving.unwrap_or(ready),
        terminating: e.terminating.unwrap_or(false),
        node_name: Some(if e.local { NODE.into() } else { "node-b".into() }),
        zone: None,
        zone_hints: e
            .zones
            .map(|z| Arc::new(z.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>())),
        node_hints: e
            .nodes
            .map(|z| Arc::new(z.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>())),
    }
}

fn state(service: Service, eps: &[Ep]) -> ClusterState {
    let mut st = ClusterState::default();
    let slice = EndpointSlice {
        name: ObjectName::new("ns", "web-1"),
        service_name: "web".into(),
        address_family: Some(IpFamily::V4),
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: eps.iter().copied().map(to_endpoint).collect(),
        last_change_trigger_time: None,
    };
    st.endpoint_slices.insert(slice.name.clone(), slice);
    st.services.insert(service.name.clone(), service);
    let mut node = Node {
        name: NODE.into(),
        ..Default::default()
    };
    node.labels.insert(Node::ZONE_LABEL.into(), "zone-a".into());
    st.node = Some(node);
    st
}

fn intent(st: &ClusterState) -> Intent {
    build_intent(
        st,
        &IntentConfig {
            family: IpFamily::V4,
            node_name: NODE.into(),
        },
    )
}

fn only_port(st: &ClusterState) -> ServicePortIntent {
    let intent = intent(st);
    assert_eq!(intent.service_ports.len(), 1);
    (**intent.service_ports.values().next().unwrap()).clone()
}

fn ips(v: &[svcproxy_model::EndpointInfo]) -> Vec<String> {
    v.iter().map(|e| e.ip.to_string()).collect()
}

struct Case {
    name: &'static str,
    service: fn() -> Service,
    eps: Vec<Ep>,
    cluster: &'static [&'static str],
    local: &'static [&'static str],
    has_endpoints: bool,
}

fn local_svc() -> Service {
    let mut s = svc();
    s.internal_traffic_policy = TrafficPolicy::Local;
    s
}

fn etp_local_lb() -> Service {
    let mut s = svc();
    s.service_type = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30080);
    s.load_balancer_ingress = vec![LoadBalancerIngress {
        ip: ip("192.0.2.1"),
        ip_mode_proxy: false,
    }];
    s.external_traffic_policy = TrafficPolicy::Local;
    s
}

const TERMINATING: Ep = Ep {
    ready: Some(false),
    serving: Some(true),
    terminating: Some(true),
    ..ep("10.0.0.9")
};
const NOT_SERVING_TERMINATING: Ep = Ep {
    ready: Some(false),
    serving: Some(false),
    terminating: Some(true),
    ..ep("10.0.0.8")
};
const UNREADY: Ep = Ep {
    ready: Some(false),
    ..ep("10.0.0.7")
};

#[test]
fn endpoint_selection_table() {
    let cases = [
        Case {
            name: "ready endpoints are all used",
            service: svc,
            eps: vec![ep("10.0.0.1"), ep("10.0.0.2")],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "unready endpoints are skipped",
            service: svc,
            eps: vec![ep("10.0.0.1"), UNREADY],
            cluster: &["10.0.0.1"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "terminating endpoints are not used while a ready one exists",
            service: svc,
            eps: vec![ep("10.0.0.1"), TERMINATING],
            cluster: &["10.0.0.1"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "serving terminating endpoints are the fallback when none is ready",
            service: svc,
            eps: vec![TERMINATING, NOT_SERVING_TERMINATING, UNREADY],
            cluster: &["10.0.0.9"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "nothing serving means no endpoints",
            service: svc,
            eps: vec![NOT_SERVING_TERMINATING, UNREADY],
            cluster: &[],
            local: &[],
            has_endpoints: false,
        },
        Case {
            name: "zone hints for this zone restrict the cluster set",
            service: svc,
            eps: vec![
                Ep {
                    zones: Some(&["zone-a"]),
                    ..ep("10.0.0.1")
                },
                Ep {
                    zones: Some(&["zone-b"]),
                    ..ep("10.0.0.2")
                },
            ],
            cluster: &["10.0.0.1"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "zone hints are ignored unless every ready endpoint has them",
            service: svc,
            eps: vec![
                Ep {
                    zones: Some(&["zone-a"]),
                    ..ep("10.0.0.1")
                },
                ep("10.0.0.2"),
            ],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "zone hints are ignored when none names this zone",
            service: svc,
            eps: vec![
                Ep {
                    zones: Some(&["zone-b"]),
                    ..ep("10.0.0.1")
                },
                Ep {
                    zones: Some(&["zone-c"]),
                    ..ep("10.0.0.2")
                },
            ],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "node hints for this node win over zone hints",
            service: svc,
            eps: vec![
                Ep {
                    zones: Some(&["zone-a"]),
                    nodes: Some(&["node-b"]),
                    ..ep("10.0.0.1")
                },
                Ep {
                    zones: Some(&["zone-a"]),
                    nodes: Some(&[NODE]),
                    ..ep("10.0.0.2")
                },
            ],
            cluster: &["10.0.0.2"],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "internal traffic policy Local uses only local endpoints",
            service: local_svc,
            eps: vec![
                ep("10.0.0.1"),
                Ep {
                    local: true,
                    ..ep("10.0.0.2")
                },
            ],
            cluster: &[],
            local: &["10.0.0.2"],
            has_endpoints: true,
        },
        Case {
            name: "iTP Local without local endpoints still has endpoints (drop, not reject)",
            service: local_svc,
            eps: vec![ep("10.0.0.1")],
            cluster: &[],
            local: &[],
            has_endpoints: true,
        },
        Case {
            name: "local terminating fallback applies per node",
            service: local_svc,
            eps: vec![
                ep("10.0.0.1"),
                Ep {
                    local: true,
                    ..TERMINATING
                },
            ],
            cluster: &[],
            local: &["10.0.0.9"],
            has_endpoints: true,
        },
        Case {
            name: "hints never restrict the local set",
            service: etp_local_lb,
            eps: vec![
                Ep {
                    zones: Some(&["zone-b"]),
                    local: true,
                    ..ep("10.0.0.1")
                },
                Ep {
                    zones: Some(&["zone-a"]),
                    ..ep("10.0.0.2")
                },
            ],
            cluster: &["10.0.0.2"],
            local: &["10.0.0.1"],
            has_endpoints: true,
        },
        Case {
            name: "eTP Local needs both sets (cluster for pod short-circuit)",
            service: etp_local_lb,
            eps: vec![
                ep("10.0.0.1"),
                Ep {
                    local: true,
                    ..ep("10.0.0.2")
                },
            ],
            cluster: &["10.0.0.1", "10.0.0.2"],
            local: &["10.0.0.2"],
            has_endpoints: true,
        },
    ];
    for case in cases {
        let spi = only_port(&state((case.service)(), &case.eps));
        assert_eq!(
            ips(&spi.endpoints.cluster),
            case.cluster,
            "{}: cluster set",
            case.name
        );
        assert_eq!(ips(&spi.endpoints.local), case.local, "{}: local set", case.name);
        assert_eq!(
            spi.has_endpoints(),
            case.has_endpoints,
            "{}: has endpoints",
            case.name
        );
    }
}

#[test]
fn derived_booleans_follow_policies() {
    let spi = only_port(&state(local_svc(), &[ep("10.0.0.1")]));
    assert!(
        spi.has_endpoints() && !spi.has_internal_endpoints(),
        "iTP Local, no local: drop"
    );
    assert!(!spi.uses_cluster_chain() && !spi.uses_local_chain());

    let spi = only_port(&state(svc(), &[]));
    assert!(
        !spi.has_endpoints() && !spi.has_internal_endpoints(),
        "no endpoints: reject"
    );

    let spi = only_port(&state(etp_local_lb(), &[ep("10.0.0.1")]));
    assert!(spi.external_policy_local && spi.has_internal_endpoints() && !spi.has_external_endpoints());
    assert!(spi.uses_external_chain() && spi.uses_cluster_chain() && !spi.uses_local_chain());
}

#[test]
fn services_without_a_virtual_ip_are_ignored() {
    let mut headless = svc();
    headless.headless = true;
    headless.cluster_ips.clear();
    let mut external_name = svc();
    external_name.service_type = ServiceType::ExternalName;
    let mut v6_only = svc();
    v6_only.cluster_ips = vec![ip("fd00::10")];
    for s in [headless, external_name, v6_only] {
        let intent = build_intent(
            &state(s, &[ep("10.0.0.1")]),
            &IntentConfig {
                family: IpFamily::V4,
                node_name: NODE.into(),
            },
        );
        assert!(intent.service_ports.is_empty());
    }
}

#[test]
fn proxy_mode_lb_ingress_and_zero_source_ranges_are_dropped() {
    let mut s = etp_local_lb();
    s.load_balancer_ingress.push(LoadBalancerIngress {
        ip: ip("192.0.2.2"),
        ip_mode_proxy: true,
    });
    s.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap(), "0.0.0.0/0".parse().unwrap()];
    let spi = only_port(&state(s, &[ep("10.0.0.1")]));
    assert_eq!(spi.load_balancer_ips, vec![ip("192.0.2.1")]);
    assert!(spi.source_ranges.is_empty());
}

#[test]
fn a_local_load_balancer_has_a_health_check_before_it_has_an_address() {
    // No node ports allocated and no ingress address yet: the port is not reachable from outside, but the
    // load balancer being set up probes the health-check port all the same.
    let mut s = svc();
    s.service_type = ServiceType::LoadBalancer;
    s.external_traffic_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(32000);
    s.ports.push(ServicePort {
        name: "grpc".into(),
        protocol: Protocol::Tcp,
        port: 81,
        node_port: None,
    });
    let mut st = state(
        s.clone(),
        &[
            Ep {
                local: true,
                ..ep("10.0.0.1")
            },
            Ep {
                local: true,
                ..ep("10.0.0.2")
            },
            Ep {
                local: true,
                ready: Some(false),
                ..ep("10.0.0.3")
            },
            ep("10.0.0.4"),
        ],
    );
    // A second slice serves the other port from one of the same pods and one more: the check counts
    // addresses once across ports (3: .1, .2, .5), not the best port (2).
    let mut grpc = st.endpoint_slices.values().next().unwrap().clone();
    grpc.name = ObjectName::new("ns", "web-2");
    grpc.ports[0].name = "grpc".into();
    grpc.endpoints = [
        Ep {
            local: true,
            ..ep("10.0.0.1")
        },
        Ep {
            local: true,
            ..ep("10.0.0.5")
        },
    ]
    .into_iter()
    .map(to_endpoint)
    .collect();
    st.endpoint_slices.insert(grpc.name.clone(), grpc);
    let checks = intent(&st).health_checks();
    let hc = checks.get(&s.name).expect("a health check");
    assert_eq!((hc.node_port, hc.local_ready_endpoints), (32000, 3));

    // Cluster policy, or not a load balancer: none.
    for (ty, policy) in [
        (ServiceType::LoadBalancer, TrafficPolicy::Cluster),
        (ServiceType::NodePort, TrafficPolicy::Local),
    ] {
        let mut other = s.clone();
        (other.service_type, other.external_traffic_policy) = (ty, policy);
        st.services.insert(other.name.clone(), other);
        assert!(intent(&st).health_checks().is_empty());
    }
}

#[test]
fn draining_udp_endpoints_keep_their_flows_and_gone_ones_lose_them() {
    use std::net::SocketAddr;
    use svcproxy_model::conntrack_plan::{FlowEntry, FlowProtocol, FlowTuple, stale_flows};

    // A UDP port: one ready pod, one serving but terminating (draining during a rollout), one terminating
    // and no longer serving.
    let mut s = svc();
    s.ports[0].protocol = Protocol::Udp;
    let st = state(
        s,
        &[
            ep("10.0.0.1"),
            Ep {
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true),
                ..ep("10.0.0.2")
            },
            Ep {
                ready: Some(false),
                serving: Some(false),
                terminating: Some(true),
                ..ep("10.0.0.3")
            },
        ],
    );
    let mut st = st;
    for slice in st.endpoint_slices.values_mut() {
        slice.ports[0].protocol = Protocol::Udp;
    }
    let intent = intent(&st);
    let port = intent.service_ports.values().next().unwrap();
    assert_eq!(
        port.endpoints
            .cluster
            .iter()
            .map(|e| e.ip.to_string())
            .collect::<Vec<_>>(),
        ["10.0.0.1"],
        "new flows go to the ready pod only"
    );
    let client: SocketAddr = "10.244.0.50:40000".parse().unwrap();
    let flow_to = |target: &str| {
        let target: SocketAddr = target.parse().unwrap();
        FlowEntry::new(
            FlowProtocol::Udp,
            FlowTuple::new(client, "10.96.0.10:80".parse().unwrap()),
            FlowTuple::new(target, client),
        )
    };
    let flows = [
        flow_to("10.0.0.1:8080"),
        flow_to("10.0.0.2:8080"),
        flow_to("10.0.0.3:8080"),
    ];
    let stale: Vec<String> = stale_flows(&flows, &intent, &[])
        .iter()
        .map(|f| f.reply.src.to_string())
        .collect();
    assert_eq!(stale, ["10.0.0.3"], "the draining pod keeps its sessions");
}
