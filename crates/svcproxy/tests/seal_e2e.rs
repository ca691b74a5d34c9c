//! The seal on a real kernel: what it relies on (iptables-nft commits each table section of a restore as one
//! transaction, moving the nf_tables generation by exactly one), and what it buys (a restart onto rules nobody
//! touched reads one chain and writes nothing) without ever hiding a change made behind svcproxy's back.

#[macro_use]
mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::{Svcproxy, TempDir, WebLab};
use svcproxy::exec::generation::{NfTablesGeneration, RulesetGeneration};
use svcproxy::exec::iptables::{IptablesCommands, SystemIptables};
use svcproxy_iptables::payload::Payload;
use svcproxy_iptables::seal::{Generation, SEAL_CHAIN, Seal, newest, sealed};
use svcproxy_model::IpFamily;
use svcproxy_testkit::{Backend, Lab, NetNs, tcp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);
const PROVEN: &str = "the kernel's seal shows our rules in place";

fn generation(ns: &NetNs) -> Generation {
    ns.run(|| NfTablesGeneration::open().expect("socket").generation())
        .expect("generation")
}

fn restore(ns: &NetNs, payload: &str) {
    let payload = payload.to_string();
    ns.run(move || SystemIptables::new(IpFamily::V4).restore(payload.as_bytes()))
        .expect("restore");
}

/// The newest of the seals in filter and nat.
fn listed_seal(ns: &NetNs) -> Option<Seal> {
    listed_seal_of(ns, IpFamily::V4)
}

/// The newest of one family's seals in filter and nat.
fn listed_seal_of(ns: &NetNs, family: IpFamily) -> Option<Seal> {
    newest(["filter", "nat"].map(|table| {
        ns.run(move || SystemIptables::new(family).list_chain(table, SEAL_CHAIN))
            .expect("list")
            .as_deref()
            .and_then(Seal::from_listing)
    }))
}

#[test]
fn each_table_section_of_a_restore_moves_the_generation_by_one() {
    let ns = NetNs::new("seal").expect("netns");
    let two_tables = Payload::from_text(
        "*filter\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\nCOMMIT\n*nat\n:KUBE-B - [0:0]\n-A KUBE-B -j RETURN\nCOMMIT\n",
    );
    for round in 0..2 {
        // The second time every chain exists already and gets the same rules: still one transaction a section.
        let before = generation(&ns);
        let (payload, seal) = sealed(two_tables.clone(), before, Some(round));
        restore(&ns, payload.text());
        assert_eq!(seal.generation, before.after(2), "round {round}");
        assert_eq!(generation(&ns), seal.generation, "round {round}");
        assert_eq!(listed_seal(&ns), Some(seal), "round {round}");
    }
    // A one-table payload is one transaction with its seal, and a seal alone is one too.
    let nat_only = Payload::from_text("*nat\n:KUBE-B - [0:0]\nCOMMIT\n");
    for payload in [nat_only, Payload::default()] {
        let before = generation(&ns);
        let (sealed_payload, seal) = sealed(payload.clone(), before, Some(7));
        restore(&ns, sealed_payload.text());
        assert_eq!(generation(&ns), seal.generation);
        let sections = payload.text().lines().filter(|l| l.starts_with('*')).count() as u32;
        assert_eq!(seal.generation, before.after(sections.max(1)));
        assert_eq!(listed_seal(&ns), Some(seal));
    }
    // Listing does not move it.
    let before = generation(&ns);
    listed_seal(&ns);
    assert_eq!(generation(&ns), before);
    // Another namespace counts on its own, under another instance: a seal cannot be carried across.
    let other = generation(&NetNs::new("seal2").expect("netns"));
    assert_ne!(other.instance, before.instance);
}

#[test]
fn a_restart_trusts_the_seal_only_while_nobody_else_wrote() {
    let web = WebLab::new();
    let (lab, client, vip) = (&web.lab, &web.client, web.vip());
    let args = ["--manifests", web.manifests()];

    // First run: nothing to trust, the kernel is read and written, and the write is sealed. The node serves
    // IPv6 too (as upstream does), so both families seal their writes; the later seal names the generation.
    let mut proxy = Svcproxy::start(lab.node(), &args);
    let log = both_synced(&mut proxy);
    assert!(!log.contains(PROVEN), "{log}");
    wait_until(WAIT, POLL, "the ClusterIP answers", || {
        tcp_request(client.ns(), vip, T).ok()
    });
    drop(proxy);
    let seal = listed_seal(lab.node()).expect("a seal");
    assert!(seal.digest.is_some(), "{seal:?}");
    let later = [IpFamily::V4, IpFamily::V6]
        .map(|f| listed_seal_of(lab.node(), f).expect("a seal"))
        .into_iter()
        .max_by_key(|s| s.generation.value)
        .unwrap();
    let written = generation(lab.node());
    assert_eq!(later.generation, written);

    // Nobody wrote since: the restart trusts the seal, writes nothing, and traffic flows.
    let mut proxy = Svcproxy::start(lab.node(), &args);
    let log = both_synced(&mut proxy);
    assert_eq!(log.matches(PROVEN).count(), 2, "{log}");
    assert!(tcp_request(client.ns(), vip, T).is_ok());
    drop(proxy);
    assert_eq!(generation(lab.node()), written, "nothing written");

    // Someone flushes KUBE-SERVICES behind our back: that commit voids the seal, so the restart reads the
    // kernel, finds the chain empty and repairs it (and seals again).
    lab.node()
        .exec(&["iptables", "-t", "nat", "-F", "KUBE-SERVICES"])
        .expect("flush");
    assert!(tcp_request(client.ns(), vip, Duration::from_millis(500)).is_err());
    let mut proxy = Svcproxy::start(lab.node(), &args);
    let log = both_synced(&mut proxy);
    assert!(!log.contains(PROVEN), "{log}");
    wait_until(WAIT, POLL, "the ClusterIP answers again", || {
        tcp_request(client.ns(), vip, T).ok()
    });
    drop(proxy);
    let resealed = listed_seal(lab.node()).expect("a seal");
    assert!(
        resealed.digest.is_some() && resealed.generation.value > seal.generation.value,
        "{resealed:?}"
    );
    assert_eq!(resealed.digest, seal.digest, "the same rules as before the flush");
}

const DUAL_WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.100
  clusterIPs: [10.96.0.100, \"fd00:10:96::100\"]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- addresses: [\"fd00:10:244::11\"]
  conditions: {ready: true}
";

/// Waits for both families' first sync and returns the log.
fn both_synced(proxy: &mut Svcproxy) -> String {
    wait_until(WAIT, POLL, "both families synced", || {
        proxy.assert_running();
        let log = proxy.log();
        (log.matches("synced").count() >= 2).then_some(log)
    })
}

#[test]
fn a_dual_stack_restart_trusts_the_seals_of_both_families() {
    // The IPv4 and IPv6 restores move one generation: alone, each family's writes would void the other's
    // seal, and whichever wrote first would read its tables whole on every restart.
    let lab = Lab::new();
    let pod = lab.add_dual_pod(
        "pod11",
        Ipv4Addr::new(10, 244, 0, 11),
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x11),
    );
    let _backend = Backend::start(pod.ns(), pod.name(), &[8080], &[]);
    let client = lab.add_dual_pod(
        "client",
        Ipv4Addr::new(10, 244, 0, 50),
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x50),
    );
    let dir = TempDir::new("manifests");
    dir.write("web.yaml", DUAL_WEB);
    let args = [
        "--manifests",
        dir.path().to_str().unwrap(),
        "--cluster-cidr",
        "fd00:10:244::/64",
    ];
    let vips: [SocketAddr; 2] = [
        "10.96.0.100:80".parse().unwrap(),
        "[fd00:10:96::100]:80".parse().unwrap(),
    ];

    let mut proxy = Svcproxy::start(lab.node(), &args);
    let log = both_synced(&mut proxy);
    assert!(!log.contains(PROVEN), "{log}");
    for vip in vips {
        wait_until(WAIT, POLL, "the ClusterIP answers", || {
            tcp_request(client.ns(), vip, T).ok()
        });
    }
    drop(proxy);
    let written = generation(lab.node());
    // Each family sealed its own write with a digest; the later seal names the generation the kernel is at
    // and vouches for every commit since the earlier one.
    let seals = [IpFamily::V4, IpFamily::V6].map(|f| listed_seal_of(lab.node(), f).expect("a seal"));
    assert!(seals.iter().all(|s| s.digest.is_some()), "{seals:?}");
    let [earlier, later] = if seals[0].generation.value < seals[1].generation.value {
        seals
    } else {
        [seals[1], seals[0]]
    };
    assert_eq!(later.generation, written, "{seals:?}");
    assert!(later.ours_after(earlier.generation), "{seals:?}");

    // Restarted: both families prove their rules from the seals, though only one of them wrote last.
    let mut proxy = Svcproxy::start(lab.node(), &args);
    let log = both_synced(&mut proxy);
    assert_eq!(log.matches(PROVEN).count(), 2, "{log}");
    for vip in vips {
        assert!(tcp_request(client.ns(), vip, T).is_ok(), "{vip}");
    }
    drop(proxy);
    assert_eq!(generation(lab.node()), written, "nothing written");

    // A foreign commit to the IPv6 tables: both families read again (neither can tell whose tables it
    // touched), and the IPv6 one repairs its chain.
    lab.node()
        .exec(&["ip6tables", "-t", "nat", "-F", "KUBE-SERVICES"])
        .expect("flush");
    let mut proxy = Svcproxy::start(lab.node(), &args);
    let log = both_synced(&mut proxy);
    assert_eq!(log.matches(PROVEN).count(), 0, "{log}");
    wait_until(WAIT, POLL, "the IPv6 ClusterIP answers again", || {
        tcp_request(client.ns(), vips[1], T).ok()
    });
}

#[test]
fn a_read_back_that_finds_the_rules_right_seals_them_again_after_another_writer() {
    let web = WebLab::new();
    let (lab, client, vip) = (&web.lab, &web.client, web.vip());
    let mut proxy = Svcproxy::start(
        lab.node(),
        &["--manifests", web.manifests(), "--verify-period", "1s"],
    );
    both_synced(&mut proxy);
    wait_until(WAIT, POLL, "the ClusterIP answers", || {
        tcp_request(client.ns(), vip, T).ok()
    });

    // Another program commits (a chain of its own): the seal no longer names the generation the kernel is
    // at. The next read-back finds our rules as we left them, nobody writing while it read, and seals them.
    lab.node()
        .exec(&["iptables", "-t", "filter", "-N", "OTHER-WRITER"])
        .expect("another writer");
    let foreign = generation(lab.node());
    // Neither family can tell whose tables a foreign commit touched: both read back and seal again.
    let resealed = wait_until(WAIT, POLL, "new seals with digests", || {
        proxy.assert_running();
        let seals = [IpFamily::V4, IpFamily::V6].map(|f| {
            listed_seal_of(lab.node(), f).filter(|s| s.digest.is_some() && s.generation.value > foreign.value)
        });
        let [Some(v4), Some(v6)] = seals else {
            return None;
        };
        Some(if v4.generation.value > v6.generation.value {
            v4
        } else {
            v6
        })
    });
    drop(proxy);
    assert_eq!(
        generation(lab.node()),
        resealed.generation,
        "the seal is the last write"
    );

    // So a restart trusts it, where it would have read the kernel whole.
    let mut proxy = Svcproxy::start(lab.node(), &["--manifests", web.manifests()]);
    let log = both_synced(&mut proxy);
    assert_eq!(log.matches(PROVEN).count(), 2, "{log}");
    assert!(tcp_request(client.ns(), vip, T).is_ok());
}
