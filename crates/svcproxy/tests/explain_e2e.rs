//! `svcproxy explain`, `diff` and `status` on a real kernel: a node namespace programmed by the daemon from
//! manifests, then broken by hand while the daemon is stopped (so nothing repairs it). Each answer is checked
//! against real traffic, so the tools cannot agree with themselves and still be wrong about the kernel.

mod common;
#[path = "explain_e2e/faults.rs"]
mod faults;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{Svcproxy, TempDir};
use serde_json::Value;
use svcproxy_iptables::chain_name::{sep_chain, svc_chain};
use svcproxy_model::{EndpointInfo, ObjectName, Protocol, ServicePortName};
use svcproxy_testkit::{Backend, Lab, NetNs, Pod, http_get, tcp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);

const WEB_VIP: &str = "10.96.0.100";
const API_VIP: &str = "10.96.0.110";
const API_EP: &str = "10.244.0.21";

fn manifests() -> String {
    let slice = |svc: &str, eps: &[&str]| {
        let eps: String = eps
            .iter()
            .map(|ip| format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: node-a\n"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {svc}-1
  namespace: demo
  labels: {{kubernetes.io/service-name: {svc}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
{eps}"
        )
    };
    let service = |svc: &str, ip: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {svc}, namespace: demo}}
spec:
  clusterIP: {ip}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
"
        )
    };
    // The client Pod is there for `--from demo/client`: explain reads pod addresses from Pod documents.
    [
        service("web", WEB_VIP),
        slice("web", &["10.244.0.11", "10.244.0.12", "10.244.0.13"]),
        service("api", API_VIP),
        slice("api", &[API_EP]),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: demo}\nstatus: {podIP: 10.244.0.50}\n"
            .to_string(),
        // Only nftables mode acts on it (upstream's iptables mode has no use for ServiceCIDRs).
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\n\
         spec: {cidrs: [10.96.0.0/16, 'fd00:10:96::/112']}\n"
            .to_string(),
    ]
    .join("---\n")
}

fn spn(name: &str) -> ServicePortName {
    ServicePortName::new(ObjectName::new("demo", name), "http", Protocol::Tcp)
}

fn api_sep() -> String {
    let ep = EndpointInfo {
        ip: API_EP.parse().unwrap(),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: true,
        zone_hints: None,
        node_hints: None,
    };
    sep_chain(&spn("api"), &ep)
}

fn vip(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 80)
}

/// A node running the daemon from manifests, with backends behind both Services and a client pod.
struct Node {
    lab: Lab,
    dir: TempDir,
    client: Pod,
    _pods: Vec<(Pod, Backend)>,
}

impl Node {
    fn new() -> Node {
        let lab = Lab::new();
        let pods = [(11, "web11"), (12, "web12"), (13, "web13"), (21, "api21")]
            .into_iter()
            .map(|(i, name)| {
                let pod = lab.add_pod(name, Ipv4Addr::new(10, 244, 0, i));
                let backend = Backend::start(pod.ns(), name, &[8080], &[]);
                (pod, backend)
            })
            .collect();
        let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
        let dir = TempDir::new("explain");
        dir.write("cluster.yaml", &manifests());
        Node {
            lab,
            dir,
            client,
            _pods: pods,
        }
    }

    fn ns(&self) -> &NetNs {
        self.lab.node()
    }

    fn dir(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    /// Starts the daemon and waits until both Services answer.
    fn start(&self) -> Svcproxy {
        let mut proxy = Svcproxy::start(self.ns(), &["--manifests", self.dir()]);
        self.wait_ready(&mut proxy);
        proxy
    }

    /// Waits until both Services answer through `proxy`.
    fn wait_ready(&self, proxy: &mut Svcproxy) {
        for ip in [WEB_VIP, API_VIP] {
            wait_until(WAIT, POLL, "the ClusterIP answers", || {
                proxy.assert_running();
                tcp_request(self.client.ns(), vip(ip), T).ok()
            });
        }
    }

    /// Runs `svcproxy ARGS…` in the node namespace; `intent` adds the daemon's flags.
    fn cli(&self, args: &[&str], intent: bool) -> (i32, String, String) {
        let mut cmd = self.ns().command(env!("CARGO_BIN_EXE_svcproxy"));
        cmd.args(args);
        if intent {
            cmd.args(["--manifests", self.dir()]).args([
                "--hostname-override",
                "node-a",
                "--cluster-cidr",
                "10.244.0.0/16",
            ]);
        }
        let Output {
            status,
            stdout,
            stderr,
        } = cmd.output().expect("run svcproxy");
        let out = String::from_utf8_lossy(&stdout).into_owned();
        let err = String::from_utf8_lossy(&stderr).into_owned();
        (status.code().unwrap_or(-1), out, err)
    }

    fn json(&self, args: &[&str], intent: bool) -> (i32, Value) {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let (code, out, err) = self.cli(&all, intent);
        let value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{args:?}: {e}\nstdout:\n{out}\nstderr:\n{err}"));
        (code, value)
    }

    /// `svcproxy explain --daemon` of a connection from the client pod to `to`, as JSON.
    fn explain_from_the_client_by_the_daemon(&self, to: &str) -> (i32, Value) {
        self.json(
            &["explain", "--daemon", "--from", "10.244.0.50", "--to", to],
            false,
        )
    }

    fn iptables(&self, args: &[&str]) -> String {
        let mut argv = vec!["iptables"];
        argv.extend(args);
        self.ns()
            .exec_stdout(&argv)
            .unwrap_or_else(|e| panic!("iptables {args:?}: {e}"))
    }

    /// Text output with the run-specific manifest directory replaced, for snapshots.
    fn stable(&self, text: &str) -> String {
        let marker = "last successful sync ";
        text.replace(self.dir(), "<manifests>")
            .lines()
            .map(|l| match l.split_once(marker) {
                Some((head, _)) => format!("{head}{marker}<time>.\n"),
                None => format!("{l}\n"),
            })
            .collect()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_healthy_node_agrees_with_its_intent() {
    let node = Node::new();
    let mut proxy = node.start();

    // From a pod, named as the Pod: every endpoint, source kept.
    let (code, r) = node.json(
        &["explain", "--from", "demo/client", "--to", "demo/web:http"],
        true,
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["agree"], true, "{r:#}");
    assert_eq!(r["packet"]["origin"], "pod");
    assert_eq!(r["packet"]["source"], "10.244.0.50");
    assert_eq!(r["service"]["name"], "demo/web:http");
    assert_eq!(r["kernel"]["verdict"], "accept");
    assert_eq!(r["kernel"]["masquerade"], false);
    assert_eq!(
        strings(&r["kernel"]["endpoints"]),
        ["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"]
    );
    assert_eq!(
        r["kernel"]["alternatives"].as_array().unwrap().len(),
        2,
        "one per further endpoint"
    );
    for ep in r["endpoints"].as_array().unwrap() {
        assert_eq!(
            (ep["kernel"].as_bool(), ep["intent"].as_bool()),
            (Some(true), Some(true)),
            "{ep}"
        );
        assert_eq!(ep["state"]["ready"], true);
        assert_eq!(ep["state"]["local"], true);
    }
    assert!(r["differing_chains"].as_array().unwrap().is_empty(), "{r:#}");

    // From outside the node, given as an address: masqueraded, as real traffic shows.
    let (code, r) = node.json(
        &["explain", "--from", "10.0.0.20", "--to", "10.96.0.110:80/tcp"],
        true,
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["packet"]["origin"], "external");
    assert_eq!(r["service"]["name"], "demo/api:http");
    assert_eq!(r["kernel"]["masquerade"], true);
    let seen = tcp_request(node.lab.external(), vip(API_VIP), T).unwrap();
    assert_ne!(
        seen.seen_source.ip().to_string(),
        "10.0.0.20",
        "external clients are masqueraded"
    );

    let (code, text, err) = node.cli(&["explain", "--from", "demo/client", "--to", "demo/api"], true);
    assert_eq!(code, 0, "{text}{err}");
    insta::assert_snapshot!("explain_healthy", node.stable(&text));

    let (code, text, err) = node.cli(&["diff"], true);
    assert_eq!(code, 0, "{text}{err}");
    insta::assert_snapshot!("diff_healthy", text);

    // The same answers from the daemon's debug endpoints.
    let (code, r) = node.explain_from_the_client_by_the_daemon("demo/web:http");
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["agree"], true, "{r:#}");
    assert_eq!(r["intent_source"], "the intent svcproxy last applied");
    assert_eq!(strings(&r["intent"]["endpoints"]).len(), 3);
    let (code, r) = node.json(&["diff", "--daemon"], false);
    assert_eq!((code, &r["equal"]), (0, &Value::Bool(true)), "{r:#}");
    let (code, r) = node.json(&["status"], false);
    assert_eq!(code, 0, "{r:#}");
    let web = r["service_ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "demo/web:http")
        .unwrap_or_else(|| panic!("{r:#}"));
    assert_eq!(web["cluster_ip"], WEB_VIP);
    assert_eq!(web["endpoints"]["ready"], 3);
    assert_eq!(web["endpoints"]["local"], 3);
    assert_eq!(web["verified"], true);
    assert!(web["programmed_at"].is_string(), "{web:#}");
    assert!(r["last_sync"].is_string() && r["last_error"].is_null(), "{r:#}");
    let (code, text, err) = node.cli(&["status"], false);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("demo/web:http") && l.contains("3/3/0/3 of 3")),
        "{text}"
    );
    let (status, body) = http_get(node.ns(), common::METRICS.parse().unwrap(), "/debug/intent", T).unwrap();
    assert_eq!(status, 200, "{body}");
    let intent: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        intent["service_ports"].as_object().map(|m| m.len()),
        Some(2),
        "{intent:#}"
    );
    assert_eq!(
        intent["service_ports"]["demo/api:http"]["cluster_ip"], API_VIP,
        "{intent:#}"
    );
    let (status, body) = http_get(
        node.ns(),
        common::METRICS.parse().unwrap(),
        "/debug/explain?from=nonsense&to=demo/web",
        T,
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("IP address"), "{body}");
    proxy.assert_running();
    proxy.assert_no_divergence();
}

#[test]
fn a_deleted_dnat_rule_is_pointed_at_and_repaired_by_a_restart() {
    let node = Node::new();
    let proxy = node.start();
    drop(proxy);

    // Delete the endpoint chain's DNAT rule, by its number in the chain.
    let sep = api_sep();
    let listing = node.iptables(&["-t", "nat", "-S", &sep]);
    let rules: Vec<&str> = listing.lines().filter(|l| l.starts_with("-A ")).collect();
    let number = rules
        .iter()
        .position(|r| r.contains("-j DNAT"))
        .expect("a DNAT rule")
        + 1;
    node.iptables(&["-t", "nat", "-D", &sep, &number.to_string()]);
    assert!(
        tcp_request(node.client.ns(), vip(API_VIP), T).is_err(),
        "without its DNAT rule the Service is unreachable"
    );

    let (code, r) = node.json(
        &["explain", "--from", "demo/client", "--to", "demo/api:http"],
        true,
    );
    assert_eq!(code, 1, "disagreement is exit status 1: {r:#}");
    assert_eq!(r["agree"], false);
    assert!(strings(&r["kernel"]["endpoints"]).is_empty(), "{r:#}");
    assert_eq!(strings(&r["intent"]["endpoints"]), [format!("{API_EP}:8080")]);
    assert_eq!(
        r["first_difference"]["intent"]["chain"],
        format!("nat/{sep}"),
        "{r:#}"
    );
    assert!(
        r["first_difference"]["intent"]["rule"]
            .as_str()
            .unwrap()
            .contains("DNAT"),
        "{r:#}"
    );
    let chains = r["differing_chains"].as_array().unwrap();
    assert_eq!(chains.len(), 1, "{r:#}");
    assert_eq!(chains[0]["chain"], sep);
    assert_eq!(chains[0]["status"], "different");
    assert_eq!(chains[0]["missing_rules"].as_array().unwrap().len(), 1);
    let (_, text, _) = node.cli(
        &["explain", "--from", "demo/client", "--to", "demo/api:http"],
        true,
    );
    insta::assert_snapshot!("explain_missing_dnat", node.stable(&text));

    let (code, r) = node.json(&["diff"], true);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["equal"], false);
    assert_eq!(r["service_ports"][0]["name"], "demo/api:http", "{r:#}");
    assert_eq!(r["service_ports"][0]["chains"][0]["chain"], sep);
    let (code, text, _) = node.cli(&["diff"], true);
    assert_eq!(code, 1);
    insta::assert_snapshot!("diff_missing_dnat", text);

    // A restart's first sync compares with the kernel and rewrites what differs.
    let mut proxy = Svcproxy::start(node.ns(), &["--manifests", node.dir()]);
    wait_until(WAIT, POLL, "the restarted daemon repairs the chain", || {
        proxy.assert_running();
        (node.cli(&["diff"], true).0 == 0).then_some(())
    });
    let (code, r) = node.json(
        &["explain", "--from", "demo/client", "--to", "demo/api:http"],
        true,
    );
    assert_eq!((code, &r["agree"]), (0, &Value::Bool(true)), "{r:#}");
    tcp_request(node.client.ns(), vip(API_VIP), T).expect("repaired");
}

#[test]
fn foreign_rules_in_our_chains_are_pointed_at() {
    let node = Node::new();
    drop(node.start());
    let svc = svc_chain(&spn("api"));

    // The kernel refuses DROP in the nat table, so the foreign rule in the service chain is the next worst
    // thing: a RETURN at its top, which sends the packet on untranslated.
    node.iptables(&["-t", "nat", "-I", &svc, "1", "-j", "RETURN"]);
    let (code, r) = node.json(
        &["explain", "--from", "10.244.0.50", "--to", "demo/api:http"],
        true,
    );
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["kernel"]["verdict"], "accept");
    assert!(strings(&r["kernel"]["endpoints"]).is_empty(), "{r:#}");
    assert_eq!(
        r["first_difference"]["kernel"]["chain"],
        format!("nat/{svc}"),
        "{r:#}"
    );
    assert!(
        r["first_difference"]["kernel"]["rule"]
            .as_str()
            .unwrap()
            .ends_with("-j RETURN")
    );
    let chains = r["differing_chains"].as_array().unwrap();
    assert_eq!(chains.len(), 1, "{r:#}");
    assert_eq!(
        strings(&chains[0]["extra_rules"]),
        [format!("-A {svc} -j RETURN")]
    );
    let (code, text, _) = node.cli(&["diff"], true);
    assert_eq!(code, 1);
    assert!(text.contains(&format!("+ -A {svc} -j RETURN")), "{text}");
    node.iptables(&["-t", "nat", "-D", &svc, "1"]);
    assert_eq!(node.cli(&["diff"], true).0, 0);

    // A DROP in filter's KUBE-SERVICES for the endpoint: connections time out, and explain says why.
    let ep = format!("{API_EP}/32");
    node.iptables(&[
        "-I",
        "KUBE-SERVICES",
        "1",
        "-d",
        &ep,
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "DROP",
    ]);
    assert!(matches!(
        tcp_request(node.client.ns(), vip(API_VIP), T),
        Err(svcproxy_testkit::ClientError::Timeout)
    ));
    let (code, r) = node.json(
        &["explain", "--from", "10.244.0.50", "--to", "demo/api:http"],
        true,
    );
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["kernel"]["verdict"], "drop");
    assert_eq!(r["intent"]["verdict"], "accept");
    assert_eq!(
        r["first_difference"]["kernel"]["chain"], "filter/KUBE-SERVICES",
        "{r:#}"
    );
    let differences = strings(&r["differences"]);
    assert!(
        differences.iter().any(|d| d.starts_with("verdict:")),
        "{differences:?}"
    );
    let (_, text, _) = node.cli(
        &["explain", "--from", "10.244.0.50", "--to", "demo/api:http"],
        true,
    );
    insta::assert_snapshot!("explain_foreign_drop", node.stable(&text));
    let (code, r) = node.json(&["diff"], true);
    assert_eq!(code, 1);
    assert_eq!(r["shared"][0]["chain"], "KUBE-SERVICES", "{r:#}");
    assert_eq!(r["shared"][0]["table"], "filter");
}

/// The daemon's flags for nftables mode, given to every command of the nftables test.
const NFT: [&str; 2] = ["--proxy-mode", "nftables"];

impl Node {
    /// `svcproxy ARGS… --proxy-mode nftables` with the daemon's flags.
    fn nft_cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = args.to_vec();
        all.extend(NFT);
        self.cli(&all, true)
    }

    fn nft_json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = args.to_vec();
        all.extend(NFT);
        self.json(&all, true)
    }

    fn nft(&self, args: &[&str]) -> String {
        let mut argv = vec!["nft"];
        argv.extend(args);
        self.ns()
            .exec_stdout(&argv)
            .unwrap_or_else(|e| panic!("nft {args:?}: {e}"))
    }
}

#[test]
fn nftables_mode_agrees_when_healthy_and_points_at_what_was_removed() {
    let node = Node::new();
    let mut proxy = Svcproxy::start(
        node.ns(),
        &["--manifests", node.dir(), "--proxy-mode", "nftables"],
    );
    for ip in [WEB_VIP, API_VIP] {
        wait_until(WAIT, POLL, "the ClusterIP answers", || {
            proxy.assert_running();
            tcp_request(node.client.ns(), vip(ip), T).ok()
        });
    }

    // Healthy: the live table and the rendering agree, read here and asked of the daemon.
    let (code, r) = node.nft_json(&["explain", "--from", "demo/client", "--to", "demo/web:http"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["agree"], true, "{r:#}");
    assert_eq!(r["nft_table"], "ip svcproxy");
    assert_eq!(
        strings(&r["kernel"]["endpoints"]),
        ["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"]
    );
    assert!(
        r["kernel"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["chain"].as_str().unwrap().starts_with("ip svcproxy/")),
        "{r:#}"
    );
    assert_eq!(
        r["kernel"]["alternatives"].as_array().unwrap().len(),
        0,
        "one rule picks among all endpoints, from the chain's slot of an endpoint map: {r:#}"
    );
    let (code, r) = node.nft_json(&["explain", "--from", "10.0.0.20", "--to", "10.96.0.110:80/tcp"]);
    assert_eq!((code, &r["agree"]), (0, &Value::Bool(true)), "{r:#}");
    assert_eq!(
        r["kernel"]["masquerade"], true,
        "external clients are masqueraded"
    );
    // An address of the ServiceCIDR that no Service holds: dropped, by the kernel as by the rendering.
    let (code, r) = node.nft_json(&["explain", "--from", "demo/client", "--to", "10.96.7.7:80/tcp"]);
    assert_eq!((code, &r["agree"]), (0, &Value::Bool(true)), "{r:#}");
    assert_eq!(r["kernel"]["verdict"], "drop", "{r:#}");
    assert!(
        r["kernel"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["chain"] == "ip svcproxy/cluster-ips-check"),
        "{r:#}"
    );
    let (code, text, err) = node.nft_cli(&["diff"]);
    assert_eq!(code, 0, "{text}{err}");
    assert!(
        text.contains("Table ip svcproxy matches the intent (2 service ports"),
        "{text}"
    );
    let (code, r) = node.explain_from_the_client_by_the_daemon("demo/api:http");
    assert_eq!((code, &r["agree"]), (0, &Value::Bool(true)), "{r:#}");
    assert_eq!(r["nft_table"], "ip svcproxy");
    let (code, r) = node.json(&["diff", "--daemon"], false);
    assert_eq!((code, &r["equal"]), (0, &Value::Bool(true)), "{r:#}");
    let (code, r) = node.explain_from_the_client_by_the_daemon("10.96.7.7:80/tcp");
    assert_eq!((code, &r["agree"]), (0, &Value::Bool(true)), "{r:#}");
    assert_eq!(r["intent"]["verdict"], "drop", "{r:#}");
    proxy.assert_no_divergence();
    drop(proxy);

    // Broken while the daemon is stopped: demo/api's element of the ClusterIP map, and demo/web's element of
    // its endpoint map that sends connections to its third endpoint.
    let api_key = format!("{API_VIP} . tcp . 80");
    node.nft(&[
        "delete",
        "element",
        "ip",
        "svcproxy",
        "service-ips",
        &format!("{{ {api_key} }}"),
    ]);
    let web_chain = "service-demo/web/tcp/http";
    let listing = node.nft(&["list", "chain", "ip", "svcproxy", web_chain]);
    let map = listing
        .split(" map @")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no endpoint map in\n{listing}"))
        .to_string();
    let elements = node.nft(&["list", "map", "ip", "svcproxy", &map]);
    let key = elements
        .split(['{', ','])
        .find(|e| e.contains(": 10.244.0.13 . 8080"))
        .and_then(|e| e.split_whitespace().next())
        .unwrap_or_else(|| panic!("no element for 10.244.0.13 in\n{elements}"))
        .to_string();
    node.nft(&[
        "delete",
        "element",
        "ip",
        "svcproxy",
        &map,
        &format!("{{ {key} }}"),
    ]);
    let web_map = format!("@{map}");
    assert!(
        tcp_request(node.client.ns(), vip(API_VIP), T).is_err(),
        "without its map element the Service is unreachable"
    );

    let (code, r) = node.nft_json(&["explain", "--from", "demo/client", "--to", "demo/api:http"]);
    assert_eq!(code, 1, "disagreement is exit status 1: {r:#}");
    assert_eq!(r["agree"], false);
    assert!(strings(&r["kernel"]["endpoints"]).is_empty(), "{r:#}");
    assert_eq!(
        r["kernel"]["verdict"], "reject",
        "as the refused connection shows: {r:#}"
    );
    assert_eq!(strings(&r["intent"]["endpoints"]), [format!("{API_EP}:8080")]);
    assert_eq!(
        r["first_difference"]["intent"]["chain"], "ip svcproxy/services",
        "{r:#}"
    );
    assert!(
        r["first_difference"]["intent"]["rule"]
            .as_str()
            .unwrap()
            .contains("vmap @service-ips"),
        "{r:#}"
    );
    let chains = r["differing_chains"].as_array().unwrap();
    assert_eq!(chains.len(), 1, "only the map is on this path: {r:#}");
    assert_eq!(chains[0]["chain"], "@service-ips");
    let missing = strings(&chains[0]["missing_rules"]);
    assert_eq!(missing.len(), 1, "{r:#}");
    assert!(missing[0].starts_with(&api_key), "{missing:?}");
    let (_, text, _) = node.nft_cli(&["explain", "--from", "demo/client", "--to", "demo/api:http"]);
    insta::assert_snapshot!("explain_nft_missing_element", node.stable(&text));

    let (code, r) = node.nft_json(&["explain", "--from", "demo/client", "--to", "demo/web:http"]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(
        strings(&r["kernel"]["endpoints"]),
        ["10.244.0.11:8080", "10.244.0.12:8080"],
        "{r:#}"
    );
    assert_eq!(
        r["differing_chains"][0]["chain"], web_map,
        "the map missing the element: {r:#}"
    );

    let (code, r) = node.nft_json(&["diff"]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["equal"], false);
    let ports: Vec<&str> = r["service_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["demo/api:http", "demo/web:http"], "{r:#}");
    assert_eq!(r["service_ports"][0]["chains"][0]["chain"], "@service-ips");
    assert_eq!(r["service_ports"][1]["chains"][0]["chain"], web_map);
    assert_eq!(strings(&r["services"]), ["demo/api", "demo/web"], "{r:#}");
    let repair = strings(&r["repair"]);
    assert!(
        repair
            .iter()
            .any(|l| l.starts_with("add element ip svcproxy service-ips {") && l.contains(&api_key)),
        "{repair:?}"
    );
    assert!(
        repair
            .iter()
            .any(|l| l.starts_with(&format!("add element ip svcproxy {map} {{"))
                && l.contains(": 10.244.0.13 . 8080")),
        "{repair:?}"
    );
    let (code, text, _) = node.nft_cli(&["diff"]);
    assert_eq!(code, 1);
    insta::assert_snapshot!("diff_nft_missing_element_and_rule", text);

    // The repair diff shows is the one a restarted daemon applies.
    let mut proxy = Svcproxy::start(
        node.ns(),
        &["--manifests", node.dir(), "--proxy-mode", "nftables"],
    );
    wait_until(WAIT, POLL, "the restarted daemon repairs the table", || {
        proxy.assert_running();
        (node.nft_cli(&["diff"]).0 == 0).then_some(())
    });
    let (code, r) = node.nft_json(&["explain", "--from", "demo/client", "--to", "demo/api:http"]);
    assert_eq!((code, &r["agree"]), (0, &Value::Bool(true)), "{r:#}");
    tcp_request(node.client.ns(), vip(API_VIP), T).expect("repaired");
}
