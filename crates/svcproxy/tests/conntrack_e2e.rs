//! The DNS case: a UDP client that keeps one socket (as resolvers do) keeps reaching a dead or replaced
//! backend through a stale conntrack entry unless the proxy deletes it. After the next sync every datagram must
//! reach the new backend, while flows of unrelated services keep their entries.

#[macro_use]
mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::{Svcproxy, TempDir};
use svcproxy_testkit::{Backend, Lab, NetNs, wait_until};

fn service(name: &str, ip: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: t}}
spec:
  clusterIP: {ip}
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: t
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- addresses: [{endpoint}]
"
    )
}

/// A resolver-like client: one socket, one source port, a datagram every 50 ms; every answer's identity goes
/// to the channel.
fn resident_client(
    ns: &NetNs,
    local: SocketAddr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    ns.spawn_thread(move || {
        let socket = UdpSocket::bind(local).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            let _ = socket.send_to(b"q", to);
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                let line = String::from_utf8_lossy(&buf[..n]).to_string();
                let identity = line.split_whitespace().next().unwrap_or_default().to_string();
                if tx.send(identity).is_err() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    rx
}

/// The conntrack id of the UDP entry from `source_port` to `vip`, as `conntrack -L -o id` prints it.
fn entry_id(ns: &NetNs, vip: &str, source_port: u16) -> Option<String> {
    let out = ns
        .exec_stdout(&[
            "conntrack",
            "-L",
            "-p",
            "udp",
            "--orig-dst",
            vip,
            "--sport",
            &source_port.to_string(),
            "-o",
            "id",
        ])
        .ok()?;
    out.lines().find_map(|l| {
        l.split("id=")
            .nth(1)
            .map(|id| id.split_whitespace().next().unwrap_or("").to_string())
    })
}

fn replaced_udp_backend_gets_every_datagram_and_other_flows_survive(mode: &str) {
    let lab = Lab::new();
    let pods: Vec<_> = [("dns1", 11), ("dns2", 12), ("other", 13)]
        .iter()
        .map(|(n, i)| lab.add_pod(n, Ipv4Addr::new(10, 244, 0, *i)))
        .collect();
    let _backends: Vec<_> = pods
        .iter()
        .map(|p| Backend::start(p.ns(), p.name(), &[], &[5353]))
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
    let dir = TempDir::new("ct");
    dir.write("dns.yaml", &service("dns", "10.96.0.10", "10.244.0.11"));
    dir.write("other.yaml", &service("other", "10.96.0.20", "10.244.0.13"));
    let mut proxy = Svcproxy::start(
        lab.node(),
        &["--manifests", dir.path().to_str().unwrap(), "--proxy-mode", mode],
    );

    let stop = Arc::new(AtomicBool::new(false));
    let dns = resident_client(
        client.ns(),
        "10.244.0.50:40000".parse().unwrap(),
        "10.96.0.10:53".parse().unwrap(),
        stop.clone(),
    );
    let other = resident_client(
        client.ns(),
        "10.244.0.50:40001".parse().unwrap(),
        "10.96.0.20:53".parse().unwrap(),
        stop.clone(),
    );
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        "dns1 answers the resident client",
        || {
            proxy.assert_running();
            dns.try_iter().any(|id| id == "dns1").then_some(())
        },
    );
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        "the other service answers",
        || other.try_iter().any(|id| id == "other").then_some(()),
    );
    let other_entry = entry_id(lab.node(), "10.96.0.20", 40001).expect("the other service's flow is tracked");

    // Replace the backend. dns1 keeps running and answering: only a deleted conntrack entry moves the flow.
    dir.write("dns.yaml", &service("dns", "10.96.0.10", "10.244.0.12"));
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        "the same socket reaches dns2",
        || dns.try_iter().any(|id| id == "dns2").then_some(()),
    );
    // From now on every datagram goes to the new backend.
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<String> = dns.try_iter().collect();
    assert!(
        !after.is_empty() && after.iter().all(|id| id == "dns2"),
        "stragglers to the old backend: {after:?}"
    );
    assert_eq!(
        entry_id(lab.node(), "10.96.0.20", 40001).as_deref(),
        Some(other_entry.as_str()),
        "the unrelated service's flow kept its conntrack entry"
    );
    assert!(other.try_iter().all(|id| id == "other"));

    // Scaled to zero and back: the flow must not stay pinned to the pod that was removed.
    dir.write(
        "dns.yaml",
        &service("dns", "10.96.0.10", "10.244.0.11").replace("- addresses: [10.244.0.11]\n", ""),
    );
    std::thread::sleep(Duration::from_secs(1));
    dir.write("dns.yaml", &service("dns", "10.96.0.10", "10.244.0.11"));
    let _ = dns.try_iter().count();
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        "the flow reaches dns1 again",
        || dns.try_iter().any(|id| id == "dns1").then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    let metrics = proxy.metrics(lab.node());
    assert!(
        metrics.contains("kubeproxy_conntrack_reconciler_deleted_entries_total"),
        "{metrics}"
    );
    proxy.assert_no_divergence();
}

in_both_modes!(replaced_udp_backend_gets_every_datagram_and_other_flows_survive,);
