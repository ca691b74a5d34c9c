//! Taking a node over from upstream kube-proxy, and handing it back: svcproxy starts on a node holding the rules
//! a real kube-proxy v1.31 wrote (its iptables-save output for the clusterip-basic reference scenario), replaces
//! them with no traffic gap and no leftovers, and when it stops leaves exactly the chains upstream writes.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Svcproxy, TempDir};
use svcproxy_iptables::save_parser::parse_save;
use svcproxy_testkit::{Backend, Lab, tcp_request, wait_until};

fn data(path: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../iptables/tests/data/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Upstream's dump as restore input: nfacct matches need accounting objects a fresh namespace lacks, and
/// are not part of the behaviour.
fn loadable(dump: &str) -> String {
    dump.lines()
        .map(|l| {
            l.replace("-m nfacct --nfacct-name  ct_state_invalid_dropped_pkts ", "")
                .replace("-m nfacct --nfacct-name ct_state_invalid_dropped_pkts ", "")
        })
        .filter(|l| !l.contains("nfacct"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn kube_chains(ns: &svcproxy_testkit::NetNs) -> BTreeSet<String> {
    let saved = parse_save(&ns.exec_stdout(&["iptables-save"]).unwrap()).unwrap();
    saved
        .tables
        .iter()
        .flat_map(|(t, table)| {
            table
                .chains
                .keys()
                .filter(|c| c.starts_with("KUBE-"))
                .map(move |c| format!("{t}/{c}"))
        })
        .collect()
}

#[test]
fn takes_over_from_upstream_without_a_gap_and_hands_back_cleanly() {
    let lab = Lab::new();
    // The web service's endpoints in the reference scenario, as real pods.
    let pods: Vec<_> = [(1, 14), (2, 15), (0, 16)]
        .iter()
        .map(|(b, c)| lab.add_pod(&format!("web{c}"), Ipv4Addr::new(10, 244, *b, *c)))
        .collect();
    let _backends: Vec<_> = pods
        .iter()
        .map(|p| Backend::start(p.ns(), p.name(), &[8080], &[]))
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));

    // Upstream's rules, as its kube-proxy left them.
    let dump = data("upstream-v1.31.14-iptables/clusterip-basic.txt");
    let mut restore = lab.node().command("iptables-restore");
    restore.stdin(std::process::Stdio::piped());
    let mut child = restore.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), loadable(&dump).as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "upstream's dump loads");
    let upstream_chains = kube_chains(lab.node());

    let vip: SocketAddr = "10.96.1.20:80".parse().unwrap();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        "upstream's rules serve the ClusterIP",
        || tcp_request(client.ns(), vip, Duration::from_secs(1)).ok(),
    );

    // A client loop runs for the whole takeover.
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let dir = TempDir::new("takeover");
    dir.write("scenario.yaml", &data("scenarios/clusterip-basic.yaml"));
    // The apiserver's own service, which every reference run had.
    dir.write(
        "kubernetes.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: kubernetes, namespace: default}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: https, protocol: TCP, port: 443}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubernetes\n  namespace: default\n  labels: {kubernetes.io/service-name: kubernetes}\naddressType: IPv4\nports: [{name: https, protocol: TCP, port: 6443}]\nendpoints:\n- addresses: [10.0.0.10]\n",
    );
    let proxy = std::thread::scope(|scope| {
        let looping = scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match tcp_request(client.ns(), vip, Duration::from_secs(1)) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let mut proxy = Svcproxy::start(lab.node(), &["--manifests", dir.path().to_str().unwrap()]);
        wait_until(
            Duration::from_secs(20),
            Duration::from_millis(100),
            "svcproxy synced",
            || {
                proxy.assert_running();
                proxy.log().contains("synced").then_some(())
            },
        );
        // Keep the loop going until a good number of requests went through the new rules.
        let at_sync = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "20 requests after the takeover",
            || (ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) >= at_sync + 20).then_some(()),
        );
        stop.store(true, Ordering::Relaxed);
        looping.join().unwrap();
        proxy
    });
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("takeover: {ok} requests answered, {failed} failed");
    assert!(ok >= 20, "the loop ran");
    assert_eq!(failed, 0, "no traffic gap during the takeover");

    // No leftovers: every KUBE-* chain is one upstream also writes (the same names, hence the same hashes).
    let ours = kube_chains(lab.node());
    let extra: Vec<&String> = ours.difference(&upstream_chains).collect();
    assert!(extra.is_empty(), "chains upstream would not recognise: {extra:?}");
    proxy.assert_no_divergence();

    // Hand back: stopping leaves the rules in place, in upstream's names, and traffic keeps flowing.
    drop(proxy);
    assert_eq!(kube_chains(lab.node()), ours);
    assert!(tcp_request(client.ns(), vip, Duration::from_secs(1)).is_ok());
}
