//! Housekeeping: the removals a snapshot left behind. The tree writer records them as pending with a due time and
//! carries them out; this owns when a run starts (the core's rule, [`removals_due`]: the earliest pending removal
//! is due and no run is going on) and how many are pending (for the status: a mirror with removals left is not
//! settled).

use std::time::{Duration, Instant};

use mirrormesh_proto::sync::apply_order::removals_due;
use mirrormesh_proto::timestamp::Timestamp;

/// How often the shell asks whether a removal run is due.
pub const REMOVAL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Removals {
    /// A removal run is queued or running on the tree writer.
    running: bool,
    /// When the earliest pending removal is due.
    next_due: Option<Timestamp>,
    /// The earliest due of removals scheduled while a run was going (its report does not know them).
    scheduled_during_run: Option<Timestamp>,
    /// Removals pending, as last counted in the database.
    pending: u64,
    next_check: Instant,
}

impl Removals {
    /// `pending` removals are in the database at start: the first check reads their real due time.
    pub fn new(pending: u64, now: Instant) -> Self {
        Self {
            running: false,
            next_due: (pending > 0).then_some(Timestamp(0)),
            scheduled_during_run: None,
            pending,
            next_check: now,
        }
    }

    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// An apply recorded removals due at `due` (if it recorded any); `pending` is the database's new count.
    pub fn scheduled(&mut self, due: Option<Timestamp>, pending: u64) {
        self.pending = pending;
        let Some(due) = due else { return };
        let earliest = |t: Option<Timestamp>| Some(t.map_or(due, |t| t.min(due)));
        self.next_due = earliest(self.next_due);
        if self.running {
            self.scheduled_during_run = earliest(self.scheduled_during_run);
        }
    }

    /// Whether to start a removal run now (asked at most every [`REMOVAL_CHECK_INTERVAL`]); the caller submits it
    /// and calls [`Removals::started`].
    pub fn check(&mut self, at: Instant, now: Timestamp) -> bool {
        if at < self.next_check {
            return false;
        }
        self.next_check = at + REMOVAL_CHECK_INTERVAL;
        removals_due(self.next_due, now, self.running)
    }

    pub fn started(&mut self) {
        self.running = true;
    }

    /// A run ended: the earliest due of what it left (`None` if it failed: then what was due stays due) and the
    /// database's count (counted after the run, not by it: an apply that finished meanwhile added removals after
    /// the run counted them).
    pub fn finished(&mut self, next_due: Option<Option<Timestamp>>, pending: Option<u64>) {
        self.running = false;
        let during = self.scheduled_during_run.take();
        if let Some(left) = next_due {
            self.next_due = match (left, during) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if let Some(pending) = pending {
            self.pending = pending;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_starts_when_the_earliest_removal_is_due_and_keeps_what_was_scheduled_meanwhile() {
        let t0 = Instant::now();
        let mut r = Removals::new(0, t0);
        assert!(!r.check(t0, Timestamp(1_000)), "nothing pending");
        r.scheduled(Some(Timestamp(5_000)), 3);
        assert_eq!(r.pending(), 3);
        assert!(!r.check(t0 + REMOVAL_CHECK_INTERVAL, Timestamp(4_999)));
        assert!(!r.check(t0 + REMOVAL_CHECK_INTERVAL, Timestamp(5_000)), "asked again within the interval");
        assert!(r.check(t0 + 2 * REMOVAL_CHECK_INTERVAL, Timestamp(5_000)));
        r.started();
        r.scheduled(Some(Timestamp(9_000)), 5); // an apply while the run goes
        assert!(!r.check(t0 + 3 * REMOVAL_CHECK_INTERVAL, Timestamp(9_000)), "one run at a time");
        r.finished(Some(None), Some(2)); // the run removed all it knew of
        assert_eq!(r.pending(), 2);
        assert!(r.check(t0 + 4 * REMOVAL_CHECK_INTERVAL, Timestamp(9_000)), "what was scheduled meanwhile is kept");
        r.started();
        r.finished(None, None); // failed: still due
        assert!(r.check(t0 + 5 * REMOVAL_CHECK_INTERVAL, Timestamp(9_000)));
    }

    #[test]
    fn removals_left_in_the_database_at_start_are_checked_at_once() {
        let t0 = Instant::now();
        let mut r = Removals::new(4, t0);
        assert!(r.check(t0, Timestamp(1)));
    }
}
