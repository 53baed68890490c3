//! Staging: where the new and changed files of a snapshot are assembled and verified before they are applied.
//!
//! The staging directory sits on the same filesystem as the served tree (so applying a file is an atomic rename)
//! but outside it (so nginx and rsyncd never see a partial file). A staged file is named by its content,
//! `objects/<blake3 of size and chunk ids>`: the same content is staged once whatever its path, and staging is
//! resumable without bookkeeping, because preparing a snapshot re-verifies whatever is already there, chunk by chunk,
//! against the manifest's hashes. A chunk written before a crash is found again; a torn one is fetched again.
//!
//! Chunks are taken locally before they are fetched: from a staged copy, from the served tree (any file of the
//! applied snapshot that holds the chunk, per the chunk index), or from the file already at the destination path
//! (a crash after it was renamed into place). Every local chunk is verified before it is used.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use mirrormesh_proto::chunk::{CHUNK_SIZE, ChunkId, chunk_range};
use mirrormesh_proto::entry::FileMeta;
use mirrormesh_proto::sync::StageFile;

use crate::chunk_index::ChunkIndex;

/// Name of a staged file: blake3 of its size and chunk ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey(pub [u8; 32]);

impl FileKey {
    pub fn of(meta: &FileMeta) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("mirrormesh staged file key v1");
        hasher.update(&meta.size.to_le_bytes());
        for id in &meta.chunks {
            hasher.update(&id.0);
        }
        Self(*hasher.finalize().as_bytes())
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The files of the snapshot being staged.
pub struct StagePlan {
    pub seq: u64,
    /// Destination path -> (content, metadata), in path order.
    pub paths: BTreeMap<String, (FileKey, FileMeta)>,
    /// Where each chunk goes: (staged file, offset, length).
    targets: HashMap<ChunkId, Vec<(FileKey, u64, u64)>>,
}

impl StagePlan {
    fn new(seq: u64, files: &[StageFile]) -> Self {
        let mut paths = BTreeMap::new();
        let mut targets: HashMap<ChunkId, Vec<(FileKey, u64, u64)>> = HashMap::new();
        let mut keys = HashSet::new();
        for file in files {
            let key = FileKey::of(&file.meta);
            paths.insert(file.path.clone(), (key, file.meta.clone()));
            if keys.insert(key) {
                for (i, id) in file.meta.chunks.iter().enumerate() {
                    if let Some((offset, len)) = chunk_range(file.meta.size, i as u64) {
                        targets.entry(*id).or_default().push((key, offset, len));
                    }
                }
            }
        }
        Self { seq, paths, targets }
    }

    /// Distinct staged files with their metadata.
    pub fn files(&self) -> BTreeMap<FileKey, &FileMeta> {
        self.paths.values().map(|(k, m)| (*k, m)).collect()
    }
}

pub struct Staging {
    dir: PathBuf,
    tree: PathBuf,
    plan: RwLock<Option<Arc<StagePlan>>>,
    /// Chunks of the plan verified in staging.
    present: Mutex<HashSet<ChunkId>>,
    /// Chunks being written now (locked before `present` when both are), and the signal that one finished: a
    /// second copy waits for the first, so nothing is written into a file once its chunks are all present (the
    /// apply may be setting its mtime or renaming it).
    writing: Mutex<HashSet<ChunkId>>,
    written: Condvar,
}

/// What preparing found.
#[derive(Debug, Default)]
pub struct Prepared {
    pub held: Vec<ChunkId>,
    /// Chunks already staged by an earlier run and verified again.
    pub resumed: usize,
    /// Chunks copied from the served tree.
    pub copied: usize,
}

impl Staging {
    /// Opens the staging directory `dir` for the tree `tree` (creating both if needed) and checks that they share a
    /// filesystem.
    pub fn open(dir: &Path, tree: &Path) -> Result<Self> {
        std::fs::create_dir_all(tree).with_context(|| format!("creating tree {}", tree.display()))?;
        std::fs::create_dir_all(dir.join("objects")).with_context(|| format!("creating staging {}", dir.display()))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).with_context(|| format!("stat {}", p.display()));
        if dev(dir)? != dev(tree)? {
            bail!(
                "staging directory {} is not on the same filesystem as the tree {}: files could not be renamed into \
                 place atomically (set repo.staging_dir beside the tree)",
                dir.display(),
                tree.display()
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
            tree: tree.to_owned(),
            plan: RwLock::new(None),
            present: Mutex::new(HashSet::new()),
            writing: Mutex::new(HashSet::new()),
            written: Condvar::new(),
        })
    }

    pub fn tree(&self) -> &Path {
        &self.tree
    }

    pub fn object_path(&self, key: &FileKey) -> PathBuf {
        self.dir.join("objects").join(key.hex())
    }

    /// A fresh path for a temporary file inside the staging directory.
    pub fn tmp_path(&self, name: &str) -> PathBuf {
        self.dir.join("tmp").join(name)
    }

    pub fn plan(&self) -> Option<Arc<StagePlan>> {
        self.plan.read().ok().and_then(|p| p.clone())
    }

    /// Sets up staging for snapshot `seq` and returns the chunks already held (blocking: reads and hashes).
    pub fn prepare(&self, seq: u64, files: &[StageFile], index: &ChunkIndex) -> Result<Prepared> {
        let plan = Arc::new(StagePlan::new(seq, files));
        let mut out = Prepared::default();
        let mut fresh = HashSet::new();
        for (key, meta) in plan.files() {
            let path = self.object_path(&key);
            let existed = path.exists();
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("creating staged file {}", path.display()))?;
            if file.metadata()?.len() != meta.size {
                file.set_len(meta.size).with_context(|| format!("sizing staged file {}", path.display()))?;
            }
            if !existed {
                fresh.insert(key);
            }
        }
        // Local sources besides the index: the destination paths themselves (a file already renamed into place).
        let mut at_destination: HashMap<ChunkId, Vec<(PathBuf, u64, u64)>> = HashMap::new();
        for (path, (_, meta)) in &plan.paths {
            let full = self.tree.join(path);
            if std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_file() && m.len() == meta.size) {
                for (i, id) in meta.chunks.iter().enumerate() {
                    if let Some((offset, len)) = chunk_range(meta.size, i as u64) {
                        at_destination.entry(*id).or_default().push((full.clone(), offset, len));
                    }
                }
            }
        }

        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut present = HashSet::new();
        let mut ids: Vec<&ChunkId> = plan.targets.keys().collect();
        ids.sort();
        for id in ids {
            let targets = &plan.targets[id];
            let mut missing = Vec::new();
            let mut good: Option<(PathBuf, u64, u64)> = None;
            for (key, offset, len) in targets {
                let path = self.object_path(key);
                if !fresh.contains(key) && read_verified(&path, *offset, *len, id, &mut buf)? {
                    out.resumed += 1;
                    good.get_or_insert((path, *offset, *len));
                } else {
                    missing.push((path, *offset));
                }
            }
            if good.is_none() {
                let from_tree = index.locations(id).iter().filter_map(|loc| {
                    let (offset, len) = chunk_range(loc.file_size, u64::from(loc.index))?;
                    Some((self.tree.join(&*loc.path), offset, len))
                });
                let from_destination = at_destination.get(id).into_iter().flatten().cloned();
                for (path, offset, len) in from_tree.chain(from_destination) {
                    if read_verified(&path, offset, len, id, &mut buf)? {
                        out.copied += 1;
                        good = Some((path, offset, len));
                        break;
                    }
                }
            }
            let Some((src, offset, len)) = good else { continue };
            if !missing.is_empty() {
                let data = &mut buf[..len as usize];
                File::open(&src)
                    .and_then(|f| f.read_exact_at(data, offset))
                    .with_context(|| format!("reading {}", src.display()))?;
                for (path, at) in &missing {
                    write_at(path, *at, data)?;
                }
            }
            present.insert(*id);
            out.held.push(*id);
        }
        *self.present.lock().map_err(|_| anyhow::anyhow!("staging lock poisoned"))? = present;
        *self.plan.write().map_err(|_| anyhow::anyhow!("staging lock poisoned"))? = Some(plan);
        Ok(out)
    }

    /// Writes a verified chunk into every staged file that needs it (blocking); false if none needed it.
    pub fn write_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        // A chunk arriving after its snapshot was staged whole (a second copy from the endgame, or one that
        // outlived its sync) is not needed: nothing to write, and the staged files may already be in the tree.
        let Some(plan) = self.plan() else { return Ok(false) };
        let Some(targets) = plan.targets.get(id) else { return Ok(false) };
        let poisoned = |_| anyhow::anyhow!("staging lock poisoned");
        {
            let mut writing = self.writing.lock().map_err(poisoned)?;
            loop {
                // Under the writing lock, which `finish` takes too: a plan applied and forgotten since it was read
                // above needs nothing (its staged files are gone, and `present` no longer lists what it held).
                let current = self.plan().is_some_and(|p| Arc::ptr_eq(&p, &plan));
                if !current || self.present.lock().map_err(poisoned)?.contains(id) {
                    return Ok(false);
                }
                if writing.insert(*id) {
                    break;
                }
                writing = self.written.wait(writing).map_err(poisoned)?;
            }
        }
        let result = targets.iter().try_for_each(|(key, offset, len)| {
            if *len != bytes.len() as u64 {
                bail!("chunk {id} is {} bytes, expected {len}", bytes.len());
            }
            write_at(&self.object_path(key), *offset, bytes)
        });
        let mut writing = self.writing.lock().map_err(poisoned)?;
        if result.is_ok() {
            self.present.lock().map_err(poisoned)?.insert(*id);
        }
        writing.remove(id);
        self.written.notify_all();
        result.map(|()| true)
    }

    /// A verified staged chunk, for serving peers (blocking).
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let held = self.present.lock().map_err(|_| anyhow::anyhow!("staging lock poisoned"))?.contains(id);
        let Some(plan) = self.plan().filter(|_| held) else { return Ok(None) };
        let Some(&(key, offset, len)) = plan.targets.get(id).and_then(|t| t.first()) else { return Ok(None) };
        let mut buf = vec![0u8; len as usize];
        if read_verified(&self.object_path(&key), offset, len, id, &mut buf)? {
            return Ok(Some(buf));
        }
        // While a snapshot is applied, staged files move to their destination: look there too.
        for (path, (k, _)) in &plan.paths {
            if *k == key && read_verified(&self.tree.join(path), offset, len, id, &mut buf)? {
                return Ok(Some(buf));
            }
        }
        Ok(None)
    }

    /// Forgets the plan once it was applied and removes staged files no longer needed.
    pub fn finish(&self) -> Result<()> {
        fn poisoned<T>(_: std::sync::PoisonError<T>) -> anyhow::Error {
            anyhow::anyhow!("staging lock poisoned")
        }
        {
            // Not while a chunk is being written, and a write starting later sees the plan gone.
            let mut writing = self.writing.lock().map_err(poisoned)?;
            while !writing.is_empty() {
                writing = self.written.wait(writing).map_err(poisoned)?;
            }
            *self.plan.write().map_err(poisoned)? = None;
            self.present.lock().map_err(poisoned)?.clear();
        }
        for dir in ["objects", "tmp"] {
            for entry in std::fs::read_dir(self.dir.join(dir))? {
                let path = entry?.path();
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// Reads `len` bytes at `offset` of `path` into `buf` and checks they hash to `id`. A missing or short file is
/// "not verified", not an error.
fn read_verified(path: &Path, offset: u64, len: u64, id: &ChunkId, buf: &mut [u8]) -> Result<bool> {
    let data = &mut buf[..len as usize];
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    match file.read_exact_at(data, offset) {
        Ok(()) => Ok(ChunkId::of(data) == *id),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Alignment of offsets, lengths and buffers for a write that bypasses the page cache.
const DIRECT_ALIGN: usize = 4096;

/// Writes `data` at `offset` of `path`. Whole aligned chunks (every chunk but a file's last) bypass the page cache
/// (`O_DIRECT`): the apply must flush every staged file to disk before it is renamed into place anyway, and on this
/// path the data goes there straight from one aligned copy, without being copied into the page cache first and
/// written back later. Where the filesystem refuses direct writes, and for the unaligned tail, the write is buffered
/// and its writeback started at once, so the apply's flush finds the pages already on their way.
fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let context = || format!("writing staged file {}", path.display());
    if offset.is_multiple_of(DIRECT_ALIGN as u64) && data.len().is_multiple_of(DIRECT_ALIGN) && !data.is_empty() {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(file) = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
            // An aligned copy: a buffer with room to start at the next aligned address, zeroed only up to it.
            let mut buf: Vec<u8> = Vec::with_capacity(data.len() + DIRECT_ALIGN);
            buf.resize(buf.as_ptr().align_offset(DIRECT_ALIGN), 0);
            let skip = buf.len();
            buf.extend_from_slice(data);
            match file.write_all_at(&buf[skip..], offset) {
                Ok(()) => return Ok(()),
                // Not supported here after all (some filesystems accept the flag but not the write).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e).with_context(context),
            }
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(data, offset).map(|()| f))
        .with_context(context)?;
    start_writeback(&file, offset, data.len() as u64);
    Ok(())
}

/// Asks the kernel to start writing back a range of `file` without waiting for it (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). Only a hint: the apply's flush is what makes the file durable, so a failure is ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: the descriptor is open for the whole call and the call touches no memory of this process.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(len: usize, seed: u8) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len);
        crate::gentree::content::write_content(&[seed; 32], len as u64, &mut bytes).unwrap();
        bytes
    }

    fn stage_file(path: &str, bytes: &[u8]) -> StageFile {
        let chunks = (0..)
            .map_while(|i| chunk_range(bytes.len() as u64, i))
            .map(|(offset, len)| ChunkId::of(&bytes[offset as usize..(offset + len) as usize]))
            .collect();
        StageFile { path: path.into(), meta: FileMeta { mode: 0o644, size: bytes.len() as u64, mtime: 0, chunks } }
    }

    #[test]
    fn whole_chunks_and_unaligned_tails_land_byte_exact_in_every_staged_file() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(&dir.path().join("staging"), &dir.path().join("tree")).unwrap();
        let chunk = CHUNK_SIZE as usize;
        // Two whole chunks (written around the page cache where the filesystem allows) and a tail that is not a
        // multiple of the alignment (always buffered); the second file shares the first chunk at the same offset
        // and has a one-byte tail.
        let a = content(2 * chunk + 4097, 1);
        let mut b = a[..chunk].to_vec();
        b.push(7);
        let files = [stage_file("a.apk", &a), stage_file("b.apk", &b)];
        staging.prepare(1, &files, &ChunkIndex::default()).unwrap();
        let mut pieces: Vec<(u64, u64, &[u8])> = Vec::new();
        for bytes in [&a, &b] {
            for (offset, len) in (0..).map_while(|i| chunk_range(bytes.len() as u64, i)) {
                pieces.push((offset, len, &bytes[offset as usize..(offset + len) as usize]));
            }
        }
        // Last piece first: the order chunks arrive in is arbitrary.
        for (_, _, piece) in pieces.iter().rev() {
            staging.write_chunk(&ChunkId::of(piece), piece).unwrap();
        }
        for (file, bytes) in files.iter().zip([&a, &b]) {
            let staged = std::fs::read(staging.object_path(&FileKey::of(&file.meta))).unwrap();
            assert!(staged == **bytes, "{} staged wrong ({} bytes, want {})", file.path, staged.len(), bytes.len());
        }
        for (_, _, piece) in pieces {
            assert_eq!(staging.read_chunk(&ChunkId::of(piece)).unwrap().as_deref(), Some(piece));
        }
    }
}
