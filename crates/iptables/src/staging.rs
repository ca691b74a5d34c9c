//! Turning a set of chain writes and deletions into one or more `iptables-restore --noflush` transactions.
//!
//! Why more than one: with `--noflush`, iptables-nft's cost grows with the square of the number of chains a
//! single transaction declares (measured on iptables 1.8.9: 5,000 chains 0.27 s, 20,000 chains 2.2 s, 55,000
//! chains — 5,000 services × 10 endpoints — 29 s; the same rules without `--noflush` load in 3.4 s, and 5,000
//! more chains on top of 20,000 already in the kernel take 0.15 s). The cost depends on the transaction, not
//! on what the kernel holds, so bounded transactions make a cold sync linear.
//!
//! How chains are grouped matters as much: a transaction whose rules jump to many chains written by *earlier*
//! transactions is slow again (4,000 service chains jumping to 40,000 endpoint chains already in the kernel:
//! 31 s), while the same chains written service by service — each service port's endpoint, service, external
//! and firewall chains together — load 5,000 services × 10 endpoints in 5.6 s in total.
//!
//! Why that stays safe: each transaction is atomic, and each carries whole service ports, whose chains only
//! jump to each other and to KUBE-MARK-MASQ (written first). Then one transaction writes the shared chains
//! (KUBE-SERVICES and friends), the reference clean-up and the jumps from the built-in chains, switching
//! traffic over; stale chains go last, referrers before the chains they refer to. Between two transactions
//! every chain is either the old or the new version of itself, and both are complete.

use std::collections::BTreeSet;

use crate::chain_name::{
    EXT_PREFIX, FW_PREFIX, KUBE_MARK_MASQ, SEP_PREFIX, SVC_PREFIX, SVL_PREFIX, XLB_PREFIX,
    is_owned_service_chain,
};
use crate::gc::GcPlan;
use crate::jumps::JumpRule;
use crate::kernel_view::{Found, KernelView};
use crate::payload::{Payload, Section, merge_join, serialize};
use crate::ruleset::{Chain, Ruleset, TableName, jump_target};

/// Chains per transaction. Well below where the quadratic cost starts to show (≈0.2 s per transaction).
pub const DEFAULT_MAX_CHAINS: usize = 4_000;

/// What the kernel is known to hold, to decide which chains need writing.
pub enum Baseline<'a> {
    /// Nothing is assumed: write every chain (the rebuild rung).
    None,
    /// Our last successful write, held in memory: write chains that differ from it (partial syncs).
    Applied(&'a Ruleset),
    /// What `iptables-save` just printed, read against the ruleset being staged: write chains whose rules
    /// differ from it in substance (full syncs, and restarts, which then rewrite nothing when the rules are
    /// already right).
    Kernel(&'a KernelView),
}

/// The service port a per-service chain belongs to: SVC, SVL, EXT and FW chains share the port's hash; an
/// endpoint chain belongs to the port whose dispatch chain jumps to it.
fn service_groups(next: &Ruleset) -> std::collections::HashMap<&str, &str> {
    let mut group = std::collections::HashMap::new();
    for (name, chain) in &next.nat.chains {
        let Some(hash) = [SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX]
            .iter()
            .find_map(|p| name.strip_prefix(p))
        else {
            continue;
        };
        group.insert(&**name, hash);
        for line in chain.lines() {
            if let Some(target) = jump_target(line)
                && target.starts_with(SEP_PREFIX)
            {
                group.entry(target).or_insert(hash);
            }
        }
    }
    group
}

/// Deletion order: referrers first.
fn delete_stage(name: &str) -> usize {
    if name.starts_with(FW_PREFIX) || name.starts_with(XLB_PREFIX) {
        0
    } else if name.starts_with(EXT_PREFIX) {
        1
    } else if name.starts_with(SVC_PREFIX) || name.starts_with(SVL_PREFIX) {
        2
    } else {
        3
    }
}

/// The transactions that take the kernel from `baseline` to `next`, carrying out `plan` and inserting
/// `jumps`. Empty when nothing needs to change.
pub fn staged_payloads(
    baseline: Baseline<'_>,
    next: &Ruleset,
    plan: &GcPlan,
    jumps: &[JumpRule],
    max_chains: usize,
) -> Vec<Payload> {
    let mut payloads = Vec::new();
    let Ok(()) = stage(baseline, next, plan, jumps, max_chains, |p| {
        payloads.push(p);
        Ok::<(), std::convert::Infallible>(())
    });
    payloads
}

/// [`staged_payloads`], handing each transaction to `apply` as soon as it is serialised, in order, and stopping
/// at the first error `apply` returns. A cold sync's transactions together are as large as the ruleset (31 MB
/// at 5,000 services × 10 endpoints); applied one by one, only one is held at a time.
pub fn stage<E>(
    baseline: Baseline<'_>,
    next: &Ruleset,
    plan: &GcPlan,
    jumps: &[JumpRule],
    max_chains: usize,
    mut apply: impl FnMut(Payload) -> Result<(), E>,
) -> Result<(), E> {
    let max_chains = max_chains.max(1);
    let jump_targets: BTreeSet<&str> = jumps.iter().map(|j| j.target).collect();
    let mut writes: Vec<(TableName, &str, &Chain)> = Vec::new();
    let mut deletes: BTreeSet<&str> = plan
        .delete_chains
        .iter()
        .map(String::as_str)
        .filter(|n| is_owned_service_chain(n) && !next.nat.chains.contains_key(*n))
        .collect();
    for table in TableName::ALL {
        let ours = next.table(table);
        match &baseline {
            Baseline::Applied(prev) => {
                for (name, before, after) in merge_join(&prev.table(table).chains, &ours.chains) {
                    match (before, after) {
                        (_, Some(chain)) if before != Some(chain) || jump_targets.contains(name) => {
                            writes.push((table, name, chain))
                        }
                        (Some(_), None) if is_owned_service_chain(name) => {
                            deletes.insert(name);
                        }
                        _ => {}
                    }
                }
            }
            Baseline::Kernel(kernel) => {
                for (name, chain) in &ours.chains {
                    if kernel.found(table, name) != Found::Same {
                        writes.push((table, &**name, chain));
                    }
                }
            }
            Baseline::None => writes.extend(ours.chains.iter().map(|(n, c)| (table, &**n, c))),
        }
    }

    let total = writes.len() + deletes.len();
    if total <= max_chains {
        let sections = TableName::ALL.map(|table| Section {
            table,
            write: writes
                .iter()
                .filter(|(t, _, _)| *t == table)
                .map(|(_, n, c)| (*n, *c))
                .collect(),
            delete: if table == TableName::Nat {
                deletes.iter().copied().collect()
            } else {
                Vec::new()
            },
            jumps: jumps.iter().filter(|j| j.table == table).collect(),
            delete_rules: plan
                .delete_rules
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, r)| r)
                .collect(),
        });
        let payload = serialize(&sections);
        return if payload.is_empty() {
            Ok(())
        } else {
            apply(payload)
        };
    }

    let nat_only = |write: Vec<(&str, &Chain)>, delete: Vec<&str>| {
        let sections = TableName::ALL.map(|table| Section {
            table,
            write: if table == TableName::Nat {
                write.clone()
            } else {
                Vec::new()
            },
            delete: if table == TableName::Nat {
                delete.clone()
            } else {
                Vec::new()
            },
            jumps: Vec::new(),
            delete_rules: Vec::new(),
        });
        serialize(&sections)
    };
    // Endpoint chains jump to KUBE-MARK-MASQ, which a cold node does not have yet.
    if let Some((name, chain)) = next.nat.chains.get_key_value(KUBE_MARK_MASQ) {
        apply(nat_only(vec![(&**name, chain)], Vec::new()))?;
    }
    let (per_service, shared): (Vec<_>, Vec<_>) = writes
        .iter()
        .partition(|(t, n, _)| *t == TableName::Nat && is_owned_service_chain(n));
    let groups = service_groups(next);
    let mut by_group: std::collections::BTreeMap<&str, Vec<(&str, &Chain)>> =
        std::collections::BTreeMap::new();
    for (_, name, chain) in &per_service {
        by_group
            .entry(groups.get(name).copied().unwrap_or(name))
            .or_default()
            .push((*name, *chain));
    }
    let mut batch: Vec<(&str, &Chain)> = Vec::new();
    for chains in by_group.into_values() {
        if !batch.is_empty() && batch.len() + chains.len() > max_chains {
            apply(nat_only(std::mem::take(&mut batch), Vec::new()))?;
        }
        batch.extend(chains);
    }
    if !batch.is_empty() {
        apply(nat_only(batch, Vec::new()))?;
    }
    let switch = TableName::ALL.map(|table| Section {
        table,
        write: shared
            .iter()
            .filter(|(t, _, _)| *t == table)
            .map(|(_, n, c)| (*n, *c))
            .collect(),
        delete: Vec::new(),
        jumps: jumps.iter().filter(|j| j.table == table).collect(),
        delete_rules: plan
            .delete_rules
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, r)| r)
            .collect(),
    });
    let switch = serialize(&switch);
    if !switch.is_empty() {
        apply(switch)?;
    }
    // Stale chains: a batch's chains are flushed and deleted together, so references inside a batch are fine;
    // references from later stages' chains are gone because those stages went first.
    for stage in 0..4 {
        let chains: Vec<&str> = deletes
            .iter()
            .copied()
            .filter(|n| delete_stage(n) == stage)
            .collect();
        for chunk in chains.chunks(max_chains) {
            apply(nat_only(Vec::new(), chunk.to_vec()))?;
        }
    }
    Ok(())
}
