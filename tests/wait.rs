//! `mirrormesh wait` against real daemons on loopback (an origin and two mirrors): it returns as soon as a mirror
//! (or, with `--all`, every member the origin knows) serves the snapshot, also when started before the publish;
//! its exit status says whether the snapshot was reached (0), the timeout passed first (124) or the node could not
//! be asked (1). Every wait is on an event: the command's own long-poll, or the admin API's.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

fn wait_command(fabric: &LocalFabric, node: usize, args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .args(["wait", "--admin", &fabric.nodes[node].admin.to_string()])
        .args(args)
        .env_remove("MIRRORMESH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn wait(fabric: &LocalFabric, node: usize, args: &[&str]) -> Output {
    wait_command(fabric, node, args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn wait_returns_once_a_mirror_or_the_whole_fabric_serves_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let options = vec![NodeOptions { delete_grace_secs: 0, ..NodeOptions::default() }; 3];
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &options).unwrap();
    let tree = fabric.nodes[0].tree.clone();
    gentree::generate(&GenTreeArgs { out: tree.clone(), fraction: 0.002, seed: 1, ..GenTreeArgs::default() }).unwrap();
    fabric.start_all().unwrap();

    // No snapshot yet: without --seq there is nothing to wait for (an error); with one, --timeout 0 says "not yet".
    let none = wait(&fabric, 1, &["--timeout", "0"]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none.stderr));
    assert!(text(&none.stderr).contains("knows of no snapshot yet"), "{}", text(&none.stderr));
    let early = wait(&fabric, 1, &["--seq", "1", "--timeout", "0"]);
    assert_eq!(early.status.code(), Some(124), "{}", text(&early.stderr));
    assert!(text(&early.stderr).contains("timed out after 0 s waiting for seq 1"), "{}", text(&early.stderr));

    let first = fabric.publish().unwrap().seq;
    let seq = first.to_string();
    let mirror = wait(&fabric, 1, &["--seq", &seq, "--timeout", "120"]);
    assert_eq!(mirror.status.code(), Some(0), "{}", text(&mirror.stderr));
    let said = text(&mirror.stdout);
    assert!(said.contains(&fabric.nodes[1].peer_id) && said.contains(&format!("serves alpine seq {first}")), "{said}");
    assert_eq!(fabric.status(1).unwrap().repos[0].seq, Some(first), "mirror1 serves it once wait returned");

    // The origin's newest (no --seq), everywhere.
    let all = wait(&fabric, 0, &["--all", "--timeout", "120"]);
    assert_eq!(all.status.code(), Some(0), "{}", text(&all.stderr));
    assert!(text(&all.stdout).contains("and so do its 2 connected peers"), "{}", text(&all.stdout));
    for i in 1..3 {
        assert_eq!(fabric.status(i).unwrap().repos[0].seq, Some(first), "{} serves it", fabric.nodes[i].name);
    }

    // Started before the next publish, for any newer snapshot: returns once every mirror serves it.
    let next = (first + 1).to_string();
    let waiter = wait_command(&fabric, 0, &["--all", "--seq", &next, "--timeout", "120"]).spawn().unwrap();
    gentree::generate(&GenTreeArgs { out: tree, update: Some(2), seed: 2, ..GenTreeArgs::default() }).unwrap();
    let second = fabric.publish().unwrap().seq;
    let done = waiter.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    assert!(text(&done.stdout).contains(&format!("serves alpine seq {second}")), "{}", text(&done.stdout));
    for i in 1..3 {
        assert_eq!(fabric.status(i).unwrap().repos[0].seq, Some(second), "{} serves it", fabric.nodes[i].name);
    }

    // A snapshot nobody has: the timeout's status, and who is behind.
    let future = (second + 1000).to_string();
    let late = wait(&fabric, 0, &["--all", "--seq", &future, "--timeout", "0"]);
    let err = text(&late.stderr);
    assert_eq!(late.status.code(), Some(124), "{err}");
    assert!(
        err.contains(&format!("waiting for seq {future}")) && err.contains(&format!("serves seq {second}")),
        "{err}"
    );
    for i in 1..3 {
        assert!(err.contains(&format!("behind: {} holds seq {second}", fabric.nodes[i].peer_id)), "{err}");
    }

    // Nobody answers: an error, not a timeout.
    let port = mirrormesh::local_fabric::free_port().unwrap().to_string();
    let gone = Command::new(binary()).args(["wait", "--admin", &format!("127.0.0.1:{port}"), "--seq", "1"]).output();
    let gone = gone.unwrap();
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone.stderr));
    assert!(text(&gone.stderr).contains("cannot reach the mirrormesh daemon"), "{}", text(&gone.stderr));
}
