//! Finding a manifest's entry by path, loading only the directories on the way.
//!
//! A directory's nodes are paged by content, and interior nodes carry no names, so finding one name reads the
//! directory's nodes in order until the name is passed. [`Lookup`] keeps the last few directories it listed, so a
//! batch of paths sorted by path (the removals of an update, say) lists each directory once.

use std::collections::VecDeque;

use thiserror::Error;

use crate::entry::{Entry, EntryKind};
use crate::node::{Node, NodeError, NodeHash, verify_node};
use crate::node_store::{NodeSource, SourceError};

/// Directories whose listing a [`Lookup`] keeps.
pub const LOOKUP_DIRS_CACHED_MAX: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LookupError {
    #[error("node {0} is not held")]
    Missing(NodeHash),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("node {hash} is at level {found}, expected {expected}")]
    Level { hash: NodeHash, expected: u8, found: u8 },
}

/// Looks paths up in the manifest whose top directory is `root`.
pub struct Lookup<'a, S> {
    source: &'a S,
    root: NodeHash,
    /// Listed directories, most recently used last.
    listed: VecDeque<(NodeHash, Vec<Entry>)>,
}

impl<'a, S: NodeSource> Lookup<'a, S> {
    pub fn new(source: &'a S, root: NodeHash) -> Self {
        Self { source, root, listed: VecDeque::new() }
    }

    /// The entry at `path` (relative, `/`-separated), or `None` when the manifest names nothing there (also when
    /// a component on the way is not a directory).
    pub fn entry(&mut self, path: &str) -> Result<Option<Entry>, LookupError> {
        let mut dir = self.root;
        let mut names = path.split('/').filter(|n| !n.is_empty()).peekable();
        while let Some(name) = names.next() {
            let found = self.listing(&dir)?.iter().find(|e| e.name == name).cloned();
            match (found, names.peek()) {
                (None, _) => return Ok(None),
                (Some(entry), None) => return Ok(Some(entry)),
                (Some(Entry { kind: EntryKind::Dir { root, .. }, .. }), Some(_)) => dir = root,
                (Some(_), Some(_)) => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Whether the manifest names `path` (as anything).
    pub fn names(&mut self, path: &str) -> Result<bool, LookupError> {
        Ok(self.entry(path)?.is_some())
    }

    fn listing(&mut self, dir: &NodeHash) -> Result<&[Entry], LookupError> {
        if let Some(at) = self.listed.iter().position(|(hash, _)| hash == dir) {
            let hit = self.listed.remove(at).ok_or(LookupError::Missing(*dir))?;
            self.listed.push_back(hit);
        } else {
            let entries = self.list(dir)?;
            if self.listed.len() >= LOOKUP_DIRS_CACHED_MAX {
                self.listed.pop_front();
            }
            self.listed.push_back((*dir, entries));
        }
        Ok(self.listed.back().map(|(_, entries)| entries.as_slice()).unwrap_or_default())
    }

    /// Every entry of the directory whose tree root is `dir`, in name order (read from the source each time: the
    /// publisher's scan of a changed directory reads the previous snapshot's listing once).
    pub fn list(&self, dir: &NodeHash) -> Result<Vec<Entry>, LookupError> {
        let mut entries = Vec::new();
        let mut stack = vec![(*dir, None)];
        while let Some((hash, level)) = stack.pop() {
            let node = match self.source.verified_node(&hash) {
                Some(node) => node,
                None => {
                    let bytes = self.source.node_bytes(&hash)?.ok_or(LookupError::Missing(hash))?;
                    verify_node(&hash, &bytes)?
                }
            };
            if let Some(expected) = level
                && node.level() != expected
            {
                return Err(LookupError::Level { hash, expected, found: node.level() });
            }
            match node {
                Node::Leaf { entries: leaf } => entries.extend(leaf),
                Node::Interior { level, children } => {
                    stack.extend(children.into_iter().rev().map(|child| (child, Some(level - 1))))
                }
            }
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::chunk::ChunkId;
    use crate::entry::FileMeta;
    use crate::tree::TreeDir;

    fn file(n: u8) -> EntryKind {
        EntryKind::File(FileMeta { mode: 0o644, size: 1, mtime: 0, chunks: vec![ChunkId::of(&[n])] })
    }

    #[test]
    fn finds_entries_in_paged_directories_and_nothing_under_a_non_directory() {
        let mut tree = TreeDir::default();
        for i in 0..2_000u32 {
            tree.insert(&format!("big/p{i:05}.apk"), file(1)).unwrap();
        }
        tree.insert("a/b/c", file(2)).unwrap();
        tree.insert("link", EntryKind::Symlink { target: "a".into() }).unwrap();
        let mut store = BTreeMap::new();
        let root = tree.build(&mut store).unwrap();
        let mut lookup = Lookup::new(&store, root);
        assert_eq!(lookup.entry("big/p01999.apk").unwrap().map(|e| e.name), Some("p01999.apk".into()));
        assert!(lookup.names("big/p00000.apk").unwrap());
        assert!(!lookup.names("big/p02000.apk").unwrap());
        assert!(lookup.entry("a/b").unwrap().is_some_and(|e| e.is_dir()));
        assert!(lookup.names("a/b/c").unwrap());
        assert!(!lookup.names("a/b/c/d").unwrap(), "nothing under a file");
        assert!(!lookup.names("link/b").unwrap(), "nothing under a symlink");
        assert!(lookup.names("link").unwrap());
        assert!(!lookup.names("missing/x").unwrap());
    }

    #[test]
    fn a_missing_node_is_an_error_not_an_absent_entry() {
        let mut tree = TreeDir::default();
        tree.insert("d/f", file(1)).unwrap();
        let mut store = BTreeMap::new();
        let root = tree.build(&mut store).unwrap();
        let only_root: BTreeMap<NodeHash, Vec<u8>> =
            store.iter().filter(|(h, _)| **h == root).map(|(h, b)| (*h, b.clone())).collect();
        assert!(matches!(Lookup::new(&only_root, root).entry("d/f"), Err(LookupError::Missing(_))));
    }
}
