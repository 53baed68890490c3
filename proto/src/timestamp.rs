//! Time as the core sees it: values passed in by the caller, never read from a clock. There are two clocks, passed
//! separately ([`Now`]): a monotonic one ([`Mono`]) for every timeout, window, rate, back-off and ban, and the wall
//! clock ([`Timestamp`]) for the creation and expiry of signed roots only. A wall clock stepped back or forward
//! (NTP, an operator) then neither stops nor fires every timer at once, and roots still expire by the calendar.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_secs(secs: u64) -> Self {
        Self(secs.saturating_mul(1000))
    }

    pub fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// Milliseconds on a monotonic clock that never goes back (its zero is arbitrary: the daemon's start, the
/// simulation's start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mono(pub u64);

impl Mono {
    pub fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    pub fn millis_since(self, earlier: Mono) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::fmt::Display for Mono {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "+{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// The two clocks at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    pub mono: Mono,
    pub wall: Timestamp,
}

impl Now {
    /// `mono` advanced by `ms` on both clocks (for tests and the simulator, whose clocks do not drift).
    pub fn plus_ms(self, ms: u64) -> Self {
        Self { mono: self.mono.plus_ms(ms), wall: self.wall.plus_ms(ms) }
    }
}
