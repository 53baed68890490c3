//! Field safety on real daemons (child processes of the `mirrormesh` binary on loopback): what a mirror's tree
//! goes through when the origin's tree changes shape (directories becoming symlinks or files becoming directories),
//! goes missing or is emptied, when an apply fails on the mirror's disk, and when the origin restarts. Every wait
//! is on an event: a daemon's log line or the admin API's long-poll `/wait`.

use std::path::Path;
use std::time::Duration;

use mirrormesh::local_fabric::{LocalFabric, NodeOptions};

const WAIT: Duration = Duration::from_secs(120);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

#[test]
fn a_directory_replaced_by_a_symlink_or_a_file_by_a_directory_costs_the_mirror_no_live_file() {
    let dir = tempfile::tempdir().unwrap();
    // Removals are carried out at once (grace 0), so the next settled state shows what they did.
    let opts = vec![NodeOptions { delete_grace_secs: 0, ..NodeOptions::default() }; 2];
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &opts).unwrap();
    let tree = fabric.nodes[0].tree.clone();
    write(&tree.join("a/f"), "a's f");
    write(&tree.join("b/f"), "b's f");
    write(&tree.join("b/g"), "b's g");
    write(&tree.join("x"), "x is a file first");
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();
    fabric.check_identical(1).unwrap();

    // Directory `a` becomes a symlink to `b`; file `x` becomes an empty directory.
    std::fs::remove_dir_all(tree.join("a")).unwrap();
    std::os::unix::fs::symlink("b", tree.join("a")).unwrap();
    std::fs::remove_file(tree.join("x")).unwrap();
    std::fs::create_dir(tree.join("x")).unwrap();
    let second = fabric.publish().unwrap();
    fabric.wait_all_settled(second.seq, WAIT).unwrap();
    let mirror = &fabric.nodes[1].tree;
    assert_eq!(std::fs::read_to_string(mirror.join("b/f")).ok().as_deref(), Some("b's f"), "b/f is live");
    assert!(mirror.join("x").is_dir(), "x is the directory the snapshot names");
    fabric.check_identical(1).unwrap();

    // A later snapshot changes nothing under `b`: the mirror still holds all of it.
    write(&tree.join("c"), "c");
    let third = fabric.publish().unwrap();
    fabric.wait_all_settled(third.seq, WAIT).unwrap();
    fabric.check_identical(1).unwrap();
}

/// `GET /metrics` of node `i` (classic text format).
fn metrics(fabric: &LocalFabric, i: usize) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    agent.get(format!("http://{}/metrics", fabric.nodes[i].admin)).call().unwrap().body_mut().read_to_string().unwrap()
}

/// The value of sample `series` (labels included) in a metrics exposition.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn counter(fabric: &LocalFabric, i: usize, name: &str) -> u64 {
    fabric.status(i).unwrap().counters.get(name).copied().unwrap_or(0)
}

#[test]
fn an_origin_whose_tree_is_moved_away_or_emptied_publishes_nothing_and_no_mirror_loses_a_file() {
    let dir = tempfile::tempdir().unwrap();
    // The product's removal limit (10%), a watching origin, mirrors that remove at once (grace 0).
    let origin = NodeOptions { removal_limit_percent: Some(10), watch_quiet_secs: Some(1), ..NodeOptions::default() };
    let mirror = NodeOptions { delete_grace_secs: 0, ..NodeOptions::default() };
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &[origin, mirror.clone(), mirror]).unwrap();
    let tree = fabric.nodes[0].tree.clone();
    for i in 0..40 {
        write(&tree.join(format!("alpine/edge/main/x86_64/p{i}-1.0-r0.apk")), &format!("package {i}"));
    }
    write(&tree.join("alpine/edge/main/x86_64/APKINDEX.tar.gz"), "index");
    fabric.start_all().unwrap();
    // Nobody publishes: the watching origin does, once the tree is quiet.
    let first = fabric.client(1, WAIT).wait_settled(1, WAIT.as_millis() as u64).unwrap().repos[0].seq.unwrap();
    fabric.wait_all_settled(first, WAIT).unwrap();
    let served = |fabric: &LocalFabric| {
        (1..=2).map(|i| mirrormesh::local_fabric::summarize(&fabric.nodes[i].tree).unwrap().entries).collect::<Vec<_>>()
    };
    let before = served(&fabric);
    assert_eq!(before[0].len(), 45, "41 files and 4 directories");

    // The tree is moved away (an unmounted filesystem looks the same to the daemon).
    let moved = dir.path().join("moved-away");
    std::fs::rename(&tree, &moved).unwrap();
    let refused = fabric.client(0, WAIT).wait_counter("publishes_refused", 1, WAIT.as_millis() as u64).unwrap();
    let problem = refused.problems.iter().find(|p| p.kind == mirrormesh::daemon::ProblemKind::PublishRefused);
    assert!(problem.is_some_and(|p| p.message.contains("does not exist")), "{:?}", refused.problems);
    assert_eq!(refused.repos[0].seq, Some(first), "nothing was published");
    let m = metrics(&fabric, 0);
    assert_eq!(sample(&m, "mirrormesh_problem{kind=\"publish_refused\"}"), 1.0);
    assert_eq!(sample(&m, "mirrormesh_failing"), 1.0);
    assert!(!fabric.nodes[0].tree.exists(), "the origin never creates its tree");

    // Restored: the watcher finds it again and a change is published.
    std::fs::rename(&moved, &tree).unwrap();
    write(&tree.join("alpine/edge/main/x86_64/p40-1.0-r0.apk"), "package 40");
    let second = fabric.client(1, WAIT).wait_settled(first + 1, WAIT.as_millis() as u64).unwrap().repos[0].seq.unwrap();
    fabric.wait_all_settled(second, WAIT).unwrap();
    fabric.check_identical(1).unwrap();
    assert!(fabric.status(0).unwrap().problems.is_empty(), "the refusal cleared with the publish");
    let before = served(&fabric);

    // Emptied: refused too, and the mirrors keep every file.
    for entry in std::fs::read_dir(&tree).unwrap() {
        std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
    }
    let refused = fabric.client(0, WAIT).wait_counter("publishes_refused", 2, WAIT.as_millis() as u64).unwrap();
    assert!(refused.last_error.as_deref().is_some_and(|e| e.contains("empty")), "{:?}", refused.last_error);
    assert_eq!(sample(&metrics(&fabric, 0), "mirrormesh_problem{kind=\"publish_refused\"}"), 1.0);
    // Removing 90% of the files is refused as well.
    for i in 0..4 {
        write(&tree.join(format!("alpine/edge/main/x86_64/p{i}-1.0-r0.apk")), &format!("package {i}"));
    }
    let refused = fabric.client(0, WAIT).wait_counter("publishes_refused", 3, WAIT.as_millis() as u64).unwrap();
    assert!(refused.last_error.as_deref().is_some_and(|e| e.contains("removal_limit_percent")), "{:?}", refused);
    for i in 1..=2 {
        let status = fabric.status(i).unwrap();
        assert_eq!(status.repos[0].seq, Some(second), "mirror {i} still serves the last good snapshot");
    }
    assert_eq!(served(&fabric), before, "no mirror lost a file");

    // The operator means it: a forced publish goes out, and the mirrors follow.
    let forced = fabric.client(0, WAIT).publish_forced().unwrap();
    assert_eq!(forced.files, 4);
    fabric.wait_all_settled(forced.seq, WAIT).unwrap();
    fabric.check_identical(2).unwrap();
    assert_eq!(counter(&fabric, 0, "publishes_refused"), 3);
}

#[test]
fn a_mirror_that_trusts_the_wrong_publisher_or_never_synced_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let opts = vec![NodeOptions::default(); 3];
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &opts).unwrap();
    // Mirror 2 pins a key that is not the origin's.
    let wrong = mirrormesh::key::NodeKey::generate().unwrap().peer_id().to_string();
    let config = std::fs::read_to_string(&fabric.nodes[2].config).unwrap();
    std::fs::write(&fabric.nodes[2].config, config.replace(&fabric.nodes[0].peer_id, &wrong)).unwrap();
    write(&fabric.nodes[0].tree.join("alpine/p.apk"), "package");
    fabric.start(1).unwrap();
    // Before any snapshot exists, a mirror is not "idle and in sync".
    let fresh = fabric.status(1).unwrap();
    assert_eq!(fresh.repos[0].state, "never-synced");
    assert_eq!(fresh.repos[0].progress, 0.0);
    assert!(fresh.problems.iter().any(|p| p.kind == mirrormesh::daemon::ProblemKind::NeverSynced));
    fabric.start(0).unwrap();
    fabric.start(2).unwrap();
    let published = fabric.publish().unwrap();
    let good = fabric.client(1, WAIT).wait_settled(published.seq, WAIT.as_millis() as u64).unwrap();
    assert!(good.problems.is_empty(), "{:?}", good.problems);
    assert_eq!(sample(&metrics(&fabric, 1), "mirrormesh_failing"), 0.0);

    let wrong_status =
        fabric.client(2, WAIT).wait_counter("roots_rejected_unknown_publisher", 1, WAIT.as_millis() as u64).unwrap();
    let repo = &wrong_status.repos[0];
    assert_eq!((repo.state.as_str(), repo.progress, repo.seq), ("never-synced", 0.0, None));
    let untrusted = wrong_status.problems.iter().find(|p| p.kind == mirrormesh::daemon::ProblemKind::RootsUntrusted);
    let message = untrusted.map(|p| p.message.clone()).unwrap_or_default();
    assert!(
        message.contains(&fabric.nodes[0].peer_id) && message.contains(&wrong),
        "names the signer and the trusted id as the config does: {message:?}"
    );
    assert_eq!(sample(&metrics(&fabric, 2), "mirrormesh_failing"), 1.0);
    let log = std::fs::read_to_string(&fabric.nodes[2].log).unwrap();
    assert!(!log.contains("PeerId(") && !log.contains("Some("), "no Debug output in the log");
}

#[test]
fn a_mirror_serving_an_old_snapshot_reports_it_and_exports_the_root_times() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = NodeOptions { stale_after_secs: Some(1), ..NodeOptions::default() };
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &[NodeOptions::default(), mirror]).unwrap();
    write(&fabric.nodes[0].tree.join("alpine/p.apk"), "package");
    fabric.start_all().unwrap();
    let published = fabric.publish().unwrap();
    fabric.wait_all_settled(published.seq, WAIT).unwrap();
    // Nothing newer comes: a second after its creation the snapshot is stale.
    let stale = fabric.client(1, WAIT).wait_counter("problems_root_stale", 1, WAIT.as_millis() as u64).unwrap();
    let problem = stale.problems.iter().find(|p| p.kind == mirrormesh::daemon::ProblemKind::RootStale);
    assert!(problem.is_some_and(|p| p.message.contains("stale_after_secs")), "{:?}", stale.problems);
    let m = metrics(&fabric, 1);
    assert_eq!(sample(&m, "mirrormesh_problem{kind=\"root_stale\"}"), 1.0);
    let created = sample(&m, "mirrormesh_root_created_timestamp_seconds{repo=\"alpine\"}");
    let expires = sample(&m, "mirrormesh_root_expires_timestamp_seconds{repo=\"alpine\"}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(created <= now && now - created < 600.0, "created {created}, now {now}");
    assert!((expires - created - 7.0 * 24.0 * 3600.0).abs() < 2.0, "a week's validity: {created} .. {expires}");
}

#[test]
fn a_publish_reaches_every_mirror_within_seconds_of_an_origin_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 3, &vec![NodeOptions::default(); 4]).unwrap();
    write(&fabric.nodes[0].tree.join("alpine/p1.apk"), "package 1");
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();

    // SIGTERM, as systemd stops it; then the origin starts again and publishes at once.
    let stopped = std::time::Instant::now();
    fabric.kill(0, 15).unwrap();
    let stop = stopped.elapsed();
    write(&fabric.nodes[0].tree.join("alpine/p2.apk"), "package 2");
    fabric.start(0).unwrap();
    let restarted = std::time::Instant::now();
    let second = fabric.publish().unwrap();
    fabric.wait_all_settled(second.seq, Duration::from_secs(30)).unwrap();
    let reached = restarted.elapsed();
    println!("origin stopped in {stop:?}; publish after the restart served by all 3 mirrors {reached:?} after it");
    assert!(reached < Duration::from_secs(15), "{reached:?}");
    for i in 1..=3 {
        fabric.check_identical(i).unwrap();
    }
}

fn signal(fabric: &LocalFabric, i: usize, signal: i32) {
    let pid = fabric.pid(i).expect("running") as i32;
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill -{signal} {pid}");
}

#[test]
fn sighup_reloads_the_allow_list_and_refuses_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &vec![NodeOptions::default(); 3]).unwrap();
    let (origin, first) = (fabric.nodes[0].peer_id.clone(), fabric.nodes[1].peer_id.clone());
    // Mirror 2 allows only the origin at first.
    let config = std::fs::read_to_string(&fabric.nodes[2].config).unwrap();
    let only_origin = config.replace("bootstrap = [", &format!("allow = [\"{origin}\"]\nbootstrap = ["));
    std::fs::write(&fabric.nodes[2].config, &only_origin).unwrap();
    write(&fabric.nodes[0].tree.join("alpine/p.apk"), "package");
    fabric.start_all().unwrap();
    fabric.client(2, WAIT).wait_counter("peers_refused_not_allowed", 1, WAIT.as_millis() as u64).unwrap();

    // The operator adds mirror 1 to the list and reloads: no restart, mirror 1 is let in.
    let joined = fabric.watch_log(2, &format!("peer={first}}}: mirrormesh::daemon: connected"));
    let reloaded = fabric.watch_log(2, "configuration reloaded");
    let both = config.replace("bootstrap = [", &format!("allow = [\"{origin}\", \"{first}\"]\nbootstrap = ["));
    std::fs::write(&fabric.nodes[2].config, &both).unwrap();
    signal(&fabric, 2, libc::SIGHUP);
    reloaded.recv_timeout(WAIT).expect("the reload is logged");
    joined.recv_timeout(WAIT).expect("mirror 1 connects once allowed");
    let published = fabric.publish().unwrap();
    fabric.wait_all_settled(published.seq, WAIT).unwrap();

    // A change only a restart can make is refused, and the daemon keeps running as it was.
    let refused = fabric.watch_log(2, "reload refused");
    std::fs::write(&fabric.nodes[2].config, both.replace("role = \"mirror\"", "role = \"origin\"")).unwrap();
    signal(&fabric, 2, libc::SIGHUP);
    let line = refused.recv_timeout(WAIT).expect("the refusal is logged");
    assert!(line.contains("node.role"), "{line}");
    let status = fabric.client(2, WAIT).wait_counter("reloads_refused", 1, WAIT.as_millis() as u64).unwrap();
    assert_eq!((status.counters["reloads"], status.role.as_str()), (1, "mirror"));
}

#[test]
fn two_nodes_with_the_same_key_are_noticed_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &vec![NodeOptions::default(); 3]).unwrap();
    // Mirror 2 was set up by copying mirror 1's key file.
    std::fs::copy(&fabric.nodes[1].key, &fabric.nodes[2].key).unwrap();
    write(&fabric.nodes[0].tree.join("alpine/p.apk"), "package");
    let warned = fabric.watch_log(0, "use the same key");
    fabric.start_all().unwrap();
    let line = warned.recv_timeout(WAIT).expect("the origin names the duplicated node id");
    assert!(line.contains(&fabric.nodes[1].peer_id), "{line}");
    fabric.client(0, WAIT).wait_counter("peers_duplicate_key", 1, WAIT.as_millis() as u64).unwrap();
}

/// Makes a directory immutable (`chattr +i`: renames into it fail with EPERM, even for root) until dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Self {
        let ok = std::process::Command::new("chattr").arg("+i").arg(dir).status().unwrap().success();
        assert!(ok, "chattr +i {}", dir.display());
        Immutable(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn a_failing_apply_is_retried_and_the_mirror_converges_once_the_fault_clears() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &vec![NodeOptions::default(); 2]).unwrap();
    let repo = "alpine/edge/main/x86_64";
    write(&fabric.nodes[0].tree.join(repo).join("a-1.0-r0.apk"), "package a");
    write(&fabric.nodes[0].tree.join(repo).join("APKINDEX.tar.gz"), "index: a");
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();

    // The mirror's package directory refuses new entries (as a read-only or foreign-owned directory would).
    let guard = Immutable::set(&fabric.nodes[1].tree.join(repo));
    write(&fabric.nodes[0].tree.join(repo).join("b-1.0-r0.apk"), "package b");
    write(&fabric.nodes[0].tree.join(repo).join("APKINDEX.tar.gz"), "index: a b");
    let second = fabric.publish().unwrap();
    let failing = fabric.client(1, WAIT).wait_counter("apply_failures", 2, WAIT.as_millis() as u64).unwrap();
    let repo_status = &failing.repos[0];
    assert_eq!(repo_status.seq, Some(first.seq), "the old snapshot is still served");
    assert!(failing.problems.iter().any(|p| p.kind == mirrormesh::daemon::ProblemKind::ApplyFailing));
    assert_eq!(sample(&metrics(&fabric, 1), "mirrormesh_failing"), 1.0);
    assert_eq!(std::fs::read_to_string(fabric.nodes[1].tree.join(repo).join("APKINDEX.tar.gz")).unwrap(), "index: a");

    // The operator fixes the directory: the mirror converges by itself, no restart.
    drop(guard);
    let done = fabric.client(1, WAIT).wait_settled(second.seq, WAIT.as_millis() as u64).unwrap();
    assert!(done.problems.is_empty(), "{:?}", done.problems);
    fabric.check_identical(1).unwrap();
}
