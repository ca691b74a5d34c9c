//! Someone else changes our rules while svcproxy runs: a second writer that keeps rewriting one of our chains
//! (two proxies on one node, a configuration manager), and one-off edits — a flushed nat table, a deleted
//! KUBE-SVC chain, a rule inserted into one of ours. Read-back must notice, repair, and say what happened.

use std::process::Command;
use std::time::Duration;

use super::harness::{WAIT, chains, dump_diff, iptables, log_tail, measure, metric, save, traffic_summary};
use super::report::Case;
use super::second_writer::{Fight, SYNC_PERIOD_S, SecondWriter, WRITER_COMMENT, fight_and_settle};
use super::web::{WebNode, web_sep_chain, web_svc_chain};
use crate::common::Svcproxy;

fn divergence_lines(proxy: &Svcproxy) -> usize {
    proxy
        .log()
        .matches("kernel diverges from what was written")
        .count()
}

/// Repairs are counted over this long once svcproxy has recognised the second writer.
const FIGHT_WINDOW: Duration = Duration::from_secs(20);
/// The fast checks (the 2-second flush canary, and the 2-second read-back F3 asks for) must notice an edit
/// well before the default 60-second full read-back would: a longer deadline could pass on the wrong check.
const DETECT: Duration = Duration::from_secs(30);

/// D: a second writer re-inserts a (harmless) rule into our KUBE-SVC chain every second (see
/// [`fight_and_settle`] for what svcproxy must do).
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
    let namespace = s.cluster.node().name().to_owned();
    let put_back = {
        let chain = chain.clone();
        move || {
            let rule = [
                "-m",
                "comment",
                "--comment",
                WRITER_COMMENT,
                "-j",
                "KUBE-MARK-MASQ",
            ];
            let run = |op: &[&str]| {
                Command::new("ip")
                    .args(["netns", "exec", &namespace, "iptables", "-w", "-t", "nat"])
                    .args(op)
                    .args(rule)
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            !run(&["-C", &chain]) && run(&["-I", &chain, "1"])
        }
    };
    let difference = |s: &WebNode| {
        let nat = save(s.cluster.node(), "nat");
        let mut diff = dump_diff(&nat_before, &nat);
        if nat.contains(WRITER_COMMENT) {
            diff.push(format!("the other writer's rule is still in {chain}"));
        }
        diff
    };
    let (_, problems) = fight_and_settle(
        &mut case,
        &mut s,
        || SecondWriter::start(put_back),
        Fight {
            window: FIGHT_WINDOW,
            reported: &|reason| reason.contains("writing KUBE-* chains"),
            difference: &difference,
        },
    );
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
