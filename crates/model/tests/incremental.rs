//! Rebuilding only the changed Services gives exactly the intent a full build gives, whatever the changes.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use svcproxy_model::intent::build_intent;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, IntentChanges, IntentConfig, IpFamily, ObjectName,
    Protocol, Service, ServicePort, SliceIndex, TrafficPolicy, update_intent,
};

fn config() -> IntentConfig {
    IntentConfig {
        family: IpFamily::V4,
        node_name: "me".into(),
    }
}

fn service(id: u8, local: bool, ports: u8) -> Service {
    let mut svc = Service::cluster_ip(
        ObjectName::new("ns", format!("svc{id}")),
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, id)),
        (0..ports)
            .map(|p| ServicePort {
                name: format!("p{p}"),
                protocol: if p % 2 == 0 { Protocol::Tcp } else { Protocol::Udp },
                port: 80 + u16::from(p),
                node_port: None,
            })
            .collect(),
    );
    if local {
        svc.internal_traffic_policy = TrafficPolicy::Local;
    }
    svc
}

/// A slice named `slice{slice}` labelled for `svc{owner}`, with endpoints `hosts` (a host's low bit says ready,
/// the next bit local).
fn slice(slice: u8, owner: u8, hosts: &[u8]) -> EndpointSlice {
    EndpointSlice {
        name: ObjectName::new("ns", format!("slice{slice}")),
        service_name: format!("svc{owner}"),
        address_family: Some(IpFamily::V4),
        ports: (0..2u8)
            .map(|p| EndpointPort {
                name: format!("p{p}"),
                protocol: if p % 2 == 0 { Protocol::Tcp } else { Protocol::Udp },
                port: 8080 + u16::from(p),
            })
            .collect(),
        endpoints: hosts
            .iter()
            .map(|h| Endpoint {
                address: IpAddr::V4(Ipv4Addr::new(10, 244, owner, *h)),
                ready: h & 1 == 1,
                serving: h & 1 == 1,
                terminating: false,
                node_name: Some(if h & 2 == 2 { "me".into() } else { "other".into() }),
                zone: None,
                zone_hints: None,
                node_hints: None,
            })
            .collect(),
        last_change_trigger_time: None,
    }
}

#[derive(Debug, Clone)]
enum Op {
    PutService { id: u8, local: bool, ports: u8 },
    DeleteService { id: u8 },
    PutSlice { slice: u8, owner: u8, hosts: Vec<u8> },
    DeleteSlice { slice: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..8, any::<bool>(), 0u8..3).prop_map(|(id, local, ports)| Op::PutService { id, local, ports }),
        (0u8..8).prop_map(|id| Op::DeleteService { id }),
        (0u8..12, 0u8..8, prop::collection::vec(1u8..30, 0..6))
            .prop_map(|(slice, owner, hosts)| Op::PutSlice { slice, owner, hosts }),
        (0u8..12).prop_map(|slice| Op::DeleteSlice { slice }),
    ]
}

/// Applies one change and records whose inputs it touched, as the engine does: a Service by name, a slice by
/// the Service it was labelled for before and after.
fn apply(state: &mut ClusterState, changes: &mut IntentChanges, op: &Op) {
    match op {
        Op::PutService { id, local, ports } => {
            let svc = service(*id, *local, *ports);
            changes.service(&svc.name);
            state.services.insert(svc.name.clone(), svc);
        }
        Op::DeleteService { id } => {
            let name = ObjectName::new("ns", format!("svc{id}"));
            changes.service(&name);
            state.services.remove(&name);
        }
        Op::PutSlice {
            slice: s,
            owner,
            hosts,
        } => {
            let new = slice(*s, *owner, hosts);
            if let Some(old) = state.endpoint_slices.get(&new.name) {
                changes.slice(old);
            }
            changes.slice(&new);
            state.endpoint_slices.insert(new.name.clone(), new);
        }
        Op::DeleteSlice { slice } => {
            let name = ObjectName::new("ns", format!("slice{slice}"));
            if let Some(old) = state.endpoint_slices.remove(&name) {
                changes.slice(&old);
            }
        }
    }
}

proptest! {
    #[test]
    fn incremental_intent_equals_full_build(
        initial in prop::collection::vec(op(), 0..30),
        rounds in prop::collection::vec(prop::collection::vec(op(), 0..4), 1..6),
    ) {
        let mut state = ClusterState::default();
        let mut ignored = IntentChanges::default();
        for o in &initial {
            apply(&mut state, &mut ignored, o);
        }
        let mut intent = build_intent(&state, &config());
        let mut index = SliceIndex::of_state(&state);
        // Each round builds on the previous round's incremental intent, as successive syncs do.
        for round in &rounds {
            let mut changes = IntentChanges::default();
            for o in round {
                apply(&mut state, &mut changes, o);
            }
            intent = update_intent(&intent, &state, &mut index, &config(), &changes);
            prop_assert_eq!(&intent, &build_intent(&state, &config()));
        }
    }
}

#[test]
fn unchanged_ports_are_shared_with_the_previous_intent() {
    let mut state = ClusterState::default();
    for id in 0..20 {
        let svc = service(id, false, 2);
        state.services.insert(svc.name.clone(), svc);
        let s = slice(id, id, &[1, 3, 5]);
        state.endpoint_slices.insert(s.name.clone(), s);
    }
    let before = build_intent(&state, &config());
    let mut index = SliceIndex::of_state(&state);
    let mut changes = IntentChanges::default();
    apply(
        &mut state,
        &mut changes,
        &Op::PutSlice {
            slice: 3,
            owner: 3,
            hosts: vec![1, 7],
        },
    );
    let after = update_intent(&before, &state, &mut index, &config(), &changes);
    assert_eq!(after, build_intent(&state, &config()));
    for (name, spi) in &after.service_ports {
        let shared = std::sync::Arc::ptr_eq(spi, &before.service_ports[name]);
        assert_eq!(shared, name.service.name != "svc3", "{name}");
    }
}
