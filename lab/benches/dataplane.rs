//! Data-plane throughput and CPU cost on loopback, against a raw quinn baseline with the same TLS and windows.
//!
//! `cargo bench --bench dataplane [-- --mib N --batch B --inflight K --rounds R --only raw|raw-verify|dataplane]`
//! (defaults: 1024 MiB, 64 chunks per request, 4 requests in flight, median of 3 interleaved rounds). Set
//! `DATAPLANE_BENCH_ROUNDS=1` to print every round.
//!
//! - raw quinn: one connection (the data plane's TLS config: AES-128-GCM, its transport windows); each request
//!   stream carries B chunks of 1 MiB written from memory; the receiver takes quinn's buffers and drops them.
//! - raw + copies + blake3: the same, but the sender copies every chunk out of memory first (as `ChunkSource::read`
//!   does) and the receiver copies every chunk into its own buffer and hashes it: the work the data plane must do
//!   to serve from a source and hand out verified `Bytes`. The gap between this row and the data plane is the data
//!   plane's own cost (framing, blocking-pool reads, limits, bookkeeping).
//! - dataplane: `DataPlane::fetch` of the same chunks, B per request, K requests in flight, served through
//!   `ChunkSource::read` from memory (one copy out, as a page-cache read would be).
//!
//! Both ends run in this process, each request as its own tokio task, so CPU is the sum of sender and receiver
//! (utime + stime of the process) and on a small machine the run is CPU-bound: throughput follows CPU per byte.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::PeerId;
use mirrormesh::dataplane::{ChunkSource, DataPlane, DataPlaneConfig, Decision};
use mirrormesh::key::NodeKey;
use mirrormesh_lab::raw::{Measured, batches, chunks, cpu_time, raw_run, raw_setup, spawned};
use mirrormesh_proto::{ChunkId, RepoId};

const MIB: usize = 1 << 20;
/// Distinct chunks in memory; requests cycle through them.
const DISTINCT: usize = 64;
/// Volume of the warm-up pass before each measurement.
const WARMUP_MIB: usize = 64;

struct Args {
    mib: usize,
    batch: usize,
    inflight: usize,
    rounds: usize,
    /// Run only this variant (0 raw, 1 raw + copies + blake3, 2 dataplane), e.g. under a profiler.
    only: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { mib: 1024, batch: 64, inflight: 4, rounds: 3, only: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            it.next().with_context(|| format!("{name} needs a value"))?.parse().with_context(|| format!("bad {name}"))
        };
        match arg.as_str() {
            "--mib" => args.mib = value("--mib")?,
            "--batch" => args.batch = value("--batch")?,
            "--inflight" => args.inflight = value("--inflight")?,
            "--rounds" => args.rounds = value("--rounds")?,
            "--only" => {
                args.only = Some(match it.next().as_deref() {
                    Some("raw") => 0,
                    Some("raw-verify") => 1,
                    Some("dataplane") => 2,
                    other => bail!("--only takes raw, raw-verify or dataplane, not {other:?}"),
                })
            }
            // `cargo bench` passes this to every bench target.
            "--bench" => {}
            other => {
                bail!("unknown argument {other} (use --mib N, --batch B, --inflight K, --rounds R, --only VARIANT)")
            }
        }
    }
    if args.mib == 0 || args.batch == 0 || args.batch > 256 || args.inflight == 0 || args.rounds == 0 {
        bail!("--mib, --inflight and --rounds must be positive, --batch 1..=256");
    }
    Ok(args)
}

async fn measure<Fut>(name: &'static str, run: Fut, mib: usize) -> Result<Measured>
where
    Fut: std::future::Future<Output = Result<u64>>,
{
    let (cpu0, t0) = (cpu_time()?, Instant::now());
    let bytes = run.await?;
    let (wall, cpu) = (t0.elapsed(), cpu_time()?.saturating_sub(cpu0));
    if bytes != (mib * MIB) as u64 {
        bail!("{name}: moved {bytes} bytes, expected {}", mib * MIB);
    }
    let measured = Measured { name, bytes, wall, cpu };
    if std::env::var_os("DATAPLANE_BENCH_ROUNDS").is_some() {
        eprintln!("  {name}: {:.0} MB/s, {:.3} CPU s/GB", measured.mb_per_s(), measured.cpu_s_per_gb());
    }
    Ok(measured)
}

struct MemSource {
    chunks: HashMap<ChunkId, Bytes>,
}

impl ChunkSource for MemSource {
    fn decide(&self, _peer: PeerId, chunks: Vec<ChunkId>) -> BoxFuture<'static, Vec<Decision>> {
        futures::future::ready(vec![Decision::Serve; chunks.len()]).boxed()
    }

    fn read(&self, id: &ChunkId) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.chunks.get(id).map(|b| b.to_vec()))
    }
}

struct Planes {
    client: DataPlane,
    server_peer: PeerId,
    server_addr: std::net::SocketAddr,
    _server: DataPlane,
}

fn plane_setup(data: &[Bytes]) -> Result<Planes> {
    let repo = RepoId::new("alpine").map_err(|e| anyhow::anyhow!("{e}"))?;
    let server_key = NodeKey::from_seed([3; 32])?;
    let client_key = NodeKey::from_seed([4; 32])?;
    let listen: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let cfg = |repo: RepoId| DataPlaneConfig {
        listen,
        upload_rate: None,
        allow: None,
        repo,
        timeouts: Default::default(),
        sending_replies_max: None,
    };
    let source = MemSource { chunks: data.iter().map(|b| (ChunkId::of(b), b.clone())).collect() };
    let server = DataPlane::bind(&server_key, cfg(repo.clone()), Arc::new(source))?;
    let client = DataPlane::bind(&client_key, cfg(repo), Arc::new(MemSource { chunks: HashMap::new() }))?;
    Ok(Planes { server_peer: server_key.peer_id(), server_addr: server.local_addr(), client, _server: server })
}

async fn plane_run(planes: &Planes, ids: &[ChunkId], mib: usize, args: &Args) -> Result<u64> {
    let requests = batches(mib, args.batch).into_iter().map(|(start, count)| {
        let want: Vec<ChunkId> = (start..start + count).map(|i| ids[i % ids.len()]).collect();
        let (client, peer, addrs) = (planes.client.clone(), planes.server_peer, [planes.server_addr]);
        async move { Ok(client.fetch(peer, &addrs, want, |_, _| {}).await?.bytes) }
    });
    Ok(spawned(requests, args.inflight).await?.into_iter().sum())
}

/// CPU cost of the receive-side work alone, on one core: copy and blake3.
fn local_costs(data: &[Bytes], mib: usize) -> (f64, f64) {
    let gb = (mib * MIB) as f64 / 1e9;
    let t = Instant::now();
    let mut sink = 0u8;
    for i in 0..mib {
        let copy = BytesMut::from(&data[i % data.len()][..]);
        sink ^= copy[i % copy.len()];
    }
    let copy = t.elapsed().as_secs_f64() / gb;
    let t = Instant::now();
    for i in 0..mib {
        sink ^= ChunkId::of(&data[i % data.len()]).0[0];
    }
    let hash = t.elapsed().as_secs_f64() / gb;
    std::hint::black_box(sink);
    (copy, hash)
}

/// The median round of each variant (by throughput).
fn median(mut rounds: Vec<Measured>) -> Option<Measured> {
    rounds.sort_by(|a, b| a.mb_per_s().total_cmp(&b.mb_per_s()));
    let mid = rounds.len() / 2;
    rounds.into_iter().nth(mid)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let data = Arc::new(chunks(DISTINCT));
    let ids: Vec<ChunkId> = data.iter().map(|b| ChunkId::of(b)).collect();
    let shared_ids = Arc::new(ids.clone());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "data plane benchmark: {} MiB in 1 MiB chunks, {} chunks per request, {} requests in flight, {} cores, \
         loopback, median of {} interleaved rounds",
        args.mib, args.batch, args.inflight, threads, args.rounds
    );
    let rows = runtime.block_on(async {
        let raw = raw_setup(data.clone()).await?;
        let planes = plane_setup(&data)?;
        let warmup = WARMUP_MIB.min(args.mib);
        raw_run(&raw, warmup, args.batch, args.inflight, None).await?;
        raw_run(&raw, warmup, args.batch, args.inflight, Some(shared_ids.clone())).await?;
        plane_run(&planes, &ids, warmup, &args).await?;
        let mut rounds: [Vec<Measured>; 3] = Default::default();
        let run = |variant: usize| args.only.is_none_or(|only| only == variant);
        for _ in 0..args.rounds {
            if run(0) {
                rounds[0].push(
                    measure("raw quinn", raw_run(&raw, args.mib, args.batch, args.inflight, None), args.mib).await?,
                );
            }
            if run(1) {
                let verify = raw_run(&raw, args.mib, args.batch, args.inflight, Some(shared_ids.clone()));
                rounds[1].push(measure("raw + copies + blake3", verify, args.mib).await?);
            }
            if run(2) {
                let fetch = plane_run(&planes, &ids, args.mib, &args);
                rounds[2].push(measure("dataplane fetch", fetch, args.mib).await?);
            }
        }
        raw.conn.close(0u32.into(), b"done");
        anyhow::Ok(rounds.into_iter().filter_map(median).collect::<Vec<_>>())
    })?;
    println!("{:<28} {:>10} {:>12} {:>10}", "variant", "MB/s", "CPU s/GB", "wall s");
    for row in &rows {
        println!(
            "{:<28} {:>10.0} {:>12.3} {:>10.2}",
            row.name,
            row.mb_per_s(),
            row.cpu_s_per_gb(),
            row.wall.as_secs_f64()
        );
    }
    if let [raw, _, plane] = rows.as_slice() {
        println!(
            "dataplane / raw quinn: throughput {:.2}x, CPU per GB {:.2}x  (targets: >= 0.90x, <= 1.20x)",
            plane.mb_per_s() / raw.mb_per_s(),
            plane.cpu_s_per_gb() / raw.cpu_s_per_gb()
        );
    }
    let (copy, hash) = local_costs(&data, args.mib.min(1024));
    println!("reference, one core: memcpy {copy:.3} CPU s/GB, blake3 {hash:.3} CPU s/GB");
    Ok(())
}
