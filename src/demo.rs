//! `mirrormesh demo`: the whole product on one machine, with no setup. Generates an Alpine-like tree, starts an
//! origin and four mirrors as real daemons on loopback, publishes, waits for every mirror to converge, applies a
//! 20-package update and a one-package update, checks that every mirror's tree is identical to the origin's, and
//! prints what it cost the origin compared with the rsync recipe (every mirror pulls everything from the origin).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::gentree::{self, GenTreeArgs};
use crate::local_fabric::{LocalFabric, NodeOptions};
use crate::status::Status;
use indicatif::HumanBytes;

/// Mirrors in the demo fabric.
pub const DEMO_MIRRORS: usize = 4;
/// Fraction of the built-in 5004-package (3.6 GiB) size profile the demo generates.
pub const DEMO_FRACTION: f64 = 0.2;
/// How long any one step may take before the demo gives up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Leave the fabric running for inspection (Ctrl-C stops it).
    #[arg(long)]
    pub keep: bool,
    /// Work directory (default: a new temporary directory, removed at the end unless --keep).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Fraction of the built-in Alpine size profile (5004 packages, 3.6 GiB) to generate.
    #[arg(long, default_value_t = DEMO_FRACTION)]
    pub fraction: f64,
    /// Packages rebuilt by the update step.
    #[arg(long, default_value_t = 20)]
    pub update: usize,
}

struct Step {
    name: String,
    seconds: f64,
    changed_files: u64,
    changed_bytes: u64,
    origin_sent: u64,
    /// Per mirror: (from peers, from origin).
    mirrors: Vec<(u64, u64)>,
}

fn counters(fabric: &LocalFabric) -> Result<(u64, Vec<(u64, u64)>)> {
    let origin = fabric.status(0)?.bytes_served_total;
    let mut mirrors = Vec::new();
    for i in 1..fabric.nodes.len() {
        let s: Status = fabric.status(i)?;
        mirrors.push((s.bytes_fetched_total - s.bytes_fetched_from_origin, s.bytes_fetched_from_origin));
    }
    Ok((origin, mirrors))
}

/// Publishes the origin's tree and waits for every mirror to apply it; returns the measured step.
fn step(fabric: &LocalFabric, name: &str) -> Result<Step> {
    let (origin_before, mirrors_before) = counters(fabric)?;
    let started = Instant::now();
    let published = fabric.publish()?;
    for i in 1..fabric.nodes.len() {
        fabric.client(i, STEP_TIMEOUT).wait_for_seq(published.seq, STEP_TIMEOUT.as_millis() as u64)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    fabric.wait_all_settled(published.seq, STEP_TIMEOUT)?;
    let (origin_after, mirrors_after) = counters(fabric)?;
    Ok(Step {
        name: name.to_owned(),
        seconds,
        changed_files: published.changed_files,
        changed_bytes: published.changed_bytes,
        origin_sent: origin_after - origin_before,
        mirrors: mirrors_after.iter().zip(&mirrors_before).map(|(a, b)| (a.0 - b.0, a.1 - b.1)).collect(),
    })
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let temp = match &args.dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("mirrormesh-demo-").tempdir()?),
    };
    let work = args.dir.clone().or_else(|| temp.as_ref().map(|t| t.path().to_owned())).context("work directory")?;
    if work.join("origin").exists() {
        bail!("{} already holds a demo; give an empty --dir", work.display());
    }
    let binary = std::env::current_exe().context("finding the mirrormesh executable")?;
    let options = vec![NodeOptions { delete_grace_secs: 0, ..NodeOptions::default() }; DEMO_MIRRORS + 1];
    let mut fabric = LocalFabric::create(&work, &binary, DEMO_MIRRORS, &options)?;

    println!("mirrormesh demo in {}", work.display());
    let tree = fabric.nodes[0].tree.clone();
    let generated =
        gentree::generate(&GenTreeArgs { out: tree.clone(), fraction: args.fraction, ..GenTreeArgs::default() })?;
    println!(
        "  generated {} packages, {} (built-in Alpine size profile, fraction {})",
        generated.packages,
        HumanBytes(generated.bytes),
        args.fraction
    );
    fabric.start_all()?;
    println!("  started an origin and {DEMO_MIRRORS} mirrors on loopback (real daemons, QUIC)");

    let mut steps = vec![step(&fabric, "initial sync")?];
    gentree::generate(&GenTreeArgs {
        out: tree.clone(),
        update: Some(args.update),
        seed: 2,
        ..GenTreeArgs::default()
    })?;
    steps.push(step(&fabric, &format!("{}-package update", args.update))?);
    gentree::generate(&GenTreeArgs { out: tree.clone(), update: Some(1), seed: 3, ..GenTreeArgs::default() })?;
    steps.push(step(&fabric, "1-package update")?);

    for i in 1..fabric.nodes.len() {
        fabric.check_identical(i)?;
    }
    print_report(&steps, fabric.nodes.len() - 1);
    println!("\nevery mirror's tree is identical to the origin's (contents, sizes, modes, mtimes; removals included)");

    if args.keep {
        println!("\nthe fabric keeps running; inspect it with:");
        for node in &fabric.nodes {
            println!("  mirrormesh status --admin {}    # {}", node.admin, node.name);
        }
        println!("logs and trees are under {}; press Ctrl-C to stop", work.display());
        if let Some(temp) = temp {
            let _ = temp.keep();
        }
        loop {
            std::thread::park();
        }
    }
    drop(fabric);
    Ok(())
}

fn print_report(steps: &[Step], mirrors: usize) {
    println!();
    println!(
        "{:<22} {:>10} {:>12} {:>14} {:>16} {:>10}",
        "step", "converged", "changed", "origin sent", "origin/changed", "rsync*"
    );
    for s in steps {
        println!(
            "{:<22} {:>8.2} s {:>12} {:>14} {:>16.3} {:>10.2}",
            s.name,
            s.seconds,
            HumanBytes(s.changed_bytes).to_string(),
            HumanBytes(s.origin_sent).to_string(),
            s.origin_sent as f64 / s.changed_bytes.max(1) as f64,
            mirrors as f64
        );
    }
    println!();
    println!("{:<22} from peers / from origin", "bytes per mirror");
    for s in steps {
        let cells: Vec<String> = s
            .mirrors
            .iter()
            .map(|(peers, origin)| format!("{} / {}", HumanBytes(*peers), HumanBytes(*origin)))
            .collect();
        println!("{:<22} {}", s.name, cells.join("   "));
    }
    println!(
        "* rsync from the origin sends every mirror its own copy: {mirrors} x (arithmetic, not measured here; \
         `mirrormesh-lab testbed sync` runs rsync side by side)"
    );
    println!(
        "(changed files per step: {})",
        steps.iter().map(|s| s.changed_files.to_string()).collect::<Vec<_>>().join(", ")
    );
}
