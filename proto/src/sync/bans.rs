//! Who is banned, why and until when: the one owner of ban state. The scheduler's per-peer flag, the data plane's
//! deny list, the status's `banned` and `mirrormesh_peers_banned` all follow what this says (through the engine's
//! `Ban`/`Unban` outputs and [`Bans::is_banned`]).
//!
//! A ban has one of two scopes:
//! - **For the snapshot being synced** ([`BanReason::CorruptChunk`], `FalseHave`, `CorruptMetadata`,
//!   `Unresponsive`, `UnknownChunks`): what the peer did is about the data of this snapshot; the ban is lifted when
//!   the node moves on to another snapshot.
//! - **For breaking the protocol** ([`BanReason::MalformedControl`], `BadDataRequests`): the peer is disconnected,
//!   refused and neither served nor asked until [`PROTOCOL_BAN_MS`] has passed.
//!
//! Protocol offences lead to a ban through a leaky bucket per peer and kind of offence ([`Offence`]): each offence
//! adds one, one leaks away every [`Offence::leak_ms`], and the peer is banned when [`Offence::limit`] are pending at
//! once. So an honest peer on a bad link that trips a limit now and then never adds up to a ban, however long it
//! runs, while one that repeats is banned within a few offences. The buckets are kept per peer, not per
//! connection: reconnecting does not empty them.
//!
//! Every table here is keyed by peers and capped ([`BANS_MAX`], [`OFFENDERS_MAX`]).

use std::collections::BTreeMap;

use crate::sync::PeerKey;
use crate::sync::scheduler::BanReason;
use crate::timestamp::Mono;

/// How long a peer banned for breaking the protocol stays banned.
pub const PROTOCOL_BAN_MS: u64 = 3_600_000;
/// Peers banned at once; beyond it the ban ending soonest is dropped (snapshot bans count as ending last).
pub const BANS_MAX: usize = 4096;
/// Peers whose offences are counted; beyond it the one with the fewest pending is forgotten.
pub const OFFENDERS_MAX: usize = 4096;

/// Offences that lead to a protocol ban when they repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Offence {
    /// A control request that did not decode or was over its size limit.
    MalformedControl,
    /// A data-plane request refused (malformed, oversized, stalled, too slow a reader, another repository).
    RefusedDataRequest,
}

impl Offence {
    pub const ALL: [Offence; 2] = [Offence::MalformedControl, Offence::RefusedDataRequest];

    /// Offences pending at once that ban the peer.
    pub fn limit(self) -> u64 {
        match self {
            // An honest node never sends one: three cannot be chance.
            Offence::MalformedControl => 3,
            // An honest node's request can be refused now and then (a slow link makes it a slow reader, a stall
            // timeout fires under load): sixteen pending at once is a flood.
            Offence::RefusedDataRequest => 16,
        }
    }

    /// How long one offence takes to be forgiven.
    pub fn leak_ms(self) -> u64 {
        match self {
            Offence::MalformedControl => 600_000,
            Offence::RefusedDataRequest => 60_000,
        }
    }

    /// What a peer is banned for when the bucket fills.
    pub fn reason(self) -> BanReason {
        match self {
            Offence::MalformedControl => BanReason::MalformedControl,
            Offence::RefusedDataRequest => BanReason::BadDataRequests,
        }
    }
}

/// One ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ban {
    pub reason: BanReason,
    /// When a protocol ban ends (`None`: when the node moves to another snapshot).
    pub until: Option<Mono>,
}

#[derive(Clone, Debug)]
pub struct Bans<P: PeerKey> {
    bans: BTreeMap<P, Ban>,
    /// Per peer and offence, the bucket's "theoretical arrival time": the bucket holds
    /// `(tat - now) / leak_ms` offences (empty when `tat <= now`).
    offences: BTreeMap<(P, Offence), Mono>,
}

impl<P: PeerKey> Default for Bans<P> {
    fn default() -> Self {
        Self { bans: BTreeMap::new(), offences: BTreeMap::new() }
    }
}

impl<P: PeerKey> Bans<P> {
    pub fn is_banned(&self, peer: &P) -> bool {
        self.bans.contains_key(peer)
    }

    /// The ban on `peer`, if any.
    pub fn ban_of(&self, peer: &P) -> Option<Ban> {
        self.bans.get(peer).copied()
    }

    /// Whether `peer` is banned for breaking the protocol (it must not even be connected).
    pub fn is_protocol_banned(&self, peer: &P) -> bool {
        self.bans.get(peer).is_some_and(|b| b.until.is_some())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&P, &Ban)> {
        self.bans.iter()
    }

    pub fn len(&self) -> usize {
        self.bans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bans.is_empty()
    }

    /// Bans `peer` for the snapshot being synced; false if it was banned already (a protocol ban stays as it is).
    pub fn ban_for_snapshot(&mut self, peer: &P, reason: BanReason) -> bool {
        self.insert(peer, Ban { reason, until: None })
    }

    /// Counts one offence of `peer`'s; returns the ban it earned, if this one filled its bucket.
    pub fn offence(&mut self, now: Mono, peer: &P, offence: Offence) -> Option<Ban> {
        if self.is_protocol_banned(peer) {
            return None;
        }
        let key = (peer.clone(), offence);
        if !self.offences.contains_key(&key) && self.offences.len() >= OFFENDERS_MAX {
            // Forget the bucket that would empty first.
            if let Some(least) = self.offences.iter().min_by_key(|(_, tat)| **tat).map(|(k, _)| k.clone()) {
                self.offences.remove(&least);
            }
        }
        let leak = offence.leak_ms();
        let tat = self.offences.get(&key).copied().unwrap_or(now).max(now).plus_ms(leak);
        if tat.millis_since(now).div_ceil(leak) >= offence.limit() {
            self.offences.remove(&key);
            let ban = Ban { reason: offence.reason(), until: Some(now.plus_ms(PROTOCOL_BAN_MS)) };
            self.insert(peer, ban);
            return Some(ban);
        }
        self.offences.insert(key, tat);
        None
    }

    /// Offences of `peer` pending now (what the bucket holds).
    pub fn pending(&self, now: Mono, peer: &P, offence: Offence) -> u64 {
        let tat = self.offences.get(&(peer.clone(), offence)).copied().unwrap_or(now);
        tat.millis_since(now).div_ceil(offence.leak_ms())
    }

    /// The node moved to another snapshot: lifts every snapshot ban and returns the peers no longer banned.
    pub fn new_snapshot(&mut self) -> Vec<P> {
        let lifted: Vec<P> = self.bans.iter().filter(|(_, b)| b.until.is_none()).map(|(p, _)| p.clone()).collect();
        for peer in &lifted {
            self.bans.remove(peer);
        }
        lifted
    }

    /// Lifts the protocol bans whose time is over and forgets empty offence buckets; returns the peers lifted.
    pub fn expire(&mut self, now: Mono) -> Vec<P> {
        let lifted: Vec<P> =
            self.bans.iter().filter(|(_, b)| b.until.is_some_and(|u| u <= now)).map(|(p, _)| p.clone()).collect();
        for peer in &lifted {
            self.bans.remove(peer);
        }
        self.offences.retain(|_, tat| *tat > now);
        lifted
    }

    /// When the next protocol ban ends.
    pub fn next_expiry(&self) -> Option<Mono> {
        self.bans.values().filter_map(|b| b.until).min()
    }

    fn insert(&mut self, peer: &P, ban: Ban) -> bool {
        match self.bans.get(peer) {
            // A protocol ban outranks a snapshot ban; a longer protocol ban a shorter one.
            Some(old) if old.until.is_some() && (ban.until.is_none() || ban.until <= old.until) => return false,
            Some(old) if old.until.is_none() && ban.until.is_none() => return false,
            Some(_) => {}
            None if self.bans.len() >= BANS_MAX => {
                // Drop the ban ending soonest (a snapshot ban ends last).
                let soonest =
                    self.bans.iter().min_by_key(|(_, b)| b.until.map_or(u64::MAX, |t| t.0)).map(|(p, _)| p.clone());
                if let Some(soonest) = soonest {
                    self.bans.remove(&soonest);
                }
            }
            None => {}
        }
        self.bans.insert(peer.clone(), ban);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Mono = Mono(1_000_000);

    #[test]
    fn repeated_offences_ban_for_an_hour_occasional_ones_never_do() {
        let mut bans = Bans::<u32>::default();
        // Two malformed requests, then a third: banned until an hour later.
        assert_eq!(bans.offence(T0, &1, Offence::MalformedControl), None);
        assert_eq!(bans.offence(T0.plus_ms(1), &1, Offence::MalformedControl), None);
        let ban = bans.offence(T0.plus_ms(2), &1, Offence::MalformedControl).expect("third offence bans");
        assert_eq!(ban, Ban { reason: BanReason::MalformedControl, until: Some(T0.plus_ms(2 + PROTOCOL_BAN_MS)) });
        assert!(bans.is_protocol_banned(&1));
        assert!(bans.expire(T0.plus_ms(PROTOCOL_BAN_MS)).is_empty(), "not yet");
        assert_eq!(bans.expire(T0.plus_ms(2 + PROTOCOL_BAN_MS)), vec![1], "lifted after the hour");
        assert!(!bans.is_banned(&1));

        // An honest peer whose data requests are refused once a minute, for a week: never banned.
        for minute in 0..7 * 24 * 60 {
            let at = T0.plus_ms(minute * 60_000);
            assert_eq!(bans.offence(at, &2, Offence::RefusedDataRequest), None, "minute {minute}");
            bans.expire(at);
        }
        // A flood of refusals: banned within the limit.
        let at = T0.plus_ms(8 * 24 * 3_600_000);
        let banned = (0..20).position(|i| bans.offence(at.plus_ms(i), &3, Offence::RefusedDataRequest).is_some());
        assert_eq!(banned, Some(15), "the 16th refusal pending at once bans");
    }

    #[test]
    fn snapshot_bans_end_with_the_snapshot_protocol_bans_do_not() {
        let mut bans = Bans::<u32>::default();
        assert!(bans.ban_for_snapshot(&1, BanReason::CorruptChunk));
        assert!(!bans.ban_for_snapshot(&1, BanReason::FalseHave), "already banned");
        for _ in 0..3 {
            bans.offence(T0, &2, Offence::MalformedControl);
        }
        assert!(!bans.ban_for_snapshot(&2, BanReason::FalseHave), "a protocol ban outranks it");
        assert_eq!(bans.new_snapshot(), vec![1]);
        assert!(!bans.is_banned(&1) && bans.is_protocol_banned(&2));
    }

    #[test]
    fn tables_stay_within_their_caps() {
        let mut bans = Bans::<u32>::default();
        for peer in 0..(BANS_MAX as u32 + 100) {
            bans.ban_for_snapshot(&peer, BanReason::FalseHave);
            bans.offence(T0, &peer, Offence::RefusedDataRequest);
        }
        assert!(bans.len() <= BANS_MAX && bans.offences.len() <= OFFENDERS_MAX);
    }
}
