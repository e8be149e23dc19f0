//! WebSocket: the upgrade on either path, then the session over tungstenite: each envelope a
//! text frame, heartbeats as pings answered by pongs, and the close codes of the protocol.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::future::Future;

use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{HeaderMap, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes, handshake::derive_accept_key};

use super::Context;
use super::Transport;
use super::gate::IpSlot;
use super::handshake;
use super::http1::Head;
use super::session::{self, Connection, Heard, SessionEnd};
use crate::envelope::{Control, Notification};

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

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Written through on every message: no per-connection buffer retained between bursts.
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(MAX_INBOUND))
        .max_frame_size(Some(MAX_INBOUND))
}

/// The `Sec-WebSocket-Accept` value of an admitted request (whose key the admission checked).
fn accept_key(headers: &HeaderMap) -> String {
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map_or(&b""[..], |k| k.as_bytes());
    derive_accept_key(key)
}

/// The raw front-door path: the head is parsed, the socket is ours.
pub async fn serve_raw(
    ctx: Context,
    mut stream: TcpStream,
    head: Head,
    leftover: Vec<u8>,
    slot: IpSlot,
) {
    let Some(session) = handshake::admit_raw(&ctx, Transport::Ws, &head, &mut stream, slot).await
    else {
        return;
    };
    let accept = accept_key(&head.headers);
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
    tokio::spawn(session::run(ctx, ws, session));
}

/// The axum path (a kept-alive connection's later request): same admission, hyper upgrade.
pub async fn handler(State(ctx): State<Context>, mut req: Request<Body>) -> Response {
    let session = match handshake::admit_request(&ctx, Transport::Ws, &mut req).await {
        Ok(session) => session,
        Err(rejection) => return rejection.into_response(),
    };
    let accept = accept_key(req.headers());
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
                session::run(ctx, ws, session).await;
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

/// The close frame of a session's end; none when the peer is gone or stopped reading.
fn close_frame(end: SessionEnd) -> Option<CloseFrame> {
    let (code, reason) = match end {
        SessionEnd::Expired => (4001, "token expired"),
        SessionEnd::RefreshRefused => (4003, "token refused"),
        SessionEnd::SlowConsumer => (4008, "slow consumer"),
        SessionEnd::Draining => (1012, "node draining, reconnect"),
        SessionEnd::Disconnected => (4010, "disconnected by the server"),
        SessionEnd::Flood => (1008, "too many messages"),
        SessionEnd::TooBig => (1009, "message too big"),
        SessionEnd::Gone | SessionEnd::Stalled => return None,
    };
    Some(CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from_static(reason),
    })
}

/// Each envelope is one text frame, sent from the bytes rendered once per notification.
impl<S> Connection for WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    type Error = WsError;
    const HEARTBEAT_ANSWERED: bool = true;

    async fn greet(
        &mut self,
        _timing: &super::Timing,
        connected: Control,
        gap: Option<Control>,
    ) -> Result<(), WsError> {
        self.feed(Message::text(connected.json)).await?;
        if let Some(gap) = gap {
            self.feed(Message::text(gap.json)).await?;
        }
        SinkExt::flush(self).await
    }

    async fn notifications(&mut self, ns: &[std::sync::Arc<Notification>]) -> Result<(), WsError> {
        for n in ns {
            self.feed(Message::Text(n.json.clone())).await?;
        }
        SinkExt::flush(self).await
    }

    fn control(&mut self, c: Control) -> impl Future<Output = Result<(), WsError>> + Send {
        self.send(Message::text(c.json))
    }

    fn heartbeat(&mut self) -> impl Future<Output = Result<(), WsError>> + Send {
        self.send(Message::Ping(Default::default()))
    }

    fn flush(&mut self) -> impl Future<Output = Result<(), WsError>> + Send {
        // tungstenite queues the pong to a ping itself; this sends it now.
        SinkExt::flush(self)
    }

    fn heard(&mut self) -> impl Future<Output = Heard> + Send {
        self.next().map(|message| match message {
            Some(Ok(Message::Text(text))) => Heard::Text(text),
            Some(Ok(Message::Binary(_))) => Heard::Binary,
            Some(Ok(Message::Ping(_))) => Heard::Ping,
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => Heard::Alive,
            Some(Ok(Message::Close(_))) | None => Heard::End(SessionEnd::Gone),
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                Heard::End(SessionEnd::TooBig)
            }
            Some(Err(_)) => Heard::End(SessionEnd::Gone),
        })
    }

    async fn close(&mut self, end: SessionEnd) {
        let Some(frame) = close_frame(end) else {
            return;
        };
        if self.send(Message::Close(Some(frame))).await.is_ok() {
            // Wait for the peer's close so our FIN does not race its unread data.
            while let Some(Ok(_)) = self.next().await {}
        }
    }
}
