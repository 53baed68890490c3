//! The daemon: one event loop that owns the sync engine, the libp2p swarm and the node's state, and turns the
//! engine's outputs into gossip, control requests, data-plane fetches and file operations.
//!
//! Everything slow runs off the loop and reports back as a [`LoopEvent`]: staging (hashing), chunk fetches (one
//! task per request, writing verified chunks into staging), applying a snapshot, publishing (origin). The loop
//! itself only touches the state database (small, ordered writes) and in-memory state, so it stays responsive.
//!
//! State survives restarts: the applied snapshot, the newest accepted root, manifest nodes and deltas, pending
//! deletions (the state database), and staged chunks (re-verified when staging is prepared again).

mod applied;
mod control;
mod duplicate_key;
mod engine_host;
mod fetching;
mod health;
mod manifest_answers;
mod peers;
mod progress;
mod publisher;
mod serving;
mod status_projector;
mod tree_writer;

use health::Health;
pub use health::{Problem, ProblemKind};
use status_projector::StatusKey;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use indicatif::HumanDuration;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub};
use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::control::{ControlRequest, ControlResponse, roots_topic};
use mirrormesh_proto::node_store::NodeSink;
use mirrormesh_proto::node_store::{NodeSource, SourceError};
use mirrormesh_proto::root::Freshness;
use mirrormesh_proto::sync::bans::Offence;
use mirrormesh_proto::sync::driver::{Host, step};
use mirrormesh_proto::sync::scheduler::{ChunkOutcome, SchedulerLimits};
use mirrormesh_proto::sync::seeder::{SeederLimits, ServeDecision};
use mirrormesh_proto::sync::{
    ApplyFailure, ChunkSet, Engine, EngineConfig, EngineError, Input, Notice, Output, ReqId, Role, RootVia, SyncPhase,
};
use mirrormesh_proto::{Mono, Now, RootError, SignedRoot, Timestamp, VerifiedRoot};
use tokio::sync::{mpsc, oneshot, watch};

use crate::chunk_index::ChunkIndex;
use crate::config::{Config, RoleName};
use crate::dataplane::{DataPlane, DataPlaneConfig, Decision, ORIGIN_SENDING_REPLIES_MAX};
use crate::key::NodeKey;
use crate::metrics::Metrics;
use crate::publish::{PublishError, PublishGuard, PublishOptions, PublishReport, now, publish};
use crate::scan::Changed;
use crate::staging::{Prepared, Staging};
use crate::status::{PublishReply, Status};
use crate::store::{StateStore, StoreReader};
use crate::swarm::{self, Behaviour, BehaviourEvent, WireRequest};

/// How soon the shell's chores run again while something waits on them (a dial beyond the per-round budget, a
/// watched tree's quiet time, fault injection); the engine has its own timer.
pub const TICK: Duration = Duration::from_millis(50);
/// How often the shell's chores run otherwise (redials back off from 1 s, member exchanges and pruning are per
/// second or slower, data-plane refusals are reported per second): an idle daemon wakes about once a second, not 20
/// times.
pub const IDLE_TICK: Duration = Duration::from_secs(1);
/// While nothing a client waits on changes (phase, snapshots, peer count, errors), the status the admin API serves is
/// rebuilt after events at most this often (and this long after the last of them): with dozens of peers, rebuilding
/// it (and the metrics) after every loop event cost the origin more than the events themselves.
pub const STATUS_INTERVAL: Duration = TICK;
/// Events queued from tasks to the loop.
pub const LOOP_EVENTS_MAX: usize = 4096;
pub use manifest_answers::{
    ANSWER_BURST_BYTES, ANSWER_BYTES_PER_PEER_PER_SEC, ANSWERS_IN_FLIGHT_PER_PEER_MAX, NODES_RESPONSE_BYTES_MAX,
};
pub use peers::{REDIAL_MAX, REDIAL_MIN};
/// How long a shutting-down daemon waits for its connections to close.
pub const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long it then lets the connections' drivers send their close frames (a few loopback or LAN round trips).
pub const SHUTDOWN_FLUSH: Duration = Duration::from_millis(100);

/// When the shell's chores run next: soon if something waits on them (`hurry`), else in [`IDLE_TICK`].
fn chores_period(hurry: bool) -> Duration {
    if hurry { TICK } else { IDLE_TICK }
}

/// The event loop's turns: how many, and the longest (nothing else runs on the loop meanwhile: its stall).
#[derive(Default)]
struct LoopTurns {
    count: u64,
    longest: Duration,
}

/// A turn of the event loop this long is logged with what woke it and where its time went (the bar for
/// the loop's longest stall at 10^6 files).
const LOOP_TURN_SLOW: Duration = Duration::from_millis(50);

/// What woke the event loop (events boxed: the enum only carries them from the wait to their handler).
enum Wake {
    Loop(Box<LoopEvent>),
    Swarm(Box<SwarmEvent<BehaviourEvent>>),
    Engine,
    Status,
    Chores,
}

impl Wake {
    /// What woke the loop, for the log of slow turns.
    fn kind(&self) -> &'static str {
        match self {
            Wake::Loop(event) => match **event {
                LoopEvent::Planned(_) => "planned",
                LoopEvent::Staged { .. } => "staged",
                LoopEvent::Fetched { .. } => "fetched",
                LoopEvent::Applied { .. } => "applied",
                LoopEvent::Removed(_) => "removed",
                LoopEvent::Served => "served",
                LoopEvent::Serve { .. } => "serve",
                LoopEvent::Publish { .. } => "publish",
                LoopEvent::TreeChanged => "tree_changed",
                LoopEvent::Reload => "reload",
                LoopEvent::Answer { .. } => "answer",
                LoopEvent::Published { .. } => "published",
            },
            Wake::Swarm(_) => "swarm",
            Wake::Engine => "engine_timeout",
            Wake::Status => "status",
            Wake::Chores => "chores",
        }
    }
}

/// What a publish reads.
pub(crate) enum PublishScope {
    /// The whole tree.
    Whole,
    /// The whole tree, for the watcher (nothing is published if nothing changed).
    WatchedWhole,
    /// Paths an operator named (`publish --paths`).
    Paths(Vec<String>),
    /// What the watcher saw change (nothing is published if nothing did).
    Changed(Changed),
}

/// Things tasks and the admin API tell the loop.
pub enum LoopEvent {
    /// A sync's plan, made off the loop (`Output::Plan`).
    Planned(Box<mirrormesh_proto::sync::Planned<PeerId>>),
    Staged {
        seq: u64,
        result: Result<Prepared>,
        /// Which files miss which chunks, for the status (built beside the staging, off the loop).
        progress: Box<progress::FileProgress>,
    },
    Fetched {
        peer: PeerId,
        req: ReqId,
        outcomes: Vec<(ChunkId, ChunkOutcome<PeerId>)>,
        bytes: u64,
        error: Option<String>,
        /// The error means the peer could not be reached at all.
        unreachable: bool,
    },
    Applied {
        target: Box<VerifiedRoot>,
        result: Result<tree_writer::Applied>,
    },
    /// The tree writer carried out (or deferred) the removals that were due.
    Removed(Box<Result<tree_writer::RemovalRun>>),
    /// The data plane answered a request (only the status changes).
    Served,
    /// The origin's data plane asks how to answer a request.
    Serve {
        peer: PeerId,
        chunks: Vec<ChunkId>,
        reply: oneshot::Sender<Vec<Decision>>,
    },
    /// The admin API asks the origin to publish (`force`: whatever the publish checks say; `paths`: only these
    /// changed, relative to the tree).
    Publish {
        force: bool,
        paths: Option<Vec<String>>,
        reply: oneshot::Sender<Result<PublishReply, String>>,
    },
    /// Something changed in the served tree (origin watch mode).
    TreeChanged,
    /// SIGHUP: re-read the configuration file.
    Reload,
    /// A manifest fetch of a peer's, answered off the loop: send it (`bytes` of nodes or delta, paid from the
    /// peer's budget).
    Answer {
        peer: PeerId,
        channel: request_response::ResponseChannel<ControlResponse>,
        answer: Result<(ControlResponse, usize)>,
    },
    /// A publish finished: its report and the new snapshot's chunk ids (the served chunks' index already follows it).
    Published {
        result: Box<Result<(PublishReport, ChunkSet), PublishError>>,
        reply: Option<oneshot::Sender<Result<PublishReply, String>>>,
    },
}

/// The sync in progress, as the status reports it.
#[derive(Default)]
struct SyncProgress {
    /// Sequence number of the target and when its root was accepted.
    started: Option<(u64, Instant)>,
    staged_seq: Option<u64>,
    files: Option<progress::FileProgress>,
    /// Most chunk bytes the sync was missing (the denominator of its progress).
    need_bytes: u64,
    last_apply_ms: Option<u64>,
    propagation_lag_ms: Option<u64>,
}

pub struct Daemon {
    cfg: Config,
    key: NodeKey,
    store: Arc<StateStore>,
    engine: Engine<PeerId>,
    swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    data: DataPlane,
    staging: Arc<Staging>,
    index: Arc<RwLock<ChunkIndex>>,
    /// Connections, dialing, the fabric's members (`peers.rs`).
    peers: peers::Peers,
    origins: Vec<PeerId>,
    /// The control protocol's outstanding requests, timeouts and answer budgets (`control.rs`).
    control: control::Control,
    /// Chunk requests running, and when each was sent.
    fetches: HashMap<ReqId, (tokio::task::AbortHandle, Instant)>,
    /// Fault injection: made-up chunk ids announced so far (each id is the hash of this count).
    fake_chunks_announced: u64,
    /// Data-plane refusals already reported to the engine as offences (`serving.rs`).
    refusals: serving::RefusalReports,
    events_tx: mpsc::Sender<LoopEvent>,
    events_rx: mpsc::Receiver<LoopEvent>,
    /// What the node shows of itself: status, metrics, history (`status_projector.rs`).
    projector: status_projector::Projector,
    counters: BTreeMap<String, u64>,
    health: Health,
    publisher: publisher::Publisher,
    /// The one thread that changes the served tree (applies and removals).
    tree_writer: tree_writer::TreeWriter,
    /// Files and bytes of the applied snapshot (for status).
    totals: (u64, u64),
    listen_addrs: Vec<Multiaddr>,
    started: Instant,
    /// Turns of the event loop since the start and the longest (the status's counters `loop_wakeups`,
    /// `loop_turn_longest_us`; every turn's time goes to the `loop_turn_seconds` histogram).
    turns: LoopTurns,
    sync: SyncProgress,
    /// Span of the sync in progress (none when idle): log lines about it carry its sequence number.
    sync_span: tracing::Span,
    /// The service manager (systemd's notify socket and watchdog), if one is watching.
    service: crate::service::Notifier,
    /// What a mirror writes and tells downstream after each snapshot (`downstream.rs`).
    downstream: crate::downstream::Downstream,
}

/// What the admin server and tests hold onto.
#[derive(Clone)]
pub struct Handle {
    pub status: watch::Receiver<Status>,
    pub events: mpsc::Sender<LoopEvent>,
    pub data_addr: SocketAddr,
    pub listen_addrs: Vec<Multiaddr>,
    pub metrics: Metrics,
    /// The fabric view and the history (`GET /fabric`, `GET /history`).
    pub feeds: crate::history::Feeds,
}

/// After a publish (off the loop: in proportion to the tree): the served chunks' index follows the diff (in
/// proportion to the change; built anew from the manifest only when it does not describe the previous snapshot, as
/// after the first publish), and the new snapshot's chunk ids for the engine.
fn served_chunks(store: &StateStore, index: &RwLock<ChunkIndex>, report: &PublishReport) -> Result<ChunkSet> {
    let poisoned = || anyhow!("chunk index lock poisoned");
    let advanced = match &report.previous_root {
        Some(from) => index.write().map_err(|_| poisoned())?.advance(from, &report.body.root, &report.diff),
        None => false,
    };
    if advanced {
        // (Read-locked only: the data plane keeps serving meanwhile.)
        return Ok(ChunkSet::new(index.read().map_err(|_| poisoned())?.chunk_ids()));
    }
    let reader = store.reader()?;
    let built = ChunkIndex::build(&reader, &report.body.root)?;
    let chunks = ChunkSet::of_snapshot(&reader, &report.body.root)?;
    *index.write().map_err(|_| poisoned())? = built;
    Ok(chunks)
}

fn verified(root: &SignedRoot) -> Result<VerifiedRoot> {
    let body = root.verify_signature().map_err(|e| anyhow!("stored root does not verify: {e}"))?;
    Ok(VerifiedRoot { signed: root.clone(), body })
}

/// What the state database holds at start: the applied snapshot and the newest accepted root, the applied
/// snapshot's chunk index and totals, and (on an origin) its chunks, which are all the origin's tables keep.
struct Restored {
    applied: Option<VerifiedRoot>,
    latest: Option<VerifiedRoot>,
    index: ChunkIndex,
    snapshot_chunks: Option<(u64, ChunkSet)>,
    totals: (u64, u64),
}

fn restore(cfg: &Config, store: &StateStore) -> Result<Restored> {
    let reader = store.reader()?;
    let applied = reader.applied(&cfg.repo)?.map(|r| verified(&r)).transpose()?;
    let latest = reader.root(&cfg.repo)?.map(|r| verified(&r)).transpose()?;
    let index = match &applied {
        Some(root) => ChunkIndex::build(&reader, &root.body.root)?,
        None => ChunkIndex::default(),
    };
    // An origin restarted on a published snapshot keeps only that snapshot's chunks in its tables.
    let snapshot_chunks = match (&applied, cfg.role) {
        (Some(root), RoleName::Origin) => Some((root.body.seq, ChunkSet::of_snapshot(&reader, &root.body.root)?)),
        _ => None,
    };
    let totals = applied.as_ref().map_or((0, 0), |a| (a.body.files, a.body.bytes));
    Ok(Restored { applied, latest, index, snapshot_chunks, totals })
}

/// The engine's configuration for this node, and the origins a mirror trusts.
fn engine_config(cfg: &Config, key: &NodeKey) -> (EngineConfig<PeerId>, Vec<PeerId>) {
    let role = match cfg.role {
        RoleName::Origin => Role::Origin,
        RoleName::Mirror => Role::Mirror,
    };
    // An origin is the one publisher of its repository: it trusts its own key only, so no other root can
    // overtake the sequence numbers it signs.
    let (trusted, origins): (Vec<_>, Vec<PeerId>) = match role {
        Role::Origin => (vec![key.publisher_key()], Vec::new()),
        Role::Mirror => cfg.publishers.iter().map(|(k, p)| (*k, *p)).unzip(),
    };
    let salt = u64::from_le_bytes(blake3::hash(&key.peer_id().to_bytes()).as_bytes()[..8].try_into().unwrap_or([0; 8]));
    let engine_cfg = EngineConfig {
        repo: cfg.repo.clone(),
        role,
        trusted,
        origins: origins.iter().copied().collect(),
        salt,
        scheduler: SchedulerLimits::default(),
        seeder: SeederLimits::default(),
        have_flush_ms: mirrormesh_proto::sync::HAVE_FLUSH_MS,
        resign_before_expiry_ms: (role == Role::Origin).then_some(cfg.validity.as_millis() as u64 / 2),
        index_names: cfg.index_globs.names(),
    };
    (engine_cfg, origins)
}

/// Builds the control plane's swarm, subscribes to the roots topic and waits until it listens.
async fn bind_control(
    cfg: &Config,
    key: &NodeKey,
) -> Result<(Swarm<Behaviour>, gossipsub::IdentTopic, Vec<Multiaddr>)> {
    let mut swarm = swarm::build(key, cfg.faults.malformed_control)?;
    if cfg.faults.any() {
        tracing::warn!(faults = ?cfg.faults, "fault injection enabled: this node misbehaves on purpose (tests only)");
    }
    let topic = gossipsub::IdentTopic::new(roots_topic(&cfg.repo));
    swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| anyhow!("subscribing to {topic}: {e}"))?;
    let (score, thresholds) = swarm::root_topic_scoring(&topic);
    swarm.behaviour_mut().gossipsub.with_peer_score(score, thresholds).map_err(|e| anyhow!("gossip scoring: {e}"))?;
    swarm.listen_on(cfg.listen.clone()).with_context(|| format!("network.listen {}", cfg.listen))?;
    // Wait for the listener so the handle can say where the node listens.
    let mut listen_addrs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listen_addrs.is_empty() {
        match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => listen_addrs.push(address),
            Ok(SwarmEvent::ListenerError { error, .. }) => {
                return Err(anyhow!("network.listen {}: {error}", cfg.listen));
            }
            Ok(_) => {}
            Err(_) => return Err(anyhow!("network.listen {}: no listening address after 10 s", cfg.listen)),
        }
    }
    Ok((swarm, topic, listen_addrs))
}

impl Daemon {
    /// Opens the node's state, binds its sockets and returns the daemon (not yet running) and a handle to it.
    pub async fn start(cfg: Config) -> Result<(Self, Handle)> {
        let key = match cfg.role {
            RoleName::Origin => NodeKey::load_publisher(&cfg.key)?,
            RoleName::Mirror => NodeKey::load(&cfg.key)?,
        };
        let store = Arc::new(StateStore::open(&cfg.state_dir)?);
        let staging = Arc::new(Staging::open(&cfg.staging_dir, &cfg.tree)?);
        let restored = restore(&cfg, &store)?;
        let (engine_cfg, origins) = engine_config(&cfg, &key);
        let role = engine_cfg.role;
        let engine = Engine::new(engine_cfg, restored.applied, restored.latest);
        let (totals, snapshot_chunks, index) = (restored.totals, restored.snapshot_chunks, restored.index);

        let (events_tx, events_rx) = mpsc::channel(LOOP_EVENTS_MAX);
        let index = Arc::new(RwLock::new(index));
        let serving = serving::Serving {
            staging: staging.clone(),
            index: index.clone(),
            tree: cfg.tree.clone(),
            decide_via: (role == Role::Origin).then(|| events_tx.clone()),
            events: events_tx.clone(),
            corrupt: cfg.faults.corrupt_served_chunks,
        };
        if cfg.faults.corrupt_served_chunks {
            tracing::warn!("fault injection: serving corrupt chunks (faults.corrupt_served_chunks)");
        }
        let data = DataPlane::bind(
            &key,
            DataPlaneConfig {
                listen: cfg.data_listen,
                upload_rate: cfg.upload_bytes_per_sec,
                allow: cfg.allow.clone(),
                repo: cfg.repo.clone(),
                timeouts: Default::default(),
                sending_replies_max: (role == Role::Origin).then_some(ORIGIN_SENDING_REPLIES_MAX),
            },
            Arc::new(serving),
        )
        .context("starting the data plane")?;

        let (swarm, topic, listen_addrs) = bind_control(&cfg, &key).await?;
        let peers = peers::Peers::new(&cfg, key.peer_id(), &store, data.clone(), &listen_addrs)?;
        let (status_tx, status_rx) = watch::channel(Status::default());
        let pending_deletions = store.reader()?.pending_deletion_count()?;
        let tree_writer = tree_writer::TreeWriter::start(
            store.clone(),
            staging.clone(),
            cfg.repo.clone(),
            index.clone(),
            events_tx.clone(),
        )?;
        let publisher = publisher::Publisher::new(cfg.tree.clone(), cfg.watch, cfg.watch_quiet, events_tx.clone());
        // An origin only leaves its downstream files out of its snapshots (`downstream.rs`).
        let downstream = match cfg.role {
            RoleName::Mirror => crate::downstream::Downstream::start(
                cfg.downstream.clone(),
                cfg.tree.clone(),
                &cfg.staging_dir,
                store.clone(),
            )?,
            RoleName::Origin => crate::downstream::Downstream::none(cfg.downstream.clone()),
        };
        let (history, feeds) = crate::history::History::new(cfg.role == RoleName::Origin, Instant::now());
        let handle = Handle {
            feeds,
            status: status_rx,
            events: events_tx.clone(),
            data_addr: data.local_addr(),
            listen_addrs: listen_addrs.clone(),
            metrics: Metrics::new(),
        };
        let mut daemon = Daemon {
            cfg,
            key,
            store,
            engine,
            swarm,
            topic,
            data,
            staging,
            index,
            peers,
            origins,
            control: control::Control::default(),
            fetches: HashMap::new(),
            refusals: serving::RefusalReports::new(Instant::now()),
            fake_chunks_announced: 0,
            events_tx,
            events_rx,
            projector: status_projector::Projector::new(status_tx, handle.metrics.clone(), history),
            counters: BTreeMap::new(),
            health: Health::default(),
            publisher,
            tree_writer,
            totals,
            listen_addrs,
            started: Instant::now(),
            turns: LoopTurns::default(),
            sync: SyncProgress::default(),
            sync_span: tracing::Span::none(),
            service: crate::service::Notifier::from_env(),
            downstream,
        };
        if let Some((seq, chunks)) = snapshot_chunks {
            daemon.feed(Input::SnapshotChunks { seq, chunks })?;
        }
        if pending_deletions > 0 {
            // Left from the last run: a run reads when they are really due.
            daemon.feed(Input::RemovalsScheduled { due: Some(Timestamp(0)), pending: pending_deletions })?;
        }
        // The admin API answers with the state read from disk from its first request on.
        daemon.check_served_root(now());
        let key = daemon.status_key();
        daemon.publish_status(key);
        Ok((daemon, handle))
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tracing::info!(node = %self.key.peer_id(), role = ?self.cfg.role, data = %self.data.local_addr(), "mirrormesh daemon running");
        tokio::pin!(shutdown);
        let mut chores_due = tokio::time::Instant::now() + chores_period(self.peers_tick());
        // A sync resumed from the state database starts at once if the engine says so.
        self.on_engine_timeout();
        self.after_event();
        // Both planes and the admin API listen (the admin API is bound before the loop runs).
        let summary = self.projector.summary();
        self.service.ready(&summary);
        loop {
            // The engine says when it wants to run next; the shell's own chores say when they want to.
            let engine_due = self.engine.poll_timeout().map(|at| self.instant_of(at));
            let status_due = self.projector.held_until().map(tokio::time::Instant::from_std);
            let wake = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(event) = self.events_rx.recv() => Wake::Loop(Box::new(event)),
                event = self.swarm.select_next_some() => Wake::Swarm(Box::new(event)),
                _ = tokio::time::sleep_until(engine_due.unwrap_or_else(tokio::time::Instant::now)),
                    if engine_due.is_some() => Wake::Engine,
                // A status held back after the last events is published (by `after_event`).
                _ = tokio::time::sleep_until(status_due.unwrap_or_else(tokio::time::Instant::now)),
                    if status_due.is_some() => Wake::Status,
                _ = tokio::time::sleep_until(chores_due) => Wake::Chores,
            };
            // The turn: from here until the loop waits again.
            let woke = Instant::now();
            let kind = wake.kind();
            match wake {
                Wake::Loop(event) => self.on_loop_event(*event),
                Wake::Swarm(event) => self.on_swarm_event(*event),
                Wake::Engine => self.on_engine_timeout(),
                Wake::Status => {}
                Wake::Chores => chores_due = tokio::time::Instant::now() + self.on_tick(),
            }
            if self.peers.take_soon() {
                chores_due = chores_due.min(tokio::time::Instant::now() + TICK);
            }
            let handled = woke.elapsed();
            self.after_event();
            let turn = woke.elapsed();
            if turn >= LOOP_TURN_SLOW {
                tracing::warn!(
                    woken_by = kind,
                    turn_ms = turn.as_millis() as u64,
                    handler_ms = handled.as_millis() as u64,
                    "slow event-loop turn"
                );
            }
            self.turns.count += 1;
            self.turns.longest = self.turns.longest.max(turn);
            self.projector.metrics.observe_loop_turn(turn.as_secs_f64());
        }
        self.service.stopping();
        self.peers.shut_down(&self.store);
        self.data.shut_down(SHUTDOWN_CLOSE_WAIT).await;
        self.close_connections().await;
        Ok(())
    }

    /// Closes every control connection and waits (at most [`SHUTDOWN_CLOSE_WAIT`]) until they are closed, so peers
    /// notice at once and redial, instead of holding a dead connection until its idle timeout: an origin restarted
    /// on the same address would never hear from them again (it has no bootstrap list, and a new process cannot
    /// answer for the old one's connections).
    async fn close_connections(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if peers.is_empty() {
            return;
        }
        tracing::info!(peers = peers.len(), "closing every connection");
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_CLOSE_WAIT;
        while self.swarm.connected_peers().next().is_some() {
            if tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await.is_err() {
                tracing::warn!("some connections did not close within {SHUTDOWN_CLOSE_WAIT:?}");
                return;
            }
        }
        // The close frames are sent by the connections' drivers: let them run before the runtime stops.
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, std::future::pending::<()>()).await;
    }

    /// A problem of no more specific kind (cleared once the next snapshot is in place).
    fn error(&mut self, message: String) {
        self.set_problem(ProblemKind::Other, message, now().0);
    }

    /// Sets a problem (see `health.rs`); counts `problems_{kind}` each time one appears.
    fn set_problem(&mut self, kind: ProblemKind, message: impl Into<String>, now_ms: u64) {
        if self.health.set(kind, message, now_ms) {
            self.count(format!("problems_{}", kind.name()));
        }
    }

    /// What the served snapshot and the roots heard so far say about this node's health: never synced, only
    /// untrusted roots heard, the served root expired or stale.
    fn check_served_root(&mut self, t: Timestamp) {
        let syncing = self.engine.status().phase != SyncPhase::Idle;
        match self.engine.current() {
            None if self.cfg.role == RoleName::Mirror && !syncing => {
                let message = match self.health.is_set(ProblemKind::RootsUntrusted) {
                    true => "never synced: every root heard so far was refused (see roots_untrusted)",
                    false => "never synced: no snapshot has been applied here yet and no sync is running",
                };
                self.set_problem(ProblemKind::NeverSynced, message, t.0);
            }
            _ => self.health.clear(ProblemKind::NeverSynced),
        }
        let Some(current) = self.engine.current() else {
            self.health.clear(ProblemKind::RootExpired);
            self.health.clear(ProblemKind::RootStale);
            return;
        };
        let (seq, created, expires) = (current.body.seq, current.body.created, current.body.expires);
        match mirrormesh_proto::root::freshness(&current.body, t, self.cfg.stale_after.map(|d| d.as_millis() as u64)) {
            Freshness::Expired => {
                let message = format!(
                    "the snapshot served (seq {seq}) expired {} ago: the origin has not re-signed it (is it down?)",
                    HumanDuration(Duration::from_millis(t.millis_since(expires)))
                );
                self.set_problem(ProblemKind::RootExpired, message, t.0);
                self.health.clear(ProblemKind::RootStale);
            }
            Freshness::Stale => {
                let message = format!(
                    "the snapshot served (seq {seq}) was created {} ago, more than repo.stale_after_secs",
                    HumanDuration(Duration::from_millis(t.millis_since(created)))
                );
                self.set_problem(ProblemKind::RootStale, message, t.0);
                self.health.clear(ProblemKind::RootExpired);
            }
            Freshness::Fresh => {
                self.health.clear(ProblemKind::RootExpired);
                self.health.clear(ProblemKind::RootStale);
            }
        }
    }

    /// Whether roots signed by `key` are accepted here (an origin trusts its own key only).
    fn trusts(&self, key: &mirrormesh_proto::PublisherKey) -> bool {
        match self.cfg.role {
            RoleName::Origin => *key == self.key.publisher_key(),
            RoleName::Mirror => self.cfg.publishers.iter().any(|(k, _)| k == key),
        }
    }

    /// A root error as operators read it: publishers named by node id, as `trust.publishers` names them.
    fn describe_root_error(&self, error: &RootError) -> String {
        match error {
            RootError::UnknownPublisher(key) => {
                let signer = crate::key::peer_id_of(key).map_or_else(|_| key.to_string(), |p| p.to_string());
                let trusted: Vec<String> = self.cfg.publishers.iter().map(|(_, p)| p.to_string()).collect();
                format!(
                    "root signed by {signer}, which is not a trusted publisher (trust.publishers lists {})",
                    if trusted.is_empty() { "none".into() } else { trusted.join(", ") }
                )
            }
            other => other.to_string(),
        }
    }

    fn count(&mut self, what: impl Into<String>) {
        *self.counters.entry(what.into()).or_default() += 1;
    }

    // ---- the engine ---------------------------------------------------------------------------------------

    /// After every event: checks the served root and publishes the status if it changed.
    fn after_event(&mut self) {
        self.service.watchdog(Instant::now());
        self.check_served_root(now());
        let key = self.status_key();
        if self.projector.due(&key) {
            self.publish_status(key);
        }
    }

    fn status_key(&self) -> StatusKey {
        let engine = self.engine.status();
        StatusKey {
            phase: engine.phase.name(),
            current: engine.current.map(|c| c.0),
            target: engine.target.map(|t| t.0),
            waiting_for_origin: engine.waiting_for_origin,
            peers: engine.peers,
            staged: self.sync.staged_seq,
            last_error: self.health.newest().map(str::to_owned),
            problems: self.health.list().len(),
            pending_removals: engine.pending_removals,
        }
    }

    // ---- loop events --------------------------------------------------------------------------------------

    fn on_loop_event(&mut self, event: LoopEvent) {
        let span = self.sync_span.clone();
        let _sync = span.enter();
        let peer = match &event {
            LoopEvent::Fetched { peer, .. } | LoopEvent::Serve { peer, .. } => Some(*peer),
            _ => None,
        };
        let _peer = peer.map(|peer| tracing::info_span!("peer", %peer).entered());
        if let Err(e) = self.try_loop_event(event) {
            self.error(format!("{e:#}"));
        }
    }

    fn try_loop_event(&mut self, event: LoopEvent) -> Result<()> {
        let t = now();
        match event {
            // The status after this event shows what was sent.
            LoopEvent::Served => {}
            LoopEvent::Planned(planned) => self.feed(Input::Planned(planned))?,
            LoopEvent::Staged { seq, result, progress } => match result {
                Ok(prepared) => {
                    tracing::info!(
                        seq,
                        held = prepared.held.len(),
                        resumed = prepared.resumed,
                        copied = prepared.copied,
                        "staged"
                    );
                    self.sync.staged_seq = Some(seq);
                    self.sync.files = Some(*progress);
                    self.feed(Input::Staged { seq, held: prepared.held })?;
                }
                Err(e) => {
                    self.set_problem(ProblemKind::StagingFailing, format!("staging snapshot {seq}: {e:#}"), t.0);
                    self.count("staging_failures");
                }
            },
            LoopEvent::Fetched { peer, req, outcomes, bytes, error, unreachable } => {
                if let Some((_, sent)) = self.fetches.remove(&req)
                    && bytes > 0
                    && let Some(state) = self.peers.state_mut(&peer)
                {
                    state.rate = peers::smooth(state.rate, bytes as f64 / sent.elapsed().as_secs_f64().max(1e-6));
                }
                let dropped = outcomes.iter().any(|(_, o)| *o == ChunkOutcome::Dropped);
                for (id, outcome) in outcomes {
                    match &outcome {
                        ChunkOutcome::Verified => {
                            self.count("chunks_verified");
                            if let Some(files) = self.sync.files.as_mut() {
                                files.held(&id);
                            }
                        }
                        ChunkOutcome::Corrupt => self.count("chunks_rejected"),
                        _ => {}
                    }
                    self.feed(Input::Chunk { from: peer, req, id, outcome })?;
                }
                if dropped {
                    let message = "could not write staged chunks (is the staging filesystem full?)";
                    self.set_problem(ProblemKind::StagingFailing, message, t.0);
                } else if bytes > 0 {
                    self.health.clear(ProblemKind::StagingFailing);
                }
                match error {
                    Some(e) => {
                        tracing::debug!(%peer, "chunk request failed: {e}");
                        self.count("chunk_requests_failed");
                        self.feed(Input::ChunksFailed { from: peer, req })?;
                        if unreachable && self.swarm.is_connected(&peer) {
                            // Its data plane is gone, so the peer is (it died, or the network between us did):
                            // drop it now rather than when the control connection's idle timeout notices, so the
                            // sync goes on with the others (or waits for the origin) and the peer is redialed.
                            tracing::warn!(%peer, "peer unreachable: {e}; disconnecting");
                            self.count("peers_unreachable");
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                    }
                    None => self.feed(Input::ChunksDone { from: peer, req, bytes })?,
                }
            }
            LoopEvent::Applied { target, result } => self.on_applied(*target, result)?,
            LoopEvent::Removed(run) => self.on_removed(*run),
            LoopEvent::Serve { peer, chunks, reply } => {
                let decisions = chunks
                    .iter()
                    .map(|id| match self.engine.serve_decision(self.clock().mono, &peer, id) {
                        ServeDecision::Serve => Decision::Serve,
                        ServeDecision::Elsewhere(peers) => Decision::Elsewhere(peers),
                        ServeDecision::Refuse => Decision::Missing,
                    })
                    .collect();
                let _ = reply.send(decisions);
            }
            LoopEvent::Publish { force, paths, reply } => {
                let scope = paths.map_or(PublishScope::Whole, PublishScope::Paths);
                self.start_publish(force, scope, Some(reply))
            }
            LoopEvent::TreeChanged => self.publisher.tree_changed(Instant::now()),
            LoopEvent::Reload => {
                self.service.reloading();
                self.reload();
                self.service.reloaded();
            }
            LoopEvent::Answer { peer, channel, answer } => match answer {
                Ok((response, bytes)) => {
                    self.control.answered(peer, bytes);
                    let _ = self.swarm.behaviour_mut().control.send_response(channel, response);
                }
                // Not answered: the peer's request fails and it asks elsewhere.
                Err(e) => {
                    self.control.answered(peer, 0);
                    self.error(format!("answering a manifest fetch: {e:#}"));
                }
            },
            LoopEvent::Published { result, reply } => self.on_published(*result, reply)?,
        }
        Ok(())
    }

    /// Re-reads the configuration file (SIGHUP) and applies what may change while running (see
    /// [`Config::needs_restart`]); refuses the whole reload, keeping the running configuration, if anything else
    /// changed or the file does not load.
    fn reload(&mut self) {
        let Some(path) = self.cfg.path.clone() else {
            tracing::warn!("SIGHUP: this daemon was not started from a config file; nothing to re-read");
            return;
        };
        tracing::info!(config = %path.display(), "SIGHUP: re-reading the configuration");
        let new = match Config::load(&path) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!("reload refused, the running configuration stays: {e:#}");
                self.count("reloads_refused");
                return;
            }
        };
        let restart = self.cfg.needs_restart(&new);
        if !restart.is_empty() {
            tracing::error!(
                "reload refused, the running configuration stays: {} (these take a restart)",
                restart.join("; ")
            );
            self.count("reloads_refused");
            return;
        }
        let log = match crate::logging::apply(new.log.as_deref()) {
            Ok(filter) => filter,
            Err(e) => format!("unchanged ({e:#})"),
        };
        self.peers.reload(&mut self.swarm, &self.cfg, &new);
        if new.upload_bytes_per_sec != self.cfg.upload_bytes_per_sec {
            self.data.set_upload_rate(new.upload_bytes_per_sec);
        }
        self.publisher.set_quiet(new.watch_quiet);
        let allow = new.allow.as_ref().map_or("any peer".to_owned(), |a| format!("{} peers", a.len()));
        tracing::info!(
            bootstrap = new.bootstrap.len(),
            allow,
            log,
            delete_grace_secs = new.delete_grace.as_secs(),
            upload_bytes_per_sec = %new.upload_bytes_per_sec.map_or("unlimited".to_owned(), |b| b.to_string()),
            "configuration reloaded"
        );
        self.cfg = new;
        self.count("reloads");
    }

    fn start_publish(
        &mut self,
        force: bool,
        scope: PublishScope,
        reply: Option<oneshot::Sender<Result<PublishReply, String>>>,
    ) {
        if self.cfg.role != RoleName::Origin {
            if let Some(reply) = reply {
                let _ = reply.send(Err("this node is a mirror; only the origin publishes".into()));
            }
            return;
        }
        let taken = match &scope {
            PublishScope::Changed(changed) => Some(changed.clone()),
            _ => None,
        };
        if !self.publisher.begin(taken) {
            if let Some(reply) = reply {
                let _ = reply.send(Err("a publish is already running".into()));
            }
            return;
        }
        let store = self.store.clone();
        let key = self.key.clone();
        let tree = self.cfg.tree.clone();
        let repo = self.cfg.repo.clone();
        let validity = self.cfg.validity;
        let exclude = self.cfg.downstream.paths();
        let guard = PublishGuard { force, ..self.cfg.publish_guard.clone() };
        if force {
            tracing::warn!("publishing with --force: the publish checks are skipped");
        }
        let events = self.events_tx.clone();
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || {
            let only_if_changed = matches!(scope, PublishScope::WatchedWhole | PublishScope::Changed(_));
            let changed = match scope {
                PublishScope::Whole | PublishScope::WatchedWhole => Ok(None),
                PublishScope::Paths(paths) => Changed::from_paths(&tree, &paths).map(Some),
                PublishScope::Changed(changed) => Ok(Some(changed)),
            };
            let result = changed.map_err(PublishError::Failed).and_then(|changed| {
                let opts = PublishOptions {
                    tree: &tree,
                    repo,
                    validity,
                    progress: false,
                    guard,
                    exclude,
                    changed,
                    only_if_changed,
                };
                let report = publish(&store, &key, &opts)?;
                let chunks = served_chunks(&store, &index, &report).map_err(PublishError::Failed)?;
                Ok((report, chunks))
            });
            let _ = events.blocking_send(LoopEvent::Published { result: Box::new(result), reply });
        });
    }

    fn on_published(
        &mut self,
        result: Result<(PublishReport, ChunkSet), PublishError>,
        reply: Option<oneshot::Sender<Result<PublishReply, String>>>,
    ) -> Result<()> {
        let t = now();
        self.publisher.end(matches!(result, Err(PublishError::Failed(_))));
        let (report, chunks) = match result {
            Ok(published) => published,
            Err(e) => {
                let message = format!("{e:#}");
                match &e {
                    PublishError::Refused(_) => {
                        self.count("publishes_refused");
                        self.set_problem(ProblemKind::PublishRefused, message.clone(), t.0);
                    }
                    PublishError::Failed(_) => {
                        self.count("publish_failures");
                        self.set_problem(ProblemKind::PublishFailed, format!("publishing: {message}"), t.0);
                    }
                    PublishError::Unchanged => {
                        self.count("publishes_unchanged");
                        tracing::info!("the tree is as the served snapshot has it: nothing published");
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Err(message));
                }
                return Ok(());
            }
        };
        self.health.clear(ProblemKind::PublishRefused);
        self.health.clear(ProblemKind::PublishFailed);
        let accepted = self.feed(Input::Published { root: report.signed.clone(), chunks });
        if let Err(e) = accepted {
            let message = format!("publishing: the engine refused the new root: {e}");
            self.set_problem(ProblemKind::PublishFailed, message.clone(), t.0);
            if let Some(reply) = reply {
                let _ = reply.send(Err(message));
            }
            return Ok(());
        }
        let mut writer = self.store.writer()?;
        writer.set_applied(&report.signed, &self.cfg.repo)?;
        writer.commit()?;
        self.totals = (report.body.files, report.body.bytes);
        self.count("snapshots_published");
        let served = self.data.traffic().values().map(|t| t.bytes_sent).sum();
        let published = crate::history::Newest { seq: report.body.seq, created_ms: report.body.created.0 };
        self.projector.snapshot_published(self.cfg.repo.as_str(), t.0, published, report.changed_bytes, served);
        tracing::info!(
            seq = report.body.seq,
            root = %report.body.root,
            files = report.body.files,
            changes = report.changes,
            dirs_read = report.scan.dirs,
            dirs_kept = report.scan.dirs_kept,
            dirs_reread = report.scan.dirs_reread,
            dirs_kept_busy = report.scan.dirs_kept_busy,
            scan_ms = report.scan.elapsed.as_millis() as u64,
            "published"
        );
        // A client that reads the status after the answer sees the new snapshot.
        let key = self.status_key();
        self.publish_status(key);
        if let Some(reply) = reply {
            let _ = reply.send(Ok(PublishReply {
                repo: report.body.repo.to_string(),
                seq: report.body.seq,
                root: report.body.root.to_hex(),
                files: report.body.files,
                bytes: report.body.bytes,
                changes: report.changes,
                delta_bytes: report.delta_bytes,
                changed_files: report.changed_files,
                changed_bytes: report.changed_bytes,
            }));
        }
        Ok(())
    }

    // ---- swarm events -------------------------------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let peer = match &event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } | SwarmEvent::ConnectionClosed { peer_id, .. } => {
                Some(*peer_id)
            }
            SwarmEvent::OutgoingConnectionError { peer_id, .. } => *peer_id,
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source, ..
            })) => Some(*propagation_source),
            _ => None,
        };
        let _peer = peer.map(|peer| tracing::info_span!("peer", %peer).entered());
        if let Err(e) = self.try_swarm_event(event) {
            self.error(format!("{e:#}"));
        }
    }

    fn try_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Result<()> {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                let banned = self.engine.is_protocol_banned(&peer_id);
                let established = self.peers.on_established(
                    &mut self.swarm,
                    peer_id,
                    connection_id,
                    &endpoint,
                    num_established.get(),
                    banned,
                );
                match established {
                    peers::Established::First => self.feed(Input::PeerConnected(peer_id))?,
                    peers::Established::Replaced => {
                        self.feed(Input::PeerDisconnected(peer_id))?;
                        self.feed(Input::PeerConnected(peer_id))?;
                    }
                    peers::Established::Refused | peers::Established::Another => {}
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
                self.control.closed(&connection_id);
                if self.peers.on_closed(peer_id, connection_id, num_established) {
                    self.feed(Input::PeerDisconnected(peer_id))?;
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                tracing::debug!(peer = %peer_id, "dial failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                // Forwarded only if it brought this node a newer root; penalised if it is not a root at all, or
                // not one of a trusted publisher (gossipsub's peer score: `swarm::root_topic_scoring`).
                let acceptance = match SignedRoot::decode(&message.data) {
                    Ok(root) if root.verify_signature().is_err() || !self.trusts(&root.publisher) => {
                        self.count("gossip_invalid_roots");
                        self.feed(Input::Root { via: RootVia::Gossip(propagation_source), root })?;
                        gossipsub::MessageAcceptance::Reject
                    }
                    Ok(root) => {
                        let before = self.engine.latest().map(|r| r.body.seq);
                        self.feed(Input::Root { via: RootVia::Gossip(propagation_source), root })?;
                        if self.engine.latest().map(|r| r.body.seq) > before {
                            gossipsub::MessageAcceptance::Accept
                        } else {
                            gossipsub::MessageAcceptance::Ignore
                        }
                    }
                    Err(e) => {
                        tracing::warn!(peer = %propagation_source, "undecodable gossip: {e}");
                        self.count("gossip_malformed");
                        gossipsub::MessageAcceptance::Reject
                    }
                };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            SwarmEvent::Behaviour(BehaviourEvent::Control(event)) => self.on_control(event)?,
            _ => {}
        }
        Ok(())
    }

    fn on_control(&mut self, event: request_response::Event<WireRequest, ControlResponse>) -> Result<()> {
        let peer = match &event {
            request_response::Event::Message { peer, .. }
            | request_response::Event::OutboundFailure { peer, .. }
            | request_response::Event::InboundFailure { peer, .. }
            | request_response::Event::ResponseSent { peer, .. } => *peer,
        };
        let sync = self.sync_span.clone();
        let _sync = sync.enter();
        let _peer = tracing::info_span!("peer", %peer).entered();
        for step in self.control.on_event(event, self.clock().mono) {
            self.control_step(step)?;
        }
        Ok(())
    }

    /// Carries out one step of a control event (`control.rs`).
    fn control_step(&mut self, step: control::Step) -> Result<()> {
        use control::Step;
        match step {
            Step::Request { peer, request, channel } => self.answer(peer, request, channel)?,
            Step::Malformed { peer, why } => {
                tracing::debug!(%peer, "malformed control request: {why}");
                self.feed(Input::Offence { peer, offence: Offence::MalformedControl })?;
            }
            Step::Unclaimed { peer, request_id, response } => {
                if self.peers.take_request(request_id)
                    && let Some(response) = response
                {
                    self.peers.on_members_answer(peer, response);
                }
            }
            // The round trip of a hello or have, until a data-plane connection gives QUIC's own estimate.
            Step::RoundTrip { peer, ms } => self.peers.control_round_trip(&peer, ms),
            Step::Hello { peer, hello } => {
                self.peers.learn_data_addrs(peer, &hello.data_addrs);
                self.feed(Input::Hello { from: peer, hello })?;
            }
            Step::Feed(input) => self.feed(input)?,
            Step::Gone { peer, connection } => {
                self.swarm.close_connection(connection);
                if self.peers.has_other_connection(&peer, connection) {
                    self.feed(Input::PeerDisconnected(peer))?;
                    self.feed(Input::PeerConnected(peer))?;
                }
            }
            Step::Count(what) => self.count(what),
        }
        Ok(())
    }

    /// Answers a control request: hellos and haves here, manifest fetches off the loop.
    fn answer(
        &mut self,
        peer: PeerId,
        request: ControlRequest,
        channel: request_response::ResponseChannel<ControlResponse>,
    ) -> Result<()> {
        let response = match request {
            ControlRequest::Hello(hello) => {
                self.peers.learn_data_addrs(peer, &hello.data_addrs);
                self.feed(Input::Hello { from: peer, hello })?;
                let mut mine = self.engine.hello();
                mine.data_addrs = vec![self.data_addr_text()];
                self.fault_lie(&mut mine.complete_seq);
                ControlResponse::Hello(mine)
            }
            ControlRequest::Have(have) => {
                self.feed(Input::Have { from: peer, have })?;
                ControlResponse::Ack
            }
            ControlRequest::Members(members) => self.peers.answer_members(peer, members),
            ControlRequest::GetNodes { .. } | ControlRequest::GetDelta { .. } => {
                self.answer_manifest_fetch(peer, request, channel);
                return Ok(());
            }
        };
        let _ = self.swarm.behaviour_mut().control.send_response(channel, response);
        Ok(())
    }

    /// Answers `GetNodes` or `GetDelta` on the blocking pool, within the peer's budget (`manifest_answers.rs`).
    fn answer_manifest_fetch(
        &mut self,
        peer: PeerId,
        request: ControlRequest,
        channel: request_response::ResponseChannel<ControlResponse>,
    ) {
        if let Some(refusal) = self.control.start_answer(peer, &request) {
            self.count("manifest_answers_throttled");
            let _ = self.swarm.behaviour_mut().control.send_response(channel, refusal);
            return;
        }
        let store = self.store.clone();
        let events = self.events_tx.clone();
        tokio::task::spawn_blocking(move || {
            let answer = match request {
                ControlRequest::GetNodes { hashes, descendants_max } => {
                    manifest_answers::nodes(&store, &hashes, descendants_max).map(|(response, bytes, repeats)| {
                        if repeats > 0 {
                            tracing::debug!(%peer, repeats, "a node fetch asked for the same hash more than once");
                        }
                        (response, bytes)
                    })
                }
                ControlRequest::GetDelta { hash } => manifest_answers::delta(&store, &hash),
                _ => Err(anyhow!("not a manifest fetch")),
            };
            let _ = events.blocking_send(LoopEvent::Answer { peer, channel, answer });
        });
    }

    /// Fault injection (`faults.announce_fake_chunks`): announces `HAVE_CHUNKS_MAX` made-up chunk ids (of the
    /// newest snapshot's sequence number) to every connected peer.
    fn fault_announce_fake_chunks(&mut self) {
        let Some(seq) = self.engine.latest().map(|r| r.body.seq) else { return };
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let chunks = (0..mirrormesh_proto::control::HAVE_CHUNKS_MAX)
                .map(|_| {
                    self.fake_chunks_announced += 1;
                    ChunkId(*blake3::hash(&self.fake_chunks_announced.to_le_bytes()).as_bytes())
                })
                .collect();
            let have = mirrormesh_proto::control::Have { repo: self.cfg.repo.clone(), seq, complete_seq: None, chunks };
            let _ = self.swarm.behaviour_mut().control.send_request(&peer, ControlRequest::Have(have).into());
        }
    }

    /// Fault injection (`faults.lie_about_holdings`): claim to hold the newest snapshot completely (in hellos and
    /// have messages).
    fn fault_lie(&self, complete_seq: &mut Option<u64>) {
        if self.cfg.faults.lie_about_holdings
            && let Some(latest) = self.engine.latest()
        {
            *complete_seq = Some(latest.body.seq);
        }
    }

    /// Reports each data-plane request refused since the last call to the engine as an offence of its peer (the
    /// engine bans repeat offenders: `bans.rs`). Keys come from the data plane's traffic table, which is capped.
    fn report_data_refusals(&mut self) {
        let data = &self.data;
        for (peer, new) in self.refusals.due(Instant::now(), || data.traffic()) {
            // More than the limit at once bans anyway: the rest need not be reported one by one.
            for _ in 0..new.min(Offence::RefusedDataRequest.limit()) {
                if let Err(e) = self.feed(Input::Offence { peer, offence: Offence::RefusedDataRequest }) {
                    self.error(format!("{e:#}"));
                }
            }
        }
    }

    // ---- time ---------------------------------------------------------------------------------------------

    /// The shell's chores: redials and member exchanges, the tree watch, refusals (the engine has its own timer).
    /// Returns how soon they want to run again.
    fn on_tick(&mut self) -> Duration {
        let mut hurry = self.peers_tick();
        if self.cfg.faults.announce_fake_chunks {
            self.fault_announce_fake_chunks();
            hurry = true;
        }
        match self.publisher.watch_due(Instant::now()) {
            Some(publisher::Due::Full) => self.start_publish(false, PublishScope::WatchedWhole, None),
            Some(publisher::Due::Changed(changed)) => self.start_publish(false, PublishScope::Changed(changed), None),
            None => {}
        }
        hurry |= self.publisher.change_pending();
        self.report_data_refusals();
        chores_period(hurry)
    }

    /// The peer manager's chores (dials, member exchanges, persistence); it closes connections the mesh no longer
    /// needs only while no sync runs.
    /// Returns whether the peer manager wants to run again soon (dials left over).
    fn peers_tick(&mut self) -> bool {
        let idle = self.engine.status().phase == SyncPhase::Idle;
        self.peers.on_tick(&mut self.swarm, &self.store, idle)
    }

    // ---- status -------------------------------------------------------------------------------------------

    fn publish_status(&mut self, key: StatusKey) {
        self.counters.insert("loop_wakeups".into(), self.turns.count);
        self.counters.insert("loop_turn_longest_us".into(), self.turns.longest.as_micros() as u64);
        let sources = status_projector::Sources {
            cfg: &self.cfg,
            key: &self.key,
            engine: &self.engine,
            data: &self.data,
            peers: &self.peers,
            swarm: &self.swarm,
            origins: &self.origins,
            counters: &self.counters,
            downstream: &self.downstream,
            service: &mut self.service,
            health: &self.health,
            totals: self.totals,
            sync: &mut self.sync,
            listen_addrs: &self.listen_addrs,
            started: self.started,
        };
        self.projector.publish(key, sources);
    }
}
