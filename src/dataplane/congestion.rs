//! The data plane's congestion controller: quinn's BBR under a ceiling that falls when a round trip loses too much.
//!
//! Mirrors are continents apart and links lose packets at random, so the sender keeps BBR, which does not take a
//! random loss for congestion (quinn's Cubic cuts its window by 30% on every loss and on a 300 ms path needs many
//! seconds to grow back; BENCHMARKS.md, "Congestion control"). But quinn's BBR ignores loss altogether: it keeps up
//! to twice its bandwidth-delay estimate in flight, and several flows into one shallow queue (a 100 Mbit/s link's
//! 50 ms) each overfill it. On the world profile the origin resent 8-11% of S (BENCHMARKS.md, "The fabric near the
//! bound on the WAN"), and the origin's upload is the scarce resource.
//!
//! The rule, after BBR v2's `inflight_hi`:
//! 1. Loss is counted per round trip (a round ends when a packet sent after it began is acknowledged).
//! 2. A round that lost more than [`ROUND_LOSS_PER_MILLE_MAX`] of its bytes, and at least
//!    [`ROUND_LOSS_PACKETS_MIN`] packets' worth, was congestion: the window is capped at what that round delivered,
//!    at most [`CUT_PER_MILLE_MAX`] and at least [`CUT_PER_MILLE_MIN`] of the round's largest window. Random loss
//!    (0.1%) stays below the threshold and changes nothing.
//! 3. The cap holds for [`PROBE_WAIT`] after the last cut, then rises by an eighth each round trip while the window
//!    is held at it and the rounds stay clean; once BBR's own window is under half of it, the cap is lifted.
//!
//! Everything else (pacing, startup, probing for round-trip time) is BBR's. The rule is the pure [`LossCeiling`];
//! [`CappedBbr`] joins it to quinn's BBR through quinn's [`Controller`] trait.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Bbr, BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// A round trip that loses more than this share of its bytes (per mille) was congestion, not random loss: twenty
/// times the 0.1% of the loss profile, as BBR v2's 2%.
pub const ROUND_LOSS_PER_MILLE_MAX: u64 = 20;
/// ...and it lost at least this many packets' worth of bytes (one or two losses in a short round are no signal).
pub const ROUND_LOSS_PACKETS_MIN: u64 = 3;
/// A cut leaves at most this much of the window in use (per mille).
pub const CUT_PER_MILLE_MAX: u64 = 850;
/// A cut leaves at least this much of the window in use (per mille).
pub const CUT_PER_MILLE_MIN: u64 = 500;
/// The cap holds this long after a cut before it rises again (BBR v2 waits 2 to 3 s between probes).
pub const PROBE_WAIT: Duration = Duration::from_secs(2);

/// The ceiling over a sender's window, kept from its acknowledgements and losses.
#[derive(Clone, Debug)]
pub struct LossCeiling {
    /// `None`: no cap.
    cap: Option<u64>,
    /// Packets sent after this instant end the current round when acknowledged.
    round_start: Instant,
    round_acked: u64,
    round_lost: u64,
    /// The window was held at the cap at some point in this round.
    round_capped: bool,
    /// The largest window in use in this round: a cut is a share of it, not of a moment's window (BBR drops its
    /// window to four packets for 200 ms every 10 s to measure the round trip; a cut based on that would leave a
    /// far peer a few kilobytes per round trip for seconds).
    round_window_max: u64,
    last_cut: Option<Instant>,
    mtu: u64,
}

impl LossCeiling {
    pub fn new(now: Instant, mtu: u16) -> Self {
        Self {
            cap: None,
            round_start: now,
            round_acked: 0,
            round_lost: 0,
            round_capped: false,
            round_window_max: 0,
            last_cut: None,
            mtu: u64::from(mtu),
        }
    }

    /// The window to use given the inner controller's.
    pub fn window(&self, inner: u64) -> u64 {
        match self.cap {
            Some(cap) => inner.min(cap),
            None => inner,
        }
    }

    pub fn cap(&self) -> Option<u64> {
        self.cap
    }

    fn window_min(&self) -> u64 {
        4 * self.mtu
    }

    /// `bytes` sent at `sent` were acknowledged at `now`; `inner` is the inner controller's window after it.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, inner: u64) {
        self.round_acked += bytes;
        self.round_window_max = self.round_window_max.max(self.window(inner));
        if self.cap.is_some_and(|cap| inner >= cap) {
            self.round_capped = true;
        }
        if sent > self.round_start {
            self.end_round(now, inner);
        }
    }

    /// `bytes` were declared lost.
    pub fn on_loss(&mut self, bytes: u64) {
        self.round_lost += bytes;
    }

    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    fn end_round(&mut self, now: Instant, inner: u64) {
        let in_use = self.round_window_max.max(self.window(inner));
        let lost = self.round_lost;
        let total = self.round_acked + lost;
        if lost >= ROUND_LOSS_PACKETS_MIN * self.mtu && lost * 1000 > total * ROUND_LOSS_PER_MILLE_MAX {
            let most = in_use * CUT_PER_MILLE_MAX / 1000;
            let least = in_use * CUT_PER_MILLE_MIN / 1000;
            self.cap = Some(self.round_acked.clamp(least, most).max(self.window_min()));
            self.last_cut = Some(now);
        } else if let Some(cap) = self.cap {
            let waited = self.last_cut.is_none_or(|cut| now.saturating_duration_since(cut) >= PROBE_WAIT);
            if inner < cap / 2 {
                self.cap = None;
            } else if waited && self.round_capped {
                self.cap = Some(cap + (cap / 8).max(self.mtu));
            }
        }
        self.round_start = now;
        self.round_acked = 0;
        self.round_lost = 0;
        self.round_capped = false;
        self.round_window_max = 0;
    }
}

/// quinn's BBR under a [`LossCeiling`].
#[derive(Clone, Debug)]
pub struct CappedBbr {
    bbr: Bbr,
    ceiling: LossCeiling,
}

impl Controller for CappedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.bbr.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
        self.ceiling.on_ack(now, sent, bytes, self.bbr.window());
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.bbr.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.bbr.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        self.ceiling.on_loss(lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.bbr.on_mtu_update(new_mtu);
        self.ceiling.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.ceiling.window(self.bbr.window())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = self.bbr.metrics();
        metrics.congestion_window = self.window();
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.bbr.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds a [`CappedBbr`] for each connection.
#[derive(Debug, Default)]
pub struct CappedBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for CappedBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(CappedBbr {
            bbr: Bbr::new(self.bbr.clone(), current_mtu),
            ceiling: LossCeiling::new(now, current_mtu),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1200;
    const RTT: Duration = Duration::from_millis(300);

    /// A fresh ceiling and the instant it starts at.
    fn fresh() -> (LossCeiling, Instant) {
        let start = Instant::now();
        (LossCeiling::new(start, MTU), start)
    }

    /// One round trip's worth of sending from `start`: the window in use goes out paced over an RTT, each packet is
    /// acknowledged an RTT after it left except `lost` of them, declared lost after the others were acknowledged.
    /// A round ends at the second acknowledgement of the next call, so what a call sends is judged there.
    fn send(ceiling: &mut LossCeiling, start: Instant, inner: u64, lost: u64) -> Instant {
        let packets = ceiling.window(inner) / u64::from(MTU);
        let lost = lost.min(packets);
        for i in 0..packets - lost {
            let sent = start + RTT * i as u32 / packets as u32;
            ceiling.on_ack(sent + RTT, sent, u64::from(MTU), inner);
        }
        ceiling.on_loss(lost * u64::from(MTU));
        start + RTT
    }

    #[test]
    fn random_loss_below_the_threshold_never_caps_the_window() {
        let (mut ceiling, start) = fresh();
        let inner = 4_000_000; // 100 Mbit/s x 320 ms
        let mut at = start;
        // 0.1% of ~3,300 packets a round: 3 or 4 lost each round, for a minute.
        for i in 0..200 {
            at = send(&mut ceiling, at, inner, 3 + i % 2);
            assert_eq!(ceiling.cap(), None, "round {i}");
        }
        assert_eq!(ceiling.window(inner), inner);
    }

    #[test]
    fn a_lossy_round_caps_the_window_at_what_it_delivered_then_the_cap_probes_up_and_is_lifted() {
        let (mut ceiling, start) = fresh();
        let inner = 8_000_000; // twice what fits
        let mut at = send(&mut ceiling, start, inner, 0);
        // A round that sends 8 MB and loses a tenth: congestion. It delivered 7.2 MB, more than 85% of 8 MB.
        at = send(&mut ceiling, at, inner, 667);
        at = send(&mut ceiling, at, inner, 0);
        let cap = ceiling.cap().expect("a lossy round caps the window");
        assert_eq!(cap, 6_800_000, "at most 85% of the window in use");
        // A round that loses half of what it sends: cut to what it delivered, at least half.
        at = send(&mut ceiling, at, inner, cap / 1200 / 2);
        let cut = at;
        at = send(&mut ceiling, at, inner, 0);
        let cap2 = ceiling.cap().unwrap();
        assert!(cap2 >= cap / 2 && cap2 <= cap * 51 / 100, "{cap2} after {cap}");
        // Clean rounds: the cap holds for PROBE_WAIT after the cut, then rises by an eighth a round.
        while at.duration_since(cut) < PROBE_WAIT {
            at = send(&mut ceiling, at, inner, 0);
            assert_eq!(ceiling.cap(), Some(cap2), "held for the probe wait");
        }
        at = send(&mut ceiling, at, inner, 0);
        let cap3 = ceiling.cap().unwrap();
        assert_eq!(cap3, cap2 + cap2 / 8, "up by an eighth");
        at = send(&mut ceiling, at, inner, 0);
        assert_eq!(ceiling.cap(), Some(cap3 + cap3 / 8));
        // BBR's own window falls under half the cap: the cap is lifted.
        at = send(&mut ceiling, at, cap3 / 2, 0);
        send(&mut ceiling, at, cap3 / 2, 0);
        assert_eq!(ceiling.cap(), None);
    }

    #[test]
    fn a_cap_the_window_is_not_held_at_does_not_rise() {
        let (mut ceiling, start) = fresh();
        let mut at = send(&mut ceiling, start, 8_000_000, 1000);
        at = send(&mut ceiling, at, 8_000_000, 0);
        let cap = ceiling.cap().expect("a lossy round caps the window");
        // BBR's window now sits below the cap (but above half of it): nothing to probe for.
        for _ in 0..20 {
            at = send(&mut ceiling, at, cap * 3 / 4, 0);
        }
        assert_eq!(ceiling.cap(), Some(cap));
    }

    #[test]
    fn a_cut_is_a_share_of_the_rounds_largest_window_not_of_a_moments() {
        let (mut ceiling, start) = fresh();
        let mut at = send(&mut ceiling, start, 8_000_000, 0);
        // A lossy round whose last acknowledgements came while BBR's window was down to four packets (its round-trip
        // probe): the cut is still a share of the 8 MB window the round used.
        at = send(&mut ceiling, at, 8_000_000, 1000);
        let probe = 4 * u64::from(MTU);
        ceiling.on_ack(at + RTT, at + RTT / 2, u64::from(MTU), probe);
        let cap = ceiling.cap().expect("a lossy round caps the window");
        assert!(cap >= 4_000_000, "cut to {cap} bytes from an 8 MB round");
    }

    #[test]
    fn a_few_losses_in_a_short_round_are_no_signal() {
        let (mut ceiling, start) = fresh();
        // 20 packets a round, 2 lost: 10%, but under the minimum count.
        let mut at = start;
        for _ in 0..5 {
            at = send(&mut ceiling, at, 24_000, 2);
        }
        assert_eq!(ceiling.cap(), None);
    }
}
