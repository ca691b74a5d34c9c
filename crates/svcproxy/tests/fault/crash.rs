//! I: svcproxy killed with SIGKILL in the middle of a sync, then started again. No shutdown code runs, the
//! `iptables-restore` it was feeding loses its input half-way, and the new process starts from nothing.
//! Nothing may be half-written: every chain holds its old or its new rules and nothing jumps to a missing
//! chain (see [`consistency`]); Services whose rules did not change must not notice (no traffic gap); and the
//! restart must not flush connection tracking.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use svcproxy_iptables::seal::SEAL_CHAIN;
use svcproxy_testkit::{NetNs, wait_until};

use super::harness::{
    Cluster, HealthWatch, POLL, Sample, Traffic, WAIT, addr, chain_names, chains, failures, identities, save,
    traffic_summary,
};
use super::manifests::{DNS, HTTP, service};
use super::report::Case;
use super::web::names;
use crate::common::{Svcproxy, TempDir};

/// Services besides the two the case watches, so a sync's `iptables-restore` runs long enough to be killed
/// while it reads its input.
const FILLERS: usize = 800;

/// `FILLERS` ClusterIP Services with two endpoints each; `generation` moves every endpoint to new addresses
/// (nothing answers there: only the rules matter).
fn fillers(generation: u8) -> String {
    let mut out = String::new();
    for i in 0..FILLERS {
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        let eps: Vec<String> = (0..2)
            .map(|k| {
                let j = 2 * i + k;
                format!("10.{}.{}.{}", 245 + generation, j / 250, j % 250 + 1)
            })
            .collect();
        let eps: Vec<(&str, &str)> = eps.iter().map(|e| (e.as_str(), "node-b")).collect();
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&service("bulk", &format!("fill-{i}"), &ip, "", "", &[HTTP], &eps));
    }
    out
}

/// A UDP "conversation" from one socket (one conntrack entry), a datagram every half second.
struct UdpFlow {
    port: u16,
    replies: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpFlow {
    fn start(ns: &NetNs, target: SocketAddr, origin: Instant) -> UdpFlow {
        let socket = ns.run(|| {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.connect(target).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            s
        });
        let port = socket.local_addr().unwrap().port();
        let replies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (replies, stop) = (Arc::clone(&replies), Arc::clone(&stop));
            move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let at = origin.elapsed();
                    let outcome = socket
                        .send(b"ping\n")
                        .and_then(|_| socket.recv(&mut buf))
                        .map(|n| {
                            String::from_utf8_lossy(&buf[..n])
                                .split_whitespace()
                                .next()
                                .unwrap_or_default()
                                .to_owned()
                        })
                        .map_err(|e| e.kind().to_string());
                    replies.lock().unwrap().push(Sample { at, outcome });
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        });
        UdpFlow {
            port,
            replies,
            stop,
            thread: Some(thread),
        }
    }

    fn replies(&self) -> Vec<Sample> {
        self.replies.lock().unwrap().clone()
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The conntrack id of the flow from `sport` to the DNS ClusterIP: a flushed and re-created entry gets a
/// new id even though its addresses are the same.
fn conntrack_id(node: &NetNs, sport: u16) -> Option<String> {
    let out = node
        .exec_stdout(&[
            "conntrack",
            "-L",
            "-p",
            "udp",
            "--orig-dst",
            "10.96.0.10",
            "-o",
            "id",
        ])
        .unwrap_or_default();
    let want = format!("sport={sport} ");
    out.lines()
        .find(|l| l.contains(&want))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
}

/// `iptables-nft-restore` processes whose parent is `pid`.
fn restore_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        // The kernel keeps 15 bytes of the name: `iptables-nft-restore` is `iptables-nft-re`.
        if comm.starts_with("iptables-nft-re") && ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Whether process `pid` has finished (gone, or a zombie waiting for its new parent to reap it).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

#[test]
fn i_kill_9_during_a_sync_and_restart() {
    let mut case = Case::new("I kill -9 mid-sync, restart");
    let cluster = Cluster::new(&[
        ("pod11", Ipv4Addr::new(10, 244, 0, 11)),
        ("pod12", Ipv4Addr::new(10, 244, 0, 12)),
    ]);
    let node = cluster.node();
    let dir = TempDir::new("crash");
    let watched = format!(
        "{}---\n{}",
        service(
            "demo",
            "web",
            "10.96.0.100",
            "",
            "",
            &[HTTP],
            &[("10.244.0.11", "node-a"), ("10.244.0.12", "node-a")],
        ),
        service(
            "demo",
            "dns",
            "10.96.0.10",
            "",
            "",
            &[DNS],
            &[("10.244.0.11", "node-a")]
        ),
    );
    dir.write("watched.yaml", &watched);
    dir.write("bulk.yaml", &fillers(1));
    let args = ["--manifests", dir.path().to_str().unwrap()];
    let mut proxy = Svcproxy::start(node, &args);
    let traffic = Traffic::start(cluster.client.ns(), addr("10.96.0.100", 80), case.origin());
    let health = HealthWatch::start(node, case.origin());
    wait_until(
        Duration::from_secs(90),
        POLL,
        "every Service is programmed",
        || {
            proxy.assert_running();
            (chain_names(&save(node, "nat"), "KUBE-SVC-").len() >= FILLERS + 2
                && identities(&traffic.next(5)) == names(&["pod11", "pod12"]))
            .then_some(())
        },
    );
    health.wait_for("healthz is 200", WAIT, |p| p.status == 200);
    // Requests before this were sent before svcproxy had programmed anything.
    let ready = case.now();
    let flow = UdpFlow::start(cluster.client.ns(), addr("10.96.0.10", 53), case.origin());
    let id_before = wait_until(WAIT, POLL, "the UDP flow has a conntrack entry", || {
        conntrack_id(node, flow.port)
    });
    let old = (save(node, "nat"), save(node, "filter"));

    case.stage("moving every filler endpoint, then SIGKILL while iptables-restore reads");
    dir.write("bulk.yaml", &fillers(2));
    let deadline = Instant::now() + Duration::from_secs(60);
    let restore_pid = loop {
        if let Some(&child) = restore_children(proxy.pid()).first() {
            break Some(child);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    proxy.kill9();
    case.injected();
    let restore_pid = restore_pid.unwrap_or_else(|| {
        panic!(
            "no iptables-restore was seen for the change; log:\n{}",
            proxy.log()
        )
    });
    wait_until(
        WAIT,
        Duration::from_millis(20),
        "the orphaned iptables-restore ends",
        || exited(restore_pid).then_some(()),
    );
    let mid = (save(node, "nat"), save(node, "filter"));
    let killed_at = case.now();

    case.stage("restarting");
    let mut proxy = Svcproxy::start(node, &args);
    let moved = "10.247.0.1:8080";
    wait_until(
        Duration::from_secs(90),
        POLL,
        "the restarted svcproxy programs the change",
        || {
            proxy.assert_running();
            save(node, "nat").contains(moved).then_some(())
        },
    );
    health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none() && p.at > killed_at
    });
    case.repaired(case.now());
    let new = (save(node, "nat"), save(node, "filter"));
    // One more round on the UDP flow after the restart, so its entry has been used since.
    let replies_before = flow.replies().len();
    wait_until(WAIT, POLL, "the UDP flow answers after the restart", || {
        (flow.replies().len() > replies_before + 1).then_some(())
    });
    let id_after = conntrack_id(node, flow.port);

    let nat_state = consistency("nat", &mid.0, &old.0, &new.0);
    let filter_state = consistency("filter", &mid.1, &old.1, &new.1);
    let samples = traffic.since(ready);
    let udp = flow.replies();
    let udp_failed: Vec<_> = udp.iter().filter(|s| s.outcome.is_err()).collect();
    case.note(format!(
        "after the kill {}, {}",
        nat_state.summary, filter_state.summary
    ));
    case.note(format!("conntrack id {id_before} → {id_after:?}"));
    case.note(format!("tcp: {}", traffic_summary(&samples)));
    case.note(format!(
        "udp: {} datagrams, {} failed",
        udp.len(),
        udp_failed.len()
    ));
    case.health(health.summary());

    for state in [&nat_state, &filter_state] {
        assert!(state.torn.is_empty(), "{}: {:?}", state.summary, state.torn);
    }
    assert_eq!(
        failures(&samples),
        0,
        "a Service whose rules did not change must not notice the crash and restart: {}",
        traffic_summary(&samples)
    );
    assert_eq!(
        id_after.as_deref(),
        Some(id_before.as_str()),
        "the established UDP flow's conntrack entry must survive the restart"
    );
    assert!(
        udp_failed.is_empty(),
        "the UDP flow kept its answers: {udp_failed:?}"
    );
    assert!(
        udp.iter()
            .all(|s| s.outcome.as_deref().is_ok_and(|id| id == "pod11")),
        "the UDP flow stays on its backend"
    );
    proxy.assert_running();
}

/// How a table looked right after the kill, compared with the rules before the change and after it.
struct Consistency {
    summary: String,
    /// Chains holding neither their old nor their new rules, and jumps to chains that do not exist.
    torn: Vec<String>,
}

/// svcproxy may write a large change as several transactions, each carrying whole service ports (their
/// endpoint, service and external chains together) and the shared chains last. So what must hold after a kill
/// at any moment is: every chain is exactly its old or its new version (or absent where one of them has no
/// such chain), and nothing jumps to a chain that does not exist. When the whole change is one transaction,
/// that means the table is entirely old or entirely new.
fn consistency(table: &str, mid: &str, old: &str, new: &str) -> Consistency {
    let (m, o, n) = (chains(mid), chains(old), chains(new));
    let names: std::collections::BTreeSet<&String> = m.keys().chain(o.keys()).chain(n.keys()).collect();
    let mut torn = Vec::new();
    let (mut as_old, mut as_new) = (0, 0);
    // The seal is rewritten by every transaction and no packet meets its rule: it is bookkeeping, not a rule
    // chain that could be torn.
    for name in names.into_iter().filter(|n| *n != SEAL_CHAIN) {
        let (mc, oc, nc) = (m.get(name), o.get(name), n.get(name));
        if mc == oc && mc == nc {
            continue;
        }
        if mc == oc {
            as_old += 1;
        } else if mc == nc {
            as_new += 1;
        } else {
            torn.push(format!("{table}/{name} is neither its old nor its new version"));
        }
    }
    for (chain, rules) in &m {
        for rule in rules {
            let target = rule.split_whitespace().skip_while(|w| *w != "-j").nth(1);
            if let Some(t) = target.filter(|t| t.starts_with("KUBE-"))
                && !m.contains_key(t)
            {
                torn.push(format!("{table}/{chain} jumps to missing {t}"));
            }
        }
    }
    let summary = match (as_old, as_new, torn.is_empty()) {
        (_, 0, true) => format!("{table}: old"),
        (0, _, true) => format!("{table}: new"),
        (_, _, true) => {
            format!("{table}: {as_old} changed chains still old, {as_new} already new, none torn")
        }
        _ => format!("{table}: TORN ({} problems)", torn.len()),
    };
    Consistency { summary, torn }
}
