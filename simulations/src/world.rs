//! The simulated world: one origin and its mirrors, each running the real sync [`Engine`], connected by the
//! [`Network`] model, in virtual time.
//!
//! # How a run goes
//! Everything happens through one event queue ordered by (virtual instant, insertion number), so a seed replays
//! the same run. While bytes are moving, time advances in steps of `step_us`: the network sends for one step and
//! every item that finished is queued for arrival at its finishing instant plus the pair's latency; then every
//! event before the step's end is handled in order. While nothing moves, time jumps to the next event.
//!
//! The world does for each engine what the daemon does: it delivers hellos, haves, gossip and node/delta/chunk
//! requests; answers requests from the node's own store (the origin through `serve_decision`, i.e. super-seeding);
//! verifies every chunk against its id before storing it; stages and applies at once; and wakes each engine when
//! its `poll_timeout` says. Every engine is driven through the core's one driver (`sync::driver::step`). Control messages
//! arrive after the pair's latency plus their transmission time; bulk answers (chunks, manifest nodes, deltas)
//! travel through the network model and share capacity with everything else.
//!
//! Faults: node restarts (the engine is rebuilt from what the daemon persists: the applied and the newest root;
//! stored chunks and nodes survive), partitions, an origin crash, slow nodes, and byzantine nodes that run an
//! honest engine for themselves but corrupt what they serve, lie about what they hold, gossip forged or old
//! roots, or claim the whole snapshot in their hellos and then redirect every chunk request, never answer it, or
//! give no data-plane address (the request fails at once, as in the daemon).

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::control::{DESCENDANTS_PER_ANSWER_MAX, HAVE_CHUNKS_MAX, Have, Hello, NODES_RESPONSE_BYTES_MAX};
use mirrormesh_proto::delta::{DeltaHash, ManifestDelta};
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::membership::{MESH_DIALS, MeshRule, mesh_pick};
use mirrormesh_proto::node::{Node, NodeHash, verify_node};
use mirrormesh_proto::node_store::{self, NodeSink, NodeSource, SourceError};
use mirrormesh_proto::root::{DeltaRef, RepoId, RootBody, RootId, SignedRoot, VerifiedRoot, publisher_key};
use mirrormesh_proto::sync::driver::{Host, step};
use mirrormesh_proto::sync::scheduler::{BanReason, ChunkOutcome, SchedulerLimits};
use mirrormesh_proto::sync::seeder::{SeederCounts, SeederLimits, ServeDecision};
use mirrormesh_proto::sync::{
    ChunkSet, Engine, EngineConfig, HAVE_FLUSH_MS, IndexNames, Input, Notice, Output, ReqId, Role, RootVia,
};
use mirrormesh_proto::timestamp::{Mono, Now, Timestamp};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::content::{Content, Token, UpdateSize};
use crate::network::{Delivered, Nanos, Network};
use crate::scenario::{Behaviour, FaultSpec, PlannedUpdate, Scenario, Timing, pick_weighted};
use crate::sizes::Sizes;

/// The origin's node number.
pub const ORIGIN: u32 = 0;
/// Virtual time 0 as a wall-clock instant (roots carry creation and expiry times).
const EPOCH_MS: u64 = 1_800_000_000_000;
/// The publisher's signing key in every run.
const PUBLISHER_SECRET: [u8; 32] = [0x5a; 32];
/// The key forgers sign with (trusted by nobody).
const FORGER_SECRET: [u8; 32] = [0x66; 32];
/// How long a gossip message is remembered as seen (gossipsub's default duplicate-cache time).
const GOSSIP_DUPLICATE_TTL: Nanos = 60 * 1_000_000_000;
/// Bucket of the origin egress timeline.
pub const EGRESS_BUCKET_NS: Nanos = 250_000_000;

const MS: Nanos = 1_000_000;
const SEC: f64 = 1e9;

/// A node's behaviour for the checkers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Origin,
    Mirror,
    Byzantine(Behaviour),
}

/// One published snapshot.
#[derive(Clone, Debug)]
pub struct Published {
    pub seq: u64,
    pub at: Nanos,
    pub size: UpdateSize,
    pub plan: PlannedUpdate,
    pub signed: SignedRoot,
    pub root: NodeHash,
}

/// Per-update byte accounting (while the update is the newest published one).
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Bytes the origin sent (chunks, manifest nodes, deltas).
    pub origin_bytes: u64,
    /// Chunk bytes ordinary mirrors received from peers and from the origin.
    pub from_peers: u64,
    pub from_origin: u64,
}

/// What a node did, for the report and the checkers.
pub struct NodeRecord {
    pub kind: Kind,
    pub up_bps: f64,
    pub down_bps: f64,
    pub region: usize,
    pub slow: bool,
    /// Instant each update was applied (or overtaken by a newer applied one).
    pub completed: Vec<Option<Nanos>>,
    /// Sequence numbers of roots accepted, in order.
    pub accepted: Vec<u64>,
    /// Roots rejected, by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    pub bans: Vec<(u32, BanReason)>,
    /// Peers its engine found stalled (claimed the snapshot, delivered nothing while asked), each time.
    pub stalls: Vec<u32>,
    /// The longest a chunk request to each peer stayed open (from asking to its answer's end, its cancellation or
    /// failure, a disconnection, or the end of the run).
    pub longest_ask: BTreeMap<u32, Nanos>,
    /// Neighbours whose claims its engine distrusts at the end of the run (banned or stalled, see
    /// `Engine::is_suspect`).
    pub distrusts: Vec<u32>,
    pub applied: Option<(u64, NodeHash)>,
    /// The engine's newest accepted root at the end of the run.
    pub latest: Option<SignedRoot>,
    /// Stored chunks: (number, token) pairs that fail verification, counted by the checker.
    pub chunks_stored: u64,
    pub chunks_bad: u64,
    pub online: bool,
}

/// Totals of a run.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub events: u64,
    pub control_messages: u64,
    pub bulk_items: u64,
    pub chunks_delivered: u64,
    pub rate_recomputations: u64,
    pub engine_errors: u64,
    pub virtual_ns: Nanos,
    pub converged: bool,
    /// What the origin's serving policy did over the run (copies served again, by why).
    pub seeder: SeederCounts,
    /// Manifest answers the origin sent.
    pub origin_metadata: MetadataServed,
}

/// Manifest answers one node sent: node answers and deltas, and their bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetadataServed {
    pub nodes: u64,
    pub nodes_bytes: u64,
    pub deltas: u64,
    pub deltas_bytes: u64,
}

/// Everything a run produced.
pub struct Outcome {
    pub published: Vec<Published>,
    pub windows: Vec<Window>,
    pub nodes: Vec<NodeRecord>,
    /// Bytes the origin sent in each `EGRESS_BUCKET_NS` bucket.
    pub egress: Vec<f64>,
    pub stats: RunStats,
    pub trace: [u8; 32],
    /// One-way latency from the origin to each node, ns.
    pub origin_latency: Vec<Nanos>,
}

#[derive(Debug)]
enum Msg {
    Hello { hello: Hello, reply: bool },
    Have(Have),
    Gossip { root: SignedRoot },
    GetNodes { req: ReqId, hashes: Vec<NodeHash>, descendants_max: u16 },
    GetDelta { req: ReqId, hash: DeltaHash },
    GetChunks { req: ReqId, chunks: Vec<ChunkId> },
    Cancel { req: ReqId },
}

#[derive(Debug)]
enum Bulk {
    Nodes { req: ReqId, nodes: Vec<Option<Vec<u8>>>, descendants: Vec<Vec<u8>> },
    Delta { req: ReqId, delta: Option<Vec<u8>> },
    Chunk { req: ReqId, number: u32, reply: Reply },
    Done { req: ReqId, bytes: u64 },
}

#[derive(Debug)]
enum Reply {
    Data(Token),
    Missing,
    Elsewhere(Vec<u32>),
}

impl Bulk {
    fn req(&self) -> ReqId {
        match self {
            Bulk::Nodes { req, .. } | Bulk::Delta { req, .. } | Bulk::Chunk { req, .. } | Bulk::Done { req, .. } => {
                *req
            }
        }
    }
}

#[derive(Debug)]
enum Event {
    /// The instant `at` that `node`'s engine asked to run at (ignored if the node restarted since, or a newer
    /// timer replaced it).
    Timeout {
        node: u32,
        generation: u64,
        at: Nanos,
    },
    Deliver {
        from: u32,
        to: u32,
        epoch: u64,
        msg: Msg,
    },
    Arrive {
        from: u32,
        to: u32,
        epoch: u64,
        bulk: Bulk,
    },
    Publish(usize),
    Down {
        node: u32,
        up_after: Nanos,
    },
    Up {
        node: u32,
    },
    PartitionStart {
        side: BTreeSet<u32>,
    },
    PartitionHeal,
    Misbehave {
        node: u32,
    },
    /// A chunk request of `node` to `peer` failed before anything was sent (the peer gave no data-plane address).
    FetchFailed {
        node: u32,
        peer: u32,
        req: ReqId,
    },
}

/// A queue entry, earliest first: (instant, insertion number, slab slot). Small, so the heap moves little; the
/// event itself waits in a slab.
type Scheduled = Reverse<(Nanos, u64, u32)>;

struct SimNode {
    kind: Kind,
    cfg: EngineConfig<u32>,
    engine: Option<Engine<u32>>,
    /// What the daemon persists across a restart.
    saved_current: Option<VerifiedRoot>,
    saved_latest: Option<VerifiedRoot>,
    held_nodes: HashSet<NodeHash>,
    held_deltas: HashSet<DeltaHash>,
    /// Stored chunk bytes, by chunk number.
    chunks: Vec<Option<Token>>,
    /// Restarts so far (a timer of an earlier life is ignored).
    generation: u64,
    /// The pending timer's instant, if one is scheduled.
    timer: Option<Nanos>,
    /// Gossip messages seen (by content, as the daemon's gossipsub ids them) and when.
    gossip_seen: HashMap<RootId, Nanos>,
    record: NodeRecord,
}

impl SimNode {
    fn holds(&self, number: u32) -> bool {
        self.chunks.get(number as usize).is_some_and(Option::is_some)
    }

    fn store_chunk(&mut self, number: u32, token: Token) {
        let i = number as usize;
        if self.chunks.len() <= i {
            self.chunks.resize(i + 1, None);
        }
        self.chunks[i] = Some(token);
    }
}

/// A node's manifest store: the run's shared node bytes, filtered by what this node holds.
struct View<'a> {
    store: &'a HashMap<NodeHash, Vec<u8>>,
    held: &'a HashSet<NodeHash>,
    /// Nodes decoded and verified once for the whole run (every byte in `store` was verified when it entered it),
    /// so a thousand mirrors reading the same manifest decode it once.
    decoded: &'a RefCell<HashMap<NodeHash, Node>>,
}

impl NodeSource for View<'_> {
    fn verified_node(&self, hash: &NodeHash) -> Option<Node> {
        if !self.held.contains(hash) {
            return None;
        }
        if let Some(node) = self.decoded.borrow().get(hash) {
            return Some(node.clone());
        }
        let node = verify_node(hash, self.store.get(hash)?).ok()?;
        self.decoded.borrow_mut().insert(*hash, node.clone());
        Some(node)
    }

    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(if self.held.contains(hash) { self.store.get(hash).cloned() } else { None })
    }

    fn has_node(&self, hash: &NodeHash) -> Result<bool, SourceError> {
        Ok(self.held.contains(hash) && self.store.contains_key(hash))
    }
}

/// The world as the host of one node's engine.
struct NodeHost<'w> {
    world: &'w mut World,
    node: u32,
}

impl Host<u32> for NodeHost<'_> {
    type Source<'s>
        = View<'s>
    where
        Self: 's;

    fn with_engine<R>(&mut self, f: impl FnOnce(&mut Engine<u32>, &View<'_>) -> R) -> Option<R> {
        let world = &mut *self.world;
        let n = &mut world.nodes[self.node as usize];
        let view = View { store: &world.store, held: &n.held_nodes, decoded: &world.decoded };
        Some(f(n.engine.as_mut()?, &view))
    }

    fn execute(&mut self, _now: Now, output: Output<u32>) -> Vec<Input<u32>> {
        self.world.execute(self.node, output)
    }
}

/// The origin's sink when it builds a snapshot.
struct Sink<'a> {
    store: &'a mut HashMap<NodeHash, Vec<u8>>,
    held: &'a mut HashSet<NodeHash>,
}

impl NodeSink for Sink<'_> {
    fn put_node(&mut self, hash: NodeHash, bytes: Vec<u8>) {
        self.held.insert(hash);
        self.store.entry(hash).or_insert(bytes);
    }
}

pub struct World {
    scenario: Scenario,
    plan: Vec<PlannedUpdate>,
    rng: ChaCha8Rng,
    /// Draws which control messages are lost, apart from `rng`, so that a scenario with loss publishes the same
    /// updates and places the same faults as the same scenario without it.
    loss_rng: ChaCha8Rng,
    now: Nanos,
    step: Nanos,
    limit: Nanos,
    queue: BinaryHeap<Scheduled>,
    /// Events by slot, and the free slots.
    slab: Vec<Option<Event>>,
    free: Vec<u32>,
    order: u64,
    net: Network<(u64, Bulk)>,
    delivered: Vec<Delivered<(u64, Bulk)>>,
    nodes: Vec<SimNode>,
    store: HashMap<NodeHash, Vec<u8>>,
    decoded: RefCell<HashMap<NodeHash, Node>>,
    deltas: HashMap<DeltaHash, Vec<u8>>,
    content: Content,
    sizes: Sizes,
    repo: RepoId,
    latency: Vec<Vec<Nanos>>,
    region_of: Vec<usize>,
    /// Intended neighbours of each node (connections are re-made after restarts and partitions).
    topology: Vec<BTreeSet<u32>>,
    /// Connected pairs (smaller id first) and the connection's epoch (messages of a closed connection are dropped).
    links: HashMap<(u32, u32), u64>,
    adjacency: Vec<BTreeSet<u32>>,
    epochs: u64,
    partition: Option<BTreeSet<u32>>,
    published: Vec<Published>,
    windows: Vec<Window>,
    /// The next update waits for convergence: (index, gap).
    awaiting: Option<(usize, f64)>,
    /// Publications deferred while the origin is down.
    deferred_publish: Vec<usize>,
    /// Fault events still queued (the run does not end before they happen).
    faults_pending: usize,
    egress: Vec<f64>,
    /// Chunk requests open: (asker, request) -> (peer asked, when).
    asks: BTreeMap<(u32, ReqId), (u32, Nanos)>,
    trace: blake3::Hasher,
    stats: RunStats,
    progress: ProgressBar,
}

fn mbit(v: f64) -> f64 {
    v * 1e6 / 8.0
}

impl World {
    pub fn new(scenario: Scenario, seed: u64, show_progress: bool) -> Result<Self> {
        let plan = scenario.planned_updates()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let content = Content::load(&scenario, &mut rng).context("cannot build the simulated tree")?;
        let repo = RepoId::new("alpine").expect("valid repository name");
        let n = scenario.mirrors as usize + 1;

        // Roles: the origin, then special mirrors drawn at random.
        let mut mirrors: Vec<u32> = (1..n as u32).collect();
        mirrors.shuffle(&mut rng);
        let mut kinds = vec![Kind::Mirror; n];
        kinds[0] = Kind::Origin;
        let mut slow = vec![1.0; n];
        let mut next = mirrors.into_iter();
        for fault in &scenario.faults {
            match fault {
                FaultSpec::Byzantine { behaviour, nodes } => {
                    for id in next.by_ref().take(*nodes as usize) {
                        kinds[id as usize] = Kind::Byzantine(*behaviour);
                    }
                }
                FaultSpec::Slow { nodes, factor } => {
                    for id in next.by_ref().take(*nodes as usize) {
                        slow[id as usize] = *factor;
                    }
                }
                _ => {}
            }
        }

        let mut up = Vec::with_capacity(n);
        let mut down = Vec::with_capacity(n);
        let mut region = Vec::with_capacity(n);
        for (id, factor) in slow.iter().enumerate() {
            let (u, d, r) = if id == 0 {
                (mbit(scenario.origin_up_mbit), mbit(scenario.origin_down_mbit), 0)
            } else {
                let u = mbit(scenario.mirror_up_mbit.draw(rng.random::<f64>())) * factor;
                let d = mbit(scenario.mirror_down_mbit.draw(rng.random::<f64>())) * factor;
                let weights: Vec<f64> = scenario.regions.iter().map(|r| r.weight).collect();
                // Drawn either way, so a placement changes nothing else of the run.
                let drawn = pick_weighted(&weights, rng.random::<f64>());
                let placed = scenario.placement.as_ref().map(|p| p[(id - 1) % p.len()]);
                (u, d, placed.unwrap_or(drawn))
            };
            up.push(u);
            down.push(d);
            region.push(r);
        }
        let latency: Vec<Vec<Nanos>> =
            scenario.latency_ms.iter().map(|row| row.iter().map(|ms| (ms * 1e6) as Nanos).collect()).collect();

        // The daemon's mesh rule (`membership::mesh_pick`), as if discovery had run: every mirror is connected to
        // the origin and, up to `MESH_FULL_MIRRORS_MAX` mirrors, to every other; past that it dials `MESH_DIALS`
        // mirrors picked by a hash keyed by its identity (each node a random 32-byte identity, as the daemon's
        // keys are) and is dialed by those that picked it.
        let mut topology = vec![BTreeSet::new(); n];
        for id in 1..n as u32 {
            topology[0].insert(id);
            topology[id as usize].insert(0);
        }
        let rule = MeshRule { dials: scenario.degree.map_or(MESH_DIALS, |d| d as usize), ..MeshRule::default() };
        // From a stream of their own, so that a change of the mesh rule leaves the updates drawn from `rng` as they
        // are.
        let mut identity_rng = ChaCha8Rng::seed_from_u64(seed ^ u64::from_le_bytes(*b"identity"));
        let identities: Vec<[u8; 32]> = (0..n).map(|_| identity_rng.random()).collect();
        let node_of: BTreeMap<[u8; 32], u32> = identities.iter().enumerate().map(|(i, k)| (*k, i as u32)).collect();
        for a in 1..n {
            for picked in mesh_pick(&identities[a], &identities[1..], rule, |k| k.to_vec()) {
                let b = node_of[&picked];
                topology[a].insert(b);
                topology[b as usize].insert(a as u32);
            }
        }

        let trusted = vec![publisher_key(&PUBLISHER_SECRET)];
        let nodes = (0..n)
            .map(|id| {
                let role = if id == 0 { Role::Origin } else { Role::Mirror };
                let cfg = EngineConfig {
                    repo: repo.clone(),
                    role,
                    trusted: trusted.clone(),
                    origins: [ORIGIN].into_iter().collect(),
                    salt: (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    scheduler: SchedulerLimits::default(),
                    seeder: SeederLimits::default(),
                    have_flush_ms: HAVE_FLUSH_MS,
                    resign_before_expiry_ms: None,
                    index_names: IndexNames::exact(&["APKINDEX.tar.gz"]),
                };
                SimNode {
                    kind: kinds[id],
                    engine: Some(Engine::new(cfg.clone(), None, None)),
                    cfg,
                    saved_current: None,
                    saved_latest: None,
                    held_nodes: HashSet::new(),
                    held_deltas: HashSet::new(),
                    chunks: Vec::new(),
                    generation: 0,
                    timer: None,
                    gossip_seen: HashMap::new(),
                    record: NodeRecord {
                        kind: kinds[id],
                        up_bps: up[id],
                        down_bps: down[id],
                        region: region[id],
                        slow: slow[id] < 1.0,
                        completed: vec![None; plan.len()],
                        accepted: Vec::new(),
                        stalls: Vec::new(),
                        longest_ask: BTreeMap::new(),
                        rejected: BTreeMap::new(),
                        bans: Vec::new(),
                        distrusts: Vec::new(),
                        applied: None,
                        latest: None,
                        chunks_stored: 0,
                        chunks_bad: 0,
                        online: true,
                    },
                }
            })
            .collect();

        let progress = if show_progress {
            let ordinary = kinds.iter().filter(|k| **k == Kind::Mirror).count();
            let reported = plan.iter().filter(|p| !p.preloaded).count();
            let bar = ProgressBar::new((ordinary * reported) as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} mirror-updates applied, {msg} [{elapsed}]")
                    .expect("valid template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };

        let step = scenario.step_us * 1000;
        let limit = (scenario.time_limit_s * SEC) as Nanos;
        let windows = vec![Window::default(); plan.len()];
        let mut world = World {
            sizes: Sizes::new(&repo),
            plan,
            rng,
            loss_rng: ChaCha8Rng::seed_from_u64(seed ^ u64::from_le_bytes(*b"lossdraw")),
            now: 0,
            step,
            limit,
            queue: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            order: 0,
            net: match &scenario.host_cpu {
                Some(host) => Network::new(up, down).with_shared(host.bytes_per_sec()),
                None => Network::new(up, down),
            },
            delivered: Vec::new(),
            nodes,
            store: HashMap::new(),
            decoded: RefCell::new(HashMap::new()),
            deltas: HashMap::new(),
            content,
            repo,
            latency,
            region_of: region,
            topology,
            links: HashMap::new(),
            adjacency: vec![BTreeSet::new(); n],
            epochs: 0,
            partition: None,
            published: Vec::new(),
            windows,
            awaiting: None,
            deferred_publish: Vec::new(),
            faults_pending: 0,
            egress: Vec::new(),
            asks: BTreeMap::new(),
            trace: blake3::Hasher::new(),
            stats: RunStats::default(),
            progress,
            scenario,
        };
        world.start();
        Ok(world)
    }

    /// Schedules the first publication (engines wake by their own timers, once something happened to them); with
    /// a preloaded initial tree, connects everyone after it is in place.
    fn start(&mut self) {
        self.schedule(0, Event::Publish(0));
    }

    fn schedule(&mut self, at: Nanos, event: Event) {
        self.order += 1;
        if matches!(event, Event::Down { .. } | Event::Up { .. } | Event::PartitionStart { .. } | Event::PartitionHeal)
        {
            self.faults_pending += 1;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(event);
                slot
            }
            None => {
                self.slab.push(Some(event));
                (self.slab.len() - 1) as u32
            }
        };
        self.queue.push(Reverse((at, self.order, slot)));
    }

    /// Both clocks of a node now (they do not drift in the simulator).
    fn clock(&self) -> Now {
        Now { mono: Mono(self.now / MS), wall: Timestamp(EPOCH_MS + self.now / MS) }
    }

    fn latency(&self, a: u32, b: u32) -> Nanos {
        self.latency[self.region_of[a as usize]][self.region_of[b as usize]]
    }

    fn trace(&mut self, fields: &[u64]) {
        for f in fields {
            self.trace.update(&f.to_le_bytes());
        }
    }

    /// Runs to the end: every update published and applied by every live ordinary mirror, every fault over, or the
    /// time limit.
    pub fn run(mut self) -> Outcome {
        let mut last_message = 0;
        loop {
            if self.finished() {
                self.stats.converged = true;
                break;
            }
            if self.now > self.limit {
                break;
            }
            if self.net.is_idle() {
                let Some(Reverse((next, _, _))) = self.queue.peek() else { break };
                self.now = self.now.max(*next);
                self.handle_due(self.now + 1);
            } else {
                let end = self.now + self.step;
                let mut delivered = std::mem::take(&mut self.delivered);
                let before = self.net.sent(ORIGIN);
                self.net.step(self.now, self.step, &mut delivered);
                let sent = self.net.sent(ORIGIN) - before;
                if sent > 0.0 {
                    let bucket = (self.now / EGRESS_BUCKET_NS) as usize;
                    if self.egress.len() <= bucket {
                        self.egress.resize(bucket + 1, 0.0);
                    }
                    self.egress[bucket] += sent;
                }
                for d in delivered.drain(..) {
                    self.on_sent(d);
                }
                self.delivered = delivered;
                self.handle_due(end);
                self.now = end;
            }
            if self.now / SEC as u64 != last_message {
                last_message = self.now / SEC as u64;
                self.progress.set_message(format!("virtual {last_message} s"));
            }
        }
        self.progress.finish_and_clear();
        self.finish()
    }

    /// Handles every event due before `end`.
    fn handle_due(&mut self, end: Nanos) {
        while self.queue.peek().is_some_and(|s| s.0.0 < end) {
            let Reverse((at, _, slot)) = self.queue.pop().expect("peeked");
            let Some(event) = self.slab[slot as usize].take() else { continue };
            self.free.push(slot);
            self.now = self.now.max(at);
            self.stats.events += 1;
            self.handle(event);
        }
    }

    fn finished(&self) -> bool {
        self.published.len() == self.plan.len()
            && self.faults_pending == 0
            && self.deferred_publish.is_empty()
            && self.converged()
    }

    /// Every live ordinary mirror applied the newest published snapshot.
    fn converged(&self) -> bool {
        let Some(last) = self.published.last() else { return false };
        self.nodes
            .iter()
            .all(|n| n.kind != Kind::Mirror || n.engine.is_none() || n.record.applied.map(|a| a.0) == Some(last.seq))
    }

    /// An item finished sending: account for it and queue its arrival.
    fn on_sent(&mut self, d: Delivered<(u64, Bulk)>) {
        if d.src == ORIGIN
            && let Some(w) = self.windows.get_mut(self.published.len().saturating_sub(1))
        {
            w.origin_bytes += d.bytes;
        }
        let (epoch, bulk) = d.payload;
        let at = d.at + self.latency(d.src, d.dst);
        self.schedule(at, Event::Arrive { from: d.src, to: d.dst, epoch, bulk });
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Timeout { node, generation, at } => {
                let n = &mut self.nodes[node as usize];
                if n.engine.is_none() || n.generation != generation || n.timer != Some(at) {
                    return;
                }
                n.timer = None;
                self.call(node, Input::Timeout);
            }
            Event::Deliver { from, to, epoch, msg } => {
                if self.link_epoch(from, to) == Some(epoch) {
                    self.deliver(from, to, msg);
                }
            }
            Event::Arrive { from, to, epoch, bulk } => {
                if self.link_epoch(from, to) == Some(epoch) {
                    self.arrive(from, to, bulk);
                }
            }
            Event::Publish(k) => {
                if self.nodes[ORIGIN as usize].engine.is_none() {
                    self.deferred_publish.push(k);
                } else {
                    self.publish(k);
                }
            }
            Event::Down { node, up_after } => {
                self.faults_pending -= 1;
                self.down(node);
                self.schedule(self.now + up_after, Event::Up { node });
            }
            Event::Up { node } => {
                self.faults_pending -= 1;
                self.up(node);
            }
            Event::PartitionStart { side } => {
                self.faults_pending -= 1;
                let mut cut: Vec<(u32, u32)> =
                    self.links.keys().copied().filter(|(a, b)| side.contains(a) != side.contains(b)).collect();
                // In a fixed order: the disconnections reach the engines (and the run) in this order.
                cut.sort_unstable();
                for (a, b) in cut {
                    self.disconnect(a, b);
                }
                self.partition = Some(side);
            }
            Event::PartitionHeal => {
                self.faults_pending -= 1;
                self.partition = None;
                self.connect_all();
            }
            Event::Misbehave { node } => self.misbehave(node),
            Event::FetchFailed { node, peer, req } => {
                self.trace(&[10, self.now, u64::from(node), u64::from(peer)]);
                self.end_ask(node, req);
                self.call(node, Input::ChunksFailed { from: peer, req });
            }
        }
    }

    // ---- engines ----------------------------------------------------------------------------------------------

    /// Hands `input` to `node`'s engine (if it is up) through the one driver, then sets its timer.
    fn call(&mut self, node: u32, input: Input<u32>) {
        let now = self.clock();
        if step(&mut NodeHost { world: self, node }, now, input).is_err() {
            self.stats.engine_errors += 1;
        }
        self.rearm(node);
    }

    /// Schedules `node`'s timer for when its engine wants to run next, unless an earlier one is pending.
    fn rearm(&mut self, node: u32) {
        let n = &self.nodes[node as usize];
        let Some(Mono(ms)) = n.engine.as_ref().and_then(Engine::poll_timeout) else { return };
        let at = (ms * MS).max(self.now);
        if n.timer.is_some_and(|pending| pending <= at) {
            return;
        }
        let generation = n.generation;
        self.nodes[node as usize].timer = Some(at);
        self.schedule(at, Event::Timeout { node, generation, at });
    }

    /// Carries out one output of `node`'s engine; stages and applies at once, answering with the inputs.
    fn execute(&mut self, node: u32, out: Output<u32>) -> Vec<Input<u32>> {
        match out {
            Output::Gossip(root) => self.gossip(node, root),
            Output::SendHello(to, hello) => self.send(node, to, Msg::Hello { hello, reply: false }),
            Output::SendHave(to, have) => self.send(node, to, Msg::Have(have)),
            Output::FetchNodes { peer, req, hashes, descendants_max } => {
                self.send(node, peer, Msg::GetNodes { req, hashes, descendants_max })
            }
            Output::FetchDelta { peer, req, hash } => self.send(node, peer, Msg::GetDelta { req, hash }),
            Output::StoreNodes(nodes) => {
                let n = &mut self.nodes[node as usize];
                for (hash, bytes) in nodes {
                    n.held_nodes.insert(hash);
                    self.store.entry(hash).or_insert(bytes);
                }
            }
            Output::StoreDelta(hash, bytes) => {
                self.nodes[node as usize].held_deltas.insert(hash);
                self.deltas.entry(hash).or_insert(bytes);
            }
            Output::Plan(job) => {
                let n = &self.nodes[node as usize];
                let view = View { store: &self.store, held: &n.held_nodes, decoded: &self.decoded };
                return vec![Input::Planned(job.run(&view))];
            }
            Output::Stage { seq, files } => {
                let n = &mut self.nodes[node as usize];
                let held: Vec<ChunkId> = files
                    .iter()
                    .flat_map(|f| f.meta.chunks.iter())
                    .filter(|id| self.content.numbers.get(*id).is_some_and(|&c| n.holds(c)))
                    .copied()
                    .collect();
                return vec![Input::Staged { seq, held }];
            }
            Output::FetchChunks { peer, req, chunks } => {
                self.asks.insert((node, req), (peer, self.now));
                if self.nodes[peer as usize].kind == Kind::Byzantine(Behaviour::NoDataAddr) {
                    // As the daemon does without an address: the request fails at once, through its event loop.
                    self.schedule(self.now, Event::FetchFailed { node, peer, req });
                } else {
                    self.send(node, peer, Msg::GetChunks { req, chunks });
                }
            }
            Output::Cancel { peer, req } => {
                self.end_ask(node, req);
                self.send(node, peer, Msg::Cancel { req });
            }
            Output::Apply { target, .. } => {
                let seq = target.body.seq;
                self.trace(&[4, self.now, u64::from(node), seq]);
                let n = &mut self.nodes[node as usize];
                n.record.applied = Some((seq, target.body.root));
                let mut completed = 0;
                for (k, p) in self.published.iter().enumerate() {
                    if p.seq <= seq && n.record.completed[k].is_none() {
                        n.record.completed[k] = Some(self.now);
                        completed += 1;
                    }
                }
                if n.kind == Kind::Mirror {
                    self.progress.inc(completed);
                }
                self.maybe_publish_next();
                return vec![Input::Applied { seq }];
            }
            Output::Ban { peer, reason, .. } => {
                self.trace(&[5, self.now, u64::from(node), u64::from(peer), reason as u64]);
                self.nodes[node as usize].record.bans.push((peer, reason));
            }
            // A ban ending changes nothing the simulator models (its byzantine kinds break no protocol rule that
            // leads to a ban with a time); the roots a node persists are kept when it goes down (`down`).
            Output::Unban { .. } | Output::PersistRoot(_) => {}
            // Roots are signed for 30 days here; no run lasts that long.
            Output::Republish => {}
            // The simulator keeps no served tree, so it schedules no removals (`Input::RemovalsScheduled`) and this
            // is never asked for; a run would find nothing to remove.
            Output::RemoveDue { .. } => return vec![Input::RemovalsDone { left: Some(None), pending: Some(0) }],
            Output::Notice(notice) => match notice {
                Notice::RootAccepted { seq } => {
                    self.trace(&[6, self.now, u64::from(node), seq]);
                    self.nodes[node as usize].record.accepted.push(seq);
                    if matches!(self.nodes[node as usize].kind, Kind::Byzantine(_)) {
                        // Misbehave once the honest mirrors are syncing to this root too.
                        self.schedule(self.now + 200 * MS, Event::Misbehave { node });
                    }
                }
                Notice::PeerStalled { peer } => {
                    self.trace(&[11, self.now, u64::from(node), u64::from(peer)]);
                    self.nodes[node as usize].record.stalls.push(peer);
                }
                Notice::RootRejected { error, .. } => {
                    self.trace(&[7, self.now, u64::from(node)]);
                    *self.nodes[node as usize].record.rejected.entry(error.reason()).or_default() += 1;
                }
                _ => {}
            },
        }
        Vec::new()
    }

    /// Request `req` of `node` ended (answered, cancelled, failed or cut off): note how long it stayed open.
    fn end_ask(&mut self, node: u32, req: ReqId) {
        let Some((peer, at)) = self.asks.remove(&(node, req)) else { return };
        let open = self.now - at;
        let longest = self.nodes[node as usize].record.longest_ask.entry(peer).or_default();
        *longest = (*longest).max(open);
    }

    /// `node` publishes `root` on the gossip topic.
    fn gossip(&mut self, node: u32, root: SignedRoot) {
        self.first_sight(node, &root);
        for to in self.adjacency[node as usize].clone() {
            self.send(node, to, Msg::Gossip { root: root.clone() });
        }
    }

    /// Whether `node` sees this gossip message for the first time (within gossipsub's duplicate-cache time).
    fn first_sight(&mut self, node: u32, root: &SignedRoot) -> bool {
        let now = self.now;
        let seen = &mut self.nodes[node as usize].gossip_seen;
        match seen.get(&root.id()) {
            Some(at) if now.saturating_sub(*at) < GOSSIP_DUPLICATE_TTL => false,
            _ => {
                seen.insert(root.id(), now);
                true
            }
        }
    }

    // ---- messages ---------------------------------------------------------------------------------------------

    fn link_epoch(&self, a: u32, b: u32) -> Option<u64> {
        self.links.get(&(a.min(b), a.max(b))).copied()
    }

    /// Sends a control message: it arrives after the pair's latency plus its transmission time at the slower
    /// end (plus a round trip when lost and retransmitted; gossip is not retransmitted, the mesh and the hellos
    /// cover for it).
    fn send(&mut self, from: u32, to: u32, mut msg: Msg) {
        let Some(epoch) = self.link_epoch(from, to) else { return };
        if let (Msg::Hello { hello, .. }, Kind::Byzantine(behaviour)) = (&mut msg, self.nodes[from as usize].kind)
            && behaviour.claims_complete()
        {
            // Claims to hold the newest root it knows completely.
            let latest = self.nodes[from as usize].engine.as_ref().and_then(|e| e.latest()).map(|r| r.body.seq);
            hello.complete_seq = latest.or(hello.complete_seq);
        }
        let bytes = match &msg {
            Msg::Hello { hello, .. } => Sizes::hello(hello),
            Msg::Have(have) => self.sizes.have(have.chunks.len()),
            Msg::Gossip { root, .. } => root.encode().len() as u64 + crate::sizes::CONTROL_OVERHEAD_BYTES,
            Msg::GetNodes { hashes, descendants_max, .. } => Sizes::get_nodes(hashes, *descendants_max),
            Msg::GetChunks { chunks, .. } => self.sizes.chunk_request(chunks.len()),
            Msg::GetDelta { .. } | Msg::Cancel { .. } => Sizes::small(),
        };
        let latency = self.latency(from, to);
        let rate = self.net.up(from).min(self.net.down(to));
        let mut delay = latency + (bytes as f64 / rate * SEC) as Nanos;
        if self.scenario.loss > 0.0 && self.loss_rng.random::<f64>() < self.scenario.loss {
            if matches!(msg, Msg::Gossip { .. }) {
                return;
            }
            delay += 2 * latency;
        }
        self.stats.control_messages += 1;
        self.schedule(self.now + delay, Event::Deliver { from, to, epoch, msg });
    }

    fn send_bulk(&mut self, from: u32, to: u32, bytes: u64, bulk: Bulk) {
        let Some(epoch) = self.link_epoch(from, to) else { return };
        self.stats.bulk_items += 1;
        self.net.send(from, to, bytes, (epoch, bulk));
    }

    /// A control message from `from` reached `to`.
    fn deliver(&mut self, from: u32, to: u32, msg: Msg) {
        match msg {
            Msg::Hello { hello, reply } => {
                self.call(to, Input::Hello { from, hello });
                let answer = self.nodes[to as usize].engine.as_ref().map(Engine::hello);
                if !reply && let Some(answer) = answer {
                    self.send(to, from, Msg::Hello { hello: answer, reply: true });
                }
            }
            Msg::Have(have) => {
                self.call(to, Input::Have { from, have });
            }
            Msg::Gossip { root } => {
                if !self.first_sight(to, &root) {
                    return;
                }
                for next in self.adjacency[to as usize].clone() {
                    if next != from {
                        self.send(to, next, Msg::Gossip { root: root.clone() });
                    }
                }
                self.call(to, Input::Root { via: RootVia::Gossip(from), root });
            }
            Msg::GetNodes { req, hashes, descendants_max } => {
                let n = &self.nodes[to as usize];
                let nodes: Vec<Option<Vec<u8>>> = hashes
                    .iter()
                    .map(|h| if n.held_nodes.contains(h) { self.store.get(h).cloned() } else { None })
                    .collect();
                let view = View { store: &self.store, held: &n.held_nodes, decoded: &self.decoded };
                let answered: Vec<&[u8]> = nodes.iter().flatten().map(Vec::as_slice).collect();
                let asked = usize::from(descendants_max).min(DESCENDANTS_PER_ANSWER_MAX);
                let budget = NODES_RESPONSE_BYTES_MAX.saturating_sub(answered.iter().map(|b| b.len()).sum());
                let descendants = node_store::descendants(&view, &answered, asked, budget)
                    .expect("the simulator's node store does not fail");
                let bytes = Sizes::nodes(&nodes, &descendants);
                if to == ORIGIN {
                    self.stats.origin_metadata.nodes += 1;
                    self.stats.origin_metadata.nodes_bytes += bytes;
                }
                self.send_bulk(to, from, bytes, Bulk::Nodes { req, nodes, descendants });
            }
            Msg::GetDelta { req, hash } => {
                let delta = if self.nodes[to as usize].held_deltas.contains(&hash) {
                    self.deltas.get(&hash).cloned()
                } else {
                    None
                };
                let bytes = Sizes::delta(delta.as_ref());
                if to == ORIGIN && delta.is_some() {
                    self.stats.origin_metadata.deltas += 1;
                    self.stats.origin_metadata.deltas_bytes += bytes;
                }
                self.send_bulk(to, from, bytes, Bulk::Delta { req, delta });
            }
            Msg::GetChunks { req, chunks } => self.serve_chunks(to, from, req, chunks),
            Msg::Cancel { req } => {
                self.net.remove(to, from, |(_, bulk)| bulk.req() == req);
            }
        }
    }

    /// `server` answers `client`'s chunk request, chunk by chunk, then closes it.
    fn serve_chunks(&mut self, server: u32, client: u32, req: ReqId, chunks: Vec<ChunkId>) {
        let now = self.clock().mono;
        match self.nodes[server as usize].kind {
            Kind::Byzantine(Behaviour::Stall) => return,
            Kind::Byzantine(Behaviour::Elsewhere) => {
                for id in chunks {
                    let number = self.content.numbers.get(&id).copied().unwrap_or(u32::MAX);
                    let reply = Reply::Elsewhere(vec![ORIGIN]);
                    self.send_bulk(server, client, Sizes::chunk_elsewhere(1), Bulk::Chunk { req, number, reply });
                }
                self.send_bulk(server, client, 0, Bulk::Done { req, bytes: 0 });
                return;
            }
            _ => {}
        }
        let corrupt = self.nodes[server as usize].kind == Kind::Byzantine(Behaviour::Corrupt);
        let mut data_bytes = 0;
        for id in chunks {
            let Some(&number) = self.content.numbers.get(&id) else {
                self.send_bulk(
                    server,
                    client,
                    Sizes::chunk_missing(),
                    Bulk::Chunk { req, number: u32::MAX, reply: Reply::Missing },
                );
                continue;
            };
            let n = &mut self.nodes[server as usize];
            let Some(engine) = n.engine.as_mut() else { return };
            let decision = engine.serve_decision(now, &client, &id);
            let (bytes, reply) = match decision {
                ServeDecision::Elsewhere(peers) => (Sizes::chunk_elsewhere(peers.len()), Reply::Elsewhere(peers)),
                ServeDecision::Refuse => (Sizes::chunk_missing(), Reply::Missing),
                ServeDecision::Serve => match n.chunks.get(number as usize).copied().flatten() {
                    Some(mut token) => {
                        if corrupt {
                            token[0] ^= 0xff;
                        }
                        let len = u64::from(self.content.chunks[number as usize].size);
                        data_bytes += len;
                        (Sizes::chunk_data(len), Reply::Data(token))
                    }
                    None => (Sizes::chunk_missing(), Reply::Missing),
                },
            };
            self.send_bulk(server, client, bytes, Bulk::Chunk { req, number, reply });
        }
        self.send_bulk(server, client, 0, Bulk::Done { req, bytes: data_bytes });
    }

    /// A bulk answer from `from` fully arrived at `to`.
    fn arrive(&mut self, from: u32, to: u32, bulk: Bulk) {
        match bulk {
            Bulk::Nodes { req, nodes, descendants } => {
                self.call(to, Input::Nodes { from, req, nodes, descendants });
            }
            Bulk::Delta { req, delta } => {
                self.call(to, Input::Delta { from, req, delta });
            }
            Bulk::Chunk { req, number, reply } => {
                let Some(info) = self.content.chunks.get(number as usize) else { return };
                let (id, size) = (info.id, u64::from(info.size));
                let outcome = match reply {
                    Reply::Data(token) if ChunkId::of(&token) == id => {
                        self.stats.chunks_delivered += 1;
                        let n = &mut self.nodes[to as usize];
                        n.store_chunk(number, token);
                        if n.kind == Kind::Mirror
                            && let Some(w) = self.windows.get_mut(self.published.len().saturating_sub(1))
                        {
                            if from == ORIGIN {
                                w.from_origin += size;
                            } else {
                                w.from_peers += size;
                            }
                        }
                        ChunkOutcome::Verified
                    }
                    Reply::Data(_) => ChunkOutcome::Corrupt,
                    Reply::Missing => ChunkOutcome::Missing,
                    Reply::Elsewhere(peers) => ChunkOutcome::Elsewhere(peers),
                };
                let code = match &outcome {
                    ChunkOutcome::Verified => 0,
                    ChunkOutcome::Corrupt => 1,
                    ChunkOutcome::Missing => 2,
                    _ => 3,
                };
                self.trace(&[1, self.now, u64::from(from), u64::from(to), u64::from(number), code]);
                self.call(to, Input::Chunk { from, req, id, outcome });
            }
            Bulk::Done { req, bytes } => {
                self.end_ask(to, req);
                self.call(to, Input::ChunksDone { from, req, bytes });
            }
        }
    }

    // ---- topology and faults ----------------------------------------------------------------------------------

    fn may_connect(&self, a: u32, b: u32) -> bool {
        self.nodes[a as usize].engine.is_some()
            && self.nodes[b as usize].engine.is_some()
            && self.partition.as_ref().is_none_or(|side| side.contains(&a) == side.contains(&b))
    }

    fn connect(&mut self, a: u32, b: u32) {
        let key = (a.min(b), a.max(b));
        if self.links.contains_key(&key) || !self.may_connect(a, b) {
            return;
        }
        self.epochs += 1;
        self.links.insert(key, self.epochs);
        self.adjacency[a as usize].insert(b);
        self.adjacency[b as usize].insert(a);
        for (x, y) in [(a, b), (b, a)] {
            self.call(x, Input::PeerConnected(y));
        }
    }

    /// Makes every intended connection that is not up and may be.
    fn connect_all(&mut self) {
        for a in 0..self.nodes.len() as u32 {
            for b in self.topology[a as usize].clone() {
                if a < b {
                    self.connect(a, b);
                }
            }
        }
    }

    fn disconnect(&mut self, a: u32, b: u32) {
        if self.links.remove(&(a.min(b), a.max(b))).is_none() {
            return;
        }
        self.adjacency[a as usize].remove(&b);
        self.adjacency[b as usize].remove(&a);
        self.net.remove(a, b, |_| true);
        self.net.remove(b, a, |_| true);
        let cut: Vec<(u32, ReqId)> = self
            .asks
            .iter()
            .filter(|((asker, _), (peer, _))| (*asker, *peer) == (a, b) || (*asker, *peer) == (b, a))
            .map(|(k, _)| *k)
            .collect();
        for (asker, req) in cut {
            self.end_ask(asker, req);
        }
        for (x, y) in [(a, b), (b, a)] {
            self.call(x, Input::PeerDisconnected(y));
        }
    }

    /// The node stops (a crash): connections close, the engine's state is lost but for what the daemon persists.
    fn down(&mut self, node: u32) {
        if self.nodes[node as usize].engine.is_none() {
            return;
        }
        self.trace(&[8, self.now, u64::from(node)]);
        for peer in self.adjacency[node as usize].clone() {
            self.disconnect(node, peer);
        }
        let n = &mut self.nodes[node as usize];
        let engine = n.engine.take().expect("checked above");
        n.saved_current = engine.current().cloned();
        n.saved_latest = engine.latest().cloned();
        n.generation += 1;
        n.timer = None;
        n.record.online = false;
    }

    /// The node restarts from its persisted state and reconnects.
    fn up(&mut self, node: u32) {
        if self.nodes[node as usize].engine.is_some() {
            return;
        }
        self.trace(&[9, self.now, u64::from(node)]);
        let n = &mut self.nodes[node as usize];
        n.engine = Some(Engine::new(n.cfg.clone(), n.saved_current.clone(), n.saved_latest.clone()));
        n.record.online = true;
        // A restarted engine resumes a sync it had started at once (`poll_timeout`).
        self.rearm(node);
        for peer in self.topology[node as usize].clone() {
            self.connect(node, peer);
        }
        if node == ORIGIN {
            for k in std::mem::take(&mut self.deferred_publish) {
                self.schedule(self.now, Event::Publish(k));
            }
        }
    }

    /// A byzantine node does its thing to every neighbour.
    fn misbehave(&mut self, node: u32) {
        let Kind::Byzantine(behaviour) = self.nodes[node as usize].kind else { return };
        if self.nodes[node as usize].engine.is_none() {
            return;
        }
        let Some(last) = self.published.last().cloned() else { return };
        match behaviour {
            Behaviour::Corrupt => {}
            Behaviour::Elsewhere | Behaviour::Stall | Behaviour::NoDataAddr => {
                // Claims the newest snapshot to every neighbour (its hellos are rewritten in `send`).
                let hello = Hello {
                    repo: self.repo.clone(),
                    root: Some(last.signed.clone()),
                    complete_seq: Some(last.seq),
                    data_addrs: Vec::new(),
                };
                for to in self.adjacency[node as usize].clone() {
                    self.send(node, to, Msg::Hello { hello: hello.clone(), reply: true });
                }
            }
            Behaviour::Liar => {
                // Claims every chunk of the newest snapshot.
                let all: Vec<ChunkId> =
                    self.content.current.iter().map(|&c| self.content.chunks[c as usize].id).collect();
                for to in self.adjacency[node as usize].clone() {
                    for part in all.chunks(HAVE_CHUNKS_MAX) {
                        let have =
                            Have { repo: self.repo.clone(), seq: last.seq, complete_seq: None, chunks: part.to_vec() };
                        self.send(node, to, Msg::Have(have));
                    }
                }
            }
            Behaviour::Forger | Behaviour::Replayer => {
                let root = if behaviour == Behaviour::Forger {
                    // A newer root for a different tree, signed by a key nobody trusts.
                    let body = RootBody {
                        repo: self.repo.clone(),
                        seq: last.seq + 1000,
                        created: self.clock().wall,
                        expires: self.clock().wall.plus_ms(86_400_000),
                        root: NodeHash([0xee; 32]),
                        files: 0,
                        bytes: 0,
                        delta: None,
                    };
                    SignedRoot::sign(&FORGER_SECRET, &body)
                } else {
                    // The first genuine root again: a rollback for everyone past it.
                    match self.published.first() {
                        Some(first) if first.seq < last.seq => first.signed.clone(),
                        _ => return,
                    }
                };
                // On the gossip topic, and straight to each neighbour in a hello (which is not deduplicated).
                self.gossip(node, root.clone());
                let hello =
                    Hello { repo: self.repo.clone(), root: Some(root), complete_seq: None, data_addrs: Vec::new() };
                for to in self.adjacency[node as usize].clone() {
                    self.send(node, to, Msg::Hello { hello: hello.clone(), reply: true });
                }
            }
        }
    }

    // ---- publishing -------------------------------------------------------------------------------------------

    fn maybe_publish_next(&mut self) {
        if let Some((k, gap)) = self.awaiting
            && self.converged()
        {
            self.awaiting = None;
            self.schedule(self.now + (gap * SEC) as Nanos, Event::Publish(k));
        }
    }

    /// The origin publishes update `k`.
    fn publish(&mut self, k: usize) {
        let plan = self.plan[k].clone();
        let now = self.clock().wall;
        if k > 0 {
            self.content.rebuild(plan.packages, &mut self.rng);
        }
        let Ok((mut tree, size)) = self.content.snapshot() else {
            self.stats.engine_errors += 1;
            return;
        };
        let origin = &mut self.nodes[ORIGIN as usize];
        let Ok(root) = tree.build(&mut Sink { store: &mut self.store, held: &mut origin.held_nodes }) else {
            self.stats.engine_errors += 1;
            return;
        };
        let previous = self.published.last().cloned();
        let delta = previous.as_ref().and_then(|prev| {
            let view = View { store: &self.store, held: &origin.held_nodes, decoded: &self.decoded };
            let (changes, _) = diff(&view, Some(&prev.root), &root).ok()?;
            let bytes = ManifestDelta::from_changes(prev.root, root, &changes).encode();
            let hash = DeltaHash::of(&bytes);
            let len = bytes.len() as u32;
            origin.held_deltas.insert(hash);
            self.deltas.insert(hash, bytes);
            Some(DeltaRef { base_seq: prev.seq, base_root: prev.root, hash, len })
        });
        for &c in &self.content.current {
            let token = self.content.chunks[c as usize].token;
            origin.store_chunk(c, token);
        }
        let seq = k as u64 + 1;
        let totals = tree.totals();
        let body = RootBody {
            repo: self.repo.clone(),
            seq,
            created: now,
            expires: now.plus_ms(30 * 86_400_000),
            root,
            files: totals.files,
            bytes: totals.bytes,
            delta,
        };
        let signed = SignedRoot::sign(&PUBLISHER_SECRET, &body);
        self.trace.update(&[3]);
        self.trace.update(&self.now.to_le_bytes());
        self.trace.update(&seq.to_le_bytes());
        self.published.push(Published { seq, at: self.now, size, plan: plan.clone(), signed: signed.clone(), root });
        origin.record.applied = Some((seq, root));
        origin.record.completed[k] = Some(self.now);
        let chunks = ChunkSet::new(self.content.current.iter().map(|&c| self.content.chunks[c as usize].id));
        if plan.preloaded {
            self.preload(&signed);
        }
        self.call(ORIGIN, Input::Published { root: signed.clone(), chunks });
        if k == 0 {
            self.connect_all();
        }
        self.schedule_faults(k);
        match self.plan.get(k + 1).map(|p| p.timing) {
            Some(Timing::AfterPrevious(s)) => self.schedule(self.now + (s * SEC) as Nanos, Event::Publish(k + 1)),
            Some(Timing::AfterConverged(gap)) => {
                self.awaiting = Some((k + 1, gap));
                self.maybe_publish_next();
            }
            Some(Timing::Start) | None => {}
        }
    }

    /// Every mirror starts with snapshot `signed` applied (its chunks and manifest on disk).
    fn preload(&mut self, signed: &SignedRoot) {
        let Ok(body) = signed.verify_signature() else { return };
        let verified = VerifiedRoot { signed: signed.clone(), body };
        let held = self.nodes[ORIGIN as usize].held_nodes.clone();
        let current = self.content.current.clone();
        for id in 1..self.nodes.len() {
            let n = &mut self.nodes[id];
            n.held_nodes = held.clone();
            for &c in &current {
                n.store_chunk(c, self.content.chunks[c as usize].token);
            }
            n.engine = Some(Engine::new(n.cfg.clone(), Some(verified.clone()), Some(verified.clone())));
            n.record.applied = Some((verified.body.seq, verified.body.root));
            n.record.accepted.push(verified.body.seq);
            n.record.completed[0] = Some(self.now);
        }
    }

    /// Schedules the faults tied to update `k`, now that it is published.
    fn schedule_faults(&mut self, k: usize) {
        let mirrors: Vec<u32> = (1..self.nodes.len() as u32).collect();
        for fault in self.scenario.faults.clone() {
            match fault {
                FaultSpec::Churn { nodes, update, after_s, within_s, down_s } if update == k => {
                    let mut pick = mirrors.clone();
                    pick.shuffle(&mut self.rng);
                    for node in pick.into_iter().take(nodes as usize) {
                        let at = self.now + ((after_s + within_s * self.rng.random::<f64>()) * SEC) as Nanos;
                        self.schedule(at, Event::Down { node, up_after: (down_s * SEC) as Nanos });
                    }
                }
                FaultSpec::Partition { fraction, update, after_s, heal_after_s } if update == k => {
                    let mut pick = mirrors.clone();
                    pick.shuffle(&mut self.rng);
                    let count = ((mirrors.len() as f64 * fraction).round() as usize).clamp(1, mirrors.len());
                    let side: BTreeSet<u32> = pick.into_iter().take(count).collect();
                    let start = self.now + (after_s * SEC) as Nanos;
                    self.schedule(start, Event::PartitionStart { side });
                    self.schedule(start + (heal_after_s * SEC) as Nanos, Event::PartitionHeal);
                }
                FaultSpec::OriginCrash { update, after_s, down_s } if update == k => {
                    let at = self.now + (after_s * SEC) as Nanos;
                    self.schedule(at, Event::Down { node: ORIGIN, up_after: (down_s * SEC) as Nanos });
                }
                _ => {}
            }
        }
    }

    // ---- the end ----------------------------------------------------------------------------------------------

    fn finish(mut self) -> Outcome {
        self.stats.virtual_ns = self.now;
        self.stats.rate_recomputations = self.net.recomputations;
        let origin_latency = (0..self.nodes.len() as u32).map(|id| self.latency(ORIGIN, id)).collect();
        let open: Vec<(u32, ReqId)> = self.asks.keys().copied().collect();
        for (node, req) in open {
            self.end_ask(node, req);
        }
        for (n, neighbours) in self.nodes.iter_mut().zip(&self.adjacency) {
            if let Some(engine) = n.engine.as_ref() {
                n.record.distrusts = neighbours.iter().copied().filter(|p| engine.is_suspect(p)).collect();
            }
        }
        if let Some(engine) = self.nodes[ORIGIN as usize].engine.as_ref() {
            self.stats.seeder = engine.seeder_counts();
        }
        let chunks = &self.content.chunks;
        let nodes = self
            .nodes
            .into_iter()
            .map(|mut n| {
                for (number, token) in n.chunks.iter().enumerate() {
                    if let Some(token) = token {
                        n.record.chunks_stored += 1;
                        if ChunkId::of(token) != chunks[number].id {
                            n.record.chunks_bad += 1;
                        }
                    }
                }
                n.record.latest = n.engine.as_ref().and_then(|e| e.latest()).map(|r| r.signed.clone());
                n.record
            })
            .collect();
        Outcome {
            published: self.published,
            windows: self.windows,
            nodes,
            egress: self.egress,
            stats: self.stats,
            trace: *self.trace.finalize().as_bytes(),
            origin_latency,
        }
    }
}
