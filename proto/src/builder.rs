//! Building a directory's node tree from its sorted entries.
//!
//! Page boundaries are chosen by content, as in a Merkle search tree: each name gets a *boundary level*, the number
//! of trailing zero hex digits of a keyed blake3 of the name. A leaf ends after an entry whose level is at least 1
//! (one name in 16); a level-`L` node ends after a child whose last entry has a level above `L`. So leaves hold 16
//! entries and interior nodes 16 children on average, and where a page ends depends only on the names around it:
//! inserting, removing or changing one entry changes one leaf and the nodes above it, never its neighbours.
//!
//! Two caps keep nodes under the decoders' limits whatever the names: a leaf also ends when the sum of its entries'
//! [`Entry::weight`] reaches [`LEAF_WEIGHT_SPLIT`] or it holds [`LEAF_ENTRIES_SPLIT`] entries, an interior node when
//! it holds [`INTERIOR_CHILDREN_SPLIT`] children. The result is a pure function of the entry list, so a receiver
//! that rebuilds a directory from a delta gets byte-identical nodes.

use thiserror::Error;

use crate::entry::Entry;
use crate::node::{NodeHash, NodeRef};
use crate::node_store::NodeSink;
use crate::wire::DecodeError;

/// Expected entries per leaf and children per interior node (boundary levels count base-16 digits).
pub const FANOUT: u32 = 16;
/// A leaf ends once its entries weigh this much (a few big files with long chunk lists).
pub const LEAF_WEIGHT_SPLIT: usize = 256 << 10;
/// A leaf ends once it holds this many entries (below `LEAF_ENTRIES_MAX`).
pub const LEAF_ENTRIES_SPLIT: usize = 1024;
/// An interior node ends once it holds this many children (below `INTERIOR_CHILDREN_MAX`).
pub const INTERIOR_CHILDREN_SPLIT: usize = 1024;

const BOUNDARY_KEY: [u8; 32] = *b"mirrormesh page boundary key v1!";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BuildError {
    #[error("entry {name:?}: {source}")]
    Entry { name: String, source: DecodeError },
    #[error("entries not strictly sorted at {name:?}")]
    Unsorted { name: String },
}

/// Boundary level of a name: trailing zero base-16 digits of its keyed hash.
pub fn boundary_level(name: &str) -> u8 {
    let hash = blake3::keyed_hash(&BOUNDARY_KEY, name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first).trailing_zeros() / FANOUT.trailing_zeros()) as u8
}

struct Built {
    hash: NodeHash,
    /// Boundary level of the last entry under this node.
    last_level: u8,
}

fn emit(node: NodeRef<'_>, sink: &mut impl NodeSink) -> NodeHash {
    let bytes = node.encode();
    let hash = NodeHash::of(&bytes);
    sink.put_node(hash, bytes);
    hash
}

/// Builds the node tree of one directory from its entries (sorted by name, each valid) and returns its root.
/// An empty directory is a single empty leaf.
pub fn build_dir(entries: &[Entry], sink: &mut impl NodeSink) -> Result<NodeHash, BuildError> {
    for (i, entry) in entries.iter().enumerate() {
        entry.validate().map_err(|source| BuildError::Entry { name: entry.name.clone(), source })?;
        if i > 0 && entries[i - 1].name >= entry.name {
            return Err(BuildError::Unsorted { name: entry.name.clone() });
        }
    }

    let mut level_items = Vec::with_capacity(entries.len() / FANOUT as usize + 1);
    let mut start = 0;
    let mut weight = 0;
    for (i, entry) in entries.iter().enumerate() {
        let level = boundary_level(&entry.name);
        weight += entry.weight();
        if level >= 1 || weight >= LEAF_WEIGHT_SPLIT || i + 1 - start >= LEAF_ENTRIES_SPLIT {
            let hash = emit(NodeRef::Leaf { entries: &entries[start..=i] }, sink);
            level_items.push(Built { hash, last_level: level });
            start = i + 1;
            weight = 0;
        }
    }
    if start < entries.len() || level_items.is_empty() {
        let last_level = entries.last().map_or(0, |e| boundary_level(&e.name));
        level_items.push(Built { hash: emit(NodeRef::Leaf { entries: &entries[start..] }, sink), last_level });
    }

    let mut level: u8 = 1;
    while level_items.len() > 1 {
        let mut next = Vec::with_capacity(level_items.len() / FANOUT as usize + 1);
        let mut children = Vec::new();
        let mut last_level = 0;
        for item in level_items {
            children.push(item.hash);
            last_level = item.last_level;
            if item.last_level > level || children.len() >= INTERIOR_CHILDREN_SPLIT {
                next.push(Built { hash: emit(NodeRef::Interior { level, children: &children }, sink), last_level });
                children.clear();
            }
        }
        if !children.is_empty() {
            next.push(Built { hash: emit(NodeRef::Interior { level, children: &children }, sink), last_level });
        }
        level_items = next;
        level += 1;
    }
    Ok(level_items[0].hash)
}
