//! Answering peers' manifest fetches (`GetNodes`, `GetDelta`) off the event loop, within a byte budget per peer.
//!
//! A `GetNodes` of 40 bytes can ask for 16 MiB of nodes and a `GetDelta` for a 64 MiB delta, so answers are paid
//! from a token bucket per peer ([`ANSWER_BYTES_PER_PEER_PER_SEC`], burst [`ANSWER_BURST_BYTES`]): a peer in debt,
//! or with [`ANSWERS_IN_FLIGHT_PER_PEER_MAX`] answers already being read, is answered "not held" for everything
//! (it asks another peer, or again later), and counted. So a peer takes at most the burst plus the rate plus the
//! answers in flight. Hashes asked twice in
//! one request are answered once. The store is read on the blocking pool; the loop only sends the answer.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use libp2p::PeerId;
use mirrormesh_proto::control::{ControlResponse, DESCENDANTS_PER_ANSWER_MAX};
use mirrormesh_proto::delta::DeltaHash;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::node_store::{self, NodeSource};
use serde_bytes::ByteBuf;

use crate::store::StateStore;

/// Bytes of manifest answers one peer may take per second, on average. A new mirror of a 10^6-file tree fetches
/// about 80 MB of nodes once: a few seconds at this rate, while one peer cannot keep a node's disk and uplink busy
/// answering it.
pub const ANSWER_BYTES_PER_PEER_PER_SEC: u64 = 32 << 20;
/// What a peer may take at once: one largest delta (`DELTA_BYTES_MAX`, 64 MiB) plus one largest nodes answer.
pub const ANSWER_BURST_BYTES: u64 = 80 << 20;
pub use mirrormesh_proto::control::NODES_RESPONSE_BYTES_MAX;
/// Answers read for one peer at once: what an honest node asks at most (its manifest fetch keeps
/// `NODE_REQUESTS_PER_PEER_MAX` requests in flight per peer, and one delta at a time).
pub const ANSWERS_IN_FLIGHT_PER_PEER_MAX: usize = mirrormesh_proto::sync::manifest_fetch::NODE_REQUESTS_PER_PEER_MAX;
/// Peers whose budget is remembered (the least recently seen is forgotten beyond this; a forgotten peer starts with
/// a full burst again, which costs at most one burst per eviction).
pub const ANSWER_BUDGET_PEERS_MAX: usize = 4096;

struct Bucket {
    tokens: f64,
    last: Instant,
    /// Answers being read for this peer now.
    in_flight: usize,
}

#[derive(Default)]
pub struct AnswerBudgets {
    peers: BTreeMap<PeerId, Bucket>,
}

impl AnswerBudgets {
    fn bucket(&mut self, now: Instant, peer: PeerId) -> &mut Bucket {
        if !self.peers.contains_key(&peer)
            && self.peers.len() >= ANSWER_BUDGET_PEERS_MAX
            && let Some(oldest) = self.peers.iter().min_by_key(|(_, b)| b.last).map(|(p, _)| *p)
        {
            self.peers.remove(&oldest);
        }
        let bucket =
            self.peers.entry(peer).or_insert(Bucket { tokens: ANSWER_BURST_BYTES as f64, last: now, in_flight: 0 });
        let refill = now.saturating_duration_since(bucket.last).as_secs_f64() * ANSWER_BYTES_PER_PEER_PER_SEC as f64;
        bucket.tokens = (bucket.tokens + refill).min(ANSWER_BURST_BYTES as f64);
        bucket.last = now;
        bucket
    }

    /// Whether an answer to `peer` may start now (it is not in debt, and not too many are being read for it);
    /// if so, it counts as in flight until [`AnswerBudgets::spend`].
    pub fn start(&mut self, now: Instant, peer: PeerId) -> bool {
        let bucket = self.bucket(now, peer);
        let ok = bucket.tokens > 0.0 && bucket.in_flight < ANSWERS_IN_FLIGHT_PER_PEER_MAX;
        bucket.in_flight += usize::from(ok);
        ok
    }

    /// An answer to `peer` that [`AnswerBudgets::start`] let through ended, `bytes` long (its budget may go into
    /// debt: an answer is never cut short once read).
    pub fn spend(&mut self, now: Instant, peer: PeerId, bytes: usize) {
        let bucket = self.bucket(now, peer);
        assert!(bucket.in_flight > 0, "an answer ended that never started");
        bucket.in_flight -= 1;
        bucket.tokens -= bytes as f64;
    }
}

/// The answer to `GetNodes`: each hash's node if held, a hash asked again in the same request `None`, and nothing
/// more once [`NODES_RESPONSE_BYTES_MAX`] is reached; then up to `descendants_max` (at most
/// `DESCENDANTS_PER_ANSWER_MAX`) nodes below them, breadth first, within the same byte budget. Returns the answer,
/// its node bytes and how many hashes were repeats (blocking: reads the store).
pub fn nodes(
    store: &Arc<StateStore>,
    hashes: &[NodeHash],
    descendants_max: u16,
) -> Result<(ControlResponse, usize, usize)> {
    let reader = store.reader()?;
    let mut seen = HashSet::with_capacity(hashes.len());
    let (mut total, mut repeats) = (0, 0);
    let mut nodes = Vec::with_capacity(hashes.len());
    for hash in hashes {
        if !seen.insert(*hash) {
            repeats += 1;
            nodes.push(None);
            continue;
        }
        let bytes = if total < NODES_RESPONSE_BYTES_MAX { reader.node_bytes(hash)? } else { None };
        total += bytes.as_ref().map_or(0, Vec::len);
        nodes.push(bytes.map(ByteBuf::from));
    }
    let answered: Vec<&[u8]> = nodes.iter().flatten().map(|b| b.as_slice()).collect();
    let below = node_store::descendants(
        &reader,
        &answered,
        usize::from(descendants_max).min(DESCENDANTS_PER_ANSWER_MAX),
        NODES_RESPONSE_BYTES_MAX.saturating_sub(total),
    )?;
    total += below.iter().map(Vec::len).sum::<usize>();
    let descendants = below.into_iter().map(ByteBuf::from).collect();
    Ok((ControlResponse::Nodes { nodes, descendants }, total, repeats))
}

/// The answer to `GetDelta` and its bytes (blocking: reads the store).
pub fn delta(store: &Arc<StateStore>, hash: &DeltaHash) -> Result<(ControlResponse, usize)> {
    let delta = store.reader()?.delta(hash)?;
    let bytes = delta.as_ref().map_or(0, Vec::len);
    Ok((ControlResponse::Delta { delta: delta.map(ByteBuf::from) }, bytes))
}

/// What is answered to a peer in debt: nothing held.
pub fn refusal(hashes: usize, delta: bool) -> ControlResponse {
    if delta {
        ControlResponse::Delta { delta: None }
    } else {
        ControlResponse::Nodes { nodes: vec![None; hashes], descendants: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_peer_in_debt_waits_for_its_budget_others_do_not() {
        let mut b = AnswerBudgets::default();
        let (greedy, other) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        assert!(b.start(t, greedy));
        b.spend(t, greedy, ANSWER_BURST_BYTES as usize + 1);
        assert!(!b.start(t, greedy), "in debt");
        assert!(b.start(t, other), "budgets are per peer");
        b.spend(t, other, 0);
        assert!(b.start(t + Duration::from_millis(10), greedy), "refilled at the per-second rate");
        b.spend(t + Duration::from_millis(10), greedy, 0);
        for _ in 0..ANSWERS_IN_FLIGHT_PER_PEER_MAX {
            assert!(b.start(t + Duration::from_secs(5), other));
        }
        assert!(!b.start(t + Duration::from_secs(5), other), "no more answers in flight");
        for _ in 0..ANSWERS_IN_FLIGHT_PER_PEER_MAX {
            b.spend(t + Duration::from_secs(5), other, 0);
        }
        // Forty 40-byte requests for 64 MiB deltas in one second cost at most the burst plus one second's rate.
        let mut sent = 0;
        for i in 0..40 {
            let at = t + Duration::from_millis(1_000 + 25 * i);
            if b.start(at, other) {
                b.spend(at, other, 64 << 20);
                sent += 64u64 << 20;
            }
        }
        assert!(sent <= ANSWER_BURST_BYTES + 2 * ANSWER_BYTES_PER_PEER_PER_SEC + (64 << 20), "{sent}");
    }
}
