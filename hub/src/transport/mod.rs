//! Client connections: the listener's front door, the one admission ([`handshake`]), and one
//! connection's life: the session ([`session`]), written once, over the framing and socket
//! writer of WebSocket ([`ws`]) or Server-Sent Events ([`sse`]).
//!
//! # Why a front door of our own
//!
//! A streaming response inside hyper keeps hyper's HTTP/1 connection state (read and write
//! buffers of at least 8 KiB each) alive for as long as the stream runs: about 22 KiB per idle
//! SSE client. So [`front::serve`] reads the first request head of every TCP connection
//! itself. `GET /ws` and `GET /sse` are handled right there on the raw socket, keeping only what
//! the stream needs; every other request (and every later request on a kept-alive connection)
//! goes to hyper and the axum router, which also serves `/ws` and `/sse` through the same
//! admission and session code, so a browser that reuses a connection still works.

pub mod front;
pub mod gate;
pub mod handshake;
pub mod http1;
mod inbound;
pub mod session;
pub mod sse;
pub mod streams;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{OriginPolicy, Verifier};
use crate::backplane::Backplane;
use crate::fanout::Fanout;
use crate::metrics::{Metrics, TransportMetrics};
use crate::shutdown::Lifecycle;

/// A client transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket.
    Ws,
    /// Server-Sent Events.
    Sse,
}

impl Transport {
    /// Its name in logs (and the `transport` label's value).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }

    /// This transport's children of the `transport`-labelled metrics.
    pub fn metrics(self, metrics: &Metrics) -> &TransportMetrics {
        match self {
            Transport::Ws => metrics.ws(),
            Transport::Sse => metrics.sse(),
        }
    }
}

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
    /// Per-address and pending-handshake caps, taken at accept.
    pub gate: gate::Gate,
    /// Handshakes per user (token `sub`).
    pub user_rate: governor::DefaultKeyedRateLimiter<Arc<str>>,
    /// Client → server WebSocket messages per connection.
    pub ws_inbound: governor::Quota,
    /// Channels one connection may follow.
    pub max_channels: usize,
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

/// A complete response for the axum path: `status`, `headers`, and a JSON `body` (or none).
fn response(
    status: http::StatusCode,
    headers: Vec<(http::HeaderName, String)>,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut builder = axum::response::Response::builder().status(status);
    if !body.is_empty() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
        .body(axum::body::Body::from(body))
        .unwrap_or_else(|_| http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Longest wait a connection's clock is asked to hold (tokens are capped by
/// `HUB_JWT_MAX_LIFETIME`, at most a year; this only keeps the arithmetic safe).
const FAR: Duration = Duration::from_secs(400 * 24 * 3600);

/// When to close for token expiry: at `exp`. A token already past `exp` was accepted within
/// the configured leeway; it is kept until `exp` plus the leeway, not closed at once (so a
/// client does not reconnect in a loop with it).
fn expiry_instant(exp: u64, leeway: Duration) -> tokio::time::Instant {
    let now_s = crate::envelope::now_micros() / 1_000_000;
    let end = if exp > now_s {
        exp
    } else {
        exp.saturating_add(leeway.as_secs())
    };
    let left = Duration::from_secs(end.saturating_sub(now_s)).min(FAR);
    let now = tokio::time::Instant::now();
    now.checked_add(left).unwrap_or(now)
}

/// Builds the per-user handshake limiter.
pub fn user_rate(per_second: u32, burst: u32) -> governor::DefaultKeyedRateLimiter<Arc<str>> {
    let rate = std::num::NonZeroU32::new(per_second).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
    governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
}

/// The per-connection inbound quota: `per_second`, bursts of twice that.
pub fn ws_inbound(per_second: u32) -> governor::Quota {
    let rate = std::num::NonZeroU32::new(per_second).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(rate));
    governor::Quota::per_second(rate).allow_burst(burst)
}

#[cfg(test)]
mod tests {
    //! Per-connection task size is most of an idle connection's memory: keep it in check.

    use std::sync::Arc;

    use super::Transport;
    use super::*;
    use crate::backplane::memory::MemoryBackplane;
    use crate::fanout::Limits;

    use crate::backplane::NoSink;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn context() -> Context {
        let settings = crate::config::Settings::load_from_pairs([("HUB_JWT_SECRET", SECRET)])
            .expect("settings");
        let second = Duration::from_secs(1);
        Context::new(ContextInner {
            verifier: Verifier::from_settings(&settings, None).expect("verifier"),
            origins: OriginPolicy::new(&[]),
            fanout: Fanout::new(Limits {
                max_connections: 10,
                max_per_user: 10,
                queue: 10,
                max_channel_subscribers: 10,
            }),
            backplane: Arc::new(MemoryBackplane::new(Arc::new(NoSink), 10, second)),
            metrics: Metrics::new(),
            lifecycle: Lifecycle::new(),
            timing: Timing {
                ping_interval: second,
                pong_timeout: second,
                handshake_timeout: second,
                write_timeout: second,
                sse_retry: second,
                drain_window: second,
            },
            gate: gate::Gate::new(10, 10),
            user_rate: user_rate(10, 10),
            ws_inbound: ws_inbound(10),
            max_channels: 4,
        })
    }

    async fn admitted(ctx: &Context, t: Transport) -> handshake::Session {
        let token = crate::auth::sign_hs256(SECRET, "u", Duration::from_secs(60)).expect("sign");
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        for (name, value) in [
            (http::header::UPGRADE, "websocket"),
            (http::header::CONNECTION, "Upgrade"),
            (http::header::SEC_WEBSOCKET_VERSION, "13"),
            (http::header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ=="),
        ] {
            headers.insert(name, value.parse().expect("header"));
        }
        let req = handshake::RequestInfo {
            method: &http::Method::GET,
            headers: &headers,
            query: None,
        };
        handshake::admit(ctx, t, &req).await.expect("admitted")
    }

    #[test]
    fn expiry_far_ahead_or_past_never_overflows() {
        let now = tokio::time::Instant::now();
        let far = expiry_instant(u64::MAX, Duration::from_secs(60));
        assert!(far > now && far <= now + FAR + Duration::from_secs(1));
        let past = expiry_instant(1, Duration::from_secs(60));
        assert!(past <= tokio::time::Instant::now());
        let soon = crate::envelope::now_micros() / 1_000_000 + 100;
        let at = expiry_instant(soon, Duration::from_secs(60));
        assert!(
            at <= now + Duration::from_secs(101),
            "closes at exp, not exp + leeway"
        );
    }

    #[tokio::test]
    async fn long_lived_connection_tasks_stay_small() {
        let ctx = context();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tcp = || tokio::net::TcpStream::connect(addr);

        let ws_stream = tokio_tungstenite::WebSocketStream::from_raw_socket(
            tcp().await.expect("connect"),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let ws_task = session::run(ctx.clone(), ws_stream, admitted(&ctx, Transport::Ws).await);
        let sse_task = session::run(
            ctx.clone(),
            sse::RawOut {
                stream: tcp().await.expect("connect"),
            },
            admitted(&ctx, Transport::Sse).await,
        );
        let (ws_size, sse_size) = (size_of_val(&ws_task), size_of_val(&sse_task));
        // Measured 2080 and 1432 bytes before the closing and refresh envelopes, the inbound
        // rate limit and the address slot; 1824 for SSE with channels (the streams pointer,
        // the subscribe path boxed). The budget leaves room for small changes but catches a
        // handshake or key-fetch future creeping into the session's state.
        assert!(ws_size <= 2560, "WebSocket session task is {ws_size} bytes");
        assert!(sse_size <= 1856, "SSE session task is {sse_size} bytes");
    }
}
