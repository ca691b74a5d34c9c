//! Rebuilding only the changed Services gives exactly the intent a full build gives, whatever the changes.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use imbl::ordmap::DiffItem;

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

/// Service `big{i}` (10.97.x.y, one TCP port) and its slice with one ready endpoint whose last octet is `host`.
fn big(i: u16, host: u8) -> (Service, EndpointSlice) {
    let svc = Service::cluster_ip(
        ObjectName::new("ns", format!("big{i}")),
        IpAddr::V4(Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250) as u8 + 1)),
        vec![ServicePort {
            name: "p0".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }],
    );
    let mut s = slice(0, 0, &[host | 1]);
    s.name = ObjectName::new("ns", format!("big{i}-1"));
    s.service_name = format!("big{i}");
    s.ports.truncate(1);
    (svc, s)
}

/// Syncs learn which service ports changed by diffing the port maps of two intents, which share most of
/// their trees: the diff must name every port whose content changed, also thousands of ports deep. (The
/// persistent map's diff once skipped an entry right after each run of shared nodes, so a few changes in a
/// large sync went unwritten, silently; comparing two maps went through the same diff and agreed.)
#[test]
fn diffing_two_intents_names_every_changed_port() {
    const N: u16 = 3000;
    let mut state = ClusterState::default();
    for i in 0..N {
        let (svc, s) = big(i, 1);
        state.services.insert(svc.name.clone(), svc);
        state.endpoint_slices.insert(s.name.clone(), s);
    }
    let mut intent = build_intent(&state, &config());
    let mut index = SliceIndex::of_state(&state);
    let mut x: u32 = 0x9e37_79b9;
    let mut next_random = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for round in 0..12u32 {
        // From one change in a thousand to half of them, as endpoint churn and rollouts do.
        let per_mille = [1, 5, 20, 100, 500][round as usize % 5];
        let mut changes = IntentChanges::default();
        for i in 0..N {
            if next_random() % 1000 < per_mille {
                let (_, s) = big(i, (next_random() % 120) as u8 * 2);
                if let Some(old) = state.endpoint_slices.get(&s.name) {
                    changes.slice(old);
                }
                changes.slice(&s);
                state.endpoint_slices.insert(s.name.clone(), s);
            }
        }
        let next = update_intent(&intent, &state, &mut index, &config(), &changes);
        let want: BTreeSet<String> = next
            .service_ports
            .iter()
            .filter(|(name, spi)| {
                intent
                    .service_ports
                    .get(*name)
                    .is_none_or(|old| old.content_hash != spi.content_hash)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        let got: BTreeSet<String> = intent
            .service_ports
            .diff(&next.service_ports)
            .filter_map(|item| match item {
                DiffItem::Update { old, new } if old.1.content_hash == new.1.content_hash => None,
                DiffItem::Update { new, .. } => Some(new.0.to_string()),
                DiffItem::Add(name, _) | DiffItem::Remove(name, _) => Some(name.to_string()),
            })
            .collect();
        assert!(!want.is_empty() || per_mille < 5, "round {round} changed nothing");
        assert_eq!(
            got, want,
            "round {round}: the diff and a port-by-port comparison disagree"
        );
        intent = next;
    }
}
