//! What the runs are graded against.
//!
//! - **Kumar–Ross** (2006): distributing `S` bytes from an origin with upload `U0` to `N` peers with uploads `Ui`
//!   and downloads `Di` takes at least `T_min = max(S/U0, S/min(Di), N·S/(U0 + ΣUi))`. It ignores latency and
//!   per-message costs, so small updates sit well above it.
//! - **Client-server** (rsync from the origin): every mirror pulls the update's bytes from the origin over the same
//!   network model, all at once, sharing the origin's upload max-min fairly; each mirror also pays two round trips
//!   before its data flows (connection and file list). The file list itself is not charged, which favours rsync.

use crate::network::{Nanos, Network};

/// `T_min` in seconds for `bytes` from an origin uploading `origin_up` bytes/s to peers with these capacities.
pub fn kumar_ross(bytes: u64, origin_up: f64, ups: &[f64], downs: &[f64]) -> f64 {
    if ups.is_empty() || bytes == 0 {
        return 0.0;
    }
    let s = bytes as f64;
    let min_down = downs.iter().copied().fold(f64::INFINITY, f64::min);
    let sum_up: f64 = ups.iter().sum();
    let n = ups.len() as f64;
    (s / origin_up).max(s / min_down).max(n * s / (origin_up + sum_up))
}

/// Completion time in seconds of the slowest mirror when every mirror pulls `bytes` from the origin at once.
/// `downs[i]` and `latency[i]` (one way, ns) belong to mirror i.
pub fn client_server(bytes: u64, origin_up: f64, downs: &[f64], latency: &[Nanos]) -> f64 {
    if downs.is_empty() {
        return 0.0;
    }
    let mut up = vec![origin_up];
    up.extend(std::iter::repeat_n(1.0, downs.len()));
    let mut down = vec![1.0];
    down.extend_from_slice(downs);
    let mut net: Network<usize> = Network::new(up, down);
    for i in 0..downs.len() {
        net.send(0, i as u32 + 1, bytes, i);
    }
    let mut now: Nanos = 0;
    let mut finished = vec![0; downs.len()];
    let mut out = Vec::new();
    while let Some(dt) = net.time_to_next_completion() {
        net.step(now, dt, &mut out);
        now += dt;
        for d in out.drain(..) {
            finished[d.payload] = d.at;
        }
    }
    finished.iter().zip(latency).map(|(at, l)| (at + 5 * l) as f64 / 1e9).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kumar_ross_picks_the_binding_term() {
        // Origin-bound: S/U0.
        assert_eq!(kumar_ross(100, 10.0, &[100.0; 3], &[100.0; 3]), 10.0);
        // Download-bound.
        assert_eq!(kumar_ross(100, 100.0, &[100.0; 3], &[5.0, 50.0, 50.0]), 20.0);
        // Upload-bound: 4 peers * 100 bytes / (10 + 4 * 5) bytes/s.
        assert!((kumar_ross(100, 10.0, &[5.0; 4], &[1e9; 4]) - 400.0 / 30.0).abs() < 1e-9);
    }

    #[test]
    fn client_server_matches_the_closed_form() {
        // Homogeneous, no latency: N * S / U0 when the origin is the bottleneck.
        let t = client_server(1_000_000, 1e6, &[1e7; 10], &[0; 10]);
        assert!((t - 10.0).abs() < 1e-6, "{t}");
        // A slow receiver finishes last at S / D; the others share the rest.
        let t = client_server(1_000_000, 1e6, &[1e5, 1e7], &[0, 0]);
        assert!((t - 10.0).abs() < 1e-6, "{t}");
    }
}
