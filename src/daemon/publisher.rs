//! The origin's publisher: when to publish, and whether a publish may go out.
//!
//! - A publish starts when the operator asks (`POST /publish`, `mirrormesh publish`, possibly forced), when the tree
//!   watcher saw changes and the tree has been quiet for `origin.quiet_secs`, or when the served root is past half
//!   its validity (re-signing). One runs at a time.
//! - `publish.rs` refuses, unless forced, a tree that is missing, not mounted (`origin.require_mount`) or lacks
//!   `origin.require_file`, and a snapshot that is empty or removes more than `origin.removal_limit_percent` of the
//!   previous one's files or bytes. A refusal publishes nothing: mirrors keep what they serve. The daemon shows it
//!   as the `publish_refused` problem and counts `publishes_refused`.
//! - The tree is never created here. The watcher follows the tree's directory: when it goes missing and comes back
//!   (remounted, restored), or is replaced by another directory, it is watched anew and a publish follows once it is
//!   quiet.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::LoopEvent;

/// How often the watcher checks that it still watches the directory at the tree's path.
pub const TREE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Identity of a directory: device and inode.
type DirId = (u64, u64);

pub struct Publisher {
    tree: PathBuf,
    watch: bool,
    quiet: Duration,
    events: mpsc::Sender<LoopEvent>,
    /// The watcher and the directory it was set up on (`None` while the tree is missing).
    watcher: Option<(notify::RecommendedWatcher, DirId)>,
    next_tree_check: Instant,
    /// When the tree last changed, if that is not published yet.
    changed_at: Option<Instant>,
    running: bool,
}

impl Publisher {
    pub fn new(tree: PathBuf, watch: bool, quiet: Duration, events: mpsc::Sender<LoopEvent>) -> Self {
        let now = Instant::now();
        let mut publisher =
            Self { tree, watch, quiet, events, watcher: None, next_tree_check: now, changed_at: None, running: false };
        // Whatever happened to the tree while the daemon was down is published once it is quiet.
        publisher.check_watcher(now);
        publisher
    }

    /// A reloaded `origin.quiet_secs`.
    pub fn set_quiet(&mut self, quiet: Duration) {
        self.quiet = quiet;
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// A watched change waits for the tree to be quiet (`watch_due` is asked often then).
    pub fn change_pending(&self) -> bool {
        self.watch && self.changed_at.is_some()
    }

    /// Something changed in the tree (the watcher saw it).
    pub fn tree_changed(&mut self, now: Instant) {
        self.changed_at = Some(now);
    }

    /// Called on every tick: re-arms the watcher when the tree's directory changed, and says whether a publish of
    /// watched changes is due now.
    pub fn watch_due(&mut self, now: Instant) -> bool {
        if !self.watch {
            return false;
        }
        if now >= self.next_tree_check {
            self.next_tree_check = now + TREE_CHECK_INTERVAL;
            self.check_watcher(now);
        }
        let due = !self.running && self.changed_at.is_some_and(|at| now.duration_since(at) >= self.quiet);
        if due {
            tracing::info!("tree quiet for {:?}: publishing", self.quiet);
            self.changed_at = None;
        }
        due
    }

    /// Marks a publish as started; false if one is running already.
    pub fn begin(&mut self) -> bool {
        !std::mem::replace(&mut self.running, true)
    }

    /// A publish ended. A failed scan (the tree changed under it, most likely) is tried again once the tree is
    /// quiet; a refusal waits for the tree to change.
    pub fn end(&mut self, failed: bool) {
        self.running = false;
        if failed && self.watch {
            self.changed_at = Some(Instant::now());
        }
    }

    fn check_watcher(&mut self, now: Instant) {
        if !self.watch {
            return;
        }
        let current = dir_id(&self.tree);
        if self.watcher.as_ref().map(|(_, id)| *id) == current {
            return;
        }
        let was_watched = self.watcher.take().is_some();
        let Some(id) = current else {
            tracing::warn!(tree = %self.tree.display(), "origin.watch: the tree is missing; watching for it to return");
            if was_watched {
                // Try a publish, so the refusal shows (and nothing is published).
                self.changed_at = Some(now);
            }
            return;
        };
        match watch_tree(&self.tree, self.events.clone()) {
            Ok(watcher) => {
                tracing::info!(tree = %self.tree.display(), "origin.watch: watching the tree");
                self.watcher = Some((watcher, id));
                self.changed_at = Some(now);
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}

fn dir_id(path: &std::path::Path) -> Option<DirId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// Watches the tree (recursively, inotify on Linux) and tells the loop when anything in it changes. Bursts
/// coalesce: a full event queue just drops the extra notifications.
fn watch_tree(tree: &std::path::Path, events: mpsc::Sender<LoopEvent>) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = events.try_send(LoopEvent::TreeChanged);
        }
    })
    .context("origin.watch: starting the tree watcher")?;
    watcher
        .watch(tree, notify::RecursiveMode::Recursive)
        .with_context(|| format!("origin.watch: watching {}", tree.display()))?;
    Ok(watcher)
}
