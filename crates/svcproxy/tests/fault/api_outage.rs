//! J: the API server goes away for a while (every list and watch answered with 500, open watches cut, its
//! history compacted as a restarted apiserver's would be) while endpoints keep churning in the cluster.
//! What is programmed must keep serving during the outage, and once the API is back svcproxy must converge
//! on the final state with no stale endpoint left.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use svcproxy_testkit::{FakeApiServer, tcp_request, wait_until};

use super::harness::{
    Cluster, HealthWatch, POLL, Traffic, addr, failures, identities, poll_for, save, traffic_summary,
};
use super::report::Case;
use super::web::names;
use crate::common::{Svcproxy, TempDir};

const OUTAGE: Duration = Duration::from_secs(30);

fn service(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
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

#[test]
fn j_api_server_outage_with_endpoint_churn() {
    let mut case = Case::new("J API outage 30s with churn");
    let cluster = Cluster::new(&[
        ("pod11", Ipv4Addr::new(10, 244, 0, 11)),
        ("pod12", Ipv4Addr::new(10, 244, 0, 12)),
        ("pod13", Ipv4Addr::new(10, 244, 0, 13)),
    ]);
    let node = cluster.node();
    let api = FakeApiServer::start_in(node, "127.0.0.1:0".parse().unwrap());
    api.apply(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a"}, "spec": {"podCIDR": "10.244.0.0/24"}
    }))
    .unwrap();
    api.apply(service("web", "10.96.0.100")).unwrap();
    api.apply(slice("web", &["10.244.0.11", "10.244.0.12"])).unwrap();
    api.apply(service("old", "10.96.0.102")).unwrap();
    api.apply(slice("old", &["10.244.0.13"])).unwrap();
    let dir = TempDir::new("kubeconfig");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let mut proxy = Svcproxy::start(node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);
    let web = addr("10.96.0.100", 80);
    let traffic = Traffic::start(cluster.client.ns(), web, case.origin());
    let health = HealthWatch::start(node, case.origin());
    wait_until(
        Duration::from_secs(45),
        POLL,
        "web reaches pod11 and pod12",
        || {
            proxy.assert_running();
            (identities(&traffic.next(10)) == names(&["pod11", "pod12"])).then_some(())
        },
    );

    case.stage("API server down; endpoints churn");
    api.set_fail_lists(u32::MAX);
    api.set_fail_watches(u32::MAX);
    api.compact();
    api.break_watches();
    let down = case.injected();
    // Pods come and go while nobody can tell svcproxy.
    let churn: [&[&str]; 4] = [
        &["10.244.0.12", "10.244.0.13"],
        &["10.244.0.13"],
        &["10.244.0.11", "10.244.0.13"],
        &["10.244.0.12", "10.244.0.13"],
    ];
    let step = OUTAGE / (churn.len() as u32 + 1);
    for ips in churn {
        std::thread::sleep(step);
        api.apply(slice("web", ips)).unwrap();
        proxy.assert_running();
    }
    api.delete("EndpointSlice", Some("demo"), "old-1");
    api.delete("Service", Some("demo"), "old");
    api.apply(service("new", "10.96.0.103")).unwrap();
    api.apply(slice("new", &["10.244.0.11"])).unwrap();
    std::thread::sleep(step);
    let during = traffic.since(down);

    case.stage("API server back");
    api.set_fail_lists(0);
    api.set_fail_watches(0);
    let back = case.now();
    let new = addr("10.96.0.103", 80);
    let converged = poll_for(Duration::from_secs(90), || {
        let nat = save(node, "nat");
        let ok = identities(&traffic.next(10)) == names(&["pod12", "pod13"])
            && !nat.contains("demo/old")
            && tcp_request(cluster.client.ns(), new, Duration::from_secs(1))
                .is_ok_and(|r| r.identity == "pod11");
        ok.then_some(())
    });
    if converged.is_some() {
        case.repaired(case.now());
        case.note(format!(
            "converged {:.1}s after the API came back",
            (case.now() - back).as_secs_f64()
        ));
    }
    let requests = api.request_log();
    case.note(format!("traffic during the outage: {}", traffic_summary(&during)));
    case.note(format!("{} API requests in all", requests.len()));
    case.health(health.summary());

    assert!(
        converged.is_some(),
        "no convergence 90s after the API came back; nat:\n{}\nlog:\n{}",
        save(node, "nat"),
        proxy.log()
    );
    // No stale endpoint: pod11 is no longer behind web, and nothing of the deleted Service is left.
    let nat = save(node, "nat");
    let stale: Vec<&str> = nat
        .lines()
        .filter(|l| l.contains("demo/web") && l.contains("10.244.0.11"))
        .collect();
    assert!(stale.is_empty(), "stale web endpoint rules: {stale:?}");
    assert!(
        !nat.contains("demo/old"),
        "rules of the deleted Service left:\n{nat}"
    );
    // What was programmed keeps serving while the API is unreachable.
    assert_eq!(
        failures(&during),
        0,
        "requests failed during the outage: {}",
        traffic_summary(&during)
    );
    assert_eq!(
        identities(&during),
        names(&["pod11", "pod12"]),
        "the outage changes nothing in the kernel"
    );
    proxy.assert_running();
}
