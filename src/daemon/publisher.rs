//! The origin's publisher: when to publish, and whether a publish may go out.
//!
//! - A publish starts when the operator asks (`POST /publish`, `mirrormesh publish`, possibly forced), when the tree
//!   watcher saw changes and the tree has been quiet for `origin.quiet_secs`, or when the served root is past half
//!   its validity (re-signing). One runs at a time.
//! - `publish.rs` refuses, unless forced, a tree that is missing, not mounted (`origin.require_mount`) or lacks
//!   `origin.require_file`, and a snapshot that is empty or removes more than `origin.removal_limit_percent` of the
//!   previous one's files or bytes. A refusal publishes nothing: mirrors keep what they serve. The daemon shows it
//!   as the `publish_refused` problem and counts `publishes_refused`.
//! - **In proportion to the change.** The watcher notes which directories changed (the directory of each event's
//!   path; a directory created, moved in or changed itself is read whole), and a directory is published once it has
//!   been quiet for `origin.quiet_secs`: a publish reads the quiet ones and their ancestors only, and leaves the
//!   directories still being written as the previous snapshot has them (they follow once quiet), so a master whose
//!   builders never stop still publishes. The whole tree is read on start, after the watcher was set up anew, when
//!   the watcher lost events (its queue overflowed) or remembers more than [`DIRTY_DIRS_MAX`] directories, and every
//!   [`FULL_SCAN_INTERVAL`] all the same: it waits for the whole tree to be quiet, at most
//!   [`FULL_SCAN_QUIET_WAIT_FACTOR`] times `quiet_secs` (then each directory's own re-read keeps it consistent).
//! - The tree is never created here. The watcher follows the tree's directory: when it goes missing and comes back
//!   (remounted, restored), or is replaced by another directory, it is watched anew and a publish follows once it is
//!   quiet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::LoopEvent;
use crate::scan::Changed;

/// How often the watcher checks that it still watches the directory at the tree's path.
pub const TREE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Most directories the watcher remembers as changed; past it, the next publish reads the whole tree.
pub const DIRTY_DIRS_MAX: usize = 65_536;

/// How often a watching origin reads its whole tree all the same (a safety net under the watcher's events).
pub const FULL_SCAN_INTERVAL: Duration = Duration::from_secs(3600);

/// A whole-tree read waits at most this many times `quiet_secs` for the whole tree to be quiet.
pub const FULL_SCAN_QUIET_WAIT_FACTOR: u32 = 10;

/// Identity of a directory: device and inode.
type DirId = (u64, u64);

/// What the watcher saw since the last publish took it.
#[derive(Default)]
struct Dirty {
    /// Changed directories (relative to the tree): when they last changed, and whether to read them whole.
    dirs: BTreeMap<String, (Instant, bool)>,
    /// The watcher lost track (events dropped, too many directories, a path it could not place): read everything.
    full: bool,
}

impl Dirty {
    fn mark(&mut self, dir: String, whole: bool, now: Instant) {
        let entry = self.dirs.entry(dir).or_insert((now, whole));
        entry.0 = now;
        entry.1 |= whole;
        if self.dirs.len() > DIRTY_DIRS_MAX {
            self.dirs.clear();
            self.full = true;
        }
    }
}

/// What a due publish reads.
#[derive(Debug)]
pub enum Due {
    /// The whole tree.
    Full,
    /// The directories that changed and are quiet now.
    Changed(Changed),
}

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
    /// The directories that changed (shared with the watcher's thread).
    dirty: Arc<Mutex<Dirty>>,
    /// Since when a whole-tree read is wanted.
    full_since: Option<Instant>,
    next_full: Instant,
    /// What the running publish reads (put back if it fails).
    taken: Option<Changed>,
    running: bool,
}

impl Publisher {
    pub fn new(tree: PathBuf, watch: bool, quiet: Duration, events: mpsc::Sender<LoopEvent>) -> Self {
        let now = Instant::now();
        let mut publisher = Self {
            tree,
            watch,
            quiet,
            events,
            watcher: None,
            next_tree_check: now,
            changed_at: None,
            dirty: Arc::default(),
            full_since: None,
            next_full: now + FULL_SCAN_INTERVAL,
            taken: None,
            running: false,
        };
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
        self.watch && (self.changed_at.is_some() || self.full_since.is_some())
    }

    /// Something changed in the tree (the watcher saw it).
    pub fn tree_changed(&mut self, now: Instant) {
        self.changed_at = Some(now);
    }

    /// Called on every tick: re-arms the watcher when the tree's directory changed, and says whether a publish of
    /// watched changes is due now, and what it reads.
    pub fn watch_due(&mut self, now: Instant) -> Option<Due> {
        if !self.watch {
            return None;
        }
        if now >= self.next_tree_check {
            self.next_tree_check = now + TREE_CHECK_INTERVAL;
            self.check_watcher(now);
        }
        if self.running {
            return None;
        }
        if now >= self.next_full {
            self.want_full(now);
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        if std::mem::take(&mut dirty.full) {
            self.full_since.get_or_insert(now);
        }
        if let Some(since) = self.full_since {
            let quiet = self.changed_at.is_none_or(|at| now.duration_since(at) >= self.quiet);
            if !quiet && now.duration_since(since) < self.quiet * FULL_SCAN_QUIET_WAIT_FACTOR {
                return None;
            }
            tracing::info!(
                "reading the whole tree ({})",
                if quiet { "quiet" } else { "not quiet, waited long enough" }
            );
            dirty.dirs.clear();
            drop(dirty);
            self.full_since = None;
            self.changed_at = None;
            self.next_full = now + FULL_SCAN_INTERVAL;
            return Some(Due::Full);
        }
        let quiet_since = now.checked_sub(self.quiet);
        let is_quiet = |at: &Instant| quiet_since.is_some_and(|q| *at <= q);
        if !dirty.dirs.values().any(|(at, _)| is_quiet(at)) {
            if dirty.dirs.is_empty() {
                self.changed_at = None;
            }
            return None;
        }
        let mut changed = Changed::default();
        let dirs = std::mem::take(&mut dirty.dirs);
        for (dir, (at, whole)) in dirs {
            if !is_quiet(&at) {
                changed.keep.insert(dir.clone());
                dirty.dirs.insert(dir, (at, whole));
            } else if whole {
                changed.trees.insert(dir);
            } else {
                changed.dirs.insert(dir);
            }
        }
        if dirty.dirs.is_empty() {
            self.changed_at = None;
        }
        tracing::info!(
            dirs = changed.dirs.len() + changed.trees.len(),
            still_written = changed.keep.len(),
            "directories quiet for {:?}: publishing them",
            self.quiet
        );
        Some(Due::Changed(changed))
    }

    /// Marks a publish as started (reading `taken`, if the watcher's changes); false if one is running already.
    pub fn begin(&mut self, taken: Option<Changed>) -> bool {
        if self.running {
            return false;
        }
        self.running = true;
        self.taken = taken;
        true
    }

    /// A publish ended. What a failed scan was reading (the tree changed under it, most likely) is read again once
    /// quiet; a refusal waits for the tree to change.
    pub fn end(&mut self, failed: bool) {
        self.running = false;
        let taken = self.taken.take();
        if failed && self.watch {
            let now = Instant::now();
            self.changed_at = Some(now);
            match taken {
                Some(changed) => {
                    let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
                    for dir in changed.dirs {
                        dirty.mark(dir, false, now);
                    }
                    for dir in changed.trees {
                        dirty.mark(dir, true, now);
                    }
                }
                None => self.want_full(now),
            }
        }
    }

    fn want_full(&mut self, now: Instant) {
        self.full_since.get_or_insert(now);
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
                self.want_full(now);
            }
            return;
        };
        match watch_tree(&self.tree, self.events.clone(), self.dirty.clone()) {
            Ok(watcher) => {
                tracing::info!(tree = %self.tree.display(), "origin.watch: watching the tree");
                self.watcher = Some((watcher, id));
                // What happened while nobody watched: read everything.
                self.changed_at = Some(now);
                self.want_full(now);
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}

fn dir_id(path: &std::path::Path) -> Option<DirId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// Watches the tree (recursively, inotify on Linux): notes the directories that changed in `dirty` and tells the
/// loop. Bursts coalesce: a full event queue just drops the extra notifications (the directories are noted all the
/// same).
fn watch_tree(
    tree: &Path,
    events: mpsc::Sender<LoopEvent>,
    dirty: Arc<Mutex<Dirty>>,
) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let root = tree.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let now = Instant::now();
        match event {
            Ok(e) if e.kind.is_access() => return,
            Ok(e) => {
                let mut dirty = dirty.lock().unwrap_or_else(PoisonError::into_inner);
                if e.need_rescan() {
                    dirty.full = true;
                }
                for path in &e.paths {
                    match changed_dir(&root, path) {
                        Some((dir, whole)) => dirty.mark(dir, whole, now),
                        None => dirty.full = true,
                    }
                }
            }
            // The watcher lost track of something: read everything.
            Err(_) => dirty.lock().unwrap_or_else(PoisonError::into_inner).full = true,
        }
        let _ = events.try_send(LoopEvent::TreeChanged);
    })
    .context("origin.watch: starting the tree watcher")?;
    watcher
        .watch(tree, notify::RecursiveMode::Recursive)
        .with_context(|| format!("origin.watch: watching {}", tree.display()))?;
    Ok(watcher)
}

/// The directory to read again for a change at `path` (absolute), relative to `tree`, and whether to read it whole:
/// a directory at `path` itself (created, moved in, its mode changed) is read whole, anything else has its parent
/// read. `None` when the path cannot be placed in the tree (read everything).
fn changed_dir(tree: &Path, path: &Path) -> Option<(String, bool)> {
    let rel = path.strip_prefix(tree).ok()?.to_str()?.to_owned();
    if rel.is_empty() {
        return Some((rel, true));
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Some((rel, true));
    }
    Some((rel.rfind('/').map_or("", |i| &rel[..i]).to_owned(), false))
}
