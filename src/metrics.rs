//! The daemon's Prometheus metrics (`GET /metrics`, text exposition format).
//!
//! Names follow Prometheus conventions: the `mirrormesh_` prefix, base units (bytes, seconds) in the name, `_total`
//! on counters. Totals the daemon already keeps (traffic per peer, its event counters) are carried over when the
//! status is refreshed; durations are observed when they end.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::daemon::ProblemKind;
use crate::status::Status;

/// Most distinct label values of one metric family (event names, rejection reasons): the names come from the
/// daemon's own code, this only bounds a mistake.
pub const LABEL_VALUES_MAX: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Class {
    /// `origin` or `peer`: which kind of node the bytes went to or came from.
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Event {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    /// A `ProblemKind` name (a closed set).
    kind: String,
}

/// Every metric the daemon exports. Cloning shares the values.
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    sent: Family<Class, Counter>,
    received: Family<Class, Counter>,
    chunks_verified: Counter,
    chunks_rejected: Counter,
    peers_connected: Gauge,
    peers_banned: Gauge,
    origins_connected: Gauge,
    members: Gauge,
    roots_accepted: Counter,
    roots_rejected: Family<Reason, Counter>,
    events: Family<Event, Counter>,
    sync_duration: Histogram,
    propagation_lag: Histogram,
    snapshot_seq: Gauge,
    missing: Gauge,
    update_changed: Gauge,
    origin_update_sent: Gauge,
    waiting_for_origin: Gauge,
    failing: Gauge,
    problem: Family<Kind, Gauge>,
    root_created: Gauge,
    root_expires: Gauge,
}

/// Seconds, from 50 ms to about 55 minutes.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.05, 2.0, 17)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mirrormesh");
        let sent = Family::<Class, Counter>::default();
        r.register_with_unit("sent", "Chunk bytes sent, by the class of the receiving node", Unit::Bytes, sent.clone());
        let received = Family::<Class, Counter>::default();
        r.register_with_unit(
            "received",
            "Chunk bytes received, by the class of the sending node",
            Unit::Bytes,
            received.clone(),
        );
        let chunks_verified = Counter::default();
        r.register("chunks_verified", "Chunks received whose hash matched", chunks_verified.clone());
        let chunks_rejected = Counter::default();
        r.register(
            "chunks_rejected",
            "Chunks received whose hash did not match (sender blamed)",
            chunks_rejected.clone(),
        );
        let peers_connected = Gauge::default();
        r.register("peers_connected", "Peers with an open control connection", peers_connected.clone());
        let peers_banned = Gauge::default();
        r.register("peers_banned", "Connected peers banned for the snapshot being synced", peers_banned.clone());
        let origins_connected = Gauge::default();
        r.register(
            "origins_connected",
            "Connected peers that are origins (equal to peers_connected: a mirror reaches no other mirror)",
            origins_connected.clone(),
        );
        let members = Gauge::default();
        r.register("members", "Nodes of the fabric this node knows, itself included", members.clone());
        let roots_accepted = Counter::default();
        r.register("roots_accepted", "Signed roots accepted (newer and valid)", roots_accepted.clone());
        let roots_rejected = Family::<Reason, Counter>::default();
        r.register("roots_rejected", "Signed roots rejected, by reason", roots_rejected.clone());
        let events = Family::<Event, Counter>::default();
        r.register("events", "Everything else the daemon counts (refusals, failures, bans), by name", events.clone());
        let sync_duration = Histogram::new(duration_buckets());
        r.register_with_unit(
            "sync_duration",
            "From accepting a root to its snapshot in place",
            Unit::Seconds,
            sync_duration.clone(),
        );
        let propagation_lag = Histogram::new(duration_buckets());
        r.register_with_unit(
            "propagation_lag",
            "From a root's creation at the origin to its snapshot in place here",
            Unit::Seconds,
            propagation_lag.clone(),
        );
        let snapshot_seq = Gauge::default();
        r.register("snapshot_seq", "Sequence number of the snapshot the served tree holds", snapshot_seq.clone());
        let missing = Gauge::default();
        r.register_with_unit(
            "sync_missing",
            "Chunk bytes the sync in progress still needs",
            Unit::Bytes,
            missing.clone(),
        );
        let update_changed = Gauge::default();
        r.register_with_unit(
            "update_changed",
            "Origin: bytes of the files the newest snapshot added or changed",
            Unit::Bytes,
            update_changed.clone(),
        );
        let origin_update_sent = Gauge::default();
        r.register_with_unit(
            "origin_update_sent",
            "Origin: chunk bytes sent since the newest snapshot was published (divide by update_changed_bytes for \
             origin bytes per update byte)",
            Unit::Bytes,
            origin_update_sent.clone(),
        );
        let waiting_for_origin = Gauge::default();
        r.register(
            "sync_waiting_for_origin",
            "1 while the sync needs chunks that no reachable peer holds and no origin is connected",
            waiting_for_origin.clone(),
        );
        let failing = Gauge::default();
        r.register(
            "failing",
            "1 while any problem is present (see mirrormesh_problem and the status's problems)",
            failing.clone(),
        );
        let problem = Family::<Kind, Gauge>::default();
        r.register(
            "problem",
            "1 while a problem of this kind is present (publish refused, apply failing, root expired, ...)",
            problem.clone(),
        );
        for kind in ProblemKind::ALL {
            problem.get_or_create(&Kind { kind: kind.name().into() }).set(0);
        }
        let root_created = Gauge::default();
        r.register_with_unit(
            "root_created_timestamp",
            "When the origin created the root of the snapshot served here (Unix time)",
            Unit::Seconds,
            root_created.clone(),
        );
        let root_expires = Gauge::default();
        r.register_with_unit(
            "root_expires_timestamp",
            "When the root of the snapshot served here expires (Unix time)",
            Unit::Seconds,
            root_expires.clone(),
        );
        Self {
            registry: std::sync::Arc::new(r),
            waiting_for_origin,
            failing,
            problem,
            root_created,
            root_expires,
            sent,
            received,
            chunks_verified,
            chunks_rejected,
            peers_connected,
            peers_banned,
            origins_connected,
            members,
            roots_accepted,
            roots_rejected,
            events,
            sync_duration,
            propagation_lag,
            snapshot_seq,
            missing,
            update_changed,
            origin_update_sent,
        }
    }

    /// Every metric in the OpenMetrics text format (what Prometheus asks for first).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Every metric in the classic Prometheus text format (0.0.4, what `promtool check metrics` and older scrapers
    /// read): a counter's HELP and TYPE name its `_total` series, and there are no UNIT or EOF lines.
    pub fn encode_text(&self) -> String {
        to_classic_text(&self.encode_openmetrics())
    }

    /// Carries the status's totals over (counters only ever rise; gauges follow).
    pub fn refresh(&self, status: &Status, origin_update_sent: Option<u64>) {
        let mut sent = BTreeMap::<&str, u64>::new();
        let mut received = BTreeMap::<&str, u64>::new();
        for p in &status.peers {
            let class = if p.origin { "origin" } else { "peer" };
            *sent.entry(class).or_default() += p.bytes_sent;
            *received.entry(class).or_default() += p.bytes_received;
        }
        for (class, total) in sent {
            raise(&self.sent.get_or_create(&Class { class: class.into() }), total);
        }
        for (class, total) in received {
            raise(&self.received.get_or_create(&Class { class: class.into() }), total);
        }
        let count = |name: &str| status.counters.get(name).copied().unwrap_or(0);
        raise(&self.chunks_verified, count("chunks_verified"));
        raise(&self.chunks_rejected, count("chunks_rejected"));
        raise(&self.roots_accepted, count("roots_accepted"));
        for (name, n) in status.counters.iter().take(LABEL_VALUES_MAX) {
            if let Some(reason) = name.strip_prefix("roots_rejected_") {
                raise(&self.roots_rejected.get_or_create(&Reason { reason: reason.into() }), *n);
            } else if !matches!(name.as_str(), "chunks_verified" | "chunks_rejected" | "roots_accepted") {
                raise(&self.events.get_or_create(&Event { event: name.clone() }), *n);
            }
        }
        self.peers_connected.set(status.peers.iter().filter(|p| p.connected).count() as i64);
        self.peers_banned.set(status.peers.iter().filter(|p| p.banned).count() as i64);
        self.origins_connected.set(status.peers.iter().filter(|p| p.connected && p.origin).count() as i64);
        self.members.set(status.members as i64);
        if let Some(repo) = status.repos.first() {
            self.snapshot_seq.set(repo.seq.map_or(0, |s| s as i64));
            self.missing.set(repo.bytes_missing as i64);
            self.waiting_for_origin.set(i64::from(repo.waiting_for_origin));
        }
        self.failing.set(i64::from(!status.problems.is_empty()));
        for kind in ProblemKind::ALL {
            let present = status.problems.iter().any(|p| p.kind == kind);
            self.problem.get_or_create(&Kind { kind: kind.name().into() }).set(i64::from(present));
        }
        if let Some(repo) = status.repos.first() {
            self.root_created.set(repo.created_ms.map_or(0, |ms| (ms / 1000) as i64));
            self.root_expires.set(repo.expires_ms.map_or(0, |ms| (ms / 1000) as i64));
        }
        if let Some(sent) = origin_update_sent {
            self.origin_update_sent.set(sent as i64);
        }
    }

    pub fn observe_sync(&self, seconds: f64, lag_seconds: Option<f64>) {
        self.sync_duration.observe(seconds);
        if let Some(lag) = lag_seconds {
            self.propagation_lag.observe(lag);
        }
    }

    /// Origin: a snapshot was published that added or changed `bytes` of files.
    pub fn published(&self, bytes: u64) {
        self.update_changed.set(bytes as i64);
        self.origin_update_sent.set(0);
    }
}

/// OpenMetrics text to the classic format (see [`Metrics::encode_text`]).
fn to_classic_text(open: &str) -> String {
    let counters: std::collections::BTreeSet<&str> =
        open.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Raises `counter` to `total` (a total that went down, after a peer reconnected, adds nothing).
fn raise(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PeerStatus, RepoStatus};

    #[test]
    fn refresh_carries_totals_and_counters_over() {
        let m = Metrics::new();
        let mut s = Status::default();
        s.peers.push(PeerStatus { origin: true, connected: true, bytes_received: 100, ..Default::default() });
        s.peers.push(PeerStatus { connected: true, banned: true, bytes_received: 50, ..Default::default() });
        s.repos.push(RepoStatus { seq: Some(3), bytes_missing: 7, ..Default::default() });
        s.counters.insert("chunks_verified".into(), 4);
        s.counters.insert("roots_rejected_bad_signature".into(), 2);
        s.counters.insert("data_refused_not_allowed".into(), 1);
        m.refresh(&s, None);
        // A peer that reconnected starts its totals again: the counters do not go down.
        s.peers[0].bytes_received = 10;
        m.refresh(&s, None);
        m.observe_sync(1.5, Some(2.0));
        let text = m.encode_text();
        assert!(text.contains("# TYPE mirrormesh_chunks_verified_total counter\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        let open = m.encode_openmetrics();
        assert!(open.contains("# TYPE mirrormesh_chunks_verified counter\n") && open.ends_with("# EOF\n"), "{open}");
        for line in [
            "mirrormesh_received_bytes_total{class=\"origin\"} 100",
            "mirrormesh_received_bytes_total{class=\"peer\"} 50",
            "mirrormesh_chunks_verified_total 4",
            "mirrormesh_roots_rejected_total{reason=\"bad_signature\"} 2",
            "mirrormesh_events_total{event=\"data_refused_not_allowed\"} 1",
            "mirrormesh_peers_connected 2",
            "mirrormesh_peers_banned 1",
            "mirrormesh_snapshot_seq 3",
            "mirrormesh_sync_missing_bytes 7",
            "mirrormesh_sync_duration_seconds_count 1",
            "mirrormesh_propagation_lag_seconds_sum 2.0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
    }

    #[test]
    fn origins_connected_and_members_show_a_mirror_that_reaches_only_the_origin() {
        let m = Metrics::new();
        let mut s = Status { members: 5, ..Status::default() };
        s.peers.push(PeerStatus { origin: true, connected: true, ..Default::default() });
        m.refresh(&s, None);
        let text = m.encode_text();
        for line in ["mirrormesh_peers_connected 1", "mirrormesh_origins_connected 1", "mirrormesh_members 5"] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
    }
}
