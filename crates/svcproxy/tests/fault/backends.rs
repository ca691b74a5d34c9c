//! KUBE-* chains in both iptables backends on one node: what a proxy image whose iptables picked the other
//! backend than kubelet's leaves behind. Packets traverse both, so the rules in the backend svcproxy does
//! not write would keep steering traffic where it can neither see nor repair them. svcproxy must refuse to
//! start, naming both backends and the fix, and write nothing; and when such chains appear while it runs, turn
//! `/healthz` red with the same words until they are gone.

use std::time::Duration;

use svcproxy_testkit::Lab;

use super::harness::{dump_diff, failures, require_tool, save_with, traffic_summary};
use super::report::Case;
use super::web::{WebNode, web_manifest};
use crate::common::{Svcproxy, TempDir};

#[test]
fn e_kube_chains_in_both_legacy_and_nft() {
    let mut case = Case::new("E legacy + nft KUBE-* chains");
    for tool in [
        "iptables-legacy-restore",
        "iptables-legacy-save",
        "iptables-nft-restore",
        "iptables-nft-save",
    ] {
        require_tool(tool);
    }
    let lab = Lab::new();
    let node = lab.node();
    // Leftovers of an old kube-proxy in the legacy backend, and a current one's chains in nf_tables.
    super::harness::restore(
        node,
        "iptables-legacy-restore",
        &["--noflush"],
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]\n\
         -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y\nCOMMIT\n",
    );
    super::harness::restore(
        node,
        "iptables-nft-restore",
        &["--noflush"],
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\nCOMMIT\n",
    );
    let before = [
        save_with(node, "iptables-legacy-save", "nat"),
        save_with(node, "iptables-nft-save", "nat"),
        save_with(node, "iptables-legacy-save", "filter"),
        save_with(node, "iptables-nft-save", "filter"),
    ];
    let dir = TempDir::new("e");
    dir.write("web.yaml", &web_manifest(&["10.244.0.11"]));

    case.stage("starting svcproxy on a node with both backends in use");
    case.injected();
    let mut proxy = Svcproxy::start(node, &["--manifests", dir.path().to_str().unwrap()]);
    let status = proxy.wait_exit(Duration::from_secs(30));
    case.detected(case.now());
    let log = proxy.log();
    let status =
        status.unwrap_or_else(|| panic!("svcproxy kept running on a mixed-backend node; log:\n{log}"));
    case.note(format!("refused at start with {status}"));
    assert!(
        !status.success(),
        "refusal must be a failing exit status, got {status}"
    );
    for needle in ["legacy", "nf_tables", "svcproxy cleanup"] {
        assert!(
            log.contains(needle),
            "the refusal names both backends and the fix ({needle:?} missing):\n{log}"
        );
    }
    let after = [
        save_with(node, "iptables-legacy-save", "nat"),
        save_with(node, "iptables-nft-save", "nat"),
        save_with(node, "iptables-legacy-save", "filter"),
        save_with(node, "iptables-nft-save", "filter"),
    ];
    for (b, a) in before.iter().zip(&after) {
        let diff = dump_diff(b, a);
        assert!(
            diff.is_empty(),
            "svcproxy changed a backend before refusing: {diff:?}"
        );
    }
    case.note(format!(
        "message: {}",
        super::harness::shorten(log.lines().find(|l| l.contains("legacy")).unwrap_or(""), 160)
    ));
}

#[test]
fn e2_kube_chains_appear_in_the_legacy_backend_at_run_time() {
    let mut case = Case::new("E2 legacy KUBE-* chains appear at run time");
    for tool in ["iptables-legacy-restore", "iptables-legacy"] {
        require_tool(tool);
    }
    let s = WebNode::start(&case, &["--verify-period", "1s"], &[]);

    case.stage("an old kube-proxy of the legacy backend writes its chains");
    case.injected();
    super::harness::restore(
        s.cluster.node(),
        "iptables-legacy-restore",
        &["--noflush"],
        "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n",
    );
    let red = s.health.wait_for("healthz names the other backend", WAIT, |p| {
        p.status == 503
            && p.reason
                .as_deref()
                .is_some_and(|r| r.contains("legacy") && r.contains("svcproxy cleanup"))
    });
    case.detected(red.at);

    case.stage("the legacy chains removed");
    for args in [
        ["-t", "nat", "-D", "PREROUTING", "-j", "KUBE-SERVICES"].as_slice(),
        &["-t", "nat", "-X", "KUBE-SERVICES"],
    ] {
        let mut argv = vec!["iptables-legacy"];
        argv.extend(args);
        s.cluster.node().exec_stdout(&argv).expect("iptables-legacy");
    }
    let green = s.health.wait_for("healthz is 200 again", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    case.repaired(green.at);
    case.health(s.health.summary());
    let samples = s.traffic.next(10);
    assert_eq!(failures(&samples), 0, "{}", traffic_summary(&samples));
}

const WAIT: Duration = Duration::from_secs(30);

/// E3: an nftables kube-proxy appears next to our iptables rules while running (its `ip kube-proxy` table):
/// `/healthz` is red, naming the table and the fix, until it is gone.
#[test]
fn e3_a_kube_proxy_nftables_table_appears_at_run_time() {
    let mut case = Case::new("E3 nftables kube-proxy table appears at run time");
    let s = WebNode::start(&case, &["--verify-period", "1s"], &[]);
    let nft = |args: &[&str]| {
        let mut argv = vec!["nft"];
        argv.extend(args);
        s.cluster.node().exec_stdout(&argv).expect("nft");
    };

    case.stage("a kube-proxy in nftables mode writes its table");
    case.injected();
    nft(&["add", "table", "ip", "kube-proxy"]);
    let red = s.health.wait_for("healthz names the table", WAIT, |p| {
        p.status == 503
            && p.reason
                .as_deref()
                .is_some_and(|r| r.contains("ip kube-proxy") && r.contains("nft delete table"))
    });
    case.detected(red.at);
    // Liveness stays green: restarting svcproxy cannot remove another proxy's table, and a liveness probe
    // that failed here would restart it every minute for as long as that proxy runs.
    let (live, body) = svcproxy_testkit::http_get(
        s.cluster.node(),
        "127.0.0.1:10256".parse().unwrap(),
        "/livez",
        Duration::from_secs(2),
    )
    .expect("/livez answers");
    assert_eq!(live, 200, "{body}");

    case.stage("the table deleted");
    nft(&["delete", "table", "ip", "kube-proxy"]);
    let green = s.health.wait_for("healthz is 200 again", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    case.repaired(green.at);
    case.health(s.health.summary());
    let samples = s.traffic.next(10);
    assert_eq!(failures(&samples), 0, "{}", traffic_summary(&samples));
}
