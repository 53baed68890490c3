//! The fetching side: one cached connection per peer, one stream per request, every chunk hashed on arrival.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use libp2p::PeerId;
use mirrormesh_proto::ChunkId;
use mirrormesh_proto::transfer::{CHUNKS_PER_REQUEST_MAX, ChunkReply, ChunkRequest};
use tokio::time::timeout;
use tracing::Instrument;

use super::frame::{self, ReadError};
use super::stall::Watchdog;
use super::{DIAL_TIMEOUT, FetchSummary, Fetched, Inner, code, tls};

/// The connection to one peer, and a lock that makes concurrent fetches share one dial.
#[derive(Default)]
pub(super) struct PeerSlot {
    dialing: tokio::sync::Mutex<()>,
    conn: Mutex<Option<quinn::Connection>>,
}

impl PeerSlot {
    pub(super) fn live(&self) -> Option<quinn::Connection> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }

    fn set(&self, conn: quinn::Connection) {
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
    }

    /// Forgets `conn` if it is still the cached one.
    fn evict(&self, conn: &quinn::Connection) {
        let mut cached = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
            *cached = None;
        }
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

/// Marks a fetch error meaning the peer could not be reached: no connection could be made, or the connection died
/// (timed out or reset). Find it with `error.downcast_ref::<Unreachable>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer unreachable")]
pub struct Unreachable;

pub(super) async fn fetch(
    inner: &Inner,
    peer: PeerId,
    addrs: &[SocketAddr],
    chunks: Vec<ChunkId>,
    mut on_chunk: impl FnMut(ChunkId, Fetched) + Send,
) -> Result<FetchSummary> {
    let what = format!("fetching {} chunks from {peer}", chunks.len());
    if chunks.is_empty() || chunks.len() > CHUNKS_PER_REQUEST_MAX {
        bail!("{what}: a request names 1 to {CHUNKS_PER_REQUEST_MAX} chunks");
    }
    if !inner.shared.allowed(&peer) {
        bail!("{what}: the peer is not in the allow list");
    }
    let span = tracing::debug_span!("fetch", %peer, chunks = chunks.len());
    let result = async {
        let slot = slot(inner, peer);
        let (conn, fresh) = connect(inner, &slot, peer, addrs)
            .await
            .with_context(|| format!("{what} at {}", list_addrs(addrs)))
            .context(Unreachable)?;
        let mut delivered = 0;
        let outcome = request(inner, peer, &conn, &chunks, &mut on_chunk, &mut delivered).await;
        let (conn, outcome) = match outcome {
            Err(FetchError::Connection(e)) if !fresh && delivered == 0 => {
                // A cached connection can die unnoticed (the peer restarted); nothing was delivered, so redial once.
                tracing::debug!(error = %e, "cached connection failed; redialing");
                slot.evict(&conn);
                let (conn, _) = connect(inner, &slot, peer, addrs)
                    .await
                    .with_context(|| format!("{what} at {}", list_addrs(addrs)))
                    .context(Unreachable)?;
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
            let e = anyhow!(e).context(format!("{what} at {}", conn.remote_address()));
            if lost { e.context(Unreachable) } else { e }
        })
    }
    .instrument(span.clone())
    .await;
    if let Err(e) = &result {
        inner.shared.stats.record(peer, |t| t.failures += 1);
        // The caller gets the error with its context and decides; logged here for tracing only.
        span.in_scope(|| tracing::debug!(error = format!("{e:#}"), "fetch failed"));
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
async fn connect(
    inner: &Inner,
    slot: &PeerSlot,
    peer: PeerId,
    addrs: &[SocketAddr],
) -> Result<(quinn::Connection, bool)> {
    if let Some(conn) = slot.live() {
        return Ok((conn, false));
    }
    let _dialing = slot.dialing.lock().await;
    if let Some(conn) = slot.live() {
        return Ok((conn, true));
    }
    if addrs.is_empty() {
        bail!("cannot connect without an address");
    }
    let mut failures = Vec::new();
    for &addr in addrs {
        match dial(inner, peer, addr).await {
            Ok(conn) => {
                slot.set(conn.clone());
                return Ok((conn, true));
            }
            Err(e) => {
                tracing::debug!(%addr, error = format!("{e:#}"), "dial failed");
                failures.push(if addrs.len() == 1 { format!("{e:#}") } else { format!("{addr}: {e:#}") });
            }
        }
    }
    bail!("could not connect: {}", failures.join("; "))
}

pub(super) async fn dial(inner: &Inner, peer: PeerId, addr: SocketAddr) -> Result<quinn::Connection> {
    let (config, presented) = tls::client_config(&inner.identity, peer)?;
    let connecting = inner.endpoint.connect_with(config, addr, tls::SERVER_NAME).context("starting the handshake")?;
    let conn = match timeout(DIAL_TIMEOUT, connecting).await {
        Err(_) => bail!("no handshake within {DIAL_TIMEOUT:?}"),
        Ok(Err(e)) => {
            if let Some(actual) = presented.get()
                && actual != peer
            {
                bail!("the node at {addr} presented identity {actual}, not {peer}");
            }
            bail!("handshake failed: {}", describe_connection_error(&e));
        }
        Ok(Ok(conn)) => conn,
    };
    let actual = tls::remote_peer(&conn)?;
    if actual != peer {
        conn.close(code::NOT_ALLOWED, b"unexpected identity");
        bail!("the node at {addr} presented identity {actual}, not {peer}");
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
