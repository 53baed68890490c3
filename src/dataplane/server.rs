//! The serving side: accepts connections, checks the peer, and answers chunk requests.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::PeerId;
use mirrormesh_proto::transfer::{ChunkReply, ChunkRequest, PEER_ID_BYTES_MAX, REDIRECT_PEERS_MAX};
use mirrormesh_proto::{CHUNK_SIZE, ChunkId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::Instrument;

use super::frame::{self, LenError};
use super::sending::SendingSlots;
use super::stall::Watchdog;
use super::{
    CONNECTIONS_MAX, CONNECTIONS_PER_PEER_MAX, Decision, HANDSHAKE_TIMEOUT, HANDSHAKES_MAX, HANDSHAKES_PER_SOURCE_MAX,
    RATE_PIECE_BYTES, READ_AHEAD_CHUNKS, Refusal, SENDING_SLOT_HOLD_MAX, SENT_CHECK_INTERVAL,
    SERVE_CHUNKS_PER_CONNECTION_MAX, Shared, WireTotals, code, tls,
};

/// Where a handshake comes from, for [`HANDSHAKES_PER_SOURCE_MAX`]: an IPv4 address, or the /64 prefix of an IPv6
/// address (a host commonly holds a whole /64). An IPv4-mapped IPv6 address counts as its IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4(Ipv4Addr),
    V6Prefix([u8; 8]),
}

impl Source {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => {
                    let [a, b, c, d, e, f, g, h, ..] = v6.octets();
                    Source::V6Prefix([a, b, c, d, e, f, g, h])
                }
            },
        }
    }
}

/// Accepted connections and handshakes in progress, for the connection limits.
#[derive(Debug, Default)]
pub(super) struct IncomingCounts {
    handshaking: usize,
    /// Handshakes in progress per source, for sources with at least one (so at most [`HANDSHAKES_MAX`] entries).
    handshaking_from: HashMap<Source, usize>,
    connections: usize,
    /// Accepted connections per peer, for peers with at least one (so at most [`CONNECTIONS_MAX`] entries).
    per_peer: HashMap<PeerId, usize>,
}

impl IncomingCounts {
    /// Takes a handshake slot for a dialer at `from`, or says which limit refuses it.
    fn admit(&mut self, from: Source) -> Result<(), Refusal> {
        if self.handshaking >= HANDSHAKES_MAX || self.connections + self.handshaking >= CONNECTIONS_MAX {
            return Err(Refusal::TooManyConnections);
        }
        let of_source = self.handshaking_from.entry(from).or_default();
        if *of_source >= HANDSHAKES_PER_SOURCE_MAX {
            return Err(Refusal::TooManyHandshakesFromSource);
        }
        *of_source += 1;
        self.handshaking += 1;
        Ok(())
    }
}

/// Releases a handshake slot (overall and of its source) when dropped.
struct HandshakeSlot {
    shared: Arc<Shared>,
    from: Source,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.shared.incoming.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(counts.handshaking > 0, "a handshake slot released twice");
        counts.handshaking -= 1;
        match counts.handshaking_from.get_mut(&self.from) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                counts.handshaking_from.remove(&self.from);
            }
            None => unreachable!("a handshake slot of a source with none"),
        }
    }
}

/// Releases a connection slot (overall and of its peer) when dropped.
struct ConnectionSlot {
    shared: Arc<Shared>,
    peer: PeerId,
}

impl ConnectionSlot {
    fn acquire(shared: &Arc<Shared>, peer: PeerId) -> Option<Self> {
        let mut counts = shared.incoming.lock().unwrap_or_else(PoisonError::into_inner);
        let of_peer = counts.per_peer.get(&peer).copied().unwrap_or(0);
        if counts.connections >= CONNECTIONS_MAX || of_peer >= CONNECTIONS_PER_PEER_MAX {
            return None;
        }
        counts.connections += 1;
        counts.per_peer.insert(peer, of_peer + 1);
        Some(Self { shared: shared.clone(), peer })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.shared.incoming.lock().unwrap_or_else(PoisonError::into_inner);
        counts.connections = counts.connections.saturating_sub(1);
        if let Some(n) = counts.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Accepts connections until the endpoint is closed.
///
/// A dialer must first prove that it receives packets at its source address: an Initial packet without a valid
/// address-validation token is answered with a QUIC Retry (one small packet, no state kept), and only the Initial
/// that echoes the Retry's token takes a handshake slot. So Initials from spoofed or never-answering addresses,
/// however many, take none; a dialer that does answer takes at most [`HANDSHAKES_PER_SOURCE_MAX`] slots from its
/// address, and all take at most [`HANDSHAKES_MAX`]. A dialer over a limit is refused at once (CONNECTION_REFUSED),
/// which it sees as a refused handshake, not as an unreachable peer.
pub(super) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        if !incoming.remote_address_validated() {
            shared.stats.refuse(Refusal::Unvalidated);
            if let Err(e) = incoming.retry() {
                // quinn allows a Retry whenever the address is not validated; refuse rather than admit if not.
                tracing::warn!(%remote, "refusing a connection that can be neither validated nor retried");
                e.into_incoming().refuse();
            }
            continue;
        }
        let from = Source::of(remote.ip());
        let admitted = shared.incoming.lock().unwrap_or_else(PoisonError::into_inner).admit(from);
        if let Err(refusal) = admitted {
            shared.stats.refuse(refusal);
            tracing::debug!(%remote, kind = refusal.name(), "refusing a connection");
            incoming.refuse();
            continue;
        }
        let slot = HandshakeSlot { shared: shared.clone(), from };
        let span = tracing::debug_span!("dataplane_serve", %remote);
        tokio::spawn(serve_connection(incoming, slot).instrument(span));
    }
    tracing::debug!("data plane endpoint closed; no longer accepting");
}

async fn serve_connection(incoming: quinn::Incoming, slot: HandshakeSlot) {
    let shared = slot.shared.clone();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            shared.stats.refuse(Refusal::HandshakeFailed);
            tracing::debug!(error = %e, "incoming connection failed");
            return;
        }
    };
    // Dropping an unfinished handshake closes its connection.
    let conn = match timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Err(_) => {
            shared.stats.refuse(Refusal::HandshakeFailed);
            tracing::debug!("handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            shared.stats.refuse(Refusal::HandshakeFailed);
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Ok(Ok(conn)) => conn,
    };
    drop(slot);
    let peer = match tls::remote_peer(&conn) {
        Ok(peer) => peer,
        Err(e) => {
            shared.stats.refuse(Refusal::HandshakeFailed);
            tracing::warn!(error = %e, "connection without a usable identity");
            conn.close(code::NOT_ALLOWED, b"no identity");
            return;
        }
    };
    let span = tracing::info_span!("peer", %peer);
    async move {
        if !shared.allowed(&peer) {
            shared.stats.refuse(Refusal::NotAllowed);
            tracing::info!("refusing a connection from a peer not in the allow list");
            conn.close(code::NOT_ALLOWED, b"peer not allowed");
            return;
        }
        let Some(_slot) = ConnectionSlot::acquire(&shared, peer) else {
            shared.stats.refuse(Refusal::TooManyConnections);
            tracing::info!("refusing a connection: too many connections");
            conn.close(code::TOO_MANY_CONNECTIONS, b"too many connections");
            return;
        };
        tracing::debug!("peer connected");
        let _counted = SentCounted::start(&shared, peer, &conn);
        let memory = Arc::new(Semaphore::new(SERVE_CHUNKS_PER_CONNECTION_MAX));
        loop {
            match conn.accept_bi().await {
                Ok(_) if !shared.allowed(&peer) => {
                    tracing::info!("closing the connection of a peer no longer allowed");
                    conn.close(code::NOT_ALLOWED, b"peer not allowed");
                    break;
                }
                Ok((send, recv)) => {
                    let stream = serve_stream(shared.clone(), memory.clone(), conn.clone(), peer, send, recv);
                    tokio::spawn(stream.in_current_span());
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "connection ended");
                    break;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

enum RequestError {
    /// Counted and answered with a reset.
    Refused(Refusal, String),
    /// The requester reset the stream or the connection is gone: nothing to answer.
    Gone(String),
}

async fn read_request(recv: &mut quinn::RecvStream) -> Result<ChunkRequest, RequestError> {
    let exact = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            RequestError::Refused(Refusal::Malformed, "stream ended inside the request frame".into())
        }
        quinn::ReadExactError::ReadError(e) => RequestError::Gone(e.to_string()),
    };
    let mut prefix = [0u8; frame::PREFIX_BYTES];
    recv.read_exact(&mut prefix).await.map_err(exact)?;
    let len = frame::check_len(prefix).map_err(|e| match e {
        LenError::Empty => RequestError::Refused(Refusal::Malformed, e.to_string()),
        LenError::Oversized(_) => RequestError::Refused(Refusal::Oversized, e.to_string()),
    })?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(exact)?;
    match recv.read_chunk(1, true).await {
        Ok(None) => {}
        Ok(Some(_)) => return Err(RequestError::Refused(Refusal::Malformed, "bytes after the request frame".into())),
        Err(e) => return Err(RequestError::Gone(e.to_string())),
    }
    ChunkRequest::decode(&body).map_err(|e| RequestError::Refused(Refusal::Malformed, e.to_string()))
}

/// One reply, ready to write.
enum Prepared {
    /// Holds its share of the serving memory (the connection's and the node's) until written.
    Data(Bytes, [OwnedSemaphorePermit; 2]),
    Missing,
    Elsewhere(Vec<PeerId>),
}

async fn prepare(shared: Arc<Shared>, memory: Arc<Semaphore>, id: ChunkId, decision: Decision) -> Prepared {
    match decision {
        Decision::Elsewhere(peers) => Prepared::Elsewhere(peers),
        Decision::Missing => Prepared::Missing,
        Decision::Serve => {
            // The connection's share first, so one peer cannot take the whole node's budget. Neither semaphore is
            // ever closed.
            let Ok(of_connection) = memory.acquire_owned().await else {
                return Prepared::Missing;
            };
            let Ok(of_node) = shared.serve_memory.clone().acquire_owned().await else {
                return Prepared::Missing;
            };
            let permit = [of_connection, of_node];
            let source = shared.source.clone();
            match tokio::task::spawn_blocking(move || source.read(&id)).await {
                Ok(Ok(Some(bytes))) if !bytes.is_empty() && bytes.len() as u64 <= CHUNK_SIZE => {
                    Prepared::Data(Bytes::from(bytes), permit)
                }
                Ok(Ok(Some(bytes))) => {
                    tracing::error!(chunk = %id, len = bytes.len(), "chunk source returned an impossible chunk size");
                    Prepared::Missing
                }
                Ok(Ok(None)) => Prepared::Missing,
                Ok(Err(e)) => {
                    tracing::warn!(chunk = %id, error = %e, "reading a chunk to serve failed; answering Missing");
                    Prepared::Missing
                }
                Err(e) => {
                    tracing::error!(chunk = %id, error = %e, "reading a chunk to serve panicked; answering Missing");
                    Prepared::Missing
                }
            }
        }
    }
}

enum WriteFail {
    /// The reader took nothing for WRITE_STALL_TIMEOUT.
    Stalled,
    /// The requester stopped the stream or the connection is gone.
    Gone(quinn::WriteError),
}

/// Writes all of `bufs`, failing if the stream accepts no byte for the watchdog's period.
async fn write_all(send: &mut quinn::SendStream, bufs: &mut [Bytes], watchdog: &mut Watchdog) -> Result<(), WriteFail> {
    let mut start = 0;
    while start < bufs.len() {
        match watchdog.run(send.write_chunks(&mut bufs[start..])).await {
            Err(_) => return Err(WriteFail::Stalled),
            Ok(Err(e)) => return Err(WriteFail::Gone(e)),
            Ok(Ok(written)) => start += written.chunks,
        }
    }
    Ok(())
}

/// Writes one reply; returns the chunk bytes sent, if it was data.
async fn write_reply(
    shared: &Shared,
    send: &mut quinn::SendStream,
    watchdog: &mut Watchdog,
    reply: Prepared,
) -> Result<Option<u64>, WriteFail> {
    match reply {
        Prepared::Missing => {
            write_all(send, &mut [frame::encode(&ChunkReply::Missing.encode())], watchdog).await?;
            Ok(None)
        }
        Prepared::Elsewhere(peers) => {
            let peers = peers
                .iter()
                .map(|peer| peer.to_bytes())
                .filter(|bytes| bytes.len() <= PEER_ID_BYTES_MAX)
                .take(REDIRECT_PEERS_MAX)
                .map(Into::into)
                .collect();
            write_all(send, &mut [frame::encode(&ChunkReply::Elsewhere { peers }.encode())], watchdog).await?;
            Ok(None)
        }
        Prepared::Data(bytes, _permit) => {
            let len = bytes.len();
            // `prepare` admits only 1..=CHUNK_SIZE bytes, so the length fits a u32.
            let header = frame::encode(&ChunkReply::Data { len: len as u32 }.encode());
            let upload = shared.upload.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            match upload {
                None => write_all(send, &mut [header, bytes], watchdog).await?,
                Some(_) => {
                    write_all(send, &mut [header], watchdog).await?;
                    let mut rest = bytes;
                    while !rest.is_empty() {
                        let piece = rest.split_to(rest.len().min(RATE_PIECE_BYTES));
                        // The limit of now: a reload may have replaced or lifted it.
                        let bucket = shared.upload.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                        if let Some(bucket) = bucket {
                            bucket.take(piece.len()).await;
                        }
                        write_all(send, &mut [piece], watchdog).await?;
                    }
                }
            }
            Ok(Some(len as u64))
        }
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    memory: Arc<Semaphore>,
    conn: quinn::Connection,
    peer: PeerId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let request = match timeout(shared.timeouts.request_read, read_request(&mut recv)).await {
        Ok(Ok(request)) => request,
        Ok(Err(RequestError::Gone(why))) => {
            tracing::debug!(%why, "request abandoned");
            return;
        }
        Ok(Err(RequestError::Refused(refusal, why))) => {
            refuse(&shared, peer, &mut send, &mut recv, refusal, &why);
            return;
        }
        Err(_) => {
            let why = format!("no complete request within {:?}", shared.timeouts.request_read);
            refuse(&shared, peer, &mut send, &mut recv, Refusal::Stalled, &why);
            return;
        }
    };
    drop(recv);
    if request.repo != shared.repo {
        let why = format!("request for repository {}, this node serves {}", request.repo, shared.repo);
        shared.stats.refuse(Refusal::WrongRepo);
        shared.stats.record(peer, |t| t.refused += 1);
        tracing::info!(%why, "refused request");
        let _ = send.reset(code::REFUSED);
        return;
    }
    let count = request.chunks.len();
    let decisions = shared.source.decide(peer, request.chunks.clone()).await;
    if decisions.len() != count {
        tracing::error!(
            asked = count,
            answered = decisions.len(),
            "chunk source decided on the wrong number of chunks"
        );
        let _ = send.reset(code::INTERNAL);
        return;
    }
    // A reply with data to send waits for a sending slot where the node limits them (the origin), before it reads.
    let sends_data = decisions.iter().any(|d| matches!(d, Decision::Serve));
    let slot = match (&shared.sending, sends_data) {
        (Some(slots), true) => slots.acquire(peer).await,
        _ => None,
    };
    let replies = futures::stream::iter(request.chunks.into_iter().zip(decisions))
        .map(|(id, decision)| prepare(shared.clone(), memory.clone(), id, decision))
        .buffered(READ_AHEAD_CHUNKS + 1);
    let deadline = tokio::time::Instant::now() + SENDING_SLOT_HOLD_MAX;
    let release = match (&shared.sending, &slot) {
        (Some(slots), Some(_)) => {
            Some(SlotRelease { deadline, wire_from: conn.stats().udp_tx.bytes, conn, slots: slots.clone(), peer })
        }
        _ => None,
    };
    let sending = send_replies(&shared, peer, &mut send, replies, release);
    match slot {
        None => sending.await,
        Some(slot) => {
            futures::pin_mut!(sending);
            if tokio::time::timeout_at(deadline, &mut sending).await.is_err() {
                drop(slot);
                sending.await;
            }
        }
    }
    shared.source.served(peer);
}

/// When a reply holding a sending slot lets it go: once its bytes have left, or at `deadline`.
struct SlotRelease {
    deadline: tokio::time::Instant,
    /// The reply's connection, and what it had put on the wire (UDP payload bytes) when the reply took its slot.
    conn: quinn::Connection,
    wire_from: u64,
    /// The slots and the peer, to know whether the peer holds more than this one.
    slots: Arc<SendingSlots>,
    peer: PeerId,
}

impl SlotRelease {
    /// Returns once the peer acknowledged every byte of `send`, its connection has put at least `written` bytes on
    /// the wire since the slot was taken (the reply's bytes have left this node: the slot is the link, and on a
    /// long path the acknowledgement comes a round trip later, while the link could carry the next reply), or
    /// the deadline passed. The connection's bytes count every stream's (retransmissions too, as they take the link),
    /// so they tell one reply's bytes apart only while its peer holds no other slot: a peer holding several (it gets
    /// more than one only while nobody else waits) frees them at its acknowledgements, or its replies would free
    /// each other's slots early and queue more of its bytes ahead of peers that come to wait
    /// (`tests/dataplane.rs`, `a_greedy_peer_does_not_keep_others_waiting_for_sending_slots`).
    async fn wait(self, send: &mut quinn::SendStream, written: u64) {
        let left = async {
            let mut tick = tokio::time::interval(SENT_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // The connection's counter only grows.
                if self.slots.held_by(&self.peer) == 1 && self.conn.stats().udp_tx.bytes - self.wire_from >= written {
                    return;
                }
            }
        };
        // Ok(None) once every byte is acknowledged; a stop code or a lost connection frees the slot as well.
        let acked = send.stopped();
        let _ = tokio::time::timeout_at(self.deadline, async {
            tokio::select! {
                _ = acked => {}
                () = left => {}
            }
        })
        .await;
    }
}

/// Writes every reply, then finishes the stream; with a [`SlotRelease`], then waits for it, which is when a sending
/// slot is free for the next reply.
async fn send_replies(
    shared: &Shared,
    peer: PeerId,
    send: &mut quinn::SendStream,
    replies: impl futures::Stream<Item = Prepared>,
    release: Option<SlotRelease>,
) {
    futures::pin_mut!(replies);
    let mut watchdog = Watchdog::new(shared.timeouts.write_stall);
    let mut written = 0;
    while let Some(reply) = replies.next().await {
        match write_reply(shared, send, &mut watchdog, reply).await {
            Ok(Some(bytes)) => {
                written += bytes;
                shared.stats.record(peer, |t| {
                    t.bytes_sent += bytes;
                    t.chunks_sent += 1;
                })
            }
            Ok(None) => {}
            Err(WriteFail::Stalled) => {
                shared.stats.refuse(Refusal::SlowReader);
                shared.stats.record(peer, |t| t.refused += 1);
                tracing::info!("resetting a stream whose reader took no data for {:?}", shared.timeouts.write_stall);
                let _ = send.reset(code::SLOW_READER);
                return;
            }
            Err(WriteFail::Gone(e)) => {
                tracing::debug!(error = %e, "reply abandoned");
                return;
            }
        }
    }
    let _ = send.finish();
    if let Some(release) = release {
        release.wait(send, written).await;
    }
}

fn refuse(
    shared: &Shared,
    peer: PeerId,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    refusal: Refusal,
    why: &str,
) {
    shared.stats.refuse(refusal);
    shared.stats.record(peer, |t| t.refused += 1);
    tracing::info!(kind = refusal.name(), %why, "refused request");
    let _ = send.reset(code::REFUSED);
    let _ = recv.stop(code::REFUSED);
}

/// What served connections sent on the wire: the totals of those that ended, and the open ones (at most as many as
/// the connection limits admit: each is registered only once it holds a connection slot).
#[derive(Debug, Default)]
pub(super) struct SentOnWire {
    ended: WireTotals,
    open: HashMap<usize, (PeerId, quinn::Connection)>,
}

impl SentOnWire {
    pub(super) fn totals(&self) -> WireTotals {
        let mut totals = self.ended;
        for (_, conn) in self.open.values() {
            totals.add(WireTotals::of(&conn.stats()));
        }
        totals
    }

    /// The round trip QUIC measured on each open served connection ([`super::measured_round_trip`]), with its peer.
    pub(super) fn round_trips(&self) -> impl Iterator<Item = (PeerId, std::time::Duration)> + '_ {
        self.open.values().filter_map(|(peer, conn)| Some((*peer, super::measured_round_trip(conn)?)))
    }
}

/// Registers a served connection for as long as its task runs; when it ends, its statistics join the totals.
struct SentCounted {
    shared: Arc<Shared>,
    id: usize,
}

impl SentCounted {
    fn start(shared: &Arc<Shared>, peer: PeerId, conn: &quinn::Connection) -> Self {
        let id = conn.stable_id();
        shared.stats.sent.lock().unwrap_or_else(PoisonError::into_inner).open.insert(id, (peer, conn.clone()));
        SentCounted { shared: shared.clone(), id }
    }
}

impl Drop for SentCounted {
    fn drop(&mut self) {
        let mut sent = self.shared.stats.sent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, conn)) = sent.open.remove(&self.id) {
            sent.ended.add(WireTotals::of(&conn.stats()));
        }
    }
}
