//! From `svcproxy explain` alone, why a packet fails on a node in each state the never-stuck fault cases
//! create (A–K for iptables, N-A/N-D/N-E for nftables). Each test breaks a node the way its case does, shows
//! with real traffic that packets fail or go astray, then checks that explain's text — what a person reads —
//! names the cause and what to do. The fault suite itself checks that svcproxy repairs each state; here the
//! repair is held off (the daemon stopped, or its transactions refused) so the broken state can be looked at.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use svcproxy_testkit::ClientError;

use super::*;

const STICKY_VIP: &str = "10.96.0.130";
const LB_IP: &str = "192.0.2.10";

/// The api Service moved to a new pod: the cluster's next state in several cases.
fn api_moved() -> String {
    manifests().replace(&format!("[{API_EP}]"), "[10.244.0.22]")
}

/// The api Service gains an endpoint: in nftables mode its pick rule changes (`mod 2`), so the update needs
/// `nft`. (Moving an endpoint changes map elements only, which bypass `nft`.)
fn api_grown() -> String {
    manifests().replace(
        &format!("[{API_EP}]"),
        &format!("[{API_EP}]\n  conditions: {{ready: true}}\n  nodeName: node-a\n- addresses: [10.244.0.22]"),
    )
}

fn sticky_manifest() -> String {
    "apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  clusterIP: 10.96.0.130
  sessionAffinity: ClientIP
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  namespace: demo
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true}
  nodeName: node-a
"
    .to_string()
}

fn lb_manifest() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.120
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30120}}
status:
  loadBalancer:
    ingress:
    - ip: {LB_IP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-1
  namespace: demo
  labels: {{kubernetes.io/service-name: lb}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
- addresses: [10.244.0.11]
  conditions: {{ready: true}}
  nodeName: node-a
"
    )
}

impl Node {
    /// `svcproxy explain` as a person runs it: text, with the daemon's flags.
    fn explain(&self, from: &str, to: &str, extra: &[&str]) -> String {
        let mut args = vec!["explain", "--from", from, "--to", to];
        args.extend(extra);
        let (_, out, err) = self.cli(&args, true);
        assert!(!out.is_empty(), "explain printed nothing; stderr:\n{err}");
        out
    }

    fn status(&self) -> Value {
        self.json(&["status"], false).1
    }

    /// A pod with a backend, for a Service's endpoint that moves.
    fn add_backend(&self, name: &str, ip: Ipv4Addr) -> (Pod, Backend) {
        let pod = self.lab.add_pod(name, ip);
        let backend = Backend::start(pod.ns(), name, &[8080], &[]);
        (pod, backend)
    }
}

/// Asserts that every phrase is in explain's text, printing the text when one is not.
#[track_caller]
fn says(text: &str, phrases: &[&str]) {
    for p in phrases {
        assert!(text.contains(p), "explain does not say {p:?}:\n{text}");
    }
}

/// `iptables-restore` (or `nft`) behind a script whose behaviour a file selects, so one running daemon can
/// meet several kinds of refusal in turn. An empty mode passes everything to the real program.
struct Refusing {
    dir: TempDir,
}

impl Refusing {
    fn new(program: &str) -> Refusing {
        let dir = TempDir::new("refusing");
        let real = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(program))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{program} is not installed"));
        let mode = dir.path().join("mode");
        let script = format!(
            r#"#!/bin/sh
mode=$(cat "{mode}" 2>/dev/null)
case "$mode" in
  line)
    cat > /dev/null
    echo "iptables-restore: line 3 failed" >&2
    exit 1 ;;
  lock)
    cat > /dev/null
    echo "Another app is currently holding the xtables lock. Stopped waiting after 5s." >&2
    exit 4 ;;
  recent)
    payload=$(mktemp)
    cat > "$payload"
    line=$(grep -n -m1 -e '-m recent' "$payload" | cut -d: -f1)
    if [ -n "$line" ]; then
      rm -f "$payload"
      printf "iptables-restore v1.8.9 (nf_tables): Couldn't load match \`recent':No such file or directory\n\nError occurred at line: %s\n" "$line" >&2
      exit 2
    fi
    "{real}" "$@" < "$payload"
    rc=$?
    rm -f "$payload"
    exit $rc ;;
  nft-busy)
    if [ "$1" = "-f" ]; then
      cat > /dev/null
      echo "/dev/stdin:2:1-30: Error: Could not process rule: Device or resource busy" >&2
      exit 1
    fi ;;
  numgen)
    if [ "$1" = "-f" ]; then
      payload=$(mktemp)
      cat > "$payload"
      hit=$(grep -n -m 1 -e numgen "$payload")
      if [ -n "$hit" ]; then
        rm -f "$payload"
        echo "/dev/stdin:${{hit%%:*}}:1-10: Error: Could not process rule: No such file or directory" >&2
        echo "${{hit#*:}}" >&2
        exit 1
      fi
      "{real}" "$@" < "$payload"
      rc=$?
      rm -f "$payload"
      exit $rc
    fi ;;
esac
exec "{real}" "$@"
"#,
            mode = mode.display(),
            real = real.display()
        );
        dir.write(program, &script);
        let path = dir.path().join(program);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Refusing { dir }
    }

    fn set(&self, mode: &str) {
        self.dir.write("mode", mode);
    }

    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
}

/// A, B: chains an older kube-proxy left behind still jump to ours (the references that made upstream's
/// deletions fail in the outage), and the api Service moved while nothing ran: packets still go to the old
/// pod.
#[test]
fn a_b_leftover_references_and_a_stopped_daemon() {
    let node = Node::new();
    drop(node.start());
    let sep = api_sep();
    let leftover = "KUBE-XLB-QWERTYUIOPASDFGH";
    node.iptables(&["-t", "nat", "-N", leftover]);
    node.iptables(&["-t", "nat", "-A", leftover, "-j", &sep]);
    let _api22 = node.add_backend("api22", Ipv4Addr::new(10, 244, 0, 22));
    node.dir.write("cluster.yaml", &api_moved());

    let reply = tcp_request(node.client.ns(), vip(API_VIP), T).expect("the old pod answers");
    assert_eq!(reply.identity, "api21", "the kernel still sends to the old pod");

    let text = node.explain("demo/client", "demo/api:http", &[]);
    says(
        &text,
        &[
            "DELIVERED to 10.244.0.21:8080",
            "DELIVERED to 10.244.0.22:8080",
            "Kernel and intent DISAGREE",
            "svcproxy does not answer at http://127.0.0.1:10249",
            "start it",
            "Hazard (orphan_reference)",
            leftover,
        ],
    );
    insta::assert_snapshot!("explain_fault_ab_leftovers_daemon_stopped", node.stable(&text));

    // Started again, svcproxy programs the move and collects the leftover by its reference to our chain.
    let mut proxy = Svcproxy::start(node.ns(), &["--manifests", node.dir()]);
    wait_until(WAIT, POLL, "the new pod answers", || {
        proxy.assert_running();
        tcp_request(node.client.ns(), vip(API_VIP), T)
            .ok()
            .filter(|r| r.identity == "api22")
    });
    let text = node.explain("demo/client", "demo/api:http", &[]);
    says(
        &text,
        &[
            "Kernel and intent AGREE",
            "svcproxy (http://127.0.0.1:10249): healthy",
        ],
    );
    assert!(!text.contains("Hazard"), "{text}");
}

/// C: kubelet's KUBE-MARK-DROP is gone (svcproxy never uses it), and a client outside the Service's
/// loadBalancerSourceRanges is dropped: explain shows the drop is the Service's own rule, as asked.
#[test]
fn c_a_source_range_drop_needs_no_kube_mark_drop() {
    let node = Node::new();
    node.lab
        .external()
        .exec(&["ip", "route", "add", "192.0.2.0/24", "via", "10.0.0.10"])
        .unwrap();
    node.dir.write("lb.yaml", &lb_manifest());
    let mut proxy = node.start();
    wait_until(WAIT, POLL, "the LB Service is programmed", || {
        proxy.assert_running();
        (node.cli(&["diff"], true).0 == 0).then_some(())
    });
    drop(proxy);
    assert!(!node.iptables(&["-t", "nat", "-S"]).contains("KUBE-MARK-DROP"));
    assert!(matches!(
        tcp_request(
            node.lab.external(),
            SocketAddr::new(LB_IP.parse().unwrap(), 80),
            T
        ),
        Err(ClientError::Timeout)
    ));

    let text = node.explain("10.0.0.20", &format!("{LB_IP}:80/tcp"), &[]);
    says(
        &text,
        &[
            "from outside the node",
            "DROPPED",
            "Kernel and intent AGREE",
            "KUBE-PROXY-FIREWALL",
            "The kernel drops this packet, and so would svcproxy's rendering",
        ],
    );
    insta::assert_snapshot!("explain_fault_c_source_range", node.stable(&text));
}

/// D: another program keeps inserting a rule into one of our chains; the daemon repairs it each time, then
/// recognises the fight and says so, and explain passes that on.
#[test]
fn d_a_second_writer_is_named() {
    let node = Node::new();
    let mut proxy = Svcproxy::start(node.ns(), &["--manifests", node.dir(), "--verify-period", "1s"]);
    node.wait_ready(&mut proxy);
    let svc = svc_chain(&spn("api"));
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if !node.iptables(&["-t", "nat", "-S", &svc]).contains("-j RETURN") {
                    node.iptables(&["-t", "nat", "-I", &svc, "1", "-j", "RETURN"]);
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        wait_until(
            Duration::from_secs(60),
            POLL,
            "the daemon names a second writer",
            || {
                proxy.assert_running();
                node.status()["problem"]
                    .as_str()
                    .filter(|p| p.contains("changed from outside"))
                    .map(drop)
            },
        );
        let text = node.explain("demo/client", "demo/api:http", &[]);
        stop.store(true, Ordering::Relaxed);
        says(
            &text,
            &[
                "svcproxy reports this node unhealthy",
                "is another proxy or tool writing KUBE-* chains on this node?",
            ],
        );
    });
}

/// E: KUBE-* chains in the legacy backend too (a kube-proxy of the other backend ran here): packets meet both
/// sets of rules, and explain, reading the active backend, names the other one.
#[test]
fn e_chains_in_both_backends_are_named() {
    let node = Node::new();
    drop(node.start());
    let legacy = |args: &[&str]| {
        let mut argv = vec!["iptables-legacy"];
        argv.extend(args);
        node.ns()
            .exec_stdout(&argv)
            .unwrap_or_else(|e| panic!("iptables-legacy {args:?}: {e}"));
    };
    legacy(&["-t", "nat", "-N", "KUBE-SERVICES"]);
    legacy(&["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
    let text = node.explain("demo/client", "demo/api:http", &[]);
    says(&text, &["Hazard (split_backends)", "legacy"]);
}

/// F1, F2 and I: a service chain deleted (or never written: a first sync cut short by SIGKILL leaves the
/// same state), then the whole nat table flushed.
#[test]
fn f_i_deleted_chains_and_a_flushed_table_are_named() {
    let node = Node::new();
    drop(node.start());
    let svc = svc_chain(&spn("api"));
    // Everything of the api Service's chain, rules jumping to it included, out of nat in one restore.
    let nat = node.ns().exec_stdout(&["iptables-save", "-t", "nat"]).unwrap();
    let kept: String = nat
        .lines()
        .filter(|l| !l.contains(&svc))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut restore = node.ns().command("iptables-restore");
    restore.stdin(std::process::Stdio::piped());
    let mut child = restore.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), kept.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(tcp_request(node.client.ns(), vip(API_VIP), T).is_err());

    let text = node.explain("demo/client", "demo/api:http", &[]);
    says(
        &text,
        &[
            "ACCEPTED, but not translated to any endpoint",
            "Kernel and intent DISAGREE",
            &format!("nat/{svc}: missing"),
            "svcproxy does not answer",
        ],
    );
    insta::assert_snapshot!("explain_fault_f2_chain_deleted", node.stable(&text));

    node.iptables(&["-t", "nat", "-F"]);
    node.iptables(&["-t", "nat", "-X"]);
    assert!(tcp_request(node.client.ns(), vip(WEB_VIP), T).is_err());
    let text = node.explain("demo/client", "demo/web:http", &[]);
    says(
        &text,
        &[
            "Kernel and intent DISAGREE",
            "missing jump: nat/PREROUTING -> KUBE-SERVICES",
            "svcproxy does not answer",
        ],
    );
    insta::assert_snapshot!("explain_fault_f1_nat_flushed", node.stable(&text));
}

/// G, H and K: the daemon runs, but the kernel refuses its transactions — a refused line, the xtables lock,
/// a missing match. Explain quotes the refusal next to the stale path, both when it reads the kernel itself
/// and when the daemon answers.
#[test]
fn g_h_k_refused_syncs_are_quoted() {
    let node = Node::new();
    let refusing = Refusing::new("iptables-nft-restore");
    let path = refusing.path_env();
    let mut proxy = Svcproxy::start_with_env(
        node.ns(),
        &["--manifests", node.dir(), "--sync-period", "5s"],
        &[("PATH", &path)],
    );
    node.wait_ready(&mut proxy);
    let _api22 = node.add_backend("api22", Ipv4Addr::new(10, 244, 0, 22));

    // G: every restore refused while the api Service moves.
    refusing.set("line");
    node.dir.write("cluster.yaml", &api_moved());
    wait_until(WAIT, POLL, "syncs fail", || {
        proxy.assert_running();
        (node.status()["consecutive_failures"].as_u64() >= Some(2)).then_some(())
    });
    let reply = tcp_request(node.client.ns(), vip(API_VIP), T).expect("the old pod answers");
    assert_eq!(reply.identity, "api21");
    let text = node.explain("demo/client", "demo/api:http", &[]);
    says(
        &text,
        &[
            "DELIVERED to 10.244.0.21:8080",
            "Kernel and intent DISAGREE",
            "FAILED, so nothing",
            "line 3 failed",
        ],
    );
    // The daemon compares the kernel with what it is trying to program, not with what it last managed to.
    let (_, r) = node.json(
        &[
            "explain",
            "--from",
            "10.244.0.50",
            "--to",
            "demo/api:http",
            "--daemon",
            "http://127.0.0.1:10249",
        ],
        false,
    );
    assert_eq!(r["agree"], false, "{r:#}");
    assert_eq!(strings(&r["intent"]["endpoints"]), ["10.244.0.22:8080"], "{r:#}");
    assert!(
        r["intent_source"].as_str().unwrap().contains("trying to program"),
        "{r:#}"
    );
    assert!(strings(&r["diagnosis"])[0].contains("line 3 failed"), "{r:#}");

    // H: the lock held by someone else.
    refusing.set("lock");
    wait_until(Duration::from_secs(30), POLL, "a sync fails on the lock", || {
        proxy.assert_running();
        node.status()["last_error"]
            .as_str()
            .filter(|e| e.contains("xtables lock"))
            .map(drop)
    });
    let text = node.explain("demo/client", "demo/api:http", &[]);
    says(&text, &["FAILED, so nothing", "xtables lock"]);

    // Allowed again, the move is programmed.
    refusing.set("");
    wait_until(Duration::from_secs(30), POLL, "the new pod answers", || {
        proxy.assert_running();
        tcp_request(node.client.ns(), vip(API_VIP), T)
            .ok()
            .filter(|r| r.identity == "api22")
    });

    // K: a kernel without the `recent` match meets a ClientIP-affinity Service.
    refusing.set("recent");
    node.dir.write("sticky.yaml", &sticky_manifest());
    wait_until(
        Duration::from_secs(30),
        POLL,
        "the affinity Service is refused",
        || {
            proxy.assert_running();
            node.status()["last_error"]
                .as_str()
                .filter(|e| e.contains("recent"))
                .map(drop)
        },
    );
    assert!(tcp_request(node.client.ns(), vip(STICKY_VIP), T).is_err());
    let text = node.explain("demo/client", "demo/sticky:http", &[]);
    says(
        &text,
        &[
            "ACCEPTED, but not translated to any endpoint",
            "Kernel and intent DISAGREE",
            "FAILED, so nothing",
            "missing_extension",
            "Couldn't load match `recent'",
        ],
    );
}

/// N-D, N-E and N-A in nftables mode: `nft` refusing every transaction, then refusing `numgen` as a kernel
/// without it does, then our table deleted while the daemon is stopped.
#[test]
fn n_nftables_refusals_and_a_deleted_table_are_named() {
    let node = Node::new();
    let refusing = Refusing::new("nft");
    let path = refusing.path_env();
    let mut proxy = Svcproxy::start_with_env(
        node.ns(),
        &[
            "--manifests",
            node.dir(),
            "--proxy-mode",
            "nftables",
            "--sync-period",
            "5s",
        ],
        &[("PATH", &path)],
    );
    node.wait_ready(&mut proxy);
    let _api22 = node.add_backend("api22", Ipv4Addr::new(10, 244, 0, 22));

    // N-D: every transaction refused while the api Service grows.
    refusing.set("nft-busy");
    node.dir.write("cluster.yaml", &api_grown());
    wait_until(WAIT, POLL, "syncs fail", || {
        proxy.assert_running();
        (node.status()["consecutive_failures"].as_u64() >= Some(2)).then_some(())
    });
    let text = node.explain("demo/client", "demo/api:http", &NFT);
    says(
        &text,
        &[
            "DELIVERED to 10.244.0.21:8080",
            "Kernel and intent DISAGREE",
            "FAILED, so nothing",
            "Device or resource busy",
        ],
    );

    // N-E: numgen refused, as by a kernel without it; the web Service's three endpoints need it.
    refusing.set("numgen");
    node.dir.write("cluster.yaml", &manifests());
    wait_until(Duration::from_secs(30), POLL, "a sync fails on numgen", || {
        proxy.assert_running();
        node.status()["last_error"]
            .as_str()
            .filter(|e| e.contains("numgen"))
            .map(drop)
    });
    let text = node.explain("demo/client", "demo/web:http", &NFT);
    says(
        &text,
        &["FAILED, so nothing", "numgen", "No such file or directory"],
    );

    // N-A: the table deleted while nothing runs.
    refusing.set("");
    wait_until(Duration::from_secs(30), POLL, "syncs succeed again", || {
        proxy.assert_running();
        (node.status()["consecutive_failures"].as_u64() == Some(0)).then_some(())
    });
    drop(proxy);
    node.nft(&["delete", "table", "ip", "svcproxy"]);
    assert!(tcp_request(node.client.ns(), vip(WEB_VIP), T).is_err());
    let text = node.explain("demo/client", "demo/web:http", &NFT);
    says(
        &text,
        &[
            "table ip svcproxy does not exist",
            "svcproxy's nftables table is missing or empty",
            "svcproxy does not answer",
        ],
    );
    insta::assert_snapshot!("explain_fault_na_table_deleted", node.stable(&text));
}
