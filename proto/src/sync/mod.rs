//! The sync engine: one repository's state machine, shared by the daemon and the simulator.
//!
//! The engine decides; its caller does. It takes events (a peer connected, a root arrived, nodes or chunks
//! arrived, its timer came) with the current time and returns what to do as [`Output`]s. It never reads a clock, opens a
//! socket or touches a disk: manifest nodes are read through a [`NodeSource`] the caller passes in, and everything
//! else the engine learns from events.
//!
//! # Call order
//! The engine has one input/output contract, as quinn-proto's connection does:
//! 1. Create it with [`Engine::new`] from the persisted state (the applied snapshot and the newest accepted root).
//! 2. Feed every event as an [`Input`] through [`Engine::handle`], with the two clocks ([`Now`]: monotonic time for
//!    every timer, wall-clock time for roots only) and the node store as a [`NodeSource`].
//! 3. After every call, take the outputs with [`Engine::poll_output`] and carry them out **in order**. Nodes of a
//!    `StoreNodes` must be readable through the source by the next call; `PersistRoot` must be durable before the
//!    next call; `Plan` is answered by [`Input::Planned`] (its job may run anywhere, e.g. on another thread, as long
//!    as no `StoreNodes` is skipped meanwhile), `Stage` by [`Input::Staged`], `Apply` by [`Input::Applied`] or
//!    [`Input::ApplyFailed`] (after an apply the caller reports the removals it recorded pending with
//!    [`Input::RemovalsScheduled`], before `Applied`), `RemoveDue` by [`Input::RemovalsDone`], every fetch by its
//!    answer or failure.
//! 4. Call `handle` with [`Input::Timeout`] once the time [`Engine::poll_timeout`] names has come (it is `None`
//!    when the engine waits only for events: an idle node sleeps).
//!
//! [`driver::step`] is that loop for one input; the daemon, the simulator and the engine tests all drive the engine
//! through it, each as a [`driver::Host`].
//!
//! # Life of a snapshot (mirror role)
//! A newer root is accepted ([`RootTracker`]) → its manifest is fetched (the delta when this node holds its base,
//! otherwise nodes; [`manifest_fetch`]) → the diff against the applied snapshot gives the files to stage (a job the
//! caller runs off its loop: [`planning`]) → the caller stages them, copying chunks it already holds, and reports what it holds → the rest is fetched from peers
//! ([`scheduler`]), with the origin asked only for chunks no peer holds → every chunk held: `Apply` → applied:
//! the node announces that it is complete at the new snapshot; the files the snapshot no longer names go once their
//! grace period is over ([`removals`]: the engine's timer names the instant, `RemoveDue` asks for the run). An apply that fails (a full disk, a permission) is
//! retried after `APPLY_RETRY_FIRST_MS`, doubling per failure in a row up to `APPLY_RETRY_MAX_MS` (phase
//! `apply-retrying`); if a newer root was accepted by the time of the retry, that one is synced instead.
//!
//! The origin role publishes instead of syncing ([`Input::Published`], with the snapshot's [`ChunkSet`])
//! and answers chunk requests through [`Engine::serve_decision`] ([`seeder`]).
//!
//! # What peers can make the engine remember
//! Every table keyed by what peers send has a global cap: the origin keeps announcements only of chunks of its
//! current snapshot (`HOLDER_ENTRIES_MAX` pairs), refuses requests for other chunks without remembering them (a
//! peer making more than `UNKNOWN_CHUNK_REQUESTS_MAX` is banned for the snapshot), and its seeder's tables have
//! caps of their own ([`seeder::SeederLimits`]). A mirror keeps announcements before it knows what its sync needs
//! (while it fetches the manifest) up to `HOLDINGS_PER_PEER_MAX` per peer and `HOLDINGS_PENDING_MAX` in all; from
//! planning on (staging, transfer) the scheduler keeps only chunks of the sync, as bits. Dropped announcements are
//! counted ([`Engine::announce_counts`]); [`Engine::table_sizes`] shows the tables' sizes.

pub mod apply_order;
pub mod availability;
pub mod bans;
pub mod chunk_set;
pub mod driver;
pub mod manifest_fetch;
pub mod planning;
pub mod removals;
pub mod scheduler;
pub mod seeder;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::chunk::ChunkId;
use crate::control::{HAVE_CHUNKS_MAX, Have, Hello};
use crate::delta::DeltaHash;
use crate::entry::FileMeta;
use crate::node::NodeHash;
use crate::node_store::{NodeSource, SourceError};
use crate::root::{PublisherKey, RepoId, RootError, RootTracker, SignedRoot, VerifiedRoot};
use crate::timestamp::{Mono, Now, Timestamp};
pub use chunk_set::ChunkSet;
use manifest_fetch::{FetchOut, ManifestFetch};
use planning::{PlanFailure, Ready};
use scheduler::{BanReason, ChunkOutcome, SchedOut, Scheduler, SchedulerLimits};
use seeder::{Seeder, SeederLimits, ServeDecision};

pub use apply_order::{IndexNames, Plan};
pub use planning::{PlanJob, Planned};

/// What the engine needs of a peer identity: the daemon uses libp2p `PeerId`s, the simulator integers.
pub trait PeerKey: Clone + Ord + Eq + std::hash::Hash + std::fmt::Debug {}
impl<T: Clone + Ord + Eq + std::hash::Hash + std::fmt::Debug> PeerKey for T {}

/// Correlates an answer with the request the engine asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Publishes snapshots and serves them, handing each chunk out about once.
    Origin,
    /// Follows the origin's snapshots, fetching from peers first.
    Mirror,
}

/// Chunks one peer may be recorded as holding before this node knows which chunks its sync needs (while it fetches
/// the manifest; beyond it, the peer's announcements are dropped and counted). A release is hundreds to thousands
/// of chunks and a whole Alpine repository about 8,100 per architecture; an announcement dropped here only means
/// the chunk may be asked of the origin, which redirects to its holders.
pub const HOLDINGS_PER_PEER_MAX: usize = 1 << 17;
/// Chunks recorded over all peers before this node knows which chunks its sync needs (see
/// `HOLDINGS_PER_PEER_MAX`): about 63 bytes each in a B-tree set (measured, `proto/tests/state_bounds.rs`), so at
/// most ~31 MiB. Once the sync is planned, announcements go to the scheduler, which keeps only chunks it needs.
pub const HOLDINGS_PENDING_MAX: usize = 1 << 19;
/// Origin: (chunk, peer) pairs remembered from announcements, over all chunks (at most `REDIRECT_PEERS_MAX` peers
/// per chunk, only chunks of the current snapshot). Redirects need holders only for chunks already handed out,
/// which in a release is the release's chunks (a whole Alpine architecture is ~8,100 chunks, x 8 peers = 65,000);
/// beyond it announcements are dropped and counted. About 186 bytes per pair with libp2p peer ids when each chunk
/// has one holder (the worst case; measured, `proto/tests/state_bounds.rs`): ~23 MiB at the cap.
pub const HOLDER_ENTRIES_MAX: usize = 1 << 17;
/// Origin: requests from one peer for chunks outside the current snapshot before it is banned for the snapshot.
/// An honest mirror asks for such a chunk only while it syncs to an older snapshot and has not heard of the newer
/// one (a round trip after publication), each chunk at most once; with the origin window of 1 MiB and requests of
/// 256 chunks that is far below this.
pub const UNKNOWN_CHUNK_REQUESTS_MAX: u32 = 1 << 16;
/// How often newly held chunks are announced to peers, by default.
pub const HAVE_FLUSH_MS: u64 = 50;
/// Peers remembered as suspect (banned or stalled in an earlier snapshot, not delivering since); beyond it the one
/// with the smallest id is forgotten. A mirror has tens of peers: this covers every peer of any mesh while bounding
/// what a stream of fresh identities can make this node remember.
pub const SUSPECTS_MAX: usize = 1024;
/// After this node fails to keep a chunk (staging write error, e.g. a full disk), no chunk is requested for this
/// long, then twice as long after each further attempt that fails in a row, up to `LOCAL_FAILURE_BACKOFF_MAX_MS`;
/// the error is reported each time. A full disk rarely frees itself within seconds, and each attempt fetches (from
/// the origin, often) what is then thrown away: without the doubling a mirror with a full disk would take about a
/// window (1 MiB) from the origin every 2 s for as long as it stays full.
pub const LOCAL_FAILURE_BACKOFF_FIRST_MS: u64 = 2_000;
/// The longest pause after failing to keep chunks: an operator who frees space sees the sync resume within a
/// minute.
pub const LOCAL_FAILURE_BACKOFF_MAX_MS: u64 = 60_000;
/// After an apply fails, it is tried again after this long, then after twice as long each time it fails again in a
/// row, up to `APPLY_RETRY_MAX_MS`. A second: a transient error (a file briefly locked, space freed by a log
/// rotation) costs little; the doubling keeps a lasting one (a full disk) from re-running the apply's staging
/// checks and renames every second.
pub const APPLY_RETRY_FIRST_MS: u64 = 1_000;
/// The longest wait between apply attempts: an operator who frees space sees the mirror catch up within a minute.
pub const APPLY_RETRY_MAX_MS: u64 = 60_000;

/// The wait after `failures` failures in a row (at least one): `first`, doubling per further failure, up to `max`.
fn backoff_ms(first: u64, max: u64, failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(u64::BITS - 1);
    first.saturating_mul(1 << doublings).min(max)
}

#[derive(Clone, Debug)]
pub struct EngineConfig<P> {
    pub repo: RepoId,
    pub role: Role,
    /// Publisher keys whose roots are accepted.
    pub trusted: Vec<PublisherKey>,
    /// Peers that are origins: asked last, and only for chunks no other peer holds.
    pub origins: BTreeSet<P>,
    /// Mixed into chunk tie-breaking so that nodes start on different chunks (derive it from the node id).
    pub salt: u64,
    pub scheduler: SchedulerLimits,
    pub seeder: SeederLimits,
    /// How often newly held chunks are announced (`HAVE_FLUSH_MS` by default).
    pub have_flush_ms: u64,
    /// Origin: once the current root has less than this left before it expires, ask for a re-signed one
    /// ([`Output::Republish`]; half the root validity, so mirrors never hold an expired root). `None`: never.
    pub resign_before_expiry_ms: Option<u64>,
    /// Which files are index files, placed last by an apply ([`Plan`]).
    pub index_names: IndexNames,
}

/// Origin: after an [`Output::Republish`] that brought no new root, it is asked for again this much later.
pub const REPUBLISH_RETRY_MS: u64 = 60_000;

/// A file to stage for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageFile {
    pub path: String,
    pub meta: FileMeta,
}

/// Where a root came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootVia<P> {
    Gossip(P),
    Hello(P),
    /// Local state or the operator.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<P> {
    /// Publish this root on the repository's gossip topic.
    Gossip(SignedRoot),
    /// Send this hello to a peer (as a request; it answers with its own).
    SendHello(P, Hello),
    SendHave(P, Have),
    FetchNodes {
        peer: P,
        req: ReqId,
        hashes: Vec<crate::node::NodeHash>,
        /// Nodes below them the answer may carry as well (`GetNodes`).
        descendants_max: u16,
    },
    FetchDelta {
        peer: P,
        req: ReqId,
        hash: DeltaHash,
    },
    /// Verified manifest nodes, children before parents: store them durably, in order.
    StoreNodes(Vec<(NodeHash, Vec<u8>)>),
    /// A verified delta: keep it to serve to peers.
    StoreDelta(DeltaHash, Vec<u8>),
    /// The newest accepted root: record it durably (the sync to it resumes after a restart).
    PersistRoot(SignedRoot),
    /// The manifest is complete: run the job (off the event loop: it reads the whole diff) and answer with
    /// [`Input::Planned`] ([`planning`]).
    Plan(PlanJob),
    /// Prepare staging for these files (copy chunks held locally), then answer with [`Input::Staged`].
    Stage {
        seq: u64,
        files: Vec<StageFile>,
    },
    FetchChunks {
        peer: P,
        req: ReqId,
        chunks: Vec<ChunkId>,
    },
    /// Stop a chunk request (its chunks arrived elsewhere, it timed out, or the peer was banned).
    Cancel {
        peer: P,
        req: ReqId,
    },
    /// Every chunk is staged and verified: apply `plan` (the diff from the applied snapshot to `target`) to the
    /// served tree in the plan's order (directories, files, symlinks, index files last; what it no longer names is
    /// recorded for removal once due), then answer with [`Input::Applied`] or [`Input::ApplyFailed`].
    Apply {
        target: VerifiedRoot,
        plan: Plan,
    },
    /// `peer` is banned (see [`bans`]): stop using it; with `until`, it broke the protocol: disconnect it, refuse its
    /// connections and neither serve nor ask its data plane until then.
    Ban {
        peer: P,
        reason: BanReason,
        until: Option<Mono>,
    },
    /// A ban ended (the snapshot changed, or a protocol ban's time is over): `peer` may connect and be used again.
    Unban {
        peer: P,
    },
    /// Carry out the pending removals that are due at `now` (wall clock; see [`removals`]), then answer with
    /// [`Input::RemovalsDone`]. One run at a time.
    RemoveDue {
        now: Timestamp,
    },
    /// Origin: the current root nears its expiry (`EngineConfig::resign_before_expiry_ms`): publish again, so a
    /// freshly signed root goes out (answered with [`Input::Published`]; asked again every [`REPUBLISH_RETRY_MS`]
    /// until one comes).
    Republish,
    Notice(Notice<P>),
}

/// Things worth counting or logging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice<P> {
    RootAccepted {
        seq: u64,
    },
    RootRejected {
        from: Option<P>,
        error: RootError,
    },
    /// The delta did not reproduce the signed root; nodes were fetched instead.
    DeltaRejected,
    /// Some needed chunk is held by no connected peer and no origin is connected.
    WaitingForOrigin {
        chunks: usize,
    },
    /// The manifest could not be read or diffed (a damaged store).
    ManifestError(ManifestProblem),
    /// A peer spoke about a repository this node does not follow.
    WrongRepo {
        from: P,
    },
    /// Chunks could not be kept locally; fetching pauses (`LOCAL_FAILURE_BACKOFF_FIRST_MS`, doubling).
    LocalFailure,
    /// A peer claiming the whole snapshot delivered nothing while asked (see `SchedulerLimits::holds_all_stall_ms`):
    /// its requests failed and the origin is asked instead.
    PeerStalled {
        peer: P,
    },
    SyncComplete {
        seq: u64,
    },
}

/// What was wrong with a manifest the engine tried to plan from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestProblem {
    /// A node the store should hold is gone: its subtree is fetched again.
    #[error("node {0} missing from the store")]
    NodeMissing(NodeHash),
    /// A stored node is damaged or the manifest breaks a rule: nothing is applied until a newer root.
    #[error(transparent)]
    Invalid(crate::diff::DiffError),
}

/// What a sync is doing (the status shows [`SyncPhase::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SyncPhase {
    Idle,
    FetchingManifest,
    /// The manifest is complete; the caller runs the plan's job.
    Planning,
    Staging,
    Transferring,
    Applying,
    /// An apply failed and waits for `apply_retry_at`.
    ApplyRetrying,
}

impl SyncPhase {
    pub fn name(self) -> &'static str {
        match self {
            SyncPhase::Idle => "idle",
            SyncPhase::FetchingManifest => "fetching-manifest",
            SyncPhase::Planning => "planning",
            SyncPhase::Staging => "staging",
            SyncPhase::Transferring => "transferring",
            SyncPhase::Applying => "applying",
            SyncPhase::ApplyRetrying => "apply-retrying",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    pub repo: RepoId,
    /// The applied snapshot.
    pub current: Option<(u64, NodeHash)>,
    /// The snapshot being synced to.
    pub target: Option<(u64, NodeHash)>,
    pub phase: SyncPhase,
    pub bytes_missing: u64,
    pub chunks_missing: usize,
    pub waiting_for_origin: bool,
    pub peers: usize,
    /// Applies that failed in a row (0 once one succeeds).
    pub apply_failures: u32,
    /// When the failed apply is tried again (phase `apply-retrying`).
    pub apply_retry_at: Option<Mono>,
    /// Why the last apply failed, until one succeeds.
    pub last_apply_failure: Option<ApplyFailure>,
    /// Removals pending in the served tree (see [`removals`]).
    pub pending_removals: u64,
}

/// Why applying a snapshot to the served tree failed (the caller maps its I/O error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyFailure {
    /// The filesystem is full (ENOSPC, EDQUOT).
    NoSpace,
    /// Not allowed (EPERM, EACCES, EROFS).
    Permission,
    /// Anything else (EXDEV, EIO, ...).
    Other,
}

/// Entries in the engine's tables that peers can grow, each under its cap (see [`Engine::table_sizes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    /// Origin: (chunk, peer) pairs announced (`HOLDER_ENTRIES_MAX`).
    pub holders: usize,
    /// Origin: chunks handed out, per recipient (`SeederLimits::recipients_max`).
    pub seeder_recipients: usize,
    /// Origin: (asker, chunk) pairs pointed elsewhere (`SeederLimits::redirects_max`).
    pub seeder_redirects: usize,
    /// Mirror: chunks announced before the sync's chunks are known, over all peers (`HOLDINGS_PENDING_MAX`).
    pub pending_holdings: usize,
}

/// Verified chunks of a sync that arrived when they were held already (their bytes were fetched twice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyCounts {
    /// The chunk had an endgame copy asked for (two copies in flight by design, and both came).
    pub endgame: u64,
    /// Any other second copy (a request asked again while the first was still on its way).
    pub other: u64,
}

/// Announced chunk ids this node dropped since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnnounceCounts {
    /// Origin: ids that are not chunks of its current snapshot.
    pub outside_snapshot: u64,
    /// Ids dropped because a table was full (`HOLDER_ENTRIES_MAX`, `HOLDINGS_PER_PEER_MAX`, `HOLDINGS_PENDING_MAX`).
    pub over_cap: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A published root the engine refused (it is not newer, or not valid).
    #[error("the published root was refused: {0}")]
    Published(RootError),
}

/// What happened, for [`Engine::handle`].
#[derive(Debug)]
pub enum Input<P: PeerKey> {
    PeerConnected(P),
    PeerDisconnected(P),
    /// A peer's hello (its request, or its answer to ours).
    Hello {
        from: P,
        hello: Hello,
    },
    Have {
        from: P,
        have: Have,
    },
    /// A signed root, from gossip, a hello, or the node itself.
    Root {
        via: RootVia<P>,
        root: SignedRoot,
    },
    /// The answer to `FetchNodes` `req`: each node's bytes, or `None` where the peer lacks it, and the descendants
    /// it carried (unverified: the core checks each against the nodes it already verified).
    Nodes {
        from: P,
        req: ReqId,
        nodes: Vec<Option<Vec<u8>>>,
        descendants: Vec<Vec<u8>>,
    },
    /// The answer to `FetchDelta` `req`.
    Delta {
        from: P,
        req: ReqId,
        delta: Option<Vec<u8>>,
    },
    /// A `FetchNodes` or `FetchDelta` failed.
    FetchFailed {
        from: P,
        req: ReqId,
    },
    /// `Plan` done: the job's result.
    Planned(Box<Planned<P>>),
    /// `Stage` done: these chunks of snapshot `seq` are held (copied locally or verified from an earlier run).
    Staged {
        seq: u64,
        held: Vec<ChunkId>,
    },
    /// One chunk of `FetchChunks` `req` turned out as `outcome` (the caller verified the hash).
    Chunk {
        from: P,
        req: ReqId,
        id: ChunkId,
        outcome: ChunkOutcome<P>,
    },
    /// `FetchChunks` `req` finished: `bytes` of chunk data arrived over it.
    ChunksDone {
        from: P,
        req: ReqId,
        bytes: u64,
    },
    /// `FetchChunks` `req` failed as a whole (no data-plane address, connection error, reset).
    ChunksFailed {
        from: P,
        req: ReqId,
    },
    /// `Apply` done: snapshot `seq` is in the served tree.
    Applied {
        seq: u64,
    },
    /// `Apply` of snapshot `seq` failed.
    ApplyFailed {
        seq: u64,
        failure: ApplyFailure,
    },
    /// Removals were recorded as pending (by an apply, or found in the database at start), the earliest due at
    /// `due` (`None`: none were); `pending` is how many are pending now.
    RemovalsScheduled {
        due: Option<Timestamp>,
        pending: u64,
    },
    /// `RemoveDue` done: the earliest due of the removals left (`None` if the run failed: what was due stays due),
    /// and how many are pending (`None`: unknown).
    RemovalsDone {
        left: Option<Option<Timestamp>>,
        pending: Option<u64>,
    },
    /// Origin: a snapshot was published locally (its nodes are in the store), with its chunk ids.
    Published {
        root: SignedRoot,
        chunks: ChunkSet,
    },
    /// Origin: the chunk ids of the current snapshot `seq`, after a restart from persisted state.
    SnapshotChunks {
        seq: u64,
        chunks: ChunkSet,
    },
    /// `peer` committed a protocol offence (see [`bans`]).
    Offence {
        peer: P,
        offence: bans::Offence,
    },
    /// The time [`Engine::poll_timeout`] named has come.
    Timeout,
}

/// How often the engine wants to run while a sync or its announcements are in progress: request timeouts, stall
/// allowances, deferrals and batched announcements are all checked at this granularity (`HAVE_FLUSH_MS` is the
/// finest of them).
pub const ACTIVE_TIMEOUT_MS: u64 = HAVE_FLUSH_MS;

/// A new snapshot's manifest (its delta, or its nodes) is asked of the origin at once by about this many of each
/// mirror's neighbours; the others wait for a neighbour to announce that it holds it, and ask that neighbour. Every
/// mirror learns of a new root from the origin at the same moment, before any neighbour holds its manifest: each
/// asked the origin, and a 500-package release's 66 KB delta to 1,000 mirrors was 12% of the release's bytes
/// (`simulations/scenarios/release-1000.toml`). With three, a mirror has no such neighbour with probability about
/// e^-3 (5%), and then hears of the manifest from one two hops away.
pub const ORIGIN_METADATA_ASKERS: u64 = 3;
/// A mirror that waits for a neighbour to hold a new manifest asks the origin after this long all the same. Short:
/// while the others wait, the first copies of the update's chunks go to the few that asked at once, so a long wait
/// would concentrate them (1 s was the first value; in the simulator no mirror waited even 300 ms).
pub const ORIGIN_METADATA_WAIT_MS: u64 = 300;

/// A mirror with fewer neighbours than this asks the origin for a new manifest at once: the origin saves at most
/// that many copies of the manifest, while a wait can only add to the mirror's time (up to
/// [`ORIGIN_METADATA_WAIT_MS`]). On the WAN testbed (8 mirrors, 7 neighbours each, round trips up to 327 ms) the
/// 50-package update took 15.4-16.1 s with the wait and 12.5-15.2 s without (four and three runs, one machine, one
/// hour: not a clear difference, but no gain either; BENCHMARKS.md, "release-1000, corrected").
pub const ORIGIN_METADATA_STAGGER_NEIGHBOURS_MIN: usize = 16;

/// Whether this node is one of those asking the origin for snapshot `seq`'s manifest at once, among `others`
/// neighbours (not the origin): always below [`ORIGIN_METADATA_STAGGER_NEIGHBOURS_MIN`], else with probability
/// [`ORIGIN_METADATA_ASKERS`] in `others + 1`, drawn from the node's salt and `seq` (another draw for every
/// snapshot).
pub fn asks_origin_for_manifest_at_once(salt: u64, seq: u64, others: usize) -> bool {
    if others < ORIGIN_METADATA_STAGGER_NEIGHBOURS_MIN {
        return true;
    }
    let draw = scheduler::mix(salt ^ scheduler::mix(seq)) % 1_000_000;
    draw * (others as u64 + 1) < ORIGIN_METADATA_ASKERS * 1_000_000
}

struct PeerInfo {
    is_origin: bool,
    /// Its hello arrived.
    greeted: bool,
    /// Sequence number of the newest valid root it told us about.
    advertised: Option<u64>,
    complete_seq: Option<u64>,
    /// Chunks it announced while this node was not yet transferring (handed to the scheduler when it starts).
    holdings: BTreeSet<ChunkId>,
    /// Newest root pushed to it directly (see `push_root`).
    pushed: Option<u64>,
    /// Newest snapshot it announced chunks of (it holds that snapshot's manifest).
    manifest_seq: Option<u64>,
    /// Origin: its requests for chunks outside the current snapshot.
    unknown_requests: u32,
    /// Origin: it claimed the current snapshot complete and then asked for one of its chunks, so the claim is
    /// false: it is not named in redirects.
    false_claim: bool,
    /// Mirror: the newest snapshot it announced beyond this node's newest root, for which it was asked for its
    /// root (see `ask_for_root`).
    root_asked: Option<u64>,
}

impl PeerInfo {
    fn new(is_origin: bool) -> Self {
        PeerInfo {
            is_origin,
            greeted: false,
            advertised: None,
            complete_seq: None,
            holdings: BTreeSet::new(),
            pushed: None,
            manifest_seq: None,
            unknown_requests: 0,
            false_claim: false,
            root_asked: None,
        }
    }
}

enum Phase<P: PeerKey> {
    Idle,
    Manifest {
        target: VerifiedRoot,
        fetch: ManifestFetch<P>,
        /// The fetch is complete and its `Plan` job is out ([`planning`]).
        planning: bool,
    },
    /// The caller stages the files; the scheduler already collects what peers announce (only chunks it needs).
    /// `plan` (the diff from the applied snapshot) is computed once, here, and carried to the apply.
    Staging {
        target: VerifiedRoot,
        sched: Scheduler<P>,
        plan: Plan,
    },
    Transfer {
        target: VerifiedRoot,
        sched: Scheduler<P>,
        plan: Plan,
    },
    Applying {
        target: VerifiedRoot,
        plan: Plan,
    },
    /// The apply failed: it is tried again at `retry_at` (or a newer root is synced instead).
    ApplyWait {
        target: VerifiedRoot,
        plan: Plan,
        retry_at: Mono,
    },
}

pub struct Engine<P: PeerKey> {
    cfg: EngineConfig<P>,
    roots: RootTracker,
    current: Option<VerifiedRoot>,
    phase: Phase<P>,
    peers: BTreeMap<P, PeerInfo>,
    /// Who is banned, why and until when (the one owner of ban state).
    bans: bans::Bans<P>,
    /// Peers banned or stalled in an earlier snapshot that have not delivered a chunk since (kept across
    /// reconnections): the next scheduler starts them stalled (see [`Scheduler::suspect`]).
    suspects: BTreeSet<P>,
    /// Claimers that kept an abandoned sync waiting without delivering, since when (handed to the next scheduler;
    /// at most one entry per connected peer).
    kept_waiting: BTreeMap<P, Mono>,
    seeder: Seeder<P>,
    /// Origin: a few peers that announced each chunk of the current snapshot (for redirects).
    holders: BTreeMap<ChunkId, Vec<P>>,
    /// (chunk, peer) pairs in `holders`.
    holder_entries: usize,
    /// Origin: the chunks of the current snapshot (`None` until the caller says, after a restart).
    snapshot_chunks: Option<ChunkSet>,
    announce_counts: AnnounceCounts,
    copy_counts: CopyCounts,
    next_req: u64,
    out: VecDeque<Output<P>>,
    have_outbox: Vec<ChunkId>,
    last_have_flush: Mono,
    /// The snapshot whose manifest is being fetched, and until when the origin is not asked for it unless this node
    /// is one of those that ask at once ([`asks_origin_for_manifest_at_once`]).
    origin_metadata_wait: Option<(u64, Mono)>,
    waiting_for_origin: bool,
    /// No chunk requests before this instant (after a local failure).
    paused_until: Mono,
    /// Attempts in a row whose chunks could not be kept (the pause doubles with each).
    local_failures: u32,
    /// Nodes handed to the store by outputs of the call in progress (not yet carried out): read together with the
    /// source until the call returns, so the engine can plan as soon as a manifest completes.
    unstored: BTreeMap<NodeHash, Vec<u8>>,
    /// The clocks at the latest call (what `poll_timeout` counts from).
    last_now: Now,
    /// Origin: when a republish was last asked for (monotonic), for the current root.
    republish_asked: Option<Mono>,
    /// Applies that failed in a row, and why the last one did.
    apply_failures: u32,
    last_apply_failure: Option<ApplyFailure>,
    removals: removals::Removals,
}

impl<P: PeerKey> Engine<P> {
    /// An engine restored from persisted state: `current` is the applied snapshot, `latest` the newest accepted
    /// root (which may be newer: the sync resumes on the first tick).
    pub fn new(cfg: EngineConfig<P>, current: Option<VerifiedRoot>, latest: Option<VerifiedRoot>) -> Self {
        let mut roots = RootTracker::new(cfg.trusted.iter().copied(), [cfg.repo.clone()]);
        if let Some(root) = latest.clone().or_else(|| current.clone()) {
            roots.restore(root);
        }
        let seeder = Seeder::new(cfg.seeder.clone());
        let mut engine = Self {
            cfg,
            roots,
            current,
            phase: Phase::Idle,
            peers: BTreeMap::new(),
            bans: bans::Bans::default(),
            suspects: BTreeSet::new(),
            kept_waiting: BTreeMap::new(),
            seeder,
            holders: BTreeMap::new(),
            holder_entries: 0,
            snapshot_chunks: None,
            announce_counts: AnnounceCounts::default(),
            copy_counts: CopyCounts::default(),
            next_req: 0,
            out: VecDeque::new(),
            have_outbox: Vec::new(),
            last_have_flush: Mono(0),
            origin_metadata_wait: None,
            waiting_for_origin: false,
            paused_until: Mono(0),
            local_failures: 0,
            unstored: BTreeMap::new(),
            last_now: Now::default(),
            republish_asked: None,
            apply_failures: 0,
            last_apply_failure: None,
            removals: removals::Removals::default(),
        };
        if let Some(latest) = latest
            && engine.is_newer(&latest)
            && engine.cfg.role == Role::Mirror
        {
            // Resumed on the first call (the manifest may be complete already): `poll_timeout` asks for it at once.
            engine.phase =
                Phase::Manifest { fetch: ManifestFetch::resume(latest.body.root), target: latest, planning: false };
        }
        engine
    }

    pub fn poll_output(&mut self) -> Option<Output<P>> {
        self.out.pop_front()
    }

    /// When the engine wants [`Input::Timeout`] (monotonic time; `None`: only when an event comes). Every
    /// [`ACTIVE_TIMEOUT_MS`] after the last input while a sync runs (a resumed manifest fetch starts on the first
    /// input, or then; a store that fails to start it is retried at that pace, never in a tight loop) or
    /// announcements wait, then the next of: an apply retry, the end of a fetch pause, a ban's end.
    pub fn poll_timeout(&self) -> Option<Mono> {
        let now = self.last_now.mono;
        let active = now.plus_ms(ACTIVE_TIMEOUT_MS);
        let mut next = match &self.phase {
            Phase::Manifest { .. } | Phase::Staging { .. } | Phase::Transfer { .. } => Some(active),
            Phase::ApplyWait { retry_at, .. } => Some(*retry_at),
            Phase::Idle | Phase::Applying { .. } => None,
        };
        if !self.have_outbox.is_empty() {
            next = next.min(Some(active)).or(Some(active));
        }
        if let Some(expiry) = self.bans.next_expiry() {
            next = Some(next.map_or(expiry, |n| n.min(expiry)));
        }
        if let Some(due) = self.republish_due() {
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        if let Some(due) = self.removals.next_due() {
            let due = self.mono_of(due);
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        next
    }

    /// The monotonic instant at which the wall clock reads `wall`, counted from the last input's two clocks (now,
    /// if that is past).
    fn mono_of(&self, wall: Timestamp) -> Mono {
        self.last_now.mono.plus_ms(wall.0.saturating_sub(self.last_now.wall.0))
    }

    /// Origin: when (monotonic) to ask for a re-signed root: the wall-clock instant the current root enters its
    /// last `resign_before_expiry_ms`, counted from the last input's two clocks; after an ask, the retry.
    fn republish_due(&self) -> Option<Mono> {
        let before = self.cfg.resign_before_expiry_ms?;
        let current = self.current.as_ref().filter(|_| self.cfg.role == Role::Origin)?;
        if let Some(asked) = self.republish_asked {
            return Some(asked.plus_ms(REPUBLISH_RETRY_MS));
        }
        Some(self.mono_of(Timestamp(current.body.expires.0.saturating_sub(before))))
    }

    /// Takes one input at `now`, reading manifest nodes through `source` (see the call order).
    pub fn handle(&mut self, now: Now, input: Input<P>, source: &impl NodeSource) -> Result<(), EngineError> {
        // The outputs of the previous call were carried out: what they stored is in `source` now.
        self.unstored.clear();
        self.last_now = now;
        match input {
            Input::PeerConnected(peer) => self.on_peer_connected(peer),
            Input::PeerDisconnected(peer) => self.on_peer_disconnected(now, &peer),
            Input::Hello { from, hello } => self.on_hello(now, from, hello, source)?,
            Input::Have { from, have } => self.on_have(now, from, have),
            Input::Root { via, root } => self.on_root(now, via, root, source)?,
            Input::Nodes { req, nodes, descendants, .. } => self.on_nodes(now, req, nodes, descendants, source)?,
            Input::Delta { req, delta, .. } => self.on_delta(now, req, delta, source)?,
            Input::FetchFailed { req, .. } => self.on_fetch_failed(now, req),
            Input::Planned(planned) => self.on_planned(now, planned)?,
            Input::Staged { seq, held } => self.on_staged(now, seq, held),
            Input::Chunk { from, req, id, outcome } => self.on_chunk(now, from, req, id, outcome),
            Input::ChunksDone { from, req, bytes } => self.on_chunks_done(now, from, req, bytes),
            Input::ChunksFailed { req, .. } => self.on_chunks_failed(now, req),
            Input::Applied { seq } => self.on_applied(now, seq, source)?,
            Input::ApplyFailed { seq, failure } => self.on_apply_failed(now, seq, failure),
            Input::Published { root, chunks } => self.on_published(now, root, chunks)?,
            Input::SnapshotChunks { seq, chunks } => self.on_snapshot_chunks(seq, chunks),
            Input::Offence { peer, offence } => self.on_offence(now, peer, offence),
            Input::Timeout => self.on_timeout(now, source)?,
            Input::RemovalsScheduled { due, pending } => self.removals.scheduled(due, pending),
            Input::RemovalsDone { left, pending } => self.removals.finished(left, pending),
        }
        if self.removals.start_if_due(now.wall) {
            self.out.push_back(Output::RemoveDue { now: now.wall });
        }
        Ok(())
    }

    pub fn current(&self) -> Option<&VerifiedRoot> {
        self.current.as_ref()
    }

    /// The newest accepted root.
    pub fn latest(&self) -> Option<&VerifiedRoot> {
        self.roots.latest(&self.cfg.repo)
    }

    pub fn role(&self) -> Role {
        self.cfg.role
    }

    /// This node's hello (the caller adds its data-plane addresses).
    pub fn hello(&self) -> Hello {
        Hello {
            repo: self.cfg.repo.clone(),
            root: self.latest().map(|r| r.signed.clone()),
            complete_seq: self.current.as_ref().map(|c| c.body.seq),
            data_addrs: Vec::new(),
        }
    }

    pub fn status(&self) -> EngineStatus {
        let (phase, target, bytes_missing, chunks_missing) = match &self.phase {
            Phase::Idle => (SyncPhase::Idle, None, 0, 0),
            Phase::Manifest { target, planning: false, .. } => (SyncPhase::FetchingManifest, Some(target), 0, 0),
            Phase::Manifest { target, planning: true, .. } => (SyncPhase::Planning, Some(target), 0, 0),
            Phase::Staging { target, .. } => (SyncPhase::Staging, Some(target), 0, 0),
            Phase::Transfer { target, sched, .. } => {
                (SyncPhase::Transferring, Some(target), sched.bytes_missing(), sched.chunks_missing())
            }
            Phase::Applying { target, .. } => (SyncPhase::Applying, Some(target), 0, 0),
            Phase::ApplyWait { target, .. } => (SyncPhase::ApplyRetrying, Some(target), 0, 0),
        };
        EngineStatus {
            repo: self.cfg.repo.clone(),
            current: self.current.as_ref().map(|c| (c.body.seq, c.body.root)),
            target: target.map(|t| (t.body.seq, t.body.root)),
            phase,
            bytes_missing,
            chunks_missing,
            waiting_for_origin: self.waiting_for_origin,
            peers: self.peers.values().filter(|p| p.greeted).count(),
            apply_failures: self.apply_failures,
            apply_retry_at: match &self.phase {
                Phase::ApplyWait { retry_at, .. } => Some(*retry_at),
                _ => None,
            },
            last_apply_failure: self.last_apply_failure,
            pending_removals: self.removals.pending(),
        }
    }

    /// The snapshot `peer` said it holds completely.
    pub fn peer_complete_seq(&self, peer: &P) -> Option<u64> {
        self.peers.get(peer).and_then(|p| p.complete_seq)
    }

    pub fn is_banned(&self, peer: &P) -> bool {
        self.bans.is_banned(peer)
    }

    /// Whether `peer` is banned for breaking the protocol (its connections are refused).
    pub fn is_protocol_banned(&self, peer: &P) -> bool {
        self.bans.is_protocol_banned(peer)
    }

    /// Every ban in force.
    pub fn bans(&self) -> impl Iterator<Item = (&P, &bans::Ban)> {
        self.bans.iter()
    }

    /// `peer` committed a protocol offence (the shell noticed a malformed control request, or its data plane refused
    /// one of the peer's requests): counted, and repeated ones ban it ([`bans`]).
    fn on_offence(&mut self, now: Now, peer: P, offence: bans::Offence) {
        if let Some(ban) = self.bans.offence(now.mono, &peer, offence) {
            self.out.push_back(Output::Ban { peer: peer.clone(), reason: ban.reason, until: ban.until });
            self.drop_banned_peer(now, &peer);
        }
    }

    /// Stops using a peer just banned for the protocol: its requests are cancelled and it is asked for nothing more.
    fn drop_banned_peer(&mut self, now: Now, peer: &P) {
        match &mut self.phase {
            Phase::Manifest { fetch, .. } => fetch.on_peer_gone(peer),
            Phase::Transfer { sched, .. } => {
                let outs = sched.remove_peer(peer);
                self.sched_outputs(outs);
            }
            _ => {}
        }
        self.pump(now);
    }

    /// Lifts the snapshot bans (the node moved on to another snapshot).
    fn lift_snapshot_bans(&mut self) {
        for peer in self.bans.new_snapshot() {
            self.out.push_back(Output::Unban { peer });
        }
    }

    /// Whether `peer`'s claims are not trusted until it delivers a chunk: it was banned or stalled in this or the
    /// previous snapshot (see [`Scheduler::suspect`]).
    pub fn is_suspect(&self, peer: &P) -> bool {
        let now = match &self.phase {
            Phase::Transfer { sched, .. } => sched.suspicion(peer),
            _ => None,
        };
        now.unwrap_or_else(|| self.suspects.contains(peer))
    }

    // ---- events -------------------------------------------------------------------------------------------

    fn on_peer_connected(&mut self, peer: P) {
        let is_origin = self.cfg.origins.contains(&peer);
        self.peers.entry(peer.clone()).or_insert(PeerInfo::new(is_origin));
        self.out.push_back(Output::SendHello(peer, self.hello()));
    }

    fn on_peer_disconnected(&mut self, now: Now, peer: &P) {
        self.peers.remove(peer);
        match &mut self.phase {
            Phase::Manifest { fetch, .. } => fetch.on_peer_gone(peer),
            Phase::Transfer { sched, .. } | Phase::Staging { sched, .. } => {
                let outs = sched.remove_peer(peer);
                self.sched_outputs(outs);
            }
            _ => {}
        }
        self.pump(now);
    }

    fn on_hello(&mut self, now: Now, peer: P, hello: Hello, source: &impl NodeSource) -> Result<(), EngineError> {
        if hello.repo != self.cfg.repo {
            self.out.push_back(Output::Notice(Notice::WrongRepo { from: peer }));
            return Ok(());
        }
        let is_origin = self.cfg.origins.contains(&peer);
        let info = self.peers.entry(peer.clone()).or_insert(PeerInfo::new(is_origin));
        let first = !info.greeted;
        info.greeted = true;
        info.complete_seq = hello.complete_seq;
        let theirs = hello.root.as_ref().and_then(|r| r.verify_signature().ok()).map(|b| b.seq);
        if let Some(root) = hello.root {
            self.on_root(now, RootVia::Hello(peer.clone()), root, source)?;
        }
        // A peer whose hello shows an older root than ours (it was greeted after we accepted ours, so no push
        // reached it) hears of ours now, once per root.
        let latest = self.latest().map(|r| r.body.seq);
        if let Some(info) = self.peers.get_mut(&peer)
            && latest > theirs
            && info.advertised < latest
            && info.pushed < latest
        {
            info.pushed = latest;
            self.out.push_back(Output::SendHello(peer.clone(), self.hello()));
        }
        if let Phase::Transfer { target, sched, .. } | Phase::Staging { target, sched, .. } = &mut self.phase {
            let seq = target.body.seq;
            let holds_all = hello.complete_seq == Some(seq);
            let known = sched.peer_keys().any(|p| *p == peer);
            sched.set_peer(&peer, is_origin, holds_all);
            if !known && self.suspects.contains(&peer) {
                sched.suspect(&peer);
            }
            if first {
                // Tell the newcomer what we already hold of this snapshot.
                let complete_seq = self.current.as_ref().map(|c| c.body.seq);
                let held: Vec<ChunkId> = sched.held_ids().collect();
                for part in held.chunks(HAVE_CHUNKS_MAX) {
                    let have = Have { repo: self.cfg.repo.clone(), seq, complete_seq, chunks: part.to_vec() };
                    self.out.push_back(Output::SendHave(peer.clone(), have));
                }
            }
        }
        self.advance(now, source)
    }

    fn on_root(
        &mut self,
        now: Now,
        via: RootVia<P>,
        root: SignedRoot,
        source: &impl NodeSource,
    ) -> Result<(), EngineError> {
        let from = match &via {
            RootVia::Gossip(p) | RootVia::Hello(p) => Some(p.clone()),
            RootVia::Local => None,
        };
        match self.roots.accept(now.wall, &root) {
            Ok(verified) => {
                if let Some(info) = from.as_ref().and_then(|p| self.peers.get_mut(p)) {
                    info.advertised = Some(verified.body.seq);
                }
                // Durable before the next call: the sync resumes from it after a restart.
                self.out.push_back(Output::PersistRoot(root.clone()));
                self.out.push_back(Output::Notice(Notice::RootAccepted { seq: verified.body.seq }));
                self.push_root(verified.body.seq);
                if matches!(via, RootVia::Hello(_)) {
                    // Learned outside gossip: pass it on so peers that missed the gossip message hear of it.
                    self.out.push_back(Output::Gossip(root));
                }
                if self.cfg.role == Role::Mirror {
                    self.start_sync(now, verified, source)?;
                }
            }
            Err(RootError::Replay { seq }) => {
                if let Some(info) = from.as_ref().and_then(|p| self.peers.get_mut(p)) {
                    info.advertised = info.advertised.max(Some(seq));
                }
            }
            Err(error) => {
                if let (Err(RootError::Rollback { .. }) | Err(RootError::Equivocation { .. }), Some(p)) =
                    (self.roots.check(now.wall, &root), &from)
                    && let Some(info) = self.peers.get_mut(p)
                    && let Ok(body) = root.verify_signature()
                {
                    // A validly signed but older root still tells us what the peer holds.
                    info.advertised = info.advertised.max(Some(body.seq));
                }
                self.out.push_back(Output::Notice(Notice::RootRejected { from, error }));
            }
        }
        self.pump(now);
        Ok(())
    }

    fn on_have(&mut self, now: Now, peer: P, have: Have) {
        if have.repo != self.cfg.repo {
            self.out.push_back(Output::Notice(Notice::WrongRepo { from: peer }));
            return;
        }
        let Some(info) = self.peers.get_mut(&peer) else { return };
        if have.complete_seq > info.complete_seq {
            info.holdings.clear();
        }
        info.complete_seq = info.complete_seq.max(have.complete_seq);
        info.manifest_seq = info.manifest_seq.max(Some(have.seq));
        let (is_origin, complete_seq) = (info.is_origin, info.complete_seq);
        self.ask_for_root(&peer, have.seq.max(have.complete_seq.unwrap_or(0)));
        match &mut self.phase {
            Phase::Transfer { target, sched, .. } | Phase::Staging { target, sched, .. } => {
                // The scheduler keeps only chunks this sync needs, in bitsets.
                sched.set_peer(&peer, is_origin, complete_seq == Some(target.body.seq));
                for id in &have.chunks {
                    sched.add_holding(now.mono, &peer, id);
                }
                // Only this peer has something new to be asked for.
                self.pump_after(now, &peer);
                return;
            }
            Phase::Manifest { .. } => {
                // Which chunks this sync needs is not known yet: keep what fits under both caps.
                let pending: usize = self.peers.values().map(|i| i.holdings.len()).sum();
                let room = HOLDINGS_PENDING_MAX.saturating_sub(pending);
                let Some(info) = self.peers.get_mut(&peer) else { return };
                let before = info.holdings.len();
                let limit = HOLDINGS_PER_PEER_MAX.min(before + room);
                for id in &have.chunks {
                    if info.holdings.len() >= limit && !info.holdings.contains(id) {
                        self.announce_counts.over_cap += 1;
                        continue;
                    }
                    info.holdings.insert(*id);
                }
            }
            Phase::Idle | Phase::Applying { .. } | Phase::ApplyWait { .. } if self.cfg.role == Role::Origin => {
                for id in &have.chunks {
                    // Only chunks of the current snapshot can be redirected to (before the caller gave the set,
                    // only the cap bounds them).
                    if self.snapshot_chunks.as_ref().is_some_and(|set| !set.contains(id)) {
                        self.announce_counts.outside_snapshot += 1;
                        continue;
                    }
                    let full = self.holder_entries >= HOLDER_ENTRIES_MAX;
                    match self.holders.get_mut(id) {
                        Some(holders) if holders.contains(&peer) => {}
                        Some(holders) if holders.len() < crate::transfer::REDIRECT_PEERS_MAX && !full => {
                            holders.push(peer.clone());
                            self.holder_entries += 1;
                        }
                        None if !full => {
                            self.holders.insert(*id, vec![peer.clone()]);
                            self.holder_entries += 1;
                        }
                        _ => self.announce_counts.over_cap += 1,
                    }
                }
            }
            Phase::Idle | Phase::Applying { .. } | Phase::ApplyWait { .. } => {}
        }
        self.pump(now);
    }

    fn on_nodes(
        &mut self,
        now: Now,
        req: ReqId,
        nodes: Vec<Option<Vec<u8>>>,
        descendants: Vec<Vec<u8>>,
        source: &impl NodeSource,
    ) -> Result<(), EngineError> {
        if let Phase::Manifest { fetch, .. } = &mut self.phase {
            let outs = fetch.on_nodes(req, nodes, descendants, source)?;
            self.fetch_outputs(outs);
        }
        self.advance(now, source)
    }

    fn on_delta(
        &mut self,
        now: Now,
        req: ReqId,
        delta: Option<Vec<u8>>,
        source: &impl NodeSource,
    ) -> Result<(), EngineError> {
        if let Phase::Manifest { fetch, .. } = &mut self.phase {
            let outs = fetch.on_delta(req, delta, source)?;
            self.fetch_outputs(outs);
        }
        self.advance(now, source)
    }

    /// A node or delta request failed.
    fn on_fetch_failed(&mut self, now: Now, req: ReqId) {
        if let Phase::Manifest { fetch, .. } = &mut self.phase {
            fetch.on_failed(req);
        }
        self.pump(now);
    }

    /// The caller staged snapshot `seq` and holds these chunks of it (copied locally or verified from an earlier
    /// run).
    fn on_staged(&mut self, now: Now, seq: u64, held: Vec<ChunkId>) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let Phase::Staging { target, mut sched, plan } = phase else {
            self.phase = phase;
            return;
        };
        if target.body.seq != seq {
            self.phase = Phase::Staging { target, sched, plan };
            return;
        }
        for id in &held {
            sched.mark_held(id);
        }
        self.have_outbox.extend(held);
        self.phase = Phase::Transfer { target, sched, plan };
        self.finish_if_done(now);
        self.pump(now);
    }

    /// One chunk of request `req` turned out as `outcome` (the caller verified the hash).
    fn on_chunk(&mut self, now: Now, peer: P, req: ReqId, id: ChunkId, outcome: ChunkOutcome<P>) {
        let Phase::Transfer { sched, .. } = &mut self.phase else { return };
        let verified = outcome == ChunkOutcome::Verified;
        match outcome {
            ChunkOutcome::Dropped => {
                // Chunks of requests sent before the pause fail within it: one attempt, one doubling.
                if now.mono >= self.paused_until {
                    self.local_failures = self.local_failures.saturating_add(1);
                    let wait =
                        backoff_ms(LOCAL_FAILURE_BACKOFF_FIRST_MS, LOCAL_FAILURE_BACKOFF_MAX_MS, self.local_failures);
                    self.paused_until = now.mono.plus_ms(wait);
                }
                self.out.push_back(Output::Notice(Notice::LocalFailure));
            }
            ChunkOutcome::Verified => self.local_failures = 0,
            _ => {}
        }
        let newly = verified && sched.is_needed(&id);
        if verified && !newly {
            match sched.endgame_copied(&id) {
                Some(true) => self.copy_counts.endgame += 1,
                Some(false) => self.copy_counts.other += 1,
                None => {}
            }
        }
        let outs = sched.on_chunk(now.mono, req, &id, outcome);
        if newly {
            self.have_outbox.push(id);
        }
        self.sched_outputs(outs);
        self.finish_if_done(now);
        if verified {
            // Outside the endgame a verified chunk frees room only at the peer that sent it (ticks pump everyone).
            self.pump_after(now, &peer);
        } else {
            self.pump(now);
        }
    }

    /// Pumps only `peer` when nothing else can have changed (outside the endgame), else everyone.
    fn pump_after(&mut self, now: Now, peer: &P) {
        match &mut self.phase {
            Phase::Transfer { sched, .. } if !sched.in_endgame() => {
                if now.mono < self.paused_until {
                    return;
                }
                let mut next = self.next_req;
                let outs = sched.pump_peer(now.mono, peer, &mut || {
                    next += 1;
                    ReqId(next)
                });
                self.next_req = next;
                self.sched_outputs(outs);
            }
            _ => self.pump(now),
        }
    }

    /// A chunk request finished: `bytes` of chunk data arrived over it.
    fn on_chunks_done(&mut self, now: Now, peer: P, req: ReqId, bytes: u64) {
        if let Phase::Transfer { sched, .. } = &mut self.phase {
            sched.on_request_done(now.mono, req, bytes);
        }
        // Its window may have grown; chunks it did not deliver were requeued (and pumped) as they were answered.
        self.pump_after(now, &peer);
    }

    /// A chunk request failed as a whole (no data-plane address, connection error, reset): its chunks are not
    /// asked of that peer again in this snapshot, and the failure counts against it.
    fn on_chunks_failed(&mut self, now: Now, req: ReqId) {
        if let Phase::Transfer { sched, .. } = &mut self.phase {
            let outs = sched.on_request_failed(req);
            self.sched_outputs(outs);
        }
        self.pump(now);
    }

    /// Applying snapshot `seq` (an `Output::Apply`) failed: it is tried again after a back-off
    /// (`APPLY_RETRY_FIRST_MS`, doubling per failure in a row up to `APPLY_RETRY_MAX_MS`), or, if a newer root was
    /// accepted by then, the newer one is synced instead (from the applied snapshot; staged chunks are found again).
    fn on_apply_failed(&mut self, now: Now, seq: u64, kind: ApplyFailure) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let Phase::Applying { target, plan } = phase else {
            self.phase = phase;
            return;
        };
        if target.body.seq != seq {
            self.phase = Phase::Applying { target, plan };
            return;
        }
        self.apply_failures = self.apply_failures.saturating_add(1);
        self.last_apply_failure = Some(kind);
        let wait = backoff_ms(APPLY_RETRY_FIRST_MS, APPLY_RETRY_MAX_MS, self.apply_failures);
        self.phase = Phase::ApplyWait { target, plan, retry_at: now.mono.plus_ms(wait) };
    }

    /// The caller applied snapshot `seq` to the served tree.
    fn on_applied(&mut self, now: Now, seq: u64, source: &impl NodeSource) -> Result<(), EngineError> {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let target = match phase {
            // (Late news of an apply that was reported failed counts too: the tree holds the snapshot.)
            Phase::Applying { target, .. } | Phase::ApplyWait { target, .. } if target.body.seq == seq => target,
            phase => {
                self.phase = phase;
                return Ok(());
            }
        };
        self.apply_failures = 0;
        self.last_apply_failure = None;
        self.current = Some(target);
        self.lift_snapshot_bans();
        self.waiting_for_origin = false;
        for info in self.peers.values_mut() {
            info.holdings.clear();
        }
        self.out.push_back(Output::Notice(Notice::SyncComplete { seq }));
        self.announce_complete(seq);
        if let Some(latest) = self.latest().cloned()
            && self.is_newer(&latest)
        {
            self.start_sync(now, latest, source)?;
        }
        Ok(())
    }

    /// Origin role: a snapshot was published locally (its nodes are in the store); `chunks` are its chunk ids
    /// (announcements of other ids are dropped, requests for them refused).
    fn on_published(&mut self, now: Now, root: SignedRoot, chunks: ChunkSet) -> Result<(), EngineError> {
        let verified = self.roots.accept(now.wall, &root).map_err(EngineError::Published)?;
        let seq = verified.body.seq;
        self.current = Some(verified);
        self.republish_asked = None;
        self.start_serving(chunks);
        self.out.push_back(Output::Gossip(root));
        self.push_root(seq);
        self.announce_complete(seq);
        Ok(())
    }

    /// Origin role: the chunk ids of the current snapshot `seq`, for an origin restored from persisted state
    /// ([`Engine::new`] with a current snapshot); until it is given, announcements and requests are bounded only by
    /// the tables' caps. Ignored unless `seq` is the current snapshot.
    fn on_snapshot_chunks(&mut self, seq: u64, chunks: ChunkSet) {
        if self.cfg.role == Role::Origin && self.current.as_ref().is_some_and(|c| c.body.seq == seq) {
            self.start_serving(chunks);
        }
    }

    /// Origin: forgets what it knew of the previous snapshot's distribution and serves `chunks`.
    fn start_serving(&mut self, chunks: ChunkSet) {
        self.seeder.reset();
        self.holders.clear();
        self.holder_entries = 0;
        self.lift_snapshot_bans();
        for info in self.peers.values_mut() {
            info.unknown_requests = 0;
            info.false_claim = false;
        }
        self.snapshot_chunks = Some(chunks);
    }

    /// Sizes of the tables peers can grow (for tests and metrics).
    pub fn table_sizes(&self) -> TableSizes {
        TableSizes {
            holders: self.holder_entries,
            seeder_recipients: self.seeder.recipients_len(),
            seeder_redirects: self.seeder.redirects_len(),
            pending_holdings: self.peers.values().map(|i| i.holdings.len()).sum(),
        }
    }

    /// Announced chunk ids dropped since the start.
    pub fn announce_counts(&self) -> AnnounceCounts {
        self.announce_counts
    }

    /// Chunks received again since the start (see [`CopyCounts`]).
    pub fn copy_counts(&self) -> CopyCounts {
        self.copy_counts
    }

    /// Sends this node's hello (which carries the newest root) straight to every greeted peer not known to have
    /// root `seq`: gossip reaches peers in the mesh, this reaches the rest (a peer that just connected, a mesh not
    /// yet formed), so a new root propagates even when a gossip message is lost.
    /// Mirror: `peer` announced snapshot `seq` (chunks of it, or all of it), newer than any root this node knows:
    /// the root's gossip and push did not arrive (a dead connection swallowed them, or the gossip mesh had not
    /// formed yet), so ask the peer for its hello, which carries its root. Once per snapshot per peer: a peer's
    /// claims cost at most one hello each.
    fn ask_for_root(&mut self, peer: &P, seq: u64) {
        let latest = self.latest().map(|r| r.body.seq);
        if self.cfg.role != Role::Mirror || Some(seq) <= latest {
            return;
        }
        let Some(info) = self.peers.get_mut(peer) else { return };
        if info.root_asked >= Some(seq) {
            return;
        }
        info.root_asked = Some(seq);
        self.out.push_back(Output::SendHello(peer.clone(), self.hello()));
    }

    fn push_root(&mut self, seq: u64) {
        let hello = self.hello();
        for (peer, info) in &mut self.peers {
            if info.greeted && info.advertised < Some(seq) && info.pushed < Some(seq) {
                info.pushed = Some(seq);
                self.out.push_back(Output::SendHello(peer.clone(), hello.clone()));
            }
        }
    }

    /// How to answer `peer`'s request for chunk `id` (only the origin ever redirects).
    /// Asked by the data plane while it answers a request, so answered at once rather than through `handle`.
    pub fn serve_decision(&mut self, now: Mono, peer: &P, id: &ChunkId) -> ServeDecision<P> {
        if self.cfg.role != Role::Origin {
            return ServeDecision::Serve;
        }
        let seq = self.current.as_ref().map(|c| c.body.seq);
        if self.bans.is_banned(peer) {
            self.seeder.counts.refused_banned += 1;
            return ServeDecision::Refuse;
        }
        if self.snapshot_chunks.as_ref().is_some_and(|set| !set.contains(id)) {
            // Not a chunk of this snapshot: nothing to serve, nothing to remember; too many and the asker is
            // banned for the snapshot.
            self.seeder.counts.refused_unknown += 1;
            if let Some(info) = self.peers.get_mut(peer) {
                info.unknown_requests += 1;
                if info.unknown_requests > UNKNOWN_CHUNK_REQUESTS_MAX
                    && self.bans.ban_for_snapshot(peer, BanReason::UnknownChunks)
                {
                    self.out.push_back(Output::Ban {
                        peer: peer.clone(),
                        reason: BanReason::UnknownChunks,
                        until: None,
                    });
                }
            }
            return ServeDecision::Refuse;
        }
        if seq.is_some()
            && let Some(info) = self.peers.get_mut(peer)
            && info.complete_seq == seq
        {
            info.false_claim = true;
            self.seeder.counts.refused += 1;
            return ServeDecision::Refuse;
        }
        let mut holders: Vec<P> = self
            .peers
            .iter()
            .filter(|(p, info)| {
                *p != peer && info.greeted && info.complete_seq == seq && seq.is_some() && !info.false_claim
            })
            .map(|(p, _)| p.clone())
            .take(crate::transfer::REDIRECT_PEERS_MAX)
            .collect();
        for holder in self.holders.get(id).into_iter().flatten() {
            let named = self.peers.get(holder).is_some_and(|info| !info.false_claim);
            if holder != peer && named && !holders.contains(holder) {
                holders.push(holder.clone());
            }
        }
        holders.truncate(crate::transfer::REDIRECT_PEERS_MAX);
        let peers = &self.peers;
        self.seeder.decide(now, peer, id, &holders, |p| peers.contains_key(p))
    }

    /// Chunks the origin served (and why it served copies beyond the first), redirected, and refused to peers
    /// claiming to hold the snapshot already.
    pub fn seeder_counts(&self) -> seeder::SeederCounts {
        self.seeder.counts
    }

    fn on_timeout(&mut self, now: Now, source: &impl NodeSource) -> Result<(), EngineError> {
        for peer in self.bans.expire(now.mono) {
            self.out.push_back(Output::Unban { peer });
        }
        if self.republish_due().is_some_and(|due| due <= now.mono) {
            self.republish_asked = Some(now.mono);
            self.out.push_back(Output::Republish);
        }
        match &mut self.phase {
            Phase::Manifest { fetch, .. } => {
                for (_, req) in fetch.overdue(now.mono) {
                    fetch.on_failed(req);
                }
                fetch.forget_lacks(now.mono);
            }
            Phase::Transfer { sched, .. } => {
                let outs = sched.on_tick(now.mono);
                self.sched_outputs(outs);
            }
            Phase::ApplyWait { retry_at, .. } if *retry_at <= now.mono => self.retry_apply(now, source)?,
            _ => {}
        }
        if now.mono.millis_since(self.last_have_flush) >= self.cfg.have_flush_ms {
            self.flush_haves(now.mono);
        }
        self.advance(now, source)
    }

    // ---- internals ----------------------------------------------------------------------------------------

    fn is_newer(&self, root: &VerifiedRoot) -> bool {
        self.current.as_ref().is_none_or(|c| root.body.seq > c.body.seq)
    }

    fn start_sync(&mut self, now: Now, target: VerifiedRoot, source: &impl NodeSource) -> Result<(), EngineError> {
        if !self.is_newer(&target) {
            return Ok(());
        }
        match &self.phase {
            // Finish applying first; `Input::Applied` picks up the newer root (or the retry does, after a failure).
            Phase::Applying { .. } | Phase::ApplyWait { .. } => return Ok(()),
            Phase::Manifest { target: t, .. }
            | Phase::Staging { target: t, .. }
            | Phase::Transfer { target: t, .. }
                if t.body.seq >= target.body.seq =>
            {
                return Ok(());
            }
            _ => {}
        }
        // Abandon a sync to an older snapshot (staged chunks stay staged and are found again).
        if let Phase::Transfer { sched, .. } = &mut self.phase {
            remember_suspects(&mut self.suspects, sched);
            // A claimer that kept this sync waiting keeps the next one waiting from the same instant: its stall
            // allowance does not restart because a newer snapshot came (trickles can come faster than it).
            self.kept_waiting = sched.peer_keys().filter_map(|p| Some((p.clone(), sched.waiting_since(p)?))).collect();
            let outs = sched.cancel_all();
            self.sched_outputs(outs);
        }
        self.lift_snapshot_bans();
        let base = self.current.as_ref().map(|c| c.body.root);
        let delta = target.body.delta.as_ref().filter(|d| Some(d.base_root) == base).map(|d| (d.hash, d.base_root));
        let fetch = ManifestFetch::new(target.body.root, delta, source)?;
        self.origin_metadata_wait = Some((target.body.seq, now.mono.plus_ms(ORIGIN_METADATA_WAIT_MS)));
        self.phase = Phase::Manifest { target, fetch, planning: false };
        self.advance(now, source)
    }

    /// Moves the manifest phase forward: a resumed fetch is started (reading the nodes this call stored through
    /// [`Unstored`]), a complete manifest's `Plan` job is handed out.
    fn advance(&mut self, now: Now, source: &impl NodeSource) -> Result<(), EngineError> {
        let mut unstored = std::mem::take(&mut self.unstored);
        let result = self.advance_with(now, &Unstored { base: source, nodes: &unstored });
        unstored.append(&mut self.unstored);
        self.unstored = unstored;
        result
    }

    fn advance_with(&mut self, now: Now, source: &impl NodeSource) -> Result<(), EngineError> {
        if let Phase::Manifest { fetch, .. } = &mut self.phase
            && fetch.needs_start()
        {
            *fetch = ManifestFetch::new(fetch.root(), None, source)?;
        }
        if let Phase::Manifest { fetch, target, planning } = &mut self.phase
            && fetch.is_complete()
            && !*planning
        {
            *planning = true;
            let base = self.current.as_ref().map(|c| c.body.root);
            let cfg = &self.cfg;
            let job = PlanJob {
                seq: target.body.seq,
                root: target.body.root,
                base,
                limits: cfg.scheduler.clone(),
                salt: cfg.salt,
                index_names: cfg.index_names.clone(),
            };
            self.out.push_back(Output::Plan(job));
        }
        self.pump(now);
        Ok(())
    }

    /// A `Plan` job's result: stage the files (or fetch a missing subtree again, or give up on a broken manifest).
    /// The result of a job for a target this node has moved on from is dropped.
    fn on_planned(&mut self, now: Now, planned: Box<Planned<P>>) -> Result<(), EngineError> {
        let is_awaited = matches!(&self.phase, Phase::Manifest { target, planning: true, .. }
            if target.body.seq == planned.seq && target.body.root == planned.root);
        if !is_awaited {
            return Ok(());
        }
        let Phase::Manifest { target, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("the phase was matched above")
        };
        let ready = match planned.outcome {
            Ok(ready) => ready,
            Err(PlanFailure::Source(e)) => {
                // As when the fetch reads the store: the sync waits for the next event to try again.
                self.phase =
                    Phase::Manifest { fetch: ManifestFetch::resume(target.body.root), target, planning: false };
                return Err(e.into());
            }
            Err(PlanFailure::Missing(hash)) => {
                self.out.push_back(Output::Notice(Notice::ManifestError(ManifestProblem::NodeMissing(hash))));
                self.phase = Phase::Manifest { fetch: ManifestFetch::resume(hash), target, planning: false };
                self.pump(now);
                return Ok(());
            }
            Err(PlanFailure::Invalid(e)) => {
                self.out.push_back(Output::Notice(Notice::ManifestError(ManifestProblem::Invalid(e))));
                return Ok(());
            }
        };
        let Ready { files, mut sched, plan } = ready;
        let seq = target.body.seq;
        // What peers announced so far moves into the scheduler, which keeps only chunks this sync needs.
        for (peer, info) in &mut self.peers {
            let holdings = std::mem::take(&mut info.holdings);
            if !info.greeted || self.bans.is_banned(peer) {
                continue;
            }
            sched.set_peer(peer, info.is_origin, info.complete_seq == Some(seq));
            if self.suspects.contains(peer) {
                sched.suspect(peer);
            }
            if let Some(since) = self.kept_waiting.get(peer) {
                sched.keep_waiting(peer, *since);
            }
            for id in &holdings {
                sched.add_holding(now.mono, peer, id);
            }
        }
        self.kept_waiting.clear();
        self.out.push_back(Output::Stage { seq, files });
        self.phase = Phase::Staging { target, sched, plan };
        // Neighbours waiting for the manifest ask here (chunks are announced later, when they arrive).
        self.announce_manifest(seq);
        self.pump(now);
        Ok(())
    }

    /// The back-off after a failed apply is over: moves on to a newer accepted root if there is one, else applies
    /// the same target again.
    fn retry_apply(&mut self, now: Now, source: &impl NodeSource) -> Result<(), EngineError> {
        let Phase::ApplyWait { target, plan, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Ok(());
        };
        if let Some(latest) = self.latest().cloned()
            && latest.body.seq > target.body.seq
        {
            return self.start_sync(now, latest, source);
        }
        self.out.push_back(Output::Apply { target: target.clone(), plan: plan.clone() });
        self.phase = Phase::Applying { target, plan };
        Ok(())
    }

    fn finish_if_done(&mut self, now: Now) {
        let done = matches!(&self.phase, Phase::Transfer { sched, .. } if sched.is_done());
        if !done {
            return;
        }
        self.flush_haves(now.mono);
        if let Phase::Transfer { target, sched, plan } = std::mem::replace(&mut self.phase, Phase::Idle) {
            remember_suspects(&mut self.suspects, &sched);
            self.out.push_back(Output::Apply { target: target.clone(), plan: plan.clone() });
            self.phase = Phase::Applying { target, plan };
        }
    }

    fn pump(&mut self, now: Now) {
        let mut next = self.next_req;
        let mut next_req = || {
            next += 1;
            ReqId(next)
        };
        match &mut self.phase {
            Phase::Manifest { target, fetch, .. } => {
                let seq = target.body.seq;
                // Peers that hold the manifest (complete at the snapshot, or announcing chunks of it) first, then
                // the origin, then peers that only know the root (they may still be fetching it themselves).
                let mut candidates: Vec<(u8, P)> = self
                    .peers
                    .iter()
                    .filter(|(p, info)| {
                        info.greeted
                            && !self.bans.is_banned(p)
                            && (info.advertised >= Some(seq) || info.complete_seq >= Some(seq))
                    })
                    .map(|(p, info)| {
                        let holds = info.complete_seq >= Some(seq) || info.manifest_seq >= Some(seq);
                        let rank = match (info.is_origin, holds) {
                            (false, true) => 0,
                            (true, _) => 1,
                            (false, false) => 2,
                        };
                        (rank, p.clone())
                    })
                    .collect();
                candidates.sort();
                // Until a neighbour holds the manifest, only a few of them ask the origin (the first candidate is
                // the origin: nobody else is known to hold it).
                // (Every neighbour counts: all learn of the root at about the same moment, most from the origin.)
                let others = self
                    .peers
                    .iter()
                    .filter(|(p, info)| info.greeted && !info.is_origin && !self.bans.is_banned(p))
                    .count();
                let waiting = self.origin_metadata_wait.is_some_and(|(s, until)| s == seq && now.mono < until);
                if waiting
                    && candidates.first().is_some_and(|(rank, _)| *rank == 1)
                    && !asks_origin_for_manifest_at_once(self.cfg.salt, seq, others)
                {
                    candidates.clear();
                }
                let peers: Vec<P> = candidates.into_iter().map(|(_, p)| p).collect();
                let outs = fetch.pump(now.mono, &peers, &mut next_req);
                self.next_req = next;
                self.fetch_outputs(outs);
            }
            Phase::Transfer { .. } if now.mono < self.paused_until => {}
            Phase::Transfer { sched, .. } => {
                let outs = sched.pump(now.mono, &mut next_req);
                self.next_req = next;
                let waiting = sched.unavailable();
                self.sched_outputs(outs);
                if (waiting > 0) != self.waiting_for_origin {
                    self.waiting_for_origin = waiting > 0;
                    if waiting > 0 {
                        self.out.push_back(Output::Notice(Notice::WaitingForOrigin { chunks: waiting }));
                    }
                }
            }
            _ => {}
        }
    }

    fn fetch_outputs(&mut self, outs: Vec<FetchOut<P>>) {
        for out in outs {
            match out {
                FetchOut::Nodes { peer, req, hashes, descendants_max } => {
                    self.out.push_back(Output::FetchNodes { peer, req, hashes, descendants_max })
                }
                FetchOut::Delta { peer, req, hash } => self.out.push_back(Output::FetchDelta { peer, req, hash }),
                FetchOut::Store(nodes) => {
                    for (hash, bytes) in &nodes {
                        self.unstored.insert(*hash, bytes.clone());
                    }
                    self.out.push_back(Output::StoreNodes(nodes));
                }
                FetchOut::StoreDelta(hash, bytes) => self.out.push_back(Output::StoreDelta(hash, bytes)),
                FetchOut::Corrupt { peer } => {
                    if self.bans.ban_for_snapshot(&peer, BanReason::CorruptMetadata) {
                        self.out.push_back(Output::Ban { peer, reason: BanReason::CorruptMetadata, until: None });
                    }
                }
                FetchOut::DeltaRejected => self.out.push_back(Output::Notice(Notice::DeltaRejected)),
            }
        }
    }

    fn sched_outputs(&mut self, outs: Vec<SchedOut<P>>) {
        for out in outs {
            match out {
                SchedOut::Fetch(f) => {
                    self.out.push_back(Output::FetchChunks { peer: f.peer, req: f.req, chunks: f.chunks })
                }
                SchedOut::Cancel { peer, req } => self.out.push_back(Output::Cancel { peer, req }),
                SchedOut::Ban { peer, reason } => {
                    if self.bans.ban_for_snapshot(&peer, reason) {
                        self.out.push_back(Output::Ban { peer, reason, until: None });
                    }
                }
                SchedOut::Stalled { peer } => self.out.push_back(Output::Notice(Notice::PeerStalled { peer })),
            }
        }
    }

    fn flush_haves(&mut self, now: Mono) {
        self.last_have_flush = now;
        if self.have_outbox.is_empty() {
            return;
        }
        let seq = match &self.phase {
            Phase::Transfer { target, .. } | Phase::Applying { target, .. } | Phase::ApplyWait { target, .. } => {
                target.body.seq
            }
            _ => {
                self.have_outbox.clear();
                return;
            }
        };
        let complete_seq = self.current.as_ref().map(|c| c.body.seq);
        let chunks = std::mem::take(&mut self.have_outbox);
        let peers: Vec<P> = self.peers.iter().filter(|(_, i)| i.greeted).map(|(p, _)| p.clone()).collect();
        for part in chunks.chunks(HAVE_CHUNKS_MAX) {
            for peer in &peers {
                let have = Have { repo: self.cfg.repo.clone(), seq, complete_seq, chunks: part.to_vec() };
                self.out.push_back(Output::SendHave(peer.clone(), have));
            }
        }
    }

    /// Tells every neighbour that this node holds snapshot `seq`'s manifest.
    fn announce_manifest(&mut self, seq: u64) {
        let complete_seq = self.current.as_ref().map(|c| c.body.seq);
        let peers: Vec<P> = self.peers.iter().filter(|(_, i)| i.greeted).map(|(p, _)| p.clone()).collect();
        for peer in peers {
            let have = Have { repo: self.cfg.repo.clone(), seq, complete_seq, chunks: Vec::new() };
            self.out.push_back(Output::SendHave(peer, have));
        }
    }

    fn announce_complete(&mut self, seq: u64) {
        let peers: Vec<P> = self.peers.iter().filter(|(_, i)| i.greeted).map(|(p, _)| p.clone()).collect();
        for peer in peers {
            let have = Have { repo: self.cfg.repo.clone(), seq, complete_seq: Some(seq), chunks: Vec::new() };
            self.out.push_back(Output::SendHave(peer, have));
        }
    }
}

/// Carries what a finished or abandoned snapshot's scheduler learnt about its peers into the next one.
fn remember_suspects<P: PeerKey>(suspects: &mut BTreeSet<P>, sched: &Scheduler<P>) {
    for peer in sched.peer_keys() {
        match sched.suspicion(peer) {
            Some(true) => {
                if suspects.len() >= SUSPECTS_MAX && !suspects.contains(peer) {
                    suspects.pop_first();
                }
                suspects.insert(peer.clone());
            }
            Some(false) => {
                suspects.remove(peer);
            }
            None => {}
        }
    }
}

/// `base` with the nodes stored by outputs of the call in progress (see [`Engine::handle`]).
struct Unstored<'a, S> {
    base: &'a S,
    nodes: &'a BTreeMap<NodeHash, Vec<u8>>,
}

impl<S: NodeSource> NodeSource for Unstored<'_, S> {
    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        match self.nodes.get(hash) {
            Some(bytes) => Ok(Some(bytes.clone())),
            None => self.base.node_bytes(hash),
        }
    }

    fn has_node(&self, hash: &NodeHash) -> Result<bool, SourceError> {
        Ok(self.nodes.contains_key(hash) || self.base.has_node(hash)?)
    }

    fn verified_node(&self, hash: &NodeHash) -> Option<crate::node::Node> {
        if self.nodes.contains_key(hash) { None } else { self.base.verified_node(hash) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_three_of_a_mirrors_neighbours_ask_the_origin_for_a_new_manifest_at_once() {
        // Alone with the origin, or among few neighbours: always at once.
        assert!((0..1000).all(|salt| asks_origin_for_manifest_at_once(mix_salt(salt), 7, 0)));
        assert!((0..1000).all(|salt| asks_origin_for_manifest_at_once(mix_salt(salt), 7, 7)));
        assert!((0..1000).all(|salt| asks_origin_for_manifest_at_once(mix_salt(salt), 7, 15)));
        assert!(!(0..1000).all(|salt| asks_origin_for_manifest_at_once(mix_salt(salt), 7, 16)));
        // Among 23 neighbours (24 mirrors): 3 in 24, each snapshot another draw.
        for seq in [1, 2, 3] {
            let at_once =
                (0..10_000u64).filter(|&salt| asks_origin_for_manifest_at_once(mix_salt(salt), seq, 23)).count();
            assert!((1_100..=1_400).contains(&at_once), "seq {seq}: {at_once} of 10,000");
        }
        let same = (0..10_000u64)
            .filter(|&salt| {
                asks_origin_for_manifest_at_once(mix_salt(salt), 1, 23)
                    && asks_origin_for_manifest_at_once(mix_salt(salt), 2, 23)
            })
            .count();
        assert!(same < 300, "the same mirrors asked for two snapshots: {same}");
    }

    /// Salts as nodes draw them (spread over all 64 bits).
    fn mix_salt(i: u64) -> u64 {
        scheduler::mix(i.wrapping_mul(0x9e37_79b9))
    }
}
