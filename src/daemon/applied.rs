//! What the loop does when the tree writer reports: a snapshot applied (its removals recorded pending, downstream
//! told, the engine answered; the tree writer updated the chunk index) or a removal run done.

use super::*;

impl Daemon {
    pub(super) fn on_applied(&mut self, target: VerifiedRoot, result: Result<tree_writer::Applied>) -> Result<()> {
        let tree_writer::Applied { report, changed_dirs, scheduled, pending, staging_left } = match result {
            Ok(applied) => applied,
            Err(e) => {
                // The tree is consistent (see apply.rs); the engine tries again with back-off, or moves on to a
                // newer root.
                let kind = apply_failure(&e);
                let seq = target.body.seq;
                self.set_problem(ProblemKind::ApplyFailing, format!("applying snapshot {seq}: {e:#}"), now().0);
                self.count("apply_failures");
                self.feed(Input::ApplyFailed { seq, failure: kind })?;
                return Ok(());
            }
        };
        // (The tree writer recorded the snapshot and its removals, and cleared staging.)
        self.feed(Input::RemovalsScheduled { due: scheduled, pending })?;
        if let Some(e) = staging_left {
            tracing::warn!("cleaning staging: {e}");
        }
        self.totals = (target.body.files, target.body.bytes);
        for kind in [ProblemKind::ApplyFailing, ProblemKind::StagingFailing, ProblemKind::Manifest, ProblemKind::Other]
        {
            self.health.clear(kind);
        }
        tracing::info!(
            seq = target.body.seq,
            files = report.files,
            index_files = report.index_files,
            removals = report.removals.len(),
            steps_ms = %report.steps.iter().map(|(step, d)| format!("{step}:{}", d.as_millis())).collect::<Vec<_>>().join(","),
            "snapshot in place"
        );
        let accepted_ms = self
            .sync
            .started
            .filter(|(seq, _)| *seq == target.body.seq)
            .map(|(_, at)| now().0.saturating_sub(at.elapsed().as_millis() as u64));
        self.downstream.applied(crate::downstream::Applied {
            seq: target.body.seq,
            root: target.body.root,
            created_ms: target.body.created.0,
            expires_ms: target.body.expires.0,
            accepted_ms,
            applied_ms: now().0,
            origin: crate::key::peer_id_of(&target.signed.publisher)
                .map_or_else(|_| "unknown".into(), |p| p.to_string()),
            node: self.key.peer_id().to_string(),
            dirs: changed_dirs,
        });
        self.feed(Input::Applied { seq: target.body.seq })?;
        Ok(())
    }

    pub(super) fn on_removed(&mut self, run: Result<tree_writer::RemovalRun>) {
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                self.removals_done(None, None);
                return self.error(format!("pending deletions: {e:#}"));
            }
        };
        // Counted again here rather than taken from the run: an apply that finished while the run was going added
        // pending deletions after the run counted them, and its count would say none are left (a mirror then
        // reported itself settled with files still to remove).
        let pending = match self.store.reader().and_then(|r| r.pending_deletion_count()) {
            Ok(n) => n,
            Err(e) => {
                self.error(format!("pending deletions: {e:#}"));
                run.pending
            }
        };
        self.removals_done(Some(run.next_due_ms.map(Timestamp)), Some(pending));
        let r = &run.report;
        if r.named_by_snapshot > 0 {
            tracing::info!(count = r.named_by_snapshot, "removals cancelled: the snapshot in the tree names them");
        }
        for (what, n) in [("removals_named_by_snapshot", r.named_by_snapshot), ("removals_dropped", r.not_beneath_tree)]
        {
            if n > 0 {
                *self.counters.entry(what.into()).or_default() += n;
            }
        }
        if r.removed > 0 {
            tracing::info!(count = r.removed, "removed files after the grace period");
        }
    }

    pub(super) fn removals_done(&mut self, left: Option<Option<Timestamp>>, pending: Option<u64>) {
        if let Err(e) = self.feed(Input::RemovalsDone { left, pending }) {
            self.error(format!("{e:#}"));
        }
    }
}

/// What kind of failure an apply error is, for the engine's retry (from the first I/O error in its chain).
pub(super) fn apply_failure(error: &anyhow::Error) -> ApplyFailure {
    let errno = error.chain().find_map(|e| e.downcast_ref::<std::io::Error>()).and_then(std::io::Error::raw_os_error);
    match errno {
        Some(libc::ENOSPC | libc::EDQUOT) => ApplyFailure::NoSpace,
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => ApplyFailure::Permission,
        _ => ApplyFailure::Other,
    }
}
