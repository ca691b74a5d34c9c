use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

/// The Node svcproxy runs on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub pod_cidrs: Vec<IpNet>,
    pub addresses: Vec<IpAddr>,
    /// A deletionTimestamp is set, or the node is tainted for removal by the cluster autoscaler: health checks
    /// report the node as ineligible so load balancers drain it.
    pub being_deleted: bool,
}

impl Node {
    pub const ZONE_LABEL: &'static str = "topology.kubernetes.io/zone";

    pub fn zone(&self) -> Option<&str> {
        self.labels.get(Self::ZONE_LABEL).map(String::as_str)
    }
}
