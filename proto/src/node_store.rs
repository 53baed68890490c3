//! Where manifest nodes come from and go to. The core reads nodes through [`NodeSource`] and writes them through
//! [`NodeSink`]; the daemon backs both with its on-disk store, tests and the simulator with a map.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use crate::node::{Node, NodeHash};

/// Error text from a node store's backing storage (the core cannot name the shell's error types).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node store: {0}")]
pub struct SourceError(pub String);

pub trait NodeSource {
    /// The encoded bytes of node `hash`, or `None` if this store does not hold it.
    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError>;

    /// Whether this store holds node `hash`.
    fn has_node(&self, hash: &NodeHash) -> Result<bool, SourceError> {
        Ok(self.node_bytes(hash)?.is_some())
    }

    /// Node `hash` already decoded and verified against its hash, if this store keeps decoded nodes (readers then
    /// skip decoding and verifying its bytes again). `None` means "read the bytes".
    fn verified_node(&self, _hash: &NodeHash) -> Option<Node> {
        None
    }
}

pub trait NodeSink {
    /// Stores an encoded node under its hash (storing the same node twice is harmless).
    fn put_node(&mut self, hash: NodeHash, bytes: Vec<u8>);
}

impl<S: BuildHasher> NodeSource for HashMap<NodeHash, Vec<u8>, S> {
    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.get(hash).cloned())
    }

    fn has_node(&self, hash: &NodeHash) -> Result<bool, SourceError> {
        Ok(self.contains_key(hash))
    }
}

impl<S: BuildHasher> NodeSink for HashMap<NodeHash, Vec<u8>, S> {
    fn put_node(&mut self, hash: NodeHash, bytes: Vec<u8>) {
        self.entry(hash).or_insert(bytes);
    }
}

impl NodeSource for BTreeMap<NodeHash, Vec<u8>> {
    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.get(hash).cloned())
    }

    fn has_node(&self, hash: &NodeHash) -> Result<bool, SourceError> {
        Ok(self.contains_key(hash))
    }
}

impl NodeSink for BTreeMap<NodeHash, Vec<u8>> {
    fn put_node(&mut self, hash: NodeHash, bytes: Vec<u8>) {
        self.entry(hash).or_insert(bytes);
    }
}

/// A sink that records what was written on top of a source: reads see both. Used to build a new manifest next to
/// an old one and learn exactly which nodes are new.
pub struct Overlay<'a, S> {
    pub base: &'a S,
    pub added: BTreeMap<NodeHash, Vec<u8>>,
}

impl<'a, S: NodeSource> Overlay<'a, S> {
    pub fn new(base: &'a S) -> Self {
        Self { base, added: BTreeMap::new() }
    }
}

impl<S: NodeSource> NodeSource for Overlay<'_, S> {
    fn node_bytes(&self, hash: &NodeHash) -> Result<Option<Vec<u8>>, SourceError> {
        match self.added.get(hash) {
            Some(bytes) => Ok(Some(bytes.clone())),
            None => self.base.node_bytes(hash),
        }
    }
}

impl<S: NodeSource> NodeSink for Overlay<'_, S> {
    fn put_node(&mut self, hash: NodeHash, bytes: Vec<u8>) {
        if !self.added.contains_key(&hash) && matches!(self.base.has_node(&hash), Ok(true)) {
            return;
        }
        self.added.insert(hash, bytes);
    }
}

/// The descendants a `GetNodes` answer carries beside the nodes asked for (`answered`, encoded, in answer order):
/// breadth first, each a child of a node answered or listed before it, none twice and none of `answered`, at most
/// `nodes_max` nodes and `bytes_max` bytes together (the first node that would pass the byte budget ends the list).
/// Nodes this store lacks are left out, with their subtrees. Answered bytes that do not decode have no children.
pub fn descendants(
    source: &impl NodeSource,
    answered: &[&[u8]],
    nodes_max: usize,
    bytes_max: usize,
) -> Result<Vec<Vec<u8>>, SourceError> {
    let mut seen: std::collections::BTreeSet<NodeHash> = answered.iter().map(|bytes| NodeHash::of(bytes)).collect();
    let mut queue: std::collections::VecDeque<NodeHash> =
        answered.iter().filter_map(|bytes| Node::decode(bytes).ok()).flat_map(|node| node.children()).collect();
    let (mut out, mut bytes_total) = (Vec::new(), 0);
    while out.len() < nodes_max
        && let Some(hash) = queue.pop_front()
    {
        if !seen.insert(hash) {
            continue;
        }
        let Some(bytes) = source.node_bytes(&hash)? else { continue };
        if bytes_total + bytes.len() > bytes_max {
            break;
        }
        bytes_total += bytes.len();
        if let Ok(node) = Node::decode(&bytes) {
            queue.extend(node.children());
        }
        out.push(bytes);
    }
    Ok(out)
}
