//! `iptables-restore` refusing transactions: failing a few times mid-way with legacy iptables' unhelpful
//! `line N failed`, the xtables lock held by someone else, and a kernel without a match module. svcproxy must
//! climb its escalation ladder, classify and quote the failure, turn `/healthz` red with the reason while the
//! node is not programmed, and come back by itself once the cause is gone.

use std::fs::File;
use std::time::Duration;

use svcproxy_testkit::{tcp_request, wait_until};

use super::harness::{
    POLL, WAIT, Wrappers, addr, failures, identities, log_tail, metric, poll_for, real_binary, require_tool,
    save, save_with, traffic_summary,
};
use super::manifests::{HTTP, service};
use super::report::Case;
use super::web::{WebNode, names, web_manifest};
use super::write_failures::writes_refused_then_recovered;

/// G: the real binary behind a wrapper that fails while a counter file holds a positive number, saving each
/// payload it refuses, with legacy iptables' message, which names a line and nothing else.
fn failing_restore(wrappers: &Wrappers) {
    let dir = wrappers.path().display().to_string();
    let real = real_binary("iptables-nft-restore").display().to_string();
    wrappers.script(
        "iptables-nft-restore",
        &format!(
            r#"n=$(cat "{dir}/fail-count" 2>/dev/null || echo 0)
if [ "$n" -gt 0 ]; then
  echo $((n - 1)) > "{dir}/fail-count"
  cat > "{dir}/refused-$n"
  echo "iptables-restore: line 3 failed" >&2
  exit 1
fi
exec "{real}" "$@"
"#
        ),
    );
}

const FAILURES: u32 = 4;
const UNHEALTHY_AFTER: &str = "3";

/// G: four restores in a row fail (`iptables-restore: line 3 failed`) right after an endpoint change; then
/// the real binary takes over again.
#[test]
fn g_restore_fails_mid_way_then_recovers() {
    let mut case = Case::new("G restore fails 4x");
    let wrappers = Wrappers::new();
    failing_restore(&wrappers);
    let path = wrappers.path_env();
    let mut s = WebNode::start(
        &case,
        &["--sync-period", "2s", "--unhealthy-after", UNHEALTHY_AFTER],
        &[("PATH", &path)],
    );
    let delta = writes_refused_then_recovered(&mut case, &mut s, &wrappers, FAILURES, "line 3 failed");
    assert_eq!(
        delta.of("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", &[]),
        f64::from(FAILURES),
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
    );
    // The log quotes the line the message points at, from the payload refused.
    let log = s.proxy.log();
    let refused = std::fs::read_to_string(wrappers.path().join(format!("refused-{FAILURES}"))).unwrap();
    let line3 = refused.lines().nth(2).expect("the refused payload has a line 3");
    assert!(
        log.contains(&format!("3: {line3}")),
        "the log quotes payload line 3 ({line3:?}):\n{log}"
    );
}

/// H: the xtables lock held by another program while an endpoint change is pending. Only legacy iptables
/// takes that lock (the nf_tables backend relies on kernel transactions), so svcproxy runs with
/// `--iptables-backend legacy`, and with `XTABLES_LOCKFILE` pointing at a lock file of this case's own, so
/// other programs on the machine are never blocked.
#[test]
fn h_xtables_lock_held() {
    let mut case = Case::new("H xtables lock held");
    for tool in [
        "iptables-legacy",
        "iptables-legacy-save",
        "iptables-legacy-restore",
    ] {
        require_tool(tool);
    }
    // Only a directory for the lock file here: no wrapper is needed.
    let wrappers = Wrappers::new();
    let lock_path = wrappers.path().join("xtables.lock");
    File::create(&lock_path).unwrap();
    let lock_env = lock_path.display().to_string();
    let mut s = WebNode::start(
        &case,
        &[
            "--sync-period",
            "5s",
            "--unhealthy-after",
            UNHEALTHY_AFTER,
            "--iptables-backend",
            "legacy",
        ],
        &[("XTABLES_LOCKFILE", &lock_env)],
    );
    let node = s.cluster.node();
    assert!(
        save_with(node, "iptables-legacy-save", "nat").contains(":KUBE-SERVICES"),
        "svcproxy writes the legacy backend"
    );
    assert!(
        !save_with(node, "iptables-nft-save", "nat").contains("KUBE-"),
        "and nothing in nf_tables"
    );
    let before = s.metrics();

    case.stage("lock held");
    let lock = nix::fcntl::Flock::lock(
        File::open(&lock_path).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .map_err(|(_, e)| e)
    .expect("take the xtables lock");
    case.injected();
    // The holder has had the lock for a moment when the change arrives (longer than the 2-second flush
    // canary's period), as a long-running writer on a busy node would.
    std::thread::sleep(Duration::from_secs(3));
    case.stage("lock held; pod12 removed");
    let changed = case.now();
    s.set_endpoints(&["10.244.0.11"]);
    let failed_on_lock = |s: &WebNode| {
        s.proxy
            .log()
            .lines()
            .any(|l| l.contains("sync failed") && l.contains("lock"))
    };
    // Hold until healthz names the lock (the point is made), or give up after a bound; then two more seconds.
    let red = poll_for(HOLD_AT_MOST, || {
        s.proxy.assert_running();
        s.health
            .current()
            .filter(|p| p.status == 503 && p.reason.as_deref().is_some_and(|r| r.contains("lock")))
    });
    if red.is_some() {
        std::thread::sleep(Duration::from_secs(2));
    }
    let logged = failed_on_lock(&s);
    let during = s.traffic.since(case.injected_at());
    let first_failure = s.health.first_after(changed, |p| p.status == 503).map(|p| p.at);
    if let Some(at) = first_failure {
        case.detected(at);
    }
    drop(lock);
    let released = case.now();
    case.note(format!(
        "lock held {:.1}s",
        (released - case.injected_at()).as_secs_f64()
    ));
    case.stage("lock released");
    let recovered = poll_for(WAIT, || {
        let ok = identities(&s.traffic.next(10)) == names(&["pod11"])
            && s.health
                .current()
                .is_some_and(|p| p.status == 200 && p.reason.is_none());
        ok.then_some(())
    });
    if recovered.is_some() {
        case.repaired(case.now());
        case.note(format!(
            "recovered {:.1}s after release",
            (case.now() - released).as_secs_f64()
        ));
    }
    let after = s.metrics();
    let lock_failures = metric(&after, "svcproxy_sync_failures_total", &[("class", "lock")])
        - metric(&before, "svcproxy_sync_failures_total", &[("class", "lock")]);
    case.note(format!("lock failures counted {lock_failures}"));
    case.health(s.health.summary());

    let threshold: f64 = UNHEALTHY_AFTER.parse().unwrap();
    let mut problems = Vec::new();
    if !logged || lock_failures < threshold {
        problems.push(format!(
            "the pending change must be retried and each attempt classified as a lock failure: {lock_failures} \
             counted in svcproxy_sync_failures_total{{class=\"lock\"}} while the lock was held {:.0}s",
            (released - changed).as_secs_f64()
        ));
    }
    if red.is_none() {
        problems.push(format!(
            "healthz must turn 503 naming the lock after {UNHEALTHY_AFTER} failed attempts: {}",
            s.health.summary()
        ));
    }
    if failures(&during) > 0 {
        problems.push(format!(
            "the old rules keep serving meanwhile: {}",
            traffic_summary(&during)
        ));
    }
    if recovered.is_none() {
        problems.push(format!(
            "after the release the change must be applied and healthz return to 200: {}",
            s.health.summary()
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

/// How long H holds the lock at most while waiting for healthz to name it: three attempts of five seconds
/// each (the wait svcproxy gives the lock) plus margin.
const HOLD_AT_MOST: Duration = Duration::from_secs(35);

/// K: a kernel (or iptables) without the `recent` match, which ClientIP session affinity needs. The wrapper
/// answers any payload using it as iptables-nft 1.8.9 does when the module cannot be loaded. svcproxy must
/// report the node unhealthy with that precise reason instead of looking healthy, keep what is programmed
/// working, and recover once the affinity is gone.
#[test]
fn k_kernel_lacks_the_recent_match() {
    let mut case = Case::new("K missing xt_recent");
    let wrappers = Wrappers::new();
    let real = real_binary("iptables-nft-restore").display().to_string();
    wrappers.script(
        "iptables-nft-restore",
        &format!(
            r#"payload=$(mktemp)
cat > "$payload"
line=$(grep -n -m1 -e '-m recent' "$payload" | cut -d: -f1)
if [ -n "$line" ]; then
  rm -f "$payload"
  printf "iptables-restore v1.8.9 (nf_tables): Couldn't load match \`recent':No such file or directory\n\nError occurred at line: %s\nTry \`iptables-restore -h' or 'iptables-restore --help' for more information.\n" "$line" >&2
  exit 2
fi
"{real}" "$@" < "$payload"
rc=$?
rm -f "$payload"
exit $rc
"#
        ),
    );
    let path = wrappers.path_env();
    let mut s = WebNode::start(&case, &["--sync-period", "5s"], &[("PATH", &path)]);
    let sticky = |affinity: &str| {
        service(
            "demo",
            "sticky",
            "10.96.0.101",
            affinity,
            "",
            &[HTTP],
            &[("10.244.0.11", "node-a"), ("10.244.0.12", "node-a")],
        )
    };

    case.stage("a ClientIP-affinity Service appears");
    case.injected();
    s.dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            web_manifest(&["10.244.0.11", "10.244.0.12"]),
            sticky("  sessionAffinity: ClientIP")
        ),
    );
    let red = s
        .health
        .wait_for("healthz is 503 naming the missing match", WAIT, |p| {
            p.status == 503
                && p.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("missing_extension") && r.contains("recent"))
        });
    case.detected(red.at);
    let sticky_vip = addr("10.96.0.101", 80);
    assert!(
        tcp_request(s.cluster.client.ns(), sticky_vip, Duration::from_secs(1)).is_err(),
        "the refused Service is not programmed"
    );
    let during = s.traffic.next(10);
    let log = s.proxy.log();
    let metrics = s.metrics();

    case.stage("affinity removed");
    let fixed_at = case.now();
    s.dir.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            web_manifest(&["10.244.0.11", "10.244.0.12"]),
            sticky("")
        ),
    );
    wait_until(WAIT, POLL, "the Service is programmed without affinity", || {
        s.proxy.assert_running();
        tcp_request(s.cluster.client.ns(), sticky_vip, Duration::from_secs(1)).ok()
    });
    s.health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    case.repaired(case.now());
    let retries = log.matches("sync failed").count();
    case.note(format!(
        "{retries} failed syncs in {:.1}s while broken",
        (fixed_at - case.injected_at()).as_secs_f64()
    ));
    case.health(s.health.summary());

    assert!(
        metric(
            &metrics,
            "svcproxy_sync_failures_total",
            &[("class", "missing_extension")]
        ) >= 1.0,
        "counted as missing_extension:\n{metrics}"
    );
    let failed = log
        .lines()
        .find(|l| l.contains("sync failed"))
        .unwrap_or_else(|| panic!("no failed sync logged:\n{log}"));
    assert!(
        failed.contains("missing_extension") && failed.contains("recent"),
        "classified, naming the match: {failed}"
    );
    assert!(
        log.contains("-m recent"),
        "the log quotes the payload line using the match:\n{log}"
    );
    assert_eq!(
        failures(&during),
        0,
        "what was programmed keeps working: {}",
        traffic_summary(&during)
    );
    s.proxy.assert_running();
    // Nothing of the refused Service reached the kernel while it was refused; it is there now.
    assert!(save(s.cluster.node(), "nat").contains("demo/sticky"));
}
