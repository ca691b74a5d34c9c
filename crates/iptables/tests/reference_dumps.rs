//! Our output held against `iptables-save` dumps taken from a real kube-proxy (v1.31.14) after syncing the
//! reference scenarios (`tests/data/`): the parser reads every dump, chain names agree, and rules agree once
//! iptables-save's respelling is undone.

mod common;

use svcproxy_iptables::canonical::canonical_rule;

use std::collections::{BTreeMap, BTreeSet};

use common::scenario::scenario_state;
use common::*;
use svcproxy_iptables::save_parser::{quote_arg, tokenize};
use svcproxy_iptables::{
    JumpRule, LocalDetector, RenderConfig, Ruleset, SavedRuleset, full_payload, jump_rules, missing_jumps,
    parse_save, render, render_payload, stale_owned_chains,
};
use svcproxy_model::{Endpoint, Protocol, ServiceType};

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

fn dump(name: &str) -> String {
    let path = format!(
        "{}/tests/data/upstream-v1.31.14-iptables/{name}.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).unwrap()
}

fn scenario(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/data/scenarios/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The reference runs' settings: ClusterCIDR detection, node IP 10.0.0.10, upstream's default of localhost
/// NodePorts on (so KUBE-FIREWALL and the NodePort gate match), and the nfacct packet counters, which
/// upstream created there.
fn reference_cfg() -> RenderConfig {
    RenderConfig {
        local_detector: LocalDetector::Cidrs(vec![net("10.244.0.0/16")]),
        node_ip: Some(ip("10.0.0.10")),
        localhost_node_ports: true,
        packet_counters: true,
        ..RenderConfig::default()
    }
}

#[test]
fn every_dump_parses_and_reprints() {
    for name in SCENARIOS {
        let text = dump(name);
        let saved = parse_save(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            saved.tables.keys().collect::<Vec<_>>(),
            ["filter", "mangle", "nat"],
            "{name}"
        );
        let rule_lines = text.lines().filter(|l| l.starts_with("-A ")).count();
        assert_eq!(
            saved.tables.values().map(|t| t.rules.len()).sum::<usize>(),
            rule_lines,
            "{name}"
        );
        for table in saved.tables.values() {
            for rule in &table.rules {
                // Re-print with iptables-save's quoting (which it applies to comments) and compare with the
                // original, modulo the runs of blanks some extensions print.
                let mut words = vec!["-A".to_string(), rule.chain.clone()];
                let mut quote_next = false;
                for arg in &rule.args {
                    words.push(if quote_next { quote_arg(arg) } else { arg.clone() });
                    quote_next = arg == "--comment";
                }
                let original: Vec<&str> = rule.line.split_whitespace().collect();
                assert_eq!(words.join(" "), original.join(" "), "{name}");
                assert_eq!(tokenize(&rule.line).unwrap()[2..], rule.args[..]);
            }
        }
    }
}

/// Chain names for the `clusterip-basic` scenario, with the intent built by hand rather than from YAML.
#[test]
fn clusterip_basic_chain_names_match_upstream() {
    use Protocol::*;
    let ns = "ref-clusterip";
    let (k8s, k8s_slice) = kubernetes_service();
    let dns = [
        ("dns-tcp", Tcp, 5353),
        ("dns-udp", Udp, 5353),
        ("dns-sctp", Sctp, 5353),
    ];
    let web = [("http", Tcp, 8080), ("https", Tcp, 8443)];
    let services = vec![
        k8s,
        service(
            ns,
            "multi-proto",
            ServiceType::ClusterIP,
            "10.96.1.10",
            vec![
                port("dns-tcp", Tcp, 53, None),
                port("dns-udp", Udp, 53, None),
                port("dns-sctp", Sctp, 53, None),
            ],
        ),
        service(
            ns,
            "web",
            ServiceType::ClusterIP,
            "10.96.1.20",
            vec![port("http", Tcp, 80, None), port("https", Tcp, 443, None)],
        ),
        service(
            ns,
            "single",
            ServiceType::ClusterIP,
            "10.96.1.30",
            vec![port("", Tcp, 80, None)],
        ),
    ];
    let eps = |list: &[(&str, &str)]| -> Vec<Endpoint> { list.iter().map(|(a, n)| ep(a, n)).collect() };
    let slices = vec![
        k8s_slice,
        slice(
            ns,
            "multi-proto-1",
            "multi-proto",
            &dns,
            eps(&[
                ("10.244.1.11", "node-b"),
                ("10.244.2.12", "node-c"),
                ("10.244.0.13", "node-a"),
            ]),
        ),
        slice(
            ns,
            "web-1",
            "web",
            &web,
            eps(&[("10.244.1.14", "node-b"), ("10.244.2.15", "node-c")]),
        ),
        slice(ns, "web-2", "web", &web, eps(&[("10.244.0.16", "node-a")])),
        slice(
            ns,
            "single-1",
            "single",
            &[("", Tcp, 8080)],
            eps(&[("10.244.1.17", "node-b")]),
        ),
    ];
    let ours = render(&intent_of(&state(services, slices)), &reference_cfg());
    let saved = parse_save(&dump("clusterip-basic")).unwrap();
    let pick = |names: Vec<&str>| -> BTreeSet<String> {
        names
            .into_iter()
            .filter(|n| n.starts_with("KUBE-SVC-") || n.starts_with("KUBE-SEP-"))
            .map(String::from)
            .collect()
    };
    let theirs = pick(saved.tables["nat"].chains.keys().map(String::as_str).collect());
    assert_eq!(theirs.len(), 7 + 17);
    assert_eq!(pick(ours.nat.chains.keys().map(|k| &**k).collect()), theirs);
}

/// Chain → canonical rules. Shared chains are compared as sets (upstream writes them in Go map order), with
/// nat KUBE-SERVICES's gate rule required last; per-service chains in order.
fn comparable(
    tables: impl Iterator<Item = (String, String, Vec<Vec<String>>)>,
) -> BTreeMap<(String, String), Vec<Vec<String>>> {
    const SHARED: [&str; 4] = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-PROXY-FIREWALL",
    ];
    let mut out = BTreeMap::new();
    for (table, chain, rules) in tables {
        let mut rules: Vec<Vec<String>> = rules.iter().map(|r| canonical_rule(r)).collect();
        if SHARED.contains(&chain.as_str()) {
            let last = (table == "nat" && chain == "KUBE-SERVICES")
                .then(|| rules.pop())
                .flatten();
            rules.sort();
            rules.extend(last);
        }
        out.insert((table, chain), rules);
    }
    out
}

fn ours_comparable(r: &Ruleset) -> BTreeMap<(String, String), Vec<Vec<String>>> {
    comparable([&r.filter, &r.nat].into_iter().flat_map(|t| {
        t.chains.iter().map(|(name, chain)| {
            let rules = chain.rules().map(|l| tokenize(l).unwrap()).collect();
            (t.name.as_str().to_string(), name.to_string(), rules)
        })
    }))
}

fn theirs_comparable(saved: &SavedRuleset) -> BTreeMap<(String, String), Vec<Vec<String>>> {
    const BUILTIN: [&str; 5] = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];
    comparable(["filter", "nat"].into_iter().flat_map(|t| {
        let table = &saved.tables[t];
        table
            .chains
            .keys()
            .filter(|c| !BUILTIN.contains(&c.as_str()) && *c != "KUBE-PROXY-CANARY")
            .map(|c| {
                let rules = table.rules_of(c).map(|r| r.args.clone()).collect();
                (t.to_string(), c.clone(), rules)
            })
            .collect::<Vec<_>>()
    }))
}

#[test]
fn every_scenario_renders_like_upstream() {
    for name in SCENARIOS {
        let ours = render(&intent_of(&scenario_state(&scenario(name))), &reference_cfg());
        assert!(ours.dangling_jumps().is_empty(), "{name}");
        let ours = ours_comparable(&ours);
        let theirs = theirs_comparable(&parse_save(&dump(name)).unwrap());
        let keys: BTreeSet<_> = ours.keys().chain(theirs.keys()).collect();
        for key in keys {
            assert_eq!(ours.get(key), theirs.get(key), "{name}: {key:?}");
        }
    }
}

/// The payload written from the service ports' parts in their order writes, chain for chain, what the
/// payload of the assembled ruleset does.
#[test]
fn the_payload_in_service_port_order_writes_the_same_chains() {
    for name in SCENARIOS {
        for cfg in [reference_cfg(), RenderConfig::default()] {
            let intent = intent_of(&scenario_state(&scenario(name)));
            let by_name = full_payload(&render(&intent, &cfg), &[], &[]);
            let by_part = render_payload(&intent, &cfg);
            assert_eq!(
                theirs_comparable(&parse_save(by_part.text()).unwrap()),
                theirs_comparable(&parse_save(by_name.text()).unwrap()),
                "{name}"
            );
            assert_eq!(by_part.line_count, by_name.line_count, "{name}");
            assert_eq!(by_part.len(), by_name.len(), "{name}");
        }
    }
}

/// Upstream's jumps as found on a host it set up from scratch, by (chain, target, comment) in chain order.
fn builtin_jumps(saved: &SavedRuleset, table: &str) -> Vec<(String, Option<String>, Option<String>)> {
    let t = &saved.tables[table];
    ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"]
        .iter()
        .flat_map(|c| t.rules_of(c))
        .map(|r| (r.chain.clone(), r.jump.clone(), r.comment.clone()))
        .collect()
}

#[test]
fn jumps_on_a_clean_host_land_in_upstream_order() {
    let cfg = reference_cfg();
    let saved = parse_save(&dump("clusterip-basic")).unwrap();
    assert!(missing_jumps(&saved, &cfg).is_empty());
    assert!(missing_jumps(&saved, &RenderConfig::default()).is_empty());

    let ours = render(&intent_of(&scenario_state(&scenario("clusterip-basic"))), &cfg);
    let mut kernel = Kernel::default();
    let all: Vec<JumpRule> = missing_jumps(&kernel.saved(), &cfg);
    assert_eq!(all, jump_rules(&cfg));
    kernel.apply(full_payload(&ours, &[], &all).text()).unwrap();
    let after = kernel.saved();
    for table in ["filter", "nat"] {
        assert_eq!(
            builtin_jumps(&after, table),
            builtin_jumps(&saved, table),
            "{table}"
        );
    }
    assert!(missing_jumps(&after, &cfg).is_empty());
}

#[test]
fn takeover_collects_upstream_chains_we_do_not_want() {
    let saved = parse_save(&dump("all-in-one")).unwrap();
    let cfg = reference_cfg();
    let same = render(&intent_of(&scenario_state(&scenario("all-in-one"))), &cfg);
    assert!(stale_owned_chains(&saved, &same).is_empty());

    let fewer = render(&intent_of(&scenario_state(&scenario("clusterip-basic"))), &cfg);
    let stale = stale_owned_chains(&saved, &fewer);
    let owned_in_dump: BTreeSet<&str> = saved.tables["nat"]
        .chains
        .keys()
        .map(String::as_str)
        .filter(|c| svcproxy_iptables::is_owned_service_chain(c))
        .collect();
    let kept: BTreeSet<&str> = fewer.nat.chains.keys().map(|k| &**k).collect();
    assert_eq!(
        stale.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        owned_in_dump.difference(&kept).copied().collect()
    );
    assert!(
        stale.iter().any(|c| c.starts_with("KUBE-FW-")) && stale.iter().any(|c| c.starts_with("KUBE-SVL-"))
    );
}
