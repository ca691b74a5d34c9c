//! The rendered table and its transactions: snapshots of the full transaction for a small cluster in both
//! the default and upstream's layout, a partial update's exact commands, determinism, the size of a
//! one-endpoint change at two scales, and IPv6.

mod common;

use common::flow::flow_config;
use common::*;
use svcproxy_model::intent::build_intent;
use svcproxy_model::{ClusterState, Endpoint, IntentConfig, IpFamily, Protocol, ServiceType};
use svcproxy_nftables::dispatch::DEFAULT_LAYOUT;
use svcproxy_nftables::{DispatchLayout, RenderConfig, full_transaction, partial_transaction, render};
use svcproxy_testkit::scale::{scale_state, toggle_first_endpoint};

/// Two services with every kind of object: a load balancer with source ranges and Local external policy
/// (one local and one remote endpoint), and a sticky ClusterIP service with no endpoints at all.
fn small_state() -> ClusterState {
    let mut lb = local_policies(
        with_lb(
            service(
                "demo",
                "web",
                ServiceType::LoadBalancer,
                "10.96.0.10",
                vec![port("http", Protocol::Tcp, 80, Some(30080))],
            ),
            &["192.0.2.10"],
        ),
        true,
        false,
    );
    lb.load_balancer_source_ranges = vec![net("203.0.113.0/24")];
    let empty = sticky(
        service(
            "demo",
            "idle",
            ServiceType::ClusterIP,
            "10.96.0.11",
            vec![port("", Protocol::Udp, 53, None)],
        ),
        600,
    );
    let slices = vec![slice(
        "demo",
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![ep("10.244.0.5", NODE), ep("10.244.1.6", "node-b")],
    )];
    state(vec![lb, empty], slices)
}

#[test]
fn full_transaction_default_layout() {
    let rs = render(&intent_of(&small_state()), &flow_config(DEFAULT_LAYOUT));
    insta::assert_snapshot!(full_transaction(&rs).text);
}

#[test]
fn full_transaction_upstream_layout() {
    let rs = render(
        &intent_of(&small_state()),
        &flow_config(DispatchLayout::NumgenVmap),
    );
    insta::assert_snapshot!(full_transaction(&rs).text);
}

#[test]
fn partial_transaction_for_a_moved_endpoint() {
    let cfg = flow_config(DEFAULT_LAYOUT);
    let before = small_state();
    let mut after = before.clone();
    after.endpoint_slices.values_mut().next().unwrap().endpoints[1].address = ip("10.244.2.7");
    let tx = partial_transaction(
        &render(&intent_of(&before), &cfg),
        &render(&intent_of(&after), &cfg),
    )
    .unwrap();
    assert_eq!(tx.services.iter().collect::<Vec<_>>(), ["demo/web"]);
    insta::assert_snapshot!(tx.text);
}

/// The line of `text` that adds elements to `set`, if any.
fn elements_of<'a>(text: &'a str, set: &str) -> Option<&'a str> {
    let head = format!("add element ip svcproxy {set} ");
    text.lines().find(|l| l.starts_with(&head))
}

#[test]
fn source_ranges_guard_a_load_balancer_without_endpoints() {
    let mut lb = with_lb(
        service(
            "demo",
            "idle-lb",
            ServiceType::LoadBalancer,
            "10.96.0.12",
            vec![port("http", Protocol::Tcp, 80, Some(30081))],
        ),
        &["192.0.2.12"],
    );
    lb.load_balancer_source_ranges = vec![net("203.0.113.0/24")];
    let cfg = flow_config(DEFAULT_LAYOUT);
    let text = full_transaction(&render(&intent_of(&state(vec![lb.clone()], vec![])), &cfg)).text;
    // Sources outside the ranges are dropped by the firewall before the no-endpoints check rejects the rest.
    let fw = "firewall-demo/idle-lb/tcp/http";
    assert!(
        text.contains(&format!(
            "add rule ip svcproxy {fw} ip saddr != 203.0.113.0/24 drop\n"
        )),
        "{text}"
    );
    let guarded = elements_of(&text, "firewall-ips").unwrap_or_else(|| panic!("{text}"));
    assert!(
        guarded.contains(&format!(
            "192.0.2.12 . tcp . 80 comment \"demo/idle-lb:http\" : goto {fw}"
        )),
        "{guarded}"
    );
    let rejected = elements_of(&text, "no-endpoint-services").unwrap_or_else(|| panic!("{text}"));
    assert!(
        rejected.contains("192.0.2.12 . tcp . 80 comment \"demo/idle-lb:http\" : goto reject-chain"),
        "{rejected}"
    );
    // Without source ranges there is nothing to guard.
    lb.load_balancer_source_ranges.clear();
    let text = full_transaction(&render(&intent_of(&state(vec![lb], vec![])), &cfg)).text;
    assert!(!text.contains("firewall-demo"), "{text}");
    assert_eq!(elements_of(&text, "firewall-ips"), None);
}

#[test]
fn rendering_is_deterministic() {
    let cfg = flow_config(DEFAULT_LAYOUT);
    let a = full_transaction(&render(&intent_of(&small_state()), &cfg));
    let b = full_transaction(&render(&intent_of(&small_state()), &cfg));
    assert_eq!(a, b);
}

#[test]
fn one_endpoint_change_has_the_same_size_at_1k_and_10k_services() {
    let mut sizes = Vec::new();
    for services in [1_000, 10_000] {
        let mut state = scale_state(services, 10);
        let cfg = RenderConfig::default();
        let before = render(&intent_of(&state), &cfg);
        toggle_first_endpoint(&mut state, 7);
        let after = render(&intent_of(&state), &cfg);
        let tx = partial_transaction(&before, &after).unwrap();
        assert_eq!(tx.services.iter().collect::<Vec<_>>(), ["scale/svc-00007"]);
        sizes.push(tx.text.len());
    }
    assert_eq!(
        sizes[0], sizes[1],
        "a one-endpoint change must not grow with the number of services"
    );
}

#[test]
fn ipv6_table() {
    let mut svc = service(
        "v6",
        "web",
        ServiceType::NodePort,
        "fd00:96::10",
        vec![port("http", Protocol::Tcp, 80, Some(30080))],
    );
    svc.external_ips = vec![ip("2001:db8::10")];
    let mut s = slice(
        "v6",
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![Endpoint::ready(ip("fd00:10::5"), Some("node-b"))],
    );
    s.address_family = Some(IpFamily::V6);
    let st = state(vec![svc], vec![s]);
    let intent = build_intent(
        &st,
        &IntentConfig {
            family: IpFamily::V6,
            node_name: NODE.into(),
        },
    );
    let cfg = RenderConfig {
        family: IpFamily::V6,
        local_detector: svcproxy_nftables::LocalDetector::Cidrs(vec![
            net("10.244.0.0/16"),
            net("fd00:10::/64"),
        ]),
        ..RenderConfig::default()
    };
    let text = full_transaction(&render(&intent, &cfg)).text;
    assert!(text.starts_with("table ip6 svcproxy {}\n"));
    assert!(text.contains("add rule ip6 svcproxy service-v6/web/tcp/http ip6 daddr fd00:96::10 tcp dport 80 ip6 saddr != fd00:10::/64 jump mark-for-masquerade"));
    assert!(text.contains("meta l4proto tcp dnat ip6 to numgen random mod 1 map @endpoints-tcp-0"));
    assert!(text.contains(
        "add map ip6 svcproxy endpoints-tcp-0 { typeof numgen random mod 1 : ip6 daddr . tcp dport ; }"
    ));
    assert!(
        text.contains("comment \"v6/web:http\" : fd00:10::5 . 8080 }"),
        "{text}"
    );
    assert!(
        text.contains(
            "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports"
        )
    );
    assert!(!text.contains("10.244."));
}
