//! Isolation: every connection receives exactly its own user's notifications.

use std::collections::HashMap;

use serde_json::json;
use test_support::clients::{SseClient, WsClient};

use crate::helpers::app::spawn_app_with;

#[tokio::test]
async fn two_hundred_users_on_both_transports_get_only_their_own() {
    const USERS: usize = 200;
    const EACH: u64 = 5;
    let app = spawn_app_with(&[("HUB_MAX_CONNECTIONS_PER_USER", "4")]).await;
    let mut ws = Vec::new();
    let mut sse = Vec::new();
    for u in 0..USERS {
        let user = format!("iso-{u}");
        let token = app.token(&user);
        let mut w = WsClient::connect(&app, &token, "").await.expect("ws");
        assert_eq!(w.envelope().await["data"]["user"], user.as_str());
        ws.push((user.clone(), w));
        let mut s = SseClient::connect(&app, &token, "").await.expect("sse");
        assert_eq!(s.event().await.data["data"]["user"], user.as_str());
        sse.push((user, s));
    }
    // Interleave users so that any cross-delivery would show up.
    for n in 1..=EACH {
        for u in 0..USERS {
            app.publish(
                &format!("iso-{u}"),
                "iso",
                json!({"to": format!("iso-{u}"), "n": n}),
            )
            .await;
        }
    }
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (user, client) in &mut ws {
        for n in 1..=EACH {
            let e = client.envelope().await;
            assert_eq!(
                e["data"]["to"],
                user.as_str(),
                "WS of {user} got someone else's"
            );
            assert_eq!(e["data"]["n"], n, "WS of {user} out of order");
            *seen.entry(format!("ws:{user}")).or_default() += 1;
        }
    }
    for (user, client) in &mut sse {
        for n in 1..=EACH {
            let e = client.event().await;
            assert_eq!(
                e.data["data"]["to"],
                user.as_str(),
                "SSE of {user} got someone else's"
            );
            assert_eq!(e.data["data"]["n"], n);
            assert_eq!(
                e.id.as_deref(),
                e.data["id"].as_str(),
                "SSE id line matches the envelope id"
            );
        }
    }
    // Nothing extra arrives: a marker published last is each client's very next message.
    for u in 0..USERS {
        app.publish(&format!("iso-{u}"), "marker", json!({})).await;
    }
    for (_, client) in &mut ws {
        assert_eq!(client.envelope().await["type"], "marker");
    }
    for (_, client) in &mut sse {
        assert_eq!(client.event().await.data["type"], "marker");
    }
    assert_eq!(seen.len(), USERS);
    app.stop().await;
}
