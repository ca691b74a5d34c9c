//! How the iptables proxier seals its writes and when it trusts a seal, against the recording fake (whose
//! generation moves by one per restored table section, as iptables-nft's does; `seal_e2e` checks that on a
//! real kernel).

#[macro_use]
mod common;

use std::collections::BTreeMap;

use svcproxy::exec::iptables::{ExecError, IptablesCommands, Recorded, RecordingIptables};
use svcproxy::node_addresses::{FixedAddresses, NodePortSpec};
use svcproxy::sync::commit_ledger::CommitLedger;
use svcproxy::sync::iptables_proxier::{DetectLocal, IptablesProxier, ProxierOptions};
use svcproxy::sync::proxier::{Proxier, SyncMode, VerifyScope};
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
            bind_ip: None,
        },
    )
    .with_generation(Box::new(fake.generation.clone()))
}

/// One family's proxier of a dual-stack node: both families' fakes move one generation, the proxiers share
/// `ledger` and read each other's seals.
fn family_proxier(
    fake: &RecordingIptables,
    family: IpFamily,
    sibling: &RecordingIptables,
    ledger: &CommitLedger,
) -> IptablesProxier {
    let address = match family {
        IpFamily::V4 => "10.0.0.10",
        IpFamily::V6 => "fd00::10",
    };
    IptablesProxier::new(
        Box::new(fake.clone()),
        Box::new(FixedAddresses(vec![address.parse().unwrap()])),
        IntentConfig {
            family,
            node_name: "node-a".into(),
        },
        ProxierOptions {
            base: RenderConfig {
                family,
                ..RenderConfig::default()
            },
            detect_local: DetectLocal::None,
            nodeport_addresses: NodePortSpec::All,
            bind_ip: None,
        },
    )
    .with_generation(Box::new(fake.generation.clone()))
    .with_commit_ledger(ledger.clone())
    .with_sibling_seals(Box::new(sibling.clone()))
}

/// The two fakes of a dual-stack node.
fn dual_stack() -> (RecordingIptables, RecordingIptables) {
    let v4 = RecordingIptables::default();
    let v6 = RecordingIptables::sharing_generation(&v4.generation);
    (v4, v6)
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

/// Listings of nat `KUBE-SERVICES`, which only the canary asks for.
fn canary_listings(fake: &RecordingIptables) -> usize {
    fake.calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| matches!(c, Recorded::ListChain(t, n) if t == "nat" && n == "KUBE-SERVICES"))
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

#[test]
fn dual_stack_families_keep_custody_across_each_others_writes() {
    let (v4, v6) = dual_stack();
    let ledger = CommitLedger::default();
    let mut p4 = family_proxier(&v4, IpFamily::V4, &v6, &ledger);
    let mut p6 = family_proxier(&v6, IpFamily::V6, &v4, &ledger);
    let everything = IntentChanges::everything();
    p4.sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    p6.sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    assert!(last_seal(&v6).digest.is_some());
    // The IPv6 write moved the generation past the IPv4 seal, but it was ours: the next IPv4 write still
    // knows what its tables hold, and its seal vouches for the IPv6 commits in between.
    let v4_before = last_seal(&v4);
    p4.sync(&state(&["10.244.0.6"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    let v4_after = last_seal(&v4);
    assert!(
        v4_after.digest.is_some(),
        "custody kept across the other family's write"
    );
    assert!(v4_after.ours_after(v4_before.generation));
    assert_eq!(v4_after.generation, now(&v4));

    // Restarted: each family proves its rules from the seals, reading and writing nothing, though only one
    // of them wrote last.
    let (saves_before, restores_before) =
        (saves(&v4) + saves(&v6), v4.restores().len() + v6.restores().len());
    let ledger = CommitLedger::default();
    let mut q4 = family_proxier(&v4, IpFamily::V4, &v6, &ledger);
    let mut q6 = family_proxier(&v6, IpFamily::V6, &v4, &ledger);
    for q in [&mut q4, &mut q6] {
        let report = q
            .sync(&state(&["10.244.0.6"]), &everything, SyncMode::Full)
            .unwrap();
        assert_eq!(report.payload_lines, 0);
    }
    assert_eq!(saves(&v4) + saves(&v6), saves_before, "no dump");
    assert_eq!(
        v4.restores().len() + v6.restores().len(),
        restores_before,
        "no write"
    );

    // After the restart the IPv6 family writes, and the IPv4 family's next write still carries a digest.
    q6.sync(
        &state(&["10.244.0.6"]),
        &IntentChanges::everything(),
        SyncMode::Partial,
    )
    .unwrap();
    q4.sync(&state(&["10.244.0.7"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    assert!(last_seal(&v4).digest.is_some());
}

#[test]
fn dual_stack_a_foreign_commit_between_the_families_writes_makes_the_older_family_read() {
    let (v4, v6) = dual_stack();
    let ledger = CommitLedger::default();
    let everything = IntentChanges::everything();
    family_proxier(&v4, IpFamily::V4, &v6, &ledger)
        .sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    // Another program commits after the IPv4 write, then the IPv6 family writes.
    v4.generation.advance(1);
    family_proxier(&v6, IpFamily::V6, &v4, &ledger)
        .sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    assert!(
        !last_seal(&v6).ours_after(last_seal(&v4).generation),
        "the IPv6 seal does not vouch for the foreign commit"
    );

    let ledger = CommitLedger::default();
    let (saves4, saves6) = (saves(&v4), saves(&v6));
    family_proxier(&v4, IpFamily::V4, &v6, &ledger)
        .sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    assert_eq!(
        saves(&v4),
        saves4 + 1,
        "IPv4 cannot know what the foreign commit did: it reads"
    );
    // The IPv4 restart then wrote (the fake's dump is empty), and nothing else did since the IPv6 seal: its
    // seal vouches for every commit after that one, so the IPv6 restart is proven without reading.
    family_proxier(&v6, IpFamily::V6, &v4, &ledger)
        .sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    assert_eq!(saves(&v6), saves6);
    // Whereas a foreign commit after the IPv4 write leaves it nothing to vouch for.
    v4.generation.advance(1);
    let ledger = CommitLedger::default();
    family_proxier(&v6, IpFamily::V6, &v4, &ledger)
        .sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    assert_eq!(saves(&v6), saves6 + 1);
}

#[test]
fn dual_stack_a_restore_that_fails_part_way_is_vouched_for_by_no_seal() {
    let (v4, v6) = dual_stack();
    let ledger = CommitLedger::default();
    let everything = IntentChanges::everything();
    let mut p4 = family_proxier(&v4, IpFamily::V4, &v6, &ledger);
    let mut p6 = family_proxier(&v6, IpFamily::V6, &v4, &ledger);
    p4.sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    p6.sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();

    // An IPv4 restore fails after its first table committed (the fake refuses the restore; the test moves
    // the generation for the section that got through).
    v4.fail_restores.lock().unwrap().push(ExecError::Failed {
        program: "iptables-restore".into(),
        status: "exit status: 1".into(),
        stderr: "iptables-restore: line 9 failed".into(),
    });
    assert!(
        p4.sync(&state(&["10.244.0.6"]), &web_changed(), SyncMode::Partial)
            .is_err()
    );
    v4.generation.advance(1);
    let half_done = now(&v4);

    // The IPv6 family writes next: its seal must not vouch for the half-done IPv4 commit.
    p6.sync(&state(&["10.244.0.6"]), &everything, SyncMode::Full)
        .unwrap();
    assert!(!last_seal(&v6).ours_after(half_done.after(u32::MAX)));

    // Restarted, the IPv4 family cannot trust its seal: it reads.
    let saves4 = saves(&v4);
    let ledger = CommitLedger::default();
    family_proxier(&v4, IpFamily::V4, &v6, &ledger)
        .sync(&state(&["10.244.0.6"]), &everything, SyncMode::Full)
        .unwrap();
    assert_eq!(saves(&v4), saves4 + 1);
}

/// What the fake "kernel" holds after the restores so far (of which only the first may have written
/// anything but seals): every line written, with the seal each table holds now.
fn dump_of_writes(fake: &RecordingIptables) -> String {
    dump_of(fake, fake)
}

/// The dump of a kernel holding what a cold sync of `cluster` writes, with `fake`'s seals.
fn dump_of_cluster(fake: &RecordingIptables, cluster: &ClusterState) -> String {
    let cold = RecordingIptables::default();
    proxier(&cold)
        .sync(cluster, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    dump_of(&cold, fake)
}

/// The dump of a kernel holding what `writes` restored (with no chain ever rewritten), and `seals`' seals.
fn dump_of(writes: &RecordingIptables, seals: &RecordingIptables) -> String {
    let fake = seals;
    let mut written: String = writes
        .restores()
        .concat()
        .lines()
        .filter(|l| !l.contains("SVCPROXY-SEAL"))
        .map(|l| format!("{l}\n"))
        .collect();
    for table in ["filter", "nat"] {
        if let Some(listing) = fake.list_chain(table, "SVCPROXY-SEAL").unwrap() {
            let rule = listing.lines().find(|l| l.starts_with("-A ")).unwrap();
            written.push_str(&format!("*{table}\n:SVCPROXY-SEAL - [0:0]\n{rule}\nCOMMIT\n"));
        }
    }
    saved_form(&written)
}

#[test]
fn a_read_back_that_finds_the_kernel_right_regains_custody_and_seals_it() {
    let fake = RecordingIptables::default();
    let one = state(&["10.244.0.5"]);
    let mut p = proxier(&fake);
    p.sync(&one, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    // Another program commits (to a table of its own, say): a restart could not trust the seal now.
    fake.generation.advance(1);

    // The periodic read-back finds the kernel holding exactly our rules: custody is back, and sealed.
    *fake.save_output.lock().unwrap() = dump_of_writes(&fake);
    let restores = fake.restores().len();
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(fake.restores().len(), restores + 1, "a seal alone");
    let seal = last_seal(&fake);
    assert!(seal.digest.is_some());
    assert_eq!(seal.generation, now(&fake));
    // Sealed already: the next read-back writes nothing.
    *fake.save_output.lock().unwrap() = dump_of_writes(&fake);
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(fake.restores().len(), restores + 1);

    // A restart trusts it.
    let saves_before = saves(&fake);
    proxier(&fake)
        .sync(&one, &IntentChanges::everything(), SyncMode::Full)
        .unwrap();
    assert_eq!(saves(&fake), saves_before, "no dump");

    // And the next change is sealed on top of the known state.
    p.sync(&state(&["10.244.0.6"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    assert!(last_seal(&fake).digest.is_some());

    // A read-back that finds something wrong regains nothing.
    fake.generation.advance(1);
    *fake.save_output.lock().unwrap() = String::new();
    let restores = fake.restores().len();
    assert!(!p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(fake.restores().len(), restores, "no seal over a wrong kernel");
}

#[test]
fn a_full_sync_that_ended_without_custody_regains_it_at_the_next_whole_read_back_that_is_not_disturbed() {
    let fake = RecordingIptables::default();
    let mut p = proxier(&fake);
    // One section commits nothing: the restore's count is off (as when the other family's restores
    // overlap), so the sync ends without custody.
    *fake.empty_sections.lock().unwrap() = 1;
    p.sync(
        &state(&["10.244.0.5"]),
        &IntentChanges::everything(),
        SyncMode::Full,
    )
    .unwrap();
    assert_eq!(last_seal(&fake).digest, None);
    // The read-back after a full sync reads everything; someone commits while it reads, so it cannot
    // vouch for the kernel.
    *fake.save_output.lock().unwrap() = dump_of_writes(&fake);
    *fake.commits_during_saves.lock().unwrap() = 1;
    let saves_before = saves(&fake);
    assert!(p.verify(VerifyScope::LastSync).unwrap().is_empty());
    assert_eq!(saves(&fake), saves_before + 1, "a whole read after a full sync");
    assert_eq!(last_seal(&fake).digest, None);
    // A read-back after a partial sync lists what it wrote, as before.
    p.sync(&state(&["10.244.0.6"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    assert!(p.verify(VerifyScope::LastSync).is_ok());
    assert_eq!(saves(&fake), saves_before + 1);
    p.sync(&state(&["10.244.0.5"]), &web_changed(), SyncMode::Partial)
        .unwrap();
    assert!(p.verify(VerifyScope::LastSync).is_ok());
    // The next periodic read-back finds the kernel right and nobody writing: custody is back.
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert!(last_seal(&fake).digest.is_some());
    assert_eq!(last_seal(&fake).generation, now(&fake));
}

/// A proxier on `fake` after a cold sync and the read-back after it, which read the kernel whole and found it
/// right; and how many dumps the fake has given.
fn verified_after_a_cold_sync(fake: &RecordingIptables) -> (IptablesProxier, usize) {
    let mut p = proxier(fake);
    p.sync(
        &state(&["10.244.0.5"]),
        &IntentChanges::everything(),
        SyncMode::Full,
    )
    .unwrap();
    *fake.save_output.lock().unwrap() = dump_of_writes(fake);
    assert!(p.verify(VerifyScope::LastSync).unwrap().is_empty());
    (p, saves(fake))
}

#[test]
fn a_periodic_read_back_reads_nothing_while_nothing_has_committed_since_the_kernel_was_verified() {
    let fake = RecordingIptables::default();
    let (mut p, reads) = verified_after_a_cold_sync(&fake);
    // Nothing has committed since: the periodic read-backs and the canary have nothing to read.
    let listed = canary_listings(&fake);
    for _ in 0..3 {
        assert!(p.verify(VerifyScope::All).unwrap().is_empty());
        assert!(p.canary().unwrap().is_empty());
    }
    assert_eq!(saves(&fake), reads, "no dump while the generation stays");
    assert_eq!(canary_listings(&fake), listed, "no listing either");

    // Another program commits: the canary looks again, and the next periodic read-back reads the kernel
    // whole and finds what changed.
    fake.generation.advance(1);
    assert!(
        !p.canary().unwrap().is_empty(),
        "this fake lists no chain of ours"
    );
    assert_eq!(canary_listings(&fake), listed + 1);
    *fake.save_output.lock().unwrap() = String::new();
    assert!(!p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&fake), reads + 1);
    // Nothing was proven right: the next one reads again.
    assert!(!p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&fake), reads + 2);
    // Once a read finds the kernel right, reading stops again.
    *fake.save_output.lock().unwrap() = dump_of_writes(&fake);
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&fake), reads + 3);
}

#[test]
fn our_own_write_is_read_again_unless_the_read_back_after_its_sync_found_it_right() {
    let fake = RecordingIptables::default();
    let (mut p, reads) = verified_after_a_cold_sync(&fake);
    // A partial sync whose own read-back does not find what it wrote (this fake lists no chain but the seal):
    // the kernel is no longer known right, so the periodic read-back reads it whole.
    let six = state(&["10.244.0.6"]);
    p.sync(&six, &web_changed(), SyncMode::Partial).unwrap();
    assert!(!p.verify(VerifyScope::LastSync).unwrap().is_empty());
    assert_eq!(saves(&fake), reads, "the chains it wrote were listed one by one");
    *fake.save_output.lock().unwrap() = dump_of_cluster(&fake, &six);
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&fake), reads + 1);
    // A partial sync whose read-back never ran: still unchecked, still read whole.
    let seven = state(&["10.244.0.7"]);
    p.sync(&seven, &web_changed(), SyncMode::Partial).unwrap();
    *fake.save_output.lock().unwrap() = dump_of_cluster(&fake, &seven);
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&fake), reads + 2);
    assert!(p.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&fake), reads + 2);
}

#[test]
fn dual_stack_the_other_familys_writes_do_not_make_a_family_read_its_tables_again() {
    let (v4, v6) = dual_stack();
    let ledger = CommitLedger::default();
    let mut p4 = family_proxier(&v4, IpFamily::V4, &v6, &ledger);
    let mut p6 = family_proxier(&v6, IpFamily::V6, &v4, &ledger);
    let everything = IntentChanges::everything();
    p4.sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    *v4.save_output.lock().unwrap() = dump_of_writes(&v4);
    assert!(p4.verify(VerifyScope::LastSync).unwrap().is_empty());
    let reads = saves(&v4);
    // The IPv6 family writes its own tables: the IPv4 tables are as they were read.
    p6.sync(&state(&["10.244.0.5"]), &everything, SyncMode::Full)
        .unwrap();
    assert!(p4.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&v4), reads);
    // A foreign commit is another matter.
    v4.generation.advance(1);
    assert!(p4.verify(VerifyScope::All).unwrap().is_empty());
    assert_eq!(saves(&v4), reads + 1);
}
