//! What downstream mirrors read: after every snapshot a mirror puts in place, it writes inside its tree the files
//! downstream tools know, and tells an MQTT broker, so the mirrors that rsync from it (Tier 2, the CDN) keep working
//! and start at once. Every part is optional (`[downstream]` in the config).
//!
//! - `last_updated` (Alpine): one line, the time the snapshot was created at the origin in Unix seconds, as Alpine's
//!   master writes its `last-updated` and mirror status pages read it.
//! - `trace_dir` (Debian's ftpsync): `<trace_dir>/<host>`, a trace file in ftpsync's style: a first line with the
//!   date, then `Key: value` lines naming the chain (the origin's node id as the upstream, this node and its host),
//!   the times (snapshot created at the origin, sync started, snapshot in place, propagation lag) and the snapshot
//!   (sequence number as the archive serial, manifest root).
//! - `mqtt_broker` (Alpine's `mqtt-exec` subscribers): one message per directory whose files changed, on the topic
//!   `<mqtt_topic>/<dir>` with the directory (relative to the tree, the rsync module's root) as the payload, as
//!   `mqtt-exec -t 'rsync/HOST/#' -- SCRIPT` passes it to a script that rsyncs just that directory. A snapshot that
//!   changed more than [`MQTT_DIRS_PER_SNAPSHOT_MAX`] directories (the first sync, say) is one message on
//!   `<mqtt_topic>` with an empty payload: sync everything. Sent with QoS 1 after the files above are written, so a
//!   triggered rsync finds them.
//!
//! Rules:
//! 1. These files belong to this node and never travel: an origin leaves the paths its own `[downstream]` names out
//!    of its snapshots (`scan.rs`), and a mirror never schedules their removal (a snapshot that stops naming them).
//! 2. The snapshot wins: a path the snapshot in place names is not written (`downstream_named_by_snapshot`), since
//!    the tree must stay identical to the origin's (peers are served chunks from it).
//! 3. Written atomically: the new content goes to a temporary file in the staging directory (same filesystem,
//!    outside the tree, so rsync never picks up a partial file) and is renamed into place. Directories on the way
//!    are opened without following symlinks, and created if missing.
//! 4. Nothing here blocks the event loop: the loop hands each applied snapshot to a worker task through a bounded
//!    queue ([`DOWNSTREAM_QUEUE_MAX`]; a full queue drops the job and counts `downstream_queue_full`); files are
//!    written on the blocking pool; the MQTT connection is driven by a task of its own, which reconnects with
//!    back-off. Failures are counted (`downstream_write_failures`, `mqtt_publish_failures`,
//!    `mqtt_connection_failures`) and logged, and never stop the daemon.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use mirrormesh_proto::diff::Change;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::lookup::Lookup;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::tree::split_parent;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::store::StateStore;

/// Applied snapshots waiting for the worker. Each job is small; a worker this far behind has a stuck disk or
/// broker, and the next snapshot's files supersede a dropped one's.
pub const DOWNSTREAM_QUEUE_MAX: usize = 16;
/// Most directories named one by one in MQTT messages for one snapshot; beyond it, one "sync everything" message.
/// Alpine's updates touch a few `branch/repo/arch` directories at a time; the first sync touches all of them.
pub const MQTT_DIRS_PER_SNAPSHOT_MAX: usize = 64;
/// MQTT messages queued for the broker connection (the client's request queue).
pub const MQTT_QUEUE_MAX: usize = 256;
/// Longest `mqtt_topic` (MQTT allows 65,535 bytes; a directory path is appended to it).
pub const MQTT_TOPIC_LEN_MAX: usize = 256;
/// Longest host name (a DNS name's limit).
pub const HOST_LEN_MAX: usize = 253;
/// The broker connection's keep-alive.
pub const MQTT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Reconnect back-off bounds after the broker connection failed.
pub const MQTT_RECONNECT_MIN: Duration = Duration::from_secs(1);
pub const MQTT_RECONNECT_MAX: Duration = Duration::from_secs(60);

/// The `[downstream]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamSection {
    host: Option<String>,
    last_updated: Option<String>,
    trace_dir: Option<String>,
    mqtt_broker: Option<String>,
    mqtt_topic: Option<String>,
}

/// What to write and tell after each snapshot (validated `[downstream]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownstreamConfig {
    /// This node's public host name (trace file name, default MQTT topic).
    pub host: String,
    /// Path in the tree of Alpine's `last-updated` file.
    pub last_updated: Option<String>,
    /// Path in the tree of the trace file (`<trace_dir>/<host>`).
    pub trace: Option<String>,
    pub mqtt: Option<MqttConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Topic prefix: messages go to `<topic>/<dir>`.
    pub topic: String,
}

impl DownstreamConfig {
    /// Validates the section; every error names its key.
    pub fn new(section: &DownstreamSection) -> Result<Self> {
        let host = match &section.host {
            Some(host) => host.clone(),
            None if section.trace_dir.is_some() || section.mqtt_broker.is_some() => {
                system_host_name().context("downstream.host: not set, and the system's host name cannot be read")?
            }
            None => String::new(),
        };
        if section.host.is_some() || !host.is_empty() {
            check_host(&host).map_err(|e| anyhow!("downstream.host: {host:?} {e}"))?;
        }
        let in_tree = |key: &str, path: &str| -> Result<String> {
            mirrormesh_proto::path::validate_rel_path(path)
                .map_err(|e| anyhow!("downstream.{key}: {path:?} is not a path inside the tree: {e}"))?;
            Ok(path.to_owned())
        };
        let last_updated = section.last_updated.as_deref().map(|p| in_tree("last_updated", p)).transpose()?;
        let trace = match &section.trace_dir {
            Some(dir) => {
                in_tree("trace_dir", dir)?;
                Some(in_tree("trace_dir", &format!("{dir}/{host}"))?)
            }
            None => None,
        };
        if let (Some(a), Some(b)) = (&last_updated, &trace)
            && (a == b || b.starts_with(&format!("{a}/")))
        {
            bail!("downstream.last_updated: {a:?} collides with the trace file {b:?}");
        }
        let mqtt = match &section.mqtt_broker {
            None => {
                if section.mqtt_topic.is_some() {
                    bail!("downstream.mqtt_topic: needs downstream.mqtt_broker");
                }
                None
            }
            Some(broker) => {
                let (host_part, port) = broker
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p > 0)?)))
                    .ok_or_else(|| anyhow!("downstream.mqtt_broker: {broker:?} is not host:port"))?;
                let broker_host = host_part.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host_part);
                if broker_host.is_empty() || broker_host.contains(['/', ' ']) {
                    bail!("downstream.mqtt_broker: {broker:?} is not host:port");
                }
                let topic = section.mqtt_topic.clone().unwrap_or_else(|| format!("rsync/{host}"));
                check_topic(&topic).map_err(|e| anyhow!("downstream.mqtt_topic: {topic:?} {e}"))?;
                Some(MqttConfig { host: broker_host.to_owned(), port, topic })
            }
        };
        Ok(Self { host, last_updated, trace, mqtt })
    }

    /// Whether anything is to be done after a snapshot.
    pub fn any(&self) -> bool {
        self.last_updated.is_some() || self.trace.is_some() || self.mqtt.is_some()
    }

    /// The files this node writes in its tree: never published, never removed by a sync.
    pub fn paths(&self) -> Vec<String> {
        self.last_updated.iter().chain(self.trace.iter()).cloned().collect()
    }
}

fn check_host(host: &str) -> Result<(), &'static str> {
    let ok = !host.is_empty()
        && host.len() <= HOST_LEN_MAX
        && !host.starts_with('.')
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok { Ok(()) } else { Err("is not a host name (letters, digits, '-' and '.')") }
}

fn check_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() || topic.len() > MQTT_TOPIC_LEN_MAX {
        return Err("must be 1 to 256 bytes long");
    }
    if topic.contains(['+', '#', '\0']) {
        return Err("must not contain the wildcards + or # (it is where messages are published)");
    }
    if topic.starts_with('/') || topic.ends_with('/') {
        return Err("must not start or end with '/'");
    }
    Ok(())
}

/// The machine's host name (`/proc/sys/kernel/hostname`).
fn system_host_name() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_owned();
    check_host(&name).map_err(|e| anyhow!("{name:?} {e}"))?;
    Ok(name)
}

/// One snapshot put in place, as the worker needs it.
#[derive(Debug, Clone)]
pub struct Applied {
    pub seq: u64,
    /// Manifest root of the snapshot (to check which paths it names, and for the trace).
    pub root: NodeHash,
    /// When the origin created the snapshot, and when it expires (Unix milliseconds).
    pub created_ms: u64,
    pub expires_ms: u64,
    /// When this node accepted the snapshot's root (the sync began), if it synced it.
    pub accepted_ms: Option<u64>,
    /// When it was in place here.
    pub applied_ms: u64,
    /// The origin's node id (the publisher of the root).
    pub origin: String,
    /// This node's id.
    pub node: String,
    /// Directories whose files changed, relative to the tree (`""` is the tree itself); `None`: too many, or all.
    pub dirs: Option<BTreeSet<String>>,
}

/// Directories holding the files, symlinks and directories `changes` add, change or remove; `None` when there are
/// more than [`MQTT_DIRS_PER_SNAPSHOT_MAX`].
pub fn changed_dirs(changes: &[Change]) -> Option<BTreeSet<String>> {
    let mut dirs = BTreeSet::new();
    for change in changes {
        let is_dir = |kind: Option<&EntryKind>| matches!(kind, Some(EntryKind::Dir { .. }));
        if is_dir(change.new.as_ref().map(|e| &e.kind)) && change.old.as_ref().is_none_or(|e| is_dir(Some(&e.kind))) {
            // A directory's own listing changes with the entries in it, which are counted for themselves.
            continue;
        }
        dirs.insert(split_parent(&change.path).0.to_owned());
        if dirs.len() > MQTT_DIRS_PER_SNAPSHOT_MAX {
            return None;
        }
    }
    Some(dirs)
}

/// What the worker did, counted for the status and `/metrics` (`mirrormesh_events_total{event=...}`).
#[derive(Default)]
pub struct Counts {
    pub files_written: AtomicU64,
    pub write_failures: AtomicU64,
    pub named_by_snapshot: AtomicU64,
    pub queue_full: AtomicU64,
    pub mqtt_queued: AtomicU64,
    pub mqtt_published: AtomicU64,
    pub mqtt_publish_failures: AtomicU64,
    pub mqtt_connection_failures: AtomicU64,
}

/// The daemon's handle on the downstream worker.
pub struct Downstream {
    config: DownstreamConfig,
    jobs: Option<mpsc::Sender<Applied>>,
    counts: Arc<Counts>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Downstream {
    /// Does nothing after a snapshot (nothing configured, or an origin).
    pub fn none(config: DownstreamConfig) -> Self {
        Self { config, jobs: None, counts: Arc::default(), tasks: Vec::new() }
    }

    /// Starts the worker (and the broker connection) for a mirror whose tree is `tree`, with temporary files in
    /// `<staging_dir>/downstream`. Must run inside the tokio runtime.
    pub fn start(config: DownstreamConfig, tree: PathBuf, staging_dir: &Path, store: Arc<StateStore>) -> Result<Self> {
        if !config.any() {
            return Ok(Self::none(config));
        }
        let tmp = staging_dir.join("downstream");
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let counts = Arc::new(Counts::default());
        let mut tasks = Vec::new();
        let mqtt = match &config.mqtt {
            Some(mqtt) => {
                let id = format!("mirrormesh-{}", config.host);
                let mut options = rumqttc::MqttOptions::new(id, mqtt.host.clone(), mqtt.port);
                options.set_keep_alive(MQTT_KEEP_ALIVE);
                let (client, eventloop) = rumqttc::AsyncClient::new(options, MQTT_QUEUE_MAX);
                let connection = tokio::spawn(drive_connection(eventloop, counts.clone(), mqtt.clone()));
                tasks.push(connection.abort_handle());
                Some((client, mqtt.topic.clone()))
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(DOWNSTREAM_QUEUE_MAX);
        let worker = Worker { config: config.clone(), tree, tmp, store, counts: counts.clone(), mqtt };
        tasks.push(tokio::spawn(worker.run(rx)).abort_handle());
        Ok(Self { config, jobs: Some(tx), counts, tasks })
    }

    pub fn config(&self) -> &DownstreamConfig {
        &self.config
    }

    /// A snapshot is in place: queue its files and messages (never waits).
    pub fn applied(&self, job: Applied) {
        let Some(jobs) = &self.jobs else { return };
        if jobs.try_send(job).is_err() {
            self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("downstream: the worker is behind; this snapshot's files and messages are skipped");
        }
    }

    /// Every count that is not zero, named as the status's counters.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counts;
        [
            ("downstream_files_written", &c.files_written),
            ("downstream_write_failures", &c.write_failures),
            ("downstream_named_by_snapshot", &c.named_by_snapshot),
            ("downstream_queue_full", &c.queue_full),
            ("mqtt_messages_queued", &c.mqtt_queued),
            ("mqtt_messages_published", &c.mqtt_published),
            ("mqtt_publish_failures", &c.mqtt_publish_failures),
            ("mqtt_connection_failures", &c.mqtt_connection_failures),
        ]
        .into_iter()
        .map(|(name, n)| (name, n.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Worker {
    config: DownstreamConfig,
    tree: PathBuf,
    tmp: PathBuf,
    store: Arc<StateStore>,
    counts: Arc<Counts>,
    mqtt: Option<(rumqttc::AsyncClient, String)>,
}

impl Worker {
    async fn run(self, mut jobs: mpsc::Receiver<Applied>) {
        let this = Arc::new(self);
        while let Some(job) = jobs.recv().await {
            let writer = this.clone();
            let files = job.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || writer.write_files(&files)).await {
                tracing::error!("downstream: writing files panicked: {e}");
            }
            this.publish(&job);
        }
    }

    /// Writes `last_updated` and the trace file (blocking).
    fn write_files(&self, job: &Applied) {
        let mut files = Vec::new();
        if let Some(path) = &self.config.last_updated {
            files.push((path, format!("{}\n", job.created_ms / 1000)));
        }
        if let Some(path) = &self.config.trace {
            files.push((path, trace_text(job, &self.config.host)));
        }
        if files.is_empty() {
            return;
        }
        let named = match self.named_by_snapshot(job, files.iter().map(|(p, _)| p.as_str())) {
            Ok(named) => named,
            Err(e) => {
                self.counts.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(seq = job.seq, "downstream: reading the snapshot: {e:#}");
                return;
            }
        };
        for (path, text) in files {
            if named.iter().any(|n| n == path) {
                self.counts.named_by_snapshot.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    seq = job.seq,
                    path,
                    "downstream: the snapshot itself holds this file, so it is left as the origin published it (list \
                     it in the origin's [downstream] too, so the origin leaves it out)"
                );
                continue;
            }
            let tmp_name = format!("{}.{}", split_parent(path).1, job.seq);
            match write_beneath(&self.tree, path, text.as_bytes(), &self.tmp, &tmp_name) {
                Ok(()) => {
                    self.counts.files_written.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(seq = job.seq, path, "downstream file written");
                }
                Err(e) => {
                    self.counts.write_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(seq = job.seq, path, "downstream: writing the file failed: {e:#}");
                }
            }
        }
    }

    /// The `paths` the snapshot in place names (as anything).
    fn named_by_snapshot<'p>(&self, job: &Applied, paths: impl Iterator<Item = &'p str>) -> Result<Vec<String>> {
        let reader = self.store.reader()?;
        let mut lookup = Lookup::new(&reader, job.root);
        let mut named = Vec::new();
        for path in paths {
            if lookup.names(path)? {
                named.push(path.to_owned());
            }
        }
        Ok(named)
    }

    /// Queues the snapshot's MQTT messages (never waits: a full queue is a failure, counted).
    fn publish(&self, job: &Applied) {
        let Some((client, prefix)) = &self.mqtt else { return };
        let messages: Vec<(String, String)> = match &job.dirs {
            Some(dirs) => dirs.iter().map(|dir| (topic_of(prefix, dir), dir.clone())).collect(),
            None => vec![(prefix.clone(), String::new())],
        };
        for (topic, payload) in messages {
            match client.try_publish(topic.as_str(), rumqttc::QoS::AtLeastOnce, false, payload.into_bytes()) {
                Ok(()) => {
                    self.counts.mqtt_queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.counts.mqtt_publish_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(seq = job.seq, topic, "MQTT: message not queued: {e}");
                }
            }
        }
    }
}

/// `<prefix>/<dir>`, or the prefix itself for the tree's top directory.
pub fn topic_of(prefix: &str, dir: &str) -> String {
    if dir.is_empty() { prefix.to_owned() } else { format!("{prefix}/{dir}") }
}

/// Drives the broker connection: connects, sends what the worker queued, counts acknowledgements, reconnects with
/// back-off after a failure.
async fn drive_connection(mut eventloop: rumqttc::EventLoop, counts: Arc<Counts>, mqtt: MqttConfig) {
    use rumqttc::{Event, Packet};
    let mut backoff = MQTT_RECONNECT_MIN;
    let broker = format!("{}:{}", mqtt.host, mqtt.port);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(broker, topic = mqtt.topic, "MQTT broker connected");
                backoff = MQTT_RECONNECT_MIN;
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                counts.mqtt_published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                counts.mqtt_connection_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(broker, "MQTT broker connection failed: {e}; trying again in {backoff:?}");
                // A reconnect delay, not a synchronisation: the broker is down or unreachable.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MQTT_RECONNECT_MAX);
            }
        }
    }
}

/// The trace file, in the style of Debian's ftpsync (`project/trace/<host>`).
pub fn trace_text(job: &Applied, host: &str) -> String {
    let date = |ms: u64| rfc2822(ms / 1000);
    let mut text = String::new();
    text.push_str(&format!("{}\n", date(job.applied_ms)));
    text.push_str(&format!("Date: {}\n", date(job.applied_ms)));
    if let Some(accepted) = job.accepted_ms {
        text.push_str(&format!("Date-Started: {}\n", date(accepted)));
    }
    text.push_str(&format!("Archive serial: {}\n", job.seq));
    text.push_str(&format!("Creator: mirrormesh {}\n", crate::metrics::VERSION));
    text.push_str(&format!("Running on host: {host}\n"));
    text.push_str("Trigger: mirrormesh\n");
    text.push_str(&format!("Upstream-mirror: {}\n", job.origin));
    text.push_str(&format!("Node: {}\n", job.node));
    text.push_str(&format!("Snapshot-created: {}\n", date(job.created_ms)));
    text.push_str(&format!("Snapshot-expires: {}\n", date(job.expires_ms)));
    text.push_str(&format!("Snapshot-root: {}\n", job.root.to_hex()));
    text.push_str(&format!("Propagation-lag: {} s\n", job.applied_ms.saturating_sub(job.created_ms) / 1000));
    text
}

/// `Tue, 03 Dec 2026 10:00:05 +0000` (RFC 2822, UTC) for Unix seconds.
pub fn rfc2822(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm, proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes `bytes` to `path` (relative to `tree`) atomically: into `tmp_dir/tmp_name` first (same filesystem, outside
/// the tree), then renamed into place. Directories on the way are created (mode 0755) and never followed through a
/// symlink.
pub fn write_beneath(tree: &Path, path: &str, bytes: &[u8], tmp_dir: &Path, tmp_name: &str) -> Result<()> {
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let root =
        rustix::fs::open(tree, dir_flags, Mode::empty()).with_context(|| format!("opening {}", tree.display()))?;
    let (parent, name) = split_parent(path);
    let mut dir: Option<OwnedFd> = None;
    for component in parent.split('/').filter(|c| !c.is_empty()) {
        if component == "." || component == ".." {
            bail!("{path}: not a plain path");
        }
        let at = dir.as_ref().unwrap_or(&root);
        let open = || rustix::fs::openat(at.as_fd(), component, dir_flags | OFlags::NOFOLLOW, Mode::empty());
        let fd = match open() {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(at.as_fd(), component, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(anyhow!("creating {component} on the way to {path}: {e}")),
                }
                open().map_err(|e| anyhow!("opening {component} on the way to {path}: {e}"))?
            }
            Err(Errno::LOOP | Errno::NOTDIR) => bail!("{path}: {component} on the way is not a directory"),
            Err(e) => bail!("opening {component} on the way to {path}: {e}"),
        };
        dir = Some(fd);
    }
    let tmp = rustix::fs::open(tmp_dir, dir_flags, Mode::empty())
        .with_context(|| format!("opening {}", tmp_dir.display()))?;
    let file_flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(tmp.as_fd(), tmp_name, file_flags, Mode::from_raw_mode(0o644))
        .with_context(|| format!("creating {}/{tmp_name}", tmp_dir.display()))?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, bytes).context("writing")?;
    // Readable by the web server and rsyncd whatever the umask.
    rustix::fs::fchmod(&file, Mode::from_raw_mode(0o644)).context("setting its mode")?;
    file.sync_data().context("flushing")?;
    drop(file);
    let at = dir.as_ref().unwrap_or(&root);
    rustix::fs::renameat(tmp.as_fd(), tmp_name, at.as_fd(), name).map_err(|e| {
        let _ = rustix::fs::unlinkat(tmp.as_fd(), tmp_name, rustix::fs::AtFlags::empty());
        anyhow!("renaming into place at {path}: {e}")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> DownstreamSection {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn config_defaults_and_errors_name_the_key() {
        let c = DownstreamConfig::new(&section("")).unwrap();
        assert!(!c.any() && c.paths().is_empty());
        let c = DownstreamConfig::new(&section(
            "host = \"m1.example.org\"\nlast_updated = \"last-updated\"\ntrace_dir = \"project/trace\"\n\
             mqtt_broker = \"127.0.0.1:1883\"\n",
        ))
        .unwrap();
        assert_eq!(c.paths(), ["last-updated", "project/trace/m1.example.org"]);
        assert_eq!(
            c.mqtt,
            Some(MqttConfig { host: "127.0.0.1".into(), port: 1883, topic: "rsync/m1.example.org".into() })
        );
        let c =
            DownstreamConfig::new(&section("host = \"m\"\nmqtt_broker = \"[::1]:1\"\nmqtt_topic = \"a/b\"")).unwrap();
        assert_eq!(c.mqtt.unwrap().host, "::1");
        let err = |text: &str| format!("{:#}", DownstreamConfig::new(&section(text)).unwrap_err());
        assert!(err("host = \"a/b\"").contains("downstream.host"));
        assert!(err("last_updated = \"../x\"").contains("downstream.last_updated"));
        assert!(err("last_updated = \"/etc/passwd\"").contains("downstream.last_updated"));
        assert!(err("host = \"h\"\ntrace_dir = \"a/../b\"").contains("downstream.trace_dir"));
        assert!(err("host = \"h\"\nmqtt_broker = \"nohost\"").contains("downstream.mqtt_broker"));
        assert!(err("host = \"h\"\nmqtt_broker = \"h:0\"").contains("downstream.mqtt_broker"));
        assert!(err("host = \"h\"\nmqtt_broker = \"h:1\"\nmqtt_topic = \"rsync/#\"").contains("downstream.mqtt_topic"));
        assert!(err("mqtt_topic = \"t\"").contains("downstream.mqtt_topic"));
        assert!(err("host = \"h\"\nlast_updated = \"t\"\ntrace_dir = \"t\"").contains("collides"));
        assert!(toml::from_str::<DownstreamSection>("bogus = 1").is_err());
    }

    #[test]
    fn dates_are_rfc2822() {
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc2822(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc2822(1_796_292_005), "Thu, 03 Dec 2026 10:00:05 +0000");
    }

    #[test]
    fn changed_directories_are_the_parents_of_what_changed() {
        use mirrormesh_proto::entry::{Entry, FileMeta};
        let file = |name: &str| Entry {
            name: name.into(),
            kind: EntryKind::File(FileMeta { mode: 0o644, size: 1, mtime: 0, chunks: Vec::new() }),
        };
        let change = |path: &str, old: Option<Entry>, new: Option<Entry>| Change { path: path.into(), old, new };
        let changes = vec![
            change("v3.22/main/x86_64/a.apk", None, Some(file("a.apk"))),
            change("v3.22/main/x86_64/APKINDEX.tar.gz", Some(file("APKINDEX.tar.gz")), Some(file("APKINDEX.tar.gz"))),
            change("edge/main/aarch64/b.apk", Some(file("b.apk")), None),
            change("README", None, Some(file("README"))),
        ];
        let dirs = changed_dirs(&changes).unwrap();
        assert_eq!(dirs.into_iter().collect::<Vec<_>>(), ["", "edge/main/aarch64", "v3.22/main/x86_64"]);
        let many: Vec<Change> =
            (0..=MQTT_DIRS_PER_SNAPSHOT_MAX).map(|i| change(&format!("d{i}/f"), None, Some(file("f")))).collect();
        assert_eq!(changed_dirs(&many), None, "too many: sync everything");
        assert_eq!(topic_of("rsync/m1", ""), "rsync/m1");
        assert_eq!(topic_of("rsync/m1", "edge/main"), "rsync/m1/edge/main");
    }

    #[test]
    fn files_are_written_atomically_beneath_the_tree_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let tmp = dir.path().join("tmp");
        let outside = dir.path().join("outside");
        for d in [&tree, &tmp, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        write_beneath(&tree, "project/trace/m1", b"one", &tmp, "m1.1").unwrap();
        write_beneath(&tree, "project/trace/m1", b"two", &tmp, "m1.2").unwrap();
        assert_eq!(std::fs::read(tree.join("project/trace/m1")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "no temporary file left");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tree.join("project/trace/m1")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        std::os::unix::fs::symlink(&outside, tree.join("escape")).unwrap();
        let e = write_beneath(&tree, "escape/last-updated", b"x", &tmp, "x").unwrap_err();
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside the tree");
    }
}
