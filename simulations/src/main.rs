//! `mirrormesh-sim`: runs scenario files and writes their reports.
//!
//! ```text
//! cargo run --release -p mirrormesh-sim -- simulations/scenarios/homogeneous-100.toml
//! cargo run --release -p mirrormesh-sim -- --all            # every scenario in simulations/scenarios
//! ```
//! Each run prints its per-update table and checkers, and writes `summary.txt`, `updates.csv`,
//! `origin_egress.csv`, `nodes.csv`, `completion_cdf.svg` and `origin_egress.svg` under `--results/<scenario name>/`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use mirrormesh_sim::scenario::Scenario;
use mirrormesh_sim::{Report, report, simulate};

/// Simulation allocates and frees millions of small messages and nodes; mimalloc does that markedly faster than
/// the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Simulate a mirrormesh fabric: the real protocol core over a modelled network")]
struct Args {
    /// Scenario files (TOML).
    scenarios: Vec<PathBuf>,
    /// Run every scenario in --scenario-dir.
    #[arg(long)]
    all: bool,
    #[arg(long, default_value = "simulations/scenarios")]
    scenario_dir: PathBuf,
    /// Seed (default: the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// Where reports go.
    #[arg(long, default_value = "simulations/results")]
    results: PathBuf,
    /// Print only, write nothing.
    #[arg(long)]
    no_write: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let args = Args::parse();
    let mut files = args.scenarios.clone();
    if args.all {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&args.scenario_dir)
            .with_context(|| format!("cannot list {}", args.scenario_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        found.sort();
        files.extend(found);
    }
    if files.is_empty() {
        bail!("no scenario given (pass files, or --all)");
    }
    let mut all_ok = true;
    for file in &files {
        let scenario = Scenario::load(file)?;
        let seed = args.seed.unwrap_or(scenario.seed);
        println!("== {} (seed {seed}, {} mirrors) ==", scenario.name, scenario.mirrors);
        let report = simulate(&scenario, seed, true)?;
        let text = summary(&scenario, file, seed, &report);
        print!("{text}");
        if !args.no_write {
            write_results(&args.results, &scenario, &report, &text)?;
        }
        if !report.passed() {
            all_ok = false;
            println!("FAILED. Replay with: cargo run --release -p mirrormesh-sim -- {} --seed {seed}", file.display());
        }
        println!();
    }
    Ok(all_ok)
}

fn summary(scenario: &Scenario, file: &Path, seed: u64, report: &Report) -> String {
    let s = &report.outcome.stats;
    let mut text = String::new();
    text.push_str(&format!("scenario {} ({}), seed {seed}\n", scenario.name, file.display()));
    if !scenario.description.is_empty() {
        text.push_str(&format!("{}\n", scenario.description.trim()));
    }
    text.push('\n');
    text.push_str(&report::table(&report.rows));
    text.push('\n');
    for c in &report.checks {
        text.push_str(&format!("[{}] {}: {}\n", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail));
    }
    text.push_str(&format!(
        "\nrun: {:.2} virtual s in {:.2} wall s; {} events ({:.0} events/s); {} control messages, {} bulk items, \
         {} chunks delivered, {} rate recomputations; peak memory {}; trace {}\n",
        s.virtual_ns as f64 / 1e9,
        report.wall.as_secs_f64(),
        s.events,
        report.events_per_sec(),
        s.control_messages,
        s.bulk_items,
        s.chunks_delivered,
        s.rate_recomputations,
        peak_memory().map_or("unknown".into(), |kb| format!("{:.0} MB", kb as f64 / 1024.0)),
        &report.trace_hex()[..16],
    ));
    let seeder = &s.seeder;
    let again = &seeder.again;
    text.push_str(&format!(
        "origin's seeder: {} chunks served, {} redirects; served again after the asker waited {}, after it banned the \
         holders named {}, with no holder connected {}, to a recipient asking again {}\n",
        seeder.served, seeder.redirects, again.after_wait, again.after_bans, again.no_holder, again.asked_again,
    ));
    let meta = &s.origin_metadata;
    text.push_str(&format!(
        "origin's manifest answers: {} deltas ({:.1} MB), {} node answers ({:.1} MB)\n",
        meta.deltas,
        meta.deltas_bytes as f64 / 1e6,
        meta.nodes,
        meta.nodes_bytes as f64 / 1e6,
    ));
    text
}

/// Peak resident memory of this process, KiB (Linux).
fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn write_results(dir: &Path, scenario: &Scenario, report: &Report, text: &str) -> Result<()> {
    let dir = dir.join(&scenario.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("summary.txt"), text)?;
    report::write_csv(&dir.join("updates.csv"), &report.rows)?;
    report::plot_completion_cdf(&dir.join("completion_cdf.svg"), &scenario.name, &report.rows)?;
    report::write_egress_csv(&dir.join("origin_egress.csv"), &report.outcome)?;
    report::write_nodes_csv(&dir.join("nodes.csv"), &report.outcome)?;
    let origin_up = report.outcome.nodes[0].up_bps;
    report::plot_origin_egress(&dir.join("origin_egress.svg"), &scenario.name, &report.outcome, origin_up)?;
    println!("wrote {}", dir.display());
    Ok(())
}
