//! Resume: every missed notification once, in order, then live ones with no gap or duplicate at
//! the seam, across transports; or `hub.gap` first when the resume point is gone.

use serde_json::{Value, json};
use test_support::clients::{SseClient, WsClient};

use crate::helpers::app::{spawn_app, spawn_app_with};

fn n_of(v: &Value) -> u64 {
    v["data"]["n"].as_u64().expect("n")
}

#[tokio::test]
async fn ws_to_sse_resume_is_lossless_and_duplicate_free() {
    let app = spawn_app().await;
    let token = app.token("r1");
    let mut ws = WsClient::connect(&app, &token, "").await.expect("ws");
    let hello = ws.envelope().await;
    assert_eq!(hello["data"]["resumed"], false);
    for n in 1..=5 {
        app.publish("r1", "t", json!({"n": n})).await;
    }
    let mut last = String::new();
    for n in 1..=3 {
        let e = ws.envelope().await;
        assert_eq!(n_of(&e), n);
        last = e["id"].as_str().expect("id").to_owned();
    }
    // The client drops having seen 3 of 5; more are published while it is away.
    drop(ws);
    for n in 6..=10 {
        app.publish("r1", "t", json!({"n": n})).await;
    }
    let mut sse = SseClient::connect_with(
        &app,
        &format!("/sse?token={token}"),
        &[("Last-Event-ID", &last)],
    )
    .await
    .expect("sse resume");
    let hello = sse.event().await;
    assert_eq!(hello.data["type"], "hub.connected");
    assert_eq!(hello.data["data"]["resumed"], true);
    assert!(hello.id.is_none(), "control events carry no id");
    // Live notifications published while replay is being written must not double up.
    let publisher = {
        let app_base = app.base();
        let key = app.api_key.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 11..=20 {
                let r = http
                    .post(format!("{app_base}/api/publish"))
                    .bearer_auth(&key)
                    .json(&json!({"user_id": "r1", "type": "t", "data": {"n": n}}))
                    .send()
                    .await
                    .expect("publish");
                assert!(r.status().is_success());
            }
        })
    };
    for n in 4..=20 {
        let e = sse.event().await;
        assert_eq!(
            n_of(&e.data),
            n,
            "resume out of order or with a gap/duplicate"
        );
        assert_eq!(e.id.as_deref(), e.data["id"].as_str());
    }
    publisher.await.expect("publisher");
    app.publish("r1", "end", json!({})).await;
    assert_eq!(sse.event().await.data["type"], "end");
    app.stop().await;
}

#[tokio::test]
async fn sse_to_ws_resume_with_query_parameters() {
    let app = spawn_app().await;
    let token = app.token("r2");
    let mut sse = SseClient::connect(&app, &token, "").await.expect("sse");
    sse.event().await;
    for n in 1..=4 {
        app.publish("r2", "t", json!({"n": n})).await;
    }
    let mut last = None;
    for n in 1..=2 {
        let e = sse.event().await;
        assert_eq!(n_of(&e.data), n);
        last = e.id;
    }
    drop(sse);
    let last = last.expect("id");
    let mut ws = WsClient::connect(&app, &token, &format!("since={last}"))
        .await
        .expect("ws");
    assert_eq!(ws.envelope().await["data"]["resumed"], true);
    for n in 3..=4 {
        assert_eq!(n_of(&ws.envelope().await), n);
    }
    app.publish("r2", "t", json!({"n": 5})).await;
    assert_eq!(n_of(&ws.envelope().await), 5);
    // And an EventSource's first connect can pass the id in the query.
    let mut again = SseClient::connect(&app, &token, &format!("last_event_id={last}"))
        .await
        .expect("sse");
    assert_eq!(again.event().await.data["data"]["resumed"], true);
    for n in 3..=5 {
        assert_eq!(n_of(&again.event().await.data), n);
    }
    app.wait_metric("hub_resumes_total{outcome=\"replayed\"}", 2.0)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn a_resume_point_older_than_history_gets_gap_first() {
    let app = spawn_app_with(&[("HUB_HISTORY_SIZE", "5")]).await;
    let token = app.token("r3");
    let first = app.publish("r3", "t", json!({"n": 1})).await;
    for n in 2..=12 {
        app.publish("r3", "t", json!({"n": n})).await;
    }
    let mut ws = WsClient::connect(&app, &token, &format!("since={first}"))
        .await
        .expect("ws");
    let hello = ws.envelope().await;
    assert_eq!(hello["type"], "hub.connected");
    assert_eq!(hello["data"]["resumed"], false);
    assert_eq!(
        ws.envelope().await["type"],
        "hub.gap",
        "gap before any replay"
    );
    // Then what history still holds, in order.
    for n in 8..=12 {
        assert_eq!(n_of(&ws.envelope().await), n);
    }
    // An id this hub never issued (another node's, or garbage) is a gap too.
    let mut sse = SseClient::connect_with(
        &app,
        &format!("/sse?token={token}"),
        &[("Last-Event-ID", "not-an-id")],
    )
    .await
    .expect("sse");
    sse.event().await;
    assert_eq!(sse.event().await.data["type"], "hub.gap");
    app.wait_metric("hub_resumes_total{outcome=\"gap\"}", 2.0)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn resume_with_nothing_missed_replays_nothing() {
    let app = spawn_app().await;
    let token = app.token("r4");
    let id = app.publish("r4", "t", json!({"n": 1})).await;
    let mut ws = WsClient::connect(&app, &token, &format!("since={id}"))
        .await
        .expect("ws");
    assert_eq!(ws.envelope().await["data"]["resumed"], true);
    app.publish("r4", "t", json!({"n": 2})).await;
    assert_eq!(n_of(&ws.envelope().await), 2);
    app.stop().await;
}
