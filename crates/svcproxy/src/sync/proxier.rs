//! What a backend does for the engine: make the kernel match the cluster state.

use std::sync::Arc;

use svcproxy_model::{ClusterState, Intent, IntentChanges, IpFamily};

use crate::exec::{Abandon, never};

/// The outcome of one successful sync.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncReport {
    pub full: bool,
    /// The intent the kernel now holds.
    pub intent: Arc<Intent>,
    /// Lines sent to the kernel (0 when nothing had changed).
    pub payload_lines: usize,
    /// Writes the sync made, each its own kernel transaction: `iptables-restore` runs in iptables mode (a
    /// cold sync cuts its rules into many, see `svcproxy_iptables::staging`), `nft` runs and netlink batches
    /// in nftables mode.
    pub writes: usize,
    /// The stale-flow cleanup that followed, when one ran.
    pub conntrack: Option<ConntrackRun>,
    /// The addresses NodePorts answer on when they are restricted (`--nodeport-addresses`); `None` when
    /// every local address takes them. Health-check node ports listen on the same.
    pub node_port_ips: Option<Vec<std::net::IpAddr>>,
    /// Run another sync after this long, even if nothing changes: the backend left work for a later
    /// transaction (chains waiting to be deleted on kernels that release them late).
    pub follow_up: Option<std::time::Duration>,
    /// iptables mode: the rules of our own chains per table, held and written (empty in nftables mode).
    pub iptables_rules: Vec<TableRules>,
    /// nftables mode: the chains and sets held back for deletion that came due could not be deleted; they
    /// stay held for another try (upstream's `sync_proxy_rules_nftables_cleanup_failures_total` counts these).
    /// The sync itself succeeded.
    pub cleanup_failed: bool,
}

/// The rules of svcproxy's own chains in one iptables table, as upstream's `sync_proxy_rules_iptables_total`
/// and `_last` count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    /// Held in the kernel after the sync.
    pub total: usize,
    /// Written by the sync.
    pub written: usize,
}

/// One conntrack reconciliation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConntrackRun {
    pub seconds: f64,
    pub deleted: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Reading the current rules back failed, so no transaction was attempted.
    #[error("cannot read the current rules: {0}")]
    ReadBack(String),
    /// The kernel refused the transaction; nothing of it was applied.
    #[error("the kernel refused the transaction ({class}): {reason}{context}")]
    Refused {
        /// A short stable class for metrics (`referenced_chain`, `lock`, …).
        class: &'static str,
        /// Whether a later rung of the ladder can fix it; if not, retrying only confirms the failure.
        repairable: bool,
        reason: String,
        context: String,
    },
    /// A read-back given up because a change was waiting: nothing is known of the kernel, nothing is wrong.
    #[error("the read-back was given up for a change waiting to be synced")]
    Abandoned,
}

impl SyncError {
    pub fn class(&self) -> &'static str {
        match self {
            SyncError::ReadBack(_) => "read_back",
            SyncError::Refused { class, .. } => class,
            SyncError::Abandoned => "abandoned",
        }
    }
}

/// How much of what we own a sync rewrites: the rungs of the escalation ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SyncMode {
    /// Only what changed since the last successful sync; never lists the kernel.
    Partial,
    /// Everything we own, after reading the kernel to collect leftovers and references to them.
    Full,
    /// As full, and every jump into our chains from the built-in chains is removed and written afresh: what
    /// is left afterwards is exactly what we wrote.
    Rebuild,
}

impl SyncMode {
    /// The next rung after a failure.
    pub fn escalate(self) -> SyncMode {
        match self {
            SyncMode::Partial => SyncMode::Full,
            SyncMode::Full | SyncMode::Rebuild => SyncMode::Rebuild,
        }
    }
}

/// One difference between the kernel and what we wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// A sentence naming the chain and what is wrong with it.
    pub what: String,
    /// A stable label for metrics (`missing_chain`, `changed_rules`, `missing_jump`).
    pub kind: &'static str,
    /// The service ports affected (`namespace/name:port`); empty for shared chains.
    pub services: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyScope {
    /// What the last sync wrote.
    LastSync,
    /// Everything we own.
    All,
}

pub trait Proxier: Send {
    fn family(&self) -> IpFamily;
    /// Makes the kernel match `state`, rewriting as much as `mode` says. `changes` names whose inputs changed
    /// since the previous call (successful or not), so the intent can be rebuilt for those alone.
    fn sync(
        &mut self,
        state: &ClusterState,
        changes: &IntentChanges,
        mode: SyncMode,
    ) -> Result<SyncReport, SyncError>;
    /// Reads the kernel back and lists every difference from what the last successful sync wrote.
    fn verify(&mut self, scope: VerifyScope) -> Result<Vec<Finding>, SyncError> {
        self.verify_unless(scope, &never)
    }
    /// [`Proxier::verify`], given up with [`SyncError::Abandoned`] once `abandon` says so (where a read is
    /// long enough to be worth stopping: then the next read covers what this one would have).
    fn verify_unless(&mut self, scope: VerifyScope, abandon: Abandon<'_>) -> Result<Vec<Finding>, SyncError>;
    /// A cheap, frequent check that catches a flushed table (upstream's canary, without a canary chain).
    fn canary(&mut self) -> Result<Vec<Finding>, SyncError>;
    /// What this backend owns, as an operator would look for it (for messages).
    fn owned_rules(&self) -> &'static str;
    /// Writes nftables directly (not through iptables), so its failed transactions count under upstream's
    /// nftables metric instead of the iptables-restore one.
    fn writes_nftables(&self) -> bool {
        false
    }
    /// State outside what we own that acts on the same packets and that no sync can repair (another iptables
    /// backend's KUBE-* chains, say), one sentence each with its fix. Read at every periodic check.
    fn hazards(&mut self) -> Vec<String> {
        Vec::new()
    }
}
