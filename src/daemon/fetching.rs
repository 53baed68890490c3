//! One chunk request to a peer, run as its own task: fetch over the data plane, keep the verified chunks in staging
//! (on the blocking pool), and report every chunk's outcome to the loop as a [`LoopEvent::Fetched`].

use libp2p::PeerId;
use mirrormesh_proto::chunk::ChunkId;
use mirrormesh_proto::sync::ReqId;
use mirrormesh_proto::sync::scheduler::ChunkOutcome;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;

use super::LoopEvent;
use crate::dataplane::{DataPlane, FetchFailed, FetchFailure, Fetched};
use crate::staging::Staging;

pub struct Fetch {
    pub data: DataPlane,
    pub staging: Arc<Staging>,
    pub peer: PeerId,
    pub req: ReqId,
    pub chunks: Vec<ChunkId>,
    /// The peer's data-plane addresses (none known: the request fails at once).
    pub addrs: Vec<SocketAddr>,
}

impl Fetch {
    pub async fn run(self, events: mpsc::Sender<LoopEvent>) {
        let Fetch { data, staging, peer, req, chunks, addrs } = self;
        let mut outcomes = Vec::with_capacity(chunks.len());
        // Verified chunks are written once the request is done, on the blocking pool: a write into the
        // page cache would hold up this runtime thread, and with it the QUIC connections it drives. A
        // request asks for about `request_bytes_target`, so this holds about that much.
        let mut verified = Vec::new();
        let result = if addrs.is_empty() {
            Err(FetchFailed::no_address(peer))
        } else {
            data.fetch(peer, &addrs, chunks, |id, fetched| {
                let outcome = match fetched {
                    Fetched::Verified(data) => {
                        verified.push((outcomes.len(), id, data));
                        ChunkOutcome::Verified
                    }
                    Fetched::Corrupt => ChunkOutcome::Corrupt,
                    Fetched::Missing => ChunkOutcome::Missing,
                    Fetched::Elsewhere(peers) => ChunkOutcome::Elsewhere(peers),
                };
                outcomes.push((id, outcome));
            })
            .await
        };
        let mut bytes = 0;
        if !verified.is_empty() {
            let written = tokio::task::spawn_blocking(move || {
                let keep = |(at, id, data): (usize, ChunkId, bytes::Bytes)| match staging.write_chunk(&id, &data) {
                    Ok(_) => (at, Some(data.len() as u64)),
                    Err(e) => {
                        tracing::error!("keeping chunk {id}: {e:#}");
                        (at, None)
                    }
                };
                verified.into_iter().map(keep).collect::<Vec<_>>()
            })
            .await;
            match written {
                Ok(written) => {
                    for (at, kept) in written {
                        match kept {
                            Some(len) => bytes += len,
                            None => outcomes[at].1 = ChunkOutcome::Dropped,
                        }
                    }
                }
                Err(e) => {
                    tracing::error!("writing fetched chunks failed: {e}");
                    for (_, outcome) in outcomes.iter_mut().filter(|(_, o)| *o == ChunkOutcome::Verified) {
                        *outcome = ChunkOutcome::Dropped;
                    }
                }
            }
        }
        let unreachable = result.as_ref().err().is_some_and(|e| e.kind == FetchFailure::Unreachable);
        let error = result.err().map(|e| e.to_string());
        let _ = events.send(LoopEvent::Fetched { peer, req, outcomes, bytes, error, unreachable }).await;
    }
}
