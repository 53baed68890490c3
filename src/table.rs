//! Plain-text tables for `mirrormesh status`, `peers` and `repos`: columns sized to their contents; to fit the
//! terminal the widest shrinkable ones are cut (with `…`), then the least important ones left out. Only on a
//! terminal: in a pipe or a file (`mirrormesh peers | grep`, `> peers.txt`) nothing is ever cut or left out,
//! whatever `COLUMNS` says.
//!
//! Weighed against comfy-table (and tabled): fitting a table to the terminal is their arrangement of wrapping or
//! cutting each cell at its end; neither cuts in the middle (peer ids and addresses differ at both ends) nor leaves
//! columns out by importance, which is what this module decides. With that policy kept, what a table crate would
//! take over is the padding of each line (a dozen lines below), for another dependency and a changed output:
//! kept by hand.

use std::time::Duration;

use indicatif::{HumanBytes, HumanDuration};

use crate::status::{PeerStatus, RepoStatus, Status};

/// Width assumed on a terminal that does not tell its size when `COLUMNS` is not set either.
pub const DEFAULT_WIDTH: usize = 120;
/// Shrinkable columns are cut to this width before any column is left out (a peer id cut to 20 characters still
/// tells peers apart), and to [`SHRINK_MIN`] after.
const SHRINK_COMFORT: usize = 20;
/// Narrowest a shrinkable column gets.
const SHRINK_MIN: usize = 8;

pub struct Column {
    pub title: &'static str,
    pub right: bool,
    /// May be cut to fit.
    pub shrink: bool,
    /// Columns are left out lowest rank first when cutting is not enough (0: always shown).
    pub rank: u8,
}

const fn col(title: &'static str, right: bool, shrink: bool, rank: u8) -> Column {
    Column { title, right, shrink, rank }
}

/// The width to fit when stdout is a terminal: its size, else `COLUMNS`, else [`DEFAULT_WIDTH`]. `None` when
/// stdout is not a terminal (a pipe, a file): nothing is to be cut.
pub fn terminal_width() -> Option<usize> {
    let stdout = console::Term::stdout();
    if !stdout.is_term() {
        return None;
    }
    if let Some((_, cols)) = stdout.size_checked() {
        return Some(usize::from(cols));
    }
    Some(std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).filter(|&c| c > 0).unwrap_or(DEFAULT_WIDTH))
}

/// Cuts `text` to `width` characters, keeping its start and end (ids and addresses differ at both).
fn cut(text: &str, width: usize) -> String {
    let n = text.chars().count();
    if n <= width {
        return text.to_owned();
    }
    if width <= 1 {
        return "…".chars().take(width).collect();
    }
    let head = (width - 1) / 2;
    let tail = width - 1 - head;
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(n - tail).collect();
    format!("{start}…{end}")
}

/// Renders `rows` under `columns` in at most `width` characters per line (as far as rank-0 columns allow); with
/// no width, every column whole.
pub fn render(columns: &[Column], rows: &[Vec<String>], width: Option<usize>) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.title.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut shown: Vec<bool> = vec![true; columns.len()];
    let total = |widths: &[usize], shown: &[bool]| {
        let n = shown.iter().filter(|s| **s).count();
        widths.iter().zip(shown).filter(|(_, s)| **s).map(|(w, _)| w).sum::<usize>() + 2 * n.saturating_sub(1)
    };
    let widest = |widths: &[usize], shown: &[bool], floor: usize| {
        (0..columns.len())
            .filter(|&i| shown[i] && columns[i].shrink && widths[i] > floor)
            .max_by_key(|&i| (widths[i], std::cmp::Reverse(i)))
    };
    while let Some(width) = width
        && total(&widths, &shown) > width
    {
        if let Some(i) = widest(&widths, &shown, SHRINK_COMFORT) {
            widths[i] -= 1;
            continue;
        }
        let least = (0..columns.len())
            .filter(|&i| shown[i] && columns[i].rank > 0)
            .min_by_key(|&i| (columns[i].rank, std::cmp::Reverse(i)));
        if let Some(i) = least {
            shown[i] = false;
            continue;
        }
        match widest(&widths, &shown, SHRINK_MIN) {
            Some(i) => widths[i] -= 1,
            None => break,
        }
    }
    let visible: Vec<usize> = (0..columns.len()).filter(|&i| shown[i]).collect();
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (k, &i) in visible.iter().enumerate() {
            let cell = cut(cells.get(i).map_or("", String::as_str), widths[i]);
            let pad = widths[i] - cell.chars().count();
            if k > 0 {
                out.push_str("  ");
            }
            if columns[i].right {
                out.push_str(&" ".repeat(pad));
                out.push_str(&cell);
            } else {
                out.push_str(&cell);
                if k + 1 < visible.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let titles: Vec<String> = columns.iter().map(|c| c.title.to_owned()).collect();
    let mut out = line(&titles);
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

fn ago(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    format!("{:#} ago", HumanDuration(Duration::from_millis(now_ms.saturating_sub(at_ms))))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub fn peers_table(peers: &[PeerStatus], now_ms: u64, width: Option<usize>) -> String {
    let columns = [
        col("PEER", false, true, 0),
        col("ADDRESS", false, true, 3),
        col("KIND", false, false, 0),
        col("VIA", false, false, 3),
        col("CONNECTED", true, false, 2),
        col("RTT", true, false, 6),
        col("RECEIVED", true, false, 8),
        col("SENT", true, false, 7),
        col("CHUNKS IN/OUT", true, false, 1),
        col("FAIL", true, false, 4),
        col("SCORE", true, false, 5),
        col("SEQ", true, false, 3),
        col("STATE", false, false, 0),
    ];
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.data_address.clone().unwrap_or_else(|| p.address.clone()),
                if p.origin { "origin".into() } else { "peer".into() },
                p.learned.clone().unwrap_or_else(|| "-".into()),
                ago(p.connected_since_ms, now_ms),
                p.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms")),
                HumanBytes(p.bytes_received).to_string(),
                HumanBytes(p.bytes_sent).to_string(),
                format!("{}/{}", p.chunks_received, p.chunks_sent),
                p.failures.to_string(),
                p.score.map_or("-".into(), |s| format!("{}/s", HumanBytes(s as u64))),
                opt(p.complete_seq),
                match (p.banned, p.connected) {
                    (true, _) => "BANNED".into(),
                    (false, true) => "ok".into(),
                    (false, false) => "closed".into(),
                },
            ]
        })
        .collect();
    render(&columns, &rows, width)
}

pub fn repos_table(repos: &[RepoStatus], now_ms: u64, width: Option<usize>) -> String {
    let columns = [
        col("REPO", false, true, 0),
        col("SEQ", true, false, 0),
        col("ROOT", false, true, 1),
        col("STATE", false, false, 0),
        col("TARGET", true, false, 3),
        col("PROGRESS", true, false, 7),
        col("FILES MISSING", true, false, 4),
        col("BYTES MISSING", true, false, 6),
        col("APPLIED", true, false, 2),
        col("LAG", true, false, 5),
    ];
    let rows: Vec<Vec<String>> = repos
        .iter()
        .map(|r| {
            let state =
                if r.waiting_for_origin { format!("{} (waiting for origin)", r.phase) } else { r.phase.clone() };
            vec![
                r.name.clone(),
                opt(r.seq),
                r.root.as_deref().map_or("-".into(), |root| root[..16.min(root.len())].to_owned()),
                state,
                opt(r.target_seq),
                format!("{:.0}%", r.progress * 100.0),
                r.files_missing.to_string(),
                HumanBytes(r.bytes_missing).to_string(),
                r.last_apply_ms.map_or("-".into(), |at| ago(at, now_ms)),
                r.propagation_lag_ms.map_or("-".into(), |l| format!("{:.2} s", l as f64 / 1000.0)),
            ]
        })
        .collect();
    render(&columns, &rows, width)
}

/// `mirrormesh status`: a summary, then the repositories and peers tables (fit to `width` if given).
pub fn status_text(s: &Status, now_ms: u64, width: Option<usize>) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "node    {} ({}), up {:#}\n",
        s.node_id,
        s.role,
        HumanDuration(Duration::from_millis(s.uptime_ms))
    ));
    out.push_str(&format!(
        "bytes   served {}, fetched {} ({} from origin, {} from peers)\n",
        HumanBytes(s.bytes_served_total),
        HumanBytes(s.bytes_fetched_total),
        HumanBytes(s.bytes_fetched_from_origin),
        HumanBytes(s.bytes_fetched_total.saturating_sub(s.bytes_fetched_from_origin))
    ));
    let banned = s.peers.iter().filter(|p| p.banned).count();
    out.push_str(&format!(
        "peers   {} connected, {banned} banned; {} members known (this node included)\n",
        s.peers.iter().filter(|p| p.connected).count(),
        s.members
    ));
    if let Some(e) = &s.last_error {
        out.push_str(&format!("error   {e}\n"));
    }
    out.push('\n');
    out.push_str(&repos_table(&s.repos, now_ms, width));
    out.push('\n');
    out.push_str(&peers_table(&s.peers, now_ms, width));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_the_width_by_cutting_shrinkable_columns() {
        let peers: Vec<PeerStatus> = (0..3)
            .map(|i| PeerStatus {
                id: format!("12D3KooWLongPeerIdentifierNumber{i}XXXXXXXXXXXXXXXXXXXX"),
                address: format!("/ip4/127.0.0.1/udp/{}/quic-v1", 4000 + i),
                connected: true,
                rtt_ms: Some(0.25),
                bytes_received: 5 << 20,
                learned: Some("exchange".into()),
                ..Default::default()
            })
            .collect();
        let text = peers_table(&peers, 0, Some(100));
        assert_eq!(text.lines().count(), 4);
        for line in text.lines() {
            assert!(line.chars().count() <= 100, "{line:?} is {} wide", line.chars().count());
        }
        // Cut in the middle: both ends of the id stay.
        assert!(text.contains("12D3KooW") && text.contains('…'), "{text}");
        assert!(text.contains("5.00 MiB") && text.contains("0.2 ms"), "{text}");
        // Narrower than the rank-0 columns and the cut ones: the least important columns go, the rest stay whole.
        let narrow = peers_table(&peers, 0, Some(80));
        assert!(narrow.lines().all(|l| l.chars().count() <= 80), "{narrow}");
        assert!(narrow.starts_with("PEER") && narrow.contains("KIND") && !narrow.contains("CHUNKS"), "{narrow}");
        // Wide enough: nothing is cut.
        let wide = peers_table(&peers, 0, Some(400));
        assert!(wide.contains(&peers[0].id) && !wide.contains('…'), "{wide}");
        assert!(wide.contains("VIA") && wide.contains("exchange"), "{wide}");
        // No width (not a terminal): nothing is cut or left out, however wide the rows.
        assert_eq!(peers_table(&peers, 0, None), wide);
    }

    #[test]
    fn cut_keeps_both_ends() {
        assert_eq!(cut("abcdefghij", 5), "ab…ij");
        assert_eq!(cut("abc", 5), "abc");
    }
}
