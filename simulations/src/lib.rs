//! mirrormesh-sim: a discrete-event simulator that drives the same protocol core (`mirrormesh-proto`) as the daemon,
//! in virtual time over a simulated network, and grades each run against the Kumar–Ross lower bound and a
//! client-server (rsync-style) baseline on the same network.
//!
//! # Layout
//! - [`scenario`]: the TOML scenario format and its limits.
//! - [`content`]: the simulated repository (real names and sizes, 16-byte stand-ins for chunk bytes).
//! - [`network`]: the flow-level network model (max-min fair sharing of upload and download capacities).
//! - [`sizes`]: message sizes from the core's own encoding.
//! - [`world`]: the run itself: engines, messages, faults, in one deterministic event queue.
//! - [`bounds`]: the Kumar–Ross bound and the client-server baseline.
//! - [`report`]: per-update table, CSV and SVG plots.
//! - [`check`]: the checkers run after every run.
//!
//! Architecture invariant: the simulator depends on the core, never on the daemon; everything nondeterministic
//! (time, network, randomness) comes from the world and its seed, so a seed replays a run exactly.

pub mod bounds;
pub mod check;
pub mod content;
pub mod network;
pub mod report;
pub mod scenario;
pub mod sizes;
pub mod world;

pub use mirrormesh_proto as proto;

use std::time::{Duration, Instant};

/// A finished run with its report.
pub struct Report {
    pub outcome: world::Outcome,
    pub rows: Vec<report::UpdateRow>,
    pub checks: Vec<check::Check>,
    pub wall: Duration,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// Events handled per wall-clock second.
    pub fn events_per_sec(&self) -> f64 {
        self.outcome.stats.events as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The trace hash, in hex.
    pub fn trace_hex(&self) -> String {
        self.outcome.trace.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Runs `scenario` with `seed` and grades it.
pub fn simulate(scenario: &scenario::Scenario, seed: u64, show_progress: bool) -> anyhow::Result<Report> {
    let started = Instant::now();
    let world = world::World::new(scenario.clone(), seed, show_progress)?;
    let outcome = world.run();
    let wall = started.elapsed();
    let rows = report::rows(&outcome);
    let checks = check::run_checks(scenario, &outcome, &rows);
    Ok(Report { outcome, rows, checks, wall })
}
