//! One Server-Sent Events stream: `retry:` and greeting, replay, live notifications as
//! `id:`/`data:` events, `: ping` heartbeats, and the end of the stream at `exp`, on drain or
//! for a slow consumer (the browser then reconnects with `Last-Event-ID` and resumes).
//!
//! The session is written once over [`SseOut`], with two outputs: the raw socket of the front
//! door (events pre-framed as HTTP/1.1 chunks, nothing else buffered) and an axum body.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Future;
use http::{HeaderMap, Request, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::WriteEnds;
use super::gate::IpSlot;
use super::handshake::{self, Rejection, RequestInfo, Session, is_new};
use super::http1::Head;
use super::{Context, drain_delay, expiry_instant};
use crate::auth::{self, OriginCheck};
use crate::envelope::{Control, Notification, chunk, now_micros};
use crate::metrics::Transport;

const HEARTBEAT: &[u8] = b": ping\n\n";
const BATCH: usize = 64;

/// Where a stream's bytes go.
pub trait SseOut: Send {
    /// Writes pre-rendered notifications, several in one write when more than one is queued.
    fn notifications(
        &mut self,
        ns: &[Arc<Notification>],
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes raw event bytes (greeting, heartbeat).
    fn event(&mut self, bytes: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Resolves when the client has gone away.
    fn gone(&mut self) -> impl Future<Output = ()> + Send;
    /// Ends the stream cleanly.
    fn end(&mut self) -> impl Future<Output = ()> + Send;
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
            many => {
                // One chunk holding every event: one syscall, one TCP segment train.
                let len: usize = many.iter().map(|n| n.sse_event().len()).sum();
                let mut events = bytes::BytesMut::with_capacity(len);
                for n in many {
                    events.extend_from_slice(n.sse_event());
                }
                self.stream.write_all(&chunk(&events)).await
            }
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
            many => {
                let mut events = bytes::BytesMut::new();
                for n in many {
                    events.extend_from_slice(n.sse_event());
                }
                self.event(events.freeze()).await
            }
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

fn resume_id<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<std::borrow::Cow<'a, str>> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(std::borrow::Cow::Borrowed)
        .or_else(|| auth::query_param(query, "last_event_id"))
}

/// CORS headers so `EventSource` works from another origin: echo an accepted origin, and
/// allow credentials only for a listed one (the only kind whose cookie is used).
fn cors_headers(headers: &HeaderMap, origin: OriginCheck) -> Vec<(header::HeaderName, String)> {
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

/// The answer to a CORS preflight of `/sse`: 204 allowing `GET` with the `Authorization` and
/// `Last-Event-ID` headers for an accepted origin, 403 with a readable reason otherwise.
fn preflight(
    ctx: &Context,
    headers: &HeaderMap,
) -> (StatusCode, Vec<(header::HeaderName, String)>) {
    match ctx.origins.check(headers) {
        Ok(origin) => {
            let mut out = cors_headers(headers, origin);
            out.push((header::ACCESS_CONTROL_ALLOW_METHODS, "GET".to_owned()));
            out.push((
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "authorization, last-event-id, cache-control".to_owned(),
            ));
            out.push((header::ACCESS_CONTROL_MAX_AGE, "600".to_owned()));
            (StatusCode::NO_CONTENT, out)
        }
        Err(_) => (StatusCode::FORBIDDEN, refused_origin_headers(headers)),
    }
}

/// A refused origin still gets `Access-Control-Allow-Origin` on its 403, so the page can read
/// why (the body holds no secret) instead of seeing a bare CORS failure.
pub(super) fn refused_origin_headers(headers: &HeaderMap) -> Vec<(header::HeaderName, String)> {
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

fn raw_response(
    status: StatusCode,
    headers: &[(header::HeaderName, String)],
    body: &str,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: {}\r\nconnection: close\r\ncache-control: no-store\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if !body.is_empty() {
        out.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// The raw front-door path.
pub async fn serve_raw(ctx: Context, mut stream: TcpStream, head: Head, slot: IpSlot) {
    if head.method == http::Method::OPTIONS {
        let (status, headers) = preflight(&ctx, &head.headers);
        let body = if status == StatusCode::FORBIDDEN {
            serde_json::json!({ "error": "origin not allowed" }).to_string()
        } else {
            String::new()
        };
        let _ = stream
            .write_all(&raw_response(status, &headers, &body))
            .await;
        return;
    }
    let admitted = async {
        if head.method != http::Method::GET {
            return Err(Rejection::bad_request("use GET"));
        }
        let req = RequestInfo {
            headers: &head.headers,
            query: head.query.as_deref(),
        };
        let since = resume_id(&head.headers, head.query.as_deref());
        handshake::admit(&ctx, &req, Transport::Sse, since.as_deref()).await
    };
    let session = // Boxed: the handshake's state (token checks, key fetches) is freed once it is done
    // instead of sizing the connection's task for its whole life.
    match timeout(ctx.timing.handshake_timeout, Box::pin(admitted)).await {
        Ok(Ok(s)) => s,
        Ok(Err(rejection)) => {
            tracing::debug!(path = "/sse", status = rejection.status.as_u16(), reason = %rejection.reason, "handshake refused");
            let headers = if rejection.status == StatusCode::FORBIDDEN {
                refused_origin_headers(&head.headers)
            } else {
                Vec::new()
            };
            let _ = stream
                .write_all(&raw_response(rejection.status, &headers, &rejection.body()))
                .await;
            return;
        }
        Err(_) => {
            ctx.metrics.rejected(crate::metrics::reason::TIMEOUT);
            return;
        }
    };
    let mut session = session;
    session.hold(slot);
    let mut response = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nx-accel-buffering: no\r\n",
    );
    for (name, value) in cors_headers(&head.headers, session.origin) {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    drop(head);
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    // The stream lives on in a task sized for the session alone.
    tokio::spawn(run(ctx, RawOut { stream }, session));
}

/// The axum path (a kept-alive connection's later request).
pub async fn handler(State(ctx): State<Context>, mut req: Request<Body>) -> Response {
    if req.method() == http::Method::OPTIONS {
        let (status, headers) = preflight(&ctx, req.headers());
        let mut builder = Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let body = if status == StatusCode::FORBIDDEN {
            Body::from(serde_json::json!({ "error": "origin not allowed" }).to_string())
        } else {
            Body::empty()
        };
        return builder
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let slot = req
        .extensions_mut()
        .get_mut::<super::front::ConnSlot>()
        .and_then(super::front::ConnSlot::take);
    let query = req.uri().query();
    let since = resume_id(req.headers(), query);
    let info = RequestInfo {
        headers: req.headers(),
        query,
    };
    let admitted = handshake::admit(&ctx, &info, Transport::Sse, since.as_deref());
    let mut session = match timeout(ctx.timing.handshake_timeout, Box::pin(admitted)).await {
        Ok(Ok(s)) => s,
        Ok(Err(r)) => {
            let headers = if r.status == StatusCode::FORBIDDEN {
                refused_origin_headers(req.headers())
            } else {
                Vec::new()
            };
            let mut response = r.into_response();
            for (name, value) in headers {
                if let Ok(v) = http::HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, v);
                }
            }
            return response;
        }
        Err(_) => {
            ctx.metrics.rejected(crate::metrics::reason::TIMEOUT);
            return StatusCode::REQUEST_TIMEOUT.into_response();
        }
    };
    if let Some(slot) = slot {
        session.hold(slot);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no");
    for (name, value) in cors_headers(req.headers(), session.origin) {
        builder = builder.header(name, value);
    }
    tokio::spawn(run(ctx, BodyOut { tx }, session));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    builder
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Clean end of stream, after `hub.closing` with this reason (expiry, drain, slow
    /// consumer, the disconnect API): the browser reconnects.
    Close(&'static str),
    /// The client went away or a write failed.
    Gone,
    /// A write made no progress within the write timeout.
    Stalled,
}

pub(super) async fn run<O: SseOut>(ctx: Context, mut out: O, mut session: Session) {
    let timing = ctx.timing;
    let metrics = ctx.metrics.transport(Transport::Sse).clone();
    let end: Result<Infallible, End> = async {
        let replay = session.replay.take();
        let resumed = replay.as_ref().is_some_and(|r| !r.gap);
        let mut last = session.resume_from;
        let mut greeting = format!("retry: {}\n\n", timing.sse_retry.as_millis()).into_bytes();
        greeting.extend_from_slice(&Control::connected(&session.user, resumed).sse_event());
        if replay.as_ref().is_some_and(|r| r.gap) {
            greeting.extend_from_slice(&Control::gap("resume point not in history").sse_event());
        }
        write_timeout(timing.write_timeout, &session, out.event(Bytes::from(greeting))).await?;
        if let Some(replay) = replay {
            for n in &replay.items {
                if is_new(&mut last, n) {
                    write_timeout(timing.write_timeout, &session, out.notifications(std::slice::from_ref(n))).await?;
                    metrics.delivered.inc();
                }
            }
        }

        let mut close_at = Box::pin(sleep_until(expiry_instant(session.exp, ctx.verifier.leeway())));
        let mut closing = "expired";
        let heartbeat = sleep(timing.ping_interval);
        tokio::pin!(heartbeat);
        let mut draining = false;
        // Made once: a new wait for the drain on every message would register and unregister
        // with the drain token each time.
        let drained = ctx.lifecycle.drained();
        tokio::pin!(drained);
        let mut batch: Vec<Arc<Notification>> = Vec::new();
        loop {
            tokio::select! {
                next = session.queue.recv() => {
                    let Some(n) = next else { return Err(evicted_end(&session)) };
                    session.fill_batch(n, &mut batch, BATCH);
                    batch.retain(|n| is_new(&mut last, n));
                    write_timeout(timing.write_timeout, &session, out.notifications(&batch)).await?;
                    let now = now_micros();
                    for n in batch.drain(..) {
                        if !n.gap {
                            metrics.delivered.inc();
                            ctx.metrics
                                .delivery_latency()
                                .observe(now.saturating_sub(n.accepted_us) as f64 / 1e6);
                        }
                    }
                    if batch.capacity() > BATCH {
                        batch.shrink_to(BATCH);
                    }
                }
                () = out.gone() => return Err(End::Gone),
                () = &mut heartbeat => {
                    write_timeout(timing.write_timeout, &session, out.event(Bytes::from_static(HEARTBEAT))).await?;
                    heartbeat.as_mut().reset(Instant::now() + timing.ping_interval);
                }
                () = &mut close_at => return Err(End::Close(closing)),
                () = &mut drained, if !draining => {
                    draining = true;
                    let at = Instant::now() + drain_delay(timing.drain_window);
                    if at < close_at.deadline() {
                        close_at.as_mut().reset(at);
                        closing = "draining";
                    }
                }
            }
        }
    }
    .await;
    match end {
        Err(End::Close(reason)) => {
            match reason {
                "slow_consumer" => tracing::debug!("slow consumer disconnected"),
                "disconnected" => ctx.metrics.api_disconnects().inc(),
                _ => {}
            }
            let _ = timeout(Duration::from_secs(1), async {
                if out
                    .event(Control::closing(reason).sse_event())
                    .await
                    .is_ok()
                {
                    out.end().await;
                }
            })
            .await;
        }
        Err(End::Stalled) => ctx.metrics.write_timeouts().inc(),
        _ => {}
    }
}

/// Why the registry dropped this stream.
fn evicted_end(session: &Session) -> End {
    if session.disconnected_by_api() {
        End::Close("disconnected")
    } else {
        End::Close("slow_consumer")
    }
}

/// One write under the write timeout (see [`super::write_within`]), its failure as an end.
/// A plain function returning the shared future: no wrapper state in the session's task.
fn write_timeout<'a, F, T, E>(
    limit: Duration,
    session: &'a Session,
    f: F,
) -> impl Future<Output = Result<T, End>> + 'a
where
    F: Future<Output = Result<T, E>> + 'a,
    T: 'a,
    E: 'a,
{
    super::write_within(
        limit,
        session,
        f,
        WriteEnds {
            gone: End::Gone,
            stalled: End::Stalled,
            evicted: evicted_end,
        },
    )
}
