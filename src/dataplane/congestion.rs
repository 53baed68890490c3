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
//!    at most [`CUT_PER_MILLE_MAX`] and at least [`CUT_PER_MILLE_MIN`] of the most the round had in flight (not of
//!    the window: a connection sending one 1 MiB reply under a 4 MB window that lost half of it was cut to 2 MB,
//!    which never bound). Random loss (0.1%) stays below the threshold and changes nothing. The round after a cut is
//!    not judged: its packets left before the cut (one episode, one cut).
//! 3. The cap holds for [`PROBE_WAIT`] after the last cut, then rises by an eighth each round trip in which sending
//!    reached it and the rounds stay clean; once BBR's own window is under half of it, the cap is lifted.
//! 4. Before the first cap, a round trip whose fastest acknowledgement came later than the round before's by more
//!    than [`delay_rise_max`] (HyStart++, RFC 9406: an eighth of it, 4 to 16 ms) means the queue is filling:
//!    startup overshoots, and a doubling window loses a whole queue's worth a round trip later, before rule 2 sees
//!    it. The window is capped at the share that would have kept the round trip at the round before's (within the
//!    same 50-85%), then probes as in rule 3. Only on paths of at least [`DELAY_RULE_RTT_MIN`]: on a short path the
//!    receiver's event loop can hold a whole round's acknowledgements, and the overshoot is a few packets.
//! 5. A cap is never below [`CAP_FLOOR_PER_MILLE_OF_WINDOW`] of BBR's own window, and a connection idle for
//!    [`IDLE_RESET`] starts afresh.
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
/// A cap is never below this share of BBR's own window (one sixteenth: an eighth of its bandwidth-delay estimate).
/// A cut is a share of what the round had in flight, and a round with little in flight (a small reply that lost
/// a few packets to a queue others filled) would otherwise leave the connection a few packets per round trip, which
/// on a 300 ms path takes seconds of probing to undo.
pub const CAP_FLOOR_PER_MILLE_OF_WINDOW: u64 = 62;
/// A connection that had nothing in flight for this long starts afresh: the cap is lifted and rule 4 applies again
/// (the queue it was learnt from is gone; BBR's own state restarts from idle likewise).
pub const IDLE_RESET: Duration = PROBE_WAIT;

/// Rule 4 (the queue is filling) applies only on paths whose round trip is at least this.
pub const DELAY_RULE_RTT_MIN: Duration = Duration::from_millis(20);
/// Rule 4 judges a round by at least this many acknowledgements (RFC 9406's `N_RTT_SAMPLE`).
pub const DELAY_RULE_SAMPLES_MIN: u32 = 8;

/// How much later than `base` a round's fastest acknowledgement may come before the queue counts as filling: an
/// eighth of it, at least 4 and at most 16 ms (RFC 9406's `MIN_RTT_THRESH`, `MAX_RTT_THRESH`).
pub fn delay_rise_max(base: Duration) -> Duration {
    (base / 8).clamp(Duration::from_millis(4), Duration::from_millis(16))
}

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
    /// Bytes in flight now, and the most in flight at once in this round: a cut is a share of what the round had in
    /// flight, not of a moment's window (BBR drops its window to four packets for 200 ms every 10 s to measure the
    /// round trip; a cut based on that would leave a far peer a few kilobytes per round trip for seconds), nor of a
    /// window it did not use (a connection sending one 1 MiB reply under an 8 MB window that lost half of it).
    in_flight: u64,
    round_in_flight_max: u64,
    last_cut: Option<Instant>,
    mtu: u64,
    /// The shortest round trip acknowledged in this round, and how many acknowledgements it is taken from.
    round_rtt_min: Option<Duration>,
    round_rtt_samples: u32,
    /// The shortest round trip of the round before (rule 4's base).
    last_round_rtt_min: Option<Duration>,
    /// A cap was set once: startup is over and rule 4 no longer applies.
    capped_once: bool,
    /// The last packet sent or acknowledged.
    last_active: Instant,
}

impl LossCeiling {
    pub fn new(now: Instant, mtu: u16) -> Self {
        Self {
            cap: None,
            round_start: now,
            round_acked: 0,
            round_lost: 0,
            round_capped: false,
            in_flight: 0,
            round_in_flight_max: 0,
            last_cut: None,
            mtu: u64::from(mtu),
            round_rtt_min: None,
            round_rtt_samples: 0,
            last_round_rtt_min: None,
            capped_once: false,
            last_active: now,
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
        self.in_flight = self.in_flight.saturating_sub(bytes);
        self.last_active = now;
        let rtt = now.saturating_duration_since(sent);
        self.round_rtt_min = Some(self.round_rtt_min.map_or(rtt, |min| min.min(rtt)));
        self.round_rtt_samples += 1;
        self.check_queue_filling(now, inner);
        if sent > self.round_start {
            self.end_round(now, inner);
        }
    }

    /// `bytes` were sent.
    pub fn on_sent(&mut self, now: Instant, bytes: u64) {
        if self.in_flight == 0 && now.saturating_duration_since(self.last_active) >= IDLE_RESET {
            self.cap = None;
            self.capped_once = false;
            self.last_round_rtt_min = None;
            self.round_rtt_min = None;
            self.round_rtt_samples = 0;
        }
        self.last_active = now;
        self.in_flight += bytes;
        self.round_in_flight_max = self.round_in_flight_max.max(self.in_flight);
        if self.cap.is_some_and(|cap| self.in_flight + self.mtu > cap) {
            self.round_capped = true;
        }
    }

    /// `bytes` were declared lost.
    pub fn on_loss(&mut self, bytes: u64) {
        self.round_lost += bytes;
        self.in_flight = self.in_flight.saturating_sub(bytes);
    }

    /// The sender's own count of bytes in flight, after a batch of acknowledgements.
    pub fn on_end_acks(&mut self, in_flight: u64) {
        self.in_flight = in_flight;
    }

    /// What this round used: the most it had in flight at once (at least the minimum window).
    fn in_use(&self) -> u64 {
        self.round_in_flight_max.max(self.in_flight).max(self.window_min())
    }

    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    /// Rule 4: before the first cap, a round trip risen by more than [`delay_rise_max`] over the round before's.
    fn check_queue_filling(&mut self, now: Instant, inner: u64) {
        if self.capped_once || self.round_rtt_samples < DELAY_RULE_SAMPLES_MIN {
            return;
        }
        let (Some(base), Some(current)) = (self.last_round_rtt_min, self.round_rtt_min) else {
            return;
        };
        if base < DELAY_RULE_RTT_MIN || current < base + delay_rise_max(base) {
            return;
        }
        let in_use = self.in_use();
        let most = in_use * CUT_PER_MILLE_MAX / 1000;
        let least = in_use * CUT_PER_MILLE_MIN / 1000;
        let keeps_base = u64::try_from(u128::from(in_use) * base.as_micros() / current.as_micros()).unwrap_or(in_use);
        self.set_cap(now, keeps_base.clamp(least, most), inner);
        tracing::debug!(?base, ?current, in_use, cap = self.cap, "queue filling: window capped");
    }

    fn set_cap(&mut self, now: Instant, cap: u64, inner: u64) {
        let floor = (inner * CAP_FLOOR_PER_MILLE_OF_WINDOW / 1000).max(self.window_min());
        self.cap = Some(cap.max(floor));
        self.last_cut = Some(now);
        self.capped_once = true;
    }

    fn end_round(&mut self, now: Instant, inner: u64) {
        let in_use = self.in_use();
        let lost = self.round_lost;
        let total = self.round_acked + lost;
        // The round just after a cut judges packets sent before it, under the window just cut: one cut per episode.
        let after_cut = self.last_cut == Some(self.round_start);
        let congested = lost >= ROUND_LOSS_PACKETS_MIN * self.mtu && lost * 1000 > total * ROUND_LOSS_PER_MILLE_MAX;
        if after_cut {
            // Judged by the next round.
        } else if congested {
            let most = in_use * CUT_PER_MILLE_MAX / 1000;
            let least = in_use * CUT_PER_MILLE_MIN / 1000;
            self.set_cap(now, self.round_acked.clamp(least, most), inner);
            tracing::debug!(lost, total, in_use, cap = self.cap, "lossy round: window capped");
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
        self.round_in_flight_max = self.in_flight;
        self.last_round_rtt_min = self.round_rtt_min.take();
        self.round_rtt_samples = 0;
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
        self.ceiling.on_sent(now, bytes);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
        self.ceiling.on_ack(now, sent, bytes, self.bbr.window());
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.bbr.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.ceiling.on_end_acks(in_flight);
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

    /// Within ten packets (the helpers count whole packets, and a round's edge moves its bytes by a few).
    #[track_caller]
    fn assert_near(got: u64, want: u64, what: &str) {
        assert!(got.abs_diff(want) <= 10 * u64::from(MTU), "{what}: {got}, not {want}");
    }

    /// A fresh ceiling and the instant it starts at.
    fn fresh() -> (LossCeiling, Instant) {
        let start = Instant::now();
        (LossCeiling::new(start, MTU), start)
    }

    /// One round trip's worth of sending from `start`: the window in use goes out paced over an RTT, each packet is
    /// acknowledged an RTT after it left except `lost` of them, declared lost after the others were acknowledged.
    /// A round ends at the second acknowledgement of the next call, so what a call sends is judged there.
    fn send(ceiling: &mut LossCeiling, start: Instant, inner: u64, lost: u64) -> Instant {
        send_over(ceiling, start, inner, lost, |_| RTT)
    }

    /// [`send`], the `i`th packet of the round taking `rtt(i)` to be acknowledged.
    fn send_over(
        ceiling: &mut LossCeiling,
        start: Instant,
        inner: u64,
        lost: u64,
        rtt: impl Fn(u64) -> Duration,
    ) -> Instant {
        send_app_limited(ceiling, start, inner, ceiling.window(inner), lost, rtt)
    }

    /// [`send_over`], sending only `bytes` of the window.
    fn send_app_limited(
        ceiling: &mut LossCeiling,
        start: Instant,
        inner: u64,
        bytes: u64,
        lost: u64,
        rtt: impl Fn(u64) -> Duration,
    ) -> Instant {
        let packets = bytes / u64::from(MTU);
        let lost = lost.min(packets);
        for i in 0..packets {
            ceiling.on_sent(start + RTT * i as u32 / packets as u32, u64::from(MTU));
        }
        for i in 0..packets - lost {
            let sent = start + RTT * i as u32 / packets as u32;
            ceiling.on_ack(sent + rtt(i), sent, u64::from(MTU), inner);
        }
        ceiling.on_loss(lost * u64::from(MTU));
        start + RTT
    }

    #[test]
    fn a_filling_queue_caps_a_startup_before_it_loses() {
        let (mut ceiling, start) = fresh();
        let mut at = send(&mut ceiling, start, 1_000_000, 0);
        at = send(&mut ceiling, at, 2_000_000, 0);
        assert_eq!(ceiling.cap(), None, "a steady round trip is no signal");
        // The window doubles into a queue: every acknowledgement of the round comes 150 ms later (more than 16 ms
        // counts on a 300 ms path).
        send_over(&mut ceiling, at, 4_000_000, 0, |_| RTT + Duration::from_millis(150));
        let cap = ceiling.cap().expect("a filling queue caps the window");
        assert_near(cap, 4_000_000 * 300 / 450, "the share that kept the round trip at 300 ms");
    }

    #[test]
    fn a_round_trip_risen_in_part_of_a_round_or_on_a_short_path_or_after_a_cap_is_no_signal() {
        // A few acknowledgements held back (the receiver's loop was busy): the round's fastest did not rise.
        let (mut ceiling, start) = fresh();
        let mut at = send(&mut ceiling, start, 1_000_000, 0);
        for _ in 0..10 {
            at = send_over(&mut ceiling, at, 2_000_000, 0, |i| RTT + Duration::from_millis(100 * (i % 2)));
        }
        assert_eq!(ceiling.cap(), None);
        // A 10 ms path whose round trip doubles.
        let (mut ceiling, start) = fresh();
        let short = |_| Duration::from_millis(10);
        let mut at = send_over(&mut ceiling, start, 100_000, 0, short);
        send_over(&mut ceiling, at, 100_000, 0, |_| Duration::from_millis(20));
        assert_eq!(ceiling.cap(), None, "below {DELAY_RULE_RTT_MIN:?}");
        // After a loss cut, a rising round trip leaves the cap to rule 3.
        let (mut ceiling, start) = fresh();
        at = send(&mut ceiling, start, 8_000_000, 1000);
        at = send(&mut ceiling, at, 8_000_000, 0);
        let cap = ceiling.cap().expect("a lossy round caps the window");
        send_over(&mut ceiling, at, 8_000_000, 0, |_| RTT * 2);
        assert_eq!(ceiling.cap(), Some(cap));
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
        assert_near(cap, 6_800_000, "at most 85% of the window in use");
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
    fn a_cut_is_a_share_of_what_the_round_had_in_flight_not_of_a_window_it_did_not_use() {
        let (mut ceiling, start) = fresh();
        let inner = 8_000_000;
        let reply = 1_200_000;
        let mut at = send_app_limited(&mut ceiling, start, inner, reply, 0, |_| RTT);
        // One reply of 1.2 MB under an 8 MB window, half of it lost (other connections filled the queue).
        at = send_app_limited(&mut ceiling, at, inner, reply, 500, |_| RTT);
        send_app_limited(&mut ceiling, at, inner, reply, 0, |_| RTT);
        let cap = ceiling.cap().expect("a lossy round caps the window");
        assert_near(cap, reply / 2, "cut to what was delivered, half of what was in flight");
        // Replies of that size under the cap do not raise it, however long they go on.
        for _ in 0..20 {
            at = send_app_limited(&mut ceiling, at, inner, reply / 4, 0, |_| RTT);
        }
        assert_eq!(ceiling.cap(), Some(cap));
    }

    #[test]
    fn one_episode_of_loss_is_one_cut() {
        let (mut ceiling, start) = fresh();
        let inner = 8_400_000;
        let mut at = send(&mut ceiling, start, inner, 0);
        // Two lossy rounds in a row: the second was sent before the first's cut took effect.
        at = send(&mut ceiling, at, inner, 700);
        at = send(&mut ceiling, at, inner, 700);
        let cap = ceiling.cap().expect("a lossy round caps the window");
        send(&mut ceiling, at, inner, 0);
        assert_eq!(ceiling.cap(), Some(cap), "cut once");
        assert_near(cap, inner * CUT_PER_MILLE_MAX / 1000, "the first round's cut");
    }

    #[test]
    fn a_cut_keeps_a_floor_and_an_idle_connection_starts_afresh() {
        let (mut ceiling, start) = fresh();
        let inner = 8_000_000;
        // A 60 KB answer that lost half of itself.
        let mut at = send_app_limited(&mut ceiling, start, inner, 60_000, 25, |_| RTT);
        at = send_app_limited(&mut ceiling, at, inner, 60_000, 0, |_| RTT);
        assert_eq!(ceiling.cap(), Some(inner * CAP_FLOOR_PER_MILLE_OF_WINDOW / 1000), "not 30 KB");
        // Nothing in flight for the idle time: the next packet starts without a cap.
        at += RTT + IDLE_RESET;
        ceiling.on_sent(at, u64::from(MTU));
        assert_eq!(ceiling.cap(), None);
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
