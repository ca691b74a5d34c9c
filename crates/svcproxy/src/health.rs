//! Proxy health with upstream's meaning: healthy unless a change has been waiting for longer than the
//! timeout (2 × syncPeriod), so a proxy whose syncs keep failing turns red even though its process is alive.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

#[derive(Debug)]
struct Inner {
    last_updated: SystemTime,
    /// When the oldest change not yet in the kernel arrived.
    oldest_pending: Option<(Instant, SystemTime)>,
    node_eligible: bool,
    /// Why the kernel does not match the cluster, when we know: repeated sync failures or a divergence found
    /// by read-back that is not repaired yet.
    problem: Option<String>,
}

#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    inner: Mutex<Inner>,
}

/// One health answer, as `/healthz` and `/livez` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthStatus {
    pub healthy: bool,
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
                oldest_pending: None,
                node_eligible: true,
                problem: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent (plain field stores), so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that the kernel does not reflect yet.
    pub fn queued_update(&self) {
        let mut g = self.lock();
        if g.oldest_pending.is_none() {
            g.oldest_pending = Some((Instant::now(), SystemTime::now()));
        }
    }

    /// Everything queued so far is now in the kernel.
    pub fn updated(&self) {
        let mut g = self.lock();
        g.oldest_pending = None;
        g.last_updated = SystemTime::now();
    }

    /// Marks the proxy unhealthy with a reason, or clears it.
    pub fn set_problem(&self, problem: Option<String>) {
        self.lock().problem = problem;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn status(&self) -> HealthStatus {
        let g = self.lock();
        let now = SystemTime::now();
        let healthy =
            g.problem.is_none() && g.oldest_pending.is_none_or(|(at, _)| at.elapsed() < self.timeout);
        HealthStatus {
            healthy,
            problem: g.problem.clone(),
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
        h.queued_update();
        assert!(!h.status().healthy);
        h.updated();
        assert!(h.status().healthy);
    }

    #[test]
    fn fresh_pending_change_is_still_healthy() {
        let h = ProxyHealth::new(Duration::from_secs(3600));
        h.queued_update();
        assert!(h.status().healthy);
    }

    #[test]
    fn go_time_shape() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500_000_000_123);
        assert_eq!(go_time(t), "1970-01-01 00:25:00.000000123 +0000 UTC");
    }
}
