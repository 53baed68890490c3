//! `mirrormesh keygen` and `mirrormesh publish` through the real binary, on real files.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use mirrormesh::store::StateStore;
use mirrormesh_proto::chunk::chunk_ids;
use mirrormesh_proto::delta::ManifestDelta;
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::node_store::Overlay;
use mirrormesh_proto::{RepoId, RootTracker};

fn mirrormesh(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mirrormesh")).args(args).output().expect("binary runs");
    assert!(out.status.success(), "mirrormesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn field<'a>(output: &'a str, name: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name:?} in output:\n{output}"))
}

fn write(root: &Path, path: &str, bytes: &[u8]) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Deterministic incompressible-looking bytes.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut reader = blake3::Hasher::new().update(&[seed]).finalize_xof();
    out.resize(len, 0);
    reader.fill(&mut out);
    out
}

#[test]
fn publish_scans_signs_caches_and_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let state = dir.path().join("state");
    let key = dir.path().join("origin.key");

    let keygen = mirrormesh(&["keygen", "--out", key.to_str().unwrap()]);
    let node_id = field(&keygen, "node id").to_owned();
    assert!(node_id.starts_with("12D3KooW"), "{keygen}");

    let big = bytes(2_500_000, 1);
    write(&tree, "alpine/edge/main/x86_64/big-1.0-r0.apk", &big);
    write(&tree, "alpine/edge/main/x86_64/small-1.0-r0.apk", &bytes(20_000, 2));
    write(&tree, "alpine/edge/main/x86_64/empty-1.0-r0.apk", b"");
    write(&tree, "alpine/edge/main/x86_64/APKINDEX.tar.gz", &bytes(5_000, 3));
    std::fs::create_dir_all(tree.join("alpine/v3.22/main")).unwrap();
    std::os::unix::fs::symlink("edge", tree.join("alpine/latest")).unwrap();
    std::os::unix::fs::symlink("../../../etc/passwd", tree.join("alpine/escape")).unwrap();

    let args = [
        "publish",
        "--tree",
        tree.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        // This tree is four files: removing one is a quarter of it, over the default limit.
        "--removal-limit-percent",
        "100",
    ];
    let first = mirrormesh(&args);
    assert!(field(&first, "files").starts_with("4 "), "{first}");
    assert!(field(&first, "entries").contains("1 symlinks, 1 skipped"), "escaping symlink is skipped: {first}");
    assert!(field(&first, "scan").contains("hashed 4 files"), "{first}");
    let seq1: u64 = field(&first, "published alpine seq").parse().unwrap();

    // An unchanged rescan only stats files.
    let second = mirrormesh(&args);
    assert!(field(&second, "scan").contains("hashed 0 files"), "{second}");
    assert!(field(&second, "scan").contains("4 unchanged from cache"), "{second}");
    assert_eq!(field(&second, "root"), field(&first, "root"));
    let seq2: u64 = field(&second, "published alpine seq").parse().unwrap();
    assert!(seq2 > seq1);

    // Change one file, add one, remove one: only the changed ones are hashed, and a delta is published.
    write(&tree, "alpine/edge/main/x86_64/small-1.0-r0.apk", &bytes(21_000, 4));
    write(&tree, "alpine/edge/main/x86_64/new-2.0-r0.apk", &bytes(30_000, 5));
    std::fs::remove_file(tree.join("alpine/edge/main/x86_64/empty-1.0-r0.apk")).unwrap();
    let third = mirrormesh(&args);
    assert!(field(&third, "scan").contains("hashed 2 files"), "{third}");
    assert!(field(&third, "changes").starts_with("3 since seq"), "{third}");
    assert!(field(&third, "changes").contains("delta"), "{third}");

    // What was recorded verifies: the root under the key keygen printed, the delta reproduces it from the previous
    // snapshot, and every file's chunk ids are the blake3 of its bytes.
    let store = StateStore::open(&state).unwrap();
    let reader = store.reader().unwrap();
    let repo = RepoId::new("alpine").unwrap();
    let signed = reader.root(&repo).unwrap().expect("root recorded");
    let publisher = mirrormesh::key::parse_publisher(&node_id).unwrap();
    let mut tracker = RootTracker::new([publisher], [repo]);
    let verified = tracker.accept(mirrormesh::publish::now(), &signed).expect("published root verifies");
    assert_eq!(verified.body.root.to_hex(), field(&third, "root"));
    assert_eq!(verified.body.files, 4);

    let delta_ref = verified.body.delta.clone().expect("delta referenced");
    let delta = ManifestDelta::decode(&reader.delta(&delta_ref.hash).unwrap().expect("delta stored")).unwrap();
    let mut overlay = Overlay::new(&reader);
    assert_eq!(delta.apply(&delta_ref.base_root, &reader, &mut overlay).unwrap(), verified.body.root);

    let (changes, _) = diff(&reader, None, &verified.body.root).unwrap();
    let files: HashMap<String, Vec<_>> = changes
        .into_iter()
        .filter_map(|c| match c.new.map(|e| e.kind) {
            Some(EntryKind::File(meta)) => Some((c.path, meta.chunks)),
            _ => None,
        })
        .collect();
    assert_eq!(files.len(), 4);
    for (path, chunks) in &files {
        assert_eq!(chunks, &chunk_ids(&std::fs::read(tree.join(path)).unwrap()), "{path}");
    }
    assert_eq!(files["alpine/edge/main/x86_64/big-1.0-r0.apk"].len(), 3);
}

#[test]
fn publish_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    mirrormesh(&["keygen", "--out", key.to_str().unwrap()]);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mirrormesh")).args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let state = dir.path().join("s");
    let missing = run(&[
        "publish",
        "--tree",
        "/nonexistent/tree",
        "--key",
        key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(missing.contains("/nonexistent/tree"), "{missing}");
    let bad_key = dir.path().join("bad");
    std::fs::write(&bad_key, "not a key").unwrap();
    let err = run(&[
        "publish",
        "--tree",
        dir.path().to_str().unwrap(),
        "--key",
        bad_key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(err.contains("not an ed25519 PKCS#8 PEM key"), "{err}");
    let err = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(err.contains("must not exist"), "{err}");
    let err = run(&[
        "publish",
        "--tree",
        dir.path().to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--repo",
        "../x",
    ]);
    assert!(err.contains("--repo"), "{err}");
}

/// Publishes `tree` offline with a fresh key and state; returns the command's output.
fn publish_offline(dir: &Path, tree: &Path) -> String {
    let key = dir.join("origin.key");
    if !key.exists() {
        mirrormesh(&["keygen", "--out", key.to_str().unwrap()]);
    }
    let state = dir.join("state");
    mirrormesh(&[
        "publish",
        "--tree",
        tree.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ])
}

/// Every entry of the newest published manifest in `state`, by path.
fn published(state: &Path) -> HashMap<String, EntryKind> {
    let store = StateStore::open(state).unwrap();
    let reader = store.reader().unwrap();
    let signed = reader.root(&RepoId::new("alpine").unwrap()).unwrap().expect("root recorded");
    let body = signed.verify_signature().unwrap();
    let (changes, _) = diff(&reader, None, &body.root).unwrap();
    changes.into_iter().filter_map(|c| Some((c.path, c.new?.kind))).collect()
}

#[test]
fn published_modes_never_carry_setuid_setgid_sticky_or_group_and_other_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write(&tree, "dir/tool", b"#!/bin/sh\n");
    write(&tree, "dir/shared.apk", b"package");
    std::fs::set_permissions(tree.join("dir/tool"), std::fs::Permissions::from_mode(0o4777)).unwrap();
    std::fs::set_permissions(tree.join("dir/shared.apk"), std::fs::Permissions::from_mode(0o664)).unwrap();
    std::fs::set_permissions(tree.join("dir"), std::fs::Permissions::from_mode(0o3777)).unwrap();
    publish_offline(dir.path(), &tree);
    let entries = published(&dir.path().join("state"));
    let mode = |path: &str| match &entries[path] {
        EntryKind::File(meta) => meta.mode,
        EntryKind::Dir { mode, .. } => *mode,
        other => panic!("{path}: {other:?}"),
    };
    assert_eq!(mode("dir/tool"), 0o755);
    assert_eq!(mode("dir/shared.apk"), 0o644);
    assert_eq!(mode("dir"), 0o755);
}

#[test]
fn a_file_over_the_size_limit_is_left_out_and_counted_not_a_failed_publish() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    write(&tree, "small.apk", b"small");
    let huge = std::fs::File::create(tree.join("huge.iso")).unwrap();
    // Sparse: no disk space, but its size is past the limit.
    huge.set_len(mirrormesh_proto::entry::FILE_SIZE_MAX + 1).unwrap();
    let out = publish_offline(dir.path(), &tree);
    assert!(field(&out, "files").starts_with("1 "), "{out}");
    assert!(field(&out, "entries").contains("1 skipped"), "{out}");
    let entries = published(&dir.path().join("state"));
    assert!(entries.contains_key("small.apk") && !entries.contains_key("huge.iso"));
}

/// A tree of `dirs` directories under `alpine/` with `per_dir` small packages and an index each.
fn alpine_like(tree: &Path, dirs: &[&str], per_dir: u8) {
    for (i, d) in dirs.iter().enumerate() {
        for p in 0..per_dir {
            write(tree, &format!("alpine/{d}/pkg{p}-1.0-r0.apk"), &bytes(1_000 + usize::from(p), (i as u8) ^ p));
        }
        write(tree, &format!("alpine/{d}/APKINDEX.tar.gz"), &bytes(300, i as u8));
    }
}

/// Library publish options for `tree` (key and validity as every test here uses them).
fn lib_opts(
    tree: &Path,
    changed: Option<mirrormesh::scan::Changed>,
    only_if_changed: bool,
) -> mirrormesh::publish::PublishOptions<'_> {
    mirrormesh::publish::PublishOptions {
        tree,
        repo: RepoId::new("alpine").unwrap(),
        validity: std::time::Duration::from_secs(3600),
        progress: false,
        guard: Default::default(),
        exclude: Vec::new(),
        changed,
        only_if_changed,
    }
}

fn lib_key() -> mirrormesh::key::NodeKey {
    mirrormesh::key::NodeKey::from_seed([7; 32]).unwrap()
}

/// Publishes `tree` with the library (into `state`), reading only `paths` when given.
fn publish_lib(tree: &Path, state: &Path, paths: Option<&[&str]>) -> mirrormesh::publish::PublishReport {
    let store = StateStore::open(state).unwrap();
    let changed = paths.map(|p| mirrormesh::scan::Changed::from_paths(tree, p).unwrap());
    mirrormesh::publish::publish(&store, &lib_key(), &lib_opts(tree, changed, false)).unwrap()
}

#[test]
fn a_publish_of_named_paths_reads_only_their_directories_and_equals_a_full_scan() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let dirs = ["edge/main/x86_64", "edge/community/x86_64", "v3.20/main/x86_64", "v3.20/main/aarch64"];
    alpine_like(&tree, &dirs, 40);
    let first = publish_lib(&tree, &dir.path().join("state"), None);
    assert_eq!(first.body.files, 4 * 41);

    // A rebuilt package (new file, new index, old file gone), a package added elsewhere, and a new repository.
    write(&tree, "alpine/edge/main/x86_64/pkg3-1.0-r1.apk", &bytes(5_000, 99));
    write(&tree, "alpine/edge/main/x86_64/APKINDEX.tar.gz", &bytes(301, 98));
    std::fs::remove_file(tree.join("alpine/edge/main/x86_64/pkg3-1.0-r0.apk")).unwrap();
    write(&tree, "alpine/v3.20/main/aarch64/extra-2-r0.apk", &bytes(7_000, 97));
    alpine_like(&tree.join("alpine/v3.21"), &["main/x86_64"], 5);
    std::fs::rename(tree.join("alpine/v3.21/alpine/main"), tree.join("alpine/v3.21/main")).unwrap();
    std::fs::remove_dir(tree.join("alpine/v3.21/alpine")).unwrap();
    let paths = [
        "alpine/edge/main/x86_64/pkg3-1.0-r1.apk",
        "alpine/edge/main/x86_64/APKINDEX.tar.gz",
        "alpine/edge/main/x86_64/pkg3-1.0-r0.apk",
        "/alpine/v3.20/main/aarch64/extra-2-r0.apk",
        "alpine/v3.21",
    ];
    let changed = publish_lib(&tree, &dir.path().join("state"), Some(&paths));
    // Read: the two changed directories, the new repository's two, and their ancestors; the other two repositories'
    // directories were kept unread.
    assert_eq!(changed.scan.dirs_kept, 2, "{:?}", changed.scan);
    assert_eq!(
        changed.scan.files,
        41 + 42 + 6,
        "only the changed directories' files are looked at: {:?}",
        changed.scan
    );
    assert_eq!(changed.scan.hashed_files, 2 + 1 + 6, "{:?}", changed.scan);
    assert_eq!(changed.changed_files, 2 + 1 + 6);

    // The same snapshot a full scan of the tree gives, totals included.
    let full = publish_lib(&tree, &dir.path().join("state-full"), None);
    assert_eq!(changed.body.root, full.body.root);
    assert_eq!((changed.body.files, changed.body.bytes), (full.body.files, full.body.bytes));
}

#[test]
fn a_directory_still_being_written_keeps_its_previous_content_until_it_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    alpine_like(&tree, &["edge/main/x86_64", "edge/testing/x86_64"], 3);
    let state = dir.path().join("state");
    let first = publish_lib(&tree, &state, None);
    write(&tree, "alpine/edge/main/x86_64/new-1-r0.apk", b"quiet");
    write(&tree, "alpine/edge/testing/x86_64/half-1-r0.apk", b"still being written");
    std::fs::create_dir_all(tree.join("alpine/edge/busy/x86_64")).unwrap();
    write(&tree, "alpine/edge/busy/x86_64/a.apk", b"new, busy");

    let store = StateStore::open(&state).unwrap();
    let changed = mirrormesh::scan::Changed {
        dirs: ["alpine/edge/main/x86_64".to_owned(), "alpine/edge".to_owned()].into(),
        trees: Default::default(),
        keep: ["alpine/edge/testing/x86_64".to_owned(), "alpine/edge/busy".to_owned()].into(),
    };
    let report = mirrormesh::publish::publish(&store, &lib_key(), &lib_opts(&tree, Some(changed), false)).unwrap();
    drop(store);
    let entries = published(&state);
    assert!(entries.contains_key("alpine/edge/main/x86_64/new-1-r0.apk"));
    assert!(!entries.contains_key("alpine/edge/testing/x86_64/half-1-r0.apk"), "a busy directory was read");
    assert!(!entries.keys().any(|p| p.starts_with("alpine/edge/busy")), "a new busy directory was published");
    assert_eq!(report.body.files, first.body.files + 1);
}

#[test]
fn publish_paths_on_the_command_line_and_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    alpine_like(&tree, &["edge/main/x86_64", "edge/community/x86_64", "v3.20/main/x86_64"], 10);
    publish_offline(dir.path(), &tree);
    write(&tree, "alpine/edge/main/x86_64/one-1-r0.apk", b"one");
    let key = dir.path().join("origin.key");
    let state = dir.path().join("state");
    let base = [
        "publish",
        "--tree",
        tree.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ];
    let out = mirrormesh(&[&base[..], &["--paths", "alpine/edge/main/x86_64/one-1-r0.apk"]].concat());
    assert!(field(&out, "entries").contains("2 kept unread"), "{out}");
    assert!(field(&out, "files").starts_with("34 "), "{out}");

    // From standard input, one path per line.
    write(&tree, "alpine/v3.20/main/x86_64/two-1-r0.apk", b"two");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mirrormesh"))
        .args([&base[..], &["--paths-from", "-"]].concat())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(b"alpine/v3.20/main/x86_64/two-1-r0.apk\n\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(field(&out, "files").starts_with("35 "), "{out}");
    assert!(published(&state).contains_key("alpine/v3.20/main/x86_64/two-1-r0.apk"));

    // A path that is not a clean relative path is refused before anything is read.
    let out = Command::new(env!("CARGO_BIN_EXE_mirrormesh"))
        .args([&base[..], &["--paths", "alpine/../etc/passwd"]].concat())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("changed path \"alpine/../etc/passwd\""), "{err}");
}

#[test]
fn a_watched_publish_of_an_unchanged_tree_signs_nothing() {
    use mirrormesh::publish::{PublishError, publish};
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    alpine_like(&tree, &["edge/main/x86_64"], 3);
    let state = dir.path().join("state");
    let first = publish_lib(&tree, &state, None);
    let store = StateStore::open(&state).unwrap();
    let key = lib_key();
    let opts = |only_if_changed| lib_opts(&tree, None, only_if_changed);
    assert!(matches!(publish(&store, &key, &opts(true)), Err(PublishError::Unchanged)));
    let root = |store: &StateStore| {
        store.reader().unwrap().root(&RepoId::new("alpine").unwrap()).unwrap().unwrap().verify_signature().unwrap()
    };
    assert_eq!(root(&store).seq, first.body.seq, "nothing was signed");
    // An operator's publish (or a re-signing) of the same tree still signs a new root.
    let again = publish(&store, &key, &opts(false)).unwrap();
    assert!(again.body.seq > first.body.seq);
    write(&tree, "alpine/edge/main/x86_64/new-1-r0.apk", b"new");
    let changed = publish(&store, &key, &opts(true)).unwrap();
    assert_eq!(changed.changed_files, 1);
}
