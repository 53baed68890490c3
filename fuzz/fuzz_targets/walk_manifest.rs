//! Manifest walker: arbitrary node graphs, diffed against each other, produce changes or a clean error: no panic,
//! no unbounded work.
//!
//! The input is split at 0xff bytes into parts; each part that decodes as a node has its references (interior
//! children, directory roots) rewired to the hashes of *later* parts (chosen by the reference's first byte), so the
//! fuzzer can build deep trees, wrong levels, escaping symlinks and duplicate names without finding blake3
//! preimages. Part 0 is diffed from an empty tree and against part 1.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::node::{Node, NodeHash};

fn rewire(node: &mut Node, later: &[NodeHash]) {
    if later.is_empty() {
        return;
    }
    let pick = |h: &NodeHash| later[h.0[0] as usize % later.len()];
    match node {
        Node::Interior { children, .. } => children.iter_mut().for_each(|c| *c = pick(c)),
        Node::Leaf { entries } => {
            for entry in entries {
                if let EntryKind::Dir { root, .. } = &mut entry.kind {
                    *root = pick(root);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xff).take(64).collect();
    let mut hashes = vec![NodeHash([0; 32]); parts.len()];
    let mut nodes = HashMap::new();
    for i in (0..parts.len()).rev() {
        let bytes = match Node::decode(parts[i]) {
            Ok(mut node) => {
                rewire(&mut node, &hashes[i + 1..]);
                node.encode()
            }
            Err(_) => parts[i].to_vec(),
        };
        hashes[i] = NodeHash::of(&bytes);
        nodes.insert(hashes[i], bytes);
    }
    if let Some(root) = hashes.first() {
        let _ = diff(&nodes, None, root);
        if let Some(other) = hashes.get(1) {
            let _ = diff(&nodes, Some(other), root);
        }
    }
});
