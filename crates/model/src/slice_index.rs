//! Which EndpointSlices belong to which Service, kept up to date from the names of the slices that changed.
//!
//! Slices are keyed by their own name, which need not share anything with their Service's (the label says
//! whose they are), so finding one Service's slices otherwise means scanning all of them: about 2 ms per
//! sync at 50,000 slices, for a change that touched one.

use std::collections::{BTreeSet, HashMap};

use crate::{ClusterState, EndpointSlice, ObjectName};

#[derive(Debug, Clone, Default)]
pub struct SliceIndex {
    /// Service → the names of its slices, in name order (the order a full build sees them in).
    by_service: HashMap<ObjectName, BTreeSet<ObjectName>>,
    /// Slice → the Service it was filed under, to move or drop it when it changes.
    owner: HashMap<ObjectName, ObjectName>,
}

impl SliceIndex {
    pub fn of_state(state: &ClusterState) -> Self {
        let mut index = SliceIndex::default();
        for slice in state.endpoint_slices.values() {
            index.file(slice);
        }
        index
    }

    /// Re-files the named slices as they are now in `state` (present, moved to another Service, or gone).
    pub fn update<'a>(&mut self, state: &ClusterState, touched: impl IntoIterator<Item = &'a ObjectName>) {
        for name in touched {
            self.unfile(name);
            if let Some(slice) = state.endpoint_slices.get(name) {
                self.file(slice);
            }
        }
    }

    /// The slices of `service` in `state`, in slice-name order.
    pub fn slices_for<'a>(&self, state: &'a ClusterState, service: &ObjectName) -> Vec<&'a EndpointSlice> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| state.endpoint_slices.get(name))
            // A slice whose label changed without the index hearing of it must not be counted twice.
            .filter(|s| s.name.namespace == service.namespace && s.service_name == service.name)
            .collect()
    }

    fn file(&mut self, slice: &EndpointSlice) {
        let service = ObjectName::new(slice.name.namespace.clone(), slice.service_name.clone());
        self.by_service
            .entry(service.clone())
            .or_default()
            .insert(slice.name.clone());
        self.owner.insert(slice.name.clone(), service);
    }

    fn unfile(&mut self, name: &ObjectName) {
        let Some(service) = self.owner.remove(name) else {
            return;
        };
        if let Some(names) = self.by_service.get_mut(&service) {
            names.remove(name);
            if names.is_empty() {
                self.by_service.remove(&service);
            }
        }
    }
}
