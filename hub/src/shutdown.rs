//! The node's lifecycle: the drain state every connection and the readiness probe watch (the
//! stop signal itself is `service_kit::signal::shutdown`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

/// Shared drain state; cheap to clone.
#[derive(Clone, Default)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    draining: AtomicBool,
    /// Cancelled when draining starts; connections then close themselves over the window.
    drain: CancellationToken,
}

impl Lifecycle {
    /// A running (not draining) node.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: readiness turns 503, new client connections are refused and existing
    /// ones are told to reconnect elsewhere.
    pub fn start_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.drain.cancel();
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Resolves when draining starts.
    pub async fn drain_started(&self) {
        self.inner.drain.cancelled().await;
    }
}
