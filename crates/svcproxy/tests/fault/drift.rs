//! Someone else changes our rules while svcproxy runs: a second writer that keeps rewriting one of our chains
//! (two proxies on one node, a configuration manager), and one-off edits — a flushed nat table, a deleted
//! KUBE-SVC chain, a rule inserted into one of ours. Read-back must notice, repair, and say what happened.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use svcproxy_testkit::wait_until;

use super::harness::{
    WAIT, chains, dump_diff, failures, iptables, log_tail, measure, metric, poll_for, save, traffic_summary,
};
use super::report::Case;
use super::web::{WebNode, web_sep_chain, web_svc_chain};
use crate::common::Svcproxy;

fn divergence_lines(proxy: &Svcproxy) -> usize {
    proxy
        .log()
        .matches("kernel diverges from what was written")
        .count()
}

/// Another program that keeps putting its rule back into one of our chains, once a second, as a second
/// proxy or a configuration manager would. Counts how often it found its rule gone, which is how often a
/// repair really reached the kernel.
struct SecondWriter {
    stop: Arc<AtomicBool>,
    reinserted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl SecondWriter {
    fn start(namespace: &str, chain: &str, rule: &[&str]) -> SecondWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let reinserted = Arc::new(AtomicUsize::new(0));
        let namespace = namespace.to_owned();
        let chain = chain.to_owned();
        let rule: Vec<String> = rule.iter().map(|s| s.to_string()).collect();
        let thread = std::thread::spawn({
            let (stop, reinserted) = (Arc::clone(&stop), Arc::clone(&reinserted));
            move || {
                let run = |op: &[&str]| {
                    Command::new("ip")
                        .args(["netns", "exec", &namespace, "iptables", "-w", "-t", "nat"])
                        .args(op)
                        .args(&rule)
                        .output()
                        .is_ok_and(|o| o.status.success())
                };
                while !stop.load(Ordering::Relaxed) {
                    if !run(&["-C", &chain]) && run(&["-I", &chain, "1"]) {
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

/// The second writer's rule only sets the masquerade mark, so traffic works with or without it: any failed
/// request in D is svcproxy's doing, not the other writer's.
const WRITER_COMMENT: &str = "written by another proxy";
/// Repairs are counted over this long once svcproxy has recognised the second writer.
const FIGHT_WINDOW: Duration = Duration::from_secs(20);
/// D's `--sync-period`: short enough that "one repair per sync period" shows as several in the window, and
/// long enough to tell apart from one repair per read-back (every second).
const SYNC_PERIOD_S: u64 = 5;
/// The fast checks (the 2-second flush canary, and the 2-second read-back F3 asks for) must notice an edit
/// well before the default 60-second full read-back would: a longer deadline could pass on the wrong check.
const DETECT: Duration = Duration::from_secs(30);
/// How long the node may take to settle once the second writer has stopped: several sync periods.
const SETTLE: Duration = Duration::from_secs(30);

/// Syncs that rewrite everything we own: the repairs.
fn full_syncs(metrics: &str) -> f64 {
    metric(metrics, "svcproxy_syncs_total", &[("kind", "full")])
        + metric(metrics, "svcproxy_syncs_total", &[("kind", "rebuild")])
}

/// D: a second writer re-inserts a (harmless) rule into our KUBE-SVC chain every second. svcproxy must
/// notice, say on `/healthz` that another writer is at work, slow its repairs to one per sync period instead
/// of flapping with the other writer, keep traffic flowing, and settle once the other writer stops.
#[test]
fn d_second_writer_rewrites_our_chain_every_second() {
    let mut case = Case::new("D second writer, 1/s");
    let period = format!("{SYNC_PERIOD_S}s");
    let mut s = WebNode::start(&case, &["--verify-period", "1s", "--sync-period", &period], &[]);
    let chain = web_svc_chain();
    let nat_before = save(s.cluster.node(), "nat");
    assert!(
        chains(&nat_before).contains_key(chain.as_str()),
        "{chain} missing:\n{nat_before}"
    );
    let divergences_before = divergence_lines(&s.proxy);

    case.stage("second writer running");
    case.injected();
    let mut writer = SecondWriter::start(
        s.cluster.node().name(),
        &chain,
        &[
            "-m",
            "comment",
            "--comment",
            WRITER_COMMENT,
            "-j",
            "KUBE-MARK-MASQ",
        ],
    );
    let (detected_at, ()) = measure(case.origin(), "the divergence is logged", WAIT, || {
        s.proxy.assert_running();
        (divergence_lines(&s.proxy) > divergences_before).then_some(())
    });
    case.detected(detected_at);
    case.stage("waiting for the second writer to be reported");
    let fight = wait_until(
        WAIT,
        Duration::from_millis(50),
        "healthz names another writer",
        || {
            s.health.points().into_iter().find(|p| {
                p.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("writing KUBE-* chains"))
            })
        },
    );
    case.note(format!(
        "second writer reported after {:.1}s",
        (fight.at - case.injected_at()).as_secs_f64()
    ));

    // Count repairs over a fixed window once the fight is recognised: unthrottled, there would be one per
    // read-back (every second); throttled, one per sync period.
    case.stage("counting repairs while the writer keeps going");
    let m0 = s.proxy.metrics(s.cluster.node());
    let writes0 = writer.reinserted();
    let window_start = case.now();
    std::thread::sleep(FIGHT_WINDOW);
    let m1 = s.proxy.metrics(s.cluster.node());
    let repairs = full_syncs(&m1) - full_syncs(&m0);
    let verified = metric(&m1, "svcproxy_repairs_total", &[]) - metric(&m0, "svcproxy_repairs_total", &[]);
    let undone = writer.reinserted() - writes0;
    let flips = s
        .health
        .points()
        .iter()
        .filter(|p| p.at >= window_start && p.status == 200)
        .count();
    case.note(format!(
        "in {}s of fighting: {repairs} full syncs, the writer's rule removed {undone} times, \
         {verified} repairs counted as verified, healthz back to 200 {flips} times",
        FIGHT_WINDOW.as_secs()
    ));

    case.stage("second writer stopped; waiting to settle");
    writer.stop();
    let stopped = case.now();
    // One sync period plus a read-back is what a repair takes once nobody fights it.
    let settled = poll_for(SETTLE, || {
        let nat = save(s.cluster.node(), "nat");
        let ok = !nat.contains(WRITER_COMMENT)
            && dump_diff(&nat_before, &nat).is_empty()
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

    // Every expectation is checked and all violations reported together: they tend to share a cause.
    let window = FIGHT_WINDOW.as_secs();
    let bound = window as f64 / SYNC_PERIOD_S as f64 + 2.0;
    let mut problems = Vec::new();
    if repairs > bound {
        problems.push(format!(
            "repairs must slow to one per sync period while another writer fights: {repairs} full syncs in {window}s \
             (at most {bound})"
        ));
    }
    if repairs < 1.0 || undone == 0 {
        problems.push(format!(
            "repairs must slow down, not stop: {repairs} full syncs and {undone} removals of the foreign rule in \
             {window}s with --sync-period {period}"
        ));
    }
    if verified > repairs {
        problems.push(format!(
            "{verified} repairs counted as verified (svcproxy_repairs_total) but only {repairs} syncs rewrote \
             anything, while the foreign rule stayed in {chain}: a read-back that did not look at the chain cleared \
             the divergence (healthz went back to 200 {flips} times)"
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
            "{}s after the writer stopped, our chain still differs from what was written ({:?}) or healthz is not 200",
            SETTLE.as_secs(),
            dump_diff(&nat_before, &save(s.cluster.node(), "nat"))
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\nlast log lines:\n{}",
        problems.join("\n"),
        log_tail(&s.proxy.log(), 12)
    );
    s.proxy.assert_running();
}

/// The common shape of the one-off edits (F): snapshot the kernel, break it, then time detection (a
/// divergence logged) and repair (both tables exactly as before, traffic answered by both pods, health 200
/// without a reason).
fn one_off_edit(name: &'static str, args: &[&str], break_it: impl FnOnce(&WebNode)) {
    let mut case = Case::new(name);
    let mut s = WebNode::start(&case, args, &[]);
    let (nat_before, filter_before) = (save(s.cluster.node(), "nat"), save(s.cluster.node(), "filter"));
    let divergences_before = divergence_lines(&s.proxy);
    let metrics_before = s.proxy.metrics(s.cluster.node());

    case.stage("editing the kernel behind svcproxy's back");
    case.injected();
    break_it(&s);
    let (detected_at, ()) = measure(case.origin(), "the divergence is logged", DETECT, || {
        (divergence_lines(&s.proxy) > divergences_before).then_some(())
    });
    case.detected(detected_at);
    case.stage("waiting for the repair");
    let (repaired_at, ()) = measure(
        case.origin(),
        "both tables are as svcproxy wrote them",
        WAIT,
        || {
            let same = dump_diff(&nat_before, &save(s.cluster.node(), "nat")).is_empty()
                && dump_diff(&filter_before, &save(s.cluster.node(), "filter")).is_empty();
            same.then_some(())
        },
    );
    case.repaired(repaired_at);
    s.wait_traffic(&["pod11", "pod12"]);
    s.health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    let metrics = s.proxy.metrics(s.cluster.node());
    let counted = |name: &str| metric(&metrics, name, &[]) - metric(&metrics_before, name, &[]);
    let (divergences, repairs) = (
        counted("svcproxy_divergences_total"),
        counted("svcproxy_repairs_total"),
    );
    case.note(format!(
        "divergences counted {divergences}, repairs counted {repairs}"
    ));
    case.note(format!(
        "traffic after injection: {}",
        traffic_summary(&s.traffic.since(case.injected_at()))
    ));
    case.health(s.health.summary());
    assert!(
        divergences >= 1.0,
        "the divergence is counted in svcproxy_divergences_total"
    );
    assert!(repairs >= 1.0, "the repair is counted in svcproxy_repairs_total");
    let log = s.proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("kernel diverges from what was written"))
        .unwrap();
    assert!(line.contains("nat/"), "the log names the table and chain: {line}");
}

/// F1: `iptables -t nat -F` and `-X`: every chain of ours and the jumps into them gone at once. The flush
/// canary (a 2-second listing of KUBE-SERVICES) catches it with default flags.
#[test]
fn f1_nat_table_flushed() {
    one_off_edit("F1 nat flushed and chains deleted", &[], |s| {
        iptables(s.cluster.node(), &["-t", "nat", "-F"]);
        iptables(s.cluster.node(), &["-t", "nat", "-X"]);
    });
}

/// F2: one Service's KUBE-SVC chain deleted the careful way (flushed, every jump to it removed, then `-X`),
/// with default flags: the missing jump shows in KUBE-SERVICES.
#[test]
fn f2_one_service_chain_deleted() {
    one_off_edit("F2 one KUBE-SVC chain deleted", &[], |s| {
        let node = s.cluster.node();
        let chain = web_svc_chain();
        iptables(node, &["-t", "nat", "-F", &chain]);
        for (from, rules) in chains(&save(node, "nat")) {
            let jumps: Vec<usize> = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.ends_with(&format!("-j {chain}")))
                .map(|(i, _)| i + 1)
                .collect();
            // Highest number first, so the numbers of the rest stay valid.
            for n in jumps.into_iter().rev() {
                iptables(node, &["-t", "nat", "-D", &from, &n.to_string()]);
            }
        }
        iptables(node, &["-t", "nat", "-X", &chain]);
    });
}

/// F3: a rule inserted at the top of our KUBE-SVC chain that sends every connection to one endpoint. Only a
/// full read-back sees inside per-service chains, so this runs with `--verify-period 2s`.
#[test]
fn f3_rule_inserted_into_our_chain() {
    one_off_edit(
        "F3 rule inserted into KUBE-SVC",
        &["--verify-period", "2s"],
        |s| {
            let sep = web_sep_chain("10.244.0.11");
            iptables(
                s.cluster.node(),
                &["-t", "nat", "-I", &web_svc_chain(), "1", "-j", &sep],
            );
        },
    );
}
