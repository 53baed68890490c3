//! `testbed sync --timeline`: every host's link sampled while a mirrormesh sync runs, so that a run shows where its
//! time went: how long the origin's link was busy, how full each mirror's download was, and how long the mesh took
//! after the origin's last byte.
//!
//! The counters are those of each host's veth end on the bridge: what it receives is the host's upload, what it
//! sends the host's download (every frame, headers included).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::net::NetHost;

/// How often the links are sampled.
pub const TIMELINE_STEP: Duration = Duration::from_millis(100);
/// A link counts as busy in a step when it moved at least this share of its shaped rate.
const BUSY_SHARE: f64 = 0.5;

/// Samples the links until finished.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

/// Byte counters of every host (upload, download) at one instant.
struct Sample {
    at: Duration,
    bytes: Vec<(u64, u64)>,
}

fn counter(path: &PathBuf) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

impl Recorder {
    /// Starts sampling `hosts` (the origin first); times are counted from `t0`.
    pub fn start(hosts: &[NetHost], t0: Instant) -> Result<Self> {
        let paths: Vec<(PathBuf, PathBuf)> = hosts
            .iter()
            .map(|h| {
                let dir = PathBuf::from("/sys/class/net").join(&h.outer).join("statistics");
                (dir.join("rx_bytes"), dir.join("tx_bytes"))
            })
            .collect();
        for (up, _) in &paths {
            std::fs::metadata(up).with_context(|| format!("reading {}", up.display()))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next = Instant::now();
            loop {
                let bytes = paths.iter().map(|(up, down)| (counter(up), counter(down))).collect();
                samples.push(Sample { at: t0.elapsed(), bytes });
                if stopped.load(Ordering::Relaxed) {
                    return samples;
                }
                next += TIMELINE_STEP;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Ok(Self { stop, thread })
    }

    /// Stops sampling and prints the timeline: per step, the origin's upload and every mirror's download in MB/s,
    /// then when the origin's link and the mirrors' links were last busy. `rates` are the shaped rates (bytes/s).
    pub fn finish_and_print(self, title: &str, rates: &[f64]) {
        self.stop.store(true, Ordering::Relaxed);
        let Ok(samples) = self.thread.join() else {
            println!("timeline of {title}: the sampling thread failed");
            return;
        };
        println!();
        println!("timeline of {title}: MB/s per {} ms step", TIMELINE_STEP.as_millis());
        let mirrors = rates.len().saturating_sub(1);
        let names: Vec<String> = (1..=mirrors).map(|i| format!("m{i}")).collect();
        println!("{:>6} | {:>9} | mirrors' downloads: {}", "t s", "origin up", names.join(" "));
        let mut origin_busy_until = Duration::ZERO;
        let mut mirrors_busy_until = Duration::ZERO;
        let mut mirror_fill = (0.0, 0usize);
        for pair in samples.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let secs = (b.at - a.at).as_secs_f64().max(1e-3);
            let rate = |i: usize, down: bool| {
                let (x, y) = if down { (a.bytes[i].1, b.bytes[i].1) } else { (a.bytes[i].0, b.bytes[i].0) };
                y.saturating_sub(x) as f64 / secs
            };
            let origin = rate(0, false);
            let origin_busy = origin >= BUSY_SHARE * rates[0];
            let downs: Vec<f64> = (1..=mirrors).map(|i| rate(i, true)).collect();
            if downs.iter().zip(&rates[1..]).any(|(d, r)| *d >= BUSY_SHARE * r) {
                mirrors_busy_until = b.at;
            }
            if origin_busy {
                origin_busy_until = b.at;
                for (d, r) in downs.iter().zip(&rates[1..]) {
                    mirror_fill.0 += d / r;
                    mirror_fill.1 += 1;
                }
            }
            let cells: Vec<String> = downs.iter().map(|d| format!("{:4.1}", d / 1e6)).collect();
            println!("{:>6.1} | {:>9.1} | {}", a.at.as_secs_f64(), origin / 1e6, cells.join(" "));
        }
        let fill = if mirror_fill.1 == 0 { 0.0 } else { mirror_fill.0 / mirror_fill.1 as f64 };
        println!(
            "origin's link busy until {:.1} s; mirrors' downloads filled {:.0}% of their links meanwhile; \
             a mirror's link busy until {:.1} s ({:.1} s after the origin's)",
            origin_busy_until.as_secs_f64(),
            fill * 100.0,
            mirrors_busy_until.as_secs_f64(),
            mirrors_busy_until.saturating_sub(origin_busy_until).as_secs_f64(),
        );
    }
}
