//! Heartbeats: SSE `: ping` comments on schedule; a WebSocket that never answers pings is
//! dropped after the pong deadline, while one that answers stays.

use std::time::Duration;

use test_support::STEP;
use test_support::clients::WsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};

use crate::helpers::app::{spawn_app_with, wait_metric_eq};

#[tokio::test]
async fn sse_sends_ping_comments_every_interval() {
    let app = spawn_app_with(&[("HUB_PING_INTERVAL", "200ms")]).await;
    let token = app.token("hb1");
    let mut tcp = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    tcp.write_all(format!("GET /sse?token={token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let started = Instant::now();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches(": ping").count() < 3 {
        let n = timeout(STEP, tcp.read(&mut buf))
            .await
            .expect("heartbeat within the deadline")
            .expect("read");
        assert!(n > 0, "stream ended");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // Three heartbeats at 200 ms take at least 600 ms: they are paced, not a burst.
    assert!(started.elapsed() >= Duration::from_millis(550));
    assert!(seen.contains("retry: "));
    app.stop().await;
}

#[tokio::test]
async fn a_websocket_that_never_answers_pings_is_dropped() {
    let app = spawn_app_with(&[("HUB_PING_INTERVAL", "200ms"), ("HUB_PONG_TIMEOUT", "1s")]).await;
    // A healthy client (tungstenite answers pings) stays through many ping rounds.
    let mut healthy = WsClient::connect(&app, &app.token("hb-ok"), "")
        .await
        .expect("ws");
    healthy.envelope().await;
    // Keep reading in the background, as a browser does: reading is what answers pings.
    let healthy = tokio::spawn(async move { healthy.envelope().await });
    // A raw client completes the handshake, then never reads or answers.
    let mut raw = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let token = app.token("hb-dead");
    raw.write_all(
        format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    app.wait_metric("hub_connections{transport=\"ws\"}", 2.0)
        .await;
    // Ping at 200 ms, no pong by 1.2 s (a loose deadline so a busy test machine does not drop the healthy one): the server closes; the healthy one remains.
    wait_metric_eq(&app, "hub_connections{transport=\"ws\"}", 1.0).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.metric("hub_connections{transport=\"ws\"}").await, 1.0);
    app.publish("hb-ok", "t", serde_json::json!({})).await;
    assert_eq!(healthy.await.expect("reader")["type"], "t");
    app.stop().await;
}
