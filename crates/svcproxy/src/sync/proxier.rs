//! What a backend does for the engine: make the kernel match the cluster state.

use std::sync::Arc;

use svcproxy_model::{ClusterState, Intent, IpFamily};

/// The outcome of one successful sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub full: bool,
    /// The intent the kernel now holds.
    pub intent: Arc<Intent>,
    /// Lines sent to the kernel (0 when nothing had changed).
    pub payload_lines: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Reading the current rules back failed, so no transaction was attempted.
    #[error("cannot read the current rules: {0}")]
    ReadBack(String),
    /// The kernel refused the transaction; nothing of it was applied.
    #[error("the kernel refused the transaction: {reason}{context}")]
    Refused { reason: String, context: String },
}

pub trait Proxier: Send {
    fn family(&self) -> IpFamily;
    /// Makes the kernel match `state`. A full sync rewrites everything we own and collects leftovers; a
    /// partial one writes only what changed since the last successful sync.
    fn sync(&mut self, state: &ClusterState, full: bool) -> Result<SyncReport, SyncError>;
}
