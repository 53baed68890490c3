//! The order in which a sync plan reaches the served tree, and when the files it no longer names go: decided here,
//! carried out by the shell's tree writer.
//!
//! [`Plan::new`] sorts a sync's changes into the steps mirrors rely on (new directories parents first; files
//! that are not index files; symlinks and directory modes; index files last, so no index names a package that is not
//! in place yet); removals are not applied with the rest: they are carried out deepest first once due (see
//! [`super::removals`]).

use std::sync::Arc;

use crate::diff::Change;
use crate::entry::{EntryKind, FileMeta};
use crate::tree::split_parent;

/// Which file names (the last path component) are index files, placed last by an apply: the daemon's
/// `repo.index_globs`. Given once, in the engine's configuration; the rule itself is the caller's (a glob set).
#[derive(Clone)]
pub struct IndexNames(Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl IndexNames {
    pub fn new(is_index: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(is_index))
    }

    /// Exactly the names given (Alpine's `APKINDEX.tar.gz`, in the simulator and tests).
    pub fn exact(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        Self::new(move |name| names.iter().any(|n| n == name))
    }

    pub fn is_index(&self, name: &str) -> bool {
        (self.0)(name)
    }
}

impl std::fmt::Debug for IndexNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexNames(..)")
    }
}

/// A sync's plan: the changes from the applied snapshot to its target (a diff, in path order: a parent before its
/// children), computed once when the sync is planned, and the order in which the tree writer carries them out.
/// Cloning shares it.
#[derive(Clone, PartialEq, Eq)]
pub struct Plan {
    changes: Arc<[Change]>,
    steps: Arc<Steps>,
}

/// The order of a plan's changes, as positions in it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Steps {
    /// Directories to create or whose mode changes, parents first, and whether each is created.
    dirs: Vec<(usize, bool)>,
    /// New and changed files that are not index files.
    files: Vec<usize>,
    symlinks: Vec<usize>,
    /// Index files, placed last.
    indexes: Vec<usize>,
    /// Paths the new snapshot no longer names, deepest first (a directory after its contents); never a path the new
    /// snapshot names, even one that changed kind (the diff lists it removed as the old kind and added as the new).
    removals: Vec<usize>,
}

impl Plan {
    /// Sorts `changes` into the steps mirrors rely on.
    pub fn new(changes: Vec<Change>, index_names: &IndexNames) -> Self {
        let mut steps = Steps::default();
        let named: std::collections::BTreeSet<&str> =
            changes.iter().filter(|c| c.new.is_some()).map(|c| c.path.as_str()).collect();
        for (at, change) in changes.iter().enumerate() {
            let old_kind = change.old.as_ref().map(|e| &e.kind);
            match change.new.as_ref().map(|e| &e.kind) {
                Some(EntryKind::File(_)) if index_names.is_index(split_parent(&change.path).1) => {
                    steps.indexes.push(at)
                }
                Some(EntryKind::File(_)) => steps.files.push(at),
                Some(EntryKind::Symlink { .. }) => steps.symlinks.push(at),
                Some(EntryKind::Dir { .. }) => {
                    steps.dirs.push((at, !matches!(old_kind, Some(EntryKind::Dir { .. }))));
                }
                None if named.contains(change.path.as_str()) => {}
                None => steps.removals.push(at),
            }
        }
        steps.removals.sort_by(|a, b| super::removals::deepest_first(&changes[*a].path, &changes[*b].path));
        Self { changes: changes.into(), steps: Arc::new(steps) }
    }

    /// The changes, in path order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Directories to create or whose mode changes, parents first: `(path, mode, created)`.
    pub fn dirs(&self) -> impl Iterator<Item = (&str, u32, bool)> + '_ {
        self.steps.dirs.iter().filter_map(|&(at, created)| match self.new_kind(at) {
            Some(EntryKind::Dir { mode, .. }) => Some((self.changes[at].path.as_str(), *mode, created)),
            _ => None,
        })
    }

    /// New and changed files that are not index files: `(path, meta)`.
    pub fn files(&self) -> impl Iterator<Item = (&str, &FileMeta)> + '_ {
        self.file_steps(&self.steps.files)
    }

    /// Symlinks: `(path, target)`.
    pub fn symlinks(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.steps.symlinks.iter().filter_map(|&at| match self.new_kind(at) {
            Some(EntryKind::Symlink { target }) => Some((self.changes[at].path.as_str(), target.as_str())),
            _ => None,
        })
    }

    /// Index files, placed after everything else: `(path, meta)`.
    pub fn indexes(&self) -> impl Iterator<Item = (&str, &FileMeta)> + '_ {
        self.file_steps(&self.steps.indexes)
    }

    /// Paths the new snapshot no longer names, deepest first; not removed by the apply but recorded for removal
    /// once due (see [`super::removals`]).
    pub fn removals(&self) -> impl Iterator<Item = &str> + '_ {
        self.steps.removals.iter().map(|&at| self.changes[at].path.as_str())
    }

    fn new_kind(&self, at: usize) -> Option<&EntryKind> {
        self.changes[at].new.as_ref().map(|e| &e.kind)
    }

    fn file_steps<'a>(&'a self, steps: &'a [usize]) -> impl Iterator<Item = (&'a str, &'a FileMeta)> + 'a {
        steps.iter().filter_map(|&at| match self.new_kind(at) {
            Some(EntryKind::File(meta)) => Some((self.changes[at].path.as_str(), meta)),
            _ => None,
        })
    }
}

/// The changes alone (the order follows from them): an engine's trace shows what it asked to apply.
impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.changes.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkId;
    use crate::entry::Entry;
    use crate::node::NodeHash;

    fn file(path: &str) -> Entry {
        Entry {
            name: split_parent(path).1.to_owned(),
            kind: EntryKind::File(FileMeta { size: 1, mtime: 0, mode: 0o644, chunks: vec![ChunkId([1; 32])] }),
        }
    }

    fn dir(path: &str) -> Entry {
        Entry { name: split_parent(path).1.to_owned(), kind: EntryKind::Dir { mode: 0o755, root: NodeHash([0; 32]) } }
    }

    fn change(path: &str, old: Option<Entry>, new: Option<Entry>) -> Change {
        Change { path: path.to_owned(), old, new }
    }

    #[test]
    fn indexes_come_last_and_removals_deepest_first_never_a_path_still_named() {
        let changes = vec![
            change("a", None, Some(dir("a"))),
            change("a/APKINDEX.tar.gz", Some(file("a/APKINDEX.tar.gz")), Some(file("a/APKINDEX.tar.gz"))),
            change("a/new.apk", None, Some(file("a/new.apk"))),
            change("a/x", Some(file("a/x")), None),
            change("a/x", None, Some(dir("a/x"))),
            change("b", Some(dir("b")), None),
            change("b/old.apk", Some(file("b/old.apk")), None),
        ];
        let plan = Plan::new(changes, &IndexNames::exact(&["APKINDEX.tar.gz"]));
        assert_eq!(plan.dirs().collect::<Vec<_>>(), vec![("a", 0o755, true), ("a/x", 0o755, true)]);
        assert_eq!(plan.files().map(|(p, _)| p).collect::<Vec<_>>(), vec!["a/new.apk"]);
        assert_eq!(plan.indexes().map(|(p, _)| p).collect::<Vec<_>>(), vec!["a/APKINDEX.tar.gz"]);
        assert_eq!(plan.removals().collect::<Vec<_>>(), vec!["b/old.apk", "b"], "a/x changed kind: not removed");
    }
}
