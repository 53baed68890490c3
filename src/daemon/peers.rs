//! The peer manager: the node's control-plane connections, which peers it dials and when, the fabric's membership
//! and its persistence, the peer exchange, and what the node knows of each connected peer (addresses, round trip,
//! delivery rate). The policy (which addresses to accept, whom to keep connected, when to forget a member) is the
//! core's `mirrormesh_proto::membership`; this module carries it out. The daemon's event loop owns one [`Peers`],
//! hands it the swarm's connection events and the `Members` messages, and feeds the engine the connections and
//! disconnections it reports.
//!
//! - **Dialing**: every tick, each member the mesh rule wants and that is not connected is dialed (at its
//!   configured bootstrap address and the addresses it advertised), at most [`DIALS_PER_TICK_MAX`] at once, then
//!   again after a back-off from [`REDIAL_MIN`] doubling to [`REDIAL_MAX`] (reset once connected).
//! - **Exchange**: the dialer of a new connection sends `Members` (where it listens, the members it knows) and gets
//!   the other side's list in the answer, and asks again [`MEMBERS_EXCHANGE_AGAIN`] later (nodes that start together
//!   ask the origin before it has heard where the others listen); after that one connected peer in turn, when the
//!   core's `membership::Exchanges` says: 30 s after news (a member this node did not know), then backing off to
//!   ten minutes while nothing new is learnt. A peer asking more often than [`MEMBERS_ANSWER_INTERVAL_MIN`] is refused.
//! - **Persistence**: changed members are written to the state database every [`MEMBERS_PERSIST_INTERVAL`] and at
//!   shutdown, so a restarted node (the origin too, which has no bootstrap list) redials the fabric at once.
//! - **Mesh**: a mirror closes a connection it dialed to a peer the mesh rule no longer wants (it learned that the
//!   fabric is larger than the full-mesh limit): at once if no chunk ever crossed it either way and it is
//!   [`MESH_PRUNE_UNUSED`] old (mirrors starting together first connect to every mirror the origin knew of then),
//!   else only while no sync runs here and once no chunk has crossed it for [`MESH_PRUNE_IDLE`] (the peer may still
//!   be syncing from this node).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Result;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm};
use mirrormesh_proto::RepoId;
use mirrormesh_proto::control::{ControlRequest, ControlResponse, MEMBERS_PER_MESSAGE_MAX, MemberEntry, Members};
use mirrormesh_proto::membership::{
    AddrScope, Exchanges, Learned, MEMBERS_MAX, MemberRecord, Membership, MembershipConfig, MeshRule, Report,
    check_addrs,
};
use mirrormesh_proto::{Mono, Timestamp};
use serde_bytes::ByteBuf;

use super::duplicate_key::DuplicateKeys;
use crate::config::{Config, RoleName};
use crate::dataplane::DataPlane;
use crate::publish::now;
use crate::store::StateStore;
use crate::swarm::Behaviour;

/// Redial back-off bounds.
pub const REDIAL_MIN: Duration = Duration::from_secs(1);
pub const REDIAL_MAX: Duration = Duration::from_secs(30);
/// New dials started per tick (50 ms): an origin restarted with 1,000 members reaches them all within 7 s without
/// a thousand handshakes at once.
pub const DIALS_PER_TICK_MAX: usize = 8;
/// The dialer of a new connection asks again this long after the first exchange: mirrors that start together all ask
/// the origin at once, before it has heard where the others listen; a second answer names them.
pub const MEMBERS_EXCHANGE_AGAIN: Duration = Duration::from_secs(2);
/// A peer's `Members` requests are answered at most this often (an honest node asks a peer on connecting, again
/// `MEMBERS_EXCHANGE_AGAIN` later, and then one peer at a time at least `membership::MEMBERS_POLL_FIRST_MS` apart).
pub const MEMBERS_ANSWER_INTERVAL_MIN: Duration = Duration::from_millis(500);
/// Changed members are written to the state database this often (a crash loses at most this much).
pub const MEMBERS_PERSIST_INTERVAL: Duration = Duration::from_secs(5);
/// Connected members are recorded as seen this often (so a node killed after a long uptime does not forget them).
pub const MEMBERS_TOUCH_INTERVAL: Duration = Duration::from_secs(3600);
/// How often members are checked against the forget time.
pub const MEMBERS_EXPIRE_INTERVAL: Duration = Duration::from_secs(60);
/// A connection the mesh rule no longer wants is closed only once it is this old and no chunk crossed it either way
/// for this long: closing one a peer still fetches from cuts its requests (64 mirrors on loopback: a mirror done
/// with a sync closed connections that mirrors still syncing used, 383 requests failed and the origin sent 1.5 x).
pub const MESH_PRUNE_IDLE: Duration = Duration::from_secs(60);
/// An unwanted connection that never carried a chunk is closed once it is this old (its members exchange is done).
/// 64 mirrors started together on loopback kept about 10 such connections each through their first syncs (a mean
/// of 34 peers instead of 24) when only idle connections were closed.
pub const MESH_PRUNE_UNUSED: Duration = Duration::from_secs(5);

/// What the node knows of a connected peer.
#[derive(Default)]
pub struct PeerState {
    pub address: Option<Multiaddr>,
    pub data_addrs: Vec<SocketAddr>,
    pub connected_since_ms: u64,
    /// Round trip, milliseconds: the smallest QUIC measured on the data-plane connection, else a hello's or have's
    /// time, smoothed.
    pub rtt_ms: Option<f64>,
    /// `rtt_ms` is QUIC's measurement.
    rtt_measured: bool,
    /// Chunk delivery rate to this node, bytes per second, smoothed over requests.
    pub rate: Option<f64>,
}

/// Weight of a new sample in the smoothed RTT and delivery rate.
const SMOOTHING: f64 = 0.3;

pub fn smooth(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |o| (1.0 - SMOOTHING) * o + SMOOTHING * sample))
}

/// When a peer is dialed next.
struct Redial {
    next: Instant,
    backoff: Duration,
}

/// One open connection.
struct Conn {
    id: ConnectionId,
    inbound: bool,
    addr: Multiaddr,
    since: Instant,
}

/// What a new connection means for the engine.
#[derive(Debug, PartialEq, Eq)]
pub enum Established {
    /// Refused (not allowed, banned) and being closed.
    Refused,
    /// The peer's first connection: it is connected now.
    First,
    /// The peer reconnected and its earlier connections were closed: greet it afresh.
    Replaced,
    /// Another connection to a connected peer.
    Another,
}

pub struct Peers {
    me: PeerId,
    repo: RepoId,
    role: RoleName,
    membership: Membership<PeerId>,
    /// `network.bootstrap`: where each bootstrap peer is dialed.
    bootstrap: BTreeMap<PeerId, Multiaddr>,
    /// Back-off of each wanted peer (bounded by the membership table).
    dials: BTreeMap<PeerId, Redial>,
    states: BTreeMap<PeerId, PeerState>,
    /// Open connections of each peer (bounded by libp2p's per-peer limit).
    connections: HashMap<PeerId, Vec<Conn>>,
    /// Peers whose connections keep replacing each other from different addresses (two nodes, one key).
    duplicate_keys: DuplicateKeys,
    /// Where this node's control plane listens, as it tells peers.
    listen: Vec<SocketAddr>,
    data: DataPlane,
    /// Fault injection: flood every peer's data plane.
    #[cfg(feature = "faults")]
    flood: bool,
    #[cfg(feature = "faults")]
    flooding: BTreeSet<PeerId>,
    /// `Members` requests in flight, and to whom (at most one per connected peer).
    requests: HashMap<OutboundRequestId, PeerId>,
    /// Second exchanges due with peers this node just dialed.
    again: Vec<(Instant, PeerId)>,
    /// When to ask the next connected peer for its members (the core's rule).
    exchanges: Exchanges,
    /// The instant the exchange's monotonic clock counts from.
    epoch: Instant,
    /// The peer asked last by the periodic exchange.
    exchange_cursor: Option<PeerId>,
    /// When each connected peer's `Members` request was last answered.
    answered: HashMap<PeerId, Instant>,
    /// Chunk bytes that crossed each connected peer's data plane either way, and when that total last changed.
    activity: HashMap<PeerId, (u64, Instant)>,
    next_persist: Instant,
    next_touch: Instant,
    next_expire: Instant,
    next_prune: Instant,
    /// See [`Peers::take_soon`].
    soon: bool,
    counters: BTreeMap<String, u64>,
}

fn peer_key(p: &PeerId) -> Vec<u8> {
    p.to_bytes()
}

pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

fn udp_port_of(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Udp(port) => Some(port),
        _ => None,
    })
}

/// The control-plane address of a member: QUIC v1 over UDP at `addr`, ending in its id.
fn multiaddr_of(addr: SocketAddr, peer: PeerId) -> Multiaddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty().with(ip).with(Protocol::Udp(addr.port())).with(Protocol::QuicV1).with(Protocol::P2p(peer))
}

impl Peers {
    /// The peer manager of a node started with `cfg`, listening at `listen_addrs`, with the members it persisted.
    pub fn new(
        cfg: &Config,
        me: PeerId,
        store: &StateStore,
        data: DataPlane,
        listen_addrs: &[Multiaddr],
    ) -> Result<Self> {
        let mut counters = BTreeMap::new();
        let own: Vec<IpAddr> = ip_of(&cfg.listen).into_iter().chain([cfg.data_listen.ip()]).collect();
        let origins: BTreeSet<PeerId> = match cfg.role {
            RoleName::Origin => BTreeSet::new(),
            RoleName::Mirror => cfg.publishers.iter().map(|(_, p)| *p).collect(),
        };
        let membership_cfg = MembershipConfig {
            me,
            origin: cfg.role == RoleName::Origin,
            origins,
            scope: AddrScope::of(&own),
            allow: cfg.allow.clone(),
            forget_after_ms: cfg.forget_after.as_millis() as u64,
            members_max: MEMBERS_MAX,
            mesh: MeshRule::default(),
            key: peer_key,
        };
        let stored = store.reader()?.members()?;
        let mut members = Vec::with_capacity(stored.members.len());
        let mut bad_ids = stored.unreadable;
        for (id, member) in stored.members {
            match PeerId::from_bytes(&id) {
                Ok(peer) => members.push((peer, member)),
                Err(_) => bad_ids += 1,
            }
        }
        if bad_ids > 0 {
            tracing::warn!(records = bad_ids, "state database: unreadable member records skipped");
            counters.insert("members_unreadable".into(), bad_ids as u64);
        }
        let loaded = members.len();
        let membership = Membership::new(membership_cfg, members);
        if loaded > 0 {
            tracing::info!(members = membership.len(), "members of the fabric known from the last run");
        }
        // What peers are told: the configured ip (an unspecified one means "the ip you see me at") and the port
        // bound.
        let port = match udp_port_of(&cfg.listen) {
            Some(0) | None => listen_addrs.iter().find_map(udp_port_of).unwrap_or(0),
            Some(port) => port,
        };
        let listen = ip_of(&cfg.listen).map(|ip| SocketAddr::new(ip, port)).into_iter().collect();
        let at = Instant::now();
        let mut peers = Peers {
            me,
            repo: cfg.repo.clone(),
            role: cfg.role,
            membership,
            bootstrap: BTreeMap::new(),
            dials: BTreeMap::new(),
            states: BTreeMap::new(),
            connections: HashMap::new(),
            duplicate_keys: DuplicateKeys::default(),
            listen,
            data,
            #[cfg(feature = "faults")]
            flood: cfg.faults.flood_data_plane,
            #[cfg(feature = "faults")]
            flooding: BTreeSet::new(),
            requests: HashMap::new(),
            again: Vec::new(),
            exchanges: Exchanges::new(Mono(0)),
            epoch: at,
            exchange_cursor: None,
            answered: HashMap::new(),
            activity: HashMap::new(),
            next_persist: at,
            next_touch: at + MEMBERS_TOUCH_INTERVAL,
            next_expire: at,
            next_prune: at,
            soon: false,
            counters,
        };
        peers.set_bootstrap(&cfg.bootstrap);
        Ok(peers)
    }

    fn count(&mut self, what: impl Into<String>) {
        self.count_n(what, 1);
    }

    fn count_n(&mut self, what: impl Into<String>, n: u64) {
        if n > 0 {
            *self.counters.entry(what.into()).or_default() += n;
        }
    }

    /// What the peer manager counted (merged into the node's counters).
    pub fn counters(&self) -> &BTreeMap<String, u64> {
        &self.counters
    }

    fn count_report(&mut self, report: &Report<PeerId>) {
        for why in &report.rejected {
            self.count(format!("addrs_rejected_{}", why.name()));
        }
        self.count_n("members_not_allowed", report.not_allowed as u64);
        self.count_n("members_dropped_full", report.full as u64);
        self.count_n("members_without_addrs", report.without_addrs as u64);
        self.count_n("members_learned", report.new.len() as u64);
        for peer in &report.new {
            tracing::debug!(%peer, "new member of the fabric");
        }
    }

    // ---- what the rest of the daemon reads ----------------------------------------------------------------

    pub fn state(&self, peer: &PeerId) -> Option<&PeerState> {
        self.states.get(peer)
    }

    pub fn state_mut(&mut self, peer: &PeerId) -> Option<&mut PeerState> {
        self.states.get_mut(peer)
    }

    /// Connected peers, in id order.
    pub fn states(&self) -> impl Iterator<Item = (&PeerId, &PeerState)> {
        self.states.iter()
    }

    /// How a member was learned (`bootstrap`, `exchange`, `inbound`).
    pub fn learned(&self, peer: &PeerId) -> Option<Learned> {
        self.membership.get(peer).map(|m| m.learned)
    }

    /// The members this node knows (itself not included), for the dashboard's fabric view.
    pub fn members(&self) -> Vec<crate::history::MemberInfo> {
        let origins = &self.membership.config().origins;
        self.membership
            .iter()
            .map(|(id, m)| crate::history::MemberInfo {
                id: id.to_string(),
                origin: origins.contains(id),
                learned: m.learned.name(),
                last_seen_ms: m.last_seen.0,
            })
            .collect()
    }

    /// Nodes of the fabric this node knows, itself included.
    pub fn fabric_size(&self) -> usize {
        self.membership.len() + 1
    }

    /// Whether `peer` has a connection open beside `connection`.
    pub fn has_other_connection(&self, peer: &PeerId, connection: ConnectionId) -> bool {
        self.connections.get(peer).is_some_and(|c| c.iter().any(|conn| conn.id != connection))
    }

    // ---- configuration --------------------------------------------------------------------------------------

    /// Replaces the bootstrap list: its peers become members learned from it and are dialed like every wanted
    /// member (those newly listed at once); peers dropped from the list stay members.
    pub fn set_bootstrap(&mut self, list: &[(PeerId, Multiaddr)]) {
        self.bootstrap = list.iter().filter(|(p, _)| *p != self.me).cloned().collect();
        let report = self.membership.set_bootstrap(now(), self.bootstrap.keys().copied());
        self.count_report(&report);
    }

    /// Applies a reloaded configuration's bootstrap list, allow list and forget time. Peers no longer allowed are
    /// forgotten and disconnected; with a new allow list, every connected peer is asked for its members at once, so
    /// a newly allowed node is found in a round trip.
    pub fn reload(&mut self, swarm: &mut Swarm<Behaviour>, old: &Config, new: &Config) {
        self.set_bootstrap(&new.bootstrap);
        self.membership.set_forget_after(new.forget_after.as_millis() as u64);
        if new.allow == old.allow {
            return;
        }
        self.data.set_allow(new.allow.clone());
        for peer in self.membership.set_allow(new.allow.clone()) {
            tracing::info!(%peer, "member no longer in network.allow; forgotten");
            self.dials.remove(&peer);
        }
        let refused: Vec<PeerId> = swarm
            .connected_peers()
            .filter(|p| new.allow.as_ref().is_some_and(|allow| !allow.contains(p)))
            .copied()
            .collect();
        for peer in refused {
            tracing::warn!(%peer, "peer no longer in network.allow; disconnecting");
            let _ = swarm.disconnect_peer_id(peer);
        }
        let connected: Vec<PeerId> = self.states.keys().copied().collect();
        for peer in connected {
            self.ask_members(swarm, peer);
        }
    }

    // ---- connections ----------------------------------------------------------------------------------------

    /// A connection was established. `banned`: the engine bans this peer (its connections are refused).
    pub fn on_established(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        connection: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
        banned: bool,
    ) -> Established {
        if let Some(allow) = &self.membership.config().allow
            && !allow.contains(&peer)
        {
            tracing::warn!(%peer, "peer not in network.allow; disconnecting");
            self.count("peers_refused_not_allowed");
            let _ = swarm.disconnect_peer_id(peer);
            return Established::Refused;
        }
        if banned {
            tracing::debug!(%peer, "refusing a connection from a banned peer");
            self.count("connections_refused_banned");
            let _ = swarm.close_connection(connection);
            return Established::Refused;
        }
        let inbound = endpoint.is_listener();
        let remote = endpoint.get_remote_address().clone();
        let mut outcome = if num_established == 1 { Established::First } else { Established::Another };
        let connections = self.connections.entry(peer).or_default();
        if inbound && num_established > 1 {
            // The peer dialed again: it restarted or lost its network, so the connections it dialed before, and
            // the ones this node dialed unless both ends dialed at once, are dead (they would swallow requests
            // until a timeout). Close them and greet it afresh.
            let at = Instant::now();
            let base = connections.iter().map(|c| c.since).min().unwrap_or(at);
            let mono = |t: Instant| Mono(t.duration_since(base).as_millis() as u64);
            let existing: Vec<(ConnectionId, bool, Mono)> =
                connections.iter().map(|c| (c.id, c.inbound, mono(c.since))).collect();
            let replaced = mirrormesh_proto::links::replaced_by(&existing, inbound, mono(at));
            // Where the replaced connections came from: only those the peer dialed say where it runs (the ones this
            // node dialed name the address it dialed, written differently).
            let stale: Vec<(ConnectionId, Option<Multiaddr>)> = connections
                .iter()
                .filter(|c| replaced.contains(&c.id))
                .map(|c| (c.id, c.inbound.then(|| c.addr.clone())))
                .collect();
            if !stale.is_empty() {
                connections.retain(|c| !stale.iter().any(|(s, _)| *s == c.id));
                tracing::info!(stale = stale.len(), "peer reconnected; closing its earlier connections");
                self.count("connections_replaced");
                let old: Vec<Multiaddr> = stale.iter().filter_map(|(_, a)| a.clone()).collect();
                if !old.is_empty()
                    && let Some(addrs) = self.duplicate_keys.replaced(Instant::now(), peer, &old, &remote)
                {
                    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        %peer,
                        "two nodes seem to use the same key: {peer} keeps connecting from {} in turn; every node \
                         needs its own key (mirrormesh keygen)",
                        addrs.join(" and ")
                    );
                    self.count("peers_duplicate_key");
                }
                for (id, _) in stale {
                    swarm.close_connection(id);
                }
                outcome = Established::Replaced;
            }
        }
        self.connections.entry(peer).or_default().push(Conn {
            id: connection,
            inbound,
            addr: remote.clone(),
            since: Instant::now(),
        });
        let state = self.states.entry(peer).or_default();
        state.address = Some(remote.clone());
        if outcome == Established::First {
            // A peer connecting afresh may be a restarted process: a cached data-plane connection to its old one
            // would swallow requests until its idle timeout.
            self.data.forget(&peer);
            state.connected_since_ms = now().0;
            // Logged under the daemon's target, as before this module existed: operators and tests follow it.
            tracing::info!(target: "mirrormesh::daemon", addr = %remote, "connected");
            if let Some(dial) = self.dials.get_mut(&peer) {
                dial.backoff = REDIAL_MIN;
            }
            let report = self.membership.on_connected(now(), peer);
            self.count_report(&report);
            if !report.new.is_empty() {
                self.exchanges.news(self.mono(Instant::now()));
            }
            if !inbound {
                self.ask_members(swarm, peer);
                self.again.push((Instant::now() + MEMBERS_EXCHANGE_AGAIN, peer));
            }
        }
        outcome
    }

    /// A connection closed. Returns whether it was the peer's last (it is disconnected now).
    pub fn on_closed(&mut self, peer: PeerId, connection: ConnectionId, num_established: u32) -> bool {
        if let Some(connections) = self.connections.get_mut(&peer) {
            connections.retain(|c| c.id != connection);
        }
        if num_established > 0 {
            return false;
        }
        self.connections.remove(&peer);
        tracing::info!(target: "mirrormesh::daemon", "disconnected");
        self.states.remove(&peer);
        self.answered.remove(&peer);
        self.activity.remove(&peer);
        self.requests.retain(|_, p| *p != peer);
        self.membership.on_disconnected(now(), &peer);
        if let Some(dial) = self.dials.get_mut(&peer) {
            dial.next = Instant::now() + dial.backoff;
        }
        true
    }

    // ---- dialing, exchange, persistence ---------------------------------------------------------------------

    /// Where to dial `peer`: its bootstrap address, then the addresses it advertised.
    fn dial_addrs(&self, peer: PeerId) -> Vec<Multiaddr> {
        let configured = self.bootstrap.get(&peer).cloned();
        let learned =
            self.membership.get(&peer).into_iter().flat_map(|m| m.addrs.iter().map(|a| multiaddr_of(*a, peer)));
        configured.into_iter().chain(learned).collect()
    }

    /// The peer manager's chores, every tick: dials, exchanges, pruning (while `idle`: no sync runs), persistence
    /// and forgetting. Returns whether dials are left over (more than [`DIALS_PER_TICK_MAX`] were due): then it
    /// wants to run again soon rather than in a second.
    pub fn on_tick(&mut self, swarm: &mut Swarm<Behaviour>, store: &StateStore, idle: bool) -> bool {
        let at = Instant::now();
        let wanted = self.membership.wanted(now());
        let mut started = 0;
        for peer in &wanted {
            if started == DIALS_PER_TICK_MAX {
                break;
            }
            if swarm.is_connected(peer) {
                continue;
            }
            let dial = self.dials.entry(*peer).or_insert(Redial { next: at, backoff: REDIAL_MIN });
            if at < dial.next {
                continue;
            }
            dial.next = at + dial.backoff;
            dial.backoff = (dial.backoff * 2).min(REDIAL_MAX);
            let addrs = self.dial_addrs(*peer);
            if addrs.is_empty() {
                continue;
            }
            started += 1;
            let opts =
                DialOpts::peer_id(*peer).addresses(addrs).condition(PeerCondition::DisconnectedAndNotDialing).build();
            match swarm.dial(opts) {
                Ok(()) => self.count("member_dials"),
                Err(e) => tracing::debug!(%peer, "dial: {e}"),
            }
        }
        self.dials.retain(|p, _| wanted.contains(p) || self.states.contains_key(p));

        let due: Vec<PeerId> = self.again.iter().filter(|(when, _)| *when <= at).map(|(_, p)| *p).collect();
        self.again.retain(|(when, _)| *when > at);
        for peer in due {
            self.ask_members(swarm, peer);
        }
        if self.exchanges.due(self.mono(at)) {
            let after = self.exchange_cursor.and_then(|c| self.states.range(c..).map(|(p, _)| *p).find(|p| *p != c));
            let next = after.or_else(|| self.states.keys().next().copied());
            if let Some(peer) = next {
                self.exchange_cursor = Some(peer);
                self.ask_members(swarm, peer);
            }
        }
        if at >= self.next_prune {
            self.next_prune = at + Duration::from_secs(1);
            self.note_activity(at);
            self.read_round_trips();
            self.prune(swarm, &wanted, at, idle);
        }
        if at >= self.next_touch {
            self.next_touch = at + MEMBERS_TOUCH_INTERVAL;
            self.membership.touch_connected(now());
        }
        if at >= self.next_expire {
            self.next_expire = at + MEMBERS_EXPIRE_INTERVAL;
            for peer in self.membership.expire(now()) {
                tracing::info!(%peer, "member unseen for network.forget_after_secs; forgotten");
                self.dials.remove(&peer);
                self.count("members_forgotten");
            }
        }
        if at >= self.next_persist {
            self.next_persist = at + MEMBERS_PERSIST_INTERVAL;
            self.persist(store);
        }
        started == DIALS_PER_TICK_MAX
    }

    /// `at` on the exchange's monotonic clock.
    fn mono(&self, at: Instant) -> Mono {
        Mono(at.saturating_duration_since(self.epoch).as_millis() as u64)
    }

    /// The smallest round trip QUIC measured on each data-plane connection: what `mirrormesh peers` shows (until
    /// there is one, a hello's or have's time: [`Peers::control_round_trip`]).
    fn read_round_trips(&mut self) {
        for (peer, rtt) in self.data.round_trips() {
            if let Some(state) = self.states.get_mut(&peer) {
                state.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                state.rtt_measured = true;
            }
        }
    }

    /// A hello or have to `peer` was answered `ms` after it was sent: its round trip until QUIC measures one.
    pub fn control_round_trip(&mut self, peer: &PeerId, ms: f64) {
        if let Some(state) = self.states.get_mut(peer).filter(|s| !s.rtt_measured) {
            state.rtt_ms = smooth(state.rtt_ms, ms);
        }
    }

    /// Records which connected peers' data planes moved chunks since the last call.
    fn note_activity(&mut self, at: Instant) {
        let traffic = self.data.traffic();
        for peer in self.states.keys() {
            let total = traffic.get(peer).map_or(0, |t| t.bytes_sent + t.bytes_received);
            match self.activity.get_mut(peer) {
                Some((seen, _)) if *seen == total => {}
                Some(entry) => *entry = (total, at),
                None => {
                    self.activity.insert(*peer, (total, at));
                }
            }
        }
    }

    /// Closes connections this mirror dialed to peers the mesh rule no longer wants (never an origin's, never one a
    /// peer dialed: that peer wants it): unused ones at once, used ones once idle (`idle`: no sync runs here).
    fn prune(&mut self, swarm: &mut Swarm<Behaviour>, wanted: &BTreeSet<PeerId>, at: Instant, idle: bool) {
        if self.role == RoleName::Origin {
            return;
        }
        let closable = |peer: &PeerId, conns: &Vec<Conn>| {
            let youngest = conns.iter().map(|c| at.duration_since(c.since)).min().unwrap_or_default();
            let (moved, since) = self.activity.get(peer).copied().unwrap_or((0, at));
            let unused = moved == 0 && youngest >= MESH_PRUNE_UNUSED;
            let quiet = idle && youngest >= MESH_PRUNE_IDLE && at.duration_since(since) >= MESH_PRUNE_IDLE;
            unused || quiet
        };
        let unwanted: Vec<PeerId> = self
            .connections
            .iter()
            .filter(|(peer, conns)| {
                !wanted.contains(*peer)
                    && !self.membership.config().origins.contains(*peer)
                    && !conns.is_empty()
                    && conns.iter().all(|c| !c.inbound)
                    && closable(peer, conns)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in unwanted {
            tracing::info!(%peer, "closing a connection the mesh no longer needs");
            self.count("mesh_pruned");
            let _ = swarm.disconnect_peer_id(peer);
        }
    }

    /// At shutdown: every connected member was seen now; everything changed is written.
    pub fn shut_down(&mut self, store: &StateStore) {
        self.membership.touch_connected(now());
        self.persist(store);
    }

    /// Writes the members changed since the last call to the state database.
    pub fn persist(&mut self, store: &StateStore) {
        let changed = self.membership.take_dirty();
        if changed.is_empty() {
            return;
        }
        let write = || -> Result<()> {
            let mut writer = store.writer()?;
            for (peer, member) in &changed {
                writer.set_member(&peer.to_bytes(), member.as_ref())?;
            }
            writer.commit()
        };
        if let Err(e) = write() {
            tracing::warn!("recording the fabric's members: {e:#}");
            self.count("members_persist_failures");
        }
    }

    /// What this node tells `to` about itself and the fabric.
    fn members_message(&self, to: &PeerId) -> Members {
        let members = self
            .membership
            .records_for(now(), to, MEMBERS_PER_MESSAGE_MAX)
            .into_iter()
            .map(|r| MemberEntry { id: ByteBuf::from(r.id.to_bytes()), addrs: r.addrs, seen_ago_ms: r.seen_ago_ms })
            .collect();
        Members { repo: self.repo.clone(), listen: self.listen.clone(), members }
    }

    /// Sends `peer` this node's members (unless an exchange with it is in flight); its answer comes back through
    /// [`Peers::on_members_answer`].
    fn ask_members(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        if !self.states.contains_key(&peer) || self.requests.values().any(|p| *p == peer) {
            return;
        }
        let request = ControlRequest::Members(self.members_message(&peer));
        let id = swarm.behaviour_mut().control.send_request(&peer, request.into());
        self.requests.insert(id, peer);
    }

    /// Whether `request` is a `Members` request of this module's (then the answer or failure is its to handle).
    pub fn take_request(&mut self, request: OutboundRequestId) -> bool {
        self.requests.remove(&request).is_some()
    }

    /// Takes in a peer's `Members` (in its request or its answer).
    fn take_members(&mut self, from: PeerId, members: Members) {
        if members.repo != self.repo {
            self.count("members_wrong_repo");
            return;
        }
        let t: Timestamp = now();
        let observed = self.states.get(&from).and_then(|s| s.address.as_ref()).and_then(ip_of);
        let report = self.membership.on_listen(t, &from, &members.listen, observed);
        self.count_report(&report);
        let mut records = Vec::with_capacity(members.members.len());
        for entry in members.members {
            match PeerId::from_bytes(&entry.id) {
                Ok(id) => records.push(MemberRecord { id, addrs: entry.addrs, seen_ago_ms: entry.seen_ago_ms }),
                Err(_) => self.count("members_bad_id"),
            }
        }
        let report = self.membership.on_members(t, &from, records);
        self.count_report(&report);
        if !report.new.is_empty() {
            self.exchanges.news(self.mono(Instant::now()));
        }
        // Members just learnt are dialed at the next round of chores, which should come soon.
        self.soon = true;
    }

    /// Whether something happened that the chores should see soon (members learnt), since the last call.
    pub fn take_soon(&mut self) -> bool {
        std::mem::take(&mut self.soon)
    }

    /// The answer to this node's `Members` request.
    pub fn on_members_answer(&mut self, from: PeerId, response: ControlResponse) {
        match response {
            ControlResponse::Members(members) => self.take_members(from, members),
            ControlResponse::Refused { reason } => tracing::debug!(peer = %from, "members refused: {reason}"),
            other => {
                tracing::debug!(peer = %from, ?other, "unexpected answer to a members request");
                self.count("control_unexpected_responses");
            }
        }
    }

    /// A peer's `Members` request: taken in, and answered with this node's (or refused if it asks too often).
    pub fn answer_members(&mut self, from: PeerId, members: Members) -> ControlResponse {
        let at = Instant::now();
        if self.answered.get(&from).is_some_and(|last| at.duration_since(*last) < MEMBERS_ANSWER_INTERVAL_MIN) {
            self.count("members_requests_throttled");
            return ControlResponse::Refused { reason: "members asked too often".into() };
        }
        if self.states.contains_key(&from) {
            self.answered.insert(from, at);
        }
        if members.repo != self.repo {
            self.count("members_wrong_repo");
            return ControlResponse::Refused { reason: "another repository".into() };
        }
        self.take_members(from, members);
        ControlResponse::Members(self.members_message(&from))
    }

    /// Records where a peer's data plane listens (from its hello); an unspecified ip means the address its
    /// connection comes from. Addresses are checked as members' are (loopback and link-local only for a node of
    /// that kind, at most `PEER_ADDRS_MAX`).
    pub fn learn_data_addrs(&mut self, peer: PeerId, addrs: &[String]) {
        let seen_ip = self.states.get(&peer).and_then(|p| p.address.as_ref()).and_then(ip_of);
        let mut parsed = Vec::new();
        for text in addrs {
            match text.parse::<SocketAddr>() {
                Ok(addr) => parsed.push(addr),
                Err(_) => self.count("hello_bad_data_addr"),
            }
        }
        let checked = check_addrs(&parsed, seen_ip, self.membership.config().scope);
        for why in &checked.rejected {
            self.count(format!("addrs_rejected_{}", why.name()));
        }
        if !checked.rejected.is_empty() {
            tracing::debug!(%peer, rejected = checked.rejected.len(), "data-plane addresses refused");
        }
        if checked.kept.is_empty() {
            return;
        }
        #[cfg(feature = "faults")]
        if self.flood && self.flooding.insert(peer) {
            let data = self.data.clone();
            let addrs = checked.kept.clone();
            tokio::spawn(async move { data.flood(peer, addrs).await });
        }
        if let Some(state) = self.states.get_mut(&peer) {
            state.data_addrs = checked.kept;
        }
    }
}
