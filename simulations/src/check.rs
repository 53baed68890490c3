//! Checkers run after every run: cluster-wide invariants and the scenario's expected bounds.

use mirrormesh_proto::sync::scheduler::SchedulerLimits;

use crate::report::UpdateRow;
use crate::scenario::{Behaviour, Scenario};
use crate::world::{Kind, ORIGIN, Outcome};

#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, ok: bool, detail: String) -> Check {
    Check { name, ok, detail }
}

pub fn run_checks(scenario: &Scenario, outcome: &Outcome, rows: &[UpdateRow]) -> Vec<Check> {
    let mut checks = Vec::new();
    let last = outcome.published.last();
    let ordinary: Vec<usize> = (0..outcome.nodes.len()).filter(|&i| outcome.nodes[i].kind == Kind::Mirror).collect();

    // 1. Convergence.
    let behind: Vec<usize> = ordinary
        .iter()
        .copied()
        .filter(|&i| outcome.nodes[i].applied.map(|a| a.0) != last.map(|p| p.seq) || !outcome.nodes[i].online)
        .collect();
    let all_published = outcome.published.len() == scenario.planned_updates().map(|p| p.len()).unwrap_or(0);
    checks.push(check(
        "converged",
        outcome.stats.converged && all_published && behind.is_empty(),
        format!(
            "{} of {} mirrors at seq {:?} after {:.2} virtual s{}",
            ordinary.len() - behind.len(),
            ordinary.len(),
            last.map(|p| p.seq),
            outcome.stats.virtual_ns as f64 / 1e9,
            if behind.is_empty() { String::new() } else { format!("; behind: {:?}", &behind[..behind.len().min(10)]) }
        ),
    ));

    // 2. Only genuine roots accepted, in increasing order, and the newest one held is a published one.
    let mut bad_roots = Vec::new();
    for &i in &ordinary {
        let n = &outcome.nodes[i];
        let increasing = n.accepted.windows(2).all(|w| w[0] < w[1]);
        let known = n.accepted.iter().all(|s| outcome.published.iter().any(|p| p.seq == *s));
        let latest_ok = n.latest.as_ref().is_none_or(|l| outcome.published.iter().any(|p| &p.signed == l));
        if !(increasing && known && latest_ok) {
            bad_roots.push(i);
        }
    }
    let rejected: u64 = ordinary.iter().map(|&i| outcome.nodes[i].rejected.values().sum::<u64>()).sum();
    checks.push(check(
        "no forged or rolled-back root accepted",
        bad_roots.is_empty(),
        format!("{} roots rejected by mirrors; offending mirrors: {:?}", rejected, bad_roots),
    ));

    // 3. Every stored chunk hashes to its id.
    let stored: u64 = outcome.nodes.iter().map(|n| n.chunks_stored).sum();
    let bad: u64 = outcome.nodes.iter().map(|n| n.chunks_bad).sum();
    checks.push(check("stored chunks verify", bad == 0, format!("{stored} stored chunks re-hashed, {bad} wrong")));

    // 4. Byzantine peers are found out; nobody honest is banned.
    for (i, n) in outcome.nodes.iter().enumerate() {
        let Kind::Byzantine(behaviour) = n.kind else { continue };
        let (ok, detail) = match behaviour {
            Behaviour::Stall => {
                // A silent claimer is found stalled by a mirror that waits on it for the stall allowance, and
                // banned only after several stalls in one snapshot. In a short update nobody may wait that long
                // (the chunks come from elsewhere and the requests to it are cancelled): then it must have held
                // nobody up beyond the longest a request may take.
                let by = ordinary.iter().filter(|&&m| outcome.nodes[m].bans.iter().any(|b| b.0 as usize == i)).count();
                let stalled =
                    ordinary.iter().filter(|&&m| outcome.nodes[m].stalls.iter().any(|&p| p as usize == i)).count();
                let waited = ordinary
                    .iter()
                    .filter_map(|&m| outcome.nodes[m].longest_ask.get(&(i as u32)).copied())
                    .max()
                    .unwrap_or(0);
                let limits = SchedulerLimits::default();
                let allowance_ms = limits.request_timeout_base_ms
                    + limits.request_bytes_target * 1000 / limits.timeout_rate_min.max(1);
                (
                    by + stalled > 0 || waited <= allowance_ms * 1_000_000,
                    format!(
                        "node {i} ({behaviour:?}) banned by {by} mirrors, found stalled by {stalled}; the longest a \
                         mirror waited on it: {:.1} s (a request may take {:.1} s)",
                        waited as f64 / 1e9,
                        allowance_ms as f64 / 1e3
                    ),
                )
            }
            Behaviour::Corrupt | Behaviour::Liar | Behaviour::Elsewhere | Behaviour::NoDataAddr => {
                let by = ordinary.iter().filter(|&&m| outcome.nodes[m].bans.iter().any(|b| b.0 as usize == i)).count();
                (by > 0, format!("node {i} ({behaviour:?}) banned by {by} mirrors"))
            }
            Behaviour::Forger | Behaviour::Replayer => {
                let reason = if behaviour == Behaviour::Forger { "unknown_publisher" } else { "rollback" };
                let by = ordinary.iter().filter(|&&m| outcome.nodes[m].rejected.contains_key(reason)).count();
                (by > 0, format!("node {i} ({behaviour:?}): {by} mirrors rejected its roots ({reason})"))
            }
        };
        checks.push(check("byzantine peer found out", ok, detail));
    }
    let false_bans: Vec<(usize, u32)> = ordinary
        .iter()
        .flat_map(|&m| {
            outcome.nodes[m]
                .bans
                .iter()
                .filter(|b| b.0 == ORIGIN || outcome.nodes[b.0 as usize].kind == Kind::Mirror)
                .map(move |b| (m, b.0))
        })
        .collect();
    checks.push(check(
        "no honest peer banned",
        false_bans.is_empty(),
        format!("{} bans of honest peers {:?}", false_bans.len(), &false_bans[..false_bans.len().min(10)]),
    ));
    checks.push(check(
        "engine calls succeeded",
        outcome.stats.engine_errors == 0,
        format!("{} engine errors", outcome.stats.engine_errors),
    ));

    // 5. The scenario's bounds.
    if let Some(max) = scenario.expect.origin_over_update_max {
        let worst = rows.iter().map(|r| r.origin_over_update).fold(0.0, f64::max);
        checks.push(check("origin bytes / update bytes", worst <= max, format!("worst {worst:.3}, bound {max}")));
    }
    if let Some(max) = scenario.expect.tmax_over_tmin_max {
        let worst = rows.iter().map(|r| r.tmax_over_tmin).fold(0.0, f64::max);
        checks.push(check("T_max / T_min", worst <= max, format!("worst {worst:.3}, bound {max}")));
    }
    checks
}
