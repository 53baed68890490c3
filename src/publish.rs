//! Publishing a snapshot: scan the tree, build its manifest, compute the delta against the previous snapshot, sign
//! a root and commit all of it to the state store in one transaction.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mirrormesh_proto::delta::{DELTA_BYTES_MAX, DeltaHash, ManifestDelta};
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::root::{DeltaRef, RootBody};
use mirrormesh_proto::{RepoId, SignedRoot, Timestamp};

use crate::key::NodeKey;
use crate::scan::{Changed, ScanStats, scan};
use crate::store::StateStore;

/// How long a published root stays valid unless the publisher says otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Share of the previous snapshot's files or bytes a new snapshot may remove without being forced, by default.
pub const DEFAULT_REMOVAL_LIMIT_PERCENT: u32 = 10;

pub struct PublishOptions<'a> {
    pub tree: &'a Path,
    pub repo: RepoId,
    pub validity: Duration,
    /// Draw a progress bar while hashing (only when stderr is a terminal).
    pub progress: bool,
    pub guard: PublishGuard,
    /// Paths (relative to the tree) left out of the snapshot: the origin's own downstream files.
    pub exclude: Vec<String>,
    /// Read only what changed since the previous snapshot (`publish --paths`, the tree watcher); `None`, or no
    /// previous snapshot, reads the whole tree.
    pub changed: Option<Changed>,
    /// Sign nothing when the tree is as the previous snapshot has it ([`PublishError::Unchanged`]): the watcher's
    /// publishes and its hourly whole-tree read, not an operator's or a re-signing.
    pub only_if_changed: bool,
}

/// What a publish must find before it signs anything: the checks that keep an unmounted, moved or emptied tree from
/// wiping every mirror.
#[derive(Clone, Debug)]
pub struct PublishGuard {
    /// Refuse a snapshot that removes more than this share (percent) of the previous snapshot's files or bytes.
    pub removal_limit_percent: u32,
    /// Refuse unless the tree is a mount point.
    pub require_mount: bool,
    /// Refuse unless this file (relative to the tree) exists.
    pub require_file: Option<String>,
    /// The operator asked for this publish whatever the checks say (an empty or much smaller tree is intended).
    pub force: bool,
}

impl Default for PublishGuard {
    fn default() -> Self {
        Self {
            removal_limit_percent: DEFAULT_REMOVAL_LIMIT_PERCENT,
            require_mount: false,
            require_file: None,
            force: false,
        }
    }
}

/// Why a publish was refused. Nothing was signed or recorded: mirrors keep the snapshot they have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("tree {0} does not exist or is not a directory (an origin never creates its tree: mount or restore it)")]
    TreeMissing(String),
    #[error("tree {0} is not a mount point (origin.require_mount)")]
    NotMounted(String),
    #[error("tree {tree} has no {file} (origin.require_file): is the right filesystem mounted?")]
    MarkerMissing { tree: String, file: String },
    #[error("the new snapshot is empty{}", previous.map(|f| format!(" (the previous one has {f} files)")).unwrap_or_default())]
    Empty { previous: Option<u64> },
    #[error(
        "the new snapshot removes {removed_files} of {files} files and {removed_bytes} of {bytes} bytes, more than \
         origin.removal_limit_percent ({limit}%)"
    )]
    TooManyRemovals { removed_files: u64, files: u64, removed_bytes: u64, bytes: u64, limit: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publish refused: {0}; if this is intended, publish with --force")]
    Refused(Refusal),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
    /// Nothing changed since the previous snapshot and the publish asked for nothing then (`only_if_changed`): no
    /// new snapshot (what the scan learned about files is kept).
    #[error("nothing changed since the previous snapshot")]
    Unchanged,
}

impl From<Refusal> for PublishError {
    fn from(r: Refusal) -> Self {
        PublishError::Refused(r)
    }
}

/// The checks made before scanning (see [`PublishGuard`]).
fn check_tree(tree: &Path, guard: &PublishGuard) -> Result<(), Refusal> {
    let shown = || tree.display().to_string();
    if !std::fs::metadata(tree).is_ok_and(|m| m.is_dir()) {
        return Err(Refusal::TreeMissing(shown()));
    }
    if guard.require_mount && !is_mount_point(tree) {
        return Err(Refusal::NotMounted(shown()));
    }
    if let Some(file) = &guard.require_file
        && std::fs::symlink_metadata(tree.join(file)).is_err()
    {
        return Err(Refusal::MarkerMissing { tree: shown(), file: file.clone() });
    }
    Ok(())
}

/// Whether `dir` is where a filesystem is mounted (`/proc/self/mountinfo` names it as a mount point).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else { return false };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    // Field 5 is the mount point, with space, tab, newline and backslash escaped as octal.
    let unescape =
        |field: &str| field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\");
    mounts.lines().filter_map(|line| line.split(' ').nth(4)).any(|point| Path::new(&unescape(point)) == dir)
}

/// The checks made on the scanned snapshot against the previous one (see [`PublishGuard`]).
fn check_removals(
    guard: &PublishGuard,
    files: u64,
    previous: Option<&RootBody>,
    changes: &[mirrormesh_proto::diff::Change],
) -> Result<(), Refusal> {
    if files == 0 {
        return Err(Refusal::Empty { previous: previous.map(|p| p.files) });
    }
    let Some(previous) = previous else { return Ok(()) };
    let (removed_files, removed_bytes) = changes
        .iter()
        .filter(|c| !matches!(c.new.as_ref().map(|e| &e.kind), Some(EntryKind::File(_))))
        .filter_map(|c| match c.old.as_ref().map(|e| &e.kind) {
            Some(EntryKind::File(meta)) => Some(meta.size),
            _ => None,
        })
        .fold((0u64, 0u64), |(n, b), size| (n + 1, b + size));
    let limit = u128::from(guard.removal_limit_percent);
    let over = |removed: u64, total: u64| u128::from(removed) * 100 > u128::from(total) * limit;
    if over(removed_files, previous.files) || over(removed_bytes, previous.bytes) {
        return Err(Refusal::TooManyRemovals {
            removed_files,
            files: previous.files,
            removed_bytes,
            bytes: previous.bytes,
            limit: guard.removal_limit_percent,
        });
    }
    Ok(())
}

#[derive(Debug)]
pub struct PublishReport {
    pub signed: SignedRoot,
    pub body: RootBody,
    pub scan: ScanStats,
    pub build_elapsed: Duration,
    /// Entries that differ from the previous snapshot (0 for the first one).
    pub changes: usize,
    pub previous_seq: Option<u64>,
    pub new_nodes: usize,
    pub new_node_bytes: usize,
    pub delta_bytes: Option<usize>,
    /// Regular files added or changed since the previous snapshot (all of them for the first), and their bytes:
    /// what mirrors must fetch.
    pub changed_files: u64,
    pub changed_bytes: u64,
    /// The previous snapshot's root and what changed since (empty for the first snapshot).
    pub previous_root: Option<NodeHash>,
    pub diff: Vec<mirrormesh_proto::diff::Change>,
}

/// The wall clock as the core's timestamp.
pub fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// Scans `opts.tree`, signs a new snapshot with `key` and commits it to `store`, all in one transaction: a crash
/// leaves the previous snapshot as it was. Refuses (recording nothing) what `opts.guard` refuses, unless forced.
pub fn publish(store: &StateStore, key: &NodeKey, opts: &PublishOptions<'_>) -> Result<PublishReport, PublishError> {
    let guard = &opts.guard;
    if !guard.force {
        check_tree(opts.tree, guard)?;
    }
    let mut writer = store.writer()?;
    let previous = match writer.root(&opts.repo)? {
        Some(root) => Some(root.verify_signature().context("the previously published root does not verify")?),
        None => None,
    };

    let changes_since = previous.as_ref().and(opts.changed.as_ref());
    let previous_root = previous.as_ref().map(|p| p.root);
    let scanned = scan(opts.tree, &mut writer, opts.progress, &opts.exclude, previous_root, changes_since)?;
    let build_started = Instant::now();
    let root = scanned.root;
    let (changes, delta) = match &previous {
        Some(prev) => {
            let (changes, _) =
                diff(&writer, Some(&prev.root), &root).context("comparing with the previous snapshot")?;
            let delta = (prev.root != root).then(|| ManifestDelta::from_changes(prev.root, root, &changes).encode());
            (changes, delta.filter(|d| d.len() <= DELTA_BYTES_MAX).map(|d| (prev, d)))
        }
        None => (Vec::new(), None),
    };
    let build_elapsed = build_started.elapsed();
    if opts.only_if_changed && previous.as_ref().is_some_and(|p| p.root == root) {
        writer.commit()?;
        return Err(PublishError::Unchanged);
    }
    // The tree's totals: counted by a full scan; a scan of changes counts only what it read (and a busy directory
    // kept as it was is not read), so then the previous snapshot's totals are moved by the changes.
    let partial = changes_since.is_some() || scanned.stats.dirs_kept_busy > 0;
    let (files, bytes) = match (partial, &previous) {
        (true, Some(prev)) => changes.iter().fold((prev.files, prev.bytes), |(n, b), c| {
            let size = |e: &Option<mirrormesh_proto::entry::Entry>| match e.as_ref().map(|e| &e.kind) {
                Some(EntryKind::File(meta)) => Some(meta.size),
                _ => None,
            };
            let (n, b) = match size(&c.old) {
                Some(s) => (n.saturating_sub(1), b.saturating_sub(s)),
                None => (n, b),
            };
            match size(&c.new) {
                Some(s) => (n + 1, b + s),
                None => (n, b),
            }
        }),
        _ => (scanned.stats.files, scanned.stats.bytes),
    };
    if !guard.force {
        // Dropping the writer records nothing of this scan.
        check_removals(guard, files, previous.as_ref(), &changes)?;
    }

    let created = now();
    let previous_seq = previous.as_ref().map(|b| b.seq);
    // Sequence numbers follow the clock (seconds) so a publisher that lost its state still moves forward, and
    // stay strictly increasing when publishing twice in a second.
    let seq = previous_seq.map_or(0, |s| s + 1).max(created.0 / 1000);
    let body = RootBody {
        repo: opts.repo.clone(),
        seq,
        created,
        expires: created.plus_ms(opts.validity.as_millis() as u64),
        root,
        files,
        bytes,
        delta: delta.as_ref().map(|(prev, bytes)| DeltaRef {
            base_seq: prev.seq,
            base_root: prev.root,
            hash: DeltaHash::of(bytes),
            len: bytes.len() as u32,
        }),
    };
    let signed = SignedRoot::sign(key.secret(), &body);

    if let Some((_, bytes)) = &delta {
        writer.put_delta(&DeltaHash::of(bytes), bytes)?;
    }
    for change in &changes {
        if change.new.is_none() && matches!(change.old.as_ref().map(|e| &e.kind), Some(EntryKind::File(_))) {
            writer.remove_scan_entry(&change.path)?;
        }
    }
    writer.set_root(&signed, &opts.repo)?;
    let (new_nodes, new_node_bytes) = (writer.new_nodes, writer.new_node_bytes);
    writer.commit()?;
    let (changed_files, changed_bytes) = if previous.is_some() {
        changes.iter().fold((0, 0), |(n, b), c| match c.new.as_ref().map(|e| &e.kind) {
            Some(EntryKind::File(meta)) => (n + 1, b + meta.size),
            _ => (n, b),
        })
    } else {
        (files, bytes)
    };

    Ok(PublishReport {
        signed,
        body,
        scan: scanned.stats,
        build_elapsed,
        changes: changes.len(),
        previous_seq,
        new_nodes,
        new_node_bytes,
        delta_bytes: delta.map(|(_, d)| d.len()),
        changed_files,
        changed_bytes,
        previous_root: previous.as_ref().map(|p| p.root),
        diff: changes,
    })
}
