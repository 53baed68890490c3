//! Control-plane messages: what nodes say to each other over libp2p (gossip and request-response), apart from
//! chunk data.
//!
//! - Gossip topic `mirrormesh/<repo>/roots/1` carries encoded [`SignedRoot`]s.
//! - Request-response protocol `/mirrormesh/control/1` carries one [`ControlRequest`] and one [`ControlResponse`]
//!   per stream, each framed as a 4-byte big-endian length and the wire encoding.
//!
//! Every node sends `Hello` on every new connection (anti-entropy: the latest root, the snapshot it holds, where
//! its data plane listens), `Have` whenever it holds more chunks of the snapshot it is syncing to, and fetches
//! manifest nodes and deltas by hash from any peer.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::delta::DeltaHash;
use crate::node::NodeHash;
use crate::root::{RepoId, SignedRoot};
use crate::wire::{self, DecodeError, bounded_vec};

/// Largest encoded control request.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 256 << 10;
/// Largest encoded control response (a batch of manifest nodes, or a delta).
pub const CONTROL_RESPONSE_BYTES_MAX: usize = crate::delta::DELTA_BYTES_MAX + 1024;
/// Most node hashes in one `GetNodes`.
pub const NODES_PER_REQUEST_MAX: usize = 256;
/// Most chunk ids in one `Have`.
pub const HAVE_CHUNKS_MAX: usize = 4096;
/// Most data-plane addresses in one `Hello`.
pub const DATA_ADDRS_MAX: usize = 8;
/// Longest data-plane address text.
pub const DATA_ADDR_BYTES_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub repo: RepoId,
    /// The newest root this node accepted (or published).
    pub root: Option<SignedRoot>,
    /// Sequence number of the snapshot this node holds completely (serves every chunk of).
    pub complete_seq: Option<u64>,
    /// Where this node's data plane listens, as `ip:port` (an unspecified ip means "the address you reached me at").
    #[serde(deserialize_with = "bounded_vec::<_, _, DATA_ADDRS_MAX>")]
    pub data_addrs: Vec<String>,
}

/// "I hold these chunks" (in addition to the snapshot `complete_seq`, if any).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Have {
    pub repo: RepoId,
    /// The snapshot the sender is syncing to.
    pub seq: u64,
    pub complete_seq: Option<u64>,
    #[serde(deserialize_with = "bounded_vec::<_, _, HAVE_CHUNKS_MAX>")]
    pub chunks: Vec<ChunkId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    Hello(Hello),
    GetNodes {
        #[serde(deserialize_with = "bounded_vec::<_, _, NODES_PER_REQUEST_MAX>")]
        hashes: Vec<NodeHash>,
    },
    GetDelta {
        hash: DeltaHash,
    },
    Have(Have),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Hello(Hello),
    /// One entry per requested hash, in order; `None` where the node does not hold it.
    Nodes {
        #[serde(deserialize_with = "bounded_vec::<_, _, NODES_PER_REQUEST_MAX>")]
        nodes: Vec<Option<serde_bytes::ByteBuf>>,
    },
    Delta {
        delta: Option<serde_bytes::ByteBuf>,
    },
    Ack,
    /// The request was understood but refused (wrong repository, over a limit, not allowed).
    Refused {
        reason: String,
    },
}

impl ControlRequest {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let request: ControlRequest = wire::decode(bytes, CONTROL_REQUEST_BYTES_MAX)?;
        if let ControlRequest::Hello(hello) = &request {
            hello.validate()?;
        }
        Ok(request)
    }
}

impl ControlResponse {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let response: ControlResponse = wire::decode(bytes, CONTROL_RESPONSE_BYTES_MAX)?;
        match &response {
            ControlResponse::Hello(hello) => hello.validate()?,
            ControlResponse::Refused { reason } if reason.len() > 1024 => {
                return Err(DecodeError::Invalid("refusal reason too long"));
            }
            _ => {}
        }
        Ok(response)
    }
}

impl Hello {
    fn validate(&self) -> Result<(), DecodeError> {
        if self.data_addrs.iter().any(|a| a.len() > DATA_ADDR_BYTES_MAX) {
            return Err(DecodeError::Invalid("data address too long"));
        }
        Ok(())
    }
}

/// Gossip topic name of a repository's roots.
pub fn roots_topic(repo: &RepoId) -> String {
    format!("mirrormesh/{repo}/roots/1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_limits() {
        let repo = RepoId::new("alpine").unwrap();
        let have = ControlRequest::Have(Have {
            repo: repo.clone(),
            seq: 3,
            complete_seq: Some(2),
            chunks: vec![ChunkId([1; 32])],
        });
        assert_eq!(ControlRequest::decode(&have.encode()), Ok(have));
        let too_many = ControlRequest::GetNodes { hashes: vec![NodeHash([0; 32]); NODES_PER_REQUEST_MAX + 1] };
        assert!(matches!(ControlRequest::decode(&too_many.encode()), Err(DecodeError::Malformed(_))));
        let hello =
            ControlResponse::Hello(Hello { repo, root: None, complete_seq: None, data_addrs: vec!["x".repeat(65)] });
        assert_eq!(ControlResponse::decode(&hello.encode()), Err(DecodeError::Invalid("data address too long")));
        let nodes = ControlResponse::Nodes { nodes: vec![Some(serde_bytes::ByteBuf::from(vec![1, 2, 3])), None] };
        assert_eq!(ControlResponse::decode(&nodes.encode()), Ok(nodes));
    }
}
