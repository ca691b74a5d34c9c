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
use crate::parallel::{for_each_in_parallel, threads_for};
use crate::ruleset::{Chain, ChainName, Ruleset, TableName};
use crate::save_parser::{SavedRule, quote_arg};

/// One restore input and what it does.
///
/// Held as bytes, not as a `String`: the large ones are written by several threads into regions of one
/// buffer, and making a `String` of that buffer would check all of it (33 MB at 10,000 services, a fifth of
/// the time rendering them took). Every byte comes from a `str`, so [`Payload::text`] never fails; the kernel
/// is handed [`Payload::as_bytes`], unchecked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Payload {
    bytes: Vec<u8>,
    pub line_count: usize,
    /// Chains declared and rewritten (not counting the ones deleted).
    pub chains_written: usize,
    pub chains_deleted: usize,
    /// `-A` and `-I` lines.
    pub rules_written: usize,
    /// Rules of the ruleset's own chains written, per table in [`TableName::ALL`] order: neither the jumps
    /// from the built-in chains nor the seal (upstream's `sync_proxy_rules_iptables_last` counts the same).
    pub chain_rules_by_table: [usize; 2],
    /// `-D` lines.
    pub rules_deleted: usize,
}

impl Payload {
    /// A payload spelled out whole, with its lines counted (nothing else is: the caller knows what it wrote).
    pub fn from_text(text: impl Into<String>) -> Self {
        let text: String = text.into();
        Payload {
            line_count: text.lines().count(),
            bytes: text.into_bytes(),
            ..Payload::default()
        }
    }

    /// What `iptables-restore` reads.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The payload as text. Checks every byte, so it is for diagnostics and tests, not for the way to the
    /// kernel.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.bytes).expect("a payload is made of strs")
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Nothing to send: the kernel already matches.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Lines in order, each without its newline; checked one by one, so quoting the first lines of a large
    /// payload does not check the rest.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.bytes.split_inclusive(|b| *b == b'\n').map(|line| {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            std::str::from_utf8(line).expect("a payload is made of strs")
        })
    }

    /// Inserts `text` at byte `at`, which must be the start of a line.
    pub(crate) fn insert_lines(&mut self, at: usize, text: &str) {
        debug_assert!(
            at == 0 || self.bytes[at - 1] == b'\n',
            "not at a line's start: {at}"
        );
        self.bytes.splice(at..at, text.bytes());
    }

    /// Line `n`, 1-based as `iptables-restore` counts in its "line N failed" messages.
    pub fn line(&self, n: usize) -> Option<&str> {
        n.checked_sub(1).and_then(|i| self.lines().nth(i))
    }

    /// Lines `n - ctx ..= n + ctx` (clamped) with their numbers, for quoting a failure in context.
    pub fn lines_around(&self, n: usize, ctx: usize) -> Vec<(usize, &str)> {
        let first = n.saturating_sub(ctx).max(1);
        let last = n.saturating_add(ctx);
        self.lines()
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
    /// The chains to write, each name as the bytes that go into the payload: a name held inline is checked as
    /// UTF-8 each time it is read as a `str`, which was a tenth of writing a full payload (110,000 names).
    pub(crate) write: Vec<(&'a [u8], &'a Chain)>,
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
            write: t.chains.iter().map(|(n, c)| (n.as_bytes(), c)).collect(),
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
                    write.push((name.as_bytes(), chain));
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
    // A section is written as its table line, the declarations of the chains it writes (3 of the 33 MB at
    // 10,000 services), those of the chains it deletes, the rules of the chains it writes (30 MB), and its
    // tail (deletions, jumps, COMMIT). Everything is measured first and written once into a buffer of the
    // exact size, the declarations and rules split over the cores in contiguous runs of chains: a buffer grown
    // by pushing, or filled per thread and then joined, would take every page fault twice or on one core.
    let sections: Vec<&Section<'_>> = sections.iter().filter(|s| !s.is_empty()).collect();
    let mut payload = Payload::default();
    let mut pieces = Vec::with_capacity(sections.len());
    let mut total = 0;
    let mut lines = 0;
    for s in &sections {
        let mut head = Writer::default();
        head.line(&["*", s.table.as_str()]);
        let runs = rule_runs(&s.write);
        let mut deleted = Writer::default();
        for name in &s.delete {
            deleted.line(&[":", name, " - [0:0]"]);
        }
        let mut tail = Writer::default();
        for rule in &s.delete_rules {
            let args: Vec<String> = rule.args.iter().map(|a| quote_arg(a)).collect();
            tail.line(&["-D ", &rule.chain, " ", &args.join(" ")]);
        }
        for jump in &s.jumps {
            tail.line(&[&jump.insert_line()]);
        }
        for name in &s.delete {
            tail.line(&["-X ", name]);
        }
        tail.line(&["COMMIT"]);
        let rules: usize = runs.iter().map(|r| r.rules).sum();
        total += head.text.len()
            + runs.iter().map(|r| r.declared + r.bytes).sum::<usize>()
            + deleted.text.len()
            + tail.text.len();
        lines += head.lines + s.write.len() + deleted.lines + rules + tail.lines;
        payload.rules_written += rules + s.jumps.len();
        payload.chain_rules_by_table[s.table.position()] += rules;
        payload.rules_deleted += s.delete_rules.len();
        payload.chains_written += s.write.len();
        payload.chains_deleted += s.delete.len();
        pieces.push(([head.text, deleted.text, tail.text], runs));
    }
    let text = if pieces.iter().any(|(_, runs)| runs.len() > 1) {
        // Zeroed by the allocator, whose fresh pages are zero already: nothing is written twice, and the
        // threads take the page faults of their own regions.
        let mut text = vec![0u8; total];
        let mut rest = text.as_mut_slice();
        let mut fills = Vec::new();
        for ([head, deleted, tail], runs) in &pieces {
            rest = put(rest, head.as_bytes());
            let mut declarations = Vec::with_capacity(runs.len());
            for run in runs {
                let (region, after) = rest.split_at_mut(run.declared);
                declarations.push(region);
                rest = after;
            }
            rest = put(rest, deleted.as_bytes());
            for (run, declared) in runs.iter().zip(declarations) {
                let (region, after) = rest.split_at_mut(run.bytes);
                fills.push((run, declared, region));
                rest = after;
            }
            rest = put(rest, tail.as_bytes());
        }
        debug_assert!(
            rest.is_empty(),
            "payload measured {total} bytes, {} left over",
            rest.len()
        );
        for_each_in_parallel(fills, |(run, declared, region)| {
            write_declarations(run.chains, declared);
            write_rules(run.chains, region);
        });
        text
    } else {
        // On one thread the buffer is filled in order: memory the allocator hands back from earlier payloads
        // is not zeroed first, and each run of rules is zeroed just before it is written, while in cache.
        let mut text = Vec::with_capacity(total);
        for ([head, deleted, tail], runs) in &pieces {
            text.extend_from_slice(head.as_bytes());
            for run in runs {
                let start = text.len();
                text.resize(start + run.declared, 0);
                write_declarations(run.chains, &mut text[start..]);
            }
            text.extend_from_slice(deleted.as_bytes());
            for run in runs {
                let start = text.len();
                text.resize(start + run.bytes, 0);
                write_rules(run.chains, &mut text[start..]);
            }
            text.extend_from_slice(tail.as_bytes());
        }
        text
    };
    payload.line_count = lines;
    payload.bytes = text;
    payload
}

/// What follows a chain's name in its declaration: no policy (user chains have none), zero counters.
const DECLARED: &[u8] = b" - [0:0]\n";

/// The fewest chains a thread writes the rules of: a section with fewer than twice as many is written on the
/// calling thread.
const CHAINS_PER_THREAD: usize = 8_192;

/// A run of a section's written chains, and the size of their declarations and rule lines.
struct RuleRun<'s, 'a> {
    chains: &'s [(&'a [u8], &'a Chain)],
    declared: usize,
    bytes: usize,
    rules: usize,
}

/// The written chains in one run per core (one, for a section with few), measured.
fn rule_runs<'s, 'a>(write: &'s [(&'a [u8], &'a Chain)]) -> Vec<RuleRun<'s, 'a>> {
    let threads = threads_for(write.len(), CHAINS_PER_THREAD);
    write
        .chunks(write.len().div_ceil(threads).max(1))
        .map(|chains| {
            // From the chains' lengths, without reading their texts.
            let (mut declared, mut bytes, mut rules) = (0, 0, 0);
            for (name, chain) in chains {
                declared += 1 + name.len() + DECLARED.len();
                // `-A NAME ` before each rule's arguments, which end with their newline.
                bytes += chain.text_len() + chain.len() * (name.len() + 4);
                rules += chain.len();
            }
            RuleRun {
                chains,
                declared,
                bytes,
                rules,
            }
        })
        .collect()
}

/// Writes the declarations of `chains` into `out`, exactly as long as they are.
fn write_declarations(chains: &[(&[u8], &Chain)], mut out: &mut [u8]) {
    for (name, _) in chains {
        out = put(out, b":");
        out = put(out, name);
        out = put(out, DECLARED);
    }
    debug_assert!(out.is_empty(), "declarations measured longer than written");
}

/// Writes the rule lines of `chains` into `out`, exactly as long as they are.
fn write_rules(chains: &[(&[u8], &Chain)], mut out: &mut [u8]) {
    // `-A NAME ` spelled once per chain, in a buffer of a fixed size: iptables names are at most 28 bytes,
    // so it always fits, and copying all of it (its tail is overwritten by the rule) is a few vector moves
    // instead of a call to `memcpy` per line.
    const PREFIX: usize = 32;
    let mut prefix = [0u8; PREFIX];
    for (name, chain) in chains {
        let len = name.len() + 4;
        if len > PREFIX {
            for args in rule_lines(chain.text().as_bytes()) {
                out = put(out, b"-A ");
                out = put(out, name);
                out = put(out, b" ");
                out = put(out, args);
            }
            continue;
        }
        prefix[..3].copy_from_slice(b"-A ");
        prefix[3..len - 1].copy_from_slice(name);
        prefix[len - 1] = b' ';
        for args in rule_lines(chain.text().as_bytes()) {
            if out.len() >= PREFIX {
                out[..PREFIX].copy_from_slice(&prefix);
                out = &mut out[len..];
            } else {
                out = put(out, &prefix[..len]);
            }
            out = put(out, args);
        }
    }
    debug_assert!(out.is_empty(), "rule lines measured longer than written");
}

/// A chain's rules, each with its newline. `str::split_inclusive('\n')` compares every match against the
/// encoded `char` with a call to `memcmp`: 320,000 calls a full render, a tenth of writing the payload.
fn rule_lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', text).map(move |end| {
        let line = &text[start..=end];
        start = end + 1;
        line
    })
}

/// Copies `bytes` to the start of `out` and gives back the rest.
fn put<'o>(out: &'o mut [u8], bytes: &[u8]) -> &'o mut [u8] {
    let (here, rest) = out.split_at_mut(bytes.len());
    here.copy_from_slice(bytes);
    rest
}

#[derive(Default)]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload spelled the plain way, one line after another.
    fn spelled(ruleset: &Ruleset) -> String {
        let mut out = String::new();
        for table in TableName::ALL {
            let chains = &ruleset.table(table).chains;
            out.push_str(&format!("*{table}\n"));
            for name in chains.keys() {
                out.push_str(&format!(":{name} - [0:0]\n"));
            }
            for (name, chain) in chains {
                for line in chain.lines_in(name) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    #[test]
    fn a_payload_reads_back_line_by_line_as_its_text() {
        for text in [
            "",
            "COMMIT\n",
            "*nat\n:A - [0:0]\nCOMMIT\n",
            "*nat\nno newline",
            "\n\nx\n",
        ] {
            let payload = Payload::from_text(text);
            assert_eq!(payload.text(), text);
            assert_eq!(payload.len(), text.len());
            assert_eq!(
                payload.lines().collect::<Vec<_>>(),
                text.lines().collect::<Vec<_>>(),
                "{text:?}"
            );
            assert_eq!(payload.line_count, text.lines().count());
        }
        let mut payload = Payload::from_text("*nat\nCOMMIT\n");
        payload.insert_lines(5, ":A - [0:0]\n");
        assert_eq!(payload.line(2), Some(":A - [0:0]"));
        assert_eq!(
            payload.lines_around(2, 1),
            [(1, "*nat"), (2, ":A - [0:0]"), (3, "COMMIT")]
        );
    }

    #[test]
    fn a_large_section_written_on_several_threads_reads_as_one_written_in_order() {
        let mut ruleset = Ruleset::default();
        // Enough chains for every core to take a run, with rules of different lengths and an empty chain.
        for i in 0..5 * CHAINS_PER_THREAD {
            let rules: String = (0..i % 4)
                .map(|r| format!("-m comment --comment c{i}-{r} -j X\n"))
                .collect();
            ruleset
                .nat
                .chains
                .insert(format!("KUBE-SEP-{i:016}").into(), Chain::from_rules(&rules));
        }
        ruleset
            .filter
            .chains
            .insert("KUBE-FORWARD".into(), Chain::from_rules("-j ACCEPT\n"));
        let payload = full_payload(&ruleset, &[], &[]);
        let want = spelled(&ruleset);
        assert!(
            payload.text() == want,
            "the payload differs from the one spelled in order"
        );
        assert_eq!(payload.line_count, want.lines().count());
        assert_eq!(payload.chains_written, 5 * CHAINS_PER_THREAD + 1);
        assert_eq!(payload.rules_written, ruleset.nat.rule_count() + 1);
        assert_eq!(payload.chain_rules_by_table, [1, ruleset.nat.rule_count()]);
    }
}
