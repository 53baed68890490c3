//! Manifest algebra: diff, apply, delta, paging locality, encoding round trips.

mod support;

use mirrormesh_proto::delta::ManifestDelta;
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::node::{Node, NodeHash};
use mirrormesh_proto::node_store::Overlay;
use mirrormesh_proto::tree::TreeDir;
use proptest::prelude::*;
use support::*;

/// One edit of a random tree. Names come from a small alphabet so edits collide with what exists.
#[derive(Debug, Clone)]
enum Edit {
    File { path: String, size: u64, tag: u64 },
    Symlink { path: String, target: String },
    Dir { path: String, mode: u32 },
    Remove { path: String },
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-e]{1,2}".prop_map(|s| s),
        1 => "[a-z0-9._-]{1,12}".prop_filter("not . or ..", |s| s != "." && s != ".."),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(name(), 1..4).prop_map(|parts| parts.join("/"))
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => (path(), 0u64..3_000_000, any::<u64>()).prop_map(|(path, size, tag)| Edit::File { path, size, tag }),
        1 => (path(), name()).prop_map(|(path, target)| Edit::Symlink { path, target }),
        1 => (path(), prop_oneof![Just(0o755u32), Just(0o700)]).prop_map(|(path, mode)| Edit::Dir { path, mode }),
        2 => path().prop_map(|path| Edit::Remove { path }),
    ]
}

fn apply_edits(tree: &mut TreeDir, edits: &[Edit]) {
    for edit in edits {
        // Edits that do not fit the current tree (removing what is absent, a file under a file) are skipped: the
        // point is a random *valid* tree.
        let _ = match edit {
            Edit::File { path, size, tag } => tree.insert_file(path, file(*size, *tag)),
            Edit::Symlink { path, target } => tree.insert(path, EntryKind::Symlink { target: target.clone() }),
            Edit::Dir { path, mode } => tree.insert(path, EntryKind::Dir { mode: *mode, root: NodeHash([0; 32]) }),
            Edit::Remove { path } => {
                let (parent, name) = mirrormesh_proto::tree::split_parent(path);
                match tree.dir_mut(parent) {
                    Some(dir) => {
                        dir.entries.retain(|e| e.name != name);
                        dir.subdirs.remove(name);
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
        };
    }
}

fn random_tree() -> impl Strategy<Value = TreeDir> {
    prop::collection::vec(edit(), 0..40).prop_map(|edits| {
        let mut tree = TreeDir::default();
        apply_edits(&mut tree, &edits);
        tree
    })
}

/// A base tree and a second one derived from it by more edits (so the two share most of their content).
fn tree_pair() -> impl Strategy<Value = (TreeDir, TreeDir)> {
    (random_tree(), prop::collection::vec(edit(), 0..25)).prop_map(|(a, edits)| {
        let mut b = a.clone();
        apply_edits(&mut b, &edits);
        (a, b)
    })
}

fn check_pair(a: &TreeDir, b: &TreeDir) -> Result<(), TestCaseError> {
    let (root_a, mut nodes) = build(a);
    let (root_b, nodes_b) = build(b);
    nodes.extend(nodes_b);

    // Applying diff(a, b) to a gives b.
    let (changes, _) = diff(&nodes, Some(&root_a), &root_b).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut model = a.clone();
    for change in &changes {
        model.apply(change).map_err(|e| TestCaseError::fail(format!("{change:?}: {e}")))?;
    }
    let mut scratch = Nodes::new();
    let mut expected = b.clone();
    prop_assert_eq!(model.build(&mut scratch).unwrap(), root_b);
    expected.build(&mut scratch).unwrap();
    prop_assert_eq!(&model, &expected);
    prop_assert_eq!(changes.is_empty(), root_a == root_b);

    // The delta built from the diff, applied to a's nodes alone, reproduces b's root; it round-trips.
    let (_, nodes_a) = build(a);
    let delta = ManifestDelta::from_changes(root_a, root_b, &changes);
    let encoded = delta.encode();
    prop_assert_eq!(&ManifestDelta::decode(&encoded).unwrap(), &delta);
    let mut overlay = Overlay::new(&nodes_a);
    let rebuilt = delta.apply(&root_a, &nodes_a, &mut overlay.added).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(rebuilt, root_b);

    // Diff of a tree with itself loads nothing.
    let (same, stats) = diff(&nodes, Some(&root_b), &root_b).unwrap();
    prop_assert!(same.is_empty());
    prop_assert_eq!(stats.nodes_loaded, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn diff_then_apply_gives_the_new_tree((a, b) in tree_pair()) {
        check_pair(&a, &b)?;
    }

    #[test]
    fn diff_of_unrelated_trees((a, b) in (random_tree(), random_tree())) {
        check_pair(&a, &b)?;
    }

    #[test]
    fn nodes_round_trip(tree in random_tree()) {
        let (_, nodes) = build(&tree);
        for (hash, bytes) in &nodes {
            let node = Node::decode(bytes).unwrap();
            prop_assert_eq!(&node.encode(), bytes);
            prop_assert_eq!(NodeHash::of(bytes), *hash);
        }
    }

    #[test]
    fn building_is_independent_of_insertion_order(edits in prop::collection::vec(edit(), 0..40)) {
        let mut forward = TreeDir::default();
        apply_edits(&mut forward, &edits);
        // Rebuild the same final tree by inserting its files in reverse path order.
        let (root, nodes) = build(&forward);
        let (changes, _) = diff(&nodes, None, &root).unwrap();
        let mut backward = TreeDir::default();
        for change in changes.iter().rev() {
            if let Some(new) = &change.new {
                backward.insert(&change.path, new.kind.clone()).unwrap();
            }
        }
        prop_assert_eq!(build(&backward).0, root);
    }
}

/// The paging promise: one changed file in a 20,000-entry directory costs one leaf and the path to the root.
#[test]
fn one_file_change_in_a_20000_entry_directory_costs_at_most_8_kib() {
    let base = alpine_tree(20_000);
    let (root, nodes) = build(&base);
    let dir = "alpine/edge/community/x86_64";

    let mut modified = base.clone();
    modified.insert_file(&format!("{dir}/pkg010000-1.0.4-r0.apk"), file(31_337, 99)).unwrap();
    let mut added = base.clone();
    added.insert_file(&format!("{dir}/newpkg-0.1-r0.apk"), file(12_345, 98)).unwrap();
    let mut removed = base.clone();
    removed.dir_mut(dir).unwrap().entries.retain(|e| e.name != "pkg005000-1.0.2-r0.apk");
    removed.dir_mut(dir).unwrap().subdirs.clear();

    for (what, tree) in [("modify", modified), ("add", added), ("remove", removed)] {
        let (new_root, new_nodes) = build(&tree);
        let bytes = new_node_bytes(&nodes, &new_nodes);
        let count = new_nodes.keys().filter(|h| !nodes.contains_key(h)).count();
        println!("{what}: {count} new nodes, {bytes} bytes");
        assert!(bytes <= 8 * 1024, "{what}: {bytes} bytes of new nodes");
        assert!(count <= 10, "{what}: {count} new nodes");

        let mut both = nodes.clone();
        both.extend(new_nodes);
        let (changes, stats) = diff(&both, Some(&root), &new_root).unwrap();
        assert_eq!(changes.len(), 1, "{what}: {changes:?}");
        // Opened: the changed leaf and its interior path on both sides, plus the small ancestor directories.
        assert!(stats.nodes_loaded <= 2 * count + 4, "{what}: loaded {} nodes for {count} changed", stats.nodes_loaded);
    }
}
