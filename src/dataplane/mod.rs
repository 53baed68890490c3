//! The data plane: chunk transfer between nodes over QUIC (quinn), authenticated with each node's libp2p identity.
//!
//! # Protocol
//! One UDP socket per node serves incoming requests and dials peers. Connections are used in the direction they
//! were dialed: the dialer requests, the listener serves (a dialer grants the listener no streams). Every request
//! is one bidirectional stream, with the messages of [`mirrormesh_proto::transfer`]:
//! - the requester writes one frame (4-byte big-endian length, then [`ChunkRequest::encode`]) naming the
//!   repository and 1 to [`CHUNKS_PER_REQUEST_MAX`] chunk ids, and finishes its send side;
//! - the responder answers each chunk in order with one [`ChunkReply`] frame: `Data { len }` followed by exactly
//!   `len` raw bytes, `Missing`, or `Elsewhere { peers }` (the origin's super-seeding redirect); then it finishes.
//!
//! The requester hashes every chunk it receives ([`ChunkId::of`], blake3) and reports it [`Fetched::Verified`] only
//! if it matches the id it asked for; nothing from a peer is trusted before that. Any other deviation (a frame
//! over the limit, an undecodable reply, a short or long stream) fails the fetch with an error naming the peer.
//! A refused request is answered with a stream reset (code 1); dropping a fetch resets its stream (code 2).
//!
//! # Identity
//! Each node presents a self-signed certificate made by `libp2p_tls::certificate::generate` from its node key: a
//! fresh ECDSA key whose public half is signed by the node's ed25519 identity in the libp2p extension. Both sides
//! require exactly one such certificate, check it with `libp2p_tls::certificate::parse` (self-signature, validity,
//! extension signature) and check the TLS 1.3 handshake signature against its key, so the certificate's peer id is
//! proven by the handshake. A dialer accepts only the peer id it meant to reach (and says which one answered if
//! another did); a listener learns the dialer's peer id from its certificate and applies the allow list, closing
//! the connection of a peer not on it. TLS 1.3 only, no session resumption (every connection proves both
//! identities), ALPN [`DATA_ALPN`], cipher suites AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305, from an
//! explicit aws-lc-rs provider, never the process default (see [`tls`]).
//!
//! # Limits
//! Every quantity a peer drives is bounded here or in the protocol core:
//! - frames: [`FRAME_BYTES_MAX`] (the length prefix is checked before anything is allocated),
//!   [`CHUNKS_PER_REQUEST_MAX`] chunks per request, `Data` of 1 to [`CHUNK_SIZE`] bytes, [`REDIRECT_PEERS_MAX`]
//!   peers per redirect;
//! - connections: a dialer must first prove its source address (QUIC Retry: an Initial without a valid token is
//!   answered with a Retry and takes no state), so spoofed Initials take nothing; then [`HANDSHAKES_MAX`] handshakes
//!   in progress, [`HANDSHAKES_PER_SOURCE_MAX`] from one source address (IPv4 address or IPv6 /64), each within
//!   [`HANDSHAKE_TIMEOUT`]; [`CONNECTIONS_MAX`] accepted connections, [`CONNECTIONS_PER_PEER_MAX`] from one peer id
//!   (further ones are closed once the handshake names the peer); a connection with no packets for
//!   [`IDLE_TIMEOUT`] closes. When we dial: [`DIAL_TIMEOUT`], and after a refused or failed handshake a back-off of
//!   [`DIAL_BACKOFF_MIN`] doubling to [`DIAL_BACKOFF_MAX`] (a refusal for load is retried within the dial timeout);
//! - streams: [`STREAMS_PER_CONNECTION_MAX`] concurrent requests per connection (QUIC stream credit); a request
//!   must arrive completely within [`REQUEST_READ_TIMEOUT`]; a serving stream whose reader takes no data for
//!   [`WRITE_STALL_TIMEOUT`] is reset, and a fetch whose server sends nothing for [`REPLY_STALL_TIMEOUT`] fails
//!   (both detected within twice the period, see `stall.rs`);
//! - memory: at most [`SERVE_CHUNKS_IN_MEMORY_MAX`] chunks are held for serving, at most
//!   [`SERVE_CHUNKS_PER_CONNECTION_MAX`] for one connection, each stream reading at most [`READ_AHEAD_CHUNKS`]
//!   ahead of what it writes; quinn then buffers at most [`SEND_WINDOW`] unacknowledged bytes per connection.
//!   Requests get [`REQUEST_STREAM_WINDOW`] per stream and [`REQUEST_CONNECTION_WINDOW`] per connection; replies
//!   [`STREAM_RECEIVE_WINDOW`] per stream and [`CONNECTION_RECEIVE_WINDOW`] per connection;
//! - upload: an optional token bucket shared by all connections meters chunk bytes in pieces of
//!   [`RATE_PIECE_BYTES`], saving up at most [`RATE_BURST`] of idle time;
//! - sending: optionally (the origin: [`ORIGIN_SENDING_REPLIES_MAX`]) only a few replies send chunk data at once,
//!   across all connections; a reply keeps its slot until its bytes have left (its connection put as many on the
//!   wire since it took the slot) or its peer acknowledged all of it, at most [`SENDING_SLOT_HOLD_MAX`], so a slow or
//!   silent peer holds a slot only that long. A slot that comes free goes to
//!   the waiting peer holding fewest slots (the longest-waiting reply among equals), so a peer with many requests
//!   queued gets a second slot only when no other peer waits (see `sending.rs`);
//! - bookkeeping: per-peer traffic for at most [`TRAFFIC_PEERS_MAX`] peers.
//!
//! Refused input is counted by kind ([`DataPlane::refusals`]): `malformed`, `oversized`, `stalled` (request not
//! complete in time), `wrong_repo`, `not_allowed`, `too_many_connections` (per peer, in all, or handshakes),
//! `too_many_handshakes_from_source`, `unvalidated` (an Initial without an address-validation token, answered
//! with a Retry: every first dial counts one, a flood of Initials one each), `handshake_failed` (including bad
//! certificates), `slow_reader` (reset for not reading replies).
//!
//! # Failures as the dialer sees them
//! A fetch fails with a [`FetchFailed`] of a [`FetchFailure`] kind: `Unreachable` means nothing answered (no
//! handshake within the dial timeout) or the connection died (timed out, reset): the daemon drops such a peer.
//! `HandshakeFailed` means the peer answered but refused the connection (its limits were full) or the handshake
//! failed (TLS, identity): the peer is reachable, and its dials are backed off instead.
//!
//! [`ChunkRequest::encode`]: mirrormesh_proto::transfer::ChunkRequest::encode
//! [`ChunkReply`]: mirrormesh_proto::transfer::ChunkReply
//! [`CHUNKS_PER_REQUEST_MAX`]: mirrormesh_proto::transfer::CHUNKS_PER_REQUEST_MAX
//! [`DATA_ALPN`]: mirrormesh_proto::transfer::DATA_ALPN
//! [`FRAME_BYTES_MAX`]: mirrormesh_proto::transfer::FRAME_BYTES_MAX
//! [`REDIRECT_PEERS_MAX`]: mirrormesh_proto::transfer::REDIRECT_PEERS_MAX
//! [`CHUNK_SIZE`]: mirrormesh_proto::CHUNK_SIZE

mod client;
pub mod congestion;
#[cfg(feature = "faults")]
mod flood;
mod frame;
mod rate;
mod sending;

pub use client::{FetchFailed, FetchFailure};
mod server;
mod stall;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::future::BoxFuture;
use libp2p::PeerId;
use mirrormesh_proto::{ChunkId, RepoId};
use tokio::sync::Semaphore;

use crate::key::NodeKey;

/// Most concurrent requests (bidirectional streams) a peer may have open on one connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 64;
/// Most accepted connections from one peer id (further ones are closed once the handshake names the peer). A node
/// dials each peer once and reuses the connection; a peer that restarted or changed networks opens a new one while
/// the old one lingers here until [`IDLE_TIMEOUT`], so two are normal and four leave room for that twice in a row.
pub const CONNECTIONS_PER_PEER_MAX: usize = 4;
/// Most accepted connections in all.
pub const CONNECTIONS_MAX: usize = 256;
/// Most incoming handshakes in progress. Only dialers that proved their address (QUIC Retry) take one, so a flood
/// of spoofed Initial packets takes none.
pub const HANDSHAKES_MAX: usize = 64;
/// Most incoming handshakes in progress from one source address (an IPv4 address, or an IPv6 /64 prefix). A node
/// dials each peer once at a time, so one address needs one; eight leave room for a few nodes behind one address
/// (NAT, or the loopback tests' daemons), while a dialer that can receive at only one address fills an eighth of
/// [`HANDSHAKES_MAX`] at most.
pub const HANDSHAKES_PER_SOURCE_MAX: usize = 8;
/// Time an incoming handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a dial may take: each address, and all retries after refusals together.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before dialing a peer again after it refused a handshake (busy) or the handshake failed; doubled after each
/// further refusal up to [`DIAL_BACKOFF_MAX`], reset by a successful dial. Long enough that a busy peer is not asked
/// again before a handshake of its can finish (a few round trips), short enough that a peer refusing because a
/// burst of dialers arrived at once is redialed within a fraction of a second.
pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait before redialing a peer that keeps refusing handshakes.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection with no packet in either direction for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a request frame may take to arrive, from the stream's opening to its end.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A serving stream whose reader accepts no byte for this long (detected within twice this) is reset.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A fetch whose server sends no byte for this long (detected within twice this) fails.
pub const REPLY_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks held in memory for serving, across all connections (each at most 1 MiB).
pub const SERVE_CHUNKS_IN_MEMORY_MAX: usize = 128;
/// Chunks held in memory for serving one connection, so that one peer's stalled streams cannot take the whole
/// node's budget.
pub const SERVE_CHUNKS_PER_CONNECTION_MAX: usize = 16;
/// Chunks a serving stream reads from disk ahead of the one it is writing.
pub const READ_AHEAD_CHUNKS: usize = 2;
/// Receive window of a request stream (a request is one frame of at most 16 KiB).
pub const REQUEST_STREAM_WINDOW: u32 = 64 << 10;
/// Receive window of an accepted connection (requests only).
pub const REQUEST_CONNECTION_WINDOW: u32 = 1 << 20;
/// Bytes quinn may buffer unacknowledged per accepted connection.
pub const SEND_WINDOW: u64 = 16 << 20;
/// Receive window of a reply stream on a dialed connection.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Receive window of a dialed connection, all streams together.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 << 20;
/// Replies the origin sends chunk data in at once, across all connections. Each mirror asks the origin for its own
/// new chunk; sent side by side, eight such chunks share the origin's link and each reaches its first holder (and
/// can spread from there) only after eight chunks' time. Sent three at a time, each arrives in three chunks' time
/// and the mesh starts forwarding sooner, at the start of an update and at its end. (Two left the origin's link
/// idle while both replies waited for acknowledgements queued behind the mirrors' own uploads; on mirrors, whose
/// uploads are many copies of chunks already spread, a limit made the mesh slower: testbed sync, BENCHMARKS.md.)
pub const ORIGIN_SENDING_REPLIES_MAX: usize = 3;
/// Longest a reply keeps its sending slot (from taking it to its last byte leaving, or its peer's acknowledgement of
/// it, whichever is first).
pub const SENDING_SLOT_HOLD_MAX: Duration = Duration::from_millis(500);
/// How often a reply that holds a sending slot and has written everything checks whether its bytes have left (its
/// connection's UDP bytes sent): 2 ms is 25 KB at 100 Mbit/s, 2.4% of a 1 MiB chunk's time on the link.
pub const SENT_CHECK_INTERVAL: Duration = Duration::from_millis(2);
/// Chunk bytes are metered by the upload limit in pieces of this size.
pub const RATE_PIECE_BYTES: usize = 64 << 10;
/// The upload limit saves up at most this much idle time (and at least one piece).
pub const RATE_BURST: Duration = Duration::from_millis(50);
/// Peers whose traffic is counted individually; later peers are not recorded.
pub const TRAFFIC_PEERS_MAX: usize = 4096;

/// Application error codes on streams and connections.
mod code {
    use quinn::VarInt;
    /// Stream: the request was refused (malformed, oversized, wrong repository, stalled).
    pub const REFUSED: VarInt = VarInt::from_u32(1);
    /// Stream: the requester gave up.
    pub const CANCELLED: VarInt = VarInt::from_u32(2);
    /// Stream: the reader took no data for too long.
    pub const SLOW_READER: VarInt = VarInt::from_u32(3);
    /// Stream: the server failed internally.
    pub const INTERNAL: VarInt = VarInt::from_u32(4);
    /// Connection: the node is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// Connection: the peer is not in the allow list.
    pub const NOT_ALLOWED: VarInt = VarInt::from_u32(1);
    /// Connection: too many connections (from this peer or in all).
    pub const TOO_MANY_CONNECTIONS: VarInt = VarInt::from_u32(2);

    pub fn describe(code: VarInt) -> &'static str {
        match code.into_inner() {
            1 => "refused",
            2 => "cancelled",
            3 => "slow reader",
            4 => "server error",
            _ => "unknown",
        }
    }
}

#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    pub listen: SocketAddr,
    /// Upload limit for chunk bytes served, bytes per second (None = unlimited). Shared by all connections.
    pub upload_rate: Option<u64>,
    /// Peers allowed to connect or be connected to (None = any peer presenting a valid identity certificate).
    pub allow: Option<BTreeSet<PeerId>>,
    pub repo: RepoId,
    pub timeouts: StreamTimeouts,
    /// Replies that may send chunk data at once, across all connections (None = no limit; the origin sets
    /// [`ORIGIN_SENDING_REPLIES_MAX`]).
    pub sending_replies_max: Option<usize>,
}

/// How long a stream may stall, or a dial take, before it is given up (the defaults are the named constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamTimeouts {
    /// See [`REQUEST_READ_TIMEOUT`].
    pub request_read: Duration,
    /// See [`WRITE_STALL_TIMEOUT`].
    pub write_stall: Duration,
    /// See [`REPLY_STALL_TIMEOUT`].
    pub reply_stall: Duration,
    /// See [`DIAL_TIMEOUT`].
    pub dial: Duration,
}

impl Default for StreamTimeouts {
    fn default() -> Self {
        Self {
            request_read: REQUEST_READ_TIMEOUT,
            write_stall: WRITE_STALL_TIMEOUT,
            reply_stall: REPLY_STALL_TIMEOUT,
            dial: DIAL_TIMEOUT,
        }
    }
}

/// How a node answers a peer's request for one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Serve,
    Elsewhere(Vec<PeerId>),
    /// Answer "missing" whether or not the chunk is here.
    Missing,
}

/// Where the data plane gets the chunks it serves and how it decides whom to serve.
pub trait ChunkSource: Send + Sync + 'static {
    /// How to answer `peer` for each requested chunk, in order (the origin may point askers at other peers).
    fn decide(&self, peer: PeerId, chunks: Vec<ChunkId>) -> BoxFuture<'static, Vec<Decision>>;
    /// The chunk's bytes, read from disk (called on a blocking thread); None if not held. The source verifies them.
    fn read(&self, id: &ChunkId) -> std::io::Result<Option<Vec<u8>>>;
    /// A request of `peer`'s was answered (what it sent is in [`DataPlane::traffic`] now). Must not block.
    fn served(&self, _peer: PeerId) {}
}

/// The outcome of one requested chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The chunk's bytes, which hash to the requested id.
    Verified(bytes::Bytes),
    /// The peer sent bytes that do not hash to the requested id.
    Corrupt,
    /// The peer does not hold the chunk.
    Missing,
    /// The peer points at these peers instead.
    Elsewhere(Vec<PeerId>),
}

/// What one fetch received: bytes and number of [`Fetched::Verified`] chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchSummary {
    pub bytes: u64,
    pub chunks: usize,
}

/// The smallest round trip QUIC measured on `conn`; `None` before it measured one (no acknowledgement received yet:
/// quinn's figure is then its initial guess). A sample can read zero on loopback (quinn takes one instant per
/// round of its driver); then the smoothed estimate, and `None` if that is zero too.
fn measured_round_trip(conn: &quinn::Connection) -> Option<Duration> {
    let stats = conn.stats();
    if stats.frame_rx.acks == 0 {
        return None;
    }
    [stats.path.min_rtt, stats.path.rtt].into_iter().find(|rtt| !rtt.is_zero())
}

/// What connections sent on the wire (from quinn's connection statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireTotals {
    /// UDP payload bytes (QUIC packets: headers, frames, encryption tags; not the UDP, IP and link headers).
    pub udp_bytes: u64,
    pub datagrams: u64,
    /// QUIC packets sent, and those declared lost (their data is sent again).
    pub packets: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
}

impl WireTotals {
    fn of(stats: &quinn::ConnectionStats) -> Self {
        WireTotals {
            udp_bytes: stats.udp_tx.bytes,
            datagrams: stats.udp_tx.datagrams,
            packets: stats.path.sent_packets,
            lost_packets: stats.path.lost_packets,
            lost_bytes: stats.path.lost_bytes,
        }
    }

    fn add(&mut self, other: WireTotals) {
        self.udp_bytes += other.udp_bytes;
        self.datagrams += other.datagrams;
        self.packets += other.packets;
        self.lost_packets += other.lost_packets;
        self.lost_bytes += other.lost_bytes;
    }
}

/// Per-peer counters. Sent: chunk bytes and chunks served to the peer. Received: chunk bytes and chunks received
/// from it (verified or not). Failures: fetches from it that failed, plus chunks from it that failed verification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub chunks_sent: u64,
    pub chunks_received: u64,
    pub failures: u64,
    /// Requests from the peer refused (malformed, oversized, stalled, wrong repository, slow reader).
    pub refused: u64,
}

/// Kinds of refused input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Malformed,
    Oversized,
    Stalled,
    WrongRepo,
    NotAllowed,
    TooManyConnections,
    TooManyHandshakesFromSource,
    Unvalidated,
    HandshakeFailed,
    SlowReader,
}

impl Refusal {
    const ALL: [Refusal; 10] = [
        Refusal::Malformed,
        Refusal::Oversized,
        Refusal::Stalled,
        Refusal::WrongRepo,
        Refusal::NotAllowed,
        Refusal::TooManyConnections,
        Refusal::TooManyHandshakesFromSource,
        Refusal::Unvalidated,
        Refusal::HandshakeFailed,
        Refusal::SlowReader,
    ];

    fn name(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Oversized => "oversized",
            Refusal::Stalled => "stalled",
            Refusal::WrongRepo => "wrong_repo",
            Refusal::NotAllowed => "not_allowed",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyHandshakesFromSource => "too_many_handshakes_from_source",
            Refusal::Unvalidated => "unvalidated",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::SlowReader => "slow_reader",
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    refusals: [AtomicU64; Refusal::ALL.len()],
    traffic: Mutex<HashMap<PeerId, Traffic>>,
    /// What the connections this node served sent on the wire.
    sent: Mutex<server::SentOnWire>,
}

impl Stats {
    fn refuse(&self, refusal: Refusal) {
        self.refusals[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn record(&self, peer: PeerId, update: impl FnOnce(&mut Traffic)) {
        let mut traffic = self.traffic.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = traffic.get_mut(&peer) {
            update(entry);
        } else if traffic.len() < TRAFFIC_PEERS_MAX {
            update(traffic.entry(peer).or_default());
        }
    }
}

/// State shared by the accept loop, the serving tasks and the handle.
struct Shared {
    repo: RepoId,
    timeouts: StreamTimeouts,
    /// Changed when the node's configuration is reloaded.
    allow: std::sync::RwLock<Option<BTreeSet<PeerId>>>,
    source: Arc<dyn ChunkSource>,
    stats: Stats,
    /// Replaced when the node's configuration is reloaded (`network.upload_bytes_per_sec`).
    upload: std::sync::RwLock<Option<Arc<rate::TokenBucket>>>,
    /// Sending slots (see [`DataPlaneConfig::sending_replies_max`]).
    sending: Option<Arc<sending::SendingSlots>>,
    serve_memory: Arc<Semaphore>,
    incoming: Mutex<server::IncomingCounts>,
    /// Peers banned by the node: neither served nor asked.
    denied: Mutex<HashSet<PeerId>>,
}

impl Shared {
    fn allowed(&self, peer: &PeerId) -> bool {
        self.allow.read().unwrap_or_else(PoisonError::into_inner).as_ref().is_none_or(|allow| allow.contains(peer))
            && !self.denied.lock().unwrap_or_else(PoisonError::into_inner).contains(peer)
    }
}

struct Inner {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    identity: tls::Identity,
    peers: Mutex<HashMap<PeerId, Arc<client::PeerSlot>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.close(code::SHUTDOWN, b"shutting down");
    }
}

/// A node's data plane: serves chunks to peers and fetches chunks from them. Cheap to clone.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataPlane({} at {})", self.inner.identity.peer_id(), self.inner.local_addr)
    }
}

impl DataPlane {
    /// Binds the UDP socket, starts accepting (spawned tokio task). Must be called inside a tokio runtime.
    pub fn bind(key: &NodeKey, cfg: DataPlaneConfig, source: Arc<dyn ChunkSource>) -> Result<Self> {
        if cfg.upload_rate == Some(0) {
            bail!("data plane upload rate must be positive (leave it unset for unlimited)");
        }
        if cfg.sending_replies_max == Some(0) {
            bail!("data plane sending replies must be at least 1 (leave it unset for no limit)");
        }
        let identity = tls::Identity::new(key)?;
        let server_config = tls::server_config(&identity)?;
        let endpoint = quinn::Endpoint::server(server_config, cfg.listen)
            .with_context(|| format!("binding the data plane to {}", cfg.listen))?;
        let local_addr = endpoint.local_addr().context("reading the data plane's bound address")?;
        let shared = Arc::new(Shared {
            repo: cfg.repo,
            timeouts: cfg.timeouts,
            allow: std::sync::RwLock::new(cfg.allow),
            source,
            stats: Stats::default(),
            upload: std::sync::RwLock::new(cfg.upload_rate.map(|r| Arc::new(rate::TokenBucket::new(r)))),
            sending: cfg.sending_replies_max.map(sending::SendingSlots::new),
            serve_memory: Arc::new(Semaphore::new(SERVE_CHUNKS_IN_MEMORY_MAX)),
            incoming: Mutex::new(server::IncomingCounts::default()),
            denied: Mutex::default(),
        });
        tokio::spawn(server::accept_loop(endpoint.clone(), shared.clone()));
        tracing::info!(peer = %identity.peer_id(), addr = %local_addr, "data plane listening");
        Ok(Self { inner: Arc::new(Inner { shared, endpoint, local_addr, identity, peers: Mutex::default() }) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Fetches `chunks` (1..=CHUNKS_PER_REQUEST_MAX) from `peer`, reachable at one of `addrs`: reuses or opens a
    /// connection (the server's certificate must prove it is `peer`), opens one stream, and calls `on_chunk` for each
    /// chunk in order as it arrives; Data is hashed and reported Verified only if it matches the id asked for.
    /// Dropping the future cancels the request (the stream is reset).
    pub async fn fetch(
        &self,
        peer: PeerId,
        addrs: &[SocketAddr],
        chunks: Vec<ChunkId>,
        on_chunk: impl FnMut(ChunkId, Fetched) + Send,
    ) -> Result<FetchSummary, FetchFailed> {
        client::fetch(&self.inner, peer, addrs, chunks, on_chunk).await
    }

    /// Per-peer counters since start.
    pub fn traffic(&self) -> BTreeMap<PeerId, Traffic> {
        let traffic = self.inner.shared.stats.traffic.lock().unwrap_or_else(PoisonError::into_inner);
        traffic.iter().map(|(peer, t)| (*peer, *t)).collect()
    }

    /// What the connections peers opened to this node (the ones it serves chunks on) sent on the wire, ended and
    /// open ones together: UDP payload bytes and datagrams, and packets and bytes QUIC declared lost (sent again).
    pub fn sent_on_wire(&self) -> WireTotals {
        self.inner.shared.stats.sent.lock().unwrap_or_else(PoisonError::into_inner).totals()
    }

    /// The round trip toward each peer this node has a data-plane connection with, in either direction (the one it
    /// dialed preferred): the smallest QUIC measured on that connection, so the path's own, not the queues' of a
    /// busy transfer (whose smoothed estimate grows by the queueing delay). No probe is sent for it.
    pub fn round_trips(&self) -> BTreeMap<PeerId, Duration> {
        let mut rtts: BTreeMap<PeerId, Duration> =
            self.inner.shared.stats.sent.lock().unwrap_or_else(PoisonError::into_inner).round_trips().collect();
        let slots = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner);
        for (peer, slot) in slots.iter() {
            if let Some(rtt) = slot.live().as_ref().and_then(measured_round_trip) {
                rtts.insert(*peer, rtt);
            }
        }
        rtts
    }

    /// Counters of refused input: requests that were malformed, over a limit, from peers not allowed, stalled.
    /// Every kind is present, zero or not.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        let stats = &self.inner.shared.stats;
        Refusal::ALL.iter().map(|r| (r.name(), stats.refusals[*r as usize].load(Ordering::Relaxed))).collect()
    }

    /// Stops serving `peer` and fetching from it: its connections are refused, and closed at their next request.
    pub fn deny(&self, peer: PeerId) {
        self.inner.shared.denied.lock().unwrap_or_else(PoisonError::into_inner).insert(peer);
        if let Some(slot) = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).remove(&peer)
            && let Some(conn) = slot.live()
        {
            conn.close(code::NOT_ALLOWED, b"banned");
        }
    }

    /// Serves and asks `peer` again (its ban ended).
    pub fn undeny(&self, peer: &PeerId) {
        self.inner.shared.denied.lock().unwrap_or_else(PoisonError::into_inner).remove(peer);
    }

    /// Replaces the allow list (a reloaded configuration): peers no longer allowed are refused from now on, and
    /// their connections closed at their next request.
    pub fn set_allow(&self, allow: Option<BTreeSet<PeerId>>) {
        *self.inner.shared.allow.write().unwrap_or_else(PoisonError::into_inner) = allow;
        let shared = &self.inner.shared;
        self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).retain(|peer, slot| {
            let keep = shared.allowed(peer);
            if !keep && let Some(conn) = slot.live() {
                conn.close(code::NOT_ALLOWED, b"peer not allowed");
            }
            keep
        });
    }

    /// Replaces the upload limit (a reloaded configuration; `None`: unlimited). Chunks being sent finish their
    /// current piece under the old limit; the next piece is metered by the new one.
    pub fn set_upload_rate(&self, rate: Option<u64>) {
        let bucket = rate.filter(|r| *r > 0).map(|r| Arc::new(rate::TokenBucket::new(r)));
        *self.inner.shared.upload.write().unwrap_or_else(PoisonError::into_inner) = bucket;
    }

    /// Fault injection (`faults.flood_data_plane`), for testing peers' defences: until the returned future is
    /// dropped, keeps `peer`'s data plane busy with requests that stall, announce oversized frames or are garbage.
    #[cfg(feature = "faults")]
    pub async fn flood(&self, peer: PeerId, addrs: Vec<SocketAddr>) {
        flood::flood(&self.inner, peer, &addrs).await
    }

    /// Closes every connection and stops accepting. Fetches in progress fail.
    pub fn close(&self) {
        self.inner.endpoint.close(code::SHUTDOWN, b"shutting down");
        self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// [`DataPlane::close`], then waits (at most `wait`) until the peers were told: a restarted node's new process
    /// cannot answer for the old one's connections, so a peer that missed the close would send requests into a
    /// dead connection until its idle timeout.
    pub async fn shut_down(&self, wait: std::time::Duration) {
        self.close();
        let _ = tokio::time::timeout(wait, self.inner.endpoint.wait_idle()).await;
    }

    /// Forgets the connection to `peer` (closing it): the peer reconnected on the control plane, so it may be a new
    /// process whose data plane knows nothing of the old connection. The next fetch dials afresh.
    pub fn forget(&self, peer: &PeerId) {
        if let Some(slot) = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).remove(peer)
            && let Some(conn) = slot.live()
        {
            conn.close(code::SHUTDOWN, b"reconnected");
        }
    }
}
