//! Fetching the manifest of a newly accepted snapshot: the delta when it applies, otherwise (and for directories
//! the delta only names) the missing nodes, by hash, from any peer.
//!
//! Invariant kept for the node store: a node is stored only after every node below it is stored, so "the store
//! holds node X" means "the store holds X's whole subtree", and a walk can stop at any held node. Nodes arrive top
//! down, so each stays pending in memory until its children are complete, then it and its completed ancestors are
//! handed to the store bottom up.

use std::collections::{BTreeMap, BTreeSet};

use crate::delta::{DeltaHash, ManifestDelta};
use crate::node::{Node, NodeHash, verify_node};
use crate::node_store::{NodeSource, Overlay, SourceError};
use crate::sync::{PeerKey, ReqId};
use crate::timestamp::Mono;

/// How long a node or delta request may take before it is retried elsewhere.
pub const METADATA_TIMEOUT_MS: u64 = 10_000;
/// Node requests in flight to one peer.
pub const NODE_REQUESTS_PER_PEER_MAX: usize = 4;
/// Hashes per node request.
pub const NODES_PER_FETCH: usize = 128;
/// Descendants a node request asks for when the fetch is not from a delta (the tree is mostly new here): a fresh
/// mirror's first manifest then takes a round trip per few thousand nodes instead of one per level of the tree
/// (a mirror 327 ms from the origin took 2.8 s for six levels; BENCHMARKS.md, WAN). After a delta, the nodes still
/// wanted are few and their subtrees mostly held, so none are asked for.
pub const DESCENDANTS_PER_FETCH: u16 = 4096;
/// Nodes held pending in memory while their subtrees are fetched.
pub const PENDING_NODES_MAX: usize = 1 << 22;
/// What peers said they lack (or failed to send) is forgotten this long after the first of it: a peer still
/// fetching the manifest itself holds it a moment later, and a timeout under load is not a lasting answer.
pub const LACKS_FORGET_MS: u64 = 3_000;

/// What the fetcher wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchOut<P> {
    Nodes {
        peer: P,
        req: ReqId,
        hashes: Vec<NodeHash>,
        /// Nodes below them to ask for as well.
        descendants_max: u16,
    },
    Delta {
        peer: P,
        req: ReqId,
        hash: DeltaHash,
    },
    /// Verified nodes, children before parents: store them (durably, in this order).
    Store(Vec<(NodeHash, Vec<u8>)>),
    /// A verified delta that reproduced the signed root: keep it to serve to peers.
    StoreDelta(DeltaHash, Vec<u8>),
    /// A peer sent a node or delta whose bytes do not match its hash.
    Corrupt {
        peer: P,
    },
    /// The delta could not be used (it did not reproduce the signed root, or did not decode); nodes are fetched
    /// instead.
    DeltaRejected,
}

struct Pending {
    bytes: Vec<u8>,
    /// Children not yet complete.
    missing: usize,
    parents: Vec<NodeHash>,
}

enum DeltaState {
    None,
    Wanted { hash: DeltaHash, base: NodeHash },
    InFlight { hash: DeltaHash, base: NodeHash, req: ReqId },
}

pub struct ManifestFetch<P: PeerKey> {
    root: NodeHash,
    delta: DeltaState,
    /// Hashes to request.
    wanted: BTreeSet<NodeHash>,
    /// Hashes in flight, with their request.
    requested: BTreeMap<NodeHash, ReqId>,
    in_flight: BTreeMap<ReqId, (P, Vec<NodeHash>, Mono)>,
    /// Parents waiting for a hash that is wanted or in flight.
    waiting_parents: BTreeMap<NodeHash, Vec<NodeHash>>,
    pending: BTreeMap<NodeHash, Pending>,
    /// Completed (handed to the store) in this fetch.
    stored: BTreeSet<NodeHash>,
    /// Peers that said they do not hold a hash.
    lacks: BTreeSet<(P, NodeHash)>,
    /// Peers that do not hold the delta.
    delta_lacks: BTreeSet<P>,
    /// When the oldest remembered lack was first seen.
    lacks_since: Option<Mono>,
    complete: bool,
    /// False until the store was checked (see [`ManifestFetch::resume`]).
    started: bool,
    /// Bytes of nodes and deltas received (for metrics).
    pub bytes_received: u64,
    /// What node requests ask for below the nodes they name ([`DESCENDANTS_PER_FETCH`], or none after a delta).
    descendants_max: u16,
}

impl<P: PeerKey> ManifestFetch<P> {
    /// Starts fetching the tree at `root`. `delta` is `(hash, base root)` when the signed root names a delta whose
    /// base this node holds.
    pub fn new(
        root: NodeHash,
        delta: Option<(DeltaHash, NodeHash)>,
        source: &impl NodeSource,
    ) -> Result<Self, SourceError> {
        let mut f = Self::resume(root);
        f.started = true;
        if source.has_node(&root)? {
            f.complete = true;
        } else if let Some((hash, base)) = delta {
            f.delta = DeltaState::Wanted { hash, base };
            f.descendants_max = 0;
        } else {
            f.wanted.insert(root);
        }
        Ok(f)
    }

    /// A fetch of the tree at `root` that checks the store on its first step (used when no source is at hand).
    pub fn resume(root: NodeHash) -> Self {
        Self {
            root,
            delta: DeltaState::None,
            wanted: BTreeSet::new(),
            requested: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            waiting_parents: BTreeMap::new(),
            pending: BTreeMap::new(),
            stored: BTreeSet::new(),
            lacks: BTreeSet::new(),
            delta_lacks: BTreeSet::new(),
            lacks_since: None,
            complete: false,
            started: false,
            bytes_received: 0,
            descendants_max: DESCENDANTS_PER_FETCH,
        }
    }

    /// Created by [`ManifestFetch::resume`] and not yet checked against the store.
    pub fn needs_start(&self) -> bool {
        !self.started
    }

    /// The subtree this fetch completes.
    pub fn root(&self) -> NodeHash {
        self.root
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Nodes still to fetch or in flight (for status).
    pub fn outstanding(&self) -> usize {
        self.wanted.len() + self.requested.len() + usize::from(!matches!(self.delta, DeltaState::None))
    }

    /// Sends requests to `peers` (those that should hold this snapshot, best first) as far as limits allow.
    pub fn pump(&mut self, now: Mono, peers: &[P], next_req: &mut impl FnMut() -> ReqId) -> Vec<FetchOut<P>> {
        let mut out = Vec::new();
        if let DeltaState::Wanted { hash, base } = self.delta {
            match peers.iter().find(|p| !self.delta_lacks.contains(*p)) {
                Some(peer) => {
                    let req = next_req();
                    self.in_flight.insert(req, (peer.clone(), Vec::new(), now));
                    self.delta = DeltaState::InFlight { hash, base, req };
                    out.push(FetchOut::Delta { peer: peer.clone(), req, hash });
                    return out;
                }
                // Nobody we can reach has the delta: fetch nodes instead.
                None if !peers.is_empty() => {
                    self.delta = DeltaState::None;
                    self.wanted.insert(self.root);
                }
                None => return out,
            }
        }
        for peer in peers {
            loop {
                let busy = self.in_flight.values().filter(|(p, _, _)| p == peer).count();
                if busy >= NODE_REQUESTS_PER_PEER_MAX {
                    break;
                }
                let hashes: Vec<NodeHash> = self
                    .wanted
                    .iter()
                    .filter(|h| !self.lacks.contains(&(peer.clone(), **h)))
                    .take(NODES_PER_FETCH)
                    .copied()
                    .collect();
                if hashes.is_empty() {
                    break;
                }
                let req = next_req();
                for h in &hashes {
                    self.wanted.remove(h);
                    self.requested.insert(*h, req);
                }
                self.in_flight.insert(req, (peer.clone(), hashes.clone(), now));
                out.push(FetchOut::Nodes { peer: peer.clone(), req, hashes, descendants_max: self.descendants_max });
            }
        }
        out
    }

    /// Nodes answered for request `req` (one entry per requested hash; `None` = the peer does not hold it), and
    /// the descendants it sent with them (breadth first). A descendant is taken only if a verified node named it
    /// and it is still wanted (or asked of someone else); anything else it sent is ignored.
    pub fn on_nodes(
        &mut self,
        req: ReqId,
        nodes: Vec<Option<Vec<u8>>>,
        descendants: Vec<Vec<u8>>,
        source: &impl NodeSource,
    ) -> Result<Vec<FetchOut<P>>, SourceError> {
        let Some((peer, hashes, _)) = self.in_flight.remove(&req) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let mut answers = nodes.into_iter();
        for hash in hashes {
            // A hash may have arrived meanwhile as another answer's descendant: then it is no longer this request's.
            let ours = self.requested.get(&hash) == Some(&req);
            if ours {
                self.requested.remove(&hash);
            }
            match answers.next().flatten() {
                Some(bytes) => {
                    self.bytes_received += bytes.len() as u64;
                    match verify_node(&hash, &bytes) {
                        Ok(node) => self.accept(hash, bytes, &node, source, &mut out)?,
                        Err(_) => {
                            out.push(FetchOut::Corrupt { peer: peer.clone() });
                            self.lacks.insert((peer.clone(), hash));
                            if ours {
                                self.wanted.insert(hash);
                            }
                        }
                    }
                }
                None => {
                    self.lacks.insert((peer.clone(), hash));
                    if ours {
                        self.wanted.insert(hash);
                    }
                }
            }
        }
        for bytes in descendants {
            self.bytes_received += bytes.len() as u64;
            let hash = NodeHash::of(&bytes);
            if !self.wanted.contains(&hash) && !self.requested.contains_key(&hash) {
                continue;
            }
            match verify_node(&hash, &bytes) {
                Ok(node) => {
                    self.wanted.remove(&hash);
                    self.requested.remove(&hash);
                    self.accept(hash, bytes, &node, source, &mut out)?;
                }
                // Bytes that hash to a node a verified parent names but do not decode: the publisher's tree is
                // broken there, or the peer found a collision; either way this peer's answer is not used.
                Err(_) => out.push(FetchOut::Corrupt { peer: peer.clone() }),
            }
        }
        Ok(out)
    }

    /// A delta answered for request `req` (`None` = the peer does not hold it).
    pub fn on_delta(
        &mut self,
        req: ReqId,
        bytes: Option<Vec<u8>>,
        source: &impl NodeSource,
    ) -> Result<Vec<FetchOut<P>>, SourceError> {
        let DeltaState::InFlight { hash, base, req: expected } = self.delta else { return Ok(Vec::new()) };
        if req != expected {
            return Ok(Vec::new());
        }
        let Some((peer, _, _)) = self.in_flight.remove(&req) else { return Ok(Vec::new()) };
        let Some(bytes) = bytes else {
            // Ask another peer; once none is left, `pump` falls back to nodes.
            self.delta_lacks.insert(peer);
            self.delta = DeltaState::Wanted { hash, base };
            return Ok(Vec::new());
        };
        self.bytes_received += bytes.len() as u64;
        let mut out = Vec::new();
        if DeltaHash::of(&bytes) != hash {
            out.push(FetchOut::Corrupt { peer: peer.clone() });
            self.delta_lacks.insert(peer);
            self.delta = DeltaState::Wanted { hash, base };
            return Ok(out);
        }
        self.delta = DeltaState::None;
        let applied = ManifestDelta::decode(&bytes).ok().and_then(|delta| {
            let mut overlay = Overlay::new(source);
            match delta.apply(&base, source, &mut overlay) {
                Ok(root) if root == self.root => Some(overlay.added),
                _ => None,
            }
        });
        let Some(added) = applied else {
            out.push(FetchOut::DeltaRejected);
            self.wanted.insert(self.root);
            return Ok(out);
        };
        out.push(FetchOut::StoreDelta(hash, bytes));
        // The rebuilt nodes are verified (they hash to the signed root); feed them through the same bottom-up
        // bookkeeping as fetched ones, parents before children so every node finds its pending parent.
        let mut added: Vec<(NodeHash, Vec<u8>)> = added.into_iter().collect();
        added.sort_by_key(|(h, _)| *h);
        let mut by_hash: BTreeMap<NodeHash, Vec<u8>> = added.into_iter().collect();
        let mut stack = vec![self.root];
        while let Some(hash) = stack.pop() {
            let Some(bytes) = by_hash.remove(&hash) else { continue };
            let Ok(node) = Node::decode(&bytes) else { continue };
            for child in node.children().into_iter().rev() {
                if by_hash.contains_key(&child) {
                    stack.push(child);
                }
            }
            self.wanted.remove(&hash);
            self.accept(hash, bytes, &node, source, &mut out)?;
        }
        // Nodes reachable only through children the delta left out are fetched; anything the delta rebuilt that
        // is not reachable is dropped.
        if self.wanted.is_empty() && self.requested.is_empty() && !self.stored.contains(&self.root) && !self.complete {
            self.wanted.insert(self.root);
        }
        Ok(out)
    }

    /// A request failed or timed out: its hashes are wanted again (from another peer if possible).
    pub fn on_failed(&mut self, req: ReqId) {
        let Some((peer, hashes, _)) = self.in_flight.remove(&req) else { return };
        if let DeltaState::InFlight { hash, base, req: r } = self.delta
            && r == req
        {
            self.delta_lacks.insert(peer);
            self.delta = DeltaState::Wanted { hash, base };
            return;
        }
        for hash in hashes {
            self.requested.remove(&hash);
            self.lacks.insert((peer.clone(), hash));
            self.wanted.insert(hash);
        }
    }

    /// Forgets what peers lacked once it is [`LACKS_FORGET_MS`] old, so they are asked again (called on ticks).
    pub fn forget_lacks(&mut self, now: Mono) {
        if self.lacks.is_empty() {
            self.lacks_since = None;
            return;
        }
        match self.lacks_since {
            None => self.lacks_since = Some(now),
            Some(since) if now.millis_since(since) >= LACKS_FORGET_MS => {
                self.lacks.clear();
                self.lacks_since = None;
            }
            Some(_) => {}
        }
    }

    /// Requests overdue at `now`.
    pub fn overdue(&self, now: Mono) -> Vec<(P, ReqId)> {
        self.in_flight
            .iter()
            .filter(|(_, (_, _, at))| now.millis_since(*at) > METADATA_TIMEOUT_MS)
            .map(|(req, (peer, _, _))| (peer.clone(), *req))
            .collect()
    }

    /// A peer went away: forget what it lacked (it may come back with more) and fail its requests.
    pub fn on_peer_gone(&mut self, peer: &P) {
        let reqs: Vec<ReqId> = self.in_flight.iter().filter(|(_, (p, _, _))| p == peer).map(|(r, _)| *r).collect();
        for req in reqs {
            self.on_failed(req);
        }
        self.lacks.retain(|(p, _)| p != peer);
        self.delta_lacks.remove(peer);
    }

    /// Whether some wanted hash has no peer left to ask among `peers`.
    pub fn stuck(&self, peers: &[P]) -> bool {
        self.requested.is_empty()
            && self.in_flight.is_empty()
            && !self.wanted.is_empty()
            && self.wanted.iter().all(|h| peers.iter().all(|p| self.lacks.contains(&(p.clone(), *h))))
    }

    fn accept(
        &mut self,
        hash: NodeHash,
        bytes: Vec<u8>,
        node: &Node,
        source: &impl NodeSource,
        out: &mut Vec<FetchOut<P>>,
    ) -> Result<(), SourceError> {
        if self.stored.contains(&hash) || self.pending.contains_key(&hash) || self.pending.len() >= PENDING_NODES_MAX {
            return Ok(());
        }
        let parents = self.waiting_parents.remove(&hash).unwrap_or_default();
        let mut missing = 0;
        for child in node.children() {
            if self.stored.contains(&child) || source.has_node(&child)? {
                continue;
            }
            missing += 1;
            // A pending child notifies its waiting parents when it completes.
            self.waiting_parents.entry(child).or_default().push(hash);
            if !self.pending.contains_key(&child) && !self.requested.contains_key(&child) {
                self.wanted.insert(child);
            }
        }
        self.pending.insert(hash, Pending { bytes, missing, parents });
        if missing == 0 {
            let mut batch = Vec::new();
            self.complete_node(hash, &mut batch);
            out.push(FetchOut::Store(batch));
        }
        Ok(())
    }

    /// Marks `hash` complete, appends it to `batch`, and completes parents that were waiting only for it.
    fn complete_node(&mut self, hash: NodeHash, batch: &mut Vec<(NodeHash, Vec<u8>)>) {
        let mut ready = vec![hash];
        while let Some(hash) = ready.pop() {
            let Some(pending) = self.pending.remove(&hash) else { continue };
            batch.push((hash, pending.bytes));
            self.stored.insert(hash);
            if hash == self.root {
                self.complete = true;
            }
            let mut parents = pending.parents;
            parents.extend(self.waiting_parents.remove(&hash).unwrap_or_default());
            for parent in parents {
                if let Some(p) = self.pending.get_mut(&parent) {
                    p.missing = p.missing.saturating_sub(1);
                    if p.missing == 0 {
                        ready.push(parent);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_that_lacked_a_node_are_asked_again_once_the_lack_is_old() {
        let root = NodeHash::of(b"a manifest node");
        let mut fetch = ManifestFetch::<u8>::resume(root);
        fetch.wanted.insert(root);
        let mut n = 0;
        let mut next = || {
            n += 1;
            ReqId(n)
        };
        let t0 = Mono(1_000_000);
        let first = fetch.pump(t0, &[7], &mut next);
        let [FetchOut::Nodes { req, .. }] = first.as_slice() else { panic!("one request: {first:?}") };
        // The only peer times out: nobody is left to ask...
        fetch.on_failed(*req);
        assert!(fetch.pump(t0, &[7], &mut next).is_empty());
        fetch.forget_lacks(t0);
        fetch.forget_lacks(t0.plus_ms(LACKS_FORGET_MS - 1));
        assert!(fetch.pump(t0.plus_ms(LACKS_FORGET_MS - 1), &[7], &mut next).is_empty());
        // ...until the lack is old enough to be forgotten.
        fetch.forget_lacks(t0.plus_ms(LACKS_FORGET_MS));
        let again = fetch.pump(t0.plus_ms(LACKS_FORGET_MS), &[7], &mut next);
        assert!(matches!(again.as_slice(), [FetchOut::Nodes { peer: 7, hashes, .. }] if hashes == &vec![root]));
    }
}
