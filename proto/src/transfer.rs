//! Data-plane messages: chunk transfer over a QUIC connection (quinn, TLS 1.3 with AES-GCM, both ends
//! authenticated by their node identity).
//!
//! One bidirectional stream per request. The requester writes one frame holding a [`ChunkRequest`] and finishes
//! its side. The responder answers, for each requested chunk in order, one frame holding a [`ChunkReply`], and
//! after a `Data { len }` reply exactly `len` raw bytes of the chunk; then it finishes the stream. A frame is a
//! 4-byte big-endian length and the wire encoding of the value. The requester hashes every chunk and accepts it only
//! if it matches the id it asked for.

use serde::{Deserialize, Serialize};

use crate::chunk::{CHUNK_SIZE, ChunkId};
use crate::root::RepoId;
use crate::wire::{self, DecodeError, bounded_vec};

/// ALPN protocol name of the data plane.
pub const DATA_ALPN: &[u8] = b"mirrormesh-data/1";
/// Largest frame (request or reply header).
pub const FRAME_BYTES_MAX: usize = 16 << 10;
/// Most chunks in one request.
pub const CHUNKS_PER_REQUEST_MAX: usize = 256;
/// Most peers named in one redirect.
pub const REDIRECT_PEERS_MAX: usize = 8;
/// Longest peer identity in a redirect (libp2p peer ids are 38 bytes).
pub const PEER_ID_BYTES_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub repo: RepoId,
    #[serde(deserialize_with = "bounded_vec::<_, _, CHUNKS_PER_REQUEST_MAX>")]
    pub chunks: Vec<ChunkId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkReply {
    /// The chunk's bytes follow.
    Data { len: u32 },
    /// This node does not hold the chunk.
    Missing,
    /// The origin's super-seeding answer: these peers hold (or are receiving) the chunk; ask them.
    Elsewhere {
        #[serde(deserialize_with = "bounded_vec::<_, _, REDIRECT_PEERS_MAX>")]
        peers: Vec<serde_bytes::ByteBuf>,
    },
}

impl ChunkRequest {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let request: ChunkRequest = wire::decode(bytes, FRAME_BYTES_MAX)?;
        if request.chunks.is_empty() {
            return Err(DecodeError::Invalid("empty chunk request"));
        }
        Ok(request)
    }
}

impl ChunkReply {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let reply: ChunkReply = wire::decode(bytes, FRAME_BYTES_MAX)?;
        match &reply {
            ChunkReply::Data { len } if u64::from(*len) > CHUNK_SIZE || *len == 0 => {
                Err(DecodeError::Invalid("chunk length out of range"))
            }
            ChunkReply::Elsewhere { peers } if peers.iter().any(|p| p.len() > PEER_ID_BYTES_MAX) => {
                Err(DecodeError::Invalid("peer id too long"))
            }
            _ => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_limits() {
        let request = ChunkRequest { repo: RepoId::new("alpine").unwrap(), chunks: vec![ChunkId([3; 32]); 2] };
        assert_eq!(ChunkRequest::decode(&request.encode()), Ok(request.clone()));
        let empty = ChunkRequest { chunks: vec![], ..request.clone() };
        assert!(ChunkRequest::decode(&empty.encode()).is_err());
        let over = ChunkRequest { chunks: vec![ChunkId([0; 32]); CHUNKS_PER_REQUEST_MAX + 1], ..request };
        assert!(ChunkRequest::decode(&over.encode()).is_err());
        assert!(ChunkReply::decode(&ChunkReply::Data { len: (CHUNK_SIZE + 1) as u32 }.encode()).is_err());
        assert!(ChunkReply::decode(&ChunkReply::Data { len: 0 }.encode()).is_err());
        assert_eq!(ChunkReply::decode(&ChunkReply::Missing.encode()), Ok(ChunkReply::Missing));
    }
}
