//! When the files a snapshot no longer names leave the served tree: not with the apply, but [`removal_due`] after
//! it (the grace period, `repo.delete_grace_secs`, so downstream mirrors and clients that read the old index still
//! find its files), one run at a time. The engine owns a [`Removals`] and asks for a run with
//! [`Output::RemoveDue`](super::Output::RemoveDue) when the earliest pending removal is due; the shell's tree
//! writer keeps the pending removals in the node's database (with their due times, on the wall clock: they outlive
//! restarts, where a monotonic time means nothing), carries a run out and reports what is left.

use crate::timestamp::Timestamp;

/// The order removals are carried out in: deepest first, so a directory comes after its contents (then by path,
/// descending, so the order is total).
pub fn deepest_first(a: &str, b: &str) -> std::cmp::Ordering {
    b.matches('/').count().cmp(&a.matches('/').count()).then(b.cmp(a))
}

/// When the removals of a snapshot applied at `applied` are carried out: `grace_ms` later.
pub fn removal_due(applied: Timestamp, grace_ms: u64) -> Timestamp {
    applied.plus_ms(grace_ms)
}

/// Pending removals as the engine knows them: when the earliest is due, how many there are, whether a run goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removals {
    /// A run was asked for and has not reported yet.
    running: bool,
    /// When the earliest pending removal is due.
    next_due: Option<Timestamp>,
    /// The earliest due of removals scheduled while a run was going (its report does not know them).
    scheduled_during_run: Option<Timestamp>,
    /// Removals pending, as the shell last counted them.
    pending: u64,
}

impl Removals {
    /// Removals were recorded, the earliest due at `due` (`None`: none were); `pending` is the new count.
    pub fn scheduled(&mut self, due: Option<Timestamp>, pending: u64) {
        self.pending = pending;
        let Some(due) = due else { return };
        let earliest = |t: Option<Timestamp>| Some(t.map_or(due, |t| t.min(due)));
        self.next_due = earliest(self.next_due);
        if self.running {
            self.scheduled_during_run = earliest(self.scheduled_during_run);
        }
    }

    /// Whether a run starts at `now`: the earliest pending removal is due and no run goes. If so it is going.
    pub fn start_if_due(&mut self, now: Timestamp) -> bool {
        if self.running || self.next_due.is_none_or(|due| due > now) {
            return false;
        }
        self.running = true;
        true
    }

    /// A run ended: the earliest due of what it left (`None` if it failed: what was due stays due) and the count
    /// of pending removals after it (`None`: unknown, the last count stays).
    pub fn finished(&mut self, left: Option<Option<Timestamp>>, pending: Option<u64>) {
        self.running = false;
        let during = self.scheduled_during_run.take();
        if let Some(left) = left {
            self.next_due = match (left, during) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if let Some(pending) = pending {
            self.pending = pending;
        }
    }

    /// When the next run is due (wall clock); `None` while one goes or nothing is pending.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.next_due.filter(|_| !self.running)
    }

    pub fn pending(&self) -> u64 {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_starts_when_the_earliest_removal_is_due_and_keeps_what_was_scheduled_meanwhile() {
        let mut r = Removals::default();
        assert!(!r.start_if_due(Timestamp(1_000)), "nothing pending");
        let due = removal_due(Timestamp(1_000), 4_000);
        assert_eq!(due, Timestamp(5_000));
        r.scheduled(Some(due), 3);
        assert_eq!((r.pending(), r.next_due()), (3, Some(due)));
        assert!(!r.start_if_due(Timestamp(4_999)));
        assert!(r.start_if_due(Timestamp(5_000)));
        assert_eq!(r.next_due(), None, "a run goes");
        r.scheduled(Some(Timestamp(9_000)), 5); // an apply while the run goes
        assert!(!r.start_if_due(Timestamp(9_000)), "one run at a time");
        r.finished(Some(None), Some(2)); // the run removed all it knew of
        assert_eq!((r.pending(), r.next_due()), (2, Some(Timestamp(9_000))), "what was scheduled meanwhile is kept");
        assert!(r.start_if_due(Timestamp(9_000)));
        r.finished(None, None); // failed: still due
        assert_eq!(r.pending(), 2);
        assert!(r.start_if_due(Timestamp(9_000)));
        r.finished(Some(Some(Timestamp(20_000))), Some(1)); // some are due later
        assert!(!r.start_if_due(Timestamp(19_999)));
        assert!(r.start_if_due(Timestamp(20_000)));
    }

    #[test]
    fn an_apply_that_records_no_removal_changes_only_the_count() {
        let mut r = Removals::default();
        r.scheduled(None, 7);
        assert_eq!((r.pending(), r.next_due()), (7, None));
        assert!(!r.start_if_due(Timestamp(u64::MAX)));
    }
}
