//! Carrying out removals whose grace period is over, without ever touching a file the served snapshot names.
//!
//! A removal was decided against an older snapshot; by the time it is due the tree may have changed shape (a
//! directory became a symlink to a live directory, a removed file came back as a directory). So every due removal is
//! checked again, here, just before it is carried out:
//!
//! 1. A path the snapshot now in the tree names (as anything) is kept, and its removal forgotten.
//! 2. The path is reached from the tree's root one directory at a time with `openat(O_DIRECTORY | O_NOFOLLOW)`: a
//!    symlink anywhere on the way, or a component that is no longer a directory, means the path no longer leads
//!    where the removal meant, and the removal is dropped. Nothing outside the tree and nothing behind a symlink is
//!    ever unlinked.
//! 3. The last component is removed with `unlinkat` (a symlink itself, never its target); a directory only once it
//!    is empty.
//!
//! Removals run in the order given (deepest first, so a directory after its contents).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use mirrormesh_proto::lookup::{Lookup, LookupError};
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::node_store::NodeSource;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use thiserror::Error;

/// What became of one due removal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Removal {
    Removed,
    /// Nothing was there any more.
    Gone,
    /// A directory that still has entries (new ones, or ones of the snapshot): left in place.
    NotEmpty,
    /// The snapshot in the tree names this path: kept.
    NamedBySnapshot,
    /// A symlink or a non-directory on the way: the path leads elsewhere now, so nothing was removed.
    NotBeneathTree,
}

#[derive(Debug, Error)]
pub enum RemovalError {
    #[error("opening the tree {path}: {source}")]
    Tree { path: String, source: std::io::Error },
    #[error("removing {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("reading the snapshot in the tree: {0}")]
    Manifest(#[from] LookupError),
}

/// What a batch of removals did, by outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemovalReport {
    pub removed: u64,
    pub gone: u64,
    pub not_empty: u64,
    pub named_by_snapshot: u64,
    pub not_beneath_tree: u64,
}

impl RemovalReport {
    fn count(&mut self, removal: Removal) {
        *match removal {
            Removal::Removed => &mut self.removed,
            Removal::Gone => &mut self.gone,
            Removal::NotEmpty => &mut self.not_empty,
            Removal::NamedBySnapshot => &mut self.named_by_snapshot,
            Removal::NotBeneathTree => &mut self.not_beneath_tree,
        } += 1;
    }
}

/// Carries out `paths` (relative to `tree`, deepest first) unless the snapshot whose manifest root is `snapshot`
/// (read through `source`) names them. Stops at the first I/O error (the caller keeps the paths not yet done); every
/// path before it is settled and may be forgotten.
pub fn remove_due(
    tree: &Path,
    source: &impl NodeSource,
    snapshot: Option<NodeHash>,
    paths: &[String],
    mut settled: impl FnMut(&str, Removal),
) -> Result<RemovalReport, RemovalError> {
    let root = rustix::fs::open(tree, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| RemovalError::Tree { path: tree.display().to_string(), source: e.into() })?;
    let mut lookup = snapshot.map(|root| Lookup::new(source, root));
    let mut report = RemovalReport::default();
    for path in paths {
        let named = match &mut lookup {
            Some(lookup) => lookup.names(path)?,
            None => false,
        };
        let removal = if named {
            Removal::NamedBySnapshot
        } else {
            remove_beneath(&root, path).map_err(|e| RemovalError::Io { path: path.clone(), source: e.into() })?
        };
        report.count(removal);
        settled(path, removal);
    }
    Ok(report)
}

/// Removes `path` below the directory `root` without following a symlink in any component.
fn remove_beneath(root: &OwnedFd, path: &str) -> Result<Removal, Errno> {
    let mut names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
    let Some(last) = names.pop() else { return Ok(Removal::NotBeneathTree) };
    if names.iter().chain([&last]).any(|n| *n == "." || *n == "..") {
        return Ok(Removal::NotBeneathTree);
    }
    let mut dir: Option<OwnedFd> = None;
    for name in names {
        let at = dir.as_ref().unwrap_or(root);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(at.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => dir = Some(fd),
            Err(Errno::NOENT) => return Ok(Removal::Gone),
            // A symlink (ELOOP with O_NOFOLLOW) or something that is not a directory on the way.
            Err(Errno::LOOP | Errno::NOTDIR) => return Ok(Removal::NotBeneathTree),
            Err(e) => return Err(e),
        }
    }
    let at = dir.as_ref().unwrap_or(root);
    let stat = match rustix::fs::statat(at.as_fd(), last, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(Removal::Gone),
        Err(e) => return Err(e),
    };
    let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
    let flags = if is_dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
    match rustix::fs::unlinkat(at.as_fd(), last, flags) {
        Ok(()) => Ok(Removal::Removed),
        Err(Errno::NOENT) => Ok(Removal::Gone),
        Err(Errno::NOTEMPTY | Errno::EXIST) => Ok(Removal::NotEmpty),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use mirrormesh_proto::chunk::ChunkId;
    use mirrormesh_proto::entry::{EntryKind, FileMeta};
    use mirrormesh_proto::tree::TreeDir;

    fn file() -> EntryKind {
        EntryKind::File(FileMeta { mode: 0o644, size: 1, mtime: 0, chunks: vec![ChunkId::of(b"x")] })
    }

    fn run(tree: &Path, snapshot: &TreeDir, paths: &[&str]) -> (RemovalReport, Vec<(String, Removal)>) {
        let mut store = BTreeMap::new();
        let root = snapshot.clone().build(&mut store).unwrap();
        let paths: Vec<String> = paths.iter().map(|p| (*p).to_owned()).collect();
        let mut settled = Vec::new();
        let report = remove_due(tree, &store, Some(root), &paths, |p, r| settled.push((p.to_owned(), r))).unwrap();
        (report, settled)
    }

    #[test]
    fn a_removal_never_follows_a_symlink_and_never_removes_what_the_snapshot_names() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("b")).unwrap();
        std::fs::write(tree.join("b/f"), "live").unwrap();
        std::fs::write(dir.path().join("outside"), "not in the tree").unwrap();
        // `a` was a directory holding `f`; it is now a symlink to the live `b`. `x` was a file and is now an
        // (empty) directory. `up` points out of the tree.
        std::os::unix::fs::symlink("b", tree.join("a")).unwrap();
        std::fs::create_dir(tree.join("x")).unwrap();
        std::os::unix::fs::symlink(dir.path(), tree.join("up")).unwrap();
        std::fs::write(tree.join("old"), "removed by the snapshot").unwrap();
        let mut snapshot = TreeDir::default();
        snapshot.insert("b/f", file()).unwrap();
        snapshot.insert("a", EntryKind::Symlink { target: "b".into() }).unwrap();
        snapshot.insert("up", EntryKind::Symlink { target: "b".into() }).unwrap();
        snapshot.insert("x", EntryKind::Dir { mode: 0o755, root: NodeHash([0; 32]) }).unwrap();

        let (report, settled) = run(&tree, &snapshot, &["a/f", "up/outside", "x", "old", "gone"]);
        assert_eq!(std::fs::read_to_string(tree.join("b/f")).unwrap(), "live");
        assert_eq!(std::fs::read_to_string(dir.path().join("outside")).unwrap(), "not in the tree");
        assert!(tree.join("x").is_dir());
        assert!(!tree.join("old").exists());
        assert_eq!(
            settled,
            vec![
                ("a/f".to_owned(), Removal::NotBeneathTree),
                ("up/outside".to_owned(), Removal::NotBeneathTree),
                ("x".to_owned(), Removal::NamedBySnapshot),
                ("old".to_owned(), Removal::Removed),
                ("gone".to_owned(), Removal::Gone),
            ]
        );
        assert_eq!((report.removed, report.not_beneath_tree, report.named_by_snapshot), (1, 2, 1));
    }

    #[test]
    fn a_removal_under_a_path_that_stopped_being_a_directory_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("d"), "d is a file now").unwrap();
        std::fs::create_dir(tree.join("e")).unwrap();
        std::fs::write(tree.join("e/new"), "a file the removal did not know of").unwrap();
        let (_, settled) = run(&tree, &TreeDir::default(), &["d/f", "e", "../tree/d"]);
        assert_eq!(
            settled,
            vec![
                ("d/f".to_owned(), Removal::NotBeneathTree),
                ("e".to_owned(), Removal::NotEmpty),
                ("../tree/d".to_owned(), Removal::NotBeneathTree),
            ]
        );
        assert!(tree.join("d").is_file() && tree.join("e/new").is_file());
    }
}
