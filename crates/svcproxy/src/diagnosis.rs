//! What explains a packet's fate beyond the rules it meets: the running daemon's own account (failing syncs,
//! a repair under way, a second writer), the node's upgrade and rollback hazards, and a short diagnosis that
//! puts them together with the trace.
//!
//! The rules alone can say that the kernel sends a packet to an endpoint the cluster no longer has; only the
//! daemon can say that this is because its last four transactions were refused and why. A person reading
//! `svcproxy explain` should not have to know that `svcproxy status` and `svcproxy audit` exist.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::audit::{self, HazardView};
use crate::exec::runner::Runner;
use crate::explain::ExplainReport;
use crate::status::{self, DaemonError, SourceProblem, StatusReport};

/// How long explain waits for a daemon that may not be running: on this node it answers in milliseconds.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The daemon's account of itself, as its status endpoint gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonView {
    /// Where it was asked (`http://127.0.0.1:10249`), or `the daemon itself` when it answers explain.
    pub at: String,
    /// Why it did not answer; the fields below are then empty.
    pub unreachable: Option<String>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// When its last sync succeeded (RFC 3339).
    pub last_sync: Option<String>,
    /// Why its `/healthz` fails, when it does.
    pub problem: Option<String>,
    /// Service ports whose rules read-back found changed from what was written, not yet repaired.
    pub unverified: Vec<String>,
    /// While it cannot read the cluster (the API server unreachable): since when, and the latest error.
    #[serde(default)]
    pub source_problem: Option<SourceProblem>,
}

impl DaemonView {
    pub fn of(at: &str, s: &StatusReport) -> DaemonView {
        DaemonView {
            at: at.to_string(),
            unreachable: None,
            consecutive_failures: s.consecutive_failures,
            last_error: s.last_error.clone(),
            last_sync: s.last_sync.clone(),
            problem: s.problem.clone(),
            unverified: s
                .service_ports
                .iter()
                .filter(|p| !p.verified)
                .map(|p| p.name.clone())
                .collect(),
            source_problem: s.source_problem.clone(),
        }
    }

    /// Asks the daemon listening at `metrics` (its `--metrics-bind-address`) on this node.
    pub fn ask(metrics: SocketAddr) -> DaemonView {
        // A daemon bound to every address is reached on loopback.
        let host = if metrics.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), metrics.port())
        } else {
            metrics
        };
        let at = format!("http://{host}");
        match status::fetch(&at, ASK_TIMEOUT) {
            Ok(s) => DaemonView::of(&at, &s),
            Err(e) => DaemonView {
                at,
                unreachable: Some(match e {
                    DaemonError::Connect { source, .. } => source.to_string(),
                    e => e.to_string(),
                }),
                consecutive_failures: 0,
                last_error: None,
                last_sync: None,
                problem: None,
                unverified: Vec::new(),
                source_problem: None,
            },
        }
    }
}

/// The hazards `svcproxy audit` finds on this node, or why the node could not be audited.
pub fn node_hazards(runner: &dyn Runner) -> Result<Vec<HazardView>, String> {
    let (node, read, skipped) = audit::read_node(runner).map_err(|e| e.to_string())?;
    Ok(audit::report(&node, read, skipped).hazards)
}

fn plural(n: u32, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Puts the trace, the daemon's account and the hazards together, most decisive first. Each sentence stands
/// alone: it says what is wrong and what to do.
pub fn diagnose(r: &ExplainReport) -> Vec<String> {
    let mut out = Vec::new();
    let kernel_differs = !r.differing_chains.is_empty() || !r.missing_jumps.is_empty();
    let disagree = r.agree == Some(false);
    let mut daemon_healthy = false;
    if let Some(d) = &r.daemon {
        if let Some(why) = &d.unreachable {
            out.push(format!(
                "svcproxy does not answer at {} ({why}). While it is not running, nothing programs changes in the \
                 cluster or repairs the kernel: start it (or give explain its --metrics-bind-address).",
                d.at
            ));
        } else if d.consecutive_failures > 0 {
            out.push(format!(
                "svcproxy's last {} FAILED, so nothing that changed in the cluster since its last successful sync \
                 ({}) is in the kernel. The kernel's answer: {}",
                plural(d.consecutive_failures, "sync", "syncs"),
                d.last_sync.as_deref().unwrap_or("never"),
                d.last_error.as_deref().unwrap_or("(no error recorded)")
            ));
        } else if let Some(p) = &d.problem {
            out.push(format!("svcproxy reports this node unhealthy: {p}"));
        } else {
            daemon_healthy = true;
        }
        if let Some(SourceProblem { since, error }) = &d.source_problem {
            out.push(format!(
                "svcproxy cannot read the cluster (since {since}: {error}): the kernel keeps the state it last \
                 knew, and nothing changed in the cluster since then is programmed. Endpoints that went away in \
                 the meantime still receive connections."
            ));
        }
        if d.unreachable.is_none() && !d.unverified.is_empty() {
            out.push(format!(
                "svcproxy found the kernel's rules for {} changed from what it wrote; a full sync rewrites them.",
                d.unverified.join(", ")
            ));
        }
    }
    if let Some(why) = &r.intent_unavailable {
        out.push(format!(
            "What the cluster wants could not be read ({why}): only the kernel's answer is shown, nothing says \
             whether it is right."
        ));
    }
    if r.nft_table.is_some() && r.kernel.steps.is_empty() && r.kernel.error.is_none() && disagree {
        out.push(
            "svcproxy's nftables table is missing or empty: no Service address is translated on this node."
                .into(),
        );
    } else if disagree && kernel_differs {
        let cause = if daemon_healthy {
            "changed after svcproxy wrote them (it repairs them at its next read-back, within --verify-period; \
             if they come back, another program on this node writes them)"
        } else {
            "changed after svcproxy wrote them, or never written"
        };
        out.push(format!(
            "The kernel's rules on this packet's path differ from what svcproxy renders ({cause}); the first \
             difference and the chains are listed above."
        ));
    } else if disagree {
        out.push(
            "The rules svcproxy owns on the path are as it renders them, yet the outcome differs: look at the \
             kernel's steps outside svcproxy's chains, or give explain the daemon's flags."
                .into(),
        );
    } else if r.agree == Some(true) && matches!(r.kernel.verdict.as_str(), "drop" | "reject") {
        let at = r
            .kernel
            .steps
            .last()
            .map(|s| format!(" The rule that decides: {}  {}", s.chain, s.rule))
            .unwrap_or_default();
        out.push(format!(
            "The kernel {} this packet, and so would svcproxy's rendering of the cluster's configuration: the \
             fix is in the Service (its endpoints, traffic policies or source ranges), not on the node.{at}",
            if r.kernel.verdict == "drop" { "drops" } else { "rejects" }
        ));
    }
    for h in &r.hazards {
        out.push(format!(
            "Hazard ({}) at {}: {} Fix: {}",
            h.kind, h.location, h.why, h.fix
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::{PacketView, PathView};

    fn path(verdict: &str, endpoints: &[&str]) -> PathView {
        PathView {
            steps: Vec::new(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            masquerade: false,
            verdict: verdict.into(),
            error: None,
            alternatives: Vec::new(),
        }
    }

    fn report(agree: bool) -> ExplainReport {
        ExplainReport {
            packet: PacketView {
                origin: "pod".into(),
                source: "10.244.0.50".parse().unwrap(),
                destination: "10.96.0.110".parse().unwrap(),
                port: 80,
                protocol: "TCP".into(),
            },
            from: "10.244.0.50".into(),
            service: None,
            kernel: path("accept", &["10.244.0.21:8080"]),
            intent: Some(path("accept", &["10.244.0.22:8080"])),
            intent_source: Some("the manifests".into()),
            intent_unavailable: None,
            endpoints: Vec::new(),
            agree: Some(agree),
            differences: Vec::new(),
            first_difference: None,
            differing_chains: Vec::new(),
            missing_jumps: vec!["nat/PREROUTING -> KUBE-SERVICES".into()],
            notes: Vec::new(),
            nft_table: None,
            daemon: None,
            hazards: Vec::new(),
            hazards_unavailable: None,
            diagnosis: Vec::new(),
        }
    }

    fn daemon(failures: u32, problem: Option<&str>) -> DaemonView {
        DaemonView {
            at: "http://127.0.0.1:10249".into(),
            unreachable: None,
            consecutive_failures: failures,
            last_error: (failures > 0).then(|| "iptables-restore: line 3 failed".into()),
            last_sync: Some("2026-01-01T00:00:00Z".into()),
            problem: problem.map(Into::into),
            unverified: Vec::new(),
            source_problem: None,
        }
    }

    #[test]
    fn failing_syncs_come_first_and_quote_the_kernel() {
        let mut r = report(false);
        r.daemon = Some(daemon(4, Some("4 consecutive syncs failed")));
        let d = diagnose(&r);
        assert!(d[0].starts_with("svcproxy's last 4 syncs FAILED"), "{d:?}");
        assert!(d[0].ends_with("line 3 failed"), "{d:?}");
        assert!(d[1].contains("or never written"), "{d:?}");
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn a_healthy_daemon_means_the_change_came_from_outside() {
        let mut r = report(false);
        r.daemon = Some(daemon(0, None));
        let d = diagnose(&r);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("another program on this node writes them"), "{d:?}");
    }

    #[test]
    fn an_absent_daemon_is_said_first() {
        let mut r = report(false);
        r.daemon = Some(DaemonView {
            unreachable: Some("Connection refused".into()),
            ..daemon(0, None)
        });
        let d = diagnose(&r);
        assert!(
            d[0].contains("does not answer at http://127.0.0.1:10249 (Connection refused)"),
            "{d:?}"
        );
    }

    #[test]
    fn an_unreadable_cluster_is_said_with_its_start() {
        let mut r = report(true);
        r.missing_jumps.clear();
        r.daemon = Some(DaemonView {
            source_problem: Some(SourceProblem {
                since: "2026-01-01T00:00:00Z".into(),
                error: "connection refused".into(),
            }),
            ..daemon(0, None)
        });
        let d = diagnose(&r);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].starts_with(
                "svcproxy cannot read the cluster (since 2026-01-01T00:00:00Z: connection refused)"
            ),
            "{d:?}"
        );
        assert!(!d[0].contains("  "), "one sentence, evenly spaced: {d:?}");
    }

    #[test]
    fn an_agreed_drop_points_at_the_service() {
        let mut r = report(true);
        r.kernel = path("drop", &[]);
        r.missing_jumps.clear();
        r.daemon = Some(daemon(0, None));
        let d = diagnose(&r);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("The kernel drops this packet"), "{d:?}");
        assert!(!d[0].contains("  "), "one sentence, evenly spaced: {d:?}");
    }

    #[test]
    fn hazards_are_listed_with_their_fix() {
        let mut r = report(true);
        r.hazards.push(HazardView {
            kind: "orphan_reference".into(),
            location: "nf_tables IPv4 nat/KUBE-XLB-X".into(),
            rule: None,
            why: "It jumps to ours.".into(),
            fix: "iptables -t nat -X KUBE-XLB-X".into(),
            commands: Vec::new(),
        });
        let d = diagnose(&r);
        assert_eq!(
            d,
            [
                "Hazard (orphan_reference) at nf_tables IPv4 nat/KUBE-XLB-X: It jumps to ours. Fix: iptables -t nat -X KUBE-XLB-X"
            ]
        );
    }
}
