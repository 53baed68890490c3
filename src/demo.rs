//! `mirrormesh demo`: the whole product on one machine, with no setup. Generates an Alpine-like tree, starts an
//! origin and four mirrors as real daemons on loopback, publishes, waits for every mirror to converge, applies a
//! 20-package update and a one-package update, checks that every mirror's tree is identical to the origin's, and
//! prints what it cost the origin compared with the rsync recipe (every mirror pulls everything from the origin).
//!
//! It says what it does as it goes: a line per stage and per mirror that converged (with a progress bar on a
//! terminal). Its daemons end with it whatever signal ends it: SIGINT, SIGTERM and SIGHUP stop them and remove the
//! temporary tree (exit status 130); SIGKILL leaves them their parent-death signal (see `local_fabric`).

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::gentree::{self, GenTreeArgs};
use crate::local_fabric::{LocalFabric, NodeOptions};
use crate::status::Status;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

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

/// Prints a line of progress: above the progress bar on a terminal, plainly elsewhere.
fn say(bar: &ProgressBar, line: &str) {
    bar.suspend(|| println!("{line}"));
}

/// A bar counting mirrors that converged, drawn on standard error when it is a terminal (hidden otherwise).
fn mirrors_bar(name: &str, mirrors: usize) -> ProgressBar {
    let bar = ProgressBar::new(mirrors as u64);
    if let Ok(style) = ProgressStyle::with_template("  {spinner} {msg} [{bar:20}] {pos}/{len} mirrors, {elapsed}") {
        bar.set_style(style);
    }
    bar.set_message(name.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Publishes the origin's tree and waits for every mirror to apply it, saying so as each does; returns the
/// measured step.
fn step(fabric: &LocalFabric, name: &str) -> Result<Step> {
    let (origin_before, mirrors_before) = counters(fabric)?;
    let started = Instant::now();
    let bar = mirrors_bar(name, fabric.nodes.len() - 1);
    say(&bar, &format!("  {name}: publishing"));
    let published = fabric.publish()?;
    say(
        &bar,
        &format!(
            "  {name}: published seq {} ({} files, {} to fetch), waiting for the mirrors",
            published.seq,
            published.changed_files,
            HumanBytes(published.changed_bytes)
        ),
    );
    // Every mirror long-polls at once; each reports as it converges.
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|scope| -> Result<()> {
        for i in 1..fabric.nodes.len() {
            let client = fabric.client(i, STEP_TIMEOUT + Duration::from_secs(5));
            let done = done_tx.clone();
            scope.spawn(move || {
                let _ = done.send((i, client.wait_for_seq(published.seq, STEP_TIMEOUT.as_millis() as u64)));
            });
        }
        drop(done_tx);
        for (i, result) in done_rx {
            let status = result.with_context(|| format!("waiting for {}", fabric.nodes[i].name))?;
            let origin = status.bytes_fetched_from_origin;
            let peers = status.bytes_fetched_total - origin;
            bar.inc(1);
            say(
                &bar,
                &format!(
                    "    {} applied seq {} after {:.2} s (fetched so far: {} from peers, {} from the origin)",
                    fabric.nodes[i].name,
                    published.seq,
                    started.elapsed().as_secs_f64(),
                    HumanBytes(peers),
                    HumanBytes(origin)
                ),
            );
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    fabric.wait_all_settled(published.seq, STEP_TIMEOUT)?;
    // The origin's count includes every byte it sent for this step once it heard every mirror complete.
    fabric.wait_origin_heard(published.seq, STEP_TIMEOUT)?;
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
    end_with_signals(&fabric, temp.as_ref().map(|t| t.path().to_owned()))?;

    println!("mirrormesh demo in {}", work.display());
    let tree = fabric.nodes[0].tree.clone();
    let spinner = ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(100));
    say(&spinner, &format!("  generating an Alpine-like tree (built-in size profile, fraction {})", args.fraction));
    let generated =
        gentree::generate(&GenTreeArgs { out: tree.clone(), fraction: args.fraction, ..GenTreeArgs::default() })?;
    say(&spinner, &format!("  generated {} packages, {}", generated.packages, HumanBytes(generated.bytes)));
    for i in 0..fabric.nodes.len() {
        spinner.set_message(format!("starting {}", fabric.nodes[i].name));
        fabric.start(i)?;
    }
    spinner.finish_and_clear();
    println!("  started an origin and {DEMO_MIRRORS} mirrors on loopback (real daemons, QUIC)");

    let mut steps = vec![step(&fabric, "initial sync")?];
    println!("  rebuilding {} packages in the origin's tree", args.update);
    gentree::generate(&GenTreeArgs {
        out: tree.clone(),
        update: Some(args.update),
        seed: 2,
        ..GenTreeArgs::default()
    })?;
    steps.push(step(&fabric, &format!("{}-package update", args.update))?);
    println!("  rebuilding 1 package in the origin's tree");
    gentree::generate(&GenTreeArgs { out: tree.clone(), update: Some(1), seed: 3, ..GenTreeArgs::default() })?;
    steps.push(step(&fabric, "1-package update")?);

    println!("  comparing every mirror's tree with the origin's");
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
        let removed = if temp.is_some() { ", which removes them" } else { "" };
        println!("logs and trees are under {}; press Ctrl-C to stop{removed}", work.display());
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

/// On SIGINT, SIGTERM or SIGHUP: stops the fabric's daemons, removes `temp` (the work directory the demo made, if
/// it made one) and exits with status 130.
fn end_with_signals(fabric: &LocalFabric, temp: Option<PathBuf>) -> Result<()> {
    let stopper = fabric.stopper();
    ctrlc::set_handler(move || {
        use std::io::Write as _;
        // Not eprintln!: stderr may be a closed pipe.
        let _ = writeln!(std::io::stderr(), "mirrormesh demo: stopping its daemons");
        stopper.stop();
        if let Some(dir) = &temp {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    })
    .context("installing the demo's signal handler")
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
