//! `iptables-restore --noflush` input: what to send the kernel to go from one state to the next.
//!
//! With `--noflush`, a `:NAME - [0:0]` line creates the chain or flushes it, and chains a payload does not
//! mention stay as they are. So a payload declares exactly the chains it rewrites (then appends their rules)
//! and the chains it deletes (flushed first, so references among them are gone before their `-X`). Each
//! table is committed as one transaction.

use std::collections::{BTreeMap, BTreeSet};

use crate::chain_name::is_owned_service_chain;
use crate::gc::GcPlan;
use crate::jumps::JumpRule;
use crate::ruleset::{Chain, ChainName, Ruleset, TableName};
use crate::save_parser::{SavedRule, quote_arg};

/// One restore input and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    pub text: String,
    pub line_count: usize,
    /// Chains declared and rewritten (not counting the ones deleted).
    pub chains_written: usize,
    pub chains_deleted: usize,
    /// `-A` and `-I` lines.
    pub rules_written: usize,
    /// `-D` lines.
    pub rules_deleted: usize,
}

impl Payload {
    /// Nothing to send: the kernel already matches.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Line `n`, 1-based as `iptables-restore` counts in its "line N failed" messages.
    pub fn line(&self, n: usize) -> Option<&str> {
        n.checked_sub(1).and_then(|i| self.text.lines().nth(i))
    }

    /// Lines `n - ctx ..= n + ctx` (clamped) with their numbers, for quoting a failure in context.
    pub fn lines_around(&self, n: usize, ctx: usize) -> Vec<(usize, &str)> {
        let first = n.saturating_sub(ctx).max(1);
        let last = n.saturating_add(ctx);
        self.text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .skip(first - 1)
            .take_while(|(i, _)| *i <= last)
            .collect()
    }
}

/// What one table section does.
pub(crate) struct Section<'a> {
    pub(crate) table: TableName,
    pub(crate) write: Vec<(&'a str, &'a Chain)>,
    pub(crate) delete: Vec<&'a str>,
    pub(crate) jumps: Vec<&'a JumpRule>,
    /// Rules of chains we do not rewrite that must go before chains are deleted or jumps re-inserted.
    pub(crate) delete_rules: Vec<&'a SavedRule>,
}

impl Section<'_> {
    fn is_empty(&self) -> bool {
        self.write.is_empty()
            && self.delete.is_empty()
            && self.jumps.is_empty()
            && self.delete_rules.is_empty()
    }
}

/// Rewrites every chain of `next`, deletes `stale_chains` from nat and inserts `missing_jumps`.
///
/// Only owned-pattern chains absent from `next` are deleted from `stale_chains`; anything else in that list
/// is ignored, so a mistaken caller cannot delete a chain we are about to write or one we do not own.
pub fn full_payload(next: &Ruleset, stale_chains: &[String], missing_jumps: &[JumpRule]) -> Payload {
    let plan = GcPlan {
        delete_chains: stale_chains.to_vec(),
        delete_rules: Vec::new(),
    };
    full_payload_with_gc(next, &plan, missing_jumps)
}

/// Rewrites every chain of `next` and carries out `plan`: first the foreign rules that reference what goes
/// away are deleted, then the stale chains, all in the same transaction, so the kernel never sees a half-done
/// collection.
pub fn full_payload_with_gc(next: &Ruleset, plan: &GcPlan, missing_jumps: &[JumpRule]) -> Payload {
    let sections = TableName::ALL.map(|table| {
        let t = next.table(table);
        let delete = if table == TableName::Nat {
            let unique: BTreeSet<&str> = plan
                .delete_chains
                .iter()
                .map(String::as_str)
                .filter(|name| is_owned_service_chain(name) && !t.chains.contains_key(*name))
                .collect();
            unique.into_iter().collect()
        } else {
            Vec::new()
        };
        Section {
            table,
            write: t.chains.iter().map(|(n, c)| (&**n, c)).collect(),
            delete,
            jumps: missing_jumps.iter().filter(|j| j.table == table).collect(),
            delete_rules: plan
                .delete_rules
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, r)| r)
                .collect(),
        }
    });
    serialize(&sections)
}

/// Writes only what differs between `prev` (what the kernel holds, as we last wrote it) and `next`: chains
/// that are new or whose lines changed, and deletion of owned chains `next` no longer has.
///
/// Shared chains such as `KUBE-SERVICES` are rewritten only when their own lines changed; upstream rewrites
/// them on every sync, which makes each update cost O(services). Chains targeted by a missing jump are
/// rewritten too, so the inserted jump cannot point at a chain that was lost along with it.
pub fn partial_payload(prev: &Ruleset, next: &Ruleset, missing_jumps: &[JumpRule]) -> Payload {
    let sections = TableName::ALL.map(|table| {
        let jumps: Vec<&JumpRule> = missing_jumps.iter().filter(|j| j.table == table).collect();
        let mut write = Vec::new();
        let mut delete = Vec::new();
        for (name, before, after) in merge_join(&prev.table(table).chains, &next.table(table).chains) {
            match (before, after) {
                (_, Some(chain)) if before != Some(chain) || jumps.iter().any(|j| j.target == name) => {
                    write.push((name, chain));
                }
                // A shared chain that disappears (only KUBE-FIREWALL can, and kubelet keeps using it) is left
                // alone.
                (Some(_), None) if is_owned_service_chain(name) => delete.push(name),
                _ => {}
            }
        }
        Section {
            table,
            write,
            delete,
            jumps,
            delete_rules: Vec::new(),
        }
    });
    serialize(&sections)
}

/// Walks two name-ordered maps side by side: one pass and no lookups, which keeps comparing two rulesets of
/// a hundred thousand chains cheap (unchanged chains are shared, so their comparison is a pointer check).
pub(crate) fn merge_join<'a>(
    prev: &'a BTreeMap<ChainName, Chain>,
    next: &'a BTreeMap<ChainName, Chain>,
) -> impl Iterator<Item = (&'a str, Option<&'a Chain>, Option<&'a Chain>)> + 'a {
    let mut p = prev.iter().peekable();
    let mut n = next.iter().peekable();
    std::iter::from_fn(move || match (p.peek(), n.peek()) {
        (None, None) => None,
        (Some((pk, _)), Some((nk, _))) if pk == nk => {
            let (name, before) = p.next().unwrap();
            let (_, after) = n.next().unwrap();
            Some((&**name, Some(before), Some(after)))
        }
        (Some((pk, _)), Some((nk, _))) if pk < nk => p.next().map(|(k, c)| (&**k, Some(c), None)),
        (Some(_), None) => p.next().map(|(k, c)| (&**k, Some(c), None)),
        _ => n.next().map(|(k, c)| (&**k, None, Some(c))),
    })
}

pub(crate) fn serialize(sections: &[Section<'_>]) -> Payload {
    // Payloads reach tens of megabytes on large clusters; size the buffer once, from lengths alone: counting
    // the rules would mean a pass over every chain's text (cache misses on 100,000 chains) before the pass
    // that writes them. A rule's args are rarely shorter than its `-A NAME ` prefix, so doubling the text
    // covers the prefixes; growing a buffer this large is a remap, not a copy, should it fall short.
    let capacity: usize = sections
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let rules: usize = s
                .write
                .iter()
                .map(|(n, c)| 2 * c.text().len() + n.len() + 4)
                .sum();
            let names: usize = s.write.iter().map(|(n, _)| n.len() + 9).sum::<usize>()
                + s.delete.iter().map(|n| 2 * n.len() + 13).sum::<usize>();
            rules + names + s.jumps.len() * 128 + 16
        })
        .sum();
    let mut w = Writer {
        text: String::with_capacity(capacity),
        lines: 0,
    };
    let mut payload = Payload::default();
    let mut prefix = String::with_capacity(64);
    for s in sections.iter().filter(|s| !s.is_empty()) {
        w.line(&["*", s.table.as_str()]);
        for name in s.write.iter().map(|(n, _)| n).chain(&s.delete) {
            w.line(&[":", name, " - [0:0]"]);
        }
        for (name, chain) in &s.write {
            // Each rule's text ends with its newline already: the `-A NAME ` prefix is spelled once per chain,
            // then two copies a line, and the lines counted as they go.
            prefix.clear();
            prefix.push_str("-A ");
            prefix.push_str(name);
            prefix.push(' ');
            let mut rules = 0;
            for args in chain.text().split_inclusive('\n') {
                w.text.push_str(&prefix);
                w.text.push_str(args);
                rules += 1;
            }
            w.lines += rules;
            payload.rules_written += rules;
        }
        for rule in &s.delete_rules {
            let args: Vec<String> = rule.args.iter().map(|a| quote_arg(a)).collect();
            w.line(&["-D ", &rule.chain, " ", &args.join(" ")]);
        }
        payload.rules_deleted += s.delete_rules.len();
        for jump in &s.jumps {
            w.line(&[&jump.insert_line()]);
        }
        payload.rules_written += s.jumps.len();
        for name in &s.delete {
            w.line(&["-X ", name]);
        }
        w.line(&["COMMIT"]);
        payload.chains_written += s.write.len();
        payload.chains_deleted += s.delete.len();
    }
    payload.line_count = w.lines;
    payload.text = w.text;
    payload
}

struct Writer {
    text: String,
    lines: usize,
}

impl Writer {
    fn line(&mut self, parts: &[&str]) {
        for p in parts {
            self.text.push_str(p);
        }
        self.text.push('\n');
        self.lines += 1;
    }
}
