//! Metrics: `/metrics` exposes every series the contract names (§5) in the Prometheus text
//! format, the values follow what clients and publishers do, and no label carries a user.

use serde_json::json;
use test_support::clients::{SseClient, WsClient};

use crate::helpers::app::{spawn_app, wait_metric_eq};

const WS: &str = "hub_connections{transport=\"ws\"}";
const SSE: &str = "hub_connections{transport=\"sse\"}";
const WS_TOTAL: &str = "hub_connections_total{transport=\"ws\"}";
const SSE_TOTAL: &str = "hub_connections_total{transport=\"sse\"}";
const PUBLISHED: &str = "hub_notifications_published_total{source=\"api\"}";
const DELIVERED_WS: &str = "hub_messages_delivered_total{transport=\"ws\"}";
const DELIVERED_SSE: &str = "hub_messages_delivered_total{transport=\"sse\"}";
const LATENCY_COUNT: &str = "hub_delivery_latency_seconds_count";
const LATENCY_INF: &str = "hub_delivery_latency_seconds_bucket{le=\"+Inf\"}";
const INVALID_TOKEN: &str = "hub_handshake_rejections_total{reason=\"invalid_token\"}";
const REPLAYED: &str = "hub_resumes_total{outcome=\"replayed\"}";

/// The `# TYPE` of a metric family in the exposition.
fn family_type<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("# TYPE ")?
                .strip_prefix(name)?
                .strip_prefix(' ')
        })
        .map(str::trim)
}

#[tokio::test]
async fn every_contract_metric_is_exposed_with_its_type() {
    let app = spawn_app().await;
    let r = reqwest::get(format!("{}/metrics", app.base()))
        .await
        .expect("GET /metrics");
    assert_eq!(r.status().as_u16(), 200);
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format, got {content_type:?}"
    );
    let text = r.text().await.expect("metrics body");

    // Every series exists from start, at zero, so dashboards and alerts see it before traffic.
    for series in [
        WS,
        SSE,
        WS_TOTAL,
        SSE_TOTAL,
        INVALID_TOKEN,
        "hub_handshake_rejections_total{reason=\"user_limit\"}",
        "hub_handshake_rejections_total{reason=\"node_limit\"}",
        "hub_handshake_rejections_total{reason=\"draining\"}",
        PUBLISHED,
        DELIVERED_WS,
        DELIVERED_SSE,
        LATENCY_COUNT,
        "hub_delivery_latency_seconds_sum",
        LATENCY_INF,
        "hub_slow_consumer_disconnects_total",
        REPLAYED,
        "hub_resumes_total{outcome=\"gap\"}",
    ] {
        let line = text
            .lines()
            .find(|l| {
                l.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"));
        let value = line[series.len()..].trim();
        assert_eq!(
            value.parse::<f64>().ok(),
            Some(0.0),
            "{series} on a fresh node"
        );
    }
    for (family, kind) in [
        ("hub_connections", "gauge"),
        ("hub_connections_total", "counter"),
        ("hub_handshake_rejections_total", "counter"),
        ("hub_notifications_published_total", "counter"),
        ("hub_messages_delivered_total", "counter"),
        ("hub_delivery_latency_seconds", "histogram"),
        ("hub_slow_consumer_disconnects_total", "counter"),
        ("hub_resumes_total", "counter"),
    ] {
        assert_eq!(family_type(&text, family), Some(kind), "# TYPE of {family}");
    }
    app.stop().await;
}

#[tokio::test]
async fn metrics_follow_connections_publishes_deliveries_and_resumes() {
    let app = spawn_app().await;
    let user = "metrics-user-7f3a9c";
    let token = app.token(user);
    assert_eq!(app.metric(WS).await, 0.0);
    assert_eq!(app.metric(SSE).await, 0.0);

    let mut ws = WsClient::connect(&app, &token, "").await.expect("ws");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    let mut sse = SseClient::connect(&app, &token, "").await.expect("sse");
    assert_eq!(sse.event().await.data["type"], "hub.connected");
    assert_eq!(app.metric(WS).await, 1.0);
    assert_eq!(app.metric(SSE).await, 1.0);
    assert_eq!(app.metric(WS_TOTAL).await, 1.0);
    assert_eq!(app.metric(SSE_TOTAL).await, 1.0);

    let Err(r) = WsClient::connect(&app, "not-a-jwt", "").await else {
        panic!("a garbage token was accepted");
    };
    assert_eq!(r.status, 401);
    assert_eq!(app.metric(INVALID_TOKEN).await, 1.0);
    assert_eq!(
        app.metric(WS_TOTAL).await,
        1.0,
        "a refusal is not a connection"
    );

    let mut first_id = String::new();
    for n in 0..3 {
        let id = app.publish(user, "m", json!({"n": n})).await;
        if n == 0 {
            first_id = id;
        }
    }
    for n in 0..3 {
        assert_eq!(ws.envelope().await["data"]["n"], n);
        assert_eq!(sse.event().await.data["data"]["n"], n);
    }
    // Counters move after the socket write; wait for them, then check they moved by exactly
    // what happened.
    for (series, want) in [
        (PUBLISHED, 3.0),
        (DELIVERED_WS, 3.0),
        (DELIVERED_SSE, 3.0),
        (LATENCY_COUNT, 6.0),
    ] {
        app.wait_metric(series, want).await;
        assert_eq!(app.metric(series).await, want, "{series}");
    }
    assert_eq!(
        app.metric(LATENCY_INF).await,
        6.0,
        "+Inf bucket equals the count"
    );

    // A resume is counted by outcome.
    let mut resumed = WsClient::connect(&app, &token, &format!("since={first_id}"))
        .await
        .expect("resume");
    assert_eq!(resumed.envelope().await["data"]["resumed"], true);
    assert_eq!(app.metric(REPLAYED).await, 1.0);
    assert_eq!(app.metric(WS).await, 2.0);
    assert_eq!(app.metric(WS_TOTAL).await, 2.0);

    // Nothing identifies a user or a token.
    let (_, text) = app.get("/metrics").await;
    assert!(!text.contains(user), "a metric label carries the user id");
    assert!(!text.contains(&token), "a metric label carries the token");

    // Gauges fall back as clients leave, whichever way they go.
    ws.close().await;
    drop(resumed);
    drop(sse);
    wait_metric_eq(&app, WS, 0.0).await;
    wait_metric_eq(&app, SSE, 0.0).await;
    assert_eq!(app.metric(WS_TOTAL).await, 2.0, "totals never go down");
    assert_eq!(app.metric(SSE_TOTAL).await, 1.0, "totals never go down");
    app.stop().await;
}
