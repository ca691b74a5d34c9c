//! The sync engine against a recording fake of iptables: when it syncs, full versus partial, and what a
//! failure does.

use std::sync::Arc;
use std::time::Duration;

use svcproxy::exec::iptables::{ExecError, Recorded, RecordingIptables};
use svcproxy::health::ProxyHealth;
use svcproxy::metrics::Metrics;
use svcproxy::node_addresses::{FixedAddresses, NodePortSpec};
use svcproxy::packet_counters::CountingSwitch;
use svcproxy::source::{Delta, SourceEvent};
use svcproxy::sync::engine::{Engine, EngineConfig, EngineStatus};
use svcproxy::sync::iptables_proxier::{DetectLocal, IptablesProxier, ProxierOptions};
use svcproxy_iptables::config::RenderConfig;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, IntentConfig, IpFamily, ObjectName, Protocol,
    Service, ServicePort,
};
use tokio::sync::{mpsc, watch};

fn service(name: &str, ip: &str) -> Service {
    Service::cluster_ip(
        ObjectName::new("ns", name),
        ip.parse().unwrap(),
        vec![ServicePort {
            name: "p".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }],
    )
}

fn slice(service: &str, ips: &[&str]) -> EndpointSlice {
    EndpointSlice {
        name: ObjectName::new("ns", format!("{service}-1")),
        service_name: service.into(),
        address_family: Some(IpFamily::V4),
        ports: vec![EndpointPort {
            name: "p".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: ips
            .iter()
            .map(|ip| Endpoint::ready(ip.parse().unwrap(), None))
            .collect(),
        last_change_trigger_time: None,
    }
}

struct Harness {
    fake: RecordingIptables,
    tx: mpsc::Sender<SourceEvent>,
    status: watch::Receiver<EngineStatus>,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    /// What the proxier says of its packet counters, as the debug endpoints read it.
    counting: CountingSwitch,
    _stop: watch::Sender<bool>,
}

fn start() -> Harness {
    start_with(RenderConfig::default())
}

fn start_with(base: RenderConfig) -> Harness {
    start_queued(base, false, Default::default(), Vec::new())
}

/// An engine with read-back after each sync, whose fake holds restores at `gate`, finding `queued` waiting.
fn start_gated(gate: svcproxy::exec::gate::Gate, queued: Vec<SourceEvent>) -> Harness {
    start_queued(RenderConfig::default(), true, gate, queued)
}

/// An engine that finds `queued` waiting when it starts, so what it does with them does not depend on how
/// fast the test sends them; `verify_after_sync` as the daemon's.
fn start_queued(
    base: RenderConfig,
    verify_after_sync: bool,
    gate: svcproxy::exec::gate::Gate,
    queued: Vec<SourceEvent>,
) -> Harness {
    let mut fake = RecordingIptables::default();
    fake.restore_gate = gate;
    let counting = CountingSwitch::new(base.packet_counters);
    let proxier = iptables_proxier(&fake, base).with_counting_switch(counting.clone());
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    let config = EngineConfig {
        min_sync_period: Duration::ZERO,
        sync_period: Duration::from_millis(200),
        // The fake has no kernel to read back (a read finds it empty); read-back has its own real-kernel
        // tests.
        verify_after_sync,
        verify_period: None,
        canary_period: None,
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::new(proxier, config, health.clone(), metrics.clone());
    let status = engine.status();
    let (tx, rx) = mpsc::channel(16);
    for event in queued {
        tx.try_send(event).expect("room in the channel");
    }
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(engine.run(rx, stop_rx));
    Harness {
        fake,
        tx,
        status,
        health,
        metrics,
        counting,
        _stop: stop,
    }
}

impl Harness {
    async fn wait_syncs(&mut self, n: u64) -> EngineStatus {
        tokio::time::timeout(Duration::from_secs(10), self.status.wait_for(|s| s.syncs >= n))
            .await
            .expect("sync happened")
            .unwrap()
            .clone()
    }
    fn calls(&self) -> Vec<Recorded> {
        self.fake.calls.lock().unwrap().clone()
    }

    /// The fake's calls once `enough` of them were made (10 s at most). A test that gives up opens the fake's
    /// gates first: an engine held at one would keep the runtime from shutting down, and the test would hang
    /// instead of failing.
    fn calls_until(&self, what: &str, enough: &dyn Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let calls = self.calls();
            if enough(&calls) {
                return calls;
            }
            if std::time::Instant::now() > deadline {
                self.fake.restore_gate.open();
                self.fake.save_gate.open();
                panic!("{what}: {calls:#?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The IPv4 engine of node-a (10.0.0.10), rendering with `base`.
fn node_a(base: RenderConfig) -> (FixedAddresses, IntentConfig, ProxierOptions) {
    (
        FixedAddresses(vec!["10.0.0.10".parse().unwrap()]),
        IntentConfig {
            family: IpFamily::V4,
            node_name: "node-a".into(),
        },
        ProxierOptions {
            base,
            detect_local: DetectLocal::None,
            nodeport_addresses: NodePortSpec::All,
            bind_ip: None,
        },
    )
}

/// An iptables proxier for node-a, writing to `fake`.
fn iptables_proxier(fake: &RecordingIptables, base: RenderConfig) -> IptablesProxier {
    let (addresses, intent, options) = node_a(base);
    IptablesProxier::new(Box::new(fake.clone()), Box::new(addresses), intent, options)
}

/// An nftables proxier for node-a, writing to `nft`.
fn nft_proxier(nft: &svcproxy::exec::nft::RecordingNft) -> svcproxy::sync::nft_proxier::NftProxier {
    let (addresses, intent, options) = node_a(RenderConfig::default());
    svcproxy::sync::nft_proxier::NftProxier::new(Box::new(nft.clone()), Box::new(addresses), intent, options)
}

fn saves(calls: &[Recorded]) -> usize {
    calls.iter().filter(|c| matches!(c, Recorded::Save(_))).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_written_before_every_initial_list_completes() {
    let mut h = start();
    let mut state = ClusterState::default();
    state
        .services
        .insert(ObjectName::new("ns", "a"), service("a", "10.96.0.1"));
    h.tx.send(SourceEvent::Snapshot(state)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        h.calls().is_empty(),
        "no kernel access before Synced: {:?}",
        h.calls()
    );
    h.tx.send(SourceEvent::Synced).await.unwrap();
    h.wait_syncs(1).await;
    let restores = h.fake.restores();
    assert_eq!(restores.len(), 1);
    assert!(restores[0].contains("ns/a"), "{}", restores[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn first_sync_is_full_later_ones_partial_and_a_failure_escalates_to_full() {
    let mut h = start();
    h.tx.send(SourceEvent::Services(Delta::Apply(service("a", "10.96.0.1"))))
        .await
        .unwrap();
    h.tx.send(SourceEvent::EndpointSlices(Delta::Apply(slice(
        "a",
        &["10.244.0.1"],
    ))))
    .await
    .unwrap();
    h.tx.send(SourceEvent::Synced).await.unwrap();
    h.wait_syncs(1).await;
    assert_eq!(
        saves(&h.calls()),
        1,
        "a full sync reads the kernel once, to collect leftovers"
    );

    // An endpoint change is a partial sync: no kernel listing, and only the changed service's chains.
    h.tx.send(SourceEvent::EndpointSlices(Delta::Apply(slice(
        "a",
        &["10.244.0.1", "10.244.0.2"],
    ))))
    .await
    .unwrap();
    h.wait_syncs(2).await;
    assert_eq!(saves(&h.calls()), 1, "partial sync never lists the kernel");
    let partial = h.fake.restores().last().unwrap().clone();
    assert!(partial.contains("10.244.0.2:8080"), "{partial}");

    // The kernel refuses the next transaction: the engine retries at once with a full sync, not the same one.
    h.fake.fail_restores.lock().unwrap().push(ExecError::Failed {
        program: "iptables-restore".into(),
        status: "exit status: 1".into(),
        stderr: "iptables-restore: line 3 failed".into(),
    });
    h.tx.send(SourceEvent::Services(Delta::Apply(service("b", "10.96.0.2"))))
        .await
        .unwrap();
    // The retry can follow so fast that the status is only seen after it: the failure is then read from the
    // metrics.
    let failed = h.wait_syncs(3).await;
    if failed.syncs == 3 {
        assert!(
            failed.last_error.as_deref().is_some_and(|e| e.contains("line 3")),
            "{failed:?}"
        );
    }
    let ok = h.wait_syncs(4).await;
    assert_eq!(ok.last_error, None);
    let metrics = h.metrics.encode();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("iptables_restore_failures") && !l.starts_with('#') && l.ends_with(" 1")),
        "{metrics}"
    );
    assert_eq!(saves(&h.calls()), 2, "the retry was a full sync");
    assert!(h.fake.restores().last().unwrap().contains("ns/b"));
    assert!(h.health.status().healthy);
}

/// On a kernel before 6.2 a removed Service's chains are flushed by the sync that removes it, and deleted by
/// a sync the engine runs on its own a second later, with nothing else changing.
#[tokio::test(flavor = "multi_thread")]
async fn chains_held_back_on_an_old_kernel_are_deleted_by_a_follow_up_sync() {
    use svcproxy::exec::kernel_release::FixedKernelRelease;
    use svcproxy::exec::nft::RecordingNft;

    let nft = RecordingNft::default();
    let proxier = nft_proxier(&nft).with_kernel_release(&FixedKernelRelease("5.15.0-91-generic".into()));
    let config = EngineConfig {
        min_sync_period: Duration::ZERO,
        verify_after_sync: false,
        verify_period: None,
        canary_period: None,
        ..Default::default()
    };
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    let engine = Engine::new(proxier, config, health, Arc::new(Metrics::new()));
    let mut status = engine.status();
    let (tx, rx) = mpsc::channel(16);
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(engine.run(rx, stop_rx));
    let mut wait_syncs = async |n: u64| {
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.syncs >= n))
            .await
            .expect("sync happened")
            .unwrap()
            .clone()
    };
    let last = || nft.applied.lock().unwrap().last().cloned().unwrap_or_default();

    for name in ["a", "b"] {
        let ip = if name == "a" { "10.96.0.1" } else { "10.96.0.2" };
        tx.send(SourceEvent::Services(Delta::Apply(service(name, ip))))
            .await
            .unwrap();
        tx.send(SourceEvent::EndpointSlices(Delta::Apply(slice(
            name,
            &["10.244.0.1"],
        ))))
        .await
        .unwrap();
    }
    tx.send(SourceEvent::Synced).await.unwrap();
    wait_syncs(1).await;

    tx.send(SourceEvent::Services(Delta::Delete(ObjectName::new("ns", "b"))))
        .await
        .unwrap();
    let removed = wait_syncs(2).await;
    assert_eq!(removed.last_error, None);
    let flushed = last();
    assert!(
        flushed.contains("flush chain ip svcproxy service-ns/b/tcp/p"),
        "{flushed}"
    );
    assert!(!flushed.contains("delete chain"), "{flushed}");

    // No event: the engine comes back on its own and the chains go.
    let followed = wait_syncs(3).await;
    assert_eq!(followed.last_error, None);
    let deleted = last();
    assert!(
        deleted
            .lines()
            .all(|l| l.starts_with("delete chain ip svcproxy ") && l.contains("ns/b/")),
        "{deleted}"
    );
    assert!(
        deleted.contains("delete chain ip svcproxy service-ns/b/tcp/p"),
        "{deleted}"
    );
}

/// A kernel with nfacct objects but without the iptables `nfacct` match (kubernetes#142068: there every restore
/// failed for good while kube-proxy reported healthy): the first restore fails on a counting rule, and the
/// retry writes the same rules without packet counters, and says so to the debug endpoints, which render
/// what the daemon writes.
#[tokio::test(flavor = "multi_thread")]
async fn rules_that_cannot_count_are_written_without_the_counters() {
    let mut h = start_with(RenderConfig {
        packet_counters: true,
        ..RenderConfig::default()
    });
    assert!(h.counting.is_on());
    h.fake.fail_restores.lock().unwrap().push(ExecError::Failed {
        program: "iptables-restore".into(),
        status: "exit status: 2".into(),
        stderr: "iptables-restore v1.8.9 (nf_tables): Couldn't load match `nfacct':No such file or directory"
            .into(),
    });
    h.tx.send(SourceEvent::Services(Delta::Apply(service("a", "10.96.0.1"))))
        .await
        .unwrap();
    h.tx.send(SourceEvent::Synced).await.unwrap();
    let ok = h.wait_syncs(2).await;
    assert_eq!(ok.last_error, None, "{ok:?}");
    let restores = h.fake.restores();
    assert!(
        restores[0].contains("-m nfacct --nfacct-name ct_state_invalid_dropped_pkts"),
        "{}",
        restores[0]
    );
    let last = restores.last().unwrap();
    assert!(!last.contains("nfacct"), "{last}");
    assert!(!h.counting.is_on(), "the switch the debug endpoints read is off");
    assert!(
        last.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"),
        "{last}"
    );
}

/// Topology hints choose endpoints by the Node's zone, so a Node moving to another zone changes what every
/// hinted Service sends to though none of them changed: the next sync must rebuild them all, not only the
/// Services named by events.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_moving_zones_rewrites_services_that_did_not_change() {
    use std::collections::BTreeSet;

    let mut h = start();
    let node_in = |zone: &str| svcproxy_model::Node {
        name: "node-a".into(),
        labels: [(svcproxy_model::Node::ZONE_LABEL.to_string(), zone.to_string())].into(),
        ..Default::default()
    };
    let mut hinted = slice("a", &["10.244.0.1", "10.244.0.2"]);
    for (ep, zone) in hinted.endpoints.iter_mut().zip(["zone-a", "zone-b"]) {
        ep.zone_hints = Some(Arc::new(BTreeSet::from([zone.to_string()])));
    }
    h.tx.send(SourceEvent::Node(Some(node_in("zone-a"))))
        .await
        .unwrap();
    h.tx.send(SourceEvent::Services(Delta::Apply(service("a", "10.96.0.1"))))
        .await
        .unwrap();
    h.tx.send(SourceEvent::EndpointSlices(Delta::Apply(hinted)))
        .await
        .unwrap();
    h.tx.send(SourceEvent::Synced).await.unwrap();
    h.wait_syncs(1).await;
    let first = h.fake.restores().last().unwrap().clone();
    assert!(first.contains("--to-destination 10.244.0.1:8080"), "{first}");
    assert!(!first.contains("10.244.0.2:8080"), "{first}");

    h.tx.send(SourceEvent::Node(Some(node_in("zone-b"))))
        .await
        .unwrap();
    let moved = h.wait_syncs(2).await;
    assert_eq!(moved.last_error, None, "{moved:?}");
    let second = h.fake.restores().last().unwrap().clone();
    assert!(second.contains("--to-destination 10.244.0.2:8080"), "{second}");
    assert!(!second.contains("--to-destination 10.244.0.1:8080"), "{second}");
}

/// A change that arrives while a full sync runs is synced before that sync's read-back, which at thousands of
/// services reads the whole ruleset for a second or more; the read-back then covers both syncs, so the full
/// one is still read whole (not only the chains the partial one wrote).
#[tokio::test(flavor = "multi_thread")]
async fn a_change_arriving_during_a_full_sync_goes_before_its_read_back() {
    let queued = vec![
        SourceEvent::Services(Delta::Apply(service("a", "10.96.0.1"))),
        SourceEvent::EndpointSlices(Delta::Apply(slice("a", &["10.244.0.1"]))),
        SourceEvent::Synced,
    ];
    let fake_gate = svcproxy::exec::gate::Gate::default();
    fake_gate.close();
    let h = start_gated(fake_gate.clone(), queued);
    // The full sync is writing (held at its restore) when the change comes.
    h.calls_until("the full sync writes", &|c| {
        c.iter().any(|c| matches!(c, Recorded::Restore(_)))
    });
    h.tx.send(SourceEvent::EndpointSlices(Delta::Apply(slice(
        "a",
        &["10.244.0.1", "10.244.0.2"],
    ))))
    .await
    .unwrap();
    fake_gate.open();
    let calls = h.calls_until("the read-back after both", &|c| saves(c) >= 2);
    let change = calls
        .iter()
        .position(|c| matches!(c, Recorded::Restore(p) if p.contains("10.244.0.2:8080")));
    let saves_at: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Recorded::Save(_)))
        .map(|(i, _)| i)
        .collect();
    // The first read is the full sync's own (collecting leftovers); the second, the read-back after it,
    // comes once the change is written, and reads everything, not only the chains the change wrote.
    assert!(
        change.is_some_and(|at| at < saves_at[1]),
        "the change waited for the read-back: {calls:#?}"
    );
    assert!(
        !calls[..saves_at[1]]
            .iter()
            .any(|c| matches!(c, Recorded::ListChain(..))),
        "{calls:#?}"
    );
}

/// A change that arrives while the read-back after a full sync is reading the whole ruleset does not wait for
/// that read: the read is given up, the change synced, and the read done after it, whole still (it covers the
/// full sync too).
#[tokio::test(flavor = "multi_thread")]
async fn a_change_arriving_during_a_whole_read_back_is_synced_before_it() {
    let queued = vec![
        SourceEvent::Services(Delta::Apply(service("a", "10.96.0.1"))),
        SourceEvent::EndpointSlices(Delta::Apply(slice("a", &["10.244.0.1"]))),
        SourceEvent::Synced,
    ];
    let restores = svcproxy::exec::gate::Gate::default();
    restores.close();
    let h = start_gated(restores.clone(), queued);
    // The full sync read the kernel and is writing; from now on reads wait at the gate.
    h.calls_until("the full sync writes", &|c| {
        c.iter().any(|c| matches!(c, Recorded::Restore(_)))
    });
    h.fake.save_gate.close();
    restores.open();
    h.calls_until("the read-back after it reads", &|c| saves(c) >= 2);
    h.tx.send(SourceEvent::EndpointSlices(Delta::Apply(slice(
        "a",
        &["10.244.0.1", "10.244.0.2"],
    ))))
    .await
    .unwrap();
    let change = |c: &Recorded| matches!(c, Recorded::Restore(p) if p.contains("10.244.0.2:8080"));
    // Reads still wait at the gate: the change can only be written if the read was given up.
    let calls = h.calls_until("the change is written while the read-back waits", &|c| {
        c.iter().any(change)
    });
    h.fake.save_gate.open();
    let calls_after = h.calls_until("the read-back is done again", &|c| saves(c) >= 3);
    let written = calls.iter().position(change).unwrap();
    // The fake's empty dump then reads as a divergence, which repairs follow: only the first read counts.
    let read_after = calls_after[written..]
        .iter()
        .find(|c| matches!(c, Recorded::Save(_) | Recorded::ListChain(..)));
    assert!(
        matches!(read_after, Some(Recorded::Save(_))),
        "the read after the change reads everything, not only the chains the change wrote: {calls_after:#?}"
    );
}

/// In nftables mode too a change arriving while the read-back after a full sync lists the table stops the
/// listing (`nft` is killed) and is synced at once; the read is done again only once changes pause, not
/// between two changes of a burst, where it would only be given up again.
#[tokio::test(flavor = "multi_thread")]
async fn an_nftables_read_back_gives_way_to_changes_and_follows_once_they_pause() {
    read_back_gives_way_to_a_burst(None).await;
}

/// The canary, a glance at one chain every few seconds, is no read of the table: one that finds its chain
/// right during a burst leaves the whole read put off, not started again between two changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_canary_during_a_burst_leaves_the_read_back_put_off() {
    read_back_gives_way_to_a_burst(Some(Duration::from_millis(20))).await;
}

/// The chain `chain` as `nft list chain` shows it, from the transaction that wrote it.
fn chain_as_listed(transaction: &str, chain: &str) -> String {
    let declared = format!("add chain ip svcproxy {chain} {{ ");
    let head = transaction
        .lines()
        .find_map(|l| l.strip_prefix(declared.as_str()))
        .and_then(|rest| rest.strip_suffix(" }"))
        .unwrap_or_else(|| panic!("{chain} declared in {transaction}"));
    let rule = format!("add rule ip svcproxy {chain} ");
    let rules: Vec<&str> = transaction
        .lines()
        .filter_map(|l| l.strip_prefix(rule.as_str()))
        .collect();
    assert!(!rules.is_empty(), "{chain} has rules in {transaction}");
    format!(
        "table ip svcproxy {{\n\tchain {chain} {{\n\t\t{head}\n\t\t{}\n\t}}\n}}\n",
        rules.join("\n\t\t")
    )
}

async fn read_back_gives_way_to_a_burst(canary_period: Option<Duration>) {
    use std::sync::atomic::Ordering;
    use svcproxy::exec::nft::RecordingNft;

    let nft = RecordingNft::default();
    nft.listing_gate.close();
    let config = EngineConfig {
        min_sync_period: Duration::ZERO,
        verify_after_sync: true,
        verify_period: None,
        canary_period,
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::new(
        nft_proxier(&nft),
        config,
        Arc::new(ProxyHealth::new(Duration::from_secs(60))),
        metrics.clone(),
    );
    let (tx, rx) = mpsc::channel(16);
    for event in [
        SourceEvent::Services(Delta::Apply(service("a", "10.96.0.1"))),
        SourceEvent::EndpointSlices(Delta::Apply(slice("a", &["10.244.0.1"]))),
        SourceEvent::Synced,
    ] {
        tx.try_send(event).unwrap();
    }
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(engine.run(rx, stop_rx));
    // Whole reads of the table, not the canary's listings of one chain.
    let listings = || nft.table_listings.load(Ordering::SeqCst);
    let canaries = || nft.chain_listings.load(Ordering::SeqCst);
    let written = |ip: &str| nft.applied.lock().unwrap().iter().any(|t| t.contains(ip));
    // Waits for `done` (10 s at most); gives up with the gates open, so the engine is not left held.
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            if std::time::Instant::now() > deadline {
                nft.apply_gate.open();
                nft.listing_gate.open();
                let transactions = nft.applied.lock().unwrap().clone();
                panic!("{what}: {} listings, transactions {transactions:#?}", listings());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // The full sync reads the kernel first, and is held writing; from then on listings wait at the gate.
    until("the full sync reads the kernel", &|| listings() == 1);
    nft.apply_gate.close();
    nft.listing_gate.open();
    // After the feature probe, the first of its transactions.
    until("the full sync writes", &|| nft.applied.lock().unwrap().len() >= 2);
    // The canary's chain, the first base chain by name, reads as the full sync wrote it.
    let full = nft.applied.lock().unwrap()[1].clone();
    *nft.chain_listing.lock().unwrap() = Some(chain_as_listed(&full, "filter-forward"));
    let before = listings();
    nft.listing_gate.close();
    nft.apply_gate.open();
    until("the full sync is done", &|| written("10.244.0.1"));
    until("the read-back after it lists the table", &|| listings() > before);
    tx.send(SourceEvent::EndpointSlices(Delta::Apply(slice(
        "a",
        &["10.244.0.1", "10.244.0.2"],
    ))))
    .await
    .unwrap();
    // The listing still waits at the gate: the change can only be written if the read was given up.
    until("the change is written while the listing waits", &|| {
        written("10.244.0.2")
    });
    nft.listing_gate.open();
    let given_up = listings();
    let canaries_before = canaries();
    // A burst: each change comes well within the quiet period after the one before it.
    for n in 3..8 {
        let ips: Vec<String> = (1..=n).map(|i| format!("10.244.0.{i}")).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        tx.send(SourceEvent::EndpointSlices(Delta::Apply(slice("a", &ips))))
            .await
            .unwrap();
        let last = format!("10.244.0.{n} ");
        until("the change is written", &|| written(&last));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            listings(),
            given_up,
            "the read-back restarted within a burst of changes"
        );
    }
    if canary_period.is_some() {
        assert!(canaries() > canaries_before, "the canary ran during the burst");
        let text = metrics.encode();
        assert!(
            !text.contains("class=\"missing_chain\""),
            "the canary found its chain as written: {text}"
        );
    }
    until("the read-back follows once the changes pause", &|| {
        listings() > given_up
    });
    let text = metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.starts_with("svcproxy_read_backs_given_up_total{") && l.ends_with(" 1")),
        "{text}"
    );
}

/// The proxier's side of the same: in nftables mode a partial sync between a full one and its read-back
/// leaves that read-back a listing of the table (a partial sync alone is not followed by one), and the
/// read-back takes the request with it.
#[test]
fn an_nftables_full_sync_is_read_back_even_after_a_partial_one() {
    use std::sync::atomic::Ordering;
    use svcproxy::exec::nft::RecordingNft;
    use svcproxy::sync::proxier::{Proxier, SyncMode, VerifyScope};
    use svcproxy_model::IntentChanges;

    let nft = RecordingNft::default();
    let mut proxier = nft_proxier(&nft);
    let mut state = ClusterState::default();
    state
        .services
        .insert(ObjectName::new("ns", "a"), service("a", "10.96.0.1"));
    let one = slice("a", &["10.244.0.1"]);
    state.endpoint_slices.insert(one.name.clone(), one);
    proxier
        .sync(&state, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    let two = slice("a", &["10.244.0.1", "10.244.0.2"]);
    let mut changes = IntentChanges::default();
    changes.slice(&two);
    state.endpoint_slices.insert(two.name.clone(), two);
    let partial = proxier.sync(&state, &changes, SyncMode::Partial).unwrap();
    assert!(!partial.full && partial.payload_lines > 0, "{partial:?}");

    let before = nft.listings.load(Ordering::Relaxed);
    // The fake lists an empty table: the read-back finds everything missing, which shows it read.
    let findings = proxier.verify(VerifyScope::LastSync).unwrap();
    assert!(
        nft.listings.load(Ordering::Relaxed) > before,
        "the table was listed"
    );
    assert!(!findings.is_empty());
    let after = nft.listings.load(Ordering::Relaxed);
    assert!(proxier.verify(VerifyScope::LastSync).unwrap().is_empty());
    assert_eq!(
        nft.listings.load(Ordering::Relaxed),
        after,
        "asked once, read once"
    );
}

/// In iptables mode the read-back after two partial syncs lists each chain they wrote once, though both wrote
/// some of the same (listed twice, a chain reads as holding its rules twice: a divergence that is not there).
#[test]
fn the_read_back_after_two_partial_syncs_lists_each_chain_once() {
    use std::collections::BTreeMap;
    use svcproxy::sync::proxier::{Proxier, SyncMode, VerifyScope};
    use svcproxy_model::IntentChanges;

    let fake = RecordingIptables::default();
    let mut proxier = iptables_proxier(&fake, RenderConfig::default());
    let mut state = ClusterState::default();
    state
        .services
        .insert(ObjectName::new("ns", "a"), service("a", "10.96.0.1"));
    let set_slice = |state: &mut ClusterState, ips: &[&str]| {
        let s = slice("a", ips);
        let mut changes = IntentChanges::default();
        changes.slice(&s);
        state.endpoint_slices.insert(s.name.clone(), s);
        changes
    };
    set_slice(&mut state, &["10.244.0.1"]);
    proxier
        .sync(&state, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    let _ = proxier.verify(VerifyScope::LastSync).unwrap();
    for ips in [&["10.244.0.1", "10.244.0.2"][..], &["10.244.0.2"]] {
        let changes = set_slice(&mut state, ips);
        let report = proxier.sync(&state, &changes, SyncMode::Partial).unwrap();
        assert!(!report.full && report.payload_lines > 0, "{report:?}");
    }
    fake.calls.lock().unwrap().clear();
    let _ = proxier.verify(VerifyScope::LastSync).unwrap();
    let mut listed: BTreeMap<String, usize> = BTreeMap::new();
    for call in fake.calls.lock().unwrap().iter() {
        if let Recorded::ListChain(table, chain) = call {
            *listed.entry(format!("{table}/{chain}")).or_default() += 1;
        }
    }
    assert!(
        listed.keys().any(|c| c.starts_with("nat/KUBE-SVC-")),
        "both syncs wrote the service chain: {listed:?}"
    );
    assert!(listed.values().all(|n| *n == 1), "{listed:?}");
}
