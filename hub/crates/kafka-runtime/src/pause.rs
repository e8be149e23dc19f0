//! Waiting out a retry delay unless the consumer is stopping.

use service_kit::Backoff;
use tokio_util::sync::CancellationToken;

/// Waits `backoff`'s next delay; false when `stop` was cancelled first (give up the work).
pub(crate) async fn wait(backoff: &mut Backoff, stop: &CancellationToken) -> bool {
    let delay = backoff.next_delay();
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stopped_wait_gives_up() {
        let stop = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(2));
        assert!(wait(&mut b, &stop).await);
        assert_eq!(b.peek(), Duration::from_secs(2));
        stop.cancel();
        assert!(!wait(&mut b, &stop).await);
    }
}
