//! Properties that must hold for any cluster state.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use svcproxy_model::intent::build_intent;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, IntentConfig, IpFamily, ObjectName, Protocol,
    Service, ServicePort, TrafficPolicy,
};

#[derive(Debug, Clone)]
struct GenEndpoint {
    host: u8,
    ready: bool,
    terminating: bool,
    local: bool,
    slice: u8,
}

fn gen_endpoint() -> impl Strategy<Value = GenEndpoint> {
    (1u8..40, any::<bool>(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(
        |(host, ready, terminating, local, slice)| GenEndpoint {
            host,
            ready,
            terminating,
            local,
            slice,
        },
    )
}

/// Distinct service ids: two objects with one name are one object, and the later version legitimately wins.
fn gen_services() -> impl Strategy<Value = Vec<(u8, bool, Vec<GenEndpoint>)>> {
    prop::collection::btree_map(
        0u8..20,
        (any::<bool>(), prop::collection::vec(gen_endpoint(), 0..12)),
        0..8,
    )
    .prop_map(|m| m.into_iter().map(|(id, (local, eps))| (id, local, eps)).collect())
}

/// Builds a state by inserting objects in the given order; BTreeMap keys make order irrelevant only if the
/// builder is order-independent, which is what the property checks.
fn build(services: &[(u8, bool, Vec<GenEndpoint>)], reverse: bool) -> ClusterState {
    let mut objects: Vec<(Option<Service>, Vec<EndpointSlice>)> = Vec::new();
    for (id, local_policy, eps) in services {
        let name = format!("svc{id}");
        let mut svc = Service::cluster_ip(
            ObjectName::new("ns", &name),
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, *id)),
            vec![ServicePort {
                name: "p".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
        );
        if *local_policy {
            svc.internal_traffic_policy = TrafficPolicy::Local;
        }
        let mut slices = Vec::new();
        for s in 0..3u8 {
            let endpoints: Vec<Endpoint> = eps
                .iter()
                .filter(|e| e.slice == s)
                .map(|e| Endpoint {
                    address: IpAddr::V4(Ipv4Addr::new(10, 244, *id, e.host)),
                    ready: e.ready,
                    serving: e.ready || e.terminating,
                    terminating: e.terminating,
                    node_name: Some(if e.local { "me".into() } else { "other".into() }),
                    zone: None,
                    zone_hints: None,
                    node_hints: None,
                })
                .collect();
            slices.push(EndpointSlice {
                name: ObjectName::new("ns", format!("{name}-{s}")),
                service_name: name.clone(),
                address_family: Some(IpFamily::V4),
                ports: vec![EndpointPort {
                    name: "p".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                }],
                endpoints,
                last_change_trigger_time: None,
            });
        }
        objects.push((Some(svc), slices));
    }
    if reverse {
        objects.reverse();
        for (_, slices) in &mut objects {
            slices.reverse();
        }
    }
    let mut state = ClusterState::default();
    for (svc, slices) in objects {
        let svc = svc.unwrap();
        state.services.insert(svc.name.clone(), svc);
        for s in slices {
            state.endpoint_slices.insert(s.name.clone(), s);
        }
    }
    state
}

proptest! {
    #[test]
    fn intent_is_independent_of_insertion_order(services in gen_services()) {
        let config = IntentConfig { family: IpFamily::V4, node_name: "me".into() };
        let a = build_intent(&build(&services, false), &config);
        let b = build_intent(&build(&services, true), &config);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn every_selected_endpoint_appears_once(services in gen_services()) {
        let config = IntentConfig { family: IpFamily::V4, node_name: "me".into() };
        let intent = build_intent(&build(&services, false), &config);
        for spi in intent.service_ports.values() {
            for set in [&spi.endpoints.cluster, &spi.endpoints.local, spi.endpoints.all_reachable()] {
                let unique: BTreeSet<String> = set.iter().map(ToString::to_string).collect();
                prop_assert_eq!(unique.len(), set.len());
            }
            for e in spi.endpoints.cluster.iter().chain(&spi.endpoints.local) {
                prop_assert!(spi.endpoints.all_reachable().contains(e));
                prop_assert!(e.ready || (e.serving && e.terminating));
            }
            for e in &spi.endpoints.local {
                prop_assert!(e.is_local);
            }
        }
    }
}
