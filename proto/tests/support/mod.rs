//! Helpers shared by the core's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;

use mirrormesh_proto::chunk::{ChunkId, chunk_count};
use mirrormesh_proto::entry::FileMeta;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::tree::TreeDir;

pub type Nodes = HashMap<NodeHash, Vec<u8>>;

/// File metadata for a file of `size` bytes whose content is identified by `tag` (fake but well-formed chunk ids).
pub fn file(size: u64, tag: u64) -> FileMeta {
    let chunks = (0..chunk_count(size)).map(|i| ChunkId::of(format!("{tag}/{i}").as_bytes())).collect();
    FileMeta { mode: 0o644, size, mtime: 1_700_000_000 + tag as i64, chunks }
}

/// Builds `tree` into a fresh node map and returns the root and the map.
pub fn build(tree: &TreeDir) -> (NodeHash, Nodes) {
    let mut nodes = Nodes::new();
    let root = tree.clone().build(&mut nodes).expect("valid tree");
    (root, nodes)
}

/// An Alpine-like tree with one large directory of `big` packages and a few small ones.
pub fn alpine_tree(big: usize) -> TreeDir {
    let mut tree = TreeDir::default();
    for i in 0..big {
        tree.insert_file(
            &format!("alpine/edge/community/x86_64/pkg{i:06}-1.0.{}-r0.apk", i % 7),
            file(20_000 + i as u64, i as u64),
        )
        .unwrap();
    }
    tree.insert_file("alpine/edge/community/x86_64/APKINDEX.tar.gz", file(900_000, 1 << 40)).unwrap();
    for arch in ["aarch64", "armv7"] {
        for i in 0..50 {
            tree.insert_file(&format!("alpine/edge/main/{arch}/lib{i}-2.0-r1.apk"), file(4_000, 1 << 41 | i)).unwrap();
        }
    }
    tree
}

/// Sum of the sizes of the nodes `after` holds and `before` does not.
pub fn new_node_bytes(before: &Nodes, after: &Nodes) -> usize {
    after.iter().filter(|(h, _)| !before.contains_key(h)).map(|(_, b)| b.len()).sum()
}
