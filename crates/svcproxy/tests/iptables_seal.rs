//! How the iptables proxier seals its writes and when it trusts a seal, against the recording fake (whose
//! generation moves by one per restored table section, as iptables-nft's does; `seal_e2e` checks that on a
//! real kernel).

#[macro_use]
mod common;

use std::collections::BTreeMap;

use svcproxy::exec::iptables::{Recorded, RecordingIptables};
use svcproxy::node_addresses::{FixedAddresses, NodePortSpec};
use svcproxy::sync::iptables_proxier::{DetectLocal, IptablesProxier, ProxierOptions};
use svcproxy::sync::proxier::{Proxier, SyncMode};
use svcproxy_iptables::config::RenderConfig;
use svcproxy_iptables::seal::{Generation, Seal};
use svcproxy_model::{ClusterState, IntentChanges, IntentConfig, IpFamily, ObjectName};

fn state(endpoints: &[&str]) -> ClusterState {
    common::web_cluster(endpoints)
}

/// A proxier on `fake` (a fresh one plays a restarted process), sealing with the fake's generation.
fn proxier(fake: &RecordingIptables) -> IptablesProxier {
    IptablesProxier::new(
        Box::new(fake.clone()),
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
    .with_generation(Box::new(fake.generation.clone()))
}

fn web_changed() -> IntentChanges {
    let mut c = IntentChanges::default();
    c.service(&ObjectName::new("ns", "web"));
    c
}

fn saves(fake: &RecordingIptables) -> usize {
    fake.calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| matches!(c, Recorded::Save(_)))
        .count()
}

fn last_seal(fake: &RecordingIptables) -> Seal {
    Seal::from_listing(fake.restores().last().expect("a restore")).expect("a seal in it")
}

fn now(fake: &RecordingIptables) -> Generation {
    fake.generation.now()
}

#[test]
fn a_restart_onto_our_last_write_reads_and_writes_nothing() {
    let fake = RecordingIptables::default();
    let two = state(&["10.244.0.5", "10.244.0.6"]);
    proxier(&fake)
        .sync(&two, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    let cold = last_seal(&fake);
    assert_eq!(
        cold.generation,
        now(&fake),
        "the seal names where the write ended"
    );
    assert!(
        cold.digest.is_some(),
        "a full read at a still generation, then our writes alone"
    );
    assert_eq!(saves(&fake), 1);

    // Restarted onto the same cluster: one chain listed, nothing read whole, nothing written.
    let restores = fake.restores().len();
    let mut restarted = proxier(&fake);
    let report = restarted
        .sync(&two, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    assert_eq!(report.payload_lines, 0);
    assert_eq!(saves(&fake), 1, "no dump");
    assert_eq!(fake.restores().len(), restores, "no write");

    // The restarted proxier carries on: its partial syncs are sealed on top of the proven state.
    restarted
        .sync(
            &state(&["10.244.0.5", "10.244.0.7"]),
            &web_changed(),
            SyncMode::Partial,
        )
        .unwrap();
    let partial = last_seal(&fake);
    assert!(partial.digest.is_some() && partial.digest != cold.digest);
    assert_eq!(partial.generation, now(&fake));

    // A restart onto a cluster that changed while we were down cannot use the seal: it reads the kernel.
    proxier(&fake)
        .sync(&two, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    assert_eq!(saves(&fake), 2);
}

#[test]
fn another_writer_voids_the_seal_until_a_full_read() {
    let fake = RecordingIptables::default();
    let mut p = proxier(&fake);
    p.sync(
        &state(&["10.244.0.5"]),
        &IntentChanges::everything(),
        SyncMode::Full,
    )
    .unwrap();
    // Another program commits between our syncs: our partial sync cannot know what the kernel holds, so its
    // seal carries no digest.
    fake.generation.advance(1);
    p.sync(&state(&["10.244.0.6"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    assert_eq!(last_seal(&fake).digest, None);
    // Nor does the next one, though nobody else wrote in between: custody is not regained by writing.
    p.sync(&state(&["10.244.0.7"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    assert_eq!(last_seal(&fake).digest, None);
    // A restart reads the kernel whole.
    let before = saves(&fake);
    let mut restarted = proxier(&fake);
    restarted
        .sync(
            &state(&["10.244.0.7"]),
            &IntentChanges::everything(),
            SyncMode::Full,
        )
        .unwrap();
    assert_eq!(saves(&fake), before + 1);
    // The read happened at a still generation; its sync wrote everything anew (the fake's dump is empty)
    // and sealed it.
    let seal = last_seal(&fake);
    assert!(seal.digest.is_some());
    assert_eq!(seal.generation, now(&fake));
}

#[test]
fn a_seal_naming_a_generation_still_to_come_is_voided_at_once() {
    let fake = RecordingIptables::default();
    let mut p = proxier(&fake);
    p.sync(
        &state(&["10.244.0.5"]),
        &IntentChanges::everything(),
        SyncMode::Full,
    )
    .unwrap();
    // The next restore's one section commits nothing: its seal names a generation the kernel has not
    // reached, which the next foreign commit would reach and so "prove". The writer replaces it at once.
    let before = now(&fake);
    *fake.empty_sections.lock().unwrap() = 1;
    p.sync(&state(&["10.244.0.6"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    let seal = last_seal(&fake);
    assert_eq!(seal.digest, None, "{seal:?}");
    assert_eq!(seal.generation, now(&fake));
    assert_eq!(now(&fake), before.after(1), "only the void seal moved it");
    // Another writer's commit now proves nothing: a restart reads the kernel.
    fake.generation.advance(1);
    let saves_before = saves(&fake);
    proxier(&fake)
        .sync(
            &state(&["10.244.0.6"]),
            &IntentChanges::everything(),
            SyncMode::Full,
        )
        .unwrap();
    assert_eq!(saves(&fake), saves_before + 1);
}

#[test]
fn a_kernel_already_right_gets_a_seal_alone() {
    let fake = RecordingIptables::default();
    let one = state(&["10.244.0.5"]);
    proxier(&fake)
        .sync(&one, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    // Hand the fake a dump holding exactly what was written, then void the seal: a restart reads the kernel,
    // finds every chain right, and writes only a seal.
    let written = fake.restores().concat();
    let dump: String = written
        .lines()
        .filter(|l| !l.contains("SVCPROXY-SEAL"))
        .map(|l| format!("{l}\n"))
        .collect();
    *fake.save_output.lock().unwrap() = saved_form(&dump);
    fake.generation.advance(1);
    let restores = fake.restores().len();
    proxier(&fake)
        .sync(&one, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    let all = fake.restores();
    assert_eq!(all.len(), restores + 1, "one write");
    let seal_only = all.last().unwrap();
    assert!(
        seal_only.starts_with("*filter\n:SVCPROXY-SEAL - [0:0]\n") && seal_only.lines().count() == 4,
        "{seal_only}"
    );
    assert_eq!(last_seal(&fake).generation, now(&fake));
    assert!(last_seal(&fake).digest.is_some());
}

/// A restore payload of ours as `iptables-save` would print the state it leaves (every table once, chains
/// declared before rules, the built-in chains with their policies, insertions as appends).
fn saved_form(payload: &str) -> String {
    let mut tables: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    let mut table = String::new();
    for line in payload.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
            tables.entry(table.clone()).or_default();
        } else if line.starts_with(':') {
            let (chains, _) = tables.get_mut(&table).unwrap();
            if !chains.contains(&line.to_string()) {
                chains.push(line.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-I ") {
            tables.get_mut(&table).unwrap().1.push(format!("-A {rule}"));
        } else if line.starts_with("-A ") {
            tables.get_mut(&table).unwrap().1.push(line.to_string());
        }
    }
    let mut out = String::new();
    for (name, (chains, rules)) in tables {
        out.push_str(&format!("*{name}\n"));
        let builtin: &[&str] = if name == "nat" {
            &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
        } else {
            &["INPUT", "FORWARD", "OUTPUT"]
        };
        for b in builtin {
            out.push_str(&format!(":{b} ACCEPT [0:0]\n"));
        }
        for c in chains {
            out.push_str(&format!("{c}\n"));
        }
        for r in rules {
            out.push_str(&format!("{r}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}
