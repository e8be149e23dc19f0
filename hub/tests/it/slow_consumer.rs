//! Slow consumer, with the real binary: a WebSocket client that stops reading is disconnected
//! once its bounded queue overflows, the node's memory stays bounded while a flood is aimed at
//! it, and other clients on the node are unaffected.

use std::time::Duration;

use serde_json::json;
use test_support::STEP;
use test_support::clients::WsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::helpers::app::{TestApp, wait_metric_eq};
use crate::helpers::processes::HubProcess;

/// Notifications aimed at the stalled client; with `PAD` bytes each this is ~20 MB, well past
/// what loopback socket buffers absorb (a few MB), so the hub's own queue must overflow.
const FLOOD: usize = 10_000;
const PAD: usize = 2 * 1024;
const PUBLISHERS: usize = 16;
const WS_OPEN: &str = "hub_connections{transport=\"ws\"}";
const SLOW: &str = "hub_slow_consumer_disconnects_total";
const PUBLISHED: &str = "hub_notifications_published_total{source=\"api\"}";
/// Largest RSS growth of the node accepted over the flood. Bounded queues plus history (100 per
/// user) need well under 2 MiB; a queue that kept growing would hold the ~8 000 notifications the
/// socket cannot take, at ~6 KiB each rendered (WS frame, SSE event, SSE chunk): ~48 MiB.
const RSS_BOUND_KIB: u64 = 16 * 1024;

/// Completes a WebSocket handshake on a raw socket and returns it; the caller never reads again.
async fn stalled_ws(app: &TestApp, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte so nothing after the head (the greeting frame) is consumed.
    while !head.ends_with(b"\r\n\r\n") {
        let n = timeout(STEP, stream.read(&mut byte))
            .await
            .expect("101 response within the deadline")
            .expect("read response head");
        assert!(
            n == 1,
            "closed during the handshake: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        assert!(head.len() < 4096, "response head too long");
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    stream
}

#[tokio::test]
async fn a_stalled_client_is_dropped_with_bounded_memory_and_others_are_unaffected() {
    // The evicted connection's task sits in its blocked socket write until the write timeout
    // (10 s by default) before the socket is released; 2 s keeps the test short.
    let hub = HubProcess::start(&[("HUB_SEND_QUEUE", "64"), ("HUB_WRITE_TIMEOUT", "2s")]).await;
    let app = hub.as_app();

    let mut healthy = WsClient::connect(&app, &app.token("healthy"), "")
        .await
        .expect("healthy client");
    assert_eq!(healthy.envelope().await["type"], "hub.connected");
    let mut stalled = stalled_ws(&app, &app.token("stalled")).await;
    wait_metric_eq(&app, WS_OPEN, 2.0).await;

    let rss_before = hub.rss_kib();
    let started = Instant::now();
    let per_task = FLOOD / PUBLISHERS;
    let mut tasks = Vec::new();
    for t in 0..PUBLISHERS {
        let publisher = hub.as_app();
        tasks.push(tokio::spawn(async move {
            let pad = "x".repeat(PAD);
            for i in 0..per_task {
                let body = json!({
                    "user_id": "stalled",
                    "type": "flood",
                    "data": {"n": t * per_task + i, "pad": pad},
                });
                let (status, answer) = publisher.publish_raw(&body).await;
                assert_eq!(status, 200, "publish during the flood: {answer}");
            }
        }));
    }
    let mut rss_peak = rss_before;
    let mut detected = None;
    while !tasks.iter().all(|t| t.is_finished()) {
        rss_peak = rss_peak.max(hub.rss_kib());
        if detected.is_none() && app.metric(SLOW).await >= 1.0 {
            detected = Some((started.elapsed(), app.metric(PUBLISHED).await));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    let flood_took = started.elapsed();

    app.wait_metric(SLOW, 1.0).await;
    // Only the healthy client is left.
    wait_metric_eq(&app, WS_OPEN, 1.0).await;
    let released_after = started.elapsed();
    let rss_after = hub.rss_kib();
    let write_timeouts = app.metric("hub_write_timeouts_total").await;
    rss_peak = rss_peak.max(rss_after);

    // The server really let go of the socket: reading what it had buffered ends in EOF or reset.
    let mut sink = vec![0u8; 64 * 1024];
    let mut buffered = 0usize;
    loop {
        match timeout(STEP, stalled.read(&mut sink))
            .await
            .expect("the stalled socket is closed by the hub")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => buffered += n,
        }
    }

    // The other user's client never noticed: the next thing it gets is its own marker.
    app.publish("healthy", "marker", json!({})).await;
    assert_eq!(healthy.envelope().await["type"], "marker");

    let growth = rss_peak.saturating_sub(rss_before);
    let detected = detected.map_or_else(
        || "after the flood".to_owned(),
        |(at, published)| format!("by {at:?} ({published} published)"),
    );
    println!(
        "slow consumer: {FLOOD} x {PAD} B published in {flood_took:?}; disconnect counted \
         {detected}; stalled connection released after {released_after:?} \
         ({write_timeouts} write timeouts); {buffered} B were \
         in socket buffers; RSS before {rss_before} KiB, peak {rss_peak} KiB, after \
         {rss_after} KiB, peak growth {growth} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(
        growth < RSS_BOUND_KIB,
        "RSS grew by {growth} KiB during the flood (bound {RSS_BOUND_KIB} KiB)"
    );
}
