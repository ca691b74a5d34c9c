//! The engine: applies source events to the cluster state and decides when and how to sync.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use svcproxy_model::{ClusterState, ObjectName};
use tokio::sync::{mpsc, watch};

use super::proxier::{Proxier, SyncError};
use super::throttle::SyncThrottle;
use crate::health::ProxyHealth;
use crate::metrics::{FamilyLabels, Metrics, SyncLabels};
use crate::source::{Delta, SourceEvent};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Upper bound on sync frequency (`--min-sync-period`, upstream default 1 s).
    pub min_sync_period: Duration,
    /// Retry delay after a failed sync, and half the health timeout (`--sync-period`, upstream default 30 s).
    pub sync_period: Duration,
    /// A full sync at least this often, to repair what partial syncs cannot see (upstream: one hour).
    pub full_sync_period: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
        }
    }
}

/// What the engine publishes after each sync, for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStatus {
    pub syncs: u64,
    /// The intent of the last successful sync.
    pub applied: Option<Arc<svcproxy_model::Intent>>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
}

pub struct Engine<P: Proxier> {
    proxier: P,
    config: EngineConfig,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    state: ClusterState,
    initialized: bool,
    dirty: bool,
    need_full: bool,
    retry_at: Option<Instant>,
    last_full: Option<Instant>,
    throttle: SyncThrottle,
    status: watch::Sender<EngineStatus>,
}

fn replace<T: Clone + PartialEq>(
    map: &mut BTreeMap<ObjectName, T>,
    objects: Vec<T>,
    rejected: &[ObjectName],
    key: impl Fn(&T) -> &ObjectName,
) -> usize {
    let mut next: BTreeMap<ObjectName, T> = objects.into_iter().map(|o| (key(&o).clone(), o)).collect();
    for name in rejected {
        if let Some(old) = map.get(name) {
            next.insert(name.clone(), old.clone());
        }
    }
    let changed = next.iter().filter(|(k, v)| map.get(*k) != Some(*v)).count()
        + map.keys().filter(|k| !next.contains_key(*k)).count();
    *map = next;
    changed
}

fn apply_delta<T: Clone + PartialEq>(
    map: &mut BTreeMap<ObjectName, T>,
    delta: Delta<T>,
    key: impl Fn(&T) -> &ObjectName,
) -> usize {
    match delta {
        Delta::Apply(o) => {
            let k = key(&o).clone();
            if map.get(&k) == Some(&o) {
                0
            } else {
                map.insert(k, o);
                1
            }
        }
        Delta::Delete(name) => usize::from(map.remove(&name).is_some()),
        Delta::Replace { objects, rejected } => replace(map, objects, &rejected, key),
    }
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
            initialized: false,
            dirty: false,
            need_full: true,
            retry_at: None,
            last_full: None,
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
                let services = replace(
                    &mut self.state.services,
                    next.services.into_values().collect(),
                    &[],
                    |s| &s.name,
                );
                let slices = replace(
                    &mut self.state.endpoint_slices,
                    next.endpoint_slices.into_values().collect(),
                    &[],
                    |s| &s.name,
                );
                let node_changed = self.set_node(next.node);
                self.count_changes(services, slices);
                return services + slices > 0 || node_changed;
            }
            SourceEvent::Services(d) => (apply_delta(&mut self.state.services, d, |s| &s.name), 0),
            SourceEvent::EndpointSlices(d) => {
                (0, apply_delta(&mut self.state.endpoint_slices, d, |s| &s.name))
            }
            SourceEvent::Node(n) => return self.set_node(n),
            SourceEvent::Synced => {
                let first = !self.initialized;
                self.initialized = true;
                return first;
            }
        };
        self.count_changes(services, slices);
        services + slices > 0
    }

    fn count_changes(&self, services: usize, slices: usize) {
        self.metrics.service_changes.inc_by(services as u64);
        self.metrics.endpoint_changes.inc_by(slices as u64);
    }

    fn set_node(&mut self, node: Option<svcproxy_model::Node>) -> bool {
        if self.state.node == node {
            return false;
        }
        self.health
            .set_node_eligible(!node.as_ref().is_some_and(|n| n.being_deleted));
        // Node labels (the topology zone) can change every service's endpoint selection: rewrite everything.
        self.need_full = true;
        self.state.node = node;
        true
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
        Some(self.last_full.map_or(now, |t| t + self.config.full_sync_period))
    }

    /// Runs until the source channel closes or `shutdown` fires.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) -> P {
        self.health.updated();
        // Failure counters exist from the start at zero, so alerts on their rate work before the first failure.
        let labels = self.family_labels();
        let _ = self.metrics.restore_failures.get_or_create(&labels);
        let _ = self.metrics.partial_restore_failures.get_or_create(&labels);
        loop {
            let deadline = self.next_deadline(Instant::now());
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    if self.apply(ev) {
                        self.dirty = true;
                        self.health.queued_update();
                        self.metrics.last_queued_timestamp.get_or_create(&self.family_labels()).set(unix_now());
                    }
                }
                _ = sleep => self.sync_once(),
                _ = shutdown.changed() => break,
            }
        }
        self.proxier
    }

    fn sync_once(&mut self) {
        let now = Instant::now();
        let full = self.need_full
            || self
                .last_full
                .is_none_or(|t| now >= t + self.config.full_sync_period);
        self.throttle.record_run(now);
        self.retry_at = None;
        let labels = self.family_labels();
        let started = Instant::now();
        let state = &self.state;
        let proxier = &mut self.proxier;
        let result = tokio::task::block_in_place(|| proxier.sync(state, full));
        let elapsed = started.elapsed().as_secs_f64();
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
        let kind = if full { "full" } else { "partial" };
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
                    seconds = elapsed,
                    "synced"
                );
                self.dirty = false;
                self.need_full = false;
                if full {
                    self.last_full = Some(now);
                }
                self.health.updated();
                self.metrics
                    .last_sync_timestamp
                    .get_or_create(&labels)
                    .set(unix_now());
                self.metrics
                    .programmed_service_ports
                    .get_or_create(&labels)
                    .set(report.intent.service_ports.len() as i64);
                self.metrics
                    .payload_lines
                    .get_or_create(&labels)
                    .set(report.payload_lines as i64);
                self.status.send_modify(|s| {
                    s.syncs += 1;
                    s.applied = Some(report.intent.clone());
                    s.last_error = None;
                    s.consecutive_failures = 0;
                });
            }
            Err(e) => {
                if matches!(e, SyncError::Refused { .. }) {
                    self.metrics.restore_failures.get_or_create(&labels).inc();
                    if !full {
                        self.metrics.partial_restore_failures.get_or_create(&labels).inc();
                    }
                }
                // A failed partial sync is retried at once as a full one (it may have been missing a chain that
                // only a full rewrite restores); a failed full sync waits a sync period, as upstream does.
                self.need_full = true;
                self.retry_at = if full {
                    Some(now + self.config.sync_period)
                } else {
                    None
                };
                tracing::error!(kind, "sync failed: {e}");
                self.status.send_modify(|s| {
                    s.syncs += 1;
                    s.last_error = Some(e.to_string());
                    s.consecutive_failures += 1;
                });
            }
        }
    }
}
