//! nftables mode as it runs on kernels before 6.2 (told so by a fixed kernel release), on this kernel: a
//! removed Service's chains and sets are flushed by the sync that removes it and deleted by a sync after the
//! delay the report asks for, also after a restart in between; read-back never takes the flushed chains for
//! a difference; and traffic to the Service that stays never stops.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use svcproxy::exec::kernel_release::FixedKernelRelease;
use svcproxy::exec::nft::SystemNft;
use svcproxy::exec::nft_netlink::NetlinkElementSocket;
use svcproxy::node_addresses::{FixedAddresses, NodePortSpec};
use svcproxy::sync::iptables_proxier::{DetectLocal, ProxierOptions};
use svcproxy::sync::nft_proxier::NftProxier;
use svcproxy::sync::proxier::{Proxier, SyncMode, SyncReport, VerifyScope};
use svcproxy_iptables::config::RenderConfig;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, IntentChanges, IntentConfig, IpFamily, ObjectName,
    Protocol, Service, ServicePort, SessionAffinity,
};
use svcproxy_nftables::{DELETION_DELAY, Family, Ruleset, parse_listing};
use svcproxy_testkit::{Backend, Lab, NetNs, tcp_request};

const T: Duration = Duration::from_secs(2);

/// Service `ns/NAME` at `vip`, port 80 to 8080 on `endpoint`; sticky when `affinity`, so it has sets too.
fn add_service(state: &mut ClusterState, name: &str, vip: &str, endpoint: &str, affinity: bool) {
    let object = ObjectName::new("ns", name);
    let mut service = Service::cluster_ip(
        object.clone(),
        vip.parse().unwrap(),
        vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }],
    );
    if affinity {
        service.session_affinity = SessionAffinity::ClientIP { timeout_seconds: 60 };
    }
    let slice = EndpointSlice {
        name: ObjectName::new("ns", format!("{name}-1")),
        service_name: name.into(),
        address_family: Some(IpFamily::V4),
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: vec![Endpoint::ready(endpoint.parse().unwrap(), None)],
        last_change_trigger_time: None,
    };
    state.services.insert(object, service);
    state.endpoint_slices.insert(slice.name.clone(), slice);
}

fn remove_service(state: &mut ClusterState, name: &str) -> IntentChanges {
    let object = ObjectName::new("ns", name);
    state.services.remove(&object);
    state
        .endpoint_slices
        .remove(&ObjectName::new("ns", format!("{name}-1")));
    let mut changes = IntentChanges::default();
    changes.service(&object);
    changes
}

/// A proxier in the node's namespace that believes it runs on Linux 5.15.
fn old_kernel_proxier(node: &NetNs) -> NftProxier {
    node.run(|| {
        NftProxier::new(
            Box::new(SystemNft),
            Box::new(FixedAddresses(vec![Lab::NODE_IP.into()])),
            IntentConfig {
                family: IpFamily::V4,
                node_name: "node-a".into(),
            },
            ProxierOptions {
                base: RenderConfig::default(),
                detect_local: DetectLocal::None,
                nodeport_addresses: NodePortSpec::All,
                bind_ip: None,
            },
        )
        .with_element_socket(Box::new(NetlinkElementSocket::new().expect("netlink socket")))
        .with_kernel_release(&FixedKernelRelease("5.15.0-91-generic".into()))
    })
}

fn sync(
    node: &NetNs,
    proxier: &mut NftProxier,
    state: &ClusterState,
    changes: &IntentChanges,
    mode: SyncMode,
) -> SyncReport {
    node.run(|| proxier.sync(state, changes, mode))
        .unwrap_or_else(|e| panic!("sync ({mode:?}): {e}"))
}

fn table(node: &NetNs) -> Ruleset {
    let text = node
        .exec_stdout(&["nft", "list", "table", "ip", "svcproxy"])
        .unwrap();
    parse_listing(&text)
        .unwrap()
        .table(Family::Ip, "svcproxy")
        .unwrap()
        .clone()
}

/// The names of `service`'s chains and sets in the kernel's table, and whether every chain is empty.
fn objects_of(node: &NetNs, service: &str) -> (Vec<String>, bool) {
    let rs = table(node);
    let owned = |name: &String| name.contains(&format!("ns/{service}/"));
    let chains: Vec<&String> = rs.chains.keys().filter(|n| owned(n)).collect();
    let empty = chains.iter().all(|n| rs.chains[*n].rules.is_empty());
    let names = chains
        .into_iter()
        .chain(rs.sets.keys().filter(|n| owned(n)))
        .cloned()
        .collect();
    (names, empty)
}

/// Waits for the follow-up the report asked for, as the engine does, and runs it.
fn follow_up(
    node: &NetNs,
    proxier: &mut NftProxier,
    state: &ClusterState,
    report: &SyncReport,
) -> SyncReport {
    let after = report.follow_up.expect("a follow-up sync is asked for");
    assert!(after <= DELETION_DELAY, "{after:?}");
    std::thread::sleep(after);
    sync(node, proxier, state, &IntentChanges::default(), SyncMode::Partial)
}

#[test]
fn removed_chains_are_flushed_first_and_deleted_by_a_later_sync() {
    let lab = Lab::new();
    let pods: Vec<_> = (11..=13)
        .map(|i| lab.add_pod(&format!("pod{i}"), Ipv4Addr::new(10, 244, 0, i)))
        .collect();
    let _backends: Vec<_> = pods
        .iter()
        .map(|p| Backend::start(p.ns(), p.name(), &[8080], &[]))
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
    let node = lab.node();

    let mut state = ClusterState::default();
    add_service(&mut state, "web", "10.96.0.10", "10.244.0.11", false);
    add_service(&mut state, "sticky", "10.96.0.20", "10.244.0.12", true);
    add_service(&mut state, "plain", "10.96.0.30", "10.244.0.13", false);
    let mut proxier = old_kernel_proxier(node);
    let cold = sync(
        node,
        &mut proxier,
        &state,
        &IntentChanges::everything(),
        SyncMode::Full,
    );
    assert_eq!(cold.follow_up, None, "nothing removed, nothing held");
    let vip = |last: u8| SocketAddr::from(([10, 96, 0, last], 80));
    for (last, pod) in [(10, "pod11"), (20, "pod12"), (30, "pod13")] {
        assert_eq!(tcp_request(client.ns(), vip(last), T).unwrap().identity, pod);
    }

    // Traffic to the Service that stays, the whole time.
    let stop = AtomicBool::new(false);
    let (sent, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        // Set when this closure ends, returning or failing: the scope waits for the traffic to stop.
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                if !tcp_request(client.ns(), vip(10), T).is_ok_and(|r| r.identity == "pod11") {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        removals(node, client.ns(), &mut proxier, &mut state);
    });
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests to the Service that stayed",
        sent.load(Ordering::Relaxed)
    );
    assert!(sent.load(Ordering::Relaxed) > 0);
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The two removals, while traffic flows.
fn removals(node: &NetNs, client: &NetNs, proxier: &mut NftProxier, state: &mut ClusterState) {
    let vip = |last: u8| SocketAddr::from(([10, 96, 0, last], 80));

    // The sticky Service goes: its chains are flushed and its affinity set kept, nothing reaches them, and
    // reading the table back finds it as written.
    let changes = remove_service(state, "sticky");
    let removed = sync(node, proxier, state, &changes, SyncMode::Partial);
    let (held, empty) = objects_of(node, "sticky");
    assert!(
        held.iter().any(|n| n.starts_with("service-")) && held.iter().any(|n| n.starts_with("affinity-")),
        "{held:?}"
    );
    assert!(empty, "held chains are flushed: {held:?}");
    assert!(!tcp_request(client, vip(20), T).is_ok_and(|r| r.identity == "pod12"));
    assert_eq!(node.run(|| proxier.verify(VerifyScope::All)).unwrap(), []);

    // The sync the report asks for deletes them, and asks for nothing more.
    let deleted = follow_up(node, proxier, state, &removed);
    assert_eq!(objects_of(node, "sticky").0, Vec::<String>::new());
    assert!(deleted.payload_lines >= held.len(), "{deleted:?}");
    assert_eq!(deleted.follow_up, None);
    assert_eq!(node.run(|| proxier.verify(VerifyScope::All)).unwrap(), []);

    // Another Service goes, and the proxier restarts before the follow-up: the new one finds the flushed
    // chains in the kernel, holds them again and deletes them in its own follow-up.
    let changes = remove_service(state, "plain");
    sync(node, proxier, state, &changes, SyncMode::Partial);
    let (held, empty) = objects_of(node, "plain");
    assert!(!held.is_empty() && empty, "{held:?}");
    let mut restarted = old_kernel_proxier(node);
    let first = sync(
        node,
        &mut restarted,
        state,
        &IntentChanges::everything(),
        SyncMode::Full,
    );
    assert_eq!(
        objects_of(node, "plain").0,
        held,
        "held again, not deleted at once"
    );
    assert_eq!(node.run(|| restarted.verify(VerifyScope::All)).unwrap(), []);
    follow_up(node, &mut restarted, state, &first);
    assert_eq!(objects_of(node, "plain").0, Vec::<String>::new());
    assert_eq!(node.run(|| restarted.verify(VerifyScope::All)).unwrap(), []);
}

/// A held deletion the kernel refuses (here because another program's rule still jumps to the chain) does not
/// fail the sync, whose rules are in: it is reported for upstream's cleanup-failure counter, the objects stay
/// held, and a later sync deletes them once nothing refers to them.
#[test]
fn a_refused_deletion_is_tried_again_without_failing_the_sync() {
    let lab = Lab::new();
    let node = lab.node();
    let mut state = ClusterState::default();
    add_service(&mut state, "web", "10.96.0.10", "10.244.0.11", false);
    add_service(&mut state, "gone", "10.96.0.20", "10.244.0.12", false);
    let mut proxier = old_kernel_proxier(node);
    sync(
        node,
        &mut proxier,
        &state,
        &IntentChanges::everything(),
        SyncMode::Full,
    );

    let changes = remove_service(&mut state, "gone");
    let removed = sync(node, &mut proxier, &state, &changes, SyncMode::Partial);
    assert!(!removed.cleanup_failed);
    let (held, flushed) = objects_of(node, "gone");
    assert!(!held.is_empty() && flushed, "{held:?}");

    let chain = "service-ns/gone/tcp/http";
    assert!(held.iter().any(|n| n == chain), "{held:?}");
    for step in [
        &["nft", "add", "chain", "ip", "svcproxy", "foreign"][..],
        &["nft", "add", "rule", "ip", "svcproxy", "foreign", "jump", chain],
    ] {
        node.exec(step).unwrap();
    }
    let refused = follow_up(node, &mut proxier, &state, &removed);
    assert!(refused.cleanup_failed, "the kernel refused the deletion");
    assert_eq!(objects_of(node, "gone").0, held, "still held, still there");

    node.exec(&["nft", "flush", "chain", "ip", "svcproxy", "foreign"])
        .unwrap();
    node.exec(&["nft", "delete", "chain", "ip", "svcproxy", "foreign"])
        .unwrap();
    let retried = follow_up(node, &mut proxier, &state, &refused);
    assert!(!retried.cleanup_failed);
    assert_eq!(objects_of(node, "gone").0, Vec::<String>::new());
    assert_eq!(retried.follow_up, None, "nothing held any more");
}
