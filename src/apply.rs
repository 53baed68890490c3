//! Applying a staged snapshot to the served tree, in the order mirrors have learned to rely on (decided by the core:
//! the [`Plan`] the engine's `Apply` carries; carried out here):
//!
//! 1. new directories (parents first);
//! 2. new and changed files that are not index files: each staged file gets its mode and mtime (all of them first,
//!    many at once, and the copies for paths that share content with another are made then), the filesystem is flushed once (`syncfs`: every staged file's content is on disk before any is
//!    renamed), and each is renamed into place (atomic: a reader sees the old file or the new one, never a mix);
//! 3. symlinks (created in staging, renamed into place) and directory mode changes; the filesystem is flushed
//!    again, so the renames are on disk before any index names what they brought;
//! 4. index files (`repo.index_globs`, default `APKINDEX.tar.gz`), so no index names a package not yet in place;
//! 5. the filesystem is flushed a last time (the index renames and the directories written to).
//!
//! The flushes are of the whole filesystem the staging directory is on (which is the tree's: files are renamed
//! from one to the other), three per apply whatever its size: one `fsync` per file made a 10^5-file first sync
//! spend most of its time waiting for the disk (BENCHMARKS.md, "An initial sync at full size"). They flush
//! whatever else is waiting on that filesystem too.
//! 6. removals are not done here: they are returned, to be carried out after the grace period (`removals.rs`
//!    checks each again then). A path the new snapshot names is never among them, even when it changed kind (a
//!    file that became a directory is removed as a file and added as a directory by the diff).
//!
//! Modes are applied through [`served_mode`]: never setuid, setgid or sticky, never writable by group or others,
//! whatever the manifest says.
//!
//! No temporary name ever appears inside the tree. A crash or an error at any point leaves a consistent tree (old
//! index with old files still present, or new files with the old index, or everything new); re-running the apply
//! finishes it: a file whose staged copy was already renamed into place is recognised there by its content.

use std::collections::HashMap;
use std::fs::{File, FileTimes, OpenOptions, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mirrormesh_proto::chunk::{ChunkId, chunk_range};
use mirrormesh_proto::entry::{FileMeta, served_mode};
use mirrormesh_proto::sync::Plan;

use crate::staging::{FileKey, Staging};

/// Staged files given their mode and mtime at once before they are renamed into place.
pub const FINALIZE_THREADS: usize = 16;

#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    pub files: usize,
    pub index_files: usize,
    pub symlinks: usize,
    pub dirs_created: usize,
    pub bytes: u64,
    /// Paths to remove once the grace period is over, deepest first. None of them is named by the new snapshot.
    pub removals: Vec<String>,
    /// Paths the new snapshot names that this apply wrote or created (files, symlinks, directories): pending
    /// removals of these paths must be cancelled.
    pub written: Vec<String>,
    /// Where its time went, step by step (for the log).
    pub steps: Vec<(&'static str, Duration)>,
}

/// Times the steps of an apply.
struct Steps(Instant);

impl Steps {
    fn end(&mut self, report: &mut ApplyReport, step: &'static str) {
        let now = Instant::now();
        report.steps.push((step, now - self.0));
        self.0 = now;
    }
}

/// Applies `plan` to the tree in its order, taking file contents from `staging` (blocking).
pub fn apply(staging: &Staging, plan: &Plan) -> Result<ApplyReport> {
    let tree = staging.tree().to_owned();
    let staged = staging.plan().context("no staged snapshot to apply")?;
    let mut report = ApplyReport { removals: plan.removals().map(str::to_owned).collect(), ..ApplyReport::default() };
    let mut steps = Steps(Instant::now());

    for (path, mode, created) in plan.dirs() {
        let full = tree.join(path);
        if created {
            clear_other_kind(&full, Kind::Dir)?;
            match std::fs::create_dir(&full) {
                Ok(()) => report.dirs_created += 1,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating directory {}", full.display())),
            }
        }
        std::fs::set_permissions(&full, Permissions::from_mode(served_mode(mode)))
            .with_context(|| format!("setting mode of {}", full.display()))?;
        report.written.push(path.to_owned());
    }
    steps.end(&mut report, "dirs");

    // Every file the plan places, in order. Paths with the same content share a staged file: the last of them takes
    // it by rename, the others get copies, made here before anything is renamed (Alpine's noarch packages are the
    // same bytes in every architecture's directory).
    let order: Vec<(&str, &FileMeta)> = plan.files().chain(plan.indexes()).collect();
    let mut last_use: HashMap<FileKey, usize> = HashMap::new();
    for (i, (path, _)) in order.iter().enumerate() {
        if let Some((key, _)) = staged.paths.get(*path) {
            last_use.insert(*key, i);
        }
    }
    let source_of = |i: usize, key: &FileKey| {
        if last_use.get(key) == Some(&i) { staging.object_path(key) } else { staging.tmp_path(&format!("copy-{i}")) }
    };
    // Each source gets its copy made and its mode and mtime, many at once; then one flush of the filesystem puts
    // them all on disk. A staged file already renamed into place by an earlier, interrupted run of this apply is
    // left alone (the renames below find it in place).
    let finalizers =
        rayon::ThreadPoolBuilder::new().num_threads(FINALIZE_THREADS).build().context("finalize threads")?;
    finalizers.install(|| {
        use rayon::prelude::*;
        order.par_iter().enumerate().try_for_each(|(i, (path, meta))| -> Result<()> {
            let Some((key, _)) = staged.paths.get(*path) else { return Ok(()) };
            let (object, source) = (staging.object_path(key), source_of(i, key));
            if !object.exists() {
                return Ok(());
            }
            if source != object {
                std::fs::copy(&object, &source).with_context(|| format!("copying {}", object.display()))?;
            }
            finalize(&source, meta)
        })
    })?;
    steps.end(&mut report, "modes");
    flush_filesystem(&tree)?;
    steps.end(&mut report, "flush");
    let mut placed = 0;
    let mut place = |path: &str, meta: &FileMeta, report: &mut ApplyReport| -> Result<()> {
        let i = placed;
        placed += 1;
        let (key, _) = staged.paths.get(path).with_context(|| format!("{path} was not staged"))?;
        let source = source_of(i, key);
        let full = tree.join(path);
        if !source.exists() && in_place(&full, meta)? {
            // Renamed into place by an earlier run of this apply that stopped before the end.
            report.bytes += meta.size;
            report.written.push(path.to_owned());
            return Ok(());
        }
        clear_other_kind(&full, Kind::File)?;
        std::fs::rename(&source, &full)
            .with_context(|| format!("renaming {} into {}", source.display(), full.display()))?;
        report.bytes += meta.size;
        report.written.push(path.to_owned());
        Ok(())
    };
    for (path, meta) in plan.files() {
        place(path, meta, &mut report)?;
        report.files += 1;
    }
    for (i, (path, target)) in plan.symlinks().enumerate() {
        let tmp = staging.tmp_path(&format!("link-{i}"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("creating symlink {}", tmp.display()))?;
        let full = tree.join(path);
        clear_other_kind(&full, Kind::Symlink)?;
        std::fs::rename(&tmp, &full).with_context(|| format!("renaming symlink into {}", full.display()))?;
        report.written.push(path.to_owned());
        report.symlinks += 1;
    }
    steps.end(&mut report, "renames");
    flush_filesystem(&tree)?;
    steps.end(&mut report, "flush");
    for (path, meta) in plan.indexes() {
        place(path, meta, &mut report)?;
        report.index_files += 1;
    }
    flush_filesystem(&tree)?;
    steps.end(&mut report, "indexes");
    Ok(report)
}

/// Flushes everything written to the filesystem `dir` is on (contents, metadata, renames) to disk: one wait for
/// the disk instead of one per file.
fn flush_filesystem(dir: &Path) -> Result<()> {
    let dir_file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    rustix::fs::syncfs(&dir_file).with_context(|| format!("flushing the filesystem of {}", dir.display()))
}

/// Sets a staged file's mode and mtime (checking its size; it is flushed with the rest).
fn finalize(path: &Path, meta: &FileMeta) -> Result<()> {
    let file = OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    if file.metadata()?.len() != meta.size {
        bail!("staged file {} has the wrong size", path.display());
    }
    file.set_permissions(Permissions::from_mode(served_mode(meta.mode)))?;
    let mtime = if meta.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(meta.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(meta.mtime.unsigned_abs())
    };
    file.set_times(FileTimes::new().set_modified(mtime).set_accessed(SystemTime::now()))?;
    Ok(())
}

/// Whether the tree already holds this file at `full`: a regular file of the right size whose every chunk hashes
/// to the manifest's id (read only when the staged copy is gone, i.e. when an apply runs again).
fn in_place(full: &Path, meta: &FileMeta) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let Ok(stat) = std::fs::symlink_metadata(full) else { return Ok(false) };
    if !stat.is_file() || stat.len() != meta.size {
        return Ok(false);
    }
    let file = File::open(full).with_context(|| format!("opening {}", full.display()))?;
    let mut buf = Vec::new();
    for (i, id) in meta.chunks.iter().enumerate() {
        let Some((offset, len)) = chunk_range(meta.size, i as u64) else { return Ok(false) };
        buf.resize(len as usize, 0);
        file.read_exact_at(&mut buf, offset).with_context(|| format!("reading {}", full.display()))?;
        if ChunkId::of(&buf) != *id {
            return Ok(false);
        }
    }
    Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk_index::ChunkIndex;
    use mirrormesh_proto::chunk::ChunkId;
    use mirrormesh_proto::diff::Change;
    use mirrormesh_proto::entry::{Entry, EntryKind};
    use mirrormesh_proto::sync::{IndexNames, StageFile};
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
        let plan = Plan::new(changes, &IndexNames::exact(&["APKINDEX.tar.gz"]));
        let report = apply(&staging, &plan).unwrap();
        assert_eq!((report.files, report.index_files), (3, 1));
        for (path, content, mode, mtime) in files {
            let full = tree.join(path);
            assert_eq!(std::fs::read(&full).unwrap(), content, "{path}");
            let m = std::fs::metadata(&full).unwrap();
            assert_eq!((m.mode() & 0o7777, m.mtime()), (mode, mtime), "{path}");
        }
    }

    #[test]
    fn modes_from_the_manifest_are_masked_no_setuid_setgid_sticky_or_group_write() {
        use mirrormesh_proto::node::NodeHash;
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let staging = Staging::open(&dir.path().join("staging"), &tree).unwrap();
        let content = b"#!/bin/sh\n".as_slice();
        let stage = [StageFile { path: "bin/tool".into(), meta: meta(content, 0o6777, 1_000) }];
        staging.prepare(1, &stage, &ChunkIndex::default()).unwrap();
        staging.write_chunk(&ChunkId::of(content), content).unwrap();
        let changes = vec![
            Change {
                path: "bin".into(),
                old: None,
                new: Some(Entry { name: "bin".into(), kind: EntryKind::Dir { mode: 0o3777, root: NodeHash([0; 32]) } }),
            },
            Change { path: "bin/tool".into(), old: None, new: Some(Entry::file("tool", meta(content, 0o6777, 1_000))) },
        ];
        apply(&staging, &Plan::new(changes, &IndexNames::exact(&[]))).unwrap();
        let mode = |p: &str| std::fs::metadata(tree.join(p)).unwrap().mode() & 0o7777;
        assert_eq!((mode("bin"), mode("bin/tool")), (0o755, 0o755));
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
            apply(&staging, &Plan::new(vec![change], &IndexNames::exact(&[]))).unwrap();
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
