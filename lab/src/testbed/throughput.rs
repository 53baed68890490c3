//! Single-link throughput on loopback, no shaping: one mirror pulls a whole tree from one peer (a mirror that holds
//! it; the origin is stopped first, so nothing else takes part), against an rsync daemon serving the same tree to
//! one client, and against raw quinn moving the same number of bytes (the data plane's TLS and windows, from memory).
//! MB/s and CPU seconds per GB (both ends of each transfer).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::RsyncDaemon;
use crate::raw::{Measured, chunks, cpu_time, process_cpu, raw_run, raw_setup};
use indicatif::HumanBytes;
use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions, compare_trees, free_port};

#[derive(Args)]
pub struct ThroughputArgs {
    /// Share of the built-in Alpine size profile (3.6 GiB at 1): 0.55 is about 2 GiB.
    #[arg(long, default_value_t = 0.55)]
    fraction: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the work directory and print where it is.
    #[arg(long)]
    keep: bool,
}

/// Own plus reaped children's CPU of process `pid`.
fn total_cpu(pid: u32) -> Result<Duration> {
    let (own, children) = process_cpu(&pid.to_string())?;
    Ok(own + children)
}

/// Whether process `pid` has children that have not been reaped yet.
fn has_children(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).is_ok_and(|c| !c.trim().is_empty())
}

fn mirrormesh(work: &std::path::Path, a: &ThroughputArgs) -> Result<(Measured, std::path::PathBuf)> {
    let options = vec![NodeOptions { delete_grace_secs: 0, ..NodeOptions::default() }; 3];
    let mut fabric = LocalFabric::create(&work.join("fabric"), &crate::daemon_binary()?, 2, &options)?;
    let tree = fabric.nodes[0].tree.clone();
    let generated = gentree::generate(&GenTreeArgs {
        out: tree.clone(),
        fraction: a.fraction,
        seed: a.seed,
        ..Default::default()
    })?;
    println!("tree: {} packages, {}", generated.packages, HumanBytes(generated.bytes));
    // The origin publishes and mirror1 syncs from it, untimed; then the origin stops and mirror2 (which learns the
    // root from mirror1's hello) pulls everything from mirror1: that transfer is timed.
    fabric.start(0)?;
    fabric.start(1)?;
    let published = fabric.publish()?;
    fabric.wait_all_settled(published.seq, super::SYNC_TIMEOUT)?;
    fabric.kill(0, 15)?;
    let server_pid = fabric.pid(1).context("mirror1 pid")?;
    let server_cpu0 = total_cpu(server_pid)?;
    let t0 = Instant::now();
    fabric.start(2)?;
    fabric.client(2, super::SYNC_TIMEOUT).wait_settled(published.seq, super::SYNC_TIMEOUT.as_millis() as u64)?;
    let wall = t0.elapsed();
    let client_pid = fabric.pid(2).context("mirror2 pid")?;
    let cpu = total_cpu(server_pid)? - server_cpu0 + total_cpu(client_pid)?;
    fabric.check_identical(2)?;
    let status = fabric.status(2)?;
    if status.bytes_fetched_from_origin != 0 || status.bytes_fetched_total < published.bytes {
        bail!("mirror2 was to fetch everything from mirror1: {status:?}");
    }
    Ok((Measured { name: "mirrormesh (peer to mirror)", bytes: published.bytes, wall, cpu }, tree))
}

fn rsync(work: &std::path::Path, tree: &std::path::Path, bytes: u64) -> Result<Measured> {
    let port = free_port()?;
    let daemon = RsyncDaemon::start(work, tree, "127.0.0.1", port, None)?;
    let daemon_pid = daemon.pid();
    let dest = work.join("rsync-mirror");
    std::fs::create_dir_all(&dest)?;
    let daemon_cpu0 = total_cpu(daemon_pid)?;
    let (_, reaped0) = process_cpu("self")?;
    let t0 = Instant::now();
    let out = super::rsync_client(std::process::Command::new("rsync"), &daemon.url, &dest)
        .output()
        .context("running rsync")?;
    let wall = t0.elapsed();
    if !out.status.success() {
        bail!("rsync: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let (_, reaped) = process_cpu("self")?;
    // The daemon serves each client from a child it reaps once that child exits: wait for that to count its CPU.
    let deadline = Instant::now() + Duration::from_secs(30);
    while has_children(daemon_pid) {
        if Instant::now() > deadline {
            bail!("the rsync daemon's child did not exit");
        }
        std::thread::yield_now();
    }
    let cpu = (reaped - reaped0) + (total_cpu(daemon_pid)? - daemon_cpu0);
    drop(daemon);
    compare_trees(tree, &dest, "rsync mirror")?;
    Ok(Measured { name: "rsync daemon to rsync", bytes, wall, cpu })
}

fn raw_quinn(bytes: u64) -> Result<Measured> {
    let mib = bytes.div_ceil(1 << 20) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let raw = raw_setup(std::sync::Arc::new(chunks(64))).await?;
        raw_run(&raw, 64.min(mib), 64, 4, None).await?;
        let (cpu0, t0) = (cpu_time()?, Instant::now());
        let moved = raw_run(&raw, mib, 64, 4, None).await?;
        let (wall, cpu) = (t0.elapsed(), cpu_time()? - cpu0);
        raw.conn.close(0u32.into(), b"done");
        Ok(Measured { name: "raw quinn (same bytes)", bytes: moved, wall, cpu })
    })
}

pub fn run(a: &ThroughputArgs) -> Result<()> {
    let work = tempfile::Builder::new().prefix("mirrormesh-throughput").tempdir()?;
    let (mm, tree) = mirrormesh(work.path(), a)?;
    let rs = rsync(work.path(), &tree, mm.bytes)?;
    let raw = raw_quinn(mm.bytes)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!();
    println!(
        "mirrormesh-lab testbed throughput: one link on loopback, no shaping, {cores} cores; trees checked identical"
    );
    println!("{:<32} {:>10} {:>8} {:>10} {:>8}", "transfer", "bytes", "MB/s", "CPU s/GB", "wall s");
    for row in [&mm, &rs, &raw] {
        println!(
            "{:<32} {:>10} {:>8.0} {:>10.3} {:>8.2}",
            row.name,
            HumanBytes(row.bytes).to_string(),
            row.mb_per_s(),
            row.cpu_s_per_gb(),
            row.wall.as_secs_f64()
        );
    }
    println!(
        "mirrormesh / raw quinn: throughput {:.2} (target >= 0.90), CPU per GB {:.2} (target <= 1.20); \
         mirrormesh / rsync: throughput {:.2} (target >= 1.20)",
        mm.mb_per_s() / raw.mb_per_s(),
        mm.cpu_s_per_gb() / raw.cpu_s_per_gb(),
        mm.mb_per_s() / rs.mb_per_s()
    );
    if a.keep {
        println!("work directory kept: {}", work.keep().display());
    }
    Ok(())
}
