//! The status projection: what the node shows of itself. From the engine, the peer manager, the data plane and
//! the shell's own counters it builds the [`Status`] the admin API, the dashboard and the CLI read (a watch
//! channel: no request reaches the event loop), and refreshes from it the Prometheus metrics, the service manager's
//! `STATUS=` line and the last hour's history. It publishes when something a client may be waiting on changed
//! ([`StatusKey`]), and at least every [`STATUS_INTERVAL`] for the counters.

use std::collections::BTreeMap;
use std::time::Instant;

use libp2p::{Multiaddr, PeerId, Swarm};
use mirrormesh_proto::sync::{Engine, SyncPhase};
use tokio::sync::watch;

use super::peers::Peers;
use super::{Health, STATUS_INTERVAL, SyncProgress};
use crate::config::{Config, RoleName};
use crate::dataplane::DataPlane;
use crate::history::History;
use crate::key::NodeKey;
use crate::metrics::Metrics;
use crate::publish::now;
use crate::status::{PeerStatus, RepoStatus, Status};
use crate::swarm::Behaviour;

/// What in the status a client may be waiting on: a change publishes it at once.
#[derive(PartialEq, Eq)]
pub struct StatusKey {
    pub phase: &'static str,
    pub current: Option<u64>,
    pub target: Option<u64>,
    pub waiting_for_origin: bool,
    pub peers: usize,
    pub staged: Option<u64>,
    pub last_error: Option<String>,
    pub problems: usize,
    pub pending_removals: u64,
}

/// What the projection reads (and the two things it updates: the sync's largest missing byte count, the service
/// manager's status line).
pub struct Sources<'a> {
    pub cfg: &'a Config,
    pub key: &'a NodeKey,
    pub engine: &'a Engine<PeerId>,
    pub data: &'a DataPlane,
    pub peers: &'a Peers,
    pub swarm: &'a Swarm<Behaviour>,
    pub origins: &'a [PeerId],
    pub counters: &'a BTreeMap<String, u64>,
    pub downstream: &'a crate::downstream::Downstream,
    pub service: &'a mut crate::service::Notifier,
    pub health: &'a Health,
    pub totals: (u64, u64),
    pub sync: &'a mut SyncProgress,
    pub listen_addrs: &'a [Multiaddr],
    pub started: Instant,
}

pub struct Projector {
    status_tx: watch::Sender<Status>,
    /// When the status was last published, and its key then.
    published: Option<(Instant, StatusKey)>,
    /// Something may have changed since then, but the status was published less than [`STATUS_INTERVAL`] before.
    held_back: bool,
    /// Bytes this node had served when it last published a snapshot (an origin's bytes sent for the newest update
    /// are counted from there).
    served_at_publish: u64,
    pub metrics: Metrics,
    pub history: History,
}

impl Projector {
    pub fn new(status_tx: watch::Sender<Status>, metrics: Metrics, history: History) -> Self {
        Self { status_tx, published: None, held_back: false, served_at_publish: 0, metrics, history }
    }

    /// Whether a status with `key` is to be published now (after an event). If not, it is held back until
    /// [`Projector::held_until`].
    pub fn due(&mut self, key: &StatusKey) -> bool {
        let due = self.published.as_ref().is_none_or(|(at, was)| was != key || at.elapsed() >= STATUS_INTERVAL);
        self.held_back = !due;
        due
    }

    /// When a held-back status is to be published: the loop wakes for it, so what the last events changed shows
    /// within [`STATUS_INTERVAL`] even if nothing else happens.
    pub fn held_until(&self) -> Option<Instant> {
        self.published.as_ref().filter(|_| self.held_back).map(|(at, _)| *at + STATUS_INTERVAL)
    }

    /// The service manager's one-line summary of the status last published.
    pub fn summary(&self) -> String {
        crate::service::summary(&self.status_tx.borrow())
    }

    /// The origin published a snapshot of `changed_bytes` changed bytes (`newest`) at `wall_ms`, having served
    /// `served_total` bytes so far.
    pub fn snapshot_published(
        &mut self,
        repo: &str,
        wall_ms: u64,
        newest: crate::history::Newest,
        changed_bytes: u64,
        served_total: u64,
    ) {
        self.served_at_publish = served_total;
        self.metrics.published(repo, changed_bytes);
        self.history.published(wall_ms, newest, changed_bytes, served_total);
    }

    pub fn publish(&mut self, key: StatusKey, src: Sources<'_>) {
        self.published = Some((Instant::now(), key));
        self.held_back = false;
        let engine = src.engine.status();
        let traffic = src.data.traffic();
        let syncing = engine.phase != SyncPhase::Idle;
        let bytes_missing = engine.bytes_missing;
        if syncing {
            src.sync.need_bytes = src.sync.need_bytes.max(bytes_missing);
        }
        let progress = match engine.phase {
            SyncPhase::Idle if engine.current.is_none() && src.cfg.role == RoleName::Mirror => 0.0,
            SyncPhase::Idle => 1.0,
            SyncPhase::Transferring if src.sync.need_bytes > 0 => {
                1.0 - bytes_missing as f64 / src.sync.need_bytes as f64
            }
            SyncPhase::Applying | SyncPhase::ApplyRetrying => 1.0,
            _ => 0.0,
        };
        let target_seq = engine.target.map(|t| t.0);
        let files_missing = match &src.sync.files {
            Some(files) if syncing && Some(files.seq) == target_seq => files.files_missing(),
            _ => 0,
        };
        let repo = RepoStatus {
            name: engine.repo.to_string(),
            seq: engine.current.map(|c| c.0),
            root: engine.current.map(|c| c.1.to_hex()),
            state: match (syncing, engine.current) {
                (true, _) => "syncing".into(),
                (false, None) if src.cfg.role == RoleName::Mirror => "never-synced".into(),
                (false, _) => "idle".into(),
            },
            phase: engine.phase.name().into(),
            target_seq,
            staged_seq: src.sync.staged_seq.filter(|_| syncing),
            progress,
            files_missing,
            bytes_missing,
            chunks_missing: engine.chunks_missing as u64,
            waiting_for_origin: engine.waiting_for_origin,
            files: src.totals.0,
            bytes: src.totals.1,
            pending_deletions: engine.pending_removals,
            created_ms: src.engine.current().map(|c| c.body.created.0),
            expires_ms: src.engine.current().map(|c| c.body.expires.0),
            last_apply_ms: src.sync.last_apply_ms,
            propagation_lag_ms: src.sync.propagation_lag_ms,
        };
        let mut peers = Vec::new();
        for (id, state) in src.peers.states() {
            let t = traffic.get(id);
            let banned = src.engine.is_banned(id);
            peers.push(PeerStatus {
                id: id.to_string(),
                address: state.address.as_ref().map(ToString::to_string).unwrap_or_default(),
                data_address: state.data_addrs.first().map(ToString::to_string),
                origin: src.origins.contains(id),
                learned: src.peers.learned(id).map(|l| l.name().to_owned()),
                connected: src.swarm.is_connected(id),
                rtt_ms: state.rtt_ms,
                bytes_sent: t.map_or(0, |t| t.bytes_sent),
                bytes_received: t.map_or(0, |t| t.bytes_received),
                chunks_sent: t.map_or(0, |t| t.chunks_sent),
                chunks_received: t.map_or(0, |t| t.chunks_received),
                failures: t.map_or(0, |t| t.failures),
                banned,
                score: if banned { Some(0.0) } else { state.rate },
                complete_seq: src.engine.peer_complete_seq(id),
                connected_since_ms: state.connected_since_ms,
            });
        }
        let served = traffic.values().map(|t| t.bytes_sent).sum();
        let fetched = traffic.values().map(|t| t.bytes_received).sum();
        let from_origin = traffic.iter().filter(|(p, _)| src.origins.contains(p)).map(|(_, t)| t.bytes_received).sum();
        let mut counters = src.counters.clone();
        counters.extend(src.peers.counters().iter().map(|(k, v)| (k.clone(), *v)));
        for (what, n) in src.data.refusals() {
            counters.insert(format!("data_refused_{what}"), n);
        }
        for (name, n) in src.downstream.counters() {
            counters.insert(name.into(), n);
        }
        if src.service.failures() > 0 {
            counters.insert("service_notify_failures".into(), src.service.failures());
        }
        if self.history.memos_dropped > 0 {
            counters.insert("history_members_dropped".into(), self.history.memos_dropped);
        }
        let seeder = src.engine.seeder_counts();
        let announced = src.engine.announce_counts();
        counters.insert("announced_outside_snapshot".into(), announced.outside_snapshot);
        counters.insert("announced_over_cap".into(), announced.over_cap);
        let copies = src.engine.copy_counts();
        counters.insert("chunks_received_again_endgame".into(), copies.endgame);
        counters.insert("chunks_received_again_other".into(), copies.other);
        // What the data plane's served connections put on the wire, beyond the chunk bytes (QUIC's own overhead and
        // what it sent again).
        let wire = src.data.sent_on_wire();
        counters.insert("dataplane_sent_udp_bytes".into(), wire.udp_bytes);
        counters.insert("dataplane_sent_datagrams".into(), wire.datagrams);
        counters.insert("dataplane_sent_packets".into(), wire.packets);
        counters.insert("dataplane_lost_packets".into(), wire.lost_packets);
        counters.insert("dataplane_lost_bytes".into(), wire.lost_bytes);
        if src.cfg.role == RoleName::Origin {
            counters.insert("origin_chunks_served".into(), seeder.served);
            counters.insert("origin_redirects".into(), seeder.redirects);
            counters.insert("origin_refused_complete_claims".into(), seeder.refused);
            counters.insert("origin_served_again_after_wait".into(), seeder.again.after_wait);
            counters.insert("origin_served_again_after_bans".into(), seeder.again.after_bans);
            counters.insert("origin_served_again_no_holder".into(), seeder.again.no_holder);
            counters.insert("origin_served_again_same_asker".into(), seeder.again.asked_again);
            counters.insert("origin_refused_unknown_chunks".into(), seeder.refused_unknown);
            counters.insert("origin_refused_banned".into(), seeder.refused_banned);
        }
        let status = Status {
            node_id: src.key.peer_id().to_string(),
            listen_addrs: src.listen_addrs.iter().map(ToString::to_string).collect(),
            data_addr: src.data.local_addr().to_string(),
            uptime_ms: src.started.elapsed().as_millis() as u64,
            role: match src.cfg.role {
                RoleName::Origin => "origin".into(),
                RoleName::Mirror => "mirror".into(),
            },
            repos: vec![repo],
            peers,
            members: src.peers.fabric_size() as u64,
            bytes_served_total: served,
            bytes_fetched_total: fetched,
            bytes_fetched_from_origin: from_origin,
            counters,
            last_error: src.health.newest().map(str::to_owned),
            problems: src.health.list(),
        };
        let origin_sent = (src.cfg.role == RoleName::Origin).then(|| served.saturating_sub(self.served_at_publish));
        src.service.status(&crate::service::summary(&status));
        self.metrics.refresh(&status, origin_sent);
        let newest =
            src.engine.latest().map(|r| crate::history::Newest { seq: r.body.seq, created_ms: r.body.created.0 });
        let peers = &src.peers;
        self.history.observe(Instant::now(), now().0, &status, newest, || peers.members());
        self.status_tx.send_replace(status);
    }
}
