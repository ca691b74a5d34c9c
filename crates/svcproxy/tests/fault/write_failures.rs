//! The course both backends' write-failure cases share: the program that writes the rules (behind a wrapper
//! the case installs) refuses a few transactions in a row right after an endpoint change, then works again.
//! svcproxy must climb its escalation ladder to a rebuild that succeeds, keep the old rules serving meanwhile
//! (a refused transaction changes nothing), classify and quote the failure, and turn `/healthz` red with the
//! reason while the node is not programmed.

use super::harness::{WAIT, Wrappers, failures, measure, metric, traffic_summary};
use super::report::Case;
use super::web::WebNode;

/// Metrics before and after a case, for what it changed.
pub struct MetricsDelta {
    before: String,
    after: String,
}

impl MetricsDelta {
    pub fn of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.after, name, labels) - metric(&self.before, name, labels)
    }
}

/// Has the wrapper refuse the next `refusals` writes (it counts them down in `fail-count`), removes pod12
/// and waits until only pod11 answers and `/healthz` is 200 again; then checks what holds whichever program
/// refused: no request failed, every planned refusal happened, each counted as a failure of class `other`,
/// the ladder (the partial sync fails, then a full one, then rebuilds until one succeeds), and the failure
/// logged and reported by `/healthz` classified and quoting `quoted`, the refusing program's own words.
/// Gives back what the metrics changed by, for the checks of one program alone.
pub fn writes_refused_then_recovered(
    case: &mut Case,
    s: &mut WebNode,
    wrappers: &Wrappers,
    refusals: u32,
    quoted: &str,
) -> MetricsDelta {
    let before = s.metrics();
    let failed_lines = |s: &WebNode| s.proxy.log().matches("sync failed").count();

    case.stage("writes refused; pod12 removed");
    std::fs::write(wrappers.path().join("fail-count"), refusals.to_string()).unwrap();
    case.injected();
    s.set_endpoints(&["10.244.0.11"]);
    let (detected_at, ()) = measure(case.origin(), "a failed sync is logged", WAIT, || {
        s.proxy.assert_running();
        (failed_lines(s) > 0).then_some(())
    });
    case.detected(detected_at);
    case.stage("waiting for the ladder to converge");
    s.wait_traffic(&["pod11"]);
    s.health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    case.repaired(case.now());
    let delta = MetricsDelta {
        before,
        after: s.metrics(),
    };
    let ladder: Vec<String> = ["partial", "full", "rebuild"]
        .iter()
        .flat_map(|kind| {
            ["failure", "success"].map(|result| {
                format!(
                    "{kind}/{result}={}",
                    delta.of("svcproxy_syncs_total", &[("kind", kind), ("result", result)])
                )
            })
        })
        .collect();
    case.note(format!("syncs {}", ladder.join(" ")));
    let during = s.traffic.since(case.injected_at());
    case.note(format!("traffic: {}", traffic_summary(&during)));
    case.health(s.health.summary());

    assert_eq!(failures(&during), 0, "{}", traffic_summary(&during));
    let left = std::fs::read_to_string(wrappers.path().join("fail-count")).unwrap();
    assert_eq!(left.trim(), "0", "every planned refusal happened");
    assert_eq!(
        delta.of("svcproxy_sync_failures_total", &[("class", "other")]),
        f64::from(refusals),
        "svcproxy_sync_failures_total{{class=\"other\"}}"
    );
    for (kind, result, want) in [
        ("partial", "failure", 1.0),
        ("full", "failure", 1.0),
        ("rebuild", "failure", f64::from(refusals - 2)),
    ] {
        assert_eq!(
            delta.of("svcproxy_syncs_total", &[("kind", kind), ("result", result)]),
            want,
            "{kind} syncs with {result}: {}",
            ladder.join(" ")
        );
    }
    assert!(
        delta.of(
            "svcproxy_syncs_total",
            &[("kind", "rebuild"), ("result", "success")]
        ) >= 1.0,
        "a rebuild finally succeeds: {}",
        ladder.join(" ")
    );
    let log = s.proxy.log();
    let failed = log
        .lines()
        .find(|l| l.contains("sync failed"))
        .unwrap_or_else(|| panic!("no failed sync logged:\n{log}"));
    assert!(
        failed.contains("(other)") && failed.contains(quoted),
        "classified and with the program's own message ({quoted:?}): {failed}"
    );
    // Unhealthy with the reason once `--unhealthy-after` syncs in a row failed, then healthy again.
    let red = s
        .health
        .first_after(case.injected_at(), |p| p.status == 503 && p.reason.is_some())
        .unwrap_or_else(|| panic!("healthz never reported the failures: {}", s.health.summary()));
    assert!(
        red.reason.as_deref().unwrap().contains(quoted),
        "the reason quotes the failure: {red:?}"
    );
    s.proxy.assert_running();
    delta
}
