//! Applying a staged snapshot to the served tree, in the order mirrors have learned to rely on:
//!
//! 1. new directories (parents first);
//! 2. new and changed files that are not index files: each staged file gets its mode and mtime, is flushed to disk
//!    (all of them first, many at once), and is renamed into place (atomic: a reader sees the old file or the new
//!    one, never a mix);
//! 3. symlinks (created in staging, renamed into place) and directory mode changes;
//! 4. index files (`repo.index_globs`, default `APKINDEX.tar.gz`), so no index names a package not yet in place;
//! 5. the directories written to are flushed;
//! 6. removals are not done here: they are returned, to be carried out after the grace period.
//!
//! No temporary name ever appears inside the tree. A crash at any point leaves a consistent tree (old index with
//! old files still present, or new files with the old index, or everything new); re-running the apply after a
//! restart finishes it, since staging finds the files already in place.

use std::collections::BTreeMap;
use std::fs::{File, FileTimes, OpenOptions, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mirrormesh_proto::diff::Change;
use mirrormesh_proto::entry::{EntryKind, FileMeta};
use mirrormesh_proto::tree::split_parent;

use crate::config::glob_match;
use crate::staging::{FileKey, Staging};

/// Staged files flushed to disk at once before they are renamed into place.
pub const FLUSH_THREADS: usize = 16;

#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    pub files: usize,
    pub index_files: usize,
    pub symlinks: usize,
    pub dirs_created: usize,
    pub bytes: u64,
    /// Paths to remove once the grace period is over, deepest first.
    pub removals: Vec<String>,
    /// Paths written by this apply (pending removals of these paths must be cancelled).
    pub written: Vec<String>,
}

/// Applies `changes` to the tree, taking file contents from `staging` (blocking).
pub fn apply(staging: &Staging, changes: &[Change], index_globs: &[String]) -> Result<ApplyReport> {
    let tree = staging.tree().to_owned();
    let plan = staging.plan().context("no staged snapshot to apply")?;
    let mut report = ApplyReport::default();
    let is_index = |path: &str| index_globs.iter().any(|g| glob_match(g, split_parent(path).1));

    let mut files: Vec<(&str, &FileMeta)> = Vec::new();
    let mut indexes: Vec<(&str, &FileMeta)> = Vec::new();
    let mut links: Vec<(&str, &str)> = Vec::new();
    let mut dirs: Vec<(&str, u32, bool)> = Vec::new();
    for change in changes {
        let old_kind = change.old.as_ref().map(|e| &e.kind);
        match change.new.as_ref().map(|e| &e.kind) {
            Some(EntryKind::File(meta)) if is_index(&change.path) => indexes.push((&change.path, meta)),
            Some(EntryKind::File(meta)) => files.push((&change.path, meta)),
            Some(EntryKind::Symlink { target }) => links.push((&change.path, target)),
            Some(EntryKind::Dir { mode, .. }) => {
                let created = !matches!(old_kind, Some(EntryKind::Dir { .. }));
                dirs.push((&change.path, *mode, created));
            }
            None => report.removals.push(change.path.clone()),
        }
    }
    // Deepest first, so a directory is removed after its contents.
    report.removals.sort_by(|a, b| b.matches('/').count().cmp(&a.matches('/').count()).then(b.cmp(a)));

    for (path, mode, created) in &dirs {
        let full = tree.join(path);
        if *created {
            clear_other_kind(&full, Kind::Dir)?;
            match std::fs::create_dir(&full) {
                Ok(()) => report.dirs_created += 1,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating directory {}", full.display())),
            }
        }
        std::fs::set_permissions(&full, Permissions::from_mode(*mode))
            .with_context(|| format!("setting mode of {}", full.display()))?;
    }

    // How many paths still need each staged file: the last one takes it by rename, the others get copies.
    let mut uses: BTreeMap<FileKey, usize> = BTreeMap::new();
    for (path, _) in files.iter().chain(&indexes) {
        if let Some((key, _)) = plan.paths.get(*path) {
            *uses.entry(*key).or_default() += 1;
        }
    }
    // Staged files that one path takes by rename are given their mode and mtime and flushed first, many at once
    // (flushing is waiting for the disk; one at a time it was most of the apply). The renames below stay in order.
    let direct: Vec<(FileKey, &FileMeta)> = files
        .iter()
        .chain(&indexes)
        .filter_map(|(path, meta)| plan.paths.get(*path).map(|(key, _)| (*key, *meta)))
        .filter(|(key, _)| uses.get(key) == Some(&1))
        .collect();
    let flushers = rayon::ThreadPoolBuilder::new().num_threads(FLUSH_THREADS).build().context("flush threads")?;
    flushers.install(|| {
        use rayon::prelude::*;
        direct.par_iter().try_for_each(|(key, meta)| finalize(&staging.object_path(key), meta))
    })?;
    let flushed: std::collections::BTreeSet<FileKey> = direct.iter().map(|(key, _)| *key).collect();
    let mut touched_dirs = std::collections::BTreeSet::new();
    let mut place = |path: &str, meta: &FileMeta, report: &mut ApplyReport| -> Result<()> {
        let (key, _) = plan.paths.get(path).with_context(|| format!("{path} was not staged"))?;
        let staged = staging.object_path(key);
        let remaining = uses.get_mut(key).context("staged file accounting")?;
        *remaining -= 1;
        let source = if *remaining > 0 {
            let copy = staging.tmp_path(&format!("copy-{}", report.files + report.index_files));
            std::fs::copy(&staged, &copy).with_context(|| format!("copying {}", staged.display()))?;
            copy
        } else {
            staged
        };
        if !flushed.contains(key) {
            finalize(&source, meta)?;
        }
        let full = tree.join(path);
        clear_other_kind(&full, Kind::File)?;
        std::fs::rename(&source, &full)
            .with_context(|| format!("renaming {} into {}", source.display(), full.display()))?;
        touched_dirs.insert(split_parent(path).0.to_owned());
        report.bytes += meta.size;
        report.written.push(path.to_owned());
        Ok(())
    };
    for (path, meta) in &files {
        place(path, meta, &mut report)?;
        report.files += 1;
    }
    for (i, (path, target)) in links.iter().enumerate() {
        let tmp = staging.tmp_path(&format!("link-{i}"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("creating symlink {}", tmp.display()))?;
        let full = tree.join(path);
        clear_other_kind(&full, Kind::Symlink)?;
        std::fs::rename(&tmp, &full).with_context(|| format!("renaming symlink into {}", full.display()))?;
        report.written.push((*path).to_owned());
        report.symlinks += 1;
    }
    for (path, meta) in &indexes {
        place(path, meta, &mut report)?;
        report.index_files += 1;
    }
    for dir in touched_dirs {
        let full = tree.join(&dir);
        File::open(&full)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing directory {}", full.display()))?;
    }
    Ok(report)
}

/// Sets a staged file's mode and mtime and flushes it.
fn finalize(path: &Path, meta: &FileMeta) -> Result<()> {
    let file = OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    if file.metadata()?.len() != meta.size {
        bail!("staged file {} has the wrong size", path.display());
    }
    file.set_permissions(Permissions::from_mode(meta.mode))?;
    let mtime = if meta.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(meta.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(meta.mtime.unsigned_abs())
    };
    file.set_times(FileTimes::new().set_modified(mtime).set_accessed(SystemTime::now()))?;
    file.sync_all().with_context(|| format!("flushing {}", path.display()))?;
    Ok(())
}

#[derive(PartialEq)]
enum Kind {
    File,
    Symlink,
    Dir,
}

/// A path about to receive an entry of another kind (a file that became a directory, say) is cleared first:
/// rename cannot replace a directory by a file or the reverse.
fn clear_other_kind(path: &Path, want: Kind) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let have = if meta.is_dir() {
        Kind::Dir
    } else if meta.is_symlink() {
        Kind::Symlink
    } else {
        Kind::File
    };
    if have == want || (have != Kind::Dir && want != Kind::Dir) {
        return Ok(());
    }
    if have == Kind::Dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) }
        .with_context(|| format!("clearing {} for an entry of another kind", path.display()))
}

/// Carries out one removal whose grace period is over. A directory is removed only once empty.
pub fn remove(tree: &Path, path: &str) -> Result<()> {
    let full = tree.join(path);
    let Ok(meta) = std::fs::symlink_metadata(&full) else { return Ok(()) };
    let result = if meta.is_dir() { std::fs::remove_dir(&full) } else { std::fs::remove_file(&full) };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", full.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk_index::ChunkIndex;
    use mirrormesh_proto::chunk::ChunkId;
    use mirrormesh_proto::entry::Entry;
    use mirrormesh_proto::sync::StageFile;
    use std::os::unix::fs::MetadataExt;

    fn meta(content: &[u8], mode: u32, mtime: i64) -> FileMeta {
        FileMeta { mode, size: content.len() as u64, mtime, chunks: vec![ChunkId::of(content)] }
    }

    #[test]
    fn staged_files_land_with_their_metadata_also_when_two_paths_share_content() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let staging = Staging::open(&dir.path().join("staging"), &tree).unwrap();
        // "a" and "b" have the same content (one staged file, taken by one path and copied for the other).
        let files = [
            ("a.apk", b"same bytes".as_slice(), 0o644, 1_000),
            ("b.apk", b"same bytes".as_slice(), 0o600, 2_000),
            ("c.apk", b"other bytes".as_slice(), 0o644, 3_000),
            ("APKINDEX.tar.gz", b"index".as_slice(), 0o644, 4_000),
        ];
        let stage: Vec<StageFile> =
            files.iter().map(|(p, c, m, t)| StageFile { path: (*p).into(), meta: meta(c, *m, *t) }).collect();
        staging.prepare(1, &stage, &ChunkIndex::default()).unwrap();
        for (i, (_, content, _, _)) in files.iter().enumerate() {
            // One write fills every staged file with that content; a second copy is not needed.
            let first = !files[..i].iter().any(|(_, c, _, _)| c == content);
            assert_eq!(staging.write_chunk(&ChunkId::of(content), content).unwrap(), first);
        }
        let changes: Vec<Change> = files
            .iter()
            .map(|(p, c, m, t)| Change { path: (*p).into(), old: None, new: Some(Entry::file(*p, meta(c, *m, *t))) })
            .collect();
        let report = apply(&staging, &changes, &["APKINDEX.tar.gz".into()]).unwrap();
        assert_eq!((report.files, report.index_files), (3, 1));
        for (path, content, mode, mtime) in files {
            let full = tree.join(path);
            assert_eq!(std::fs::read(&full).unwrap(), content, "{path}");
            let m = std::fs::metadata(&full).unwrap();
            assert_eq!((m.mode() & 0o7777, m.mtime()), (mode, mtime), "{path}");
        }
    }

    #[test]
    fn a_second_copy_arriving_while_the_applied_plan_is_forgotten_is_skipped() {
        // A late endgame copy used to find the plan still set but `present` already cleared by `finish`, and failed
        // writing to a staged file the apply had renamed away ("could not write staged chunks").
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let staging = std::sync::Arc::new(Staging::open(&dir.path().join("staging"), &tree).unwrap());
        for round in 0..200u32 {
            let content = format!("package {round}").into_bytes();
            let id = ChunkId::of(&content);
            let path = format!("p{round}.apk");
            let stage = [StageFile { path: path.clone(), meta: meta(&content, 0o644, 1_000) }];
            staging.prepare(u64::from(round) + 1, &stage, &ChunkIndex::default()).unwrap();
            assert!(staging.write_chunk(&id, &content).unwrap());
            // Copies keep arriving until the plan is forgotten, and a few after.
            let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let copies = {
                let (staging, content, finished) = (staging.clone(), content.clone(), finished.clone());
                std::thread::spawn(move || {
                    let mut results = Vec::new();
                    let mut after = 0;
                    while after < 10 {
                        results.push(staging.write_chunk(&id, &content));
                        after += u32::from(finished.load(std::sync::atomic::Ordering::SeqCst));
                    }
                    results
                })
            };
            let change =
                Change { path: path.clone(), old: None, new: Some(Entry::file(&path, meta(&content, 0o644, 1_000))) };
            apply(&staging, &[change], &[]).unwrap();
            staging.finish().unwrap();
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
            for copy in copies.join().unwrap() {
                assert!(!copy.unwrap(), "round {round}: a second copy is never written");
            }
            let m = std::fs::metadata(tree.join(&path)).unwrap();
            assert_eq!((std::fs::read(tree.join(&path)).unwrap(), m.mtime()), (content, 1_000), "round {round}");
        }
    }
}
