//! Token expiry closes the connection (WS 4001, SSE end of stream) unless a WS refresh for the
//! same user extends it; a refresh for another user is refused with 4003.

use serde_json::json;
use test_support::clients::{SseClient, WsClient};

use crate::helpers::app::spawn_app;
use crate::helpers::tokens::{hs256, now_s};

#[tokio::test]
async fn ws_closes_at_exp_with_4001() {
    let app = spawn_app().await;
    let token = hs256(&app.secret, &json!({"sub": "e1", "exp": now_s() + 2}));
    let started = std::time::Instant::now();
    let mut ws = WsClient::connect(&app, &token, "").await.expect("ws");
    ws.envelope().await;
    assert_eq!(ws.closing("expired").await, Some(4001));
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    app.stop().await;
}

#[tokio::test]
async fn sse_stream_ends_at_exp() {
    let app = spawn_app().await;
    let token = hs256(&app.secret, &json!({"sub": "e2", "exp": now_s() + 2}));
    let mut sse = SseClient::connect(&app, &token, "").await.expect("sse");
    sse.event().await;
    sse.closing("expired").await;
    app.stop().await;
}

#[tokio::test]
async fn refresh_for_the_same_user_keeps_the_connection() {
    let app = spawn_app().await;
    let short = hs256(&app.secret, &json!({"sub": "e3", "exp": now_s() + 2}));
    let mut ws = WsClient::connect(&app, &short, "").await.expect("ws");
    ws.envelope().await;
    let exp = now_s() + 600;
    let long = hs256(&app.secret, &json!({"sub": "e3", "exp": exp}));
    ws.send_text(json!({"type": "refresh", "token": long}).to_string())
        .await;
    let refreshed = ws.envelope().await;
    assert_eq!(refreshed["type"], "hub.refreshed");
    assert_eq!(refreshed["data"]["exp"], exp, "the new expiry");
    // Past the first token's expiry the connection still delivers.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    app.publish("e3", "t", json!({"after": "refresh"})).await;
    let e = ws.envelope().await;
    assert_eq!(e["data"]["after"], "refresh");
    app.stop().await;
}

#[tokio::test]
async fn refresh_for_another_user_or_invalid_is_refused_with_4003() {
    let app = spawn_app().await;
    for bad in [
        hs256(
            &app.secret,
            &json!({"sub": "someone-else", "exp": now_s() + 600}),
        ),
        hs256(&app.secret, &json!({"sub": "e4", "exp": now_s() - 100})),
        "garbage".to_owned(),
    ] {
        let mut ws = WsClient::connect(&app, &app.token("e4"), "")
            .await
            .expect("ws");
        ws.envelope().await;
        ws.send_text(json!({"type": "refresh", "token": bad}).to_string())
            .await;
        assert_eq!(ws.closed().await, Some(4003));
    }
    app.stop().await;
}
