//! What is wrong with the node now: at most one problem of each kind, set and cleared by the part of the daemon that
//! owns it (the publisher its refusals, the apply its failures, the root check its staleness). The status lists
//! them (`problems`), `last_error` is the newest one's message, and `mirrormesh_failing` is 1 while any is set, so
//! an operator sees every problem until the condition behind it is gone, not just the last thing that went wrong.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The kinds of problem; each is its own metric label (`mirrormesh_problem{kind}`), so the set is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Origin: the newest publish was refused (empty tree, too many removals, tree missing or not mounted).
    PublishRefused,
    /// Origin: publishing failed (scan or store error).
    PublishFailed,
    /// Applying a snapshot failed; the engine retries with back-off.
    ApplyFailing,
    /// Staging could not be prepared or chunks could not be written (a full disk, say).
    StagingFailing,
    /// The manifest could not be read or diffed.
    Manifest,
    /// Roots arrived that are signed by a publisher this node does not trust, and no trusted one was accepted.
    RootsUntrusted,
    /// Mirror: no snapshot has ever been applied here and no sync is running.
    NeverSynced,
    /// The snapshot served is past its root's expiry.
    RootExpired,
    /// The snapshot served was created longer ago than `repo.stale_after_secs`.
    RootStale,
    /// Something else the loop hit (a store error, a failed removal run); cleared by the next snapshot in place.
    Other,
}

impl ProblemKind {
    pub const ALL: [ProblemKind; 10] = [
        ProblemKind::PublishRefused,
        ProblemKind::PublishFailed,
        ProblemKind::ApplyFailing,
        ProblemKind::StagingFailing,
        ProblemKind::Manifest,
        ProblemKind::RootsUntrusted,
        ProblemKind::NeverSynced,
        ProblemKind::RootExpired,
        ProblemKind::RootStale,
        ProblemKind::Other,
    ];

    /// The name used in the status, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::PublishRefused => "publish_refused",
            ProblemKind::PublishFailed => "publish_failed",
            ProblemKind::ApplyFailing => "apply_failing",
            ProblemKind::StagingFailing => "staging_failing",
            ProblemKind::Manifest => "manifest",
            ProblemKind::RootsUntrusted => "roots_untrusted",
            ProblemKind::NeverSynced => "never_synced",
            ProblemKind::RootExpired => "root_expired",
            ProblemKind::RootStale => "root_stale",
            ProblemKind::Other => "other",
        }
    }
}

/// One problem as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
    /// When this kind of problem appeared (milliseconds since the Unix epoch).
    pub since_ms: u64,
    /// When its message last changed.
    pub updated_ms: u64,
}

#[derive(Default)]
pub struct Health {
    problems: BTreeMap<ProblemKind, Problem>,
}

impl Health {
    /// Sets (or updates) the problem of `kind`; logs it when it is new or its message changed. True if it is new.
    pub fn set(&mut self, kind: ProblemKind, message: impl Into<String>, now_ms: u64) -> bool {
        let message = message.into();
        match self.problems.get_mut(&kind) {
            Some(p) if p.message == message => false,
            Some(p) => {
                tracing::error!(problem = kind.name(), "{message}");
                p.message = message;
                p.updated_ms = now_ms;
                false
            }
            None => {
                tracing::error!(problem = kind.name(), "{message}");
                self.problems.insert(kind, Problem { kind, message, since_ms: now_ms, updated_ms: now_ms });
                true
            }
        }
    }

    /// Clears the problem of `kind`; logs that it cleared.
    pub fn clear(&mut self, kind: ProblemKind) {
        if self.problems.remove(&kind).is_some() {
            tracing::info!(problem = kind.name(), "problem cleared");
        }
    }

    pub fn is_set(&self, kind: ProblemKind) -> bool {
        self.problems.contains_key(&kind)
    }

    /// The most recently set or changed problem's message.
    pub fn newest(&self) -> Option<&str> {
        self.problems.values().max_by_key(|p| (p.updated_ms, p.kind)).map(|p| p.message.as_str())
    }

    pub fn list(&self) -> Vec<Problem> {
        self.problems.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_set_and_cleared_on_its_own_and_the_newest_is_the_last_error() {
        let mut h = Health::default();
        assert_eq!(h.newest(), None);
        h.set(ProblemKind::ApplyFailing, "no space", 10);
        h.set(ProblemKind::RootStale, "old", 20);
        assert_eq!(h.newest(), Some("old"));
        h.set(ProblemKind::ApplyFailing, "no space left", 30);
        assert_eq!(h.newest(), Some("no space left"));
        assert_eq!(h.list()[0].since_ms, 10, "since stays when the message changes");
        h.clear(ProblemKind::ApplyFailing);
        assert_eq!(h.newest(), Some("old"));
        assert!(!h.is_set(ProblemKind::ApplyFailing) && h.is_set(ProblemKind::RootStale));
    }
}
