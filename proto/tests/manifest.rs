//! Manifest algebra: diff, apply, delta, paging locality, encoding round trips.

mod support;

use mirrormesh_proto::Mono;
use mirrormesh_proto::control::NODES_RESPONSE_BYTES_MAX;
use mirrormesh_proto::delta::ManifestDelta;
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::node::{Node, NodeHash};
use mirrormesh_proto::node_store::{Overlay, descendants};
use mirrormesh_proto::sync::ReqId;
use mirrormesh_proto::sync::manifest_fetch::{DESCENDANTS_PER_FETCH, FetchOut, ManifestFetch};
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

/// Fetches the manifest at `root` from one peer holding `held`, answering each request as a peer would (the nodes
/// named, and the descendants asked for), and returns the round trips it took (requests in flight together count
/// once) and the nodes stored.
fn fetch_round_trips(root: NodeHash, held: &Nodes, ask_descendants: bool) -> (usize, Nodes) {
    let mut store = Nodes::new();
    let mut fetch = ManifestFetch::<u8>::new(root, None, &store).unwrap();
    let mut next = 0;
    let mut round_trips = 0;
    while !fetch.is_complete() {
        let requests = fetch.pump(Mono(0), &[1], &mut || {
            next += 1;
            ReqId(next)
        });
        assert!(!requests.is_empty(), "the fetch stalled after {round_trips} round trips");
        round_trips += 1;
        for request in requests {
            let FetchOut::Nodes { req, hashes, descendants_max, .. } = request else { panic!("{request:?}") };
            let nodes: Vec<Option<Vec<u8>>> = hashes.iter().map(|h| held.get(h).cloned()).collect();
            let answered: Vec<&[u8]> = nodes.iter().flatten().map(Vec::as_slice).collect();
            let asked = if ask_descendants { usize::from(descendants_max) } else { 0 };
            let below = descendants(held, &answered, asked, NODES_RESPONSE_BYTES_MAX).unwrap();
            for out in fetch.on_nodes(req, nodes, below, &store).unwrap() {
                match out {
                    FetchOut::Store(batch) => store.extend(batch),
                    other => panic!("{other:?}"),
                }
            }
        }
    }
    (round_trips, store)
}

#[test]
fn a_fresh_mirror_fetches_a_deep_manifest_in_one_round_trip_per_few_thousand_nodes() {
    // The testbed's layout (alpine/edge/main/x86_64), a few hundred packages: six levels of nodes.
    let mut tree = alpine_tree(300);
    // And a deeper corner.
    tree.insert_file("alpine/v3.20/releases/x86_64/netboot/boot/grub/x86_64-efi/deep.mod", file(1_000, 99)).unwrap();
    let (root, held) = build(&tree);
    let (level_by_level, stored) = fetch_round_trips(root, &held, false);
    assert_eq!(stored, held, "the whole manifest, byte for byte");
    let (with_descendants, stored) = fetch_round_trips(root, &held, true);
    assert_eq!(stored, held, "the whole manifest, byte for byte");
    println!("{} nodes: {level_by_level} round trips level by level, {with_descendants} with descendants", held.len());
    assert!(level_by_level >= 9, "the deep corner is nine levels of nodes down: {level_by_level}");
    assert!(held.len() < usize::from(DESCENDANTS_PER_FETCH));
    assert_eq!(with_descendants, 1, "fewer nodes than one answer carries: one round trip");
}

#[test]
fn descendants_nobody_named_are_ignored_and_a_large_tree_takes_a_round_trip_per_answer() {
    // 20,000 packages in one directory: about 1,300 leaves and their interior nodes.
    let tree = alpine_tree(20_000);
    let (root, held) = build(&tree);
    let (round_trips, stored) = fetch_round_trips(root, &held, true);
    assert_eq!(stored, held);
    assert!(round_trips <= held.len().div_ceil(usize::from(DESCENDANTS_PER_FETCH)) + 2, "{round_trips} round trips");

    // Nodes sent as descendants that no verified node names are not taken.
    let (other_root, other) = build(&alpine_tree(10));
    let store = Nodes::new();
    let mut fetch = ManifestFetch::<u8>::new(root, None, &store).unwrap();
    let requests = fetch.pump(Mono(0), &[1], &mut || ReqId(1));
    let [FetchOut::Nodes { req, .. }] = requests.as_slice() else { panic!("{requests:?}") };
    let strangers: Vec<Vec<u8>> = other.values().cloned().collect();
    let outs = fetch.on_nodes(*req, vec![held.get(&root).cloned()], strangers, &store).unwrap();
    assert!(outs.is_empty(), "nothing stored, nothing corrupt: {outs:?}");
    assert!(!other.contains_key(&root) && !held.contains_key(&other_root));
    assert_eq!(fetch.outstanding(), 1, "the root's one child (alpine/) is still wanted");
}
