//! A manifest entry: one name in a directory and what it is (file, symlink or directory).

use serde::{Deserialize, Serialize};

use crate::chunk::{CHUNK_SIZE, ChunkId, chunk_count};
use crate::node::NodeHash;
use crate::path::{validate_name, validate_symlink_target};
use crate::wire::{DecodeError, bounded_vec};

/// Permission bits kept for files and directories (setuid/setgid/sticky and rwx); file type bits are implied by
/// the entry kind.
pub const MODE_BITS: u32 = 0o7777;
/// Permission bits a node gives what it publishes and what it applies: read and execute as the origin set them,
/// write for the owner only; never setuid, setgid or sticky, never writable by group or others. A mirror running as
/// root must not create setuid files from a manifest, and a hardened service (`RestrictSUIDSGID=yes`) cannot.
pub const SERVED_MODE_MASK: u32 = 0o755;

/// `mode` as it is published and applied (see [`SERVED_MODE_MASK`]).
pub fn served_mode(mode: u32) -> u32 {
    mode & SERVED_MODE_MASK
}
/// Largest file a manifest may describe. Alpine's largest package is 124 MiB; this leaves room for installer
/// images while keeping one entry's chunk list (8,192 ids, 264 KiB) well inside a manifest node.
pub const FILE_SIZE_MAX: u64 = 8 << 30;
/// Most chunks one file may have: `FILE_SIZE_MAX / CHUNK_SIZE`.
pub const FILE_CHUNKS_MAX: usize = (FILE_SIZE_MAX / CHUNK_SIZE) as usize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File(FileMeta),
    /// A symbolic link; its target obeys the rules in [`crate::path`].
    Symlink {
        target: String,
    },
    /// A directory; `root` names the top node of its own paged tree.
    Dir {
        mode: u32,
        root: NodeHash,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub mode: u32,
    pub size: u64,
    /// Modification time, seconds since the Unix epoch (what `rsync --times` preserves).
    pub mtime: i64,
    /// `chunk_count(size)` ids, in file order.
    #[serde(deserialize_with = "bounded_vec::<_, _, FILE_CHUNKS_MAX>")]
    pub chunks: Vec<ChunkId>,
}

impl Entry {
    pub fn file(name: impl Into<String>, meta: FileMeta) -> Self {
        Self { name: name.into(), kind: EntryKind::File(meta) }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir { .. })
    }

    /// Checks everything that can be checked about one entry on its own.
    pub fn validate(&self) -> Result<(), DecodeError> {
        validate_name(&self.name)?;
        self.kind.validate()
    }

    /// A deterministic stand-in for the entry's encoded size, used by the page builder to cap a page's bytes.
    /// Part of the format: changing it changes page boundaries.
    pub fn weight(&self) -> usize {
        self.name.len()
            + 16
            + match &self.kind {
                EntryKind::File(meta) => 33 * meta.chunks.len(),
                EntryKind::Symlink { target } => target.len(),
                EntryKind::Dir { .. } => 33,
            }
    }
}

impl EntryKind {
    /// Checks what can be checked about an entry's kind on its own (a symlink's target syntax, not where it
    /// points: that needs the link's position, see [`crate::path::check_symlink_within`]).
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            EntryKind::File(meta) => meta.validate(),
            EntryKind::Symlink { target } => Ok(validate_symlink_target(target)?),
            EntryKind::Dir { mode, .. } if mode & !MODE_BITS != 0 => {
                Err(DecodeError::Invalid("mode has non-permission bits"))
            }
            EntryKind::Dir { .. } => Ok(()),
        }
    }
}

impl FileMeta {
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.mode & !MODE_BITS != 0 {
            return Err(DecodeError::Invalid("mode has non-permission bits"));
        }
        if self.size > FILE_SIZE_MAX {
            return Err(DecodeError::Invalid("file size above FILE_SIZE_MAX"));
        }
        if self.chunks.len() as u64 != chunk_count(self.size) {
            return Err(DecodeError::Invalid("chunk count does not match file size"));
        }
        Ok(())
    }
}
