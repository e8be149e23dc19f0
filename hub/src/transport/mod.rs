//! Client connections: the listener's front door, the handshake, and one connection's life on
//! WebSocket ([`ws`]) or Server-Sent Events ([`sse`]).
//!
//! # Why a front door of our own
//!
//! A streaming response inside hyper keeps hyper's HTTP/1 connection state (read and write
//! buffers of at least 8 KiB each) alive for as long as the stream runs: about 22 KiB per idle
//! SSE client. So [`front::serve`] reads the first request head of every TCP connection
//! itself. `GET /ws` and `GET /sse` are handled right there on the raw socket, keeping only what
//! the stream needs; every other request (and every later request on a kept-alive connection)
//! goes to hyper and the axum router, which also serves `/ws` and `/sse` through the same
//! handshake and session code, so a browser that reuses a connection still works.

pub mod front;
pub mod handshake;
pub mod http1;
pub mod sse;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{OriginPolicy, Verifier};
use crate::backplane::Backplane;
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::shutdown::Lifecycle;

/// Timing and size settings of client connections.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// WebSocket ping / SSE heartbeat interval.
    pub ping_interval: Duration,
    /// Silence allowed after a ping.
    pub pong_timeout: Duration,
    /// Request head and handshake deadline.
    pub handshake_timeout: Duration,
    /// A stalled write closes the connection after this long.
    pub write_timeout: Duration,
    /// SSE reconnection hint.
    pub sse_retry: Duration,
    /// Drain spreads closes over this window.
    pub drain_window: Duration,
}

/// Everything a connection needs; cheap to clone.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

/// The parts of [`Context`].
pub struct ContextInner {
    /// Token verification.
    pub verifier: Verifier,
    /// Origin allow-list.
    pub origins: OriginPolicy,
    /// Local registry.
    pub fanout: Fanout,
    /// History and routing.
    pub backplane: Arc<dyn Backplane>,
    /// Metrics.
    pub metrics: Metrics,
    /// Drain state.
    pub lifecycle: Lifecycle,
    /// Timings.
    pub timing: Timing,
}

impl Context {
    /// Wraps the parts.
    pub fn new(inner: ContextInner) -> Self {
        Context {
            inner: Arc::new(inner),
        }
    }
}

impl std::ops::Deref for Context {
    type Target = ContextInner;

    fn deref(&self) -> &ContextInner {
        &self.inner
    }
}

/// A random delay within the drain window, so a draining node's clients do not all reconnect
/// to the remaining nodes at the same instant.
fn drain_delay(window: Duration) -> Duration {
    if window.is_zero() {
        return Duration::ZERO;
    }
    window.mul_f64(rand::random::<f64>())
}

/// When to close for token expiry: `exp` plus the configured leeway (the same leeway the
/// handshake allowed), as a tokio instant.
fn expiry_instant(exp: u64, leeway: Duration) -> tokio::time::Instant {
    let now_s = crate::envelope::now_micros() / 1_000_000;
    let left = (exp + leeway.as_secs()).saturating_sub(now_s);
    tokio::time::Instant::now() + Duration::from_secs(left)
}
