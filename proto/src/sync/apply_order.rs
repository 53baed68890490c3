//! The order in which a sync plan reaches the served tree, and when the files it no longer names go: decided here,
//! carried out by the shell's tree writer.
//!
//! [`ApplySteps::of`] sorts a plan's changes into the steps mirrors rely on (new directories parents first; files
//! that are not index files; symlinks and directory modes; index files last, so no index names a package that is not
//! in place yet); removals are not applied with the rest: they are carried out deepest first once due (see
//! [`super::removals`]).

use crate::diff::Change;
use crate::entry::{EntryKind, FileMeta};
use crate::tree::split_parent;

/// A plan's changes in the order the tree writer carries them out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySteps<'a> {
    /// Directories to create or whose mode changes: `(path, mode, created)`, parents first.
    pub dirs: Vec<(&'a str, u32, bool)>,
    /// New and changed files that are not index files.
    pub files: Vec<(&'a str, &'a FileMeta)>,
    /// Symlinks: `(path, target)`.
    pub links: Vec<(&'a str, &'a str)>,
    /// Index files, placed last.
    pub indexes: Vec<(&'a str, &'a FileMeta)>,
    /// Paths the new snapshot no longer names, deepest first (a directory after its contents); never a path the
    /// new snapshot names, even one that changed kind (the diff lists it removed as the old kind and added as the
    /// new).
    pub removals: Vec<String>,
}

impl<'a> ApplySteps<'a> {
    /// Sorts `changes` (a diff, paths in manifest order: a parent before its children) into steps; `is_index` says
    /// whether a file name (the last path component) is an index file (`repo.index_globs`).
    pub fn of(changes: &'a [Change], is_index: impl Fn(&str) -> bool) -> Self {
        let mut steps = ApplySteps::default();
        let named: std::collections::BTreeSet<&str> =
            changes.iter().filter(|c| c.new.is_some()).map(|c| c.path.as_str()).collect();
        for change in changes {
            let old_kind = change.old.as_ref().map(|e| &e.kind);
            match change.new.as_ref().map(|e| &e.kind) {
                Some(EntryKind::File(meta)) if is_index(split_parent(&change.path).1) => {
                    steps.indexes.push((&change.path, meta))
                }
                Some(EntryKind::File(meta)) => steps.files.push((&change.path, meta)),
                Some(EntryKind::Symlink { target }) => steps.links.push((&change.path, target)),
                Some(EntryKind::Dir { mode, .. }) => {
                    let created = !matches!(old_kind, Some(EntryKind::Dir { .. }));
                    steps.dirs.push((&change.path, *mode, created));
                }
                None if named.contains(change.path.as_str()) => {}
                None => steps.removals.push(change.path.clone()),
            }
        }
        steps.removals.sort_by(|a, b| b.matches('/').count().cmp(&a.matches('/').count()).then(b.cmp(a)));
        steps
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
        let steps = ApplySteps::of(&changes, |name| name == "APKINDEX.tar.gz");
        assert_eq!(steps.dirs, vec![("a", 0o755, true), ("a/x", 0o755, true)]);
        assert_eq!(steps.files.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec!["a/new.apk"]);
        assert_eq!(steps.indexes.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec!["a/APKINDEX.tar.gz"]);
        assert_eq!(steps.removals, vec!["b/old.apk".to_owned(), "b".to_owned()], "a/x changed kind: not removed");
    }
}
