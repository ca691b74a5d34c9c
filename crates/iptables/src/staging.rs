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
use std::sync::Arc;

use crate::chain_name::{
    EXT_PREFIX, FW_PREFIX, KUBE_MARK_MASQ, SEP_PREFIX, SVC_PREFIX, SVL_PREFIX, XLB_PREFIX,
    is_owned_service_chain,
};
use crate::gc::GcPlan;
use crate::jumps::JumpRule;
use crate::kernel_view::{Found, KernelView};
use crate::payload::{Payload, Section, merge_join, serialize};
use crate::render::Replaced;
use crate::ruleset::{Chain, ChainName, Ruleset, TableName, jump_target};
use crate::service_rules::ServicePortRules;

/// Chains per transaction. The quadratic part is already felt at a few thousand: a cold sync of 5,000
/// services × 10 endpoints (55,000 chains) took 7.9–9.7 s in transactions of up to 4,000 chains, 5.1–5.8 s
/// of up to 1,000 and 5.4 s of up to 2,000, on the same VM. Each transaction also pays a fixed cost
/// (`iptables-nft-restore` starting and fetching the table's chain list, 30–50 ms next to 55,000 chains), so
/// much smaller ones lose again: 500 took 6.6 s.
pub const DEFAULT_MAX_CHAINS: usize = 1_000;

/// Chains per transaction with iptables-legacy, which has no such quadratic part but rewrites the whole table
/// on every transaction (it reads the table from the kernel, edits it, and hands it back whole): the more
/// transactions, the slower. Restoring 5,000 services × 10 endpoints with `iptables-legacy-restore
/// --noflush` took 2.6 s in one transaction, 3.9 s in transactions of 16,500 chains, 7.8 s of 4,400 and 22.9 s
/// of 1,100. Bounded still, so that the payload of one transaction, held in memory while it is written, stays
/// about 5 MB (some 1,450 services × 10 endpoints).
pub const LEGACY_MAX_CHAINS: usize = 16_000;

/// What the kernel is known to hold, to decide which chains need writing.
pub enum Baseline<'a> {
    /// Nothing is assumed: write every chain (the rebuild rung).
    None,
    /// Our last successful write, held in memory: write chains that differ from it (partial syncs).
    Applied(&'a Ruleset),
    /// Our last successful write, which differs from the ruleset being staged only in these chains (their
    /// previous versions, as [`crate::render::reassemble`] reports them): write those that changed (partial
    /// syncs that patched the ruleset in place).
    Replaced(&'a Replaced),
    /// What `iptables-save` just printed, read against the ruleset being staged: write chains whose rules
    /// differ from it in substance (full syncs, and restarts, which then rewrite nothing when the rules are
    /// already right).
    Kernel(&'a KernelView),
}

/// The chains of the service port whose SVC, SVL, EXT and FW chains carry `hash`: those chains and the
/// endpoint chains they jump to, in name order.
fn service_group<'a>(next: &'a Ruleset, hash: &str) -> Vec<(&'a str, &'a Chain)> {
    let mut group: Vec<(&str, &Chain)> = Vec::new();
    // Looked up as chain names, not as texts: a map searched with a text spells out each name it compares
    // (a quarter of a cold sync's CPU time at 10,000 services).
    let mut wanted = String::with_capacity(SVC_PREFIX.len() + hash.len());
    for prefix in [SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX] {
        wanted.clear();
        wanted.push_str(prefix);
        wanted.push_str(hash);
        let Some((name, chain)) = next.nat.chains.get_key_value(&ChainName::from(&wanted)) else {
            continue;
        };
        group.push((name, chain));
        for target in chain.rules().filter_map(jump_target) {
            if target.starts_with(SEP_PREFIX)
                && let Some((name, chain)) = next.nat.chains.get_key_value(&ChainName::from(target))
            {
                group.push((name, chain));
            }
        }
    }
    group.sort_unstable_by_key(|(name, _)| *name);
    group.dedup_by_key(|(name, _)| *name);
    group
}

/// The hashes of the service ports `next` has chains for, in order.
fn service_hashes(next: &Ruleset) -> BTreeSet<&str> {
    next.nat
        .chains
        .keys()
        .filter_map(|name| {
            [SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX]
                .iter()
                .find_map(|p| name.strip_prefix(p))
        })
        .collect()
}

/// Adds a service port's chains to the transaction being filled; when they do not fit, hands back the full
/// transaction and starts the next with them.
fn add_group<'a>(
    group: Vec<(&'a str, &'a Chain)>,
    batch: &mut Vec<(&'a str, &'a Chain)>,
    max_chains: usize,
) -> Option<Vec<(&'a str, &'a Chain)>> {
    if !batch.is_empty() && batch.len() + group.len() > max_chains {
        Some(std::mem::replace(batch, group))
    } else {
        batch.extend(group);
        None
    }
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

/// How a staged sync finds which chains belong to which service port (a transaction carries whole service
/// ports).
#[derive(Clone, Copy)]
pub enum Groups<'a> {
    /// By name, in the ruleset: each service port's SVC, SVL, EXT and FW chains share its hash, and its
    /// endpoint chains are the ones they jump to.
    ByName,
    /// The parts the ruleset was assembled from, in service-port order: nothing to look up (finding them by
    /// name was a search of a hundred-thousand-entry map per chain, most of a cold sync's CPU time at 10,000
    /// services).
    Parts(&'a [Arc<ServicePortRules>]),
}

/// The chains of each service port, one service port at a time (a cold sync's groups together are as many
/// as the chains).
fn service_groups<'a>(
    next: &'a Ruleset,
    groups: Groups<'a>,
) -> Box<dyn Iterator<Item = Vec<(&'a str, &'a Chain)>> + 'a> {
    match groups {
        Groups::ByName => Box::new(
            service_hashes(next)
                .into_iter()
                .map(move |hash| service_group(next, hash)),
        ),
        Groups::Parts(parts) => Box::new(parts.iter().map(move |part| {
            part.chains
                .iter()
                .map(|(name, chain)| {
                    debug_assert!(
                        next.nat.chains.get(name) == Some(chain),
                        "{name} is not the ruleset's: the parts are not the ones it was assembled from"
                    );
                    (name.as_str(), chain)
                })
                .collect()
        })),
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
    let Ok(()) = stage(baseline, next, Groups::ByName, plan, jumps, max_chains, |p, _| {
        payloads.push(p);
        Ok::<(), std::convert::Infallible>(())
    });
    payloads
}

/// [`staged_payloads`], handing each transaction to `apply` as soon as it is serialised, in order, with whether
/// it is the last one, and stopping at the first error `apply` returns. A cold sync's transactions together are
/// as large as the ruleset (31 MB at 5,000 services × 10 endpoints); applied one by one, only one is held at a
/// time.
pub fn stage<'a, E>(
    baseline: Baseline<'_>,
    next: &'a Ruleset,
    groups: Groups<'a>,
    plan: &GcPlan,
    jumps: &[JumpRule],
    max_chains: usize,
    mut apply: impl FnMut(Payload, bool) -> Result<(), E>,
) -> Result<(), E> {
    let max_chains = max_chains.max(1);
    let jump_targets: BTreeSet<&str> = jumps.iter().map(|j| j.target).collect();
    let mut deletes: BTreeSet<&str> = plan
        .delete_chains
        .iter()
        .map(String::as_str)
        .filter(|n| is_owned_service_chain(n) && !next.nat.chains.contains_key(*n))
        .collect();
    // Against our last write the changed chains are few and found in one merge pass; against the kernel (or
    // nothing) they may be every chain, so they are not listed but asked for chain by chain: the list took
    // 8 MB at 5,000 services × 10 endpoints, the largest allocation of a cold sync.
    let mut changed: BTreeSet<(TableName, &str)> = BTreeSet::new();
    if let Baseline::Replaced(replaced) = &baseline {
        for ((table, name), before) in replaced.iter() {
            match (before, next.table(*table).chains.get(&**name)) {
                (_, Some(chain)) if before.as_ref() != Some(chain) || jump_targets.contains(&**name) => {
                    changed.insert((*table, &**name));
                }
                (Some(_), None) if is_owned_service_chain(name) => {
                    deletes.insert(&**name);
                }
                _ => {}
            }
        }
        // A chain the kernel is to jump to from a built-in chain is written even when unchanged.
        for name in &jump_targets {
            for table in TableName::ALL {
                if next.table(table).chains.contains_key(*name) {
                    changed.insert((table, name));
                }
            }
        }
    }
    if let Baseline::Applied(prev) = &baseline {
        for table in TableName::ALL {
            for (name, before, after) in merge_join(&prev.table(table).chains, &next.table(table).chains) {
                match (before, after) {
                    (_, Some(chain)) if before != Some(chain) || jump_targets.contains(name) => {
                        changed.insert((table, name));
                    }
                    (Some(_), None) if is_owned_service_chain(name) => {
                        deletes.insert(name);
                    }
                    _ => {}
                }
            }
        }
    }
    let needs_write = |table: TableName, name: &str| match &baseline {
        Baseline::Applied(_) | Baseline::Replaced(_) => changed.contains(&(table, name)),
        Baseline::Kernel(kernel) => kernel.found(table, name) != Found::Same,
        Baseline::None => true,
    };
    // Against our last write the chains to write are listed already: a partial sync need not look at the
    // other hundred thousand.
    let listed = matches!(baseline, Baseline::Applied(_) | Baseline::Replaced(_));
    let writes_of = |table: TableName| -> Box<dyn Iterator<Item = (&str, &Chain)> + '_> {
        let chains = &next.table(table).chains;
        if listed {
            Box::new(
                changed
                    .range((table, "")..)
                    .take_while(move |(t, _)| *t == table)
                    .filter_map(move |(_, name)| chains.get_key_value(*name).map(|(n, c)| (&**n, c))),
            )
        } else {
            Box::new(
                chains
                    .iter()
                    .filter(move |(name, _)| needs_write(table, name))
                    .map(|(name, chain)| (&**name, chain)),
            )
        }
    };
    let (mut per_service, mut shared_count) = (0, 0);
    for table in TableName::ALL {
        for (name, _) in writes_of(table) {
            if table == TableName::Nat && is_owned_service_chain(name) {
                per_service += 1;
            } else {
                shared_count += 1;
            }
        }
    }

    let total = per_service + shared_count + deletes.len();
    if total <= max_chains {
        let sections = TableName::ALL.map(|table| Section {
            table,
            write: writes_of(table).map(|(n, c)| (n.as_bytes(), c)).collect(),
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
            apply(payload, true)
        };
    }

    let nat_only = |write: Vec<(&str, &Chain)>, delete: Vec<&str>| {
        let sections = TableName::ALL.map(|table| Section {
            table,
            write: if table == TableName::Nat {
                write.iter().map(|(n, c)| (n.as_bytes(), *c)).collect()
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
    let shared: Vec<(TableName, &str, &Chain)> = TableName::ALL
        .into_iter()
        .flat_map(|table| {
            writes_of(table)
                .filter(move |(name, _)| table != TableName::Nat || !is_owned_service_chain(name))
                .map(move |(name, chain)| (table, name, chain))
        })
        .collect();
    // What follows the per-service transactions, to tell which transaction is the last.
    let switch_follows = !shared.is_empty() || !jumps.is_empty() || !plan.delete_rules.is_empty();
    let deletes_follow = !deletes.is_empty();
    // Endpoint chains jump to KUBE-MARK-MASQ, which a cold node does not have yet.
    if let Some((name, chain)) = next.nat.chains.get_key_value(KUBE_MARK_MASQ) {
        let last = per_service == 0 && !switch_follows && !deletes_follow;
        apply(nat_only(vec![(&**name, chain)], Vec::new()), last)?;
    }
    // Whole service ports per transaction, in hash order.
    let mut batch: Vec<(&str, &Chain)> = Vec::new();
    let mut batched = 0;
    for group in service_groups(next, groups) {
        let group: Vec<_> = group
            .into_iter()
            .filter(|(name, _)| needs_write(TableName::Nat, name))
            .collect();
        batched += group.len();
        if let Some(done) = add_group(group, &mut batch, max_chains) {
            apply(nat_only(done, Vec::new()), false)?;
        }
    }
    if batched != per_service {
        // Per-service chains no service port's chains reach (none are rendered so): each is a group of its own.
        let grouped: std::collections::HashSet<&str> = service_groups(next, groups)
            .flat_map(|group| group.into_iter().map(|(name, _)| name))
            .collect();
        let strays: Vec<(&str, &Chain)> = writes_of(TableName::Nat)
            .filter(|(name, _)| is_owned_service_chain(name) && !grouped.contains(name))
            .collect();
        for stray in strays {
            if let Some(done) = add_group(vec![stray], &mut batch, max_chains) {
                apply(nat_only(done, Vec::new()), false)?;
            }
        }
    }
    if !batch.is_empty() {
        apply(nat_only(batch, Vec::new()), !switch_follows && !deletes_follow)?;
    }
    let switch = TableName::ALL.map(|table| Section {
        table,
        write: shared
            .iter()
            .filter(|(t, _, _)| *t == table)
            .map(|(_, n, c)| (n.as_bytes(), *c))
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
        apply(switch, !deletes_follow)?;
    }
    // Stale chains: a batch's chains are flushed and deleted together, so references inside a batch are fine;
    // references from later stages' chains are gone because those stages went first.
    let last_stage = deletes.iter().map(|n| delete_stage(n)).max();
    for stage in 0..4 {
        let chains: Vec<&str> = deletes
            .iter()
            .copied()
            .filter(|n| delete_stage(n) == stage)
            .collect();
        let chunks = chains.chunks(max_chains).count();
        for (i, chunk) in chains.chunks(max_chains).enumerate() {
            let last = Some(stage) == last_stage && i + 1 == chunks;
            apply(nat_only(Vec::new(), chunk.to_vec()), last)?;
        }
    }
    Ok(())
}
