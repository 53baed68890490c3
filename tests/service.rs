//! The daemon under a service manager, as systemd runs it: a real daemon started with `NOTIFY_SOCKET` (a Unix
//! datagram socket this test listens on), `WATCHDOG_USEC` and `JOURNAL_STREAM` naming its stderr. Every step waits
//! for the datagram or the process event it expects; the socket's read timeout only bounds a failure.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mirrormesh::local_fabric::{LocalFabric, NodeOptions};

/// How often systemd wants to hear from the watchdog in this test (the daemon pings at half of it).
const WATCHDOG: Duration = Duration::from_secs(2);
/// Bounds a wait that fails (no datagram at all).
const GIVE_UP: Duration = Duration::from_secs(60);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// Ends the daemon however the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status().unwrap().success();
    assert!(ok, "kill -{name}");
}

/// The next datagram (one sd_notify message).
fn next(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let len = socket.recv(&mut buf).expect("a notification from the daemon");
    String::from_utf8(buf[..len].to_vec()).unwrap()
}

/// The next datagram that is not a watchdog ping.
fn next_not_watchdog(socket: &UnixDatagram) -> String {
    loop {
        let message = next(socket);
        if message != "WATCHDOG=1" {
            return message;
        }
    }
}

#[test]
fn notify_ready_status_watchdog_reload_and_stop_and_journal_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(GIVE_UP)).unwrap();
    let fabric = LocalFabric::create(&dir.path().join("fabric"), binary(), 0, &[NodeOptions::default()]).unwrap();
    let node = &fabric.nodes[0];
    std::fs::write(node.tree.join("hello.txt"), b"hello, downstream").unwrap();

    // Standard error is a file; JOURNAL_STREAM names it, as systemd names the journal's stream.
    let log_path = dir.path().join("stderr.log");
    let log = File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let child = Command::new(binary())
        .args(["daemon", "--config"])
        .arg(&node.config)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);

    // READY=1 once it listens: the admin API answers from then on.
    let ready = next(&socket);
    assert_eq!(ready, "READY=1\nSTATUS=alpine nothing published yet; 0 peers", "{ready}");
    assert_eq!(fabric.status(0).unwrap().role, "origin", "the admin API answers once READY=1 is sent");

    // The watchdog is fed at half its interval, from the event loop.
    let mut pings = Vec::new();
    while pings.len() < 3 {
        if next(&socket) == "WATCHDOG=1" {
            pings.push(Instant::now());
        }
    }
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap < WATCHDOG, "watchdog pings {gap:?} apart, systemd wants one every {WATCHDOG:?}");
    }

    // A publish changes the status line.
    let published = fabric.publish().unwrap();
    let status = next_not_watchdog(&socket);
    assert_eq!(status, format!("STATUS=alpine seq {}; 0 peers", published.seq));

    // SIGHUP: RELOADING=1 (with the monotonic time), then READY=1.
    signal(&daemon.0, "HUP");
    let reloading = next_not_watchdog(&socket);
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    assert_eq!(next_not_watchdog(&socket), format!("READY=1\nSTATUS=alpine seq {}; 0 peers", published.seq));

    // A reload of a broken config is refused, logged as an error, and still ends with READY=1.
    std::fs::write(&node.config, "[node]\nbroken = ").unwrap();
    signal(&daemon.0, "HUP");
    assert!(next_not_watchdog(&socket).starts_with("RELOADING=1"));
    assert!(next_not_watchdog(&socket).starts_with("READY=1"));

    // SIGTERM: STOPPING=1, then a clean exit.
    signal(&daemon.0, "TERM");
    assert_eq!(next_not_watchdog(&socket), "STOPPING=1");
    let exit = daemon.0.wait().unwrap();
    assert!(exit.success(), "{exit}");

    // Every line carries its journal priority; info is 6, the refused reload an error (3).
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.starts_with('<') && line.as_bytes().get(2) == Some(&b'>'), "no priority: {line}");
    }
    assert!(text.lines().any(|l| l.starts_with("<6>") && l.contains("mirrormesh daemon running")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("<3>") && l.contains("reload refused")), "{text}");
}

#[test]
fn without_the_journal_lines_carry_no_priority() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let fabric = LocalFabric::create(dir.path(), binary(), 0, &[NodeOptions::default()]).unwrap();
    // A JOURNAL_STREAM that names another file (inherited from a shell a service started) is not the journal.
    let mut child = Command::new(binary())
        .args(["daemon", "--config"])
        .arg(&fabric.nodes[0].config)
        .env("RUST_LOG", "info")
        .env("JOURNAL_STREAM", "1:1")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let daemon = Daemon(child);
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let running = line.contains("mirrormesh daemon running");
        seen.push(line);
        if running {
            break;
        }
    }
    drop(daemon);
    assert!(seen.last().is_some_and(|l| l.contains("mirrormesh daemon running")), "{seen:?}");
    assert!(seen.iter().all(|l| !l.starts_with('<')), "{seen:?}");
}
