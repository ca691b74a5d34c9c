//! Rate limiting of syncs, as upstream's bounded-frequency runner does it: a token bucket of two, refilled one
//! token per `min_sync_period`. Two syncs may run back to back (a change right after a sync is not delayed),
//! then at most one per period, so a burst of API events becomes one kernel transaction.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SyncThrottle {
    period: Duration,
    burst: f64,
    tokens: f64,
    refilled_at: Option<Instant>,
}

impl SyncThrottle {
    pub fn new(min_sync_period: Duration) -> Self {
        SyncThrottle {
            period: min_sync_period,
            burst: 2.0,
            tokens: 2.0,
            refilled_at: None,
        }
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        match self.refilled_at {
            Some(at) if !self.period.is_zero() => {
                let earned = now.saturating_duration_since(at).as_secs_f64() / self.period.as_secs_f64();
                (self.tokens + earned).min(self.burst)
            }
            _ => self.burst,
        }
    }

    /// The earliest time the next run may start.
    pub fn next_allowed(&self, now: Instant) -> Instant {
        let tokens = self.tokens_at(now);
        if self.period.is_zero() || tokens >= 1.0 {
            now
        } else {
            now + self.period.mul_f64(1.0 - tokens)
        }
    }

    pub fn record_run(&mut self, at: Instant) {
        self.tokens = (self.tokens_at(at) - 1.0).max(0.0);
        self.refilled_at = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_runs_back_to_back_then_one_per_period() {
        let t0 = Instant::now();
        let p = Duration::from_secs(1);
        let mut t = SyncThrottle::new(p);
        assert_eq!(t.next_allowed(t0), t0);
        t.record_run(t0);
        assert_eq!(t.next_allowed(t0), t0, "burst of two");
        t.record_run(t0);
        assert_eq!(t.next_allowed(t0), t0 + p);
        t.record_run(t0 + p);
        assert_eq!(t.next_allowed(t0 + p), t0 + p * 2);
    }

    #[test]
    fn zero_period_never_waits() {
        let t0 = Instant::now();
        let mut t = SyncThrottle::new(Duration::ZERO);
        for _ in 0..5 {
            t.record_run(t0);
        }
        assert_eq!(t.next_allowed(t0), t0);
    }
}
