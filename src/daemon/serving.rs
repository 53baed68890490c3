//! What this node serves on the data plane: chunks of the applied tree (found through the chunk index, read from
//! the served files themselves) and verified staged chunks. Every chunk is hashed before it leaves, so a file
//! changed behind the daemon's back is never passed on as good data. On the origin, each request is first put to
//! the engine's super-seeding policy.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::PeerId;
use mirrormesh_proto::chunk::{ChunkId, chunk_range};
use tokio::sync::{mpsc, oneshot};

use crate::chunk_index::ChunkIndex;
use crate::daemon::LoopEvent;
use crate::dataplane::{ChunkSource, Decision};
use crate::staging::Staging;

pub struct Serving {
    pub staging: Arc<Staging>,
    pub index: Arc<RwLock<ChunkIndex>>,
    pub tree: PathBuf,
    /// Set on the origin: decisions go through the engine.
    pub decide_via: Option<mpsc::Sender<LoopEvent>>,
    /// Fault injection (`faults.corrupt_served_chunks`): flip a byte of everything served.
    pub corrupt: bool,
}

impl ChunkSource for Serving {
    fn decide(&self, peer: PeerId, chunks: Vec<ChunkId>) -> BoxFuture<'static, Vec<Decision>> {
        let Some(events) = self.decide_via.clone() else {
            let all = chunks.iter().map(|_| Decision::Serve).collect();
            return futures::future::ready(all).boxed();
        };
        async move {
            let count = chunks.len();
            let (reply, answer) = oneshot::channel();
            if events.send(LoopEvent::Serve { peer, chunks, reply }).await.is_err() {
                return (0..count).map(|_| Decision::Serve).collect();
            }
            answer.await.unwrap_or_else(|_| (0..count).map(|_| Decision::Serve).collect())
        }
        .boxed()
    }

    fn read(&self, id: &ChunkId) -> std::io::Result<Option<Vec<u8>>> {
        let mut bytes = self.read_verified(id)?;
        if self.corrupt
            && let Some(b) = bytes.as_mut().and_then(|b| b.first_mut())
        {
            *b ^= 0xff;
        }
        Ok(bytes)
    }
}

impl Serving {
    fn read_verified(&self, id: &ChunkId) -> std::io::Result<Option<Vec<u8>>> {
        if let Ok(Some(bytes)) = self.staging.read_chunk(id) {
            return Ok(Some(bytes));
        }
        let locations = match self.index.read() {
            Ok(index) => index.locations(id).to_vec(),
            Err(_) => return Ok(None),
        };
        for loc in locations {
            let Some((offset, len)) = chunk_range(loc.file_size, u64::from(loc.index)) else { continue };
            let path = self.tree.join(&*loc.path);
            if let Ok(buf) = read_range(&path, offset, len)
                && ChunkId::of(&buf) == *id
            {
                return Ok(Some(buf));
            }
            tracing::warn!(path = %path.display(), chunk = %id, "served file does not hold the expected chunk; not serving it");
        }
        Ok(None)
    }
}

/// Reads `len` bytes at `offset` of `path` into a new buffer, without zeroing it first; short is an error.
fn read_range(path: &std::path::Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}
