//! Faults on real daemons (child processes of the `mirrormesh` binary on loopback): SIGKILL at random instants
//! with the served tree checked after every kill, and the origin lost mid-update. Waits are on events (a daemon's
//! log line, the admin API's long-poll `/wait`); the only timed pauses are the random kill instants themselves.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions, TreeEntry, summarize};
use mirrormesh_proto::sync::scheduler::SchedulerLimits;
use rand::{RngExt, SeedableRng};

const WAIT: Duration = Duration::from_secs(120);
const WAIT_MS: u64 = 120_000;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

fn generate(tree: &Path, fraction: f64, seed: u64) -> gentree::GenReport {
    gentree::generate(&GenTreeArgs { out: tree.to_owned(), fraction, seed, ..GenTreeArgs::default() }).unwrap()
}

fn update(tree: &Path, packages: usize, seed: u64) -> gentree::GenReport {
    gentree::generate(&GenTreeArgs { out: tree.to_owned(), update: Some(packages), seed, ..GenTreeArgs::default() })
        .unwrap()
}

type Manifest = BTreeMap<String, TreeEntry>;

fn is_index(path: &str) -> bool {
    path.ends_with("/APKINDEX.tar.gz")
}

/// The served tree at `tree`, between snapshots `old` and `new`: every file and symlink is exactly as in one of
/// them (so no temporary or foreign name, no torn content), every directory belongs to one of them, and an index
/// with the new snapshot's bytes is there only once every other file of the new snapshot is in place.
fn check_between(tree: &Path, old: &Manifest, new: &Manifest) -> Result<()> {
    let served = summarize(tree)?.entries;
    for (path, entry) in &served {
        let known = |m: &Manifest| match (m.get(path), entry) {
            (Some(TreeEntry::Dir { .. }), TreeEntry::Dir { .. }) => true,
            (Some(e), _) => e == entry,
            (None, _) => false,
        };
        if !known(old) && !known(new) {
            bail!("{path} is in neither snapshot: {entry:?}");
        }
    }
    let new_index_served = served
        .iter()
        .any(|(path, entry)| is_index(path) && new.get(path) == Some(entry) && old.get(path) != Some(entry));
    if new_index_served {
        for (path, entry) in new {
            if !matches!(entry, TreeEntry::Dir { .. }) && !is_index(path) && served.get(path) != Some(entry) {
                bail!("a new index is served while {path} of its snapshot is not");
            }
        }
    }
    Ok(())
}

/// Panics with `message`, node `i`'s status and the end of its log.
fn fail(fabric: &LocalFabric, i: usize, message: &str) -> ! {
    let status = fabric.status(i).map(|s| format!("{s:#?}")).unwrap_or_else(|e| format!("{e:#}"));
    let log = std::fs::read_to_string(&fabric.nodes[i].log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    panic!("{message}\n{} status: {status}\n{} log:\n{}", fabric.nodes[i].name, fabric.nodes[i].name, tail.join("\n"));
}

/// Chunk bytes the origin has sent to `peer_id`, over all its connections.
fn origin_sent_to(fabric: &LocalFabric, peer_id: &str) -> u64 {
    let status = fabric.status(0).unwrap();
    status.peers.iter().find(|p| p.id == peer_id).map_or(0, |p| p.bytes_sent)
}

/// Kills the mirror with SIGKILL at random instants of its syncs (about a third of them just after it starts
/// applying a snapshot), restarting it each time, and checks the served tree after every kill. Updates are
/// published one after the other as the mirror completes them. `MIRRORMESH_KILLS` sets the number of kills.
#[test]
fn kills_at_random_instants_never_expose_a_half_updated_tree() {
    let kills_wanted: usize = std::env::var("MIRRORMESH_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    // The origin uploads at 4 MB/s: an update takes seconds, so kills land in every phase of it.
    let opts =
        vec![NodeOptions { upload_bytes_per_sec: Some(4_000_000), ..NodeOptions::default() }, NodeOptions::default()];
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &opts).unwrap();
    let origin_tree = fabric.nodes[0].tree.clone();
    let mirror_tree = fabric.nodes[1].tree.clone();
    generate(&origin_tree, 0.01, 21);
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    fabric.client(1, WAIT).wait_settled(first.seq, WAIT_MS).unwrap();
    fabric.check_identical(1).unwrap();
    let mut sent_for_updates = first.changed_bytes;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x6b696c6c);
    let mut old = summarize(&origin_tree).unwrap().entries;
    let mut seed = 100;
    update(&origin_tree, 12, seed);
    let mut new = summarize(&origin_tree).unwrap().entries;
    let mut applying = fabric.watch_log(1, "applying snapshot");
    let mut current = fabric.publish().unwrap();
    sent_for_updates += current.changed_bytes;
    let (mut kills, mut in_apply, mut updates) = (0usize, 0usize, 1usize);
    while kills < kills_wanted {
        if !fabric.is_running(1) {
            applying = fabric.watch_log(1, "applying snapshot");
            fabric.start(1).unwrap();
        }
        if fabric.status(1).unwrap().repos.first().and_then(|r| r.seq) == Some(current.seq) {
            // This update is in place: once its removals are done, check it and publish the next one.
            fabric.client(1, WAIT).wait_settled(current.seq, WAIT_MS).unwrap();
            fabric.check_identical(1).unwrap();
            old = new;
            seed += 1;
            update(&origin_tree, 12, seed);
            new = summarize(&origin_tree).unwrap().entries;
            applying = fabric.watch_log(1, "applying snapshot");
            current = fabric.publish().unwrap();
            sent_for_updates += current.changed_bytes;
            updates += 1;
        }
        // The fault schedule: a random instant within the next 1.5 s, or within 20 ms of the start of an apply.
        if rng.random_bool(0.3) {
            if applying.recv_timeout(WAIT).is_err() {
                fail(&fabric, 1, "the mirror did not start applying the snapshot");
            }
            std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
            in_apply += 1;
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..1_500)));
        }
        fabric.kill(1, 9).unwrap();
        kills += 1;
        if let Err(e) = check_between(&mirror_tree, &old, &new) {
            panic!("after kill {kills} (update {updates}): {e:#}");
        }
    }

    fabric.start(1).unwrap();
    fabric.client(1, WAIT).wait_settled(current.seq, WAIT_MS).unwrap();
    fabric.check_identical(1).unwrap();
    // What a kill loses is what was requested and not yet written: toward the origin, at most one window.
    let sent = origin_sent_to(&fabric, &fabric.nodes[1].peer_id);
    let window = SchedulerLimits::default().origin_window_max;
    let refetched = sent.saturating_sub(sent_for_updates);
    println!(
        "{kills} kills ({in_apply} just after an apply began) over {updates} updates; the origin sent {sent} bytes \
         for {sent_for_updates} bytes of snapshots: {refetched} bytes refetched, {:.2} windows per kill",
        refetched as f64 / kills as f64 / window as f64
    );
    assert!(
        refetched <= kills as u64 * window,
        "refetched {refetched} bytes in {kills} kills: more than one window ({window} bytes) per kill"
    );
}
