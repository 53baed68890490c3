//! The control plane on libp2p (QUIC): node identity, gossip of signed roots (gossipsub, one topic per repository),
//! identify, and the request-response protocol `/mirrormesh/control/1` carrying the core's control messages
//! (hello, have, manifest node and delta fetches) in the project's bounded wire encoding. libp2p's connection limits
//! bound connections per peer, handshakes in progress and incoming connections ([`ConnectionCaps`]).

use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, Swarm, connection_limits, gossipsub, identify, request_response};
use mirrormesh_proto::control::{
    CONTROL_REQUEST_BYTES_MAX, CONTROL_RESPONSE_BYTES_MAX, ControlRequest, ControlResponse,
};

use crate::key::NodeKey;

/// Protocol name of control requests.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/mirrormesh/control/1");
/// How long a control request may take before it fails (the core's [`CONTROL_TIMEOUT_MS`], which its rule about
/// timeouts uses).
///
/// [`CONTROL_TIMEOUT_MS`]: mirrormesh_proto::links::CONTROL_TIMEOUT_MS
pub const CONTROL_TIMEOUT: Duration = Duration::from_millis(mirrormesh_proto::links::CONTROL_TIMEOUT_MS);
/// Control streams open at once per connection.
pub const CONTROL_STREAMS_MAX: usize = 64;
/// Largest gossip message (an encoded signed root is at most 1 KiB).
pub const GOSSIP_BYTES_MAX: usize = 4096;
/// An idle connection stays open this long (peers keep each other for gossip and anti-entropy).
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// A QUIC connection that heard nothing for this long pings its peer (libp2p's default, 5 s, costs an idle fabric
/// about 12 kB per node and minute). Under Linux conntrack's 120 s timeout for an established UDP flow, so a stateful
/// firewall in front of a mirror keeps the connection; an idle connection costs one ping and its acknowledgement
/// per interval (either end's timer restarts on every packet it receives).
pub const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(100);
/// A QUIC connection that hears nothing for this long is dead: three keep-alives missed. (While chunks or control
/// requests are in flight, their own timeouts notice a dead peer sooner.)
pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often identify re-sends this node's description to a connected peer (libp2p's default is 5 minutes; the
/// description does not change while the daemon runs).
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(3600);
/// Most established connections with one peer, both directions together. A node keeps one connection per peer, but
/// holds two while it reconnects (the old one not yet noticed dead) and two more when both ends dial each other at
/// once; a fifth is refused.
pub const CONTROL_CONNECTIONS_PER_PEER_MAX: u32 = 4;
/// Most incoming connections still in their handshake. libp2p's QUIC transport starts a handshake for every Initial
/// packet (it has no address validation), and one that never completes is dropped after its handshake timeout
/// (5 s), so this bounds the memory and CPU a flood of Initials can take; honest dialers complete in a few round
/// trips, so 128 lets a fabric's 64 mirrors (`tests/reliability.rs`) all dial at once, twice over.
pub const CONTROL_PENDING_INCOMING_MAX: u32 = 128;
/// Most established incoming connections in all. A fabric is tens to hundreds of nodes, each dialing a node at most
/// a few times at once; this leaves room for that and bounds what a crowd of identities can take.
pub const CONTROL_INCOMING_MAX: u32 = 1024;

/// The control plane's connection limits (the defaults are the named constants; tests use smaller ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// See [`CONTROL_CONNECTIONS_PER_PEER_MAX`].
    pub per_peer: u32,
    /// See [`CONTROL_PENDING_INCOMING_MAX`].
    pub pending_incoming: u32,
    /// See [`CONTROL_INCOMING_MAX`].
    pub established_incoming: u32,
}

impl Default for ConnectionCaps {
    fn default() -> Self {
        Self {
            per_peer: CONTROL_CONNECTIONS_PER_PEER_MAX,
            pending_incoming: CONTROL_PENDING_INCOMING_MAX,
            established_incoming: CONTROL_INCOMING_MAX,
        }
    }
}

impl ConnectionCaps {
    fn limits(self) -> connection_limits::ConnectionLimits {
        connection_limits::ConnectionLimits::default()
            .with_max_established_per_peer(Some(self.per_peer))
            .with_max_pending_incoming(Some(self.pending_incoming))
            .with_max_established_incoming(Some(self.established_incoming))
    }
}

/// Gossipsub's peer scoring for the roots topic. Roots are rare (one per publish), so only what a peer does wrong
/// counts: an invalid root (undecodable, badly signed, from an untrusted publisher) costs
/// [`INVALID_ROOT_WEIGHT`] times the square of such roots (decaying), so one puts a peer below the gossip threshold
/// and two below the graylist, where its gossip is ignored. Peers are not scored for delivering few messages, and
/// not for sharing an IP address (mirrors behind one NAT, fabrics on one host).
pub fn root_topic_scoring(
    topic: &gossipsub::IdentTopic,
) -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic_params = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_ROOT_WEIGHT,
        invalid_message_deliveries_decay: INVALID_ROOT_DECAY,
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams { ip_colocation_factor_weight: 0.0, ..Default::default() };
    params.topics.insert(topic.hash(), topic_params);
    (params, gossipsub::PeerScoreThresholds::default())
}

/// Score per invalid root squared (the default thresholds: gossip -10, publish -50, graylist -80).
pub const INVALID_ROOT_WEIGHT: f64 = -50.0;
/// Kept of the invalid-root count per decay interval (1 s): about a minute to fall back above the graylist.
pub const INVALID_ROOT_DECAY: f64 = 0.97;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Refuses connections over [`ConnectionCaps`] (first, so that no other behaviour sets up state for them).
    pub limits: connection_limits::Behaviour,
    pub gossipsub: gossipsub::Behaviour,
    pub identify: identify::Behaviour,
    pub control: request_response::Behaviour<ControlCodec>,
}

/// A control request as read from a peer: decoded, or malformed (with why), which the node counts, never answers,
/// and bans the peer for when it repeats.
#[derive(Debug)]
pub enum WireRequest {
    Valid(ControlRequest),
    Malformed(String),
}

impl From<ControlRequest> for WireRequest {
    fn from(request: ControlRequest) -> Self {
        WireRequest::Valid(request)
    }
}

/// Frames control messages as a 4-byte big-endian length and the wire encoding, refusing oversized frames before
/// reading them.
#[derive(Clone, Default)]
pub struct ControlCodec {
    /// Fault injection (`faults.malformed_control`): write requests malformed.
    malformed: bool,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("control frame of {len} bytes, limit {max}")));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

/// Fault injection: a hello announces a frame far over the limit, any other request arrives with its bytes
/// inverted (undecodable).
async fn write_malformed<T: AsyncWrite + Unpin + Send>(io: &mut T, request: &ControlRequest) -> io::Result<()> {
    if matches!(request, ControlRequest::Hello(_)) {
        io.write_all(&u32::MAX.to_be_bytes()).await?;
        io.write_all(&[0u8; 64]).await?;
        return io.close().await;
    }
    let garbage: Vec<u8> = request.encode().iter().map(|b| !b).collect();
    write_frame(io, &garbage).await
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl request_response::Codec for ControlCodec {
    type Protocol = StreamProtocol;
    type Request = WireRequest;
    type Response = ControlResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<WireRequest> {
        let bytes = match read_frame(io, CONTROL_REQUEST_BYTES_MAX).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return Ok(WireRequest::Malformed(e.to_string())),
            Err(e) => return Err(e),
        };
        Ok(match ControlRequest::decode(&bytes) {
            Ok(request) => WireRequest::Valid(request),
            Err(e) => WireRequest::Malformed(format!("undecodable control request: {e}")),
        })
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ControlResponse> {
        let bytes = read_frame(io, CONTROL_RESPONSE_BYTES_MAX).await?;
        ControlResponse::decode(&bytes).map_err(invalid)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: WireRequest,
    ) -> io::Result<()> {
        match request {
            WireRequest::Valid(request) if self.malformed => write_malformed(io, &request).await,
            WireRequest::Valid(request) => write_frame(io, &request.encode()).await,
            WireRequest::Malformed(_) => write_frame(io, b"malformed").await,
        }
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: ControlResponse,
    ) -> io::Result<()> {
        write_frame(io, &response.encode()).await
    }
}

/// Builds the swarm for `key` (not yet listening) with the default [`ConnectionCaps`]. `malformed_control` is fault
/// injection for tests: every control request this node sends is malformed.
pub fn build(key: &NodeKey, malformed_control: bool) -> anyhow::Result<Swarm<Behaviour>> {
    build_with(key, malformed_control, ConnectionCaps::default())
}

/// [`build`] with the given connection limits.
pub fn build_with(key: &NodeKey, malformed_control: bool, caps: ConnectionCaps) -> anyhow::Result<Swarm<Behaviour>> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key.keypair().clone())
        .with_tokio()
        .with_quic_config(|mut quic| {
            quic.keep_alive_interval = QUIC_KEEP_ALIVE;
            quic.max_idle_timeout = QUIC_IDLE_TIMEOUT.as_millis() as u32;
            quic
        })
        .with_behaviour(|keypair| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .max_transmit_size(GOSSIP_BYTES_MAX)
                .validation_mode(gossipsub::ValidationMode::Strict)
                // A root is forwarded only once the node has checked it (`report_message_validation_result`).
                .validate_messages()
                // Identical roots are one message however many peers forward them.
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
                })
                .build()
                .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
            let gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(keypair.clone()), gossip_config)
                    .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
            let identify = identify::Behaviour::new(
                identify::Config::new("/mirrormesh/1".into(), keypair.public()).with_interval(IDENTIFY_INTERVAL),
            );
            let control = request_response::Behaviour::with_codec(
                ControlCodec { malformed: malformed_control },
                [(CONTROL_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(CONTROL_TIMEOUT)
                    .with_max_concurrent_streams(CONTROL_STREAMS_MAX),
            );
            let limits = connection_limits::Behaviour::new(caps.limits());
            Ok(Behaviour { limits, gossipsub, identify, control })
        })
        .map_err(|e| anyhow::anyhow!("building the libp2p behaviour: {e}"))?
        // Every control request opens a stream; with multistream-select's plain V1 the dialer waits for the
        // protocol's confirmation before sending, so each request cost two round trips (a mirror's first manifest
        // took about 12 round trips of 100 ms, `testbed sync --rtt-ms 100`). Lazy: the one protocol a stream is
        // opened for is proposed together with the request (every node speaks every protocol here).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}
