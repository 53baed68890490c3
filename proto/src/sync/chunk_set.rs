//! The set of chunk ids of one snapshot, as the origin knows it: what it may be asked for and what peers may
//! sensibly announce to it. A sorted vector: 32 bytes per chunk (a 2 TB mirror's ~2 million chunks take 64 MB), a
//! binary search per lookup.

use crate::chunk::ChunkId;
use crate::diff::{DiffError, diff};
use crate::entry::EntryKind;
use crate::node::NodeHash;
use crate::node_store::NodeSource;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkSet {
    /// Sorted, without duplicates.
    ids: Vec<ChunkId>,
}

impl ChunkSet {
    pub fn new(ids: impl IntoIterator<Item = ChunkId>) -> Self {
        let mut ids: Vec<ChunkId> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.shrink_to_fit();
        Self { ids }
    }

    /// Every chunk of the snapshot at `root` (a walk of its whole manifest: do it off the event loop for a large
    /// tree).
    pub fn of_snapshot(source: &impl NodeSource, root: &NodeHash) -> Result<Self, DiffError> {
        let (changes, _) = diff(source, None, root)?;
        Ok(Self::new(
            changes
                .iter()
                .flat_map(|c| match c.new.as_ref().map(|e| &e.kind) {
                    Some(EntryKind::File(meta)) => meta.chunks.as_slice(),
                    _ => &[],
                })
                .copied(),
        ))
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.ids.binary_search(id).is_ok()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_and_deduplicated() {
        let set = ChunkSet::new([ChunkId([3; 32]), ChunkId([1; 32]), ChunkId([3; 32])]);
        assert_eq!(set.len(), 2);
        assert!(set.contains(&ChunkId([1; 32])) && set.contains(&ChunkId([3; 32])));
        assert!(!set.contains(&ChunkId([2; 32])));
        assert!(ChunkSet::default().is_empty());
    }
}
