//! iptables mode on a node whose kubelet writes legacy iptables: svcproxy must find kubelet's marker chain and
//! write the same backend, whatever plain `iptables` points at. Writing the other one leaves kubelet's
//! `KUBE-FIREWALL` and our chains in different backends, which the next start refuses as a mixed node.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Svcproxy, TempDir, WebLab};
use svcproxy_testkit::{NetNs, tcp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);

fn run(node: &NetNs, argv: &[&str]) -> String {
    node.exec_stdout(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// Every table of one backend's save in `node`.
fn save(node: &NetNs, program: &str) -> String {
    run(node, &[program])
}

#[test]
fn a_legacy_kubelet_marker_makes_svcproxy_write_legacy() {
    let web = WebLab::new();
    let node = web.lab.node();
    // What kubelet on a legacy node creates: its marker in mangle and its firewall chain in filter, both in
    // the legacy backend only.
    run(
        node,
        &["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
    );
    run(node, &["iptables-legacy", "-t", "filter", "-N", "KUBE-FIREWALL"]);
    assert!(
        !save(node, "iptables-nft-save").contains("KUBE-"),
        "the namespace starts with no KUBE-* chain in nf_tables"
    );

    let mut proxy = Svcproxy::start(node, &["--manifests", web.manifests()]);
    wait_until(WAIT, POLL, "the web ClusterIP answers", || {
        proxy.assert_running();
        tcp_request(web.client.ns(), web.vip(), T).ok()
    });
    let log = proxy.log();
    assert!(
        log.contains("writing the legacy iptables backend") && log.contains("KUBE-IPTABLES-HINT"),
        "the start log names the backend and why:\n{log}"
    );

    let legacy = save(node, "iptables-legacy-save");
    for chain in [":KUBE-SERVICES", ":KUBE-SVC-", ":KUBE-SEP-"] {
        assert!(legacy.contains(chain), "{chain} missing from legacy:\n{legacy}");
    }
    let nft = save(node, "iptables-nft-save");
    assert!(!nft.contains("KUBE-"), "svcproxy wrote nf_tables:\n{nft}");

    // `svcproxy diff` reads the backend the daemon writes: the kernel matches the intent.
    let out = node
        .command(env!("CARGO_BIN_EXE_svcproxy"))
        .args([
            "diff",
            "--manifests",
            web.manifests(),
            "--hostname-override",
            "node-a",
        ])
        .args(["--cluster-cidr", "10.244.0.0/16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diff found differences or could not read ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A restart finds kubelet's chains and ours in the one backend: no mixed-backend refusal.
    drop(proxy);
    let mut proxy = Svcproxy::start(node, &["--manifests", web.manifests()]);
    wait_until(WAIT, POLL, "the restarted svcproxy has synced", || {
        proxy.assert_running();
        proxy
            .log()
            .contains("writing the legacy iptables backend")
            .then_some(())
    });
    // Long enough for a refusal, which comes before the first sync.
    std::thread::sleep(Duration::from_secs(2));
    proxy.assert_running();
    tcp_request(web.client.ns(), web.vip(), T).expect("the ClusterIP answers after the restart");
    assert!(!save(node, "iptables-nft-save").contains("KUBE-"));
}

#[test]
fn no_marker_anywhere_writes_nf_tables() {
    let web = WebLab::new();
    let node = web.lab.node();
    let mut proxy = Svcproxy::start(node, &["--manifests", web.manifests()]);
    wait_until(WAIT, POLL, "the web ClusterIP answers", || {
        proxy.assert_running();
        tcp_request(web.client.ns(), web.vip(), T).ok()
    });
    assert!(
        proxy.log().contains("writing the nf_tables iptables backend"),
        "{}",
        proxy.log()
    );
    assert!(save(node, "iptables-nft-save").contains(":KUBE-SERVICES"));
    assert!(!save(node, "iptables-legacy-save").contains("KUBE-"));
}

/// `PATH` in which every nf_tables iptables tool fails as a missing one does, for an image that ships
/// iptables-legacy only.
fn without_nft_tools(dir: &TempDir) -> String {
    for family in ["iptables", "ip6tables"] {
        for tool in ["", "-save", "-restore"] {
            let name = format!("{family}-nft{tool}");
            dir.write(&name, "#!/bin/sh\necho \"$0: not installed\" >&2\nexit 127\n");
            let path = dir.path().join(&name);
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
    }
    format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap())
}

#[test]
fn an_image_with_only_legacy_iptables_writes_legacy() {
    let web = WebLab::new();
    let node = web.lab.node();
    let tools = TempDir::new("legacy-only");
    let path = without_nft_tools(&tools);
    let mut proxy = Svcproxy::start_with_env(node, &["--manifests", web.manifests()], &[("PATH", &path)]);
    wait_until(WAIT, POLL, "the web ClusterIP answers", || {
        proxy.assert_running();
        tcp_request(web.client.ns(), web.vip(), T).ok()
    });
    assert!(
        proxy.log().contains("only iptables-legacy is installed"),
        "{}",
        proxy.log()
    );
    assert!(save(node, "iptables-legacy-save").contains(":KUBE-SERVICES"));
    assert!(!save(node, "iptables-nft-save").contains("KUBE-"));
}

#[test]
fn a_backend_that_is_not_installed_is_refused_at_start() {
    let web = WebLab::new();
    let node = web.lab.node();
    let tools = TempDir::new("legacy-only");
    let path = without_nft_tools(&tools);
    let mut proxy = Svcproxy::start_with_env(
        node,
        &["--manifests", web.manifests(), "--iptables-backend", "nft"],
        &[("PATH", &path)],
    );
    let status = proxy.wait_exit(WAIT).expect("svcproxy refuses to start");
    assert!(!status.success());
    let log = proxy.log();
    assert!(
        log.contains("the nf_tables iptables backend cannot be written")
            && log.contains("iptables-nft-restore"),
        "{log}"
    );
    assert!(!save(node, "iptables-legacy-save").contains("KUBE-"));
}

/// `count` selector-less Services of 10 remote endpoints each, as one manifest: 11 chains apiece.
fn bulk_services(count: u32) -> String {
    let mut text = String::new();
    for i in 1..=count {
        let endpoints: String = (1..=10)
            .map(|j| {
                format!("- addresses: [10.250.{i}.{j}]\n  conditions: {{ready: true}}\n  nodeName: node-b\n")
            })
            .collect();
        text.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bulk-{i}, namespace: demo}}\nspec:\n  \
             clusterIP: 10.96.1.{i}\n  ports:\n  - {{name: http, protocol: TCP, port: 80}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: bulk-{i}-1\n  \
             namespace: demo\n  labels: {{kubernetes.io/service-name: bulk-{i}}}\naddressType: IPv4\nports:\n\
             - {{name: http, protocol: TCP, port: 80}}\nendpoints:\n{endpoints}---\n"
        ));
    }
    text
}

/// The kernel writes of the first sync that programmed more than 100 service ports, from the JSON log.
fn writes_of_first_big_sync(proxy: &mut Svcproxy) -> u64 {
    wait_until(WAIT, POLL, "a sync of every bulk Service", || {
        proxy.assert_running();
        proxy.log().lines().find_map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = &entry["fields"];
            (fields["message"] == "synced" && fields["service_ports"].as_u64()? > 100)
                .then(|| fields["writes"].as_u64())
                .flatten()
        })
    })
}

/// A cold sync is cut into transactions by backend: iptables-nft's `--noflush` costs more than linearly in a
/// transaction's chains, so 1,300 chains go in several; iptables-legacy rewrites the whole table on each, so
/// they go in one.
#[test]
fn a_cold_sync_is_many_small_restores_with_nf_tables_and_one_with_legacy() {
    let mut writes = Vec::new();
    for backend in ["nft", "legacy"] {
        let web = WebLab::new();
        web.dir.write("bulk.yaml", &bulk_services(120));
        let mut proxy = Svcproxy::start(
            web.lab.node(),
            &[
                "--manifests",
                web.manifests(),
                "--iptables-backend",
                backend,
                "--log-format",
                "json",
            ],
        );
        writes.push(writes_of_first_big_sync(&mut proxy));
        tcp_request(web.client.ns(), web.vip(), T).expect("the web ClusterIP answers");
    }
    assert!(writes[0] >= 2, "nf_tables: {} restores", writes[0]);
    assert_eq!(writes[1], 1, "legacy: {} restores", writes[1]);
}
