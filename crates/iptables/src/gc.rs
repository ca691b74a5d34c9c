//! Garbage collection by ownership: per-service chains found in the kernel that the next ruleset no longer
//! has are deleted, whichever version of kube-proxy or svcproxy wrote them.

use std::collections::BTreeSet;

use crate::chain_name::is_owned_service_chain;
use crate::ruleset::{Ruleset, TableName};
use crate::save_parser::{SavedRule, SavedRuleset};

/// Owned-pattern nat chains present in `saved` but not in `next`, in name order.
///
/// Recognising every historical prefix (including `KUBE-XLB-`, which current kube-proxy forgets) matters:
/// an orphan that still jumps to one of our endpoint chains makes the `-X` of that chain fail on every later
/// sync. Deleting all stale chains in one payload, each flushed first, removes such references among them.
pub fn stale_owned_chains(saved: &SavedRuleset, next: &Ruleset) -> Vec<String> {
    let Some(nat) = saved.table("nat") else {
        return Vec::new();
    };
    nat.chains
        .keys()
        .filter(|name| is_owned_service_chain(name) && !next.nat.chains.contains_key(name.as_str()))
        .cloned()
        .collect()
}

/// Everything a full sync removes besides rewriting our chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Owned-pattern nat chains to flush and delete.
    pub delete_chains: Vec<String>,
    /// Rules in chains we do not rewrite that must go first: they jump to a chain being deleted (a foreign
    /// or older-version chain, or a built-in chain), or, on a rebuild, they are our jumps from the built-in
    /// chains, which are re-inserted fresh. Deleted by their saved spelling (`-D CHAIN args…`).
    pub delete_rules: Vec<(TableName, SavedRule)>,
}

impl GcPlan {
    /// Nothing to collect.
    pub fn is_empty(&self) -> bool {
        self.delete_chains.is_empty() && self.delete_rules.is_empty()
    }
}

fn table_name(name: &str) -> Option<TableName> {
    TableName::ALL.into_iter().find(|t| t.as_str() == name)
}

/// The reference-aware collection for a full sync: stale owned chains, plus every rule outside the chains we
/// rewrite that still jumps to one of them. Without the second part a leftover chain of another version (the
/// `KUBE-XLB-…` of the incident) keeps a reference alive and the whole transaction fails on every sync.
pub fn plan_gc(saved: &SavedRuleset, next: &Ruleset) -> GcPlan {
    let delete_chains = stale_owned_chains(saved, next);
    let stale: BTreeSet<&str> = delete_chains.iter().map(String::as_str).collect();
    let mut delete_rules = Vec::new();
    if let Some(nat) = saved.table("nat") {
        for rule in &nat.rules {
            let rewritten =
                next.nat.chains.contains_key(rule.chain.as_str()) || stale.contains(rule.chain.as_str());
            if !rewritten && rule.jump.as_deref().is_some_and(|j| stale.contains(j)) {
                delete_rules.push((TableName::Nat, rule.clone()));
            }
        }
    }
    GcPlan {
        delete_chains,
        delete_rules,
    }
}

/// The last rung of the escalation ladder: as [`plan_gc`], and additionally every jump from a built-in chain to
/// one of our chains is deleted (the payload inserts exactly one fresh copy of each), so duplicated, edited or
/// reordered jumps left by another writer are gone too. Every chain of ours is flushed by the full payload
/// anyway, so after this transaction nothing of ours holds anything but what we wrote.
pub fn plan_rebuild(saved: &SavedRuleset, next: &Ruleset) -> GcPlan {
    let mut plan = plan_gc(saved, next);
    for (name, table) in &saved.tables {
        let Some(t) = table_name(name) else { continue };
        let ours = next.table(t);
        for rule in &table.rules {
            let builtin = table.chains.get(&rule.chain).is_some_and(Option::is_some);
            if builtin && rule.jump.as_deref().is_some_and(|j| ours.chains.contains_key(j)) {
                plan.delete_rules.push((t, rule.clone()));
            }
        }
    }
    plan
}
