//! The daemon: one event loop that owns the sync engine, the libp2p swarm and the node's state, and turns the
//! engine's outputs into gossip, control requests, data-plane fetches and file operations.
//!
//! Everything slow runs off the loop and reports back as a [`LoopEvent`]: staging (hashing), chunk fetches (one
//! task per request, writing verified chunks into staging), applying a snapshot, publishing (origin). The loop
//! itself only touches the state database (small, ordered writes) and in-memory state, so it stays responsive.
//!
//! State survives restarts: the applied snapshot, the newest accepted root, manifest nodes and deltas, pending
//! deletions (the state database), and staged chunks (re-verified when staging is prepared again).

mod progress;
mod serving;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub};
use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::control::{ControlRequest, ControlResponse, roots_topic};
use mirrormesh_proto::diff::Change;
use mirrormesh_proto::node_store::NodeSink;
use mirrormesh_proto::sync::scheduler::{ChunkOutcome, SchedulerLimits};
use mirrormesh_proto::sync::seeder::{SeederLimits, ServeDecision};
use mirrormesh_proto::sync::{Engine, EngineConfig, Notice, Output, ReqId, Role, RootVia};
use mirrormesh_proto::{SignedRoot, Timestamp, VerifiedRoot};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot, watch};

use crate::apply::{self, ApplyReport};
use crate::chunk_index::ChunkIndex;
use crate::config::{Config, RoleName};
use crate::dataplane::{DataPlane, DataPlaneConfig, Decision, Fetched, ORIGIN_SENDING_REPLIES_MAX, Unreachable};
use crate::key::NodeKey;
use crate::metrics::Metrics;
use crate::publish::{PublishOptions, PublishReport, now, publish};
use crate::staging::{Prepared, Staging};
use crate::status::{PeerStatus, PublishReply, RepoStatus, Status};
use crate::store::StateStore;
use crate::swarm::{self, Behaviour, BehaviourEvent, WireRequest};

/// How often the engine is ticked.
pub const TICK: Duration = Duration::from_millis(50);
/// While nothing a client waits on changes (phase, snapshots, peer count, errors), the status the admin API serves is
/// rebuilt at most this often: with dozens of peers, rebuilding it (and the metrics) after every loop event cost the
/// origin more than the events themselves.
pub const STATUS_INTERVAL: Duration = TICK;
/// Events queued from tasks to the loop.
pub const LOOP_EVENTS_MAX: usize = 4096;
/// Bytes of manifest nodes in one control response.
pub const NODES_RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Bootstrap redial back-off bounds.
pub const REDIAL_MIN: Duration = Duration::from_secs(1);
pub const REDIAL_MAX: Duration = Duration::from_secs(30);
/// Malformed control requests (undecodable, or over the size limit) a peer may send before it is banned.
pub const CONTROL_MALFORMED_MAX: u32 = 3;
/// Refused data-plane requests (malformed, oversized, stalled, slow reader, wrong repository) a peer may make
/// before it is banned.
pub const DATA_REFUSALS_MAX: u64 = 16;
/// How long a peer banned for breaking the protocol stays banned (it is disconnected, its connections refused,
/// and its data plane neither served nor asked).
pub const PROTOCOL_BAN: Duration = Duration::from_secs(3600);
/// Peers remembered as banned for breaking the protocol; the longest-banned are forgotten beyond this.
pub const PROTOCOL_BANS_MAX: usize = 4096;

/// Things tasks and the admin API tell the loop.
pub enum LoopEvent {
    Staged {
        seq: u64,
        result: Result<Prepared>,
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
        changes: Vec<Change>,
        result: Result<ApplyReport>,
    },
    /// The origin's data plane asks how to answer a request.
    Serve {
        peer: PeerId,
        chunks: Vec<ChunkId>,
        reply: oneshot::Sender<Vec<Decision>>,
    },
    /// The admin API asks the origin to publish.
    Publish {
        reply: oneshot::Sender<Result<PublishReply, String>>,
    },
    /// Something changed in the served tree (origin watch mode).
    TreeChanged,
    Published {
        result: Box<Result<PublishReport>>,
        reply: Option<oneshot::Sender<Result<PublishReply, String>>>,
    },
}

enum Pending {
    Hello { sent: Instant },
    Have { sent: Instant },
    Nodes { peer: PeerId, req: ReqId },
    Delta { peer: PeerId, req: ReqId },
}

#[derive(Default)]
struct PeerState {
    address: Option<Multiaddr>,
    data_addrs: Vec<SocketAddr>,
    connected_since_ms: u64,
    banned: bool,
    /// Control-plane round trip, milliseconds, smoothed.
    rtt_ms: Option<f64>,
    /// Chunk delivery rate to this node, bytes per second, smoothed over requests.
    rate: Option<f64>,
    /// Malformed control requests received from the peer.
    malformed: u32,
}

/// Weight of a new sample in the smoothed RTT and delivery rate.
const SMOOTHING: f64 = 0.3;

fn smooth(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |o| (1.0 - SMOOTHING) * o + SMOOTHING * sample))
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

struct Bootstrap {
    peer: PeerId,
    addr: Multiaddr,
    connected: bool,
    next_dial: Instant,
    backoff: Duration,
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
    peers: BTreeMap<PeerId, PeerState>,
    origins: Vec<PeerId>,
    pending: HashMap<OutboundRequestId, Pending>,
    /// Chunk requests running, and when each was sent.
    fetches: HashMap<ReqId, (tokio::task::AbortHandle, Instant)>,
    bootstrap: Vec<Bootstrap>,
    /// Open control-plane connections per peer, and whether the peer dialed them.
    connections: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    /// When each connection last brought an answer to one of this node's control requests.
    control_answered: HashMap<ConnectionId, Instant>,
    /// Peers banned for breaking the protocol, until when.
    protocol_bans: HashMap<PeerId, Instant>,
    /// Peers whose data plane this node floods (fault injection).
    flooding: std::collections::BTreeSet<PeerId>,
    events_tx: mpsc::Sender<LoopEvent>,
    events_rx: mpsc::Receiver<LoopEvent>,
    status_tx: watch::Sender<Status>,
    counters: BTreeMap<String, u64>,
    last_error: Option<String>,
    publishing: bool,
    next_deletion_check: Instant,
    /// Files and bytes of the applied snapshot (for status).
    totals: (u64, u64),
    pending_deletions: u64,
    listen_addrs: Vec<Multiaddr>,
    /// Origin watch mode: the tree watcher (kept alive) and when the tree last changed, if not yet published.
    _watcher: Option<notify::RecommendedWatcher>,
    tree_changed_at: Option<Instant>,
    metrics: Metrics,
    started: Instant,
    sync: SyncProgress,
    /// Origin: chunk bytes served when the newest snapshot was published.
    served_at_publish: u64,
    /// When the status was last published, and what clients wait on in it then.
    status_published: Option<(Instant, StatusKey)>,
    /// Span of the sync in progress (none when idle): log lines about it carry its sequence number.
    sync_span: tracing::Span,
}

/// What the admin server and tests hold onto.
#[derive(Clone)]
pub struct Handle {
    pub status: watch::Receiver<Status>,
    pub events: mpsc::Sender<LoopEvent>,
    pub data_addr: SocketAddr,
    pub listen_addrs: Vec<Multiaddr>,
    pub metrics: Metrics,
}

fn verified(root: &SignedRoot) -> Result<VerifiedRoot> {
    let body = root.verify_signature().map_err(|e| anyhow!("stored root does not verify: {e}"))?;
    Ok(VerifiedRoot { signed: root.clone(), body })
}

impl Daemon {
    /// Opens the node's state, binds its sockets and returns the daemon (not yet running) and a handle to it.
    pub async fn start(cfg: Config) -> Result<(Self, Handle)> {
        let key = NodeKey::load(&cfg.key)?;
        let store = Arc::new(StateStore::open(&cfg.state_dir)?);
        let staging = Arc::new(Staging::open(&cfg.staging_dir, &cfg.tree)?);
        let reader = store.reader()?;
        let applied = reader.applied(&cfg.repo)?.map(|r| verified(&r)).transpose()?;
        let latest = reader.root(&cfg.repo)?.map(|r| verified(&r)).transpose()?;
        let index = match &applied {
            Some(root) => ChunkIndex::build(&reader, &root.body.root)?,
            None => ChunkIndex::default(),
        };
        let totals = applied.as_ref().map_or((0, 0), |a| (a.body.files, a.body.bytes));
        drop(reader);

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
        let salt =
            u64::from_le_bytes(blake3::hash(&key.peer_id().to_bytes()).as_bytes()[..8].try_into().unwrap_or([0; 8]));
        let engine_cfg = EngineConfig {
            repo: cfg.repo.clone(),
            role,
            trusted,
            origins: origins.iter().copied().collect(),
            salt,
            scheduler: SchedulerLimits::default(),
            seeder: SeederLimits::default(),
            have_flush_ms: mirrormesh_proto::sync::HAVE_FLUSH_MS,
        };
        let engine = Engine::new(engine_cfg, applied, latest);

        let (events_tx, events_rx) = mpsc::channel(LOOP_EVENTS_MAX);
        let index = Arc::new(RwLock::new(index));
        let serving = serving::Serving {
            staging: staging.clone(),
            index: index.clone(),
            tree: cfg.tree.clone(),
            decide_via: (role == Role::Origin).then(|| events_tx.clone()),
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

        let mut swarm = swarm::build(&key, cfg.faults.malformed_control)?;
        if cfg.faults.any() {
            tracing::warn!(faults = ?cfg.faults, "fault injection enabled: this node misbehaves on purpose (tests only)");
        }
        let topic = gossipsub::IdentTopic::new(roots_topic(&cfg.repo));
        swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| anyhow!("subscribing to {topic}: {e}"))?;
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

        let bootstrap = cfg
            .bootstrap
            .iter()
            .filter(|(peer, _)| *peer != key.peer_id())
            .map(|(peer, addr)| Bootstrap {
                peer: *peer,
                addr: addr.clone(),
                connected: false,
                next_dial: Instant::now(),
                backoff: REDIAL_MIN,
            })
            .collect();
        let (status_tx, status_rx) = watch::channel(Status::default());
        let pending_deletions = store.reader()?.pending_deletions()?.len() as u64;
        let watcher = if cfg.watch { Some(watch_tree(&cfg.tree, events_tx.clone())?) } else { None };
        let handle = Handle {
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
            peers: BTreeMap::new(),
            origins,
            pending: HashMap::new(),
            fetches: HashMap::new(),
            bootstrap,
            connections: HashMap::new(),
            control_answered: HashMap::new(),
            protocol_bans: HashMap::new(),
            flooding: Default::default(),
            events_tx,
            events_rx,
            status_tx,
            counters: BTreeMap::new(),
            last_error: None,
            publishing: false,
            next_deletion_check: Instant::now(),
            totals,
            pending_deletions,
            listen_addrs,
            // Whatever happened to the tree while the daemon was down is published once it is quiet.
            tree_changed_at: watcher.as_ref().map(|_| Instant::now()),
            _watcher: watcher,
            metrics: handle.metrics.clone(),
            started: Instant::now(),
            sync: SyncProgress::default(),
            served_at_publish: 0,
            status_published: None,
            sync_span: tracing::Span::none(),
        };
        // The admin API answers with the state read from disk from its first request on.
        let key = daemon.status_key();
        daemon.publish_status(key);
        Ok((daemon, handle))
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tracing::info!(node = %self.key.peer_id(), role = ?self.cfg.role, data = %self.data.local_addr(), "mirrormesh daemon running");
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        self.dial_bootstrap();
        self.drive()?;
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(event) = self.events_rx.recv() => self.on_loop_event(event),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tick.tick() => self.on_tick(),
            }
            if let Err(e) = self.drive() {
                self.error(format!("{e:#}"));
            }
        }
        self.data.close();
        Ok(())
    }

    fn error(&mut self, message: String) {
        tracing::error!("{message}");
        self.last_error = Some(message);
    }

    fn count(&mut self, what: impl Into<String>) {
        *self.counters.entry(what.into()).or_default() += 1;
    }

    // ---- the engine ---------------------------------------------------------------------------------------

    /// Executes the engine's outputs, ticking it again while it has deferred work.
    fn drive(&mut self) -> Result<()> {
        let span = self.sync_span.clone();
        let _sync = span.enter();
        for _ in 0..16 {
            while let Some(out) = self.engine.poll_output() {
                self.execute(out)?;
            }
            if !self.engine.wants_tick() {
                break;
            }
            let reader = self.store.reader()?;
            self.engine.handle_tick(now(), &reader)?;
        }
        let key = self.status_key();
        if self.status_published.as_ref().is_none_or(|(at, was)| *was != key || at.elapsed() >= STATUS_INTERVAL) {
            self.publish_status(key);
        }
        Ok(())
    }

    fn status_key(&self) -> StatusKey {
        let engine = self.engine.status();
        StatusKey {
            phase: engine.phase,
            current: engine.current.map(|c| c.0),
            target: engine.target.map(|t| t.0),
            waiting_for_origin: engine.waiting_for_origin,
            peers: engine.peers,
            staged: self.sync.staged_seq,
            last_error: self.last_error.clone(),
        }
    }

    fn execute(&mut self, out: Output<PeerId>) -> Result<()> {
        match out {
            Output::Gossip(root) => {
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), root.encode()) {
                    // No subscribed peer yet, or a duplicate: peers learn the root from hellos instead.
                    tracing::debug!("gossip not sent: {e}");
                }
            }
            Output::SendHello(peer, mut hello) => {
                hello.data_addrs = vec![self.data_addr_text()];
                self.fault_lie(&mut hello.complete_seq);
                let id = self.swarm.behaviour_mut().control.send_request(&peer, ControlRequest::Hello(hello).into());
                self.pending.insert(id, Pending::Hello { sent: Instant::now() });
            }
            Output::SendHave(peer, mut have) => {
                self.fault_lie(&mut have.complete_seq);
                let id = self.swarm.behaviour_mut().control.send_request(&peer, ControlRequest::Have(have).into());
                self.pending.insert(id, Pending::Have { sent: Instant::now() });
            }
            Output::FetchNodes { peer, req, hashes } => {
                let id =
                    self.swarm.behaviour_mut().control.send_request(&peer, ControlRequest::GetNodes { hashes }.into());
                self.pending.insert(id, Pending::Nodes { peer, req });
            }
            Output::FetchDelta { peer, req, hash } => {
                let id =
                    self.swarm.behaviour_mut().control.send_request(&peer, ControlRequest::GetDelta { hash }.into());
                self.pending.insert(id, Pending::Delta { peer, req });
            }
            Output::StoreNodes(nodes) => {
                let mut writer = self.store.writer()?;
                for (hash, bytes) in nodes {
                    writer.put_node(hash, bytes);
                }
                writer.commit()?;
            }
            Output::StoreDelta(hash, bytes) => {
                let mut writer = self.store.writer()?;
                writer.put_delta(&hash, &bytes)?;
                writer.commit()?;
            }
            Output::Stage { seq, files } => {
                self.sync.files = Some(progress::FileProgress::new(seq, &files));
                let staging = self.staging.clone();
                let index = self.index.clone();
                let events = self.events_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = match index.read() {
                        Ok(index) => staging.prepare(seq, &files, &index),
                        Err(_) => Err(anyhow!("chunk index lock poisoned")),
                    };
                    let _ = events.blocking_send(LoopEvent::Staged { seq, result });
                });
            }
            Output::FetchChunks { peer, req, chunks } => self.fetch_chunks(peer, req, chunks),
            Output::Cancel { req, .. } => {
                if let Some((task, _)) = self.fetches.remove(&req) {
                    task.abort();
                }
            }
            Output::Apply { target, base } => {
                let staging = self.staging.clone();
                let store = self.store.clone();
                let globs = self.cfg.index_globs.clone();
                let events = self.events_tx.clone();
                tracing::info!(seq = target.body.seq, "applying snapshot");
                tokio::task::spawn_blocking(move || {
                    let diffed = store.reader().and_then(|reader| {
                        let (changes, _) = mirrormesh_proto::diff::diff(&reader, base.as_ref(), &target.body.root)?;
                        Ok(changes)
                    });
                    let (changes, result) = match diffed {
                        Ok(changes) => {
                            let result = apply::apply(&staging, &changes, &globs);
                            (changes, result)
                        }
                        Err(e) => (Vec::new(), Err(e.context("diffing the snapshot to apply"))),
                    };
                    let _ = events.blocking_send(LoopEvent::Applied { target: Box::new(target), changes, result });
                });
            }
            Output::Ban { peer, reason } => {
                tracing::warn!(%peer, ?reason, "peer banned for this snapshot");
                self.peers.entry(peer).or_default().banned = true;
                self.count(format!("peers_banned_{reason:?}").to_lowercase());
            }
            Output::Notice(notice) => self.notice(notice)?,
        }
        Ok(())
    }

    fn notice(&mut self, notice: Notice<PeerId>) -> Result<()> {
        match notice {
            Notice::RootAccepted { seq } => {
                tracing::info!(seq, "accepted a new root");
                self.count("roots_accepted");
                if self.cfg.role == RoleName::Mirror {
                    self.sync_span = tracing::info_span!("sync", seq);
                    self.sync.started = Some((seq, Instant::now()));
                    self.sync.need_bytes = 0;
                }
                if let Some(latest) = self.engine.latest() {
                    let mut writer = self.store.writer()?;
                    writer.set_root(&latest.signed, &self.cfg.repo)?;
                    writer.commit()?;
                }
            }
            Notice::RootRejected { from, error } => {
                tracing::warn!(?from, %error, "root rejected");
                self.count(format!("roots_rejected_{}", error.reason()));
            }
            Notice::DeltaRejected => self.count("deltas_rejected"),
            Notice::WaitingForOrigin { chunks } => {
                tracing::warn!(chunks, "waiting for origin: some chunks exist on no reachable peer");
            }
            Notice::ManifestError(e) => self.error(format!("manifest: {e}")),
            Notice::WrongRepo { from } => {
                tracing::debug!(%from, "peer speaks of another repository");
                self.count("messages_wrong_repo");
            }
            Notice::LocalFailure => self.count("local_write_failures"),
            Notice::SyncComplete { seq } => {
                tracing::info!(seq, "snapshot applied");
                self.count("syncs_completed");
                let t = now();
                let lag = self.engine.current().filter(|c| c.body.seq == seq).map(|c| t.millis_since(c.body.created));
                self.sync.last_apply_ms = Some(t.0);
                self.sync.propagation_lag_ms = lag;
                self.sync.staged_seq = None;
                self.sync.files = None;
                self.sync_span = tracing::Span::none();
                if let Some((_, started)) = self.sync.started.take() {
                    self.metrics.observe_sync(started.elapsed().as_secs_f64(), lag.map(|l| l as f64 / 1000.0));
                }
            }
        }
        Ok(())
    }

    fn data_addr_text(&self) -> String {
        self.data.local_addr().to_string()
    }

    fn fetch_chunks(&mut self, peer: PeerId, req: ReqId, chunks: Vec<ChunkId>) {
        let addrs = self.peers.get(&peer).map(|p| p.data_addrs.clone()).unwrap_or_default();
        let data = self.data.clone();
        let staging = self.staging.clone();
        let events = self.events_tx.clone();
        let span = tracing::info_span!(parent: &self.sync_span, "fetch", %peer, req = req.0);
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut outcomes = Vec::with_capacity(chunks.len());
                // Verified chunks are written once the request is done, on the blocking pool: a write into the
                // page cache would hold up this runtime thread, and with it the QUIC connections it drives. A
                // request asks for about `request_bytes_target`, so this holds about that much.
                let mut verified = Vec::new();
                let result = if addrs.is_empty() {
                    Err(anyhow!("no data-plane address known for {peer}"))
                } else {
                    data.fetch(peer, &addrs, chunks, |id, fetched| {
                        let outcome = match fetched {
                            Fetched::Verified(data) => {
                                verified.push((outcomes.len(), id, data));
                                ChunkOutcome::Verified
                            }
                            Fetched::Corrupt => ChunkOutcome::Corrupt,
                            Fetched::Missing => ChunkOutcome::Missing,
                            Fetched::Elsewhere(peers) => ChunkOutcome::Elsewhere(peers),
                        };
                        outcomes.push((id, outcome));
                    })
                    .await
                };
                let mut bytes = 0;
                if !verified.is_empty() {
                    let written = tokio::task::spawn_blocking(move || {
                        let keep =
                            |(at, id, data): (usize, ChunkId, bytes::Bytes)| match staging.write_chunk(&id, &data) {
                                Ok(_) => (at, Some(data.len() as u64)),
                                Err(e) => {
                                    tracing::error!("keeping chunk {id}: {e:#}");
                                    (at, None)
                                }
                            };
                        verified.into_iter().map(keep).collect::<Vec<_>>()
                    })
                    .await;
                    match written {
                        Ok(written) => {
                            for (at, kept) in written {
                                match kept {
                                    Some(len) => bytes += len,
                                    None => outcomes[at].1 = ChunkOutcome::Dropped,
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!("writing fetched chunks failed: {e}");
                            for (_, outcome) in outcomes.iter_mut().filter(|(_, o)| *o == ChunkOutcome::Verified) {
                                *outcome = ChunkOutcome::Dropped;
                            }
                        }
                    }
                }
                let unreachable = result.as_ref().err().is_some_and(|e| e.downcast_ref::<Unreachable>().is_some());
                let error = result.err().map(|e| format!("{e:#}"));
                let _ = events.send(LoopEvent::Fetched { peer, req, outcomes, bytes, error, unreachable }).await;
            },
            span,
        ));
        self.fetches.insert(req, (task.abort_handle(), Instant::now()));
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
            LoopEvent::Staged { seq, result } => match result {
                Ok(prepared) => {
                    tracing::info!(
                        seq,
                        held = prepared.held.len(),
                        resumed = prepared.resumed,
                        copied = prepared.copied,
                        "staged"
                    );
                    self.sync.staged_seq = Some(seq);
                    if let Some(files) = self.sync.files.as_mut().filter(|f| f.seq == seq) {
                        for id in &prepared.held {
                            files.held(id);
                        }
                    }
                    self.engine.handle_staged(t, seq, prepared.held);
                }
                Err(e) => {
                    self.error(format!("staging snapshot {seq}: {e:#}"));
                    self.count("staging_failures");
                }
            },
            LoopEvent::Fetched { peer, req, outcomes, bytes, error, unreachable } => {
                if let Some((_, sent)) = self.fetches.remove(&req)
                    && bytes > 0
                    && let Some(state) = self.peers.get_mut(&peer)
                {
                    state.rate = smooth(state.rate, bytes as f64 / sent.elapsed().as_secs_f64().max(1e-6));
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
                    self.engine.handle_chunk(t, peer, req, id, outcome);
                }
                if dropped {
                    self.last_error = Some("could not write staged chunks (is the staging filesystem full?)".into());
                } else if bytes > 0
                    && self.last_error.as_deref().is_some_and(|e| e.starts_with("could not write staged"))
                {
                    self.last_error = None;
                }
                match error {
                    Some(e) => {
                        tracing::debug!(%peer, "chunk request failed: {e}");
                        self.count("chunk_requests_failed");
                        self.engine.handle_chunks_failed(t, peer, req);
                        if unreachable && self.swarm.is_connected(&peer) {
                            // Its data plane is gone, so the peer is (it died, or the network between us did):
                            // drop it now rather than when the control connection's idle timeout notices, so the
                            // sync goes on with the others (or waits for the origin) and the peer is redialed.
                            tracing::warn!(%peer, "peer unreachable: {e}; disconnecting");
                            self.count("peers_unreachable");
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                    }
                    None => self.engine.handle_chunks_done(t, peer, req, bytes),
                }
            }
            LoopEvent::Applied { target, changes, result } => self.on_applied(*target, changes, result)?,
            LoopEvent::Serve { peer, chunks, reply } => {
                let decisions = chunks
                    .iter()
                    .map(|id| match self.engine.serve_decision(t, &peer, id) {
                        ServeDecision::Serve => Decision::Serve,
                        ServeDecision::Elsewhere(peers) => Decision::Elsewhere(peers),
                        ServeDecision::Refuse => Decision::Missing,
                    })
                    .collect();
                let _ = reply.send(decisions);
            }
            LoopEvent::Publish { reply } => self.start_publish(Some(reply)),
            LoopEvent::TreeChanged => self.tree_changed_at = Some(Instant::now()),
            LoopEvent::Published { result, reply } => self.on_published(*result, reply)?,
        }
        Ok(())
    }

    fn on_applied(&mut self, target: VerifiedRoot, changes: Vec<Change>, result: Result<ApplyReport>) -> Result<()> {
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                // The tree is consistent (see apply.rs); the engine retries the sync from its current state.
                self.error(format!("applying snapshot {}: {e:#}", target.body.seq));
                self.count("apply_failures");
                return Ok(());
            }
        };
        let due = now().plus_ms(self.cfg.delete_grace.as_millis() as u64).0;
        let mut writer = self.store.writer()?;
        writer.set_applied(&target.signed, &self.cfg.repo)?;
        for path in &report.written {
            writer.remove_pending_deletion(path)?;
        }
        for path in &report.removals {
            if !report.written.contains(path) {
                writer.add_pending_deletion(path, due)?;
            }
        }
        writer.commit()?;
        self.pending_deletions = self.store.reader()?.pending_deletions()?.len() as u64;
        if let Ok(mut index) = self.index.write() {
            index.apply(&changes);
        }
        if let Err(e) = self.staging.finish() {
            tracing::warn!("cleaning staging: {e:#}");
        }
        self.totals = (target.body.files, target.body.bytes);
        self.last_error = None;
        tracing::info!(
            seq = target.body.seq,
            files = report.files,
            index_files = report.index_files,
            removals = report.removals.len(),
            "snapshot in place"
        );
        let reader = self.store.reader()?;
        self.engine.handle_applied(now(), target.body.seq, &reader)?;
        Ok(())
    }

    fn start_publish(&mut self, reply: Option<oneshot::Sender<Result<PublishReply, String>>>) {
        if self.cfg.role != RoleName::Origin {
            if let Some(reply) = reply {
                let _ = reply.send(Err("this node is a mirror; only the origin publishes".into()));
            }
            return;
        }
        if self.publishing {
            if let Some(reply) = reply {
                let _ = reply.send(Err("a publish is already running".into()));
            }
            return;
        }
        self.publishing = true;
        let store = self.store.clone();
        let key = self.key.clone();
        let tree = self.cfg.tree.clone();
        let repo = self.cfg.repo.clone();
        let validity = self.cfg.validity;
        let events = self.events_tx.clone();
        tokio::task::spawn_blocking(move || {
            let opts = PublishOptions { tree: &tree, repo, validity, progress: false };
            let result = publish(&store, &key, &opts);
            let _ = events.blocking_send(LoopEvent::Published { result: Box::new(result), reply });
        });
    }

    fn on_published(
        &mut self,
        result: Result<PublishReport>,
        reply: Option<oneshot::Sender<Result<PublishReply, String>>>,
    ) -> Result<()> {
        self.publishing = false;
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                let message = format!("publishing: {e:#}");
                self.error(message.clone());
                if self._watcher.is_some() {
                    // Most likely the tree changed under the scan: try again once it is quiet.
                    self.tree_changed_at = Some(Instant::now());
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Err(message));
                }
                return Ok(());
            }
        };
        let reader = self.store.reader()?;
        let index = ChunkIndex::build(&reader, &report.body.root)?;
        let chunks = mirrormesh_proto::sync::ChunkSet::of_snapshot(&reader, &report.body.root)?;
        drop(reader);
        if let Ok(mut current) = self.index.write() {
            *current = index;
        }
        let accepted = self.engine.handle_published(now(), report.signed.clone(), chunks);
        if let Err(e) = accepted {
            let message = format!("publishing: the engine refused the new root: {e}");
            self.error(message.clone());
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
        self.served_at_publish = self.data.traffic().values().map(|t| t.bytes_sent).sum();
        self.metrics.published(report.changed_bytes);
        tracing::info!(seq = report.body.seq, root = %report.body.root, files = report.body.files, changes = report.changes, "published");
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
        let t = now();
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                if let Some(allow) = &self.cfg.allow
                    && !allow.contains(&peer_id)
                {
                    tracing::warn!(peer = %peer_id, "peer not in network.allow; disconnecting");
                    self.count("peers_refused_not_allowed");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return Ok(());
                }
                if self.protocol_bans.get(&peer_id).is_some_and(|until| Instant::now() < *until) {
                    tracing::debug!(peer = %peer_id, "refusing a connection from a banned peer");
                    self.count("connections_refused_banned");
                    let _ = self.swarm.close_connection(connection_id);
                    return Ok(());
                }
                let inbound = endpoint.is_listener();
                let connections = self.connections.entry(peer_id).or_default();
                if inbound && num_established.get() > 1 {
                    // The peer dialed again although it had dialed before: it restarted or lost its network, so
                    // its earlier connections are dead (they would swallow requests until their idle timeout).
                    // Close them and greet it afresh.
                    let stale: Vec<ConnectionId> =
                        connections.iter().filter(|(_, inbound)| *inbound).map(|(id, _)| *id).collect();
                    if !stale.is_empty() {
                        connections.retain(|(id, _)| !stale.contains(id));
                        tracing::info!(stale = stale.len(), "peer reconnected; closing its earlier connections");
                        self.count("connections_replaced");
                        for id in stale {
                            self.swarm.close_connection(id);
                        }
                        self.engine.handle_peer_disconnected(t, &peer_id);
                        self.engine.handle_peer_connected(t, peer_id);
                    }
                }
                self.connections.entry(peer_id).or_default().push((connection_id, inbound));
                let state = self.peers.entry(peer_id).or_default();
                state.address = Some(endpoint.get_remote_address().clone());
                if num_established.get() == 1 {
                    state.connected_since_ms = t.0;
                    tracing::info!(addr = %endpoint.get_remote_address(), "connected");
                    for b in self.bootstrap.iter_mut().filter(|b| b.peer == peer_id) {
                        b.connected = true;
                        b.backoff = REDIAL_MIN;
                    }
                    self.engine.handle_peer_connected(t, peer_id);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
                if let Some(connections) = self.connections.get_mut(&peer_id) {
                    connections.retain(|(id, _)| *id != connection_id);
                }
                self.control_answered.remove(&connection_id);
                if num_established > 0 {
                    return Ok(());
                }
                self.connections.remove(&peer_id);
                tracing::info!("disconnected");
                self.peers.remove(&peer_id);
                for b in self.bootstrap.iter_mut().filter(|b| b.peer == peer_id) {
                    b.connected = false;
                    b.next_dial = Instant::now() + b.backoff;
                }
                self.engine.handle_peer_disconnected(t, &peer_id);
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                tracing::debug!(peer = %peer_id, "dial failed: {error}");
                for b in self.bootstrap.iter_mut().filter(|b| b.peer == peer_id && !b.connected) {
                    b.next_dial = Instant::now() + b.backoff;
                    b.backoff = (b.backoff * 2).min(REDIAL_MAX);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => match SignedRoot::decode(&message.data) {
                Ok(root) => {
                    let reader = self.store.reader()?;
                    self.engine.handle_root(t, RootVia::Gossip(propagation_source), root, &reader)?;
                }
                Err(e) => {
                    tracing::warn!(peer = %propagation_source, "undecodable gossip: {e}");
                    self.count("gossip_malformed");
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Control(event)) => self.on_control(event)?,
            _ => {}
        }
        Ok(())
    }

    fn on_control(&mut self, event: request_response::Event<WireRequest, ControlResponse>) -> Result<()> {
        let t = now();
        let peer = match &event {
            request_response::Event::Message { peer, .. }
            | request_response::Event::OutboundFailure { peer, .. }
            | request_response::Event::InboundFailure { peer, .. }
            | request_response::Event::ResponseSent { peer, .. } => *peer,
        };
        let sync = self.sync_span.clone();
        let _sync = sync.enter();
        let _peer = tracing::info_span!("peer", %peer).entered();
        match event {
            request_response::Event::Message { peer, connection_id, message } => match message {
                request_response::Message::Request { request: WireRequest::Valid(request), channel, .. } => {
                    let response = self.answer(peer, request)?;
                    let _ = self.swarm.behaviour_mut().control.send_response(channel, response);
                }
                request_response::Message::Request { request: WireRequest::Malformed(why), .. } => {
                    // Not answered: dropping the channel resets the stream.
                    tracing::debug!(%peer, "malformed control request: {why}");
                    self.count("control_malformed");
                    let state = self.peers.entry(peer).or_default();
                    state.malformed += 1;
                    let malformed = state.malformed;
                    if malformed >= CONTROL_MALFORMED_MAX {
                        let why = format!("{malformed} malformed control requests, the last: {why}");
                        self.ban_for_protocol(peer, "malformedcontrol", &why);
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    self.control_answered.insert(connection_id, Instant::now());
                    let reader = self.store.reader()?;
                    let pending = self.pending.remove(&request_id);
                    if let Some(Pending::Hello { sent } | Pending::Have { sent }) = &pending
                        && let Some(state) = self.peers.get_mut(&peer)
                    {
                        state.rtt_ms = smooth(state.rtt_ms, sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    match (pending, response) {
                        (Some(Pending::Hello { .. }), ControlResponse::Hello(hello)) => {
                            self.learn_data_addrs(peer, &hello.data_addrs);
                            self.engine.handle_hello(t, peer, hello, &reader)?;
                        }
                        (Some(Pending::Nodes { peer, req }), ControlResponse::Nodes { nodes }) => {
                            let nodes = nodes.into_iter().map(|n| n.map(ByteBuf::into_vec)).collect();
                            self.engine.handle_nodes(t, peer, req, nodes, &reader)?;
                        }
                        (Some(Pending::Delta { peer, req }), ControlResponse::Delta { delta }) => {
                            self.engine.handle_delta(t, peer, req, delta.map(ByteBuf::into_vec), &reader)?;
                        }
                        (Some(Pending::Nodes { peer, req } | Pending::Delta { peer, req }), other) => {
                            tracing::warn!(%peer, ?other, "unexpected answer to a manifest fetch");
                            self.count("control_unexpected_responses");
                            self.engine.handle_fetch_failed(t, peer, req);
                        }
                        _ => {}
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, connection_id, request_id, error } => {
                tracing::debug!(%peer, "control request failed: {error}");
                self.count("control_requests_failed");
                let answering = self
                    .control_answered
                    .get(&connection_id)
                    .is_some_and(|at| at.elapsed() < crate::swarm::CONTROL_TIMEOUT);
                if matches!(error, request_response::OutboundFailure::Timeout) && answering {
                    // It answered other requests on this connection meanwhile: it is slow (an origin that dozens of
                    // mirrors ask at once), not gone, and closing would throw away everything else in flight.
                    tracing::debug!(%peer, "control request timed out on a connection that still answers");
                    self.count("control_requests_slow");
                } else if matches!(error, request_response::OutboundFailure::Timeout) {
                    // A peer that does not answer within the control timeout is gone, or its connection is:
                    // close it so the peer is redialed (or greeted afresh on the connection it still has).
                    tracing::info!(%peer, "control request timed out; closing the connection");
                    self.swarm.close_connection(connection_id);
                    let others =
                        self.connections.get(&peer).is_some_and(|c| c.iter().any(|(id, _)| *id != connection_id));
                    if others {
                        self.engine.handle_peer_disconnected(t, &peer);
                        self.engine.handle_peer_connected(t, peer);
                    }
                }
                if let Some(Pending::Nodes { peer, req } | Pending::Delta { peer, req }) =
                    self.pending.remove(&request_id)
                {
                    self.engine.handle_fetch_failed(t, peer, req);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "control request from peer failed: {error}");
                self.count("control_inbound_failures");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
        Ok(())
    }

    fn answer(&mut self, peer: PeerId, request: ControlRequest) -> Result<ControlResponse> {
        let t = now();
        let reader = self.store.reader()?;
        Ok(match request {
            ControlRequest::Hello(hello) => {
                self.learn_data_addrs(peer, &hello.data_addrs);
                self.engine.handle_hello(t, peer, hello, &reader)?;
                let mut mine = self.engine.hello();
                mine.data_addrs = vec![self.data_addr_text()];
                self.fault_lie(&mut mine.complete_seq);
                ControlResponse::Hello(mine)
            }
            ControlRequest::Have(have) => {
                self.engine.handle_have(t, peer, have);
                ControlResponse::Ack
            }
            ControlRequest::GetNodes { hashes } => {
                let mut total = 0;
                let mut nodes = Vec::with_capacity(hashes.len());
                for hash in &hashes {
                    let bytes = if total < NODES_RESPONSE_BYTES_MAX {
                        mirrormesh_proto::node_store::NodeSource::node_bytes(&reader, hash)?
                    } else {
                        None
                    };
                    total += bytes.as_ref().map_or(0, Vec::len);
                    nodes.push(bytes.map(ByteBuf::from));
                }
                ControlResponse::Nodes { nodes }
            }
            ControlRequest::GetDelta { hash } => {
                ControlResponse::Delta { delta: reader.delta(&hash)?.map(ByteBuf::from) }
            }
        })
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

    /// Bans `peer` for breaking the protocol: counted as `peers_banned_{reason}`, disconnected, its connections
    /// refused and its data plane neither served nor asked for [`PROTOCOL_BAN`].
    fn ban_for_protocol(&mut self, peer: PeerId, reason: &str, why: &str) {
        if self.protocol_bans.get(&peer).is_some_and(|until| Instant::now() < *until) {
            return;
        }
        tracing::warn!(%peer, reason, "peer banned for breaking the protocol: {why}");
        self.count(format!("peers_banned_{reason}"));
        if self.protocol_bans.len() >= PROTOCOL_BANS_MAX
            && let Some(oldest) = self.protocol_bans.iter().min_by_key(|(_, until)| **until).map(|(p, _)| *p)
        {
            self.protocol_bans.remove(&oldest);
        }
        self.protocol_bans.insert(peer, Instant::now() + PROTOCOL_BAN);
        self.data.deny(peer);
        if let Some(state) = self.peers.get_mut(&peer) {
            state.banned = true;
        }
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Records where a peer's data plane listens; an unspecified ip means the address its connection comes from.
    fn learn_data_addrs(&mut self, peer: PeerId, addrs: &[String]) {
        let seen_ip = self.peers.get(&peer).and_then(|p| p.address.as_ref()).and_then(ip_of);
        let mut parsed = Vec::new();
        for text in addrs {
            match text.parse::<SocketAddr>() {
                Ok(mut addr) => {
                    if addr.ip().is_unspecified()
                        && let Some(ip) = seen_ip
                    {
                        addr.set_ip(ip);
                    }
                    parsed.push(addr);
                }
                Err(_) => self.count("hello_bad_data_addr"),
            }
        }
        if !parsed.is_empty() {
            if self.cfg.faults.flood_data_plane && self.flooding.insert(peer) {
                let data = self.data.clone();
                let addrs = parsed.clone();
                tokio::spawn(async move { data.flood(peer, addrs).await });
            }
            self.peers.entry(peer).or_default().data_addrs = parsed;
        }
    }

    // ---- time ---------------------------------------------------------------------------------------------

    fn on_tick(&mut self) {
        let t = now();
        let result = self.store.reader().and_then(|reader| Ok(self.engine.handle_tick(t, &reader)?));
        if let Err(e) = result {
            self.error(format!("{e:#}"));
        }
        self.dial_bootstrap();
        if let Some(changed) = self.tree_changed_at
            && changed.elapsed() >= self.cfg.watch_quiet
            && !self.publishing
        {
            tracing::info!("tree quiet for {:?}: publishing", self.cfg.watch_quiet);
            self.tree_changed_at = None;
            self.start_publish(None);
        }
        if Instant::now() >= self.next_deletion_check {
            // An origin re-signs before half the validity of its root is left, so mirrors never hold an expired one.
            if self.cfg.role == RoleName::Origin
                && !self.publishing
                && let Some(current) = self.engine.current()
                && current.body.expires.millis_since(t) < self.cfg.validity.as_millis() as u64 / 2
            {
                tracing::info!(seq = current.body.seq, "root past half its validity: re-signing");
                self.start_publish(None);
            }
            self.next_deletion_check = Instant::now() + Duration::from_secs(1);
            let abusers: Vec<(PeerId, u64)> = self
                .data
                .traffic()
                .into_iter()
                .filter(|(peer, t)| t.refused >= DATA_REFUSALS_MAX && !self.protocol_bans.contains_key(peer))
                .map(|(peer, t)| (peer, t.refused))
                .collect();
            for (peer, refused) in abusers {
                self.ban_for_protocol(peer, "baddatarequests", &format!("{refused} data-plane requests refused"));
            }
            if let Err(e) = self.run_deletions(t) {
                self.error(format!("pending deletions: {e:#}"));
            }
        }
    }

    fn dial_bootstrap(&mut self) {
        let now = Instant::now();
        for b in &mut self.bootstrap {
            if !b.connected && now >= b.next_dial && !self.swarm.is_connected(&b.peer) {
                b.next_dial = now + b.backoff;
                b.backoff = (b.backoff * 2).min(REDIAL_MAX);
                if let Err(e) = self.swarm.dial(b.addr.clone()) {
                    tracing::debug!(addr = %b.addr, "dial: {e}");
                }
            }
        }
    }

    fn run_deletions(&mut self, t: Timestamp) -> Result<()> {
        let due: Vec<String> = self
            .store
            .reader()?
            .pending_deletions()?
            .into_iter()
            .filter(|(_, at)| *at <= t.0)
            .map(|(p, _)| p)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let mut ordered = due;
        ordered.sort_by(|a, b| b.matches('/').count().cmp(&a.matches('/').count()).then(b.cmp(a)));
        let mut writer = self.store.writer()?;
        for path in &ordered {
            apply::remove(&self.cfg.tree, path)?;
            writer.remove_pending_deletion(path)?;
        }
        writer.commit()?;
        self.pending_deletions = self.store.reader()?.pending_deletions()?.len() as u64;
        tracing::info!(count = ordered.len(), "removed files after the grace period");
        Ok(())
    }

    // ---- status -------------------------------------------------------------------------------------------

    fn publish_status(&mut self, key: StatusKey) {
        self.status_published = Some((Instant::now(), key));
        let engine = self.engine.status();
        let traffic = self.data.traffic();
        let syncing = engine.phase != "idle";
        let bytes_missing = engine.bytes_missing;
        if syncing {
            self.sync.need_bytes = self.sync.need_bytes.max(bytes_missing);
        }
        let progress = match engine.phase {
            "idle" => 1.0,
            "transferring" if self.sync.need_bytes > 0 => 1.0 - bytes_missing as f64 / self.sync.need_bytes as f64,
            "applying" => 1.0,
            _ => 0.0,
        };
        let target_seq = engine.target.map(|t| t.0);
        let files_missing = match &self.sync.files {
            Some(files) if syncing && Some(files.seq) == target_seq => files.files_missing(),
            _ => 0,
        };
        let repo = RepoStatus {
            name: engine.repo.to_string(),
            seq: engine.current.map(|c| c.0),
            root: engine.current.map(|c| c.1.to_hex()),
            state: if syncing { "syncing".into() } else { "idle".into() },
            phase: engine.phase.into(),
            target_seq,
            staged_seq: self.sync.staged_seq.filter(|_| syncing),
            progress,
            files_missing,
            bytes_missing,
            chunks_missing: engine.chunks_missing as u64,
            waiting_for_origin: engine.waiting_for_origin,
            files: self.totals.0,
            bytes: self.totals.1,
            pending_deletions: self.pending_deletions,
            last_apply_ms: self.sync.last_apply_ms,
            propagation_lag_ms: self.sync.propagation_lag_ms,
        };
        let mut peers = Vec::new();
        for (id, state) in &self.peers {
            let t = traffic.get(id);
            let banned = state.banned || self.engine.is_banned(id);
            peers.push(PeerStatus {
                id: id.to_string(),
                address: state.address.as_ref().map(ToString::to_string).unwrap_or_default(),
                data_address: state.data_addrs.first().map(ToString::to_string),
                origin: self.origins.contains(id),
                connected: self.swarm.is_connected(id),
                rtt_ms: state.rtt_ms,
                bytes_sent: t.map_or(0, |t| t.bytes_sent),
                bytes_received: t.map_or(0, |t| t.bytes_received),
                chunks_sent: t.map_or(0, |t| t.chunks_sent),
                chunks_received: t.map_or(0, |t| t.chunks_received),
                failures: t.map_or(0, |t| t.failures),
                banned,
                score: if banned { Some(0.0) } else { state.rate },
                complete_seq: self.engine.peer_complete_seq(id),
                connected_since_ms: state.connected_since_ms,
            });
        }
        let served = traffic.values().map(|t| t.bytes_sent).sum();
        let fetched = traffic.values().map(|t| t.bytes_received).sum();
        let from_origin = traffic.iter().filter(|(p, _)| self.origins.contains(p)).map(|(_, t)| t.bytes_received).sum();
        let mut counters = self.counters.clone();
        for (what, n) in self.data.refusals() {
            counters.insert(format!("data_refused_{what}"), n);
        }
        let seeder = self.engine.seeder_counts();
        if self.cfg.role == RoleName::Origin {
            counters.insert("origin_chunks_served".into(), seeder.served);
            counters.insert("origin_redirects".into(), seeder.redirects);
            counters.insert("origin_refused_complete_claims".into(), seeder.refused);
            counters.insert("origin_served_again_after_wait".into(), seeder.again.after_wait);
            counters.insert("origin_served_again_after_bans".into(), seeder.again.after_bans);
            counters.insert("origin_served_again_no_holder".into(), seeder.again.no_holder);
            counters.insert("origin_served_again_same_asker".into(), seeder.again.asked_again);
        }
        let status = Status {
            node_id: self.key.peer_id().to_string(),
            listen_addrs: self.listen_addrs.iter().map(ToString::to_string).collect(),
            data_addr: self.data.local_addr().to_string(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            role: match self.cfg.role {
                RoleName::Origin => "origin".into(),
                RoleName::Mirror => "mirror".into(),
            },
            repos: vec![repo],
            peers,
            bytes_served_total: served,
            bytes_fetched_total: fetched,
            bytes_fetched_from_origin: from_origin,
            counters,
            last_error: self.last_error.clone(),
        };
        let origin_sent = (self.cfg.role == RoleName::Origin).then(|| served.saturating_sub(self.served_at_publish));
        self.metrics.refresh(&status, origin_sent);
        self.status_tx.send_replace(status);
    }
}

/// What in the status a client may be waiting on: a change publishes it at once.
#[derive(PartialEq, Eq)]
struct StatusKey {
    phase: &'static str,
    current: Option<u64>,
    target: Option<u64>,
    waiting_for_origin: bool,
    peers: usize,
    staged: Option<u64>,
    last_error: Option<String>,
}

/// Watches the tree (recursively, inotify on Linux) and tells the loop when anything in it changes. Bursts
/// coalesce: a full event queue just drops the extra notifications.
fn watch_tree(tree: &std::path::Path, events: mpsc::Sender<LoopEvent>) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = events.try_send(LoopEvent::TreeChanged);
        }
    })
    .context("origin.watch: starting the tree watcher")?;
    watcher
        .watch(tree, notify::RecursiveMode::Recursive)
        .with_context(|| format!("origin.watch: watching {}", tree.display()))?;
    Ok(watcher)
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}
