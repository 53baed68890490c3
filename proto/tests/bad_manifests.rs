//! Manifests with bad paths, absurd sizes or counts are refused when decoded or walked, each with its own error.

mod support;

use mirrormesh_proto::delta::{DeltaChange, DirDelta, ManifestDelta};
use mirrormesh_proto::diff::{DiffError, diff};
use mirrormesh_proto::entry::{Entry, EntryKind, FILE_SIZE_MAX, FileMeta};
use mirrormesh_proto::node::{LEAF_ENTRIES_MAX, NODE_BYTES_MAX, Node, NodeError, NodeHash, verify_node};
use mirrormesh_proto::node_store::NodeSink;
use mirrormesh_proto::path::PathError;
use mirrormesh_proto::wire::DecodeError;
use support::*;

fn leaf_with(name: &str, kind: EntryKind) -> Vec<u8> {
    Node::Leaf { entries: vec![Entry { name: name.to_owned(), kind }] }.encode()
}

fn decode_error(bytes: &[u8]) -> DecodeError {
    Node::decode(bytes).expect_err("must be refused")
}

#[test]
fn bad_names_are_refused_each_with_its_own_error() {
    let f = || EntryKind::File(file(10, 1));
    assert_eq!(decode_error(&leaf_with("..", f())), DecodeError::Path(PathError::DotDot));
    assert_eq!(decode_error(&leaf_with(".", f())), DecodeError::Path(PathError::Dot));
    assert_eq!(decode_error(&leaf_with("/etc", f())), DecodeError::Path(PathError::Absolute));
    assert_eq!(decode_error(&leaf_with("a\0b", f())), DecodeError::Path(PathError::Nul));
    assert_eq!(decode_error(&leaf_with("", f())), DecodeError::Path(PathError::EmptyComponent));
    assert_eq!(decode_error(&leaf_with("a/b", f())), DecodeError::Path(PathError::Separator));
    assert!(matches!(decode_error(&leaf_with(&"n".repeat(300), f())), DecodeError::Path(PathError::TooLong { .. })));
}

#[test]
fn bad_symlinks_are_refused() {
    let link = |t: &str| EntryKind::Symlink { target: t.to_owned() };
    assert_eq!(decode_error(&leaf_with("l", link("/etc/passwd"))), DecodeError::Path(PathError::Absolute));
    assert_eq!(decode_error(&leaf_with("l", link("a/../../x"))), DecodeError::Path(PathError::SymlinkNotNormal));
    assert_eq!(decode_error(&leaf_with("l", link("a\0"))), DecodeError::Path(PathError::Nul));

    // `../../x` is well-formed but escapes from a link one directory deep: caught when the tree is walked.
    let mut nodes = Nodes::new();
    let inner = leaf_with("escape", link("../../x"));
    let inner_hash = NodeHash::of(&inner);
    nodes.put_node(inner_hash, inner);
    let outer = leaf_with("sub", EntryKind::Dir { mode: 0o755, root: inner_hash });
    let root = NodeHash::of(&outer);
    nodes.put_node(root, outer);
    match diff(&nodes, None, &root) {
        Err(DiffError::Path { path, source: PathError::SymlinkEscapes }) => assert_eq!(path, "sub/escape"),
        other => panic!("expected an escaping symlink error, got {other:?}"),
    }
}

#[test]
fn absurd_sizes_and_counts_are_refused() {
    // A file claiming more than FILE_SIZE_MAX.
    let huge = FileMeta { mode: 0o644, size: FILE_SIZE_MAX + 1, mtime: 0, chunks: vec![] };
    assert_eq!(
        decode_error(&leaf_with("big", EntryKind::File(huge))),
        DecodeError::Invalid("file size above FILE_SIZE_MAX")
    );
    // A chunk list that does not match the size.
    let mut meta = file(3 << 20, 1);
    meta.chunks.pop();
    assert_eq!(
        decode_error(&leaf_with("f", EntryKind::File(meta))),
        DecodeError::Invalid("chunk count does not match file size")
    );
    // Mode bits outside the permission bits.
    let mut meta = file(1, 1);
    meta.mode = 0o100644;
    assert_eq!(
        decode_error(&leaf_with("f", EntryKind::File(meta))),
        DecodeError::Invalid("mode has non-permission bits")
    );
    // More entries than a leaf may hold: refused from the declared count, before reading them.
    let entries: Vec<Entry> = (0..=LEAF_ENTRIES_MAX)
        .map(|i| Entry { name: format!("{i:05}"), kind: EntryKind::Symlink { target: "x".into() } })
        .collect();
    assert!(matches!(decode_error(&Node::Leaf { entries }.encode()), DecodeError::Malformed(_)));
    // A node above the size limit.
    assert!(matches!(decode_error(&vec![1u8; NODE_BYTES_MAX + 1]), DecodeError::TooLarge { .. }));
    // Unsorted or duplicate names.
    let two = |a: &str, b: &str| Node::Leaf {
        entries: vec![
            Entry { name: a.into(), kind: EntryKind::File(file(1, 1)) },
            Entry { name: b.into(), kind: EntryKind::File(file(1, 2)) },
        ],
    };
    assert_eq!(decode_error(&two("b", "a").encode()), DecodeError::Invalid("leaf entries not strictly sorted by name"));
    assert_eq!(decode_error(&two("a", "a").encode()), DecodeError::Invalid("leaf entries not strictly sorted by name"));
    // Interior nodes: level 0, no children.
    assert_eq!(
        decode_error(&Node::Interior { level: 0, children: vec![NodeHash([0; 32])] }.encode()),
        DecodeError::Invalid("interior level out of range")
    );
    assert_eq!(
        decode_error(&Node::Interior { level: 1, children: vec![] }.encode()),
        DecodeError::Invalid("interior node without children")
    );
}

#[test]
fn a_node_must_match_its_hash() {
    let bytes = leaf_with("a", EntryKind::File(file(1, 1)));
    let wrong = NodeHash([1; 32]);
    assert_eq!(verify_node(&wrong, &bytes), Err(NodeError::HashMismatch { expected: wrong }));
    assert!(verify_node(&NodeHash::of(&bytes), &bytes).is_ok());
}

#[test]
fn a_node_at_the_wrong_level_is_refused_when_walked() {
    let mut nodes = Nodes::new();
    let leaf = leaf_with("a", EntryKind::File(file(1, 1)));
    let leaf_hash = NodeHash::of(&leaf);
    nodes.put_node(leaf_hash, leaf);
    // An interior node at level 2 whose child is a leaf (should be level 1).
    let interior = Node::Interior { level: 2, children: vec![leaf_hash] }.encode();
    let root = NodeHash::of(&interior);
    nodes.put_node(root, interior);
    assert!(matches!(diff(&nodes, None, &root), Err(DiffError::Level { expected: 1, found: 0, .. })));
}

#[test]
fn bad_deltas_are_refused() {
    let delta = |path: &str, name: &str| ManifestDelta {
        base: NodeHash([0; 32]),
        target: NodeHash([1; 32]),
        dirs: vec![DirDelta { path: path.into(), changes: vec![DeltaChange { name: name.into(), kind: None }] }],
    };
    let decode = |d: ManifestDelta| ManifestDelta::decode(&d.encode()).expect_err("must be refused");
    assert_eq!(decode(delta("a/../b", "x")), DecodeError::Path(PathError::DotDot));
    assert_eq!(decode(delta("/a", "x")), DecodeError::Path(PathError::Absolute));
    assert_eq!(decode(delta("a", "..")), DecodeError::Path(PathError::DotDot));
    assert_eq!(decode(delta("a", "x/y")), DecodeError::Path(PathError::Separator));

    // A well-formed delta whose result does not hash to its target is refused when applied.
    let tree = alpine_tree(100);
    let (root, nodes) = build(&tree);
    let mut bad = delta("alpine/edge/main/armv7", "lib3-2.0-r1.apk");
    bad.base = root;
    let mut sink = Nodes::new();
    assert!(matches!(bad.apply(&root, &nodes, &mut sink), Err(mirrormesh_proto::delta::DeltaError::Target { .. })));
    // Removing something absent is refused.
    let mut absent = delta("alpine/edge/main/armv7", "nope.apk");
    absent.base = root;
    assert!(matches!(
        absent.apply(&root, &nodes, &mut sink),
        Err(mirrormesh_proto::delta::DeltaError::RemoveMissing(_))
    ));
}

/// Found by the `decode_node` fuzz target: postcard accepts an overlong varint (here a directory mode `109` written
/// as `0xED 0x00`), so the same node had two encodings and two hashes. Node decoding now accepts only the
/// canonical encoding.
#[test]
fn non_canonical_node_encoding_is_refused() {
    let crash: &[u8] = &[
        1, 0, 2, 4, 101, 100, 103, 101, 2, 237, 0, 0, 0, 0, 0, 0, 0, 9, 153, 156, 158, 67, 139, 211, 158, 197, 44, 201,
        24, 83, 56, 111, 237, 135, 145, 63, 103, 53, 130, 89, 152, 160, 193, 13, 108, 97, 116, 101, 115, 116, 45, 115,
        116, 97, 98, 108, 101, 1, 4, 101, 100, 103, 101,
    ];
    assert_eq!(Node::decode(crash), Err(DecodeError::NonCanonical));
    // The canonical form of the same value still decodes.
    let canonical = [
        1, 0, 2, 4, 101, 100, 103, 101, 2, 109, 0, 0, 0, 0, 0, 0, 9, 153, 156, 158, 67, 139, 211, 158, 197, 44, 201,
        24, 83, 56, 111, 237, 135, 145, 63, 103, 53, 130, 89, 152, 160, 193, 13, 108, 97, 116, 101, 115, 116, 45, 115,
        116, 97, 98, 108, 101, 1, 4, 101, 100, 103, 101,
    ];
    assert!(Node::decode(&canonical).is_ok());
}
