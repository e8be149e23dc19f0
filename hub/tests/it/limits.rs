//! Limits and refusals: inbound frame size, publish body size, per-user and per-node connection
//! caps, publish API validation, and idempotent publishing.

use std::time::Duration;

use serde_json::json;
use test_support::STEP;
use test_support::clients::{SseClient, WsClient};
use tokio::time::Instant;

use crate::helpers::app::{TestApp, spawn_app, spawn_app_with};
use crate::helpers::clients::{assert_json_error, refused_on_both};
use crate::helpers::redis::{redis_prefix, redis_url};

/// Largest client → server WebSocket message (§3.2).
const MAX_INBOUND: usize = 4 * 1024;
/// Largest publish body (§4).
const MAX_BODY: usize = 64 * 1024;

/// A JSON text of exactly `len` bytes with an unknown `type`.
fn unknown_message(len: usize) -> String {
    let head = r#"{"type":"nope","pad":""#;
    let tail = r#""}"#;
    let pad = len
        .checked_sub(head.len() + tail.len())
        .expect("long enough for the JSON frame");
    let text = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(text.len(), len);
    text
}

/// POST /api/publish with a raw body and an optional `Authorization` value.
async fn post_publish(app: &TestApp, authorization: Option<&str>, body: String) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/publish", app.base()))
        .header("content-type", "application/json")
        .body(body);
    if let Some(value) = authorization {
        req = req.header("authorization", value);
    }
    let r = req.send().await.expect("publish request");
    (
        r.status().as_u16(),
        r.text().await.expect("publish response body"),
    )
}

/// Connects over WS, retrying while the cap still counts a connection that is going away.
async fn ws_connect_eventually(app: &TestApp, token: &str) -> WsClient {
    let deadline = Instant::now() + STEP;
    loop {
        match WsClient::connect(app, token, "").await {
            Ok(c) => return c,
            Err(r) => assert!(
                Instant::now() < deadline,
                "still refused after a slot was freed: {} {}",
                r.status,
                r.body
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ws_message_over_4_kib_closes_with_1009_and_smaller_unknown_ones_get_an_error() {
    let app = spawn_app().await;
    let token = app.token("frames");

    // Exactly at the limit: refused politely, the connection stays usable.
    let mut ws = WsClient::connect(&app, &token, "").await.expect("ws");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    ws.send_text(unknown_message(MAX_INBOUND)).await;
    let e = ws.envelope().await;
    assert_eq!(e["type"], "hub.error", "reply to an unknown message: {e}");
    assert!(
        e["data"]["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "hub.error without data.reason: {e}"
    );
    app.publish("frames", "still.open", json!({})).await;
    assert_eq!(
        ws.envelope().await["type"],
        "still.open",
        "the connection stays open after a refused message"
    );

    // One byte over, and well over: closed with 1009.
    for len in [MAX_INBOUND + 1, 5 * 1024] {
        ws.send_text(unknown_message(len)).await;
        assert_eq!(ws.closed().await, Some(1009), "close code for {len} bytes");
        ws = WsClient::connect(&app, &token, "")
            .await
            .expect("reconnect");
        assert_eq!(ws.envelope().await["type"], "hub.connected");
    }
    // Clients leave first, so stopping does not wait out the drain window.
    drop(ws);
    app.stop().await;
}

#[tokio::test]
async fn publish_body_over_64_kib_is_413_and_just_under_is_accepted() {
    let app = spawn_app().await;
    let under = json!({"user_id": "big", "type": "t", "data": {"pad": "x".repeat(MAX_BODY - 100)}});
    assert!(under.to_string().len() <= MAX_BODY);
    let (status, body) = app.publish_raw(&under).await;
    assert_eq!(status, 200, "a body under 64 KiB is accepted: {body}");

    let over = json!({"user_id": "big", "type": "t", "data": {"pad": "x".repeat(65 * 1024)}});
    let (status, body) = app.publish_raw(&over).await;
    assert_eq!(status, 413, "a 65 KiB body: {body}");
    assert!(
        body["error"].is_string(),
        "413 without a JSON error: {body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn per_user_cap_refuses_the_next_connection_with_429_until_one_closes() {
    let app = spawn_app_with(&[("HUB_MAX_CONNECTIONS_PER_USER", "2")]).await;
    let token = app.token("capped");
    let mut ws = WsClient::connect(&app, &token, "").await.expect("first");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    let mut sse = SseClient::connect(&app, &token, "").await.expect("second");
    assert_eq!(sse.event().await.data["type"], "hub.connected");

    refused_on_both(
        &app,
        &token,
        429,
        "user_limit",
        2.0,
        "third connection of one user",
    )
    .await;

    // The cap is per user: someone else still gets in.
    let mut other = WsClient::connect(&app, &app.token("uncapped"), "")
        .await
        .expect("another user is not affected by the first user's cap");
    assert_eq!(other.envelope().await["type"], "hub.connected");

    // Closing one frees its slot.
    ws.close().await;
    let mut again = ws_connect_eventually(&app, &token).await;
    assert_eq!(again.envelope().await["type"], "hub.connected");
    // The two live connections of the capped user both still receive.
    app.publish("capped", "after.cap", json!({})).await;
    assert_eq!(again.envelope().await["type"], "after.cap");
    assert_eq!(sse.event().await.data["type"], "after.cap");
    drop((sse, other, again));
    app.stop().await;
}

#[tokio::test]
async fn node_cap_refuses_the_next_connection_with_503() {
    let app = spawn_app_with(&[("HUB_MAX_CONNECTIONS", "2")]).await;
    let mut a = WsClient::connect(&app, &app.token("node-a"), "")
        .await
        .expect("first");
    assert_eq!(a.envelope().await["type"], "hub.connected");
    let mut b = SseClient::connect(&app, &app.token("node-b"), "")
        .await
        .expect("second");
    assert_eq!(b.event().await.data["type"], "hub.connected");

    let token = app.token("node-c");
    refused_on_both(
        &app,
        &token,
        503,
        "node_limit",
        2.0,
        "connection over the node cap",
    )
    .await;

    a.close().await;
    let mut c = ws_connect_eventually(&app, &token).await;
    assert_eq!(c.envelope().await["type"], "hub.connected");
    drop((b, c));
    app.stop().await;
}

#[tokio::test]
async fn publish_api_refuses_bad_requests_with_json_errors_and_publishes_nothing() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app, &app.token("api-u"), "")
        .await
        .expect("ws");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    let good = json!({"user_id": "api-u", "type": "t", "data": {}}).to_string();
    let bearer = format!("Bearer {}", app.api_key);
    let wrong_key = "0123456789abcdef-not-the-key";
    let wrong = format!("Bearer {wrong_key}");

    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("missing key", None, good.clone(), 401),
        ("wrong key", Some(&wrong), good.clone(), 401),
        (
            "bad JSON",
            Some(&bearer),
            r#"{"user_id": "api-u", "type": "t", "data": {"#.to_owned(),
            400,
        ),
        (
            "missing user_id",
            Some(&bearer),
            json!({"type": "t", "data": {}}).to_string(),
            400,
        ),
        (
            "missing type",
            Some(&bearer),
            json!({"user_id": "api-u", "data": {}}).to_string(),
            400,
        ),
        (
            "missing data",
            Some(&bearer),
            json!({"user_id": "api-u", "type": "t"}).to_string(),
            400,
        ),
        (
            "reserved hub. type",
            Some(&bearer),
            json!({"user_id": "api-u", "type": "hub.connected", "data": {}}).to_string(),
            400,
        ),
    ];
    for (what, auth, body, want) in cases {
        let (status, text) = post_publish(&app, auth, body).await;
        assert_eq!(status, want, "{what}: {text}");
        assert_json_error(&text, what);
        assert!(!text.contains(wrong_key), "{what}: the key is echoed");
    }
    assert_eq!(
        app.metric("hub_notifications_published_total{source=\"api\"}")
            .await,
        0.0,
        "a refused publish was counted"
    );

    // None of the refused publishes reached the user: the next envelope is the marker.
    app.publish("api-u", "marker", json!({})).await;
    assert_eq!(ws.envelope().await["type"], "marker");
    drop(ws);
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_id_and_delivers_once() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app, &app.token("idem"), "")
        .await
        .expect("ws");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    let body = json!({
        "user_id": "idem",
        "type": "order.status",
        "data": {"n": 1},
        "idempotency_key": "evt-42",
    });
    let (s1, first) = app.publish_raw(&body).await;
    let (s2, second) = app.publish_raw(&body).await;
    assert_eq!((s1, s2), (200, 200), "{first} / {second}");
    let id = first["id"].as_str().expect("id in the first answer");
    assert_eq!(
        second["id"].as_str(),
        Some(id),
        "the repeat returns the first id"
    );

    app.publish("idem", "marker", json!({})).await;
    let e = ws.envelope().await;
    assert_eq!(e["type"], "order.status");
    assert_eq!(e["id"].as_str(), Some(id));
    assert_eq!(
        ws.envelope().await["type"],
        "marker",
        "the repeated publish was delivered a second time"
    );
    drop(ws);
    app.stop().await;
}

/// POST /api/publish/batch with a JSON body.
async fn post_batch(app: &TestApp, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/publish/batch", app.base()))
        .bearer_auth(&app.api_key)
        .json(body)
        .send()
        .await
        .expect("batch request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn batch_in_order_with_ids_and_idempotency(app: &TestApp) {
    let mut a = WsClient::connect(app, &app.token("ba"), "")
        .await
        .expect("ws a");
    a.envelope().await;
    let mut b = SseClient::connect(app, &app.token("bb"), "")
        .await
        .expect("sse b");
    b.event().await;
    let items: Vec<serde_json::Value> = (0..300)
        .map(|n| {
            let user = if n % 3 == 0 { "bb" } else { "ba" };
            json!({"user_id": user, "type": "batch", "data": {"n": n}, "idempotency_key": format!("k{n}")})
        })
        .collect();
    let (status, body) = post_batch(app, &json!({"notifications": items})).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = body["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 300);
    // Each user's items arrive in the batch's order, with the ids the answer gave.
    for n in (0..300).filter(|n| n % 3 != 0) {
        let e = a.envelope().await;
        assert_eq!(
            (e["data"]["n"].clone(), e["id"].clone()),
            (json!(n), json!(ids[n]))
        );
    }
    for n in (0..300).filter(|n| n % 3 == 0) {
        let e = b.event().await;
        assert_eq!(
            (e.data["data"]["n"].clone(), e.id.clone()),
            (json!(n), Some(ids[n].clone()))
        );
    }
    // The same keys again: the first ids, nothing published; a new key publishes.
    let again = json!({"notifications": [
        {"user_id": "ba", "type": "batch", "data": {"n": 1}, "idempotency_key": "k1"},
        {"user_id": "ba", "type": "batch", "data": {"n": "new"}, "idempotency_key": "k-new"},
    ]});
    let (status, body) = post_batch(app, &again).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ids"][0], json!(ids[1]));
    assert_eq!(
        a.envelope().await["data"]["n"],
        "new",
        "only the new key was published"
    );
}

#[tokio::test]
async fn batch_publish_keeps_order_ids_and_idempotency_per_item() {
    let app = spawn_app().await;
    batch_in_order_with_ids_and_idempotency(&app).await;
    app.stop().await;
    let app = spawn_app_with(&[
        ("HUB_REDIS_URL", &redis_url()),
        ("HUB_REDIS_PREFIX", &redis_prefix()),
    ])
    .await;
    batch_in_order_with_ids_and_idempotency(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn an_invalid_batch_item_is_named_and_nothing_is_published() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app, &app.token("bv"), "")
        .await
        .expect("ws");
    ws.envelope().await;
    let ok = json!({"user_id": "bv", "type": "t", "data": {}});
    for (bad, index, what) in [
        (
            json!({"user_id": "bv", "type": "hub.x", "data": {}}),
            1,
            "reserved",
        ),
        (
            json!({"user_id": "b}v", "type": "t", "data": {}}),
            1,
            "user_id",
        ),
        (
            json!({"user_id": "bv", "type": "t", "data": "text"}),
            1,
            "object",
        ),
        (json!({"user_id": "bv", "type": "t"}), usize::MAX, "data"),
    ] {
        let (status, body) = post_batch(&app, &json!({"notifications": [ok, bad, ok]})).await;
        assert_eq!(status, 400, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        if index != usize::MAX {
            assert!(
                error.starts_with(&format!("notifications[{index}]")),
                "{error}"
            );
        }
        assert!(error.contains(what), "{error}");
    }
    // Limits: more than 1 000 items, or a body over 1 MiB → 413; no key → 401.
    let many: Vec<_> = (0..1001).map(|_| ok.clone()).collect();
    assert_eq!(
        post_batch(&app, &json!({"notifications": many})).await.0,
        413
    );
    let big = json!({"notifications": [{"user_id": "bv", "type": "t", "data": {"pad": "x".repeat(1100 * 1024)}}]});
    assert_eq!(post_batch(&app, &big).await.0, 413);
    let r = reqwest::Client::new()
        .post(format!("{}/api/publish/batch", app.base()))
        .json(&json!({"notifications": [ok]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    // Nothing of the refused batches arrived: the next notification is this one.
    app.publish("bv", "marker", json!({})).await;
    assert_eq!(ws.envelope().await["type"], "marker");
    app.stop().await;
}
