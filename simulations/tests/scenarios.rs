//! Small scenarios run end to end through the simulator (the real engine per node): the checkers must pass, the
//! homogeneous run must stay near the Kumar–Ross bound, and a seed must replay the same run.

use mirrormesh_sim::scenario::Scenario;
use mirrormesh_sim::{Report, simulate};

fn run(text: &str, seed: u64) -> Report {
    let scenario = Scenario::parse(text).expect("valid scenario");
    let report = simulate(&scenario, seed, false).expect("the run starts");
    for c in &report.checks {
        println!("[{}] {}: {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
    }
    println!("{}", mirrormesh_sim::report::table(&report.rows));
    report
}

fn assert_checks(report: &Report, seed: u64) {
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "checkers failed with seed {seed}: {failed:?}");
}

/// All links equal: the origin sends the tree about once and the slowest mirror finishes near `S / U0`.
const HOMOGENEOUS: &str = r#"
    name = "homogeneous-small"
    mirrors = 20
    origin_up_mbit = 1000
    origin_down_mbit = 1000
    mirror_up_mbit = 1000
    mirror_down_mbit = 1000
    latency_ms = [[5]]
    [tree]
    profile = 600
    [[updates]]
    kind = "initial"
"#;

#[test]
fn homogeneous_run_stays_near_the_bound() {
    let report = run(HOMOGENEOUS, 5);
    assert_checks(&report, 5);
    let row = &report.rows[0];
    assert_eq!(row.mirrors, 20);
    assert!(row.origin_over_update <= 1.05, "origin sent {:.3} x the update", row.origin_over_update);
    assert!(row.tmax_over_tmin <= 1.25, "T_max / T_min = {:.3}", row.tmax_over_tmin);
    assert!(row.rsync_over_tmax > 5.0, "rsync from the origin is far slower: {:.2}", row.rsync_over_tmax);
    assert!(row.from_peers_per_mirror > 10.0 * row.from_origin_per_mirror);
}

/// Every kind of fault at once, on a small tree.
const FAULTS: &str = r#"
    name = "faults-small"
    mirrors = 24
    origin_up_mbit = 1000
    origin_down_mbit = 1000
    mirror_up_mbit = { min = 500, max = 2000 }
    mirror_down_mbit = { values = [1000, 2000], weights = [1, 1] }
    regions = [{ name = "eu", weight = 1 }, { name = "na", weight = 1 }]
    latency_ms = [[5, 40], [40, 8]]
    loss = 0.01
    time_limit_s = 300
    [tree]
    profile = 300
    [[updates]]
    kind = "initial"
    [[updates]]
    kind = "release"
    packages = 40
    [[updates]]
    kind = "release"
    packages = 20
    [[updates]]
    kind = "trickle"
    packages = 2
    every_s = 2
    count = 2
    [[faults]]
    kind = "byzantine"
    behaviour = "corrupt"
    nodes = 1
    [[faults]]
    kind = "byzantine"
    behaviour = "liar"
    nodes = 1
    [[faults]]
    kind = "byzantine"
    behaviour = "forger"
    nodes = 1
    [[faults]]
    kind = "byzantine"
    behaviour = "replayer"
    nodes = 1
    [[faults]]
    kind = "byzantine"
    behaviour = "elsewhere"
    nodes = 1
    [[faults]]
    kind = "byzantine"
    behaviour = "stall"
    nodes = 1
    [[faults]]
    kind = "byzantine"
    behaviour = "no_data_addr"
    nodes = 1
    [[faults]]
    kind = "slow"
    nodes = 2
    factor = 0.1
    [[faults]]
    kind = "churn"
    nodes = 3
    update = 1
    after_s = 0.1
    within_s = 0.5
    down_s = 2
    [[faults]]
    kind = "partition"
    fraction = 0.3
    update = 2
    after_s = 0.05
    heal_after_s = 3
    [[faults]]
    kind = "origin_crash"
    update = 3
    after_s = 0.1
    down_s = 2
"#;

#[test]
fn faults_of_every_kind_still_converge_and_byzantine_peers_are_found_out() {
    let report = run(FAULTS, 11);
    assert_checks(&report, 11);
    // One checker per byzantine peer ran (and passed above).
    assert_eq!(report.checks.iter().filter(|c| c.name == "byzantine peer found out").count(), 7);
    assert_eq!(report.rows.len(), 5);
}

#[test]
fn a_seed_replays_the_same_run() {
    // Uploads drawn per mirror, so the seed matters: 20 mirrors are a full mesh, whatever the seed.
    let drawn = HOMOGENEOUS.replace("mirror_up_mbit = 1000", "mirror_up_mbit = { min = 500, max = 1000 }");
    let first = run(&drawn, 9);
    let again = run(&drawn, 9);
    assert_eq!(first.trace_hex(), again.trace_hex());
    assert_eq!(first.outcome.stats.events, again.outcome.stats.events);
    let other = run(&drawn, 10);
    assert_ne!(first.trace_hex(), other.trace_hex(), "a different seed gives a different run");
}

#[test]
fn a_seed_replays_the_same_run_through_faults() {
    // Partitions, restarts and byzantine peers too: every collection whose order reaches the run is ordered.
    let first = run(FAULTS, 11);
    for _ in 0..2 {
        let again = run(FAULTS, 11);
        assert_eq!(first.trace_hex(), again.trace_hex());
        assert_eq!(first.outcome.stats.events, again.outcome.stats.events);
    }
}

#[test]
fn every_shipped_scenario_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("scenario directory") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            scenario.planned_updates().expect("updates expand");
            count += 1;
        }
    }
    assert!(count >= 5, "found {count} scenarios");
}

#[test]
fn a_placement_puts_each_mirror_in_its_region() {
    // Region 0 (the origin's) is 5 ms away one way, region 1 is 80 ms: mirrors 1 and 3 are placed far, 2 near.
    let text = HOMOGENEOUS
        .replace("mirrors = 20", "mirrors = 3")
        .replace(
            "latency_ms = [[5]]",
            "regions = [{ name = \"near\", weight = 1 }, { name = \"far\", weight = 1 }]\n\
             latency_ms = [[5, 80], [80, 5]]\nplacement = [1, 0]",
        )
        .replace("profile = 600", "profile = 20");
    let report = run(&text, 1);
    assert_checks(&report, 1);
    let ms = |id: usize| report.outcome.origin_latency[id] / 1_000_000;
    assert_eq!([ms(1), ms(2), ms(3)], [80, 5, 80], "placement cycles over the mirrors");
}
