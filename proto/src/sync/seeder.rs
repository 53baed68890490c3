//! The origin's serving policy ("super-seeding"): hand out each chunk of a new snapshot about once, and point later
//! askers at the peers that have it.
//!
//! For a request from peer `r` for chunk `c`:
//! 1. if `r` was already pointed elsewhere for `c`:
//!    - if `r` came back sooner than [`SeederLimits::rebound_ms`] after it was pointed elsewhere (an asker waits
//!      that long for the mesh unless it banned every peer named) and the origin has since handed `c` to peers `r`
//!      was not pointed at, point `r` at them (at most [`REDIRECTS_PER_ASKER_MAX`] times per asker and chunk): a
//!      recipient it did not know of is the likeliest honest holder;
//!    - else if `c` is still on its way to a recipient and nobody announced it yet, point `r` at that recipient
//!      again;
//!    - else serve it (a peer that cannot reach the holders still gets the chunk, about one extra copy per asker);
//! 2. else if `c` is on its way to other connected recipients (handed to them less than
//!    [`SeederLimits::assign_timeout_ms`] ago), or connected peers other than `r` claim to hold `c` and `c` already
//!    left the origin in this snapshot, answer `Elsewhere(them)`, recipients first (every copy of a new chunk
//!    descends from the origin's first one, so a peer claiming a chunk the origin never handed out is lying or holds
//!    it from an older snapshot: either way the origin serves);
//! 3. else serve it and remember that `r` got it.
//!
//! The engine asks only about chunks of the current snapshot (others are refused before they reach the seeder), so
//! what it remembers is bounded by the snapshot; each table also has a global cap ([`SeederLimits`]): a recipient
//! is remembered once per chunk (a peer asking again moves to the end of the list), and beyond the caps the origin
//! stops remembering (it serves where it would have redirected).

use std::collections::BTreeMap;

use crate::chunk::ChunkId;
use crate::sync::PeerKey;
use crate::timestamp::Mono;
use crate::transfer::REDIRECT_PEERS_MAX;

/// Most times one asker is pointed elsewhere for one chunk by newer recipients (rule 1).
pub const REDIRECTS_PER_ASKER_MAX: u8 = 2;
/// (chunk, recipient) pairs remembered per snapshot, by default. A chunk is handed out about once, so this covers a
/// whole mirror's snapshot (~2 million chunks of 1 MiB) handed out once each. About 180 bytes per pair with libp2p
/// peer ids (measured, `proto/tests/state_bounds.rs`): ~360 MiB at the cap, which only serving 2 million chunks
/// (up to 2 TB) fills; chunks outside the snapshot are refused before they get here, and a peer asking again for a
/// chunk it got is not added twice.
pub const SEEDER_RECIPIENTS_MAX: usize = 1 << 21;
/// (asker, chunk) redirects remembered per snapshot, by default: about 237 bytes each with libp2p peer ids
/// (measured), ~30 MiB at the cap. An answer costs the origin no upload, so this table is the one a peer could
/// grow cheaply (with real chunk ids only). Beyond it a new asker is served instead of redirected. A 500-package
/// release to 1,000 mirrors (`simulations/scenarios/release-1000.toml`) runs the same with this cap as without.
pub const SEEDER_REDIRECTS_MAX: usize = 1 << 17;

#[derive(Clone, Debug)]
pub struct SeederLimits {
    /// How long a chunk handed to one peer is assumed to be on its way there.
    pub assign_timeout_ms: u64,
    /// An asker back sooner than this after a redirect banned every peer named (the scheduler's
    /// [`redirect_defer_ms`](crate::sync::scheduler::SchedulerLimits::redirect_defer_ms)).
    pub rebound_ms: u64,
    /// Most (chunk, recipient) pairs remembered per snapshot (beyond it the origin serves without remembering).
    pub recipients_max: usize,
    /// Most (asker, chunk) redirects remembered per snapshot (beyond it a new asker is served).
    pub redirects_max: usize,
}

impl Default for SeederLimits {
    fn default() -> Self {
        Self {
            assign_timeout_ms: 30_000,
            rebound_ms: 6_000,
            recipients_max: SEEDER_RECIPIENTS_MAX,
            redirects_max: SEEDER_REDIRECTS_MAX,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeDecision<P> {
    Serve,
    Elsewhere(Vec<P>),
    /// Answer "missing": the asker claims to hold the whole snapshot already, so it is lying (an honest peer
    /// announces a snapshot complete only after its last chunk arrived) and the origin's bandwidth is not for it
    /// (the engine then names it in no redirect), or the chunk is not in the snapshot, or the asker is banned.
    Refuse,
}

pub struct Seeder<P: PeerKey> {
    limits: SeederLimits,
    /// Who got each chunk from the origin in this snapshot, and when, in that order.
    recipients: BTreeMap<ChunkId, Vec<(P, Mono)>>,
    recipients_count: usize,
    /// (asker, chunk) pairs already pointed elsewhere: when last, and how often by rule 1.
    redirected: BTreeMap<(P, ChunkId), (Mono, u8)>,
    /// What it did since the start.
    pub counts: SeederCounts,
}

/// What the origin's policy did since the start: chunks served, redirected and refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeederCounts {
    pub served: u64,
    pub redirects: u64,
    /// Refused to peers claiming to hold the snapshot already.
    pub refused: u64,
    /// Refused because the chunk is not in the current snapshot (never remembered).
    pub refused_unknown: u64,
    /// Refused because the asker is banned for this snapshot (too many requests for unknown chunks).
    pub refused_banned: u64,
    /// Copies of chunks the origin had already handed out in this snapshot, by why they were served.
    pub again: AgainCounts,
}

/// Why the origin served a chunk it had already handed out in this snapshot (each is one copy beyond the first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgainCounts {
    /// The asker was pointed elsewhere, waited for the mesh and came back without it.
    pub after_wait: u64,
    /// The asker came back at once (it banned every peer named) and nobody newer holds the chunk.
    pub after_bans: u64,
    /// A new asker, and nobody connected holds the chunk or is getting it.
    pub no_holder: u64,
    /// The asker got the chunk from the origin before and asks again (its copy did not arrive).
    pub asked_again: u64,
}

impl<P: PeerKey> Seeder<P> {
    pub fn new(limits: SeederLimits) -> Self {
        Self {
            limits,
            recipients: BTreeMap::new(),
            recipients_count: 0,
            redirected: BTreeMap::new(),
            counts: SeederCounts::default(),
        }
    }

    /// Forgets everything (a new snapshot was published).
    pub fn reset(&mut self) {
        self.recipients.clear();
        self.recipients_count = 0;
        self.redirected.clear();
    }

    /// Decides how to answer `asker` for `id`. `holders` are connected peers other than the asker that claim to hold
    /// it (believed only once the origin handed `id` out in this snapshot); `connected` says whether a peer is still
    /// connected.
    pub fn decide(
        &mut self,
        now: Mono,
        asker: &P,
        id: &ChunkId,
        holders: &[P],
        connected: impl Fn(&P) -> bool,
    ) -> ServeDecision<P> {
        let got = self.recipients.get(id).map(Vec::as_slice).unwrap_or(&[]);
        let timeout = self.limits.assign_timeout_ms;
        let in_transit: Vec<P> = got
            .iter()
            .filter(|(p, at)| p != asker && connected(p) && now.millis_since(*at) < timeout)
            .map(|(p, _)| p.clone())
            .collect();
        let claimed: Vec<&P> =
            if got.is_empty() { Vec::new() } else { holders.iter().filter(|p| *p != asker).collect() };
        let key = (asker.clone(), *id);
        if let Some(&(last, count)) = self.redirected.get(&key) {
            let newer: Vec<P> =
                got.iter().filter(|(p, at)| p != asker && connected(p) && *at > last).map(|(p, _)| p.clone()).collect();
            let rebound = now.millis_since(last) < self.limits.rebound_ms;
            if rebound && count < REDIRECTS_PER_ASKER_MAX && !newer.is_empty() {
                self.redirected.insert(key, (now, count + 1));
                self.counts.redirects += 1;
                return ServeDecision::Elsewhere(newer.into_iter().rev().take(REDIRECT_PEERS_MAX).collect());
            }
            if claimed.is_empty()
                && let Some(first) = in_transit.into_iter().next()
            {
                // Still on its way to its first recipient (the origin's queue can be seconds long): a second copy
                // now would only compete with the first.
                self.counts.redirects += 1;
                return ServeDecision::Elsewhere(vec![first]);
            }
            if !got.is_empty() {
                if rebound { self.counts.again.after_bans += 1 } else { self.counts.again.after_wait += 1 }
            }
            return self.serve(now, asker, id);
        }
        // Recipients lead the list: they are getting the chunk now, while peers that claim to hold everything may
        // be lying (an asker that banned every listed peer comes back at once).
        let mut elsewhere = in_transit;
        for p in claimed {
            if elsewhere.len() >= REDIRECT_PEERS_MAX {
                break;
            }
            if !elsewhere.contains(p) {
                elsewhere.push(p.clone());
            }
        }
        elsewhere.truncate(REDIRECT_PEERS_MAX);
        if !elsewhere.is_empty() && self.redirected.len() < self.limits.redirects_max {
            self.redirected.insert(key, (now, 0));
            self.counts.redirects += 1;
            return ServeDecision::Elsewhere(elsewhere);
        }
        if got.iter().any(|(p, _)| p == asker) {
            self.counts.again.asked_again += 1;
        } else if !got.is_empty() {
            self.counts.again.no_holder += 1;
        }
        self.serve(now, asker, id)
    }

    fn serve(&mut self, now: Mono, asker: &P, id: &ChunkId) -> ServeDecision<P> {
        let got = self.recipients.get_mut(id);
        match got {
            Some(got) if got.iter().any(|(p, _)| p == asker) => {
                // Got it again: it moves to the end of the list, with the new time.
                got.retain(|(p, _)| p != asker);
                got.push((asker.clone(), now));
            }
            Some(got) if self.recipients_count < self.limits.recipients_max => {
                got.push((asker.clone(), now));
                self.recipients_count += 1;
            }
            None if self.recipients_count < self.limits.recipients_max => {
                self.recipients.insert(*id, vec![(asker.clone(), now)]);
                self.recipients_count += 1;
            }
            _ => {}
        }
        self.counts.served += 1;
        ServeDecision::Serve
    }

    /// (chunk, recipient) pairs remembered.
    pub fn recipients_len(&self) -> usize {
        self.recipients_count
    }

    /// (asker, chunk) redirects remembered.
    pub fn redirects_len(&self) -> usize {
        self.redirected.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_chunk_leaves_about_once() {
        let mut s = Seeder::<u32>::new(SeederLimits::default());
        let c = ChunkId([1; 32]);
        let t = Mono(1_000);
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
        assert_eq!((s.counts.served, s.counts.redirects), (5, 3));
        assert_eq!(s.counts.again, AgainCounts { after_wait: 0, after_bans: 1, no_holder: 2, asked_again: 0 });
    }

    #[test]
    fn claims_to_chunks_never_handed_out_are_not_believed() {
        let mut s = Seeder::<u32>::new(SeederLimits::default());
        let c = ChunkId([3; 32]);
        let t = Mono(1_000);
        // Peer 9 claims the chunk before the origin sent it to anyone: the first asker is served all the same.
        assert_eq!(s.decide(t, &1, &c, &[9], |_| true), ServeDecision::Serve);
        // Once it left the origin, claims count, behind the first recipient.
        assert_eq!(s.decide(t.plus_ms(10), &2, &c, &[9], |_| true), ServeDecision::Elsewhere(vec![1, 9]));
        // After a new snapshot nothing has been handed out again.
        s.reset();
        assert_eq!(s.decide(t.plus_ms(20), &3, &c, &[9, 1], |_| true), ServeDecision::Serve);
        assert_eq!((s.counts.served, s.counts.redirects), (2, 1));
        assert_eq!(s.counts.again, AgainCounts::default());
    }

    #[test]
    fn an_asker_that_comes_back_is_pointed_at_newer_recipients() {
        let mut s = Seeder::<u32>::new(SeederLimits::default());
        let c = ChunkId([4; 32]);
        let t = Mono(1_000);
        // 9 got the chunk first (and turns out to serve garbage); 1, 2 and 3 are pointed at it.
        assert_eq!(s.decide(t, &9, &c, &[], |_| true), ServeDecision::Serve);
        for asker in [1, 2, 3] {
            assert_eq!(s.decide(t.plus_ms(10), &asker, &c, &[9], |_| true), ServeDecision::Elsewhere(vec![9]));
        }
        // 1 banned 9 and comes back: nobody newer got it, so 1 is served.
        assert_eq!(s.decide(t.plus_ms(20), &1, &c, &[9], |_| true), ServeDecision::Serve);
        // 2 and 3 come back: pointed at 1 instead of getting copies of their own.
        assert_eq!(s.decide(t.plus_ms(30), &2, &c, &[9], |_| true), ServeDecision::Elsewhere(vec![1]));
        assert_eq!(s.decide(t.plus_ms(31), &3, &c, &[9, 1], |_| true), ServeDecision::Elsewhere(vec![1]));
        // 2 comes back again (it could not get it from 1 either): nobody newer, so served.
        assert_eq!(s.decide(t.plus_ms(40), &2, &c, &[9, 1], |_| true), ServeDecision::Serve);
        // 5 was pointed at 9 and waited for the mesh for its whole deferral: served, not sent around again.
        assert_eq!(s.decide(t.plus_ms(45), &5, &c, &[9], |_| true), ServeDecision::Elsewhere(vec![9, 1, 2]));
        assert_eq!(s.decide(t.plus_ms(6_100), &5, &c, &[9, 1], |_| true), ServeDecision::Serve);
        // A newcomer is pointed at every recipient, in the order they got it.
        assert_eq!(s.decide(t.plus_ms(6_200), &4, &c, &[], |_| true), ServeDecision::Elsewhere(vec![9, 1, 2, 5]));
        assert_eq!((s.counts.served, s.counts.redirects), (4, 7));
        assert_eq!(s.counts.again, AgainCounts { after_wait: 1, after_bans: 2, no_holder: 0, asked_again: 0 });
    }
}
