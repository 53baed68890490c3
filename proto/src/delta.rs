//! Manifest deltas: the changes from one snapshot to the next, as one content-addressed object.
//!
//! A node that holds the previous snapshot fetches the delta named in the new signed root (about a hundred bytes
//! per changed file) instead of every changed page (a few KiB each), rebuilds the changed directories locally with
//! the same deterministic builder the publisher used, and accepts the result only if it hashes to the signed root.
//! So a delta needs no trust of its own: a wrong delta yields a wrong root and is discarded, and the node falls
//! back to fetching nodes.
//!
//! A delta lists, per changed directory, the entries set or removed. Whole directories that appear or disappear are
//! one `Dir` entry (their contents are not listed: a receiver fetches a new directory's nodes like any other).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::builder::{BuildError, build_dir};
use crate::diff::Change;
use crate::entry::{Entry, EntryKind};
use crate::hash_id::hash_id;
use crate::node::{Node, NodeError, NodeHash, verify_node};
use crate::node_store::{NodeSink, NodeSource, SourceError};
use crate::path::{depth, join, validate_name, validate_rel_path};
use crate::tree::split_parent;
use crate::wire::{self, DecodeError, bounded_vec};

/// Largest encoded delta. Bigger changes (a new release branch) are published without a delta.
pub const DELTA_BYTES_MAX: usize = 64 << 20;
/// Most directories one delta may touch.
pub const DELTA_DIRS_MAX: usize = 1 << 16;
/// Most changes one delta may make in one directory.
pub const DELTA_DIR_CHANGES_MAX: usize = 1 << 20;

const DELTA_HASH_KEY: [u8; 32] = *b"mirrormesh manifest delta hash 1";

hash_id!(
    /// Keyed blake3 of an encoded delta.
    DeltaHash
);

impl DeltaHash {
    pub fn of(encoded: &[u8]) -> Self {
        Self(*blake3::keyed_hash(&DELTA_HASH_KEY, encoded).as_bytes())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDelta {
    /// Root of the snapshot this delta applies to.
    pub base: NodeHash,
    /// Root it produces.
    pub target: NodeHash,
    /// Changed directories, sorted by path.
    #[serde(deserialize_with = "bounded_vec::<_, _, DELTA_DIRS_MAX>")]
    pub dirs: Vec<DirDelta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirDelta {
    /// Directory path (`""` for the root).
    pub path: String,
    /// Changes sorted by name.
    #[serde(deserialize_with = "bounded_vec::<_, _, DELTA_DIR_CHANGES_MAX>")]
    pub changes: Vec<DeltaChange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaChange {
    pub name: String,
    /// The new entry, or `None` to remove it (a removed directory goes with everything below it).
    pub kind: Option<EntryKind>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeltaError {
    #[error("delta applies to {expected}, not {found}")]
    WrongBase { expected: NodeHash, found: NodeHash },
    #[error("node {0} is not held")]
    Missing(NodeHash),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("node {hash} is at level {found}, expected {expected}")]
    Level { hash: NodeHash, expected: u8, found: u8 },
    #[error("{0}: delta changes a directory the base does not have")]
    UnknownDir(String),
    #[error("{0}: delta removes an entry the base does not have")]
    RemoveMissing(String),
    #[error("{0}: delta changes entries below something that is no longer a directory")]
    NotADir(String),
    #[error("{path}: rebuilt directory is {rebuilt}, delta says {claimed}")]
    DirRoot { path: String, rebuilt: NodeHash, claimed: NodeHash },
    #[error("delta produces root {rebuilt}, expected {target}")]
    Target { target: NodeHash, rebuilt: NodeHash },
}

impl ManifestDelta {
    /// The delta for a [`crate::diff::diff`] result from `base` to `target`.
    pub fn from_changes(base: NodeHash, target: NodeHash, changes: &[Change]) -> Self {
        let is_dir = |e: &Option<Entry>| e.as_ref().is_some_and(Entry::is_dir);
        // Directories that appear or disappear as a whole: their contents are not part of the delta.
        let whole: BTreeSet<&str> =
            changes.iter().filter(|c| is_dir(&c.old) != is_dir(&c.new)).map(|c| c.path.as_str()).collect();
        let mut by_dir: BTreeMap<String, BTreeMap<String, Option<EntryKind>>> = BTreeMap::new();
        for change in changes {
            if ancestors(&change.path).any(|a| whole.contains(a)) {
                continue;
            }
            let (parent, name) = split_parent(&change.path);
            // A kind change is a removal then an addition of the same path: the later one wins.
            by_dir
                .entry(parent.to_owned())
                .or_default()
                .insert(name.to_owned(), change.new.as_ref().map(|e| e.kind.clone()));
        }
        let dirs = by_dir
            .into_iter()
            .map(|(path, changes)| DirDelta {
                path,
                changes: changes.into_iter().map(|(name, kind)| DeltaChange { name, kind }).collect(),
            })
            .collect();
        ManifestDelta { base, target, dirs }
    }

    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let delta: ManifestDelta = wire::decode_canonical(bytes, DELTA_BYTES_MAX)?;
        for (i, dir) in delta.dirs.iter().enumerate() {
            validate_rel_path(&dir.path)?;
            if i > 0 && delta.dirs[i - 1].path >= dir.path {
                return Err(DecodeError::Invalid("delta directories not strictly sorted"));
            }
            for (j, change) in dir.changes.iter().enumerate() {
                validate_name(&change.name)?;
                if j > 0 && dir.changes[j - 1].name >= change.name {
                    return Err(DecodeError::Invalid("delta changes not strictly sorted"));
                }
                if let Some(kind) = &change.kind {
                    kind.validate()?;
                }
            }
        }
        Ok(delta)
    }

    /// Number of entries set or removed.
    pub fn change_count(&self) -> usize {
        self.dirs.iter().map(|d| d.changes.len()).sum()
    }

    /// Applies the delta to the snapshot at `base` (read from `source`), writes the rebuilt nodes to `sink` and
    /// returns the new root, which is checked against `self.target`.
    pub fn apply(
        &self,
        base: &NodeHash,
        source: &impl NodeSource,
        sink: &mut impl NodeSink,
    ) -> Result<NodeHash, DeltaError> {
        if *base != self.base {
            return Err(DeltaError::WrongBase { expected: self.base, found: *base });
        }
        // Every changed directory and all its ancestors are rebuilt; shallow ones first when loading.
        let mut order: Vec<&str> = Vec::new();
        let mut seen = BTreeSet::new();
        for dir in &self.dirs {
            for path in ancestors(&dir.path).chain(std::iter::once(dir.path.as_str())) {
                if seen.insert(path) {
                    order.push(path);
                }
            }
        }
        order.sort_by_key(|p| (depth(p), *p));

        // Top-down, find each directory's old root. Only directories that are parents of other rebuilt directories
        // keep their entries in memory (they are needed to look their children up); the rest are loaded one at a
        // time below, so memory stays bounded by the largest directory, not the tree.
        let parents: BTreeSet<&str> = order.iter().filter(|p| !p.is_empty()).map(|p| split_parent(p).0).collect();
        let mut parent_entries: BTreeMap<&str, Vec<Entry>> = BTreeMap::new();
        let mut old_roots: BTreeMap<&str, NodeHash> = BTreeMap::new();
        for &path in &order {
            let root = if path.is_empty() {
                self.base
            } else {
                let (parent, name) = split_parent(path);
                let entries = parent_entries.get(parent).ok_or_else(|| DeltaError::UnknownDir(path.to_owned()))?;
                match entries.binary_search_by(|e| e.name.as_str().cmp(name)).map(|i| &entries[i].kind) {
                    Ok(EntryKind::Dir { root, .. }) => *root,
                    _ => return Err(DeltaError::UnknownDir(path.to_owned())),
                }
            };
            old_roots.insert(path, root);
            if parents.contains(path) {
                parent_entries.insert(path, load_entries(source, &root)?);
            }
        }

        let changes_of: BTreeMap<&str, &[DeltaChange]> =
            self.dirs.iter().map(|d| (d.path.as_str(), d.changes.as_slice())).collect();
        let mut rebuilt: BTreeMap<&str, NodeHash> = BTreeMap::new();
        for &path in order.iter().rev() {
            let old = match parent_entries.remove(path) {
                Some(entries) => entries,
                None => {
                    let root = old_roots.get(path).ok_or_else(|| DeltaError::UnknownDir(path.to_owned()))?;
                    load_entries(source, root)?
                }
            };
            let changes = changes_of.get(path).copied().unwrap_or_default();
            let mut entries = merge(path, old, changes)?;
            for entry in &mut entries {
                if let EntryKind::Dir { root, .. } = &mut entry.kind {
                    let child = join(path, &entry.name);
                    if let Some(new_root) = rebuilt.remove(child.as_str()) {
                        let claimed = changes.binary_search_by(|c| c.name.cmp(&entry.name)).is_ok();
                        if claimed && *root != new_root {
                            return Err(DeltaError::DirRoot { path: child, rebuilt: new_root, claimed: *root });
                        }
                        *root = new_root;
                    }
                }
            }
            // A rebuilt child that its parent no longer lists as a directory: the delta is inconsistent.
            let prefix_depth = depth(path) + 1;
            if let Some(orphan) = rebuilt.keys().find(|k| depth(k) == prefix_depth && split_parent(k).0 == path) {
                return Err(DeltaError::NotADir((*orphan).to_owned()));
            }
            rebuilt.insert(path, build_dir(&entries, sink)?);
        }
        let root = rebuilt.get("").copied().unwrap_or(self.base);
        if root != self.target {
            return Err(DeltaError::Target { target: self.target, rebuilt: root });
        }
        Ok(root)
    }
}

/// `a/b/c` yields `""`, `a`, `a/b` (the proper ancestors, root first).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let root = (!path.is_empty()).then_some("");
    root.into_iter().chain(path.match_indices('/').map(move |(at, _)| &path[..at]))
}

/// Applies sorted changes to sorted entries.
fn merge(dir: &str, old: Vec<Entry>, changes: &[DeltaChange]) -> Result<Vec<Entry>, DeltaError> {
    let mut out = Vec::with_capacity(old.len() + changes.len());
    let mut old = old.into_iter().peekable();
    for change in changes {
        while let Some(entry) = old.next_if(|e| e.name < change.name) {
            out.push(entry);
        }
        let existed = old.next_if(|e| e.name == change.name).is_some();
        match &change.kind {
            Some(kind) => out.push(Entry { name: change.name.clone(), kind: kind.clone() }),
            None if !existed => return Err(DeltaError::RemoveMissing(join(dir, &change.name))),
            None => {}
        }
    }
    out.extend(old);
    Ok(out)
}

/// All entries of the directory whose tree root is `root`, in order.
pub fn load_entries(source: &impl NodeSource, root: &NodeHash) -> Result<Vec<Entry>, DeltaError> {
    let mut out = Vec::new();
    let mut stack = vec![(*root, None::<u8>)];
    while let Some((hash, expected)) = stack.pop() {
        let node = match source.verified_node(&hash) {
            Some(node) => node,
            None => verify_node(&hash, &source.node_bytes(&hash)?.ok_or(DeltaError::Missing(hash))?)?,
        };
        if let Some(expected) = expected.filter(|&l| l != node.level()) {
            return Err(DeltaError::Level { hash, expected, found: node.level() });
        }
        match node {
            Node::Leaf { entries } => out.extend(entries),
            Node::Interior { level, children } => {
                stack.extend(children.into_iter().rev().map(|c| (c, Some(level - 1))))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_of_paths() {
        assert_eq!(ancestors("").collect::<Vec<_>>(), Vec::<&str>::new());
        assert_eq!(ancestors("a").collect::<Vec<_>>(), vec![""]);
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), vec!["", "a", "a/b"]);
    }
}
