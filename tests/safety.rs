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
