//! The Kubernetes source end to end: svcproxy lists and watches a fake API server speaking the real protocol,
//! and the kernel rules and real traffic follow creates, updates, deletes, relists and outages.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{Svcproxy, TempDir};
use serde_json::{Value, json};
use svcproxy_testkit::{Backend, FakeApiServer, Lab, spread, tcp_request, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);

fn service(name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo", "labels": labels},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}
    })
}

fn slice(service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-a"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints
    })
}

fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDR": "10.244.0.0/24"}
    })
}

fn identities(ns: &svcproxy_testkit::NetNs, vip: SocketAddr) -> BTreeSet<String> {
    spread(ns, vip, 30).into_keys().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn rules_follow_the_api_through_changes_relists_and_outages() {
    let lab = Lab::new();
    let pods: Vec<_> = (11..=12)
        .map(|i| lab.add_pod(&format!("pod{i}"), Ipv4Addr::new(10, 244, 0, i)))
        .collect();
    let _backends: Vec<_> = pods
        .iter()
        .map(|p| Backend::start(p.ns(), p.name(), &[8080], &[]))
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));

    let api = FakeApiServer::start_in(lab.node(), "127.0.0.1:0".parse().unwrap());
    let store = api.store();
    store.apply(node()).unwrap();
    store.apply(service("web", "10.96.0.100", json!({}))).unwrap();
    store
        .apply(slice("web", &["10.244.0.11", "10.244.0.12"]))
        .unwrap();
    // Handed to another proxy: svcproxy must never see it (the selector is applied by the server).
    store
        .apply(service(
            "other",
            "10.96.0.101",
            json!({"service.kubernetes.io/service-proxy-name": "x"}),
        ))
        .unwrap();
    store.apply(slice("other", &["10.244.0.11"])).unwrap();

    let dir = TempDir::new("kubeconfig");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let mut proxy = Svcproxy::start(lab.node(), &["--kubeconfig", kubeconfig.to_str().unwrap()]);

    let vip: SocketAddr = "10.96.0.100:80".parse().unwrap();
    wait_until(WAIT, POLL, "web reaches both pods", || {
        proxy.assert_running();
        (identities(client.ns(), vip) == set(&["pod11", "pod12"])).then_some(())
    });
    assert!(
        tcp_request(client.ns(), "10.96.0.101:80".parse().unwrap(), T).is_err(),
        "a service labelled for another proxy must not be programmed"
    );
    // The start is announced on the Node, as kube-proxy's `Starting` Event.
    let started = wait_until(WAIT, POLL, "a Starting Event on the Node", || {
        store
            .list("Event")
            .into_iter()
            .find(|e| e["reason"] == "Starting")
    });
    assert_eq!(started["regarding"]["kind"], "Node", "{started:#}");
    assert_eq!(started["regarding"]["name"], "node-a", "{started:#}");
    assert_eq!(started["action"], "StartKubeProxy", "{started:#}");
    assert_eq!(started["reportingInstance"], "node-a", "{started:#}");
    assert_eq!(started["metadata"]["namespace"], "default", "{started:#}");
    let log = store.request_log();
    assert!(
        log.iter().any(|r| r.path == "/api/v1/services"
            && r.param("labelSelector")
                == Some("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")),
        "upstream's label selector is sent: {log:?}"
    );

    // Update: an endpoint goes away.
    store.apply(slice("web", &["10.244.0.12"])).unwrap();
    wait_until(WAIT, POLL, "only pod12 answers", || {
        (identities(client.ns(), vip) == set(&["pod12"])).then_some(())
    });

    // A new Service appears; a malformed one is rejected without harming the rest.
    store.apply(service("api", "10.96.0.102", json!({}))).unwrap();
    store.apply(slice("api", &["10.244.0.11"])).unwrap();
    let mut bad = service("web", "10.96.0.100", json!({}));
    bad["spec"]["ports"][0]["protocol"] = json!("ICMP");
    store.apply(bad).unwrap();
    let api_vip: SocketAddr = "10.96.0.102:80".parse().unwrap();
    wait_until(WAIT, POLL, "the new service answers", || {
        tcp_request(client.ns(), api_vip, T).ok()
    });
    wait_until(WAIT, POLL, "the rejection is logged", || {
        proxy
            .log()
            .contains("Service demo/web: invalid field spec.ports[0].protocol")
            .then_some(())
    });
    assert_eq!(
        tcp_request(client.ns(), vip, T).unwrap().identity,
        "pod12",
        "last good web stays programmed"
    );
    let rejected = common::metric_value(&proxy.metrics(lab.node()), "svcproxy_rejected_objects_total");
    assert_eq!(rejected, Some(1.0), "one object version rejected");
    store.apply(service("web", "10.96.0.100", json!({}))).unwrap();

    // The API server loses its history and drops every watch: svcproxy relists (410 Gone) and converges on
    // what changed meanwhile, without dropping what is programmed.
    store.compact();
    store.break_watches();
    store
        .apply(slice("web", &["10.244.0.11", "10.244.0.12"]))
        .unwrap();
    wait_until(WAIT, POLL, "after the relist both pods answer", || {
        (identities(client.ns(), vip) == set(&["pod11", "pod12"])).then_some(())
    });

    // An outage: lists fail for a while; programmed rules keep working, and changes arrive afterwards.
    store.set_fail_lists(3);
    store.break_watches();
    assert_eq!(
        identities(client.ns(), vip),
        set(&["pod11", "pod12"]),
        "rules survive the outage"
    );
    store.delete("Service", Some("demo"), "api");
    wait_until(WAIT, POLL, "the deleted service is gone", || {
        tcp_request(client.ns(), api_vip, T).is_err().then_some(())
    });
    let nat = lab.node().exec_stdout(&["iptables-save", "-t", "nat"]).unwrap();
    assert!(
        !nat.contains("demo/api"),
        "no rule of the deleted service is left:\n{nat}"
    );

    // A long outage is reported by status (and so by explain), with when it began; healthz stays green so
    // load balancers keep the node; once the API answers again the report clears.
    let status = || common::status_json(lab.node());
    store.set_fail_lists(1_000_000);
    store.set_fail_watches(1_000_000);
    store.break_watches();
    let reported = wait_until(WAIT, POLL, "status reports the API unreachable", || {
        proxy.assert_running();
        status()["source_problem"]["error"].as_str().map(str::to_string)
    });
    assert!(
        reported.contains("500") || reported.contains("rror"),
        "{reported}"
    );
    let (code, _) =
        svcproxy_testkit::http_get(lab.node(), "127.0.0.1:10256".parse().unwrap(), "/healthz", T).unwrap();
    assert_eq!(code, 200, "an API outage does not turn the node red");
    store.set_fail_lists(0);
    store.set_fail_watches(0);
    wait_until(WAIT, POLL, "the report clears once the API answers", || {
        proxy.assert_running();
        status()["source_problem"].is_null().then_some(())
    });
    proxy.assert_running();

    // client-go's request series count what the API server answered, the refused lists among them.
    let metrics = proxy.metrics(lab.node());
    let requests = |code: &str| -> f64 {
        let prefix = format!("rest_client_requests_total{{code=\"{code}\",host=\"127.0.0.1:");
        metrics
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains("method=\"GET\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert!(requests("200") >= 3.0, "{metrics}");
    assert!(requests("500") >= 1.0, "{metrics}");
    assert!(
        metrics.contains("rest_client_request_duration_seconds_count{host=\"127.0.0.1:"),
        "{metrics}"
    );
}

/// A node with one pod behind `web` (10.96.0.100), a client pod, and an API server that holds them, with the
/// path for a kubeconfig.
struct OnePodNode {
    lab: Lab,
    client: svcproxy_testkit::Pod,
    api: FakeApiServer,
    kubeconfig: std::path::PathBuf,
    _pod: (svcproxy_testkit::Pod, Backend),
    _dir: TempDir,
}

fn one_pod_node() -> OnePodNode {
    let lab = Lab::new();
    let pod = lab.add_pod("pod11", Ipv4Addr::new(10, 244, 0, 11));
    let backend = Backend::start(pod.ns(), "pod11", &[8080], &[]);
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
    let api = FakeApiServer::start_in(lab.node(), "127.0.0.1:0".parse().unwrap());
    let store = api.store();
    store.apply(node()).unwrap();
    store.apply(service("web", "10.96.0.100", json!({}))).unwrap();
    store.apply(slice("web", &["10.244.0.11"])).unwrap();
    let dir = TempDir::new("kubeconfig");
    let kubeconfig = dir.path().join("kubeconfig");
    OnePodNode {
        lab,
        client,
        api,
        kubeconfig,
        _pod: (pod, backend),
        _dir: dir,
    }
}

impl OnePodNode {
    /// svcproxy started with a kubeconfig naming the API server.
    fn start_proxy(&self) -> Svcproxy {
        self.start_proxy_with(&[])
    }

    /// The same, with more arguments.
    fn start_proxy_with(&self, args: &[&str]) -> Svcproxy {
        self.api.write_kubeconfig(&self.kubeconfig).unwrap();
        let mut all = vec!["--kubeconfig", self.kubeconfig.to_str().unwrap()];
        all.extend_from_slice(args);
        Svcproxy::start(self.lab.node(), &all)
    }

    /// `web` answers the client pod, while svcproxy keeps running.
    fn wait_for_web(&self, proxy: &mut Svcproxy, patience: Duration, what: &str) {
        wait_until(patience, POLL, what, || {
            proxy.assert_running();
            tcp_request(self.client.ns(), WEB.parse().unwrap(), T).ok()
        });
    }

    /// `svcproxy explain` of a connection from the client pod to `to`, reading the cluster from the API server
    /// with the daemon's flags and `args`, as JSON.
    fn explain_from_the_client(&self, to: &str, args: &[&str]) -> Value {
        let out = self
            .lab
            .node()
            .command(env!("CARGO_BIN_EXE_svcproxy"))
            .args(["explain", "--kubeconfig", self.kubeconfig.to_str().unwrap()])
            .args(["--hostname-override", "node-a", "--cluster-cidr", "10.244.0.0/16"])
            .args(["--from", "10.244.0.50", "--to", to, "--output", "json"])
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// `svcproxy status --output json`.
    fn status(&self) -> Value {
        common::status_json(self.lab.node())
    }

    fn healthz(&self) -> (u16, String) {
        svcproxy_testkit::http_get(self.lab.node(), "127.0.0.1:10256".parse().unwrap(), "/healthz", T)
            .unwrap()
    }
}

const WEB: &str = "10.96.0.100:80";

/// Writes `api`'s kubeconfig to `path` with its server moved to a port nothing listens on.
fn write_kubeconfig_pointing_nowhere(api: &FakeApiServer, path: &std::path::Path) {
    let nowhere = api
        .kubeconfig_yaml()
        .replace(&api.addr().to_string(), "127.0.0.1:9");
    assert_ne!(nowhere, api.kubeconfig_yaml(), "the server line was rewritten");
    std::fs::write(path, nowhere).unwrap();
}

/// A node's kube-proxy arguments start svcproxy: `--master` overrides the kubeconfig's server (which points
/// nowhere here), klog's `--v` is taken, `--oom-score-adj` is accepted, and flags for things svcproxy does not
/// have are accepted and logged.
#[test]
fn kube_proxy_arguments_start_it_and_master_overrides_the_kubeconfig() {
    let node_setup = one_pod_node();
    let (lab, client, api, kubeconfig) = (
        &node_setup.lab,
        &node_setup.client,
        &node_setup.api,
        &node_setup.kubeconfig,
    );
    write_kubeconfig_pointing_nowhere(api, kubeconfig);
    let mut proxy = Svcproxy::start(
        lab.node(),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--master",
            &api.url(),
            "--v=2",
            "--oom-score-adj=-999",
            "--feature-gates=NFTablesProxyMode=true",
            "--kube-api-qps=5",
        ],
    );

    let vip: SocketAddr = "10.96.0.100:80".parse().unwrap();
    wait_until(
        WAIT,
        POLL,
        "web answers through the server --master names",
        || {
            proxy.assert_running();
            tcp_request(client.ns(), vip, T).ok()
        },
    );
    let log = proxy.log();
    for flag in ["--feature-gates", "--kube-api-qps"] {
        assert!(
            log.contains(&format!("{flag}: accepted but has no effect")),
            "{flag} not logged:\n{log}"
        );
    }
    proxy.assert_running();

    // An init container's `--init-only` applies the privileged start-up settings and exits; GCE's ipvs
    // flags, which it passes in every mode, do not stop it.
    let route_localnet = || {
        lab.node()
            .exec_stdout(&["cat", "/proc/sys/net/ipv4/conf/all/route_localnet"])
            .unwrap()
    };
    assert_eq!(route_localnet().trim(), "0");
    let out = lab
        .node()
        .command(env!("CARGO_BIN_EXE_svcproxy"))
        .args(["run", "--manifests", "/nonexistent", "--init-only"])
        .args([
            "--iptables-localhost-nodeports",
            "--ipvs-sync-period=1m",
            "--ipvs-min-sync-period=10s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--ipvs-*: accepted but has no effect"),
        "{stderr}"
    );
    assert_eq!(route_localnet().trim(), "1");
}

/// The cluster autoscaler marks the node for deletion, then deletes its Node object: /healthz turns 503 with
/// `nodeEligible: false` and stays so (the machine is going away), while the rules keep serving.
#[test]
fn a_node_marked_for_deletion_stays_ineligible_once_deleted() {
    let node_setup = one_pod_node();
    let client = &node_setup.client;
    let store = node_setup.api.store();
    let mut proxy = node_setup.start_proxy();
    let vip: SocketAddr = WEB.parse().unwrap();
    node_setup.wait_for_web(&mut proxy, WAIT, "web answers");
    let healthz = || node_setup.healthz();
    assert_eq!(healthz().0, 200);

    let mut tainted = node();
    tainted["spec"]["taints"] = json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]);
    store.apply(tainted).unwrap();
    wait_until(WAIT, POLL, "the node is ineligible", || {
        let (code, body) = healthz();
        (code == 503 && body.contains("\"nodeEligible\": false")).then_some(())
    });
    // A Node change rewrites everything (its labels choose endpoints): a new sync says the deletion arrived.
    let syncs = || proxy.log().matches("synced").count();
    let before = syncs();
    store.delete("Node", None, "node-a").unwrap();
    wait_until(WAIT, POLL, "svcproxy saw the Node go", || {
        (syncs() > before).then_some(())
    });
    let (code, body) = healthz();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"nodeEligible\": false"), "{body}");
    assert!(tcp_request(client.ns(), vip, T).is_ok(), "the rules keep serving");
    proxy.assert_running();
}

/// The API server cannot be listed at all (unreachable here; missing RBAC for Services or EndpointSlices does
/// the same):
/// nothing is programmed, so once 2 × syncPeriod has passed /healthz is red and says why, while /livez stays
/// green (listing again after a restart would not help).
#[test]
fn initial_lists_that_never_complete_turn_healthz_red_and_not_livez() {
    let lab = Lab::new();
    let dir = TempDir::new("kubeconfig");
    let kubeconfig = dir.path().join("kubeconfig");
    let api = FakeApiServer::start_in(lab.node(), "127.0.0.1:0".parse().unwrap());
    write_kubeconfig_pointing_nowhere(&api, &kubeconfig);
    let mut proxy = Svcproxy::start(
        lab.node(),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--sync-period",
            "2s",
        ],
    );
    let get =
        |path: &str| svcproxy_testkit::http_get(lab.node(), "127.0.0.1:10256".parse().unwrap(), path, T).ok();
    wait_until(WAIT, POLL, "healthz turns red, naming the lists", || {
        proxy.assert_running();
        get("/healthz").filter(|(code, body)| *code == 503 && body.contains("initial lists"))
    });
    assert_eq!(get("/livez").map(|(code, _)| code), Some(200));
}

/// A ServiceAccount that may list Services and EndpointSlices but not Nodes: kube-proxy programs the node
/// all the same, so svcproxy waits 30 s for the Node, then programs without it, healthy, and does not call
/// the API server unreachable (it answers, with 403). Once the Node can be listed it is applied like any
/// change.
#[test]
fn a_node_the_api_refuses_to_list_delays_the_first_sync_but_does_not_stop_it() {
    let node_setup = one_pod_node();
    let store = node_setup.api.store();
    store.forbid("Node");
    let mut proxy = node_setup.start_proxy();
    node_setup.wait_for_web(
        &mut proxy,
        Duration::from_secs(60),
        "web answers without the Node",
    );
    let log = proxy.log();
    assert!(
        log.contains("Node node-a not listed after 30s") && log.contains("403"),
        "{log}"
    );
    // Retried all along, the refusal is logged once.
    assert_eq!(log.matches("watch of Node node-a failed").count(), 1, "{log}");
    let (code, body) = node_setup.healthz();
    assert_eq!(code, 200, "{body}");
    let status = node_setup.status();
    assert_eq!(status["syncs"].as_u64().map(|n| n > 0), Some(true), "{status}");
    assert!(status["source_problem"].is_null(), "{status}");

    let syncs = || proxy.log().matches("synced").count();
    let before = syncs();
    store.permit("Node");
    wait_until(WAIT, POLL, "the Node is listed and applied", || {
        (proxy.log().contains("Node node-a listed at last") && syncs() > before).then_some(())
    });
    node_setup.wait_for_web(&mut proxy, T, "web still answers");
}

fn service_cidr(name: &str, cidrs: &[&str]) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": cidrs}
    })
}

/// ServiceCIDRs in nftables mode: a new connection to an address in one that is no Service's ClusterIP is
/// dropped, where it would otherwise leave by the node's default route. Here the external host (the default
/// route) owns such an address and answers on it, so a missing drop shows as a reply. The API server starts
/// out not serving ServiceCIDRs at all (404, as a cluster before they existed): svcproxy must program at once
/// without them, call nothing an outage, and pick them up once they are served.
#[test]
fn service_cidrs_drop_traffic_to_unallocated_cluster_ips_in_nftables_mode() {
    let node = one_pod_node();
    let store = node.api.store();
    let unallocated: SocketAddr = "10.96.7.7:80".parse().unwrap();
    let ext = node.lab.external();
    ext.exec(&["ip", "addr", "add", "10.96.7.7/32", "dev", "lo"])
        .unwrap();
    let _leak = Backend::start(ext, "leaked", &[80], &[]);
    store.unserve("ServiceCIDR");
    store
        .apply(service_cidr("kubernetes", &["10.96.0.0/16", "fd00:10:96::/112"]))
        .unwrap();
    store.apply(service_cidr("extra", &["10.100.0.0/24"])).unwrap();

    let mut proxy = node.start_proxy_with(&["--proxy-mode", "nftables"]);
    // Not the 30 s wait for a list that may still come: a 404 says there is nothing to wait for.
    node.wait_for_web(
        &mut proxy,
        Duration::from_secs(20),
        "web answers without ServiceCIDRs",
    );
    let reply = tcp_request(node.client.ns(), unallocated, T).expect("without ServiceCIDRs nothing drops");
    assert_eq!(reply.identity, "leaked");
    let log = proxy.log();
    assert!(
        log.contains("ServiceCIDRs cannot be listed") && log.contains("404"),
        "{log}"
    );
    assert!(node.status()["source_problem"].is_null(), "a 404 is no outage");
    // `explain` reads the cluster the same way: no ranges, nothing left out, kernel and intent agree.
    let nft = ["--proxy-mode", "nftables"];
    let r = node.explain_from_the_client("10.96.7.7:80/tcp", &nft);
    assert_eq!(
        (&r["agree"], &r["kernel"]["verdict"]),
        (&json!(true), &json!("accept")),
        "{r:#}"
    );
    assert!(
        !r["notes"].to_string().contains("left out of the intent"),
        "a cluster without ServiceCIDRs has none to leave out: {r:#}"
    );

    store.serve("ServiceCIDR");
    wait_until(WAIT, POLL, "the unallocated address is dropped", || {
        proxy.assert_running();
        matches!(
            tcp_request(node.client.ns(), unallocated, T),
            Err(svcproxy_testkit::ClientError::Timeout)
        )
        .then_some(())
    });
    assert!(
        proxy.log().contains("ServiceCIDRs listed at last"),
        "{}",
        proxy.log()
    );
    assert_eq!(
        node.status()["service_cidrs"],
        json!(["10.96.0.0/16", "10.100.0.0/24"]),
        "the IPv4 engine's ranges, as status reports them"
    );
    // What is allocated still works, an undefined port of a ClusterIP is still refused, and both families'
    // tables hold their own ranges, which the read-back after the sync found as written.
    node.wait_for_web(&mut proxy, T, "web still answers");
    assert!(matches!(
        tcp_request(node.client.ns(), "10.96.0.100:81".parse().unwrap(), T),
        Err(svcproxy_testkit::ClientError::Refused)
    ));
    let table = |family: &str| {
        node.lab
            .node()
            .exec_stdout(&["nft", "list", "chain", family, "svcproxy", "cluster-ips-check"])
            .unwrap()
    };
    let v4 = table("ip");
    assert!(
        v4.contains("10.96.0.0/16") && v4.contains("10.100.0.0/24") && !v4.contains("fd00"),
        "{v4}"
    );
    let v6 = table("ip6");
    assert!(v6.contains("fd00:10:96::/112") && !v6.contains("10.96"), "{v6}");
    proxy.assert_no_divergence();
    let r = node.explain_from_the_client("10.96.7.7:80/tcp", &nft);
    assert_eq!(
        (&r["agree"], &r["intent"]["verdict"]),
        (&json!(true), &json!("drop")),
        "{r:#}"
    );

    // A range given up is open again (and the other one still drops).
    store.delete("ServiceCIDR", None, "kubernetes");
    wait_until(WAIT, POLL, "the range is no longer dropped", || {
        tcp_request(node.client.ns(), unallocated, T).ok()
    });
    let v4 = table("ip");
    assert!(
        !v4.contains("10.96.0.0/16") && v4.contains("10.100.0.0/24"),
        "{v4}"
    );
    proxy.assert_no_divergence();
    proxy.assert_running();
}
