//! Invariants over random clusters: a partial transaction turns the previous table into the next one, a
//! chunked cold sync builds the full table through valid intermediate tables, output does not depend on the
//! order objects arrive in, and every endpoint appears once per policy chain.

mod common;

use std::collections::BTreeSet;

use common::arbitrary::{build, cluster};
use common::flow::{LAYOUTS, flow_config};
use common::*;
use proptest::prelude::*;
use svcproxy_nftables::dispatch::DEFAULT_LAYOUT;
use svcproxy_nftables::simulate::Kernel;
use svcproxy_nftables::slots;
use svcproxy_nftables::{
    Family, Ruleset, TransactionKind, chunked_full, full_transaction, partial_transaction, render,
    render_table, render_table_after,
};

fn rendered(specs: &[common::arbitrary::SvcSpec], layout_index: usize) -> Ruleset {
    render(
        &intent_of(&build(specs, false)),
        &flow_config(LAYOUTS[layout_index]),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn partial_applied_to_prev_yields_next(a in cluster(), b in cluster(), layout in 0usize..5) {
        let prev = rendered(&a, layout);
        let next = rendered(&b, layout);
        prev.check_references().unwrap();
        next.check_references().unwrap();
        let tx = partial_transaction(&prev, &next).unwrap();
        let mut kernel = Kernel::holding(&prev);
        kernel.apply(&tx.text).map_err(|e| TestCaseError::fail(format!("{e}\n{}", tx.text)))?;
        prop_assert_eq!(kernel.table(Family::Ip, "svcproxy").unwrap(), &next);
        prop_assert_eq!(tx.text.is_empty(), prev == next);
        // From nothing at all, the full transaction builds the same table.
        let mut empty = Kernel::default();
        empty.apply(&full_transaction(&next).text).unwrap();
        prop_assert_eq!(empty.table(Family::Ip, "svcproxy").unwrap(), &next);
    }

    #[test]
    fn per_service_updates_keep_the_table_a_full_render_would_build(
        steps in prop::collection::vec(cluster(), 2..5),
        layout in 0usize..6,
    ) {
        let cfg = flow_config(LAYOUTS[layout]);
        let intents: Vec<_> = steps.iter().map(|s| intent_of(&build(s, false))).collect();
        let mut table = render_table(&intents[0], &cfg);
        prop_assert_eq!(&table.ruleset, &render(&intents[0], &cfg));
        let mut kernel = Kernel::holding(&table.ruleset);
        for pair in intents.windows(2) {
            let (from, to) = (&pair[0], &pair[1]);
            // Endpoint-map slots are kept across renders, so the full render to compare with is given the
            // slots the table held.
            let prior = table.slots().clone();
            match table.plan(from, to, &cfg) {
                Some(update) => {
                    let tx = partial_transaction(&update.before, &update.after).unwrap();
                    kernel.apply(&tx.text).map_err(|e| TestCaseError::fail(format!("{e}\n{}", tx.text)))?;
                    table.apply(update);
                }
                // A shared element whose value depends on an unchanged Service: the caller renders it all.
                None => {
                    let next = render_table_after(to, &cfg, &prior);
                    let tx = partial_transaction(&table.ruleset, &next.ruleset).unwrap();
                    kernel.apply(&tx.text).unwrap();
                    table = next;
                }
            }
            prop_assert_eq!(&table, &render_table_after(to, &cfg, &prior));
            prop_assert_eq!(kernel.table(Family::Ip, "svcproxy").unwrap(), &table.ruleset);
        }
    }

    #[test]
    fn chunked_cold_sync_builds_the_table_through_valid_states(a in cluster(), b in cluster(), max in 1usize..4) {
        let old = rendered(&a, 0);
        let next = rendered(&b, 0);
        let chunks = chunked_full(&next, max).unwrap();
        // The table may exist with other content, or not at all.
        for mut kernel in [Kernel::holding(&old), Kernel::default()] {
            for (i, c) in chunks.iter().enumerate() {
                prop_assert_eq!(c.kind, TransactionKind::Chunk { index: i, count: chunks.len() });
                prop_assert!(c.services.len() <= max, "{} services in one chunk", c.services.len());
                kernel.apply(&c.text).map_err(|e| TestCaseError::fail(format!("chunk {i}: {e}\n{}", c.text)))?;
                kernel.table(Family::Ip, "svcproxy").unwrap().check_references().unwrap();
            }
            prop_assert_eq!(kernel.table(Family::Ip, "svcproxy").unwrap(), &next);
        }
    }

    #[test]
    fn output_does_not_depend_on_arrival_order(a in cluster()) {
        for layout in LAYOUTS {
            let cfg = flow_config(layout);
            let one = full_transaction(&render(&intent_of(&build(&a, false)), &cfg));
            let two = full_transaction(&render(&intent_of(&build(&a, true)), &cfg));
            prop_assert_eq!(one, two);
        }
    }

    #[test]
    fn every_endpoint_once_per_policy_chain(a in cluster()) {
        let intent = intent_of(&build(&a, false));
        let rs = render(&intent, &flow_config(DEFAULT_LAYOUT));
        for (name, chain) in &rs.chains {
            if !(name.starts_with("service-") || name.starts_with("local-")) || name.ends_with("-check") {
                continue;
            }
            // Dispatch rules are the numgen cascade plus its unconditional last rule, or one pick from the
            // chain's slot of an endpoint map.
            let mut targets: Vec<&str> = chain
                .rules
                .iter()
                .filter(|r| !r.contains(" saddr @") && !r.contains("jump mark-for-masquerade"))
                .filter(|r| !r.contains(" map @endpoints-"))
                .filter_map(|r| r.split(" dnat to ").nth(1).or_else(|| r.split("goto ").nth(1)))
                .collect();
            for rule in chain.rules.iter().filter(|r| r.contains(" map @endpoints-")) {
                let slot = slots::slot_of_rule(rule);
                prop_assert!(slot.is_some(), "{}: {}", name, rule);
                let (map, base) = slots::placement(slot.unwrap());
                let n: u32 = rule.split(" mod ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
                for key in base..base + n {
                    let element = rs.sets[&map].elements.get(key.to_string().as_str());
                    prop_assert!(element.is_some(), "{}: key {} missing from {}", name, key, map);
                    targets.push(element.unwrap().value.as_deref().unwrap());
                }
            }
            let unique: BTreeSet<&&str> = targets.iter().collect();
            prop_assert_eq!(unique.len(), targets.len(), "{}: {:?}", name, chain.rules);
            prop_assert!(!targets.is_empty(), "{} dispatches nowhere", name);
        }
    }
}
