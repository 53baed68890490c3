//! Package file content: derived from `(seed, name, version)` only, generated as a stream, written in parallel.
//!
//! A package's bytes are the first `S:` bytes of the blake3 extendable output (XOF) keyed with
//! [`content_key`]`(seed, name, version)`, so the same package always gets the same bytes, whichever subset or
//! order it is generated in, and files can be produced block by block ([`BLOCK_BYTES`]) without holding a file in
//! memory. blake3's XOF runs at several GB/s per core, faster than the disk.
//!
//! Files are written to a hidden temporary name in the target directory, given their modification time, then
//! renamed into place, so a file under its final name is always complete. A file that already exists with the right
//! size is compared with the expected content first and left in place (only its mtime fixed) when it matches.

use std::fs;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use super::layout::temp_path_for;

/// Size of the blocks content is generated, written and compared in.
pub const BLOCK_BYTES: usize = 1 << 20;

/// blake3 key-derivation context for package content keys.
const CONTENT_CONTEXT: &str = "mirrormesh gen-tree 2025 package content v1";

/// blake3 key-derivation context for the synthetic `C:` checksums.
const CHECKSUM_CONTEXT: &str = "mirrormesh gen-tree 2025 synthetic control checksum v1";

/// Bytes of a real `C:` checksum (a SHA-1 digest, written as `Q1` + base64).
const CHECKSUM_BYTES: usize = 20;

/// Progress bar layout.
const PROGRESS_TEMPLATE: &str =
    "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta})";

/// The key a package's content is derived from: blake3 key derivation over the seed and the length-prefixed name
/// and version.
pub fn content_key(seed: u64, name: &str, version: &str) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(CONTENT_CONTEXT);
    hasher.update(&seed.to_le_bytes());
    for part in [name, version] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    *hasher.finalize().as_bytes()
}

/// The content stream of a package: read `size` bytes from it.
fn content_stream(key: &[u8; 32]) -> blake3::OutputReader {
    blake3::Hasher::new_keyed(key).finalize_xof()
}

/// Writes the first `size` bytes of a package's content into `out` (for tests and tools; generation streams).
pub fn write_content(key: &[u8; 32], size: u64, out: &mut impl Write) -> io::Result<()> {
    let mut stream = content_stream(key);
    let mut block = vec![0u8; BLOCK_BYTES];
    let mut remaining = size;
    while remaining > 0 {
        let n = block_len(remaining);
        stream.fill(&mut block[..n]);
        out.write_all(&block[..n])?;
        remaining -= n as u64;
    }
    Ok(())
}

/// A stand-in for a stanza's `C:` field, derived from the content key: `Q1` + base64 of 20 bytes, the shape of a
/// real one. (A real `C:` is the SHA-1 of the package's control segment, which synthetic content does not have.)
pub fn synthetic_checksum(key: &[u8; 32]) -> String {
    let digest = blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT).update(key).finalize();
    format!("Q1{}", base64(&digest.as_bytes()[..CHECKSUM_BYTES]))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `secs` after the unix epoch.
pub fn unix_time(secs: u64) -> Result<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)).ok_or_else(|| anyhow!("time {secs} is out of range"))
}

/// One package file to place.
#[derive(Debug, Clone)]
pub struct FileJob {
    /// Final path of the file.
    pub path: PathBuf,
    /// Content key ([`content_key`]).
    pub key: [u8; 32],
    /// Size in bytes.
    pub size: u64,
    /// Modification time, unix seconds.
    pub mtime: u64,
}

/// What placing the files did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Files written (new, or existing with other content).
    pub written: usize,
    /// Files that already had the right content (mtime fixed if needed).
    pub unchanged: usize,
    /// Bytes written to files.
    pub bytes_written: u64,
}

/// Whether a file was written or found correct.
enum Outcome {
    Written,
    Unchanged,
}

/// Places every file: writes it unless it already exists with exactly the expected content. Runs on rayon's
/// pool, largest files first so that they do not end up alone at the end; advances `progress` by each file's size.
pub fn place_files(jobs: &[FileJob], progress: &ProgressBar) -> Result<WriteStats> {
    let mut order: Vec<&FileJob> = jobs.iter().collect();
    order.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
    let outcomes = order
        .par_iter()
        .map_init(Buffers::new, |buffers, job| place_file(job, buffers, progress).map(|outcome| (outcome, job.size)))
        .collect::<Result<Vec<_>>>()?;
    let mut stats = WriteStats::default();
    for (outcome, size) in outcomes {
        match outcome {
            Outcome::Written => {
                stats.written += 1;
                stats.bytes_written += size;
            }
            Outcome::Unchanged => stats.unchanged += 1,
        }
    }
    Ok(stats)
}

/// Per-thread block buffers: expected content and existing file content.
struct Buffers {
    expected: Vec<u8>,
    existing: Vec<u8>,
}

impl Buffers {
    fn new() -> Self {
        Self { expected: vec![0; BLOCK_BYTES], existing: vec![0; BLOCK_BYTES] }
    }
}

fn block_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(BLOCK_BYTES, |r| r.min(BLOCK_BYTES))
}

fn place_file(job: &FileJob, buffers: &mut Buffers, progress: &ProgressBar) -> Result<Outcome> {
    let mtime = unix_time(job.mtime).with_context(|| format!("bad modification time for {}", job.path.display()))?;
    match fs::symlink_metadata(&job.path) {
        Ok(meta) if meta.is_file() && meta.len() == job.size => {
            if has_content(&job.path, &job.key, job.size, buffers)? {
                if meta.modified().ok() != Some(mtime) {
                    let file = fs::OpenOptions::new()
                        .write(true)
                        .open(&job.path)
                        .with_context(|| format!("cannot open {}", job.path.display()))?;
                    file.set_modified(mtime)
                        .with_context(|| format!("cannot set the mtime of {}", job.path.display()))?;
                }
                progress.inc(job.size);
                return Ok(Outcome::Unchanged);
            }
        }
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("cannot inspect {}", job.path.display())),
    }
    write_file(job, mtime, buffers, progress)?;
    Ok(Outcome::Written)
}

/// Whether the file at `path` (known to be `size` bytes long) holds exactly the content of `key`.
fn has_content(path: &Path, key: &[u8; 32], size: u64, buffers: &mut Buffers) -> Result<bool> {
    let mut file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut stream = content_stream(key);
    let mut remaining = size;
    while remaining > 0 {
        let n = block_len(remaining);
        stream.fill(&mut buffers.expected[..n]);
        match file.read_exact(&mut buffers.existing[..n]) {
            Ok(()) => {}
            // The file shrank since its size was checked: it does not hold the content.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        }
        if buffers.expected[..n] != buffers.existing[..n] {
            return Ok(false);
        }
        remaining -= n as u64;
    }
    Ok(true)
}

/// Writes the file to its temporary name, sets its mtime, renames it into place.
fn write_file(job: &FileJob, mtime: SystemTime, buffers: &mut Buffers, progress: &ProgressBar) -> Result<()> {
    let temp = temp_path_for(&job.path);
    let context = || format!("cannot write {}", temp.display());
    let mut file = fs::File::create(&temp).with_context(context)?;
    let mut stream = content_stream(&job.key);
    let mut remaining = job.size;
    while remaining > 0 {
        let n = block_len(remaining);
        stream.fill(&mut buffers.expected[..n]);
        file.write_all(&buffers.expected[..n]).with_context(context)?;
        remaining -= n as u64;
        progress.inc(n as u64);
    }
    file.set_modified(mtime).with_context(context)?;
    drop(file);
    fs::rename(&temp, &job.path).with_context(|| format!("cannot rename {} to {}", temp.display(), job.path.display()))
}

/// A byte progress bar on stderr when `show` is set and stderr is a terminal; hidden otherwise.
pub fn progress_bar(show: bool, total_bytes: u64) -> ProgressBar {
    if !show || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    match ProgressStyle::with_template(PROGRESS_TEMPLATE) {
        Ok(style) => bar.with_style(style),
        Err(_) => bar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn checksums_look_real() {
        let sum = synthetic_checksum(&content_key(1, "a", "1-r0"));
        assert_eq!(sum.len(), "Q1tduNGDYV/KwvztK0sMium7UfSj0=".len());
        assert!(sum.starts_with("Q1") && sum.ends_with('='));
    }

    #[test]
    fn content_depends_on_every_input_and_is_a_prefix_stream() {
        let key = content_key(1, "a", "1-r0");
        assert_ne!(key, content_key(2, "a", "1-r0"));
        assert_ne!(key, content_key(1, "b", "1-r0"));
        assert_ne!(key, content_key(1, "a", "1-r1"));
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(content_key(1, "ab", "c"), content_key(1, "a", "bc"));
        let mut long = Vec::new();
        write_content(&key, BLOCK_BYTES as u64 + 10, &mut long).unwrap();
        let mut short = Vec::new();
        write_content(&key, 100, &mut short).unwrap();
        assert_eq!(&long[..100], &short[..]);
    }
}
