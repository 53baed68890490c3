//! `mirrormesh demo --keep` leaves a fabric running for inspection: whatever signal ends the demo (SIGINT, SIGTERM,
//! SIGHUP, or SIGKILL, which it cannot catch), its five daemons end with it, and the temporary tree it made goes
//! too when it could clean up. Each case starts a small demo, waits for its "fabric keeps running" line, notes its
//! child processes, signals the demo, and waits (on pidfds, no sleeping) for every child to exit.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How long the children may take to exit once the demo is signalled (they close connections, at most ~2 s).
const EXIT_WAIT_MS: i32 = 30_000;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// One demo at a time: each runs five daemons on a machine of two cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(fd >= 0, "pidfd_open {pid}: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Waits until every process behind `fds` has exited (a pidfd turns readable then) or `EXIT_WAIT_MS` passed;
/// returns the pids still running.
fn wait_exited(fds: &[(u32, OwnedFd)]) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let start = std::time::Instant::now();
    loop {
        let mut polled: Vec<libc::pollfd> =
            fds.iter().map(|(_, fd)| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        let left = EXIT_WAIT_MS - start.elapsed().as_millis() as i32;
        if left > 0 {
            // SAFETY: poll(2) on a valid array of pollfd of the given length.
            unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, left) };
            // SAFETY: as above, with no wait: refreshes every entry's revents.
            unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
        }
        let running: Vec<u32> =
            fds.iter().zip(&polled).filter(|(_, p)| p.revents & libc::POLLIN == 0).map(|((pid, _), _)| *pid).collect();
        if running.is_empty() || left <= 0 {
            return running;
        }
    }
}

/// Runs `mirrormesh demo --keep` (small), signals it with `signal` once its fabric keeps running, and checks that
/// its children end; returns whether the demo's temporary tree is gone.
fn demo_ended_by(signal: i32) -> bool {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Command::new(binary())
        .args(["demo", "--keep", "--fraction", "0.004", "--update", "2"])
        .env("TMPDIR", tmp.path())
        .env_remove("MIRRORMESH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(demo.stdout.take().unwrap());
    let mut work: Option<PathBuf> = None;
    let mut printed = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            demo.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("the demo ended before its fabric kept running:\n{printed}\n{err}");
        }
        printed.push_str(&line);
        if let Some(dir) = line.strip_prefix("mirrormesh demo in ") {
            work = Some(PathBuf::from(dir.trim()));
        }
        if line.contains("the fabric keeps running") {
            break;
        }
    }
    let work = work.expect("the demo names its work directory");
    assert!(work.starts_with(tmp.path()), "{} is a temporary directory", work.display());
    // The rest of what it prints is not awaited; keep its pipes drained.
    std::thread::spawn(move || stdout.lines().for_each(drop));
    let stderr = demo.stderr.take().unwrap();
    std::thread::spawn(move || BufReader::new(stderr).lines().for_each(drop));

    let children = children_of(demo.id());
    assert_eq!(children.len(), 5, "an origin and four mirrors run: {children:?}");
    let fds: Vec<(u32, OwnedFd)> = children.iter().map(|&pid| (pid, pidfd(pid))).collect();

    // SAFETY: kill(2) with the demo's pid (our child, not yet reaped) and a signal number.
    assert_eq!(unsafe { libc::kill(demo.id() as libc::pid_t, signal) }, 0);
    let status = demo.wait().unwrap();
    assert!(status.code().is_some() || status.signal().is_some());
    let running = wait_exited(&fds);
    if !running.is_empty() {
        for &pid in &running {
            // Leave nothing behind on a shared machine, then fail.
            // SAFETY: kill(2) with a pid of a daemon this test started (its pidfd is still open) and SIGKILL.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        panic!(
            "signal {signal} ended the demo ({status}) but {} of its 5 daemons kept running: {running:?}",
            running.len()
        );
    }
    !work.exists()
}

#[test]
fn sigterm_ends_the_demos_daemons_and_removes_its_tree() {
    assert!(demo_ended_by(libc::SIGTERM), "the temporary tree is removed");
}

#[test]
fn sigint_ends_the_demos_daemons_and_removes_its_tree() {
    assert!(demo_ended_by(libc::SIGINT), "the temporary tree is removed");
}

#[test]
fn sighup_ends_the_demos_daemons_and_removes_its_tree() {
    assert!(demo_ended_by(libc::SIGHUP), "the temporary tree is removed");
}

#[test]
fn sigkill_ends_the_demos_daemons() {
    // Nothing runs in the demo after SIGKILL to remove its tree: the test's own temporary directory holds it.
    demo_ended_by(libc::SIGKILL);
}
