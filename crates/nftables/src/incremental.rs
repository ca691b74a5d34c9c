//! The rendered table kept up to date Service by Service: a change to a few Services re-renders only their
//! objects and plans a transaction from those alone, so a sync costs what changed, not the size of the table.
//!
//! The table is the fixed objects plus, in Service order, each Service's *fragment* (what its ports add). Chain
//! and set names are per service port, so fragments never share them; map and set elements can be shared
//! (two Services claiming one external IP, one pod behind two Services), and then the first Service in order
//! wins, as in [`render`](crate::render). To know when a removed element is still wanted by another Service,
//! the table counts the extra Services contributing each element. Where a shared element's value would depend
//! on an unchanged Service, the update is not planned and the caller renders the whole table instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use imbl::ordmap::DiffItem;
use svcproxy_model::{Intent, IpFamily, ObjectName, Protocol, ServicePortIntent, ServicePortName};

use crate::config::RenderConfig;
use crate::fixed::fixed_ruleset;
use crate::ruleset::{Element, Ruleset, Set};
use crate::service_port::add_service_port;
use crate::slots::{SlotAllocator, Slots};

/// A rendered table and what is needed to update it per Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedTable {
    pub ruleset: Ruleset,
    /// Elements contributed by more than one Service: how many Services beyond the first.
    shared: HashMap<(String, String), u32>,
    /// The endpoint-map slots the table's policy chains hold.
    slots: Slots,
}

/// The objects one update rewrites: as the table holds them now, and as they must become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUpdate {
    /// The affected objects as they are (fixed sets declared, with only the affected elements).
    pub before: Ruleset,
    /// The same objects after the update.
    pub after: Ruleset,
    shared: Vec<((String, String), u32)>,
}

/// Renders the whole table, remembering shared elements, with endpoint-map slots numbered afresh.
pub fn render_table(intent: &Intent, cfg: &RenderConfig) -> RenderedTable {
    render_table_after(intent, cfg, &Slots::default())
}

/// Renders the whole table, keeping the endpoint-map slots of `prior` (those of the table it replaces, or of
/// the kernel's copy), so an unchanged policy chain renders exactly as it is.
pub fn render_table_after(intent: &Intent, cfg: &RenderConfig, prior: &Slots) -> RenderedTable {
    let mut table = RenderedTable {
        ruleset: fixed_ruleset(cfg),
        shared: HashMap::new(),
        slots: Slots::default(),
    };
    let skeleton = skeleton(&table.ruleset);
    let mut slots = SlotAllocator::new(prior);
    for ports in by_service(intent) {
        let fragment = fragment(&ports, cfg, &skeleton, &mut slots);
        table.merge(fragment);
    }
    table.ruleset.compact();
    table.slots = Slots::of_ruleset(&table.ruleset);
    table
}

/// The fixed sets, declared without definitions or elements: fragments are rendered into a copy of it, so
/// elements land only in sets the table has, as in a full render.
fn skeleton(fixed: &Ruleset) -> Ruleset {
    Ruleset {
        family: fixed.family,
        name: String::new(),
        comment: None,
        sets: fixed
            .sets
            .iter()
            .filter(|(n, _)| is_fixed(n))
            .map(|(n, s)| (n.clone(), Set::new(s.kind, String::new(), None)))
            .collect(),
        chains: BTreeMap::new(),
    }
}

/// The ports of each Service, Services in order.
fn by_service(intent: &Intent) -> Vec<Vec<&ServicePortIntent>> {
    let mut out: Vec<Vec<&ServicePortIntent>> = Vec::new();
    for spi in intent.service_ports.values() {
        match out.last_mut() {
            Some(group) if group[0].name.service == spi.name.service => group.push(spi),
            _ => out.push(vec![spi]),
        }
    }
    out
}

/// What one Service's ports add to the table, rendered into a copy of `skeleton`.
fn fragment(
    ports: &[&ServicePortIntent],
    cfg: &RenderConfig,
    skeleton: &Ruleset,
    slots: &mut SlotAllocator<'_>,
) -> Ruleset {
    let mut rs = skeleton.clone();
    for spi in ports {
        if IpFamily::of(&spi.cluster_ip) == cfg.family {
            add_service_port(&mut rs, spi, cfg, slots);
        }
    }
    rs
}

/// Elements of a fragment's fixed sets: (set, key, element).
fn fixed_elements<'a>(
    fragment: &'a Ruleset,
    fixed: &'a BTreeSet<&'a str>,
) -> impl Iterator<Item = (&'a str, &'a str, &'a Element)> {
    fragment
        .sets
        .iter()
        .filter(|(n, _)| fixed.contains(n.as_str()))
        .flat_map(|(n, s)| s.elements.iter().map(move |(k, e)| (n.as_str(), k.as_str(), e)))
}

/// One element key of a fixed set as the changed Services' fragments hold it: the versions their old
/// fragments added (one per Service), and the ones their new fragments add, in Service order.
#[derive(Default)]
struct KeyVersions<'a> {
    old: Vec<&'a Element>,
    added: Vec<&'a Element>,
}

/// Elements that carry neither a value nor an owner are the same whoever adds them (the hairpin pairs), so
/// only their count matters.
fn interchangeable(e: &Element) -> bool {
    e.value.is_none() && e.comment.is_none()
}

impl RenderedTable {
    /// The endpoint-map slots in use, to keep when the table is rendered again.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Adds a fragment after every fragment already merged (first Service in order wins a shared element).
    fn merge(&mut self, fragment: Ruleset) {
        let rs = &mut self.ruleset;
        for (name, set) in fragment.sets {
            match rs.sets.get_mut(&name) {
                Some(table_set) if set.key_type.is_empty() => {
                    for (key, element) in set.elements {
                        match table_set.elements.entry(key) {
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert(element);
                            }
                            std::collections::btree_map::Entry::Occupied(o) => {
                                *self
                                    .shared
                                    .entry((name.clone(), o.key().to_string()))
                                    .or_default() += 1;
                            }
                        }
                    }
                }
                _ => {
                    rs.sets.insert(name, set);
                }
            }
        }
        rs.chains.extend(fragment.chains);
    }

    /// Services contributing an element now (0 when the table lacks it).
    fn contributors(&self, set: &str, key: &str) -> u32 {
        let present = self
            .ruleset
            .sets
            .get(set)
            .is_some_and(|s| s.elements.contains_key(key));
        if !present {
            return 0;
        }
        1 + self
            .shared
            .get(&(set.to_string(), key.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Plans moving the table from `applied` (the intent it was rendered from) to `next`. `None` when a shared
    /// element's new value depends on a Service that did not change: render the whole table instead.
    pub fn plan(&self, applied: &Intent, next: &Intent, cfg: &RenderConfig) -> Option<TableUpdate> {
        let changed = changed_services(applied, next);
        let fixed = fixed_set_names(&self.ruleset);
        let skeleton = skeleton(&self.ruleset);
        let mut old_fragments = Vec::new();
        let mut new_fragments = Vec::new();
        // Old fragments find their chains' slots in the table; new chains take free ones, in Service order
        // as a full render would.
        let mut old_slots = SlotAllocator::new(&self.slots);
        let mut new_slots = SlotAllocator::new(&self.slots);
        for service in &changed {
            old_fragments.push(fragment(
                &ports_of(applied, service),
                cfg,
                &skeleton,
                &mut old_slots,
            ));
            new_fragments.push(fragment(&ports_of(next, service), cfg, &skeleton, &mut new_slots));
        }

        let mut before = declarations(&self.ruleset, &fixed);
        let mut after = before.clone();
        // Per-Service objects: as the table holds them, and as the new fragments render them.
        for f in &old_fragments {
            for name in f.chains.keys() {
                if let Some(c) = self.ruleset.chains.get(name) {
                    before.chains.insert(name.clone(), c.clone());
                }
            }
            for name in f.sets.keys().filter(|n| !fixed.contains(n.as_str())) {
                if let Some(s) = self.ruleset.sets.get(name) {
                    before.sets.insert(name.clone(), s.clone());
                }
            }
        }
        for f in &new_fragments {
            for (name, c) in &f.chains {
                after.chains.insert(name.clone(), c.clone());
                if let Some(c) = self.ruleset.chains.get(name) {
                    before.chains.insert(name.clone(), c.clone());
                }
            }
            for (name, s) in f.sets.iter().filter(|(n, _)| !fixed.contains(n.as_str())) {
                after.sets.insert(name.clone(), s.clone());
                if let Some(s) = self.ruleset.sets.get(name) {
                    before.sets.insert(name.clone(), s.clone());
                }
            }
        }

        // Elements of the fixed sets: counted per Service, so an element another Service still adds stays.
        // Gathered per key in one pass over the fragments: asking every fragment about every key cost the
        // product of the two, seconds when a change touches a thousand Services at once.
        let mut touched: BTreeMap<(&str, &str), KeyVersions<'_>> = BTreeMap::new();
        for f in &old_fragments {
            for (set, key, element) in fixed_elements(f, &fixed) {
                touched.entry((set, key)).or_default().old.push(element);
            }
        }
        for f in &new_fragments {
            for (set, key, element) in fixed_elements(f, &fixed) {
                touched.entry((set, key)).or_default().added.push(element);
            }
        }
        let mut shared = Vec::new();
        for ((set, key), KeyVersions { old, added }) in touched {
            let current = self.ruleset.sets.get(set).and_then(|s| s.elements.get(key));
            let removed = old.len() as u32;
            let unchanged = self.contributors(set, key).checked_sub(removed)?;
            if unchanged > 0 {
                // Another Service keeps adding it: its value is known only if every version is the same.
                let same = current.is_some_and(interchangeable)
                    && added.iter().all(|e| interchangeable(e))
                    && old.iter().all(|e| interchangeable(e));
                if !same {
                    return None;
                }
            }
            let count = unchanged + added.len() as u32;
            // Changed Services are taken in order, so the first one adding it wins, as in a full render.
            let value = if unchanged > 0 {
                current
            } else {
                added.first().copied()
            };
            if let Some(e) = current {
                before.sets.get_mut(set)?.elements.insert(key.into(), e.clone());
            }
            if let Some(e) = value.filter(|_| count > 0) {
                after.sets.get_mut(set)?.elements.insert(key.into(), e.clone());
            }
            shared.push(((set.to_string(), key.to_string()), count.saturating_sub(1)));
        }
        Some(TableUpdate {
            before,
            after,
            shared,
        })
    }

    /// Makes the table what `update` planned, once the kernel has taken it.
    pub fn apply(&mut self, update: TableUpdate) {
        let TableUpdate {
            before,
            after,
            shared,
        } = update;
        let rs = &mut self.ruleset;
        for name in before.chains.keys() {
            rs.chains.remove(name);
            self.slots.forget(name);
        }
        for (name, chain) in &after.chains {
            self.slots.record(name, chain);
        }
        rs.chains.extend(after.chains);
        for (name, set) in before.sets {
            if is_fixed(&name) {
                if let Some(table_set) = rs.sets.get_mut(&name) {
                    for key in set.elements.keys() {
                        table_set.elements.remove(key);
                    }
                }
            } else {
                rs.sets.remove(&name);
            }
        }
        for (name, set) in after.sets {
            match rs.sets.get_mut(&name) {
                Some(table_set) if is_fixed(&name) => table_set.elements.extend(set.elements),
                _ => {
                    rs.sets.insert(name, set);
                }
            }
        }
        for (key, extra) in shared {
            if extra == 0 {
                self.shared.remove(&key);
            } else {
                self.shared.insert(key, extra);
            }
        }
    }
}

fn is_fixed(name: &str) -> bool {
    crate::names::owner_of_object(name).is_none()
}

/// Names of the sets every table has (those fragments add elements to).
fn fixed_set_names(rs: &Ruleset) -> BTreeSet<&str> {
    rs.sets
        .keys()
        .filter(|n| is_fixed(n))
        .map(String::as_str)
        .collect()
}

/// The table with only its fixed sets, declared as the table declares them, without elements.
fn declarations(rs: &Ruleset, fixed: &BTreeSet<&str>) -> Ruleset {
    Ruleset {
        family: rs.family,
        name: rs.name.clone(),
        comment: rs.comment.clone(),
        sets: fixed
            .iter()
            .filter_map(|n| rs.sets.get(*n).map(|s| (n.to_string(), s)))
            .map(|(n, s)| {
                let mut decl = Set::new(s.kind, s.key_type.clone(), s.data_type.as_deref());
                decl.flags = s.flags.clone();
                decl.timeout = s.timeout;
                decl.size = s.size;
                decl.comment = s.comment.clone();
                (n, decl)
            })
            .collect(),
        chains: BTreeMap::new(),
    }
}

/// Services with a port added, removed or changed between two intents. The intents share the tree of
/// their unchanged ports, which the diff skips, so this costs what changed.
fn changed_services(a: &Intent, b: &Intent) -> BTreeSet<ObjectName> {
    a.service_ports
        .diff(&b.service_ports)
        .map(|item| match item {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k.service.clone(),
            DiffItem::Update { new: (k, _), .. } => k.service.clone(),
        })
        .collect()
}

fn ports_of<'a>(intent: &'a Intent, service: &ObjectName) -> Vec<&'a ServicePortIntent> {
    // A Service's ports sort together, its name being the first field of theirs.
    let first = ServicePortName::new(service.clone(), "", Protocol::Tcp);
    intent
        .service_ports
        .range(first..)
        .take_while(|(k, _)| k.service == *service)
        .map(|(_, v)| &**v)
        .collect()
}
