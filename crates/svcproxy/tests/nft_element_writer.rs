//! The nf_tables netlink writer against a real kernel: element updates of every kind our table makes land as
//! `nft` would have written them (read back with `nft list`), in IPv4 and IPv6 tables, and a batch the kernel
//! refuses changes nothing.

use svcproxy::exec::nft_netlink::{ElementWriteError, ElementWriter, NetlinkElementWriter};
use svcproxy_nftables::{
    Chain, Element, ElementChange, Family, Ruleset, Set, SetKind, element_changes, full_transaction,
    parse_listing,
};
use svcproxy_testkit::NetNs;

fn element(value: Option<&str>, comment: Option<&str>) -> Element {
    Element {
        value: value.map(str::to_string),
        comment: comment.map(str::to_string),
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
    hairpin.elements.insert(format!("{a} . {a}"), Element::default());
    rs.sets.insert("hairpin".into(), hairpin);
    let mut services = Set::new(
        SetKind::Map,
        format!("type {ty} . inet_proto . inet_service"),
        Some("verdict"),
    );
    services.elements.insert(
        format!("{a} . tcp . 80"),
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
    let text = ns
        .exec_stdout(&["nft", "list", "table", family.keyword(), "writer-test"])
        .expect("nft list");
    parse_listing(&text)
        .expect("listing parses")
        .table(family, "writer-test")
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
        hairpin.elements.insert(format!("{c} . {c}"), Element::default());
        after.sets.get_mut("service-ips").unwrap().elements.insert(
            format!("{b} . udp . 53"),
            element(Some("drop"), Some("kube-system/dns:dns")),
        );
        let changes = element_changes(&before, &after).expect("elements only");
        assert_eq!(changes.len(), 6, "{changes:#?}");

        let writer = ns.run(NetlinkElementWriter::new).expect("socket");
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
            .insert(format!("{a} . {a}"), Element::default());
        let mut refused = element_changes(&after, &next).unwrap();
        refused.push(ElementChange {
            set: "service-ips".into(),
            key: format!("{a} . tcp . 81"),
            element: Element::default(),
            add: false,
        });
        let err = writer.write(&next, &refused).expect_err("refused");
        assert!(matches!(err, ElementWriteError::Refused(_)), "{err}");
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

mod proxier {
    use std::collections::BTreeMap;

    use svcproxy::exec::nft::RecordingNft;
    use svcproxy::exec::nft_netlink::RecordingElementWriter;
    use svcproxy::node_addresses::{FixedAddresses, NodePortSpec};
    use svcproxy::sync::iptables_proxier::{DetectLocal, ProxierOptions};
    use svcproxy::sync::nft_proxier::NftProxier;
    use svcproxy::sync::proxier::{Proxier, SyncMode};
    use svcproxy_iptables::config::RenderConfig;
    use svcproxy_model::{
        ClusterState, Endpoint, EndpointPort, EndpointSlice, IntentChanges, IntentConfig, IpFamily,
        ObjectName, Protocol, Service, ServicePort,
    };

    fn state(endpoints: &[&str]) -> ClusterState {
        let name = ObjectName::new("ns", "web");
        let service = Service::cluster_ip(
            name.clone(),
            "10.96.0.10".parse().unwrap(),
            vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
        );
        let slice = EndpointSlice {
            name: ObjectName::new("ns", "web-1"),
            service_name: "web".into(),
            address_family: Some(IpFamily::V4),
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: endpoints
                .iter()
                .map(|ip| Endpoint::ready(ip.parse().unwrap(), None))
                .collect(),
            last_change_trigger_time: None,
        };
        ClusterState {
            services: BTreeMap::from([(name, service)]),
            endpoint_slices: BTreeMap::from([(slice.name.clone(), slice)]),
            node: None,
        }
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
        let writer = RecordingElementWriter::default();
        let mut proxier = NftProxier::new(
            Box::new(nft.clone()),
            Box::new(FixedAddresses(vec!["10.0.0.10".parse().unwrap()])),
            IntentConfig {
                family: IpFamily::V4,
                node_name: "node-a".into(),
            },
            ProxierOptions {
                base: RenderConfig::default(),
                detect_local: DetectLocal::None,
                nodeport_addresses: NodePortSpec::All,
            },
        )
        .with_element_writer(Box::new(writer.clone()));
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
}
