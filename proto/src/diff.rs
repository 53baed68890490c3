//! `diff(old, new)`: what changed between two manifests, loading only the nodes that differ.
//!
//! Both directory trees are walked side by side as streams of *items*, each either a whole subtree (a node hash at
//! a known level) or an entry. Two subtrees with the same hash are skipped without being loaded; otherwise the one
//! at the higher level is opened. Because page boundaries depend only on names, identical runs of entries are
//! identical nodes on both sides, so the walk opens the changed leaves, the interior nodes above them and little
//! else ([`DiffStats::nodes_loaded`] counts them).
//!
//! Output order: entries in path order; an added directory comes before its contents, a removed directory after
//! them. A directory whose contents changed but whose own mode did not produces no change of its own. Entries of
//! the new tree are checked as they are visited: symlinks may not escape the tree, directories may not nest deeper
//! than `PATH_DEPTH_MAX`.

use thiserror::Error;

use crate::entry::{Entry, EntryKind};
use crate::node::{Node, NodeError, NodeHash, verify_node};
use crate::node_store::{NodeSource, SourceError};
use crate::path::{PATH_DEPTH_MAX, PathError, check_symlink_within, depth, join};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Path relative to the tree root.
    pub path: String,
    /// The entry in the old tree, if any.
    pub old: Option<Entry>,
    /// The entry in the new tree, if any.
    pub new: Option<Entry>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Nodes read from the source (both trees together).
    pub nodes_loaded: usize,
    /// Bytes of those nodes.
    pub bytes_loaded: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiffError {
    #[error("node {0} is not held")]
    Missing(NodeHash),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("node {hash} is at level {found}, expected {expected}")]
    Level { hash: NodeHash, expected: u8, found: u8 },
    #[error("{path}: {source}")]
    Path { path: String, source: PathError },
}

/// The changes that turn the tree at `old` (or an empty tree) into the tree at `new`.
pub fn diff(
    source: &impl NodeSource,
    old: Option<&NodeHash>,
    new: &NodeHash,
) -> Result<(Vec<Change>, DiffStats), DiffError> {
    let mut walk = Walk { source, stats: DiffStats::default(), changes: Vec::new() };
    walk.dir("", old, Some(new))?;
    Ok((walk.changes, walk.stats))
}

enum Item {
    Subtree { hash: NodeHash, level: u8 },
    Entry(Entry),
}

/// What the merge loop does next; decided on borrowed tops, done on popped ones.
enum Step {
    SkipBoth,
    Expand { a: bool, b: bool },
    TakeOld,
    TakeNew,
    TakeBoth,
}

/// One side of the walk: a stack of items whose top is the next in name order.
struct Cursor {
    stack: Vec<Item>,
}

struct Walk<'a, S> {
    source: &'a S,
    stats: DiffStats,
    changes: Vec<Change>,
}

impl<S: NodeSource> Walk<'_, S> {
    fn load(&mut self, hash: &NodeHash) -> Result<Node, DiffError> {
        if let Some(node) = self.source.verified_node(hash) {
            self.stats.nodes_loaded += 1;
            return Ok(node);
        }
        let bytes = self.source.node_bytes(hash)?.ok_or(DiffError::Missing(*hash))?;
        self.stats.nodes_loaded += 1;
        self.stats.bytes_loaded += bytes.len();
        Ok(verify_node(hash, &bytes)?)
    }

    /// A cursor over the directory whose tree root is `root` (empty for `None`).
    fn open(&mut self, root: Option<&NodeHash>) -> Result<Cursor, DiffError> {
        let mut cursor = Cursor { stack: Vec::new() };
        if let Some(root) = root {
            let node = self.load(root)?;
            push_children(&mut cursor, node);
        }
        Ok(cursor)
    }

    /// Replaces the subtree on top of `cursor` by its children.
    fn expand(&mut self, cursor: &mut Cursor) -> Result<(), DiffError> {
        if let Some(Item::Subtree { hash, level }) = cursor.stack.pop() {
            let node = self.load(&hash)?;
            if node.level() != level {
                return Err(DiffError::Level { hash, expected: level, found: node.level() });
            }
            push_children(cursor, node);
        }
        Ok(())
    }

    fn dir(&mut self, path: &str, old: Option<&NodeHash>, new: Option<&NodeHash>) -> Result<(), DiffError> {
        if old == new {
            return Ok(());
        }
        let mut a = self.open(old)?;
        let mut b = self.open(new)?;
        loop {
            let step = match (a.stack.last(), b.stack.last()) {
                (None, None) => return Ok(()),
                (Some(Item::Subtree { hash: ha, .. }), Some(Item::Subtree { hash: hb, .. })) if ha == hb => {
                    Step::SkipBoth
                }
                (Some(Item::Subtree { level: la, .. }), Some(Item::Subtree { level: lb, .. })) => {
                    Step::Expand { a: la >= lb, b: lb >= la }
                }
                (Some(Item::Subtree { .. }), _) => Step::Expand { a: true, b: false },
                (_, Some(Item::Subtree { .. })) => Step::Expand { a: false, b: true },
                (Some(Item::Entry(ea)), Some(Item::Entry(eb))) => match ea.name.cmp(&eb.name) {
                    std::cmp::Ordering::Less => Step::TakeOld,
                    std::cmp::Ordering::Greater => Step::TakeNew,
                    std::cmp::Ordering::Equal => Step::TakeBoth,
                },
                (Some(Item::Entry(_)), None) => Step::TakeOld,
                (None, Some(Item::Entry(_))) => Step::TakeNew,
            };
            match step {
                Step::SkipBoth => {
                    a.stack.pop();
                    b.stack.pop();
                }
                Step::Expand { a: expand_a, b: expand_b } => {
                    if expand_a {
                        self.expand(&mut a)?;
                    }
                    if expand_b {
                        self.expand(&mut b)?;
                    }
                }
                Step::TakeOld => {
                    if let Some(Item::Entry(old)) = a.stack.pop() {
                        self.removed(path, old)?;
                    }
                }
                Step::TakeNew => {
                    if let Some(Item::Entry(new)) = b.stack.pop() {
                        self.added(path, new)?;
                    }
                }
                Step::TakeBoth => {
                    if let (Some(Item::Entry(old)), Some(Item::Entry(new))) = (a.stack.pop(), b.stack.pop()) {
                        self.changed(path, old, new)?;
                    }
                }
            }
        }
    }

    fn check_new(&self, dir: &str, entry: &Entry) -> Result<(), DiffError> {
        let path_error = |source| DiffError::Path { path: join(dir, &entry.name), source };
        match &entry.kind {
            EntryKind::Symlink { target } => check_symlink_within(depth(dir), target).map_err(path_error),
            EntryKind::Dir { .. } if depth(dir) + 1 > PATH_DEPTH_MAX => {
                Err(path_error(PathError::TooDeep { depth: depth(dir) + 1, max: PATH_DEPTH_MAX }))
            }
            _ => Ok(()),
        }
    }

    fn added(&mut self, dir: &str, entry: Entry) -> Result<(), DiffError> {
        self.check_new(dir, &entry)?;
        let path = join(dir, &entry.name);
        let root = match &entry.kind {
            EntryKind::Dir { root, .. } => Some(*root),
            _ => None,
        };
        self.changes.push(Change { path: path.clone(), old: None, new: Some(entry) });
        if let Some(root) = root {
            self.dir(&path, None, Some(&root))?;
        }
        Ok(())
    }

    fn removed(&mut self, dir: &str, entry: Entry) -> Result<(), DiffError> {
        let path = join(dir, &entry.name);
        if let EntryKind::Dir { root, .. } = &entry.kind {
            self.dir(&path, Some(root), None)?;
        }
        self.changes.push(Change { path, old: Some(entry), new: None });
        Ok(())
    }

    fn changed(&mut self, dir: &str, old: Entry, new: Entry) -> Result<(), DiffError> {
        if old == new {
            return Ok(());
        }
        match (&old.kind, &new.kind) {
            (EntryKind::Dir { mode: old_mode, root: old_root }, EntryKind::Dir { mode: new_mode, root: new_root }) => {
                self.check_new(dir, &new)?;
                let path = join(dir, &new.name);
                let (old_root, new_root) = (*old_root, *new_root);
                if old_mode != new_mode {
                    self.changes.push(Change { path: path.clone(), old: Some(old), new: Some(new) });
                }
                self.dir(&path, Some(&old_root), Some(&new_root))
            }
            (EntryKind::Dir { .. }, _) | (_, EntryKind::Dir { .. }) => {
                self.removed(dir, old)?;
                self.added(dir, new)
            }
            _ => {
                self.check_new(dir, &new)?;
                self.changes.push(Change { path: join(dir, &new.name), old: Some(old), new: Some(new) });
                Ok(())
            }
        }
    }
}

fn push_children(cursor: &mut Cursor, node: Node) {
    match node {
        Node::Leaf { entries } => cursor.stack.extend(entries.into_iter().rev().map(Item::Entry)),
        Node::Interior { level, children } => {
            cursor.stack.extend(children.into_iter().rev().map(|hash| Item::Subtree { hash, level: level - 1 }))
        }
    }
}
