//! `svcproxy audit` as an operator runs it: on saved dumps of real kube-proxy nodes (clean), on a dump with
//! hazards injected, and on a live node namespace whose state is split between both iptables backends and an
//! nftables table — where the fixes it prints are run as printed and must leave the node clean.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::TempDir;
use serde_json::Value;
use svcproxy_testkit::NetNs;

const SCENARIOS: [&str; 11] = [
    "all-in-one",
    "clusterip-basic",
    "etp-local",
    "externalips",
    "ignored",
    "itp-local",
    "loadbalancer",
    "no-endpoints",
    "nodeport",
    "terminating",
    "topology",
];

/// Chains of ref-etp/etp-local-lb:http (the `etp-local` scenario) and its local endpoint.
const SEP: &str = "KUBE-SEP-NKCU77EII7YRBULQ";
const EXT: &str = "KUBE-EXT-MT7TXGKFDAJY355P";
const XLB: &str = "KUBE-XLB-MT7TXGKFDAJY355P";

fn reference(version: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../iptables/tests/data")
        .join(format!("upstream-{version}-iptables"))
        .join(format!("{name}.txt"))
}

fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Adds chains and rules to the nat table of a dump, as an older proxy would have left them.
fn inject_nat(text: &str, chains: &[&str], rules: &[String]) -> String {
    let mut out = String::new();
    let mut in_nat = false;
    for line in text.lines() {
        if in_nat && line == "COMMIT" {
            for rule in rules {
                out.push_str(rule);
                out.push('\n');
            }
            in_nat = false;
        }
        out.push_str(line);
        out.push('\n');
        if line == "*nat" {
            in_nat = true;
            for chain in chains {
                out.push_str(&format!(":{chain} - [0:0]\n"));
            }
        }
    }
    out
}

/// The v1.23 leftover of the outage: an eTP=Local chain nothing reaches that still jumps to an endpoint.
fn orphan_xlb(text: &str) -> String {
    inject_nat(
        text,
        &[XLB],
        &[format!(
            "-A {XLB} -m comment --comment \"Balancing rule 0 for ref-etp/etp-local-lb:http\" -j {SEP}"
        )],
    )
}

fn run(mut cmd: Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run svcproxy");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn audit_files(files: &[&PathBuf], json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_svcproxy"));
    cmd.arg("audit");
    for f in files {
        cmd.arg("--file").arg(f);
    }
    if json {
        cmd.args(["--output", "json"]);
    }
    run(cmd)
}

fn audit_in(ns: &NetNs) -> (i32, Value) {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_svcproxy"));
    cmd.args(["audit", "--output", "json"]);
    let (code, out, err) = run(cmd);
    let value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}\nstdout:\n{out}\nstderr:\n{err}"));
    (code, value)
}

fn kinds(report: &Value) -> Vec<(String, String)> {
    report["hazards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["kind"].as_str().unwrap().to_string(),
                h["location"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn every_upstream_reference_dump_is_clean() {
    for version in ["v1.30.3", "v1.31.14"] {
        for name in SCENARIOS {
            let path = reference(version, name);
            let (code, out, err) = audit_files(&[&path], false);
            assert_eq!(code, 0, "{version}/{name}:\n{out}{err}");
            assert!(out.ends_with("No hazards found.\n"), "{version}/{name}:\n{out}");
        }
    }
}

#[test]
fn hazards_in_a_saved_dump_are_found_with_their_fixes() {
    let dir = TempDir::new("audit");
    let base = read(&reference("v1.31.14", "etp-local"));
    let text = inject_nat(
        &orphan_xlb(&base),
        &["KUBE-MARK-DROP"],
        &[
            "-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000".to_string(),
            format!("-A {EXT} -m comment --comment \"ref-etp/etp-local-lb:http firewall\" -j KUBE-MARK-DROP"),
            "-A KUBE-SERVICES -d 10.96.9.9/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ZZZZZZZZZZZZZZZZ"
                .to_string(),
        ],
    );
    dir.write("node.txt", &text);
    let path = dir.path().join("node.txt");
    let (code, out, err) = audit_files(&[&path], false);
    assert_eq!(code, 1, "hazards are exit status 1:\n{out}{err}");
    let stable = out.replace(&path.display().to_string(), "<dump>");
    insta::assert_snapshot!("audit_saved_dump", stable);

    let (code, out, _) = audit_files(&[&path], true);
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["clean"], false);
    assert_eq!(
        kinds(&report),
        [
            (
                "orphan_reference".to_string(),
                format!("nf_tables IPv4 nat/{XLB}")
            ),
            (
                "dangling_jump".to_string(),
                "nf_tables IPv4 nat/KUBE-SERVICES".to_string()
            ),
            ("obsolete_rule".to_string(), format!("nf_tables IPv4 nat/{EXT}")),
        ]
    );
    assert_eq!(
        report["hazards"][0]["commands"],
        serde_json::json!([
            format!("iptables -t nat -F {XLB}"),
            format!("iptables -t nat -X {XLB}")
        ])
    );

    // Two backends' dumps of one node: the split is a hazard of its own.
    let legacy = read(&reference("v1.30.3", "clusterip-basic")).replace("(nf_tables)", "(legacy)");
    dir.write("legacy.txt", &legacy);
    let clean = reference("v1.31.14", "clusterip-basic");
    let (code, out, _) = audit_files(&[&clean, &dir.path().join("legacy.txt")], true);
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        kinds(&report),
        [(
            "split_backends".to_string(),
            "IPv4 legacy and nf_tables".to_string()
        )]
    );
}

/// Runs a command in the namespace, failing loudly.
fn sh(ns: &NetNs, script: &str) {
    ns.exec(&["sh", "-c", script])
        .unwrap_or_else(|e| panic!("`{script}`: {e}"));
}

fn restore(ns: &NetNs, program: &str, text: &str) {
    use std::io::Write;
    let mut child = ns
        .command(program)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_live_node_in_two_backends_and_two_modes() {
    let ns = NetNs::new("audit").expect("a network namespace (needs root)");
    let (code, report) = audit_in(&ns);
    assert_eq!(code, 0, "an empty namespace is clean: {report:#}");

    // kube-proxy v1.30 programmed nf_tables, a v1.23 chain was left behind, an older node image wrote the
    // legacy backend, and someone tried nftables mode.
    restore(
        &ns,
        "iptables-nft-restore",
        &orphan_xlb(&read(&reference("v1.30.3", "etp-local"))),
    );
    restore(
        &ns,
        "iptables-legacy-restore",
        &read(&reference("v1.30.3", "clusterip-basic")),
    );
    sh(&ns, "nft add table ip kube-proxy");

    let (code, report) = audit_in(&ns);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        kinds(&report),
        [
            (
                "orphan_reference".to_string(),
                format!("nf_tables IPv4 nat/{XLB}")
            ),
            (
                "split_backends".to_string(),
                "IPv4 legacy and nf_tables".to_string()
            ),
            (
                "two_modes".to_string(),
                "nftables table ip kube-proxy".to_string()
            ),
        ]
    );
    let read: Vec<&str> = report["read"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        read.contains(&"iptables-nft-save") && read.contains(&"iptables-legacy-save"),
        "{read:?}"
    );

    // The fixes, as printed.
    let orphan = &report["hazards"][0];
    for command in orphan["commands"].as_array().unwrap() {
        sh(&ns, command.as_str().unwrap());
    }
    let two_modes = report["hazards"][2]["fix"].as_str().unwrap();
    assert!(
        two_modes.contains("`nft delete table ip kube-proxy`"),
        "{two_modes}"
    );
    sh(&ns, "nft delete table ip kube-proxy");
    let (code, report) = audit_in(&ns);
    assert_eq!(code, 1);
    assert_eq!(
        kinds(&report),
        [(
            "split_backends".to_string(),
            "IPv4 legacy and nf_tables".to_string()
        )]
    );
    assert!(
        report["hazards"][0]["fix"]
            .as_str()
            .unwrap()
            .contains("svcproxy cleanup")
    );
    let mut cleanup = ns.command(env!("CARGO_BIN_EXE_svcproxy"));
    cleanup.arg("cleanup");
    let (code, out, err) = run(cleanup);
    assert_eq!(code, 0, "{out}{err}");
    let (code, report) = audit_in(&ns);
    assert_eq!(code, 0, "{report:#}");
}

/// kube-proxy's `--cleanup`, as an init container runs it: `svcproxy run --cleanup` removes the leftovers and
/// exits without starting the proxy. Our nftables tables go in both families: a dual-stack node in nftables
/// mode has two.
#[test]
fn run_with_cleanup_removes_leftovers_and_exits() {
    let ns = NetNs::new("runclean").expect("a network namespace (needs root)");
    sh(
        &ns,
        "iptables -t nat -N KUBE-SERVICES && iptables -t nat -A PREROUTING -j KUBE-SERVICES \
         && iptables -t nat -N KUBE-SVC-ABCDEFGHIJKLMNOP \
         && nft add table ip svcproxy && nft add table ip6 svcproxy",
    );
    let mut cleanup = ns.command(env!("CARGO_BIN_EXE_svcproxy"));
    cleanup.args(["run", "--cleanup", "--manifests", "/nonexistent"]);
    let (code, out, err) = run(cleanup);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed"), "{out}");
    let saved = ns.command("iptables-save").output().unwrap();
    let saved = String::from_utf8_lossy(&saved.stdout);
    assert!(!saved.contains("KUBE-"), "{saved}");
    for table in ["ip svcproxy", "ip6 svcproxy"] {
        assert!(out.contains(&format!("table {table}")), "{out}");
    }
    let tables = ns.command("nft").args(["list", "tables"]).output().unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(!tables.contains("svcproxy"), "{tables}");
}
