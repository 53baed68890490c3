//! Living under a service manager: systemd's notification protocol and the journal's log priorities.
//!
//! A daemon started by systemd with `Type=notify` finds a Unix datagram socket in `NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`) and sends it newline-separated `KEY=VALUE` assignments, one datagram per
//! message (`sd_notify(3)`). What this daemon sends, and when:
//!
//! 1. `READY=1` (with a first `STATUS=`) when the event loop starts: by then the control plane, the data plane and
//!    the admin API listen, so a unit ordered after this one finds the node answering.
//! 2. `STATUS=...` whenever the one-line summary changes (snapshot served, sync phase and progress in whole percent,
//!    peers, problems): `systemctl status mirrormesh` shows it.
//! 3. `RELOADING=1` (with `MONOTONIC_USEC=`) when SIGHUP is taken up, then `READY=1` once the reload is done or
//!    refused.
//! 4. `WATCHDOG=1` every half of `WATCHDOG_USEC`, sent from the event loop itself (after each of its events; the
//!    loop ticks every 50 ms), so a loop that hangs stops the pings and systemd restarts the daemon. `WATCHDOG_PID`,
//!    when set, must name this process, else the watchdog is not ours and nothing is sent.
//! 5. `STOPPING=1` when the daemon begins to shut down.
//!
//! Without `NOTIFY_SOCKET` (OpenRC, a terminal, the tests' fabrics) nothing is sent. A send that fails is counted
//! (`service_notify_failures`) and logged once; it never stops the daemon.
//!
//! Log priorities: journald reads a `<N>` prefix on each line of a service's stderr as its syslog priority. When
//! stderr is the journal (`JOURNAL_STREAM` names its device and inode, as systemd sets it), every log line starts
//! with the priority of its level (`ERROR` 3, `WARN` 4, `INFO` 6, `DEBUG` and `TRACE` 7), so `journalctl -p
//! warning` finds warnings and errors; anywhere else lines are left as they are. This keeps one log format for
//! every service manager (OpenRC logs stderr to a file) and needs no journald client library.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use tracing::Level;

/// Longest `STATUS=` text sent (systemd shows one line; a longer one is cut at a character boundary).
pub const STATUS_LEN_MAX: usize = 512;

/// Where and how to tell the service manager about this daemon.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `WATCHDOG_USEC`: how often the loop must say it is alive.
    watchdog_every: Option<Duration>,
    next_watchdog: Option<Instant>,
    last_status: String,
    /// `READY=1` was sent: status lines before it wait for it.
    ready: bool,
    failures: u64,
}

impl Notifier {
    /// The service manager named by the environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`), if any.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let socket = var("NOTIFY_SOCKET").and_then(|path| match notify_address(&path) {
            Ok(addr) => match UnixDatagram::unbound() {
                Ok(sock) => Some((sock, addr)),
                Err(e) => {
                    tracing::warn!("NOTIFY_SOCKET {path}: cannot create a socket: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET {path:?} is not usable: {e}");
                None
            }
        });
        let ours = var("WATCHDOG_PID").is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog_every = var("WATCHDOG_USEC")
            .filter(|_| ours && socket.is_some())
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .map(|usec| Duration::from_micros(usec) / 2);
        Self { socket, watchdog_every, next_watchdog: None, last_status: String::new(), ready: false, failures: 0 }
    }

    /// A notifier that sends nothing.
    pub fn none() -> Self {
        Self {
            socket: None,
            watchdog_every: None,
            next_watchdog: None,
            last_status: String::new(),
            ready: false,
            failures: 0,
        }
    }

    /// How often the watchdog is fed, when systemd asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// Sends that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// The daemon listens and runs.
    pub fn ready(&mut self, status: &str) {
        self.last_status = status_text(status);
        let message = format!("READY=1\nSTATUS={}", self.last_status);
        self.send(&message);
        self.ready = true;
        self.next_watchdog = self.watchdog_every.map(|every| Instant::now() + every);
    }

    /// The one-line summary, sent if it changed.
    pub fn status(&mut self, status: &str) {
        let text = status_text(status);
        if text != self.last_status {
            if self.ready {
                self.send(&format!("STATUS={text}"));
            }
            self.last_status = text;
        }
    }

    /// A reload begins (SIGHUP).
    pub fn reloading(&mut self) {
        let message = match monotonic_usec() {
            Some(usec) => format!("RELOADING=1\nMONOTONIC_USEC={usec}"),
            None => "RELOADING=1".to_owned(),
        };
        self.send(&message);
    }

    /// The reload is done (or refused): the daemon runs on.
    pub fn reloaded(&mut self) {
        let message = format!("READY=1\nSTATUS={}", self.last_status);
        self.send(&message);
    }

    /// The daemon begins to shut down.
    pub fn stopping(&mut self) {
        self.send("STOPPING=1");
        self.watchdog_every = None;
    }

    /// Feeds the watchdog if it is due (called from the event loop after each event).
    pub fn watchdog(&mut self, now: Instant) {
        let (Some(every), Some(due)) = (self.watchdog_every, self.next_watchdog) else { return };
        if now >= due {
            self.send("WATCHDOG=1");
            self.next_watchdog = Some(now + every);
        }
    }

    fn send(&mut self, message: &str) {
        let Some((socket, addr)) = &self.socket else { return };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            if self.failures == 0 {
                tracing::warn!("telling the service manager ({}) failed: {e}", message.lines().next().unwrap_or(""));
            }
            self.failures += 1;
        }
    }
}

/// The socket address `NOTIFY_SOCKET` names: a filesystem path, or (with a leading `@`) an abstract name.
fn notify_address(text: &str) -> io::Result<SocketAddr> {
    if let Some(name) = text.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if text.starts_with('/') {
        SocketAddr::from_pathname(text)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "neither an absolute path nor an @abstract name"))
    }
}

/// One line, at most [`STATUS_LEN_MAX`] bytes.
fn status_text(status: &str) -> String {
    let line = status.lines().next().unwrap_or("");
    let mut end = line.len().min(STATUS_LEN_MAX);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

/// The node's state in one line, for `STATUS=`: per repository the snapshot served and the sync in progress, then
/// the peers connected and the problems present.
pub fn summary(status: &crate::status::Status) -> String {
    let mut parts = Vec::new();
    for repo in &status.repos {
        let mut text = match repo.seq {
            Some(seq) => format!("{} seq {seq}", repo.name),
            None if status.role == "origin" => format!("{} nothing published yet", repo.name),
            None => format!("{} never synced", repo.name),
        };
        if repo.state == "syncing" {
            let target = repo.target_seq.map_or_else(String::new, |t| format!(" seq {t}"));
            let percent = (repo.progress.clamp(0.0, 1.0) * 100.0).floor();
            text.push_str(&format!(", syncing{target} ({} {percent:.0}%)", repo.phase));
        }
        parts.push(text);
    }
    let peers = status.peers.iter().filter(|p| p.connected).count();
    parts.push(format!("{peers} peer{}", if peers == 1 { "" } else { "s" }));
    if !status.problems.is_empty() {
        let kinds: Vec<&str> = status.problems.iter().map(|p| p.kind.name()).collect();
        parts.push(format!("problems: {}", kinds.join(", ")));
    }
    parts.join("; ")
}

/// `CLOCK_MONOTONIC` in microseconds (what `MONOTONIC_USEC=` carries).
fn monotonic_usec() -> Option<u64> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).ok()?;
    let nanos = u64::try_from(t.tv_nsec).ok()?;
    Some(secs * 1_000_000 + nanos / 1000)
}

/// Whether standard error is the journal: `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd for a service whose
/// output goes to the journal) names the file standard error is open on.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.trim().split_once(':') else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(stat) => stat.st_dev == dev && stat.st_ino == ino,
        Err(_) => false,
    }
}

/// The syslog priority journald gives a line of this level (`<N>` prefix).
pub fn journal_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A log line format that puts the level's journal priority (`<N>`) before each line of what `F` writes.
pub struct JournalPriority<F>(pub F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // A message of several lines (a config error quoting the file) would reach the journal as several entries,
        // the later ones at the default priority: each line gets the prefix.
        let mut text = String::new();
        self.0.format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut text), event)?;
        let priority = journal_priority(event.metadata().level());
        for line in text.lines() {
            writeln!(writer, "<{priority}>{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket_and_the_watchdog_only_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let mut n = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), SocketAddr::from_pathname(&path).unwrap())),
            watchdog_every: Some(Duration::from_secs(10)),
            next_watchdog: None,
            last_status: String::new(),
            ready: false,
            failures: 0,
        };
        let recv = || {
            let mut buf = [0u8; 1024];
            match server.recv(&mut buf) {
                Ok(len) => Some(String::from_utf8_lossy(&buf[..len]).into_owned()),
                Err(_) => None,
            }
        };
        let t0 = Instant::now();
        n.watchdog(t0);
        n.status("starting");
        assert_eq!(recv(), None, "no watchdog and no status before READY");
        n.ready("seq 1\nsecond line");
        assert_eq!(recv().as_deref(), Some("READY=1\nSTATUS=seq 1"));
        n.status("seq 1");
        assert_eq!(recv(), None, "an unchanged status is not sent again");
        n.status("seq 2");
        assert_eq!(recv().as_deref(), Some("STATUS=seq 2"));
        n.watchdog(Instant::now());
        assert_eq!(recv(), None, "not due yet");
        n.watchdog(Instant::now() + Duration::from_secs(11));
        assert_eq!(recv().as_deref(), Some("WATCHDOG=1"));
        n.reloading();
        assert!(recv().unwrap().starts_with("RELOADING=1\nMONOTONIC_USEC="));
        n.reloaded();
        assert_eq!(recv().as_deref(), Some("READY=1\nSTATUS=seq 2"));
        n.stopping();
        assert_eq!(recv().as_deref(), Some("STOPPING=1"));
        assert_eq!(n.failures(), 0);
        drop(server);
        std::fs::remove_file(&path).unwrap();
        n.status("seq 3");
        assert_eq!(n.failures(), 1, "a send to a socket that went away is counted");
    }

    #[test]
    fn status_is_one_bounded_line() {
        assert_eq!(status_text("a\nb"), "a");
        let long = "é".repeat(STATUS_LEN_MAX);
        let cut = status_text(&long);
        assert!(cut.len() <= STATUS_LEN_MAX && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn addresses() {
        assert!(notify_address("/run/systemd/notify").unwrap().as_pathname().is_some());
        assert!(notify_address("@abstract").unwrap().as_pathname().is_none());
        assert!(notify_address("relative").is_err());
    }

    #[test]
    fn priorities() {
        assert_eq!(journal_priority(&Level::ERROR), 3);
        assert_eq!(journal_priority(&Level::WARN), 4);
        assert_eq!(journal_priority(&Level::INFO), 6);
        assert_eq!(journal_priority(&Level::DEBUG), 7);
    }
}
