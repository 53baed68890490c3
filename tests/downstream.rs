//! Downstream mirrors, with real daemons on loopback, a real MQTT broker (Debian's `mosquitto`, started here on a
//! free loopback port) and a real subscriber (`mosquitto_sub`, as Alpine's `mqtt-exec` subscribes): after every
//! snapshot a mirror writes `last-updated` and its trace file into its tree and announces the directories that
//! changed. Every wait is on an event: the broker's "running" line, the subscriber's SUBACK, a message, the admin
//! API's long-poll.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use mirrormesh::downstream::MQTT_DIRS_PER_SNAPSHOT_MAX;
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions, TreeEntry, free_port, summarize};

const WAIT: Duration = Duration::from_secs(120);
const WAIT_MS: u64 = 120_000;
const HOST: &str = "m1.example.org";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// Ends a helper process however the test ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mosquitto broker on a free loopback port, once it runs.
fn broker(dir: &Path) -> (Process, u16) {
    let port = free_port().unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")).unwrap();
    let mut child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .arg("-v")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto (Debian package mosquitto) must be installed: apt-get install mosquitto");
    let stderr = child.stderr.take().unwrap();
    let process = Process(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().unwrap_or_else(|| panic!("mosquitto exited: {seen:?}")).unwrap();
        if line.contains("running") {
            break;
        }
        seen.push(line);
    }
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (process, port)
}

/// `mosquitto_sub` subscribed to `topic`, once the broker acknowledged the subscription. Its messages come as
/// `MSG <topic>|<payload>` lines.
fn subscriber(port: u16, topic: &str) -> (Process, impl Iterator<Item = String> + use<>) {
    // Line-buffered (coreutils' stdbuf): its debug lines, the SUBACK among them, are not flushed otherwise.
    let mut child = Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-q",
            "1",
            "-d",
            "-F",
            "MSG %t|%p",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients) must be installed");
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let process = Process(child);
    let mut lines = BufReader::new(stdout).lines().map(Result::unwrap);
    assert!(lines.by_ref().any(|l| l.contains("received SUBACK")), "mosquitto_sub ended before it subscribed");
    (process, lines.filter_map(|l| l.strip_prefix("MSG ").map(str::to_owned)))
}

/// Directories (relative to the tree) holding what differs between two summaries of a tree.
fn changed_dirs(before: &BTreeMap<String, TreeEntry>, after: &BTreeMap<String, TreeEntry>) -> BTreeSet<String> {
    let parent = |p: &str| p.rsplit_once('/').map_or(String::new(), |(d, _)| d.to_owned());
    let is_dir = |e: Option<&TreeEntry>| matches!(e, Some(TreeEntry::Dir { .. }));
    let paths: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    paths
        .into_iter()
        .filter(|p| before.get(*p) != after.get(*p))
        .filter(|p| !(is_dir(after.get(*p)) && (is_dir(before.get(*p)) || !before.contains_key(*p))))
        .map(|p| parent(p))
        .collect()
}

/// Every entry of the origin's tree (but its own `last-updated`) is in the mirror's, the same: the snapshot is in
/// place (removals may still wait for their grace period).
fn check_in_place(fabric: &LocalFabric, mirror: usize) {
    let mut origin = summarize(&fabric.nodes[0].tree).unwrap().entries;
    origin.remove("last-updated");
    let copy = summarize(&fabric.nodes[mirror].tree).unwrap().entries;
    for (path, entry) in origin {
        assert_eq!(copy.get(&path), Some(&entry), "{path} in the mirror's tree");
    }
}

/// The mirror's tree as the origin's, its own downstream files (and the directories made for them) aside.
fn check_identical_but_own(fabric: &LocalFabric, mirror: usize, own: &[&str]) {
    let origin = summarize(&fabric.nodes[0].tree).unwrap().entries;
    let mut copy = summarize(&fabric.nodes[mirror].tree).unwrap().entries;
    for path in own {
        assert!(copy.remove(*path).is_some(), "{path} is in the mirror's tree");
        let mut dir = *path;
        while let Some((parent, _)) = dir.rsplit_once('/') {
            if !origin.contains_key(parent) {
                copy.remove(parent);
            }
            dir = parent;
        }
    }
    let mut origin = origin;
    origin.remove("last-updated");
    assert_eq!(copy, origin, "the mirror's tree is the origin's");
}

#[test]
fn each_snapshot_writes_last_updated_and_a_trace_and_reaches_a_real_mqtt_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, port) = broker(dir.path());
    let topic = format!("rsync/{HOST}");
    let (_sub, mut messages) = subscriber(port, &format!("{topic}/#"));

    let mirror = NodeOptions {
        extra_config: format!(
            "\n[downstream]\nhost = \"{HOST}\"\nlast_updated = \"last-updated\"\ntrace_dir = \"project/trace\"\n\
             mqtt_broker = \"127.0.0.1:{port}\"\n"
        ),
        ..NodeOptions::default()
    };
    // The origin's own `last-updated` (its cron job's) is left out of its snapshots.
    let origin = NodeOptions {
        extra_config: "\n[downstream]\nlast_updated = \"last-updated\"\n".into(),
        ..NodeOptions::default()
    };
    let options = [origin, NodeOptions::default(), mirror];
    let mut fabric = LocalFabric::create(&dir.path().join("fabric"), binary(), 2, &options).unwrap();
    let origin_tree = fabric.nodes[0].tree.clone();
    gentree::generate(&GenTreeArgs { out: origin_tree.clone(), fraction: 0.01, seed: 3, ..GenTreeArgs::default() })
        .unwrap();
    std::fs::write(origin_tree.join("last-updated"), "written by the origin's own cron job\n").unwrap();
    let empty = BTreeMap::new();
    let first_tree = summarize(&origin_tree).unwrap().entries;
    fabric.start_all().unwrap();
    let own = ["last-updated", "project/trace/m1.example.org"];

    let mut published = Vec::new();
    let mut messages_total = 0;
    for round in 0..2 {
        let before = if round == 0 { &empty } else { &first_tree };
        if round == 1 {
            gentree::generate(&GenTreeArgs {
                out: origin_tree.clone(),
                update: Some(3),
                seed: 5,
                ..Default::default()
            })
            .unwrap();
        }
        let mut after = summarize(&origin_tree).unwrap().entries;
        after.remove("last-updated");
        let mut before = before.clone();
        before.remove("last-updated");
        let dirs = changed_dirs(&before, &after);
        let publishing = std::time::Instant::now();
        let reply = fabric.publish().unwrap();
        published.push(reply.seq);
        // The messages of this snapshot: one per changed directory, or one "everything" when there are too many.
        let expected: BTreeSet<String> = if dirs.len() > MQTT_DIRS_PER_SNAPSHOT_MAX {
            [format!("{topic}|")].into()
        } else {
            dirs.iter().map(|d| if d.is_empty() { format!("{topic}|") } else { format!("{topic}/{d}|{d}") }).collect()
        };
        let mut got = BTreeSet::new();
        while got.len() < expected.len() {
            let message = messages.next().expect("a message");
            if got.is_empty() {
                eprintln!(
                    "round {round}: first MQTT message {:.0} ms after the publish began ({} files changed)",
                    publishing.elapsed().as_secs_f64() * 1000.0,
                    reply.changed_files
                );
                // Sent once the snapshot is in place and the files are written: a triggered rsync finds it all.
                let status = fabric.status(2).unwrap();
                assert_eq!(status.repos[0].seq, Some(reply.seq), "message {message} before the snapshot was in place");
                let created = status.repos[0].created_ms.unwrap() / 1000;
                let last = std::fs::read_to_string(fabric.nodes[2].tree.join("last-updated")).unwrap();
                assert_eq!(
                    last,
                    format!("{created}\n"),
                    "Alpine's last-updated: the snapshot's creation at the origin"
                );
                check_in_place(&fabric, 2);
            }
            assert!(got.insert(message.clone()), "{message} twice");
        }
        assert_eq!(got, expected, "round {round}");
        messages_total += got.len() as u64;
        fabric.wait_all_settled(reply.seq, WAIT).unwrap();
        check_identical_but_own(&fabric, 2, &own);
        if round == 1 {
            assert!(expected.len() <= 3 && !expected.is_empty(), "an update of 3 packages: {expected:?}");
        }
    }

    // The trace file: the chain (origin, this node, its host), the times and the snapshot.
    let status = fabric.status(2).unwrap();
    let trace = std::fs::read_to_string(fabric.nodes[2].tree.join("project/trace").join(HOST)).unwrap();
    for line in [
        format!("Archive serial: {}", published[1]),
        format!("Running on host: {HOST}"),
        format!("Upstream-mirror: {}", fabric.nodes[0].peer_id),
        format!("Node: {}", fabric.nodes[2].peer_id),
        format!("Snapshot-root: {}", status.repos[0].root.clone().unwrap()),
    ] {
        assert!(trace.lines().any(|l| l == line), "no {line:?} in\n{trace}");
    }
    assert!(trace.lines().next().unwrap().ends_with(" +0000"), "{trace}");
    assert!(trace.lines().any(|l| l.starts_with("Date-Started: ")), "{trace}");
    // The other mirror, with no [downstream], has the origin's tree exactly, without the origin's own file.
    check_identical_but_own(&fabric, 1, &[]);
    assert!(!fabric.nodes[1].tree.join("last-updated").exists());
    let counters =
        fabric.client(2, WAIT).wait_counter("mqtt_messages_published", messages_total, WAIT_MS).unwrap().counters;
    assert_eq!(counters.get("downstream_files_written"), Some(&4), "{counters:?}");
    for failure in ["downstream_write_failures", "downstream_named_by_snapshot", "mqtt_publish_failures"] {
        assert_eq!(counters.get(failure), None, "{failure}: {counters:?}");
    }
}

#[test]
fn the_snapshot_wins_and_a_sync_never_removes_the_mirrors_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = NodeOptions {
        extra_config: "\n[downstream]\nlast_updated = \"last-updated\"\n".into(),
        ..NodeOptions::default()
    };
    // The origin does not leave its `last-updated` out: it travels, and the mirror leaves it as published.
    let mut fabric = LocalFabric::create(dir.path(), binary(), 1, &[NodeOptions::default(), mirror]).unwrap();
    let tree = fabric.nodes[0].tree.clone();
    std::fs::create_dir_all(tree.join("alpine")).unwrap();
    std::fs::write(tree.join("alpine/p-1.0-r0.apk"), "package").unwrap();
    std::fs::write(tree.join("last-updated"), "the origin's\n").unwrap();
    fabric.start_all().unwrap();
    let first = fabric.publish().unwrap();
    let client = fabric.client(1, WAIT);
    client.wait_counter("downstream_named_by_snapshot", 1, WAIT_MS).unwrap();
    fabric.wait_all_settled(first.seq, WAIT).unwrap();
    fabric.check_identical(1).unwrap();
    assert_eq!(std::fs::read_to_string(fabric.nodes[1].tree.join("last-updated")).unwrap(), "the origin's\n");

    // The origin stops publishing it (grace 0): the removal the diff asks for is not carried out, and the mirror's
    // own file takes its place.
    std::fs::remove_file(tree.join("last-updated")).unwrap();
    std::fs::write(tree.join("alpine/q-1.0-r0.apk"), "another package").unwrap();
    let second = fabric.publish().unwrap();
    client.wait_counter("downstream_files_written", 1, WAIT_MS).unwrap();
    let settled = fabric.wait_all_settled(second.seq, WAIT).unwrap();
    assert_eq!(settled[0].repos[0].pending_deletions, 0);
    let created = settled[0].repos[0].created_ms.unwrap() / 1000;
    let last = std::fs::read_to_string(fabric.nodes[1].tree.join("last-updated"));
    assert_eq!(last.ok(), Some(format!("{created}\n")), "the mirror's own last-updated survived the sync");
}
