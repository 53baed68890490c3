//! Manifest nodes: the content-addressed pages of a directory's tree.
//!
//! Each directory is a tree of nodes over its entries sorted by name. Leaves hold entries; interior nodes at level
//! `L >= 1` hold the hashes of level `L - 1` children, in order. A node is named by [`NodeHash`], a keyed blake3 of
//! its encoded bytes (keyed, so a node hash can never collide with a chunk id of the same bytes). Page boundaries
//! are chosen by content (see [`crate::builder`]), so a directory's nodes depend only on its entries, and one
//! changed entry changes one leaf plus the interior nodes above it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::entry::Entry;
use crate::hash_id::hash_id;
use crate::wire::{self, DecodeError, bounded_vec};

/// Largest encoded node.
pub const NODE_BYTES_MAX: usize = 1 << 20;
/// Most entries in one leaf (the builder splits long before: a leaf holds 16 on average).
pub const LEAF_ENTRIES_MAX: usize = 4096;
/// Most children of one interior node.
pub const INTERIOR_CHILDREN_MAX: usize = 4096;
/// Highest interior level.
pub const NODE_LEVEL_MAX: u8 = 32;

/// Key of the keyed blake3 that names nodes.
const NODE_HASH_KEY: [u8; 32] = *b"mirrormesh manifest node hash v1";

hash_id!(
    /// Keyed blake3 of a node's encoded bytes.
    NodeHash
);

impl NodeHash {
    /// The hash of these encoded node bytes.
    pub fn of(encoded: &[u8]) -> Self {
        Self(*blake3::keyed_hash(&NODE_HASH_KEY, encoded).as_bytes())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    Leaf {
        #[serde(deserialize_with = "bounded_vec::<_, _, LEAF_ENTRIES_MAX>")]
        entries: Vec<Entry>,
    },
    Interior {
        level: u8,
        #[serde(deserialize_with = "bounded_vec::<_, _, INTERIOR_CHILDREN_MAX>")]
        children: Vec<NodeHash>,
    },
}

impl Node {
    /// The hashes this node refers to: an interior node's children, and the roots of the directories in a leaf.
    pub fn children(&self) -> Vec<NodeHash> {
        match self {
            Node::Interior { children, .. } => children.clone(),
            Node::Leaf { entries } => entries
                .iter()
                .filter_map(|e| match &e.kind {
                    crate::entry::EntryKind::Dir { root, .. } => Some(*root),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// A borrowed view with exactly `Node`'s encoding, so the builder can encode a page without copying entries.
#[derive(Serialize)]
pub(crate) enum NodeRef<'a> {
    Leaf { entries: &'a [Entry] },
    Interior { level: u8, children: &'a [NodeHash] },
}

impl NodeRef<'_> {
    pub(crate) fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NodeError {
    #[error("node bytes do not hash to {expected}")]
    HashMismatch { expected: NodeHash },
    #[error("node {hash}: {source}")]
    Decode { hash: NodeHash, source: DecodeError },
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Node::Leaf { entries } => NodeRef::Leaf { entries }.encode(),
            Node::Interior { level, children } => NodeRef::Interior { level: *level, children }.encode(),
        }
    }

    /// Decodes and validates a node (without checking its hash: see [`verify_node`]).
    pub fn decode(bytes: &[u8]) -> Result<Node, DecodeError> {
        let node: Node = wire::decode_canonical(bytes, NODE_BYTES_MAX)?;
        node.validate()?;
        Ok(node)
    }

    /// 0 for a leaf.
    pub fn level(&self) -> u8 {
        match self {
            Node::Leaf { .. } => 0,
            Node::Interior { level, .. } => *level,
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Node::Leaf { entries } => {
                for entry in entries {
                    entry.validate()?;
                }
                if entries.windows(2).any(|w| w[0].name >= w[1].name) {
                    return Err(DecodeError::Invalid("leaf entries not strictly sorted by name"));
                }
                Ok(())
            }
            Node::Interior { level, children } => {
                if *level == 0 || *level > NODE_LEVEL_MAX {
                    return Err(DecodeError::Invalid("interior level out of range"));
                }
                if children.is_empty() {
                    return Err(DecodeError::Invalid("interior node without children"));
                }
                Ok(())
            }
        }
    }
}

/// Checks that `bytes` hash to `hash`, then decodes and validates them. The only way bytes from a peer or a disk
/// become a [`Node`].
pub fn verify_node(hash: &NodeHash, bytes: &[u8]) -> Result<Node, NodeError> {
    if NodeHash::of(bytes) != *hash {
        return Err(NodeError::HashMismatch { expected: *hash });
    }
    Node::decode(bytes).map_err(|source| NodeError::Decode { hash: *hash, source })
}
