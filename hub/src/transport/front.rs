//! The accept loop and the front door: one task per TCP connection, which reads the first
//! request head and either serves `/ws` or `/sse` on the raw socket or hands the connection
//! (bytes already read included) to hyper and the axum router.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use super::http1::{self, HeadError, Prefixed};
use super::{Context, sse, ws};
use crate::metrics::reason;

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
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(ctx.clone(), router.clone(), stream));
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

async fn connection(ctx: Context, router: Router, mut stream: TcpStream) {
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
    let (head, len) = head;
    match (head.method == Method::GET, head.path.as_str()) {
        (true, "/ws") => {
            let leftover = buf[len..].to_vec();
            drop(buf);
            ws::serve_raw(ctx, stream, head, leftover).await;
        }
        (_, "/sse") => {
            drop(buf);
            sse::serve_raw(ctx, stream, head).await;
        }
        _ => {
            drop(head);
            // Boxed so this path's (larger) state does not size every connection's task.
            Box::pin(serve_http(ctx, router, stream, Bytes::from(buf))).await;
        }
    }
}

async fn serve_http(ctx: Context, router: Router, stream: TcpStream, prefix: Bytes) {
    let io = TokioIo::new(Prefixed::new(prefix, stream));
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.timing.handshake_timeout)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(io, service).with_upgrades().await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}
