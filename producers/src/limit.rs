//! Per-user rate limits of the REST APIs (orders per user, reports per reporter): a token
//! bucket per user (governor's GCRA), refilled at `per_minute` and holding `burst`. Over the
//! limit a request gets 429 with `Retry-After`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::http::ApiError;
use crate::metrics::Metrics;

/// A per-user limit; cheap to clone (the buckets are shared behind an `Arc`; governor's map is
/// sharded and lock-free to read, so no lock of ours is held across an `.await`).
#[derive(Clone)]
pub struct PerUser {
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    what: &'static str,
    refused: IntCounter,
}

impl PerUser {
    /// `per_minute` sustained, `burst` at once, per user; `what` names the requests in errors
    /// and in the metric `producers_rate_limited_total{limit}`.
    pub fn new(what: &'static str, per_minute: u32, burst: u32, metrics: &Metrics) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        PerUser {
            limiter: Arc::new(RateLimiter::keyed(
                Quota::per_minute(per_minute).allow_burst(burst),
            )),
            what,
            refused: metrics.rate_limited.with_label_values(&[what]),
        }
    }

    /// Takes one request of `user` from its bucket, or says when to retry.
    pub fn check(&self, user: &str) -> Result<(), ApiError> {
        match self.limiter.check_key(&user.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.refused.inc();
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                // Rounded up: a client that waits this long is let in.
                let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Err(ApiError::TooManyRequests {
                    what: self.what,
                    retry_after: retry_after.max(1),
                })
            }
        }
    }

    /// Forgets full buckets every minute (so the map holds only recently active users) until
    /// `stop` is cancelled.
    pub async fn clean_until(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_over_the_burst_waits_and_others_are_unaffected() {
        let metrics = Metrics::new("test");
        let limit = PerUser::new("reports", 1, 2, &metrics);
        limit.check("a").expect("first");
        limit.check("a").expect("second (burst 2)");
        match limit.check("a") {
            Err(ApiError::TooManyRequests { what, retry_after }) => {
                assert_eq!(what, "reports");
                assert!((1..=60).contains(&retry_after), "{retry_after}");
            }
            other => panic!("{:?}", other.map_err(|e| e.to_string())),
        }
        limit.check("b").expect("another user");
        assert_eq!(
            metrics.rate_limited.with_label_values(&["reports"]).get(),
            1
        );
    }
}
