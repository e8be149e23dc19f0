//! Waiting on a condition with a deadline: poll, and fail the test with what was last seen
//! once the deadline has passed.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, sleep};

/// How often a condition is checked again.
pub const POLL: Duration = Duration::from_millis(20);

/// A point in time a condition must hold by.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
        }
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// What is left until the deadline (zero once it has passed).
    pub fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Panics with `why()` when the deadline has passed, otherwise waits [`POLL`] before the
    /// caller checks again.
    pub async fn retry<D: Display>(&self, why: impl FnOnce() -> D) {
        self.retry_every(POLL, why).await;
    }

    /// [`Deadline::retry`] with another polling interval.
    pub async fn retry_every<D: Display>(&self, every: Duration, why: impl FnOnce() -> D) {
        assert!(!self.passed(), "{}", why());
        sleep(every).await;
    }
}

/// Waits until `check` returns `Some`, polling every 50 ms; panics naming `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Deadline::after(limit);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        deadline
            .retry_every(Duration::from_millis(50), || {
                format!("{what}: not within {limit:?}")
            })
            .await;
    }
}
