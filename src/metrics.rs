//! The daemon's Prometheus metrics (`GET /metrics`, text exposition format).
//!
//! Names follow Prometheus conventions: the `mirrormesh_` prefix, base units (bytes, seconds) in the name, `_total`
//! on counters, `_timestamp_seconds` for points in time (Unix time), a `repo` label on every metric that is about
//! one repository. Totals the daemon already keeps (traffic per peer, its event counters) are carried over when the
//! status is refreshed; durations are observed when they end. Beside them, as every Prometheus client library
//! exports them: `mirrormesh_build_info{version,commit}` and the process's `process_*` metrics (CPU seconds,
//! resident memory, open and allowed file descriptors, start time), read from `/proc` when scraped.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::daemon::ProblemKind;
use crate::status::Status;

/// The reasons `RootError::reason` names, exported at 0 from the start: `increase()` sees the first rejection, and
/// dashboards and rules find the series before anything was rejected. A reason missing here is still exported when
/// it first occurs.
pub const ROOT_REJECTION_REASONS: [&str; 9] = [
    "malformed",
    "unknown_publisher",
    "bad_signature",
    "unknown_repo",
    "expired",
    "future",
    "rollback",
    "replay",
    "equivocation",
];

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
struct Repo {
    /// The repository's name (`repo.name`).
    repo: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
    /// The git commit the binary was built from (`build.rs`), or "unknown".
    commit: String,
}

/// The version and commit this binary was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("MIRRORMESH_COMMIT");

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
    loop_turn: Histogram,
    sync_duration: Family<Repo, Histogram, fn() -> Histogram>,
    propagation_lag: Family<Repo, Histogram, fn() -> Histogram>,
    snapshot_seq: Family<Repo, Gauge>,
    missing: Family<Repo, Gauge>,
    update_changed: Family<Repo, Gauge>,
    origin_update_sent: Family<Repo, Gauge>,
    waiting_for_origin: Family<Repo, Gauge>,
    failing: Gauge,
    problem: Family<Kind, Gauge>,
    root_created: Family<Repo, Gauge>,
    root_expires: Family<Repo, Gauge>,
    last_apply: Family<Repo, Gauge>,
    process: std::sync::Arc<ProcessMetrics>,
}

/// Seconds, from 50 ms to about 55 minutes.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.05, 2.0, 17)
}

fn duration_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mirrormesh");
        let build = Family::<Build, Gauge>::default();
        r.register("build_info", "The version and git commit this binary was built from (always 1)", build.clone());
        build.get_or_create(&Build { version: VERSION.into(), commit: COMMIT.into() }).set(1);
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
        for reason in ROOT_REJECTION_REASONS {
            drop(roots_rejected.get_or_create(&Reason { reason: reason.into() }));
        }
        let events = Family::<Event, Counter>::default();
        r.register("events", "Everything else the daemon counts (refusals, failures, bans), by name", events.clone());
        // 100 us to about 3 s.
        let loop_turn = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        r.register_with_unit(
            "loop_turn",
            "How long the event loop took over one turn (an event and what follows it): nothing else runs on the \
             loop meanwhile, so its stalls",
            Unit::Seconds,
            loop_turn.clone(),
        );
        let sync_duration = Family::<Repo, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        r.register_with_unit(
            "sync_duration",
            "From accepting a root to its snapshot in place",
            Unit::Seconds,
            sync_duration.clone(),
        );
        let propagation_lag = Family::<Repo, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        r.register_with_unit(
            "propagation_lag",
            "From a root's creation at the origin to its snapshot in place here",
            Unit::Seconds,
            propagation_lag.clone(),
        );
        let snapshot_seq = Family::<Repo, Gauge>::default();
        r.register("snapshot_seq", "Sequence number of the snapshot the served tree holds", snapshot_seq.clone());
        let missing = Family::<Repo, Gauge>::default();
        r.register_with_unit(
            "sync_missing",
            "Chunk bytes the sync in progress still needs",
            Unit::Bytes,
            missing.clone(),
        );
        let update_changed = Family::<Repo, Gauge>::default();
        r.register_with_unit(
            "update_changed",
            "Origin: bytes of the files the newest snapshot added or changed",
            Unit::Bytes,
            update_changed.clone(),
        );
        let origin_update_sent = Family::<Repo, Gauge>::default();
        r.register_with_unit(
            "origin_update_sent",
            "Origin: chunk bytes sent since the newest snapshot was published (divide by update_changed_bytes for \
             origin bytes per update byte)",
            Unit::Bytes,
            origin_update_sent.clone(),
        );
        let waiting_for_origin = Family::<Repo, Gauge>::default();
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
        let root_created = Family::<Repo, Gauge>::default();
        r.register_with_unit(
            "root_created_timestamp",
            "When the origin created the root of the snapshot served here (Unix time)",
            Unit::Seconds,
            root_created.clone(),
        );
        let root_expires = Family::<Repo, Gauge>::default();
        r.register_with_unit(
            "root_expires_timestamp",
            "When the root of the snapshot served here expires (Unix time)",
            Unit::Seconds,
            root_expires.clone(),
        );
        let last_apply = Family::<Repo, Gauge>::default();
        r.register_with_unit(
            "last_apply_timestamp",
            "When the snapshot served here was put in place here (Unix time; mirrors)",
            Unit::Seconds,
            last_apply.clone(),
        );
        Self {
            registry: std::sync::Arc::new(r),
            last_apply,
            process: std::sync::Arc::new(ProcessMetrics::new()),
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
            loop_turn,
            sync_duration,
            propagation_lag,
            snapshot_seq,
            missing,
            update_changed,
            origin_update_sent,
        }
    }

    /// Every metric in the OpenMetrics text format (what Prometheus asks for first). The process metrics are read
    /// now.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = self.process.encode(&mut out);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
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
        for repo in status.repos.iter().take(LABEL_VALUES_MAX) {
            let label = Repo { repo: repo.name.clone() };
            self.snapshot_seq.get_or_create(&label).set(repo.seq.map_or(0, |s| s as i64));
            self.missing.get_or_create(&label).set(repo.bytes_missing as i64);
            self.waiting_for_origin.get_or_create(&label).set(i64::from(repo.waiting_for_origin));
            self.root_created.get_or_create(&label).set(repo.created_ms.map_or(0, |ms| (ms / 1000) as i64));
            self.root_expires.get_or_create(&label).set(repo.expires_ms.map_or(0, |ms| (ms / 1000) as i64));
            self.last_apply.get_or_create(&label).set(repo.last_apply_ms.map_or(0, |ms| (ms / 1000) as i64));
        }
        self.failing.set(i64::from(!status.problems.is_empty()));
        for kind in ProblemKind::ALL {
            let present = status.problems.iter().any(|p| p.kind == kind);
            self.problem.get_or_create(&Kind { kind: kind.name().into() }).set(i64::from(present));
        }
        // The origin publishes one repository: its first.
        if let (Some(sent), Some(repo)) = (origin_update_sent, status.repos.first()) {
            self.origin_update_sent.get_or_create(&Repo { repo: repo.name.clone() }).set(sent as i64);
        }
    }

    /// A sync of `repo` ended `seconds` after its root was accepted, `lag_seconds` after the root's creation.
    pub fn observe_sync(&self, repo: &str, seconds: f64, lag_seconds: Option<f64>) {
        let label = Repo { repo: repo.into() };
        self.sync_duration.get_or_create(&label).observe(seconds);
        if let Some(lag) = lag_seconds {
            self.propagation_lag.get_or_create(&label).observe(lag);
        }
    }

    /// One turn of the event loop took `seconds`.
    pub fn observe_loop_turn(&self, seconds: f64) {
        self.loop_turn.observe(seconds);
    }

    /// Origin: a snapshot of `repo` was published that added or changed `bytes` of files.
    pub fn published(&self, repo: &str, bytes: u64) {
        let label = Repo { repo: repo.into() };
        self.update_changed.get_or_create(&label).set(bytes as i64);
        self.origin_update_sent.get_or_create(&label).set(0);
    }
}

/// The process's own metrics, named as every Prometheus client library names them (no `mirrormesh_` prefix), so
/// the dashboards and rules written for them apply as they are. Read from `/proc` at each scrape: counting the open
/// descriptors walks `/proc/self/fd`, which should not run every time the status is refreshed.
struct ProcessMetrics {
    registry: Registry,
    cpu: Counter<f64, std::sync::atomic::AtomicU64>,
    resident: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        r.register_with_unit("process_cpu", "User and system CPU time spent", Unit::Seconds, cpu.clone());
        let resident = Gauge::default();
        r.register_with_unit("process_resident_memory", "Resident memory size", Unit::Bytes, resident.clone());
        let open_fds = Gauge::default();
        r.register("process_open_fds", "Open file descriptors", open_fds.clone());
        let max_fds = Gauge::default();
        r.register("process_max_fds", "Most file descriptors the process may open", max_fds.clone());
        let start_time = Gauge::default();
        r.register_with_unit(
            "process_start_time",
            "When the process started (Unix time)",
            Unit::Seconds,
            start_time.clone(),
        );
        Self { registry: r, cpu, resident, open_fds, max_fds, start_time }
    }

    /// Reads `/proc` (a value that cannot be read keeps its last one) and encodes the metrics.
    fn encode(&self, out: &mut String) -> std::fmt::Result {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        if let Some(stat) = proc_stat_fields() {
            let field = |i: usize| stat.get(i).and_then(|f| f.parse::<u64>().ok());
            // Fields after the command name, from the state (field 3 of proc(5)): utime 14, stime 15, starttime 22.
            if let (Some(utime), Some(stime)) = (field(11), field(12)) {
                let total = (utime + stime) as f64 / ticks;
                let now = self.cpu.get();
                if total > now {
                    self.cpu.inc_by(total - now);
                }
            }
            if let (Some(start), Some(boot)) = (field(19), boot_time()) {
                self.start_time.set((boot + start / ticks as u64) as i64);
            }
        }
        if let Some(pages) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|t| t.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        {
            self.resident.set((pages * rustix::param::page_size() as u64) as i64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            self.max_fds.set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }
}

/// The fields of `/proc/self/stat` after the command name (which may hold spaces and parentheses).
fn proc_stat_fields() -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// When the machine booted (Unix time), from `/proc/stat`.
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
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
        s.repos.push(RepoStatus {
            name: "alpine".into(),
            seq: Some(3),
            bytes_missing: 7,
            last_apply_ms: Some(1_700_000_000_500),
            ..Default::default()
        });
        s.counters.insert("chunks_verified".into(), 4);
        s.counters.insert("roots_rejected_bad_signature".into(), 2);
        s.counters.insert("data_refused_not_allowed".into(), 1);
        m.refresh(&s, None);
        // A peer that reconnected starts its totals again: the counters do not go down.
        s.peers[0].bytes_received = 10;
        m.refresh(&s, None);
        m.observe_sync("alpine", 1.5, Some(2.0));
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
            "mirrormesh_snapshot_seq{repo=\"alpine\"} 3",
            "mirrormesh_sync_missing_bytes{repo=\"alpine\"} 7",
            "mirrormesh_last_apply_timestamp_seconds{repo=\"alpine\"} 1700000000",
            "mirrormesh_sync_duration_seconds_count{repo=\"alpine\"} 1",
            "mirrormesh_propagation_lag_seconds_sum{repo=\"alpine\"} 2.0",
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

    #[test]
    fn build_info_and_process_metrics_are_exported() {
        // Work until the kernel has counted a clock tick of CPU time for this process.
        let ticks = || proc_stat_fields().map_or(0, |f| f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap());
        let mut data = vec![0u8; 1 << 20];
        while ticks() == 0 {
            data = blake3::hash(&data).as_bytes().repeat(1 << 15);
        }
        let text = Metrics::new().encode_text();
        let build = format!("mirrormesh_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1");
        assert!(text.lines().any(|l| l == build), "no {build:?} in\n{text}");
        assert!(!COMMIT.is_empty());
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"), "{text}");
        assert!(value("process_cpu_seconds_total") > 0.0);
        assert!(value("process_resident_memory_bytes") > 1_000_000.0, "a test process holds megabytes");
        let open = value("process_open_fds");
        assert!(open >= 3.0 && open <= value("process_max_fds"), "{open} open");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started <= now + 1.0 && now - started < 3600.0, "started {started}, now {now}");
        assert!(text.ends_with('\n') && !text.contains("# EOF"), "{text}");
        assert_eq!(Metrics::new().encode_openmetrics().matches("# EOF").count(), 1, "one EOF, at the end");
    }
}
