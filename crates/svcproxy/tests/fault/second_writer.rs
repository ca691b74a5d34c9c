//! Another program that keeps rewriting one of our chains while svcproxy runs (two proxies on one node, a
//! configuration manager), and the course both backends' cases of it share: svcproxy must notice, say on
//! `/healthz` that another writer is at work, slow its repairs to one per sync period instead of flapping
//! with the other writer, keep traffic flowing, and settle once the other writer stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use svcproxy_testkit::wait_until;

use super::harness::{WAIT, failures, measure, metric, poll_for, shorten, traffic_summary};
use super::report::Case;
use super::web::WebNode;

/// The second writer's rule only sets the masquerade mark, so traffic works with or without it: any failed
/// request is svcproxy's doing, not the other writer's.
pub const WRITER_COMMENT: &str = "written by another proxy";
/// The cases' `--sync-period`: short enough that "one repair per sync period" shows as several in the
/// counting window, and long enough to tell apart from one repair per read-back (every second).
pub const SYNC_PERIOD_S: u64 = 5;
/// How long the node may take to settle once the second writer has stopped: several sync periods.
const SETTLE: Duration = Duration::from_secs(30);

/// Puts its rule back once a second, and counts how often it found the rule gone, which is how often a
/// repair really reached the kernel.
pub struct SecondWriter {
    stop: Arc<AtomicBool>,
    reinserted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl SecondWriter {
    /// `put_back` puts the rule back if it is gone, and says whether it had to.
    pub fn start(put_back: impl Fn() -> bool + Send + 'static) -> SecondWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let reinserted = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::spawn({
            let (stop, reinserted) = (Arc::clone(&stop), Arc::clone(&reinserted));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if put_back() {
                        reinserted.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        });
        SecondWriter {
            stop,
            reinserted,
            thread: Some(thread),
        }
    }

    fn reinserted(&self) -> usize {
        self.reinserted.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SecondWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What differs between the backends' cases.
pub struct Fight<'a> {
    /// How long repairs are counted once svcproxy has recognised the other writer.
    pub window: Duration,
    /// Whether a `/healthz` reason names the other writer.
    pub reported: &'a dyn Fn(&str) -> bool,
    /// What of our rules differs from what they were before the fight: empty once repaired.
    pub difference: &'a dyn Fn(&WebNode) -> Vec<String>,
}

fn divergences(s: &WebNode) -> usize {
    s.proxy
        .log()
        .matches("kernel diverges from what was written")
        .count()
}

/// Syncs that rewrite everything we own: the repairs.
fn full_syncs(metrics: &str) -> f64 {
    metric(metrics, "svcproxy_syncs_total", &[("kind", "full")])
        + metric(metrics, "svcproxy_syncs_total", &[("kind", "rebuild")])
}

/// Starts the other writer with `start`, runs the fight and the settling after it, records both in `case`,
/// and gives back the `/healthz` reason that named the other writer and every expectation the node missed
/// (all of them together: they tend to share a cause).
pub fn fight_and_settle(
    case: &mut Case,
    s: &mut WebNode,
    start: impl FnOnce() -> SecondWriter,
    fight: Fight<'_>,
) -> (String, Vec<String>) {
    let divergences_before = divergences(s);
    case.stage("second writer running");
    case.injected();
    let mut writer = start();
    let (detected_at, ()) = measure(case.origin(), "the divergence is logged", WAIT, || {
        s.proxy.assert_running();
        (divergences(s) > divergences_before).then_some(())
    });
    case.detected(detected_at);
    case.stage("waiting for the second writer to be reported");
    let reported = wait_until(
        WAIT,
        Duration::from_millis(50),
        "healthz names another writer",
        || {
            s.health
                .points()
                .into_iter()
                .find(|p| p.reason.as_deref().is_some_and(fight.reported))
        },
    );
    let reason = reported.reason.unwrap_or_default();
    case.note(format!(
        "second writer reported after {:.1}s: {}",
        (reported.at - case.injected_at()).as_secs_f64(),
        shorten(&reason, 220)
    ));

    // Count repairs over a fixed window once the fight is recognised: unthrottled, there would be one per
    // read-back (every second); throttled, one per sync period.
    case.stage("counting repairs while the writer keeps going");
    let m0 = s.metrics();
    let writes0 = writer.reinserted();
    let window_start = case.now();
    std::thread::sleep(fight.window);
    let m1 = s.metrics();
    let repairs = full_syncs(&m1) - full_syncs(&m0);
    let verified = metric(&m1, "svcproxy_repairs_total", &[]) - metric(&m0, "svcproxy_repairs_total", &[]);
    let undone = writer.reinserted() - writes0;
    let flips = s
        .health
        .points()
        .iter()
        .filter(|p| p.at >= window_start && p.status == 200)
        .count();
    let window = fight.window.as_secs();
    case.note(format!(
        "in {window}s of fighting: {repairs} full syncs, the writer's rule removed {undone} times, \
         {verified} repairs counted as verified, healthz back to 200 {flips} times"
    ));

    case.stage("second writer stopped; waiting to settle");
    writer.stop();
    let stopped = case.now();
    // One sync period plus a read-back is what a repair takes once nobody fights it.
    let settled = poll_for(SETTLE, || {
        let ok = (fight.difference)(s).is_empty()
            && s.health
                .current()
                .is_some_and(|p| p.status == 200 && p.reason.is_none());
        ok.then_some(())
    });
    if settled.is_some() {
        case.repaired(case.now());
        case.note(format!(
            "settled {:.1}s after the writer stopped",
            (case.now() - stopped).as_secs_f64()
        ));
    }
    let samples = s.traffic.since(case.injected_at());
    case.note(format!("traffic: {}", traffic_summary(&samples)));
    case.health(s.health.summary());

    let bound = window as f64 / SYNC_PERIOD_S as f64 + 2.0;
    let mut problems = Vec::new();
    if repairs > bound {
        problems.push(format!(
            "repairs must slow to one per sync period while another writer fights: {repairs} full syncs in \
             {window}s (at most {bound})"
        ));
    }
    if repairs < 1.0 || undone == 0 {
        problems.push(format!(
            "repairs must slow down, not stop: {repairs} full syncs and {undone} removals of the foreign rule in \
             {window}s with --sync-period {SYNC_PERIOD_S}s"
        ));
    }
    if verified > repairs {
        problems.push(format!(
            "{verified} repairs counted as verified (svcproxy_repairs_total) but only {repairs} syncs rewrote \
             anything, while the foreign rule stayed: a read-back that did not look at the chain cleared the \
             divergence (healthz went back to 200 {flips} times)"
        ));
    }
    if failures(&samples) > 0 {
        problems.push(format!(
            "traffic must keep flowing: {}",
            traffic_summary(&samples)
        ));
    }
    if settled.is_none() {
        problems.push(format!(
            "{}s after the writer stopped, our rules still differ from what was written ({:?}) or healthz is \
             not 200",
            SETTLE.as_secs(),
            (fight.difference)(s)
        ));
    }
    (reason, problems)
}
