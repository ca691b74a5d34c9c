//! Parser for what `nft list ruleset` / `nft list table …` print, into the same [`Ruleset`] shape we render.
//!
//! The printed form differs from what we write: commands become nested blocks, priorities may be symbolic
//! (`dstnat - 10`), timeouts are humanised (`10m`), element lists wrap over several lines and carry
//! `timeout`/`expires` annotations in dynamic sets, and `-a` adds `# handle N` comments. Rule lines themselves
//! are printed in the canonical spelling our renderer already uses, so they are kept verbatim.
//!
//! Objects we never write (flowtables, counters, quotas, …) are skipped, so a whole host's ruleset parses.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::ruleset::{
    BaseChain, Chain, ChainType, CompactString, Element, Family, Hook, PRIORITY_DSTNAT, PRIORITY_SRCNAT,
    Policy, Ruleset, Set, SetKind,
};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ListingError {
    #[error("line {line}: unexpected {text:?}")]
    Unexpected { line: usize, text: String },
    #[error("line {line}: bad table header {text:?}")]
    TableHeader { line: usize, text: String },
    #[error("line {line}: bad base chain definition {text:?}")]
    BaseChain { line: usize, text: String },
    #[error("line {line}: bad set property {text:?}")]
    SetProperty { line: usize, text: String },
    #[error("line {line}: bad element {text:?}")]
    Element { line: usize, text: String },
    #[error("listing ends inside a block")]
    Unterminated,
}

/// Every table of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub tables: Vec<Ruleset>,
}

impl Listing {
    pub fn table(&self, family: Family, name: &str) -> Option<&Ruleset> {
        self.tables.iter().find(|t| t.family == family && t.name == name)
    }
}

/// Removes `# handle N` (printed by `nft -a`) and surrounding blanks.
fn clean(line: &str) -> &str {
    let line = match line.find(" # handle ") {
        Some(i) => &line[..i],
        None => line,
    };
    line.trim()
}

/// Splits off a `"…"` string at the start of `s`, returning its contents and the rest.
pub(crate) fn quoted(s: &str) -> Option<(String, &str)> {
    let rest = s.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some((rest[..end].to_string(), &rest[end + 1..]))
}

/// Braces opened minus braces closed, outside quoted strings.
fn brace_balance(s: &str) -> i32 {
    let mut depth = 0;
    let mut in_quote = false;
    for c in s.chars() {
        match c {
            '"' => in_quote = !in_quote,
            '{' if !in_quote => depth += 1,
            '}' if !in_quote => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// Splits on commas outside quotes and nested braces.
pub(crate) fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut in_quote = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quote = !in_quote,
            '{' if !in_quote => depth += 1,
            '}' if !in_quote => depth -= 1,
            ',' if !in_quote && depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = s[start..].trim();
    if !last.is_empty() {
        out.push(last);
    }
    out
}

/// `10m`, `3h`, `1d2h3m4s`, `500ms` → whole seconds (rounded down).
pub fn parse_duration(text: &str) -> Option<u64> {
    let mut total_ms: u64 = 0;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: u64 = number.parse().ok()?;
        number.clear();
        let unit_ms = match c {
            'd' => 86_400_000,
            'h' => 3_600_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            's' => 1000,
            _ => return None,
        };
        total_ms = total_ms.checked_add(value.checked_mul(unit_ms)?)?;
        any = true;
    }
    if !number.is_empty() {
        // A bare number is seconds.
        total_ms = total_ms.checked_add(number.parse::<u64>().ok()?.checked_mul(1000)?)?;
        any = true;
    }
    any.then_some(total_ms / 1000)
}

/// `dstnat - 10`, `-110`, `srcnat`, `filter + 5` → number.
pub fn parse_priority(text: &str) -> Option<i32> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let named = |w: &str| -> Option<i32> {
        Some(match w {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => PRIORITY_DSTNAT,
            "filter" => 0,
            "security" => 50,
            "srcnat" => PRIORITY_SRCNAT,
            _ => w.parse().ok()?,
        })
    };
    match words.as_slice() {
        [one] => named(one),
        [base, "+", n] => Some(named(base)? + n.parse::<i32>().ok()?),
        [base, "-", n] => Some(named(base)? - n.parse::<i32>().ok()?),
        _ => None,
    }
}

/// `type filter hook input priority -110; policy accept;`
pub(crate) fn parse_base_chain(text: &str) -> Option<BaseChain> {
    let mut chain_type = None;
    let mut hook = None;
    let mut priority = None;
    let mut policy = Policy::Accept;
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(p) = part.strip_prefix("policy ") {
            policy = match p.trim() {
                "accept" => Policy::Accept,
                "drop" => Policy::Drop,
                _ => return None,
            };
            continue;
        }
        let (head, prio) = part.split_once(" priority ")?;
        priority = Some(parse_priority(prio)?);
        let words: Vec<&str> = head.split_whitespace().collect();
        // `type X hook Y` optionally followed by `device Z` (netdev).
        if words.len() < 4 || words[0] != "type" || words[2] != "hook" {
            return None;
        }
        chain_type = ChainType::parse(words[1]);
        hook = Hook::parse(words[3]);
    }
    Some(BaseChain {
        chain_type: chain_type?,
        hook: hook?,
        priority: priority?,
        policy,
    })
}

/// One printed element: `key [timeout T] [expires E] [counter …] [comment "c"] [: value]`.
pub(crate) fn parse_element(text: &str) -> Option<(CompactString, Element)> {
    // The value follows the first ` : ` outside quotes (IPv6 keys contain bare colons, never ` : `).
    let mut in_quote = false;
    let mut split_at = None;
    let bytes = text.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' => in_quote = !in_quote,
            b':' if !in_quote && i > 0 && bytes[i - 1] == b' ' && bytes.get(i + 1) == Some(&b' ') => {
                split_at = Some(i);
                break;
            }
            _ => {}
        }
    }
    let (key_part, value) = match split_at {
        Some(i) => (&text[..i], Some(text[i + 1..].trim().to_string())),
        None => (text, None),
    };
    let mut comment = None;
    let mut key_words: Vec<&str> = Vec::new();
    let mut rest = key_part.trim();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("comment ") {
            let (c, r) = quoted(after.trim_start())?;
            comment = Some(c);
            rest = r.trim_start();
            continue;
        }
        let (word, r) = rest.split_once(' ').unwrap_or((rest, ""));
        match word {
            // Per-element state of dynamic sets: skip the word and its argument.
            "timeout" | "expires" => {
                let (_, r2) = r.trim_start().split_once(' ').unwrap_or((r, ""));
                rest = r2.trim_start();
            }
            "counter" => {
                // `counter packets N bytes M`
                let mut it = r.trim_start().splitn(5, ' ');
                let _ = (it.next(), it.next(), it.next(), it.next());
                rest = it.next().unwrap_or("").trim_start();
            }
            _ => {
                key_words.push(word);
                rest = r.trim_start();
            }
        }
    }
    if key_words.is_empty() {
        return None;
    }
    // Built in place: nearly every key fits in a `CompactString` without an allocation.
    let mut key = CompactString::default();
    for (i, word) in key_words.iter().enumerate() {
        if i > 0 {
            key.push(' ');
        }
        key.push_str(word);
    }
    Some((
        key,
        Element {
            value: value.map(CompactString::from),
            comment: comment.map(CompactString::from),
        },
    ))
}

enum Block {
    Top,
    Table(Ruleset),
    Set(Ruleset, String, Set),
    Chain(Ruleset, String, Chain),
    /// An object we do not model, with the brace depth inside it.
    Skip(Box<Block>, i32),
}

/// Parses a listing. Every `table` block becomes one [`Ruleset`].
/// The part of a whole-ruleset listing that is table `family name`, from its header line to the `}` that
/// closes it (nft prints both unindented), so that other tables — whatever they hold — are never parsed.
pub fn table_text<'a>(listing: &'a str, family: Family, name: &str) -> Option<&'a str> {
    let header = format!("table {family} {name} {{");
    let mut start = None;
    let mut offset = 0;
    for line in listing.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        match start {
            None if bare == header || bare.starts_with(&format!("{header} #")) => start = Some(offset),
            Some(from) if bare == "}" => return Some(&listing[from..offset + line.len()]),
            _ => {}
        }
        offset += line.len();
    }
    None
}

pub fn parse_listing(text: &str) -> Result<Listing, ListingError> {
    let mut listing = Listing::default();
    let mut block = Block::Top;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line_no = i + 1;
        let line = clean(lines[i]);
        i += 1;
        if line.is_empty() {
            continue;
        }
        let unexpected = || ListingError::Unexpected {
            line: line_no,
            text: line.to_string(),
        };
        block = match block {
            Block::Skip(outer, depth) => {
                let depth = depth + brace_balance(line);
                if depth <= 0 {
                    *outer
                } else {
                    Block::Skip(outer, depth)
                }
            }
            Block::Top => {
                let header = line
                    .strip_prefix("table ")
                    .and_then(|r| r.strip_suffix('{'))
                    .map(str::trim)
                    .ok_or_else(unexpected)?;
                let mut words = header.split_whitespace();
                let (family, name) = match (words.next(), words.next(), words.next()) {
                    (Some(f), Some(n), None) => (Family::parse(f), n),
                    (Some(n), None, None) => (Some(Family::Ip), n),
                    _ => (None, ""),
                };
                let family = family.ok_or_else(|| ListingError::TableHeader {
                    line: line_no,
                    text: line.to_string(),
                })?;
                Block::Table(Ruleset::new(family, name))
            }
            Block::Table(mut rs) => {
                if line == "}" {
                    listing.tables.push(rs);
                    Block::Top
                } else if let Some(c) = line.strip_prefix("comment ") {
                    rs.comment = Some(quoted(c.trim()).ok_or_else(unexpected)?.0);
                    Block::Table(rs)
                } else if let Some(name) = object_header(line, "set ") {
                    Block::Set(rs, name, Set::new(SetKind::Set, "", None))
                } else if let Some(name) = object_header(line, "map ") {
                    Block::Set(rs, name, Set::new(SetKind::Map, "", None))
                } else if let Some(name) = object_header(line, "chain ") {
                    Block::Chain(rs, name, Chain::default())
                } else if line.ends_with('{') {
                    Block::Skip(Box::new(Block::Table(rs)), brace_balance(line))
                } else {
                    return Err(unexpected());
                }
            }
            Block::Set(mut rs, name, mut set) => {
                if line == "}" {
                    rs.sets.insert(name, set);
                    Block::Table(rs)
                } else if let Some(rest) = line.strip_prefix("elements = ") {
                    // Gather continuation lines until the braces balance.
                    // Keep a running balance: recounting the growing body would make a map of n elements
                    // cost n² (22 s for 5,000 services).
                    let mut body = rest.to_string();
                    let mut balance = brace_balance(rest);
                    while balance > 0 {
                        let next = clean(lines.get(i).ok_or(ListingError::Unterminated)?);
                        i += 1;
                        balance += brace_balance(next);
                        body.push(' ');
                        body.push_str(next);
                    }
                    let inner = body
                        .trim()
                        .strip_prefix('{')
                        .and_then(|b| b.strip_suffix('}'))
                        .ok_or_else(unexpected)?;
                    for item in split_top_level(inner) {
                        let (key, element) = parse_element(item).ok_or_else(|| ListingError::Element {
                            line: line_no,
                            text: item.to_string(),
                        })?;
                        set.elements.insert(key, element);
                    }
                    Block::Set(rs, name, set)
                } else {
                    set_property(&mut set, line).ok_or_else(|| ListingError::SetProperty {
                        line: line_no,
                        text: line.to_string(),
                    })?;
                    Block::Set(rs, name, set)
                }
            }
            Block::Chain(mut rs, name, mut chain) => {
                if line == "}" {
                    rs.chains.insert(name, chain);
                    Block::Table(rs)
                } else if line.starts_with("type ") && chain.base.is_none() && chain.rules.is_empty() {
                    chain.base = Some(parse_base_chain(line).ok_or_else(|| ListingError::BaseChain {
                        line: line_no,
                        text: line.to_string(),
                    })?);
                    Block::Chain(rs, name, chain)
                } else if let Some(c) = line.strip_prefix("comment ").filter(|_| chain.rules.is_empty()) {
                    chain.comment = Some(quoted(c.trim()).ok_or_else(unexpected)?.0);
                    Block::Chain(rs, name, chain)
                } else {
                    chain.rules.push(line.to_string());
                    Block::Chain(rs, name, chain)
                }
            }
        };
    }
    match block {
        Block::Top => Ok(listing),
        _ => Err(ListingError::Unterminated),
    }
}

/// `set NAME {` → NAME.
fn object_header(line: &str, keyword: &str) -> Option<String> {
    let name = line.strip_prefix(keyword)?.strip_suffix('{')?.trim();
    (!name.is_empty() && !name.contains(' ')).then(|| name.to_string())
}

pub(crate) fn set_property(set: &mut Set, line: &str) -> Option<()> {
    let (word, rest) = line.split_once(' ')?;
    let rest = rest.trim();
    match word {
        "type" | "typeof" => {
            // The data type follows the last ` : `.
            match rest.rsplit_once(" : ") {
                Some((key, data)) => {
                    set.key_type = format!("{word} {key}");
                    set.data_type = Some(data.trim().to_string());
                }
                None => set.key_type = format!("{word} {rest}"),
            }
        }
        "flags" => {
            set.flags = rest
                .split(',')
                .map(|f| f.trim().to_string())
                .collect::<BTreeSet<String>>();
        }
        "timeout" => set.timeout = Some(parse_duration(rest)?),
        "size" => set.size = Some(rest.parse().ok()?),
        "comment" => set.comment = Some(quoted(rest)?.0),
        // Kernel-side tuning we do not model.
        "gc-interval" | "policy" | "counter" | "auto-merge" => {}
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_priorities() {
        assert_eq!(parse_duration("10m"), Some(600));
        assert_eq!(parse_duration("3h"), Some(10800));
        assert_eq!(parse_duration("1d2h3m4s"), Some(93784));
        assert_eq!(parse_duration("9m58s500ms"), Some(598));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_priority("dstnat - 10"), Some(-110));
        assert_eq!(parse_priority("-90"), Some(-90));
        assert_eq!(parse_priority("srcnat"), Some(100));
        assert_eq!(parse_priority("filter + 5"), Some(5));
    }

    #[test]
    fn elements() {
        let (k, e) = parse_element("10.0.0.1 . tcp . 80 comment \"a:b, c\" : goto x").unwrap();
        assert_eq!(k, "10.0.0.1 . tcp . 80");
        assert_eq!(e.comment.as_deref(), Some("a:b, c"));
        assert_eq!(e.value.as_deref(), Some("goto x"));
        let (k, e) = parse_element("fd00::1 timeout 10m expires 9m59s").unwrap();
        assert_eq!((k.as_str(), e.value), ("fd00::1", None));
        assert_eq!(
            split_top_level("a : goto x, b comment \"p, q\" : drop"),
            ["a : goto x", "b comment \"p, q\" : drop"]
        );
    }

    #[test]
    fn whole_listing() {
        let text = "table ip t { # handle 3\n\tcomment \"c\"\n\tset s {\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 3h\n\t\telements = { 10.0.0.1, 10.0.0.2,\n\t\t\t     10.0.0.3 }\n\t}\n\n\tflowtable f {\n\t\thook ingress priority filter\n\t\tdevices = { lo }\n\t}\n\tchain c {\n\t\ttype filter hook prerouting priority dstnat - 10; policy accept;\n\t\tip saddr @s drop # handle 4\n\t}\n}\ntable inet other {\n}\n";
        let l = parse_listing(text).unwrap();
        assert_eq!(l.tables.len(), 2);
        let t = l.table(Family::Ip, "t").unwrap();
        assert_eq!(t.comment.as_deref(), Some("c"));
        assert_eq!(t.sets["s"].elements.len(), 3);
        assert_eq!(t.sets["s"].timeout, Some(10800));
        let c = &t.chains["c"];
        assert_eq!(c.base.unwrap().priority, -110);
        assert_eq!(c.rules, ["ip saddr @s drop"]);
        assert!(parse_listing("table ip t {\n").is_err());
    }
}

#[cfg(test)]
mod table_text_tests {
    use super::*;

    #[test]
    fn one_table_is_cut_out_of_a_ruleset_listing() {
        let ruleset = "table ip filter {\n\tchain INPUT {\n\t\tmeta l4proto tcp counter packets 0 bytes 0 # xt_weird\n\t}\n}\ntable ip svcproxy {\n\tset s {\n\t\ttype ipv4_addr\n\t}\n\n\tchain c {\n\t\tip daddr @s accept\n\t}\n}\ntable ip6 svcproxy {\n}\n";
        let ours = table_text(ruleset, Family::Ip, "svcproxy").unwrap();
        assert!(
            ours.starts_with("table ip svcproxy {\n") && ours.ends_with("\t}\n}\n"),
            "{ours}"
        );
        let parsed = parse_listing(ours).unwrap();
        assert_eq!(parsed.tables.len(), 1);
        assert_eq!(parsed.tables[0].chains["c"].rules, ["ip daddr @s accept"]);
        assert_eq!(
            table_text(ruleset, Family::Ip6, "svcproxy"),
            Some("table ip6 svcproxy {\n}\n")
        );
        assert_eq!(table_text(ruleset, Family::Inet, "svcproxy"), None);
        assert_eq!(table_text(ruleset, Family::Ip, "svc"), None);
    }
}
