//! Chains left by other versions of kube-proxy that still reference ours — the shape of the outage where a
//! version skew made every `iptables-restore` fail (`line 8022 failed`, `Sync failed; retrying in 30s`) while
//! the proxy reported healthy — and kubelet's old KUBE-MARK-DROP disappearing under its former users.
//!
//! Every case uses the Service of the upstream `etp-local` reference scenario, ref-etp/etp-local-lb, so the
//! leftovers are real kube-proxy output (v1.30.3) or its v1.23 rule shapes, and their chain names are the ones
//! our chains have: the hashes depend only on the service port name and the endpoint address.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use svcproxy_iptables::chain_name::{sep_chain, service_chain_hash, svc_chain};
use svcproxy_model::{EndpointInfo, ObjectName, Protocol, ServicePortName};
use svcproxy_testkit::{tcp_request, wait_until};

use super::harness::{
    Cluster, HealthWatch, POLL, Traffic, WAIT, addr, chain_names, chains, extract, identities, iptables,
    metric, restore, save, traffic_summary,
};
use super::manifests::{HTTP, Port, lb_status, service};
use super::report::Case;
use crate::common::{Svcproxy, TempDir};

const V1_23: &str = include_str!("../data/kube-proxy-v1.23-etp-local.rules");
const V1_30: &str = include_str!("../data/kube-proxy-v1.30.3-etp-local.rules");

const NAMESPACE: &str = "ref-etp";
const CLUSTER_IP: &str = "10.96.6.10";
const LOCAL_EP: &str = "10.244.0.61";
const OTHER_EP: &str = "10.244.1.62";

fn spn() -> ServicePortName {
    ServicePortName::new(ObjectName::new(NAMESPACE, "etp-local-lb"), "http", Protocol::Tcp)
}

fn endpoint(ip: &str) -> EndpointInfo {
    EndpointInfo {
        ip: ip.parse().unwrap(),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: true,
        zone_hints: None,
        node_hints: None,
    }
}

/// Our chain names for the Service and its endpoint on this node, checked against the names the leftovers
/// use: if hashing ever changed, the leftovers would no longer reference our chains and these cases would
/// prove nothing, so say so loudly.
struct Names {
    svc: String,
    sep_local: String,
    xlb: String,
    ext: String,
    svl: String,
    fw: String,
}

fn names() -> Names {
    let spn = spn();
    let hash = service_chain_hash(&spn);
    let n = Names {
        svc: svc_chain(&spn),
        sep_local: sep_chain(&spn, &endpoint(LOCAL_EP)),
        xlb: format!("KUBE-XLB-{hash}"),
        ext: format!("KUBE-EXT-{hash}"),
        svl: format!("KUBE-SVL-{hash}"),
        fw: format!("KUBE-FW-{hash}"),
    };
    for (dump, chain) in [
        (V1_23, &n.svc),
        (V1_23, &n.sep_local),
        (V1_23, &n.xlb),
        (V1_30, &n.svl),
    ] {
        assert!(
            dump.contains(&format!(":{chain} ")),
            "the leftover dump has no chain {chain}: chain-name hashing no longer matches upstream"
        );
    }
    n
}

const LB_PORT: Port = Port {
    node_port: Some(30610),
    ..HTTP
};

fn cluster() -> Cluster {
    Cluster::new(&[
        ("local61", Ipv4Addr::new(10, 244, 0, 61)),
        ("other62", Ipv4Addr::new(10, 244, 1, 62)),
    ])
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Every chain of a kind that only another version writes (for a plain ClusterIP Service: KUBE-XLB, KUBE-EXT,
/// KUBE-SVL, KUBE-FW).
fn foreign_kinds(nat: &str) -> BTreeSet<String> {
    ["KUBE-XLB-", "KUBE-EXT-", "KUBE-SVL-", "KUBE-FW-"]
        .iter()
        .flat_map(|p| chain_names(nat, p))
        .collect()
}

fn failed_syncs(proxy: &Svcproxy, cluster: &Cluster) -> f64 {
    metric(
        &proxy.metrics(cluster.node()),
        "svcproxy_syncs_total",
        &[("result", "failure")],
    )
}

/// A: while svcproxy runs, chains of other versions appear that jump to our KUBE-SVC and KUBE-SEP chains —
/// a v1.23 KUBE-XLB chain and the KUBE-EXT/KUBE-SVL pair a v1.30 kube-proxy wrote when the Service was an
/// eTP=Local LoadBalancer. Nothing happens until the endpoint they reference goes away: then deleting its
/// KUBE-SEP chain is refused because they still jump to it. Upstream retries that same transaction forever;
/// svcproxy must collect the leftovers and converge.
#[test]
fn a_leftovers_of_other_versions_referencing_our_chains() {
    let mut case = Case::new("A leftovers injected at run time");
    let names = names();
    let cluster = cluster();
    let dir = TempDir::new("a");
    let manifest =
        |eps: &[(&str, &str)]| service(NAMESPACE, "etp-local-lb", CLUSTER_IP, "", "", &[HTTP], eps);
    dir.write(
        "svc.yaml",
        &manifest(&[(LOCAL_EP, "node-a"), (OTHER_EP, "node-a")]),
    );
    let mut proxy = Svcproxy::start(cluster.node(), &["--manifests", dir.path().to_str().unwrap()]);
    let vip = addr(CLUSTER_IP, 80);
    let traffic = Traffic::start(cluster.client.ns(), vip, case.origin());
    let health = HealthWatch::start(cluster.node(), case.origin());
    wait_until(WAIT, POLL, "both endpoints answer", || {
        proxy.assert_running();
        (identities(&traffic.next(10)) == set(&["local61", "other62"])).then_some(())
    });
    let nat = save(cluster.node(), "nat");
    for chain in [&names.svc, &names.sep_local] {
        assert!(
            chains(&nat).contains_key(chain.as_str()),
            "{chain} not programmed:\n{nat}"
        );
    }

    case.stage("injecting the leftovers");
    restore(
        cluster.node(),
        "iptables-restore",
        &["--noflush"],
        &extract(V1_23, "nat", &[&names.xlb]),
    );
    restore(
        cluster.node(),
        "iptables-restore",
        &["--noflush"],
        &extract(V1_30, "nat", &[&names.ext, &names.svl]),
    );
    let failures_before = failed_syncs(&proxy, &cluster);
    let sync_failed_lines = |p: &Svcproxy| p.log().matches("sync failed").count();
    let log_failures_before = sync_failed_lines(&proxy);

    // The pod behind the leftovers' references goes away: from here on upstream fails on every sync.
    case.stage("removing the referenced endpoint");
    let injected = case.injected();
    dir.write("svc.yaml", &manifest(&[(OTHER_EP, "node-a")]));
    let mut detected = None;
    wait_until(
        WAIT,
        POLL,
        "the leftovers are collected and the removed endpoint gets no traffic",
        || {
            proxy.assert_running();
            if detected.is_none() && sync_failed_lines(&proxy) > log_failures_before {
                detected = Some(case.now());
            }
            let nat = save(cluster.node(), "nat");
            let clean =
                foreign_kinds(&nat).is_empty() && !chains(&nat).contains_key(names.sep_local.as_str());
            if clean && detected.is_none() {
                detected = Some(case.now());
            }
            (clean && identities(&traffic.next(5)) == set(&["other62"])).then_some(())
        },
    );
    case.detected(detected.unwrap_or(injected));
    case.repaired(case.now());
    // Settled: twenty more requests, all to the remaining endpoint.
    let after = traffic.next(20);
    assert_eq!(
        identities(&after),
        set(&["other62"]),
        "{}",
        traffic_summary(&after)
    );
    let healthy = health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    let failed = failed_syncs(&proxy, &cluster) - failures_before;
    case.note(format!("failed syncs on the way: {failed}"));
    case.note(format!("traffic: {}", traffic_summary(&traffic.since(injected))));
    case.health(health.summary());
    // Each failure must climb the ladder (partial → full with reference-aware collection) rather than repeat
    // the refused transaction: one failed attempt is expected, two is the most the ladder needs.
    assert!(
        failed <= 2.0,
        "{failed} failed syncs before converging; log:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    if let Some(line) = log.lines().find(|l| l.contains("sync failed")) {
        assert!(
            line.contains("referenced_chain"),
            "the refused deletion is classified as a referenced chain: {line}"
        );
    }
    assert_eq!(healthy.status, 200);
    proxy.assert_running();
}

/// B: the node ran kube-proxy v1.23 (KUBE-XLB/KUBE-FW chains for an eTP=Local LoadBalancer, its KUBE-XLB
/// jumping straight to the local endpoint's KUBE-SEP) and is taken over by svcproxy directly, skipping the
/// releases that still knew the KUBE-XLB prefix. The takeover must collect them at once and lose no request;
/// the later loss of that local endpoint must then be an ordinary update.
#[test]
fn b_takeover_from_a_v1_23_node_with_xlb_chains() {
    let mut case = Case::new("B v1.23 XLB chains at start");
    let names = names();
    let cluster = cluster();
    restore(cluster.node(), "iptables-restore", &[], V1_23);
    let vip = addr(CLUSTER_IP, 80);
    let traffic = Traffic::start(cluster.client.ns(), vip, case.origin());
    // The old rules are live: the node really is in the state an upgrade finds.
    wait_until(WAIT, POLL, "the v1.23 rules serve the Service", || {
        (identities(&traffic.next(10)) == set(&["local61", "other62"])).then_some(())
    });

    let dir = TempDir::new("b");
    let spec = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32610";
    let manifest = |eps: &[(&str, &str)]| {
        service(
            NAMESPACE,
            "etp-local-lb",
            CLUSTER_IP,
            spec,
            &lb_status("192.0.2.61"),
            &[LB_PORT],
            eps,
        )
    };
    dir.write(
        "svc.yaml",
        &manifest(&[(LOCAL_EP, "node-a"), (OTHER_EP, "node-b")]),
    );
    case.stage("svcproxy takes over");
    let takeover = case.injected();
    let mut proxy = Svcproxy::start(cluster.node(), &["--manifests", dir.path().to_str().unwrap()]);
    let health = HealthWatch::start(cluster.node(), case.origin());
    let (collected_at, nat) =
        super::harness::measure(case.origin(), "the v1.23 chains are collected", WAIT, || {
            proxy.assert_running();
            let nat = save(cluster.node(), "nat");
            let ours = chains(&nat);
            (!ours.contains_key(names.xlb.as_str())
                && !ours.contains_key(names.fw.as_str())
                && ours.contains_key(names.svl.as_str()))
            .then_some(nat)
        });
    case.detected(collected_at);
    assert!(
        !nat.contains("KUBE-XLB-") && !nat.contains("-j KUBE-FW-"),
        "nothing references the old chains any more:\n{nat}"
    );

    // The pod behind the old KUBE-XLB's reference restarts elsewhere (the trigger in upstream issue #132516).
    case.stage("the local endpoint goes away");
    dir.write("svc.yaml", &manifest(&[(OTHER_EP, "node-b")]));
    wait_until(WAIT, POLL, "only other62 answers", || {
        proxy.assert_running();
        let nat = save(cluster.node(), "nat");
        (!chains(&nat).contains_key(names.sep_local.as_str())
            && identities(&traffic.next(5)) == set(&["other62"]))
        .then_some(())
    });
    case.repaired(case.now());
    health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    let samples = traffic.since(takeover);
    case.note(format!("failed syncs: {}", failed_syncs(&proxy, &cluster)));
    case.note(format!("traffic since takeover: {}", traffic_summary(&samples)));
    case.health(health.summary());
    // The takeover replaces the old rules in one transaction per table: no request may fail on the way.
    assert_eq!(
        super::harness::failures(&samples),
        0,
        "requests failed during the takeover: {}",
        traffic_summary(&samples)
    );
    proxy.assert_running();
}

/// C: kubelet's old KUBE-MARK-DROP chain, used by a v1.23 kube-proxy's KUBE-FW chain, is present at start;
/// then kubelet (≥ 1.27 stops creating it) flushes and deletes it. svcproxy must never have referenced it —
/// not even for the two Service shapes older releases implemented with it (load-balancer source ranges, and
/// eTP=Local without local endpoints) — so the deletion succeeds and every later sync keeps working.
#[test]
fn c_kubelet_mark_drop_chain_disappears() {
    let mut case = Case::new("C KUBE-MARK-DROP removed");
    let mut cluster = cluster();
    cluster
        .pods
        .push(cluster.lab.add_pod("remote64", Ipv4Addr::new(10, 244, 2, 64)));
    cluster
        .lab
        .external()
        .exec(&["ip", "route", "add", "192.0.2.0/24", "via", "10.0.0.10"])
        .unwrap();
    restore(cluster.node(), "iptables-restore", &[], V1_23);
    assert!(save(cluster.node(), "nat").contains("-j KUBE-MARK-DROP"));

    let dir = TempDir::new("c");
    let write = |ranges: &str, eps: &[(&str, &str)]| {
        let local = service(
            NAMESPACE,
            "etp-local-lb",
            CLUSTER_IP,
            &format!(
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32610\n  loadBalancerSourceRanges: [{ranges}]"
            ),
            &lb_status("192.0.2.61"),
            &[LB_PORT],
            eps,
        );
        let remote = service(
            NAMESPACE,
            "etp-remote-lb",
            "10.96.6.20",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32620",
            &lb_status("192.0.2.62"),
            &[Port {
                node_port: Some(30620),
                ..HTTP
            }],
            &[("10.244.2.64", "node-b")],
        );
        dir.write("svc.yaml", &format!("{local}---\n{remote}"));
    };
    // The outside host (10.0.0.20) is outside the allowed range.
    write("198.51.100.0/24", &[(LOCAL_EP, "node-a"), (OTHER_EP, "node-b")]);
    let mut proxy = Svcproxy::start(cluster.node(), &["--manifests", dir.path().to_str().unwrap()]);
    let vip = addr(CLUSTER_IP, 80);
    let traffic = Traffic::start(cluster.client.ns(), vip, case.origin());
    let health = HealthWatch::start(cluster.node(), case.origin());
    wait_until(WAIT, POLL, "svcproxy serves both endpoints", || {
        proxy.assert_running();
        (identities(&traffic.next(10)) == set(&["local61", "other62"])).then_some(())
    });
    let both = || {
        format!(
            "{}{}",
            save(cluster.node(), "nat"),
            save(cluster.node(), "filter")
        )
    };
    wait_until(WAIT, POLL, "no rule jumps to KUBE-MARK-DROP", || {
        (!both().contains("-j KUBE-MARK-DROP")).then_some(())
    });
    let outsider_is_dropped = |what: &str| {
        for target in [addr("192.0.2.61", 80), addr("192.0.2.62", 80)] {
            let reply = tcp_request(cluster.lab.external(), target, Duration::from_secs(2));
            assert!(
                reply.is_err(),
                "{what}: {target} must drop the outside host, got {reply:?}"
            );
        }
    };
    outsider_is_dropped("with KUBE-MARK-DROP present");

    case.stage("kubelet deletes KUBE-MARK-DROP");
    let failures_before = failed_syncs(&proxy, &cluster);
    case.injected();
    iptables(cluster.node(), &["-t", "nat", "-F", "KUBE-MARK-DROP"]);
    // Refused ("Device or resource busy") if any rule still jumped to it.
    iptables(cluster.node(), &["-t", "nat", "-X", "KUBE-MARK-DROP"]);

    case.stage("endpoint and source-range churn after the deletion");
    // (allowed source range, endpoints as (address, node), who answers the ClusterIP)
    type Step<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let steps: [Step<'_>; 3] = [
        ("198.51.100.0/24", &[(LOCAL_EP, "node-a")], &["local61"]),
        (
            "198.51.100.0/24",
            &[(LOCAL_EP, "node-a"), (OTHER_EP, "node-b")],
            &["local61", "other62"],
        ),
        ("10.0.0.0/24", &[(OTHER_EP, "node-b")], &["other62"]),
    ];
    for (ranges, eps, want) in steps {
        write(ranges, eps);
        wait_until(WAIT, POLL, &format!("traffic reaches exactly {want:?}"), || {
            proxy.assert_running();
            (identities(&traffic.next(10)) == set(want)).then_some(())
        });
    }
    case.repaired(case.now());
    // Still dropped without kubelet's chain: eTP=Local with no local endpoint must not answer outsiders.
    let reply = tcp_request(
        cluster.lab.external(),
        addr("192.0.2.62", 80),
        Duration::from_secs(2),
    );
    assert!(reply.is_err(), "no local endpoint: dropped, got {reply:?}");
    // And the source range now admits the outside host (a positive control for the drops above), but eTP=Local
    // has no local endpoint left for etp-local-lb either, so switch it back to one first.
    write("10.0.0.0/24", &[(LOCAL_EP, "node-a")]);
    wait_until(WAIT, POLL, "the outside host reaches the local endpoint", || {
        tcp_request(
            cluster.lab.external(),
            addr("192.0.2.61", 80),
            Duration::from_secs(2),
        )
        .ok()
        .filter(|r| r.identity == "local61")
    });
    let failed = failed_syncs(&proxy, &cluster) - failures_before;
    let after = both();
    case.note(format!("failed syncs after the deletion: {failed}"));
    case.health(health.summary());
    assert!(
        !after.contains("KUBE-MARK-DROP"),
        "svcproxy recreated or referenced kubelet's chain:\n{after}"
    );
    assert_eq!(failed, 0.0, "syncs failed after the deletion:\n{}", proxy.log());
    assert!(
        health
            .first_after(case.injected_at(), |p| p.status != 200)
            .is_none(),
        "health left 200 after the deletion: {}",
        health.summary()
    );
    proxy.assert_running();
}
