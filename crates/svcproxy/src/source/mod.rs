//! Where the cluster state comes from: the Kubernetes API or a manifest directory. Both feed the engine the
//! same [`SourceEvent`]s, so everything after this edge is shared.

pub mod api_request_metrics;
pub mod convert;
pub mod family_split;
pub mod file_stamp;
pub mod kube_api;
pub mod legacy_ip;
pub mod manifest_dir;
pub mod manifest_watch;
pub mod watch_backoff;
pub mod wire;

use svcproxy_model::{ClusterState, EndpointSlice, Node, ObjectName, Service, ServiceCidr};

/// Services (and their slices) carrying either label are not ours to proxy: the first hands them to another
/// Service proxy, the second marks headless ones. Upstream filters both on its watches; the manifest source
/// applies the same rule so both sources see the same cluster.
pub const IGNORE_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

/// A change to one kind of object.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta<T> {
    Apply(T),
    Delete(ObjectName),
    /// Everything of this kind, after a (re)list: objects absent from it are gone, except those named in
    /// `rejected`, which failed validation and keep their last good version.
    Replace {
        objects: Vec<T>,
        rejected: Vec<ObjectName>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A complete replacement of the cluster state (the manifest directory is always re-read whole).
    Snapshot(ClusterState),
    Services(Delta<Service>),
    EndpointSlices(Delta<EndpointSlice>),
    /// Our own Node, or `None` when it does not exist.
    Node(Option<Node>),
    /// The ranges ClusterIPs come from (cluster-scoped: names have an empty namespace).
    ServiceCidrs(Delta<ServiceCidr>),
    /// Every initial list has completed; before this nothing is programmed, so a restart never writes a
    /// partial view of the cluster.
    Synced,
    /// The source cannot be read (the API server unreachable, say), with why; `None` once it can again. Only
    /// reported: the kernel keeps the last known state, and `/healthz` stays as it is, since turning every
    /// node red during an API outage would drain them all from their load balancers at once.
    Unreachable(Option<String>),
}
