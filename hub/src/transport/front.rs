//! The accept loop and the front door: one task per TCP connection, which reads the first
//! request head and either serves `/ws` or `/sse` on the raw socket or hands the connection
//! (bytes already read included) to hyper and the axum router.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tower::ServiceExt;

use super::gate::{IpSlot, Pending, Refused};
use super::http1::{self, HeadError, Prefixed};
use super::{Context, sse, ws};
use crate::metrics::reason;

/// Dead peers are noticed by TCP keepalive after about this long of silence plus
/// [`KEEPALIVE_INTERVAL`] × [`KEEPALIVE_RETRIES`], so they free their slots.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// The client address's connection slot of an HTTP connection, in every request's
/// extensions: a WebSocket or SSE handler takes it into its session, so the slot lives as
/// long as the stream does; otherwise it is released with the connection.
#[derive(Clone)]
pub struct ConnSlot(Arc<Mutex<Option<IpSlot>>>);

impl ConnSlot {
    /// Moves the slot out (once).
    pub fn take(&mut self) -> Option<IpSlot> {
        self.0.lock().take()
    }
}

fn keepalive(stream: &TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "cannot enable TCP keepalive");
    }
}

/// Accepts connections until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    ctx: Context,
    router: Router,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (slot, pending) = match ctx.gate.admit(peer.ip()) {
                    Ok(taken) => taken,
                    Err(refused) => {
                        ctx.metrics.rejected(match refused {
                            Refused::PerIp => reason::IP_LIMIT,
                            Refused::Pending => reason::PENDING_LIMIT,
                        });
                        // Closed at once: nothing is read from or written to it.
                        drop(stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                tokio::spawn(connection(
                    ctx.clone(),
                    router.clone(),
                    stream,
                    peer,
                    (slot, pending),
                ));
            }
            Err(e) => {
                // Out of file descriptors or a transient accept error: back off instead of
                // spinning; the connections already open are unaffected.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    ctx: Context,
    router: Router,
    mut stream: TcpStream,
    peer: SocketAddr,
    (slot, pending): (IpSlot, Pending),
) {
    let mut buf = Vec::with_capacity(1024);
    let head = match timeout(
        ctx.timing.handshake_timeout,
        http1::read_head(&mut stream, &mut buf),
    )
    .await
    {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(e @ (HeadError::TooLarge | HeadError::Malformed))) => {
            let status = match e {
                HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            let body = serde_json::json!({ "error": e.to_string() }).to_string();
            let _ = stream.write_all(&http1::json_error(status, &body)).await;
            return;
        }
        Err(_) => {
            ctx.metrics.rejected(reason::TIMEOUT);
            return;
        }
    };
    drop(pending);
    let (head, len) = head;
    match (head.method == Method::GET, head.path.as_str()) {
        (true, "/ws") => {
            let leftover = buf[len..].to_vec();
            drop(buf);
            ws::serve_raw(ctx, stream, head, leftover, slot).await;
        }
        (_, "/sse") => {
            drop(buf);
            sse::serve_raw(ctx, stream, head, slot).await;
        }
        _ => {
            drop(head);
            // Boxed so this path's (larger) state does not size every connection's task.
            Box::pin(serve_http(
                ctx,
                router,
                stream,
                Bytes::from(buf),
                peer,
                slot,
            ))
            .await;
        }
    }
}

/// Every request of a kept-alive connection gets the same limits as the first: a head of at
/// most [`http1::MAX_HEAD`] read within the handshake timeout (hyper), a body read within it
/// (the router's body timeout), and writes that make progress within the write timeout.
async fn serve_http(
    ctx: Context,
    router: Router,
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    slot: IpSlot,
) {
    let mut timed = tokio_io_timeout::TimeoutStream::new(Prefixed::new(prefix, stream));
    timed.set_write_timeout(Some(ctx.timing.write_timeout));
    let io = TokioIo::new(Box::pin(timed));
    let slot = ConnSlot(Arc::new(Mutex::new(Some(slot))));
    let service = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(slot.clone());
        router.clone().oneshot(req)
    });
    let service = TowerToHyperService::new(service);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.timing.handshake_timeout)
        .max_buf_size(http1::MAX_HEAD)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(io, service).with_upgrades().await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}
