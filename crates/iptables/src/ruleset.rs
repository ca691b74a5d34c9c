//! The desired state as data: for each table we write, every chain we own and its rule lines.
//!
//! Rule lines are the exact `-A CHAIN …` text we hand to `iptables-restore`, so comparing two rulesets is
//! comparing what the kernel would be told, and a payload is a straight serialisation.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A table svcproxy writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableName {
    Filter,
    Nat,
}

impl TableName {
    /// In payload order: upstream writes filter before nat.
    pub const ALL: [TableName; 2] = [TableName::Filter, TableName::Nat];

    /// Where the table stands in [`TableName::ALL`], for per-table counts kept in arrays.
    pub fn position(self) -> usize {
        match self {
            TableName::Filter => 0,
            TableName::Nat => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TableName::Filter => "filter",
            TableName::Nat => "nat",
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rules of one chain: each rule's arguments after `-A NAME`, held as text with each rule ended by a
/// newline. The text is a range of one shared text, which all chains of a service port's part share: a
/// ruleset assembled from cached per-service parts reuses them without copying, comparing an unchanged chain
/// with its previous self is a pointer check, and rendering a service port costs one allocation for all its
/// chains instead of one each (110,000 at 10,000 Services). The `-A NAME ` each line starts with is not kept
/// (the name is the chain's key): it was 6 MB of 15 at 5,000 Services.
///
/// The number of rules is kept too: serialising a large ruleset sizes its buffer from the chains' lengths
/// alone, and counting rules there meant reading every chain's text twice, a cache miss apiece.
#[derive(Debug, Clone)]
pub struct Chain {
    shared: Arc<str>,
    start: u32,
    end: u32,
    rules: u32,
}

impl Default for Chain {
    fn default() -> Self {
        Chain::whole(Arc::from(""))
    }
}

impl PartialEq for Chain {
    fn eq(&self, other: &Self) -> bool {
        (Arc::ptr_eq(&self.shared, &other.shared) && self.start == other.start && self.end == other.end)
            || self.text() == other.text()
    }
}

impl Eq for Chain {}

/// A rule line's arguments after `-A NAME`, for a line of chain `name` (any chain's, if not).
fn rule_args<'l>(line: &'l str, name: &str) -> &'l str {
    let known = line.len() > name.len() + 3
        && line.as_bytes().get(name.len() + 3) == Some(&b' ')
        && line.get(3..name.len() + 3) == Some(name)
        && line.starts_with("-A ");
    if known {
        return &line[name.len() + 4..];
    }
    let rest = line.strip_prefix("-A ").unwrap_or(line);
    rest.split_once(' ').map_or("", |(_, args)| args)
}

impl Chain {
    /// Chain `name` of these rule lines, each spelled `-A NAME args…` (none holds a newline: rule text never
    /// does). Only the arguments are kept, so a line filed under the wrong chain would be silently renamed:
    /// debug builds (and so every test) check the names.
    pub fn new<S: AsRef<str>>(name: &str, lines: impl AsRef<[S]>) -> Self {
        let lines = lines.as_ref();
        let mut rules =
            String::with_capacity(lines.iter().map(|l| rule_args(l.as_ref(), name).len() + 1).sum());
        for line in lines {
            let line = line.as_ref();
            debug_assert!(!line.contains('\n'), "rule line with a newline: {line:?}");
            debug_assert!(
                line.strip_prefix("-A ")
                    .and_then(|l| l.strip_prefix(name))
                    .is_some_and(|l| l.is_empty() || l.starts_with(' ')),
                "not an append to {name}: {line:?}"
            );
            rules.push_str(rule_args(line, name));
            rules.push('\n');
        }
        Chain::whole(rules.into())
    }

    fn whole(shared: Arc<str>) -> Self {
        let end = u32::try_from(shared.len()).expect("a chain's rules are far below 4 GiB");
        let rules = count_rules(&shared);
        Chain {
            shared,
            start: 0,
            end,
            rules,
        }
    }

    /// The chains whose rules `text` holds at `ranges` (each a run of whole rules, as [`Chain::from_rules`]
    /// takes them), all sharing one copy of it.
    pub fn split<I>(text: &str, ranges: I) -> impl Iterator<Item = Chain> + use<I>
    where
        I: IntoIterator<Item = std::ops::Range<usize>>,
    {
        let shared: Arc<str> = Arc::from(text);
        ranges.into_iter().map(move |range| {
            debug_assert!(
                shared[range.clone()].is_empty() || shared[range.clone()].ends_with('\n'),
                "rule text not ended by a newline: {:?}",
                &shared[range.clone()]
            );
            let bound = |at: usize| u32::try_from(at).expect("a part's rules are far below 4 GiB");
            Chain {
                rules: count_rules(&shared[range.clone()]),
                shared: shared.clone(),
                start: bound(range.start),
                end: bound(range.end),
            }
        })
    }

    /// A chain from its rules' arguments, each ended by a newline (the form [`Chain::text`] gives back).
    pub fn from_rules(text: &str) -> Self {
        debug_assert!(
            text.is_empty() || text.ends_with('\n'),
            "rule text not ended by a newline: {text:?}"
        );
        debug_assert!(
            !text.lines().any(|l| l.starts_with("-A ")),
            "rule arguments spelled as a line: {text:?}"
        );
        Chain::whole(text.into())
    }

    /// Each rule's arguments after `-A NAME`.
    pub fn rules(&self) -> std::str::Lines<'_> {
        self.text().lines()
    }

    /// The rule lines, `-A NAME args…`, of this chain held under `name`.
    pub fn lines_in<'a>(&'a self, name: &'a str) -> impl Iterator<Item = String> + 'a {
        self.rules().map(move |args| append_line(name, args))
    }

    /// The rules' arguments, each ended by a newline.
    pub fn text(&self) -> &str {
        &self.shared[self.start as usize..self.end as usize]
    }

    /// Length of [`Chain::text`], without reading it.
    pub fn text_len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

fn count_rules(text: &str) -> u32 {
    // Counted in blocks of at most 255 bytes, each into one byte, which compiles to whole-vector compares and
    // adds; counting straight into a `usize` widened every byte to 64 bits, four bytes a step, and was half of
    // what rendering a service port spent outside hashing and spelling.
    let count: usize = text
        .as_bytes()
        .chunks(255)
        .map(|block| usize::from(block.iter().fold(0u8, |n, b| n + u8::from(*b == b'\n'))))
        .sum();
    u32::try_from(count).expect("a chain's rules are far below 4 GiB")
}

/// `-A NAME args`.
pub fn append_line(chain: &str, args: &str) -> String {
    if args.is_empty() {
        format!("-A {chain}")
    } else {
        format!("-A {chain} {args}")
    }
}

pub use crate::chain_name_text::ChainName;

/// The chains of one table, by name. Name order keeps output deterministic and happens to be the order
/// `iptables-save` lists user chains in, which makes payloads easy to hold against a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: TableName,
    pub chains: BTreeMap<ChainName, Chain>,
}

impl Table {
    pub fn new(name: TableName) -> Self {
        Table {
            name,
            chains: BTreeMap::new(),
        }
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.get(name)
    }

    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Chain::len).sum()
    }
}

/// Everything svcproxy wants in the kernel for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub filter: Table,
    pub nat: Table,
}

impl Default for Ruleset {
    fn default() -> Self {
        Ruleset {
            filter: Table::new(TableName::Filter),
            nat: Table::new(TableName::Nat),
        }
    }
}

impl Ruleset {
    pub fn table(&self, name: TableName) -> &Table {
        match name {
            TableName::Filter => &self.filter,
            TableName::Nat => &self.nat,
        }
    }

    pub fn table_mut(&mut self, name: TableName) -> &mut Table {
        match name {
            TableName::Filter => &mut self.filter,
            TableName::Nat => &mut self.nat,
        }
    }

    /// Rules of each table, in [`TableName::ALL`] order.
    pub fn rule_counts(&self) -> [usize; 2] {
        TableName::ALL.map(|t| self.table(t).rule_count())
    }

    /// Jumps (`-j`/`-g`) to a target that is neither a chain of the same table nor a built-in target or
    /// standard chain: as `(table, chain, target)`. A non-empty result means `iptables-restore` would refuse the
    /// payload, so it is an invariant check for tests and debug assertions.
    pub fn dangling_jumps(&self) -> Vec<(TableName, String, String)> {
        let mut out = Vec::new();
        for table in [&self.filter, &self.nat] {
            for (chain, rules) in &table.chains {
                for line in rules.rules() {
                    if let Some(target) = jump_target(line)
                        && !table.chains.contains_key(target)
                        && !is_builtin_target(target)
                    {
                        out.push((table.name, chain.to_string(), target.to_string()));
                    }
                }
            }
        }
        out
    }
}

/// The `-j`/`-g` target of a rule line we rendered, or of its arguments (our lines never quote a target).
pub fn jump_target(line: &str) -> Option<&str> {
    let mut words = line.split(' ');
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// Targets provided by extensions or standard verdicts rather than user chains.
pub fn is_builtin_target(target: &str) -> bool {
    matches!(
        target,
        "ACCEPT" | "DROP" | "REJECT" | "RETURN" | "MARK" | "MASQUERADE" | "DNAT" | "SNAT"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_split_from_one_text_are_its_ranges_and_compare_as_text() {
        let text = "-j A\n-j B\n-s 10.0.0.1 -j C\n";
        let chains: Vec<Chain> = Chain::split(text, [0..5, 5..5, 5..text.len()]).collect();
        assert_eq!(chains[0].text(), "-j A\n");
        assert!(chains[1].is_empty());
        assert_eq!(chains[1].len(), 0);
        assert_eq!(
            chains[2].rules().collect::<Vec<_>>(),
            ["-j B", "-s 10.0.0.1 -j C"]
        );
        assert_eq!(chains[2].len(), 2);
        // Same text elsewhere is the same chain; another range of the same text is not.
        assert_eq!(chains[0], Chain::from_rules("-j A\n"));
        assert_ne!(chains[0], chains[2]);
        assert_eq!(chains[1], Chain::default());
        let again: Vec<Chain> = Chain::split("-j B\n-j A\n", std::iter::once(5..10)).collect();
        assert_eq!(again[0], chains[0]);
    }

    #[test]
    fn rules_are_counted_across_blocks_of_any_length() {
        // Counting goes block by block into one byte each: every block boundary, and a block of nothing but
        // newlines (255 of them, the most a byte holds), must count exactly.
        for rules in [0usize, 1, 254, 255, 256, 511, 1_000] {
            let short = "\n".repeat(rules);
            assert_eq!(Chain::from_rules(&short).len(), rules, "{rules} empty rules");
            let long = "-m comment --comment x -j KUBE-SEP-ABCDEFGHIJKLMNOP\n".repeat(rules);
            assert_eq!(Chain::from_rules(&long).len(), rules, "{rules} rules");
        }
    }
}
