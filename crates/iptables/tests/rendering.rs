//! Rendering against hand-checked expectations: a worked example of one NodePort service, snapshots of a
//! payload covering every rule shape, and large-cluster mode.

mod common;

use common::*;
use svcproxy_iptables::chain_name::KUBE_SERVICES;
use svcproxy_iptables::{
    LocalDetector, NodePortAddresses, RenderConfig, Ruleset, full_payload, jump_rules, partial_payload,
    render,
};
use svcproxy_model::{Endpoint, EndpointSlice, Protocol, Service, ServiceType};

fn cfg() -> RenderConfig {
    RenderConfig {
        local_detector: LocalDetector::Cidrs(vec![net("10.244.0.0/16")]),
        node_ip: Some(ip("10.0.0.10")),
        ..RenderConfig::default()
    }
}

fn lines(ruleset: &Ruleset, table: &str, chain: &str) -> Vec<String> {
    let t = if table == "nat" {
        &ruleset.nat
    } else {
        &ruleset.filter
    };
    t.chain(chain)
        .unwrap_or_else(|| panic!("{table} {chain} missing"))
        .lines_in(chain)
        .collect()
}

/// One NodePort service with two endpoints, line by line as upstream writes it where it has no packet
/// counters (without nfacct objects, so without the counting rule and matches).
#[test]
fn worked_example() {
    let svc = service(
        "demo",
        "web",
        ServiceType::NodePort,
        "10.96.100.10",
        vec![port("http", Protocol::Tcp, 80, Some(30080))],
    );
    let sl = slice(
        "demo",
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![ep("10.244.1.5", "n1"), ep("10.244.2.7", "n2")],
    );
    let cfg = RenderConfig {
        localhost_node_ports: true,
        ..cfg()
    };
    let r = render(&intent_of(&state(vec![svc], vec![sl])), &cfg);

    let expected = r#"
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment "demo/web:http cluster IP" -m tcp -p tcp -d 10.96.100.10 --dport 80 -j KUBE-SVC-XRY76EGRC3BSCIIJ
-A KUBE-NODEPORTS -m comment --comment demo/web:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-XRY76EGRC3BSCIIJ
-A KUBE-SVC-XRY76EGRC3BSCIIJ -m comment --comment "demo/web:http cluster IP" -m tcp -p tcp -d 10.96.100.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-EXT-XRY76EGRC3BSCIIJ -m comment --comment "masquerade traffic for demo/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-XRY76EGRC3BSCIIJ -j KUBE-SVC-XRY76EGRC3BSCIIJ
-A KUBE-SVC-XRY76EGRC3BSCIIJ -m comment --comment "demo/web:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-NW5VICAF3Z2QABHQ
-A KUBE-SVC-XRY76EGRC3BSCIIJ -m comment --comment "demo/web:http -> 10.244.2.7:8080" -j KUBE-SEP-JPICTQTYOLMYNIJ7
-A KUBE-SEP-NW5VICAF3Z2QABHQ -m comment --comment demo/web:http -s 10.244.1.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-NW5VICAF3Z2QABHQ -m comment --comment demo/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-JPICTQTYOLMYNIJ7 -m comment --comment demo/web:http -s 10.244.2.7 -j KUBE-MARK-MASQ
-A KUBE-SEP-JPICTQTYOLMYNIJ7 -m comment --comment demo/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.2.7:8080
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
"#;
    let mut want: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in expected.lines().filter(|l| !l.is_empty()) {
        let chain = line.split(' ').nth(1).unwrap().to_string();
        want.entry(chain).or_default().push(line.to_string());
    }
    let got: std::collections::BTreeMap<String, Vec<String>> = r
        .nat
        .chains
        .iter()
        .map(|(n, c)| (n.to_string(), c.lines_in(n).collect::<Vec<_>>()))
        .collect();
    assert_eq!(got, want);

    assert_eq!(
        lines(&r, "filter", "KUBE-FORWARD"),
        [
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            r#"-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x00004000/0x00004000 -j ACCEPT"#,
            r#"-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"#,
        ]
    );
    assert_eq!(
        lines(&r, "filter", "KUBE-FIREWALL"),
        [
            r#"-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"#
        ]
    );
    let filter_rules: usize = r.filter.chains.values().map(|c| c.len()).sum();
    assert_eq!((r.filter.chains.len(), filter_rules), (6, 4));
}

/// Every rule shape in one intent.
fn showcase() -> (Vec<Service>, Vec<EndpointSlice>) {
    use Protocol::*;
    use ServiceType::*;
    let ns = "shop";
    let tcp80 = [("http", Tcp, 8080)];
    let services = vec![
        // TCP, UDP and SCTP on one port number; one local endpoint.
        service(
            ns,
            "dns",
            ClusterIP,
            "10.96.0.10",
            vec![
                port("dns", Udp, 53, None),
                port("dns-tcp", Tcp, 53, None),
                port("dns-sctp", Sctp, 53, None),
            ],
        ),
        // No endpoints at all: REJECT for the cluster IP, the external IP and the node port.
        {
            let mut s = service(
                ns,
                "empty",
                NodePort,
                "10.96.0.20",
                vec![port("http", Tcp, 80, Some(30020))],
            );
            s.external_ips = vec![ip("198.51.100.20")];
            s
        },
        service(
            ns,
            "np",
            NodePort,
            "10.96.0.30",
            vec![port("http", Tcp, 80, Some(30030))],
        ),
        // Source ranges; one of them contains the node IP, so the LB IPs are admitted as sources too.
        {
            let mut s = with_lb(
                service(
                    ns,
                    "lb",
                    LoadBalancer,
                    "10.96.0.40",
                    vec![port("http", Tcp, 80, Some(30040))],
                ),
                &["192.0.2.10", "192.0.2.11"],
            );
            s.load_balancer_source_ranges = vec![net("203.0.113.0/24"), net("10.0.0.0/24")];
            s
        },
        // eTP=Local with a local endpoint, and without one (external DROP, no SVL).
        {
            let mut s = local_policies(
                with_lb(
                    service(
                        ns,
                        "local-lb",
                        LoadBalancer,
                        "10.96.0.50",
                        vec![port("http", Tcp, 80, Some(30050))],
                    ),
                    &["192.0.2.20"],
                ),
                true,
                false,
            );
            s.health_check_node_port = Some(32050);
            s
        },
        {
            let mut s = local_policies(
                with_lb(
                    service(
                        ns,
                        "remote-lb",
                        LoadBalancer,
                        "10.96.0.60",
                        vec![port("http", Tcp, 80, Some(30060))],
                    ),
                    &["192.0.2.30"],
                ),
                true,
                false,
            );
            s.health_check_node_port = Some(32060);
            s
        },
        // ClientIP affinity with an external IP.
        {
            let mut s = sticky(
                service(
                    ns,
                    "sticky",
                    ClusterIP,
                    "10.96.0.70",
                    vec![port("http", Tcp, 80, None)],
                ),
                600,
            );
            s.external_ips = vec![ip("198.51.100.70")];
            s
        },
        // iTP=Local with and without a local endpoint.
        local_policies(
            service(ns, "itp", ClusterIP, "10.96.0.80", vec![port("", Tcp, 80, None)]),
            false,
            true,
        ),
        local_policies(
            service(
                ns,
                "itp-none",
                ClusterIP,
                "10.96.0.90",
                vec![port("", Tcp, 80, None)],
            ),
            false,
            true,
        ),
    ];
    let slices = vec![
        slice(
            ns,
            "dns-1",
            "dns",
            &[
                ("dns", Udp, 5353),
                ("dns-tcp", Tcp, 5353),
                ("dns-sctp", Sctp, 5353),
            ],
            vec![ep("10.244.0.5", NODE), ep("10.244.1.5", "node-b")],
        ),
        slice(
            ns,
            "np-1",
            "np",
            &tcp80,
            vec![
                ep("10.244.1.30", "node-b"),
                ep("10.244.2.30", "node-c"),
                ep("10.244.1.31", "node-b"),
            ],
        ),
        slice(
            ns,
            "lb-1",
            "lb",
            &tcp80,
            vec![ep("10.244.1.40", "node-b"), ep("10.244.2.40", "node-c")],
        ),
        slice(
            ns,
            "local-lb-1",
            "local-lb",
            &tcp80,
            vec![ep("10.244.0.50", NODE), ep("10.244.1.50", "node-b")],
        ),
        slice(
            ns,
            "remote-lb-1",
            "remote-lb",
            &tcp80,
            vec![ep("10.244.1.60", "node-b")],
        ),
        slice(
            ns,
            "sticky-1",
            "sticky",
            &tcp80,
            vec![ep("10.244.1.70", "node-b"), ep("10.244.2.70", "node-c")],
        ),
        slice(
            ns,
            "itp-1",
            "itp",
            &[("", Tcp, 8080)],
            vec![ep("10.244.0.80", NODE), ep("10.244.1.80", "node-b")],
        ),
        slice(
            ns,
            "itp-none-1",
            "itp-none",
            &[("", Tcp, 8080)],
            vec![ep("10.244.1.90", "node-b")],
        ),
    ];
    (services, slices)
}

fn showcase_ruleset(cfg: &RenderConfig) -> Ruleset {
    let (services, slices) = showcase();
    render(&intent_of(&state(services, slices)), cfg)
}

#[test]
fn snapshot_full_payload() {
    let cfg = cfg();
    let r = showcase_ruleset(&cfg);
    assert!(r.dangling_jumps().is_empty(), "{:?}", r.dangling_jumps());
    let payload = full_payload(&r, &[], &jump_rules(&cfg));
    insta::assert_snapshot!("full_payload", payload.text());
    let mut kernel = Kernel::default();
    kernel.apply(payload.text()).unwrap();
}

#[test]
fn snapshot_masquerade_all_and_node_port_addresses() {
    let cfg = RenderConfig {
        masquerade_all: true,
        local_detector: LocalDetector::None,
        node_port_addresses: NodePortAddresses::Ips(vec![ip("10.0.0.10"), ip("127.0.0.1"), ip("fd00::1")]),
        drop_invalid: false,
        random_fully: false,
        masquerade_bit: 5,
        ..cfg()
    };
    let (mut services, mut slices) = showcase();
    services.retain(|s| ["np", "local-lb"].contains(&s.name.name.as_str()));
    slices.retain(|s| ["np-1", "local-lb-1"].contains(&s.name.name.as_str()));
    let r = render(&intent_of(&state(services, slices)), &cfg);
    insta::assert_snapshot!("masquerade_all", full_payload(&r, &[], &[]).text());
}

#[test]
fn snapshot_partial_payloads() {
    let cfg = cfg();
    let (services, slices) = showcase();
    let prev = render(&intent_of(&state(services.clone(), slices.clone())), &cfg);

    // One endpoint moves: only that service port's chains change, the shared chains stay.
    let mut moved = slices.clone();
    let np = moved.iter_mut().find(|s| s.name.name == "np-1").unwrap();
    np.endpoints[2] = ep("10.244.3.31", "node-d");
    let next = render(&intent_of(&state(services.clone(), moved)), &cfg);
    let payload = partial_payload(&prev, &next, &[]);
    assert!(
        !payload.text().contains(&format!(":{KUBE_SERVICES} ")),
        "KUBE-SERVICES rewritten needlessly"
    );
    insta::assert_snapshot!("partial_endpoint_moved", payload.text());

    // A service goes away: its chains are flushed and deleted, KUBE-SERVICES is rewritten without it.
    let mut fewer = services.clone();
    fewer.retain(|s| s.name.name != "sticky");
    let next = render(&intent_of(&state(fewer, slices.clone())), &cfg);
    let payload = partial_payload(&prev, &next, &[]);
    insta::assert_snapshot!("partial_service_deleted", payload.text());
    let mut kernel = Kernel::holding(&prev);
    kernel.apply(payload.text()).unwrap();
    assert!(kernel.matches(&next));

    assert!(partial_payload(&prev, &prev, &[]).is_empty());
}

#[test]
fn large_cluster_mode_drops_endpoint_comments() {
    let services: Vec<Service> = (0..101)
        .map(|i| {
            service(
                "big",
                &format!("s{i}"),
                ServiceType::ClusterIP,
                &format!("10.96.1.{}", i + 1),
                vec![port("p", Protocol::Tcp, 80, None)],
            )
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..101)
        .map(|i| {
            let eps: Vec<Endpoint> = (0..10)
                .map(|j| ep(&format!("10.245.{i}.{j}"), "node-b"))
                .collect();
            slice(
                "big",
                &format!("s{i}-1"),
                &format!("s{i}"),
                &[("p", Protocol::Tcp, 8080)],
                eps,
            )
        })
        .collect();
    let intent = intent_of(&state(services, slices));
    assert_eq!(intent.total_endpoints(), 1010);
    let r = render(&intent, &cfg());
    for (name, chain) in &r.nat.chains {
        for line in chain.rules() {
            if name.starts_with("KUBE-SEP-")
                || (name.starts_with("KUBE-SVC-") && !line.contains("KUBE-MARK-MASQ"))
            {
                assert!(!line.contains("--comment"), "{line}");
            }
        }
    }
    let svc = r
        .nat
        .chains
        .iter()
        .find(|(n, _)| n.starts_with("KUBE-SVC-"))
        .unwrap()
        .1;
    assert!(
        svc.rules().next().unwrap().contains("cluster IP"),
        "masquerade rule keeps its comment"
    );
    let sep = r
        .nat
        .chains
        .iter()
        .find(|(n, _)| n.starts_with("KUBE-SEP-"))
        .unwrap();
    let first = sep.1.lines_in(sep.0).next().unwrap();
    let words: Vec<&str> = first.split(' ').collect();
    assert_eq!(words.len(), 6, "{words:?}");
    assert_eq!((words[1], words[2], words[5]), (&**sep.0, "-s", "KUBE-MARK-MASQ"));
    let dnat = format!("-A {} -m tcp -p tcp -j DNAT --to-destination 10.245.", sep.0);
    assert!(sep.1.lines_in(sep.0).nth(1).unwrap().starts_with(&dnat));
}

#[test]
fn payload_line_lookup() {
    let r = showcase_ruleset(&cfg());
    let payload = full_payload(&r, &[], &[]);
    assert_eq!(payload.line(1), Some("*filter"));
    assert_eq!(payload.line(payload.line_count), Some("COMMIT"));
    assert_eq!(payload.line(0), None);
    assert_eq!(payload.line(payload.line_count + 1), None);
    let around = payload.lines_around(2, 1);
    assert_eq!(around.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(around[0].1, "*filter");
    let end = payload.lines_around(payload.line_count, 3);
    assert_eq!(end.len(), 4);
    assert_eq!(payload.text().lines().count(), payload.line_count);
}

#[test]
fn ipv6_family() {
    use svcproxy_model::intent::build_intent;
    use svcproxy_model::{IntentConfig, IpFamily};
    let mut svc = service(
        "v6",
        "web",
        ServiceType::NodePort,
        "fd00:96::10",
        vec![port("http", Protocol::Tcp, 80, Some(30080))],
    );
    svc.cluster_ips.insert(0, ip("10.96.0.10"));
    let mut sl = slice(
        "v6",
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![ep("fd00:10::5", "node-b")],
    );
    sl.address_family = Some(IpFamily::V6);
    let intent = build_intent(
        &state(vec![svc], vec![sl]),
        &IntentConfig {
            family: IpFamily::V6,
            node_name: NODE.into(),
        },
    );
    let cfg = RenderConfig {
        family: IpFamily::V6,
        localhost_node_ports: true,
        local_detector: LocalDetector::Cidrs(vec![net("10.244.0.0/16"), net("fd00:10::/64")]),
        ..RenderConfig::default()
    };
    let r = render(&intent, &cfg);
    let services = lines(&r, "nat", KUBE_SERVICES);
    assert_eq!(
        services,
        [
            r#"-A KUBE-SERVICES -m comment --comment "v6/web:http cluster IP" -m tcp -p tcp -d fd00:96::10 --dport 80 -j KUBE-SVC-MZQI2OEBPJK52I3H"#,
            r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"#,
        ]
    );
    let svc_chain = lines(&r, "nat", "KUBE-SVC-MZQI2OEBPJK52I3H");
    assert!(
        svc_chain[0].ends_with("--dport 80 ! -s fd00:10::/64 -j KUBE-MARK-MASQ"),
        "{}",
        svc_chain[0]
    );
    let sep = r
        .nat
        .chains
        .iter()
        .find(|(n, _)| n.starts_with("KUBE-SEP-"))
        .unwrap()
        .1;
    assert!(
        sep.rules()
            .next()
            .unwrap()
            .contains("-s fd00:10::5 -j KUBE-MARK-MASQ")
    );
    assert!(
        sep.rules()
            .nth(1)
            .unwrap()
            .ends_with("-j DNAT --to-destination [fd00:10::5]:8080")
    );
    // No localhost NodePorts and no anti-martian chain for IPv6.
    assert!(r.filter.chain("KUBE-FIREWALL").is_none());
    assert_eq!(jump_rules(&cfg).len(), 12);
}
