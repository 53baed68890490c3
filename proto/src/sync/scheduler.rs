//! The chunk scheduler: which chunk to ask which peer for, and when.
//!
//! - **Rarest first.** Unrequested chunks are taken in order of how many non-origin peers announced them (fewest
//!   first; [`super::availability`]), ties in a per-node salted order so that nodes start on different chunks.
//! - **Windows.** Each peer has a byte window of requests in flight, adapted to its measured throughput (the bytes
//!   it can deliver in [`SchedulerLimits::window_target_ms`]); several requests are in flight per peer.
//! - **Batches.** Small chunks travel many per request, up to [`SchedulerLimits::request_bytes_target`].
//! - **Origin last.** An origin peer is asked only for chunks that no connected, unbanned non-origin peer can
//!   supply: nobody announced them, and no peer claims the whole snapshot or every peer claiming it is stalled or
//!   refused them (a claim is only a claim). A claimer that delivers nothing for
//!   [`SchedulerLimits::holds_all_stall_ms`] while asked is stalled: its requests fail (one failure) and it does
//!   not keep the origin from being asked until it delivers again; while an origin is connected a stalled
//!   claimer is asked only for copies of chunks in flight elsewhere, so it holds nothing up. A peer that ended the
//!   previous snapshot banned or stalled starts the next one stalled ([`Scheduler::suspect`]): trust in a claim
//!   is earned by delivering; a claimer's allowance runs on across a sync abandoned for a newer root
//!   ([`Scheduler::keep_waiting`]). If the origin answers "elsewhere" (super-seeding), the chunk is not asked of it
//!   again for a while, unless every peer named is banned or a stalled claimer.
//! - **Endgame.** Once every chunk is requested, idle peers also ask for chunks in flight elsewhere (at most
//!   [`SchedulerLimits::endgame_copies_max`] copies); a request whose chunks all arrived elsewhere is cancelled.
//! - **Refusals.** Only an origin may answer "elsewhere". A chunk a non-origin peer answers "missing" or
//!   "elsewhere" for, or whose request to it failed or timed out, is marked missing at that peer: not asked of it
//!   again in this snapshot unless it announces the chunk again.
//! - **Bans.** A peer that delivers a chunk with the wrong hash is banned for the rest of this snapshot; a peer that
//!   claims to hold chunks it then refuses ("missing", or "elsewhere" from a non-origin) is banned after more than
//!   [`SchedulerLimits::lies_max`] such answers; a non-origin peer whose requests fail or time out more than
//!   [`SchedulerLimits::failures_max`] times in a row without it delivering a chunk is banned as unresponsive
//!   (requests already in flight when a failure is counted fail with it and do not count again).
//!
//! Chunks are numbered once (ids sorted) and everything per chunk or per peer is an array or a bitset over those
//! numbers, so a node syncing millions of chunks with dozens of peers stays small and fast. All collections that
//! reach outputs are ordered, so the same inputs give the same requests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use fixedbitset::FixedBitSet;

use crate::chunk::ChunkId;
use crate::sync::availability::Availability;
use crate::sync::{PeerKey, ReqId};
use crate::timestamp::Mono;
use crate::transfer::{CHUNKS_PER_REQUEST_MAX, REDIRECT_PEERS_MAX};

/// A partial holder's candidate chunks are sorted by rarity when there are at most this many; beyond it the
/// rarest-first order is walked instead (cost: a request's worth of hits instead of a sort of thousands).
const SORTED_CANDIDATES_MAX: usize = 64;

/// Tunables of the scheduler, each a named limit.
#[derive(Clone, Debug)]
pub struct SchedulerLimits {
    /// A request is closed once it asks for this many bytes.
    pub request_bytes_target: u64,
    /// Most chunks in one request.
    pub request_chunks_max: usize,
    /// Requests in flight to one peer.
    pub requests_in_flight_per_peer_max: usize,
    /// Window of a peer not yet measured.
    pub window_initial: u64,
    pub window_min: u64,
    pub window_max: u64,
    /// The window is the bytes a peer delivers in this long at its measured rate.
    pub window_target_ms: u64,
    /// Largest window toward an origin.
    pub origin_window_max: u64,
    /// A request times out after this long plus the time its bytes take at `timeout_rate_min` bytes per second.
    pub request_timeout_base_ms: u64,
    pub timeout_rate_min: u64,
    /// The same for a request to an origin, which sends a few replies at once and queues the rest, fairly between
    /// askers: at the start of an update most mirrors wait there for their first chunk (64 mirrors on 2 cores:
    /// over 14 s). The origin is trusted and a dead connection fails its requests anyway; timing a queued request
    /// out only re-asks it, and a copy already leaving it is sent twice. Equal to the data plane's reply stall
    /// allowance (30 s), the backstop for a request the origin never answers.
    pub origin_request_timeout_base_ms: u64,
    /// After an origin redirect, the chunk is not asked of the origin again for this long.
    pub redirect_defer_ms: u64,
    /// Copies of one chunk in flight at once during the endgame.
    pub endgame_copies_max: usize,
    /// Refusals ("missing", or "elsewhere" from a non-origin) of chunks a peer claimed to hold; one more bans it.
    pub lies_max: u32,
    /// Failed or timed-out requests to a non-origin peer in a row (without a chunk delivered in between, requests
    /// in flight together counting once); one more bans it.
    pub failures_max: u32,
    /// A peer claiming the whole snapshot that delivers nothing for this long while asked is stalled: its requests
    /// fail, and it no longer keeps the origin from being asked until it delivers again.
    pub holds_all_stall_ms: u64,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        Self {
            request_bytes_target: 1 << 20,
            request_chunks_max: CHUNKS_PER_REQUEST_MAX,
            requests_in_flight_per_peer_max: 32,
            window_initial: 2 << 20,
            window_min: 1 << 20,
            window_max: 64 << 20,
            window_target_ms: 1000,
            origin_window_max: 1 << 20,
            request_timeout_base_ms: 10_000,
            timeout_rate_min: 256 << 10,
            origin_request_timeout_base_ms: 30_000,
            redirect_defer_ms: 6_000,
            endgame_copies_max: 2,
            lies_max: 16,
            // An honest peer's failures come in bursts (one lost connection fails every request on it, counted
            // once) and end with a delivery; four rounds in a row with nothing delivered is a peer that cannot
            // serve. A no-address peer reaches it within milliseconds, a silent one after four request timeouts.
            failures_max: 3,
            // Below the 10 s request timeout, so the origin is asked before a request to a silent claimer times
            // out; above what an honest peer takes to deliver a chunk while it has requests waiting (its window is
            // about a second of its measured rate; a first, unmeasured 2 MiB window at 10 Mbit/s is 1.7 s).
            holds_all_stall_ms: 5_000,
        }
    }
}

/// Why a peer is banned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BanReason {
    /// It sent bytes that do not hash to the chunk id asked for.
    CorruptChunk,
    /// It claimed to hold chunks it then refused (answered missing, or elsewhere though it is no origin), too
    /// often.
    FalseHave,
    /// Its requests failed or timed out too many times in a row (no data-plane address, a dead data plane, a peer
    /// that never answers).
    Unresponsive,
    /// Origin: it asked for too many chunks that are not in the current snapshot.
    UnknownChunks,
    /// It sent a manifest node or delta that does not hash to its name.
    CorruptMetadata,
    /// Protocol: it sent malformed control requests again and again (`bans::Offence::MalformedControl`).
    MalformedControl,
    /// Protocol: its data-plane requests were refused again and again (`bans::Offence::RefusedDataRequest`).
    BadDataRequests,
}

impl BanReason {
    /// A stable short name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            BanReason::CorruptChunk => "corruptchunk",
            BanReason::FalseHave => "falsehave",
            BanReason::Unresponsive => "unresponsive",
            BanReason::UnknownChunks => "unknownchunks",
            BanReason::CorruptMetadata => "corruptmetadata",
            BanReason::MalformedControl => "malformedcontrol",
            BanReason::BadDataRequests => "baddatarequests",
        }
    }
}

/// A request the scheduler wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkFetch<P> {
    pub peer: P,
    pub req: ReqId,
    pub chunks: Vec<ChunkId>,
}

/// What the scheduler decided after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchedOut<P> {
    Fetch(ChunkFetch<P>),
    Cancel {
        peer: P,
        req: ReqId,
    },
    Ban {
        peer: P,
        reason: BanReason,
    },
    /// A peer claiming the whole snapshot delivered nothing for `holds_all_stall_ms` while asked: its requests
    /// failed and it no longer keeps the origin from being asked.
    Stalled {
        peer: P,
    },
}

/// How one requested chunk turned out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkOutcome<P> {
    /// Received and its hash matched.
    Verified,
    /// Received, hash mismatch.
    Corrupt,
    /// The peer does not hold it.
    Missing,
    /// The origin points at these peers instead.
    Elsewhere(Vec<P>),
    /// Received and verified, but this node could not keep it (a staging write failed): fetch it again later,
    /// without blaming the peer.
    Dropped,
}

struct PeerSched {
    is_origin: bool,
    /// Holds every chunk of the target snapshot (it is complete at it).
    holds_all: bool,
    banned: bool,
    /// Chunks this peer announced.
    explicit: FixedBitSet,
    /// Chunks it answered "missing" for: not asked of it again in this snapshot (until it announces them again).
    missing: FixedBitSet,
    requests: BTreeSet<ReqId>,
    in_flight_bytes: u64,
    window: u64,
    /// Measured delivery rate, bytes per second (exponentially weighted).
    rate: Option<f64>,
    lies: u32,
    /// Failures counted since it last delivered a chunk.
    failures: u32,
    /// Number of the current failure round: a failed request counts only if it was sent in this round (requests
    /// sent before the last counted failure failed with it).
    failure_round: u32,
    /// Since when it has had requests in flight without delivering a chunk.
    waiting_since: Option<Mono>,
    /// It claims the whole snapshot and delivered nothing for `holds_all_stall_ms` while asked: until it delivers
    /// again, it does not keep the origin from being asked.
    stalled: bool,
    /// It delivered a chunk in this snapshot.
    delivered: bool,
}

struct Request<P> {
    peer: P,
    /// Chunks not yet answered.
    pending: Vec<u32>,
    bytes: u64,
    sent_at: Mono,
    /// The peer's failure round when it was sent.
    round: u32,
}

pub struct Scheduler<P: PeerKey> {
    limits: SchedulerLimits,
    /// Chunk ids, sorted: a chunk's number is its position here.
    ids: Vec<ChunkId>,
    /// Number of each id (looked up for every announced chunk: a hash beats a binary search of 32-byte keys).
    numbers: HashMap<ChunkId, u32, BuildHasherDefault<IdHasher>>,
    sizes: Vec<u32>,
    held: FixedBitSet,
    /// Chunks an endgame copy was asked for (a second copy arriving is then the endgame's, by design).
    endgame_copied: FixedBitSet,
    /// Requests each chunk is in flight in (only chunks in flight appear).
    in_flight: BTreeMap<u32, Vec<(P, ReqId)>>,
    /// Needed chunks in rarest-first order (held ones retired).
    avail: Availability,
    /// The origin is not asked for a chunk before this instant (after it redirected), unless every peer it pointed
    /// at is banned.
    origin_deferred: BTreeMap<u32, (Mono, Vec<P>)>,
    /// When the mesh around this node last moved: a non-origin peer delivered a chunk, or announced one of this
    /// sync's chunks it had not announced before.
    mesh_moved_at: Option<Mono>,
    peers: BTreeMap<P, PeerSched>,
    /// Connected, unbanned non-origin peers that hold every chunk.
    holds_all_count: u32,
    /// Needed chunks that every peer counted in `holds_all_count` refused or failed to deliver (only kept while
    /// there are such peers): the origin may be asked for them.
    lacking: BTreeSet<u32>,
    requests: BTreeMap<ReqId, Request<P>>,
    bytes_missing: u64,
    chunks_missing: usize,
}

/// Hashes a chunk id by its first eight bytes: ids are blake3 outputs, already uniform. (Only used for lookups; no
/// order reaches an output.)
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(1) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
}

/// Numbers of the bits set in word `i` of a bitset.
fn set_bits(i: usize, mut word: usize) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        if word == 0 {
            return None;
        }
        let bit = word.trailing_zeros() as usize;
        word &= word - 1;
        Some((i * usize::BITS as usize + bit) as u32)
    })
}

/// splitmix64: spreads chunk ids so different salts order chunks differently.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How a connected peer adds to chunk availability (the origin never does: it is the supplier of last resort).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contribution {
    Nothing,
    /// Every needed chunk (the peer is complete at the target snapshot).
    All,
    /// The chunks it announced.
    Explicit,
}

/// A peer a redirect may not wait for: banned, or a claimer that stalled.
fn useless(p: &PeerSched) -> bool {
    p.banned || (p.stalled && p.holds_all)
}

fn contribution(p: &PeerSched) -> Contribution {
    if p.banned || p.is_origin {
        Contribution::Nothing
    } else if p.holds_all {
        Contribution::All
    } else {
        Contribution::Explicit
    }
}

impl<P: PeerKey> Scheduler<P> {
    /// A scheduler for the chunks (id, size) of a snapshot's new files. Chunks already held are then marked with
    /// [`Scheduler::mark_held`].
    pub fn new(limits: SchedulerLimits, salt: u64, chunks: impl IntoIterator<Item = (ChunkId, u64)>) -> Self {
        let mut all: Vec<(ChunkId, u64)> = chunks.into_iter().collect();
        all.sort_unstable_by_key(|c| c.0);
        all.dedup_by_key(|c| c.0);
        let n = all.len();
        let tiebreak = |id: &ChunkId| {
            let mut first = [0u8; 8];
            first.copy_from_slice(&id.0[..8]);
            mix(u64::from_le_bytes(first) ^ salt)
        };
        let mut initial: Vec<u32> = (0..n as u32).collect();
        initial.sort_unstable_by_key(|&i| (tiebreak(&all[i as usize].0), i));
        Self {
            limits,
            bytes_missing: all.iter().map(|c| c.1).sum(),
            chunks_missing: n,
            sizes: all.iter().map(|c| c.1 as u32).collect(),
            numbers: all.iter().enumerate().map(|(i, c)| (c.0, i as u32)).collect(),
            ids: all.into_iter().map(|c| c.0).collect(),
            held: FixedBitSet::with_capacity(n),
            endgame_copied: FixedBitSet::with_capacity(n),
            in_flight: BTreeMap::new(),
            avail: Availability::new(initial),
            origin_deferred: BTreeMap::new(),
            mesh_moved_at: None,
            peers: BTreeMap::new(),
            holds_all_count: 0,
            lacking: BTreeSet::new(),
            requests: BTreeMap::new(),
        }
    }

    fn index(&self, id: &ChunkId) -> Option<u32> {
        self.numbers.get(id).copied()
    }

    fn needed(&self, c: u32) -> bool {
        !self.held.contains(c as usize)
    }

    fn queued(&self, c: u32) -> bool {
        self.needed(c) && !self.in_flight.contains_key(&c)
    }

    /// Every needed chunk is in flight (the endgame: idle peers may ask for copies).
    pub fn in_endgame(&self) -> bool {
        self.in_flight.len() >= self.chunks_missing
    }

    pub fn is_done(&self) -> bool {
        self.chunks_missing == 0
    }

    pub fn bytes_missing(&self) -> u64 {
        self.bytes_missing
    }

    pub fn chunks_missing(&self) -> usize {
        self.chunks_missing
    }

    pub fn is_needed(&self, id: &ChunkId) -> bool {
        self.index(id).is_some_and(|c| self.needed(c))
    }

    /// Whether an endgame copy of this chunk of the snapshot was asked for (`None`: not a chunk of it).
    pub fn endgame_copied(&self, id: &ChunkId) -> Option<bool> {
        self.index(id).map(|c| self.endgame_copied.contains(c as usize))
    }

    /// Chunks of the snapshot held (received or found locally).
    pub fn held_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.held.ones().map(|c| self.ids[c])
    }

    /// Chunks that no connected peer (origin included) can supply right now.
    pub fn unavailable(&self) -> usize {
        let origin_up = self.peers.values().any(|p| p.is_origin && !p.banned);
        if origin_up {
            return 0;
        }
        if self.holds_all_count > 0 {
            return self.lacking.iter().filter(|&&c| self.avail.level(c) == 0).count();
        }
        self.avail.unannounced().count()
    }

    /// Whether some peer claiming the whole snapshot still keeps the origin from being asked: it is not stalled
    /// (see [`Scheduler::on_tick`]).
    fn claimed_by_a_live_holder(&self) -> bool {
        self.holds_all_count > 0 && self.peers.values().any(|p| contribution(p) == Contribution::All && !p.stalled)
    }

    pub fn requests_in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Adds or updates a connected peer.
    pub fn set_peer(&mut self, peer: &P, is_origin: bool, holds_all: bool) {
        let n = self.ids.len();
        let window = self.limits.window_initial;
        let entry = self.peers.entry(peer.clone()).or_insert_with(|| PeerSched {
            is_origin,
            holds_all: false,
            banned: false,
            explicit: FixedBitSet::with_capacity(n),
            missing: FixedBitSet::with_capacity(n),
            requests: BTreeSet::new(),
            in_flight_bytes: 0,
            window,
            rate: None,
            lies: 0,
            failures: 0,
            failure_round: 0,
            waiting_since: None,
            stalled: false,
            delivered: false,
        });
        let before = contribution(entry);
        let completed = holds_all && !entry.holds_all;
        if completed {
            // It completed the snapshot: whatever it lacked before, it holds now.
            entry.missing.clear();
        }
        entry.is_origin = is_origin;
        entry.holds_all = holds_all;
        let after = contribution(entry);
        if before != after {
            self.contribute(peer, before, -1);
            self.contribute(peer, after, 1);
        }
        if before != after || (completed && after == Contribution::All) {
            self.holders_changed(before, after);
        }
    }

    /// `peer` was banned or stalled in an earlier snapshot and has not delivered since: while it claims the whole
    /// snapshot it starts stalled (it gets only copies of chunks in flight elsewhere while an origin is connected,
    /// and does not keep the origin from being asked) until it delivers a chunk.
    pub fn suspect(&mut self, peer: &P) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.stalled = true;
        }
    }

    /// What this snapshot showed of `peer` so far: `Some(true)` if it is banned, or stalled and has not delivered
    /// since (see [`Scheduler::suspect`]), `Some(false)` if it delivered a chunk, `None` if neither.
    pub fn suspicion(&self, peer: &P) -> Option<bool> {
        let p = self.peers.get(peer)?;
        if p.banned || p.stalled {
            Some(true)
        } else if p.delivered {
            Some(false)
        } else {
            None
        }
    }

    /// Since when `peer`, a claimer of the whole snapshot that has not delivered in this sync, has kept requests
    /// waiting.
    pub fn waiting_since(&self, peer: &P) -> Option<Mono> {
        let p = self.peers.get(peer)?;
        if p.holds_all && !p.delivered && !p.banned { p.waiting_since } else { None }
    }

    /// `peer` kept an abandoned sync waiting since `since` (see [`Scheduler::waiting_since`]): its stall allowance
    /// counts from then, not from this sync's first request to it.
    pub fn keep_waiting(&mut self, peer: &P, since: Mono) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.waiting_since = Some(since);
        }
    }

    /// Peers this scheduler knows (connected, banned or not).
    pub fn peer_keys(&self) -> impl Iterator<Item = &P> + '_ {
        self.peers.keys()
    }

    /// A peer announced that it holds `id`.
    pub fn add_holding(&mut self, now: Mono, peer: &P, id: &ChunkId) {
        let Some(c) = self.index(id) else { return };
        let Some(p) = self.peers.get_mut(peer) else { return };
        // A fresh announcement outweighs an earlier "missing" answer: the peer has it now.
        p.missing.set(c as usize, false);
        if contribution(p) == Contribution::All {
            self.lacking.remove(&c);
        }
        if p.explicit.put(c as usize) {
            return;
        }
        if !p.is_origin && !p.banned {
            self.mesh_moved_at = Some(now);
        }
        if contribution(p) == Contribution::Explicit {
            self.avail.raise(c);
        }
    }

    /// A peer disconnected: its requests are abandoned and its holdings forgotten.
    pub fn remove_peer(&mut self, peer: &P) -> Vec<SchedOut<P>> {
        let Some(p) = self.peers.get(peer) else { return Vec::new() };
        let before = contribution(p);
        self.contribute(peer, before, -1);
        let Some(p) = self.peers.remove(peer) else { return Vec::new() };
        for req in p.requests {
            self.drop_request(req);
        }
        self.holders_changed(before, Contribution::Nothing);
        Vec::new()
    }

    /// Marks `id` as held (received or found locally) without a request.
    pub fn mark_held(&mut self, id: &ChunkId) -> Vec<SchedOut<P>> {
        match self.index(id) {
            Some(c) => self.complete_chunk(c),
            None => Vec::new(),
        }
    }

    /// Records the outcome of one chunk of request `req`. Returns follow-up actions (cancels, bans).
    pub fn on_chunk(&mut self, now: Mono, req: ReqId, id: &ChunkId, outcome: ChunkOutcome<P>) -> Vec<SchedOut<P>> {
        let Some(c) = self.index(id) else { return Vec::new() };
        let Some(request) = self.requests.get_mut(&req) else {
            if matches!(outcome, ChunkOutcome::Verified) {
                return self.complete_chunk(c);
            }
            return Vec::new();
        };
        let Some(at) = request.pending.iter().position(|&x| x == c) else { return Vec::new() };
        request.pending.swap_remove(at);
        let peer = request.peer.clone();
        let size = u64::from(self.sizes[c as usize]);
        self.untrack(c, &peer, req);
        match outcome {
            ChunkOutcome::Verified => {
                if let Some(p) = self.peers.get_mut(&peer)
                    && !p.is_origin
                {
                    self.mesh_moved_at = Some(now);
                    p.failures = 0;
                    p.stalled = false;
                    p.delivered = true;
                    // It delivers: the clock restarts for its requests still waiting.
                    p.waiting_since = Some(now);
                }
                self.release(req, &peer, size);
                self.complete_chunk(c)
            }
            ChunkOutcome::Corrupt => self.ban(&peer, BanReason::CorruptChunk),
            ChunkOutcome::Missing => self.refused(&peer, req, c, size),
            ChunkOutcome::Elsewhere(_) if self.peers.get(&peer).is_some_and(|p| !p.is_origin) => {
                // Only an origin redirects: from anyone else "elsewhere" is a refusal.
                self.refused(&peer, req, c, size)
            }
            ChunkOutcome::Elsewhere(holders) => {
                // Wait for the chunk to come from the peers pointed at (directly, or through peers they pass it
                // to), unless this node banned every one of them or they are stalled claimers: then the origin's
                // next answer serves it.
                let all_useless = holders.iter().all(|h| self.peers.get(h).is_some_and(useless));
                if !all_useless {
                    let until = now.plus_ms(self.limits.redirect_defer_ms);
                    self.origin_deferred.insert(c, (until, holders.into_iter().take(REDIRECT_PEERS_MAX).collect()));
                }
                self.release(req, &peer, size);
                Vec::new()
            }
            ChunkOutcome::Dropped => {
                self.release(req, &peer, size);
                Vec::new()
            }
        }
    }

    /// The request finished (stream closed): measures the peer and requeues anything it did not answer.
    pub fn on_request_done(&mut self, now: Mono, req: ReqId, bytes_received: u64) {
        let Some(request) = self.requests.get(&req) else { return };
        let elapsed_ms = now.millis_since(request.sent_at).max(1);
        let peer = request.peer.clone();
        if bytes_received > 0
            && let Some(p) = self.peers.get_mut(&peer)
        {
            let sample = bytes_received as f64 * 1000.0 / elapsed_ms as f64;
            let rate = p.rate.map_or(sample, |r| 0.7 * r + 0.3 * sample);
            p.rate = Some(rate);
            let window = (rate * self.limits.window_target_ms as f64 / 1000.0) as u64;
            p.window = window.clamp(self.limits.window_min, self.limits.window_max);
        }
        self.drop_request(req);
    }

    /// `peer` refused chunk `c` of request `req` (answered missing, or elsewhere though it is no origin).
    fn refused(&mut self, peer: &P, req: ReqId, c: u32, size: u64) -> Vec<SchedOut<P>> {
        let claimed = self.mark_missing(peer, c);
        self.release(req, peer, size);
        let Some(p) = self.peers.get_mut(peer) else { return Vec::new() };
        if !claimed || p.is_origin {
            return Vec::new();
        }
        p.lies += 1;
        if p.lies > self.limits.lies_max { self.ban(peer, BanReason::FalseHave) } else { Vec::new() }
    }

    /// `peer` will not supply chunk `c` in this snapshot unless it announces it again. Returns whether the peer had
    /// claimed it (announced it, or holds the whole snapshot).
    fn mark_missing(&mut self, peer: &P, c: u32) -> bool {
        let Some(p) = self.peers.get_mut(peer) else { return false };
        p.missing.put(c as usize);
        let claimed = p.holds_all || p.explicit.contains(c as usize);
        let counted = p.explicit.contains(c as usize) && contribution(p) == Contribution::Explicit;
        p.explicit.set(c as usize, false);
        let holds_all = contribution(p) == Contribution::All;
        if counted {
            self.avail.lower(c);
        }
        if holds_all
            && self.needed(c)
            && self
                .peers
                .values()
                .filter(|q| contribution(q) == Contribution::All)
                .all(|q| q.missing.contains(c as usize))
        {
            self.lacking.insert(c);
        }
        claimed
    }

    /// The set of peers claiming the whole snapshot changed (a peer went from `before` to `after`): recomputes the
    /// chunks they all lack.
    fn holders_changed(&mut self, before: Contribution, after: Contribution) {
        if before != Contribution::All && after != Contribution::All {
            return;
        }
        self.lacking.clear();
        let mut holders = self.peers.values().filter(|p| contribution(p) == Contribution::All);
        let Some(first) = holders.next() else { return };
        let mut all = first.missing.clone();
        for p in holders {
            all.intersect_with(&p.missing);
        }
        all.difference_with(&self.held);
        self.lacking.extend(all.ones().map(|c| c as u32));
    }

    /// The request failed (connection error, no address, reset, timeout): its chunks are requeued, marked missing
    /// at a non-origin peer and the failure counted against it; the peer's window shrinks.
    pub fn on_request_failed(&mut self, req: ReqId) -> Vec<SchedOut<P>> {
        let Some(request) = self.requests.get(&req) else { return Vec::new() };
        let (peer, round, pending) = (request.peer.clone(), request.round, request.pending.clone());
        let Some(p) = self.peers.get_mut(&peer) else {
            self.drop_request(req);
            return Vec::new();
        };
        p.window = (p.window / 2).max(self.limits.window_min);
        // The origin is the supplier of last resort: a failure toward it is retried, never held against it.
        let is_origin = p.is_origin;
        if !is_origin && round == p.failure_round {
            p.failure_round += 1;
            p.failures += 1;
        }
        let unresponsive = !is_origin && p.failures > self.limits.failures_max;
        self.drop_request(req);
        if is_origin {
            return Vec::new();
        }
        for c in pending {
            if self.needed(c) {
                self.mark_missing(&peer, c);
            }
        }
        if unresponsive { self.ban(&peer, BanReason::Unresponsive) } else { Vec::new() }
    }

    /// Times out overdue requests, and fails the requests of a peer claiming the whole snapshot that delivered
    /// nothing for `holds_all_stall_ms` while asked: it is stalled (counted as one failure; until it delivers again
    /// it does not keep the origin from being asked).
    pub fn on_tick(&mut self, now: Mono) -> Vec<SchedOut<P>> {
        let stall_ms = self.limits.holds_all_stall_ms;
        let stalled: Vec<P> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                contribution(p) == Contribution::All && p.waiting_since.is_some_and(|t| now.millis_since(t) >= stall_ms)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        if !stalled.is_empty() {
            for peer in &stalled {
                if let Some(p) = self.peers.get_mut(peer) {
                    p.stalled = true;
                }
            }
            self.undefer_useless();
        }
        for peer in stalled {
            let Some(p) = self.peers.get(&peer) else { continue };
            out.push(SchedOut::Stalled { peer: peer.clone() });
            let requests: Vec<ReqId> = p.requests.iter().copied().collect();
            for req in requests {
                if self.requests.contains_key(&req) {
                    out.push(SchedOut::Cancel { peer: peer.clone(), req });
                    out.extend(self.on_request_failed(req));
                }
            }
        }
        let overdue: Vec<(ReqId, P)> = self
            .requests
            .iter()
            .filter(|(_, r)| {
                let to_origin = self.peers.get(&r.peer).is_some_and(|p| p.is_origin);
                let base = if to_origin {
                    self.limits.origin_request_timeout_base_ms
                } else {
                    self.limits.request_timeout_base_ms
                };
                now.millis_since(r.sent_at) > base + r.bytes * 1000 / self.limits.timeout_rate_min.max(1)
            })
            .map(|(id, r)| (*id, r.peer.clone()))
            .collect();
        for (req, peer) in overdue {
            if !self.requests.contains_key(&req) {
                // Dropped with an earlier one (its peer was banned).
                continue;
            }
            out.push(SchedOut::Cancel { peer, req });
            out.extend(self.on_request_failed(req));
        }
        out
    }

    /// Fills every peer's window; `next_req` hands out request ids. Non-origin peers are served first, stalled
    /// claimers last.
    pub fn pump(&mut self, now: Mono, next_req: &mut impl FnMut() -> ReqId) -> Vec<SchedOut<P>> {
        let mut out = Vec::new();
        // Peers first, then the origin, then stalled claimers (they get what is left).
        let rank = |p: &PeerSched| {
            if p.is_origin {
                1
            } else if p.stalled && p.holds_all {
                2
            } else {
                0
            }
        };
        let mut order: Vec<(u8, P)> = self.peers.iter().map(|(k, p)| (rank(p), k.clone())).collect();
        order.sort();
        let order = order.into_iter().map(|(_, k)| k);
        for peer in order {
            out.extend(self.pump_peer(now, &peer, next_req));
        }
        out
    }

    /// Fills one peer's window (after it announced new chunks: no other peer gains anything to ask for).
    pub fn pump_peer(&mut self, now: Mono, peer: &P, next_req: &mut impl FnMut() -> ReqId) -> Vec<SchedOut<P>> {
        let mut out = Vec::new();
        while let Some(fetch) = self.next_request(now, peer, next_req) {
            out.push(SchedOut::Fetch(fetch));
        }
        out
    }

    fn next_request(&mut self, now: Mono, peer: &P, next_req: &mut impl FnMut() -> ReqId) -> Option<ChunkFetch<P>> {
        let limits = &self.limits;
        let p = self.peers.get(peer)?;
        // Toward the origin the window stays small whatever the measured rate: every mirror asks it at once, and
        // what sits in its queue reaches the mesh late (a chunk spreads only once its first copy arrived).
        let window = if p.is_origin { p.window.min(limits.origin_window_max) } else { p.window };
        if p.banned || p.requests.len() >= limits.requests_in_flight_per_peer_max || p.in_flight_bytes >= window {
            return None;
        }
        let round = p.failure_round;
        let budget = (window - p.in_flight_bytes).min(limits.request_bytes_target).max(1);
        let mut picked: Vec<u32> = Vec::new();
        let mut bytes = 0u64;
        let mut take = |c: u32, size: u64, picked: &mut Vec<u32>| {
            picked.push(c);
            bytes += size;
            bytes >= budget || picked.len() >= limits.request_chunks_max
        };
        // A chunk in flight only as copies at stalled claimers is still the origin's to supply.
        let only_at_stalled = |c: u32| {
            self.in_flight.get(&c).is_none_or(|flights| {
                flights.iter().all(|(q, _)| self.peers.get(q).is_some_and(|q| q.stalled && q.holds_all))
            })
        };
        let usable = |c: u32| {
            let free = if p.is_origin { self.needed(c) && only_at_stalled(c) } else { self.queued(c) };
            free && !p.missing.contains(c as usize)
        };

        if p.is_origin {
            // Only chunks no one else can supply, and not ones the origin just redirected: nobody announced them
            // and nobody claims the snapshot (or those who do stopped delivering), or every claimer refused them.
            // Chunks never redirected come first: a redirected chunk is on its way through the mesh, and asking
            // the origin again (which serves a second copy) is the last resort once nothing fresh is left.
            let unclaimed = !self.claimed_by_a_live_holder();
            let lacking = (!unclaimed).then(|| self.lacking.iter().copied().filter(|&c| self.avail.level(c) == 0));
            let candidates = || {
                let unannounced = unclaimed.then(|| self.avail.unannounced());
                unannounced.into_iter().flatten().chain(lacking.clone().into_iter().flatten())
            };
            {
                let mut full = false;
                for c in candidates() {
                    let fresh = !self.origin_deferred.contains_key(&c);
                    if fresh && usable(c) && take(c, u64::from(self.sizes[c as usize]), &mut picked) {
                        full = true;
                        break;
                    }
                }
                // A redirected chunk is asked of the origin again once its deferral is over, this node has nothing
                // in flight from peers and, for as long, no peer delivered anything nor announced a chunk of this
                // sync it had not announced before: while the mesh around this node still moves, the chunk is more
                // likely spreading toward it than lost (with many mirrors on little bandwidth a chunk can take
                // longer than the deferral to cross the mesh).
                let quiet = self.mesh_moved_at.is_none_or(|at| now.millis_since(at) >= limits.redirect_defer_ms);
                let mesh_active = !quiet || self.peers.values().any(|q| !q.is_origin && !q.requests.is_empty());
                if !full && !mesh_active {
                    for c in candidates() {
                        let due = self.origin_deferred.get(&c).is_some_and(|(until, _)| *until <= now);
                        if due && usable(c) && take(c, u64::from(self.sizes[c as usize]), &mut picked) {
                            break;
                        }
                    }
                }
            }
        } else if p.holds_all {
            // A stalled claimer gets only copies of chunks in flight elsewhere (below) while an origin can supply
            // the rest: it proves itself by delivering one, and holds nothing up meanwhile.
            let origin_up = self.peers.values().any(|q| q.is_origin && !q.banned);
            if !p.stalled || !origin_up {
                for c in self.avail.rarest_first() {
                    if usable(c) && take(c, u64::from(self.sizes[c as usize]), &mut picked) {
                        break;
                    }
                }
            }
        } else {
            // What this peer announced and this node still needs, counted word by word.
            let words =
                || {
                    let (held, missing) = (self.held.as_slice(), p.missing.as_slice());
                    p.explicit.as_slice().iter().enumerate().map(move |(i, w)| {
                        w & !held.get(i).copied().unwrap_or(0) & !missing.get(i).copied().unwrap_or(0)
                    })
                };
            let count: usize = words().map(|w| w.count_ones() as usize).sum();
            let held_there = |c: u32| p.explicit.contains(c as usize) && !p.missing.contains(c as usize);
            if count <= SORTED_CANDIDATES_MAX {
                let mut candidates: Vec<(u32, u32)> = words()
                    .enumerate()
                    .flat_map(|(i, w)| set_bits(i, w))
                    .filter(|&c| usable(c))
                    .map(|c| (self.avail.position(c), c))
                    .collect();
                candidates.sort_unstable();
                for (_, c) in candidates {
                    if take(c, u64::from(self.sizes[c as usize]), &mut picked) {
                        break;
                    }
                }
            } else {
                // Many candidates: walking the rarest-first order finds the first ones sooner than sorting them
                // all (same chunks, same order).
                for c in self.avail.rarest_first() {
                    if held_there(c) && usable(c) && take(c, u64::from(self.sizes[c as usize]), &mut picked) {
                        break;
                    }
                }
            }
        }

        let nothing_queued = self.in_flight.len() >= self.chunks_missing;
        if picked.is_empty() && (nothing_queued || (p.stalled && p.holds_all)) && !p.is_origin {
            // Endgame: help with chunks in flight elsewhere (a stalled claimer only ever does this).
            for (&c, flights) in &self.in_flight {
                let here = flights.iter().any(|(q, _)| q == peer);
                let can = p.holds_all || p.explicit.contains(c as usize);
                let allowed = !here && !p.missing.contains(c as usize) && flights.len() < limits.endgame_copies_max;
                if can && allowed && take(c, u64::from(self.sizes[c as usize]), &mut picked) {
                    break;
                }
            }
            for &c in &picked {
                self.endgame_copied.put(c as usize);
            }
        }
        if picked.is_empty() {
            return None;
        }

        let req = next_req();
        let mut total = 0;
        for &c in &picked {
            self.in_flight.entry(c).or_default().push((peer.clone(), req));
            total += u64::from(self.sizes[c as usize]);
        }
        if let Some(p) = self.peers.get_mut(peer) {
            p.requests.insert(req);
            p.in_flight_bytes += total;
        }
        let chunks = picked.iter().map(|&c| self.ids[c as usize]).collect();
        self.requests.insert(req, Request { peer: peer.clone(), pending: picked, bytes: total, sent_at: now, round });
        if let Some(p) = self.peers.get_mut(peer) {
            p.waiting_since.get_or_insert(now);
        }
        Some(ChunkFetch { peer: peer.clone(), req, chunks })
    }

    fn complete_chunk(&mut self, c: u32) -> Vec<SchedOut<P>> {
        if !self.needed(c) {
            return Vec::new();
        }
        self.held.put(c as usize);
        self.avail.retire(c);
        let size = u64::from(self.sizes[c as usize]);
        self.bytes_missing -= size;
        self.chunks_missing -= 1;
        self.origin_deferred.remove(&c);
        self.lacking.remove(&c);
        let mut out = Vec::new();
        for (peer, req) in self.in_flight.remove(&c).unwrap_or_default() {
            // Another copy of this chunk is in flight: stop counting it, and cancel the request if nothing in it
            // is still needed.
            self.release(req, &peer, size);
            let useless = self.requests.get(&req).is_some_and(|r| r.pending.iter().all(|&x| x == c || !self.needed(x)));
            if useless {
                self.drop_request(req);
                out.push(SchedOut::Cancel { peer, req });
            }
        }
        out
    }

    /// Forgets that chunk `c` is in flight in `req`.
    fn untrack(&mut self, c: u32, peer: &P, req: ReqId) {
        if let Some(flights) = self.in_flight.get_mut(&c) {
            flights.retain(|(q, r)| !(q == peer && *r == req));
            if flights.is_empty() {
                self.in_flight.remove(&c);
            }
        }
    }

    /// Stops counting `size` bytes of `req` against `peer`'s window.
    fn release(&mut self, req: ReqId, peer: &P, size: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.in_flight_bytes = p.in_flight_bytes.saturating_sub(size);
        }
        if let Some(r) = self.requests.get_mut(&req) {
            r.bytes = r.bytes.saturating_sub(size);
        }
    }

    /// Forgets a request: its unanswered chunks become requestable again.
    fn drop_request(&mut self, req: ReqId) {
        let Some(request) = self.requests.remove(&req) else { return };
        if let Some(p) = self.peers.get_mut(&request.peer) {
            p.requests.remove(&req);
            p.in_flight_bytes = p.in_flight_bytes.saturating_sub(request.bytes);
            if p.requests.is_empty() {
                p.waiting_since = None;
            }
        }
        for c in request.pending {
            self.untrack(c, &request.peer, req);
        }
    }

    /// Abandons every request (the target changed).
    pub fn cancel_all(&mut self) -> Vec<SchedOut<P>> {
        let requests: Vec<(ReqId, P)> = self.requests.iter().map(|(r, q)| (*r, q.peer.clone())).collect();
        requests
            .into_iter()
            .map(|(req, peer)| {
                self.drop_request(req);
                SchedOut::Cancel { peer, req }
            })
            .collect()
    }

    fn ban(&mut self, peer: &P, reason: BanReason) -> Vec<SchedOut<P>> {
        let Some(p) = self.peers.get(peer) else { return Vec::new() };
        if p.banned {
            return Vec::new();
        }
        let before = contribution(p);
        self.contribute(peer, before, -1);
        let Some(p) = self.peers.get_mut(peer) else { return Vec::new() };
        p.banned = true;
        let requests: Vec<ReqId> = p.requests.iter().copied().collect();
        self.holders_changed(before, Contribution::Nothing);
        let mut out = vec![SchedOut::Ban { peer: peer.clone(), reason }];
        for req in requests {
            self.drop_request(req);
            out.push(SchedOut::Cancel { peer: peer.clone(), req });
        }
        self.undefer_useless();
        out
    }

    /// A chunk the origin redirected only to peers now banned or stalled will not come from them: the origin is
    /// asked again now.
    fn undefer_useless(&mut self) {
        let peers = &self.peers;
        self.origin_deferred.retain(|_, (_, holders)| !holders.iter().all(|h| peers.get(h).is_some_and(useless)));
    }

    pub fn is_banned(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|p| p.banned)
    }

    /// Adds (`sign = 1`) or removes (`-1`) a peer's contribution to availability.
    fn contribute(&mut self, peer: &P, contribution: Contribution, sign: i64) {
        match contribution {
            Contribution::Nothing => {}
            // A holds-all peer adds to every chunk at once, which leaves the order unchanged.
            Contribution::All => self.holds_all_count = (i64::from(self.holds_all_count) + sign).max(0) as u32,
            Contribution::Explicit => {
                let Some(p) = self.peers.get(peer) else { return };
                let chunks: Vec<u32> = p.explicit.ones().map(|c| c as u32).collect();
                for c in chunks {
                    if sign > 0 {
                        self.avail.raise(c);
                    } else {
                        self.avail.lower(c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn fetches(outs: &[SchedOut<u32>]) -> Vec<(u32, Vec<ChunkId>)> {
        outs.iter()
            .filter_map(|o| match o {
                SchedOut::Fetch(f) => Some((f.peer, f.chunks.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_peer_that_lacked_a_chunk_is_asked_again_once_it_completes() {
        let mut s = Scheduler::new(SchedulerLimits::default(), 1, [(id(1), 100)]);
        let mut n = 0;
        let mut next = || {
            n += 1;
            ReqId(n)
        };
        s.set_peer(&7, false, false);
        s.add_holding(Mono(0), &7, &id(1));
        let outs = s.pump(Mono(0), &mut next);
        assert_eq!(fetches(&outs), vec![(7, vec![id(1)])]);
        s.on_chunk(Mono(1), ReqId(1), &id(1), ChunkOutcome::Missing);
        s.on_request_done(Mono(1), ReqId(1), 0);
        assert!(fetches(&s.pump(Mono(2), &mut next)).is_empty(), "not asked again right away");
        s.set_peer(&7, false, true);
        assert_eq!(fetches(&s.pump(Mono(3), &mut next)), vec![(7, vec![id(1)])], "asked again once complete");
    }

    #[test]
    fn an_endgame_copy_is_marked_so_a_second_arrival_is_known_for_the_endgames() {
        let mut s = Scheduler::new(SchedulerLimits::default(), 1, [(id(1), 100)]);
        let mut n = 0;
        let mut next = || {
            n += 1;
            ReqId(n)
        };
        s.set_peer(&5, false, true);
        assert_eq!(fetches(&s.pump(Mono(0), &mut next)), vec![(5, vec![id(1)])]);
        assert_eq!(s.endgame_copied(&id(1)), Some(false), "asked once, not in the endgame");
        // Every chunk is in flight: an idle peer that holds it is asked for a copy.
        s.set_peer(&6, false, true);
        assert!(s.in_endgame());
        assert_eq!(fetches(&s.pump(Mono(1), &mut next)), vec![(6, vec![id(1)])]);
        assert_eq!(s.endgame_copied(&id(1)), Some(true));
        assert_eq!(s.endgame_copied(&id(9)), None, "not a chunk of this snapshot");
    }

    #[test]
    fn the_origin_is_asked_only_for_what_no_peer_holds() {
        let mut s = Scheduler::new(SchedulerLimits::default(), 1, [(id(1), 100), (id(2), 100)]);
        let mut n = 0;
        let mut next = || {
            n += 1;
            ReqId(n)
        };
        s.set_peer(&0, true, true);
        s.set_peer(&5, false, false);
        s.add_holding(Mono(0), &5, &id(1));
        let outs = fetches(&s.pump(Mono(0), &mut next));
        assert_eq!(outs, vec![(5, vec![id(1)]), (0, vec![id(2)])]);
    }

    #[test]
    fn a_redirected_chunk_waits_for_the_mesh_unless_its_holders_are_banned() {
        let mut s = Scheduler::new(SchedulerLimits::default(), 1, [(id(1), 100), (id(2), 100), (id(3), 100)]);
        let mut n = 0;
        let mut next = || {
            n += 1;
            ReqId(n)
        };
        let mut sent = |s: &mut Scheduler<u32>, at: u64| -> Vec<ChunkFetch<u32>> {
            s.pump(Mono(at), &mut next)
                .into_iter()
                .filter_map(|o| match o {
                    SchedOut::Fetch(f) => Some(f),
                    _ => None,
                })
                .collect()
        };
        s.set_peer(&0, true, true);
        s.set_peer(&5, false, false);
        s.set_peer(&6, false, false);
        let first = sent(&mut s, 0);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].peer, first[0].chunks.len()), (0, 3));
        let req = first[0].req;
        s.on_chunk(Mono(5), req, &id(1), ChunkOutcome::Elsewhere(vec![5]));
        s.on_chunk(Mono(5), req, &id(2), ChunkOutcome::Elsewhere(vec![6]));
        s.on_chunk(Mono(5), req, &id(3), ChunkOutcome::Elsewhere(vec![6]));
        s.on_request_done(Mono(5), req, 0);
        assert!(sent(&mut s, 10).is_empty(), "redirected chunks are not asked of the origin right away");

        // Peer 5 announces chunk 1 and sends corrupt bytes: banned, and the origin is asked for chunk 1 at once.
        s.add_holding(Mono(20), &5, &id(1));
        let from_5 = sent(&mut s, 20);
        assert_eq!(from_5.iter().map(|f| (f.peer, f.chunks.clone())).collect::<Vec<_>>(), vec![(5, vec![id(1)])]);
        let outs = s.on_chunk(Mono(30), from_5[0].req, &id(1), ChunkOutcome::Corrupt);
        assert!(outs.contains(&SchedOut::Ban { peer: 5, reason: BanReason::CorruptChunk }));
        let again = sent(&mut s, 40);
        assert_eq!(again.iter().map(|f| (f.peer, f.chunks.clone())).collect::<Vec<_>>(), vec![(0, vec![id(1)])]);

        // Chunk 3 arrives at peer 6, which is busy sending it: chunk 2 waits past its deferral while peer 6 sends,
        // and as long again after.
        s.add_holding(Mono(50), &6, &id(3));
        let from_6 = sent(&mut s, 50);
        assert_eq!(from_6.iter().map(|f| (f.peer, f.chunks.clone())).collect::<Vec<_>>(), vec![(6, vec![id(3)])]);
        let past = SchedulerLimits::default().redirect_defer_ms + 100;
        assert!(sent(&mut s, past).is_empty(), "the origin is not asked while a peer is sending");
        s.on_chunk(Mono(past + 1), from_6[0].req, &id(3), ChunkOutcome::Verified);
        s.on_request_done(Mono(past + 1), from_6[0].req, 100);
        assert!(sent(&mut s, past + 2).is_empty(), "nor until peers have been quiet for the deferral");
        // Just before that, peer 7 announces chunk 3 (held here already): its neighbourhood still moves, so chunk 2
        // waits as long again.
        let quiet = past + 1 + SchedulerLimits::default().redirect_defer_ms;
        s.set_peer(&7, false, false);
        s.add_holding(Mono(quiet - 1), &7, &id(3));
        assert!(sent(&mut s, quiet).is_empty(), "nor while peers announce chunks of this sync");
        let quiet = quiet - 1 + SchedulerLimits::default().redirect_defer_ms;
        let last = sent(&mut s, quiet);
        assert_eq!(last.iter().map(|f| (f.peer, f.chunks.clone())).collect::<Vec<_>>(), vec![(0, vec![id(2)])]);
    }

    /// Fetches in `outs` as (peer, chunks, request).
    fn sent(outs: &[SchedOut<u32>]) -> Vec<(u32, Vec<ChunkId>, ReqId)> {
        outs.iter()
            .filter_map(|o| match o {
                SchedOut::Fetch(f) => Some((f.peer, f.chunks.clone(), f.req)),
                _ => None,
            })
            .collect()
    }

    fn counter() -> impl FnMut() -> ReqId {
        let mut n = 0;
        move || {
            n += 1;
            ReqId(n)
        }
    }

    #[test]
    fn elsewhere_from_a_peer_is_a_refusal_and_the_origin_supplies_what_every_claimer_refused() {
        let limits = SchedulerLimits { lies_max: 1, ..SchedulerLimits::default() };
        let mut s = Scheduler::new(limits, 1, [(id(1), 100), (id(2), 100), (id(3), 100)]);
        let mut next = counter();
        s.set_peer(&0, true, true);
        s.set_peer(&5, false, true);
        let first = sent(&s.pump(Mono(0), &mut next));
        assert_eq!(first.len(), 1, "only the claimer is asked: {first:?}");
        assert_eq!((first[0].0, first[0].1.len()), (5, 3));
        let req = first[0].2;
        assert!(s.on_chunk(Mono(1), req, &id(1), ChunkOutcome::Elsewhere(vec![0])).is_empty());
        // The claimer refused chunk 1: the origin is asked for it, the claimer is not asked again.
        let again = sent(&s.pump(Mono(2), &mut next));
        assert_eq!(again.iter().map(|f| (f.0, f.1.clone())).collect::<Vec<_>>(), vec![(0, vec![id(1)])]);
        let outs = s.on_chunk(Mono(3), req, &id(2), ChunkOutcome::Elsewhere(vec![0]));
        assert!(outs.contains(&SchedOut::Ban { peer: 5, reason: BanReason::FalseHave }), "{outs:?}");
        // Banned: its last chunk goes to the origin too.
        let last = sent(&s.pump(Mono(4), &mut next));
        assert_eq!(last.len(), 1);
        let mut chunks = last[0].1.clone();
        chunks.sort();
        assert_eq!((last[0].0, chunks), (0, vec![id(2), id(3)]));
    }

    #[test]
    fn failed_requests_in_a_row_ban_a_peer_and_a_delivery_forgives_them() {
        let limits = SchedulerLimits {
            failures_max: 2,
            window_initial: 300,
            window_min: 100,
            request_bytes_target: 100,
            requests_in_flight_per_peer_max: 3,
            ..SchedulerLimits::default()
        };
        let chunks: Vec<(ChunkId, u64)> = (1..=20).map(|n| (id(n), 100)).collect();
        let mut s = Scheduler::new(limits, 1, chunks);
        let mut next = counter();
        s.set_peer(&5, false, true);
        let mut asked: Vec<ChunkId> = Vec::new();
        // Asks the peer, fails every request: returns what the scheduler decided.
        fn round(
            s: &mut Scheduler<u32>,
            next: &mut impl FnMut() -> ReqId,
            at: u64,
            asked: &mut Vec<ChunkId>,
        ) -> Vec<SchedOut<u32>> {
            let fetches = sent(&s.pump(Mono(at), next));
            assert!(!fetches.is_empty(), "the peer is asked at {at}");
            let mut outs = Vec::new();
            for (peer, chunks, req) in fetches {
                assert_eq!(peer, 5);
                for c in &chunks {
                    assert!(!asked.contains(c), "chunk {c} asked again of the peer whose request for it failed");
                }
                asked.extend(chunks);
                outs.extend(s.on_request_failed(req));
            }
            outs
        }
        // Three requests in flight fail together: one failure.
        assert!(round(&mut s, &mut next, 0, &mut asked).is_empty());
        assert!(round(&mut s, &mut next, 1, &mut asked).is_empty());
        // It delivers a chunk: forgiven.
        let fetch = sent(&s.pump(Mono(2), &mut next));
        let (_, chunks, req) = fetch[0].clone();
        s.on_chunk(Mono(3), req, &chunks[0], ChunkOutcome::Verified);
        s.on_request_done(Mono(3), req, 100);
        for (_, chunks, req) in &fetch[1..] {
            asked.extend(chunks.iter().copied());
            s.on_chunk(Mono(3), *req, &chunks[0], ChunkOutcome::Verified);
            s.on_request_done(Mono(3), *req, 100);
        }
        assert!(round(&mut s, &mut next, 4, &mut asked).is_empty());
        assert!(round(&mut s, &mut next, 5, &mut asked).is_empty());
        let outs = round(&mut s, &mut next, 6, &mut asked);
        assert!(outs.contains(&SchedOut::Ban { peer: 5, reason: BanReason::Unresponsive }), "{outs:?}");
        assert!(s.is_banned(&5));
    }

    #[test]
    fn timeouts_count_as_failures() {
        let limits = SchedulerLimits { failures_max: 0, ..SchedulerLimits::default() };
        let mut s = Scheduler::new(limits.clone(), 1, [(id(1), 100), (id(2), 100)]);
        let mut next = counter();
        s.set_peer(&5, false, false);
        s.add_holding(Mono(0), &5, &id(1));
        s.add_holding(Mono(0), &5, &id(2));
        assert_eq!(sent(&s.pump(Mono(0), &mut next)).len(), 1);
        assert!(s.on_tick(Mono(limits.request_timeout_base_ms)).is_empty(), "not overdue yet");
        let outs = s.on_tick(Mono(limits.request_timeout_base_ms + 10));
        assert!(outs.contains(&SchedOut::Cancel { peer: 5, req: ReqId(1) }), "{outs:?}");
        assert!(outs.contains(&SchedOut::Ban { peer: 5, reason: BanReason::Unresponsive }), "{outs:?}");
    }

    #[test]
    fn a_request_waiting_in_the_origins_sending_queue_is_not_timed_out_like_a_peers() {
        // The origin sends a few replies at once and queues the rest, fairly: with many mirrors asking at the start
        // of an update, a mirror's reply may wait there longer than a peer may stay silent. Timing it out re-asks
        // the origin, and a copy already on its way is sent twice (CI: 64 mirrors, origin 1.27 x, all of the
        // excess "asked again by the same mirror").
        let limits = SchedulerLimits::default();
        let mut s = Scheduler::new(limits.clone(), 1, [(id(1), 1 << 20)]);
        let mut next = counter();
        s.set_peer(&0, true, true);
        assert_eq!(sent(&s.pump(Mono(0), &mut next)).len(), 1);
        let peer_allowance = limits.request_timeout_base_ms + (1 << 20) * 1000 / limits.timeout_rate_min;
        assert!(s.on_tick(Mono(peer_allowance + 1_000)).is_empty(), "timed out like a peer's request");
        let origin_allowance = limits.origin_request_timeout_base_ms + (1 << 20) * 1000 / limits.timeout_rate_min;
        assert!(origin_allowance > peer_allowance);
        let outs = s.on_tick(Mono(origin_allowance + 10));
        assert!(
            outs.contains(&SchedOut::Cancel { peer: 0, req: ReqId(1) }),
            "a lost request is still retried: {outs:?}"
        );
    }

    #[test]
    fn a_claimer_silent_for_the_stall_allowance_fails_its_requests_and_lets_the_origin_be_asked() {
        let mb = 1 << 20;
        let chunks: Vec<(ChunkId, u64)> = (1..=12).map(|n| (id(n), mb)).collect();
        let mut s = Scheduler::new(SchedulerLimits::default(), 1, chunks);
        let stall = SchedulerLimits::default().holds_all_stall_ms;
        let mut next = counter();
        s.set_peer(&0, true, true);
        s.set_peer(&5, false, true);
        let to_claimer = sent(&s.pump(Mono(0), &mut next));
        assert!(!to_claimer.is_empty() && to_claimer.iter().all(|f| f.0 == 5), "{to_claimer:?}");
        assert!(s.on_tick(Mono(stall - 1)).is_empty());
        assert!(sent(&s.pump(Mono(stall - 1), &mut next)).is_empty(), "the origin waits for the claimer");
        // Silent for the allowance: its requests fail (their chunks go to the origin), and the origin is asked.
        let outs = s.on_tick(Mono(stall));
        for (_, _, req) in &to_claimer {
            assert!(outs.contains(&SchedOut::Cancel { peer: 5, req: *req }), "{outs:?}");
        }
        let after = sent(&s.pump(Mono(stall), &mut next));
        let to_origin: Vec<_> = after.iter().filter(|f| f.0 == 0).cloned().collect();
        assert_eq!(to_origin.len(), 1, "{after:?}");
        // Stalled, the claimer gets only copies of chunks in flight at the origin.
        let at_origin =
            |c: &ChunkId, reqs: &[(u32, Vec<ChunkId>, ReqId)]| reqs.iter().any(|f| f.0 == 0 && f.1.contains(c));
        for f in after.iter().filter(|f| f.0 == 5) {
            assert!(f.1.iter().all(|c| at_origin(c, &after)), "{after:?}");
        }
        // The origin delivers until the claimer is asked for a copy, which it delivers: it is no longer stalled.
        let mut outstanding = after;
        let mut at = stall;
        let copy = loop {
            if let Some(copy) = outstanding.iter().find(|f| f.0 == 5).cloned() {
                break copy;
            }
            at += 1;
            for (_, chunks, req) in outstanding.iter().filter(|f| f.0 == 0) {
                s.on_chunk(Mono(at), *req, &chunks[0], ChunkOutcome::Verified);
                s.on_request_done(Mono(at), *req, mb);
            }
            outstanding = sent(&s.pump(Mono(at), &mut next));
            assert!(!outstanding.is_empty(), "nothing asked at {at}");
        };
        s.on_chunk(Mono(at + 1), copy.2, &copy.1[0], ChunkOutcome::Verified);
        s.on_request_done(Mono(at + 1), copy.2, mb);
        let later = sent(&s.pump(Mono(at + 2), &mut next));
        let sat_on = |c: &ChunkId| to_claimer.iter().any(|g| g.1.contains(c));
        assert!(later.iter().any(|f| f.0 == 5), "{later:?}");
        for f in &later {
            // The claimer gets fresh chunks again; the origin only what the claimer sat on (missing there).
            assert!(f.0 == 0 || !f.1.iter().any(|c| at_origin(c, &outstanding)), "{later:?}");
            assert!(f.0 == 5 || f.1.iter().all(sat_on), "{later:?}");
        }
    }

    #[test]
    fn a_redirect_to_stalled_claimers_only_is_not_waited_for() {
        let mut s = Scheduler::new(SchedulerLimits::default(), 1, [(id(1), 100), (id(2), 100)]);
        let mut next = counter();
        s.set_peer(&0, true, true);
        s.set_peer(&5, false, true);
        s.suspect(&5);
        let first = sent(&s.pump(Mono(0), &mut next));
        let (_, chunks, req) = first.iter().find(|f| f.0 == 0).cloned().expect("the origin is asked");
        assert_eq!(chunks.len(), 2, "{first:?}");
        s.on_chunk(Mono(1), req, &id(1), ChunkOutcome::Elsewhere(vec![5]));
        s.on_chunk(Mono(1), req, &id(2), ChunkOutcome::Verified);
        s.on_request_done(Mono(1), req, 100);
        let again = sent(&s.pump(Mono(2), &mut next));
        assert!(again.iter().any(|f| f.0 == 0 && f.1 == vec![id(1)]), "asked of the origin again at once: {again:?}");
    }
}
