//! Turning an outcome into numbers: one row per reported update, a text table, a CSV and two SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::bounds::{client_server, kumar_ross};
use crate::world::{EGRESS_BUCKET_NS, Kind, ORIGIN, Outcome};

/// One reported update.
#[derive(Clone, Debug)]
pub struct UpdateRow {
    pub seq: u64,
    pub kind: &'static str,
    pub files: u64,
    /// Bytes of new chunks (`S`).
    pub bytes: u64,
    /// Ordinary mirrors that applied it.
    pub mirrors: usize,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
    pub t_min_s: f64,
    pub tmax_over_tmin: f64,
    pub origin_bytes: u64,
    pub origin_over_update: f64,
    pub rsync_s: f64,
    pub rsync_over_tmax: f64,
    /// Mean chunk bytes per ordinary mirror, from peers and from the origin.
    pub from_peers_per_mirror: f64,
    pub from_origin_per_mirror: f64,
    /// Completion times of every ordinary mirror, sorted (for the CDF).
    pub completions_s: Vec<f64>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Rows for every update that was published and not preloaded.
pub fn rows(outcome: &Outcome) -> Vec<UpdateRow> {
    let origin = &outcome.nodes[ORIGIN as usize];
    let ordinary: Vec<usize> = (0..outcome.nodes.len()).filter(|&i| outcome.nodes[i].kind == Kind::Mirror).collect();
    let ups: Vec<f64> = ordinary.iter().map(|&i| outcome.nodes[i].up_bps).collect();
    let downs: Vec<f64> = ordinary.iter().map(|&i| outcome.nodes[i].down_bps).collect();
    let latency: Vec<u64> = ordinary.iter().map(|&i| outcome.origin_latency[i]).collect();
    let mut rows = Vec::new();
    for (k, p) in outcome.published.iter().enumerate() {
        if p.plan.preloaded {
            continue;
        }
        let mut completions: Vec<f64> = ordinary
            .iter()
            .filter_map(|&i| outcome.nodes[i].completed[k])
            .map(|at| at.saturating_sub(p.at) as f64 / 1e9)
            .collect();
        completions.sort_by(f64::total_cmp);
        let bytes = p.size.bytes;
        let t_min = kumar_ross(bytes, origin.up_bps, &ups, &downs);
        let max = completions.last().copied().unwrap_or(f64::NAN);
        let rsync = client_server(bytes, origin.up_bps, &downs, &latency);
        let w = &outcome.windows[k];
        let n = ordinary.len().max(1) as f64;
        rows.push(UpdateRow {
            seq: p.seq,
            kind: p.plan.kind,
            files: p.size.files,
            bytes,
            mirrors: completions.len(),
            p50_s: quantile(&completions, 0.5),
            p99_s: quantile(&completions, 0.99),
            max_s: max,
            t_min_s: t_min,
            tmax_over_tmin: max / t_min,
            origin_bytes: w.origin_bytes,
            origin_over_update: w.origin_bytes as f64 / bytes.max(1) as f64,
            rsync_s: rsync,
            rsync_over_tmax: rsync / max,
            from_peers_per_mirror: w.from_peers as f64 / n,
            from_origin_per_mirror: w.from_origin as f64 / n,
            completions_s: completions,
        });
    }
    rows
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

/// The per-update table.
pub fn table(rows: &[UpdateRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>4} {:<8} {:>6} {:>10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>12} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "seq",
        "kind",
        "files",
        "MB",
        "nodes",
        "p50 s",
        "p99 s",
        "max s",
        "Tmin s",
        "Tmax/Tmin",
        "origin MB",
        "origin/S",
        "rsync s",
        "rsync/Tmax",
        "peers MB/n",
        "origin MB/n"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>4} {:<8} {:>6} {:>10.1} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.3} {:>12.1} {:>9.3} {:>9.2} {:>9.2} {:>11.1} {:>11.2}",
            r.seq,
            r.kind,
            r.files,
            mb(r.bytes as f64),
            r.mirrors,
            r.p50_s,
            r.p99_s,
            r.max_s,
            r.t_min_s,
            r.tmax_over_tmin,
            mb(r.origin_bytes as f64),
            r.origin_over_update,
            r.rsync_s,
            r.rsync_over_tmax,
            mb(r.from_peers_per_mirror),
            mb(r.from_origin_per_mirror),
        );
    }
    s
}

pub fn write_csv(path: &Path, rows: &[UpdateRow]) -> Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    w.write_record([
        "seq",
        "kind",
        "files",
        "update_bytes",
        "mirrors",
        "p50_s",
        "p99_s",
        "max_s",
        "t_min_s",
        "tmax_over_tmin",
        "origin_bytes",
        "origin_over_update",
        "rsync_s",
        "rsync_over_tmax",
        "from_peers_bytes_per_mirror",
        "from_origin_bytes_per_mirror",
    ])?;
    for r in rows {
        w.write_record([
            r.seq.to_string(),
            r.kind.to_string(),
            r.files.to_string(),
            r.bytes.to_string(),
            r.mirrors.to_string(),
            format!("{:.4}", r.p50_s),
            format!("{:.4}", r.p99_s),
            format!("{:.4}", r.max_s),
            format!("{:.4}", r.t_min_s),
            format!("{:.4}", r.tmax_over_tmin),
            r.origin_bytes.to_string(),
            format!("{:.4}", r.origin_over_update),
            format!("{:.4}", r.rsync_s),
            format!("{:.4}", r.rsync_over_tmax),
            format!("{:.0}", r.from_peers_per_mirror),
            format!("{:.0}", r.from_origin_per_mirror),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// One line per node: its kind, region, capacities and when it applied each update (seconds after publication).
pub fn write_nodes_csv(path: &Path, outcome: &Outcome) -> Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut header = vec!["node".to_string(), "kind".into(), "region".into(), "up_mbit".into(), "down_mbit".into()];
    header.extend(outcome.published.iter().map(|p| format!("seq{}_s", p.seq)));
    w.write_record(&header)?;
    for (i, n) in outcome.nodes.iter().enumerate() {
        let kind = match n.kind {
            Kind::Origin => "origin".to_string(),
            Kind::Mirror if n.slow => "slow".into(),
            Kind::Mirror => "mirror".into(),
            Kind::Byzantine(b) => format!("{b:?}").to_lowercase(),
        };
        let mut row = vec![
            i.to_string(),
            kind,
            n.region.to_string(),
            format!("{:.0}", n.up_bps * 8.0 / 1e6),
            format!("{:.0}", n.down_bps * 8.0 / 1e6),
        ];
        for (k, p) in outcome.published.iter().enumerate() {
            row.push(n.completed[k].map_or(String::new(), |at| format!("{:.3}", at.saturating_sub(p.at) as f64 / 1e9)));
        }
        w.write_record(&row)?;
    }
    w.flush()?;
    Ok(())
}

/// The origin's egress per time bucket.
pub fn write_egress_csv(path: &Path, outcome: &Outcome) -> Result<()> {
    let mut w = csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    w.write_record(["start_s", "bytes", "mbit_per_s"])?;
    let secs = EGRESS_BUCKET_NS as f64 / 1e9;
    for (i, b) in outcome.egress.iter().enumerate() {
        w.write_record([format!("{:.3}", i as f64 * secs), format!("{b:.0}"), format!("{:.1}", b * 8.0 / 1e6 / secs)])?;
    }
    w.flush()?;
    Ok(())
}

/// Completion CDF of each update (the largest few when there are many), with its `T_min` marked.
pub fn plot_completion_cdf(path: &Path, title: &str, rows: &[UpdateRow]) -> Result<()> {
    let mut shown: Vec<&UpdateRow> = rows.iter().filter(|r| !r.completions_s.is_empty()).collect();
    shown.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.seq.cmp(&b.seq)));
    shown.truncate(6);
    shown.sort_by_key(|r| r.seq);
    let x_max = shown.iter().map(|r| r.max_s.max(r.t_min_s)).fold(0.0, f64::max).max(1e-3) * 1.05;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: completion CDF"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart.configure_mesh().x_desc("seconds after publication").y_desc("fraction of mirrors done").draw()?;
    for (i, r) in shown.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let n = r.completions_s.len() as f64;
        let points: Vec<(f64, f64)> =
            r.completions_s.iter().enumerate().map(|(j, t)| (*t, (j + 1) as f64 / n)).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!("seq {} {} {:.0} MB", r.seq, r.kind, mb(r.bytes as f64)))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(LineSeries::new(vec![(r.t_min_s, 0.0), (r.t_min_s, 1.0)], color.stroke_width(1)))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// The origin's egress over time (Mbit/s per bucket), with each publication marked.
pub fn plot_origin_egress(path: &Path, title: &str, outcome: &Outcome, origin_up_bps: f64) -> Result<()> {
    let secs = EGRESS_BUCKET_NS as f64 / 1e9;
    let points: Vec<(f64, f64)> =
        outcome.egress.iter().enumerate().map(|(i, b)| (i as f64 * secs, *b * 8.0 / 1e6 / secs)).collect();
    let x_max = (outcome.stats.virtual_ns as f64 / 1e9).max(1e-3);
    let y_max = (origin_up_bps * 8.0 / 1e6) * 1.1;
    let root = SVGBackend::new(path, (900, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: origin egress"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc("virtual seconds").y_desc("Mbit/s").draw()?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(1)))?
        .label("origin egress")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    for p in &outcome.published {
        let x = p.at as f64 / 1e9;
        chart.draw_series(LineSeries::new(vec![(x, 0.0), (x, y_max)], RED.mix(0.4)))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
