//! Transactions (`nft -f -` input) computed from two [`Ruleset`]s: a clean rebuild, a partial update that
//! touches only what differs, and a cold sync split into bounded chunks.
//!
//! A transaction is atomic in the kernel, but inside it every command is checked against the state the
//! commands before it left: a chain or set cannot be deleted while something still refers to it, and nothing
//! may refer to a chain or set that does not exist yet. The order of phases in [`partial_transaction`] is
//! chosen so each command's preconditions hold:
//!
//! 1. declare new sets and chains (everything later may refer to them);
//! 2. flush the chains to be rewritten or removed (drops their references);
//! 3. delete stale elements of surviving maps (drops references to chains about to go);
//! 4. delete removed and redefined sets, then removed and redefined chains;
//! 5. re-declare redefined sets and base chains;
//! 6. add the rules of new and rewritten chains;
//! 7. add new and changed elements.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::commands;
use crate::names::{owner_in_comment, owner_of_comment, owner_of_object};
use crate::ruleset::{Chain, CompactString, Element, Family, Ruleset, Set};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionKind {
    /// Deletes and re-creates the whole table.
    Full,
    /// Changes only what differs.
    Partial,
    /// One part of a cold sync; part 0 re-creates the table with its fixed objects.
    Chunk { index: usize, count: usize },
}

/// What one backend sends to the kernel in one `nft -f -` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub kind: TransactionKind,
    pub text: String,
    /// Services (`namespace/name`) whose objects this transaction adds, changes or removes.
    pub services: BTreeSet<String>,
    /// Chains and sets it deletes (besides the whole table, for [`TransactionKind::Full`]).
    pub deleted_chains: Vec<String>,
    pub deleted_sets: Vec<String>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Splits off the deletion of removed chains and sets into a second transaction, for kernels before 6.2:
    /// there, removing the last map element or rule that refers to a chain does not release the reference
    /// until the transaction is over, so deleting the chain in the same transaction fails. The first part
    /// still flushes the chains, so nothing reaches them; run the second part once the first succeeded
    /// (upstream waits a second). Redefined base chains stay in the first part: nothing refers to them.
    pub fn defer_deletions(self) -> (Transaction, Option<Transaction>) {
        if self.deleted_chains.is_empty() && self.deleted_sets.is_empty() {
            return (self, None);
        }
        let mut now = String::new();
        let mut later = String::new();
        let deleted_chains: BTreeSet<&str> = self.deleted_chains.iter().map(String::as_str).collect();
        let deleted_sets: BTreeSet<&str> = self.deleted_sets.iter().map(String::as_str).collect();
        for line in self.text.lines() {
            let mut words = line.split(' ');
            let deferred = match (words.next(), words.next(), words.nth(2)) {
                (Some("delete"), Some("chain"), Some(name)) => deleted_chains.contains(name),
                (Some("delete"), Some("set" | "map"), Some(name)) => deleted_sets.contains(name),
                _ => false,
            };
            let out = if deferred { &mut later } else { &mut now };
            out.push_str(line);
            out.push('\n');
        }
        // Sets go after the chains whose rules used them.
        let (chains, sets): (Vec<&str>, Vec<&str>) =
            later.lines().partition(|l| l.starts_with("delete chain "));
        let later_text: String = chains.into_iter().chain(sets).map(|l| format!("{l}\n")).collect();
        let second = Transaction {
            kind: self.kind,
            text: later_text,
            services: self.services.clone(),
            deleted_chains: self.deleted_chains.clone(),
            deleted_sets: self.deleted_sets.clone(),
        };
        let first = Transaction {
            text: now,
            deleted_chains: Vec::new(),
            deleted_sets: Vec::new(),
            ..self
        };
        (first, Some(second))
    }
}

/// Removes a table whether or not it exists: our own on `cleanup`, upstream's `kube-proxy` tables on
/// takeover.
pub fn delete_table_transaction(family: Family, name: &str) -> String {
    format!("table {family} {name} {{}}\ndelete table {family} {name}\n")
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error("cannot update table {from} into table {to}")]
    DifferentTable { from: String, to: String },
    #[error("the table comment changed; only a full transaction can change it")]
    TableComment,
    #[error("regular chain {0} changed its definition while other objects may refer to it")]
    ChainRedefined(String),
    #[error("chunk size must be at least one service")]
    ChunkSize,
}

fn owner_of_element(e: &Element) -> Option<String> {
    e.comment.as_deref().map(owner_of_comment)
}

/// The clean-rebuild idiom: `table … {}` creates the table if it is missing so the `delete` that follows
/// cannot fail, and the whole definition follows in the same transaction, so the kernel never shows a
/// half-built table.
pub fn full_transaction(next: &Ruleset) -> Transaction {
    let table = next.qualified_name();
    let mut text = format!("table {table} {{}}\ndelete table {table}\n");
    commands::add_table(&mut text, &table, next.comment.as_deref());
    let empty = Ruleset {
        family: next.family,
        name: next.name.clone(),
        comment: next.comment.clone(),
        sets: BTreeMap::new(),
        chains: BTreeMap::new(),
    };
    let body = diff(&empty, next, &BTreeSet::new());
    text.push_str(&body.text);
    Transaction {
        kind: TransactionKind::Full,
        text,
        services: body.services,
        deleted_chains: Vec::new(),
        deleted_sets: Vec::new(),
    }
}

/// The commands that turn `prev` (what the kernel holds) into `next`. Empty when they are equal. The size of
/// the output depends only on what changed, never on how many services there are.
pub fn partial_transaction(prev: &Ruleset, next: &Ruleset) -> Result<Transaction, PlanError> {
    partial_transaction_given(prev, next, &BTreeSet::new())
}

/// [`partial_transaction`] for a `prev` read from the kernel whose sets named in `same_elements` were found
/// to hold exactly `next`'s elements and were kept without them: a read-back compares each set as it reads
/// it, so it never holds a second copy of every element.
pub fn partial_transaction_given(
    prev: &Ruleset,
    next: &Ruleset,
    same_elements: &BTreeSet<String>,
) -> Result<Transaction, PlanError> {
    if prev.family != next.family || prev.name != next.name {
        return Err(PlanError::DifferentTable {
            from: prev.qualified_name(),
            to: next.qualified_name(),
        });
    }
    if prev.comment != next.comment {
        return Err(PlanError::TableComment);
    }
    for (name, old, new) in join(&prev.chains, &next.chains) {
        if let (Some(old), Some(chain)) = (old, new) {
            let redefined = old.base != chain.base || old.comment != chain.comment;
            if redefined && (old.base.is_none() || chain.base.is_none()) {
                return Err(PlanError::ChainRedefined(name.clone()));
            }
        }
    }
    let mut tx = diff(prev, next, same_elements);
    tx.kind = TransactionKind::Partial;
    Ok(tx)
}

/// A cold sync in bounded steps: part 0 re-creates the table with only its fixed objects, and each further
/// part adds the complete objects of up to `max_services_per_tx` Services, chains before the map elements
/// that lead to them. Between parts the kernel holds a valid table in which every Service is either fully
/// programmed or absent, and no transaction holds the nftables lock for long.
pub fn chunked_full(next: &Ruleset, max_services_per_tx: usize) -> Result<Vec<Transaction>, PlanError> {
    Ok(full_in_chunks(next, max_services_per_tx)?.collect())
}

/// The parts of [`chunked_full`], each built only when the one before it has been taken: a cold sync applies
/// each part before building the next, so it never holds them all (at 5,000 services × 10 endpoints they
/// are 11 transactions and as much text as the whole table).
pub fn full_in_chunks(
    next: &Ruleset,
    max_services_per_tx: usize,
) -> Result<impl Iterator<Item = Transaction> + '_, PlanError> {
    if max_services_per_tx == 0 {
        return Err(PlanError::ChunkSize);
    }
    let mut owners: BTreeSet<String> = BTreeSet::new();
    owners.extend(next.chains.keys().filter_map(|n| owner_of_object(n)));
    owners.extend(next.sets.keys().filter_map(|n| owner_of_object(n)));
    for set in next.sets.values() {
        owners.extend(set.elements.values().filter_map(owner_of_element));
    }
    let owners: Vec<String> = owners.into_iter().collect();
    let groups = owners.len().div_ceil(max_services_per_tx);
    let count = groups + 1;
    // Elements of fixed sets that no Service owns (the hairpin pairs, one per endpoint: 50,000 at 5,000
    // services) are spread over the Services' parts, so part 0 stays as small as the fixed objects.
    let ownerless: Vec<(&str, &CompactString, &Element)> = if groups == 0 {
        Vec::new()
    } else {
        next.sets
            .iter()
            .filter(|(n, s)| owner_of_object(n).is_none() && !s.is_dynamic())
            .flat_map(|(n, s)| {
                s.elements
                    .iter()
                    .filter(|(_, e)| e.comment.is_none())
                    .map(move |(k, e)| (n.as_str(), k, e))
            })
            .collect()
    };
    let fixed = restrict(next, &|owner| owner.is_none(), &|owner| {
        owner.is_none() && groups == 0
    });

    let mut first = full_transaction(&fixed);
    first.kind = TransactionKind::Chunk { index: 0, count };
    let table = next.qualified_name();
    let rest = (0..groups).map(move |i| {
        let group = &owners[i * max_services_per_tx..owners.len().min((i + 1) * max_services_per_tx)];
        let members: BTreeSet<&str> = group.iter().map(String::as_str).collect();
        let mut tx = group_transaction(next, &members);
        let share = &ownerless[i * ownerless.len() / groups..(i + 1) * ownerless.len() / groups];
        for run in share.chunk_by(|a, b| a.0 == b.0) {
            commands::add_elements(
                &mut tx.text,
                &table,
                run[0].0,
                run.iter().map(|(_, k, e)| (*k, *e)),
            );
        }
        tx.kind = TransactionKind::Chunk { index: i + 1, count };
        tx
    });
    Ok(std::iter::once(first).chain(rest))
}

/// What adds the objects and elements owned by `members` to a table that holds the fixed objects and other
/// groups: the text `diff(fixed part, fixed part + group)` would give, written straight from `next` instead
/// of from a copy of the group's part (at 5,000 services a 1,000-service copy is several megabytes, made once
/// per chunk of a cold sync).
fn group_transaction(next: &Ruleset, members: &BTreeSet<&str>) -> Transaction {
    let table = next.qualified_name();
    let owned = |name: &str| owner_of_object(name).is_some_and(|o| members.contains(o.as_str()));
    let mut services: BTreeSet<String> = BTreeSet::new();
    let mut text = String::new();
    let sets: Vec<(&String, &Set)> = next.sets.iter().filter(|(n, _)| owned(n)).collect();
    let chains: Vec<(&String, &Chain)> = next.chains.iter().filter(|(n, _)| owned(n)).collect();
    for (name, set) in &sets {
        commands::add_set(&mut text, &table, name, set);
        services.extend(owner_of_object(name));
    }
    for (name, chain) in &chains {
        commands::add_chain(&mut text, &table, name, chain);
        services.extend(owner_of_object(name));
    }
    for (name, chain) in &chains {
        for rule in &chain.rules {
            commands::add_rule(&mut text, &table, name, rule);
        }
    }
    for (name, set) in &next.sets {
        let elements: Vec<(&CompactString, &Element)> = if owned(name) {
            set.elements.iter().collect()
        } else if owner_of_object(name).is_none() && !set.is_dynamic() {
            set.elements
                .iter()
                .filter(|(_, e)| {
                    e.comment
                        .as_deref()
                        .is_some_and(|c| members.contains(owner_in_comment(c)))
                })
                .collect()
        } else {
            continue;
        };
        for (_, e) in &elements {
            services.extend(owner_of_element(e));
        }
        commands::add_elements(&mut text, &table, name, elements);
    }
    Transaction {
        kind: TransactionKind::Partial,
        text,
        services,
        deleted_chains: Vec::new(),
        deleted_sets: Vec::new(),
    }
}

/// The part of a ruleset whose objects' owners pass `keep` (`None` = fixed objects). Fixed sets are kept
/// whole as declarations, with only the elements whose owners pass `keep_element`.
pub fn restrict(
    rs: &Ruleset,
    keep: &dyn Fn(Option<&str>) -> bool,
    keep_element: &dyn Fn(Option<&str>) -> bool,
) -> Ruleset {
    let chains = rs
        .chains
        .iter()
        .filter(|(n, _)| keep(owner_of_object(n).as_deref()))
        .map(|(n, c)| (n.clone(), c.clone()))
        .collect();
    let sets = rs
        .sets
        .iter()
        .filter(|(n, _)| keep(owner_of_object(n).as_deref()))
        .map(|(n, s)| {
            // Only the elements that pass are copied: the fixed maps hold an element per service port, and a
            // cold sync restricts the ruleset once per part.
            let elements = s
                .elements
                .iter()
                .filter(|(_, e)| keep_element(owner_of_element(e).as_deref()))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            let s = Set {
                kind: s.kind,
                key_type: s.key_type.clone(),
                data_type: s.data_type.clone(),
                flags: s.flags.clone(),
                timeout: s.timeout,
                size: s.size,
                comment: s.comment.clone(),
                elements,
            };
            (n.clone(), s)
        })
        .collect();
    // Built field by field: `..rs.clone()` would copy every chain and element only to drop them.
    Ruleset {
        family: rs.family,
        name: rs.name.clone(),
        comment: rs.comment.clone(),
        chains,
        sets,
    }
}

/// Chains whose rules use one of `sets`.
fn chains_using<'a>(rs: &'a Ruleset, sets: &BTreeSet<&str>) -> BTreeSet<&'a str> {
    if sets.is_empty() {
        return BTreeSet::new();
    }
    rs.chains
        .iter()
        .filter(|(_, c)| {
            c.rules.iter().any(|r| {
                crate::references::set_references(r)
                    .iter()
                    .any(|s| sets.contains(s))
            })
        })
        .map(|(n, _)| n.as_str())
        .collect()
}

type Elements<'a> = Vec<(&'a CompactString, &'a Element)>;

/// Both maps' entries joined by key, walking the two sorted maps side by side: tables of 100,000 elements
/// are compared in one pass instead of one tree lookup per entry.
fn join<'a, K: Ord, V>(
    prev: &'a BTreeMap<K, V>,
    next: &'a BTreeMap<K, V>,
) -> Vec<(&'a K, Option<&'a V>, Option<&'a V>)> {
    let mut out = Vec::with_capacity(prev.len().max(next.len()));
    let mut a = prev.iter().peekable();
    let mut b = next.iter().peekable();
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => x.0.cmp(y.0),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (k, v) = a.next().expect("peeked");
                out.push((k, Some(v), None));
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = b.next().expect("peeked");
                out.push((k, None, Some(v)));
            }
            std::cmp::Ordering::Equal => {
                let (k, v) = a.next().expect("peeked");
                let (_, w) = b.next().expect("peeked");
                out.push((k, Some(v), Some(w)));
            }
        }
    }
    out
}

/// Elements to delete (absent or changed in `next`) and to add (new or changed).
fn element_changes<'a>(
    prev: &'a BTreeMap<CompactString, Element>,
    next: &'a BTreeMap<CompactString, Element>,
) -> (Elements<'a>, Elements<'a>) {
    let (mut stale, mut added) = (Vec::new(), Vec::new());
    for (k, old, new) in join(prev, next) {
        if old == new {
            continue;
        }
        if let Some(e) = old {
            stale.push((k, e));
        }
        if let Some(e) = new {
            added.push((k, e));
        }
    }
    (stale, added)
}

fn diff(prev: &Ruleset, next: &Ruleset, same_elements: &BTreeSet<String>) -> Transaction {
    let table = next.qualified_name();
    let mut services: BTreeSet<String> = BTreeSet::new();
    let touch_object = |name: &str, services: &mut BTreeSet<String>| {
        if let Some(o) = owner_of_object(name) {
            services.insert(o);
        }
    };

    // Classify sets.
    let mut new_sets: Vec<(&str, &Set)> = Vec::new();
    let mut redefined_sets: Vec<(&str, &Set)> = Vec::new();
    let mut removed_sets: Vec<(&str, &Set)> = Vec::new();
    for (name, set) in &next.sets {
        match prev.sets.get(name) {
            None => new_sets.push((name, set)),
            Some(old) if !old.same_definition(set) => redefined_sets.push((name, set)),
            Some(_) => {}
        }
    }
    for (name, set) in &prev.sets {
        if !next.sets.contains_key(name) {
            removed_sets.push((name, set));
        }
    }
    // Classify chains.
    let redefined_names: BTreeSet<&str> = redefined_sets.iter().map(|(n, _)| *n).collect();
    let users_of_redefined = chains_using(next, &redefined_names);
    let mut new_chains: Vec<(&str, &Chain)> = Vec::new();
    let mut rewritten: Vec<(&str, &Chain)> = Vec::new();
    let mut redefined_base: Vec<(&str, &Chain)> = Vec::new();
    let mut removed_chains: Vec<&str> = Vec::new();
    for (name, old, new) in join(&prev.chains, &next.chains) {
        match (old, new) {
            (Some(_), None) => removed_chains.push(name),
            (None, Some(chain)) => new_chains.push((name, chain)),
            (Some(old), Some(chain)) if old.base != chain.base || old.comment != chain.comment => {
                redefined_base.push((name, chain));
            }
            (Some(old), Some(chain))
                if old.rules != chain.rules || users_of_redefined.contains(name.as_str()) =>
            {
                rewritten.push((name, chain));
            }
            _ => {}
        }
    }

    let mut text = String::new();
    // 1. Declarations.
    for (name, set) in &new_sets {
        commands::add_set(&mut text, &table, name, set);
        touch_object(name, &mut services);
    }
    for (name, chain) in &new_chains {
        commands::add_chain(&mut text, &table, name, chain);
        touch_object(name, &mut services);
    }
    // 2. Flushes.
    let flushed = rewritten
        .iter()
        .map(|(n, _)| *n)
        .chain(redefined_base.iter().map(|(n, _)| *n))
        .chain(removed_chains.iter().copied());
    for name in flushed {
        commands::flush_chain(&mut text, &table, name);
        touch_object(name, &mut services);
    }
    // 3. Stale elements of surviving maps, and the element additions for step 7.
    let mut additions: Vec<(&str, Vec<(&CompactString, &Element)>)> = Vec::new();
    for (name, set) in &next.sets {
        let Some(old) = prev.sets.get(name) else {
            additions.push((name, set.elements.iter().collect()));
            continue;
        };
        if redefined_names.contains(name.as_str()) {
            additions.push((name, set.elements.iter().collect()));
            continue;
        }
        if set.is_dynamic() || (same_elements.contains(name) && old.same_definition(set)) {
            // Written by traffic, not by us; or known to be equal.
            continue;
        }
        let (stale, added) = element_changes(&old.elements, &set.elements);
        for (_, e) in &stale {
            if let Some(o) = owner_of_element(e) {
                services.insert(o);
            }
        }
        commands::delete_elements(&mut text, &table, name, stale.iter().map(|(k, _)| *k));
        additions.push((name, added));
    }
    // 4. Deletions.
    for (name, set) in removed_sets.iter().chain(redefined_sets.iter()) {
        commands::delete_set(&mut text, &table, name, set);
        touch_object(name, &mut services);
    }
    for name in removed_chains.iter().chain(redefined_base.iter().map(|(n, _)| n)) {
        commands::delete_chain(&mut text, &table, name);
    }
    // 5. Re-declarations.
    for (name, set) in &redefined_sets {
        commands::add_set(&mut text, &table, name, set);
    }
    for (name, chain) in &redefined_base {
        commands::add_chain(&mut text, &table, name, chain);
    }
    // 6. Rules.
    for (name, chain) in new_chains
        .iter()
        .chain(rewritten.iter())
        .chain(redefined_base.iter())
    {
        for rule in &chain.rules {
            commands::add_rule(&mut text, &table, name, rule);
        }
    }
    // 7. Elements.
    for (name, elements) in additions {
        for (_, e) in &elements {
            if let Some(o) = owner_of_element(e) {
                services.insert(o);
            }
        }
        commands::add_elements(&mut text, &table, name, elements);
    }

    Transaction {
        kind: TransactionKind::Partial,
        text,
        services,
        deleted_chains: removed_chains.iter().map(|s| s.to_string()).collect(),
        deleted_sets: removed_sets.iter().map(|(s, _)| s.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::SetKind;

    fn table(elements: &[(&str, &str)]) -> Ruleset {
        let mut rs = Ruleset::new(Family::Ip, "svcproxy");
        let mut map = Set::new(
            SetKind::Map,
            "typeof numgen random mod 1",
            Some("ip daddr . tcp dport"),
        );
        for (k, v) in elements {
            map.elements.insert(
                (*k).into(),
                Element {
                    value: Some((*v).into()),
                    comment: Some("ns/web:http".into()),
                },
            );
        }
        rs.sets.insert("endpoints-tcp-0".into(), map);
        rs
    }

    #[test]
    fn sets_read_as_equal_are_not_compared_again() {
        let next = table(&[("0", "10.0.0.1 . 80"), ("1", "10.0.0.2 . 80")]);
        // Read back without the elements of a set found equal: nothing to do.
        let mut read = next.clone();
        read.sets.get_mut("endpoints-tcp-0").unwrap().elements.clear();
        let same = BTreeSet::from(["endpoints-tcp-0".to_string()]);
        assert!(partial_transaction_given(&read, &next, &same).unwrap().is_empty());
        // Without the note, the empty set is a difference: both elements are added back.
        let t = partial_transaction_given(&read, &next, &BTreeSet::new()).unwrap();
        assert_eq!(t.services, BTreeSet::from(["ns/web".to_string()]));
        assert!(
            t.text.contains("10.0.0.1 . 80") && t.text.contains("10.0.0.2 . 80"),
            "{}",
            t.text
        );
        // A set whose declaration differs is redefined whatever the note says.
        let mut redeclared = read.clone();
        redeclared.sets.get_mut("endpoints-tcp-0").unwrap().size = Some(16);
        let t = partial_transaction_given(&redeclared, &next, &same).unwrap();
        assert!(t.text.contains("delete map"), "{}", t.text);
    }
}
