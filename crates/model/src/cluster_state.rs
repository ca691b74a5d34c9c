use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::{EndpointSlice, IpFamily, Node, ObjectName, Service, ServiceCidr};

/// Everything the proxy knows about the cluster: the latest valid version of each object.
///
/// Both sources (the API watch and the manifest directory) fill this same type, so everything downstream of it
/// is shared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectName, Service>,
    pub endpoint_slices: BTreeMap<ObjectName, EndpointSlice>,
    pub node: Option<Node>,
    /// The ranges ClusterIPs are allocated from, by ServiceCIDR name.
    pub service_cidrs: BTreeMap<ObjectName, ServiceCidr>,
}

impl ClusterState {
    /// The slices backing one Service, in slice-name order.
    pub fn slices_for<'a>(&'a self, service: &'a ObjectName) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.endpoint_slices
            .values()
            .filter(move |s| s.name.namespace == service.namespace && s.service_name == service.name)
    }

    /// Every ServiceCIDR range of `family`, sorted, each once (two ServiceCIDRs may name the same range while
    /// one of them is being replaced).
    pub fn service_cidrs_of(&self, family: IpFamily) -> Vec<IpNet> {
        let mut cidrs: Vec<IpNet> = self
            .service_cidrs
            .values()
            .flat_map(|c| c.cidrs_of(family))
            .collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        cidrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(name: &str, cidrs: &[&str]) -> (ObjectName, ServiceCidr) {
        let name = ObjectName::new("", name);
        let cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        (name.clone(), ServiceCidr { name, cidrs })
    }

    #[test]
    fn service_cidrs_are_gathered_per_family_each_once() {
        let state = ClusterState {
            service_cidrs: [
                cidr("kubernetes", &["10.96.0.0/16", "fd00:10:96::/112"]),
                cidr("extra", &["10.100.0.0/24"]),
                cidr("kubernetes-next", &["10.96.0.0/16"]),
            ]
            .into(),
            ..ClusterState::default()
        };
        let v4: Vec<String> = state
            .service_cidrs_of(IpFamily::V4)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(v4, ["10.96.0.0/16", "10.100.0.0/24"]);
        let v6: Vec<String> = state
            .service_cidrs_of(IpFamily::V6)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(v6, ["fd00:10:96::/112"]);
        assert!(ClusterState::default().service_cidrs_of(IpFamily::V4).is_empty());
    }
}
