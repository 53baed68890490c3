//! Delta decoder and applier: arbitrary bytes either fail to decode or, applied to a small real base tree, yield
//! a root or a clean error.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::delta::ManifestDelta;
use mirrormesh_proto::entry::FileMeta;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::tree::TreeDir;

fn base() -> (NodeHash, HashMap<NodeHash, Vec<u8>>) {
    let mut tree = TreeDir::default();
    for (i, path) in ["a/x", "a/y", "a/b/z", "c", "d/e/f/g"].iter().enumerate() {
        let meta = FileMeta { mode: 0o644, size: 10, mtime: i as i64, chunks: vec![ChunkId([i as u8; 32])] };
        let _ = tree.insert_file(path, meta);
    }
    let mut nodes = HashMap::new();
    let root = tree.build(&mut nodes).unwrap_or(NodeHash([0; 32]));
    (root, nodes)
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut delta) = ManifestDelta::decode(data) else { return };
    let (root, nodes) = base();
    delta.base = root;
    let mut out = HashMap::new();
    let _ = delta.apply(&root, &nodes, &mut out);
});
