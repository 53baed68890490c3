//! `mirrormesh testbed` end to end on a small fabric: hosts in network namespaces it creates, shaped links, real
//! daemons and rsync; the run checks every tree and prints its ratios, and leaves nothing behind, also when it is
//! interrupted. Needs root, `ip`, `tc` and `rsync` (CI installs rsync).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// Namespaces and links a testbed run with process id `pid` created that still exist.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("mmtb{pid}");
    let mut out = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let text = String::from_utf8(Command::new("ip").args(args).output().unwrap().stdout).unwrap();
        out.extend(text.lines().filter(|l| l.contains(&tag)).map(str::to_owned));
    }
    out
}

/// One test, so the runs are not concurrent (each would still get its own subnet).
#[test]
fn testbed_runs_check_trees_and_clean_up() {
    a_small_sync_benchmark_runs_checks_and_cleans_up();
    a_mirror_cut_off_mid_sync_converges_without_fetching_twice();
    an_interrupted_run_removes_its_namespaces();
}

/// Runs `mirrormesh testbed ARGS` to the end; its process id and stdout, once it succeeded.
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
    let fetched: f64 = line.split("snapshot = ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    // Chunks in flight at the cut were never received (so not counted); nothing verified is fetched again.
    assert!(fetched <= 1.01, "the cut-off mirror fetched {fetched} x the snapshot: {line}");
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
    ]);
    assert!(stdout.contains("checked byte-identical"), "{stdout}");
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
        .args(["testbed", "idle", "--mirrors", "2", "--fraction", "0.002", "--seconds", "600"])
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
    Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exits as interrupted");
    assert!(leftovers(pid).is_empty(), "left behind: {:?}", leftovers(pid));
}
