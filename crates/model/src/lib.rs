//! The pure core of svcproxy: the Kubernetes objects a Service proxy cares about, in our own types, and the
//! functions that turn them into an [`Intent`] — what each service port must do on this node.
//!
//! Nothing here does I/O, spawns tasks or knows about kube or k8s-openapi: the sources convert API objects into
//! these types once, at the edge, and the renderers turn an [`Intent`] into kernel rules.
#![forbid(unsafe_code)]

pub mod cluster_state;
pub mod conntrack_plan;
pub mod endpoint;
pub mod endpoint_slice;
pub mod family;
pub mod frontend_claims;
pub mod intent;
pub mod intent_update;
pub mod node;
pub mod object_name;
pub mod protocol;
pub mod service;
pub mod service_cidr;
pub mod service_port_name;
pub mod slice_index;
pub mod topology;
pub mod trace;

pub use cluster_state::ClusterState;
pub use endpoint::EndpointInfo;
pub use endpoint_slice::{Endpoint, EndpointPort, EndpointSlice};
pub use family::IpFamily;
pub use intent::{Intent, IntentConfig, ServicePortIntent, ServicePorts};
pub use intent_update::{IntentChanges, update_intent};
pub use node::Node;
pub use object_name::ObjectName;
pub use protocol::Protocol;
pub use service::{
    LoadBalancerIngress, Service, ServicePort, ServiceType, SessionAffinity, TrafficDistribution,
    TrafficPolicy,
};
pub use service_cidr::ServiceCidr;
pub use service_port_name::ServicePortName;
pub use slice_index::SliceIndex;
