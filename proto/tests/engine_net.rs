//! The sync engine across a small in-process network: engines exchange messages through a FIFO queue with instant
//! delivery, virtual time advances 50 ms per idle round. Checks convergence, origin load, delta use, late joiners,
//! bans of corrupt and lying peers, forged and rolled-back roots, and determinism.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use mirrormesh_proto::chunk::{ChunkId, chunk_range};
use mirrormesh_proto::control::{Have, Hello, NODES_RESPONSE_BYTES_MAX};
use mirrormesh_proto::delta::{DeltaHash, ManifestDelta};
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::node_store::descendants;
use mirrormesh_proto::root::{DeltaRef, RootBody, RootError, SignedRoot, publisher_key};
use mirrormesh_proto::sync::driver::{Host, step};
use mirrormesh_proto::sync::removals::removal_due;
use mirrormesh_proto::sync::scheduler::{BanReason, ChunkOutcome, SchedulerLimits};
use mirrormesh_proto::sync::seeder::{SeederLimits, ServeDecision};
use mirrormesh_proto::sync::{
    APPLY_RETRY_FIRST_MS, APPLY_RETRY_MAX_MS, ApplyFailure, ChunkSet, Engine, EngineConfig, IndexNames, Input,
    LOCAL_FAILURE_BACKOFF_FIRST_MS, LOCAL_FAILURE_BACKOFF_MAX_MS, Notice, Output, PlanJob, REPUBLISH_RETRY_MS, ReqId,
    Role, RootVia, SyncPhase,
};
use mirrormesh_proto::tree::TreeDir;
use mirrormesh_proto::{Mono, Now, RepoId, Timestamp};
use support::*;

const SECRET: [u8; 32] = [5; 32];
const ORIGIN: u32 = 0;

#[derive(Default)]
struct Node {
    engine: Option<Engine<u32>>,
    /// `Output::Republish`es seen.
    republish_asked: u32,
    nodes: Nodes,
    deltas: HashMap<DeltaHash, Vec<u8>>,
    chunks: BTreeSet<ChunkId>,
    applied: Option<NodeHash>,
    corrupt: bool,
    liar: bool,
    /// Claims in its hellos to hold the newest snapshot completely.
    claims_complete: bool,
    /// How it answers chunk requests instead of serving them (it syncs honestly for itself).
    chunk_lie: Option<ChunkLie>,
    /// Chunks it asked the origin for, and other peers.
    asked_of_origin: u64,
    /// Deltas it asked the origin for.
    deltas_asked_of_origin: u64,
    asked_of_peers: u64,
    /// When it last applied a snapshot.
    applied_at: Option<Timestamp>,
    /// Applies of these snapshots fail (with the count of failures still to come before one succeeds).
    apply_fails: BTreeMap<u64, u32>,
    /// Every `Apply` it was asked for: (when, snapshot).
    apply_attempts: Vec<(Timestamp, u64)>,
    /// Paths the applied snapshots no longer name, with when they are due to go (the served tree keeps them until).
    pending_removals: BTreeMap<String, Timestamp>,
    /// Removal runs asked for (the wall clock's time then), and the paths each removed.
    removal_runs: Vec<(Timestamp, usize)>,
    bans: Vec<(u32, BanReason)>,
    notices: Vec<Notice<u32>>,
    bytes_from_peers: u64,
    bytes_from_origin: u64,
    /// It cannot keep the chunks it fetches (a full disk): each arrives, and is reported dropped.
    store_fails: bool,
    /// When it sent chunk requests to the origin (the network's time).
    origin_fetch_times: Vec<u64>,
    /// `Plan` jobs are kept here instead of run at once (as a daemon's blocking thread may take its time).
    held_plans: Option<Vec<PlanJob>>,
}

/// A peer's answer to every chunk request, whatever it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkLie {
    /// `Elsewhere`, naming the origin (only an origin may redirect).
    Elsewhere,
    /// Never answers (the request times out).
    Stall,
    /// Gives no data-plane address: every request to it fails at once.
    NoDataAddr,
}

enum Msg {
    Hello {
        from: u32,
        to: u32,
        hello: Hello,
        reply: bool,
    },
    Have {
        from: u32,
        to: u32,
        have: Have,
    },
    Root {
        from: u32,
        to: u32,
        root: SignedRoot,
    },
    GetNodes {
        from: u32,
        to: u32,
        req: ReqId,
        hashes: Vec<NodeHash>,
        descendants_max: u16,
    },
    GetDelta {
        from: u32,
        to: u32,
        req: ReqId,
        hash: DeltaHash,
    },
    GetChunks {
        from: u32,
        to: u32,
        req: ReqId,
        chunks: Vec<ChunkId>,
    },
    /// A lying peer's answer to a chunk request (delivered a round after the request, like a round trip).
    Lie {
        from: u32,
        to: u32,
        req: ReqId,
        chunks: Vec<ChunkId>,
        lie: ChunkLie,
    },
}

struct Net {
    nodes: BTreeMap<u32, Node>,
    links: BTreeSet<(u32, u32)>,
    queue: VecDeque<Msg>,
    /// Delivered in the next round.
    later: Vec<Msg>,
    now: Timestamp,
    sizes: HashMap<ChunkId, u64>,
    seq: u64,
    tree: TreeDir,
    root: Option<NodeHash>,
    /// Every output, for the determinism check.
    trace: blake3::Hasher,
    lies_max: u32,
    /// When the newest snapshot was published.
    published_at: Timestamp,
    /// How far the nodes' wall clock is off the network's time (a step of the system clock); their monotonic clock
    /// never steps.
    wall_step_ms: i64,
}

/// How long after an apply the files it no longer names are removed (the daemon's `repo.delete_grace_secs`).
const DELETE_GRACE_MS: u64 = 300_000;

/// The origin asks for a re-signed root once its root has less than this left (half the day roots are signed for).
const RESIGN_BEFORE_EXPIRY_MS: u64 = 43_200_000;

fn repo() -> RepoId {
    RepoId::new("alpine").unwrap()
}

impl Net {
    fn new(mirrors: u32) -> Self {
        let mut net = Net {
            nodes: BTreeMap::new(),
            links: BTreeSet::new(),
            queue: VecDeque::new(),
            later: Vec::new(),
            now: Timestamp(1_800_000_000_000),
            sizes: HashMap::new(),
            seq: 0,
            tree: TreeDir::default(),
            root: None,
            trace: blake3::Hasher::new(),
            lies_max: 16,
            published_at: Timestamp(0),
            wall_step_ms: 0,
        };
        for id in 0..=mirrors {
            net.add_node(id);
        }
        net
    }

    fn add_node(&mut self, id: u32) {
        let cfg = EngineConfig {
            repo: repo(),
            role: if id == ORIGIN { Role::Origin } else { Role::Mirror },
            trusted: vec![publisher_key(&SECRET)],
            origins: [ORIGIN].into_iter().collect(),
            salt: u64::from(id) * 0x9e37_79b9,
            scheduler: SchedulerLimits { lies_max: self.lies_max, ..SchedulerLimits::default() },
            seeder: SeederLimits::default(),
            have_flush_ms: mirrormesh_proto::sync::HAVE_FLUSH_MS,
            resign_before_expiry_ms: (id == ORIGIN).then_some(RESIGN_BEFORE_EXPIRY_MS),
            index_names: IndexNames::exact(&["APKINDEX.tar.gz"]),
        };
        self.nodes.insert(id, Node { engine: Some(Engine::new(cfg, None, None)), ..Node::default() });
    }

    fn node(&mut self, id: u32) -> &mut Node {
        self.nodes.get_mut(&id).expect("node exists")
    }

    fn applied(&self, id: u32) -> Option<NodeHash> {
        self.nodes[&id].applied
    }

    fn connect(&mut self, a: u32, b: u32) {
        self.links.insert((a.min(b), a.max(b)));
        let now = self.now;
        let _ = now;
        for (x, y) in [(a, b), (b, a)] {
            self.call(x, Input::PeerConnected(y));
            if self.node(x).liar {
                // Claims every chunk right away (the Have handler swaps in the full list).
                let have = Have { repo: repo(), seq: self.seq, complete_seq: None, chunks: Vec::new() };
                self.queue.push_back(Msg::Have { from: x, to: y, have });
            }
        }
    }

    fn connected(&self, a: u32, b: u32) -> bool {
        self.links.contains(&(a.min(b), a.max(b)))
    }

    /// The origin publishes the current tree (with a delta against the previous snapshot when there is one).
    fn publish(&mut self) -> SignedRoot {
        let now = self.now;
        let origin = self.nodes.get_mut(&ORIGIN).unwrap();
        let mut tree = self.tree.clone();
        let root = tree.build(&mut origin.nodes).unwrap();
        let (everything, _) = diff(&origin.nodes, None, &root).unwrap();
        let mut snapshot = Vec::new();
        for change in &everything {
            if let Some(EntryKind::File(meta)) = change.new.as_ref().map(|e| &e.kind) {
                for (i, id) in meta.chunks.iter().enumerate() {
                    self.sizes.insert(*id, chunk_range(meta.size, i as u64).unwrap().1);
                    origin.chunks.insert(*id);
                    snapshot.push(*id);
                }
            }
        }
        let delta = self.root.map(|base| {
            let (changes, _) = diff(&origin.nodes, Some(&base), &root).unwrap();
            let bytes = ManifestDelta::from_changes(base, root, &changes).encode();
            let hash = DeltaHash::of(&bytes);
            origin.deltas.insert(hash, bytes.clone());
            DeltaRef { base_seq: self.seq, base_root: base, hash, len: bytes.len() as u32 }
        });
        self.seq += 1;
        let body = RootBody {
            repo: repo(),
            seq: self.seq,
            created: now,
            expires: now.plus_ms(86_400_000),
            root,
            files: 0,
            bytes: 0,
            delta,
        };
        let signed = SignedRoot::sign(&SECRET, &body);
        origin.applied = Some(root);
        self.root = Some(root);
        self.published_at = now;
        self.call(ORIGIN, Input::Published { root: signed.clone(), chunks: ChunkSet::new(snapshot) });
        signed
    }

    /// The nodes' two clocks: the monotonic one counts the network's milliseconds, the wall clock too unless it
    /// was stepped (`wall_step_ms`).
    fn clock(&self) -> Now {
        Now { mono: Mono(self.now.0), wall: Timestamp(self.now.0.saturating_add_signed(self.wall_step_ms)) }
    }

    /// Hands `input` to node `id`'s engine through the one driver, this network as its host.
    fn call(&mut self, id: u32, input: Input<u32>) {
        let now = self.clock();
        step(&mut NetHost { net: self, id }, now, input).unwrap();
    }

    /// Carries out one output of node `id`; stages and applies at once, answering with the inputs.
    fn execute(&mut self, id: u32, now: Now, out: Output<u32>) -> Vec<Input<u32>> {
        self.trace.update(format!("{id} {out:?}").as_bytes());
        let connected: Vec<u32> = self.nodes.keys().copied().filter(|&p| p != id && self.connected(id, p)).collect();
        let node = self.nodes.get_mut(&id).unwrap();
        match out {
            Output::Gossip(root) => {
                for to in connected {
                    self.queue.push_back(Msg::Root { from: id, to, root: root.clone() });
                }
            }
            Output::SendHello(to, hello) => self.queue.push_back(Msg::Hello { from: id, to, hello, reply: false }),
            Output::SendHave(to, have) => self.queue.push_back(Msg::Have { from: id, to, have }),
            Output::FetchNodes { peer, req, hashes, descendants_max } => {
                self.queue.push_back(Msg::GetNodes { from: id, to: peer, req, hashes, descendants_max })
            }
            Output::FetchDelta { peer, req, hash } => {
                self.queue.push_back(Msg::GetDelta { from: id, to: peer, req, hash })
            }
            Output::StoreNodes(nodes) => node.nodes.extend(nodes),
            Output::StoreDelta(hash, bytes) => {
                node.deltas.insert(hash, bytes);
            }
            Output::PersistRoot(_) => {}
            Output::Plan(job) => match &mut node.held_plans {
                Some(held) => held.push(job),
                None => return vec![Input::Planned(job.run(&node.nodes))],
            },
            Output::Stage { seq, files } => {
                let held: Vec<ChunkId> = files
                    .iter()
                    .flat_map(|f| f.meta.chunks.iter())
                    .filter(|c| node.chunks.contains(c))
                    .copied()
                    .collect();
                return vec![Input::Staged { seq, held }];
            }
            Output::FetchChunks { peer, req, chunks } => {
                if peer == ORIGIN {
                    node.asked_of_origin += chunks.len() as u64;
                    node.origin_fetch_times.push(now.mono.0);
                } else {
                    node.asked_of_peers += chunks.len() as u64;
                }
                self.queue.push_back(Msg::GetChunks { from: id, to: peer, req, chunks })
            }
            Output::Cancel { .. } => {}
            Output::Apply { target, plan } => {
                let seq = target.body.seq;
                // The network's time (the wall clock may have been stepped).
                node.apply_attempts.push((Timestamp(now.mono.0), seq));
                if let Some(left) = node.apply_fails.get_mut(&seq)
                    && *left > 0
                {
                    *left -= 1;
                    return vec![Input::ApplyFailed { seq, failure: ApplyFailure::NoSpace }];
                }
                node.applied = Some(target.body.root);
                node.applied_at = Some(Timestamp(now.mono.0));
                // As the tree writer does: what the plan removes is recorded pending, due after the grace period.
                let due = removal_due(now.wall, DELETE_GRACE_MS);
                let removed: Vec<String> = plan.removals().map(str::to_owned).collect();
                let scheduled = (!removed.is_empty()).then_some(due);
                node.pending_removals.extend(removed.into_iter().map(|p| (p, due)));
                let pending = node.pending_removals.len() as u64;
                return vec![Input::RemovalsScheduled { due: scheduled, pending }, Input::Applied { seq }];
            }
            Output::RemoveDue { now: at } => {
                let before = node.pending_removals.len();
                node.pending_removals.retain(|_, due| *due > at);
                node.removal_runs.push((at, before - node.pending_removals.len()));
                let left = node.pending_removals.values().min().copied();
                return vec![Input::RemovalsDone {
                    left: Some(left),
                    pending: Some(node.pending_removals.len() as u64),
                }];
            }
            Output::Ban { peer, reason, .. } => node.bans.push((peer, reason)),
            Output::Unban { .. } => {}
            Output::Republish => node.republish_asked += 1,
            Output::Notice(notice) => node.notices.push(notice),
        }
        Vec::new()
    }

    fn deliver(&mut self, msg: Msg) {
        let now = self.now;
        let (from, to) = match &msg {
            Msg::Hello { from, to, .. }
            | Msg::Have { from, to, .. }
            | Msg::Root { from, to, .. }
            | Msg::GetNodes { from, to, .. }
            | Msg::GetDelta { from, to, .. }
            | Msg::GetChunks { from, to, .. }
            | Msg::Lie { from, to, .. } => (*from, *to),
        };
        if !self.connected(from, to) {
            return;
        }
        match msg {
            Msg::Hello { mut hello, reply, .. } => {
                if self.node(from).claims_complete {
                    hello.complete_seq = Some(self.seq);
                }
                self.call(to, Input::Hello { from, hello });
                if !reply {
                    let answer = self.node(to).engine.as_ref().unwrap().hello();
                    self.queue.push_back(Msg::Hello { from: to, to: from, hello: answer, reply: true });
                }
            }
            Msg::Have { mut have, .. } => {
                if self.node(from).liar {
                    have.chunks = self.sizes.keys().copied().collect();
                    have.chunks.sort();
                }
                self.call(to, Input::Have { from, have });
            }
            Msg::Root { root, .. } => {
                self.call(to, Input::Root { via: RootVia::Gossip(from), root });
            }
            Msg::GetNodes { req, hashes, descendants_max, .. } => {
                let store = &self.node(to).nodes;
                let answer: Vec<Option<Vec<u8>>> = hashes.iter().map(|h| store.get(h).cloned()).collect();
                let answered: Vec<&[u8]> = answer.iter().flatten().map(Vec::as_slice).collect();
                let descendants =
                    descendants(store, &answered, usize::from(descendants_max), NODES_RESPONSE_BYTES_MAX).unwrap();
                self.call(from, Input::Nodes { from: to, req, nodes: answer, descendants });
            }
            Msg::GetDelta { req, hash, .. } => {
                if to == ORIGIN {
                    self.node(from).deltas_asked_of_origin += 1;
                }
                let answer = self.node(to).deltas.get(&hash).cloned();
                self.call(from, Input::Delta { from: to, req, delta: answer });
            }
            Msg::GetChunks { req, chunks, .. } => {
                if let Some(lie) = self.node(to).chunk_lie {
                    if lie != ChunkLie::Stall {
                        self.later.push(Msg::Lie { from: to, to: from, req, chunks, lie });
                    }
                    return;
                }
                let mut bytes = 0;
                for id in chunks {
                    let size = self.sizes[&id];
                    let server = self.node(to);
                    let decision = server.engine.as_mut().unwrap().serve_decision(Mono(now.0), &from, &id);
                    let outcome = match decision {
                        ServeDecision::Elsewhere(peers) => ChunkOutcome::Elsewhere(peers),
                        ServeDecision::Refuse => ChunkOutcome::Missing,
                        ServeDecision::Serve if !server.chunks.contains(&id) => ChunkOutcome::Missing,
                        ServeDecision::Serve if server.corrupt => ChunkOutcome::Corrupt,
                        ServeDecision::Serve => {
                            let client = self.node(from);
                            if to == ORIGIN {
                                client.bytes_from_origin += size;
                            } else {
                                client.bytes_from_peers += size;
                            }
                            if client.store_fails {
                                ChunkOutcome::Dropped
                            } else {
                                bytes += size;
                                client.chunks.insert(id);
                                ChunkOutcome::Verified
                            }
                        }
                    };
                    self.call(from, Input::Chunk { from: to, req, id, outcome });
                }
                self.call(from, Input::ChunksDone { from: to, req, bytes });
            }
            Msg::Lie { req, chunks, lie, .. } => {
                // `from` is the liar, `to` the asker.
                match lie {
                    ChunkLie::Stall => {}
                    // What the shell does when it knows no address: the request fails before anything is sent.
                    ChunkLie::NoDataAddr => self.call(to, Input::ChunksFailed { from, req }),
                    ChunkLie::Elsewhere => {
                        for id in chunks {
                            let outcome = ChunkOutcome::Elsewhere(vec![ORIGIN]);
                            self.call(to, Input::Chunk { from, req, id, outcome });
                        }
                        self.call(to, Input::ChunksDone { from, req, bytes: 0 });
                    }
                }
            }
        }
    }

    /// Runs until nothing is queued and no engine wants more, or `rounds` idle rounds pass.
    fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.queue.extend(std::mem::take(&mut self.later));
            while let Some(msg) = self.queue.pop_front() {
                self.deliver(msg);
            }
            self.now = self.now.plus_ms(50);
            // Each engine runs when it asked to, and only then.
            let mono = self.clock().mono;
            let due: Vec<u32> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.engine.as_ref().and_then(Engine::poll_timeout).is_some_and(|at| at <= mono))
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                self.call(id, Input::Timeout);
            }
            if self.queue.is_empty() && self.later.is_empty() && self.converged() {
                return;
            }
        }
    }

    fn converged(&self) -> bool {
        self.nodes
            .iter()
            .all(|(id, n)| *id == ORIGIN || n.corrupt || n.liar || n.chunk_lie.is_some() || n.applied == self.root)
    }

    fn origin_bytes(&self) -> u64 {
        self.nodes.values().map(|n| n.bytes_from_origin).sum()
    }

    fn tree_bytes(&self) -> u64 {
        self.tree.totals().bytes
    }
}

/// A tree of `files` packages with a realistic spread of sizes (some span several chunks).
fn packages(tree: &mut TreeDir, files: u64, version: u64) {
    for i in 0..files {
        let size = match i % 10 {
            0 => 3_500_000 + i * 1000,
            1..=3 => 400_000 + i * 100,
            _ => 20_000 + i * 10,
        };
        tree.insert_file(
            &format!("alpine/edge/main/x86_64/pkg{i:04}-1.{version}-r0.apk"),
            file(size, version << 32 | i),
        )
        .unwrap();
    }
}

/// An origin and `mirrors` mirrors, all connected, that applied a first snapshot of `files` packages.
fn synced(mirrors: u32, files: u64) -> Net {
    let mut net = Net::new(mirrors);
    packages(&mut net.tree, files, 0);
    net.publish();
    full_mesh(&mut net);
    net.run(400);
    assert!(net.converged(), "every mirror applies the first snapshot");
    net
}

fn full_mesh(net: &mut Net) {
    let ids: Vec<u32> = net.nodes.keys().copied().collect();
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            net.connect(*a, *b);
        }
    }
}

#[test]
fn four_mirrors_sync_and_update_with_one_origin_copy() {
    let mut net = Net::new(4);
    packages(&mut net.tree, 120, 0);
    net.publish();
    full_mesh(&mut net);
    net.run(400);
    assert!(net.converged(), "all mirrors apply the first snapshot");
    let ratio = net.origin_bytes() as f64 / net.tree_bytes() as f64;
    println!("initial: origin sent {:.3} x tree bytes", ratio);
    assert!(ratio <= 1.10, "origin sent {ratio:.3} x the tree");
    for id in 1..=4 {
        assert!(net.node(id).bytes_from_peers > 0, "mirror {id} fetched from peers too");
    }

    // An update: 12 packages rebuilt (new file, old one removed).
    let before = net.origin_bytes();
    let mut update_bytes = 0;
    for i in (0..120).step_by(10) {
        let dir = net.tree.dir_mut("alpine/edge/main/x86_64").unwrap();
        dir.entries.retain(|e| e.name != format!("pkg{i:04}-1.0-r0.apk"));
        let meta = file(3_000_000 + i * 7, 1 << 40 | i);
        update_bytes += meta.size;
        net.tree.insert_file(&format!("alpine/edge/main/x86_64/pkg{i:04}-1.1-r0.apk"), meta).unwrap();
    }
    net.publish();
    net.run(400);
    assert!(net.converged(), "all mirrors apply the update");
    let ratio = (net.origin_bytes() - before) as f64 / update_bytes as f64;
    println!("update: origin sent {:.3} x update bytes", ratio);
    assert!(ratio <= 1.10, "origin sent {ratio:.3} x the update");
    for id in 1..=4 {
        let n = net.node(id);
        assert!(!n.notices.contains(&Notice::DeltaRejected), "mirror {id} used the delta");
        assert!(n.notices.contains(&Notice::SyncComplete { seq: 2 }));
    }

    // A mirror that joins late gets everything from peers.
    net.add_node(9);
    let before = net.origin_bytes();
    for id in 0..=4 {
        net.connect(9, id);
    }
    net.run(400);
    assert_eq!(net.applied(9), net.root, "the late joiner converges");
    assert_eq!(net.origin_bytes(), before, "and costs the origin nothing");
}

#[test]
fn a_corrupt_peer_is_banned_and_the_sync_completes() {
    let mut net = Net::new(4);
    packages(&mut net.tree, 60, 0);
    net.publish();
    // Mirror 1 gets the snapshot first, then turns bad.
    net.connect(0, 1);
    net.run(200);
    assert_eq!(net.applied(1), net.root);
    net.node(1).corrupt = true;
    full_mesh(&mut net);
    net.run(400);
    for id in 2..=4 {
        assert_eq!(net.applied(id), net.root, "mirror {id} converges");
        let n = net.node(id);
        assert!(n.bans.contains(&(1, BanReason::CorruptChunk)), "mirror {id} banned the corrupt peer: {:?}", n.bans);
    }
}

/// Two honest mirrors and mirror 3, made a liar by `lie`, sync in a full mesh; both honest mirrors converge and ban
/// the liar.
fn sync_beside_a_liar(lie: impl FnOnce(&mut Node)) -> Net {
    let mut net = Net::new(3);
    net.lies_max = 3;
    net.nodes.clear();
    for id in 0..=3 {
        net.add_node(id);
    }
    packages(&mut net.tree, 60, 0);
    net.publish();
    lie(net.node(3));
    full_mesh(&mut net);
    net.run(400);
    for id in 1..=2 {
        assert_eq!(net.applied(id), net.root, "mirror {id} converges");
        let n = net.node(id);
        assert!(n.bans.contains(&(3, BanReason::FalseHave)), "mirror {id} banned the liar: {:?}", n.bans);
    }
    net
}

#[test]
fn a_peer_lying_about_what_it_holds_is_banned() {
    sync_beside_a_liar(|n| n.liar = true);
}

#[test]
fn a_peer_claiming_a_snapshot_it_still_downloads_gets_nothing_from_the_origin() {
    let mut net = sync_beside_a_liar(|n| n.claims_complete = true);
    let refused = net.node(ORIGIN).engine.as_ref().unwrap().seeder_counts().refused;
    println!("the origin refused the liar {refused} chunks");
    assert!(refused > 0, "the liar asked the origin for chunks");
    assert_eq!(net.node(3).bytes_from_origin, 0, "the origin served the liar");
    let ratio = net.origin_bytes() as f64 / net.tree_bytes() as f64;
    assert!(ratio <= 1.05, "origin sent {ratio:.3} x the tree");
}

/// Two honest mirrors sync beside mirror 3, which claims in its hellos to hold the snapshot completely and answers
/// every chunk request with `lie`; runs for up to 600 virtual seconds and prints what each honest mirror did.
/// An origin, two honest mirrors and mirror 3, which claims the snapshot and lies about chunks by `lie`, in a full
/// mesh, with a snapshot of 60 packages just published.
fn beside_a_claimed_holder(lie: ChunkLie) -> Net {
    let mut net = Net::new(3);
    packages(&mut net.tree, 60, 0);
    net.publish();
    let liar = net.node(3);
    liar.claims_complete = true;
    liar.chunk_lie = Some(lie);
    full_mesh(&mut net);
    net
}

fn sync_beside_a_claimed_holder(lie: ChunkLie) -> Net {
    let mut net = beside_a_claimed_holder(lie);
    net.run(12_000);
    let published = net.published_at;
    for id in 1..=2 {
        let n = &net.nodes[&id];
        let took = n.applied_at.map(|t| t.millis_since(published) as f64 / 1000.0);
        println!(
            "{lie:?}: mirror {id} applied: {}, after {took:?} s; chunks asked of the origin {}, of peers {}; bans {:?}",
            n.applied.is_some(),
            n.asked_of_origin,
            n.asked_of_peers,
            n.bans
        );
    }
    let ratio = net.origin_bytes() as f64 / net.tree_bytes() as f64;
    println!("{lie:?}: the origin sent {ratio:.3} x the tree");
    for id in 1..=2 {
        let n = &net.nodes[&id];
        assert!(
            n.applied == net.root,
            "mirror {id} not applied after 600 virtual seconds; {} chunks asked of the origin, {} of peers",
            n.asked_of_origin,
            n.asked_of_peers
        );
        let took = n.applied_at.map_or(u64::MAX, |t| t.millis_since(published));
        // Within two of the claimers' stall allowances (the silent claimer's case; the others are found out at once).
        let allowed = 2 * SchedulerLimits::default().holds_all_stall_ms;
        assert!(took <= allowed, "mirror {id} applied after {took} ms, more than {allowed}");
        assert!(n.asked_of_origin > 0, "mirror {id} asked the origin for nothing");
    }
    // Each chunk left the origin about once (the liar gets nothing from it: it claims the snapshot).
    assert!(ratio <= 1.10, "the origin sent {ratio:.3} x the tree");
    assert_eq!(net.nodes[&3].bytes_from_origin, 0);
    net
}

#[test]
fn a_peer_claiming_the_snapshot_that_redirects_every_request_does_not_stop_the_sync() {
    let net = sync_beside_a_claimed_holder(ChunkLie::Elsewhere);
    for id in 1..=2 {
        let bans = &net.nodes[&id].bans;
        assert!(bans.contains(&(3, BanReason::FalseHave)), "mirror {id} banned the liar: {bans:?}");
    }
}

#[test]
fn a_peer_claiming_the_snapshot_that_never_answers_does_not_stop_the_sync() {
    let net = sync_beside_a_claimed_holder(ChunkLie::Stall);
    for id in 1..=2 {
        // The origin is asked once the claimer stayed silent for the allowance, before any request to it timed out.
        let took = net.nodes[&id].applied_at.map_or(u64::MAX, |t| t.millis_since(net.published_at));
        let stall = SchedulerLimits::default().holds_all_stall_ms;
        assert!(took < SchedulerLimits::default().request_timeout_base_ms, "mirror {id} applied after {took} ms");
        assert!(took >= stall, "mirror {id} applied after {took} ms, before the stall allowance of {stall} ms");
    }
}

#[test]
fn a_wall_clock_step_moves_no_timer() {
    // The system clock steps an hour back, or an hour forward, while the mirrors wait on a silent claimer: they
    // still wait its stall allowance, no less and no more (with one clock for both, a step back stopped every
    // timer for an hour and a step forward timed out every request at once).
    let stall = SchedulerLimits::default().holds_all_stall_ms;
    for step_ms in [-3_600_000, 3_600_000] {
        let mut net = beside_a_claimed_holder(ChunkLie::Stall);
        // The root is accepted and the claimer asked (roots are checked against the wall clock, so before the step).
        net.run(4);
        assert!(net.nodes[&1].asked_of_peers > 0, "the claimer was asked");
        net.wall_step_ms = step_ms;
        net.run(12_000);
        for id in 1..=2 {
            let n = &net.nodes[&id];
            assert_eq!(n.applied, net.root, "mirror {id} applied (clock stepped by {step_ms} ms)");
            let took = n.applied_at.map_or(u64::MAX, |t| t.millis_since(net.published_at));
            println!("clock stepped by {step_ms} ms: mirror {id} applied after {took} ms (stall allowance {stall} ms)");
            assert!(took >= stall && took < 2 * stall, "mirror {id} applied after {took} ms");
        }
        // Roots still expire by the wall clock: a day later (the harness signs for a day), a new mirror refuses it.
        net.wall_step_ms = 86_400_000 + 60_000;
        net.add_node(9);
        net.connect(9, ORIGIN);
        net.run(20);
        let n = &net.nodes[&9];
        assert!(
            n.notices.iter().any(|x| matches!(x, Notice::RootRejected { error: RootError::Expired { .. }, .. })),
            "{:?}",
            n.notices
        );
        assert_eq!(n.applied, None);
    }
}

#[test]
fn a_claimer_that_stalled_holds_up_the_next_snapshot_no_more() {
    let mut net = sync_beside_a_claimed_holder(ChunkLie::Stall);
    for i in (0..60).step_by(10) {
        net.tree
            .insert_file(&format!("alpine/edge/main/x86_64/pkg{i:04}-1.1-r0.apk"), file(500_000 + i, 1 << 40 | i))
            .unwrap();
    }
    net.publish();
    // It claims the new snapshot too.
    for to in 1..=2 {
        let hello = net.node(3).engine.as_ref().unwrap().hello();
        net.queue.push_back(Msg::Hello { from: 3, to, hello, reply: true });
    }
    net.run(12_000);
    for id in 1..=2 {
        let n = &net.nodes[&id];
        let took = n.applied_at.map_or(u64::MAX, |t| t.millis_since(net.published_at));
        println!("update: mirror {id} applied after {took} ms");
        assert_eq!(n.applied, net.root, "mirror {id} applies the update");
        let stall = SchedulerLimits::default().holds_all_stall_ms;
        assert!(took < stall, "mirror {id} waited {took} ms for the claimer again");
    }
}

#[test]
fn a_peer_claiming_the_snapshot_without_a_data_address_does_not_stop_the_sync() {
    let net = sync_beside_a_claimed_holder(ChunkLie::NoDataAddr);
    for id in 1..=2 {
        let bans = &net.nodes[&id].bans;
        assert!(bans.contains(&(3, BanReason::Unresponsive)), "mirror {id} banned the peer: {bans:?}");
    }
}

/// An origin and two mirrors synced to a first snapshot of 30 packages; then a release of 6 packages is published.
#[test]
fn a_new_manifest_is_asked_of_the_origin_by_a_few_mirrors_and_of_neighbours_by_the_rest() {
    // 24 mirrors in a full mesh: each has 23 neighbours, so about 3 in 24 ask the origin for the delta at once;
    // the others wait for a neighbour's announcement that it holds the manifest (before, all 24 asked the origin).
    let mut net = synced(24, 30);
    release(&mut net, 1);
    net.run(400);
    assert!(net.converged(), "every mirror applies the release");
    let mut asked = 0;
    for id in 1..=24 {
        let n = net.node(id);
        assert!(n.notices.contains(&Notice::SyncComplete { seq: 2 }), "mirror {id}");
        assert!(!n.notices.contains(&Notice::DeltaRejected), "mirror {id} used the delta");
        asked += n.deltas_asked_of_origin;
    }
    println!("{asked} of 24 mirrors asked the origin for the delta");
    assert!((1..=8).contains(&asked), "{asked} of 24 mirrors asked the origin for the delta");
}

fn release_after_a_first_snapshot() -> Net {
    let mut net = synced(2, 30);
    release(&mut net, 1);
    net
}

/// Publishes `packages` rebuilt as version `version`.
fn release(net: &mut Net, version: u64) {
    for i in (0..30).step_by(5) {
        let meta = file(400_000 + i, version << 40 | i);
        net.tree.insert_file(&format!("alpine/edge/main/x86_64/pkg{i:04}-1.{version}-r0.apk"), meta).unwrap();
    }
    net.publish();
}

#[test]
fn a_failed_apply_is_retried_after_a_back_off_until_it_succeeds() {
    let mut net = Net::new(2);
    packages(&mut net.tree, 30, 0);
    net.node(1).apply_fails.insert(1, 2);
    net.publish();
    full_mesh(&mut net);
    // Until the first failure is answered: the status says so.
    let mut saw_retrying = false;
    for _ in 0..400 {
        net.run(1);
        let status = net.node(1).engine.as_ref().unwrap().status();
        if status.phase == SyncPhase::ApplyRetrying {
            saw_retrying = true;
            assert!(status.apply_failures >= 1 && status.apply_retry_at.is_some(), "{status:?}");
            assert_eq!(status.last_apply_failure, Some(ApplyFailure::NoSpace));
        }
        if net.converged() {
            break;
        }
    }
    let n = &net.nodes[&1];
    println!("apply attempts of mirror 1: {:?}", n.apply_attempts);
    assert!(saw_retrying, "the status showed the retry");
    assert_eq!(n.applied, net.root, "applied on the third attempt");
    let times: Vec<u64> = n.apply_attempts.iter().map(|(t, _)| t.0).collect();
    assert_eq!(times.len(), 3, "{:?}", n.apply_attempts);
    // Retried after the first back-off, then after twice as long (within a tick of 50 ms).
    let (first, second) = (times[1] - times[0], times[2] - times[1]);
    assert!((APPLY_RETRY_FIRST_MS..APPLY_RETRY_FIRST_MS + 50).contains(&first), "{first} ms");
    assert!((2 * APPLY_RETRY_FIRST_MS..2 * APPLY_RETRY_FIRST_MS + 50).contains(&second), "{second} ms");
    let status = net.nodes[&1].engine.as_ref().unwrap().status();
    assert_eq!((status.phase, status.apply_failures, status.apply_retry_at), (SyncPhase::Idle, 0, None));
}

#[test]
fn a_snapshot_that_cannot_be_applied_is_overtaken_by_a_newer_one() {
    let mut net = release_after_a_first_snapshot();
    // Snapshot 2 never applies at mirror 1; snapshot 3 arrives while it waits to retry.
    net.node(1).apply_fails.insert(2, u32::MAX);
    net.run(20);
    assert_eq!(net.node(1).apply_attempts.last().map(|a| a.1), Some(2), "snapshot 2 was tried");
    release(&mut net, 2);
    net.run(2_000);
    let n = &net.nodes[&1];
    println!("apply attempts of mirror 1: {:?}", n.apply_attempts);
    assert_eq!(n.applied, net.root, "mirror 1 applied snapshot 3");
    assert_eq!(n.apply_attempts.last().map(|a| a.1), Some(3));
    assert_eq!(net.nodes[&2].applied, net.root);
}

#[test]
fn the_apply_back_off_doubles_up_to_its_cap() {
    let mut net = release_after_a_first_snapshot();
    net.node(1).apply_fails.insert(2, u32::MAX);
    // Long enough for the back-off to reach its cap a few times.
    net.run(8_000);
    let n = &net.nodes[&1];
    let times: Vec<u64> = n.apply_attempts.iter().filter(|a| a.1 == 2).map(|(t, _)| t.0).collect();
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    println!("gaps between apply attempts (ms): {gaps:?}");
    assert!(gaps.len() >= 9, "{gaps:?}");
    let mut expected = APPLY_RETRY_FIRST_MS;
    for gap in &gaps {
        assert!((expected..expected + 50).contains(gap), "gap {gap} ms, expected {expected}: {gaps:?}");
        expected = (expected * 2).min(APPLY_RETRY_MAX_MS);
    }
    assert_eq!(*gaps.last().unwrap() / 1000, APPLY_RETRY_MAX_MS / 1000, "capped");
}

/// A mirror that cannot keep what it fetches (its disk is full) asks again after a back-off that doubles up to a
/// cap, rather than every few seconds for as long as the disk stays full (each time at the origin's expense); once
/// it can keep chunks again it completes within the cap.
#[test]
fn a_mirror_that_cannot_keep_chunks_backs_off_fetching_up_to_a_cap() {
    let mut net = Net::new(1);
    packages(&mut net.tree, 30, 0);
    net.node(1).store_fails = true;
    net.publish();
    full_mesh(&mut net);
    // Ten minutes of a full disk (rounds of 50 ms).
    net.run(12_000);
    let times = net.nodes[&1].origin_fetch_times.clone();
    let mut attempts = times.clone();
    attempts.dedup();
    let gaps: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    println!(
        "{} attempts in 10 minutes ({} MiB fetched and dropped); gaps (ms): {gaps:?}",
        attempts.len(),
        net.nodes[&1].bytes_from_origin >> 20
    );
    let mut expected = LOCAL_FAILURE_BACKOFF_FIRST_MS;
    for gap in &gaps {
        assert!((expected..expected + 100).contains(gap), "gap {gap} ms, expected {expected}: {gaps:?}");
        expected = (expected * 2).min(LOCAL_FAILURE_BACKOFF_MAX_MS);
    }
    assert!(attempts.len() <= 16, "{} attempts in 10 minutes", attempts.len());
    net.node(1).store_fails = false;
    let freed = net.now;
    net.run((LOCAL_FAILURE_BACKOFF_MAX_MS / 50 + 400) as usize);
    assert_eq!(net.nodes[&1].applied, net.root, "completed once chunks can be kept");
    let done = net.nodes[&1].applied_at.unwrap();
    assert!(done.0 - freed.0 <= LOCAL_FAILURE_BACKOFF_MAX_MS + 1_000, "{} ms after space was freed", done.0 - freed.0);
}

#[test]
fn forged_and_rolled_back_roots_are_ignored() {
    let mut net = Net::new(2);
    packages(&mut net.tree, 20, 0);
    let first = net.publish();
    packages(&mut net.tree, 25, 1);
    net.publish();
    full_mesh(&mut net);
    net.run(200);
    let good = net.root;
    assert_eq!(net.applied(1), good);

    // A root for an empty tree signed by an unknown key, and the older genuine root again.
    let now = net.now;
    let mut empty = Nodes::new();
    let evil_root = TreeDir::default().build(&mut empty).unwrap();
    let forged_body = RootBody {
        repo: repo(),
        seq: 99,
        created: now,
        expires: now.plus_ms(1000),
        root: evil_root,
        files: 0,
        bytes: 0,
        delta: None,
    };
    let forged = SignedRoot::sign(&[66; 32], &forged_body);
    net.queue.push_back(Msg::Root { from: 2, to: 1, root: forged });
    net.queue.push_back(Msg::Root { from: 2, to: 1, root: first });
    net.run(50);
    let n = net.node(1);
    assert_eq!(n.applied, good, "nothing changed");
    let reasons: Vec<&str> = n
        .notices
        .iter()
        .filter_map(|x| match x {
            Notice::RootRejected { error, .. } => Some(error.reason()),
            _ => None,
        })
        .collect();
    assert!(reasons.contains(&"unknown_publisher"), "{reasons:?}");
    assert!(reasons.contains(&"rollback"), "{reasons:?}");
    assert!(!n.notices.iter().any(|x| matches!(x, Notice::RootRejected { error: RootError::BadSignature, .. })));
}

#[test]
fn the_same_run_gives_the_same_trace() {
    let run = || {
        let mut net = Net::new(4);
        packages(&mut net.tree, 80, 0);
        net.publish();
        full_mesh(&mut net);
        net.run(400);
        assert!(net.converged());
        net.trace.finalize()
    };
    assert_eq!(run(), run());
}

#[test]
fn the_origin_names_no_peer_in_redirects_whose_complete_claim_it_caught() {
    let mut net = Net::new(0);
    packages(&mut net.tree, 5, 0);
    net.publish();
    let now = net.now;
    let seq = net.seq;
    let chunk = *net.sizes.keys().min().unwrap();
    let other = *net.sizes.keys().max().unwrap();
    for (peer, complete_seq) in [(1, Some(seq)), (2, None), (3, None), (4, None)] {
        net.call(ORIGIN, Input::PeerConnected(peer));
        let hello = Hello { repo: repo(), root: None, complete_seq, data_addrs: Vec::new() };
        net.call(ORIGIN, Input::Hello { from: peer, hello });
    }
    let origin = net.node(ORIGIN).engine.as_mut().unwrap();
    let now = Mono(now.0);
    assert_eq!(origin.serve_decision(now, &2, &chunk), ServeDecision::Serve);
    // Peer 1 claims the snapshot: named after the first recipient.
    assert_eq!(origin.serve_decision(now, &3, &chunk), ServeDecision::Elsewhere(vec![2, 1]));
    // Then it asks for a chunk of the snapshot it claims: refused, and its claim is no longer believed.
    assert_eq!(origin.serve_decision(now, &1, &other), ServeDecision::Refuse);
    assert_eq!(origin.serve_decision(now, &4, &chunk), ServeDecision::Elsewhere(vec![2]));
}

#[test]
fn the_origin_asks_for_a_re_signed_root_at_half_its_validity_by_the_wall_clock() {
    let mut net = Net::new(0);
    packages(&mut net.tree, 5, 0);
    net.publish();
    let half = Mono(net.published_at.0 + RESIGN_BEFORE_EXPIRY_MS);
    let origin = |net: &Net| net.nodes[&ORIGIN].engine.as_ref().unwrap().poll_timeout();
    assert_eq!(origin(&net), Some(half), "an idle origin sleeps until its root is half through its validity");
    net.now = Timestamp(half.0 - 1);
    net.call(ORIGIN, Input::Timeout);
    assert_eq!(net.nodes[&ORIGIN].republish_asked, 0);
    net.now = Timestamp(half.0);
    net.call(ORIGIN, Input::Timeout);
    assert_eq!(net.nodes[&ORIGIN].republish_asked, 1);
    // Nothing new came: asked again after the retry interval, not before.
    net.now = Timestamp(half.0 + REPUBLISH_RETRY_MS - 1);
    net.call(ORIGIN, Input::Timeout);
    assert_eq!(net.nodes[&ORIGIN].republish_asked, 1);
    net.now = Timestamp(half.0 + REPUBLISH_RETRY_MS);
    net.call(ORIGIN, Input::Timeout);
    assert_eq!(net.nodes[&ORIGIN].republish_asked, 2);
    // A new root starts the count again; a wall clock stepped 13 hours ahead puts it past half at once.
    net.publish();
    net.wall_step_ms = 13 * 3_600_000;
    net.call(ORIGIN, Input::Timeout);
    assert_eq!(net.nodes[&ORIGIN].republish_asked, 3);
}

#[test]
fn a_peer_greeted_after_a_publish_hears_of_the_new_root() {
    let mut net = Net::new(0);
    packages(&mut net.tree, 5, 0);
    // Peer 9 connects; the origin's hello goes out before it has a root, and 9's answer comes after the publish.
    net.call(ORIGIN, Input::PeerConnected(9));
    net.publish();
    let to_9 = |net: &Net| {
        net.queue.iter().filter(|m| matches!(m, Msg::Hello { to: 9, hello, .. } if hello.root.is_some())).count()
    };
    assert_eq!(to_9(&net), 0, "not greeted yet: nothing pushed");
    let answer = Hello { repo: repo(), root: None, complete_seq: None, data_addrs: Vec::new() };
    net.call(ORIGIN, Input::Hello { from: 9, hello: answer.clone() });
    assert_eq!(to_9(&net), 1, "its hello shows no root: the origin's goes to it");
    net.call(ORIGIN, Input::Hello { from: 9, hello: answer });
    assert_eq!(to_9(&net), 1, "once per root");
}

/// This network as the host of one node's engine.
struct NetHost<'a> {
    net: &'a mut Net,
    id: u32,
}

impl Host<u32> for NetHost<'_> {
    type Source<'s>
        = Nodes
    where
        Self: 's;

    fn with_engine<R>(&mut self, f: impl FnOnce(&mut Engine<u32>, &Nodes) -> R) -> Option<R> {
        let node = self.net.nodes.get_mut(&self.id)?;
        Some(f(node.engine.as_mut()?, &node.nodes))
    }

    fn execute(&mut self, now: Now, output: Output<u32>) -> Vec<Input<u32>> {
        self.net.execute(self.id, now, output)
    }
}

#[test]
fn a_plan_made_for_a_root_the_mirror_has_moved_on_from_is_dropped_and_the_newer_one_is_synced() {
    let mut net = synced(1, 5);
    net.node(1).held_plans = Some(Vec::new());
    let status = |net: &mut Net| net.node(1).engine.as_ref().unwrap().status();

    // Snapshot 2: the manifest arrives, and the mirror waits for its plan (nothing is staged meanwhile).
    packages(&mut net.tree, 6, 1);
    net.publish();
    net.run(20);
    assert_eq!(status(&mut net).phase, SyncPhase::Planning);
    let old = net.node(1).held_plans.as_mut().unwrap().pop().expect("a plan job for snapshot 2");
    assert_eq!(old.seq(), 2);

    // Snapshot 3 comes before that plan is made: the mirror fetches its manifest and plans it instead.
    packages(&mut net.tree, 7, 2);
    net.publish();
    net.run(20);
    assert_eq!(status(&mut net).phase, SyncPhase::Planning);
    let new = net.node(1).held_plans.as_mut().unwrap().pop().expect("a plan job for snapshot 3");
    assert_eq!(new.seq(), 3);

    // The late plan for snapshot 2 is dropped: nothing is staged, the mirror still waits for snapshot 3's.
    let planned = old.run(&net.node(1).nodes);
    net.call(1, Input::Planned(planned));
    assert_eq!(status(&mut net).phase, SyncPhase::Planning, "still waiting for snapshot 3's plan");
    let planned = new.run(&net.node(1).nodes);
    net.call(1, Input::Planned(planned));
    // (This network stages at once.)
    assert_eq!(status(&mut net).phase, SyncPhase::Transferring);
    net.run(400);
    assert!(net.converged(), "the mirror applies snapshot 3");
    assert_eq!(net.node(1).apply_attempts.iter().map(|(_, seq)| *seq).collect::<Vec<_>>(), [1, 3]);
}

#[test]
fn a_mirror_that_missed_every_announcement_of_a_root_learns_it_from_a_peer_complete_at_it() {
    let mut net = synced(1, 5);

    // The next root's gossip and the origin's pushed hello are lost (a dead connection took them); only the
    // origin's "complete at 2" reaches the mirror.
    packages(&mut net.tree, 6, 1);
    net.publish();
    let before = net.queue.len();
    net.queue.retain(|m| !matches!(m, Msg::Root { to: 1, .. } | Msg::Hello { to: 1, .. }));
    assert_eq!(before - net.queue.len(), 2, "the gossip and the push were queued, and dropped");
    let have =
        net.queue.iter().position(|m| matches!(m, Msg::Have { to: 1, have, .. } if have.complete_seq == Some(2)));
    let have = net.queue.remove(have.expect("the origin tells the mirror it is complete at 2")).unwrap();
    let asks = |net: &Net| net.queue.iter().filter(|m| matches!(m, Msg::Hello { from: 1, reply: false, .. })).count();
    assert_eq!(asks(&net), 0);
    net.deliver(have);
    assert_eq!(asks(&net), 1, "the mirror asks the origin for its root");
    let again = Have { repo: repo(), seq: 2, complete_seq: Some(2), chunks: Vec::new() };
    net.call(1, Input::Have { from: ORIGIN, have: again });
    assert_eq!(asks(&net), 1, "once per root");
    net.run(400);
    assert!(net.converged(), "the mirror synced to the root its peer is complete at");
}

#[test]
fn removals_run_once_their_grace_period_is_over_by_the_wall_clock() {
    let mut net = synced(1, 5);
    assert!(net.nodes[&1].pending_removals.is_empty(), "the first snapshot removes nothing");

    // The update replaces every package: the old ones are pending, due after the grace period.
    net.tree = TreeDir::default();
    packages(&mut net.tree, 5, 1);
    net.publish();
    net.run(400);
    assert!(net.converged());
    let applied_at = net.nodes[&1].applied_at.unwrap();
    let status = net.node(1).engine.as_ref().unwrap().status();
    assert_eq!(status.pending_removals, 5, "the engine knows how many are pending");
    assert!(net.nodes[&1].removal_runs.is_empty(), "none before the grace period");
    // The engine's timer names the instant they are due: no polling.
    let due = net.node(1).engine.as_ref().unwrap().poll_timeout().expect("the removals' time");
    assert_eq!(due, Mono(applied_at.0 + DELETE_GRACE_MS));
    net.now = Timestamp(due.0 - 1);
    net.call(1, Input::Timeout);
    assert!(net.nodes[&1].removal_runs.is_empty(), "not yet");
    net.now = Timestamp(due.0);
    net.call(1, Input::Timeout);
    assert_eq!(net.nodes[&1].removal_runs, vec![(Timestamp(due.0), 5)]);
    let status = net.node(1).engine.as_ref().unwrap().status();
    assert_eq!(status.pending_removals, 0);
    assert_eq!(net.node(1).engine.as_ref().unwrap().poll_timeout(), None, "nothing left to wake for");
}
