//! Stall detection without a timer per I/O call: a watchdog armed once per period that fails an operation only if
//! a whole period passed with no operation completing.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// No progress for the watchdog's period.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no progress for {0:?}")]
pub(crate) struct Stalled(pub(crate) Duration);

/// Guards a sequence of I/O operations on one stream. An operation fails with [`Stalled`] once a full period (at
/// least `limit`, at most twice that) has passed in which no guarded operation completed. Re-arming the timer once
/// per period, instead of once per call, keeps the timer wheel out of the per-packet path.
pub(crate) struct Watchdog {
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    progressed: bool,
}

impl Watchdog {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit, sleep: Box::pin(tokio::time::sleep(limit)), progressed: false }
    }

    pub(crate) async fn run<F: Future>(&mut self, op: F) -> Result<F::Output, Stalled> {
        let mut op = std::pin::pin!(op);
        loop {
            tokio::select! {
                biased;
                out = &mut op => {
                    self.progressed = true;
                    return Ok(out);
                }
                () = self.sleep.as_mut() => {
                    if !std::mem::take(&mut self.progressed) {
                        return Err(Stalled(self.limit));
                    }
                    self.sleep.as_mut().reset(Instant::now() + self.limit);
                }
            }
        }
    }
}
