//! One WebSocket connection: upgrade, greeting and replay, then live notifications, pings with
//! a pong deadline, token refresh, and the close codes of the protocol.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes, handshake::derive_accept_key};

use super::WriteEnds;
use super::gate::IpSlot;
use super::handshake::{self, Rejection, RequestInfo, Session, is_new};
use super::http1::{self, Head};
use super::{Context, drain_delay, expiry_instant};
use crate::auth;
use crate::envelope::{Control, Notification, now_micros};
use crate::metrics::Transport;

/// Largest client → server message.
pub const MAX_INBOUND: usize = 4096;
/// Read buffer per connection. Clients send little (a refresh token now and then), so a small
/// buffer keeps idle connections cheap; a larger frame grows it only while it is read.
const READ_BUFFER: usize = 1024;
/// Outbound bytes tungstenite may hold for a socket that is not draining; past it the write
/// fails and the client is dropped instead of growing memory. It must hold the largest
/// envelope: a 1 MiB batch body limits no single notification beyond the 64 KiB publish
/// body, whose envelope adds the id, type and timestamp; Kafka records are capped by
/// `HUB_INGEST_MAX_RECORD_BYTES` (at most 16 MiB).
const MAX_WRITE_BUFFER: usize = 17 * 1024 * 1024;
/// Notifications written per flush when several are queued.
const BATCH: usize = 64;
/// Time allowed to send a close frame and see the peer's reply.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Written through on every message: no per-connection buffer retained between bursts.
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(MAX_INBOUND))
        .max_frame_size(Some(MAX_INBOUND))
}

/// Checks the upgrade headers and returns the `Sec-WebSocket-Accept` value.
fn accept_key(headers: &HeaderMap) -> Result<String, Rejection> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(Rejection::bad_request("expected a WebSocket upgrade"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(Rejection::bad_request(
            "unsupported WebSocket version, use 13",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| Rejection::bad_request("missing Sec-WebSocket-Key"))?;
    Ok(derive_accept_key(key.as_bytes()))
}

fn resume_id<'a>(query: Option<&'a str>) -> Option<std::borrow::Cow<'a, str>> {
    auth::query_param(query, "since")
}

/// The raw front-door path: the head is parsed, the socket is ours.
pub async fn serve_raw(
    ctx: Context,
    mut stream: TcpStream,
    head: Head,
    leftover: Vec<u8>,
    slot: IpSlot,
) {
    let admitted = async {
        let accept = accept_key(&head.headers).inspect_err(|r| ctx.metrics.rejected(r.metric))?;
        let req = RequestInfo {
            headers: &head.headers,
            query: head.query.as_deref(),
        };
        let since = resume_id(head.query.as_deref());
        let session = handshake::admit(&ctx, &req, Transport::Ws, since.as_deref()).await?;
        Ok::<_, Rejection>((accept, session))
    };
    let (accept, session) = // Boxed: the handshake's state (token checks, key fetches) is freed once it is done
    // instead of sizing the connection's task for its whole life.
    match timeout(ctx.timing.handshake_timeout, Box::pin(admitted)).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(rejection)) => {
            tracing::debug!(path = "/ws", status = rejection.status.as_u16(), reason = %rejection.reason, "handshake refused");
            let _ = stream
                .write_all(&http1::json_error(rejection.status, &rejection.body()))
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
    drop(head);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let ws = if leftover.is_empty() {
        WebSocketStream::from_raw_socket(stream, Role::Server, Some(config())).await
    } else {
        WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config())).await
    };
    // The connection lives on in a task sized for the session alone; this one, sized for the
    // handshake as well, ends here.
    tokio::spawn(run(ctx, ws, session));
}

/// The axum path (a kept-alive connection's later request): same handshake, hyper upgrade.
pub async fn handler(State(ctx): State<Context>, mut req: Request<Body>) -> Response {
    let slot = req
        .extensions_mut()
        .get_mut::<super::front::ConnSlot>()
        .and_then(super::front::ConnSlot::take);
    let accept = match accept_key(req.headers()) {
        Ok(a) => a,
        Err(r) => {
            ctx.metrics.rejected(r.metric);
            return r.into_response();
        }
    };
    let query = req.uri().query().map(str::to_owned);
    let since = resume_id(query.as_deref()).map(|s| s.into_owned());
    let info = RequestInfo {
        headers: req.headers(),
        query: query.as_deref(),
    };
    let admitted = handshake::admit(&ctx, &info, Transport::Ws, since.as_deref());
    let mut session = match timeout(ctx.timing.handshake_timeout, Box::pin(admitted)).await {
        Ok(Ok(s)) => s,
        Ok(Err(r)) => return r.into_response(),
        Err(_) => {
            ctx.metrics.rejected(crate::metrics::reason::TIMEOUT);
            return StatusCode::REQUEST_TIMEOUT.into_response();
        }
    };
    if let Some(slot) = slot {
        session.hold(slot);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config()),
                )
                .await;
                run(ctx, ws, session).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Token expired: 4001.
    Expired,
    /// A refresh was refused: 4003.
    RefreshRefused,
    /// Queue overflowed: 4008.
    Slow,
    /// Node draining: 1012.
    Draining,
    /// Closed by the disconnect API: 4010.
    Disconnected,
    /// Client messages faster than the inbound rate: 1008.
    Flood,
    /// Inbound message over 4 KiB: 1009.
    TooBig,
    /// The peer closed, vanished, or broke the protocol: nothing more to say.
    Gone,
    /// A write made no progress within the write timeout.
    Stalled,
}

impl End {
    fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::Expired => (4001, "token expired"),
            End::RefreshRefused => (4003, "token refused"),
            End::Slow => (4008, "slow consumer"),
            End::Draining => (1012, "node draining, reconnect"),
            End::Disconnected => (4010, "disconnected by the server"),
            End::Flood => (1008, "too many messages"),
            End::TooBig => (1009, "message too big"),
            End::Gone | End::Stalled => return None,
        };
        Some(CloseFrame {
            code: code.into(),
            reason: Utf8Bytes::from_static(reason),
        })
    }

    /// The `hub.closing` reason sent before the close frame, for intentional closes.
    fn closing_reason(self) -> Option<&'static str> {
        match self {
            End::Expired => Some("expired"),
            End::Draining => Some("draining"),
            End::Disconnected => Some("disconnected"),
            End::Slow => Some("slow_consumer"),
            _ => None,
        }
    }
}

/// Why the registry dropped this connection.
fn evicted_end(session: &Session) -> End {
    if session.disconnected_by_api() {
        End::Disconnected
    } else {
        End::Slow
    }
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    token: Option<String>,
}

pub(super) async fn run<S>(ctx: Context, mut ws: WebSocketStream<S>, mut session: Session)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let timing = ctx.timing;
    let metrics = ctx.metrics.transport(Transport::Ws).clone();
    let end: Result<std::convert::Infallible, End> = async {
        // Greeting, gap notice and replay, in that order, before anything live.
        let replay = session.replay.take();
        let resumed = replay.as_ref().is_some_and(|r| !r.gap);
        let mut last = session.resume_from;
        let mut greeting = vec![Control::connected(&session.user, resumed)];
        if replay.as_ref().is_some_and(|r| r.gap) {
            greeting.push(Control::gap("resume point not in history"));
        }
        for c in greeting {
            write_timeout(timing.write_timeout, &session, ws.feed(Message::text(c.json))).await?;
        }
        if let Some(replay) = replay {
            for n in &replay.items {
                if is_new(&mut last, n) {
                    write_timeout(timing.write_timeout, &session, ws.feed(Message::Text(n.json.clone())))
                        .await?;
                    metrics.delivered.inc();
                }
            }
        }
        write_timeout(timing.write_timeout, &session, ws.flush()).await?;

        let mut close_at = Box::pin(sleep_until(expiry_instant(session.exp, ctx.verifier.leeway())));
        let mut closing = End::Expired;
        let heartbeat = sleep(timing.ping_interval);
        tokio::pin!(heartbeat);
        let mut awaiting_pong = false;
        let mut draining = false;
        // Made once: a new wait for the drain on every message would register and unregister
        // with the drain token each time.
        let drained = ctx.lifecycle.drained();
        tokio::pin!(drained);
        // Created at the first client message: idle connections do not pay for it.
        let mut inbound: Option<Box<governor::DefaultDirectRateLimiter>> = None;
        let mut batch: Vec<Arc<Notification>> = Vec::new();
        loop {
            tokio::select! {
                next = session.queue.recv() => {
                    let Some(n) = next else { return Err(evicted_end(&session)) };
                    session.fill_batch(n, &mut batch, BATCH);
                    let now = now_micros();
                    for n in batch.drain(..) {
                        if !is_new(&mut last, &n) {
                            continue;
                        }
                        write_timeout(timing.write_timeout, &session, ws.feed(Message::Text(n.json.clone()))).await?;
                        if !n.gap {
                            metrics.delivered.inc();
                            ctx.metrics
                                .delivery_latency()
                                .observe(now.saturating_sub(n.accepted_us) as f64 / 1e6);
                        }
                    }
                    write_timeout(timing.write_timeout, &session, ws.flush()).await?;
                    if batch.capacity() > BATCH {
                        batch.shrink_to(BATCH);
                    }
                }
                msg = ws.next() => {
                    if awaiting_pong {
                        awaiting_pong = false;
                        heartbeat.as_mut().reset(Instant::now() + timing.ping_interval);
                    }
                    if matches!(msg, Some(Ok(Message::Text(_) | Message::Binary(_) | Message::Ping(_)))) {
                        let limiter = inbound.get_or_insert_with(|| {
                            Box::new(governor::RateLimiter::direct(ctx.ws_inbound))
                        });
                        if limiter.check().is_err() {
                            return Err(End::Flood);
                        }
                    }
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            match Box::pin(handle_text(&ctx, &session, text.as_str())).await {
                                Inbound::Refreshed(exp) => {
                                    if !draining {
                                        close_at.as_mut().reset(expiry_instant(exp, ctx.verifier.leeway()));
                                    }
                                    session.exp = exp;
                                    let c = Control::refreshed(exp);
                                    write_timeout(timing.write_timeout, &session, ws.send(Message::text(c.json))).await?;
                                }
                                Inbound::Refused => return Err(End::RefreshRefused),
                                Inbound::Reply(c) => {
                                    write_timeout(timing.write_timeout, &session, ws.send(Message::text(c.json))).await?;
                                }
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let c = Control::error("binary messages are not accepted");
                            write_timeout(timing.write_timeout, &session, ws.send(Message::text(c.json))).await?;
                        }
                        // tungstenite queues the pong itself; flush so it leaves now.
                        Some(Ok(Message::Ping(_))) => write_timeout(timing.write_timeout, &session, ws.flush()).await?,
                        Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                            return Err(End::TooBig);
                        }
                        Some(Err(_)) => return Err(End::Gone),
                    }
                }
                () = &mut heartbeat => {
                    if awaiting_pong {
                        tracing::debug!("no pong in time");
                        return Err(End::Gone);
                    }
                    write_timeout(timing.write_timeout, &session, ws.send(Message::Ping(Default::default()))).await?;
                    awaiting_pong = true;
                    heartbeat.as_mut().reset(Instant::now() + timing.pong_timeout);
                }
                () = &mut close_at => return Err(closing),
                () = &mut drained, if !draining => {
                    draining = true;
                    let at = Instant::now() + drain_delay(timing.drain_window);
                    if at < close_at.deadline() {
                        close_at.as_mut().reset(at);
                        closing = End::Draining;
                    }
                }
            }
        }
    }
    .await;
    let end = match end {
        Err(end) => end,
        Ok(never) => match never {},
    };
    match end {
        End::Slow => tracing::debug!("slow consumer disconnected"),
        End::Stalled => ctx.metrics.write_timeouts().inc(),
        End::Disconnected => ctx.metrics.api_disconnects().inc(),
        End::Flood => {
            tracing::debug!("client message flood");
            ctx.metrics.inbound_rate_closes().inc();
        }
        _ => {}
    }
    if let Some(frame) = end.close_frame() {
        let _ = timeout(CLOSE_GRACE, async {
            if let Some(reason) = end.closing_reason() {
                let c = Control::closing(reason);
                if ws.send(Message::text(c.json)).await.is_err() {
                    return;
                }
            }
            if ws.send(Message::Close(Some(frame))).await.is_ok() {
                // Wait for the peer's close so our FIN does not race its unread data.
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
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

enum Inbound {
    Refreshed(u64),
    Refused,
    Reply(Control),
}

/// Reads one client message; the error is the reason sent back in `hub.error`.
fn parse_client_message(text: &str) -> Result<ClientMessage, &'static str> {
    serde_json::from_str::<ClientMessage>(text).map_err(|_| "expected JSON with a \"type\"")
}

async fn handle_text(ctx: &Context, session: &Session, text: &str) -> Inbound {
    let msg = match parse_client_message(text) {
        Ok(m) => m,
        Err(reason) => return Inbound::Reply(Control::error(reason)),
    };
    match (msg.kind.as_str(), msg.token) {
        // Boxed: refreshes are rare, and verification may fetch keys; its state should not
        // size every connection's task.
        ("refresh", Some(token)) => match Box::pin(ctx.verifier.verify(&token)).await {
            Ok(identity)
                if ctx
                    .backplane
                    .revoked_before(&session.user)
                    .is_some_and(|before| identity.iat.is_none_or(|iat| iat < before)) =>
            {
                tracing::debug!("refresh with a revoked token refused");
                Inbound::Refused
            }
            Ok(identity) if *identity.user == *session.user => Inbound::Refreshed(identity.exp),
            Ok(_) => {
                tracing::debug!("refresh for another user refused");
                Inbound::Refused
            }
            Err(e) => {
                tracing::debug!(reason = %e, "refresh refused");
                Inbound::Refused
            }
        },
        ("refresh", None) => Inbound::Reply(Control::error("refresh needs a token")),
        _ => Inbound::Reply(Control::error("unknown message type")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_client_text_is_a_message_or_a_reason(text in "\\PC{0,200}") {
            let _ = parse_client_message(&text);
        }

        #[test]
        fn message_shaped_text_with_any_values_never_panics(
            kind in "\\PC{0,20}",
            token in proptest::option::of("\\PC{0,100}"),
            extra in "[a-z]{0,5}",
        ) {
            let mut v = serde_json::json!({ "type": kind, extra.clone(): [1, {"x": null}] });
            if let Some(t) = token {
                v["token"] = serde_json::Value::from(t);
            }
            let parsed = parse_client_message(&v.to_string());
            prop_assert!(parsed.is_ok() || extra == "type");
        }
    }
}
