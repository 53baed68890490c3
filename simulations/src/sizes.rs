//! Message sizes on the simulated wire, taken from the core's own encoding.
//!
//! Rare messages (hellos, node and delta answers, roots) are encoded for real and measured. The frequent ones
//! (have announcements, chunk requests, chunk reply headers: millions per run) are measured once per shape and
//! extended by the size of their id lists; a test checks the formula against the real encoding.

use mirrormesh_proto::control::{ControlRequest, ControlResponse, Have, Hello};
use mirrormesh_proto::node::NodeHash;
use mirrormesh_proto::root::RepoId;
use mirrormesh_proto::transfer::{ChunkReply, ChunkRequest};

/// Bytes of the data plane's frame length prefix.
pub const FRAME_PREFIX_BYTES: u64 = 4;
/// Bytes a control-plane (libp2p request-response) message costs beyond its encoding: stream setup and framing,
/// a rough figure (the simulator does not model libp2p's multiplexing in detail).
pub const CONTROL_OVERHEAD_BYTES: u64 = 64;

/// Bytes postcard uses for the length `n` (LEB128).
fn varint_len(n: u64) -> u64 {
    u64::from((64 - (n | 1).leading_zeros()).div_ceil(7))
}

/// Sizes for one repository.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// A have with no chunk ids (and `complete_seq` set).
    have_base: u64,
    /// A chunk request with no chunk ids.
    request_base: u64,
}

impl Sizes {
    pub fn new(repo: &RepoId) -> Self {
        let have = ControlRequest::Have(Have { repo: repo.clone(), seq: 1, complete_seq: Some(1), chunks: Vec::new() });
        let request = ChunkRequest { repo: repo.clone(), chunks: Vec::new() };
        Self {
            have_base: have.encode().len() as u64 - varint_len(0),
            request_base: request.encode().len() as u64 - varint_len(0),
        }
    }

    /// A have announcing `chunks` ids (sequence numbers are counted as one byte each; the difference for larger
    /// ones is a byte or two per message).
    pub fn have(&self, chunks: usize) -> u64 {
        self.have_base + varint_len(chunks as u64) + 32 * chunks as u64 + CONTROL_OVERHEAD_BYTES
    }

    /// A chunk request frame for `chunks` ids.
    pub fn chunk_request(&self, chunks: usize) -> u64 {
        FRAME_PREFIX_BYTES + self.request_base + varint_len(chunks as u64) + 32 * chunks as u64
    }

    /// A chunk reply: its header frame and, for data, the chunk bytes.
    pub fn chunk_data(len: u64) -> u64 {
        FRAME_PREFIX_BYTES + ChunkReply::Data { len: len as u32 }.encode().len() as u64 + len
    }

    /// A "missing" reply frame.
    pub fn chunk_missing() -> u64 {
        FRAME_PREFIX_BYTES + ChunkReply::Missing.encode().len() as u64
    }

    /// An "elsewhere" reply naming `peers` peers (libp2p peer ids are 38 bytes).
    pub fn chunk_elsewhere(peers: usize) -> u64 {
        let reply = ChunkReply::Elsewhere { peers: vec![serde_bytes::ByteBuf::from(vec![0u8; 38]); peers] };
        FRAME_PREFIX_BYTES + reply.encode().len() as u64
    }

    pub fn hello(hello: &Hello) -> u64 {
        ControlRequest::Hello(hello.clone()).encode().len() as u64 + CONTROL_OVERHEAD_BYTES
    }

    pub fn get_nodes(hashes: &[NodeHash], descendants_max: u16) -> u64 {
        ControlRequest::GetNodes { hashes: hashes.to_vec(), descendants_max }.encode().len() as u64
            + CONTROL_OVERHEAD_BYTES
    }

    /// The answer to a node request.
    pub fn nodes(nodes: &[Option<Vec<u8>>], descendants: &[Vec<u8>]) -> u64 {
        let nodes = nodes.iter().map(|n| n.clone().map(Into::into)).collect();
        let descendants = descendants.iter().cloned().map(Into::into).collect();
        ControlResponse::Nodes { nodes, descendants }.encode().len() as u64 + CONTROL_OVERHEAD_BYTES
    }

    /// The answer to a delta request.
    pub fn delta(delta: Option<&Vec<u8>>) -> u64 {
        ControlResponse::Delta { delta: delta.cloned().map(Into::into) }.encode().len() as u64 + CONTROL_OVERHEAD_BYTES
    }

    /// A small request or acknowledgement (delta request, cancel, ack).
    pub fn small() -> u64 {
        48 + CONTROL_OVERHEAD_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrormesh_proto::chunk::ChunkId;

    #[test]
    fn formulas_match_the_real_encoding() {
        let repo = RepoId::new("alpine").unwrap();
        let sizes = Sizes::new(&repo);
        for n in [0usize, 1, 5, 127, 128, 300, 4096] {
            let chunks = vec![ChunkId([7; 32]); n];
            let have = ControlRequest::Have(Have { repo: repo.clone(), seq: 1, complete_seq: Some(1), chunks });
            assert_eq!(sizes.have(n), have.encode().len() as u64 + CONTROL_OVERHEAD_BYTES, "have of {n}");
            let request = ChunkRequest { repo: repo.clone(), chunks: vec![ChunkId([7; 32]); n] };
            assert_eq!(sizes.chunk_request(n), FRAME_PREFIX_BYTES + request.encode().len() as u64, "request of {n}");
        }
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert!(Sizes::chunk_data(1 << 20) > 1 << 20);
    }
}
