//! The nf_tables netlink socket against a real kernel: element updates of every kind our table makes land as
//! `nft` would have written them (read back with `nft list`), in IPv4 and IPv6 tables, and a batch the kernel
//! refuses changes nothing; tables read back through the socket (terse listing plus element dumps) equal what
//! `nft list table` shows, for every reference scenario.

#[macro_use]
mod common;

use compact_str::{CompactString, format_compact};
use svcproxy::exec::never;
use svcproxy::exec::nft::SystemNft;
use svcproxy::exec::nft_netlink::{ElementSocket, ElementSocketError, NetlinkElementSocket};
use svcproxy::exec::nft_table_read::{TableReadError, read_structure, read_table};
use svcproxy_nftables::{
    Chain, Element, ElementChange, Family, LocalDetector, NodePortAddresses, RenderConfig, Ruleset, Set,
    SetKind, element_changes, full_transaction, parse_listing, render,
};
use svcproxy_testkit::NetNs;
use svcproxy_testkit::fixtures::scenario::scenario_state;
use svcproxy_testkit::fixtures::{intent_of, ip, net};

fn element(value: Option<&str>, comment: Option<&str>) -> Element {
    Element {
        value: value.map(CompactString::from),
        comment: comment.map(CompactString::from),
    }
}

/// A table shaped like ours: endpoint maps used by a DNAT rule, the hairpin set, a verdict map.
fn table(family: Family, a: &str, b: &str) -> Ruleset {
    let (addr, ty) = match family {
        Family::Ip6 => ("ip6", "ipv6_addr"),
        _ => ("ip", "ipv4_addr"),
    };
    let mut rs = Ruleset::new(family, "writer-test");
    let mut eps = Set::new(
        SetKind::Map,
        "typeof numgen random mod 1",
        Some(&format!("{addr} daddr . tcp dport")),
    );
    eps.elements.insert(
        "0".into(),
        element(Some(&format!("{a} . 8080")), Some("ns/web:http")),
    );
    eps.elements
        .insert("65536".into(), element(Some(&format!("{b} . 80")), None));
    rs.sets.insert("endpoints-tcp-0".into(), eps);
    let mut hairpin = Set::new(SetKind::Set, format!("type {ty} . {ty}"), None);
    hairpin
        .elements
        .insert(format_compact!("{a} . {a}"), Element::default());
    rs.sets.insert("hairpin".into(), hairpin);
    let mut services = Set::new(
        SetKind::Map,
        format!("type {ty} . inet_proto . inet_service"),
        Some("verdict"),
    );
    services.elements.insert(
        format_compact!("{a} . tcp . 80"),
        element(Some("goto pick"), Some("ns/web:http")),
    );
    rs.sets.insert("service-ips".into(), services);
    rs.chains.insert(
        "pick".into(),
        Chain {
            rules: vec![format!(
                "meta l4proto tcp dnat {addr} to numgen random mod 1 map @endpoints-tcp-0"
            )],
            ..Default::default()
        },
    );
    rs.chains.insert(
        "dispatch".into(),
        Chain {
            rules: vec![format!(
                "{addr} daddr . meta l4proto . th dport vmap @service-ips"
            )],
            ..Default::default()
        },
    );
    rs
}

fn read_back(ns: &NetNs, family: Family) -> Ruleset {
    listed(ns, family, "writer-test")
}

/// `nft list table`, parsed.
fn listed(ns: &NetNs, family: Family, name: &str) -> Ruleset {
    let text = ns
        .exec_stdout(&["nft", "list", "table", family.keyword(), name])
        .expect("nft list");
    parse_listing(&text)
        .expect("listing parses")
        .table(family, name)
        .expect("table listed")
        .clone()
}

fn load(ns: &NetNs, rs: &Ruleset) {
    let text = full_transaction(rs).text;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft -f of\n{text}");
}

#[test]
fn element_updates_land_as_nft_would_write_them() {
    for (family, a, b, c) in [
        (Family::Ip, "10.244.0.5", "10.244.0.6", "10.244.0.7"),
        (Family::Ip6, "fd00:10::5", "fd00:10::6", "fd00:10::7"),
    ] {
        let ns = NetNs::new("elemw").expect("netns");
        let before = table(family, a, b);
        load(&ns, &before);
        assert_eq!(read_back(&ns, family), before);

        // An endpoint replaced (a changed map value, a new hairpin pair), a verdict element added, and an
        // element with a comment removed: one batch.
        let mut after = before.clone();
        let eps = after.sets.get_mut("endpoints-tcp-0").unwrap();
        eps.elements.insert(
            "0".into(),
            element(Some(&format!("{c} . 8080")), Some("ns/web:http")),
        );
        eps.elements.remove("65536");
        let hairpin = after.sets.get_mut("hairpin").unwrap();
        hairpin.elements.clear();
        hairpin
            .elements
            .insert(format_compact!("{c} . {c}"), Element::default());
        after.sets.get_mut("service-ips").unwrap().elements.insert(
            format_compact!("{b} . udp . 53"),
            element(Some("drop"), Some("kube-system/dns:dns")),
        );
        let changes = element_changes(&before, &after).expect("elements only");
        assert_eq!(changes.len(), 6, "{changes:#?}");

        let writer = ns.run(NetlinkElementSocket::new).expect("socket");
        writer.write(&after, &changes).expect("kernel takes the batch");
        assert_eq!(read_back(&ns, family), after);
        // The socket stays usable: the reverse update, then a second one in a row.
        let back = element_changes(&after, &before).unwrap();
        writer.write(&before, &back).expect("and back");
        assert_eq!(read_back(&ns, family), before);
        writer.write(&after, &changes).expect("again");
        assert_eq!(read_back(&ns, family), after);

        // A batch with one impossible change (deleting an element that is not there) is refused whole: the
        // valid addition before it is not applied either, and the socket still works afterwards.
        let mut next = after.clone();
        next.sets
            .get_mut("hairpin")
            .unwrap()
            .elements
            .insert(format_compact!("{a} . {a}"), Element::default());
        let mut refused = element_changes(&after, &next).unwrap();
        refused.push(ElementChange {
            set: "service-ips".into(),
            key: format_compact!("{a} . tcp . 81"),
            element: Element::default(),
            add: false,
        });
        let err = writer.write(&next, &refused).expect_err("refused");
        assert!(matches!(err, ElementSocketError::Refused(_)), "{err}");
        assert_eq!(
            read_back(&ns, family),
            after,
            "nothing of a refused batch applies"
        );
        writer
            .write(&next, &element_changes(&after, &next).unwrap())
            .expect("usable after a refusal");
        assert_eq!(read_back(&ns, family), next);
    }
}

/// The socket's read of a table, in the namespace.
fn read_over_netlink(ns: &NetNs, family: Family, name: &str) -> Result<Option<Ruleset>, TableReadError> {
    let name = name.to_string();
    ns.run(move || {
        let socket = NetlinkElementSocket::new().expect("socket");
        read_table(&SystemNft, &socket, family, &name)
    })
}

/// A read-back given up for a waiting change stops before `nft` lists the table, or between two sets'
/// elements, and says so; one nobody gives up reads them all.
#[test]
fn a_table_read_is_given_up_once_abandoned() {
    let ns = NetNs::new("elemab").expect("netns");
    let t = table(Family::Ip, "10.244.0.5", "10.244.0.6");
    load(&ns, &t);
    let sets_read = ns.run(|| {
        let socket = NetlinkElementSocket::new().expect("socket");
        let listing = read_structure(&SystemNft, &socket, Family::Ip, "writer-test", &|| true);
        assert!(matches!(listing, Err(TableReadError::Abandoned)), "{listing:?}");
        let read = |asked_after: usize| {
            let asked = std::sync::atomic::AtomicUsize::new(0);
            let abandon = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= asked_after;
            let structure = read_structure(&SystemNft, &socket, Family::Ip, "writer-test", &never)
                .unwrap()
                .expect("table");
            let read = structure.read_elements(&socket, Some(&t), &abandon);
            (read, asked.into_inner())
        };
        let (first, asked) = read(0);
        assert!(matches!(first, Err(TableReadError::Abandoned)), "{first:?}");
        assert_eq!(asked, 1, "given up before the first set");
        let (second, asked) = read(1);
        assert!(matches!(second, Err(TableReadError::Abandoned)), "{second:?}");
        assert_eq!(asked, 2, "given up after one set");
        let (whole, asked) = read(usize::MAX);
        whole.map(|(_, same)| (same, asked))
    });
    let (same, asked) = sets_read.expect("a read nobody gives up");
    // Every set holds what `t` says, so each was compared and kept without its elements.
    assert_eq!(same.len(), t.sets.len(), "{same:?}");
    assert_eq!(asked, t.sets.len());
}

#[test]
fn tables_read_over_netlink_equal_nft_list_table() {
    // Fixture tables in both families.
    for (family, a, b) in [
        (Family::Ip, "10.244.0.5", "10.244.0.6"),
        (Family::Ip6, "fd00:10::5", "fd00:10::6"),
    ] {
        let ns = NetNs::new("elemr").expect("netns");
        assert!(
            read_over_netlink(&ns, family, "writer-test").unwrap().is_none(),
            "no table yet"
        );
        let t = table(family, a, b);
        load(&ns, &t);
        let got = read_over_netlink(&ns, family, "writer-test")
            .unwrap()
            .expect("table");
        assert_eq!(got, read_back(&ns, family));
        assert_eq!(got, t);
    }
    // Every reference scenario as we render it (NodePorts, firewall, affinity, hairpin, no-endpoint maps).
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../nftables/tests/data/scenarios");
    let cfg = RenderConfig {
        local_detector: LocalDetector::Cidrs(vec![net("10.244.0.0/16")]),
        node_port_addresses: NodePortAddresses::Ips(vec![ip("192.168.49.2")]),
        node_ip: Some(ip("192.168.49.2")),
        ..RenderConfig::default()
    };
    let mut scenarios = 0;
    for entry in std::fs::read_dir(dir).expect("scenarios") {
        let path = entry.unwrap().path();
        let yaml = std::fs::read_to_string(&path).unwrap();
        let rs = render(&intent_of(&scenario_state(&yaml)), &cfg);
        let ns = NetNs::new("elemr").expect("netns");
        load(&ns, &rs);
        let listed = listed(&ns, Family::Ip, &rs.name).without_dynamic_elements();
        let got = read_over_netlink(&ns, Family::Ip, &rs.name)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .expect("table");
        assert_eq!(got, listed, "{}", path.display());
        assert_eq!(got, rs.without_dynamic_elements(), "{}", path.display());
        scenarios += 1;
    }
    assert!(scenarios >= 10, "{scenarios} scenarios");
}

#[test]
fn a_read_during_another_commit_is_refused() {
    let ns = NetNs::new("elemg").expect("netns");
    let t = table(Family::Ip, "10.244.0.5", "10.244.0.6");
    load(&ns, &t);
    let socket = ns.run(NetlinkElementSocket::new).expect("socket");
    let g1 = socket.generation().unwrap();
    assert_eq!(
        socket.generation().unwrap(),
        g1,
        "reads do not move the generation"
    );
    let mut next = t.clone();
    next.sets
        .get_mut("hairpin")
        .unwrap()
        .elements
        .insert("10.244.0.9 . 10.244.0.9".into(), Element::default());
    socket.write(&next, &element_changes(&t, &next).unwrap()).unwrap();
    assert_ne!(socket.generation().unwrap(), g1, "a commit moves it");
    // The socket reads the new element; a set that is not there is an error, not an empty set.
    let hairpin = &next.sets["hairpin"];
    let got = socket
        .elements(Family::Ip, "writer-test", "hairpin", hairpin)
        .unwrap();
    assert_eq!(got, hairpin.elements);
    // Compared as it is read: the same elements, and a set one element short or long, or one value off.
    let holds = |elements: &std::collections::BTreeMap<CompactString, Element>| {
        socket
            .holds_exactly(Family::Ip, "writer-test", "hairpin", hairpin, elements)
            .unwrap()
    };
    assert!(holds(&hairpin.elements));
    assert!(!holds(&t.sets["hairpin"].elements));
    let mut more = hairpin.elements.clone();
    more.insert("10.244.0.10 . 10.244.0.10".into(), Element::default());
    assert!(!holds(&more));
    let eps = &t.sets["endpoints-tcp-0"];
    let mut moved = eps.elements.clone();
    moved.get_mut("0").unwrap().value = Some("10.244.0.99 . 8080".into());
    let holds_eps = |elements| {
        socket
            .holds_exactly(Family::Ip, "writer-test", "endpoints-tcp-0", eps, elements)
            .unwrap()
    };
    assert!(holds_eps(&eps.elements));
    assert!(!holds_eps(&moved));
    assert!(matches!(
        socket.elements(Family::Ip, "writer-test", "nowhere", hairpin),
        Err(ElementSocketError::Dump { .. })
    ));
}

mod proxier {
    use svcproxy::exec::Abandon;
    use svcproxy::exec::iptables::ExecError;
    use svcproxy::exec::nft::{NftCommands, RecordingNft, SystemNft};
    use svcproxy::exec::nft_netlink::{ElementSocket, NetlinkElementSocket, RecordingElementSocket};
    use svcproxy::node_addresses::{FixedAddresses, NodePortSpec};
    use svcproxy::sync::iptables_proxier::{DetectLocal, ProxierOptions};
    use svcproxy::sync::nft_proxier::NftProxier;
    use svcproxy::sync::proxier::{Proxier, SyncMode, VerifyScope};
    use svcproxy_iptables::config::RenderConfig;
    use svcproxy_model::{ClusterState, IntentChanges, IntentConfig, IpFamily, ObjectName};

    fn state(endpoints: &[&str]) -> ClusterState {
        crate::common::web_cluster(endpoints)
    }

    /// An IPv4 proxier on node-a with default options.
    fn proxier(nft: Box<dyn NftCommands>, socket: Box<dyn ElementSocket>) -> NftProxier {
        NftProxier::new(
            nft,
            Box::new(FixedAddresses(vec!["10.0.0.10".parse().unwrap()])),
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
        .with_element_socket(socket)
    }

    fn web_changed() -> IntentChanges {
        let mut c = IntentChanges::default();
        c.service(&ObjectName::new("ns", "web"));
        c
    }

    /// Element-only updates go to the writer and never to `nft`; rule changes go to `nft`; a refused write
    /// fails the sync, and the next (full) sync goes through `nft`.
    #[test]
    fn element_updates_bypass_nft_and_a_refused_one_fails_the_sync() {
        let nft = RecordingNft::default();
        let writer = RecordingElementSocket::default();
        let mut proxier = proxier(Box::new(nft.clone()), Box::new(writer.clone()));
        let applied = || nft.applied.lock().unwrap().len();

        proxier
            .sync(
                &state(&["10.244.0.5", "10.244.0.6"]),
                &IntentChanges::everything(),
                SyncMode::Full,
            )
            .unwrap();
        let after_cold = applied();
        assert!(after_cold >= 1, "the cold sync goes to nft");

        // An endpoint replaced: map elements only.
        let report = proxier
            .sync(
                &state(&["10.244.0.5", "10.244.0.7"]),
                &web_changed(),
                SyncMode::Partial,
            )
            .unwrap();
        assert_eq!(applied(), after_cold, "nft not run");
        let written = writer.written.lock().unwrap().clone();
        assert_eq!(written.len(), 1);
        assert_eq!(report.payload_lines, written[0].len());
        assert!(
            written[0]
                .iter()
                .any(|c| c.add && c.element.value.as_deref() == Some("10.244.0.7 . 8080"))
        );

        // One endpoint more: the pick rule's modulus changes, so nft applies it.
        proxier
            .sync(
                &state(&["10.244.0.5", "10.244.0.7", "10.244.0.8"]),
                &web_changed(),
                SyncMode::Partial,
            )
            .unwrap();
        assert_eq!(applied(), after_cold + 1);
        assert!(
            nft.applied
                .lock()
                .unwrap()
                .last()
                .unwrap()
                .contains("numgen random mod 3")
        );

        // The kernel refuses an element batch: the sync fails, and the full sync after it uses nft.
        writer
            .fail
            .lock()
            .unwrap()
            .push(std::io::Error::from_raw_os_error(16));
        let err = proxier
            .sync(
                &state(&["10.244.0.5", "10.244.0.7", "10.244.0.9"]),
                &web_changed(),
                SyncMode::Partial,
            )
            .unwrap_err();
        assert!(err.to_string().contains("refused the element update"), "{err}");
        assert_eq!(writer.written.lock().unwrap().len(), 1);
        proxier
            .sync(
                &state(&["10.244.0.5", "10.244.0.7", "10.244.0.9"]),
                &web_changed(),
                SyncMode::Full,
            )
            .unwrap();
        assert!(applied() > after_cold + 1, "the full sync goes to nft");
        assert!(
            nft.applied
                .lock()
                .unwrap()
                .last()
                .unwrap()
                .contains("10.244.0.9 . 8080")
        );
    }

    /// `nft` as the system runs it, recording which listings were asked for.
    #[derive(Clone, Default)]
    struct CountingNft {
        listings: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    }

    impl NftCommands for CountingNft {
        fn apply(&self, script: &str) -> Result<(), ExecError> {
            SystemNft.apply(script)
        }
        fn list_table(
            &self,
            family: &str,
            name: &str,
            abandon: Abandon<'_>,
        ) -> Result<Option<String>, ExecError> {
            self.listings.lock().unwrap().push("table");
            SystemNft.list_table(family, name, abandon)
        }
        fn list_chain(&self, family: &str, table: &str, chain: &str) -> Result<Option<String>, ExecError> {
            self.listings.lock().unwrap().push("chain");
            SystemNft.list_chain(family, table, chain)
        }
        fn list_ruleset_terse(&self, abandon: Abandon<'_>) -> Result<String, ExecError> {
            self.listings.lock().unwrap().push("terse");
            SystemNft.list_ruleset_terse(abandon)
        }
        fn list_table_terse(
            &self,
            family: &str,
            name: &str,
            abandon: Abandon<'_>,
        ) -> Result<Option<String>, ExecError> {
            self.listings.lock().unwrap().push("terse table");
            SystemNft.list_table_terse(family, name, abandon)
        }
    }

    /// Deletes one element of an endpoint map of `ip svcproxy`, behind the proxier's back.
    fn remove_an_endpoint_element() {
        let map = std::process::Command::new("nft")
            .args(["list", "table", "ip", "svcproxy"])
            .output()
            .unwrap();
        let text = String::from_utf8(map.stdout).unwrap();
        let (set, key) = text
            .lines()
            .scan(None::<String>, |current, l| {
                let l = l.trim();
                if let Some(name) = l.strip_prefix("map ").and_then(|r| r.strip_suffix(" {")) {
                    *current = Some(name.to_string());
                }
                Some(
                    current
                        .clone()
                        .zip(l.strip_prefix("elements = { ").map(str::to_string)),
                )
            })
            .flatten()
            .find(|(set, _)| set.starts_with("endpoints-"))
            .map(|(set, rest)| (set, rest.split(" : ").next().unwrap().to_string()))
            .expect("an endpoint map element");
        let status = std::process::Command::new("nft")
            .args([
                "delete",
                "element",
                "ip",
                "svcproxy",
                &set,
                &format!("{{ {key} }}"),
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// On a real kernel, the proxier reads its table back through the socket — never `nft list table` —
    /// and that read sees a map element someone removed; a restarted proxier finds the table right and
    /// writes nothing.
    #[test]
    fn verification_and_restart_read_the_kernel_over_netlink() {
        let ns = svcproxy_testkit::NetNs::new("elemv").expect("netns");
        let nft = CountingNft::default();
        let make = |nft: CountingNft| {
            proxier(
                Box::new(nft),
                Box::new(NetlinkElementSocket::new().expect("socket")),
            )
        };
        let listings = nft.listings.clone();
        let s = state(&["10.244.0.5", "10.244.0.6"]);
        let (clean, drifted) = ns.run(|| {
            let mut proxier = make(nft.clone());
            proxier
                .sync(&s, &IntentChanges::everything(), SyncMode::Full)
                .unwrap();
            let clean = proxier.verify(VerifyScope::All).unwrap();
            remove_an_endpoint_element();
            (clean, proxier.verify(VerifyScope::All).unwrap())
        });
        assert_eq!(clean, []);
        assert!(!drifted.is_empty(), "a removed endpoint element is seen");
        assert!(
            drifted
                .iter()
                .any(|f| f.services.iter().any(|s| s.starts_with("ns/web"))),
            "{drifted:?}"
        );
        assert!(
            !listings.lock().unwrap().contains(&"table"),
            "{:?}",
            listings.lock().unwrap()
        );
        assert!(listings.lock().unwrap().contains(&"terse"));
        assert!(
            !listings.lock().unwrap().contains(&"terse table"),
            "our table is most of this ruleset: {:?}",
            listings.lock().unwrap()
        );

        // A new proxier (a restart) repairs the element and then finds nothing to write.
        listings.lock().unwrap().clear();
        let report = ns.run(|| {
            let mut proxier = make(nft.clone());
            proxier
                .sync(&s, &IntentChanges::everything(), SyncMode::Full)
                .unwrap();
            let mut again = make(nft.clone());
            let report = again
                .sync(&s, &IntentChanges::everything(), SyncMode::Full)
                .unwrap();
            assert_eq!(again.verify(VerifyScope::All).unwrap(), []);
            report
        });
        assert_eq!(
            report.payload_lines, 0,
            "a restart onto the right table writes nothing"
        );
        assert!(
            !listings.lock().unwrap().contains(&"table"),
            "{:?}",
            listings.lock().unwrap()
        );
    }

    /// Upstream's iptables rules next to our table (a node taken over from kube-proxy's iptables mode): the
    /// terse listing of the whole ruleset would make the kernel count through all their rules again for
    /// every datagram it answers (22–53 s at 5,000 upstream Services), so the read lists our table alone,
    /// and still sees drift. Fails if the read lists the ruleset.
    #[test]
    fn next_to_a_larger_table_our_table_is_listed_alone() {
        let ns = svcproxy_testkit::NetNs::new("elemo").expect("netns");
        let mut foreign = String::from("*nat\n");
        for i in 0..2_500 {
            foreign.push_str(&format!(":KUBE-SEP-FOREIGN{i:05} - [0:0]\n"));
        }
        for i in 0..2_500 {
            foreign.push_str(&format!(
                "-A KUBE-SEP-FOREIGN{i:05} -s 10.250.{}.{}/32 -j RETURN\n",
                i / 250,
                i % 250
            ));
        }
        foreign.push_str("COMMIT\n");
        let mut restore = ns
            .command("iptables-nft-restore")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-nft-restore runs");
        use std::io::Write;
        restore
            .stdin
            .take()
            .unwrap()
            .write_all(foreign.as_bytes())
            .unwrap();
        assert!(restore.wait().unwrap().success(), "a large iptables nat table");
        let nft = CountingNft::default();
        let listings = nft.listings.clone();
        let s = state(&["10.244.0.5", "10.244.0.6"]);
        let (clean, drifted, restart) = ns.run(|| {
            let make = || {
                proxier(
                    Box::new(nft.clone()),
                    Box::new(NetlinkElementSocket::new().expect("socket")),
                )
            };
            let mut proxier = make();
            proxier
                .sync(&s, &IntentChanges::everything(), SyncMode::Full)
                .unwrap();
            let clean = proxier.verify(VerifyScope::All).unwrap();
            remove_an_endpoint_element();
            let drifted = proxier.verify(VerifyScope::All).unwrap();
            let restart = make()
                .sync(&s, &IntentChanges::everything(), SyncMode::Full)
                .unwrap();
            (clean, drifted, restart)
        });
        assert_eq!(clean, []);
        assert!(
            drifted
                .iter()
                .any(|f| f.services.iter().any(|s| s.starts_with("ns/web"))),
            "{drifted:?}"
        );
        assert!(restart.payload_lines > 0, "the restart repairs the element");
        let listings = listings.lock().unwrap();
        assert!(listings.contains(&"terse table"), "{listings:?}");
        assert!(!listings.contains(&"terse"), "{listings:?}");
        assert!(!listings.contains(&"table"), "{listings:?}");
    }

    /// The kernel's socket, with another program committing (a table of its own) while the first `count`
    /// set reads run, as the other family's engine does at start.
    struct CommittingMeanwhile {
        inner: NetlinkElementSocket,
        count: std::sync::atomic::AtomicUsize,
    }

    impl ElementSocket for CommittingMeanwhile {
        fn write(
            &self,
            table: &svcproxy_nftables::Ruleset,
            changes: &[svcproxy_nftables::ElementChange],
        ) -> Result<(), svcproxy::exec::nft_netlink::ElementSocketError> {
            self.inner.write(table, changes)
        }
        fn generation(&self) -> Result<u32, svcproxy::exec::nft_netlink::ElementSocketError> {
            self.inner.generation()
        }
        fn tables(
            &self,
        ) -> Result<
            Vec<svcproxy_nftables::table_census::TableCensus>,
            svcproxy::exec::nft_netlink::ElementSocketError,
        > {
            self.inner.tables()
        }
        fn elements(
            &self,
            family: svcproxy_nftables::Family,
            table: &str,
            name: &str,
            set: &svcproxy_nftables::Set,
        ) -> Result<
            std::collections::BTreeMap<svcproxy_nftables::CompactString, svcproxy_nftables::Element>,
            svcproxy::exec::nft_netlink::ElementSocketError,
        > {
            self.inner.elements(family, table, name, set)
        }
        fn holds_exactly(
            &self,
            family: svcproxy_nftables::Family,
            table: &str,
            name: &str,
            set: &svcproxy_nftables::Set,
            expected: &std::collections::BTreeMap<
                svcproxy_nftables::CompactString,
                svcproxy_nftables::Element,
            >,
        ) -> Result<bool, svcproxy::exec::nft_netlink::ElementSocketError> {
            use std::sync::atomic::Ordering;
            if self
                .count
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let status = std::process::Command::new("nft")
                    .args(["add", "table", "ip", "bystander"])
                    .status()
                    .unwrap();
                assert!(status.success());
            }
            self.inner.holds_exactly(family, table, name, set, expected)
        }
    }

    /// A read that another commit overtook is read again the fast way, not with `nft list table` (which
    /// formats every element: a second at 5,000 Services). Fails if the read falls back at once.
    #[test]
    fn a_read_overtaken_by_another_commit_is_read_again_over_netlink() {
        let ns = svcproxy_testkit::NetNs::new("elemr").expect("netns");
        let nft = CountingNft::default();
        let listings = nft.listings.clone();
        let s = state(&["10.244.0.5", "10.244.0.6"]);
        let found = ns.run(|| {
            proxier_with_commits(nft.clone(), 0)
                .sync(&s, &IntentChanges::everything(), SyncMode::Full)
                .unwrap();
            listings.lock().unwrap().clear();
            let mut overtaken = proxier_with_commits(nft.clone(), 1);
            overtaken
                .sync(&s, &IntentChanges::everything(), SyncMode::Full)
                .unwrap();
            overtaken.verify(VerifyScope::All).unwrap()
        });
        assert_eq!(found, []);
        let listings = listings.lock().unwrap();
        assert!(!listings.contains(&"table"), "{listings:?}");
        assert!(
            listings.iter().filter(|l| **l == "terse").count() >= 2,
            "read twice the fast way: {listings:?}"
        );
    }

    fn proxier_with_commits(nft: CountingNft, commits: usize) -> NftProxier {
        proxier(
            Box::new(nft),
            Box::new(CommittingMeanwhile {
                inner: NetlinkElementSocket::new().expect("socket"),
                count: std::sync::atomic::AtomicUsize::new(commits),
            }),
        )
    }
}
