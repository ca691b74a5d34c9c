//! ClusterIP services on a real kernel, driven from a manifest directory: real TCP and UDP traffic from a pod
//! and from an outside host through the rules svcproxy writes.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{Svcproxy, TempDir, metric_value};
use svcproxy_testkit::{Backend, ClientError, Lab, http_get, spread, tcp_request, udp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);

fn web(endpoints: &[&str]) -> String {
    // When the EndpointSlice controller saw the change: svcproxy reports the latency from here to the kernel.
    let now = jiff::Timestamp::now();
    let eps: String = endpoints
        .iter()
        .map(|ip| format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: node-a\n"))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.0.100
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{now}\"}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
{eps}"
    )
}

const DNS: &str = "apiVersion: v1
kind: Service
metadata: {name: dns, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: demo
  labels: {kubernetes.io/service-name: dns}
addressType: IPv4
ports:
- {name: dns, protocol: UDP, port: 5353}
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
";

const EMPTY: &str = "apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: 10.96.0.200
  ports:
  - {protocol: TCP, port: 80}
";

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn identities(map: &std::collections::BTreeMap<String, usize>) -> BTreeSet<String> {
    map.keys().cloned().collect()
}

fn clusterip_traffic_follows_the_manifests(mode: &str) {
    let lab = Lab::new();
    let pods: Vec<_> = (11..=13)
        .map(|i| lab.add_pod(&format!("pod{i}"), Ipv4Addr::new(10, 244, 0, i)))
        .collect();
    let _backends: Vec<_> = pods
        .iter()
        .map(|p| Backend::start(p.ns(), p.name(), &[8080], &[5353]))
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));

    let dir = TempDir::new("manifests");
    dir.write("web.yaml", &web(&["10.244.0.11", "10.244.0.12", "10.244.0.13"]));
    dir.write("dns.yaml", DNS);
    dir.write("empty.yaml", EMPTY);
    let mut proxy = Svcproxy::start(
        lab.node(),
        &[
            "--manifests",
            dir.path().to_str().unwrap(),
            "--proxy-mode",
            mode,
            "--conntrack-tcp-be-liberal",
        ],
    );

    let vip = addr("10.96.0.100", 80);
    wait_until(WAIT, POLL, "the web ClusterIP answers", || {
        proxy.assert_running();
        tcp_request(client.ns(), vip, T).ok()
    });

    // Connections spread over every ready endpoint, and a pod's own source address is kept.
    let seen = spread(client.ns(), vip, 60);
    assert_eq!(
        identities(&seen),
        BTreeSet::from(["pod11".into(), "pod12".into(), "pod13".into()]),
        "{seen:?}"
    );
    let reply = tcp_request(client.ns(), vip, T).unwrap();
    assert_eq!(
        reply.seen_source.ip(),
        IpAddr::V4(client.ip()),
        "pod-to-ClusterIP keeps its source"
    );

    // UDP through the same machinery.
    let reply = udp_request(client.ns(), addr("10.96.0.10", 53), T).unwrap();
    assert!(["pod11", "pod12"].contains(&reply.identity.as_str()), "{reply:?}");

    // A service without endpoints refuses at once instead of letting clients hang.
    assert!(matches!(
        tcp_request(client.ns(), addr("10.96.0.200", 80), T),
        Err(ClientError::Refused)
    ));

    // A client outside the pod network is masqueraded, so the reply returns through this node.
    let reply = tcp_request(lab.external(), vip, T).unwrap();
    assert_ne!(
        reply.seen_source.ip(),
        "10.0.0.20".parse::<IpAddr>().unwrap(),
        "external client masqueraded"
    );

    // Hairpin: a pod reaching itself through its own Service is masqueraded, or the reply would bypass NAT.
    let own = wait_until(WAIT, POLL, "pod11 reaches itself through the ClusterIP", || {
        tcp_request(pods[0].ns(), vip, T)
            .ok()
            .filter(|r| r.identity == "pod11")
    });
    assert_ne!(
        own.seen_source.ip(),
        IpAddr::V4(pods[0].ip()),
        "hairpin traffic masqueraded"
    );

    // An endpoint removed from the slice gets no new connections after the next sync.
    dir.write("web.yaml", &web(&["10.244.0.11", "10.244.0.12"]));
    wait_until(WAIT, POLL, "pod13 no longer receives connections", || {
        let seen = spread(client.ns(), vip, 30);
        (identities(&seen) == BTreeSet::from(["pod11".into(), "pod12".into()])).then_some(())
    });

    // Health and metrics.
    let (status, body) = http_get(lab.node(), common::HEALTHZ.parse().unwrap(), "/healthz", T).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"nodeEligible\": true"), "{body}");
    let metrics = proxy.metrics(lab.node());
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        // The process's own, as every Prometheus client exports them.
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
    ] {
        assert!(
            metric_value(&metrics, name).is_some_and(|v| v > 0.0),
            "{name} missing or zero:\n{metrics}"
        );
    }
    // Each mode's failure counter exists from the start at zero (upstream registers only its mode's).
    let (ours, theirs) = match mode {
        "iptables" => (
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"}",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{",
        ),
        _ => (
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{",
        ),
    };
    assert_eq!(metric_value(&metrics, ours), Some(0.0), "{metrics}");
    assert!(!metrics.contains(theirs), "{metrics}");
    let cleanup = "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv4\"}";
    let expected_cleanup = (mode == "nftables").then_some(0.0);
    assert_eq!(metric_value(&metrics, cleanup), expected_cleanup, "{metrics}");
    if mode == "iptables" {
        // The rules of our chains in each table, as the kernel lists them (the jumps from the built-in chains
        // and the seal are not counted), after a cold sync and a partial one that removed an endpoint.
        for table in ["filter", "nat"] {
            let saved = lab.node().exec_stdout(&["iptables-save", "-t", table]).unwrap();
            let held = saved.lines().filter(|l| l.starts_with("-A KUBE-")).count();
            let name =
                format!("kubeproxy_sync_proxy_rules_iptables_total{{ip_family=\"IPv4\",table=\"{table}\"}}");
            assert_eq!(
                metric_value(&metrics, &name),
                Some(held as f64),
                "{saved}\n{metrics}"
            );
        }
        // The last sync rewrote the changed service port's chains only.
        let name = "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"nat\"}";
        let last = metric_value(&metrics, name).unwrap_or_default();
        assert!(last > 0.0 && last < 10.0, "{last}\n{metrics}");
    }
    // The effective configuration, as upstream's /configz serves it.
    let (status, body) = http_get(lab.node(), common::METRICS.parse().unwrap(), "/configz", T).unwrap();
    assert_eq!(status, 200, "{body}");
    let configz: serde_json::Value = serde_json::from_str(&body).unwrap();
    let config = &configz["kubeproxy.config.k8s.io"];
    assert_eq!(config["mode"], mode, "{body}");
    assert_eq!(config["conntrack"]["tcpBeLiberal"], true, "{body}");
    // Network programming latency, from the slices' trigger-time annotation, as upstream reports it: the one
    // change made since start (the initial list's trigger times predate svcproxy and are not its latency).
    let programmed = metric_value(
        &metrics,
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}",
    );
    assert_eq!(programmed, Some(1.0), "{metrics}");
    // Read-back ran after the syncs and found the kernel exactly as written.
    let verifications = metric_value(&metrics, "svcproxy_verifications_total{ip_family=\"IPv4\"}");
    assert!(verifications.is_some_and(|v| v >= 2.0), "{metrics}");
    proxy.assert_no_divergence();
    // kube-proxy's conntrack timeouts are set in the node's namespace (the kernel's default is five days).
    wait_until(WAIT, POLL, "the conntrack sysctls are set", || {
        let v = lab
            .node()
            .exec_stdout(&[
                "cat",
                "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
            ])
            .ok()?;
        (v.trim() == "86400").then_some(())
    });
    // --conntrack-tcp-be-liberal (off in a new namespace).
    let liberal = lab
        .node()
        .exec_stdout(&["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"])
        .unwrap();
    assert_eq!(liberal.trim(), "1", "nf_conntrack_tcp_be_liberal");
    if mode == "iptables" {
        // Liberal tracking lets out-of-window packets through; an INVALID drop would undo it.
        let filter = lab
            .node()
            .exec_stdout(&["iptables-save", "-t", "filter"])
            .unwrap();
        assert!(filter.contains("-A KUBE-FORWARD"), "{filter}");
        assert!(!filter.contains("--ctstate INVALID"), "{filter}");
    }
    proxy.assert_running();
}

fn bad_manifests_are_rejected_and_lose_nothing(mode: &str) {
    let lab = Lab::new();
    let pod = lab.add_pod("pod11", Ipv4Addr::new(10, 244, 0, 11));
    let _backend = Backend::start(pod.ns(), "pod11", &[8080], &[5353]);
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
    let dir = TempDir::new("bad");
    dir.write("web.yaml", &web(&["10.244.0.11"]));
    dir.write("dns.yaml", DNS);
    let mut proxy = Svcproxy::start(
        lab.node(),
        &["--manifests", dir.path().to_str().unwrap(), "--proxy-mode", mode],
    );
    let vip = addr("10.96.0.100", 80);
    wait_until(WAIT, POLL, "web answers", || {
        proxy.assert_running();
        tcp_request(client.ns(), vip, T).ok()
    });

    // Break the web Service (a port out of range) and make another file unreadable YAML.
    dir.write(
        "web.yaml",
        &web(&["10.244.0.11"]).replace("port: 80,", "port: 70000,"),
    );
    dir.write(
        "dns.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: dns\n",
    );
    // A new, valid Service next to the broken ones must still get programmed.
    dir.write(
        "more.yaml",
        &EMPTY
            .replace("name: empty", "name: more")
            .replace("10.96.0.200", "10.96.0.201"),
    );
    wait_until(
        WAIT,
        POLL,
        "the new service is programmed (refuses: no endpoints)",
        || {
            matches!(
                tcp_request(client.ns(), addr("10.96.0.201", 80), T),
                Err(ClientError::Refused)
            )
            .then_some(())
        },
    );
    let log = proxy.log();
    assert!(
        log.contains("Service demo/web: invalid field spec.ports[0].port"),
        "error names object and field:\n{log}"
    );
    assert!(log.contains("dns.yaml"), "YAML error names the file:\n{log}");
    // Both count, at least once each (a read after any change reports what is still bad again).
    let rejected = metric_value(&proxy.metrics(lab.node()), "svcproxy_rejected_objects_total");
    assert!(rejected.is_some_and(|n| n >= 2.0), "{rejected:?}");
    // The last good versions stay programmed. One connection can time out on a loaded machine (the test
    // binaries run side by side), so it is retried; a lost Service fails every attempt.
    let web = wait_until(WAIT, POLL, "the web service still answers", || {
        tcp_request(client.ns(), vip, T).ok()
    });
    assert_eq!(web.identity, "pod11");
    // A single datagram can be lost under load (the first one also waits for neighbour resolution): retry.
    let dns = wait_until(WAIT, POLL, "the dns service still answers", || {
        udp_request(client.ns(), addr("10.96.0.10", 53), T).ok()
    });
    assert_eq!(dns.identity, "pod11");

    // An unknown kind is a warning naming file and document, not an error.
    dir.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    wait_until(WAIT, POLL, "the unknown kind is reported", || {
        proxy
            .log()
            .contains("cm.yaml document 0: ignoring v1 ConfigMap")
            .then_some(())
    });
    proxy.assert_running();
}

/// A Service whose endpoint is the node's own address, as the API server behind `kubernetes` is on a
/// control-plane node (and as any host-network pod is).
const API: &str = "apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports:
  - {name: https, protocol: TCP, port: 443, targetPort: 6443}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes}
addressType: IPv4
ports:
- {name: https, protocol: TCP, port: 6443}
endpoints:
- addresses: [10.0.0.10]
";

/// Connects from inside `ns` and returns the connection's own address with the one the backend saw.
fn own_and_seen(ns: &svcproxy_testkit::NetNs, to: SocketAddr) -> (SocketAddr, SocketAddr) {
    ns.run(|| {
        use std::io::Read;
        let mut stream = std::net::TcpStream::connect_timeout(&to, T).expect("connect");
        stream.set_read_timeout(Some(T)).unwrap();
        let own = stream.local_addr().unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("reply");
        let seen = text.trim_end().split_once(' ').expect("identity and source").1;
        (own, seen.parse().expect("a socket address"))
    })
}

/// Hairpin masquerading is for connections a Service sent back to where they came from, and only for them:
/// an endpoint reached directly, not through its Service, sees its client's true address. On the node a
/// connection to its own address has source equal to destination whether or not a Service is involved.
fn hairpin_is_masqueraded_only_through_a_service(mode: &str) {
    let lab = Lab::new();
    let pod = lab.add_pod("pod11", Ipv4Addr::new(10, 244, 0, 11));
    let _backend = Backend::start(pod.ns(), "pod11", &[8080], &[]);
    let _apiserver = Backend::start(lab.node(), "apiserver", &[6443], &[]);
    let dir = TempDir::new("hairpin");
    dir.write("web.yaml", &web(&["10.244.0.11"]));
    dir.write("api.yaml", API);
    let mut proxy = Svcproxy::start(
        lab.node(),
        &["--manifests", dir.path().to_str().unwrap(), "--proxy-mode", mode],
    );
    let vip = addr("10.96.0.100", 80);
    wait_until(WAIT, POLL, "both Services answer", || {
        proxy.assert_running();
        tcp_request(pod.ns(), vip, T).ok()?;
        tcp_request(lab.node(), addr("10.96.0.1", 443), T).ok()
    });

    // A pod reaching itself through its Service is masqueraded: unSNATed, it would answer itself directly.
    let own = tcp_request(pod.ns(), vip, T).unwrap();
    assert_eq!(own.identity, "pod11");
    assert_ne!(
        own.seen_source.ip(),
        IpAddr::V4(pod.ip()),
        "hairpin through the ClusterIP masqueraded"
    );

    // The node reaching the endpoint at its own address directly keeps its source port and address (the
    // masquerade is fully random, so a masqueraded connection shows another port; three connections rule out
    // a coincidence).
    let direct = addr("10.0.0.10", 6443);
    for _ in 0..3 {
        let (own, seen) = own_and_seen(lab.node(), direct);
        assert_eq!(
            seen, own,
            "the node to its own address, not through a Service, is not masqueraded"
        );
    }
    // A pod reaching the same endpoint directly is not masqueraded either.
    let (own, seen) = own_and_seen(pod.ns(), direct);
    assert_eq!(
        seen, own,
        "a pod to a host-network endpoint directly keeps its source"
    );
    proxy.assert_running();
}

in_both_modes!(
    clusterip_traffic_follows_the_manifests,
    bad_manifests_are_rejected_and_lose_nothing,
    hairpin_is_masqueraded_only_through_a_service,
);

/// The health port is held by another process (the old proxy, during a migration): svcproxy programs the
/// rules all the same and serves health once the port is free, as upstream does by default; with
/// `--bind-address-hard-fail` it refuses to start instead.
#[test]
fn a_busy_health_port_is_retried_not_fatal() {
    let lab = Lab::new();
    let pod = lab.add_pod("pod11", Ipv4Addr::new(10, 244, 0, 11));
    let _backend = Backend::start(pod.ns(), "pod11", &[8080], &[5353]);
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
    let dir = TempDir::new("busy");
    dir.write("web.yaml", &web(&["10.244.0.11"]));
    let health: SocketAddr = common::HEALTHZ.parse().unwrap();
    let holder = lab
        .node()
        .run(|| std::net::TcpListener::bind(("0.0.0.0", health.port())).unwrap());

    let out = lab
        .node()
        .command(env!("CARGO_BIN_EXE_svcproxy"))
        .args([
            "run",
            "--manifests",
            dir.path().to_str().unwrap(),
            "--bind-address-hard-fail",
        ])
        .args(["--hostname-override", "node-a"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "hard fail exits");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen on 0.0.0.0:10256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut proxy = Svcproxy::start(lab.node(), &["--manifests", dir.path().to_str().unwrap()]);
    wait_until(
        WAIT,
        POLL,
        "the rules are programmed while the port is busy",
        || {
            proxy.assert_running();
            tcp_request(client.ns(), addr("10.96.0.100", 80), T).ok()
        },
    );
    assert!(proxy.log().contains("cannot serve health"), "{}", proxy.log());
    drop(holder);
    wait_until(WAIT, POLL, "health is served once the port is free", || {
        proxy.assert_running();
        http_get(lab.node(), health, "/healthz", T)
            .ok()
            .filter(|(code, _)| *code == 200)
    });
}

/// kube-proxy's `--healthz-port=0` turns the health server off: the rules are programmed, nothing listens on
/// the health address, and the metrics server is unaffected.
#[test]
fn a_health_port_of_zero_turns_the_health_server_off() {
    let web = common::WebLab::new();
    let mut proxy = Svcproxy::start(
        web.lab.node(),
        &["--manifests", web.manifests(), "--healthz-port=0"],
    );
    wait_until(WAIT, POLL, "web answers", || {
        proxy.assert_running();
        tcp_request(web.client.ns(), web.vip(), T).ok()
    });
    let health: SocketAddr = common::HEALTHZ.parse().unwrap();
    let refused = http_get(web.lab.node(), health, "/healthz", T);
    assert!(refused.is_err(), "the health server answered: {refused:?}");
    assert!(
        proxy.log().contains("not serving health: turned off (port 0)"),
        "{}",
        proxy.log()
    );
    assert!(
        proxy
            .metrics(web.lab.node())
            .contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
    );
}

/// As kube-proxy, svcproxy sets its own OOM score adjustment at start (its pod, asking for no resources, is
/// BestEffort and starts at the kubelet's 1000): -999 unless `--oom-score-adj` says otherwise. Lowering it
/// needs CAP_SYS_RESOURCE, which not every root has (a container may lack it): then the value stays and the
/// log says why. Raising it needs nothing, so the flag's value is checked in the kernel everywhere.
#[test]
fn svcproxy_sets_its_oom_score_adjustment_as_kube_proxy_does() {
    let web = common::WebLab::new();
    let start = |extra: Option<&str>| {
        let mut args = vec!["--manifests", web.manifests()];
        args.extend(extra);
        let mut proxy = Svcproxy::start(web.lab.node(), &args);
        // Synced, so past its start-up (the rules of an earlier run would answer before that).
        wait_until(WAIT, POLL, "svcproxy synced", || {
            proxy.assert_running();
            proxy.log().contains("synced").then_some(())
        });
        assert!(tcp_request(web.client.ns(), web.vip(), T).is_ok());
        proxy
    };

    let raised = start(Some("--oom-score-adj=500"));
    assert_eq!(raised.oom_score_adj(), 500);
    assert!(
        raised.log().contains("OOM score adjustment set"),
        "{}",
        raised.log()
    );
    drop(raised);

    let inherited: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let may_lower = std::process::Command::new("sh")
        .args(["-c", "echo -999 > /proc/self/oom_score_adj"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    let default = start(None);
    if may_lower {
        assert_eq!(default.oom_score_adj(), -999, "{}", default.log());
    } else {
        assert_eq!(default.oom_score_adj(), inherited);
        assert!(
            default.log().contains(
                "cannot write -999 to /proc/self/oom_score_adj (lowering it needs CAP_SYS_RESOURCE)"
            ),
            "{}",
            default.log()
        );
    }
}

/// kube-proxy's packet counters in iptables mode: svcproxy creates upstream's nfacct objects, its rules count
/// into them as upstream's do (the INVALID drop, and a localhost NodePort rule ahead of the general one), and
/// `/metrics` reports them under upstream's names. A request to a localhost NodePort is counted.
#[test]
fn packet_counters_count_as_kube_proxys_do() {
    let web = common::WebLab::new();
    web.dir.write(
        "web.yaml",
        &common::WEB_ONE_ENDPOINT
            .replace(
                "  clusterIP: 10.96.0.100\n",
                "  type: NodePort\n  clusterIP: 10.96.0.100\n",
            )
            .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}"),
    );
    let mut proxy = Svcproxy::start(
        web.lab.node(),
        &["--manifests", web.manifests(), "--iptables-localhost-nodeports"],
    );
    wait_until(WAIT, POLL, "svcproxy synced", || {
        proxy.assert_running();
        proxy.log().contains("synced").then_some(())
    });
    let saved = |table: &str| {
        let text = web
            .lab
            .node()
            .exec_stdout(&["iptables-save", "-t", table])
            .unwrap();
        // iptables-save pads the nfacct name with a second blank.
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    assert!(
        saved("filter").contains(
            &"-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP"
                .to_string()
        ),
        "{:#?}",
        saved("filter")
    );
    let localhost_rule = saved("nat")
        .into_iter()
        .find(|l| l.starts_with("-A KUBE-NODEPORTS -d 127.0.0.0/8"));
    assert!(
        localhost_rule
            .as_deref()
            .is_some_and(|l| l.contains("--dport 30080")
                && l.contains("-m nfacct --nfacct-name localhost_nps_accepted_pkts")),
        "{localhost_rule:?}"
    );

    let counted = |metrics: &str, name: &str| metric_value(metrics, name);
    let localhost = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total";
    let invalid = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total";
    let before = proxy.metrics(web.lab.node());
    assert_eq!(counted(&before, localhost), Some(0.0), "{before}");
    assert!(counted(&before, invalid).is_some(), "{before}");
    let reply = tcp_request(web.lab.node(), "127.0.0.1:30080".parse().unwrap(), T).unwrap();
    assert_eq!(reply.identity, "pod11");
    let after = proxy.metrics(web.lab.node());
    assert!(counted(&after, localhost).is_some_and(|n| n >= 1.0), "{after}");
    proxy.assert_no_divergence();
}
