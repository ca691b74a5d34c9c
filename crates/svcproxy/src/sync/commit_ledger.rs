//! Our own nf_tables commits, as the family proxiers of one process see them.
//!
//! The IPv4 and IPv6 tables share one nf_tables generation, so each family's restores move it past the
//! generation the other family's last write ended at. Alone, a family would take that for another program
//! writing and stop trusting what it knows of its tables (and a restart would read them whole). Both families
//! record here each restore that moved the generation by exactly its own transactions, so either can tell that
//! every commit since its own last one was ours, and the seals can say so (see `svcproxy_iptables::seal`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use svcproxy_iptables::seal::Generation;

/// Shared by the proxiers of one process; clones see the same record.
#[derive(Debug, Clone, Default)]
pub struct CommitLedger {
    run: Arc<Mutex<Option<OwnRun>>>,
    /// Held across a restore (the generation read before it, the restore, the read after) and across the
    /// reading of seals: the families sync side by side, and a restore of one landing inside another's would
    /// make both miscount their own transactions.
    turn: Arc<Mutex<()>>,
    /// Shared by the big restores that do not take turns (a cold sync's), taken alone by whoever needs a
    /// moment with none under way.
    big_restores: Arc<RwLock<()>>,
}

/// Every commit after `from` up to `to` was one of our restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OwnRun {
    from: Generation,
    to: Generation,
}

impl CommitLedger {
    /// A restore of ours moved the generation from `before` to `after` by exactly its own transactions. Joined
    /// to the run it continues; after a gap (some commit nobody recorded) a new run starts.
    pub fn record(&self, before: Generation, after: Generation) {
        let mut run = self.lock();
        *run = Some(match *run {
            Some(r) if r.to == before => OwnRun {
                from: r.from,
                to: after,
            },
            _ => OwnRun {
                from: before,
                to: after,
            },
        });
    }

    /// Some commit may not have been ours (a restore failed part way, or moved the generation by other than
    /// its transactions, or the generation could not be read).
    pub fn forget(&self) {
        *self.lock() = None;
    }

    /// The generation is `now`: a run starts here (an empty one, which vouches for nothing), so the restores
    /// that follow are accounted from here, unless the run on record already ends here.
    pub fn observe(&self, now: Generation) {
        let mut run = self.lock();
        if run.is_none_or(|r| r.to != now) {
            *run = Some(OwnRun { from: now, to: now });
        }
    }

    /// A restart found a seal naming the generation the kernel is at and vouching for every commit after
    /// `since`: the run the previous process left.
    pub fn adopt(&self, since: Generation, now: Generation) {
        let mut run = self.lock();
        if run.is_none() && since.is_at_or_before(now) {
            *run = Some(OwnRun { from: since, to: now });
        }
    }

    /// Since which generation every commit up to `now` was ours: `now` itself when the last commit recorded
    /// is not `now`'s.
    pub fn ours_since(&self, now: Generation) -> Generation {
        match *self.lock() {
            Some(r) if r.to == now => r.from,
            _ => now,
        }
    }

    /// Whether every commit after `earlier` up to `now` was ours.
    pub fn ours_between(&self, earlier: Generation, now: Generation) -> bool {
        earlier == now || (self.ours_since(now).is_at_or_before(earlier) && earlier.is_at_or_before(now))
    }

    /// Waits until no other proxier of this process is restoring or reading seals, and keeps it so until
    /// the guard goes.
    pub fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held across a big restore; others may run at the same time.
    pub fn big_restore(&self) -> RwLockReadGuard<'_, ()> {
        self.big_restores.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no big restore is under way and keeps new ones from starting until the guard goes: a
    /// read-back that ended during one of the other family's cold-sync restores can then tell whether that
    /// restore was all that moved the generation.
    pub fn no_big_restore(&self) -> RwLockWriteGuard<'_, ()> {
        self.big_restores.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, Option<OwnRun>> {
        // The record is two numbers, consistent after any write: a panic elsewhere cannot leave it torn.
        self.run.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(value: u32) -> Generation {
        Generation { instance: 7, value }
    }

    #[test]
    fn restores_in_a_row_make_one_run() {
        let ledger = CommitLedger::default();
        assert_eq!(ledger.ours_since(at(5)), at(5));
        ledger.record(at(5), at(7));
        ledger.record(at(7), at(8));
        assert_eq!(ledger.ours_since(at(8)), at(5));
        assert!(ledger.ours_between(at(5), at(8)));
        assert!(ledger.ours_between(at(7), at(8)));
        assert!(!ledger.ours_between(at(4), at(8)));
        // Someone else committed 9.
        assert!(!ledger.ours_between(at(8), at(9)));
        assert_eq!(ledger.ours_since(at(9)), at(9));
    }

    #[test]
    fn a_gap_starts_a_new_run() {
        let ledger = CommitLedger::default();
        ledger.record(at(5), at(7));
        ledger.record(at(8), at(9));
        assert_eq!(ledger.ours_since(at(9)), at(8));
        assert!(!ledger.ours_between(at(7), at(9)));
    }

    #[test]
    fn forgetting_vouches_for_nothing() {
        let ledger = CommitLedger::default();
        ledger.record(at(5), at(7));
        ledger.forget();
        assert!(!ledger.ours_between(at(5), at(7)));
        assert!(ledger.ours_between(at(7), at(7)));
    }

    #[test]
    fn a_restart_adopts_the_run_a_seal_names_unless_it_knows_better() {
        let ledger = CommitLedger::default();
        ledger.adopt(at(3), at(6));
        assert!(ledger.ours_between(at(4), at(6)));
        ledger.adopt(at(1), at(6));
        assert_eq!(ledger.ours_since(at(6)), at(3));
        let elsewhere = CommitLedger::default();
        elsewhere.adopt(
            Generation {
                instance: 8,
                value: 3,
            },
            at(6),
        );
        assert_eq!(elsewhere.ours_since(at(6)), at(6));
    }

    #[test]
    fn an_observed_quiet_point_starts_a_run_the_next_restore_continues() {
        let ledger = CommitLedger::default();
        ledger.observe(at(4));
        ledger.record(at(4), at(6));
        assert!(ledger.ours_between(at(4), at(6)));
        // Observing where the run ends keeps it.
        ledger.observe(at(6));
        assert_eq!(ledger.ours_since(at(6)), at(4));
        // Someone else committed 7: observing there starts afresh.
        ledger.observe(at(7));
        assert!(!ledger.ours_between(at(6), at(7)));
        ledger.record(at(7), at(8));
        assert!(ledger.ours_between(at(7), at(8)));
    }

    #[test]
    fn clones_share_the_record() {
        let ledger = CommitLedger::default();
        let other = ledger.clone();
        other.record(at(1), at(2));
        assert_eq!(ledger.ours_since(at(2)), at(1));
    }
}
