//! An in-memory directory tree: what the publisher's scanner produces and the model tests apply diffs to.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::builder::{BuildError, build_dir};
use crate::diff::Change;
use crate::entry::{Entry, EntryKind, FileMeta};
use crate::node::NodeHash;
use crate::node_store::NodeSink;
use crate::path::{PathError, validate_rel_path};

/// Mode given to directories created implicitly by [`TreeDir::insert`].
pub const DEFAULT_DIR_MODE: u32 = 0o755;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeDir {
    /// Entries sorted by name. A `Dir` entry's `root` is only meaningful after [`TreeDir::build`].
    pub entries: Vec<Entry>,
    /// The contents of every `Dir` entry, by name.
    pub subdirs: BTreeMap<String, TreeDir>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TreeError {
    #[error("{path}: {source}")]
    Path { path: String, source: PathError },
    #[error("{path}: parent directory does not exist")]
    NoParent { path: String },
    #[error("{path}: nothing to remove")]
    NotFound { path: String },
}

/// Totals over a tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeTotals {
    pub files: u64,
    pub bytes: u64,
    pub dirs: u64,
    pub symlinks: u64,
}

impl TreeDir {
    /// Builds every directory bottom-up into `sink`, fills in the `root` of each `Dir` entry and returns the root.
    pub fn build(&mut self, sink: &mut impl NodeSink) -> Result<NodeHash, BuildError> {
        for entry in &mut self.entries {
            if let EntryKind::Dir { root, .. } = &mut entry.kind {
                let sub = self.subdirs.entry(entry.name.clone()).or_default();
                *root = sub.build(sink)?;
            }
        }
        build_dir(&self.entries, sink)
    }

    pub fn totals(&self) -> TreeTotals {
        let mut t = TreeTotals::default();
        for entry in &self.entries {
            match &entry.kind {
                EntryKind::File(meta) => {
                    t.files += 1;
                    t.bytes += meta.size;
                }
                EntryKind::Symlink { .. } => t.symlinks += 1,
                EntryKind::Dir { .. } => t.dirs += 1,
            }
        }
        for sub in self.subdirs.values() {
            let s = sub.totals();
            t.files += s.files;
            t.bytes += s.bytes;
            t.dirs += s.dirs;
            t.symlinks += s.symlinks;
        }
        t
    }

    /// Inserts or replaces the entry at `path` (its name is taken from the path), creating missing parent
    /// directories with [`DEFAULT_DIR_MODE`].
    pub fn insert(&mut self, path: &str, kind: EntryKind) -> Result<(), TreeError> {
        validate_rel_path(path).map_err(|source| TreeError::Path { path: path.to_owned(), source })?;
        let (parent, name) = split_parent(path);
        let mut dir = self;
        if !parent.is_empty() {
            for component in parent.split('/') {
                if !dir.entries.iter().any(|e| e.name == component && e.is_dir()) {
                    let kind = EntryKind::Dir { mode: DEFAULT_DIR_MODE, root: NodeHash([0; 32]) };
                    dir.set(Entry { name: component.to_owned(), kind });
                }
                dir = dir.subdirs.entry(component.to_owned()).or_default();
            }
        }
        dir.set(Entry { name: name.to_owned(), kind });
        Ok(())
    }

    /// Inserts a file at `path` (see [`TreeDir::insert`]).
    pub fn insert_file(&mut self, path: &str, meta: FileMeta) -> Result<(), TreeError> {
        self.insert(path, EntryKind::File(meta))
    }

    /// Applies one change of a [`crate::diff::diff`] result. Applying a whole diff in its order turns the old tree
    /// into the new one.
    pub fn apply(&mut self, change: &Change) -> Result<(), TreeError> {
        let (parent, name) = split_parent(&change.path);
        let dir = self.dir_mut(parent).ok_or_else(|| TreeError::NoParent { path: change.path.clone() })?;
        match &change.new {
            Some(entry) => dir.set(Entry { name: name.to_owned(), kind: entry.kind.clone() }),
            None => {
                let at = dir.position(name).map_err(|_| TreeError::NotFound { path: change.path.clone() })?;
                dir.entries.remove(at);
                dir.subdirs.remove(name);
            }
        }
        Ok(())
    }

    /// The directory at `path` (`""` is this one).
    pub fn dir_mut(&mut self, path: &str) -> Option<&mut TreeDir> {
        let mut dir = self;
        if !path.is_empty() {
            for component in path.split('/') {
                dir = dir.subdirs.get_mut(component)?;
            }
        }
        Some(dir)
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.name.as_str().cmp(name))
    }

    /// Inserts or replaces an entry by name, keeping `subdirs` in step with the entry's kind.
    fn set(&mut self, entry: Entry) {
        if entry.is_dir() {
            self.subdirs.entry(entry.name.clone()).or_default();
        } else {
            self.subdirs.remove(&entry.name);
        }
        match self.position(&entry.name) {
            Ok(at) => self.entries[at] = entry,
            Err(at) => self.entries.insert(at, entry),
        }
    }
}

/// Splits `a/b/c` into (`a/b`, `c`) and `c` into (``, `c`).
pub fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(at) => (&path[..at], &path[at + 1..]),
        None => ("", path),
    }
}
