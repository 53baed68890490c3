//! Scanning a served tree into a manifest, one directory at a time.
//!
//! The walk is depth-first: a directory is listed, its subdirectories are scanned first (each yields its root
//! hash), its files are hashed, and its node tree is built and written at once; only the directory being built is
//! in memory, never the whole tree. Every file is `lstat`ed; a file whose size, mtime, ctime, inode and device
//! match the scan cache reuses the chunk ids cached for it, everything else is read and hashed, one 1 MiB chunk per
//! task across all cores. A file that changes while it is being hashed fails the scan (publish when the tree is
//! quiet). Entries a manifest cannot carry (non-UTF-8 or forbidden names, sockets, devices, symlinks leaving the
//! tree, files over `FILE_SIZE_MAX`) are skipped, logged and counted, before anything is hashed. Modes are
//! published through `served_mode` (no setuid, setgid or sticky bit, no group or other write). Paths given as
//! `exclude` (the node's own downstream files, `downstream.rs`) are left out silently.

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
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::path::{check_symlink_within, depth, join, validate_name};
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

#[derive(Clone, Debug, Default)]
pub struct ScanStats {
    pub files: u64,
    pub bytes: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Entries left out of the manifest (see the module doc).
    pub skipped: u64,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    pub cached_files: u64,
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

struct Scanner<'a> {
    writer: &'a mut StoreWriter,
    exclude: &'a [String],
    stats: ScanStats,
    bar: ProgressBar,
}

/// Scans the tree at `root`, writing its manifest nodes and scan-cache entries into `writer`; the paths in `exclude`
/// (relative to `root`) are left out.
pub fn scan(root: &Path, writer: &mut StoreWriter, progress: bool, exclude: &[String]) -> Result<Scan> {
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
    let mut scanner = Scanner { writer, exclude, stats: ScanStats::default(), bar };
    let root = scanner.dir(root, "")?;
    scanner.bar.finish_and_clear();
    let mut stats = scanner.stats;
    stats.elapsed = started.elapsed();
    Ok(Scan { root, stats })
}

impl Scanner<'_> {
    /// Scans one directory (subdirectories first), builds its nodes and returns its root.
    fn dir(&mut self, abs: &Path, rel: &str) -> Result<NodeHash> {
        let mut names = Vec::new();
        for item in std::fs::read_dir(abs).with_context(|| format!("listing {}", abs.display()))? {
            let item = item.with_context(|| format!("listing {}", abs.display()))?;
            match item.file_name().into_string() {
                Ok(name) if validate_name(&name).is_ok() => names.push(name),
                Ok(name) => self.skip(&join(rel, &name), "name is not allowed in a manifest"),
                Err(name) => self.skip(&join(rel, &name.to_string_lossy()), "name is not UTF-8"),
            }
        }
        names.sort_unstable();

        let mut entries = Vec::with_capacity(names.len());
        let mut pending = Vec::new();
        for name in names {
            let path = join(rel, &name);
            if self.exclude.contains(&path) {
                tracing::debug!(path, "left out of the manifest: this node's own downstream file");
                continue;
            }
            let child = abs.join(&name);
            let meta = std::fs::symlink_metadata(&child).with_context(|| format!("stat {}", child.display()))?;
            let kind = if meta.is_dir() {
                let root = self.dir(&child, &path)?;
                self.stats.dirs += 1;
                EntryKind::Dir { mode: served_mode(meta.mode()), root }
            } else if meta.is_symlink() {
                let target = std::fs::read_link(&child).with_context(|| format!("readlink {}", child.display()))?;
                let Some(target) = target.to_str().map(str::to_owned) else {
                    self.skip(&path, "symlink target is not UTF-8");
                    continue;
                };
                if let Err(e) = check_symlink_within(depth(rel), &target) {
                    self.skip(&path, &format!("symlink target {target:?}: {e}"));
                    continue;
                }
                self.stats.symlinks += 1;
                EntryKind::Symlink { target }
            } else if meta.is_file() && meta.len() > FILE_SIZE_MAX {
                self.skip(&path, &format!("{} bytes, over the limit of {FILE_SIZE_MAX}", meta.len()));
                continue;
            } else if meta.is_file() {
                self.stats.files += 1;
                self.stats.bytes += meta.len();
                let cached = self
                    .writer
                    .scan_entry(&path)?
                    .and_then(|bytes| postcard::from_bytes::<CachedFile>(&bytes).ok())
                    .filter(|c| c.same_file(&meta) && c.chunks.len() as u64 == chunk_count(c.size));
                let chunks = match cached {
                    Some(c) => {
                        self.stats.cached_files += 1;
                        c.chunks
                    }
                    None => {
                        pending.push(Pending { index: entries.len(), abs: child, meta: meta.clone() });
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
                self.skip(&path, "not a regular file, directory or symlink");
                continue;
            };
            entries.push(Entry { name, kind });
        }

        if !pending.is_empty() {
            let started = Instant::now();
            let hashed = hash_files(&pending, &self.bar)?;
            self.stats.hash_elapsed += started.elapsed();
            for (file, chunks) in pending.iter().zip(hashed) {
                let entry = &mut entries[file.index];
                let path = join(rel, &entry.name);
                self.writer
                    .put_scan_entry(&path, &postcard::to_allocvec(&CachedFile::of(&file.meta, chunks.clone()))?)?;
                if let EntryKind::File(meta) = &mut entry.kind {
                    meta.chunks = chunks;
                }
                self.stats.hashed_files += 1;
                self.stats.hashed_bytes += file.meta.len();
            }
        }
        let root = build_dir(&entries, self.writer).with_context(|| format!("building the manifest of {rel:?}"))?;
        Ok(root)
    }

    fn skip(&mut self, path: &str, why: &str) {
        self.stats.skipped += 1;
        tracing::warn!(path, why, "left out of the manifest");
    }
}

/// Hashes every chunk of `files` in parallel; returns each file's chunk ids in order.
fn hash_files(files: &[Pending], bar: &ProgressBar) -> Result<Vec<Vec<ChunkId>>> {
    let units: Vec<(usize, u64)> =
        files.iter().enumerate().flat_map(|(i, f)| (0..chunk_count(f.meta.len())).map(move |c| (i, c))).collect();
    let ids: Vec<Result<ChunkId>> = units
        .par_iter()
        .map_init(
            || vec![0u8; CHUNK_SIZE as usize],
            |buf, &(i, c)| {
                let file = &files[i];
                let (offset, len) = chunk_range(file.meta.len(), c).context("chunk past the end of the file")?;
                let buf = &mut buf[..len as usize];
                File::open(&file.abs)
                    .and_then(|f| f.read_exact_at(buf, offset))
                    .with_context(|| format!("reading {}", file.abs.display()))?;
                bar.inc(len);
                Ok(ChunkId::of(buf))
            },
        )
        .collect();

    let mut out: Vec<Vec<ChunkId>> =
        files.iter().map(|f| Vec::with_capacity(chunk_count(f.meta.len()) as usize)).collect();
    for ((i, _), id) in units.iter().zip(ids) {
        out[*i].push(id?);
    }
    for file in files {
        let now = std::fs::symlink_metadata(&file.abs).with_context(|| format!("stat {}", file.abs.display()))?;
        if !CachedFile::of(&file.meta, Vec::new()).same_file(&now) {
            bail!("{} changed while it was being hashed; publish again once the tree is quiet", file.abs.display());
        }
    }
    Ok(out)
}
