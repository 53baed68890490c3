//! The shared upload limit: a token bucket that lets takers run into debt and sleep it off, so that concurrent
//! streams are served in the order they asked and the long-run rate never exceeds the limit.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{RATE_BURST, RATE_PIECE_BYTES};

#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    /// Most tokens saved up while idle.
    burst: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// May be negative: bytes granted ahead of time that later takers wait for.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket for `rate` bytes per second (> 0), starting empty.
    pub(crate) fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate * RATE_BURST.as_secs_f64()).max(RATE_PIECE_BYTES as f64);
        Self { rate, burst, state: Mutex::new(BucketState { tokens: 0.0, last: Instant::now() }) }
    }

    /// Waits until `bytes` may be sent. The lock is released before sleeping.
    pub(crate) async fn take(&self, bytes: usize) {
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let refill = now.saturating_duration_since(state.last).as_secs_f64() * self.rate;
            state.tokens = (state.tokens + refill).min(self.burst) - bytes as f64;
            state.last = now;
            (state.tokens < 0.0).then(|| Duration::from_secs_f64(-state.tokens / self.rate))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_the_rate_across_takers() {
        let bucket = std::sync::Arc::new(TokenBucket::new(1 << 20));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let bucket = bucket.clone();
                tokio::spawn(async move {
                    for _ in 0..4 {
                        bucket.take(16 << 10).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // 256 KiB at 1 MiB/s from an empty bucket: the last grant is paid off after 0.25 s.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(245), "{elapsed:?}");
        assert!(elapsed <= Duration::from_secs(2), "{elapsed:?}");
    }
}
