//! Every Service behaviour on a real kernel with real traffic: NodePorts, externalIPs, load-balancer IPs with
//! source ranges, the Local traffic policies, session affinity and the terminating fallback.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{Svcproxy, TempDir};
use svcproxy_testkit::{Backend, Lab, Pod, spread, tcp_request, udp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);
const EXTERNAL: &str = "10.0.0.20";

/// One endpoint of the test service: its pod address, the node it claims to run on, and its conditions.
struct Ep {
    ip: &'static str,
    node: &'static str,
    conditions: &'static str,
}

const fn ready(ip: &'static str, node: &'static str) -> Ep {
    Ep {
        ip,
        node,
        conditions: "{ready: true}",
    }
}

/// A Service named `svc` in namespace `t` with one TCP and one UDP port, and its slice.
fn manifest(spec_extra: &str, status: &str, eps: &[Ep]) -> String {
    let endpoints: String = eps
        .iter()
        .map(|e| {
            format!(
                "- addresses: [{}]\n  conditions: {}\n  nodeName: {}\n",
                e.ip, e.conditions, e.node
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: svc, namespace: t}}
spec:
  clusterIP: 10.96.0.50
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}
{spec_extra}
{status}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-1
  namespace: t
  labels: {{kubernetes.io/service-name: svc}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
{endpoints}"
    )
}

struct Setup {
    lab: Lab,
    pods: Vec<Pod>,
    _backends: Vec<Backend>,
    client: Pod,
    dir: TempDir,
    proxy: Svcproxy,
}

fn setup(mode: &str, manifest_text: &str) -> Setup {
    setup_with(mode, manifest_text, &[])
}

fn setup_with(mode: &str, manifest_text: &str, extra_args: &[&str]) -> Setup {
    let lab = Lab::new();
    let pods: Vec<Pod> = (11..=12)
        .map(|i| lab.add_pod(&format!("pod{i}"), Ipv4Addr::new(10, 244, 0, i)))
        .collect();
    let backends = pods
        .iter()
        .map(|p| Backend::start(p.ns(), p.name(), &[8080], &[5353]))
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
    // The outside host reaches the example external and load-balancer ranges through the node, as a router would.
    for net in ["192.0.2.0/24", "198.51.100.0/24"] {
        lab.external()
            .exec(&["ip", "route", "add", net, "via", "10.0.0.10"])
            .unwrap();
    }
    let dir = TempDir::new("svc");
    dir.write("svc.yaml", manifest_text);
    let mut args = vec!["--manifests", dir.path().to_str().unwrap(), "--proxy-mode", mode];
    args.extend_from_slice(extra_args);
    let proxy = Svcproxy::start(lab.node(), &args);
    Setup {
        lab,
        pods,
        _backends: backends,
        client,
        dir,
        proxy,
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn ids(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

impl Setup {
    fn wait_for(&mut self, what: &str, mut f: impl FnMut(&Setup) -> bool) {
        wait_until(WAIT, POLL, what, || {
            self.proxy.assert_running();
            f(self).then_some(())
        });
    }
}

fn reachable_from(ns: &svcproxy_testkit::NetNs, to: SocketAddr) -> BTreeSet<String> {
    spread(ns, to, 24).into_keys().collect()
}

fn node_port_from_outside_is_masqueraded_and_spread(mode: &str) {
    let mut s = setup(
        mode,
        &manifest(
            "  type: NodePort",
            "",
            &[ready("10.244.0.11", "node-b"), ready("10.244.0.12", "node-b")],
        ),
    );
    let np = addr("10.0.0.10", 30080);
    s.wait_for("the NodePort spreads over both pods", |s| {
        reachable_from(s.lab.external(), np) == ids(&["pod11", "pod12"])
    });
    let reply = tcp_request(s.lab.external(), np, T).unwrap();
    assert_ne!(
        reply.seen_source.ip().to_string(),
        EXTERNAL,
        "eTP=Cluster masquerades external clients"
    );
    let reply = udp_request(s.lab.external(), addr("10.0.0.10", 30053), T).unwrap();
    assert!(reply.identity.starts_with("pod"), "UDP NodePort: {reply:?}");
    s.proxy.assert_no_divergence();
}

fn external_traffic_policy_local_keeps_the_source_and_drops_without_local_endpoints(mode: &str) {
    let spec = "  type: NodePort\n  externalTrafficPolicy: Local";
    let mut s = setup(
        mode,
        &manifest(
            spec,
            "",
            &[ready("10.244.0.11", "node-a"), ready("10.244.0.12", "node-b")],
        ),
    );
    let np = addr("10.0.0.10", 30080);
    s.wait_for("only the local pod answers on the NodePort", |s| {
        reachable_from(s.lab.external(), np) == ids(&["pod11"])
    });
    let reply = tcp_request(s.lab.external(), np, T).unwrap();
    assert_eq!(
        reply.seen_source.ip().to_string(),
        EXTERNAL,
        "eTP=Local preserves the client address"
    );
    // Pods use the cluster-wide set through the ClusterIP.
    assert_eq!(
        reachable_from(s.client.ns(), addr("10.96.0.50", 80)),
        ids(&["pod11", "pod12"])
    );

    // No local endpoint left: external traffic is dropped on this node (the load balancer's health check
    // takes the node out), while cluster traffic still flows.
    s.dir
        .write("svc.yaml", &manifest(spec, "", &[ready("10.244.0.12", "node-b")]));
    s.wait_for("the NodePort drops", |s| {
        tcp_request(s.lab.external(), np, T).is_err()
    });
    let metrics = s.proxy.metrics(s.lab.node());
    let name =
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}";
    assert_eq!(
        common::metric_value(&metrics, name),
        Some(2.0),
        "both ports lack a local endpoint:\n{metrics}"
    );
    assert!(matches!(
        tcp_request(s.lab.external(), np, T),
        Err(svcproxy_testkit::ClientError::Timeout)
    ));
    assert_eq!(
        reachable_from(s.client.ns(), addr("10.96.0.50", 80)),
        ids(&["pod12"])
    );
    s.proxy.assert_no_divergence();
}

fn load_balancer_ip_honours_source_ranges(mode: &str) {
    let spec = |range: &str| format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [{range}]");
    let status = "status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.10";
    let eps = [ready("10.244.0.11", "node-b")];
    let mut s = setup(mode, &manifest(&spec("10.0.0.0/24"), status, &eps));
    let lb = addr("192.0.2.10", 80);
    s.wait_for("an allowed client reaches the LB IP", |s| {
        tcp_request(s.lab.external(), lb, T).is_ok()
    });

    s.dir
        .write("svc.yaml", &manifest(&spec("203.0.113.0/24"), status, &eps));
    s.wait_for("a client outside the ranges is dropped", |s| {
        matches!(
            tcp_request(s.lab.external(), lb, T),
            Err(svcproxy_testkit::ClientError::Timeout)
        )
    });
    // Source ranges do not apply to the NodePort, as upstream decided.
    assert!(tcp_request(s.lab.external(), addr("10.0.0.10", 30080), T).is_ok());
    s.proxy.assert_no_divergence();
}

/// Source ranges of a Service without endpoints. In nftables mode, as in upstream's, the firewall stays: a
/// source outside the ranges is dropped without a word and only allowed sources are refused. In iptables
/// mode, as in upstream's, there is no firewall without endpoints and every source is refused.
fn load_balancer_source_ranges_without_endpoints(mode: &str) {
    use svcproxy_testkit::ClientError::{Refused, Timeout};
    let spec = |range: &str| format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [{range}]");
    let status = "status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.10";
    let none = [Ep {
        ip: "10.244.0.11",
        node: "node-a",
        conditions: "{ready: false, serving: false, terminating: false}",
    }];
    let mut s = setup(mode, &manifest(&spec("10.0.0.0/24"), status, &none));
    let lb = addr("192.0.2.10", 80);
    s.wait_for("an allowed client is refused: no endpoints", |s| {
        matches!(tcp_request(s.lab.external(), lb, T), Err(Refused))
    });

    s.dir
        .write("svc.yaml", &manifest(&spec("203.0.113.0/24"), status, &none));
    if mode == "nftables" {
        s.wait_for("a client outside the ranges is dropped", |s| {
            matches!(tcp_request(s.lab.external(), lb, T), Err(Timeout))
        });
    } else {
        // Refused before the change reaches the kernel and after it alike.
        assert!(matches!(tcp_request(s.lab.external(), lb, T), Err(Refused)));
    }
    // The NodePort is not guarded by the ranges: refused either way.
    assert!(matches!(
        tcp_request(s.lab.external(), addr("10.0.0.10", 30080), T),
        Err(Refused)
    ));
    s.proxy.assert_no_divergence();
}

fn external_ips_reach_the_endpoints(mode: &str) {
    let spec = "  externalIPs: [198.51.100.5]";
    let mut s = setup(mode, &manifest(spec, "", &[ready("10.244.0.11", "node-b")]));
    let eip = addr("198.51.100.5", 80);
    s.wait_for("the external IP answers", |s| {
        tcp_request(s.lab.external(), eip, T).is_ok_and(|r| r.identity == "pod11")
    });
    s.proxy.assert_no_divergence();
}

/// `t/capture` (ClusterIP 10.96.0.60, `http` on 80, endpoint pod12), with `spec_extra` added to its spec.
fn capture(spec_extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: capture, namespace: t}}
spec:
  clusterIP: 10.96.0.60
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
{spec_extra}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: capture-1
  namespace: t
  labels: {{kubernetes.io/service-name: capture}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
- addresses: [10.244.0.12]
  conditions: {{ready: true}}
  nodeName: node-b
"
    )
}

/// A second Service naming another's external IP and port takes its traffic when it sorts first, in both
/// modes, and svcproxy says so in its log, its status and `svcproxy_contested_frontends`; once the claim is
/// withdrawn the address is the first Service's again.
/// What `svcproxy_contested_frontends` says for IPv4.
fn contested_frontends(s: &Setup) -> Option<f64> {
    common::metric_value(
        &s.proxy.metrics(s.lab.node()),
        "svcproxy_contested_frontends{ip_family=\"IPv4\"}",
    )
}

/// `t/capture` won `frontend` from `t/svc`, and the log, the gauge, `svcproxy status` and `explain` of a
/// packet to `explain_to` (the frontend as a destination) say so; `explain` traces it to the winner.
fn assert_contest_reported(s: &Setup, frontend: &str, explain_to: &str) {
    let sentence = format!(
        "{frontend} claimed by more than one service port: t/capture:http gets its traffic, t/svc:http none \
         of it there"
    );
    let log = s.proxy.log();
    assert!(log.contains(&sentence), "{log}");
    assert_eq!(contested_frontends(s), Some(1.0));
    let status = common::status_json(s.lab.node());
    assert_eq!(
        status["contested"],
        serde_json::json!([{
            "frontend": frontend,
            "winner": "t/capture:http",
            "others": ["t/svc:http"],
        }]),
        "{status}"
    );
    let explained = common::explain_json(
        s.lab.node(),
        &["--daemon", "--from", EXTERNAL, "--to", explain_to],
    );
    assert_eq!(explained["service"]["name"], "t/capture:http", "{explained}");
    assert!(
        explained["notes"]
            .as_array()
            .is_some_and(|notes| notes.iter().any(|n| *n == *sentence)),
        "{explained}"
    );
}

fn a_contested_external_ip_goes_to_the_first_claimant_and_is_reported(mode: &str) {
    let spec = "  externalIPs: [198.51.100.5]";
    let mut s = setup(mode, &manifest(spec, "", &[ready("10.244.0.11", "node-b")]));
    let eip = addr("198.51.100.5", 80);
    let answered_by = |s: &Setup| tcp_request(s.lab.external(), eip, T).map(|r| r.identity);
    s.wait_for("the external IP answers", |s| {
        answered_by(s).is_ok_and(|id| id == "pod11")
    });
    assert_eq!(contested_frontends(&s), Some(0.0));

    // `t/capture` sorts before `t/svc`: it wins the address.
    s.dir.write("capture.yaml", &capture(spec));
    s.wait_for("the capturing Service gets the external IP", |s| {
        answered_by(s).is_ok_and(|id| id == "pod12")
    });
    assert_contest_reported(&s, "198.51.100.5:80/tcp", "198.51.100.5:80/tcp");
    // The cluster IPs are not contested: each still reaches its own Service.
    assert_eq!(
        tcp_request(s.client.ns(), addr("10.96.0.60", 80), T)
            .unwrap()
            .identity,
        "pod12"
    );
    assert_eq!(
        tcp_request(s.client.ns(), addr("10.96.0.50", 80), T)
            .unwrap()
            .identity,
        "pod11"
    );

    // Withdrawn, the address is `t/svc`'s again.
    s.dir.write("capture.yaml", &capture(""));
    s.wait_for("the external IP is the first Service's again", |s| {
        answered_by(s).is_ok_and(|id| id == "pod11")
    });
    s.wait_for("the contest is over", |s| contested_frontends(s) == Some(0.0));
    assert!(
        s.proxy
            .log()
            .contains("198.51.100.5:80/tcp is claimed by one service port again"),
        "{}",
        s.proxy.log()
    );
    s.proxy.assert_no_divergence();
}

/// Hand-written manifests can give two Services one node port (the API server would not): the first in name
/// order gets it on every node address, and svcproxy says so, as for an address.
fn a_contested_node_port_goes_to_the_first_claimant_and_is_reported(mode: &str) {
    let mut s = setup(
        mode,
        &manifest("  type: NodePort", "", &[ready("10.244.0.11", "node-b")]),
    );
    let node_port = addr("10.0.0.10", 30080);
    let answered_by = |s: &Setup| tcp_request(s.lab.external(), node_port, T).map(|r| r.identity);
    s.wait_for("the node port answers", |s| {
        answered_by(s).is_ok_and(|id| id == "pod11")
    });
    assert_eq!(contested_frontends(&s), Some(0.0));

    let capturing =
        capture("  type: NodePort").replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}");
    s.dir.write("capture.yaml", &capturing);
    s.wait_for("the capturing Service gets the node port", |s| {
        answered_by(s).is_ok_and(|id| id == "pod12")
    });
    assert_contest_reported(&s, "node port 30080/tcp", "10.0.0.10:30080/tcp");

    // Withdrawn, the node port is `t/svc`'s again.
    s.dir.write("capture.yaml", &capture("  type: NodePort"));
    s.wait_for("the node port is the first Service's again", |s| {
        answered_by(s).is_ok_and(|id| id == "pod11")
    });
    s.wait_for("the contest is over", |s| contested_frontends(s) == Some(0.0));
    let log = s.proxy.log();
    assert!(
        log.contains("node port 30080/tcp is claimed by one service port again"),
        "{log}"
    );
    s.proxy.assert_no_divergence();
}

fn internal_traffic_policy_local_uses_only_local_endpoints(mode: &str) {
    let spec = "  internalTrafficPolicy: Local";
    let mut s = setup(
        mode,
        &manifest(
            spec,
            "",
            &[ready("10.244.0.11", "node-a"), ready("10.244.0.12", "node-b")],
        ),
    );
    let vip = addr("10.96.0.50", 80);
    s.wait_for("only the local pod answers", |s| {
        reachable_from(s.client.ns(), vip) == ids(&["pod11"])
    });

    s.dir
        .write("svc.yaml", &manifest(spec, "", &[ready("10.244.0.12", "node-b")]));
    s.wait_for("no local endpoint: dropped, not refused", |s| {
        matches!(
            tcp_request(s.client.ns(), vip, T),
            Err(svcproxy_testkit::ClientError::Timeout)
        )
    });
    s.proxy.assert_no_divergence();
}

fn client_ip_affinity_keeps_one_backend(mode: &str) {
    let spec = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}";
    let mut s = setup(
        mode,
        &manifest(
            spec,
            "",
            &[ready("10.244.0.11", "node-b"), ready("10.244.0.12", "node-b")],
        ),
    );
    let vip = addr("10.96.0.50", 80);
    s.wait_for("the service answers", |s| {
        tcp_request(s.client.ns(), vip, T).is_ok()
    });
    let seen = spread(s.client.ns(), vip, 30);
    assert_eq!(seen.len(), 1, "one client sticks to one backend: {seen:?}");
    // A different client may land elsewhere, but sticks too.
    let other = spread(s.pods[0].ns(), vip, 20);
    assert_eq!(other.len(), 1, "{other:?}");
    s.proxy.assert_no_divergence();
}

fn terminating_endpoints_serve_only_when_nothing_is_ready(mode: &str) {
    let terminating = "{ready: false, serving: true, terminating: true}";
    let eps = [
        Ep {
            ip: "10.244.0.11",
            node: "node-b",
            conditions: terminating,
        },
        ready("10.244.0.12", "node-b"),
    ];
    let mut s = setup(mode, &manifest("", "", &eps));
    let vip = addr("10.96.0.50", 80);
    s.wait_for("only the ready pod answers", |s| {
        reachable_from(s.client.ns(), vip) == ids(&["pod12"])
    });

    // The ready pod is gone: the terminating one still serves rather than the service going dark.
    s.dir.write(
        "svc.yaml",
        &manifest(
            "",
            "",
            &[Ep {
                ip: "10.244.0.11",
                node: "node-b",
                conditions: terminating,
            }],
        ),
    );
    s.wait_for("the terminating pod takes over", |s| {
        reachable_from(s.client.ns(), vip) == ids(&["pod11"])
    });

    // Not serving either: nothing can take traffic, so connections are refused.
    let gone = "{ready: false, serving: false, terminating: true}";
    s.dir.write(
        "svc.yaml",
        &manifest(
            "",
            "",
            &[Ep {
                ip: "10.244.0.11",
                node: "node-b",
                conditions: gone,
            }],
        ),
    );
    s.wait_for("refused", |s| {
        matches!(
            tcp_request(s.client.ns(), vip, T),
            Err(svcproxy_testkit::ClientError::Refused)
        )
    });
    s.proxy.assert_no_divergence();
}

fn health_check_node_port_follows_local_endpoints(mode: &str) {
    let spec = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000";
    let status = "status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.20";
    let mut s = setup(
        mode,
        &manifest(
            spec,
            status,
            &[ready("10.244.0.11", "node-a"), ready("10.244.0.12", "node-b")],
        ),
    );
    let hc = addr("10.0.0.10", 32000);
    let probe = |s: &Setup| svcproxy_testkit::http_get(s.lab.external(), hc, "/", T).ok();
    s.wait_for("the load balancer's probe sees a local endpoint", |s| {
        probe(s).is_some_and(|(code, _)| code == 200)
    });
    let (_, body) = probe(&s).unwrap();
    assert!(
        body.contains("\"localEndpoints\": 1") && body.contains("\"name\": \"svc\""),
        "{body}"
    );

    s.dir.write(
        "svc.yaml",
        &manifest(spec, status, &[ready("10.244.0.12", "node-b")]),
    );
    s.wait_for("503 once the node has no local endpoint", |s| {
        probe(s).is_some_and(|(code, _)| code == 503)
    });

    s.dir.write(
        "svc.yaml",
        &manifest(spec, status, &[ready("10.244.0.11", "node-a")]),
    );
    s.wait_for("200 again", |s| probe(s).is_some_and(|(code, _)| code == 200));

    // The Service stops being eTP=Local: the listener closes.
    s.dir.write(
        "svc.yaml",
        &manifest("  type: LoadBalancer", status, &[ready("10.244.0.11", "node-a")]),
    );
    s.wait_for("the listener is closed", |s| probe(s).is_none());
    s.proxy.assert_no_divergence();
}

/// `--iptables-localhost-nodeports` on a node that never had `route_localnet` set (a new namespace): the host
/// reaches NodePorts on 127.0.0.1, because svcproxy sets it.
#[test]
fn localhost_node_ports_answer_on_a_fresh_node() {
    let node_sysctl = |s: &Setup| {
        s.lab
            .node()
            .exec_stdout(&["cat", "/proc/sys/net/ipv4/conf/all/route_localnet"])
            .unwrap()
    };
    let manifest_text = manifest(
        "  type: NodePort",
        "",
        &[ready("10.244.0.11", "node-b"), ready("10.244.0.12", "node-b")],
    );
    let mut s = setup_with("iptables", &manifest_text, &["--iptables-localhost-nodeports"]);
    s.wait_for("the NodePort answers on 127.0.0.1", |s| {
        tcp_request(s.lab.node(), addr("127.0.0.1", 30080), T).is_ok()
    });
    assert_eq!(node_sysctl(&s).trim(), "1");
    s.proxy.assert_no_divergence();
}

/// With `--nodeport-addresses`, a health-check node port listens where NodePorts answer and nowhere else, as
/// upstream's does: a load balancer probes the node's address; another address of the node tells nobody
/// which Services have pods here.
fn health_check_node_port_listens_where_node_ports_answer(mode: &str) {
    let spec = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000";
    let status = "status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.20";
    let mut s = setup_with(
        mode,
        &manifest(spec, status, &[ready("10.244.0.11", "node-a")]),
        &["--nodeport-addresses", "10.0.0.0/24"],
    );
    s.lab
        .node()
        .exec(&["ip", "addr", "add", "192.168.77.1/32", "dev", "lo"])
        .unwrap();
    let probe = |s: &Setup, ip: &str| svcproxy_testkit::http_get(s.lab.node(), addr(ip, 32000), "/", T);
    s.wait_for("the probe answers on the node's NodePort address", |s| {
        probe(s, "10.0.0.10").is_ok_and(|(code, _)| code == 200)
    });
    assert!(
        probe(&s, "192.168.77.1").is_err(),
        "nothing listens on the other address"
    );
    s.proxy.assert_no_divergence();
}

// Every behaviour runs against both backends through the same harness.
in_both_modes!(
    node_port_from_outside_is_masqueraded_and_spread,
    external_traffic_policy_local_keeps_the_source_and_drops_without_local_endpoints,
    load_balancer_ip_honours_source_ranges,
    load_balancer_source_ranges_without_endpoints,
    external_ips_reach_the_endpoints,
    a_contested_external_ip_goes_to_the_first_claimant_and_is_reported,
    a_contested_node_port_goes_to_the_first_claimant_and_is_reported,
    internal_traffic_policy_local_uses_only_local_endpoints,
    client_ip_affinity_keeps_one_backend,
    terminating_endpoints_serve_only_when_nothing_is_ready,
    health_check_node_port_follows_local_endpoints,
    health_check_node_port_listens_where_node_ports_answer,
);
