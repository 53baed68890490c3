//! Where each chunk of the applied snapshot lives in the served tree, so the node can serve chunks from the files it
//! already serves (no second copy) and stage unchanged chunks locally instead of fetching them.
//!
//! Built from the manifest at start-up and updated on every apply. Held in memory: about 80 bytes per chunk
//! (a 3.6 GiB Alpine repository has ~8,100 chunks; a full 2 TB mirror ~2 million, ~160 MB).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::diff::{Change, diff};
use mirrormesh_proto::entry::{EntryKind, FileMeta};
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::node_store::NodeSource;

/// One place a chunk can be read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Path relative to the tree root.
    pub path: Arc<str>,
    /// Chunk index within the file.
    pub index: u32,
    /// Size of the whole file (to find the chunk's length).
    pub file_size: u64,
}

#[derive(Default)]
pub struct ChunkIndex {
    map: HashMap<ChunkId, Vec<ChunkLoc>>,
}

impl ChunkIndex {
    /// The index of the snapshot at `root`.
    pub fn build(source: &impl NodeSource, root: &NodeHash) -> Result<Self> {
        let (changes, _) = diff(source, None, root).context("walking the applied manifest")?;
        let mut index = Self::default();
        index.apply(&changes);
        Ok(index)
    }

    /// Follows a diff: chunks of removed or replaced files are forgotten, those of new files recorded.
    pub fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            if let Some(EntryKind::File(meta)) = change.old.as_ref().map(|e| &e.kind) {
                self.remove_file(&change.path, meta);
            }
        }
        for change in changes {
            if let Some(EntryKind::File(meta)) = change.new.as_ref().map(|e| &e.kind) {
                let path: Arc<str> = Arc::from(change.path.as_str());
                for (i, id) in meta.chunks.iter().enumerate() {
                    self.map.entry(*id).or_default().push(ChunkLoc {
                        path: path.clone(),
                        index: i as u32,
                        file_size: meta.size,
                    });
                }
            }
        }
    }

    fn remove_file(&mut self, path: &str, meta: &FileMeta) {
        for id in &meta.chunks {
            if let Some(locs) = self.map.get_mut(id) {
                locs.retain(|l| &*l.path != path);
                if locs.is_empty() {
                    self.map.remove(id);
                }
            }
        }
    }

    pub fn locations(&self, id: &ChunkId) -> &[ChunkLoc] {
        self.map.get(id).map_or(&[], Vec::as_slice)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.map.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
