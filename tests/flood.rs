//! Floods of connections against both planes, on loopback.
//!
//! - The data plane: QUIC Initial packets of handshakes that never complete (no identity needed, the source address
//!   spoofable) while a fresh mirror syncs from an origin with real daemons; handshakes that pass address
//!   validation and then stall, all from one source address; a refused handshake is not "unreachable".
//! - The control plane (libp2p): connections per peer, pending incoming connections, established incoming
//!   connections.
//!
//! The flooder is test harness and lives here: it makes each Initial with quinn's protocol core (a client
//! `Endpoint::connect` and the first datagram that connection would send), sends it from one of many UDP source
//! ports and never feeds a response back, except in its validated mode, where it answers the server's Retry once so
//! that its handshake passes address validation and then stalls.
//!
//! `FLOOD_RUNS=N FLOOD_RATE=R cargo test --test flood a_fresh_mirror -- --nocapture` repeats the measured sync N
//! times with a flood of R Initials per second (default 1000).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, connection_limits};
use mirrormesh::dataplane::{
    ChunkSource, DataPlane, DataPlaneConfig, Decision, FetchFailed, FetchFailure, HANDSHAKES_MAX,
    HANDSHAKES_PER_SOURCE_MAX, StreamTimeouts, tls,
};
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::key::NodeKey;
use mirrormesh::local_fabric::{LocalFabric, NodeOptions};
use mirrormesh::swarm::{CONTROL_CONNECTIONS_PER_PEER_MAX, CONTROL_PENDING_INCOMING_MAX, ConnectionCaps};
use mirrormesh_proto::{ChunkId, RepoId};

// ---- the flooder ---------------------------------------------------------------------------------------------

/// Makes QUIC Initial packets with quinn's protocol core and sends them from its own UDP sockets.
struct Flooder {
    endpoint: quinn_proto::Endpoint,
    config: quinn::ClientConfig,
    sockets: Vec<UdpSocket>,
    next: usize,
    buf: Vec<u8>,
}

/// True if `datagram` starts with a QUIC version 1 Retry packet (long header, type 3).
fn is_retry(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0xf0 == 0xf0)
}

impl Flooder {
    /// A flooder sending from `ports` sockets bound to `ip`.
    fn new(ip: IpAddr, ports: usize) -> Self {
        let key = NodeKey::from_seed([0xf1; 32]).unwrap();
        let identity = tls::Identity::new(&key).unwrap();
        // The identity the server must prove does not matter: no handshake gets that far.
        let (config, _) = tls::client_config(&identity, key.peer_id()).unwrap();
        let endpoint = quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, None);
        let sockets = (0..ports).map(|_| UdpSocket::bind((ip, 0)).unwrap()).collect();
        Self { endpoint, config, sockets, next: 0, buf: Vec::new() }
    }

    /// Starts a connection to `target` and sends its first datagram (an Initial carrying the start of a ClientHello)
    /// from the next socket; returns that socket's index and the connection.
    fn start(&mut self, target: SocketAddr) -> (usize, quinn_proto::ConnectionHandle, quinn_proto::Connection) {
        let now = Instant::now();
        let (handle, mut conn) = self.endpoint.connect(now, self.config.clone(), target, tls::SERVER_NAME).unwrap();
        self.buf.clear();
        let transmit = conn.poll_transmit(now, 1, &mut self.buf).expect("a new connection sends its Initial");
        let socket = self.next % self.sockets.len();
        self.next += 1;
        // A full socket buffer loses the datagram, as a congested network would; the flood goes on.
        let _ = self.sockets[socket].send_to(&self.buf[..transmit.size], transmit.destination);
        (socket, handle, conn)
    }

    /// One Initial of a connection that will never complete; the connection's state is dropped at once.
    fn send_initial(&mut self, target: SocketAddr) {
        let (_, handle, _conn) = self.start(target);
        self.endpoint.handle_event(handle, quinn_proto::EndpointEvent::drained());
    }

    /// A handshake that passes address validation and then stalls: the Initial, the server's Retry answered with
    /// the token (from the same source port), then nothing. Each uses a socket of its own, so a server that
    /// answers with no Retry (no address validation) leaves it stalled after its first Initial. Returns once the
    /// server answered the last Initial sent (or did not within `wait`).
    fn stall_validated(&mut self, target: SocketAddr, wait: Duration) -> Stalled {
        let (socket, handle, mut conn) = self.start(target);
        let sock = &self.sockets[socket];
        sock.set_read_timeout(Some(wait)).unwrap();
        let mut datagram = vec![0u8; 65536];
        let mut retried = false;
        if let Ok((len, from)) = sock.recv_from(&mut datagram)
            && is_retry(&datagram[..len])
        {
            let now = Instant::now();
            let data = bytes::BytesMut::from(&datagram[..len]);
            if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, event)) =
                self.endpoint.handle(now, from, None, None, data, &mut self.buf)
            {
                conn.handle_event(event);
                self.buf.clear();
                if let Some(transmit) = conn.poll_transmit(now, 1, &mut self.buf) {
                    sock.send_to(&self.buf[..transmit.size], transmit.destination).unwrap();
                    retried = true;
                    // Wait for the server's first answer to the validated Initial: it has taken the handshake up
                    // (or refused it).
                    let _ = sock.recv_from(&mut datagram);
                }
            }
        }
        Stalled { _handle: handle, _conn: conn, retried }
    }
}

/// A stalled handshake (its state is kept so that it is not reused).
struct Stalled {
    _handle: quinn_proto::ConnectionHandle,
    _conn: quinn_proto::Connection,
    retried: bool,
}

/// A flood of Initials at `rate` per second to `target` from `ports` source ports, on a thread of its own, until
/// stopped.
struct Flood {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<(u64, Duration)>,
}

impl Flood {
    fn start(target: SocketAddr, rate: f64, ports: usize) -> Self {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut flooder = Flooder::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports);
            let start = Instant::now();
            let mut sent = 0u64;
            loop {
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                while sent < due {
                    flooder.send_initial(target);
                    sent += 1;
                }
                // The pacing tick, and the stop signal.
                match stopped.recv_timeout(Duration::from_millis(2)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            }
            (sent, start.elapsed())
        });
        Self { stop, thread }
    }

    /// Stops the flood; returns the Initials sent and for how long.
    fn stop(self) -> (u64, Duration) {
        let _ = self.stop.send(());
        self.thread.join().unwrap()
    }
}

// ---- data-plane nodes ----------------------------------------------------------------------------------------

struct MemSource(HashMap<ChunkId, Vec<u8>>);

impl ChunkSource for MemSource {
    fn decide(&self, _peer: PeerId, chunks: Vec<ChunkId>) -> BoxFuture<'static, Vec<Decision>> {
        futures::future::ready(vec![Decision::Serve; chunks.len()]).boxed()
    }

    fn read(&self, id: &ChunkId) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.0.get(id).cloned())
    }
}

struct Node {
    key: NodeKey,
    plane: DataPlane,
}

fn node_at(seed: u8, listen: &str, chunks: &[Vec<u8>], timeouts: StreamTimeouts) -> Node {
    let key = NodeKey::from_seed([seed; 32]).unwrap();
    let cfg = DataPlaneConfig {
        listen: listen.parse().unwrap(),
        upload_rate: None,
        allow: None,
        repo: RepoId::new("alpine").unwrap(),
        timeouts,
        sending_replies_max: None,
    };
    let source = MemSource(chunks.iter().map(|c| (ChunkId::of(c), c.clone())).collect());
    let plane = DataPlane::bind(&key, cfg, Arc::new(source)).unwrap();
    Node { key, plane }
}

async fn fetch(client: &Node, server: &Node, id: ChunkId) -> Result<(), FetchFailed> {
    let summary = client.plane.fetch(server.key.peer_id(), &[server.plane.local_addr()], vec![id], |_, _| {}).await?;
    assert_eq!(summary.chunks, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initials_of_handshakes_that_never_complete_take_no_handshake_slot() {
    let chunk = vec![7u8; 4000];
    let server = node_at(1, "127.0.0.1:0", std::slice::from_ref(&chunk), StreamTimeouts::default());
    let target = server.plane.local_addr();
    // Twice as many as the handshake table holds, all sent before the client's first packet, so the server takes
    // them up first.
    let flood = 2 * HANDSHAKES_MAX;
    tokio::task::spawn_blocking(move || {
        let mut flooder = Flooder::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 16);
        for _ in 0..flood {
            flooder.send_initial(target);
        }
    })
    .await
    .unwrap();
    let client = node_at(2, "127.0.0.1:0", &[], StreamTimeouts::default());
    fetch(&client, &server, ChunkId::of(&chunk)).await.expect("a flood of Initials kept a peer out");
    let refusals = server.plane.refusals();
    assert_eq!(refusals["too_many_connections"], 0, "{refusals:?}");
    // More Initials reached the server than its handshake table holds (a few may be lost on a loaded machine), and
    // each without a token got a Retry instead of a slot.
    assert!(refusals["unvalidated"] > HANDSHAKES_MAX as u64, "{refusals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_address_cannot_take_every_handshake_slot_and_a_refusal_is_not_unreachable() {
    let chunk = vec![9u8; 4000];
    let id = ChunkId::of(&chunk);
    let server = node_at(1, "127.0.0.1:0", std::slice::from_ref(&chunk), StreamTimeouts::default());
    let target = server.plane.local_addr();
    // As many validated, stalled handshakes from 127.0.0.1 as the whole table holds.
    let stalled = tokio::task::spawn_blocking(move || {
        let mut flooder = Flooder::new(IpAddr::V4(Ipv4Addr::LOCALHOST), HANDSHAKES_MAX);
        (0..HANDSHAKES_MAX).map(|_| flooder.stall_validated(target, Duration::from_secs(5))).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // Each answered a Retry (but for one whose packets a loaded machine lost), and all but the first
    // HANDSHAKES_PER_SOURCE_MAX of them were refused.
    let retried = stalled.iter().filter(|s| s.retried).count();
    assert!(retried > HANDSHAKES_PER_SOURCE_MAX, "{retried} stalled handshakes answered a Retry");
    let refusals = server.plane.refusals();
    let refused = retried - HANDSHAKES_PER_SOURCE_MAX;
    assert_eq!(refusals["too_many_handshakes_from_source"], refused as u64, "{refusals:?}");

    // A peer at the same address is refused (it retries, backing off, for its dial timeout), and the refusal says
    // so, not "unreachable".
    let timeouts = StreamTimeouts { dial: Duration::from_millis(500), ..StreamTimeouts::default() };
    let neighbour = node_at(2, "127.0.0.1:0", &[], timeouts);
    let err = fetch(&neighbour, &server, id).await.expect_err("the source's handshake slots are full");
    assert_eq!(err.kind, FetchFailure::HandshakeFailed, "a refused handshake is reported as: {err}");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    let retries = server.plane.refusals()["too_many_handshakes_from_source"] - refused as u64;
    assert!(retries >= 2, "the refused dialer retried: {retries} refusals");
    // Backing off from 50 ms within 500 ms: 50 + 100 + 200 ms of waits leave room for four dials at most.
    assert!(retries <= 4, "{retries} refusals within the dial timeout");

    // A peer at another address is served.
    let other = node_at(3, "127.0.0.2:0", &[], StreamTimeouts::default());
    fetch(&other, &server, id).await.expect("one source address kept another out");
    drop(stalled);
}

// ---- a mirror syncing from an origin through a flood ---------------------------------------------------------

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// Hard-links every file of `from` into `to` (the origin only reads its tree).
fn link_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            link_tree(&entry.path(), &target);
        } else {
            std::fs::hard_link(entry.path(), &target).unwrap();
        }
    }
}

/// Initials per second the flood sends (the defect was seen at 600); `FLOOD_RATE` overrides it.
const FLOOD_RATE: f64 = 1000.0;
/// Source ports the flood sends from.
const FLOOD_PORTS: usize = 64;

struct SyncRun {
    elapsed: Duration,
    bytes: u64,
    mirror: mirrormesh::status::Status,
    origin: mirrormesh::status::Status,
    /// Initials sent and over how long, if flooded.
    flood: Option<(u64, Duration)>,
}

/// An origin serving `template` and a fresh mirror: the time from starting the mirror until it holds the snapshot,
/// with the origin's data plane flooded meanwhile or not. Fails if the mirror takes longer than `wait`.
fn sync_once(template: &Path, flooded: bool, wait: Duration) -> anyhow::Result<SyncRun> {
    let dir = tempfile::tempdir()?;
    let opts = vec![NodeOptions::default(); 2];
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &opts)?;
    link_tree(template, &fabric.nodes[0].tree);
    fabric.start(0)?;
    let published = fabric.publish()?;
    let origin_data = SocketAddr::new(fabric.nodes[0].host.ip, fabric.nodes[0].data_port);
    let rate = std::env::var("FLOOD_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(FLOOD_RATE);
    let flood = flooded.then(|| Flood::start(origin_data, rate, FLOOD_PORTS));
    let t = Instant::now();
    fabric.start(1)?;
    let settled = fabric.client(1, wait + Duration::from_secs(5)).wait_settled(published.seq, wait.as_millis() as u64);
    let elapsed = t.elapsed();
    let flood = flood.map(Flood::stop);
    let mirror = settled?;
    fabric.check_identical(1)?;
    let origin = fabric.status(0)?;
    Ok(SyncRun { elapsed, bytes: published.changed_bytes, mirror, origin, flood })
}

fn counter(status: &mirrormesh::status::Status, name: &str) -> u64 {
    status.counters.get(name).copied().unwrap_or(0)
}

#[test]
fn a_fresh_mirror_syncs_through_a_handshake_flood() {
    let runs: usize = std::env::var("FLOOD_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    let template = tempfile::tempdir().unwrap();
    let generated = gentree::generate(&GenTreeArgs {
        out: template.path().to_owned(),
        fraction: 0.12,
        seed: 17,
        ..Default::default()
    })
    .unwrap();
    assert!(generated.bytes >= 150 << 20, "a few hundred MiB: {} bytes", generated.bytes);
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let quiet = sync_once(template.path(), false, Duration::from_secs(120)).unwrap();
        // The flooded sync may take at most three times as long, plus time for a loaded machine.
        let bound = quiet.elapsed * 3 + Duration::from_secs(10);
        let flooded = sync_once(template.path(), true, bound).unwrap();
        let (initials, flood_time) = flooded.flood.unwrap();
        let rate = initials as f64 / flood_time.as_secs_f64();
        let ratio = flooded.elapsed.as_secs_f64() / quiet.elapsed.as_secs_f64();
        println!(
            "run {run}: {:.1} MiB to a fresh mirror in {:.2?} quiet, {:.2?} under a flood of {rate:.0} Initials/s \
             ({initials} in all): {ratio:.2} x; origin data plane: {} Retries, {} handshakes refused",
            flooded.bytes as f64 / f64::from(1 << 20),
            quiet.elapsed,
            flooded.elapsed,
            counter(&flooded.origin, "data_refused_unvalidated"),
            counter(&flooded.origin, "data_refused_too_many_connections"),
        );
        assert!(rate >= 600.0, "the flood sent only {rate:.0} Initials/s");
        for name in ["peers_unreachable", "chunk_requests_failed"] {
            assert_eq!(counter(&flooded.mirror, name), 0, "{name}: {:?}", flooded.mirror.counters);
        }
        assert!(counter(&flooded.origin, "data_refused_unvalidated") >= initials / 2, "{:?}", flooded.origin.counters);
        ratios.push(ratio);
    }
    if runs > 1 {
        ratios.sort_by(f64::total_cmp);
        println!(
            "flood / quiet over {runs} runs: min {:.2}, median {:.2}, max {:.2}",
            ratios[0],
            ratios[runs / 2],
            ratios[runs - 1]
        );
    }
}

// ---- the control plane's connection limits -------------------------------------------------------------------

/// A libp2p node with no behaviour and no limits, to dial others.
fn dialer() -> Swarm<libp2p::swarm::dummy::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build()
}

/// Starts `swarm` listening on loopback and returns its address.
async fn listen<B: libp2p::swarm::NetworkBehaviour>(swarm: &mut Swarm<B>) -> Multiaddr {
    swarm.listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()).unwrap();
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            return address;
        }
    }
}

/// The limit a denied incoming connection exceeded, if it was one of libp2p's connection limits.
fn exceeded<E>(event: &SwarmEvent<E>) -> Option<String> {
    match event {
        SwarmEvent::IncomingConnectionError { error: ListenError::Denied { cause }, .. } => {
            cause.downcast_ref::<connection_limits::Exceeded>().map(ToString::to_string)
        }
        _ => None,
    }
}

const SWARM_WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_connections_per_peer_are_capped() {
    let key = NodeKey::from_seed([1; 32]).unwrap();
    let mut node = mirrormesh::swarm::build(&key, false).unwrap();
    let addr = listen(&mut node).await;
    let mut peer = dialer();
    let cap = CONTROL_CONNECTIONS_PER_PEER_MAX as usize;
    for _ in 0..=cap {
        let opts = DialOpts::peer_id(key.peer_id()).condition(PeerCondition::Always).addresses(vec![addr.clone()]);
        peer.dial(opts.build()).unwrap();
    }
    let peer_id = *peer.local_peer_id();
    let (mut established, mut denied) = (0, Vec::new());
    tokio::time::timeout(SWARM_WAIT, async {
        while established + denied.len() <= cap {
            tokio::select! {
                event = node.select_next_some() => {
                    if let Some(limit) = exceeded(&event) {
                        denied.push(limit);
                    } else if let SwarmEvent::ConnectionEstablished { peer_id: from, .. } = event {
                        established += usize::from(from == peer_id);
                    }
                }
                _ = peer.select_next_some() => {}
            }
        }
    })
    .await
    .expect("every dial was answered");
    assert_eq!(established, cap, "denied: {denied:?}");
    assert_eq!(denied.len(), 1);
    assert!(denied[0].contains("per peer"), "{}", denied[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_incoming_control_connections_are_capped() {
    let key = NodeKey::from_seed([1; 32]).unwrap();
    let mut node = mirrormesh::swarm::build(&key, false).unwrap();
    let addr = listen(&mut node).await;
    let port = addr
        .iter()
        .find_map(|p| if let libp2p::multiaddr::Protocol::Udp(port) = p { Some(port) } else { None })
        .unwrap();
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // Four times the cap of handshakes that never complete (so that enough arrive even if a loaded machine loses
    // some).
    let flood = 4 * CONTROL_PENDING_INCOMING_MAX as usize;
    let mut flooder = Flooder::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 16);
    for _ in 0..flood {
        flooder.send_initial(target);
    }
    let (mut denied, mut failed) = (Vec::new(), 0);
    tokio::time::timeout(SWARM_WAIT, async {
        while denied.is_empty() && failed < flood {
            let event = node.select_next_some().await;
            if let Some(limit) = exceeded(&event) {
                denied.push(limit);
            } else if let SwarmEvent::IncomingConnectionError { .. } = event {
                failed += 1;
            }
        }
    })
    .await
    .expect("the flooded handshakes ended");
    assert!(!denied.is_empty(), "no pending connection was denied ({failed} timed out)");
    assert!(denied[0].contains("pending incoming"), "{}", denied[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_incoming_control_connections_are_capped() {
    let key = NodeKey::from_seed([1; 32]).unwrap();
    let caps = ConnectionCaps { established_incoming: 3, ..ConnectionCaps::default() };
    let mut node = mirrormesh::swarm::build_with(&key, false, caps).unwrap();
    let addr = listen(&mut node).await;
    // One more peer than the cap, each dialing once.
    let mut peers: Vec<_> = (0..=caps.established_incoming).map(|_| dialer()).collect();
    for peer in &mut peers {
        peer.dial(addr.clone()).unwrap();
    }
    let mut peers = futures::stream::select_all(peers);
    let (mut established, mut denied) = (0, Vec::new());
    tokio::time::timeout(SWARM_WAIT, async {
        while established + denied.len() <= caps.established_incoming as usize {
            tokio::select! {
                event = node.select_next_some() => {
                    if let Some(limit) = exceeded(&event) {
                        denied.push(limit);
                    } else if let SwarmEvent::ConnectionEstablished { .. } = event {
                        established += 1;
                    }
                }
                _ = peers.select_next_some() => {}
            }
        }
    })
    .await
    .expect("every dial was answered");
    assert_eq!(established, caps.established_incoming as usize, "denied: {denied:?}");
    assert_eq!(denied.len(), 1);
    assert!(denied[0].contains("established incoming"), "{}", denied[0]);
}
