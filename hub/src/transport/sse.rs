//! Server-Sent Events: the stream's response on either path, then the session written as
//! events: `retry:` and the greeting, each notification as its `id:`/`data:` event, `: ping`
//! heartbeats, and the end of the stream (the browser then reconnects with `Last-Event-ID`
//! and resumes).
//!
//! Two socket writers ([`SseOut`]) carry the same events: the raw socket of the front door
//! (events pre-framed as HTTP/1.1 chunks, nothing else buffered) and an axum body.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::{Future, FutureExt};
use http::{HeaderMap, HeaderName, Request, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Transport;
use super::gate::IpSlot;
use super::handshake;
use super::http1::{self, Head};
use super::session::{self, Connection, Heard, SessionEnd};
use super::{Context, Timing};
use crate::auth::OriginCheck;
use crate::envelope::{Control, Notification, chunk};

const HEARTBEAT: &[u8] = b": ping\n\n";

/// Where a stream's bytes go: the socket writer under the SSE framing.
pub trait SseOut: Send {
    /// Writes pre-rendered notifications, several in one write when more than one is queued.
    fn notifications(
        &mut self,
        ns: &[Arc<Notification>],
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes raw event bytes (greeting, heartbeat, control envelopes).
    fn event(&mut self, bytes: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Resolves when the client has gone away.
    fn gone(&mut self) -> impl Future<Output = ()> + Send;
    /// Ends the stream cleanly.
    fn end(&mut self) -> impl Future<Output = ()> + Send;
}

/// Every event of `ns` in one buffer, for one write.
fn joined_events(ns: &[Arc<Notification>]) -> BytesMut {
    let len: usize = ns.iter().map(|n| n.sse_event().len()).sum();
    let mut events = BytesMut::with_capacity(len);
    for n in ns {
        events.extend_from_slice(n.sse_event());
    }
    events
}

/// The front door's output: chunked transfer encoding straight onto the socket.
pub(super) struct RawOut {
    pub(super) stream: TcpStream,
}

impl SseOut for RawOut {
    async fn notifications(&mut self, ns: &[Arc<Notification>]) -> io::Result<()> {
        match ns {
            [] => Ok(()),
            [one] => self.stream.write_all(one.sse_chunk()).await,
            // One chunk holding every event: one syscall, one TCP segment train.
            many => self.stream.write_all(&chunk(&joined_events(many))).await,
        }
    }

    async fn event(&mut self, bytes: Bytes) -> io::Result<()> {
        self.stream.write_all(&chunk(&bytes)).await
    }

    async fn gone(&mut self) {
        // An SSE client sends nothing after its request: EOF, a reset, or any byte (a
        // pipelined request or garbage, which this stream will never answer) ends it.
        let mut scratch = [0u8; 1];
        let _ = self.stream.read(&mut scratch).await;
    }

    async fn end(&mut self) {
        let _ = self.stream.write_all(b"0\r\n\r\n").await;
        let _ = self.stream.shutdown().await;
    }
}

/// The axum path's output: a small channel feeding the response body.
struct BodyOut {
    tx: mpsc::Sender<Bytes>,
}

impl SseOut for BodyOut {
    async fn notifications(&mut self, ns: &[Arc<Notification>]) -> io::Result<()> {
        match ns {
            [] => Ok(()),
            [one] => self.event(one.sse_event().clone()).await,
            many => self.event(joined_events(many).freeze()).await,
        }
    }

    async fn event(&mut self, bytes: Bytes) -> io::Result<()> {
        self.tx
            .send(bytes)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    async fn gone(&mut self) {
        self.tx.closed().await;
    }

    async fn end(&mut self) {}
}

/// The SSE framing of a session, whichever writer carries it. Writes reach the socket (or
/// the body) as they are made: there is nothing to flush. Each method hands back the writer's
/// own future, with the event bytes already made, so no wrapper state sizes the session.
impl<O: SseOut> Connection for O {
    type Error = io::Error;
    const HEARTBEAT_ANSWERED: bool = false;

    fn greet(
        &mut self,
        timing: &Timing,
        connected: Control,
        gap: Option<Control>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let mut greeting = format!("retry: {}\n\n", timing.sse_retry.as_millis()).into_bytes();
        greeting.extend_from_slice(&connected.sse_event());
        if let Some(gap) = gap {
            greeting.extend_from_slice(&gap.sse_event());
        }
        self.event(Bytes::from(greeting))
    }

    fn notifications(
        &mut self,
        ns: &[Arc<Notification>],
    ) -> impl Future<Output = io::Result<()>> + Send {
        SseOut::notifications(self, ns)
    }

    fn control(&mut self, c: Control) -> impl Future<Output = io::Result<()>> + Send {
        self.event(c.sse_event())
    }

    fn heartbeat(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        self.event(Bytes::from_static(HEARTBEAT))
    }

    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    fn heard(&mut self) -> impl Future<Output = Heard> + Send {
        self.gone().map(|()| Heard::End(SessionEnd::Gone))
    }

    fn close(&mut self, _end: SessionEnd) -> impl Future<Output = ()> + Send {
        self.end()
    }
}

/// CORS headers so `EventSource` works from another origin: echo an accepted origin, and
/// allow credentials only for a listed one (the only kind whose cookie is used).
fn cors_headers(headers: &HeaderMap, origin: OriginCheck) -> Vec<(HeaderName, String)> {
    let Some(value) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    let mut out = vec![
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, value.to_owned()),
        (header::VARY, "origin".to_owned()),
    ];
    if origin == OriginCheck::Allowed {
        out.push((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true".to_owned()));
    }
    out
}

/// The headers of an admitted stream's response (besides its transfer framing).
fn stream_headers(headers: &HeaderMap, origin: OriginCheck) -> Vec<(HeaderName, String)> {
    let mut out = vec![
        (header::CONTENT_TYPE, "text/event-stream".to_owned()),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
        (
            HeaderName::from_static("x-accel-buffering"),
            "no".to_owned(),
        ),
    ];
    out.extend(cors_headers(headers, origin));
    out
}

/// The answer to a CORS preflight of `/sse` (status, headers, body): 204 allowing `GET` with
/// the `Authorization` and `Last-Event-ID` headers for an accepted origin, 403 with a
/// readable reason otherwise.
fn preflight(
    ctx: &Context,
    headers: &HeaderMap,
) -> (StatusCode, Vec<(HeaderName, String)>, String) {
    match ctx.origins.check(headers) {
        Ok(origin) => {
            let mut out = cors_headers(headers, origin);
            out.push((header::ACCESS_CONTROL_ALLOW_METHODS, "GET".to_owned()));
            out.push((
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "authorization, last-event-id, cache-control".to_owned(),
            ));
            out.push((header::ACCESS_CONTROL_MAX_AGE, "600".to_owned()));
            (StatusCode::NO_CONTENT, out, String::new())
        }
        Err(_) => (
            StatusCode::FORBIDDEN,
            refused_origin_headers(headers),
            serde_json::json!({ "error": "origin not allowed" }).to_string(),
        ),
    }
}

/// A refused origin still gets `Access-Control-Allow-Origin` on its 403, so the page can read
/// why (the body holds no secret) instead of seeing a bare CORS failure.
pub(super) fn refused_origin_headers(headers: &HeaderMap) -> Vec<(HeaderName, String)> {
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(|o| {
            tracing::info!(origin = o, "origin not in HUB_ALLOWED_ORIGINS refused");
            vec![
                (header::ACCESS_CONTROL_ALLOW_ORIGIN, o.to_owned()),
                (header::VARY, "origin".to_owned()),
            ]
        })
        .unwrap_or_default()
}

/// The raw front-door path.
pub async fn serve_raw(ctx: Context, mut stream: TcpStream, head: Head, slot: IpSlot) {
    if head.method == http::Method::OPTIONS {
        let (status, headers, body) = preflight(&ctx, &head.headers);
        let _ = stream
            .write_all(&http1::response(status, &headers, &body))
            .await;
        return;
    }
    let Some(session) = handshake::admit_raw(&ctx, Transport::Sse, &head, &mut stream, slot).await
    else {
        return;
    };
    let mut response = String::from("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n");
    for (name, value) in stream_headers(&head.headers, session.origin) {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    drop(head);
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    // The stream lives on in a task sized for the session alone.
    tokio::spawn(session::run(ctx, RawOut { stream }, session));
}

/// The axum path (a kept-alive connection's later request).
pub async fn handler(State(ctx): State<Context>, mut req: Request<Body>) -> Response {
    if req.method() == http::Method::OPTIONS {
        let (status, headers, body) = preflight(&ctx, req.headers());
        return super::response(status, headers, body);
    }
    let session = match handshake::admit_request(&ctx, Transport::Sse, &mut req).await {
        Ok(session) => session,
        Err(rejection) => return rejection.into_response(),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let mut builder = Response::builder().status(StatusCode::OK);
    for (name, value) in stream_headers(req.headers(), session.origin) {
        builder = builder.header(name, value);
    }
    tokio::spawn(session::run(ctx, BodyOut { tx }, session));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    builder
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
