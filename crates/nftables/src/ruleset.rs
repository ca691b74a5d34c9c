//! The desired (or read-back) content of one nftables table as plain data: chains with their rule lines, sets
//! and maps with their elements. Rendering produces it, the listing parser reads it back from the kernel, the
//! planner diffs two of them and the tracer walks one. Rule lines are kept as text, spelled exactly as `nft`
//! prints them, so a read-back compares equal to what we wrote without a second normal form.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use compact_str::CompactString;
use thiserror::Error;

/// An nftables address family. We only write `ip` and `ip6` tables, but a listing may hold any family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
    Arp,
    Bridge,
    Netdev,
}

impl Family {
    pub fn keyword(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
            Family::Arp => "arp",
            Family::Bridge => "bridge",
            Family::Netdev => "netdev",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "ip" => Family::Ip,
            "ip6" => Family::Ip6,
            "inet" => Family::Inet,
            "arp" => Family::Arp,
            "bridge" => Family::Bridge,
            "netdev" => Family::Netdev,
            _ => return None,
        })
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.keyword())
    }
}

/// The netfilter hook a base chain is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    Ingress,
}

impl Hook {
    pub fn keyword(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
            Hook::Ingress => "ingress",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "prerouting" => Hook::Prerouting,
            "input" => Hook::Input,
            "forward" => Hook::Forward,
            "output" => Hook::Output,
            "postrouting" => Hook::Postrouting,
            "ingress" => Hook::Ingress,
            _ => return None,
        })
    }
}

/// The type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainType {
    Filter,
    Nat,
    Route,
}

impl ChainType {
    pub fn keyword(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
            ChainType::Route => "route",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "filter" => ChainType::Filter,
            "nat" => ChainType::Nat,
            "route" => ChainType::Route,
            _ => return None,
        })
    }
}

/// What a base chain does with packets that reach its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// The only policy we write: our chains steer traffic, they never filter by default.
    #[default]
    Accept,
    Drop,
}

/// What makes a chain a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub chain_type: ChainType,
    pub hook: Hook,
    /// Numeric priority. `nft` prints some priorities symbolically (`dstnat - 10`) and others as numbers
    /// (`-110`) depending on the hook, so only the number is kept.
    pub priority: i32,
    pub policy: Policy,
}

/// Standard priority names, as nftables defines them for the ip and ip6 families.
pub const PRIORITY_DSTNAT: i32 = -100;
pub const PRIORITY_SRCNAT: i32 = 100;

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Chain {
    pub base: Option<BaseChain>,
    pub comment: Option<String>,
    /// Rule lines, without `add rule …` prefixes, as `nft list` prints them.
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetKind {
    Set,
    Map,
}

impl SetKind {
    pub fn keyword(self) -> &'static str {
        match self {
            SetKind::Set => "set",
            SetKind::Map => "map",
        }
    }
}

/// One element of a set or map. The key is the map key lookup table of [`Set::elements`].
///
/// Keys, values and comments are [`CompactString`]s: a table holds one element per endpoint in the endpoint
/// maps and another in the hairpin set, and nearly all of their texts (`10.244.3.7 . 8080`, `65539`,
/// `ns/name:port`) fit in the 24 bytes a `String` takes anyway, so they need no allocation of their own (at
/// 5,000 Services × 10 endpoints, about 150,000 fewer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Element {
    /// The mapped value (`goto service-…`, `drop`); `None` in a plain set.
    pub value: Option<CompactString>,
    /// Names the Service the element belongs to (`ns/name` or `ns/name:port`), so elements can be grouped by
    /// owner when planning and attributed when verifying.
    pub comment: Option<CompactString>,
}

/// A named set or map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Set {
    pub kind: SetKind,
    /// `type ipv4_addr . inet_proto . inet_service` or `typeof numgen random mod 1`: everything between the
    /// keyword and the data type, including the keyword.
    pub key_type: String,
    /// The data type of a map (`verdict`); `None` for a set.
    pub data_type: Option<String>,
    pub flags: BTreeSet<String>,
    /// Default element timeout, in seconds.
    pub timeout: Option<u64>,
    pub size: Option<u32>,
    pub comment: Option<String>,
    /// Elements by key, as `nft` prints the key (`10.96.0.1 . tcp . 443`).
    pub elements: BTreeMap<CompactString, Element>,
}

impl Set {
    pub fn new(kind: SetKind, key_type: impl Into<String>, data_type: Option<&str>) -> Self {
        Set {
            kind,
            key_type: key_type.into(),
            data_type: data_type.map(str::to_string),
            flags: BTreeSet::new(),
            timeout: None,
            size: None,
            comment: None,
            elements: BTreeMap::new(),
        }
    }

    /// Elements of a dynamic set are written by the packet path (affinity), never by us.
    pub fn is_dynamic(&self) -> bool {
        self.flags.contains("dynamic")
    }

    /// Whether two sets are declared alike, whatever their elements.
    pub fn same_definition(&self, other: &Set) -> bool {
        self.kind == other.kind
            && self.key_type == other.key_type
            && self.data_type == other.data_type
            && self.flags == other.flags
            && self.timeout == other.timeout
            && self.size == other.size
            && self.comment == other.comment
    }
}

/// One table: the unit of ownership (everything in our table is ours) and of the clean-rebuild idiom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub name: String,
    pub comment: Option<String>,
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConsistencyError {
    #[error("chain {from} refers to missing chain {to}")]
    MissingChain { from: String, to: String },
    #[error("chain {from} refers to missing set {set}")]
    MissingSet { from: String, set: String },
    #[error("element {key} of {set} refers to missing chain {to}")]
    ElementTarget { set: String, key: String, to: String },
}

impl Ruleset {
    pub fn new(family: Family, name: impl Into<String>) -> Self {
        Ruleset {
            family,
            name: name.into(),
            comment: None,
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }

    /// `ip svcproxy`: how commands address the table.
    pub fn qualified_name(&self) -> String {
        format!("{} {}", self.family, self.name)
    }

    /// Base chains of one hook in the order the kernel runs them: by priority (ties are run in registration
    /// order by the kernel; we break them by name, which our tables never rely on).
    pub fn base_chains(&self, hook: Hook) -> Vec<(&str, &Chain, BaseChain)> {
        let mut out: Vec<(&str, &Chain, BaseChain)> = self
            .chains
            .iter()
            .filter_map(|(name, c)| c.base.filter(|b| b.hook == hook).map(|b| (name.as_str(), c, b)))
            .collect();
        out.sort_by_key(|(name, _, b)| (b.priority, *name));
        out
    }

    /// Every reference must resolve, as the kernel insists when it commits. Used to check that each chunk of a
    /// split transaction leaves a ruleset the kernel would have accepted.
    pub fn check_references(&self) -> Result<(), ConsistencyError> {
        for (name, chain) in &self.chains {
            for rule in &chain.rules {
                for target in crate::references::chain_targets(rule) {
                    if !self.chains.contains_key(target) {
                        return Err(ConsistencyError::MissingChain {
                            from: name.clone(),
                            to: target.to_string(),
                        });
                    }
                }
                for set in crate::references::set_references(rule) {
                    if !self.sets.contains_key(set) {
                        return Err(ConsistencyError::MissingSet {
                            from: name.clone(),
                            set: set.to_string(),
                        });
                    }
                }
            }
        }
        for (set_name, set) in &self.sets {
            for (key, element) in &set.elements {
                if let Some(target) = element
                    .value
                    .as_deref()
                    .and_then(crate::references::verdict_target)
                    && !self.chains.contains_key(target)
                {
                    return Err(ConsistencyError::ElementTarget {
                        set: set_name.clone(),
                        key: key.to_string(),
                        to: target.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// This ruleset with the contents of dynamic sets removed: those are written by traffic, so a read-back
    /// compared with the intent must ignore them.
    pub fn without_dynamic_elements(&self) -> Ruleset {
        let mut out = self.clone();
        for set in out.sets.values_mut() {
            if set.is_dynamic() {
                set.elements.clear();
            }
        }
        out
    }

    /// Repacks the maps after they were filled one insertion at a time. Keys inserted in ascending order (as
    /// Services merged in order mostly are) leave every B-tree node half full, and at 5,000 Services the
    /// table holds about 110,000 elements; a map built from its sorted contents has full nodes.
    pub fn compact(&mut self) {
        for set in self.sets.values_mut() {
            set.elements = std::mem::take(&mut set.elements).into_iter().collect();
        }
        self.sets = std::mem::take(&mut self.sets).into_iter().collect();
        self.chains = std::mem::take(&mut self.chains).into_iter().collect();
    }

    /// Number of rule lines plus elements: a size measure for logs and metrics.
    pub fn object_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len() + 1).sum::<usize>()
            + self.sets.values().map(|s| s.elements.len() + 1).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacting_keeps_every_object_and_element() {
        let mut rs = Ruleset::new(Family::Ip, "t");
        let mut set = Set::new(SetKind::Map, "type inet_service", Some("verdict"));
        for port in (1..=500u32).rev() {
            set.elements.insert(
                CompactString::from(port.to_string()),
                Element {
                    value: Some(CompactString::from(format!("goto c{port}"))),
                    comment: Some("ns/web".into()),
                },
            );
        }
        rs.sets.insert("ports".into(), set);
        for i in 0..100 {
            rs.chains.insert(format!("c{i}"), Chain::default());
        }
        let before = rs.clone();
        rs.compact();
        assert_eq!(rs, before);
        assert_eq!(rs.sets["ports"].elements.len(), 500);
    }
}
