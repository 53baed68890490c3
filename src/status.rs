//! What `GET /status`, `GET /peers` and `GET /repos` return and `mirrormesh status`, `peers` and `repos` print.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub node_id: String,
    /// `origin` or `mirror`.
    pub role: String,
    /// Where the control plane (libp2p) listens.
    pub listen_addrs: Vec<String>,
    /// Where the data plane listens.
    pub data_addr: String,
    /// Milliseconds since the daemon started.
    #[serde(default)]
    pub uptime_ms: u64,
    pub repos: Vec<RepoStatus>,
    pub peers: Vec<PeerStatus>,
    /// Nodes of the fabric this node knows (its members, this node included): from the bootstrap list, member lists
    /// exchanged with peers, and peers that connected.
    #[serde(default)]
    pub members: u64,
    /// Chunk bytes this node served to peers.
    pub bytes_served_total: u64,
    /// Chunk bytes this node received from peers and origins.
    pub bytes_fetched_total: u64,
    /// The part of `bytes_fetched_total` that came from an origin.
    pub bytes_fetched_from_origin: u64,
    /// Events worth counting (roots rejected by reason, chunks rejected, bans, ...).
    pub counters: BTreeMap<String, u64>,
    /// The newest of `problems`, if any.
    pub last_error: Option<String>,
    /// What is wrong now, one entry per kind (a refused publish, a failing apply, an expired root, ...); each stays
    /// until the condition behind it is gone.
    #[serde(default)]
    pub problems: Vec<crate::daemon::Problem>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RepoStatus {
    pub name: String,
    /// Sequence number of the snapshot the served tree holds.
    pub seq: Option<u64>,
    /// Its manifest root (hex).
    pub root: Option<String>,
    /// `idle`, `syncing`, or (a mirror that has never applied a snapshot and is not syncing) `never-synced`.
    pub state: String,
    /// What the sync is doing: `idle`, `fetching-manifest`, `planning`, `staging`, `transferring`, `applying`,
    /// `apply-retrying` (the last apply failed; it is tried again with back-off, or a newer snapshot is synced
    /// instead).
    pub phase: String,
    pub target_seq: Option<u64>,
    /// Snapshot whose files are staged (its chunks are being fetched or it is being applied).
    #[serde(default)]
    pub staged_seq: Option<u64>,
    /// Share of the sync in progress that is done, from 0 to 1 (1 when idle).
    #[serde(default)]
    pub progress: f64,
    /// Files of the target snapshot that still miss chunks.
    #[serde(default)]
    pub files_missing: u64,
    pub bytes_missing: u64,
    pub chunks_missing: u64,
    /// Some needed chunk exists on no reachable peer and no origin is connected.
    pub waiting_for_origin: bool,
    /// Files and bytes of the applied snapshot.
    pub files: u64,
    pub bytes: u64,
    /// Removals waiting for their grace period.
    pub pending_deletions: u64,
    /// When the origin created the served snapshot's root, and when that root expires (ms since the Unix epoch).
    #[serde(default)]
    pub created_ms: Option<u64>,
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// When the served tree last changed to a new snapshot (milliseconds since the Unix epoch).
    #[serde(default)]
    pub last_apply_ms: Option<u64>,
    /// From the applied root's creation at the origin to its apply here, in milliseconds (clocks of both ends).
    #[serde(default)]
    pub propagation_lag_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    /// The libp2p address the connection uses.
    pub address: String,
    /// The data-plane address chunks are fetched from.
    pub data_address: Option<String>,
    pub origin: bool,
    /// How this node first learned of the peer: `bootstrap` (its config), `exchange` (a peer's member list) or
    /// `inbound` (it connected first).
    #[serde(default)]
    pub learned: Option<String>,
    /// Whether a control-plane connection is open (peers are listed while connected).
    #[serde(default)]
    pub connected: bool,
    /// Round trip of the control plane (hello/have exchanges), milliseconds, smoothed; `None` until measured.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub chunks_sent: u64,
    pub chunks_received: u64,
    pub failures: u64,
    pub banned: bool,
    /// How well the peer serves this node: its measured chunk delivery rate in bytes per second, smoothed over
    /// requests (`None` until this node fetched from it; 0 once banned).
    #[serde(default)]
    pub score: Option<f64>,
    /// Snapshot the peer holds completely.
    pub complete_seq: Option<u64>,
    /// Milliseconds since the Unix epoch when the connection was established.
    pub connected_since_ms: u64,
}

/// Reply of `POST /publish`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishReply {
    pub repo: String,
    pub seq: u64,
    pub root: String,
    pub files: u64,
    pub bytes: u64,
    pub changes: usize,
    pub delta_bytes: Option<usize>,
    /// Files added or changed, and their bytes: what mirrors must fetch.
    pub changed_files: u64,
    pub changed_bytes: u64,
}

/// What `GET /fabric` returns: every member of the fabric this node knows (itself included), the snapshot each
/// serves as it last told this node, and how far behind the newest snapshot it is. Rebuilt once a second
/// (`history::FABRIC_REFRESH`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FabricView {
    pub node_id: String,
    /// `origin` or `mirror`.
    pub role: String,
    /// The newest snapshot this node knows of: the origin's newest root as far as this node has heard.
    pub newest_seq: Option<u64>,
    /// When the origin created it (ms since the Unix epoch).
    pub newest_created_ms: Option<u64>,
    /// This node first, then the others in id order.
    pub members: Vec<MemberView>,
    /// Members serving an older snapshot than the newest (or none known).
    pub behind: u64,
    /// Changes whenever `GET /history` has something new (the page fetches it then).
    pub history_version: u64,
    /// When this view was built (ms since the Unix epoch).
    pub updated_ms: u64,
}

/// One member of the fabric, as this node sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemberView {
    pub id: String,
    /// This row is the node serving the view.
    pub this_node: bool,
    pub origin: bool,
    pub connected: bool,
    /// How this node learned of it (`bootstrap`, `exchange`, `inbound`); none for this node.
    pub learned: Option<String>,
    /// The snapshot the member serves (holds completely), as it last told this node (its hello and haves); kept
    /// after it disconnects.
    pub seq: Option<u64>,
    /// When this node last heard from it while connected, or (never connected since this node started) when the
    /// fabric last saw it (ms since the Unix epoch).
    pub seen_ms: Option<u64>,
    /// It serves an older snapshot than [`FabricView::newest_seq`], or none this node knows of.
    pub behind: bool,
    /// Snapshots newer than `seq` among those this node remembers (`history::SNAPSHOTS_MAX`).
    pub snapshots_behind: u64,
    /// `seq` is older than every snapshot this node remembers (or unknown): `snapshots_behind` is a lower bound.
    pub snapshots_behind_at_least: bool,
    /// How long it has been behind: since the origin created the oldest remembered snapshot it lacks (ms).
    pub behind_ms: Option<u64>,
    /// Its chunk delivery rate to this node, bytes per second, smoothed over requests (this node's measurement;
    /// the last one is kept after it disconnects).
    pub rate: Option<f64>,
    /// Chunk bytes per second from it and to it over the last history sample (10 s).
    pub received_bps: Option<f64>,
    pub sent_bps: Option<f64>,
    /// Control-plane round trip, milliseconds, while connected.
    pub rtt_ms: Option<f64>,
}

/// What `GET /history` returns: this node's own samples of the last hour, and what it recorded of each snapshot it
/// heard of (the last `history::SNAPSHOTS_MAX`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistoryReport {
    /// Time between samples (ms).
    pub interval_ms: u64,
    /// Oldest first; at most `history::SAMPLES_MAX` (one hour).
    pub samples: Vec<HistorySample>,
    /// Oldest first.
    pub snapshots: Vec<SnapshotHistory>,
}

/// Chunk traffic over one sample interval, bytes per second.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HistorySample {
    /// End of the interval (ms since the Unix epoch).
    pub t_ms: u64,
    pub from_peers_bps: f64,
    pub from_origin_bps: f64,
    pub served_bps: f64,
}

/// One snapshot: its propagation and, on the origin, what it cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SnapshotHistory {
    pub seq: u64,
    /// When the origin created its root (ms since the Unix epoch).
    pub created_ms: u64,
    /// Mirror: from the root's creation to its apply here (clocks of both ends).
    pub applied_lag_ms: Option<u64>,
    /// Connected peers seen announcing the snapshot complete (a change of the snapshot they hold, seen while
    /// connected; at most `membership::MEMBERS_MAX` counted), and from the root's creation to those announces:
    /// the least, the median and the most.
    pub announced: u64,
    pub announce_lag_ms_min: Option<u64>,
    pub announce_lag_ms_median: Option<u64>,
    pub announce_lag_ms_max: Option<u64>,
    /// Origin: bytes of the files the update added or changed, and chunk bytes it sent while this was its newest
    /// snapshot; their ratio is the copies of the update it sent (`copies`; none for an update that changed nothing,
    /// such as a re-signing).
    pub changed_bytes: Option<u64>,
    pub origin_sent_bytes: Option<u64>,
    pub copies: Option<f64>,
}
