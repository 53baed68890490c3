//! The fetching side: one cached connection per peer, one stream per request, every chunk hashed on arrival.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::BytesMut;
use libp2p::PeerId;
use mirrormesh_proto::ChunkId;
use mirrormesh_proto::transfer::{CHUNKS_PER_REQUEST_MAX, ChunkReply, ChunkRequest};
use tokio::time::timeout;
use tracing::Instrument;

use super::frame::{self, ReadError};
use super::stall::Watchdog;
use super::{DIAL_BACKOFF_MAX, DIAL_BACKOFF_MIN, FetchSummary, Fetched, Inner, code, tls};

/// The connection to one peer, a lock that makes concurrent fetches share one dial, and what the last dial left.
#[derive(Default)]
pub(super) struct PeerSlot {
    dialing: tokio::sync::Mutex<()>,
    conn: Mutex<Option<quinn::Connection>>,
    dial: Mutex<DialState>,
}

/// The back-off after refused or failed handshakes, and the last failure for fetches that waited on that dial.
#[derive(Default)]
struct DialState {
    /// No dial before this.
    not_before: Option<Instant>,
    /// The wait after the next refusal (zero: [`DIAL_BACKOFF_MIN`]).
    backoff: Duration,
    /// When the last dial failed, and how.
    failed: Option<(Instant, DialError)>,
}

impl PeerSlot {
    pub(super) fn live(&self) -> Option<quinn::Connection> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }

    fn set(&self, conn: quinn::Connection) {
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
        let mut dial = self.dial.lock().unwrap_or_else(PoisonError::into_inner);
        *dial = DialState::default();
    }

    /// Forgets `conn` if it is still the cached one.
    fn evict(&self, conn: &quinn::Connection) {
        let mut cached = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
            *cached = None;
        }
    }

    fn dial_state(&self) -> std::sync::MutexGuard<'_, DialState> {
        self.dial.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a failed dial; a refused or failed handshake also backs the next dial off.
    fn failed(&self, error: &DialError) {
        let now = Instant::now();
        let mut dial = self.dial_state();
        if matches!(error, DialError::Busy(_) | DialError::Failed(_)) {
            let wait = dial.backoff.max(DIAL_BACKOFF_MIN);
            dial.not_before = Some(now + wait);
            dial.backoff = (wait * 2).min(DIAL_BACKOFF_MAX);
        }
        dial.failed = Some((now, error.clone()));
    }
}

fn slot(inner: &Inner, peer: PeerId) -> Arc<PeerSlot> {
    inner.peers.lock().unwrap_or_else(PoisonError::into_inner).entry(peer).or_default().clone()
}

/// Why a request on an established connection failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{}", describe_connection_error(.0))]
    Connection(quinn::ConnectionError),
    #[error("the peer reset the stream ({})", code::describe(*.0))]
    Reset(quinn::VarInt),
    #[error("the peer stopped reading the request ({})", code::describe(*.0))]
    Stopped(quinn::VarInt),
    #[error("no data from the peer for {0:?}")]
    Stalled(Duration),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    Other(String),
}

fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == code::NOT_ALLOWED => {
            "the peer refused the connection (we are not in its allow list)".into()
        }
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == code::TOO_MANY_CONNECTIONS => {
            "the peer refused the connection (too many connections)".into()
        }
        e => format!("connection lost: {e}"),
    }
}

impl From<ReadError> for FetchError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::FinishedEarly => FetchError::Protocol("the stream ended before all replies".into()),
            ReadError::Stalled(stall) => FetchError::Stalled(stall.0),
            ReadError::Read(quinn::ReadError::Reset(code)) => FetchError::Reset(code),
            ReadError::Read(quinn::ReadError::ConnectionLost(e)) => FetchError::Connection(e),
            ReadError::Read(e) => FetchError::Other(e.to_string()),
            ReadError::Io(e) => FetchError::Other(e.to_string()),
        }
    }
}

impl From<quinn::WriteError> for FetchError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(e) => FetchError::Connection(e),
            quinn::WriteError::Stopped(code) => FetchError::Stopped(code),
            e => FetchError::Other(e.to_string()),
        }
    }
}

/// A request stream that is reset (both ways) unless it completed: dropping a fetch cancels it at the server.
struct RequestStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    complete: bool,
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.complete {
            let _ = self.send.reset(code::CANCELLED);
            let _ = self.recv.stop(code::CANCELLED);
        }
    }
}

/// What kind of failure ended a fetch: what the caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchFailure {
    /// Not sent: no chunks or too many in one request, or the peer is outside the allow list.
    Invalid,
    /// Nothing answered a dial in time, or the connection died (timed out or reset): the daemon drops such a peer.
    Unreachable,
    /// The peer answered but refused the connection (its handshake or connection limits were full) or the
    /// handshake failed (TLS, or another identity than the one dialed). The peer is reachable, so this is never
    /// [`FetchFailure::Unreachable`]; its dials are backed off ([`DIAL_BACKOFF_MIN`] to [`DIAL_BACKOFF_MAX`]).
    HandshakeFailed,
    /// Anything else: the peer reset or stopped the request, stalled, or broke the protocol; or this node could not
    /// dial (no usable address, its endpoint closed).
    Failed,
}

/// A failed fetch: its kind, and what happened (with the peer, the chunk count and the address).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FetchFailed {
    pub kind: FetchFailure,
    message: String,
}

impl FetchFailed {
    /// A fetch from a peer whose data-plane address is not known yet (the caller did not try).
    pub fn no_address(peer: PeerId) -> Self {
        FetchFailed::new(FetchFailure::Failed, format!("no data-plane address known for {peer}"))
    }

    fn new(kind: FetchFailure, message: impl std::fmt::Display) -> Self {
        FetchFailed { kind, message: message.to_string() }
    }
}

/// Why a dial failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum DialError {
    /// Nothing answered in time, or the path failed.
    #[error("{0}")]
    Unreachable(String),
    /// The peer refused the connection for now: its handshake or connection limits are full.
    #[error("{0}")]
    Busy(String),
    /// The handshake failed: TLS, identity, protocol.
    #[error("{0}")]
    Failed(String),
    /// This node could not dial: no address, an unusable one, or its endpoint is closed.
    #[error("{0}")]
    Local(String),
}

impl DialError {
    /// The same kind of failure, with `what` in front of the message.
    fn context(&self, what: impl std::fmt::Display) -> Self {
        match self {
            DialError::Unreachable(m) => DialError::Unreachable(format!("{what}: {m}")),
            DialError::Busy(m) => DialError::Busy(format!("{what}: {m}")),
            DialError::Failed(m) => DialError::Failed(format!("{what}: {m}")),
            DialError::Local(m) => DialError::Local(format!("{what}: {m}")),
        }
    }

    /// As the error of the fetch it ended (`what`: the fetch, and where).
    fn into_fetch_failed(self, what: impl std::fmt::Display) -> FetchFailed {
        let kind = match self {
            DialError::Unreachable(_) => FetchFailure::Unreachable,
            DialError::Busy(_) | DialError::Failed(_) => FetchFailure::HandshakeFailed,
            DialError::Local(_) => FetchFailure::Failed,
        };
        FetchFailed::new(kind, format!("{what}: {self}"))
    }
}

/// How a handshake that ended in `e` failed.
fn classify(e: &quinn::ConnectionError) -> DialError {
    use quinn::ConnectionError as E;
    let message = format!("handshake failed: {}", describe_connection_error(e));
    match e {
        E::ConnectionClosed(close) if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
            DialError::Busy(message)
        }
        E::ApplicationClosed(close) if close.error_code == code::TOO_MANY_CONNECTIONS => DialError::Busy(message),
        E::TimedOut | E::Reset => DialError::Unreachable(message),
        E::LocallyClosed | E::CidsExhausted => DialError::Local(message),
        E::VersionMismatch | E::TransportError(_) | E::ConnectionClosed(_) | E::ApplicationClosed(_) => {
            DialError::Failed(message)
        }
    }
}

pub(super) async fn fetch(
    inner: &Inner,
    peer: PeerId,
    addrs: &[SocketAddr],
    chunks: Vec<ChunkId>,
    mut on_chunk: impl FnMut(ChunkId, Fetched) + Send,
) -> Result<FetchSummary, FetchFailed> {
    let what = format!("fetching {} chunks from {peer}", chunks.len());
    if chunks.is_empty() || chunks.len() > CHUNKS_PER_REQUEST_MAX {
        let why = format!("{what}: a request names 1 to {CHUNKS_PER_REQUEST_MAX} chunks");
        return Err(FetchFailed::new(FetchFailure::Invalid, why));
    }
    if !inner.shared.allowed(&peer) {
        return Err(FetchFailed::new(FetchFailure::Invalid, format!("{what}: the peer is not in the allow list")));
    }
    let span = tracing::debug_span!("fetch", %peer, chunks = chunks.len());
    let result = async {
        let slot = slot(inner, peer);
        let (conn, fresh) = connect(inner, &slot, peer, addrs)
            .await
            .map_err(|e| e.into_fetch_failed(format_args!("{what} at {}", list_addrs(addrs))))?;
        let mut delivered = 0;
        let outcome = request(inner, peer, &conn, &chunks, &mut on_chunk, &mut delivered).await;
        let (conn, outcome) = match outcome {
            Err(FetchError::Connection(e)) if !fresh && delivered == 0 => {
                // A cached connection can die unnoticed (the peer restarted); nothing was delivered, so redial once.
                tracing::debug!(error = %e, "cached connection failed; redialing");
                slot.evict(&conn);
                let (conn, _) = connect(inner, &slot, peer, addrs)
                    .await
                    .map_err(|e| e.into_fetch_failed(format_args!("{what} at {}", list_addrs(addrs))))?;
                let outcome = request(inner, peer, &conn, &chunks, &mut on_chunk, &mut delivered).await;
                (conn, outcome)
            }
            outcome => (conn, outcome),
        };
        let lost = matches!(
            &outcome,
            Err(FetchError::Connection(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset))
        );
        if let Err(FetchError::Connection(_)) = &outcome {
            slot.evict(&conn);
        }
        outcome.map_err(|e| {
            let kind = if lost { FetchFailure::Unreachable } else { FetchFailure::Failed };
            FetchFailed::new(kind, format!("{what} at {}: {e}", conn.remote_address()))
        })
    }
    .instrument(span.clone())
    .await;
    if let Err(e) = &result {
        inner.shared.stats.record(peer, |t| t.failures += 1);
        // The caller gets the error with its context and decides; logged here for tracing only.
        span.in_scope(|| tracing::debug!(error = %e, kind = ?e.kind, "fetch failed"));
    }
    result
}

fn list_addrs(addrs: &[SocketAddr]) -> String {
    match addrs {
        [] => "no known address".into(),
        [one] => one.to_string(),
        many => format!("[{}]", many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// The cached connection to `peer`, or a new one; `true` if it was dialed now.
///
/// Concurrent fetches share one dial: the others wait for it, then take its connection or its failure. A dial tries
/// each address in turn; while the peer refuses for load (busy), it is retried after a back-off until the dial
/// timeout has passed. After a refused or failed handshake the next dial waits for the back-off as well, so a peer
/// whose handshakes keep failing is dialed at most once per back-off, however often it is asked.
async fn connect(
    inner: &Inner,
    slot: &PeerSlot,
    peer: PeerId,
    addrs: &[SocketAddr],
) -> Result<(quinn::Connection, bool), DialError> {
    if let Some(conn) = slot.live() {
        return Ok((conn, false));
    }
    let asked = Instant::now();
    let _dialing = slot.dialing.lock().await;
    if let Some(conn) = slot.live() {
        return Ok((conn, true));
    }
    // A dial that ended while this fetch waited for it answers this fetch too.
    if let Some((at, error)) = &slot.dial_state().failed
        && *at >= asked
    {
        return Err(error.clone());
    }
    if addrs.is_empty() {
        return Err(DialError::Local("cannot connect without an address".into()));
    }
    let deadline = Instant::now() + inner.shared.timeouts.dial;
    let mut first = true;
    loop {
        let not_before = slot.dial_state().not_before;
        if let Some(at) = not_before.filter(|at| *at > Instant::now()) {
            if at >= deadline {
                tokio::time::sleep_until(deadline.into()).await;
                let error = DialError::Busy(format!(
                    "backing off after refused handshakes; no dial within {:?}",
                    inner.shared.timeouts.dial
                ));
                slot.failed(&error);
                return Err(error);
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let mut failures = Vec::new();
        for &addr in addrs {
            // The first round gives each address the whole dial timeout; retries fit in what is left of it.
            let within =
                if first { inner.shared.timeouts.dial } else { deadline.saturating_duration_since(Instant::now()) };
            match dial(inner, peer, addr, within).await {
                Ok(conn) => {
                    slot.set(conn.clone());
                    return Ok((conn, true));
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "dial failed");
                    failures.push(if addrs.len() == 1 { e } else { e.context(addr) });
                }
            }
        }
        first = false;
        let error = combine(failures);
        slot.failed(&error);
        let retry = matches!(error, DialError::Busy(_)) && slot.dial_state().not_before.is_some_and(|at| at < deadline);
        if !retry {
            return Err(error);
        }
        tracing::debug!(error = %error, "the peer refused the connection; retrying after a back-off");
    }
}

/// One failure for a dial that failed at every address: the peer answered somewhere (busy before failed) if any
/// address answered, unreachable if none did.
fn combine(failures: Vec<DialError>) -> DialError {
    let kind = |e: &DialError| match e {
        DialError::Busy(_) => 0,
        DialError::Failed(_) => 1,
        DialError::Unreachable(_) => 2,
        DialError::Local(_) => 3,
    };
    let message =
        format!("could not connect: {}", failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
    match failures.iter().map(kind).min() {
        Some(0) => DialError::Busy(message),
        Some(1) => DialError::Failed(message),
        Some(2) => DialError::Unreachable(message),
        _ => DialError::Local(message),
    }
}

/// One handshake with `peer` at `addr`, taking at most `within`.
pub(super) async fn dial(
    inner: &Inner,
    peer: PeerId,
    addr: SocketAddr,
    within: Duration,
) -> Result<quinn::Connection, DialError> {
    let (config, presented) =
        tls::client_config(&inner.identity, peer).map_err(|e| DialError::Local(format!("{e:#}")))?;
    let connecting = inner
        .endpoint
        .connect_with(config, addr, tls::SERVER_NAME)
        .map_err(|e| DialError::Local(format!("starting the handshake: {e}")))?;
    let conn = match timeout(within, connecting).await {
        Err(_) => return Err(DialError::Unreachable(format!("no handshake within {within:?}"))),
        Ok(Err(e)) => {
            if let Some(actual) = presented.get()
                && actual != peer
            {
                return Err(DialError::Failed(format!("the node at {addr} presented identity {actual}, not {peer}")));
            }
            return Err(classify(&e));
        }
        Ok(Ok(conn)) => conn,
    };
    let actual = tls::remote_peer(&conn).map_err(|e| DialError::Failed(format!("{e:#}")))?;
    if actual != peer {
        conn.close(code::NOT_ALLOWED, b"unexpected identity");
        return Err(DialError::Failed(format!("the node at {addr} presented identity {actual}, not {peer}")));
    }
    Ok(conn)
}

/// One request on `conn`; `delivered` counts the replies handed to `on_chunk`.
async fn request(
    inner: &Inner,
    peer: PeerId,
    conn: &quinn::Connection,
    chunks: &[ChunkId],
    on_chunk: &mut (impl FnMut(ChunkId, Fetched) + Send),
    delivered: &mut usize,
) -> Result<FetchSummary, FetchError> {
    // Waits for stream credit if the peer is serving us STREAMS_PER_CONNECTION_MAX requests already.
    let stall = inner.shared.timeouts.reply_stall;
    let (send, recv) = match timeout(stall, conn.open_bi()).await {
        Err(_) => return Err(FetchError::Other(format!("the peer granted no stream for {stall:?}"))),
        Ok(opened) => opened.map_err(FetchError::Connection)?,
    };
    let mut stream = RequestStream { send, recv, complete: false };
    let request = ChunkRequest { repo: inner.shared.repo.clone(), chunks: chunks.to_vec() };
    match timeout(stall, stream.send.write_chunk(frame::encode(&request.encode()))).await {
        Err(_) => return Err(FetchError::Stalled(stall)),
        Ok(result) => result?,
    }
    // Finishing fails only if the stream was already reset, which the reads below will report.
    let _ = stream.send.finish();

    let mut watchdog = Watchdog::new(stall);
    let mut summary = FetchSummary::default();
    let mut header = BytesMut::with_capacity(256);
    for &id in chunks {
        header.clear();
        frame::read_exact_into(&mut stream.recv, &mut header, frame::PREFIX_BYTES, &mut watchdog).await?;
        let prefix = [header[0], header[1], header[2], header[3]];
        let len = frame::check_len(prefix).map_err(|e| FetchError::Protocol(format!("reply frame: {e}")))?;
        header.clear();
        frame::read_exact_into(&mut stream.recv, &mut header, len, &mut watchdog).await?;
        let reply = ChunkReply::decode(&header).map_err(|e| FetchError::Protocol(format!("reply: {e}")))?;
        let fetched = match reply {
            ChunkReply::Data { len } => {
                let len = len as usize;
                let mut data = BytesMut::with_capacity(len);
                frame::read_exact_into(&mut stream.recv, &mut data, len, &mut watchdog).await?;
                let data = data.freeze();
                let verified = ChunkId::of(&data) == id;
                inner.shared.stats.record(peer, |t| {
                    t.bytes_received += len as u64;
                    t.chunks_received += 1;
                    t.failures += u64::from(!verified);
                });
                if verified {
                    summary.bytes += len as u64;
                    summary.chunks += 1;
                    Fetched::Verified(data)
                } else {
                    tracing::warn!(chunk = %id, "received bytes that do not match the chunk id");
                    Fetched::Corrupt
                }
            }
            ChunkReply::Missing => Fetched::Missing,
            ChunkReply::Elsewhere { peers } => {
                let peers = peers
                    .iter()
                    .map(|bytes| PeerId::from_bytes(bytes))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| FetchError::Protocol(format!("redirect names an invalid peer id: {e}")))?;
                Fetched::Elsewhere(peers)
            }
        };
        *delivered += 1;
        on_chunk(id, fetched);
    }
    if !frame::read_end(&mut stream.recv, &mut watchdog).await? {
        return Err(FetchError::Protocol(format!("bytes after the last of {} replies", chunks.len())));
    }
    stream.complete = true;
    Ok(summary)
}
