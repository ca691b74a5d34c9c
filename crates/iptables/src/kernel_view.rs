//! What the kernel holds, read from an `iptables-save` dump against the ruleset we expect to find there.
//!
//! Full syncs and read-backs only ever ask two things of the rules in our own chains: does the chain exist, and
//! are its rules ours in substance (the spelling-independent form of [`crate::canonical`])? Every other rule
//! (built-in chains, other writers' chains, stale chains of ours) is needed whole, by garbage collection and the
//! jump check. So the rules of our chains are compared as they are read and dropped: holding them as
//! [`SavedRule`]s took 125 MB at 5,000 services × 10 endpoints (160,000 rules, a dozen allocations each), more
//! than everything else the proxy holds together.

use std::collections::HashMap;

use crate::canonical::canonical_rule;
use crate::chain_name::packed_service_chain;
use crate::ruleset::{ChainName, Ruleset, TableName};
use crate::save_parser::{
    SaveParseError, SaveReader, SavedRule, SavedRuleset, SavedTable, parse_rule, strip_counters,
};
use crate::verify::canonical_lines;

/// How one chain of the expected ruleset was found in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The kernel has no such chain.
    Missing,
    /// The kernel's rules are the expected ones in substance.
    Same,
    /// The chain exists with different rules; `rules` is how many it has.
    Different { rules: usize },
}

/// A dump as full syncs and read-backs need it.
#[derive(Debug, Clone, Default)]
pub struct KernelView {
    /// Every table and chain of the dump, with every rule except those of the user chains the expected ruleset
    /// has (their outcome is in `compared`). Garbage collection and the jump check read this.
    pub saved: SavedRuleset,
    /// By table (in [`TableName::ALL`] order): how the expected chains the dump declares compared, for those
    /// declared here instead of in `saved` (which would hold each name as a string in a map: 5 MB at 5,000
    /// services × 10 endpoints) and for those in `saved` that differ. An expected chain in `saved` and not
    /// here is the same. One map, filled as the dump is read and kept as it is: a second one for the view
    /// was the read-back's peak.
    compared: [Compared; 2],
}

fn index(table: TableName) -> usize {
    match table {
        TableName::Filter => 0,
        TableName::Nat => 1,
    }
}

impl KernelView {
    /// Reads a whole dump against `expected`.
    pub fn parse(text: &str, expected: &Ruleset) -> Result<Self, SaveParseError> {
        let mut reader = KernelReader::new(expected);
        for line in text.lines() {
            reader.line(line);
        }
        reader.finish()
    }

    /// A dump parsed elsewhere (a few listed chains, say), compared with `expected`.
    pub fn from_saved(saved: SavedRuleset, expected: &Ruleset) -> Self {
        KernelReader::new(expected).conclude(saved)
    }

    /// How the kernel holds chain `name` of `table`: only meaningful for chains of the ruleset this view was
    /// read against.
    pub fn found(&self, table: TableName, name: &str) -> Found {
        match self.compared[index(table)].get(name) {
            Some(p) if p.is_same() => Found::Same,
            Some(p) => Found::Different {
                rules: p.rules as usize,
            },
            None if self
                .saved
                .table(table.as_str())
                .is_some_and(|t| t.chains.contains_key(name)) =>
            {
                Found::Same
            }
            None => Found::Missing,
        }
    }
}

/// How each expected chain compared (or how far it has been), by name. Our per-service chains, nearly all of
/// them, are keyed by their packed names ([`packed_service_chain`]): held by name, the map was 3.2 MB at
/// 5,000 services, among the largest things a read-back holds.
#[derive(Debug, Clone, Default)]
struct Compared {
    service: HashMap<[u8; 11], Progress>,
    other: HashMap<ChainName, Progress>,
}

impl Compared {
    fn get(&self, name: &str) -> Option<&Progress> {
        match packed_service_chain(name.as_bytes()) {
            Some(key) => self.service.get(&key),
            None => self.other.get(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Chain `name`'s entry, `fresh` put in first when it has none.
    fn entry(&mut self, name: &ChainName, fresh: Progress) -> &mut Progress {
        match packed_service_chain(name.as_bytes()) {
            Some(key) => self.service.entry(key).or_insert(fresh),
            None => self.other.entry(name.clone()).or_insert(fresh),
        }
    }

    fn insert(&mut self, name: &ChainName, progress: Progress) {
        *self.entry(name, progress) = progress;
    }

    fn remove(&mut self, name: &str) {
        match packed_service_chain(name.as_bytes()) {
            Some(key) => self.service.remove(&key),
            None => self.other.remove(name),
        };
    }
}

/// How far the kernel's rules of one expected chain have been matched against it. Counts fit 32 bits (a chain
/// holds far fewer rules): 55,000 of these at 5,000 services.
#[derive(Debug, Clone, Copy)]
struct Progress {
    rules: u32,
    /// How many canonical lines the expected chain has.
    wanted: u32,
    different: bool,
}

impl Progress {
    fn is_same(&self) -> bool {
        !self.different && self.rules == self.wanted
    }

    /// A chain compared whole at once and found different, with `rules` rules.
    fn differing(rules: usize) -> Self {
        let rules = u32::try_from(rules).unwrap_or(u32::MAX);
        Progress {
            rules,
            wanted: rules,
            different: true,
        }
    }
}

/// The canonical lines of the expected chain compared last: `iptables-save` prints a chain's rules together, so
/// each chain's lines are worked out once, and only one chain's at a time is held.
type Current = Option<(TableName, ChainName, Vec<Vec<String>>)>;

/// Reads a dump line by line (as it arrives from `iptables-save`) into a [`KernelView`] of `expected`.
pub struct KernelReader<'a> {
    expected: &'a Ruleset,
    reader: SaveReader,
    /// By table: how far each expected user chain the dump declared has been matched (an entry for every such
    /// chain, from its declaration on).
    progress: [Compared; 2],
    /// The table being read.
    table: Option<TableName>,
    current: Current,
    /// The first parse error; the lines after it are ignored, as `parse_save` stops at it.
    error: Option<SaveParseError>,
}

impl<'a> KernelReader<'a> {
    pub fn new(expected: &'a Ruleset) -> Self {
        KernelReader {
            expected,
            reader: SaveReader::default(),
            progress: Default::default(),
            table: None,
            current: None,
            error: None,
        }
    }

    /// Reads the next line of the dump (without its newline).
    pub fn line(&mut self, raw: &str) {
        if self.error.is_some() {
            return;
        }
        if self.intercepted(raw) {
            // The parser still counts the line, so errors name the lines `parse_save` would.
            if let Err(e) = self.reader.line("", |_, _, rule| Some(rule)) {
                self.error = Some(e);
            }
            return;
        }
        let expected = self.expected;
        let progress = &mut self.progress;
        let current = &mut self.current;
        let result = self.reader.line(raw, |table, saved, rule| {
            fold(expected, progress, current, table, saved, rule)
        });
        if let Err(e) = result {
            self.error = Some(e);
        }
    }

    /// Handles the declarations of expected user chains and their rules here, without the generic parser:
    /// whether `raw` was one.
    fn intercepted(&mut self, raw: &str) -> bool {
        let trimmed = raw.trim();
        if let Some(name) = trimmed.strip_prefix('*') {
            self.table = TableName::ALL.into_iter().find(|t| t.as_str() == name.trim());
            return false;
        }
        if trimmed == "COMMIT" {
            self.table = None;
            return false;
        }
        let Some(t) = self.table else {
            return false;
        };
        let chains = &self.expected.table(t).chains;
        if let Some(decl) = trimmed.strip_prefix(':') {
            let mut words = decl.split_whitespace();
            let (Some(name), Some("-")) = (words.next(), words.next()) else {
                return false;
            };
            let Some((key, chain)) = chains.get_key_value(name) else {
                return false;
            };
            self.progress[index(t)].entry(
                key,
                Progress {
                    rules: 0,
                    wanted: u32::try_from(chain.len()).unwrap_or(u32::MAX),
                    different: false,
                },
            );
            return true;
        }
        let rule_text = strip_counters(trimmed);
        let Some(rest) = rule_text.strip_prefix("-A ") else {
            return false;
        };
        let name = rest.split_whitespace().next().unwrap_or_default();
        if !self.progress[index(t)].contains(name) {
            return false;
        }
        let key = ChainName::from(name);
        match parse_rule(rule_text, self.reader.lines_read() + 1) {
            Ok(rule) => fold_rule(
                self.expected,
                &mut self.progress,
                &mut self.current,
                t,
                &key,
                rule,
            ),
            Err(e) => self.error = Some(e),
        }
        true
    }

    /// The view, or the first error `parse_save` would have reported for the same lines.
    pub fn finish(mut self) -> Result<KernelView, SaveParseError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let saved = std::mem::take(&mut self.reader).finish()?;
        Ok(self.conclude(saved))
    }

    /// The view of `saved`, whose rules of expected user chains were folded into `progress` as they were read
    /// (or none were, when `saved` was parsed elsewhere).
    fn conclude(mut self, saved: SavedRuleset) -> KernelView {
        let mut compared: [Compared; 2] = Default::default();
        for table in TableName::ALL {
            let ours = self.expected.table(table);
            // The chains whose declarations were taken here are all in it already, their rules all folded.
            let mut progress = std::mem::take(&mut self.progress[index(table)]);
            let Some(theirs) = saved.table(table.as_str()) else {
                compared[index(table)] = progress;
                continue;
            };
            // Rules of expected chains that were kept (built-in chains, or a dump parsed elsewhere) are compared
            // the way `verify` and staging always compared them.
            let mut kept: HashMap<&str, Vec<&SavedRule>> = HashMap::new();
            for rule in &theirs.rules {
                if ours.chains.contains_key(rule.chain.as_str()) {
                    kept.entry(rule.chain.as_str()).or_default().push(rule);
                }
            }
            for name in theirs.chains.keys() {
                let Some((key, chain)) = ours.chains.get_key_value(name.as_str()) else {
                    continue;
                };
                let kept = kept.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
                let (differs, rules) = match progress.get(name.as_str()) {
                    Some(p) if kept.is_empty() => (!p.is_same(), p.rules as usize),
                    // Some rules folded and some kept means the chain was declared both as a user chain and as
                    // a built-in one, which no `iptables-save` prints: never the same as ours.
                    Some(p) => (true, p.rules as usize + kept.len()),
                    None => {
                        let found: Vec<Vec<String>> = kept.iter().map(|r| canonical_rule(&r.args)).collect();
                        (found != canonical_lines(chain), found.len())
                    }
                };
                if differs {
                    progress.insert(key, Progress::differing(rules));
                } else {
                    progress.remove(name.as_str());
                }
            }
            compared[index(table)] = progress;
        }
        KernelView { saved, compared }
    }
}

/// Compares a rule of an expected user chain with that chain and drops it; hands every other rule back.
fn fold(
    expected: &Ruleset,
    progress: &mut [Compared; 2],
    current: &mut Current,
    table: &str,
    saved: &SavedTable,
    rule: SavedRule,
) -> Option<SavedRule> {
    let Some(t) = TableName::ALL.into_iter().find(|t| t.as_str() == table) else {
        return Some(rule);
    };
    // Built-in chains keep their rules: the jump check and garbage collection read them.
    if saved.chains.get(&rule.chain).is_some_and(Option::is_some) {
        return Some(rule);
    }
    let Some(name) = expected
        .table(t)
        .chains
        .get_key_value(rule.chain.as_str())
        .map(|(k, _)| k.clone())
    else {
        return Some(rule);
    };
    fold_rule(expected, progress, current, t, &name, rule);
    None
}

/// Compares a rule of expected chain `name` of table `t` with that chain.
fn fold_rule(
    expected: &Ruleset,
    progress: &mut [Compared; 2],
    current: &mut Current,
    t: TableName,
    name: &ChainName,
    rule: SavedRule,
) {
    let Some(chain) = expected.table(t).chains.get(name) else {
        return;
    };
    if !matches!(current, Some((ct, cn, _)) if *ct == t && cn == name) {
        *current = None;
    }
    let (_, _, lines) = current.get_or_insert_with(|| (t, name.clone(), canonical_lines(chain)));
    let p = progress[index(t)].entry(
        name,
        Progress {
            rules: 0,
            wanted: u32::try_from(lines.len()).unwrap_or(u32::MAX),
            different: false,
        },
    );
    if !p.different && lines.get(p.rules as usize) != Some(&canonical_rule(&rule.args)) {
        p.different = true;
    }
    p.rules = p.rules.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::Chain;
    use crate::save_parser::parse_save;

    fn expected() -> Ruleset {
        let mut r = Ruleset::default();
        for (name, lines) in [
            (
                "KUBE-SVC-A",
                vec!["-A KUBE-SVC-A -m comment --comment \"ns/a:p\" -j KUBE-SEP-A"],
            ),
            (
                "KUBE-SEP-A",
                vec![
                    "-A KUBE-SEP-A -s 10.244.0.1 -j KUBE-MARK-MASQ",
                    "-A KUBE-SEP-A -p tcp -j DNAT --to-destination 10.244.0.1:80",
                ],
            ),
            ("KUBE-SEP-B", vec!["-A KUBE-SEP-B -j KUBE-MARK-MASQ"]),
            ("KUBE-SEP-C", vec!["-A KUBE-SEP-C -j KUBE-MARK-MASQ"]),
            ("KUBE-SEP-D", vec![]),
            ("KUBE-SEP-E", vec!["-A KUBE-SEP-E -j KUBE-MARK-MASQ"]),
            (
                "KUBE-SEP-F",
                vec!["-A KUBE-SEP-F -j KUBE-MARK-MASQ", "-A KUBE-SEP-F -j RETURN"],
            ),
            ("PREROUTING", vec!["-A PREROUTING -j KUBE-SERVICES"]),
        ] {
            r.nat.chains.insert(name.into(), Chain::new(name, lines));
        }
        r
    }

    /// A (spelled as `iptables-save` spells it: `/32`), B (an extra rule), C (missing), D (empty), E (another
    /// rule), F (its rules apart, in order), a built-in chain of ours and a foreign chain.
    const DUMP: &str = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-A - [0:0]\n\
        :KUBE-SEP-B - [0:0]\n:KUBE-SEP-D - [0:0]\n:KUBE-SEP-E - [0:0]\n:KUBE-SEP-F - [0:0]\n:OTHER - [0:0]\n\
        -A PREROUTING -j KUBE-SERVICES\n-A KUBE-SVC-A -m comment --comment ns/a:p -j KUBE-SEP-A\n\
        -A KUBE-SEP-F -j KUBE-MARK-MASQ\n\
        -A KUBE-SEP-A -s 10.244.0.1/32 -j KUBE-MARK-MASQ\n-A KUBE-SEP-A -p tcp -j DNAT --to-destination 10.244.0.1:80\n\
        -A KUBE-SEP-B -j KUBE-MARK-MASQ\n-A KUBE-SEP-B -j RETURN\n-A KUBE-SEP-E -j DROP\n\
        -A OTHER -j KUBE-SEP-A\n-A KUBE-SEP-F -j RETURN\nCOMMIT\n";

    #[test]
    fn folds_our_chains_and_keeps_every_other_rule() {
        let expected = expected();
        let view = KernelView::parse(DUMP, &expected).unwrap();
        let found = |name: &str| view.found(TableName::Nat, name);
        assert_eq!(found("KUBE-SVC-A"), Found::Same);
        assert_eq!(found("KUBE-SEP-A"), Found::Same);
        assert_eq!(found("KUBE-SEP-B"), Found::Different { rules: 2 });
        assert_eq!(found("KUBE-SEP-C"), Found::Missing);
        assert_eq!(found("KUBE-SEP-D"), Found::Same);
        assert_eq!(found("KUBE-SEP-E"), Found::Different { rules: 1 });
        assert_eq!(found("KUBE-SEP-F"), Found::Same);
        assert_eq!(found("PREROUTING"), Found::Same);
        assert_eq!(view.found(TableName::Filter, "KUBE-SEP-A"), Found::Missing);
        let nat = view.saved.table("nat").unwrap();
        let kept: Vec<&str> = nat.rules.iter().map(|r| r.chain.as_str()).collect();
        assert_eq!(kept, ["PREROUTING", "OTHER"]);
        // The expected user chains are known declared without a string each in the dump's map.
        let declared: Vec<&str> = nat.chains.keys().map(String::as_str).collect();
        assert_eq!(declared, ["OTHER", "PREROUTING"]);
    }

    #[test]
    fn reading_as_it_streams_agrees_with_comparing_a_whole_parse() {
        let expected = expected();
        let streamed = KernelView::parse(DUMP, &expected).unwrap();
        let whole = KernelView::from_saved(parse_save(DUMP).unwrap(), &expected);
        for table in TableName::ALL {
            for name in expected.table(table).chains.keys() {
                assert_eq!(
                    streamed.found(table, name),
                    whole.found(table, name),
                    "{table}/{name}"
                );
            }
        }
    }

    #[test]
    fn errors_are_those_of_parse_save() {
        let expected = expected();
        for text in [
            "*nat\n:KUBE-SEP-A - [0:0]\n-A KUBE-SEP-A --comment \"a\n-A KUBE-SEP-A -j\nCOMMIT\n",
            "*nat\n-A KUBE-SEP-A -j Y\nCOMMIT\n",
            "*nat\n:KUBE-SEP-A - [0:0]\n",
        ] {
            assert_eq!(
                KernelView::parse(text, &expected).unwrap_err(),
                parse_save(text).unwrap_err()
            );
        }
    }
}
