//! The content model: a file's bytes are cut into fixed-size chunks, each named by the blake3 hash of its bytes.
//!
//! Why 1 MiB (see PROTOCOL.md, "Chunk size", for the numbers): 93% of Alpine packages fit in one chunk, so for
//! most files "a chunk" is "the file" and the per-request cost is paid per *batch* of files, not per chunk; the large
//! files that carry most of the bytes (p99 15 MiB, max 124 MiB) still split into 15 to 125 pieces, enough to be
//! fetched from several peers at once; and the chunk ids of a 3.6 GiB repository stay at ~8,100 (260 KB).

use crate::hash_id::hash_id;

/// Size of every chunk but a file's last, in bytes.
pub const CHUNK_SIZE: u64 = 1 << 20;

hash_id!(
    /// blake3 of a chunk's bytes. A chunk of a file no larger than one chunk has the same id as `b3sum` prints for
    /// the file.
    ChunkId
);

impl ChunkId {
    /// The id of these bytes.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

/// Number of chunks of a file of `size` bytes (an empty file has none).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// Byte range `(offset, len)` of chunk `index` in a file of `size` bytes, or `None` past the end.
pub fn chunk_range(size: u64, index: u64) -> Option<(u64, u64)> {
    let offset = index.checked_mul(CHUNK_SIZE)?;
    if offset >= size {
        return None;
    }
    Some((offset, (size - offset).min(CHUNK_SIZE)))
}

/// Ids of the chunks of `data`, in order (for files held in memory: tests, benchmarks, the simulator).
pub fn chunk_ids(data: &[u8]) -> Vec<ChunkId> {
    data.chunks(CHUNK_SIZE as usize).map(ChunkId::of).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ranges() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_SIZE), 1);
        assert_eq!(chunk_count(CHUNK_SIZE + 1), 2);
        assert_eq!(chunk_range(CHUNK_SIZE + 5, 1), Some((CHUNK_SIZE, 5)));
        assert_eq!(chunk_range(CHUNK_SIZE + 5, 2), None);
        assert_eq!(chunk_range(0, 0), None);
        assert_eq!(chunk_range(10, u64::MAX), None);
    }

    #[test]
    fn single_chunk_id_is_plain_blake3() {
        let data = b"hello mirror";
        assert_eq!(ChunkId::of(data).0, *blake3::hash(data).as_bytes());
        assert_eq!(chunk_ids(data), vec![ChunkId::of(data)]);
    }

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"x");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(id.to_string().len(), 12);
        assert!(ChunkId::from_hex("zz").is_none());
    }
}
