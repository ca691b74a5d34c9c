//! The engine: applies source events to the cluster state and decides when and how to sync.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use svcproxy_model::frontend_claims::{Frontend, FrontendClaims};
use svcproxy_model::{ClusterState, EndpointSlice, IntentChanges, ObjectName, Service};
use tokio::sync::{mpsc, watch};

use super::proxier::{Finding, Proxier, SyncError, SyncMode, VerifyScope};
use super::throttle::SyncThrottle;
use crate::exec::{Abandon, never};
use crate::health::ProxyHealth;
use crate::metrics::{ClassLabels, FamilyLabels, Metrics, PolicyLabels, SyncLabels, TableLabels};
use crate::source::{Delta, SourceEvent};
use crate::status::SourceProblem;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Upper bound on sync frequency (`--min-sync-period`, upstream default 1 s).
    pub min_sync_period: Duration,
    /// Retry delay after a failed sync, and half the health timeout (`--sync-period`, upstream default 30 s).
    pub sync_period: Duration,
    /// A full sync at least this often, to repair what partial syncs cannot see (upstream: one hour).
    pub full_sync_period: Duration,
    /// Consecutive failed syncs after which `/healthz` reports the node unhealthy (`--unhealthy-after`).
    pub unhealthy_after: u32,
    /// How often everything we own is read back and compared (`--verify-period`); `None` disables it.
    pub verify_period: Option<Duration>,
    /// How often the cheap flush check runs; `None` disables it.
    pub canary_period: Option<Duration>,
    /// Read back what each sync wrote right after writing it.
    pub verify_after_sync: bool,
    /// A family no engine serves (IPv6 on a node whose kernel or ip6tables cannot take rules): Services of
    /// it are named in a warning, with the reason, since nothing programs them.
    pub unserved: Option<crate::families::Unserved>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            unhealthy_after: 3,
            verify_period: Some(Duration::from_secs(60)),
            canary_period: Some(Duration::from_secs(2)),
            verify_after_sync: true,
            unserved: None,
        }
    }
}

/// What the engine publishes after each sync, for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStatus {
    pub syncs: u64,
    /// Service ports whose rules read-back found different from what we wrote, until a repair is verified.
    pub unverified: std::collections::BTreeSet<String>,
    /// Divergences found by read-back since start.
    pub divergences: u64,
    /// The intent of the last successful sync.
    pub applied: Option<Arc<svcproxy_model::Intent>>,
    /// Where the last successful sync made NodePorts answer, when not on every address.
    pub node_port_ips: Option<Vec<std::net::IpAddr>>,
    /// The ServiceCIDR ranges of this engine's family at the last successful sync (nftables mode drops
    /// traffic to their unallocated addresses).
    pub service_cidrs: Vec<ipnet::IpNet>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Why `/healthz` is failing, when it is (the same sentence it answers with).
    pub problem: Option<String>,
    /// While syncs fail: the cluster state the failing syncs tried to program, which the kernel lacks.
    pub wanted: Option<Arc<ClusterState>>,
    /// While the source cannot be read: since when, and the latest error.
    pub source_problem: Option<SourceProblem>,
}

pub struct Engine<P: Proxier> {
    proxier: P,
    config: EngineConfig,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    state: ClusterState,
    /// Whose inputs changed since the last sync, so the proxier rebuilds only their part of the intent.
    changes: IntentChanges,
    initialized: bool,
    dirty: bool,
    need_full: bool,
    /// The rung of the escalation ladder the next sync starts from.
    mode: SyncMode,
    retry_at: Option<Instant>,
    /// When the proxier asked to be synced again though nothing changed (work it left for a later
    /// transaction).
    follow_up_at: Option<Instant>,
    consecutive_failures: u32,
    /// Repairs of divergences recently made, to recognise a second writer fighting us.
    recent_repairs: Vec<Instant>,
    /// Which service ports claim each address, as of `claims_of`, the intent last applied; and the
    /// contested addresses already warned about.
    claims: FrontendClaims,
    claims_of: Option<Arc<svcproxy_model::Intent>>,
    contests_announced: BTreeSet<Frontend>,
    /// The health problem reported because of divergence, if any.
    divergence_problem: Option<String>,
    /// The health problem reported because of failed syncs, if any.
    failure_problem: Option<String>,
    /// The health problem reported because of state no sync can repair (another backend's rules), if any.
    hazard_problem: Option<String>,
    /// EndpointSlice trigger times of changes not yet programmed.
    pending_trigger_times: Vec<SystemTime>,
    /// When this engine started: changes made before it are not its latency to report.
    started_at: SystemTime,
    /// Services of the unserved family were reported already.
    reported_unserved: bool,
    pending_service_changes: usize,
    pending_endpoint_changes: usize,
    last_full: Option<Instant>,
    /// A sync wrote, and the read-back of what it wrote has not run yet: it waits while changes are queued,
    /// for one sync, which it then covers too (a full read at 5,000 services takes 1–2 s, and a change that
    /// came in during a full sync would otherwise wait for it).
    check_after_sync: bool,
    /// A periodic read-back was given up for a change: it runs once changes pause.
    verify_due: bool,
    /// Since when read-backs have been given up for changes: once [`READ_PUT_OFF_MOST`] has passed, one is
    /// let finish, so a steady stream of changes cannot put reading back off for good.
    reads_put_off_since: Option<Instant>,
    /// When a read-back given up for a change is done again: each change that comes first pushes it on by
    /// [`READ_QUIET`] (changes come in bursts, and a read restarted between two of them is only given up
    /// again), up to [`READ_PUT_OFF_MOST`] after the first was given up.
    reads_resume_at: Option<Instant>,
    throttle: SyncThrottle,
    status: watch::Sender<EngineStatus>,
}

/// Replaces every object of one kind; `touched` sees each version that was added, changed or removed (both
/// versions of a changed object).
fn replace<T: Clone + PartialEq>(
    map: &mut BTreeMap<ObjectName, T>,
    objects: Vec<T>,
    rejected: &[ObjectName],
    key: impl Fn(&T) -> &ObjectName,
    mut touched: impl FnMut(&T),
) -> usize {
    let mut next: BTreeMap<ObjectName, T> = objects.into_iter().map(|o| (key(&o).clone(), o)).collect();
    for name in rejected {
        if let Some(old) = map.get(name) {
            next.insert(name.clone(), old.clone());
        }
    }
    let mut changed = 0;
    for (k, v) in &next {
        let old = map.get(k);
        if old != Some(v) {
            changed += 1;
            old.into_iter().for_each(&mut touched);
            touched(v);
        }
    }
    for (k, v) in map.iter() {
        if !next.contains_key(k) {
            changed += 1;
            touched(v);
        }
    }
    *map = next;
    changed
}

fn apply_delta<T: Clone + PartialEq>(
    map: &mut BTreeMap<ObjectName, T>,
    delta: Delta<T>,
    key: impl Fn(&T) -> &ObjectName,
    mut touched: impl FnMut(&T),
) -> usize {
    match delta {
        Delta::Apply(o) => {
            let k = key(&o).clone();
            if map.get(&k) == Some(&o) {
                0
            } else {
                touched(&o);
                if let Some(old) = map.insert(k, o) {
                    touched(&old);
                }
                1
            }
        }
        Delta::Delete(name) => match map.remove(&name) {
            Some(old) => {
                touched(&old);
                1
            }
            None => 0,
        },
        Delta::Replace { objects, rejected } => replace(map, objects, &rejected, key, touched),
    }
}

fn service_touched(changes: &mut IntentChanges) -> impl FnMut(&Service) + '_ {
    move |s| changes.service(&s.name)
}

/// A slice counts for the Service it is labelled for: a relabelled slice touches both Services.
fn slice_touched(changes: &mut IntentChanges) -> impl FnMut(&EndpointSlice) + '_ {
    move |s| changes.slice(s)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl<P: Proxier> Engine<P> {
    pub fn new(proxier: P, config: EngineConfig, health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Self {
        let throttle = SyncThrottle::new(config.min_sync_period);
        Engine {
            proxier,
            config,
            health,
            metrics,
            state: ClusterState::default(),
            changes: IntentChanges::everything(),
            initialized: false,
            dirty: false,
            need_full: true,
            mode: SyncMode::Full,
            retry_at: None,
            follow_up_at: None,
            consecutive_failures: 0,
            recent_repairs: Vec::new(),
            claims: FrontendClaims::default(),
            claims_of: None,
            contests_announced: BTreeSet::new(),
            divergence_problem: None,
            failure_problem: None,
            hazard_problem: None,
            pending_trigger_times: Vec::new(),
            started_at: SystemTime::now(),
            reported_unserved: false,
            pending_service_changes: 0,
            pending_endpoint_changes: 0,
            last_full: None,
            check_after_sync: false,
            verify_due: false,
            reads_put_off_since: None,
            reads_resume_at: None,
            throttle,
            status: watch::Sender::new(EngineStatus::default()),
        }
    }

    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.status.subscribe()
    }

    fn family_labels(&self) -> FamilyLabels {
        FamilyLabels {
            ip_family: self.proxier.family().label().to_string(),
        }
    }

    /// Applies one event; returns whether anything the proxy programs may have changed.
    fn apply(&mut self, event: SourceEvent) -> bool {
        let (services, slices) = match event {
            SourceEvent::Snapshot(next) => {
                for slice in next.endpoint_slices.values() {
                    self.note_trigger_time(slice);
                }
                let services = replace(
                    &mut self.state.services,
                    next.services.into_values().collect(),
                    &[],
                    |s| &s.name,
                    service_touched(&mut self.changes),
                );
                let slices = replace(
                    &mut self.state.endpoint_slices,
                    next.endpoint_slices.into_values().collect(),
                    &[],
                    |s| &s.name,
                    slice_touched(&mut self.changes),
                );
                let node_changed = self.set_node(next.node);
                let cidrs_changed = self.apply_service_cidrs(Delta::Replace {
                    objects: next.service_cidrs.into_values().collect(),
                    rejected: Vec::new(),
                });
                self.count_changes(services, slices);
                return services + slices > 0 || node_changed || cidrs_changed;
            }
            SourceEvent::Services(d) => (
                apply_delta(
                    &mut self.state.services,
                    d,
                    |s| &s.name,
                    service_touched(&mut self.changes),
                ),
                0,
            ),
            SourceEvent::EndpointSlices(d) => {
                match &d {
                    Delta::Apply(slice) => self.note_trigger_time(slice),
                    Delta::Replace { objects, .. } => objects.iter().for_each(|s| self.note_trigger_time(s)),
                    Delta::Delete(_) => {}
                }
                (
                    0,
                    apply_delta(
                        &mut self.state.endpoint_slices,
                        d,
                        |s| &s.name,
                        slice_touched(&mut self.changes),
                    ),
                )
            }
            SourceEvent::Node(n) => return self.set_node(n),
            SourceEvent::ServiceCidrs(d) => return self.apply_service_cidrs(d),
            SourceEvent::Synced => {
                let first = !self.initialized;
                self.initialized = true;
                self.health.listed(self.proxier.family());
                return first;
            }
            SourceEvent::Unreachable(problem) => {
                self.status
                    .send_if_modified(|s| match (&mut s.source_problem, problem) {
                        (None, None) => false,
                        // The outage goes on: keep when it began, with the newest error (no news for followers).
                        (Some(known), Some(error)) => {
                            known.error = error;
                            false
                        }
                        (current, problem) => {
                            *current = problem.map(|error| SourceProblem {
                                since: jiff::Timestamp::now()
                                    .round(jiff::Unit::Second)
                                    .unwrap_or_default()
                                    .to_string(),
                                error,
                            });
                            true
                        }
                    });
                return false;
            }
        };
        self.count_changes(services, slices);
        services + slices > 0
    }

    fn count_changes(&mut self, services: usize, slices: usize) {
        self.metrics.service_changes.inc_by(services as u64);
        self.metrics.endpoint_changes.inc_by(slices as u64);
        self.pending_service_changes += services;
        self.pending_endpoint_changes += slices;
        self.metrics
            .service_changes_pending
            .set(self.pending_service_changes as i64);
        self.metrics
            .endpoint_changes_pending
            .set(self.pending_endpoint_changes as i64);
    }

    /// Remembers when the EndpointSlice controller saw the change behind a new or changed slice, so the
    /// sync that programs it can report the network programming latency as upstream does. Only changes made
    /// since this engine started count, as upstream counts them: after a restart the initial list carries
    /// every slice's trigger time, hours or days old, which would land in the histogram's top bucket.
    fn note_trigger_time(&mut self, slice: &svcproxy_model::EndpointSlice) {
        if self.state.endpoint_slices.get(&slice.name) == Some(slice) {
            return;
        }
        if let Some(at) = slice
            .last_change_trigger_time
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(SystemTime::from)
            .filter(|at| *at >= self.started_at)
        {
            self.pending_trigger_times.push(at);
        }
    }

    /// Names, once, the Services of a family no engine serves: nothing else would say that they get no
    /// rules on this node.
    fn report_unserved(&mut self) {
        let Some(unserved) = &self.config.unserved else {
            return;
        };
        let family = unserved.family;
        if self.reported_unserved {
            return;
        }
        let names: Vec<String> = self
            .state
            .services
            .values()
            .filter(|s| s.cluster_ips.iter().any(|ip| family.contains(ip)))
            .map(|s| s.name.to_string())
            .collect();
        if let Some(first) = names.first() {
            self.reported_unserved = true;
            tracing::warn!(
                services = names.len(),
                example = %first,
                "Services have {} cluster IPs, but svcproxy programs no {} rules on this node: {}",
                family.label(),
                family.label(),
                unserved.reason
            );
        }
    }

    /// Metrics that describe a successful sync's result.
    fn record_programmed(&mut self, intent: &svcproxy_model::Intent) {
        let labels = self.family_labels();
        let now = SystemTime::now();
        for at in self.pending_trigger_times.drain(..) {
            if let Ok(latency) = now.duration_since(at) {
                self.metrics
                    .network_programming_duration
                    .get_or_create(&labels)
                    .observe(latency.as_secs_f64());
            }
        }
        self.pending_service_changes = 0;
        self.pending_endpoint_changes = 0;
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
        let (mut internal, mut external) = (0, 0);
        for spi in intent.service_ports.values() {
            if spi.internal_policy_local && spi.has_endpoints() && spi.endpoints.local.is_empty() {
                internal += 1;
            }
            if spi.external_policy_local && spi.has_endpoints() && spi.endpoints.local.is_empty() {
                external += 1;
            }
        }
        for (policy, count) in [("internal", internal), ("external", external)] {
            let l = PolicyLabels {
                ip_family: labels.ip_family.clone(),
                traffic_policy: policy.into(),
            };
            self.metrics.no_local_endpoints.get_or_create(&l).set(count);
        }
    }

    fn set_node(&mut self, node: Option<svcproxy_model::Node>) -> bool {
        if self.state.node == node {
            return false;
        }
        // A Node deleted after it was marked for deletion stays ineligible, as upstream keeps the last state:
        // the machine is going away, and load balancers must not send it new connections.
        if let Some(n) = &node {
            self.health.set_node_eligible(!n.being_deleted);
        }
        // Node labels (the topology zone) can change every service's endpoint selection: rewrite everything.
        self.need_full = true;
        self.changes = IntentChanges::everything();
        self.state.node = node;
        true
    }

    /// ServiceCIDRs change no Service's rules, only the proxier's configuration (nftables mode drops traffic to
    /// unallocated addresses in them), which a changed configuration rewrites in full.
    fn apply_service_cidrs(&mut self, delta: Delta<svcproxy_model::ServiceCidr>) -> bool {
        apply_delta(&mut self.state.service_cidrs, delta, |c| &c.name, |_| {}) > 0
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if !self.initialized {
            return None;
        }
        if let Some(retry) = self.retry_at {
            return Some(retry);
        }
        if self.dirty || self.need_full {
            return Some(self.throttle.next_allowed(now));
        }
        let periodic = self.last_full.map_or(now, |t| t + self.config.full_sync_period);
        Some(match self.follow_up_at {
            Some(at) => periodic.min(at.max(self.throttle.next_allowed(now))),
            None => periodic,
        })
    }

    /// Runs until the source channel closes or `shutdown` fires.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) -> P {
        self.health.updated(self.proxier.family());
        if !self.initialized {
            self.health.listing(self.proxier.family());
        }
        // Failure counters exist from the start at zero, so alerts on their rate work before the first failure.
        // So are the timestamps, at 0, as upstream's gauges are: "time() - last sync > N" must fire on a node
        // that never synced, not find no series.
        let labels = self.family_labels();
        if self.proxier.writes_nftables() {
            let _ = self.metrics.nftables_sync_failures.get_or_create(&labels);
            let _ = self.metrics.nftables_cleanup_failures.get_or_create(&labels);
        } else {
            let _ = self.metrics.restore_failures.get_or_create(&labels);
            let _ = self.metrics.partial_restore_failures.get_or_create(&labels);
        }
        let _ = self.metrics.last_sync_timestamp.get_or_create(&labels);
        let _ = self.metrics.last_queued_timestamp.get_or_create(&labels);
        let mut verify_tick = self.config.verify_period.map(interval);
        let mut canary_tick = self.config.canary_period.map(interval);
        loop {
            let deadline = self.next_deadline(Instant::now());
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let resume_at = self.reads_resume_at;
            let reads_resume = async {
                if let Some(at) = resume_at {
                    tokio::time::sleep_until(at.into()).await;
                }
            };
            // Biased: a due sync runs before a read-back, so checks can never starve syncs.
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = sleep => self.sync_once(&|| !events.is_empty()),
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    self.put_reads_off();
                    if self.apply(ev) {
                        self.dirty = true;
                        // As upstream, nothing counts as waiting before the initial lists are complete: a slow
                        // first list is not a stuck proxy, and must not get it restarted (which lists again).
                        if self.initialized {
                            self.health.queued_update(self.proxier.family());
                        }
                        self.metrics.last_queued_timestamp.get_or_create(&self.family_labels()).set(unix_now());
                    }
                }
                () = reads_resume, if (self.check_after_sync || self.verify_due) && !self.sync_pending() => {
                    let check = if std::mem::take(&mut self.check_after_sync) {
                        Check::AfterSync
                    } else {
                        self.verify_due = false;
                        Check::Verify
                    };
                    self.check(check, &|| !events.is_empty());
                }
                _ = tick(&mut verify_tick) => {
                    // A read given up for changes already waits for them to pause.
                    if self.reads_resume_at.is_some() {
                        self.verify_due = true;
                    } else {
                        self.check(Check::Verify, &|| !events.is_empty());
                    }
                }
                _ = tick(&mut canary_tick) => self.check(Check::Canary, &never),
            }
        }
        self.proxier
    }

    /// A change arrived: a read-back given up for changes waits until they pause.
    fn put_reads_off(&mut self) {
        if let (Some(at), Some(since)) = (&mut self.reads_resume_at, self.reads_put_off_since) {
            *at = (Instant::now() + READ_QUIET).min(since + READ_PUT_OFF_MOST);
        }
    }

    /// Runs `check`. A whole read-back takes 1–2 s at 5,000 Services in iptables mode (0.5 s in nftables
    /// mode), and a change arriving meanwhile would wait for it: once `waiting` says a change is, the read
    /// is given up, the change synced, and the read done once changes pause (it then covers what their syncs
    /// wrote too).
    fn check(&mut self, check: Check, waiting: Abandon<'_>) {
        if !self.initialized || self.consecutive_failures > 0 || self.status.borrow().applied.is_none() {
            self.reads_put_off_since = None;
            self.reads_resume_at = None;
            return;
        }
        // With a sync pending, reading back would only find what it is about to rewrite (and could wait on a
        // lock the sync needs); the after-sync check follows it anyway.
        if self.sync_pending() && !matches!(check, Check::AfterSync) {
            return;
        }
        let abandon = match self.reads_put_off_since {
            Some(since) if since.elapsed() >= READ_PUT_OFF_MOST => &never,
            _ => waiting,
        };
        let proxier = &mut self.proxier;
        let result = tokio::task::block_in_place(|| match check {
            Check::Verify => proxier.verify_unless(VerifyScope::All, abandon),
            Check::AfterSync => proxier.verify_unless(VerifyScope::LastSync, abandon),
            Check::Canary => proxier.canary(),
        });
        match result {
            Ok(findings) => {
                self.read_done(check);
                self.on_findings(check, findings);
            }
            Err(SyncError::Abandoned) => {
                self.metrics
                    .read_backs_given_up
                    .get_or_create(&self.family_labels())
                    .inc();
                let now = Instant::now();
                let since = *self.reads_put_off_since.get_or_insert(now);
                self.reads_resume_at = Some((now + READ_QUIET).min(since + READ_PUT_OFF_MOST));
                tracing::debug!(
                    check = check.name(),
                    "read-back given up for a change waiting to be synced; it follows once changes pause"
                );
                match check {
                    Check::AfterSync => self.check_after_sync = true,
                    Check::Verify => self.verify_due = true,
                    Check::Canary => {}
                }
                return;
            }
            Err(e) => {
                self.read_done(check);
                tracing::warn!("read-back failed: {e}");
            }
        }
        if matches!(check, Check::Verify) {
            self.check_hazards();
        }
    }

    /// Follows which service ports claim each address into `applied`, and says so when one more than one claims
    /// appears, changes hands or is no longer contested. Only the first in name order gets such an address's
    /// traffic, in both modes; the others would lose it without a word otherwise.
    fn follow_claims(&mut self, applied: &Arc<svcproxy_model::Intent>) {
        let touched = self.claims.follow(self.claims_of.as_deref(), applied);
        self.claims_of = Some(applied.clone());
        for frontend in touched {
            match self.claims.contest(&frontend, applied) {
                Some(contest) => {
                    tracing::warn!("{contest}");
                    self.contests_announced.insert(frontend);
                }
                None => {
                    if self.contests_announced.remove(&frontend) {
                        tracing::info!("{frontend} is claimed by one service port again");
                    }
                }
            }
        }
        self.metrics
            .contested_frontends
            .get_or_create(&self.family_labels())
            .set(self.claims.contested() as i64);
    }

    /// A whole or after-sync read ran to its end: nothing is put off any more. The canary, a glance at one
    /// chain, does not count: a read given up stays due.
    fn read_done(&mut self, check: Check) {
        if !matches!(check, Check::Canary) {
            self.reads_put_off_since = None;
            self.reads_resume_at = None;
        }
    }

    fn sync_pending(&self) -> bool {
        self.dirty || self.need_full || self.retry_at.is_some()
    }

    /// Reads what lies outside our rules but acts on the same packets; health stays red while it is there.
    fn check_hazards(&mut self) {
        let proxier = &mut self.proxier;
        let hazards = tokio::task::block_in_place(|| proxier.hazards());
        let problem = (!hazards.is_empty()).then(|| hazards.join("; "));
        if problem != self.hazard_problem {
            match &problem {
                Some(p) => tracing::error!("{p}"),
                None => tracing::info!("the hazard outside our rules is gone"),
            }
            self.hazard_problem = problem;
            self.publish_health();
        }
    }

    fn on_findings(&mut self, check: Check, findings: Vec<Finding>) {
        let labels = self.family_labels();
        self.metrics.verifications.get_or_create(&labels).inc();
        if findings.is_empty() {
            // The canary looks at one chain: it can raise an alarm but not prove a repair.
            if matches!(check, Check::Canary) {
                return;
            }
            if self.divergence_problem.take().is_some() {
                tracing::info!("read-back matches what was written again; divergence repaired");
                self.metrics.repairs.get_or_create(&labels).inc();
            }
            self.status.send_modify(|s| s.unverified.clear());
            self.publish_health();
            return;
        }
        for f in &findings {
            tracing::warn!(
                check = check.name(),
                "kernel diverges from what was written: {}",
                f.what
            );
            self.metrics
                .divergences
                .get_or_create(&ClassLabels {
                    ip_family: labels.ip_family.clone(),
                    class: f.kind.into(),
                })
                .inc();
        }
        let now = Instant::now();
        self.recent_repairs
            .retain(|t| now.duration_since(*t) < FIGHT_WINDOW);
        // A repair starts only when none is pending: findings while one is queued are the same divergence.
        let repair_pending = self.need_full && self.dirty;
        if !repair_pending {
            self.recent_repairs.push(now);
        }
        let first = &findings[0].what;
        let problem = if self.recent_repairs.len() >= FIGHT_REPAIRS {
            // Repairing again and again means someone keeps rewriting our chains (two proxies on one node, a
            // configuration manager): say so, and slow the repairs down instead of flapping silently.
            // Never push an already scheduled repair further out, or frequent findings would starve it.
            self.retry_at.get_or_insert(now + self.config.sync_period);
            format!(
                "our rules were changed from outside {} times in {} s (latest: {first}); is another proxy or tool writing {} on this node?",
                self.recent_repairs.len(),
                FIGHT_WINDOW.as_secs(),
                self.proxier.owned_rules()
            )
        } else {
            format!("kernel diverges from what was written: {first}")
        };
        self.divergence_problem = Some(problem);
        let affected: std::collections::BTreeSet<String> =
            findings.iter().flat_map(|f| f.services.iter().cloned()).collect();
        self.status.send_modify(|s| {
            s.divergences += findings.len() as u64;
            s.unverified.extend(affected);
        });
        // The repair is a full sync: it rewrites every chain we own and collects whatever was added.
        self.need_full = true;
        self.dirty = true;
        self.publish_health();
    }

    fn publish_health(&self) {
        let problem = self
            .failure_problem
            .clone()
            .or_else(|| self.divergence_problem.clone())
            .or_else(|| self.hazard_problem.clone());
        self.health.set_problem(self.proxier.family(), problem.clone());
        self.status.send_if_modified(|s| {
            let changed = s.problem != problem;
            s.problem = problem;
            changed
        });
    }

    /// Syncs; `waiting` says whether a change is waiting (for a read-back that follows at once).
    fn sync_once(&mut self, waiting: Abandon<'_>) {
        let now = Instant::now();
        let periodic_full = self
            .last_full
            .is_none_or(|t| now >= t + self.config.full_sync_period);
        let mode = if self.need_full || periodic_full {
            self.mode.max(SyncMode::Full)
        } else {
            self.mode
        };
        self.throttle.record_run(now);
        self.retry_at = None;
        let labels = self.family_labels();
        let started = Instant::now();
        let state = &self.state;
        let changes = std::mem::take(&mut self.changes);
        let proxier = &mut self.proxier;
        let result = tokio::task::block_in_place(|| proxier.sync(state, &changes, mode));
        if result.is_err() {
            // The proxier may not have got as far as building the intent: the next attempt rebuilds these too.
            self.changes.merge(changes);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let full = mode != SyncMode::Partial;
        self.metrics.sync_duration.get_or_create(&labels).observe(elapsed);
        if full {
            self.metrics
                .sync_full_duration
                .get_or_create(&labels)
                .observe(elapsed);
        } else {
            self.metrics
                .sync_partial_duration
                .get_or_create(&labels)
                .observe(elapsed);
        }
        let kind = match mode {
            SyncMode::Partial => "partial",
            SyncMode::Full => "full",
            SyncMode::Rebuild => "rebuild",
        };
        let result_label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .syncs
            .get_or_create(&SyncLabels {
                ip_family: labels.ip_family.clone(),
                kind: kind.into(),
                result: result_label.into(),
            })
            .inc();
        match result {
            Ok(report) => {
                tracing::info!(
                    kind,
                    service_ports = report.intent.service_ports.len(),
                    payload_lines = report.payload_lines,
                    writes = report.writes,
                    seconds = elapsed,
                    "synced"
                );
                self.dirty = false;
                self.need_full = false;
                self.mode = SyncMode::Partial;
                self.follow_up_at = report.follow_up.map(|after| Instant::now() + after);
                if report.cleanup_failed {
                    self.metrics
                        .nftables_cleanup_failures
                        .get_or_create(&self.family_labels())
                        .inc();
                }
                self.consecutive_failures = 0;
                self.failure_problem = None;
                // The first full sync is followed by the removal of the other mode's rules (see main), so a
                // hazard check right after it would only race that removal.
                let first_full = full && self.last_full.is_none();
                if full {
                    self.last_full = Some(now);
                }
                self.health.updated(self.proxier.family());
                self.report_unserved();
                self.record_programmed(&report.intent);
                self.metrics
                    .last_sync_timestamp
                    .get_or_create(&labels)
                    .set(unix_now());
                if let Some(ct) = report.conntrack {
                    self.metrics
                        .conntrack_duration
                        .get_or_create(&labels)
                        .observe(ct.seconds);
                    self.metrics
                        .conntrack_deleted
                        .get_or_create(&labels)
                        .inc_by(ct.deleted as u64);
                }
                self.metrics
                    .programmed_service_ports
                    .get_or_create(&labels)
                    .set(report.intent.service_ports.len() as i64);
                self.metrics
                    .payload_lines
                    .get_or_create(&labels)
                    .set(report.payload_lines as i64);
                for rules in &report.iptables_rules {
                    let l = TableLabels {
                        ip_family: labels.ip_family.clone(),
                        table: rules.table.to_string(),
                    };
                    let (total, last) = (rules.total as i64, rules.written as i64);
                    self.metrics.iptables_rules_total.get_or_create(&l).set(total);
                    self.metrics.iptables_rules_last.get_or_create(&l).set(last);
                }
                self.follow_claims(&report.intent);
                self.status.send_modify(|s| {
                    s.syncs += 1;
                    s.applied = Some(report.intent.clone());
                    s.node_port_ips = report.node_port_ips.clone();
                    s.service_cidrs = self.state.service_cidrs_of(self.proxier.family());
                    s.last_error = None;
                    s.consecutive_failures = 0;
                    s.wanted = None;
                });
                if self.config.verify_after_sync && report.payload_lines > 0 {
                    if self.check_after_sync && self.reads_resume_at.is_none() {
                        // It waited for this sync already: it reads back what both wrote, now (unless it was
                        // given up for changes, and waits for them to pause).
                        self.check_after_sync = false;
                        self.check(Check::AfterSync, waiting);
                    } else {
                        self.check_after_sync = true;
                    }
                }
                self.publish_health();
                if full && !first_full {
                    self.check_hazards();
                }
            }
            Err(e) => self.on_failure(mode, e, now),
        }
    }

    fn on_failure(&mut self, mode: SyncMode, e: SyncError, now: Instant) {
        let labels = self.family_labels();
        if matches!(e, SyncError::Refused { .. }) {
            if self.proxier.writes_nftables() {
                self.metrics.nftables_sync_failures.get_or_create(&labels).inc();
            } else {
                self.metrics.restore_failures.get_or_create(&labels).inc();
                if mode == SyncMode::Partial {
                    self.metrics.partial_restore_failures.get_or_create(&labels).inc();
                }
            }
        }
        self.metrics
            .sync_failures
            .get_or_create(&ClassLabels {
                ip_family: labels.ip_family.clone(),
                class: e.class().into(),
            })
            .inc();
        self.consecutive_failures += 1;
        // Never the same attempt twice: each failure climbs the ladder (partial → full → rebuild). Below the top
        // the next rung runs at once; at the top, retries back off by a sync period.
        let repairable = !matches!(
            e,
            SyncError::Refused {
                repairable: false,
                ..
            }
        );
        let at_top = mode == SyncMode::Rebuild;
        self.mode = mode.escalate();
        self.need_full = true;
        self.retry_at = Some(if at_top || !repairable {
            now + self.config.sync_period
        } else {
            now
        });
        tracing::error!(attempt = self.consecutive_failures, rung = ?mode, next = ?self.mode, "sync failed: {e}");
        if self.consecutive_failures >= self.config.unhealthy_after || !repairable {
            self.failure_problem = Some(format!(
                "{} consecutive syncs failed; last: {e}",
                self.consecutive_failures
            ));
        }
        // The state is shared for explain and status only while syncs fail, so a healthy daemon holds one copy.
        let wanted = Arc::new(self.state.clone());
        self.status.send_modify(|s| {
            s.syncs += 1;
            s.last_error = Some(e.to_string());
            s.consecutive_failures += 1;
            s.wanted = Some(wanted);
        });
        // After the sync count moved, so status followers see one sync, not a check and then a sync.
        self.publish_health();
    }
}

/// Repairs within this window that count toward recognising a second writer.
const FIGHT_WINDOW: Duration = Duration::from_secs(300);
/// This many repairs within the window means someone else keeps changing our rules.
const FIGHT_REPAIRS: usize = 3;
/// A read-back given up for a change is done again once no change has come for this long: about as long as a
/// whole read takes at 5,000 Services, and upstream's default `--min-sync-period`.
const READ_QUIET: Duration = Duration::from_secs(1);
/// Read-backs are given up for changes for at most this long; then one is let finish whatever waits.
const READ_PUT_OFF_MOST: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Check {
    AfterSync,
    Verify,
    Canary,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::AfterSync => "after-sync",
            Check::Verify => "periodic",
            Check::Canary => "canary",
        }
    }
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
