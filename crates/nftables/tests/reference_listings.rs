//! Upstream's own nftables tables (`nft list ruleset` taken from a real kube-proxy v1.31.14 after syncing
//! each reference scenario, `tests/data/`): the parser reads every listing, and for every scenario our table
//! and upstream's send the same packets to the same endpoints, masquerade the same ones and give the same
//! verdicts. Chain names differ; behaviour must not, except where we deliberately improve on it.

mod common;

use common::flow::{LAYOUTS, LOCAL_POD, NODE_IP, OUTSIDE, flow_config};
use common::scenario::scenario_state;
use common::*;
use svcproxy_model::trace::{Origin, Packet, Trace, Verdict};
use svcproxy_model::{Intent, ServicePortIntent};
use svcproxy_nftables::{Family, Ruleset, parse_listing, render, trace};

const SCENARIOS: [&str; 11] = [
    "all-in-one",
    "clusterip-basic",
    "etp-local",
    "externalips",
    "ignored",
    "itp-local",
    "loadbalancer",
    "no-endpoints",
    "nodeport",
    "terminating",
    "topology",
];

fn data(path: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/data/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn upstream(name: &str) -> Ruleset {
    let text = data(&format!("upstream-v1.31.14-nftables/{name}.txt"));
    let listing = parse_listing(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    listing.table(Family::Ip, "kube-proxy").unwrap().clone()
}

#[test]
fn every_listing_parses_completely() {
    for name in SCENARIOS {
        let text = data(&format!("upstream-v1.31.14-nftables/{name}.txt"));
        let listing = parse_listing(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(listing.tables.len(), 2, "{name}: ip and ip6 tables");
        let v6 = listing.table(Family::Ip6, "kube-proxy").unwrap();
        assert!(v6.chains.contains_key("services"));
        let rs = listing.table(Family::Ip, "kube-proxy").unwrap();
        assert_eq!(rs.comment.as_deref(), Some("rules for kube-proxy"));
        // Every chain header and rule line of the ip table was read.
        let ip_part = text.split("table ip6 ").next().unwrap();
        let chains = ip_part
            .lines()
            .filter(|l| l.trim_start().starts_with("chain "))
            .count();
        assert_eq!(rs.chains.len(), chains, "{name}");
        let rules = ip_part
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && !l.ends_with('{')
                    && *l != "}"
                    && !l.starts_with("type ")
                    && !l.starts_with("comment ")
                    && !l.starts_with("flags ")
                    && !l.starts_with("size ")
                    && !l.starts_with("timeout ")
                    && !l.starts_with("elements = ")
                    && !l.starts_with(|c: char| c.is_ascii_digit() || c == '}')
                    && !l.starts_with("tcp . ")
                    && !l.starts_with("udp . ")
                    && !l.starts_with("sctp . ")
            })
            .count();
        assert_eq!(
            rs.chains.values().map(|c| c.rules.len()).sum::<usize>(),
            rules,
            "{name}"
        );
        let base = rs.chains.values().filter(|c| c.base.is_some()).count();
        assert_eq!(base, 8, "{name}");
        assert_eq!(rs.chains["filter-prerouting"].base.unwrap().priority, -110);
        assert_eq!(rs.chains["nat-output"].base.unwrap().priority, -100);
        // Every reference resolves, as the kernel guaranteed when it accepted the table.
        rs.check_references().unwrap();
        // Every rule is understood by the tracer's parser.
        for (chain, c) in &rs.chains {
            for r in &c.rules {
                svcproxy_nftables::rule_syntax::parse_rule(r)
                    .unwrap_or_else(|e| panic!("{name} {chain}: {r}: {e}"));
            }
        }
    }
}

fn pkt(
    origin: Origin,
    source: &str,
    destination: std::net::IpAddr,
    spi: &ServicePortIntent,
    port: u16,
) -> Packet {
    Packet {
        origin,
        source: ip(source),
        destination,
        port,
        protocol: spi.name.protocol,
    }
}

/// Packets that exercise every address of every service port, from every kind of client.
fn probes(intent: &Intent) -> Vec<(String, Packet)> {
    let mut out = Vec::new();
    for spi in intent.service_ports.values() {
        let n = spi.name.to_string();
        let cip = spi.cluster_ip;
        for (who, origin, src) in [
            ("pod", Origin::Pod, LOCAL_POD),
            ("host", Origin::Host, NODE_IP),
            ("outside", Origin::External, OUTSIDE),
        ] {
            out.push((
                format!("{n} cluster IP from {who}"),
                pkt(origin, src, cip, spi, spi.port),
            ));
            for ext in spi.external_ips.iter().chain(&spi.load_balancer_ips) {
                out.push((
                    format!("{n} {ext} from {who}"),
                    pkt(origin, src, *ext, spi, spi.port),
                ));
            }
            if let Some(np) = spi.node_port {
                out.push((
                    format!("{n} nodePort from {who}"),
                    pkt(origin, src, ip(NODE_IP), spi, np),
                ));
            }
        }
        out.push((
            format!("{n} undefined port"),
            pkt(Origin::Pod, LOCAL_POD, cip, spi, spi.port + 1000),
        ));
        for range in &spi.source_ranges {
            let inside = range.hosts().next().unwrap().to_string();
            for lb in &spi.load_balancer_ips {
                out.push((
                    format!("{n} {lb} from allowed {inside}"),
                    pkt(Origin::External, &inside, *lb, spi, spi.port),
                ));
            }
        }
        for ep in spi.endpoints.all_reachable() {
            let origin = if ep.is_local {
                Origin::Pod
            } else {
                Origin::External
            };
            let src = ep.ip.to_string();
            out.push((
                format!("{n} hairpin from {src}"),
                pkt(origin, &src, cip, spi, spi.port),
            ));
        }
    }
    out
}

/// Where we deliberately differ: host traffic to a Local-policy external address without local endpoints
/// is short-circuited to cluster endpoints (upstream checks for "no local endpoints" before DNAT and drops).
fn deliberate_difference(spi: &ServicePortIntent, p: &Packet) -> bool {
    p.origin == Origin::Host
        && spi.external_policy_local
        && spi.has_endpoints()
        && !spi.has_external_endpoints()
        && (spi.external_ips.contains(&p.destination) || spi.load_balancer_ips.contains(&p.destination))
}

fn outcome(t: &Trace) -> (Vec<String>, bool, Verdict) {
    (t.endpoints.clone(), t.masquerade, t.verdict)
}

#[test]
fn same_behaviour_as_upstream_on_every_scenario() {
    let node = [ip(NODE_IP)];
    let mut compared = 0;
    let mut differences = 0;
    let mut kinds = std::collections::BTreeSet::new();
    for layout in LAYOUTS {
        for name in SCENARIOS {
            let intent = intent_of(&scenario_state(&data(&format!("scenarios/{name}.yaml"))));
            let ours = render(&intent, &flow_config(layout));
            let theirs = upstream(name);
            let mut failures = Vec::new();
            for (what, p) in probes(&intent) {
                let a = trace(&ours, &p, &node).unwrap_or_else(|e| panic!("{name} {what}: ours: {e}"));
                let b = trace(&theirs, &p, &node).unwrap_or_else(|e| panic!("{name} {what}: upstream: {e}"));
                let spi = intent
                    .service_ports
                    .values()
                    .find(|s| what.starts_with(&s.name.to_string()))
                    .unwrap();
                compared += 1;
                if deliberate_difference(spi, &p) {
                    differences += 1;
                    assert_eq!(b.verdict, Verdict::Drop, "{name} {what}: upstream drops");
                    assert_eq!(a.verdict, Verdict::Accept, "{name} {what}: we short-circuit");
                    continue;
                }
                kinds.insert(format!(
                    "{:?} masq={} endpoints={}",
                    a.verdict,
                    a.masquerade,
                    a.endpoints.len().min(2)
                ));
                if outcome(&a) != outcome(&b) {
                    failures.push(format!(
                        "{what}: ours {:?}, upstream {:?}",
                        outcome(&a),
                        outcome(&b)
                    ));
                }
            }
            assert!(
                failures.is_empty(),
                "{name} ({layout:?}):\n{}",
                failures.join("\n")
            );
        }
    }
    assert!(compared > 300, "{compared} probes");
    // The probes reach every kind of outcome, so agreement is not agreement on trivia.
    for kind in [
        "Accept masq=false endpoints=1",
        "Accept masq=false endpoints=2",
        "Accept masq=true endpoints=1",
        "Accept masq=true endpoints=2",
        "Drop masq=false endpoints=0",
        "Reject masq=false endpoints=0",
    ] {
        assert!(kinds.contains(kind), "{kind} not seen in {kinds:?}");
    }
    assert!(differences > 0, "the deliberate difference was exercised");
}

/// An endpoint at one of the node's own addresses (a host-network pod, the API server behind `kubernetes` on a
/// control-plane node) is masqueraded when it reaches itself through its Service, and only then: the host
/// connecting to that address directly has source equal to destination too, and keeps it.
#[test]
fn an_endpoint_at_a_node_address_is_masqueraded_only_through_its_service() {
    let mut compared = 0;
    for layout in LAYOUTS {
        for name in SCENARIOS {
            let intent = intent_of(&scenario_state(&data(&format!("scenarios/{name}.yaml"))));
            let ours = render(&intent, &flow_config(layout));
            let theirs = upstream(name);
            for spi in intent.service_ports.values() {
                for ep in spi.endpoints.all_reachable() {
                    let node = [ip(NODE_IP), ep.ip];
                    let src = ep.ip.to_string();
                    let direct = pkt(Origin::Host, &src, ep.ip, spi, ep.port);
                    let a = trace(&ours, &direct, &node).unwrap();
                    let b = trace(&theirs, &direct, &node).unwrap();
                    let what = format!("{name} ({layout:?}) {} {src} to itself", spi.name);
                    assert_eq!(outcome(&a), outcome(&b), "{what}");
                    assert!(!a.masquerade, "{what}: masqueraded without a Service");
                    let hairpin = pkt(Origin::Host, &src, spi.cluster_ip, spi, spi.port);
                    let a = trace(&ours, &hairpin, &node).unwrap();
                    let b = trace(&theirs, &hairpin, &node).unwrap();
                    assert_eq!(outcome(&a), outcome(&b), "{what} through {}", spi.cluster_ip);
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 50, "{compared} endpoints");
}
