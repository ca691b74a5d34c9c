//! Proxy health. Liveness has upstream's meaning: alive unless a change has been waiting for longer than the
//! timeout (2 × syncPeriod), so a proxy whose syncs keep failing is restarted even though its process runs.
//! Health (`/healthz`, the health-check node ports) is stricter: it also turns red the moment svcproxy knows
//! the kernel does not match the cluster (repeated failed syncs, a divergence read back, a hazard no sync can
//! repair), so load balancers stop sending new connections. Those problems stay out of liveness: restarting
//! the process cannot fix a foreign program rewriting the rules, and a liveness probe would restart it every
//! minute for as long as that goes on.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use svcproxy_model::IpFamily;

#[derive(Debug)]
struct Inner {
    last_updated: SystemTime,
    /// Per family, when the oldest change not yet in the kernel arrived.
    oldest_pending: BTreeMap<IpFamily, Instant>,
    /// Per family, since when the engine has been waiting for its initial lists.
    listing_since: BTreeMap<IpFamily, Instant>,
    node_eligible: bool,
    /// Per family, why the kernel does not match the cluster, when we know: repeated sync failures, a
    /// divergence found by read-back that is not repaired yet, a hazard no sync can repair.
    problems: BTreeMap<IpFamily, String>,
}

/// The node's health across the engines of every family: healthy only while each one is.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    inner: Mutex<Inner>,
}

/// One health answer, as `/healthz` and `/livez` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthStatus {
    pub healthy: bool,
    /// No change has waited longer than the timeout (what `/livez` reports).
    pub live: bool,
    pub problem: Option<String>,
    pub node_eligible: bool,
    pub last_updated: SystemTime,
    pub current_time: SystemTime,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        ProxyHealth {
            timeout,
            inner: Mutex::new(Inner {
                last_updated: SystemTime::now(),
                oldest_pending: BTreeMap::new(),
                listing_since: BTreeMap::new(),
                node_eligible: true,
                problems: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent (plain field stores), so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that the kernel of `family` does not reflect yet.
    pub fn queued_update(&self, family: IpFamily) {
        self.lock()
            .oldest_pending
            .entry(family)
            .or_insert_with(Instant::now);
    }

    /// The engine of `family` waits for its initial lists (Services, EndpointSlices, its Node for 30 s at
    /// most) before it programs anything. Nothing counts as a waiting change meanwhile, so a slow list does
    /// not fail the liveness probe (and a restart would only list again); but lists still incomplete after
    /// the timeout turn health red, since nothing this node serves is being kept in line with the cluster.
    pub fn listing(&self, family: IpFamily) {
        self.lock()
            .listing_since
            .entry(family)
            .or_insert_with(Instant::now);
    }

    /// The initial lists of `family` are complete.
    pub fn listed(&self, family: IpFamily) {
        self.lock().listing_since.remove(&family);
    }

    /// Everything queued so far for `family` is now in the kernel.
    pub fn updated(&self, family: IpFamily) {
        let mut g = self.lock();
        g.oldest_pending.remove(&family);
        g.last_updated = SystemTime::now();
    }

    /// Marks `family` unhealthy with a reason, or clears it.
    pub fn set_problem(&self, family: IpFamily, problem: Option<String>) {
        let mut g = self.lock();
        match problem {
            Some(p) => g.problems.insert(family, p),
            None => g.problems.remove(&family),
        };
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn status(&self) -> HealthStatus {
        let g = self.lock();
        let now = SystemTime::now();
        let live = g.oldest_pending.values().all(|at| at.elapsed() < self.timeout);
        let stuck_listing = g
            .listing_since
            .iter()
            .filter(|(_, at)| at.elapsed() >= self.timeout);
        let mut problems: Vec<(IpFamily, String)> = stuck_listing
            .map(|(family, at)| {
                let waited = at.elapsed().as_secs();
                (
                    *family,
                    format!("the initial lists are not complete after {waited}s; nothing is programmed"),
                )
            })
            .collect();
        problems.extend(g.problems.iter().map(|(f, p)| (*f, p.clone())));
        let healthy = live && problems.is_empty();
        // IPv4's reasons read as they always did; the other family's say which family they are about.
        let problem = (!problems.is_empty()).then(|| {
            problems
                .iter()
                .map(|(family, p)| match family {
                    IpFamily::V4 => p.clone(),
                    IpFamily::V6 => format!("IPv6: {p}"),
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        HealthStatus {
            healthy,
            live,
            problem,
            node_eligible: g.node_eligible,
            // Upstream reports the current time as lastUpdated while healthy (its older meaning was "the sync loop
            // ran"); monitoring built on that keeps working.
            last_updated: if healthy { now } else { g.last_updated },
            current_time: now,
        }
    }
}

/// Go's `time.Time.String()` shape, which upstream's JSON bodies carry.
pub fn go_time(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.strftime("%Y-%m-%d %H:%M:%S.%N +0000 UTC").to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_pending_change_is_unhealthy_until_updated() {
        let h = ProxyHealth::new(Duration::from_millis(0));
        assert!(h.status().healthy, "idle proxy is healthy");
        h.queued_update(IpFamily::V4);
        assert!(!h.status().healthy);
        assert!(!h.status().live);
        h.updated(IpFamily::V4);
        assert!(h.status().healthy && h.status().live);
    }

    #[test]
    fn initial_lists_that_never_complete_turn_health_red_but_not_liveness() {
        let h = ProxyHealth::new(Duration::from_millis(0));
        h.listing(IpFamily::V4);
        let st = h.status();
        assert!(!st.healthy && st.live, "{st:?}");
        assert!(st.problem.unwrap().contains("initial lists"));
        h.listed(IpFamily::V4);
        assert!(h.status().healthy);

        let patient = ProxyHealth::new(Duration::from_secs(3600));
        patient.listing(IpFamily::V4);
        assert!(
            patient.status().healthy,
            "a list still within the timeout is fine"
        );
    }

    #[test]
    fn fresh_pending_change_is_still_healthy() {
        let h = ProxyHealth::new(Duration::from_secs(3600));
        h.queued_update(IpFamily::V4);
        assert!(h.status().healthy);
    }

    #[test]
    fn each_family_answers_for_itself() {
        let h = ProxyHealth::new(Duration::from_millis(0));
        h.queued_update(IpFamily::V4);
        h.queued_update(IpFamily::V6);
        h.updated(IpFamily::V4);
        assert!(!h.status().healthy, "IPv6's change is still waiting");
        h.updated(IpFamily::V6);
        assert!(h.status().healthy);

        h.set_problem(IpFamily::V6, Some("sync failed".into()));
        h.set_problem(IpFamily::V4, Some("read-back differs".into()));
        assert!(!h.status().healthy);
        assert!(
            h.status().live,
            "what a restart cannot repair leaves liveness alone"
        );
        assert_eq!(
            h.status().problem.as_deref(),
            Some("read-back differs; IPv6: sync failed")
        );
        h.set_problem(IpFamily::V4, None);
        assert_eq!(h.status().problem.as_deref(), Some("IPv6: sync failed"));
        h.set_problem(IpFamily::V6, None);
        assert!(h.status().healthy);
    }

    #[test]
    fn go_time_shape() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500_000_000_123);
        assert_eq!(go_time(t), "1970-01-01 00:25:00.000000123 +0000 UTC");
    }
}
