//! The origin's serving policy ("super-seeding"): hand out each chunk of a new snapshot about once, and point later
//! askers at the peers that have it.
//!
//! For a request from peer `r` for chunk `c`:
//! 1. if `r` was already pointed elsewhere for `c`, serve it (a peer that cannot reach the holders still gets the
//!    chunk, at most one extra copy per asker), unless `c` is still on its way to its first recipient and nobody
//!    announced it yet (then point `r` at that recipient again);
//! 2. else if connected peers other than `r` hold `c`, answer `Elsewhere(them)`;
//! 3. else if `c` was handed to another connected peer less than [`SeederLimits::assign_timeout_ms`] ago (it is
//!    still arriving there), answer `Elsewhere(that peer)`;
//! 4. else serve it and remember that `r` got it.

use std::collections::{BTreeMap, BTreeSet};

use crate::chunk::ChunkId;
use crate::sync::PeerKey;
use crate::timestamp::Timestamp;
use crate::transfer::REDIRECT_PEERS_MAX;

#[derive(Clone, Debug)]
pub struct SeederLimits {
    /// How long a chunk handed to one peer is assumed to be on its way there.
    pub assign_timeout_ms: u64,
    /// Most chunks remembered per snapshot (beyond it the origin simply serves).
    pub entries_max: usize,
}

impl Default for SeederLimits {
    fn default() -> Self {
        Self { assign_timeout_ms: 30_000, entries_max: 1 << 22 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeDecision<P> {
    Serve,
    Elsewhere(Vec<P>),
}

pub struct Seeder<P: PeerKey> {
    limits: SeederLimits,
    /// Who got each chunk first, and when.
    first_sent: BTreeMap<ChunkId, (P, Timestamp)>,
    /// (asker, chunk) pairs already pointed elsewhere.
    redirected: BTreeSet<(P, ChunkId)>,
    /// Chunks served and redirected since the last reset.
    pub served: u64,
    pub redirects: u64,
}

impl<P: PeerKey> Seeder<P> {
    pub fn new(limits: SeederLimits) -> Self {
        Self { limits, first_sent: BTreeMap::new(), redirected: BTreeSet::new(), served: 0, redirects: 0 }
    }

    /// Forgets everything (a new snapshot was published).
    pub fn reset(&mut self) {
        self.first_sent.clear();
        self.redirected.clear();
    }

    /// Decides how to answer `asker` for `id`. `holders` are connected peers other than the asker that hold it;
    /// `connected` says whether a peer is still connected.
    pub fn decide(
        &mut self,
        now: Timestamp,
        asker: &P,
        id: &ChunkId,
        holders: &[P],
        connected: impl Fn(&P) -> bool,
    ) -> ServeDecision<P> {
        let mut elsewhere: Vec<P> = holders.iter().filter(|p| *p != asker).take(REDIRECT_PEERS_MAX).cloned().collect();
        let in_transit = self
            .first_sent
            .get(id)
            .filter(|(first, at)| {
                first != asker && connected(first) && now.millis_since(*at) < self.limits.assign_timeout_ms
            })
            .map(|(first, _)| first.clone());
        if self.redirected.contains(&(asker.clone(), *id)) {
            if elsewhere.is_empty()
                && let Some(first) = in_transit
            {
                // Still on its way to its first recipient (the origin's queue can be seconds long): a second copy
                // now would only compete with the first.
                self.redirects += 1;
                return ServeDecision::Elsewhere(vec![first]);
            }
            self.served += 1;
            return ServeDecision::Serve;
        }
        // The chunk's first recipient leads the list: it is getting the chunk now, while peers that claim to hold
        // everything may be lying (an asker that banned every listed peer comes back at once).
        if let Some(first) = in_transit
            && !elsewhere.contains(&first)
        {
            elsewhere.insert(0, first);
            elsewhere.truncate(REDIRECT_PEERS_MAX);
        }
        if !elsewhere.is_empty() && self.redirected.len() < self.limits.entries_max {
            self.redirected.insert((asker.clone(), *id));
            self.redirects += 1;
            return ServeDecision::Elsewhere(elsewhere);
        }
        if self.first_sent.len() < self.limits.entries_max {
            self.first_sent.entry(*id).or_insert_with(|| (asker.clone(), now));
        }
        self.served += 1;
        ServeDecision::Serve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_chunk_leaves_about_once() {
        let mut s = Seeder::<u32>::new(SeederLimits::default());
        let c = ChunkId([1; 32]);
        let t = Timestamp(1_000);
        assert_eq!(s.decide(t, &1, &c, &[], |_| true), ServeDecision::Serve);
        // Peer 2 asks while it is still on its way to 1: pointed at 1.
        assert_eq!(s.decide(t.plus_ms(10), &2, &c, &[], |_| true), ServeDecision::Elsewhere(vec![1]));
        // 3 asks once 1 announced it.
        assert_eq!(s.decide(t.plus_ms(20), &3, &c, &[1], |_| true), ServeDecision::Elsewhere(vec![1]));
        // 2 asks again while it is still on its way to 1 and nobody announced it: pointed at 1 again.
        assert_eq!(s.decide(t.plus_ms(25), &2, &c, &[], |_| true), ServeDecision::Elsewhere(vec![1]));
        // 2 asks again once 1 announced it (2 could not reach 1): served.
        assert_eq!(s.decide(t.plus_ms(30), &2, &c, &[1], |_| true), ServeDecision::Serve);
        // After the timeout with nobody announcing it, a new asker is served.
        assert_eq!(s.decide(t.plus_ms(40_000), &4, &c, &[], |_| true), ServeDecision::Serve);
        // A disconnected first recipient does not hold others up.
        let d = ChunkId([2; 32]);
        assert_eq!(s.decide(t, &1, &d, &[], |_| true), ServeDecision::Serve);
        assert_eq!(s.decide(t, &2, &d, &[], |p| *p != 1), ServeDecision::Serve);
        assert_eq!((s.served, s.redirects), (5, 3));
    }
}
