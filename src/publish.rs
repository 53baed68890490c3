//! Publishing a snapshot: scan the tree, build its manifest, compute the delta against the previous snapshot, sign
//! a root and commit all of it to the state store in one transaction.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mirrormesh_proto::delta::{DELTA_BYTES_MAX, DeltaHash, ManifestDelta};
use mirrormesh_proto::diff::diff;
use mirrormesh_proto::entry::EntryKind;
use mirrormesh_proto::root::{DeltaRef, RootBody};
use mirrormesh_proto::{RepoId, SignedRoot, Timestamp};

use crate::key::NodeKey;
use crate::scan::{ScanStats, scan};
use crate::store::StateStore;

/// How long a published root stays valid unless the publisher says otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct PublishOptions<'a> {
    pub tree: &'a Path,
    pub repo: RepoId,
    pub validity: Duration,
    /// Draw a progress bar while hashing (only when stderr is a terminal).
    pub progress: bool,
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
}

/// The wall clock as the core's timestamp.
pub fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// Scans `opts.tree`, signs a new snapshot with `key` and commits it to `store`, all in one transaction: a crash
/// leaves the previous snapshot as it was.
pub fn publish(store: &StateStore, key: &NodeKey, opts: &PublishOptions<'_>) -> Result<PublishReport> {
    let mut writer = store.writer()?;
    let previous = match writer.root(&opts.repo)? {
        Some(root) => Some(root.verify_signature().context("the previously published root does not verify")?),
        None => None,
    };

    let scanned = scan(opts.tree, &mut writer, opts.progress)?;
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
        files: scanned.stats.files,
        bytes: scanned.stats.bytes,
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
        (scanned.stats.files, scanned.stats.bytes)
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
    })
}

/// `1.5 GiB`-style sizes for humans.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}
