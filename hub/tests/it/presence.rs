//! Presence (`GET /api/presence/users/{user_id}`): a user's connections counted over every
//! node, on the embedded backplane, on Redis and on a Redis Cluster; a closed connection
//! leaves within 2 s and a dead node's connections within its presence timeout.

use std::time::Duration;

use serde_json::{Value, json};
use test_support::STEP;
use test_support::clients::{SseClient, WsClient};
use test_support::process::Signal;
use test_support::wait::Deadline;

use crate::helpers::app::{Credentials, TestApp, spawn_app, wait_status};
use crate::helpers::processes::HubProcess;
use crate::helpers::redis::{redis_cluster_urls, redis_prefix, redis_url};

/// The presence answer for `user` on `app`.
async fn presence(app: &TestApp, user: &str) -> Value {
    let (status, body) = app.get_api(&format!("/api/presence/users/{user}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until `app` reports `want` connections of `user`, within `limit`.
async fn wait_presence(app: &TestApp, user: &str, want: u64, limit: Duration) {
    let deadline = Deadline::after(limit);
    loop {
        let got = presence(app, user).await;
        if got["connections"] == want {
            assert_eq!(got["online"], want > 0, "{got}");
            return;
        }
        deadline
            .retry_every(Duration::from_millis(50), || {
                format!("{user}: {got} on {}, wanted {want}", app.base())
            })
            .await;
    }
}

#[tokio::test]
async fn presence_counts_a_users_connections_on_one_node() {
    let app = spawn_app().await;
    let unknown = presence(&app, "nobody").await;
    assert_eq!(unknown, json!({"online": false, "connections": 0}));

    let mut ws = WsClient::connect(&app, &app.token("here"), "")
        .await
        .expect("ws");
    ws.envelope().await;
    let mut sse = SseClient::connect(&app, &app.token("here"), "")
        .await
        .expect("sse");
    sse.event().await;
    assert_eq!(
        presence(&app, "here").await,
        json!({"online": true, "connections": 2})
    );
    ws.close().await;
    wait_presence(&app, "here", 1, Duration::from_secs(2)).await;

    // Without the API key: 401; a user id the hub never accepts: 400.
    let (status, _) = app.get("/api/presence/users/here").await;
    assert_eq!(status, 401);
    let (status, body) = app.get_api("/api/presence/users/a%7Db").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("user_id")),
        "{body}"
    );
    drop(sse);
    app.stop().await;
}

/// Two nodes on `env`: a user's connections on both are counted on both, a closed one
/// leaves within 2 s, and a killed node's within its presence timeout (2 s here).
async fn presence_over_two_nodes(env: &[(&str, &str)]) {
    let creds = Credentials::random();
    let a = HubProcess::start_with_credentials(&creds, env).await;
    let mut b = HubProcess::start_with_credentials(&creds, env).await;
    let (a_app, b_app) = (a.as_app(), b.as_app());
    wait_status(&a_app, "/readyz", 200, STEP).await;
    wait_status(&b_app, "/readyz", 200, STEP).await;

    let mut on_a = WsClient::connect(&a_app, &a_app.token("roamer"), "")
        .await
        .expect("ws on A");
    on_a.envelope().await;
    let mut on_b = WsClient::connect(&b_app, &b_app.token("roamer"), "")
        .await
        .expect("ws on B");
    on_b.envelope().await;
    let mut sse_on_b = SseClient::connect(&b_app, &b_app.token("roamer"), "")
        .await
        .expect("sse on B");
    sse_on_b.event().await;
    for node in [&a_app, &b_app] {
        wait_presence(node, "roamer", 3, Duration::from_secs(2)).await;
        assert!(node.metric("hub_presence_reports_total").await >= 1.0);
    }
    on_b.close().await;
    for node in [&a_app, &b_app] {
        wait_presence(node, "roamer", 2, Duration::from_secs(2)).await;
    }
    // B dies without a word: its SSE connection leaves presence once B's heartbeat is
    // older than the presence timeout.
    b.signal(Signal::SIGKILL);
    b.wait_exit(STEP).await;
    wait_presence(&a_app, "roamer", 1, Duration::from_secs(5)).await;
    drop(sse_on_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_redis_counts_every_node_and_forgets_a_dead_one() {
    let (url, prefix) = (redis_url(), redis_prefix());
    presence_over_two_nodes(&[
        ("HUB_REDIS_URL", &url),
        ("HUB_REDIS_PREFIX", &prefix),
        ("HUB_PRESENCE_TIMEOUT", "2s"),
        ("HUB_LOG", "warn"),
    ])
    .await;
    // Each node's presence keys expire unless it rewrites them: a dead node's (the killed
    // one's among them) go by themselves, and no reader has to skip past them for ever.
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:p:*"))
        .query(&mut conn)
        .expect("KEYS");
    assert!(!keys.is_empty(), "presence keys written");
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).expect("PTTL");
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_a_redis_cluster_counts_every_node_and_forgets_a_dead_one() {
    let (urls, prefix) = (redis_cluster_urls(), redis_prefix());
    presence_over_two_nodes(&[
        ("HUB_REDIS_CLUSTER_URLS", &urls),
        ("HUB_REDIS_PREFIX", &prefix),
        ("HUB_PRESENCE_TIMEOUT", "2s"),
        ("HUB_LOG", "warn"),
    ])
    .await;
}
