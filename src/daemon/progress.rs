//! Which files of the snapshot being synced still miss chunks (for `/repos` and the dashboard).

use std::collections::HashMap;

use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::sync::StageFile;

pub struct FileProgress {
    pub seq: u64,
    /// For each chunk not yet held, the files it belongs to.
    waiting: HashMap<ChunkId, Vec<u32>>,
    /// Chunks each file still misses.
    left: Vec<u32>,
    files_missing: u64,
}

impl FileProgress {
    /// Files to stage for snapshot `seq`; none of their chunks are held yet.
    pub fn new(seq: u64, files: &[StageFile]) -> Self {
        let mut waiting: HashMap<ChunkId, Vec<u32>> = HashMap::new();
        let mut left = Vec::with_capacity(files.len());
        for (i, file) in files.iter().enumerate() {
            let mut distinct = 0;
            for id in &file.meta.chunks {
                let owners = waiting.entry(*id).or_default();
                if owners.last() != Some(&(i as u32)) {
                    owners.push(i as u32);
                    distinct += 1;
                }
            }
            left.push(distinct);
        }
        let files_missing = left.iter().filter(|&&n| n > 0).count() as u64;
        Self { seq, waiting, left, files_missing }
    }

    /// Chunk `id` is held now.
    pub fn held(&mut self, id: &ChunkId) {
        for file in self.waiting.remove(id).unwrap_or_default() {
            let n = &mut self.left[file as usize];
            *n -= 1;
            if *n == 0 {
                self.files_missing -= 1;
            }
        }
    }

    pub fn files_missing(&self) -> u64 {
        self.files_missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrormesh_proto::entry::FileMeta;

    fn file(path: &str, chunks: &[u8]) -> StageFile {
        let chunks: Vec<ChunkId> = chunks.iter().map(|b| ChunkId([*b; 32])).collect();
        StageFile { path: path.into(), meta: FileMeta { mode: 0o644, size: 0, mtime: 0, chunks } }
    }

    #[test]
    fn a_file_is_done_when_its_last_chunk_arrives() {
        // b shares chunk 2 with a and holds chunk 3 twice; c is empty.
        let mut p = FileProgress::new(1, &[file("a", &[1, 2]), file("b", &[2, 3, 3]), file("c", &[])]);
        assert_eq!(p.files_missing(), 2);
        p.held(&ChunkId([2; 32]));
        assert_eq!(p.files_missing(), 2);
        p.held(&ChunkId([3; 32]));
        assert_eq!(p.files_missing(), 1);
        p.held(&ChunkId([3; 32]));
        assert_eq!(p.files_missing(), 1);
        p.held(&ChunkId([1; 32]));
        assert_eq!(p.files_missing(), 0);
    }
}
