//! Rebuilding the intent after a few Services or EndpointSlices changed: only the ports of the Services whose
//! inputs changed are built again; every other port is shared with the previous intent. The result is the
//! intent [`build_intent`] would build from the same state, so a caller may use either.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::intent::{ServicePorts, build_intent, service_port_intents};
use crate::slice_index::SliceIndex;
use crate::{ClusterState, EndpointSlice, Intent, IntentConfig, ObjectName, Protocol, ServicePortName};

/// Whose inputs changed since an intent was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntentChanges {
    /// Something every Service depends on changed (the Node's zone, a whole re-list): rebuild everything.
    pub all: bool,
    /// Services whose object or whose EndpointSlices changed (added, updated or removed).
    pub services: BTreeSet<ObjectName>,
    /// EndpointSlices that were added, updated or removed, so the [`SliceIndex`] can follow them.
    pub slices: BTreeSet<ObjectName>,
}

impl IntentChanges {
    pub fn everything() -> Self {
        IntentChanges {
            all: true,
            services: BTreeSet::new(),
            slices: BTreeSet::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }

    pub fn service(&mut self, name: &ObjectName) {
        if !self.all && !self.services.contains(name) {
            self.services.insert(name.clone());
        }
    }

    /// An EndpointSlice, and so the Service it belongs to. Call it for the slice as it was and as it is when
    /// its Service label may have changed.
    pub fn slice(&mut self, slice: &EndpointSlice) {
        if !self.all {
            self.services.insert(ObjectName::new(
                slice.name.namespace.clone(),
                slice.service_name.clone(),
            ));
            self.slices.insert(slice.name.clone());
        }
    }

    pub fn merge(&mut self, other: IntentChanges) {
        if other.all {
            *self = IntentChanges::everything();
        } else if !self.all {
            self.services.extend(other.services);
            self.slices.extend(other.slices);
        }
    }
}

/// The intent for `state`, given the intent `prev` built from an earlier state and what changed since.
/// `index` must describe the state `prev` was built from (or be rebuilt: a change of everything rebuilds it);
/// it is brought up to date with `changes.slices` here.
pub fn update_intent(
    prev: &Intent,
    state: &ClusterState,
    index: &mut SliceIndex,
    config: &IntentConfig,
    changes: &IntentChanges,
) -> Intent {
    if changes.all {
        *index = SliceIndex::of_state(state);
        return build_intent(state, config);
    }
    index.update(state, &changes.slices);
    let zone = state.node.as_ref().and_then(|n| n.zone());
    let mut service_ports = prev.service_ports.clone();
    for name in &changes.services {
        let stale: Vec<ServicePortName> = ports_of(&service_ports, name).cloned().collect();
        for key in stale {
            service_ports.remove(&key);
        }
        let Some(service) = state.services.get(name) else {
            continue;
        };
        // In slice-name order, as build_intent sees them, so endpoint order matches.
        let slices = index.slices_for(state, name);
        for spi in service_port_intents(service, &slices, config, zone) {
            service_ports.insert(spi.name.clone(), Arc::new(spi));
        }
    }
    Intent { service_ports }
}

/// The keys of one Service's ports: they sort together, the Service name being the first field.
fn ports_of<'a>(
    ports: &'a ServicePorts,
    service: &'a ObjectName,
) -> impl Iterator<Item = &'a ServicePortName> + 'a {
    let first = ServicePortName::new(service.clone(), "", Protocol::Tcp);
    ports
        .range(first..)
        .map(|(k, _)| k)
        .take_while(move |k| k.service == *service)
}
