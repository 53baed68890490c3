//! Scenario files: what to simulate, in TOML. Unknown keys are errors; every value is checked against a named
//! limit before the run starts, and errors name the key.
//!
//! ```toml
//! name = "example"
//! seed = 7
//! mirrors = 20            # mirror nodes; node 0 is the origin
//! degree = 8              # optional, for experiments: mirrors each mirror dials past the full-mesh limit
//!                         # (default: the daemon's rule, `mirrormesh_proto::membership::MESH_DIALS`)
//! origin_up_mbit = 1000
//! origin_down_mbit = 1000
//! mirror_up_mbit = { min = 1000, max = 10000 }        # a number, { min, max } or { values, weights }
//! mirror_down_mbit = 10000
//! regions = [{ name = "eu", weight = 2 }, { name = "us", weight = 1 }]
//! latency_ms = [[5, 45], [45, 5]]                       # one-way, region by region (the origin is in region 0)
//! placement = [1, 0]                                    # optional: mirror 1's region, mirror 2's, ... (cycled);
//!                                                       # default: each mirror's region drawn by the weights
//! loss = 0.0                                            # chance a control message needs a retransmission
//!
//! [tree]
//! apkindex = "../../../shared/data/alpine-v3.17-main-aarch64.APKINDEX.tar.gz"   # relative to this file
//! fraction = 0.1          # or: profile = 5004 (packages drawn from the built-in size profile)
//!
//! [[updates]]
//! kind = "initial"        # the whole tree; `preloaded = true` starts every mirror with it instead
//! [[updates]]
//! kind = "release"        # `packages` rebuilt at once
//! packages = 200
//! [[updates]]
//! kind = "trickle"        # `count` updates of `packages` each, `every_s` apart
//! packages = 2
//! every_s = 5
//! count = 3
//!
//! [[faults]]
//! kind = "churn"          # also: partition, origin_crash, byzantine, slow
//!                         # byzantine behaviours: corrupt, liar, forger, replayer, and three that claim the whole
//!                         # snapshot in their hellos and then answer chunk requests with elsewhere, stall (never
//!                         # answer) or no_data_addr (every request to them fails at once)
//! nodes = 3
//! update = 1
//! after_s = 0.5
//! within_s = 2
//! down_s = 4
//!
//! [expect]                # bounds checked after the run (and by the tests)
//! origin_over_update_max = 1.05
//! tmax_over_tmin_max = 1.25
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

/// Most mirrors a scenario may have.
pub const MIRRORS_MAX: u32 = 100_000;
/// Most regions.
pub const REGIONS_MAX: usize = 64;
/// Longest virtual run, seconds.
pub const TIME_LIMIT_S_MAX: f64 = 7.0 * 86_400.0;
/// Smallest and largest step of the network model, microseconds.
pub const STEP_US_MIN: u64 = 10;
pub const STEP_US_MAX: u64 = 100_000;
/// Largest link capacity, Mbit/s, and smallest.
pub const CAPACITY_MBIT_MAX: f64 = 1_000_000.0;
pub const CAPACITY_MBIT_MIN: f64 = 0.001;
/// Largest one-way latency, milliseconds.
pub const LATENCY_MS_MAX: f64 = 10_000.0;
/// Most updates after expansion (a trickle counts once per update).
pub const UPDATES_MAX: usize = 10_000;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub mirrors: u32,
    /// Overrides the mesh rule's dials per mirror (past the full-mesh limit); `None`: the daemon's rule.
    #[serde(default)]
    pub degree: Option<u32>,
    pub origin_up_mbit: f64,
    pub origin_down_mbit: f64,
    pub mirror_up_mbit: Dist,
    pub mirror_down_mbit: Dist,
    #[serde(default = "default_regions")]
    pub regions: Vec<Region>,
    #[serde(default = "default_latency")]
    pub latency_ms: Vec<Vec<f64>>,
    /// The region of mirror 1, 2, ... in order, cycled (a testbed's hosts, one per site); `None`: drawn by weight.
    #[serde(default)]
    pub placement: Option<Vec<usize>>,
    #[serde(default)]
    pub loss: f64,
    /// Every node on one machine whose CPU bounds their traffic together (the testbed); absent: CPU to spare.
    #[serde(default)]
    pub host_cpu: Option<HostCpu>,
    /// Step of the network model.
    #[serde(default = "default_step_us")]
    pub step_us: u64,
    /// The run fails if it has not converged after this much virtual time.
    #[serde(default = "default_time_limit_s")]
    pub time_limit_s: f64,
    pub tree: TreeSpec,
    pub updates: Vec<UpdateSpec>,
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    #[serde(default)]
    pub expect: Expect,
    /// Where relative paths in the file are resolved from (the scenario file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// A distribution of link capacities (Mbit/s).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Dist {
    Fixed(f64),
    Uniform { min: f64, max: f64 },
    Choice { values: Vec<f64>, weights: Vec<f64> },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    pub weight: f64,
}

/// One machine's CPU shared by every node: each byte costs CPU at its sender and its receiver, so all flows
/// together carry at most `cores / cpu_s_per_gb` GB/s.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCpu {
    /// Cores the daemons get (the machine's, less what else runs on it, such as the testbed's WAN emulators).
    pub cores: f64,
    /// CPU seconds the daemons spend per GB of chunk traffic, sender and receiver together (`testbed sync` prints
    /// it per step as the daemons' CPU per GB the mirrors received).
    pub cpu_s_per_gb: f64,
}

impl HostCpu {
    /// Bytes per second all flows together may carry.
    pub fn bytes_per_sec(&self) -> f64 {
        self.cores / self.cpu_s_per_gb * 1e9
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeSpec {
    /// An APKINDEX file (relative to the scenario file); its packages' real names and sizes.
    pub apkindex: Option<String>,
    /// Or this many packages with sizes drawn from the built-in profile of a real index.
    pub profile: Option<usize>,
    /// Share of the packages to keep (a seeded random subset).
    #[serde(default = "default_fraction")]
    pub fraction: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum UpdateSpec {
    /// Publish the whole tree. With `preloaded`, every mirror starts with it applied (nothing is transferred and
    /// the update is not reported).
    Initial {
        #[serde(default)]
        preloaded: bool,
    },
    /// `packages` rebuilt at once, published `after_s` after the previous update (default: once every mirror has
    /// the previous update, plus a second).
    Release { packages: usize, after_s: Option<f64> },
    /// `count` updates of `packages` each, `every_s` apart (the first after the previous update converged).
    Trickle { packages: usize, every_s: f64, count: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Serves bytes that do not match the chunk asked for.
    Corrupt,
    /// Announces every chunk of the snapshot without holding them.
    Liar,
    /// Gossips roots signed by a key nobody trusts.
    Forger,
    /// Gossips older genuine roots (rollbacks).
    Replayer,
    /// Claims the whole newest snapshot in its hellos and answers every chunk request with "elsewhere" (only an
    /// origin may redirect).
    Elsewhere,
    /// Claims the whole newest snapshot in its hellos and never answers a chunk request.
    Stall,
    /// Claims the whole newest snapshot in its hellos but gives no data-plane address: every chunk request to it
    /// fails at once.
    NoDataAddr,
}

impl Behaviour {
    /// It claims in its hellos to hold the newest snapshot completely, whatever it holds.
    pub fn claims_complete(self) -> bool {
        matches!(self, Behaviour::Elsewhere | Behaviour::Stall | Behaviour::NoDataAddr)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// `nodes` random mirrors each go down once, at a random instant in `[after_s, after_s + within_s)` after
    /// update `update` is published, for `down_s` seconds (a restart: the engine is rebuilt from persisted state).
    Churn {
        nodes: u32,
        #[serde(default)]
        update: usize,
        after_s: f64,
        within_s: f64,
        down_s: f64,
    },
    /// A random `fraction` of the mirrors is cut off from the rest and the origin, `after_s` after update `update`
    /// is published, until `heal_after_s` later.
    Partition {
        fraction: f64,
        #[serde(default)]
        update: usize,
        after_s: f64,
        heal_after_s: f64,
    },
    /// The origin goes down `after_s` after update `update` is published, for `down_s` seconds.
    OriginCrash {
        #[serde(default)]
        update: usize,
        after_s: f64,
        down_s: f64,
    },
    /// `nodes` random mirrors misbehave this way for the whole run.
    Byzantine { behaviour: Behaviour, nodes: u32 },
    /// `nodes` random mirrors have their capacities multiplied by `factor`.
    Slow { nodes: u32, factor: f64 },
}

/// Bounds checked after the run, on every reported update.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub origin_over_update_max: Option<f64>,
    pub tmax_over_tmin_max: Option<f64>,
}

/// An update after expansion: what changes and when it is published.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedUpdate {
    pub kind: &'static str,
    /// Packages rebuilt (0 for the initial tree).
    pub packages: usize,
    pub timing: Timing,
    pub preloaded: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Timing {
    /// At the start of the run.
    Start,
    /// This long after every live mirror applied the previous update.
    AfterConverged(f64),
    /// This long after the previous update was published.
    AfterPrevious(f64),
}

fn default_seed() -> u64 {
    1
}
fn default_regions() -> Vec<Region> {
    vec![Region { name: "all".into(), weight: 1.0 }]
}
fn default_latency() -> Vec<Vec<f64>> {
    vec![vec![10.0]]
}
fn default_step_us() -> u64 {
    1000
}
fn default_time_limit_s() -> f64 {
    3600.0
}
fn default_fraction() -> f64 {
    1.0
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read scenario {}", path.display()))?;
        let mut scenario = Self::parse(&text).with_context(|| format!("invalid scenario {}", path.display()))?;
        scenario.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(scenario)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn validate(&self) -> Result<()> {
        ensure!(!self.name.is_empty() && self.name.len() <= 64, "name: 1 to 64 characters");
        ensure!(
            self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "name: letters, digits, '-' and '_' only (it names the results directory)"
        );
        ensure!((1..=MIRRORS_MAX).contains(&self.mirrors), "mirrors: 1 to {MIRRORS_MAX}");
        ensure!(self.degree.is_none_or(|d| d < self.mirrors.max(1) || d == 0), "degree: must be less than mirrors");
        for (key, v) in [("origin_up_mbit", self.origin_up_mbit), ("origin_down_mbit", self.origin_down_mbit)] {
            check_capacity(key, v)?;
        }
        if let Some(host) = &self.host_cpu {
            ensure!(host.cores.is_finite() && (0.1..=1024.0).contains(&host.cores), "host_cpu.cores: 0.1 to 1024");
            ensure!(
                host.cpu_s_per_gb.is_finite() && (0.01..=1000.0).contains(&host.cpu_s_per_gb),
                "host_cpu.cpu_s_per_gb: 0.01 to 1000"
            );
        }
        self.mirror_up_mbit.validate("mirror_up_mbit")?;
        self.mirror_down_mbit.validate("mirror_down_mbit")?;
        ensure!((1..=REGIONS_MAX).contains(&self.regions.len()), "regions: 1 to {REGIONS_MAX}");
        for r in &self.regions {
            ensure!(r.weight.is_finite() && r.weight > 0.0, "regions: weight of {:?} must be positive", r.name);
        }
        ensure!(
            self.latency_ms.len() == self.regions.len()
                && self.latency_ms.iter().all(|row| row.len() == self.regions.len()),
            "latency_ms: must be a {n} x {n} matrix (one row and column per region)",
            n = self.regions.len()
        );
        for row in &self.latency_ms {
            for &l in row {
                ensure!((0.0..=LATENCY_MS_MAX).contains(&l), "latency_ms: each value 0 to {LATENCY_MS_MAX}");
            }
        }
        if let Some(placement) = &self.placement {
            ensure!(
                (1..=self.mirrors as usize).contains(&placement.len()),
                "placement: 1 to {} entries (one per mirror at most)",
                self.mirrors
            );
            ensure!(
                placement.iter().all(|&r| r < self.regions.len()),
                "placement: each entry a region's index, below {}",
                self.regions.len()
            );
        }
        ensure!((0.0..=0.5).contains(&self.loss), "loss: 0 to 0.5");
        ensure!((STEP_US_MIN..=STEP_US_MAX).contains(&self.step_us), "step_us: {STEP_US_MIN} to {STEP_US_MAX}");
        ensure!(
            self.time_limit_s > 0.0 && self.time_limit_s <= TIME_LIMIT_S_MAX,
            "time_limit_s: 0 to {TIME_LIMIT_S_MAX}"
        );
        match (&self.tree.apkindex, self.tree.profile) {
            (Some(_), None) => {}
            (None, Some(n)) => ensure!((1..=1_000_000).contains(&n), "tree.profile: 1 to 1000000 packages"),
            _ => bail!("tree: give exactly one of apkindex and profile"),
        }
        ensure!(self.tree.fraction > 0.0 && self.tree.fraction <= 1.0, "tree.fraction: above 0, at most 1");
        let planned = self.planned_updates()?;
        ensure!(!planned.is_empty() && planned.len() <= UPDATES_MAX, "updates: 1 to {UPDATES_MAX} after expansion");
        let mut special = 0u32;
        for fault in &self.faults {
            match fault {
                FaultSpec::Churn { nodes, update, after_s, within_s, down_s } => {
                    ensure!(*nodes <= self.mirrors, "faults.churn.nodes: at most mirrors");
                    check_update_ref(*update, planned.len())?;
                    check_seconds("faults.churn.after_s", *after_s)?;
                    check_seconds("faults.churn.within_s", *within_s)?;
                    check_seconds("faults.churn.down_s", *down_s)?;
                }
                FaultSpec::Partition { fraction, update, after_s, heal_after_s } => {
                    ensure!(*fraction > 0.0 && *fraction < 1.0, "faults.partition.fraction: between 0 and 1");
                    check_update_ref(*update, planned.len())?;
                    check_seconds("faults.partition.after_s", *after_s)?;
                    check_seconds("faults.partition.heal_after_s", *heal_after_s)?;
                }
                FaultSpec::OriginCrash { update, after_s, down_s } => {
                    check_update_ref(*update, planned.len())?;
                    check_seconds("faults.origin_crash.after_s", *after_s)?;
                    check_seconds("faults.origin_crash.down_s", *down_s)?;
                }
                FaultSpec::Byzantine { nodes, .. } => special += nodes,
                FaultSpec::Slow { nodes, factor } => {
                    special += nodes;
                    ensure!(*factor > 0.0 && *factor <= 1.0, "faults.slow.factor: above 0, at most 1");
                }
            }
        }
        ensure!(special < self.mirrors, "faults: byzantine and slow nodes must leave at least one ordinary mirror");
        for (key, v) in [
            ("expect.origin_over_update_max", self.expect.origin_over_update_max),
            ("expect.tmax_over_tmin_max", self.expect.tmax_over_tmin_max),
        ] {
            if let Some(v) = v {
                ensure!(v.is_finite() && v >= 1.0, "{key}: at least 1");
            }
        }
        Ok(())
    }

    /// The updates in publication order, trickles expanded.
    pub fn planned_updates(&self) -> Result<Vec<PlannedUpdate>> {
        let mut out = Vec::new();
        for (i, spec) in self.updates.iter().enumerate() {
            match spec {
                UpdateSpec::Initial { preloaded } => {
                    ensure!(i == 0, "updates: \"initial\" can only be the first update");
                    out.push(PlannedUpdate {
                        kind: "initial",
                        packages: 0,
                        timing: Timing::Start,
                        preloaded: *preloaded,
                    });
                }
                UpdateSpec::Release { packages, after_s } => {
                    ensure!(i > 0, "updates: the first update must be \"initial\"");
                    ensure!(*packages >= 1, "updates.release.packages: at least 1");
                    let timing = match after_s {
                        Some(s) => {
                            check_seconds("updates.release.after_s", *s)?;
                            Timing::AfterPrevious(*s)
                        }
                        None => Timing::AfterConverged(1.0),
                    };
                    out.push(PlannedUpdate { kind: "release", packages: *packages, timing, preloaded: false });
                }
                UpdateSpec::Trickle { packages, every_s, count } => {
                    ensure!(i > 0, "updates: the first update must be \"initial\"");
                    ensure!(*packages >= 1, "updates.trickle.packages: at least 1");
                    ensure!(*count >= 1 && *count <= UPDATES_MAX, "updates.trickle.count: 1 to {UPDATES_MAX}");
                    check_seconds("updates.trickle.every_s", *every_s)?;
                    for k in 0..*count {
                        let timing = if k == 0 { Timing::AfterConverged(1.0) } else { Timing::AfterPrevious(*every_s) };
                        out.push(PlannedUpdate { kind: "trickle", packages: *packages, timing, preloaded: false });
                    }
                }
            }
            ensure!(out.len() <= UPDATES_MAX, "updates: at most {UPDATES_MAX} after expansion");
        }
        Ok(out)
    }

    /// The APKINDEX path, resolved against the scenario file's directory.
    pub fn apkindex_path(&self) -> Option<PathBuf> {
        self.tree.apkindex.as_ref().map(|p| self.base_dir.join(p))
    }
}

impl Dist {
    fn validate(&self, key: &str) -> Result<()> {
        match self {
            Dist::Fixed(v) => check_capacity(key, *v),
            Dist::Uniform { min, max } => {
                check_capacity(key, *min)?;
                check_capacity(key, *max)?;
                ensure!(min <= max, "{key}: min above max");
                Ok(())
            }
            Dist::Choice { values, weights } => {
                ensure!(!values.is_empty() && values.len() == weights.len(), "{key}: one weight per value");
                for v in values {
                    check_capacity(key, *v)?;
                }
                ensure!(weights.iter().all(|w| w.is_finite() && *w > 0.0), "{key}: weights must be positive");
                Ok(())
            }
        }
    }

    /// Draws a value with `unit`, a uniform number in [0, 1).
    pub fn draw(&self, unit: f64) -> f64 {
        match self {
            Dist::Fixed(v) => *v,
            Dist::Uniform { min, max } => min + (max - min) * unit,
            Dist::Choice { values, weights } => values[pick_weighted(weights, unit)],
        }
    }
}

/// Index chosen by `unit` (uniform in [0, 1)) with these weights.
pub fn pick_weighted(weights: &[f64], unit: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = unit * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

fn check_capacity(key: &str, v: f64) -> Result<()> {
    ensure!(
        v.is_finite() && (CAPACITY_MBIT_MIN..=CAPACITY_MBIT_MAX).contains(&v),
        "{key}: {CAPACITY_MBIT_MIN} to {CAPACITY_MBIT_MAX} Mbit/s"
    );
    Ok(())
}

fn check_seconds(key: &str, v: f64) -> Result<()> {
    ensure!(v.is_finite() && (0.0..=TIME_LIMIT_S_MAX).contains(&v), "{key}: 0 to {TIME_LIMIT_S_MAX} seconds");
    Ok(())
}

fn check_update_ref(update: usize, updates: usize) -> Result<()> {
    ensure!(update < updates, "faults: update {update} does not exist (there are {updates} after expansion)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "t"
        mirrors = 3
        degree = 1
        origin_up_mbit = 100
        origin_down_mbit = 100
        mirror_up_mbit = { min = 10, max = 20 }
        mirror_down_mbit = 100
        [tree]
        profile = 10
        [[updates]]
        kind = "initial"
        [[updates]]
        kind = "trickle"
        packages = 1
        every_s = 2
        count = 3
    "#;

    #[test]
    fn parses_and_expands() {
        let s = Scenario::parse(MINIMAL).unwrap();
        let planned = s.planned_updates().unwrap();
        assert_eq!(planned.len(), 4);
        assert_eq!(planned[2].timing, Timing::AfterPrevious(2.0));
        assert!(matches!(s.mirror_up_mbit, Dist::Uniform { .. }));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (MINIMAL.replace("degree = 1", "degree = 1\nsped = 3"), "sped"),
            (MINIMAL.replace("mirrors = 3", "mirrors = 0"), "mirrors"),
            (MINIMAL.replace("profile = 10", "profile = 10\nfraction = 2"), "tree.fraction"),
            (MINIMAL.replace("count = 3", "count = 3\ncolour = 1"), "colour"),
            (MINIMAL.replace("origin_up_mbit = 100", "origin_up_mbit = -1"), "origin_up_mbit"),
            (MINIMAL.replace("kind = \"trickle\"", "kind = \"sprinkle\""), "sprinkle"),
            // One region (the default): index 1 does not exist; and more entries than mirrors.
            (MINIMAL.replace("degree = 1", "degree = 1\nplacement = [0, 1]"), "placement"),
            (MINIMAL.replace("degree = 1", "degree = 1\nplacement = [0, 0, 0, 0]"), "placement"),
        ];
        for (text, key) in cases {
            let err = format!("{:#}", Scenario::parse(&text).unwrap_err());
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
