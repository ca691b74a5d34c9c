//! A rule line, as `nft` prints it, parsed into the matches and statements the tracer evaluates.
//!
//! Only the vocabulary a Service proxy's table uses (ours and upstream kube-proxy's) is understood: address,
//! protocol, port, mark, fib, conntrack state and status, and interface-name matches, set and map lookups
//! (named and anonymous), `numgen`, jumps and verdicts, DNAT, masquerade, mark arithmetic and dynamic-set
//! updates. Any other word is an error rather than a guess, so the tracer never silently skips a rule it
//! cannot read.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RuleSyntaxError {
    #[error("unsupported word {0:?}")]
    Unsupported(String),
    #[error("expected {expected} after {after:?}")]
    Expected { expected: &'static str, after: String },
    #[error("bad number {0:?}")]
    Number(String),
    #[error("bad address {0:?}")]
    Address(String),
    #[error("unbalanced braces or quotes")]
    Unbalanced,
}

/// A packet property a match or lookup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    Saddr,
    Daddr,
    L4proto,
    /// `th dport` (any transport), or `tcp dport` etc., which also requires that protocol.
    Dport(Option<&'static str>),
    Mark,
    /// `fib saddr type` / `fib daddr type`.
    FibSaddrType,
    FibDaddrType,
    CtState,
    /// `ct status`: the connection's status bits (`dnat` once a DNAT rewrote its destination).
    CtStatus,
    Iifname,
    /// `numgen random mod M offset K`: any of K..K+M.
    Numgen {
        modulus: u32,
        offset: u32,
    },
}

/// The right-hand side of a match or the map of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// One value as printed (`10.0.0.0/8`, `tcp`, `0x00004000`).
    Value(String),
    /// An anonymous set `{ a, b }`: its elements' keys.
    AnonSet(Vec<String>),
    /// `@name`.
    Named(String),
}

/// A map of a `vmap` lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapRef {
    /// `{ key : verdict, … }`.
    Anon(Vec<(String, String)>),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Jump(String),
    Goto(String),
    Return,
    Accept,
    Drop,
    Reject,
    Continue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkOp {
    Set(u32),
    Or(u32),
    Xor(u32),
    And(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `selectors [& mask] [==|!=] operand`; an operand of a set kind is a lookup.
    Match {
        selectors: Vec<Selector>,
        mask: Option<u32>,
        negate: bool,
        operand: Operand,
    },
    /// `selectors vmap map`: when the key is found, its verdict applies; otherwise the rule stops here.
    Vmap {
        selectors: Vec<Selector>,
        map: MapRef,
    },
    Verdict(Verdict),
    Dnat {
        addr: String,
        port: Option<u16>,
    },
    /// `dnat ip to <selectors> map @name`: the destination (`address . port`) is the value the key finds.
    DnatMap {
        selectors: Vec<Selector>,
        map: String,
    },
    Masquerade,
    SetMark(MarkOp),
    /// `update @set { … }` / `add @set { … }`: affects later packets only.
    UpdateSet(String),
    /// `comment`, `counter`, `log`: no effect on the verdict.
    Annotation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub items: Vec<Item>,
}

/// Words, with `{ … }` groups and `"…"` strings kept whole.
fn tokens(text: &str) -> Result<Vec<String>, RuleSyntaxError> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == '{' {
            let mut depth = 0;
            let mut in_quote = false;
            while i < chars.len() {
                match chars[i] {
                    '"' => in_quote = !in_quote,
                    '{' if !in_quote => depth += 1,
                    '}' if !in_quote => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            if i >= chars.len() {
                return Err(RuleSyntaxError::Unbalanced);
            }
            i += 1;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            if i >= chars.len() {
                return Err(RuleSyntaxError::Unbalanced);
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                i += 1;
            }
        }
        out.push(chars[start..i].iter().collect());
    }
    Ok(out)
}

/// The inside of a `{ … }` token, split into its elements.
fn group_items(token: &str) -> Vec<String> {
    let inner = token
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(token);
    crate::listing::split_top_level(inner)
        .into_iter()
        .map(str::to_string)
        .collect()
}

pub fn parse_number(word: &str) -> Result<u32, RuleSyntaxError> {
    let parsed = match word.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => word.parse(),
    };
    parsed.map_err(|_| RuleSyntaxError::Number(word.to_string()))
}

struct Cursor {
    words: Vec<String>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&str> {
        self.words.get(self.pos).map(String::as_str)
    }

    fn next(&mut self) -> Option<String> {
        let w = self.words.get(self.pos).cloned();
        if w.is_some() {
            self.pos += 1;
        }
        w
    }

    fn expect(&mut self, expected: &'static str, after: &str) -> Result<String, RuleSyntaxError> {
        self.next().ok_or_else(|| RuleSyntaxError::Expected {
            expected,
            after: after.to_string(),
        })
    }

    fn expect_word(&mut self, word: &'static str, after: &str) -> Result<(), RuleSyntaxError> {
        match self.next() {
            Some(w) if w == word => Ok(()),
            _ => Err(RuleSyntaxError::Expected {
                expected: word,
                after: after.to_string(),
            }),
        }
    }
}

/// Parses one selector starting at `first`, or returns `None` if `first` does not start one.
fn selector(first: &str, cur: &mut Cursor) -> Result<Option<Selector>, RuleSyntaxError> {
    let sel = match first {
        "ip" | "ip6" => match cur.expect("saddr or daddr", first)?.as_str() {
            "saddr" => Selector::Saddr,
            "daddr" => Selector::Daddr,
            other => return Err(RuleSyntaxError::Unsupported(format!("{first} {other}"))),
        },
        "meta" => match cur.expect("meta key", first)?.as_str() {
            "l4proto" => Selector::L4proto,
            "mark" => Selector::Mark,
            other => return Err(RuleSyntaxError::Unsupported(format!("meta {other}"))),
        },
        "th" | "tcp" | "udp" | "sctp" => {
            cur.expect_word("dport", first)?;
            Selector::Dport(match first {
                "tcp" => Some("tcp"),
                "udp" => Some("udp"),
                "sctp" => Some("sctp"),
                _ => None,
            })
        }
        "fib" => {
            let which = cur.expect("saddr or daddr", first)?;
            cur.expect_word("type", "fib")?;
            match which.as_str() {
                "saddr" => Selector::FibSaddrType,
                "daddr" => Selector::FibDaddrType,
                other => return Err(RuleSyntaxError::Unsupported(format!("fib {other}"))),
            }
        }
        "ct" => match cur.expect("state or status", first)?.as_str() {
            "state" => Selector::CtState,
            "status" => Selector::CtStatus,
            other => return Err(RuleSyntaxError::Unsupported(format!("ct {other}"))),
        },
        "iifname" => Selector::Iifname,
        "numgen" => {
            cur.expect_word("random", "numgen")?;
            cur.expect_word("mod", "numgen random")?;
            let modulus = parse_number(&cur.expect("modulus", "mod")?)?;
            let mut offset = 0;
            if cur.peek() == Some("offset") {
                cur.next();
                offset = parse_number(&cur.expect("offset", "offset")?)?;
            }
            Selector::Numgen { modulus, offset }
        }
        _ => return Ok(None),
    };
    Ok(Some(sel))
}

fn operand(word: String) -> Operand {
    if let Some(name) = word.strip_prefix('@') {
        Operand::Named(name.to_string())
    } else if word.starts_with('{') {
        Operand::AnonSet(group_items(&word))
    } else {
        Operand::Value(word)
    }
}

fn mark_set(cur: &mut Cursor) -> Result<MarkOp, RuleSyntaxError> {
    let first = cur.expect("mark value", "meta mark set")?;
    if first != "meta" {
        return Ok(MarkOp::Set(parse_number(&first)?));
    }
    cur.expect_word("mark", "meta mark set meta")?;
    let op = cur.expect("operator", "meta mark set meta mark")?;
    let value = parse_number(&cur.expect("operand", &op)?)?;
    Ok(match op.as_str() {
        "|" | "or" => MarkOp::Or(value),
        "^" | "xor" => MarkOp::Xor(value),
        "&" | "and" => MarkOp::And(value),
        other => return Err(RuleSyntaxError::Unsupported(format!("mark operator {other}"))),
    })
}

fn dnat_target(word: &str) -> Result<(String, Option<u16>), RuleSyntaxError> {
    let bad = || RuleSyntaxError::Address(word.to_string());
    if let Some(rest) = word.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| bad())?),
            None => None,
        };
        return Ok((addr.to_string(), port));
    }
    // IPv4 `a.b.c.d:port`; a bare IPv6 address has several colons and no port.
    match word.split_once(':') {
        Some((addr, port)) if !port.contains(':') && addr.contains('.') => {
            Ok((addr.to_string(), Some(port.parse().map_err(|_| bad())?)))
        }
        _ => Ok((word.to_string(), None)),
    }
}

pub fn parse_rule(text: &str) -> Result<Rule, RuleSyntaxError> {
    let mut cur = Cursor {
        words: tokens(text)?,
        pos: 0,
    };
    let mut items = Vec::new();
    while let Some(word) = cur.next() {
        // `meta mark set …` is a statement, not a match.
        if word == "meta"
            && cur.words.get(cur.pos).is_some_and(|w| w == "mark")
            && cur.words.get(cur.pos + 1).is_some_and(|w| w == "set")
        {
            cur.pos += 2;
            items.push(Item::SetMark(mark_set(&mut cur)?));
            continue;
        }
        if let Some(first) = selector(&word, &mut cur)? {
            let mut selectors = vec![first];
            while cur.peek() == Some(".") {
                cur.next();
                let w = cur.expect("selector", ".")?;
                let s = selector(&w, &mut cur)?.ok_or(RuleSyntaxError::Unsupported(w))?;
                selectors.push(s);
            }
            let mut mask = None;
            if cur.peek() == Some("&") {
                cur.next();
                mask = Some(parse_number(&cur.expect("mask", "&")?)?);
            }
            let mut negate = false;
            match cur.peek() {
                Some("vmap") => {
                    cur.next();
                    let map = cur.expect("map", "vmap")?;
                    let map = if let Some(name) = map.strip_prefix('@') {
                        MapRef::Named(name.to_string())
                    } else {
                        let mut entries = Vec::new();
                        for e in group_items(&map) {
                            let (k, v) = e.split_once(" : ").ok_or_else(|| RuleSyntaxError::Expected {
                                expected: "key : verdict",
                                after: "vmap".into(),
                            })?;
                            entries.push((k.trim().to_string(), v.trim().to_string()));
                        }
                        MapRef::Anon(entries)
                    };
                    items.push(Item::Vmap { selectors, map });
                    continue;
                }
                Some("==") => {
                    cur.next();
                }
                Some("!=") => {
                    cur.next();
                    negate = true;
                }
                _ => {}
            }
            let value = cur.expect("value", &word)?;
            items.push(Item::Match {
                selectors,
                mask,
                negate,
                operand: operand(value),
            });
            continue;
        }
        let item = match word.as_str() {
            "jump" => Item::Verdict(Verdict::Jump(cur.expect("chain", "jump")?)),
            "goto" => Item::Verdict(Verdict::Goto(cur.expect("chain", "goto")?)),
            "return" => Item::Verdict(Verdict::Return),
            "accept" => Item::Verdict(Verdict::Accept),
            "drop" => Item::Verdict(Verdict::Drop),
            "continue" => Item::Verdict(Verdict::Continue),
            "reject" => {
                if cur.peek() == Some("with") {
                    // `with icmp type X`, `with icmpx X`, `with tcp reset`: the kind of rejection only.
                    cur.next();
                    let kind = cur.expect("reject kind", "with")?;
                    if kind == "icmp" || kind == "icmpv6" {
                        if cur.peek() == Some("type") {
                            cur.next();
                        }
                        cur.expect("reject code", &kind)?;
                    } else {
                        cur.expect("reject code", &kind)?;
                    }
                }
                Item::Verdict(Verdict::Reject)
            }
            "dnat" => {
                if matches!(cur.peek(), Some("ip" | "ip6")) {
                    cur.next();
                }
                cur.expect_word("to", "dnat")?;
                let target = cur.expect("address", "dnat to")?;
                if let Some(first) = selector(&target, &mut cur)? {
                    let mut selectors = vec![first];
                    while cur.peek() == Some(".") {
                        cur.next();
                        let w = cur.expect("selector", ".")?;
                        selectors.push(selector(&w, &mut cur)?.ok_or(RuleSyntaxError::Unsupported(w))?);
                    }
                    cur.expect_word("map", "dnat to")?;
                    let map = cur.expect("map", "dnat to … map")?;
                    let map = map
                        .strip_prefix('@')
                        .ok_or(RuleSyntaxError::Unsupported(map.clone()))?;
                    Item::DnatMap {
                        selectors,
                        map: map.to_string(),
                    }
                } else {
                    let (addr, port) = dnat_target(&target)?;
                    Item::Dnat { addr, port }
                }
            }
            "masquerade" => {
                while matches!(cur.peek(), Some("fully-random" | "random" | "persistent")) {
                    cur.next();
                }
                Item::Masquerade
            }
            "update" | "add" => {
                let set = cur.expect("set", &word)?;
                let set = set
                    .strip_prefix('@')
                    .ok_or(RuleSyntaxError::Unsupported(set.clone()))?;
                cur.expect("element expression", "update")?;
                Item::UpdateSet(set.to_string())
            }
            "comment" => {
                cur.expect("string", "comment")?;
                Item::Annotation
            }
            "counter" => {
                if cur.peek() == Some("packets") {
                    for _ in 0..4 {
                        cur.expect("counter values", "counter")?;
                    }
                }
                Item::Annotation
            }
            other => return Err(RuleSyntaxError::Unsupported(other.to_string())),
        };
        items.push(item);
    }
    Ok(Rule { items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shapes_we_and_upstream_use() {
        let r =
            parse_rule("ip daddr 10.96.0.1 tcp dport 443 ip saddr != 10.244.0.0/16 jump mark-for-masquerade")
                .unwrap();
        assert_eq!(r.items.len(), 4);
        assert_eq!(
            r.items[2],
            Item::Match {
                selectors: vec![Selector::Saddr],
                mask: None,
                negate: true,
                operand: Operand::Value("10.244.0.0/16".into())
            }
        );
        let r = parse_rule("numgen random mod 2 vmap { 0 : goto a, 1 : goto b }").unwrap();
        assert_eq!(
            r.items[0],
            Item::Vmap {
                selectors: vec![Selector::Numgen {
                    modulus: 2,
                    offset: 0
                }],
                map: MapRef::Anon(vec![("0".into(), "goto a".into()), ("1".into(), "goto b".into())])
            }
        );
        let r = parse_rule("meta mark & 0x00004000 == 0x00000000 return").unwrap();
        assert!(matches!(
            &r.items[0],
            Item::Match {
                mask: Some(0x4000),
                ..
            }
        ));
        let r = parse_rule("meta mark set meta mark ^ 0x00004000").unwrap();
        assert_eq!(r.items, [Item::SetMark(MarkOp::Xor(0x4000))]);
        let r = parse_rule("fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @m").unwrap();
        assert_eq!(r.items.len(), 3);
        let r = parse_rule("meta l4proto tcp dnat ip to numgen random mod 3 offset 65536 map @endpoints-4")
            .unwrap();
        assert_eq!(
            r.items[1],
            Item::DnatMap {
                selectors: vec![Selector::Numgen {
                    modulus: 3,
                    offset: 65536
                }],
                map: "endpoints-4".into()
            }
        );
        let r = parse_rule("meta l4proto tcp dnat to [fd00::1]:80").unwrap();
        assert_eq!(
            r.items[1],
            Item::Dnat {
                addr: "fd00::1".into(),
                port: Some(80)
            }
        );
        let r = parse_rule("ip saddr 10.244.0.0/16 goto x comment \"short-circuit pod traffic\"").unwrap();
        assert_eq!(r.items.len(), 3);
        let r = parse_rule("update @aff { ip saddr }").unwrap();
        assert_eq!(r.items, [Item::UpdateSet("aff".into())]);
        assert!(parse_rule("ip daddr @cluster-ips reject comment \"x\"").is_ok());
        assert!(parse_rule("numgen random mod 3 0 goto e").is_ok());
        assert!(parse_rule("ct state new jump c").is_ok());
        let r = parse_rule("ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade").unwrap();
        assert_eq!(
            r.items[0],
            Item::Match {
                selectors: vec![Selector::CtStatus],
                mask: None,
                negate: false,
                operand: Operand::Value("dnat".into())
            }
        );
        assert!(parse_rule("ct helper \"ftp\" accept").is_err());
        assert!(parse_rule("masquerade fully-random").is_ok());
        assert!(parse_rule("tproxy to :50").is_err());
    }
}
