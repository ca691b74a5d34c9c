//! Deletions held back on kernels before 6.2 ([`crate::KernelVersion`]): there, the chain a removed
//! verdict-map element jumped to stays referenced until some time after the commit, so a transaction cannot
//! delete a chain whose last reference it removes. Such a transaction only flushes the chain (nothing reaches
//! it any more and it refers to nothing), and a later one deletes it once [`DELETION_DELAY`] has passed, as
//! upstream does. The sets the transaction deletes wait with the chains whose rules used them.
//!
//! Bookkeeping only: the caller says what time it is and applies the text.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::ruleset::Ruleset;
use crate::transaction::Transaction;

/// How long a flushed chain waits before it is deleted: the time upstream gives the kernel.
pub const DELETION_DELAY: Duration = Duration::from_secs(1);

/// One held deletion: its command, and since when the object has been unreferenced.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    command: String,
    since: Instant,
}

/// Whether a held deletion is of a chain or of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chain,
    Set,
}

/// Chains and sets flushed and waiting to be deleted, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeferredDeletions {
    chains: BTreeMap<String, Held>,
    sets: BTreeMap<String, Held>,
    /// Deletions split off transactions not yet known to be applied: (kind, name, command).
    staged: Vec<(Kind, String, String)>,
}

/// The held deletions that are due, as one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDeletions {
    pub text: String,
    pub chains: Vec<String>,
    pub sets: Vec<String>,
}

impl DeferredDeletions {
    /// What of `tx` to apply now: all of it but its deletions of chains and sets, which are held once
    /// [`Self::applied`] says the transaction went in. Until then the objects may still be referenced: a
    /// transaction the kernel refused has flushed nothing.
    pub fn defer(&mut self, tx: Transaction) -> String {
        let (first, later) = tx.defer_deletions();
        for line in later.iter().flat_map(|t| t.text.lines()) {
            let mut words = line.split(' ');
            let kind = match (words.next(), words.next()) {
                (Some("delete"), Some("chain")) => Kind::Chain,
                (Some("delete"), Some("set" | "map")) => Kind::Set,
                _ => continue,
            };
            if let Some(name) = words.nth(2) {
                self.staged.push((kind, name.to_string(), line.to_string()));
            }
        }
        first.text
    }

    /// The transactions [`Self::defer`] split since the last call were applied at `now`: their deletions
    /// wait from then. An object held already keeps its earlier time: the transaction only flushed it again.
    pub fn applied(&mut self, now: Instant) {
        for (kind, name, command) in std::mem::take(&mut self.staged) {
            let held = match kind {
                Kind::Chain => &mut self.chains,
                Kind::Set => &mut self.sets,
            };
            held.entry(name).or_insert(Held { command, since: now });
        }
    }

    /// The transactions [`Self::defer`] split since the last call were not applied: nothing of them is held.
    pub fn not_applied(&mut self) {
        self.staged.clear();
    }

    /// Forgets the objects `next` holds: a Service came back before its chains were deleted, and the
    /// transaction that brought it back declared them again.
    pub fn keep_wanted(&mut self, next: &Ruleset) {
        self.chains.retain(|name, _| !next.chains.contains_key(name));
        self.sets.retain(|name, _| !next.sets.contains_key(name));
    }

    /// The deletions held for at least [`DELETION_DELAY`] at `now`, chains first (their rules were what used
    /// the sets); `None` when none is due. They stay held until [`Self::deleted`].
    pub fn due(&self, now: Instant) -> Option<DueDeletions> {
        let ripe = |held: &Held| now.saturating_duration_since(held.since) >= DELETION_DELAY;
        let mut due = DueDeletions {
            text: String::new(),
            chains: Vec::new(),
            sets: Vec::new(),
        };
        for (names, held) in [(&mut due.chains, &self.chains), (&mut due.sets, &self.sets)] {
            for (name, h) in held.iter().filter(|(_, h)| ripe(h)) {
                due.text.push_str(&h.command);
                due.text.push('\n');
                names.push(name.clone());
            }
        }
        (!due.text.is_empty()).then_some(due)
    }

    /// Marks `due` as applied.
    pub fn deleted(&mut self, due: &DueDeletions) {
        for name in &due.chains {
            self.chains.remove(name);
        }
        for name in &due.sets {
            self.sets.remove(name);
        }
    }

    /// `due` could not be applied (something still refers to an object in it): they stay held, due again
    /// [`DELETION_DELAY`] after `now`.
    pub fn retry_later(&mut self, due: &DueDeletions, now: Instant) {
        for (names, held) in [(&due.chains, &mut self.chains), (&due.sets, &mut self.sets)] {
            for name in names {
                if let Some(h) = held.get_mut(name) {
                    h.since = now;
                }
            }
        }
    }

    /// When the next held deletion is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.chains
            .values()
            .chain(self.sets.values())
            .map(|h| h.since + DELETION_DELAY)
            .min()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty()
    }

    /// Forgets everything held: the table was deleted (and written anew), or found missing.
    pub fn clear(&mut self) {
        self.chains.clear();
        self.sets.clear();
        self.staged.clear();
    }

    /// Takes the held objects out of a read-back of the kernel's table, so a chain flushed and waiting to be
    /// deleted is not taken for a difference. A held chain that has rules again stays: something wrote them.
    pub fn hide_from(&self, read_back: &mut Ruleset) {
        read_back
            .chains
            .retain(|name, c| !(self.chains.contains_key(name) && c.base.is_none() && c.rules.is_empty()));
        read_back.sets.retain(|name, _| !self.sets.contains_key(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{Chain, Family, Set, SetKind};
    use crate::transaction::partial_transaction;

    /// A table with a service chain reached from a verdict map and an affinity set its rule uses.
    fn table(with_service: bool) -> Ruleset {
        let mut rs = Ruleset::new(Family::Ip, "svcproxy");
        let mut map = Set::new(
            SetKind::Map,
            "type ipv4_addr . inet_proto . inet_service",
            Some("verdict"),
        );
        if with_service {
            map.elements.insert(
                "10.96.0.1 . tcp . 80".into(),
                crate::ruleset::Element {
                    value: Some("goto service-ns/web/tcp/http".into()),
                    comment: Some("ns/web:http".into()),
                },
            );
            let mut sticky = Set::new(SetKind::Set, "type ipv4_addr", None);
            sticky.flags = ["dynamic".to_string(), "timeout".to_string()].into();
            sticky.timeout = Some(10);
            rs.sets.insert("affinity-ns/web/tcp/http".into(), sticky);
            rs.chains.insert(
                "service-ns/web/tcp/http".into(),
                Chain {
                    rules: vec!["ip saddr @affinity-ns/web/tcp/http accept".into()],
                    ..Default::default()
                },
            );
        }
        rs.sets.insert("service-ips".into(), map);
        rs
    }

    #[test]
    fn deletions_wait_for_the_delay_and_then_come_chains_first() {
        let t0 = Instant::now();
        let mut held = DeferredDeletions::default();
        let now = held.defer(partial_transaction(&table(true), &table(false)).unwrap());
        assert!(
            now.contains("flush chain ip svcproxy service-ns/web/tcp/http"),
            "{now}"
        );
        assert!(now.contains("delete element ip svcproxy service-ips"), "{now}");
        assert!(
            !now.contains("delete chain") && !now.contains("delete set"),
            "{now}"
        );
        assert_eq!(held.next_due(), None, "held once applied");
        held.applied(t0);
        assert_eq!(held.next_due(), Some(t0 + DELETION_DELAY));
        assert_eq!(held.due(t0 + DELETION_DELAY / 2), None);

        // Flushed again a moment later (a full sync read the kernel): the first time counts.
        let mut kernel = table(false);
        kernel
            .chains
            .insert("service-ns/web/tcp/http".into(), Chain::default());
        kernel.sets.insert(
            "affinity-ns/web/tcp/http".into(),
            table(true).sets["affinity-ns/web/tcp/http"].clone(),
        );
        let again = partial_transaction(&kernel, &table(false)).unwrap();
        held.defer(again);
        held.applied(t0 + DELETION_DELAY / 2);
        assert_eq!(held.next_due(), Some(t0 + DELETION_DELAY));

        let due = held.due(t0 + DELETION_DELAY).expect("due");
        assert_eq!(
            due.text,
            "delete chain ip svcproxy service-ns/web/tcp/http\ndelete set ip svcproxy affinity-ns/web/tcp/http\n"
        );
        assert!(!held.is_empty(), "held until applied");
        held.deleted(&due);
        assert!(held.is_empty());
        assert_eq!(held.next_due(), None);
    }

    #[test]
    fn deletions_the_kernel_refused_are_due_again_a_delay_later() {
        let t0 = Instant::now();
        let mut held = DeferredDeletions::default();
        held.defer(partial_transaction(&table(true), &table(false)).unwrap());
        held.applied(t0);
        let due = held.due(t0 + DELETION_DELAY).expect("due");
        let refused_at = t0 + DELETION_DELAY;
        held.retry_later(&due, refused_at);
        assert_eq!(held.due(refused_at), None, "not again at once");
        assert_eq!(held.next_due(), Some(refused_at + DELETION_DELAY));
        assert_eq!(held.due(refused_at + DELETION_DELAY), Some(due));
    }

    #[test]
    fn an_object_wanted_again_is_no_longer_deleted_and_one_in_waiting_is_no_difference() {
        let t0 = Instant::now();
        let mut held = DeferredDeletions::default();
        held.defer(partial_transaction(&table(true), &table(false)).unwrap());
        held.applied(t0);

        // The kernel holds the flushed chain and the set: hidden, the read-back equals what was applied.
        let mut read_back = table(false);
        read_back
            .chains
            .insert("service-ns/web/tcp/http".into(), Chain::default());
        read_back.sets.insert(
            "affinity-ns/web/tcp/http".into(),
            table(true).sets["affinity-ns/web/tcp/http"].clone(),
        );
        let mut hidden = read_back.clone();
        held.hide_from(&mut hidden);
        assert_eq!(hidden, table(false));
        // Unless someone wrote into the chain meanwhile.
        read_back
            .chains
            .get_mut("service-ns/web/tcp/http")
            .unwrap()
            .rules
            .push("accept".into());
        held.hide_from(&mut read_back);
        assert!(read_back.chains.contains_key("service-ns/web/tcp/http"));

        // The Service comes back before its chain was deleted: nothing is deleted.
        held.keep_wanted(&table(true));
        assert!(held.is_empty());
        assert_eq!(held.due(t0 + DELETION_DELAY * 2), None);
    }

    #[test]
    fn a_transaction_without_deletions_is_applied_whole() {
        let mut held = DeferredDeletions::default();
        let tx = partial_transaction(&table(false), &table(true)).unwrap();
        let text = tx.text.clone();
        assert_eq!(held.defer(tx), text);
        held.applied(Instant::now());
        assert!(held.is_empty());
    }

    #[test]
    fn a_refused_transaction_holds_nothing() {
        let mut held = DeferredDeletions::default();
        held.defer(partial_transaction(&table(true), &table(false)).unwrap());
        held.not_applied();
        held.applied(Instant::now());
        assert!(held.is_empty());
    }
}
