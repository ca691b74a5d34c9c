//! Connection-tracking upkeep for svcproxy: deleting the UDP and SCTP flows that still follow an old NAT
//! decision after the rules changed, and the conntrack sysctls set at start.
//!
//! Which flows are stale is decided by the pure plan in `svcproxy_model::conntrack_plan`; this crate lists
//! and deletes them through the [`Conntrack`] trait, implemented over ctnetlink by [`NetlinkConntrack`] and
//! in memory by [`RecordingConntrack`] for tests.
#![forbid(unsafe_code)]

pub mod cleanup;
pub mod codec;
pub mod error;
pub mod netlink;
pub mod recording;
pub mod sysctls;

use std::sync::Arc;

use svcproxy_model::IpFamily;
use svcproxy_model::conntrack_plan::FlowEntry;

pub use cleanup::{CleanupReport, clean_stale_flows};
pub use error::ConntrackError;
pub use netlink::NetlinkConntrack;
pub use recording::RecordingConntrack;

/// A conntrack table. Calls block; an async caller runs them on a blocking thread.
pub trait Conntrack: Send + Sync {
    /// Every entry of one family, in all zones.
    fn list(&self, family: IpFamily) -> Result<Vec<FlowEntry>, ConntrackError>;

    /// Deletes each entry by protocol, original tuple and zone (and id when known), and returns how many
    /// the kernel removed. An entry that is gone already is not an error: it is simply not counted.
    fn delete(&self, entries: &[FlowEntry]) -> Result<usize, ConntrackError>;
}

/// Lets the engine and a test share one table.
impl<T: Conntrack + ?Sized> Conntrack for Arc<T> {
    fn list(&self, family: IpFamily) -> Result<Vec<FlowEntry>, ConntrackError> {
        (**self).list(family)
    }

    fn delete(&self, entries: &[FlowEntry]) -> Result<usize, ConntrackError> {
        (**self).delete(entries)
    }
}
