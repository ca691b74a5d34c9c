//! Garbage collection by ownership: per-service chains found in the kernel that the next ruleset no longer
//! has are deleted, whichever version of kube-proxy or svcproxy wrote them.

use crate::chain_name::is_owned_service_chain;
use crate::ruleset::Ruleset;
use crate::save_parser::SavedRuleset;

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
