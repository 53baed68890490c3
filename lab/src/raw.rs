//! The raw quinn baseline that data-plane benchmarks compare against (`lab/benches/dataplane.rs`, `mirrormesh-lab testbed
//! throughput`): one connection with the data plane's TLS config and transport windows; each request stream carries
//! a batch of 1 MiB chunks written from memory, and the receiver takes quinn's buffers (optionally copying and
//! hashing each chunk, as the data plane must).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use mirrormesh_proto::{CHUNK_SIZE, ChunkId};

use mirrormesh::dataplane::tls;
use mirrormesh::key::NodeKey;

const MIB: usize = 1 << 20;

/// Deterministic incompressible chunks of 1 MiB.
pub fn chunks(distinct: usize) -> Vec<Bytes> {
    (0..distinct)
        .map(|i| {
            let mut state = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let words: Vec<u8> = (0..CHUNK_SIZE as usize / 8)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()
                })
                .collect();
            Bytes::from(words)
        })
        .collect()
}

/// Batches of chunk indices covering `mib` chunks.
pub fn batches(mib: usize, batch: usize) -> Vec<(usize, usize)> {
    (0..mib).step_by(batch).map(|start| (start, batch.min(mib - start))).collect()
}

/// One measured transfer: what moved, in how long, at what CPU cost.
pub struct Measured {
    pub name: &'static str,
    pub bytes: u64,
    pub wall: Duration,
    pub cpu: Duration,
}

impl Measured {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.wall.as_secs_f64()
    }

    pub fn cpu_s_per_gb(&self) -> f64 {
        self.cpu.as_secs_f64() / (self.bytes as f64 / 1e9)
    }
}

/// CPU time of process `pid` (`"self"` for this one): its own (user + system, all threads) and that of its
/// children it has waited for.
pub fn process_cpu(pid: &str) -> Result<(Duration, Duration)> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which is in parentheses and may contain spaces): utime, stime, cutime and
    // cstime are fields 14 to 17 of the whole line, 12 to 15 after the name.
    let rest = stat.rsplit_once(')').with_context(|| format!("unexpected {path}"))?.1;
    let fields: Vec<u64> = rest.split_whitespace().skip(11).take(4).map(str::parse).collect::<Result<_, _>>()?;
    if fields.len() < 4 {
        bail!("short {path}");
    }
    // CLK_TCK is 100 on Linux.
    let ticks = |t: u64| Duration::from_millis(t * 10);
    Ok((ticks(fields[0] + fields[1]), ticks(fields[2] + fields[3])))
}

/// This process's CPU time (user + system, all threads).
pub fn cpu_time() -> Result<Duration> {
    Ok(process_cpu("self")?.0)
}

/// The raw baseline: a quinn server that answers "start, count" with `count` chunks from memory.
pub struct Raw {
    pub conn: quinn::Connection,
    _server: quinn::Endpoint,
    _client: quinn::Endpoint,
}

pub async fn raw_setup(data: Arc<Vec<Bytes>>) -> Result<Raw> {
    let server_key = NodeKey::from_seed([1; 32])?;
    let client_key = NodeKey::from_seed([2; 32])?;
    let server_id = tls::Identity::new(&server_key)?;
    let client_id = tls::Identity::new(&client_key)?;
    let server = quinn::Endpoint::server(tls::server_config(&server_id)?, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let accept = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let data = data.clone();
                    tokio::spawn(async move {
                        let mut request = [0u8; 9];
                        if recv.read_exact(&mut request).await.is_err() {
                            return;
                        }
                        let start = u32::from_be_bytes([request[0], request[1], request[2], request[3]]) as usize;
                        let count = u32::from_be_bytes([request[4], request[5], request[6], request[7]]) as usize;
                        let copy = request[8] == 1;
                        for i in start..start + count {
                            let chunk = &data[i % data.len()];
                            // The copy a `ChunkSource::read` makes (from the page cache, or here from memory).
                            let chunk = if copy { Bytes::from(chunk.to_vec()) } else { chunk.clone() };
                            if send.write_chunk(chunk).await.is_err() {
                                return;
                            }
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let (config, _) = tls::client_config(&client_id, server_key.peer_id())?;
    let conn = client.connect_with(config, addr, tls::SERVER_NAME)?.await?;
    Ok(Raw { conn, _server: server, _client: client })
}

async fn raw_request(conn: &quinn::Connection, start: usize, count: usize, verify: Option<&[ChunkId]>) -> Result<u64> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut request = (start as u32).to_be_bytes().to_vec();
    request.extend_from_slice(&(count as u32).to_be_bytes());
    request.push(u8::from(verify.is_some()));
    send.write_all(&request).await?;
    send.finish()?;
    let mut total = 0u64;
    match verify {
        None => {
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                total += chunk.bytes.len() as u64;
            }
        }
        Some(ids) => {
            for i in start..start + count {
                let mut buf = BytesMut::with_capacity(MIB);
                while buf.len() < MIB {
                    let want = MIB - buf.len();
                    let chunk = recv.read_chunk(want, true).await?.context("stream ended early")?;
                    buf.extend_from_slice(&chunk.bytes);
                }
                let buf = buf.freeze();
                if ChunkId::of(&buf) != ids[i % ids.len()] {
                    bail!("corrupt chunk");
                }
                total += buf.len() as u64;
            }
        }
    }
    Ok(total)
}

/// Runs each request as its own task (as the daemon does), `inflight` at a time.
pub async fn spawned<T: Send + 'static>(
    requests: impl Iterator<Item = impl std::future::Future<Output = Result<T>> + Send + 'static>,
    inflight: usize,
) -> Result<Vec<T>> {
    futures::stream::iter(requests.map(tokio::spawn))
        .buffer_unordered(inflight)
        .map(|joined| joined.context("request task failed")?)
        .collect::<Vec<Result<T>>>()
        .await
        .into_iter()
        .collect()
}

pub async fn raw_run(
    raw: &Raw,
    mib: usize,
    batch: usize,
    inflight: usize,
    verify: Option<Arc<Vec<ChunkId>>>,
) -> Result<u64> {
    let requests = batches(mib, batch).into_iter().map(|(start, count)| {
        let (conn, verify) = (raw.conn.clone(), verify.clone());
        async move { raw_request(&conn, start, count, verify.as_deref().map(Vec::as_slice)).await }
    });
    Ok(spawned(requests, inflight).await?.into_iter().sum())
}
