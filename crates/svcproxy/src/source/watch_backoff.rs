//! Retry delays for the API watches.
//!
//! kube's default backoff grows to 30 s, and after an API outage the watches then stay idle for up to that
//! long before the relist that brings the node up to date (measured: 54 s from the API's return to converged
//! rules). A node proxy is worth a quicker return, but not a tight loop against a recovering API server from
//! every node at once: the delay doubles from 0.5 s to 10 s, with jitter so nodes spread out.

use std::time::Duration;

use kube::runtime::utils::Backoff;

const MIN: Duration = Duration::from_millis(500);
const MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
    /// A small xorshift state for jitter; no need for a random-number crate to spread retries.
    seed: u64,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        WatchBackoff { next: MIN, seed }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        // Between half and all of the current step.
        let fraction = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let delay = self.next.mul_f64(fraction);
        self.next = (self.next * 2).min(MAX);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = b.by_ref().take(8).collect();
        assert!(delays[0] <= MIN && delays[0] >= MIN / 2);
        assert!(delays.iter().all(|d| *d <= MAX));
        assert!(delays[7] >= MAX / 2);
        b.reset();
        assert!(b.next().unwrap() <= MIN);
    }
}
