//! A model of how the kernel applies an `nft -f` transaction to its tables, with the refusals that matter
//! for ordering: no reference to a chain or set that does not exist (yet), no deleting what is missing or
//! still referenced, no element re-added with another value. All or nothing, like the kernel.
//!
//! It understands the commands this crate writes, so tests can check without privileges that a partial
//! transaction turns the previous table into the next one and that every chunk of a cold sync is accepted.
//! Behaviours were checked against Linux 6.18: `add` of an existing chain or set is a no-op (its properties
//! are not updated, except that a different base-chain definition is refused), and a chain with rules may be
//! deleted as long as nothing refers to it.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::listing::{parse_base_chain, parse_element, quoted, set_property, split_top_level};
use crate::references::{chain_targets, set_references, verdict_target};
use crate::ruleset::{Chain, Family, Ruleset, Set, SetKind};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    #[error("line {line}: {reason}: {text}")]
    Refused {
        line: usize,
        reason: String,
        text: String,
    },
}

/// The tables of one network namespace, by `family name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kernel {
    pub tables: BTreeMap<String, Ruleset>,
}

impl Kernel {
    /// A namespace holding exactly `rs`.
    pub fn holding(rs: &Ruleset) -> Self {
        let mut k = Kernel::default();
        k.tables.insert(rs.qualified_name(), rs.clone());
        k
    }

    pub fn table(&self, family: Family, name: &str) -> Option<&Ruleset> {
        self.tables.get(&format!("{family} {name}"))
    }

    /// Applies a transaction atomically: on the first refused command nothing changes.
    pub fn apply(&mut self, text: &str) -> Result<(), SimError> {
        let mut work = self.clone();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            work.command(line).map_err(|reason| SimError::Refused {
                line: i + 1,
                reason,
                text: line.to_string(),
            })?;
        }
        *self = work;
        Ok(())
    }

    fn command(&mut self, line: &str) -> Result<(), String> {
        let words: Vec<&str> = line.splitn(5, ' ').collect();
        let (verb, object) = match words.as_slice() {
            ["table", ..] => ("add", "table"),
            [verb, object, ..] => (*verb, *object),
            _ => return Err("unknown command".into()),
        };
        let (family, table, rest) = if words[0] == "table" {
            // `table ip name {}`: the declarative form, creating the table if needed.
            (words.get(1), words.get(2), "")
        } else {
            (words.get(2), words.get(3), words.get(4).copied().unwrap_or(""))
        };
        let family = family.and_then(|f| Family::parse(f)).ok_or("unknown family")?;
        let table = table.ok_or("missing table name")?.to_string();
        let key = format!("{family} {table}");
        if object == "table" {
            return match verb {
                "add" => {
                    let rs = self
                        .tables
                        .entry(key)
                        .or_insert_with(|| Ruleset::new(family, table.clone()));
                    if let Some(spec) = braces(line) {
                        for part in spec.split(';').map(str::trim) {
                            if let Some(c) = part.strip_prefix("comment ") {
                                rs.comment.get_or_insert(quoted(c.trim()).ok_or("bad comment")?.0);
                            }
                        }
                    }
                    Ok(())
                }
                "delete" => self.tables.remove(&key).map(|_| ()).ok_or("no such table".into()),
                _ => Err("unknown table command".into()),
            };
        }
        let rs = self.tables.get_mut(&key).ok_or("no such table")?;
        let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        match (verb, object) {
            ("add", "chain") => add_chain(rs, name, tail),
            ("flush", "chain") => {
                rs.chains.get_mut(name).ok_or("no such chain")?.rules.clear();
                Ok(())
            }
            ("delete", "chain") => {
                if !rs.chains.contains_key(name) {
                    return Err("no such chain".into());
                }
                if is_chain_referenced(rs, name) {
                    return Err("chain is in use".into());
                }
                rs.chains.remove(name);
                Ok(())
            }
            ("add", "rule") => {
                let rule = tail.trim();
                for target in chain_targets(rule) {
                    if !rs.chains.contains_key(target) {
                        return Err(format!("no such chain {target}"));
                    }
                }
                for set in set_references(rule) {
                    if !rs.sets.contains_key(set) {
                        return Err(format!("no such set {set}"));
                    }
                }
                rs.chains
                    .get_mut(name)
                    .ok_or("no such chain")?
                    .rules
                    .push(rule.to_string());
                Ok(())
            }
            ("add", "set" | "map") => add_set(rs, object, name, tail),
            ("delete", "set" | "map") => {
                if !rs.sets.contains_key(name) {
                    return Err("no such set".into());
                }
                let used = rs
                    .chains
                    .values()
                    .any(|c| c.rules.iter().any(|r| set_references(r).contains(&name)));
                if used {
                    return Err("set is in use".into());
                }
                rs.sets.remove(name);
                Ok(())
            }
            ("add", "element") => {
                let inner = braces(tail).ok_or("missing element list")?;
                let mut added = Vec::new();
                for item in split_top_level(inner) {
                    let (k, e) = parse_element(item).ok_or("bad element")?;
                    if let Some(target) = e.value.as_deref().and_then(verdict_target)
                        && !rs.chains.contains_key(target)
                    {
                        return Err(format!("no such chain {target}"));
                    }
                    added.push((k, e));
                }
                let set = rs.sets.get_mut(name).ok_or("no such set")?;
                for (k, e) in added {
                    match set.elements.get(&k) {
                        Some(old) if old.value != e.value => return Err(format!("element {k} exists")),
                        Some(_) => {}
                        None => {
                            set.elements.insert(k, e);
                        }
                    }
                }
                Ok(())
            }
            ("delete", "element") => {
                let inner = braces(tail).ok_or("missing element list")?;
                let set = rs.sets.get_mut(name).ok_or("no such set")?;
                for item in split_top_level(inner) {
                    let (k, _) = parse_element(item).ok_or("bad element")?;
                    if set.elements.remove(&k).is_none() {
                        return Err(format!("no such element {k}"));
                    }
                }
                Ok(())
            }
            _ => Err("unknown command".into()),
        }
    }
}

/// The text between the first `{` and the last `}`.
fn braces(text: &str) -> Option<&str> {
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    (start < end).then(|| text[start + 1..end].trim())
}

fn is_chain_referenced(rs: &Ruleset, name: &str) -> bool {
    rs.chains
        .values()
        .any(|c| c.rules.iter().any(|r| chain_targets(r).contains(&name)))
        || rs.sets.values().any(|s| {
            s.elements
                .values()
                .any(|e| e.value.as_deref().and_then(verdict_target) == Some(name))
        })
}

fn add_chain(rs: &mut Ruleset, name: &str, spec: &str) -> Result<(), String> {
    let mut chain = Chain::default();
    if let Some(inner) = braces(spec) {
        let mut base_parts = Vec::new();
        for part in inner.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            match part.strip_prefix("comment ") {
                Some(c) => chain.comment = Some(quoted(c.trim()).ok_or("bad comment")?.0),
                None => base_parts.push(part),
            }
        }
        if !base_parts.is_empty() {
            chain.base = Some(parse_base_chain(&base_parts.join("; ")).ok_or("bad base chain")?);
        }
    }
    match rs.chains.get(name) {
        Some(old) if old.base != chain.base && chain.base.is_some() => {
            Err("a base chain cannot change its definition".into())
        }
        Some(_) => Ok(()),
        None => {
            rs.chains.insert(name.to_string(), chain);
            Ok(())
        }
    }
}

fn add_set(rs: &mut Ruleset, object: &str, name: &str, spec: &str) -> Result<(), String> {
    let kind = if object == "map" {
        SetKind::Map
    } else {
        SetKind::Set
    };
    let mut set = Set::new(kind, "", None);
    let inner = braces(spec).ok_or("missing set definition")?;
    for part in inner.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        set_property(&mut set, part).ok_or_else(|| format!("bad set property {part}"))?;
    }
    match rs.sets.get(name) {
        Some(old) if old.kind != set.kind || old.key_type != set.key_type || old.flags != set.flags => {
            Err("set exists with another type".into())
        }
        Some(_) => Ok(()),
        None => {
            rs.sets.insert(name.to_string(), set);
            Ok(())
        }
    }
}
