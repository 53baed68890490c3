//! The data plane over real sockets on 127.0.0.1: transfers, redirects, corruption, identity and allow-list checks,
//! refusal of bad requests, traffic counters and the upload limit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::PeerId;
use mirrormesh::dataplane::{
    ChunkSource, DataPlane, DataPlaneConfig, Decision, FetchFailed, FetchFailure, FetchSummary, Fetched,
    StreamTimeouts, Traffic, tls,
};
use mirrormesh::key::NodeKey;
use mirrormesh_proto::transfer::{ChunkRequest, FRAME_BYTES_MAX};
use mirrormesh_proto::{CHUNK_SIZE, ChunkId, RepoId};

/// How a test source answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Honest,
    /// Serves every chunk with its first byte flipped.
    Corrupt,
    /// Points every asker at the redirect peers.
    Redirect,
}

struct MemSource {
    chunks: HashMap<ChunkId, Vec<u8>>,
    mode: Mode,
    redirect: Vec<PeerId>,
    seen: Seen,
}

/// What a server's chunk source saw, in order: requests as they arrived (before a reply waits for a sending slot)
/// and chunks as they were read (once the reply holds one).
type Seen = Arc<std::sync::Mutex<Vec<SourceEvent>>>;

#[derive(Clone, Debug, PartialEq)]
enum SourceEvent {
    Asked(PeerId),
    Read(ChunkId),
}

impl ChunkSource for MemSource {
    fn decide(&self, peer: PeerId, chunks: Vec<ChunkId>) -> BoxFuture<'static, Vec<Decision>> {
        self.seen.lock().unwrap().push(SourceEvent::Asked(peer));
        let decision = match self.mode {
            Mode::Redirect => Decision::Elsewhere(self.redirect.clone()),
            _ => Decision::Serve,
        };
        futures::future::ready(vec![decision; chunks.len()]).boxed()
    }

    fn read(&self, id: &ChunkId) -> std::io::Result<Option<Vec<u8>>> {
        self.seen.lock().unwrap().push(SourceEvent::Read(*id));
        Ok(self.chunks.get(id).map(|bytes| {
            let mut bytes = bytes.clone();
            if self.mode == Mode::Corrupt {
                bytes[0] ^= 1;
            }
            bytes
        }))
    }
}

/// Deterministic test bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn repo() -> RepoId {
    RepoId::new("alpine").unwrap()
}

fn key(seed: u8) -> NodeKey {
    NodeKey::from_seed([seed; 32]).unwrap()
}

struct Node {
    key: NodeKey,
    plane: DataPlane,
    seen: Seen,
}

impl Node {
    fn peer(&self) -> PeerId {
        self.key.peer_id()
    }

    fn addr(&self) -> SocketAddr {
        self.plane.local_addr()
    }
}

fn node_with(
    seed: u8,
    chunks: &[Vec<u8>],
    mode: Mode,
    redirect: Vec<PeerId>,
    allow: Option<BTreeSet<PeerId>>,
    upload_rate: Option<u64>,
) -> Node {
    let cfg = DataPlaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upload_rate,
        allow,
        repo: repo(),
        timeouts: Default::default(),
        sending_replies_max: None,
    };
    bind(seed, chunks, mode, redirect, cfg)
}

/// A node serving `chunks` from memory, its source recording what it saw.
fn bind(seed: u8, chunks: &[Vec<u8>], mode: Mode, redirect: Vec<PeerId>, cfg: DataPlaneConfig) -> Node {
    let key = key(seed);
    let seen = Seen::default();
    let chunks = chunks.iter().map(|c| (ChunkId::of(c), c.clone())).collect();
    let source = MemSource { chunks, mode, redirect, seen: seen.clone() };
    let plane = DataPlane::bind(&key, cfg, Arc::new(source)).unwrap();
    Node { key, plane, seen }
}

/// A node whose stream timeouts are short, so the stall tests take a fraction of a second.
fn node_timed(seed: u8, chunks: &[Vec<u8>], timeouts: StreamTimeouts) -> Node {
    node_limited(seed, chunks, timeouts, None)
}

/// An honest node with the given stream timeouts and sending slots.
fn node_limited(seed: u8, chunks: &[Vec<u8>], timeouts: StreamTimeouts, sending_replies_max: Option<usize>) -> Node {
    let cfg = DataPlaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upload_rate: None,
        allow: None,
        repo: repo(),
        timeouts,
        sending_replies_max,
    };
    bind(seed, chunks, Mode::Honest, Vec::new(), cfg)
}

const SHORT: Duration = Duration::from_millis(400);

fn node(seed: u8, chunks: &[Vec<u8>]) -> Node {
    node_with(seed, chunks, Mode::Honest, vec![], None, None)
}

/// Fetches `ids` from `server`, returning every outcome in order.
async fn fetch_all(
    client: &Node,
    server: &Node,
    ids: &[ChunkId],
) -> Result<(FetchSummary, Vec<(ChunkId, Fetched)>), FetchFailed> {
    let mut got = Vec::new();
    let summary = client.plane.fetch(server.peer(), &[server.addr()], ids.to_vec(), |id, f| got.push((id, f))).await?;
    Ok((summary, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_small_and_full_chunks_byte_for_byte_and_counts_traffic() {
    let mut chunks: Vec<Vec<u8>> = (0..200).map(|i| pattern(i, 1 + (i as usize * 977) % (64 << 10))).collect();
    chunks.extend((0..4).map(|i| pattern(1000 + i, CHUNK_SIZE as usize)));
    let server = node(1, &chunks);
    let client = node(2, &[]);
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();

    // Two requests at once on the same connection: the batch of small chunks and the full-size ones.
    let (small, large) = ids.split_at(200);
    let (a, b) = tokio::join!(fetch_all(&client, &server, small), fetch_all(&client, &server, large));
    let (summary_a, got_a) = a.unwrap();
    let (summary_b, got_b) = b.unwrap();
    let got: Vec<_> = got_a.into_iter().chain(got_b).collect();
    assert_eq!(got.len(), chunks.len());
    for ((id, fetched), chunk) in got.iter().zip(&chunks) {
        assert_eq!(*id, ChunkId::of(chunk));
        assert_eq!(*fetched, Fetched::Verified(Bytes::from(chunk.clone())), "chunk {id}");
    }
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    assert_eq!(summary_a.bytes + summary_b.bytes, total);
    assert_eq!(summary_a.chunks + summary_b.chunks, chunks.len());

    let received = client.plane.traffic()[&server.peer()];
    assert_eq!(received, Traffic { bytes_received: total, chunks_received: chunks.len() as u64, ..Traffic::default() });
    let sent = server.plane.traffic()[&client.peer()];
    assert_eq!(sent, Traffic { bytes_sent: total, chunks_sent: chunks.len() as u64, ..Traffic::default() });

    // The connection is reused: a second round adds exactly its bytes.
    fetch_all(&client, &server, &ids[..3]).await.unwrap();
    let again: u64 = chunks[..3].iter().map(|c| c.len() as u64).sum();
    assert_eq!(client.plane.traffic()[&server.peer()].bytes_received, total + again);
    // Nothing refused but the first Initial of the one dial, answered with a Retry (address validation).
    let refusals = server.plane.refusals();
    assert_eq!(refusals["unvalidated"], 1, "{refusals:?}");
    assert!(refusals.iter().all(|(kind, n)| *kind == "unvalidated" || *n == 0), "{refusals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_elsewhere_and_corrupt_come_through() {
    let chunks: Vec<Vec<u8>> = (0..3).map(|i| pattern(i, 5000)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    let unknown = ChunkId::of(b"nobody has this");
    let holder = node(1, &chunks);
    let corrupt = node_with(2, &chunks, Mode::Corrupt, vec![], None, None);
    let others = vec![key(7).peer_id(), key(8).peer_id()];
    let origin = node_with(3, &chunks, Mode::Redirect, others.clone(), None, None);
    let client = node(4, &[]);

    let (summary, got) = fetch_all(&client, &holder, &[ids[0], unknown, ids[1]]).await.unwrap();
    assert_eq!(summary, FetchSummary { bytes: 10_000, chunks: 2 });
    assert_eq!(got[0], (ids[0], Fetched::Verified(Bytes::from(chunks[0].clone()))));
    assert_eq!(got[1], (unknown, Fetched::Missing));
    assert_eq!(got[2], (ids[1], Fetched::Verified(Bytes::from(chunks[1].clone()))));

    let (summary, got) = fetch_all(&client, &origin, &ids).await.unwrap();
    assert_eq!(summary, FetchSummary::default());
    assert!(got.iter().all(|(_, f)| *f == Fetched::Elsewhere(others.clone())), "{got:?}");

    let (summary, got) = fetch_all(&client, &corrupt, &ids).await.unwrap();
    assert_eq!(summary, FetchSummary::default());
    assert_eq!(got, ids.iter().map(|id| (*id, Fetched::Corrupt)).collect::<Vec<_>>());
    let traffic = client.plane.traffic()[&corrupt.peer()];
    assert_eq!((traffic.bytes_received, traffic.chunks_received, traffic.failures), (15_000, 3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_must_prove_the_expected_identity() {
    let chunk = pattern(1, 100);
    let server = node(1, std::slice::from_ref(&chunk));
    let client = node(2, &[]);
    let impostor_for = key(9).peer_id();
    let err = client
        .plane
        .fetch(impostor_for, &[server.addr()], vec![ChunkId::of(&chunk)], |_, _| panic!("no chunk expected"))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&format!("presented identity {}, not {impostor_for}", server.peer())), "{message}");
    assert_eq!(err.kind, FetchFailure::HandshakeFailed, "{message}");
    assert!(message.contains(&server.addr().to_string()), "{message}");
    // The right identity at the same address works.
    let (summary, _) = fetch_all(&client, &server, &[ChunkId::of(&chunk)]).await.unwrap();
    assert_eq!(summary.chunks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_is_enforced_both_ways() {
    let chunk = pattern(1, 1000);
    let id = ChunkId::of(&chunk);
    let friend = node(2, &[]);
    let stranger = node(3, &[]);
    let server = node_with(1, std::slice::from_ref(&chunk), Mode::Honest, vec![], Some([friend.peer()].into()), None);

    // Inbound: the server refuses a stranger and counts it.
    let err = fetch_all(&stranger, &server, &[id]).await.unwrap_err();
    assert!(format!("{err:#}").contains("allow list"), "{err:#}");
    assert_eq!(server.plane.refusals()["not_allowed"], 1);
    fetch_all(&friend, &server, &[id]).await.unwrap();

    // Outbound: a node with an allow list does not fetch from others.
    let picky = node_with(4, &[], Mode::Honest, vec![], Some([friend.peer()].into()), None);
    let err = fetch_all(&picky, &server, &[id]).await.unwrap_err();
    assert!(format!("{err:#}").contains("not in the allow list"), "{err:#}");
    assert_eq!(server.plane.refusals()["not_allowed"], 1, "refused before dialing");
}

/// Writes raw bytes on a fresh stream of `conn` and returns the server's reset code, if it reset the stream.
async fn raw_request(conn: &quinn::Connection, bytes: &[u8]) -> Option<u64> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The server may reset its side before reading everything; a failed write is fine.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    match recv.read_to_end(1 << 20).await {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Some(code.into_inner()),
        _ => None,
    }
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_counted_and_others_still_served() {
    let chunk = pattern(1, 4000);
    let id = ChunkId::of(&chunk);
    let server = node(1, std::slice::from_ref(&chunk));

    let raw_key = key(5);
    let identity = tls::Identity::new(&raw_key).unwrap();
    let (config, _) = tls::client_config(&identity, server.peer()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint.connect_with(config, server.addr(), tls::SERVER_NAME).unwrap().await.unwrap();

    let good = ChunkRequest { repo: repo(), chunks: vec![id] }.encode();
    let wrong_repo = ChunkRequest { repo: RepoId::new("debian").unwrap(), chunks: vec![id] }.encode();
    let mut trailing = framed(&good);
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", framed(b"\x01garbage")),
        ("malformed", framed(&[])),
        ("malformed", good[..2].to_vec()),
        ("malformed", trailing),
        ("oversized", ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec()),
        ("oversized", u32::MAX.to_be_bytes().to_vec()),
        ("wrong_repo", framed(&wrong_repo)),
    ];
    for (kind, bytes) in &cases {
        assert_eq!(raw_request(&conn, bytes).await, Some(1), "{kind}: {bytes:?}");
    }
    let refusals = server.plane.refusals();
    assert_eq!(refusals["malformed"], 4, "{refusals:?}");
    assert_eq!(refusals["oversized"], 2, "{refusals:?}");
    assert_eq!(refusals["wrong_repo"], 1, "{refusals:?}");

    // The same connection still gets a well-formed request answered...
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&framed(&good)).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(2 * FRAME_BYTES_MAX + chunk.len()).await.unwrap();
    assert!(reply.ends_with(&chunk));
    // ...and so does everyone else.
    let client = node(2, &[]);
    let (summary, _) = fetch_all(&client, &server, &[id]).await.unwrap();
    assert_eq!(summary.chunks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_limit_holds() {
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, CHUNK_SIZE as usize)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    let server = node_with(1, &chunks, Mode::Honest, vec![], None, Some(8 << 20));
    let client = node(2, &[]);
    let start = Instant::now();
    let (summary, _) = fetch_all(&client, &server, &ids).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(summary.bytes, 4 << 20);
    // 4 MiB at 8 MiB/s from an empty bucket.
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_fetch_is_cancelled_and_the_peer_keeps_serving() {
    let chunks: Vec<Vec<u8>> = (0..8).map(|i| pattern(i, CHUNK_SIZE as usize)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    let server = node_with(1, &chunks, Mode::Honest, vec![], None, Some(16 << 20));
    let client = node(2, &[]);
    let mut seen = 0;
    let addrs = [server.addr()];
    let fetch = client.plane.fetch(server.peer(), &addrs, ids.clone(), |_, _| seen += 1);
    assert!(tokio::time::timeout(Duration::from_millis(100), fetch).await.is_err(), "8 MiB at 16 MiB/s takes 0.5 s");
    assert!(seen < ids.len());
    let (summary, _) = fetch_all(&client, &server, &ids[..1]).await.unwrap();
    assert_eq!(summary.chunks, 1);
    // The cancelled request stopped early: the server sent less than all of it.
    let sent = server.plane.traffic()[&client.peer()];
    assert!(sent.chunks_sent < 1 + ids.len() as u64, "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_closed_planes_fail_cleanly() {
    let chunk = pattern(1, 10);
    let server = node(1, std::slice::from_ref(&chunk));
    let client = node(2, &[]);
    assert_eq!(fetch_all(&client, &server, &[]).await.unwrap_err().kind, FetchFailure::Invalid);
    let too_many = fetch_all(&client, &server, &vec![ChunkId::of(&chunk); 257]).await.unwrap_err();
    assert_eq!(too_many.kind, FetchFailure::Invalid, "{too_many}");
    let err = client.plane.fetch(server.peer(), &[], vec![ChunkId::of(&chunk)], |_, _| {}).await.unwrap_err();
    assert!(err.to_string().contains("without an address"), "{err}");
    assert_eq!(err.kind, FetchFailure::Failed, "{err}");
    // Nothing answers at this address (a socket that never replies): unreachable, after the dial timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let timeouts = StreamTimeouts { dial: Duration::from_millis(300), ..StreamTimeouts::default() };
    let impatient = node_timed(4, &[], timeouts);
    let addrs = [silent.local_addr().unwrap()];
    let err = impatient.plane.fetch(server.peer(), &addrs, vec![ChunkId::of(&chunk)], |_, _| {}).await.unwrap_err();
    assert_eq!(err.kind, FetchFailure::Unreachable, "{err}");
    let cfg = DataPlaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upload_rate: Some(0),
        allow: None,
        repo: repo(),
        timeouts: Default::default(),
        sending_replies_max: None,
    };
    let source =
        Arc::new(MemSource { chunks: HashMap::new(), mode: Mode::Honest, redirect: vec![], seen: Seen::default() });
    assert!(DataPlane::bind(&key(3), cfg.clone(), source.clone()).is_err());
    let cfg = DataPlaneConfig { upload_rate: None, sending_replies_max: Some(0), ..cfg };
    let err = DataPlane::bind(&key(3), cfg, source).unwrap_err();
    assert!(format!("{err:#}").contains("sending replies"), "{err:#}");

    fetch_all(&client, &server, &[ChunkId::of(&chunk)]).await.unwrap();
    // A closed plane fails its fetches at once, naming the peer.
    client.plane.close();
    let err = fetch_all(&client, &server, &[ChunkId::of(&chunk)]).await.unwrap_err();
    assert!(format!("{err:#}").contains(&server.peer().to_string()), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_peer_are_bounded() {
    let server = node(1, &[]);
    let identity = tls::Identity::new(&key(5)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut open = Vec::new();
    for _ in 0..mirrormesh::dataplane::CONNECTIONS_PER_PEER_MAX {
        let (config, _) = tls::client_config(&identity, server.peer()).unwrap();
        let conn = endpoint.connect_with(config, server.addr(), tls::SERVER_NAME).unwrap().await.unwrap();
        // A stream round trip proves the server admitted the connection.
        assert_eq!(raw_request(&conn, &framed(b"\x01x")).await, Some(1));
        open.push(conn);
    }
    let (config, _) = tls::client_config(&identity, server.peer()).unwrap();
    let extra = endpoint.connect_with(config, server.addr(), tls::SERVER_NAME).unwrap().await.unwrap();
    match extra.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(close.error_code.into_inner(), 2),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(server.plane.refusals()["too_many_connections"], 1);
}

/// A fake server speaking the data plane's TLS that answers the i-th request stream with `replies[i]`.
async fn fake_server(key: &NodeKey, replies: Vec<Vec<u8>>) -> (quinn::Endpoint, SocketAddr) {
    let identity = tls::Identity::new(key).unwrap();
    let endpoint =
        quinn::Endpoint::server(tls::server_config(&identity).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accept = endpoint.clone();
    tokio::spawn(async move {
        let conn = accept.accept().await.unwrap().await.unwrap();
        for reply in replies {
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            recv.read_to_end(FRAME_BYTES_MAX + 4).await.unwrap();
            send.write_all(&reply).await.unwrap();
            send.finish().unwrap();
        }
        conn.closed().await;
    });
    (endpoint, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_by_a_server_fail_the_fetch() {
    use mirrormesh_proto::transfer::ChunkReply;
    let chunk = pattern(1, 100);
    let id = ChunkId::of(&chunk);
    let data_header = framed(&ChunkReply::Data { len: 100 }.encode());
    let missing = framed(&ChunkReply::Missing.encode());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("exceeds the limit", u32::MAX.to_be_bytes().to_vec()),
        ("reply:", framed(&ChunkReply::Data { len: CHUNK_SIZE as u32 + 1 }.encode())),
        ("reply:", framed(b"\x01\x09garbage")),
        ("ended before all replies", [data_header.clone(), chunk[..50].to_vec()].concat()),
        ("ended before all replies", vec![]),
        ("bytes after the last", [data_header, chunk.clone(), missing].concat()),
        ("invalid peer id", framed(&ChunkReply::Elsewhere { peers: vec![b"nope".to_vec().into()] }.encode())),
    ];
    let server_key = key(6);
    let (_endpoint, addr) = fake_server(&server_key, cases.iter().map(|(_, reply)| reply.clone()).collect()).await;
    let client = node(2, &[]);
    for (expected, _) in &cases {
        let err = client.plane.fetch(server_key.peer_id(), &[addr], vec![id], |_, _| {}).await.unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains(expected), "{expected}: {message}");
        assert!(message.contains(&server_key.peer_id().to_string()), "{message}");
    }
    assert_eq!(client.plane.traffic()[&server_key.peer_id()].failures, cases.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_completes_is_refused_as_stalled() {
    let chunk = pattern(1, 100);
    let timeouts = StreamTimeouts { request_read: SHORT, ..StreamTimeouts::default() };
    let server = node_timed(1, std::slice::from_ref(&chunk), timeouts);
    let identity = tls::Identity::new(&key(5)).unwrap();
    let (config, _) = tls::client_config(&identity, server.peer()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint.connect_with(config, server.addr(), tls::SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // Half a length prefix, and then nothing.
    send.write_all(&[0, 0]).await.unwrap();
    let start = Instant::now();
    let result = recv.read_to_end(1024).await;
    assert!(matches!(result, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)))), "{result:?}");
    assert!(start.elapsed() >= SHORT - Duration::from_millis(50));
    assert_eq!(server.plane.refusals()["stalled"], 1);
    // Others are served meanwhile and after.
    let client = node(2, &[]);
    fetch_all(&client, &server, &[ChunkId::of(&chunk)]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_reset() {
    let chunks: Vec<Vec<u8>> = (0..40).map(|i| pattern(i, CHUNK_SIZE as usize)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    let timeouts = StreamTimeouts { write_stall: SHORT, ..StreamTimeouts::default() };
    let server = node_timed(1, &chunks, timeouts);
    let identity = tls::Identity::new(&key(5)).unwrap();
    let (mut config, _) = tls::client_config(&identity, server.peer()).unwrap();
    // Keep the connection alive so that the stream's stall, not the idle timeout, ends it.
    let mut transport = tls::client_transport();
    transport.keep_alive_interval(Some(Duration::from_millis(100)));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint.connect_with(config, server.addr(), tls::SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&framed(&ChunkRequest { repo: repo(), chunks: ids }.encode())).await.unwrap();
    send.finish().unwrap();
    // Read one byte, then nothing: the server fills the windows and stalls.
    let mut one = [0u8; 1];
    recv.read_exact(&mut one).await.unwrap();
    assert!(server.plane.refusals()["slow_reader"] == 0);
    let reset = recv.received_reset().await;
    assert!(matches!(reset, Ok(Some(code)) if code.into_inner() == 3), "{reset:?}");
    assert_eq!(server.plane.refusals()["slow_reader"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_slots_are_taken_in_turn_and_a_stalled_reader_gives_it_up() {
    let chunks: Vec<Vec<u8>> = (0..40).map(|i| pattern(i, CHUNK_SIZE as usize)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    // One slot, and the default 30 s write stall: only the slot's hold limit can free it from a stalled reader.
    let server = node_limited(1, &chunks, StreamTimeouts::default(), Some(1));
    let identity = tls::Identity::new(&key(5)).unwrap();
    let (config, _) = tls::client_config(&identity, server.peer()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint.connect_with(config, server.addr(), tls::SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&framed(&ChunkRequest { repo: repo(), chunks: ids.clone() }.encode())).await.unwrap();
    send.finish().unwrap();
    // The stalled request holds the slot once its first byte arrives; then nothing more is read.
    let mut one = [0u8; 1];
    recv.read_exact(&mut one).await.unwrap();

    // Three peers at once, each a few chunks: every reply takes the slot in turn, and all arrive byte for byte,
    // long before the stalled stream would be reset.
    let clients: Vec<Node> = (2..5).map(|seed| node(seed, &[])).collect();
    let fetches = clients.iter().enumerate().map(|(i, c)| fetch_all(c, &server, &ids[i * 4..i * 4 + 4]));
    let results = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(fetches))
        .await
        .expect("the stalled reader kept the only sending slot");
    for (i, result) in results.into_iter().enumerate() {
        let (summary, got) = result.unwrap();
        assert_eq!(summary.chunks, 4);
        for ((id, fetched), chunk) in got.iter().zip(&chunks[i * 4..]) {
            assert_eq!(*fetched, Fetched::Verified(Bytes::from(chunk.clone())), "chunk {id}");
        }
    }
    assert_eq!(server.plane.refusals()["slow_reader"], 0, "the stalled stream is still open: its slot was given up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_peer_does_not_keep_others_waiting_for_sending_slots() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const GREEDY_REQUESTS: usize = 60;
    let chunks: Vec<Vec<u8>> = (0..GREEDY_REQUESTS as u64 + 4).map(|i| pattern(i, CHUNK_SIZE as usize)).collect();
    let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
    let slots = mirrormesh::dataplane::ORIGIN_SENDING_REPLIES_MAX;
    let server = Arc::new(node_limited(1, &chunks, StreamTimeouts::default(), Some(slots)));
    let greedy = Arc::new(node(2, &[]));
    let others = [node(3, &[]), node(4, &[])];
    // The others connect first (one chunk each), so what follows measures the queue, not how long a handshake
    // takes on a loaded machine while the greedy peer's replies go out.
    for (i, other) in others.iter().enumerate() {
        fetch_all(other, &server, &[ids[GREEDY_REQUESTS + 2 + i]]).await.unwrap();
    }

    // The greedy peer asks for one chunk per request, all requests at once, on one connection.
    let done = Arc::new(AtomicUsize::new(0));
    let (completed_tx, mut completed) = tokio::sync::mpsc::channel(GREEDY_REQUESTS);
    let greedy_fetches: Vec<_> = ids[..GREEDY_REQUESTS]
        .iter()
        .map(|&id| {
            let (greedy, server, done, completed_tx) =
                (greedy.clone(), server.clone(), done.clone(), completed_tx.clone());
            tokio::spawn(async move {
                let (summary, _) = fetch_all(&greedy, &server, &[id]).await.unwrap();
                assert_eq!(summary.chunks, 1);
                done.fetch_add(1, Ordering::SeqCst);
                let _ = completed_tx.send(()).await;
            })
        })
        .collect();
    // Once a few of its requests are through, the rest are long queued at the server; then the others ask.
    for _ in 0..3 {
        completed.recv().await.unwrap();
    }
    futures::future::join_all(others.iter().enumerate().map(|(i, other)| {
        let server = server.clone();
        let id = ids[GREEDY_REQUESTS + i];
        async move {
            let (summary, _) = fetch_all(other, &server, &[id]).await.unwrap();
            assert_eq!(summary.chunks, 1);
        }
    }))
    .await;
    for fetch in greedy_fetches {
        fetch.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), GREEDY_REQUESTS);

    // The order is read at the server, so it measures the queue and not how soon a loaded machine ran each client:
    // between another peer's request arriving and its chunk being read (once its reply held a slot), how many of the
    // greedy peer's chunks were read. First come, first served, that would be all those queued before it.
    let seen = server.seen.lock().unwrap().clone();
    let greedy_ids: HashSet<ChunkId> = ids[..GREEDY_REQUESTS].iter().copied().collect();
    let greedy_reads = |events: &[SourceEvent]| {
        events.iter().filter(|e| matches!(e, SourceEvent::Read(id) if greedy_ids.contains(id))).count()
    };
    for (i, other) in others.iter().enumerate() {
        let read = seen.iter().position(|e| *e == SourceEvent::Read(ids[GREEDY_REQUESTS + i])).unwrap();
        let asked = seen[..read].iter().rposition(|e| *e == SourceEvent::Asked(other.peer())).unwrap();
        let (ahead, after) = (greedy_reads(&seen[asked..read]), greedy_reads(&seen[read..]));
        println!("peer {i}: {ahead} greedy replies read between its request and its own, {after} after");
        assert!(ahead <= 2 * slots, "the others waited for the greedy peer's queue: {ahead} of its replies went first");
        assert!(after >= GREEDY_REQUESTS / 4, "the greedy peer's queue was short when the others asked: {after}");
    }
}
