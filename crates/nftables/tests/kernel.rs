//! Through the real kernel: transactions applied with `nft -f` in a private network namespace, the table
//! listed back with `nft list table` and parsed. Proves the parser reads what the kernel prints, that what we
//! write is already in the kernel's spelling, and that the packet-flow table holds on the read-back.

mod common;

use common::flow::*;
use common::netns::Netns;
use common::*;
use svcproxy_nftables::{
    Family, Kernel, RenderConfig, Ruleset, chunked_full, full_transaction, parse_listing,
    partial_transaction, render,
};
use svcproxy_testkit::scale::{scale_state, toggle_first_endpoint};

fn read_back(ns: &Netns, table: &str) -> Ruleset {
    let text = ns.nft(&["list", "table", "ip", table]);
    let listing = parse_listing(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    listing.table(Family::Ip, table).expect("table listed").clone()
}

fn assert_same(got: &Ruleset, want: &Ruleset) {
    for (name, chain) in &want.chains {
        assert_eq!(got.chains.get(name), Some(chain), "chain {name}");
    }
    for (name, set) in &want.sets {
        assert_eq!(got.sets.get(name), Some(set), "set {name}");
    }
    assert_eq!(got, want);
}

#[test]
fn full_transaction_reads_back_identically_and_flows_hold() {
    for layout in LAYOUTS {
        let cfg = flow_config(layout);
        let rs = render(&intent_of(&flow_state()), &cfg);
        let ns = Netns::new();
        ns.nft_f(&full_transaction(&rs).text).unwrap();
        // Twice: the idiom must work whether or not the table exists.
        ns.nft_f(&full_transaction(&rs).text).unwrap();
        let back = read_back(&ns, "svcproxy");
        assert_same(&back, &rs);
        check_flows(&back, &flows(), "read back");
    }
}

/// Changes that exercise every kind of partial update: endpoints moving, a service appearing and going,
/// affinity switched on (new sets), an external policy switched to Local (new chains, changed elements).
fn changed_state() -> svcproxy_model::ClusterState {
    let mut st = flow_state();
    let web = st
        .endpoint_slices
        .values_mut()
        .find(|s| s.name.name == "web-1")
        .unwrap();
    web.endpoints[0].address = ip("10.244.2.13");
    st.services.retain(|n, _| n.name != "empty");
    let extra = service(
        "flow",
        "extra",
        svcproxy_model::ServiceType::ClusterIP,
        "10.96.1.99",
        vec![port("http", svcproxy_model::Protocol::Tcp, 80, None)],
    );
    st.services.insert(extra.name.clone(), extra);
    let np = st.services.values_mut().find(|s| s.name.name == "np").unwrap();
    np.session_affinity = svcproxy_model::SessionAffinity::ClientIP { timeout_seconds: 300 };
    let lb = st.services.values_mut().find(|s| s.name.name == "lb").unwrap();
    lb.external_traffic_policy = svcproxy_model::TrafficPolicy::Local;
    st
}

#[test]
fn partial_transactions_apply_and_read_back_as_the_next_table() {
    for layout in LAYOUTS {
        let cfg = flow_config(layout);
        let a = render(&intent_of(&flow_state()), &cfg);
        let b = render(&intent_of(&changed_state()), &cfg);
        let ns = Netns::new();
        ns.nft_f(&full_transaction(&a).text).unwrap();
        for (prev, next) in [(&a, &b), (&b, &a)] {
            let tx = partial_transaction(prev, next).unwrap();
            assert!(!tx.is_empty());
            ns.nft_f(&tx.text)
                .unwrap_or_else(|e| panic!("{layout:?}: {e}\n{}", tx.text));
            assert_same(&read_back(&ns, "svcproxy"), next);
            // The simulated kernel agrees with the real one.
            let mut sim = Kernel::holding(prev);
            sim.apply(&tx.text).unwrap();
            assert_eq!(sim.table(Family::Ip, "svcproxy").unwrap(), next);
        }
        assert!(partial_transaction(&a, &a).unwrap().is_empty());
    }
}

#[test]
fn chunked_cold_sync_reads_back_as_the_full_table() {
    let cfg = flow_config(svcproxy_nftables::dispatch::DEFAULT_LAYOUT);
    let rs = render(&intent_of(&flow_state()), &cfg);
    let ns = Netns::new();
    // Whatever was there before is replaced.
    ns.nft_f(&full_transaction(&render(&intent_of(&changed_state()), &cfg)).text)
        .unwrap();
    let chunks = chunked_full(&rs, 3).unwrap();
    assert!(chunks.len() > 3);
    for c in &chunks {
        ns.nft_f(&c.text).unwrap_or_else(|e| panic!("{e}\n{}", c.text));
        read_back(&ns, "svcproxy").check_references().unwrap();
    }
    assert_same(&read_back(&ns, "svcproxy"), &rs);
}

#[test]
fn a_scaled_table_reads_back_and_updates() {
    // Enough services that element lists wrap and chains are listed in kernel order.
    let mut state = scale_state(300, 3);
    let cfg = RenderConfig::default();
    let a = render(&intent_of(&state), &cfg);
    let ns = Netns::new();
    ns.nft_f(&full_transaction(&a).text).unwrap();
    assert_same(&read_back(&ns, "svcproxy"), &a);
    toggle_first_endpoint(&mut state, 7);
    let b = render(&intent_of(&state), &cfg);
    ns.nft_f(&partial_transaction(&a, &b).unwrap().text).unwrap();
    assert_same(&read_back(&ns, "svcproxy"), &b);
}

#[test]
fn feature_probe_passes_and_leaves_nothing() {
    for family in [svcproxy_model::IpFamily::V4, svcproxy_model::IpFamily::V6] {
        let ns = Netns::new();
        let probe = svcproxy_nftables::probe_transaction(family);
        ns.nft_f(&probe).unwrap_or_else(|e| panic!("{e}\n{probe}"));
        assert_eq!(ns.nft(&["list", "ruleset"]), "");
        // A feature the kernel lacks shows as a refused line; simulate one with an unknown expression.
        let broken = probe.replace("numgen random mod 2 0", "numgen random mod 0 0");
        assert!(ns.nft_f(&broken).is_err());
    }
}

#[test]
fn deferred_deletions_apply_in_two_steps() {
    let cfg = flow_config(svcproxy_nftables::dispatch::DEFAULT_LAYOUT);
    let a = render(&intent_of(&changed_state()), &cfg);
    let b = render(&intent_of(&flow_state()), &cfg);
    let ns = Netns::new();
    ns.nft_f(&full_transaction(&a).text).unwrap();
    let (now, later) = partial_transaction(&a, &b).unwrap().defer_deletions();
    let later = later.expect("the change removes chains and sets");
    assert!(!now.text.contains("delete chain") && !now.text.contains("delete set"));
    ns.nft_f(&now.text).unwrap();
    // In between, the removed chains exist but are empty and unreferenced.
    let mid = read_back(&ns, "svcproxy");
    for name in &later.deleted_chains {
        assert!(mid.chains[name].rules.is_empty(), "{name}");
    }
    ns.nft_f(&later.text).unwrap();
    assert_same(&read_back(&ns, "svcproxy"), &b);
}

#[test]
fn upstream_tables_are_removed_on_takeover_and_ours_on_cleanup() {
    let listing = std::fs::read_to_string(format!(
        "{}/tests/data/upstream-v1.31.14-nftables/all-in-one.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let ns = Netns::new();
    // nft reads its own listing format back.
    ns.nft_f(&listing).unwrap();
    let rs = render(
        &intent_of(&flow_state()),
        &flow_config(svcproxy_nftables::dispatch::DEFAULT_LAYOUT),
    );
    ns.nft_f(&full_transaction(&rs).text).unwrap();
    let both = parse_listing(&ns.nft(&["list", "ruleset"])).unwrap();
    assert_eq!(both.tables.len(), 3);
    for family in [Family::Ip, Family::Ip6] {
        ns.nft_f(&svcproxy_nftables::delete_table_transaction(family, "kube-proxy"))
            .unwrap();
    }
    assert_same(&read_back(&ns, "svcproxy"), &rs);
    for _ in 0..2 {
        // Whether or not it exists.
        ns.nft_f(&svcproxy_nftables::delete_table_transaction(
            Family::Ip,
            "svcproxy",
        ))
        .unwrap();
    }
    assert_eq!(ns.nft(&["list", "ruleset"]), "");
}

#[test]
fn drift_is_found_by_diffing_the_read_back_and_repaired_by_the_diff() {
    let rs = render(
        &intent_of(&flow_state()),
        &flow_config(svcproxy_nftables::dispatch::DEFAULT_LAYOUT),
    );
    let ns = Netns::new();
    ns.nft_f(&full_transaction(&rs).text).unwrap();
    assert!(
        partial_transaction(&read_back(&ns, "svcproxy"), &rs)
            .unwrap()
            .is_empty()
    );
    // Someone edits our table: an element and a chain's rules go missing, a stray chain appears.
    ns.nft_f(
        "delete element ip svcproxy service-ips { 10.96.1.1 . tcp . 80 }\n\
         flush chain ip svcproxy service-flow/lb/tcp/http\n\
         add chain ip svcproxy stray\n",
    )
    .unwrap();
    let repair = partial_transaction(&read_back(&ns, "svcproxy"), &rs).unwrap();
    assert_eq!(
        repair.services.iter().collect::<Vec<_>>(),
        ["flow/lb", "flow/web"]
    );
    ns.nft_f(&repair.text).unwrap();
    assert_same(&read_back(&ns, "svcproxy"), &rs);
}
