//! Scanning a served tree into a manifest, one directory at a time.
//!
//! The walk is depth-first: a directory is listed, its subdirectories are scanned first (each yields its root
//! hash), its files are hashed, and its node tree is built and written at once; only the directory being built is
//! in memory, never the whole tree. Every file is `lstat`ed; a file whose size, mtime, ctime, inode and device
//! match the scan cache reuses the chunk ids cached for it, everything else is read and hashed, one 1 MiB chunk per
//! task across all cores. Entries a manifest cannot carry (non-UTF-8 or forbidden names, sockets, devices, symlinks
//! leaving the tree, files over `FILE_SIZE_MAX`) are skipped, logged and counted, before anything is hashed. Modes
//! are published through `served_mode` (no setuid, setgid or sticky bit, no group or other write). Paths given as
//! `exclude` (the node's own downstream files, `downstream.rs`) are left out silently.
//!
//! **A busy tree.** Builders write into the tree while it is scanned. Each directory is captured whole or not at
//! all: after its files are read, it is listed and its files `lstat`ed again, and if anything differs (a name came or
//! went, a file changed while it was read) the directory is read again, up to [`DIR_READ_ATTEMPTS`] times; then it is
//! published as the previous snapshot has it (its changes wait for the next publish), or, with no previous snapshot
//! holding it, the scan fails. So an index and the packages it names are taken from one moment of their directory.
//!
//! **Reading only what changed** ([`Changed`]). Given the previous snapshot's root and the directories that changed
//! since (from the tree watcher, or named by the operator: `publish --paths`), the scan lists those directories and
//! their ancestors only; every other subdirectory keeps its root from the previous snapshot unread. One changed
//! package in a tree of a million files costs the `lstat`s of its directory. Directories still being written
//! (`keep`) are left as the previous snapshot has them.

use std::collections::BTreeSet;
use std::fs::{File, Metadata};
use std::io::IsTerminal;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use mirrormesh_proto::builder::build_dir;
use mirrormesh_proto::chunk::{CHUNK_SIZE, ChunkId, chunk_count, chunk_range};
use mirrormesh_proto::entry::{Entry, EntryKind, FILE_SIZE_MAX, FileMeta, served_mode};
use mirrormesh_proto::lookup::Lookup;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::path::{check_symlink_within, depth, join, validate_name, validate_rel_path};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::store::StoreWriter;

/// What the scan cache remembers of a file. Any difference in the stat fields means "hash it again".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub ino: u64,
    pub dev: u64,
    pub chunks: Vec<ChunkId>,
}

impl CachedFile {
    fn same_file(&self, meta: &Metadata) -> bool {
        self.size == meta.len()
            && self.mtime == (meta.mtime(), meta.mtime_nsec())
            && self.ctime == (meta.ctime(), meta.ctime_nsec())
            && self.ino == meta.ino()
            && self.dev == meta.dev()
    }

    fn of(meta: &Metadata, chunks: Vec<ChunkId>) -> Self {
        Self {
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
            chunks,
        }
    }
}

/// Times a directory is read before the scan gives up on it because it changed during every read.
pub const DIR_READ_ATTEMPTS: u32 = 5;

/// Most paths one scan of changes takes (`publish --paths`, the watcher's dirty directories); past it, the whole
/// tree is read.
pub const CHANGED_PATHS_MAX: usize = 100_000;

/// What changed in the tree since the previous snapshot, for a scan that reads only that (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Directories whose entries are read again (their listing, and an `lstat` of each entry). Their ancestors are
    /// read again too; a subdirectory is read only if it is named here, is an ancestor of one named here, or is new.
    pub dirs: BTreeSet<String>,
    /// Directories read again whole, with everything under them.
    pub trees: BTreeSet<String>,
    /// Directories left as the previous snapshot has them (still being written: their changes wait for the next
    /// publish); a new one is left out until then.
    pub keep: BTreeSet<String>,
}

impl Changed {
    /// From paths (relative to the tree) that changed: a path that is a directory now is read whole; anything else
    /// (a file, a symlink, a path no longer there) has its directory read again. Rejects a path that is not a clean
    /// relative path (no `..`, no `.`, no empty component).
    pub fn from_paths<S: AsRef<str>>(tree: &Path, paths: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut changed = Changed::default();
        for (i, path) in paths.into_iter().enumerate() {
            if i >= CHANGED_PATHS_MAX {
                bail!("more than {CHANGED_PATHS_MAX} changed paths: publish the whole tree instead");
            }
            let path = path.as_ref().trim_matches('/');
            validate_rel_path(path).with_context(|| format!("changed path {path:?}"))?;
            if std::fs::symlink_metadata(tree.join(path)).is_ok_and(|m| m.is_dir()) {
                changed.trees.insert(path.to_owned());
            } else {
                changed.dirs.insert(parent(path).to_owned());
            }
        }
        Ok(changed)
    }

    /// Nothing to read.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.trees.is_empty()
    }

    /// The directories to list: those named and all their ancestors (the root included).
    fn listed(&self) -> BTreeSet<String> {
        let mut listed = BTreeSet::new();
        for dir in self.dirs.iter().chain(&self.trees) {
            let mut at = dir.as_str();
            loop {
                if !listed.insert(at.to_owned()) {
                    break;
                }
                if at.is_empty() {
                    break;
                }
                at = parent(at);
            }
        }
        listed
    }

    fn in_tree(&self, rel: &str) -> bool {
        self.trees.iter().any(|t| is_within(rel, t))
    }
}

/// The directory holding `path` (`""` for a name at the root).
fn parent(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

/// Whether `path` is `dir` or below it.
fn is_within(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

#[derive(Clone, Debug, Default)]
pub struct ScanStats {
    /// Regular files and their bytes in the directories read (the whole tree for a full scan).
    pub files: u64,
    pub bytes: u64,
    /// Directories read, and directories whose previous root was kept unread (a scan of changes).
    pub dirs: u64,
    pub dirs_kept: u64,
    pub symlinks: u64,
    /// Entries left out of the manifest (see the module doc).
    pub skipped: u64,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    pub cached_files: u64,
    /// Directories read again because they changed while they were read, and those that changed during every
    /// read and were published as the previous snapshot has them.
    pub dirs_reread: u64,
    pub dirs_kept_busy: u64,
    pub elapsed: Duration,
    /// Time spent reading and hashing (part of `elapsed`).
    pub hash_elapsed: Duration,
}

pub struct Scan {
    pub root: NodeHash,
    pub stats: ScanStats,
}

struct Pending {
    /// Index of the entry in the directory's entry list.
    index: usize,
    abs: PathBuf,
    meta: Metadata,
}

/// A scan of changes: what changed, and the directories to list because of it.
struct Scope {
    changed: Changed,
    listed: BTreeSet<String>,
}

/// Tests' hook between a directory's read and its second look.
#[cfg(test)]
type BetweenLooks = Box<dyn FnMut(&str, u32)>;

/// One read of one directory: what it found, before it is checked against a second look.
#[derive(Default)]
struct DirRead {
    entries: Vec<Entry>,
    /// Files to hash.
    pending: Vec<Pending>,
    /// Every entry read, as `lstat` saw it (checked again once the directory is read).
    seen: Vec<(PathBuf, Metadata)>,
    names: Vec<String>,
    skipped: Skipped,
    files: u64,
    bytes: u64,
    cached_files: u64,
    symlinks: u64,
}

struct Scanner<'a> {
    writer: &'a mut StoreWriter,
    exclude: &'a [String],
    scope: Option<Scope>,
    /// The previous snapshot's root, if any.
    previous_root: Option<NodeHash>,
    stats: ScanStats,
    bar: ProgressBar,
    /// Tests: called between a directory's read and its second look, with the directory and the attempt.
    #[cfg(test)]
    between_looks: Option<BetweenLooks>,
}

/// Scans the tree at `root`, writing its manifest nodes and scan-cache entries into `writer`; the paths in `exclude`
/// (relative to `root`) are left out. `previous` is the previous snapshot's root: with `changed` (what changed since),
/// only the changed directories and their ancestors are read (see the module doc); a directory that changed during
/// every read is published as `previous` has it.
pub fn scan(
    root: &Path,
    writer: &mut StoreWriter,
    progress: bool,
    exclude: &[String],
    previous: Option<NodeHash>,
    changed: Option<&Changed>,
) -> Result<Scan> {
    let started = Instant::now();
    let meta = std::fs::metadata(root).with_context(|| format!("tree {}", root.display()))?;
    if !meta.is_dir() {
        bail!("tree {} is not a directory", root.display());
    }
    let bar = if progress && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} scanning: hashed {bytes} ({bytes_per_sec}) {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let scope = changed.filter(|_| previous.is_some()).map(|c| Scope { listed: c.listed(), changed: c.clone() });
    let mut scanner = Scanner {
        writer,
        exclude,
        scope,
        previous_root: previous,
        stats: ScanStats::default(),
        bar,
        #[cfg(test)]
        between_looks: None,
    };
    let start = if scanner.scope.is_some() { previous } else { None };
    let root = scanner.dir(root, "", start)?;
    scanner.bar.finish_and_clear();
    let mut stats = scanner.stats;
    stats.elapsed = started.elapsed();
    Ok(Scan { root, stats })
}

impl Scanner<'_> {
    /// Scans one directory (subdirectories first), builds its nodes and returns its root. `previous` is its root in
    /// the previous snapshot, when only changes are read (`None` reads everything under it).
    fn dir(&mut self, abs: &Path, rel: &str, previous: Option<NodeHash>) -> Result<NodeHash> {
        let previous = match (&self.scope, previous) {
            (Some(scope), Some(root)) if !scope.changed.in_tree(rel) => Some(
                Lookup::new(&*self.writer, root)
                    .list(&root)
                    .with_context(|| format!("reading the previous snapshot's listing of {rel:?}"))?,
            ),
            _ => None,
        };
        for attempt in 1..=DIR_READ_ATTEMPTS {
            let read = self.read_dir(abs, rel, previous.as_deref())?;
            #[cfg(test)]
            if let Some(hook) = &mut self.between_looks {
                hook(rel, attempt);
            }
            if let Some(root) = self.finish_dir(abs, rel, read)? {
                return Ok(root);
            }
            self.stats.dirs_reread += 1;
            tracing::info!(dir = rel, attempt, "changed while it was read; reading it again");
        }
        if let Some(kept) = self.previous_dir_root(rel)? {
            self.stats.dirs_kept_busy += 1;
            tracing::warn!(
                dir = rel,
                "changed during each of {DIR_READ_ATTEMPTS} reads: published as the previous snapshot has it"
            );
            return Ok(kept);
        }
        bail!("{} changed during each of {DIR_READ_ATTEMPTS} reads; publish again once it is quiet", abs.display())
    }

    /// The root directory `rel` has in the previous snapshot, if there is one and it has it.
    fn previous_dir_root(&self, rel: &str) -> Result<Option<NodeHash>> {
        let Some(root) = self.previous_root else { return Ok(None) };
        if rel.is_empty() {
            return Ok(Some(root));
        }
        let entry = Lookup::new(&*self.writer, root)
            .entry(rel)
            .with_context(|| format!("reading the previous snapshot's entry of {rel:?}"))?;
        Ok(match entry.map(|e| e.kind) {
            Some(EntryKind::Dir { root, .. }) => Some(root),
            _ => None,
        })
    }

    /// Lists a directory and `lstat`s its entries, scanning subdirectories as it goes; `None` if an entry went away
    /// meanwhile.
    fn read_dir(&mut self, abs: &Path, rel: &str, previous: Option<&[Entry]>) -> Result<Option<DirRead>> {
        let mut read = DirRead::default();
        (read.names, read.skipped) = list_names(abs, rel)?;
        let names = read.names.clone();
        for name in names {
            let path = join(rel, &name);
            if self.exclude.contains(&path) {
                tracing::debug!(path, "left out of the manifest: this node's own downstream file");
                continue;
            }
            let child = abs.join(&name);
            let meta = match std::fs::symlink_metadata(&child) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("stat {}", child.display())),
            };
            let kind = if meta.is_dir() {
                let Some(root) = self.subdir(&child, &path, &name, previous)? else {
                    read.seen.push((child, meta));
                    continue;
                };
                EntryKind::Dir { mode: served_mode(meta.mode()), root }
            } else if meta.is_symlink() {
                let target = match std::fs::read_link(&child) {
                    Ok(target) => target,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e).with_context(|| format!("readlink {}", child.display())),
                };
                let Some(target) = target.to_str().map(str::to_owned) else {
                    read.skipped.push((path, "symlink target is not UTF-8".into()));
                    continue;
                };
                if let Err(e) = check_symlink_within(depth(rel), &target) {
                    read.skipped.push((path, format!("symlink target {target:?}: {e}")));
                    continue;
                }
                read.symlinks += 1;
                EntryKind::Symlink { target }
            } else if meta.is_file() && meta.len() > FILE_SIZE_MAX {
                read.skipped.push((path, format!("{} bytes, over the limit of {FILE_SIZE_MAX}", meta.len())));
                continue;
            } else if meta.is_file() {
                read.files += 1;
                read.bytes += meta.len();
                let cached = self
                    .writer
                    .scan_entry(&path)?
                    .and_then(|bytes| postcard::from_bytes::<CachedFile>(&bytes).ok())
                    .filter(|c| c.same_file(&meta) && c.chunks.len() as u64 == chunk_count(c.size));
                let chunks = match cached {
                    Some(c) => {
                        read.cached_files += 1;
                        c.chunks
                    }
                    None => {
                        read.pending.push(Pending {
                            index: read.entries.len(),
                            abs: child.clone(),
                            meta: meta.clone(),
                        });
                        Vec::new()
                    }
                };
                EntryKind::File(FileMeta {
                    mode: served_mode(meta.mode()),
                    size: meta.len(),
                    mtime: meta.mtime(),
                    chunks,
                })
            } else {
                read.skipped.push((path, "not a regular file, directory or symlink".into()));
                continue;
            };
            read.seen.push((child, meta));
            read.entries.push(Entry { name, kind });
        }
        Ok(Some(read))
    }

    /// The root of subdirectory `name` (at `path`): read, or kept from the previous snapshot; `None` leaves it out
    /// (a new directory still being written).
    fn subdir(&mut self, abs: &Path, path: &str, name: &str, previous: Option<&[Entry]>) -> Result<Option<NodeHash>> {
        // Read it (from its previous root, or all of it), or keep its previous root unread.
        let (read, root) = match (previous, &self.scope) {
            (Some(previous), Some(scope)) => {
                let old = previous.binary_search_by(|e| e.name.as_str().cmp(name)).ok().and_then(|i| {
                    match previous[i].kind {
                        EntryKind::Dir { root, .. } => Some(root),
                        _ => None,
                    }
                });
                if scope.changed.keep.contains(path) {
                    if old.is_none() {
                        tracing::debug!(path, "a new directory still being written: left out until it is quiet");
                    }
                    (false, old)
                } else {
                    let read = scope.listed.contains(path) || scope.changed.in_tree(path) || old.is_none();
                    (read, old)
                }
            }
            _ => (true, None),
        };
        if read {
            self.stats.dirs += 1;
            return self.dir(abs, path, root).map(Some);
        }
        self.stats.dirs_kept += u64::from(root.is_some());
        Ok(root)
    }

    /// Hashes what a read found, checks the directory against a second look and builds its nodes; `None` if it
    /// changed meanwhile (nothing of this read is recorded then but nodes, which are named by their content).
    fn finish_dir(&mut self, abs: &Path, rel: &str, read: Option<DirRead>) -> Result<Option<NodeHash>> {
        let Some(mut read) = read else { return Ok(None) };
        let hashed = if read.pending.is_empty() {
            Vec::new()
        } else {
            let started = Instant::now();
            let hashed = hash_files(&read.pending, &self.bar)?;
            self.stats.hash_elapsed += started.elapsed();
            match hashed {
                Some(hashed) => hashed,
                None => return Ok(None),
            }
        };
        // The second look: the same names, and every entry as it was when it was read.
        if list_names(abs, rel)?.0 != read.names || !read.seen.iter().all(|(path, meta)| unchanged(path, meta)) {
            return Ok(None);
        }
        for (file, chunks) in read.pending.iter().zip(hashed) {
            let entry = &mut read.entries[file.index];
            let path = join(rel, &entry.name);
            self.writer.put_scan_entry(&path, &postcard::to_allocvec(&CachedFile::of(&file.meta, chunks.clone()))?)?;
            if let EntryKind::File(meta) = &mut entry.kind {
                meta.chunks = chunks;
            }
            self.stats.hashed_files += 1;
            self.stats.hashed_bytes += file.meta.len();
        }
        for (path, why) in &read.skipped {
            self.stats.skipped += 1;
            tracing::warn!(path, why, "left out of the manifest");
        }
        self.stats.files += read.files;
        self.stats.bytes += read.bytes;
        self.stats.cached_files += read.cached_files;
        self.stats.symlinks += read.symlinks;
        let root =
            build_dir(&read.entries, self.writer).with_context(|| format!("building the manifest of {rel:?}"))?;
        Ok(Some(root))
    }
}

/// Entries left out of a manifest: path and why.
type Skipped = Vec<(String, String)>;

/// A directory's names a manifest can carry, sorted, and those it cannot (with why).
fn list_names(abs: &Path, rel: &str) -> Result<(Vec<String>, Skipped)> {
    let (mut names, mut skipped) = (Vec::new(), Vec::new());
    for item in std::fs::read_dir(abs).with_context(|| format!("listing {}", abs.display()))? {
        let item = item.with_context(|| format!("listing {}", abs.display()))?;
        match item.file_name().into_string() {
            Ok(name) if validate_name(&name).is_ok() => names.push(name),
            Ok(name) => skipped.push((join(rel, &name), "name is not allowed in a manifest".into())),
            Err(name) => skipped.push((join(rel, &name.to_string_lossy()), "name is not UTF-8".into())),
        }
    }
    names.sort_unstable();
    Ok((names, skipped))
}

/// Whether the entry at `path` is as `lstat` saw it (`meta`): a file or symlink by size, times, inode and device; a
/// directory by inode and device only (its times change with what is written inside it, which its own read covers).
fn unchanged(path: &Path, meta: &Metadata) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(now) if meta.is_dir() => now.is_dir() && now.ino() == meta.ino() && now.dev() == meta.dev(),
        Ok(now) => now.file_type() == meta.file_type() && CachedFile::of(meta, Vec::new()).same_file(&now),
        Err(_) => false,
    }
}

/// Hashes every chunk of `files` in parallel; returns each file's chunk ids in order, or `None` if a file went away
/// or was cut short while it was read (the directory is read again).
fn hash_files(files: &[Pending], bar: &ProgressBar) -> Result<Option<Vec<Vec<ChunkId>>>> {
    let units: Vec<(usize, u64)> =
        files.iter().enumerate().flat_map(|(i, f)| (0..chunk_count(f.meta.len())).map(move |c| (i, c))).collect();
    let ids: Vec<std::io::Result<ChunkId>> = units
        .par_iter()
        .map_init(
            || vec![0u8; CHUNK_SIZE as usize],
            |buf, &(i, c)| {
                let file = &files[i];
                let (offset, len) = chunk_range(file.meta.len(), c)
                    .ok_or_else(|| std::io::Error::other("chunk past the end of the file"))?;
                let buf = &mut buf[..len as usize];
                File::open(&file.abs).and_then(|f| f.read_exact_at(buf, offset))?;
                bar.inc(len);
                Ok(ChunkId::of(buf))
            },
        )
        .collect();

    let mut out: Vec<Vec<ChunkId>> =
        files.iter().map(|f| Vec::with_capacity(chunk_count(f.meta.len()) as usize)).collect();
    for ((i, _), id) in units.iter().zip(ids) {
        match id {
            Ok(id) => out[*i].push(id),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof) => {
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", files[*i].abs.display())),
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use mirrormesh_proto::diff::diff;

    use super::*;
    use crate::store::StateStore;

    fn write(root: &Path, path: &str, bytes: &[u8]) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Scans `root` whole with `hook` between each directory's read and its second look.
    fn scan_with(store: &StateStore, root: &Path, previous: Option<NodeHash>, hook: BetweenLooks) -> Result<Scan> {
        let mut writer = store.writer()?;
        let mut scanner = Scanner {
            writer: &mut writer,
            exclude: &[],
            scope: None,
            previous_root: previous,
            stats: ScanStats::default(),
            bar: ProgressBar::hidden(),
            between_looks: Some(hook),
        };
        let hash = scanner.dir(root, "", None)?;
        let stats = scanner.stats;
        writer.commit()?;
        Ok(Scan { root: hash, stats })
    }

    /// Every file of the manifest at `root`, by path, with its chunk ids.
    fn files(store: &StateStore, root: NodeHash) -> BTreeMap<String, Vec<ChunkId>> {
        let reader = store.reader().unwrap();
        let (changes, _) = diff(&reader, None, &root).unwrap();
        changes
            .into_iter()
            .filter_map(|c| match c.new?.kind {
                EntryKind::File(meta) => Some((c.path, meta.chunks)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_directory_that_changes_between_its_read_and_its_second_look_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        write(&tree, "repo/x86_64/APKINDEX", b"a-1.apk\n");
        write(&tree, "repo/x86_64/a-1.apk", b"one");
        let store = StateStore::open(&dir.path().join("state")).unwrap();
        // The builder replaces the index and adds a package while the first read of the directory is under way.
        let builder_tree = tree.clone();
        let hook = Box::new(move |rel: &str, attempt: u32| {
            if rel == "repo/x86_64" && attempt == 1 {
                write(&builder_tree, "repo/x86_64/b-1.apk", b"two");
                write(&builder_tree, "repo/x86_64/APKINDEX", b"a-1.apk\nb-1.apk\n");
            }
        });
        let scan = scan_with(&store, &tree, None, hook).unwrap();
        assert_eq!(scan.stats.dirs_reread, 1, "{:?}", scan.stats);
        let files = files(&store, scan.root);
        // The second read's state, whole: the new index with the package it names.
        assert_eq!(files["repo/x86_64/APKINDEX"], vec![ChunkId::of(b"a-1.apk\nb-1.apk\n")]);
        assert!(files.contains_key("repo/x86_64/b-1.apk"), "{files:?}");
    }

    #[test]
    fn a_directory_that_changes_during_every_read_keeps_its_previous_content_or_fails_the_first_scan_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        write(&tree, "repo/APKINDEX", b"0");
        write(&tree, "other/APKINDEX", b"1");
        let store = StateStore::open(&dir.path().join("state")).unwrap();
        let builder = |tree: PathBuf| -> BetweenLooks {
            Box::new(move |rel: &str, attempt: u32| {
                if rel == "repo" {
                    write(&tree, "repo/APKINDEX", &[b'0'; 40][..attempt as usize + 1]);
                }
            })
        };
        // No previous snapshot to fall back on: the scan fails, and says why.
        let err = format!("{:#}", scan_with(&store, &tree, None, builder(tree.clone())).err().expect("it gives up"));
        assert!(err.contains("changed during each of 5 reads"), "{err}");

        // With one, the busy directory is published as it was; the rest as it is now.
        let quiet = scan_with(&store, &tree, None, Box::new(|_: &str, _: u32| {})).unwrap();
        write(&tree, "other/APKINDEX", b"2");
        let scan = scan_with(&store, &tree, Some(quiet.root), builder(tree.clone())).unwrap();
        assert_eq!(scan.stats.dirs_kept_busy, 1, "{:?}", scan.stats);
        let files = files(&store, scan.root);
        assert_eq!(files["repo/APKINDEX"], vec![ChunkId::of(&[b'0'; 6])]);
        assert_eq!(files["other/APKINDEX"], vec![ChunkId::of(b"2")]);
    }

    /// A builder keeps writing packages and indexes (package first, index next, the old package last, as Alpine's
    /// upload does) into four directories, as fast as it can, while the tree is scanned again and again: every scan
    /// succeeds, and its manifest has, in every directory, an index naming only files that the manifest has there
    /// too.
    #[test]
    fn scans_during_continuous_writes_capture_every_index_with_the_packages_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let dirs = ["v1/main/x86_64", "v1/main/aarch64", "v2/main/x86_64", "v2/community/x86_64"];
        // Every index content ever written, by its chunk id.
        let indexes: Arc<Mutex<HashMap<ChunkId, String>>> = Arc::default();
        let write_index = |tree: &Path, d: &str, names: &[String], indexes: &Mutex<HashMap<ChunkId, String>>| {
            let text: String = names.iter().map(|n| format!("{n}\n")).collect();
            indexes.lock().unwrap().insert(ChunkId::of(text.as_bytes()), text.clone());
            let tmp = tree.join(d).join(".APKINDEX.tmp");
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(tmp, tree.join(d).join("APKINDEX")).unwrap();
        };
        let mut current: Vec<Vec<String>> = Vec::new();
        for d in dirs {
            let names: Vec<String> = (0..8).map(|p| format!("pkg{p}-0.apk")).collect();
            for n in &names {
                write(&tree, &format!("{d}/{n}"), n.as_bytes());
            }
            write_index(&tree, d, &names, &indexes);
            current.push(names);
        }
        // The first snapshot, of the quiet tree.
        let store = StateStore::open(&dir.path().join("state")).unwrap();
        let mut writer = store.writer().unwrap();
        let mut previous = scan(&tree, &mut writer, false, &[], None, None).unwrap().root;
        writer.commit().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let builder = {
            let (tree, stop, indexes) = (tree.clone(), stop.clone(), indexes.clone());
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let d = (round % dirs.len() as u64) as usize;
                    let p = (round / dirs.len() as u64 % 8) as usize;
                    let old = current[d][p].clone();
                    let new = format!("pkg{p}-{round}.apk");
                    write(&tree, &format!("{}/{new}", dirs[d]), new.repeat(50).as_bytes());
                    current[d][p] = new;
                    write_index(&tree, dirs[d], &current[d], &indexes);
                    std::fs::remove_file(tree.join(dirs[d]).join(old)).unwrap();
                }
                round
            })
        };
        let mut scans = 0;
        let (mut rereads, mut kept) = (0, 0);
        while scans < 40 {
            let mut writer = store.writer().unwrap();
            let scan = scan(&tree, &mut writer, false, &[], Some(previous), None).unwrap();
            writer.commit().unwrap();
            previous = scan.root;
            scans += 1;
            rereads += scan.stats.dirs_reread;
            kept += scan.stats.dirs_kept_busy;
            let files = files(&store, scan.root);
            let known = indexes.lock().unwrap().clone();
            for d in dirs {
                let index = &files[&format!("{d}/APKINDEX")];
                let text = &known[&index[0]];
                for name in text.lines() {
                    assert!(
                        files.contains_key(&format!("{d}/{name}")),
                        "scan {scans}: {d}'s index names {name}, not in the manifest"
                    );
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let rounds = builder.join().unwrap();
        println!(
            "{scans} scans during {rounds} builder rounds; {rereads} directories read again, {kept} kept as before"
        );
        assert!(rounds > 0);
    }
}
