//! Doubling delays between retries of the same work.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A delay that doubles after every use, up to a ceiling.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first` and doubles up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// The delay to wait now; the one after is twice as long (at most the ceiling).
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Back to the first delay (after progress).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Waits the next delay; false when `stop` was cancelled first (give up the work).
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 300, 300]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_wait_gives_up() {
        let stop = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(2));
        assert!(b.wait(&stop).await);
        stop.cancel();
        assert!(!b.wait(&stop).await);
    }
}
