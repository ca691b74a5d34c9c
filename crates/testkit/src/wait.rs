use std::time::{Duration, Instant};

/// Polls `f` until it yields a value, panicking with `description` once
/// `timeout` has passed.
///
/// Meant for waiting on eventually-consistent state (a sync reaching the
/// kernel, a watch delivering); the timeout is a safety net, not a latency
/// assertion, so pick it generously.
pub fn wait_until<T>(
    timeout: Duration,
    poll_interval: Duration,
    description: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {description}"
        );
        std::thread::sleep(poll_interval);
    }
}
