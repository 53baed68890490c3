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
    /// The loop, told when a request was answered (its status shows the bytes sent).
    pub events: mpsc::Sender<LoopEvent>,
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

    fn served(&self, _peer: PeerId) {
        // A full queue means the loop wakes anyway.
        let _ = self.events.try_send(LoopEvent::Served);
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

/// Which of the data plane's refusals have been reported to the engine as offences (the engine bans repeat
/// offenders: `bans.rs`), and when they are next summed up.
pub struct RefusalReports {
    /// Refusals of each peer already reported. Keyed like the data plane's traffic table, which is capped; a peer
    /// that left that table is forgotten here too.
    reported: std::collections::BTreeMap<PeerId, u64>,
    next: std::time::Instant,
}

/// How often refusals are summed up.
pub const REFUSAL_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl RefusalReports {
    pub fn new(now: std::time::Instant) -> Self {
        RefusalReports { reported: Default::default(), next: now }
    }

    /// The refusals of each peer since the last report, once per [`REFUSAL_REPORT_INTERVAL`] (else nothing).
    pub fn due(
        &mut self,
        now: std::time::Instant,
        traffic: impl FnOnce() -> std::collections::BTreeMap<PeerId, crate::dataplane::Traffic>,
    ) -> Vec<(PeerId, u64)> {
        if now < self.next {
            return Vec::new();
        }
        self.next = now + REFUSAL_REPORT_INTERVAL;
        let traffic = traffic();
        self.reported.retain(|peer, _| traffic.contains_key(peer));
        let mut new = Vec::new();
        for (peer, t) in traffic {
            let seen = self.reported.entry(peer).or_default();
            if t.refused > *seen {
                new.push((peer, t.refused - *seen));
            }
            *seen = t.refused;
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dataplane::Traffic;

    fn refused(n: u64) -> Traffic {
        Traffic { refused: n, ..Traffic::default() }
    }

    #[test]
    fn refusals_are_reported_once_per_interval_only_what_is_new_and_peers_gone_are_forgotten() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        let mut reports = RefusalReports::new(t0);
        let table = |entries: &[(PeerId, u64)]| -> BTreeMap<PeerId, Traffic> {
            entries.iter().map(|(p, n)| (*p, refused(*n))).collect()
        };
        assert_eq!(reports.due(t0, || table(&[(a, 3), (b, 0)])), vec![(a, 3)]);
        // Within the interval nothing is read at all.
        assert_eq!(reports.due(t0 + Duration::from_millis(10), || panic!("read too early")), vec![]);
        let t1 = t0 + REFUSAL_REPORT_INTERVAL;
        let mut second = reports.due(t1, || table(&[(a, 5), (b, 1)]));
        second.sort();
        let mut expected = vec![(a, 2), (b, 1)];
        expected.sort();
        assert_eq!(second, expected);
        // `a` left the data plane's table: forgotten, so the table here stays as small as that one.
        assert_eq!(reports.due(t1 + REFUSAL_REPORT_INTERVAL, || table(&[(b, 1)])), vec![]);
        assert_eq!(reports.reported.len(), 1);
        // Back with a fresh count: its refusals are new again.
        assert_eq!(reports.due(t1 + 2 * REFUSAL_REPORT_INTERVAL, || table(&[(a, 1), (b, 1)])), vec![(a, 1)]);
    }
}
