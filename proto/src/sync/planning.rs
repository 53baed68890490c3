//! Planning a sync: the work between a complete manifest and staging, handed to the caller to run off its event
//! loop.
//!
//! Planning reads the whole diff from the applied snapshot to the target (every changed entry, through the node
//! store) and builds from it the staging list, the apply's [`Plan`] and the [`Scheduler`] of every chunk to fetch:
//! work and memory in proportion to the change, which for a first sync is the whole tree (3.7 s on the event loop
//! at 10^6 files, when the engine did it inside [`Engine::handle`](super::Engine::handle)). So the engine emits
//! [`Output::Plan`](super::Output::Plan) with a [`PlanJob`], the caller runs [`PlanJob::run`] where it likes (the
//! daemon on a blocking thread, the simulator at once) and hands the [`Planned`] back as
//! [`Input::Planned`](super::Input::Planned). The job reads only nodes the outputs before it stored, and is pure:
//! the same job over the same nodes gives the same result.
//!
//! Meanwhile the engine stays in its manifest phase: announcements are kept as before the plan, a newer root
//! replaces the target (the late result of the old job is then dropped, matched by sequence number and root), and
//! the status shows `planning`.

use crate::chunk::chunk_range;
use crate::diff::{DiffError, diff};
use crate::entry::EntryKind;
use crate::node::NodeHash;
use crate::node_store::{NodeSource, SourceError};

use super::scheduler::{Scheduler, SchedulerLimits};
use super::{IndexNames, PeerKey, Plan, StageFile};

/// What to plan: the diff from `base` (the applied snapshot's root, if any) to the target `root` of snapshot `seq`.
#[derive(Clone)]
pub struct PlanJob {
    pub(super) seq: u64,
    pub(super) root: NodeHash,
    pub(super) base: Option<NodeHash>,
    pub(super) limits: SchedulerLimits,
    pub(super) salt: u64,
    pub(super) index_names: IndexNames,
}

/// Two jobs are the same if they plan the same diff for the same snapshot (the limits, salt and index names are the
/// engine's configuration, the same for every job it hands out).
impl PartialEq for PlanJob {
    fn eq(&self, other: &Self) -> bool {
        (self.seq, self.root, self.base) == (other.seq, other.root, other.base)
    }
}

impl Eq for PlanJob {}

impl std::fmt::Debug for PlanJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanJob").field("seq", &self.seq).field("root", &self.root).field("base", &self.base).finish()
    }
}

/// A job's result, for [`Input::Planned`](super::Input::Planned).
pub struct Planned<P: PeerKey> {
    pub(super) seq: u64,
    pub(super) root: NodeHash,
    pub(super) outcome: Result<Ready<P>, PlanFailure>,
}

impl<P: PeerKey> std::fmt::Debug for Planned<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outcome = match &self.outcome {
            Ok(ready) => format!("{} files to stage", ready.files.len()),
            Err(failure) => format!("{failure:?}"),
        };
        f.debug_struct("Planned").field("seq", &self.seq).field("outcome", &outcome).finish()
    }
}

/// A plan ready to stage.
pub(super) struct Ready<P: PeerKey> {
    pub(super) files: Vec<StageFile>,
    /// Every chunk to fetch, with no peer yet (the engine adds what peers announced when it takes the plan).
    pub(super) sched: Scheduler<P>,
    pub(super) plan: Plan,
}

/// Why a job gave no plan.
#[derive(Debug)]
pub(super) enum PlanFailure {
    /// The node store failed: the engine reports it as its own error.
    Source(SourceError),
    /// A node the store should hold is gone: the engine fetches that subtree again, then plans again.
    Missing(NodeHash),
    /// A stored node is damaged or the manifest breaks a rule: nothing to apply until a new root.
    Invalid(DiffError),
}

impl PlanJob {
    /// The snapshot this job plans for.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Reads the diff through `source` and builds the plan (in proportion to the change: run it off the loop).
    pub fn run<P: PeerKey>(self, source: &impl NodeSource) -> Box<Planned<P>> {
        let outcome = match diff(source, self.base.as_ref(), &self.root) {
            Ok((changes, _)) => {
                let files: Vec<StageFile> = changes
                    .iter()
                    .filter_map(|c| match c.new.as_ref().map(|e| &e.kind) {
                        Some(EntryKind::File(meta)) => Some(StageFile { path: c.path.clone(), meta: meta.clone() }),
                        _ => None,
                    })
                    .collect();
                let chunks = files.iter().flat_map(|f| {
                    f.meta
                        .chunks
                        .iter()
                        .enumerate()
                        .filter_map(|(i, id)| Some((*id, chunk_range(f.meta.size, i as u64)?.1)))
                });
                let sched = Scheduler::new(self.limits, self.salt, chunks);
                let plan = Plan::new(changes, &self.index_names);
                Ok(Ready { files, sched, plan })
            }
            Err(DiffError::Source(e)) => Err(PlanFailure::Source(e)),
            Err(DiffError::Missing(hash)) => Err(PlanFailure::Missing(hash)),
            Err(e) => Err(PlanFailure::Invalid(e)),
        };
        Box::new(Planned { seq: self.seq, root: self.root, outcome })
    }
}
