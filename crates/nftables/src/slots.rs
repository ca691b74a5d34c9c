//! Where each policy chain's endpoints live in the shared endpoint maps.
//!
//! In the mapped layout a policy chain picks its endpoint with one rule,
//! `meta l4proto tcp dnat ip to numgen random mod N offset B map @endpoints-tcp-K`, and its endpoints are the
//! elements `B` to `B+N-1` of map `endpoints-tcp-K`. The pair (K, B) is the chain's *slot*. Slots are
//! numbered per protocol: slot `s` is map `s % maps` at base `(s / maps) << 16`, so a chain can hold up to
//! 65,536 endpoints and the maps fill evenly.
//!
//! Each protocol has maps of its own because `nft` 1.0 cannot use a map whose data is typed
//! `ip daddr . th dport` once it reads the definition back from the kernel ("conflicting protocols"), and a
//! map typed `… . tcp dport` serves only rules that match TCP.
//!
//! A slot is kept for as long as its chain exists, so an endpoint change is a change of map elements only
//! (no rule is replaced, so the kernel does not re-validate the table). New chains take the lowest free slot;
//! the slot of a chain that went away is reused only by a later render. Slot numbers are not derived from
//! the intent alone: a render is given the slots already in use (those of the previous table, or read back
//! from the kernel's rules), and keeps them.

use std::collections::{BTreeSet, HashMap};

use crate::ruleset::{Chain, Ruleset};

/// How many endpoint maps the table has. Each element added to a map is checked by the kernel against
/// every rule that uses the map, and each rule binding a map is checked against all its elements, so one
/// map shared by every chain makes loading the table quadratic (measured: 4.5 s for 5,000 services × 10
/// endpoints in one map, 0.76 s spread over 64 or 256 maps, 1.8 s with one map per chain, whose
/// by-name lookups are linear in the number of sets). At 20,000 services 256 maps load faster (6.4 s cold
/// against 8.5 s: a rule binding a map makes the kernel walk the map's elements) but a restart at 5,000
/// reads back slower (0.65–0.71 s against 0.55–0.61 s), so 64 it is. Raising the count later keeps every
/// existing chain where it is (its map and base still decode to the same place); lowering it moves the
/// chains of the maps that go.
pub const TCP_MAPS: u32 = 64;

/// Protocols with endpoint maps, and how many maps each has (UDP and SCTP services are few).
pub const PROTOCOLS: [(&str, u32); 3] = [("tcp", TCP_MAPS), ("udp", 16), ("sctp", 4)];

/// Keys one slot spans: the most endpoints a chain can pick from through a map.
pub const SLOT_WIDTH: u32 = 1 << 16;

/// One slot: its protocol's index in [`PROTOCOLS`] and its number.
pub type Slot = (usize, u32);

fn maps(proto: usize) -> u32 {
    PROTOCOLS[proto].1
}

/// Slots a protocol has in all.
fn slot_count(proto: usize) -> u32 {
    maps(proto) * (u32::MAX / SLOT_WIDTH + 1)
}

/// The index of `proto` in [`PROTOCOLS`].
pub fn protocol_index(proto: &str) -> Option<usize> {
    PROTOCOLS.iter().position(|(p, _)| *p == proto)
}

pub fn map_name(proto: usize, map: u32) -> String {
    format!("endpoints-{}-{map}", PROTOCOLS[proto].0)
}

/// Map name and base key of a slot.
pub fn placement((proto, n): Slot) -> (String, u32) {
    (map_name(proto, n % maps(proto)), (n / maps(proto)) * SLOT_WIDTH)
}

/// The slot a chain's rules use, if one of them picks from an endpoint map.
pub fn slot_of_chain(chain: &Chain) -> Option<Slot> {
    chain.rules.iter().find_map(|r| slot_of_rule(r))
}

/// Reads `numgen random mod N [offset B] map @endpoints-PROTO-K` back into a slot.
pub fn slot_of_rule(rule: &str) -> Option<Slot> {
    let (_, after) = rule.split_once(" numgen random mod ")?;
    let mut words = after.split(' ');
    words.next()?.parse::<u32>().ok()?;
    let mut word = words.next()?;
    let mut base = 0;
    if word == "offset" {
        base = words.next()?.parse::<u32>().ok()?;
        word = words.next()?;
    }
    if word != "map" {
        return None;
    }
    let (proto, map) = words.next()?.strip_prefix("@endpoints-")?.split_once('-')?;
    let proto = protocol_index(proto)?;
    let map: u32 = map.parse().ok()?;
    if map >= maps(proto) || base % SLOT_WIDTH != 0 {
        return None;
    }
    Some((proto, map + (base / SLOT_WIDTH) * maps(proto)))
}

/// The slots in use in one table, by owning chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    by_chain: HashMap<String, Slot>,
    used: BTreeSet<Slot>,
}

impl Slots {
    /// The slots a table's rules use. When two chains claim one slot (a table edited by hand), the first in
    /// name order keeps it and the other gets a new one when rendered.
    pub fn of_ruleset(rs: &Ruleset) -> Slots {
        let mut out = Slots::default();
        for (name, chain) in &rs.chains {
            out.record(name, chain);
        }
        out
    }

    pub fn get(&self, chain: &str) -> Option<Slot> {
        self.by_chain.get(chain).copied()
    }

    pub fn len(&self) -> usize {
        self.by_chain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_chain.is_empty()
    }

    /// Notes the slot `chain` uses now (none: it holds no slot).
    pub fn record(&mut self, name: &str, chain: &Chain) {
        self.forget(name);
        if let Some(slot) = slot_of_chain(chain)
            && self.used.insert(slot)
        {
            self.by_chain.insert(name.to_string(), slot);
        }
    }

    pub fn forget(&mut self, name: &str) {
        if let Some(slot) = self.by_chain.remove(name) {
            self.used.remove(&slot);
        }
    }
}

/// Hands out slots during one render: a chain that held a slot keeps it; a new one takes the lowest slot
/// that neither a previous chain nor an earlier new one holds.
#[derive(Debug)]
pub struct SlotAllocator<'a> {
    prior: &'a Slots,
    taken: BTreeSet<Slot>,
    /// Per protocol, where the search for a free slot resumes: everything below is in use.
    cursor: [u32; PROTOCOLS.len()],
}

impl<'a> SlotAllocator<'a> {
    pub fn new(prior: &'a Slots) -> Self {
        SlotAllocator {
            prior,
            taken: BTreeSet::new(),
            cursor: [0; PROTOCOLS.len()],
        }
    }

    /// The slot for `chain`, whose protocol is `proto`; `None` only when every slot is in use.
    pub fn slot(&mut self, chain: &str, proto: usize) -> Option<Slot> {
        if let Some(s) = self.prior.get(chain).filter(|s| s.0 == proto) {
            return Some(s);
        }
        let mut n = self.cursor[proto];
        while n < slot_count(proto)
            && (self.prior.used.contains(&(proto, n)) || self.taken.contains(&(proto, n)))
        {
            n += 1;
        }
        if n >= slot_count(proto) {
            return None;
        }
        self.taken.insert((proto, n));
        self.cursor[proto] = n + 1;
        Some((proto, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(rule: &str) -> Chain {
        Chain {
            rules: vec![rule.to_string()],
            ..Default::default()
        }
    }

    #[test]
    fn slots_read_back_from_rules() {
        assert_eq!(
            slot_of_rule("meta l4proto tcp dnat ip to numgen random mod 3 map @endpoints-tcp-5"),
            Some((0, 5))
        );
        assert_eq!(
            slot_of_rule(
                "meta l4proto udp dnat ip6 to numgen random mod 1 offset 131072 map @endpoints-udp-15"
            ),
            Some((1, 15 + 2 * 16))
        );
        assert_eq!(placement((1, 15 + 2 * 16)), ("endpoints-udp-15".into(), 131072));
        // Not ours, or not a slot: an offset inside a slot, a map out of range, a plain numgen match.
        assert_eq!(
            slot_of_rule("dnat ip to numgen random mod 3 offset 5 map @endpoints-tcp-1"),
            None
        );
        assert_eq!(
            slot_of_rule("dnat ip to numgen random mod 3 map @endpoints-sctp-4"),
            None
        );
        assert_eq!(
            slot_of_rule("numgen random mod 2 0 meta l4proto tcp dnat to 10.0.0.1:80"),
            None
        );
    }

    #[test]
    fn kept_slots_stay_and_new_chains_fill_the_gaps() {
        let mut prior = Slots::default();
        prior.record("a", &chain("dnat ip to numgen random mod 1 map @endpoints-tcp-0"));
        prior.record("c", &chain("dnat ip to numgen random mod 1 map @endpoints-tcp-2"));
        // A second claim on slot 2 is not recorded.
        prior.record("d", &chain("dnat ip to numgen random mod 4 map @endpoints-tcp-2"));
        assert_eq!(prior.len(), 2);
        let mut alloc = SlotAllocator::new(&prior);
        assert_eq!(alloc.slot("c", 0), Some((0, 2)));
        assert_eq!(alloc.slot("b", 0), Some((0, 1)));
        assert_eq!(alloc.slot("d", 0), Some((0, 3)));
        assert_eq!(alloc.slot("a", 0), Some((0, 0)));
        assert_eq!(alloc.slot("e", 0), Some((0, 4)));
        // Each protocol counts its own slots; a chain whose protocol changed gets a slot of the new one.
        assert_eq!(alloc.slot("u", 1), Some((1, 0)));
        assert_eq!(alloc.slot("a", 2), Some((2, 0)));

        prior.forget("a");
        let mut alloc = SlotAllocator::new(&prior);
        assert_eq!(alloc.slot("z", 0), Some((0, 0)));
    }
}
