//! Control-plane messages: what nodes say to each other over libp2p (gossip and request-response), apart from
//! chunk data.
//!
//! - Gossip topic `mirrormesh/<repo>/roots/1` carries encoded [`SignedRoot`]s.
//! - Request-response protocol `/mirrormesh/control/1` carries one [`ControlRequest`] and one [`ControlResponse`]
//!   per stream, each framed as a 4-byte big-endian length and the wire encoding.
//!
//! Every node sends `Hello` on every new connection (anti-entropy: the latest root, the snapshot it holds, where
//! its data plane listens), `Have` whenever it holds more chunks of the snapshot it is syncing to, and fetches
//! manifest nodes and deltas by hash from any peer. The dialer of a connection also sends `Members` (where its
//! control plane listens and the fabric's members it knows) and gets the other side's in the answer; nodes repeat
//! the exchange with one peer at a time (`membership` in this crate decides what is kept).

use core::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::delta::DeltaHash;
use crate::node::NodeHash;
use crate::root::{RepoId, SignedRoot};
use crate::transfer::PEER_ID_BYTES_MAX;
use crate::wire::{self, DecodeError, bounded_vec};

/// Largest encoded control request.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 256 << 10;
/// Largest encoded control response (a batch of manifest nodes, or a delta).
pub const CONTROL_RESPONSE_BYTES_MAX: usize = crate::delta::DELTA_BYTES_MAX + 1024;
/// Most node hashes in one `GetNodes`.
pub const NODES_PER_REQUEST_MAX: usize = 256;
/// Bytes of manifest nodes in one `Nodes` answer (the nodes named and their descendants together).
pub const NODES_RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Most descendants one `Nodes` answer carries beside the nodes asked for (and most a `GetNodes` asks for).
pub const DESCENDANTS_PER_ANSWER_MAX: usize = 4096;
/// Most chunk ids in one `Have`.
pub const HAVE_CHUNKS_MAX: usize = 4096;
/// Most data-plane addresses in one `Hello`.
pub const DATA_ADDRS_MAX: usize = 8;
/// Longest data-plane address text.
pub const DATA_ADDR_BYTES_MAX: usize = 64;
/// Most members in one `Members` message: the most a node keeps ([`crate::membership::MEMBERS_MAX`]).
pub const MEMBERS_PER_MESSAGE_MAX: usize = crate::membership::MEMBERS_MAX;
/// Most addresses of one node in a `Members` message (a receiver keeps at most
/// [`crate::membership::PEER_ADDRS_MAX`] of them).
pub const MEMBER_ADDRS_MAX: usize = 8;

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

/// Peer exchange: where the sender's control plane listens and the members of the fabric it knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub repo: RepoId,
    /// Where the sender's control plane (QUIC) listens; an unspecified ip means "the ip you see me at".
    #[serde(deserialize_with = "bounded_vec::<_, _, MEMBER_ADDRS_MAX>")]
    pub listen: Vec<SocketAddr>,
    /// Members the sender knows, most recently seen first (neither the sender nor the receiver).
    #[serde(deserialize_with = "bounded_vec::<_, _, MEMBERS_PER_MESSAGE_MAX>")]
    pub members: Vec<MemberEntry>,
}

/// One member in a `Members` message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// Its node id (libp2p peer id bytes).
    pub id: serde_bytes::ByteBuf,
    /// Its control-plane addresses, as the sender knows them.
    #[serde(deserialize_with = "bounded_vec::<_, _, MEMBER_ADDRS_MAX>")]
    pub addrs: Vec<SocketAddr>,
    /// How long ago the sender last saw it connected (0: it is connected now).
    pub seen_ago_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    Hello(Hello),
    /// The nodes named, and up to `descendants_max` nodes below them (breadth first) that the asker has not
    /// named: a fresh mirror's first manifest comes in one round trip per few thousand nodes, not one per level.
    GetNodes {
        #[serde(deserialize_with = "bounded_vec::<_, _, NODES_PER_REQUEST_MAX>")]
        hashes: Vec<NodeHash>,
        descendants_max: u16,
    },
    GetDelta {
        hash: DeltaHash,
    },
    Have(Have),
    /// Peer exchange; answered with `ControlResponse::Members`.
    Members(Members),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Hello(Hello),
    /// One entry per requested hash, in order; `None` where the node does not hold it.
    Nodes {
        #[serde(deserialize_with = "bounded_vec::<_, _, NODES_PER_REQUEST_MAX>")]
        nodes: Vec<Option<serde_bytes::ByteBuf>>,
        /// Nodes below those answered, breadth first: each a child of a node answered or listed before it.
        #[serde(deserialize_with = "bounded_vec::<_, _, DESCENDANTS_PER_ANSWER_MAX>")]
        descendants: Vec<serde_bytes::ByteBuf>,
    },
    Delta {
        delta: Option<serde_bytes::ByteBuf>,
    },
    Ack,
    /// The request was understood but refused (wrong repository, over a limit, not allowed).
    Refused {
        reason: String,
    },
    Members(Members),
}

impl ControlRequest {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let request: ControlRequest = wire::decode(bytes, CONTROL_REQUEST_BYTES_MAX)?;
        match &request {
            ControlRequest::Hello(hello) => hello.validate()?,
            ControlRequest::Members(members) => members.validate()?,
            _ => {}
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
            ControlResponse::Members(members) => members.validate()?,
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

impl Members {
    fn validate(&self) -> Result<(), DecodeError> {
        if self.members.iter().any(|m| m.id.is_empty() || m.id.len() > PEER_ID_BYTES_MAX) {
            return Err(DecodeError::Invalid("member id empty or too long"));
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
        let too_many =
            ControlRequest::GetNodes { hashes: vec![NodeHash([0; 32]); NODES_PER_REQUEST_MAX + 1], descendants_max: 0 };
        assert!(matches!(ControlRequest::decode(&too_many.encode()), Err(DecodeError::Malformed(_))));
        let hello =
            ControlResponse::Hello(Hello { repo, root: None, complete_seq: None, data_addrs: vec!["x".repeat(65)] });
        assert_eq!(ControlResponse::decode(&hello.encode()), Err(DecodeError::Invalid("data address too long")));
        let nodes = ControlResponse::Nodes {
            nodes: vec![Some(serde_bytes::ByteBuf::from(vec![1, 2, 3])), None],
            descendants: vec![serde_bytes::ByteBuf::from(vec![4])],
        };
        assert_eq!(ControlResponse::decode(&nodes.encode()), Ok(nodes));
        let too_many = ControlResponse::Nodes {
            nodes: Vec::new(),
            descendants: vec![serde_bytes::ByteBuf::new(); DESCENDANTS_PER_ANSWER_MAX + 1],
        };
        assert!(matches!(ControlResponse::decode(&too_many.encode()), Err(DecodeError::Malformed(_))));
    }

    fn members(entries: usize, addrs: usize, id_len: usize) -> Members {
        let v6: SocketAddr = "[2001:db8::1]:65535".parse().unwrap();
        Members {
            repo: RepoId::new(&"r".repeat(crate::root::REPO_NAME_BYTES_MAX)).unwrap(),
            listen: vec![v6; MEMBER_ADDRS_MAX],
            members: (0..entries)
                .map(|_| MemberEntry {
                    id: serde_bytes::ByteBuf::from(vec![7; id_len]),
                    addrs: vec![v6; addrs],
                    seen_ago_ms: u64::MAX,
                })
                .collect(),
        }
    }

    #[test]
    fn a_members_list_is_bounded_and_the_largest_one_accepted_fits_a_request() {
        let largest = ControlRequest::Members(members(MEMBERS_PER_MESSAGE_MAX, MEMBER_ADDRS_MAX, PEER_ID_BYTES_MAX));
        let bytes = largest.encode();
        assert!(bytes.len() <= CONTROL_REQUEST_BYTES_MAX, "{} bytes", bytes.len());
        // What an 8-mirror fabric exchanges: one IPv4 address each, 38-byte ed25519 peer ids.
        let v4: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        let entry = MemberEntry { id: serde_bytes::ByteBuf::from(vec![7; 38]), addrs: vec![v4], seen_ago_ms: 0 };
        let typical = ControlRequest::Members(Members {
            repo: RepoId::new("alpine").unwrap(),
            listen: vec![v4],
            members: vec![entry; 8],
        });
        // PROTOCOL.md quotes both sizes.
        assert_eq!(typical.encode().len(), 402);
        assert_eq!(bytes.len(), 241_894);
        assert_eq!(ControlRequest::decode(&bytes), Ok(largest));
        let too_many = ControlRequest::Members(members(MEMBERS_PER_MESSAGE_MAX + 1, 1, 38));
        assert!(matches!(ControlRequest::decode(&too_many.encode()), Err(DecodeError::Malformed(_))));
        let too_many_addrs = ControlResponse::Members(members(1, MEMBER_ADDRS_MAX + 1, 38));
        assert!(matches!(ControlResponse::decode(&too_many_addrs.encode()), Err(DecodeError::Malformed(_))));
        let long_id = ControlResponse::Members(members(1, 1, PEER_ID_BYTES_MAX + 1));
        assert_eq!(
            ControlResponse::decode(&long_id.encode()),
            Err(DecodeError::Invalid("member id empty or too long"))
        );
        let no_id = ControlRequest::Members(members(1, 1, 0));
        assert_eq!(ControlRequest::decode(&no_id.encode()), Err(DecodeError::Invalid("member id empty or too long")));
    }
}
