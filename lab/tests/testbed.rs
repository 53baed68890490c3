//! `mirrormesh-lab testbed` end to end on a small fabric: hosts in network namespaces it creates, shaped links, real
//! daemons and rsync; the run checks every tree and prints its ratios, and leaves nothing behind, also when it is
//! interrupted. Needs root, `ip`, `tc`, `rsync`, `iptables` and `ping` (CI installs them).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// The lab binary; the product's `mirrormesh` (which the testbed runs as its daemons) must be beside it:
/// `cargo test --workspace` has built it; when only this package's tests were built, it is built here (with the
/// `faults` feature, as the workspace's test build has it).
fn binary() -> &'static Path {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let lab = Path::new(env!("CARGO_BIN_EXE_mirrormesh-lab"));
    BUILT.call_once(|| {
        let profile_dir = lab.parent().unwrap();
        if profile_dir.join("mirrormesh").is_file() {
            return;
        }
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "mirrormesh", "--bin", "mirrormesh", "--features", "faults"]);
        if profile_dir.file_name().is_some_and(|d| d == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("running cargo to build the daemon binary");
        assert!(status.success(), "building the mirrormesh binary failed");
        assert!(profile_dir.join("mirrormesh").is_file(), "no mirrormesh binary beside {}", lab.display());
    });
    lab
}

/// Namespaces, links and WAN emulators (which name their host) a testbed run with process id `pid` created that
/// still exist.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("mmtb{pid}");
    let mut out = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let text = String::from_utf8(Command::new("ip").args(args).output().unwrap().stdout).unwrap();
        out.extend(text.lines().filter(|l| l.contains(&tag)).map(str::to_owned));
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("emulate") && cmdline.contains(&format!("{tag}h")) {
            out.push(format!("process {}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    out
}

/// One test, so the runs are not concurrent (each would still get its own subnet).
#[test]
fn testbed_runs_check_trees_and_clean_up() {
    the_wan_emulator_delays_and_drops_as_told();
    a_small_sync_benchmark_runs_checks_and_cleans_up();
    a_mirror_cut_off_mid_sync_converges_without_fetching_twice();
    an_interrupted_run_removes_its_namespaces();
}

/// The number after `key` in `line` (up to the next space or comma).
fn number_after(line: &str, key: &str) -> f64 {
    let rest = line.split(key).nth(1).unwrap_or_else(|| panic!("no {key:?} in {line}"));
    rest.trim_start().split([' ', ',', '|']).next().unwrap().parse().unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn the_wan_emulator_delays_and_drops_as_told() {
    // Two hosts 40 ms apart: every ping comes back after 40 ms, give or take the emulator's scheduling; a 4 MiB TCP
    // copy goes through the emulators (held, not lost).
    let (pid, stdout) =
        run_testbed(&["wan", "--mirrors", "1", "--rtt-ms", "40", "--pings", "10", "--probes", "0", "--tcp-mib", "4"]);
    println!("{stdout}");
    let row = stdout.lines().find(|l| l.starts_with("| origin - mirror1 |")).unwrap_or_else(|| panic!("{stdout}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let (profile, avg): (f64, f64) = (cells[2].parse().unwrap(), cells[3].parse().unwrap());
    assert_eq!(profile, 40.0, "{row}");
    assert!((40.0..43.0).contains(&avg), "ping avg {avg} ms for a 40 ms round trip: {row}");
    assert_eq!(cells[6], "10/10", "nothing lost: {row}");
    let report = stdout.lines().find(|l| l.starts_with("WAN emulator:")).unwrap_or_else(|| panic!("{stdout}"));
    // Every packet of the copy and the pings was held (both directions), none dropped.
    assert!(number_after(report, "held") >= 4.0 * 1024.0 * 1024.0 / 65536.0, "{report}");
    assert_eq!(number_after(report, "dropped (loss)"), 0.0, "{report}");
    assert!(leftovers(pid).is_empty(), "left behind: {:?}", leftovers(pid));

    // Loss 0.5, no delay: about half of 200 one-way probes arrive (binomial: 100 +- 7; 70..130 is over 4 sigma).
    let (pid, stdout) =
        run_testbed(&["wan", "--mirrors", "1", "--loss", "0.5", "--pings", "0", "--probes", "200", "--tcp-mib", "0"]);
    println!("{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("UDP one-way probes")).unwrap_or_else(|| panic!("{stdout}"));
    let received = number_after(line, "sent,");
    assert!((70.0..=130.0).contains(&received), "{received} of 200 arrived at loss 0.5: {line}");
    assert!(leftovers(pid).is_empty(), "left behind: {:?}", leftovers(pid));
}

/// Runs `mirrormesh-lab testbed ARGS` to the end; its process id and stdout, once it succeeded.
fn run_testbed(args: &[&str]) -> (u32, String) {
    let child =
        Command::new(binary()).arg("testbed").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (pid, stdout)
}

fn a_mirror_cut_off_mid_sync_converges_without_fetching_twice() {
    // Cut for 35 s: past the 30 s stall timeouts, so the requests in flight fail and the peers are dropped.
    let (pid, stdout) = run_testbed(&["partition", "--mirrors", "3", "--fraction", "0.01", "--cut-secs", "35"]);
    println!("{stdout}");
    assert!(stdout.contains("all 3 mirrors checked byte-identical"), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("victim:")).unwrap_or_else(|| panic!("{stdout}"));
    let number_after = |label: &str| -> f64 {
        let rest = line.split(label).nth(1).unwrap_or_else(|| panic!("no {label:?} in {line}"));
        rest.trim_start().split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().parse().unwrap()
    };
    let endgame = number_after("received again:");
    let other = number_after("copies,");
    // Chunks in flight at the cut were never received (so not counted). What is fetched again: the endgame's second
    // copies of the last chunks (by design both may arrive), and, a defect not yet understood, a few chunks the
    // mirror received again outside the endgame after the cut (runs on 2026-12-06: 0, 1 or 2 of them, with one
    // request failed and its peer dropped as unreachable). At most `OTHER_COPIES_MAX` of those; every copy counted.
    const OTHER_COPIES_MAX: f64 = 4.0;
    assert!(other <= OTHER_COPIES_MAX, "the cut-off mirror received {other} chunks again outside the endgame: {line}");
    let bytes = |text: &str| -> f64 {
        let (value, unit) = text.trim().split_once(' ').unwrap_or_else(|| panic!("no size in {text:?}"));
        let scale = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            other => panic!("size in {other}: {text}"),
        };
        value.parse::<f64>().unwrap() * scale
    };
    // The table's row: `| <snapshot size> | mirrorN | ...`.
    let row =
        stdout.lines().find(|l| l.starts_with("| ") && l.contains("| mirror")).unwrap_or_else(|| panic!("{stdout}"));
    let snapshot = bytes(row.split('|').nth(1).unwrap());
    let fetched = number_after("snapshot = ");
    // 1% for data of requests cut off mid-chunk (received, never verified), plus one chunk per counted copy.
    let allowed = 1.01 + (endgame + other) * mirrormesh_proto::CHUNK_SIZE as f64 / snapshot;
    assert!(fetched <= allowed, "the cut-off mirror fetched {fetched} x the snapshot (allowed {allowed:.3}): {line}");
    assert!(leftovers(pid).is_empty(), "left behind: {:?}", leftovers(pid));
}

fn a_small_sync_benchmark_runs_checks_and_cleans_up() {
    let (pid, stdout) = run_testbed(&[
        "sync",
        "--mirrors",
        "2",
        "--fraction",
        "0.005",
        "--update-packages",
        "2",
        "--origin-mbit",
        "400",
        "--mirror-mbit",
        "300-500",
        "--rtt-ms",
        "10",
    ]);
    assert!(stdout.contains("checked byte-identical"), "{stdout}");
    assert!(stdout.contains("WAN emulated: every round trip 10 ms"), "{stdout}");
    let report = stdout.lines().find(|l| l.starts_with("WAN emulator:")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(report.contains("3 processes"), "one emulator per host: {report}");
    // The origin's bytes on the wire taken apart: its data plane's QUIC packets carry at least every chunk byte,
    // and what its link carried is at least those packets that left the host (the rest, headers and the control
    // plane, is not negative beyond the estimate of the drops before the link).
    for step in ["initial sync", "2-package update"] {
        let prefix = format!("  {step}: ");
        let line = stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{stdout}"));
        let numbers = line[prefix.len()..].replace(['=', '(', ')', '+'], " ").replace(" - ", " ");
        let parts: Vec<f64> = numbers.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        let [_total, quic, _lost, _dropped, _packets, rest] = parts[..] else { panic!("{line}") };
        assert!(quic >= 1.0, "{line}");
        assert!(rest > -0.01, "the origin's link carried less than its data plane sent: {line}");
    }
    // The round trip `mirrormesh peers` shows is the real one (QUIC's estimate on the data plane), not two round
    // trips (a request opening a stream) or the peers' event loops.
    let rtts = stdout.lines().find(|l| l.starts_with("peers' round trips shown")).unwrap_or_else(|| panic!("{stdout}"));
    let median: f64 = rtts.split("median ").nth(1).and_then(|r| r.split(',').next()).unwrap().parse().unwrap();
    assert!((0.8..1.6).contains(&median), "shown / emulated round trip: {rtts}");
    // Two rows of measurements: for each, rsync from the origin costs about one copy per mirror.
    for step in ["initial sync", "2-package update"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(step) && l.contains(" | "))
            .unwrap_or_else(|| panic!("no {step} row:\n{stdout}"));
        let rsync_ratio: f64 = row.split_whitespace().last().unwrap().parse().unwrap();
        assert!((1.8..2.5).contains(&rsync_ratio), "rsync sent {rsync_ratio} x the update to 2 mirrors: {row}");
    }
    assert!(leftovers(pid).is_empty(), "left behind: {:?}", leftovers(pid));
}

fn an_interrupted_run_removes_its_namespaces() {
    let mut child = Command::new(binary())
        .args(["testbed", "idle", "--mirrors", "2", "--fraction", "0.002", "--seconds", "600", "--rtt-ms", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The first line comes once the hosts exist and the daemons run.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("testbed:"), "{first}");
    assert!(!leftovers(pid).is_empty(), "the namespaces exist while it runs");
    // SAFETY: sends a signal to the child this test spawned and has not reaped yet.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) }, 0, "interrupting the testbed");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exits as interrupted");
    assert!(leftovers(pid).is_empty(), "left behind: {:?}", leftovers(pid));
}
