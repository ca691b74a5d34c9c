//! The packet-flow table against our rendered table, in both dispatch layouts and in the configuration
//! variants that change the rules' shape.

mod common;

use common::flow::*;
use common::*;
use svcproxy_model::Protocol;
use svcproxy_model::trace::{Origin, Packet, Verdict};
use svcproxy_nftables::dispatch::DEFAULT_LAYOUT;
use svcproxy_nftables::{DispatchLayout, NodePortAddresses, render, trace};

#[test]
fn flow_table_holds_in_both_layouts() {
    for layout in LAYOUTS
        .into_iter()
        .chain([DispatchLayout::Cascade { max_endpoints: 1 }])
    {
        let rs = render(&intent_of(&flow_state()), &flow_config(layout));
        let mut all = flows();
        all.push(host_to_local_policy_without_local_endpoints());
        check_flows(&rs, &all, &format!("{layout:?}"));
    }
}

#[test]
fn nodeports_on_every_local_address() {
    let mut cfg = flow_config(DEFAULT_LAYOUT);
    cfg.node_port_addresses = NodePortAddresses::All;
    let rs = render(&intent_of(&flow_state()), &cfg);
    check_flows(&rs, &flows(), "all addresses");
    // A second node address now takes NodePorts too; loopback never does.
    let second = Packet {
        origin: Origin::External,
        source: ip(OUTSIDE),
        destination: ip("10.0.1.10"),
        port: 30080,
        protocol: Protocol::Tcp,
    };
    let t = trace(&rs, &second, &[ip(NODE_IP), ip("10.0.1.10")]).unwrap();
    assert_eq!(t.endpoints, ["10.244.1.31:8080"]);
    let lo = Packet {
        origin: Origin::Host,
        source: ip("127.0.0.1"),
        destination: ip("127.0.0.1"),
        ..second
    };
    let t = trace(&rs, &lo, &[ip(NODE_IP)]).unwrap();
    assert!(t.endpoints.is_empty());
}

#[test]
fn masquerade_all_masquerades_pods_too() {
    let mut cfg = flow_config(DEFAULT_LAYOUT);
    cfg.masquerade_all = true;
    let rs = render(&intent_of(&flow_state()), &cfg);
    let p = Packet {
        origin: Origin::Pod,
        source: ip(LOCAL_POD),
        destination: ip("10.96.1.1"),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let t = trace(&rs, &p, &[ip(NODE_IP)]).unwrap();
    assert!(t.masquerade);
    assert_eq!(t.verdict, Verdict::Accept);
}

#[test]
fn without_detector_offcluster_clients_keep_their_source() {
    let mut cfg = flow_config(DEFAULT_LAYOUT);
    cfg.local_detector = svcproxy_nftables::LocalDetector::None;
    let rs = render(&intent_of(&flow_state()), &cfg);
    let p = Packet {
        origin: Origin::External,
        source: ip(OUTSIDE),
        destination: ip("10.96.1.1"),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert!(!trace(&rs, &p, &[ip(NODE_IP)]).unwrap().masquerade);
    // And pods reaching a Local-policy LB no longer short-circuit: they are external clients too.
    let p = Packet {
        origin: Origin::Pod,
        source: ip(LOCAL_POD),
        destination: ip("192.0.2.60"),
        ..p
    };
    assert_eq!(
        trace(&rs, &p, &[ip(NODE_IP)]).unwrap().endpoints,
        ["10.244.0.61:8080"]
    );
}

#[test]
fn service_cidr_drops_unallocated_addresses() {
    let mut cfg = flow_config(DEFAULT_LAYOUT);
    cfg.service_cidrs = vec![net("10.96.0.0/16")];
    let rs = render(&intent_of(&flow_state()), &cfg);
    let p = Packet {
        origin: Origin::Pod,
        source: ip(LOCAL_POD),
        destination: ip("10.96.5.5"),
        port: 80,
        protocol: Protocol::Tcp,
    };
    assert_eq!(trace(&rs, &p, &[ip(NODE_IP)]).unwrap().verdict, Verdict::Drop);
    check_flows(&rs, &flows(), "service CIDR");
}

#[test]
fn trace_lists_the_rules_it_matched() {
    let rs = render(&intent_of(&flow_state()), &flow_config(DEFAULT_LAYOUT));
    let p = Packet {
        origin: Origin::External,
        source: ip("198.51.100.7"),
        destination: ip("192.0.2.50"),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let t = trace(&rs, &p, &[ip(NODE_IP)]).unwrap();
    let steps: Vec<String> = t
        .steps
        .iter()
        .map(|s| format!("{}: {}", s.chain, s.rule))
        .collect();
    assert_eq!(
        steps,
        [
            "ip svcproxy/filter-prerouting: ct state new jump firewall-check",
            "ip svcproxy/firewall-check: ip daddr . meta l4proto . th dport vmap @firewall-ips",
            "ip svcproxy/firewall-flow/lb/tcp/http: ip saddr != 203.0.113.0/24 drop",
        ]
    );
}
