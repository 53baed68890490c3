//! The one thread that changes the served tree: it applies snapshots and carries out removals whose grace period is
//! over, one job at a time, so a removal never runs beside an apply.
//!
//! Once an apply is in place it updates the chunk index the data plane serves from (the files moved: their chunks are
//! served from where they are now), records the applied snapshot and its removals in the state database (pending,
//! due after the grace period; removals pending for paths it wrote are cancelled), clears staging, and reports what
//! the loop needs (`Applied`), not the plan: nothing of the plan travels back. All of this is in proportion to the
//! change, which in a first sync is the whole tree: none of it runs on the event loop.
//!
//! It also knows which snapshot the tree holds *now* (`in_tree`), which the event loop learns only a moment later,
//! and checks every removal against it (`removals.rs`): a path a newer snapshot brought back is never removed. While
//! an apply that failed part-way has left the tree between two snapshots, no removal runs at all.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::sync::Plan;
use mirrormesh_proto::sync::removals::{deepest_first, removal_due};
use mirrormesh_proto::{RepoId, Timestamp, VerifiedRoot};
use tokio::sync::mpsc;

use crate::apply::{self, ApplyReport};
use crate::chunk_index::ChunkIndex;
use crate::removals::{Removal, RemovalReport, remove_due};
use crate::staging::Staging;
use crate::store::StateStore;

use super::LoopEvent;

/// Jobs queued for the tree writer. The loop keeps at most one apply and one removal run outstanding.
pub const TREE_JOBS_MAX: usize = 4;
/// Removals carried out in one run; the rest wait for the next (a run keeps applies waiting).
pub const REMOVALS_PER_RUN_MAX: usize = 10_000;

pub enum TreeJob {
    /// Apply `plan` (the engine's, from the applied snapshot to `target`, in its order); answered with
    /// [`LoopEvent::Applied`].
    Apply { target: Box<VerifiedRoot>, plan: Plan, record: Record },
    /// Carry out the removals due by `now_ms`; answered with [`LoopEvent::Removed`].
    RemoveDue { now_ms: u64 },
}

/// How an apply is recorded in the state database.
pub struct Record {
    pub repo: RepoId,
    /// How long the files a snapshot no longer names stay (`repo.delete_grace_secs`).
    pub grace_ms: u64,
    /// Paths never recorded for removal (what the mirror itself writes downstream).
    pub keep: BTreeSet<String>,
}

/// What an apply did, for the loop.
#[derive(Debug)]
pub struct Applied {
    pub report: ApplyReport,
    /// Directories whose listing changed (for downstream notification; `None`: the tree's top).
    pub changed_dirs: Option<BTreeSet<String>>,
    /// When the earliest removal this apply recorded is due (`None`: it recorded none).
    pub scheduled: Option<Timestamp>,
    /// Removals pending after it.
    pub pending: u64,
    /// Staging could not be cleared (the next sync clears it again).
    pub staging_left: Option<String>,
}

/// What a removal run did.
#[derive(Debug, Default)]
pub struct RemovalRun {
    pub report: RemovalReport,
    /// Removals not run because an apply is unfinished.
    pub deferred: bool,
    /// Removals still pending after the run.
    pub pending: u64,
    /// When the earliest of them is due (unix ms).
    pub next_due_ms: Option<u64>,
}

pub struct TreeWriter {
    jobs: mpsc::Sender<TreeJob>,
}

struct Worker {
    store: Arc<StateStore>,
    staging: Arc<Staging>,
    tree: PathBuf,
    /// What the data plane serves from, updated once an apply is in place.
    index: Arc<RwLock<ChunkIndex>>,
    events: mpsc::Sender<LoopEvent>,
    /// Manifest root of the snapshot wholly in the tree (none before the first).
    in_tree: Option<NodeHash>,
    /// An apply failed part-way: the tree is between two snapshots until an apply succeeds.
    unfinished: bool,
}

impl TreeWriter {
    pub fn start(
        store: Arc<StateStore>,
        staging: Arc<Staging>,
        repo: RepoId,
        index: Arc<RwLock<ChunkIndex>>,
        events: mpsc::Sender<LoopEvent>,
    ) -> Result<Self> {
        let in_tree = store.reader()?.applied(&repo)?.map(|r| r.verify_signature().map(|b| b.root)).transpose()?;
        let (jobs, mut queue) = mpsc::channel(TREE_JOBS_MAX);
        let tree = staging.tree().to_owned();
        let mut worker = Worker { store, staging, tree, index, events, in_tree, unfinished: false };
        std::thread::Builder::new()
            .name("tree-writer".into())
            .spawn(move || {
                while let Some(job) = queue.blocking_recv() {
                    let event = match job {
                        TreeJob::Apply { target, plan, record } => worker.apply(target, plan, record),
                        TreeJob::RemoveDue { now_ms } => LoopEvent::Removed(Box::new(worker.remove_due(now_ms))),
                    };
                    if worker.events.blocking_send(event).is_err() {
                        break;
                    }
                }
            })
            .context("starting the tree writer thread")?;
        Ok(Self { jobs })
    }

    /// Queues a job; fails only if the writer is gone or the loop broke its bound on outstanding jobs.
    pub fn submit(&self, job: TreeJob) -> Result<()> {
        self.jobs.try_send(job).map_err(|e| anyhow::anyhow!("tree writer: {e}"))
    }
}

impl Worker {
    fn apply(&mut self, target: Box<VerifiedRoot>, plan: Plan, record: Record) -> LoopEvent {
        let result = apply::apply(&self.staging, &plan);
        let result = match result {
            Ok(report) => {
                self.in_tree = Some(target.body.root);
                self.unfinished = false;
                if let Ok(mut index) = self.index.write() {
                    index.apply(plan.changes());
                }
                self.record(&target, &report, &record).map(|(scheduled, pending)| {
                    let staging_left = self.staging.finish().err().map(|e| format!("{e:#}"));
                    let changed_dirs = crate::downstream::changed_dirs(plan.changes());
                    Applied { report, changed_dirs, scheduled, pending, staging_left }
                })
            }
            Err(e) => {
                self.unfinished = true;
                Err(e)
            }
        };
        // The plan is dropped here too (at 10^6 files, tens of milliseconds of freeing).
        drop(plan);
        LoopEvent::Applied { target, result }
    }

    /// Records the applied snapshot and its removals; returns when the earliest removal recorded is due and how
    /// many are pending.
    fn record(&self, target: &VerifiedRoot, report: &ApplyReport, record: &Record) -> Result<(Option<Timestamp>, u64)> {
        let due = removal_due(crate::publish::now(), record.grace_ms);
        let mut writer = self.store.writer()?;
        writer.set_applied(&target.signed, &record.repo)?;
        for path in &report.written {
            writer.remove_pending_deletion(path)?;
        }
        let mut scheduled = None;
        for path in report.removals.iter().filter(|p| !record.keep.contains(*p)) {
            writer.add_pending_deletion(path, due.0)?;
            scheduled = Some(due);
        }
        writer.commit()?;
        Ok((scheduled, self.store.reader()?.pending_deletion_count()?))
    }

    fn remove_due(&mut self, now_ms: u64) -> Result<RemovalRun> {
        let reader = self.store.reader()?;
        let all = reader.pending_deletions()?;
        let next_due_ms = all.iter().map(|(_, at)| *at).min();
        if self.unfinished {
            return Ok(RemovalRun { deferred: true, pending: all.len() as u64, next_due_ms, ..RemovalRun::default() });
        }
        let mut due: Vec<String> = all.into_iter().filter(|(_, at)| *at <= now_ms).map(|(p, _)| p).collect();
        if due.is_empty() {
            return Ok(RemovalRun { pending: reader.pending_deletion_count()?, next_due_ms, ..RemovalRun::default() });
        }
        due.sort_by(|a, b| deepest_first(a, b));
        due.truncate(REMOVALS_PER_RUN_MAX);
        let mut settled = Vec::with_capacity(due.len());
        let outcome = remove_due(&self.tree, &reader, self.in_tree, &due, |path, removal| {
            if removal == Removal::NotBeneathTree {
                tracing::warn!(path, "removal dropped: a symlink or a file is now on its way");
            }
            settled.push(path.to_owned());
        });
        drop(reader);
        let mut writer = self.store.writer()?;
        for path in &settled {
            writer.remove_pending_deletion(path)?;
        }
        writer.commit()?;
        let report = outcome?;
        let left = self.store.reader()?.pending_deletions()?;
        let next_due_ms = left.iter().map(|(_, at)| *at).min();
        Ok(RemovalRun { report, deferred: false, pending: left.len() as u64, next_due_ms })
    }
}
