use std::collections::BTreeMap;

use crate::{EndpointSlice, Node, ObjectName, Service};

/// Everything the proxy knows about the cluster: the latest valid version of each object.
///
/// Both sources (the API watch and the manifest directory) fill this same type, so everything downstream of it
/// is shared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectName, Service>,
    pub endpoint_slices: BTreeMap<ObjectName, EndpointSlice>,
    pub node: Option<Node>,
}

impl ClusterState {
    /// The slices backing one Service, in slice-name order.
    pub fn slices_for<'a>(&'a self, service: &'a ObjectName) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.endpoint_slices
            .values()
            .filter(move |s| s.name.namespace == service.namespace && s.service_name == service.name)
    }
}
