//! The nftables backend as the engine drives it: our own table (`ip svcproxy`), written with `nft -f -`.
//!
//! Partial syncs diff the new table against the last one applied, held in memory, and send only changed map
//! elements and chains; full syncs read the table back and send what differs (nothing on a restart onto a
//! table that is already right); the rebuild rung deletes and re-adds the whole table in one transaction.
//! The first sync also removes upstream's `kube-proxy` table in the same transaction that loads ours, so a
//! takeover has no moment without rules.
//!
//! On kernels before 6.2 a chain cannot be deleted by the transaction that removes the last map element
//! jumping to it: there, removed chains (and sets) are flushed by that transaction and deleted by a sync at
//! least a second later, which the report asks the engine for ([`DeferredDeletions`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use svcproxy_conntrack::Conntrack;

use super::conntrack_step::reconcile;
use svcproxy_iptables::config::{
    LocalDetector as IptLocalDetector, NodePortAddresses as IptNodePorts, RenderConfig as IptConfig,
};
use svcproxy_iptables::seal::Generation;
use svcproxy_model::{ClusterState, Intent, IntentChanges, IntentConfig, IpFamily};
use svcproxy_nftables::{
    DeferredDeletions, Family, KernelVersion, LocalDetector, NodePortAddresses, RenderConfig, RenderedTable,
    Ruleset, Slots, TableUpdate, Transaction, TransactionKind, delete_table_transaction, element_changes,
    full_in_chunks, full_transaction, parse_listing, partial_transaction, partial_transaction_given,
    probe_transaction, render_table_after,
};

use super::intent_cache::IntentCache;
use super::iptables_proxier::ProxierOptions;
use super::other_proxies::OtherProxies;
use super::proxier::{ConntrackRun, Finding, Proxier, SyncError, SyncMode, SyncReport, VerifyScope};
use crate::exec::generation::RulesetGeneration;
use crate::exec::iptables::ExecError;
use crate::exec::kernel_release::KernelRelease;
use crate::exec::nft::NftCommands;
use crate::exec::nft_netlink::{ElementSocket, ElementSocketError};
use crate::exec::nft_table_read::{TableReadError, TableStructure, read_structure};
use crate::exec::{Abandon, never};
use crate::node_addresses::LocalAddresses;

/// Services per transaction on a cold sync: keeps each transaction (and the kernel's nftables lock) short.
/// Measured at 5,000 Services × 10 endpoints (cold sync): 500 per transaction 2.1 s, 1,000 1.8 s, all in one
/// 1.75 s, against 1.6 s for `nft -f` of the whole listing into an empty namespace. Each transaction re-validates
/// the table built so far, so fewer are cheaper; 1,000 keeps the lock to about 0.3 s.
const SERVICES_PER_TRANSACTION: usize = 1000;
/// The table upstream kube-proxy's nftables mode writes.
const UPSTREAM_TABLE: &str = "kube-proxy";

/// Our table read back, and the sets in it that were found equal to what they should be and kept without
/// their elements.
type ReadBack = (Ruleset, BTreeSet<String>);

/// What a read of the kernel found before its elements are read.
enum KernelTable {
    Missing,
    /// Read whole, elements included (`nft list table`).
    Whole(Ruleset),
    Structure(TableStructure),
}

impl KernelTable {
    fn table(&self) -> Option<&Ruleset> {
        match self {
            KernelTable::Missing => None,
            KernelTable::Whole(t) => Some(t),
            KernelTable::Structure(s) => Some(&s.table),
        }
    }
}

pub struct NftProxier {
    cmds: Box<dyn NftCommands>,
    addresses: Box<dyn LocalAddresses>,
    intent_config: IntentConfig,
    intents: IntentCache,
    options: ProxierOptions,
    /// The table the kernel holds after our last successful transaction, and the configuration it was
    /// rendered with; `None` forces a full sync.
    applied: Option<(RenderedTable, RenderConfig)>,
    applied_intent: Option<Arc<Intent>>,
    conntrack: Option<Box<dyn Conntrack>>,
    /// The nf_tables socket, when set: element-only updates and read-backs go through it; everything else
    /// goes to `nft`.
    elements: Option<Box<dyn ElementSocket>>,
    /// A read through the socket has failed before.
    socket_read_failed: AtomicBool,
    probed: bool,
    /// A sync since the last read-back rewrote the table in full: the read-back after it lists the table.
    last_sync_full: bool,
    /// Watches for a proxy of the other mode (kube-proxy's iptables chains or its nftables table).
    other_proxies: Option<OtherProxies>,
    /// The nf_tables generation, when readable: it moves with every commit anyone makes.
    generation: Option<Box<dyn RulesetGeneration>>,
    /// The generation at which a read found our table exactly as applied, the generation unmoved while it
    /// read. While it stays there nothing can have changed, and a periodic read-back (a listing of seconds
    /// at thousands of services) has nothing to find.
    verified: Option<Generation>,
    /// On kernels that release a chain only some time after the transaction removing its last reference:
    /// the removed chains and sets, flushed and waiting to be deleted. `None` where a transaction deletes
    /// them at once.
    deferred: Option<DeferredDeletions>,
}

/// The text to apply for `t`: all of it, or with `deferred`, all but the deletions it holds for later.
fn staged(deferred: &mut Option<DeferredDeletions>, t: Transaction) -> String {
    match deferred {
        Some(d) => d.defer(t),
        None => t.text,
    }
}

fn family(f: IpFamily) -> Family {
    match f {
        IpFamily::V4 => Family::Ip,
        IpFamily::V6 => Family::Ip6,
    }
}

/// The nftables configuration for the same options the iptables backend resolves.
pub(crate) fn nft_config(c: &IptConfig) -> RenderConfig {
    RenderConfig {
        family: c.family,
        masquerade_bit: c.masquerade_bit,
        masquerade_all: c.masquerade_all,
        local_detector: match &c.local_detector {
            IptLocalDetector::None => LocalDetector::None,
            IptLocalDetector::Cidrs(cidrs) => LocalDetector::Cidrs(cidrs.clone()),
            IptLocalDetector::BridgeInterface(b) => LocalDetector::BridgeInterface(b.clone()),
            IptLocalDetector::InterfaceNamePrefix(p) => LocalDetector::InterfaceNamePrefix(p.clone()),
        },
        node_port_addresses: match &c.node_port_addresses {
            IptNodePorts::All => NodePortAddresses::All,
            // nftables mode has no localhost NodePorts (they need route_localnet and its guard rule): a
            // loopback address inside the configured CIDRs is left out, as upstream leaves it out.
            IptNodePorts::Ips(ips) => {
                NodePortAddresses::Ips(ips.iter().copied().filter(|ip| !ip.is_loopback()).collect())
            }
        },
        node_ip: c.node_ip,
        ..RenderConfig::default()
    }
}

/// The addresses NodePorts answer on, when restricted.
fn restricted_node_ports(config: &RenderConfig) -> Option<Vec<std::net::IpAddr>> {
    match &config.node_port_addresses {
        NodePortAddresses::All => None,
        NodePortAddresses::Ips(ips) => Some(ips.clone()),
    }
}

impl NftProxier {
    pub fn new(
        cmds: Box<dyn NftCommands>,
        addresses: Box<dyn LocalAddresses>,
        intent_config: IntentConfig,
        options: ProxierOptions,
    ) -> Self {
        NftProxier {
            cmds,
            addresses,
            intents: IntentCache::new(intent_config.clone()),
            intent_config,
            options,
            applied: None,
            applied_intent: None,
            conntrack: None,
            elements: None,
            socket_read_failed: AtomicBool::new(false),
            probed: false,
            last_sync_full: false,
            other_proxies: None,
            generation: None,
            verified: None,
            deferred: None,
        }
    }

    /// Decides from the kernel's release whether removed chains wait for a later transaction to be deleted
    /// (before 6.2). A release that cannot be read or understood means waiting too: that works on every
    /// kernel, for the cost of one more sync after a removal.
    pub fn with_kernel_release(mut self, kernel: &dyn KernelRelease) -> Self {
        let defer = match kernel.release() {
            Ok(release) => match KernelVersion::parse(&release) {
                Some(version) => {
                    let defer = !version.deletes_chains_with_their_references();
                    if defer {
                        tracing::info!(
                            release,
                            "kernel before 6.2: removed chains are flushed, and deleted by a sync a second later"
                        );
                    }
                    defer
                }
                None => {
                    tracing::warn!(
                        release,
                        "unrecognised kernel release; removed chains are deleted by a later sync, as before 6.2"
                    );
                    true
                }
            },
            Err(error) => {
                tracing::warn!(%error, "kernel release unreadable; removed chains are deleted by a later sync, as before 6.2");
                true
            }
        };
        self.deferred = defer.then(DeferredDeletions::default);
        self
    }

    /// After this sync's transactions went in: holds the deletions they left out, and deletes the held chains
    /// and sets whose time has come, except what the table now applied holds again (a Service back
    /// meanwhile). Returns the lines sent, when to come back for the rest, and whether the deletion failed.
    ///
    /// A failed deletion does not fail the sync, whose rules are in: as upstream, it is logged, counted, and
    /// tried again later. Until then the objects are flushed and unreferenced by anything of ours.
    fn delete_deferred(&mut self) -> (usize, Option<Duration>, bool) {
        let Some(deferred) = &mut self.deferred else {
            return (0, None, false);
        };
        let now = Instant::now();
        deferred.applied(now);
        if let Some((table, _)) = &self.applied {
            deferred.keep_wanted(&table.ruleset);
        }
        let (mut lines, mut failed) = (0, false);
        if let Some(due) = deferred.due(now) {
            match self.cmds.apply(&due.text) {
                Ok(()) => {
                    deferred.deleted(&due);
                    lines = due.text.lines().count();
                }
                Err(e) => {
                    tracing::warn!(
                        chains = due.chains.len(),
                        sets = due.sets.len(),
                        "could not delete the chains and sets of removed Services; trying again later: {e}"
                    );
                    deferred.retry_later(&due, now);
                    failed = true;
                }
            }
        }
        let follow_up = deferred.next_due().map(|t| t.saturating_duration_since(now));
        (lines, follow_up, failed)
    }

    /// Lets periodic read-backs skip the listing while nothing has committed since one found the table right.
    pub fn with_generation(mut self, generation: Box<dyn RulesetGeneration>) -> Self {
        self.generation = Some(generation);
        self
    }

    fn generation_now(&self) -> Option<Generation> {
        self.generation.as_ref()?.current()
    }

    /// Whether nothing has committed since a read found the table right.
    fn unchanged_since_verified(&self) -> bool {
        self.verified.is_some() && self.generation_now() == self.verified
    }

    pub fn with_element_socket(mut self, socket: Box<dyn ElementSocket>) -> Self {
        self.elements = Some(socket);
        self
    }

    /// Sends an update that only changes elements over netlink. `Ok(None)` when it is not such an update, or
    /// has a type the writer does not encode: then `nft` applies it.
    fn write_elements(&self, update: &TableUpdate) -> Result<Option<usize>, SyncError> {
        let Some(writer) = &self.elements else {
            return Ok(None);
        };
        let Some(changes) = element_changes(&update.before, &update.after) else {
            return Ok(None);
        };
        if changes.is_empty() {
            return Ok(Some(0));
        }
        match writer.write(&update.after, &changes) {
            Ok(()) => Ok(Some(changes.len())),
            Err(ElementSocketError::Encode(e)) => {
                tracing::debug!(error = %e, "element update left to nft");
                Ok(None)
            }
            Err(e) => Err(SyncError::Refused {
                class: "other",
                repairable: true,
                reason: e.to_string(),
                context: String::new(),
            }),
        }
    }

    pub fn with_conntrack(mut self, conntrack: Box<dyn Conntrack>) -> Self {
        self.conntrack = Some(conntrack);
        self
    }

    /// Reports kube-proxy's rules (its iptables chains, its nftables table) appearing next to ours.
    pub fn with_other_proxies(mut self, other: OtherProxies) -> Self {
        self.other_proxies = Some(other);
        self
    }

    fn table(&self) -> (String, &'static str) {
        (family(self.intent_config.family).to_string(), "svcproxy")
    }

    /// Our table as the kernel holds it, in two steps: its rules and set declarations now, its elements when
    /// [`Self::complete`] compares them with what they should be. Through the netlink socket when there is
    /// one (the terse listing, then our own element reads); with `nft list table` otherwise, or when that
    /// read fails. Given up, by stopping `nft`, once `abandon` says so.
    fn read_kernel(&self, abandon: Abandon<'_>) -> Result<KernelTable, SyncError> {
        if let Some(socket) = &self.elements {
            let (_, name) = self.table();
            match read_structure(
                self.cmds.as_ref(),
                socket.as_ref(),
                family(self.intent_config.family),
                name,
                abandon,
            ) {
                Ok(Some(structure)) => return Ok(KernelTable::Structure(structure)),
                Ok(None) => return Ok(KernelTable::Missing),
                Err(TableReadError::Abandoned) => return Err(SyncError::Abandoned),
                Err(e) => self.fell_back(&e),
            }
        }
        Ok(match self.read_back_listing(abandon)? {
            Some(table) => KernelTable::Whole(table),
            None => KernelTable::Missing,
        })
    }

    /// A read through the socket failed, so `nft list table` reads instead (ten times slower at thousands
    /// of Services). Said once at warning level, so a read path that keeps failing does not go unnoticed;
    /// a lone failure (another writer committed meanwhile) is ordinary.
    fn fell_back(&self, error: &TableReadError) {
        if self.socket_read_failed.swap(true, Ordering::Relaxed) {
            tracing::debug!(%error, "table read with nft list table");
        } else {
            tracing::warn!(%error, "table read with nft list table (said once; later ones at debug level)");
        }
    }

    /// The kernel's table and the sets in it found to hold exactly `expected`'s elements (kept without
    /// them), for [`partial_transaction_given`]; `None` when there is no table. Given up between two sets'
    /// elements once `abandon` says so.
    fn complete(
        &self,
        kernel: KernelTable,
        expected: &Ruleset,
        abandon: Abandon<'_>,
    ) -> Result<Option<ReadBack>, SyncError> {
        match kernel {
            KernelTable::Missing => Ok(None),
            KernelTable::Whole(table) => Ok(Some((table, BTreeSet::new()))),
            KernelTable::Structure(structure) => {
                if let Some(socket) = &self.elements {
                    match structure.read_elements(socket.as_ref(), Some(expected), abandon) {
                        Ok(read) => return Ok(Some(read)),
                        Err(TableReadError::Abandoned) => return Err(SyncError::Abandoned),
                        // Another transaction committed meanwhile: at start, the other family's engine
                        // writing its table. Once more the fast way before the slow one.
                        Err(TableReadError::Moved) => match self.read_kernel(abandon)? {
                            KernelTable::Structure(again) => {
                                match again.read_elements(socket.as_ref(), Some(expected), abandon) {
                                    Ok(read) => return Ok(Some(read)),
                                    Err(TableReadError::Abandoned) => return Err(SyncError::Abandoned),
                                    Err(e) => self.fell_back(&e),
                                }
                            }
                            other => return self.complete(other, expected, abandon),
                        },
                        Err(e) => self.fell_back(&e),
                    }
                }
                Ok(self.read_back_listing(abandon)?.map(|t| (t, BTreeSet::new())))
            }
        }
    }

    fn read_back_listing(&self, abandon: Abandon<'_>) -> Result<Option<Ruleset>, SyncError> {
        let (fam, name) = self.table();
        let Some(text) = self.cmds.list_table(&fam, name, abandon).map_err(|e| match e {
            ExecError::Abandoned { .. } => SyncError::Abandoned,
            e => SyncError::ReadBack(e.to_string()),
        })?
        else {
            return Ok(None);
        };
        let listing = parse_listing(&text).map_err(|e| SyncError::ReadBack(e.to_string()))?;
        drop(text);
        // Taken out of the listing, not copied: at 5,000 services × 10 endpoints the table is about 15 MB.
        let want = family(self.intent_config.family);
        Ok(listing
            .tables
            .into_iter()
            .find(|t| t.family == want && t.name == name))
    }

    fn refused(e: ExecError, script: &str) -> SyncError {
        let reason = e.to_string();
        // nft quotes the failing command under its message; a missing kernel feature reads "No such file or
        // directory" or "Operation not supported" on a line no rewrite can avoid.
        let unsupported = reason.contains("Operation not supported") || reason.contains("not supported");
        let context = if script.len() < 4096 {
            format!("; transaction:\n{script}")
        } else {
            String::new()
        };
        SyncError::Refused {
            class: if unsupported { "missing_extension" } else { "other" },
            repairable: !unsupported,
            reason,
            context,
        }
    }

    fn apply(&self, script: &str) -> Result<(), SyncError> {
        self.cmds.apply(script).map_err(|e| Self::refused(e, script))
    }

    fn findings(&self, read_back: Option<&ReadBack>, expected: &Ruleset) -> Vec<Finding> {
        let Some((read_back, same_elements)) = read_back else {
            return vec![Finding {
                what: format!("table {} is missing", expected.qualified_name()),
                kind: "missing_table",
                services: Vec::new(),
            }];
        };
        match partial_transaction_given(read_back, expected, same_elements) {
            Ok(t) if t.is_empty() => Vec::new(),
            Ok(t) => vec![Finding {
                what: format!(
                    "table {} differs from what was written ({} lines to repair)",
                    expected.qualified_name(),
                    t.text.lines().count()
                ),
                kind: "changed_rules",
                services: t.services.iter().cloned().collect(),
            }],
            Err(e) => vec![Finding {
                what: format!("cannot compare the table: {e}"),
                kind: "changed_rules",
                services: Vec::new(),
            }],
        }
    }

    fn clean_conntrack(
        &self,
        intent: &Intent,
        config: &RenderConfig,
        local: &[std::net::IpAddr],
    ) -> Option<ConntrackRun> {
        let conntrack = self.conntrack.as_ref()?;
        let fam = self.intent_config.family;
        let node_ips: Vec<std::net::IpAddr> = match &config.node_port_addresses {
            NodePortAddresses::All => local
                .iter()
                .copied()
                .filter(|ip| fam.contains(ip) && !ip.is_loopback())
                .collect(),
            NodePortAddresses::Ips(ips) => ips.clone(),
        };
        reconcile(
            conntrack.as_ref(),
            fam,
            self.applied_intent.as_deref(),
            intent,
            &node_ips,
        )
    }
}

impl Proxier for NftProxier {
    fn family(&self) -> IpFamily {
        self.intent_config.family
    }

    fn owned_rules(&self) -> &'static str {
        "the ip svcproxy nftables table"
    }

    fn writes_nftables(&self) -> bool {
        true
    }

    fn hazards(&mut self) -> Vec<String> {
        match (&self.other_proxies, &self.applied) {
            (Some(other), Some(_)) => other.find(),
            _ => Vec::new(),
        }
    }

    fn sync(
        &mut self,
        state: &ClusterState,
        changes: &IntentChanges,
        mode: SyncMode,
    ) -> Result<SyncReport, SyncError> {
        if !self.probed {
            // A kernel without a feature we need is refused with nft's own words, before any real change.
            // Whatever the probe trips on is a feature the kernel or nft lacks (a module that cannot load shows
            // as "No such file or directory"): no rewrite can avoid it, so it is reported as such, not retried.
            let probe = probe_transaction(self.intent_config.family);
            self.cmds.apply(&probe).map_err(|e| {
                let reason = e.to_string();
                let first: Vec<&str> = reason.lines().take(3).collect();
                SyncError::Refused {
                    class: "missing_extension",
                    repairable: false,
                    reason: format!(
                        "the kernel or nft lacks a feature the svcproxy table needs (load the nf_tables modules: \
                         nft_numgen, nft_fib, nft_nat, nft_masq, nft_reject, nft_ct): {}",
                        first.join(" ")
                    ),
                    context: String::new(),
                }
            })?;
            self.probed = true;
        }
        // Whatever this sync writes is not verified until a read-back finds it.
        self.verified = None;
        // Deletions split off a sync that ended before its transactions went in were never flushed.
        self.deferred.iter_mut().for_each(DeferredDeletions::not_applied);
        let intent = self.intents.next(state, changes);
        let local = self.addresses.addresses();
        let config = RenderConfig {
            service_cidrs: state.service_cidrs_of(self.intent_config.family),
            ..nft_config(&self.options.resolve(state.node.as_ref(), &local))
        };
        let mode = match &self.applied {
            Some((_, applied_with)) if *applied_with == config => mode,
            _ => {
                self.options.warn_if_lacking_pod_cidrs(state.node.as_ref());
                mode.max(SyncMode::Full)
            }
        };
        if mode == SyncMode::Partial
            && let (Some((table, _)), Some(prev)) = (&self.applied, &self.applied_intent)
            && let Some(update) = table.plan(prev, &intent, &config)
        {
            // Only the changed Services' objects are rendered and compared: the cost follows the change.
            let lines = match self.write_elements(&update) {
                Ok(Some(lines)) => lines,
                Ok(None) => {
                    let t = partial_transaction(&update.before, &update.after)
                        .map_err(|e| SyncError::ReadBack(e.to_string()))?;
                    let text = staged(&mut self.deferred, t);
                    if !text.is_empty()
                        && let Err(e) = self.apply(&text)
                    {
                        self.applied = None;
                        self.deferred.iter_mut().for_each(DeferredDeletions::not_applied);
                        return Err(e);
                    }
                    text.lines().count()
                }
                Err(e) => {
                    self.applied = None;
                    return Err(e);
                }
            };
            if let Some((table, _)) = &mut self.applied {
                table.apply(update);
            }
            let conntrack = self.clean_conntrack(&intent, &config, &local);
            self.applied_intent = Some(intent.clone());
            let (deleted, follow_up, cleanup_failed) = self.delete_deferred();
            return Ok(SyncReport {
                full: false,
                intent,
                payload_lines: lines + deleted,
                // The elements' netlink batch or the partial transaction, and the deletions that came due.
                writes: usize::from(lines > 0) + usize::from(deleted > 0),
                conntrack,
                follow_up,
                node_port_ips: restricted_node_ports(&config),
                iptables_rules: Vec::new(),
                cleanup_failed,
            });
        }
        // A full sync compares with the kernel's table unless it rebuilds, or follows a table it applied.
        let current = match (&self.applied, mode) {
            (Some(_), SyncMode::Partial) | (_, SyncMode::Rebuild) => None,
            _ => Some(self.read_kernel(&never)?),
        };
        // Policy chains keep their endpoint-map slots: those of the table we applied, else those the kernel's
        // copy holds, so a restart onto the right table renders it exactly and writes nothing.
        let prior = match (&self.applied, &current) {
            (Some((prev, _)), _) => prev.slots().clone(),
            (None, Some(kernel)) => kernel.table().map(Slots::of_ruleset).unwrap_or_default(),
            _ => Slots::default(),
        };
        let next = render_table_after(&intent, &config, &prior);
        let fam = family(self.intent_config.family);
        let transactions: Box<dyn Iterator<Item = String> + '_> = match (&self.applied, mode) {
            (Some((prev, _)), SyncMode::Partial) => {
                let t = partial_transaction(&prev.ruleset, &next.ruleset)
                    .map_err(|e| SyncError::ReadBack(e.to_string()))?;
                Box::new(std::iter::once(staged(&mut self.deferred, t)))
            }
            (_, SyncMode::Rebuild) => {
                // The table is deleted and written anew: nothing is left waiting to be deleted.
                if let Some(d) = &mut self.deferred {
                    d.clear();
                }
                let mut text = full_transaction(&next.ruleset).text;
                text.push_str(&delete_table_transaction(fam, UPSTREAM_TABLE));
                Box::new(std::iter::once(text))
            }
            _ => match current
                .map(|k| self.complete(k, &next.ruleset, &never))
                .transpose()?
                .flatten()
            {
                // The table exists: send what differs (nothing on a restart onto the right table).
                Some((current, same_elements)) => {
                    // Chains flushed earlier and not yet deleted are in the kernel's table, so they are
                    // deleted here, or held again (from when they were first held) on kernels that need it.
                    let t = partial_transaction_given(&current, &next.ruleset, &same_elements)
                        .map_err(|e| SyncError::ReadBack(e.to_string()))?;
                    Box::new(std::iter::once(staged(&mut self.deferred, t)))
                }
                None => {
                    if let Some(d) = &mut self.deferred {
                        d.clear();
                    }
                    // Cold: bounded transactions, each leaving a consistent table and each built only when the
                    // one before it is applied (never two at once: each is megabytes at 5,000 Services);
                    // upstream's table goes in the last one, when ours is complete.
                    let upstream = delete_table_transaction(fam, UPSTREAM_TABLE);
                    Box::new(
                        full_in_chunks(&next.ruleset, SERVICES_PER_TRANSACTION)
                            .map_err(|e| SyncError::ReadBack(e.to_string()))?
                            .map(move |t: Transaction| {
                                let mut text = t.text;
                                if let TransactionKind::Chunk { index, count } = t.kind
                                    && index + 1 == count
                                {
                                    text.push_str(&upstream);
                                }
                                text
                            }),
                    )
                }
            },
        };
        let (mut lines, mut writes) = (0, 0);
        for text in transactions.filter(|t| !t.is_empty()) {
            writes += 1;
            if let Err(e) = self.apply(&text) {
                self.applied = None;
                self.deferred.iter_mut().for_each(DeferredDeletions::not_applied);
                return Err(e);
            }
            lines += text.lines().count();
        }
        let conntrack = self.clean_conntrack(&intent, &config, &local);
        let node_port_ips = restricted_node_ports(&config);
        self.applied_intent = Some(intent.clone());
        self.applied = Some((next, config));
        // Kept until a read-back takes it: the engine may run one more sync before the read-back after this.
        self.last_sync_full |= mode != SyncMode::Partial;
        let (deleted, follow_up, cleanup_failed) = self.delete_deferred();
        Ok(SyncReport {
            full: mode != SyncMode::Partial,
            intent,
            payload_lines: lines + deleted,
            writes: writes + usize::from(deleted > 0),
            conntrack,
            follow_up,
            node_port_ips,
            iptables_rules: Vec::new(),
            cleanup_failed,
        })
    }

    /// The read (0.5 s at 5,000 Services) is given up while `nft` lists the table (it is killed) or between
    /// two sets' elements.
    fn verify_unless(&mut self, scope: VerifyScope, abandon: Abandon<'_>) -> Result<Vec<Finding>, SyncError> {
        let Some((table, _)) = &self.applied else {
            return Ok(Vec::new());
        };
        let expected = &table.ruleset;
        // Listing the table costs seconds at thousands of services (nft fetches everything), so a partial sync
        // is not followed by a full listing: the canary and the periodic read-back cover it.
        let wrote_in_full = std::mem::take(&mut self.last_sync_full);
        if scope == VerifyScope::LastSync && !wrote_in_full {
            return Ok(Vec::new());
        }
        if scope == VerifyScope::All && self.unchanged_since_verified() {
            tracing::debug!("periodic read-back skipped: nothing has committed since the table was verified");
            return Ok(Vec::new());
        }
        self.verified = None;
        let before = self.generation_now();
        let read = self
            .read_kernel(abandon)
            .and_then(|kernel| self.complete(kernel, expected, abandon));
        let mut read_back = match read {
            Ok(read) => read,
            Err(e) => {
                // What the read was to cover is still to be covered, by the read that replaces it.
                self.last_sync_full |= wrote_in_full;
                return Err(e);
            }
        };
        // Chains flushed and waiting to be deleted are not a difference.
        if let (Some(deferred), Some((table, _))) = (&self.deferred, &mut read_back) {
            deferred.hide_from(table);
        }
        let findings = self.findings(read_back.as_ref(), expected);
        // Right, and nobody committed while it was read: the table at this generation is the one read.
        if findings.is_empty() && before.is_some() && self.generation_now() == before {
            self.verified = before;
        }
        Ok(findings)
    }

    fn canary(&mut self) -> Result<Vec<Finding>, SyncError> {
        // A deleted or flushed table shows in any of its base chains; listing one small chain is cheap at any
        // scale, unlike listing the table. Nothing can show while nothing has committed.
        if self.unchanged_since_verified() {
            return Ok(Vec::new());
        }
        let Some((table, _)) = &self.applied else {
            return Ok(Vec::new());
        };
        let expected = &table.ruleset;
        let Some((name, _)) = expected.chains.iter().find(|(_, c)| c.base.is_some()) else {
            return Ok(Vec::new());
        };
        let (fam, table) = self.table();
        let listing = self
            .cmds
            .list_chain(&fam, table, name)
            .map_err(|e| SyncError::ReadBack(e.to_string()))?;
        let rules_now = listing
            .as_deref()
            .and_then(|text| parse_listing(text).ok())
            .and_then(|l| {
                l.table(family(self.intent_config.family), table)
                    .and_then(|t| t.chains.get(name))
                    .map(|c| c.rules.len())
            });
        let rules_expected = expected.chains.get(name).map_or(0, |c| c.rules.len());
        if rules_now != Some(rules_expected) {
            return Ok(vec![Finding {
                what: format!(
                    "table {} or its chain {name} was removed or changed",
                    expected.qualified_name()
                ),
                kind: "missing_chain",
                services: Vec::new(),
            }]);
        }
        Ok(Vec::new())
    }
}
