//! Channels (contract §8): grants by the token's `channels` claim and by a WebSocket
//! `subscribe` with a channel token; isolation; publishing by HTTP to a channel on every node;
//! the one cursor resuming every stream of a connection across a disconnect and a node
//! change, on WS and SSE; a lost channel history's own `hub.gap`; channel presence over two
//! nodes and a killed node; limits and refusals.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use test_support::STEP;
use test_support::clients::{SseClient, WsClient};
use test_support::process::Signal;
use test_support::wait::Deadline;

use crate::helpers::app::{Credentials, TestApp, spawn_app_with, wait_status};
use crate::helpers::processes::HubProcess;
use crate::helpers::redis::{RedisServer, redis_cluster_urls, redis_prefix, redis_url};
use crate::helpers::tokens::{hs256, now_s};

/// A token of `user` whose connection follows `channels`.
fn channels_token(app: &TestApp, user: &str, channels: &[&str]) -> String {
    hs256(
        &app.secret,
        &json!({"sub": user, "exp": now_s() + 600, "channels": channels}),
    )
}

/// A token of `user` granting a WebSocket `subscribe` to `channel`.
fn channel_token(app: &TestApp, user: &str, channel: &str) -> String {
    hs256(
        &app.secret,
        &json!({"sub": user, "exp": now_s() + 600, "channel": channel}),
    )
}

/// Publishes `{"n": n}` of type `t` to a channel; returns the id.
async fn to_channel(app: &TestApp, channel: &str, n: u64) -> String {
    let (status, body) = app
        .publish_raw(&json!({"channel": channel, "type": "t", "data": {"n": n}}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// Publishes `{"n": n}` of type `t` to a user.
async fn to_user(app: &TestApp, user: &str, n: u64) {
    app.publish(user, "t", json!({"n": n})).await;
}

/// A delivered notification as the tests compare them: (channel or "", n).
fn key(v: &Value) -> (String, u64) {
    (
        v["channel"].as_str().unwrap_or_default().to_owned(),
        v["data"]["n"].as_u64().expect("n"),
    )
}

/// One client, either transport, reading envelopes.
enum Client {
    Ws(WsClient),
    Sse(SseClient),
}

impl Client {
    async fn connect(app: &TestApp, token: &str, sse: bool, resume: Option<&str>) -> Client {
        if sse {
            let path = format!("/sse?token={token}");
            let headers: Vec<(&str, &str)> =
                resume.map(|r| ("Last-Event-ID", r)).into_iter().collect();
            Client::Sse(
                SseClient::connect_with(app, &path, &headers)
                    .await
                    .expect("sse"),
            )
        } else {
            let extra = resume.map(|r| format!("since={r}")).unwrap_or_default();
            Client::Ws(WsClient::connect(app, token, &extra).await.expect("ws"))
        }
    }

    /// The next envelope, with the SSE `id:` line checked against the envelope's id.
    async fn envelope(&mut self) -> Value {
        match self {
            Client::Ws(ws) => ws.envelope().await,
            Client::Sse(sse) => {
                let e = sse.event().await;
                assert_eq!(
                    e.id.as_deref(),
                    e.data["id"].as_str(),
                    "the SSE id line is the envelope's id"
                );
                e.data
            }
        }
    }

    /// The next `n` notifications (no control message among them).
    async fn notes(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self.envelope().await;
            assert!(
                !v["type"].as_str().unwrap_or_default().starts_with("hub."),
                "control message {v} among notifications"
            );
            out.push(v);
        }
        out
    }
}

/// Checks that `got` holds exactly `want` (as (channel, n)), each once, in each stream's
/// order; the streams may interleave.
fn same_per_stream(got: &[Value], want: &[(&str, u64)]) {
    let got: Vec<(String, u64)> = got.iter().map(key).collect();
    let mut streams: Vec<&str> = got.iter().map(|(c, _)| c.as_str()).collect();
    streams.extend(want.iter().map(|(c, _)| *c));
    streams.sort_unstable();
    streams.dedup();
    for stream in streams {
        let g: Vec<u64> = got
            .iter()
            .filter(|(c, _)| c == stream)
            .map(|(_, n)| *n)
            .collect();
        let w: Vec<u64> = want
            .iter()
            .filter(|(c, _)| *c == stream)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(g, w, "stream {stream:?}: got {got:?}");
    }
    assert_eq!(got.len(), want.len(), "{got:?}");
}

async fn channel_presence(app: &TestApp, channel: &str) -> Value {
    let (status, body) = app
        .get_api(&format!("/api/presence/channels/{channel}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_channel_presence(app: &TestApp, channel: &str, users: &[&str], limit: Duration) {
    let deadline = Deadline::after(limit);
    loop {
        let got = channel_presence(app, channel).await;
        if got == json!({"users": users, "count": users.len()}) {
            return;
        }
        deadline
            .retry_every(Duration::from_millis(50), || {
                format!("{channel}: {got} on {}, wanted {users:?}", app.base())
            })
            .await;
    }
}

fn redis_env<'a>(url: &'a str, prefix: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("HUB_REDIS_URL", url),
        ("HUB_REDIS_PREFIX", prefix),
        ("HUB_PRESENCE_TIMEOUT", "2s"),
        ("HUB_LOG", "warn"),
    ]
}

fn cluster_env<'a>(urls: &'a str, prefix: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("HUB_REDIS_CLUSTER_URLS", urls),
        ("HUB_REDIS_PREFIX", prefix),
        ("HUB_PRESENCE_TIMEOUT", "2s"),
        ("HUB_LOG", "warn"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_reaches_its_subscribers_on_every_node_once_and_no_one_else() {
    let (url, prefix) = (redis_url(), redis_prefix());
    channel_over_two_nodes(&redis_env(&url, &prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_channel_reaches_its_subscribers_on_every_node() {
    let (urls, prefix) = (redis_cluster_urls(), redis_prefix());
    channel_over_two_nodes(&cluster_env(&urls, &prefix)).await;
}

/// Two nodes on `env`: three connections (one WS with a channel, one SSE with two, one
/// WS without any), channel publishes by single and batch requests through both nodes;
/// each connection gets exactly its streams; presence of the channels over both nodes and
/// after one is killed.
async fn channel_over_two_nodes(env: &[(&str, &str)]) {
    let creds = Credentials::random();
    let a = HubProcess::start_with_credentials(&creds, env).await;
    let mut b = HubProcess::start_with_credentials(&creds, env).await;
    let (a_app, b_app) = (a.as_app(), b.as_app());
    wait_status(&a_app, "/readyz", 200, STEP).await;
    wait_status(&b_app, "/readyz", 200, STEP).await;

    let mut alice = Client::connect(
        &a_app,
        &channels_token(&a_app, "alice", &["news"]),
        false,
        None,
    )
    .await;
    let hello = alice.envelope().await;
    assert_eq!(hello["type"], "hub.connected");
    assert_eq!(hello["data"]["channels"], json!(["news"]));
    let mut bob = Client::connect(
        &b_app,
        &channels_token(&b_app, "bob", &["news", "room:1"]),
        true,
        None,
    )
    .await;
    assert_eq!(bob.envelope().await["type"], "hub.connected");
    let mut carol = Client::connect(&b_app, &b_app.token("carol"), false, None).await;
    assert_eq!(carol.envelope().await["type"], "hub.connected");

    // Single publishes through A, a mixed batch through B.
    for n in 0..5 {
        to_channel(&a_app, "news", n).await;
        to_channel(&a_app, "room:1", n).await;
        to_user(&a_app, "carol", n).await;
    }
    let batch = json!({"notifications": [
        {"channel": "news", "type": "t", "data": {"n": 5}},
        {"user_id": "carol", "type": "t", "data": {"n": 5}},
        {"channel": "room:1", "type": "t", "data": {"n": 5}},
    ]});
    let (status, body) = b_app.post_api("/api/publish/batch", &batch).await;
    assert_eq!(status, 200, "{body}");
    // A last personal notification to each, so "nothing else before it" is checked too.
    for user in ["alice", "bob", "carol"] {
        to_user(&b_app, user, 99).await;
    }

    let news: Vec<(&str, u64)> = (0..6).map(|n| ("news", n)).collect();
    let got = alice.notes(7).await;
    same_per_stream(&got, &[news.clone(), vec![("", 99)]].concat());
    for v in &got[..6] {
        let id = v["id"].as_str().expect("id");
        assert!(
            id.contains('.'),
            "a connection with channels sees its cursor: {id}"
        );
    }
    let room: Vec<(&str, u64)> = (0..6).map(|n| ("room:1", n)).collect();
    same_per_stream(&bob.notes(13).await, &[news, room, vec![("", 99)]].concat());
    let mine: Vec<(&str, u64)> = (0..6).chain([99]).map(|n| ("", n)).collect();
    let got = carol.notes(7).await;
    same_per_stream(&got, &mine);
    assert!(
        !got[0]["id"].as_str().expect("id").contains('.'),
        "a connection without channels keeps plain ids"
    );

    // Presence: both nodes see both users in news, only bob in room:1.
    for node in [&a_app, &b_app] {
        wait_channel_presence(node, "news", &["alice", "bob"], Duration::from_secs(2)).await;
        wait_channel_presence(node, "room:1", &["bob"], Duration::from_secs(2)).await;
    }
    drop(alice);
    for node in [&a_app, &b_app] {
        wait_channel_presence(node, "news", &["bob"], Duration::from_secs(2)).await;
    }
    // B dies: its subscribers leave once its heartbeat is older than the presence timeout.
    b.signal(Signal::SIGKILL);
    b.wait_exit(STEP).await;
    wait_channel_presence(&a_app, "news", &[], Duration::from_secs(5)).await;
    assert!(a_app.metric("hub_presence_reports_total").await >= 1.0);
    drop((bob, carol));
}

/// The one cursor: notifications of the personal stream and two channels interleaved, a
/// disconnect, more of each while away, a reconnect to the other node with the last id (and
/// with an earlier one): each missed notification once, in its stream's order, then live.
async fn one_cursor_resumes_every_stream(env: &[(&str, &str)], sse: bool) {
    let creds = Credentials::random();
    let a = HubProcess::start_with_credentials(&creds, env).await;
    let b = HubProcess::start_with_credentials(&creds, env).await;
    let (a_app, b_app) = (a.as_app(), b.as_app());
    wait_status(&a_app, "/readyz", 200, STEP).await;
    wait_status(&b_app, "/readyz", 200, STEP).await;
    let user = "dave";
    let token = channels_token(&a_app, user, &["c1", "c2"]);

    let mut first = Client::connect(&a_app, &token, sse, None).await;
    assert_eq!(first.envelope().await["type"], "hub.connected");
    to_user(&b_app, user, 0).await;
    to_channel(&b_app, "c1", 0).await;
    to_channel(&b_app, "c2", 0).await;
    to_user(&b_app, user, 1).await;
    to_channel(&b_app, "c1", 1).await;
    let seen = first.notes(5).await;
    same_per_stream(&seen, &[("", 0), ("c1", 0), ("c2", 0), ("", 1), ("c1", 1)]);
    let last = seen[4]["id"].as_str().expect("id").to_owned();
    let third = seen[2]["id"].as_str().expect("id").to_owned();
    drop(first);

    to_channel(&b_app, "c2", 1).await;
    to_user(&b_app, user, 2).await;
    to_channel(&b_app, "c1", 2).await;
    to_channel(&b_app, "c2", 2).await;
    to_user(&b_app, user, 3).await;
    let missed = [("c2", 1), ("", 2), ("c1", 2), ("c2", 2), ("", 3)];

    let mut back = Client::connect(&b_app, &token, sse, Some(&last)).await;
    let hello = back.envelope().await;
    assert_eq!(hello["type"], "hub.connected");
    assert_eq!(hello["data"]["resumed"], true, "{hello}");
    same_per_stream(&back.notes(5).await, &missed);
    // Live after the replay, with no duplicate at the seam.
    to_user(&a_app, user, 4).await;
    to_channel(&a_app, "c1", 3).await;
    same_per_stream(&back.notes(2).await, &[("", 4), ("c1", 3)]);
    drop(back);

    // Any envelope's id resumes every stream: from the third one, everything after it.
    let mut again = Client::connect(&a_app, &token, sse, Some(&third)).await;
    assert_eq!(again.envelope().await["type"], "hub.connected");
    let want = [
        ("", 1),
        ("c1", 1),
        ("c2", 1),
        ("", 2),
        ("c1", 2),
        ("c2", 2),
        ("", 3),
        ("", 4),
        ("c1", 3),
    ];
    same_per_stream(&again.notes(want.len()).await, &want);
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cursor_resumes_every_stream_over_websocket() {
    let (url, prefix) = (redis_url(), redis_prefix());
    one_cursor_resumes_every_stream(&redis_env(&url, &prefix), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cursor_resumes_every_stream_over_sse() {
    let (url, prefix) = (redis_url(), redis_prefix());
    one_cursor_resumes_every_stream(&redis_env(&url, &prefix), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_one_cursor_resumes_every_stream() {
    let (urls, prefix) = (redis_cluster_urls(), redis_prefix());
    one_cursor_resumes_every_stream(&cluster_env(&urls, &prefix), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_subscribers_get_everything_once_across_pubsub_connection_losses() {
    const PER_CHANNEL: u64 = 200;
    let redis = RedisServer::start().await;
    let (url, prefix) = (redis.url(), redis_prefix());
    let node = HubProcess::start(&redis_env(&url, &prefix)).await;
    let app = Arc::new(node.as_app());
    wait_status(&app, "/readyz", 200, STEP).await;
    let mut readers = Vec::new();
    for i in 0..6 {
        let token = channels_token(&app, &format!("reader{i}"), &["burst", "side"]);
        let mut c = Client::connect(&app, &token, i % 2 == 1, None).await;
        assert_eq!(c.envelope().await["type"], "hub.connected");
        readers.push(tokio::spawn(async move {
            let want = 2 * PER_CHANNEL as usize;
            c.notes(want).await
        }));
    }
    let published = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = ["burst", "side"]
        .into_iter()
        .map(|channel| {
            let (app, published) = (app.clone(), published.clone());
            tokio::spawn(async move {
                for n in 0..PER_CHANNEL {
                    to_channel(&app, channel, n).await;
                    published.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for k in 1..=2u64 {
        let deadline = Deadline::after(STEP);
        while published.load(Ordering::SeqCst) < k * 2 * PER_CHANNEL / 3 {
            deadline.retry(|| "the burst progressed").await;
        }
        let killed = redis
            .cmd(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .expect("CLIENT KILL");
        assert_eq!(
            killed,
            redis::Value::Int(1),
            "the node's pub/sub connection"
        );
        app.wait_metric("hub_backplane_reconnects_total", k as f64)
            .await;
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    let want: Vec<(&str, u64)> = (0..PER_CHANNEL)
        .flat_map(|n| [("burst", n), ("side", n)])
        .collect();
    for r in readers {
        same_per_stream(&r.await.expect("reader"), &want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_history_was_lost_gets_its_own_gap_and_the_other_streams_none() {
    let (url, prefix) = (redis_url(), redis_prefix());
    let app = spawn_app_with(&redis_env(&url, &prefix)).await;
    let token = channels_token(&app, "frank", &["g1", "c1"]);
    let mut ws = Client::connect(&app, &token, false, None).await;
    ws.envelope().await;
    to_channel(&app, "g1", 0).await;
    to_channel(&app, "c1", 0).await;
    to_user(&app, "frank", 0).await;
    let seen = ws.notes(3).await;
    let last = seen[2]["id"].as_str().expect("id").to_owned();
    drop(ws);
    // g1's history is lost (as when Redis loses it); the others are intact.
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:m:{{{{g1}}"))
        .arg(format!("{prefix}:h:{{{{g1}}"))
        .query(&mut conn)
        .expect("DEL");
    to_channel(&app, "g1", 1).await;
    to_channel(&app, "c1", 1).await;
    to_user(&app, "frank", 1).await;

    let mut back = Client::connect(&app, &token, false, Some(&last)).await;
    let hello = back.envelope().await;
    assert_eq!(
        hello["data"]["resumed"], true,
        "the personal stream resumed: {hello}"
    );
    let mut got = Vec::new();
    let mut gaps = Vec::new();
    while got.len() < 3 {
        let v = back.envelope().await;
        if v["type"] == "hub.gap" {
            assert!(
                got.iter().all(|g: &Value| g["channel"] != "g1"),
                "the gap comes before the channel's replay"
            );
            gaps.push(v["data"]["channel"].clone());
        } else {
            got.push(v);
        }
    }
    assert_eq!(gaps, vec![json!("g1")], "one gap, naming the channel");
    same_per_stream(&got, &[("g1", 1), ("c1", 1), ("", 1)]);
    app.wait_metric("hub_resumes_total{outcome=\"gap\"}", 1.0)
        .await;
}

#[tokio::test]
async fn a_websocket_subscribe_needs_a_token_of_its_user_granting_the_channel() {
    let app = spawn_app_with(&[("HUB_MAX_CHANNELS_PER_CONNECTION", "2")]).await;
    subscribe_scenario(&app, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_two_nodes_a_websocket_subscribe_follows_publishes_of_the_other_and_resumes_there() {
    let (url, prefix) = (redis_url(), redis_prefix());
    let mut env = redis_env(&url, &prefix);
    env.push(("HUB_MAX_CHANNELS_PER_CONNECTION", "2"));
    let creds = Credentials::random();
    let a = HubProcess::start_with_credentials(&creds, &env).await;
    let b = HubProcess::start_with_credentials(&creds, &env).await;
    let (a_app, b_app) = (a.as_app(), b.as_app());
    wait_status(&a_app, "/readyz", 200, STEP).await;
    wait_status(&b_app, "/readyz", 200, STEP).await;
    subscribe_scenario(&a_app, &b_app).await;
}

/// WebSocket `subscribe` and `unsubscribe` on a connection to `app`, with publishes (and
/// presence reads) through `other`, and the reconnect to `other`: the grant rules, isolation,
/// the per-connection limit, and a channel joined by `subscribe` resumed from the cursor when
/// it is subscribed again on the new connection.
async fn subscribe_scenario(app: &TestApp, other: &TestApp) {
    let mut ws = WsClient::connect(app, &app.token("eve"), "")
        .await
        .expect("ws");
    ws.envelope().await;
    let ask = async |ws: &mut WsClient, msg: Value| -> Value {
        ws.send_text(msg.to_string()).await;
        ws.envelope().await
    };
    let refused = [
        (json!({"type": "subscribe", "channel": "news"}), "token"),
        (
            json!({"type": "subscribe", "channel": "news", "token": channel_token(app, "mallory", "news")}),
            "another user",
        ),
        (
            json!({"type": "subscribe", "channel": "news", "token": channel_token(app, "eve", "other")}),
            "does not grant",
        ),
        (
            json!({"type": "subscribe", "channel": "news", "token": "not.a.jwt"}),
            "refused",
        ),
        (
            json!({"type": "subscribe", "channel": "a b", "token": channel_token(app, "eve", "news")}),
            "channel name",
        ),
        (
            json!({"type": "unsubscribe", "channel": "news"}),
            "not subscribed",
        ),
    ];
    for (msg, why) in refused {
        let reply = ask(&mut ws, msg.clone()).await;
        assert_eq!(reply["type"], "hub.error", "{msg} → {reply}");
        assert!(
            reply["data"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(why)),
            "{msg} → {reply}"
        );
    }
    // Nothing of a channel reaches a connection without a grant.
    to_channel(other, "news", 0).await;
    to_user(other, "eve", 0).await;
    assert_eq!(key(&ws.envelope().await), (String::new(), 0));

    let ok = ask(
        &mut ws,
        json!({"type": "subscribe", "channel": "news", "token": channel_token(app, "eve", "news")}),
    )
    .await;
    assert_eq!(ok["type"], "hub.subscribed", "{ok}");
    assert_eq!(ok["data"]["channel"], "news");
    assert!(ok.get("id").is_none(), "control messages carry no id");
    to_channel(other, "news", 1).await;
    let v = ws.envelope().await;
    assert_eq!(key(&v), ("news".to_owned(), 1));
    assert!(v["id"].as_str().is_some_and(|id| id.contains('.')), "{v}");
    wait_channel_presence(other, "news", &["eve"], Duration::from_secs(2)).await;

    // The limit: two channels per connection here.
    let n2 = ask(
        &mut ws,
        json!({"type": "subscribe", "channel": "n2", "token": channel_token(app, "eve", "n2")}),
    )
    .await;
    assert_eq!(n2["type"], "hub.subscribed");
    let over = ask(
        &mut ws,
        json!({"type": "subscribe", "channel": "n3", "token": channel_token(app, "eve", "n3")}),
    )
    .await;
    assert_eq!(over["type"], "hub.error");
    assert!(
        over["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("at most 2")),
        "{over}"
    );

    let bye = ask(&mut ws, json!({"type": "unsubscribe", "channel": "news"})).await;
    assert_eq!(bye["type"], "hub.unsubscribed");
    assert_eq!(bye["data"]["channel"], "news");
    to_channel(other, "news", 2).await;
    to_user(other, "eve", 1).await;
    let v = ws.envelope().await;
    assert_eq!(key(&v), (String::new(), 1), "no news after unsubscribe");
    wait_channel_presence(other, "news", &[], Duration::from_secs(2)).await;

    // The cursor carries n2: a new connection resumes it when it subscribes again.
    let cursor = v["id"].as_str().expect("id").to_owned();
    ws.close().await;
    to_channel(other, "n2", 0).await;
    let mut back = WsClient::connect(other, &app.token("eve"), &format!("since={cursor}"))
        .await
        .expect("ws");
    assert_eq!(back.envelope().await["type"], "hub.connected");
    let again = ask(
        &mut back,
        json!({"type": "subscribe", "channel": "n2", "token": channel_token(app, "eve", "n2")}),
    )
    .await;
    assert_eq!(again["type"], "hub.subscribed");
    assert_eq!(key(&back.envelope().await), ("n2".to_owned(), 0));

    // More channels in a token than a connection may follow: refused at the handshake.
    match WsClient::connect(app, &channels_token(app, "eve", &["a", "b", "c"]), "").await {
        Err(r) => {
            assert_eq!(r.status, 403, "{}", r.body);
            assert!(r.body.contains("at most 2"), "{}", r.body);
        }
        Ok(_) => panic!("three channels accepted with a limit of two"),
    }
    // A malformed `channels` claim is a bad token.
    let bad = hs256(
        &app.secret,
        &json!({"sub": "eve", "exp": now_s() + 600, "channels": ["ok", "no way"]}),
    );
    match SseClient::connect(app, &bad, "").await {
        Err(r) => assert_eq!(r.status, 401, "{}", r.body),
        Ok(_) => panic!("a bad channels claim accepted"),
    }
    assert_eq!(
        app.metric("hub_channel_refusals_total{reason=\"token\"}")
            .await,
        3.0,
        "another user's, a foreign grant's and a bad token"
    );
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_of_hub_connected_and_hub_subscribed_resumes_before_any_notification() {
    let (url, prefix) = (redis_url(), redis_prefix());
    let creds = Credentials::random();
    let a = HubProcess::start_with_credentials(&creds, &redis_env(&url, &prefix)).await;
    let b = HubProcess::start_with_credentials(&creds, &redis_env(&url, &prefix)).await;
    let (a_app, b_app) = (a.as_app(), b.as_app());
    wait_status(&a_app, "/readyz", 200, STEP).await;
    wait_status(&b_app, "/readyz", 200, STEP).await;
    // Something already in each stream, so "from here" is not "from the start".
    to_user(&b_app, "gina", 0).await;
    to_channel(&b_app, "t1", 0).await;
    to_channel(&b_app, "t2", 0).await;

    // The token's channel: hub.connected's cursor is the position before anything arrived.
    let token = channels_token(&a_app, "gina", &["t1"]);
    let mut ws = WsClient::connect(&a_app, &token, "").await.expect("ws");
    let hello = ws.envelope().await;
    let cursor = hello["data"]["cursor"].as_str().expect("cursor").to_owned();
    // A channel joined by subscribe: hub.subscribed's cursor holds it too.
    ws.send_text(
        json!({"type": "subscribe", "channel": "t2", "token": channel_token(&a_app, "gina", "t2")})
            .to_string(),
    )
    .await;
    let ok = ws.envelope().await;
    assert_eq!(ok["type"], "hub.subscribed", "{ok}");
    let with_t2 = ok["data"]["cursor"].as_str().expect("cursor").to_owned();
    assert_ne!(with_t2, cursor);
    ws.close().await;

    to_user(&b_app, "gina", 1).await;
    to_channel(&b_app, "t1", 1).await;
    to_channel(&b_app, "t2", 1).await;
    let mut back = Client::connect(&b_app, &token, true, Some(&with_t2)).await;
    assert_eq!(back.envelope().await["data"]["resumed"], true);
    same_per_stream(&back.notes(2).await, &[("", 1), ("t1", 1)]);
    drop(back);
    // Over WebSocket, subscribing t2 again picks up where hub.subscribed's cursor left it.
    let mut ws = WsClient::connect(&b_app, &token, &format!("since={with_t2}"))
        .await
        .expect("ws");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    let mut replayed = Vec::new();
    for _ in 0..2 {
        replayed.push(ws.envelope().await);
    }
    same_per_stream(&replayed, &[("", 1), ("t1", 1)]);
    ws.send_text(
        json!({"type": "subscribe", "channel": "t2", "token": channel_token(&b_app, "gina", "t2")})
            .to_string(),
    )
    .await;
    assert_eq!(ws.envelope().await["type"], "hub.subscribed");
    assert_eq!(key(&ws.envelope().await), ("t2".to_owned(), 1));
}

#[tokio::test]
async fn publishing_names_a_user_or_a_channel_and_explains_what_is_wrong() {
    let app = spawn_app_with(&[]).await;
    for (body, why) in [
        (
            json!({"user_id": "u", "channel": "c", "type": "t", "data": {}}),
            "not both",
        ),
        (json!({"type": "t", "data": {}}), "user_id or channel"),
        (
            json!({"channel": "bad name", "type": "t", "data": {}}),
            "channel",
        ),
        (
            json!({"channel": "x".repeat(129), "type": "t", "data": {}}),
            "channel",
        ),
    ] {
        let (status, reply) = app.publish_raw(&body).await;
        assert_eq!(status, 400, "{body} → {reply}");
        assert!(
            reply["error"].as_str().is_some_and(|e| e.contains(why)),
            "{body} → {reply}"
        );
    }
    let batch = json!({"notifications": [
        {"channel": "ok", "type": "t", "data": {}},
        {"channel": "no good", "type": "t", "data": {}},
    ]});
    let (status, reply) = app.post_api("/api/publish/batch", &batch).await;
    assert_eq!(status, 400);
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("notifications[1]")),
        "{reply}"
    );
    // Idempotency keys are per channel: the same key on two channels makes two.
    let keyed = |c: &str| json!({"channel": c, "type": "t", "data": {}, "idempotency_key": "k"});
    let (_, one) = app.publish_raw(&keyed("k1")).await;
    let (_, again) = app.publish_raw(&keyed("k1")).await;
    let (_, other) = app.publish_raw(&keyed("k2")).await;
    assert_eq!(one["id"], again["id"]);
    assert!(other["id"].is_string());
    let (status, _) = app.get_api("/api/presence/channels/no%20good").await;
    assert_eq!(status, 400);
    assert_eq!(
        channel_presence(&app, "quiet").await,
        json!({"users": [], "count": 0})
    );
    let (status, _) = app.get("/api/presence/channels/quiet").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_channel_broadcast_on_one_node_is_one_publish_for_every_subscriber() {
    let app = spawn_app_with(&[]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let token = channels_token(&app, &format!("fan{i}"), &["all"]);
        let mut c = Client::connect(&app, &token, i % 2 == 1, None).await;
        c.envelope().await;
        clients.push(c);
    }
    let before = app
        .metric("hub_notifications_published_total{source=\"api\"}")
        .await;
    for n in 0..3 {
        to_channel(&app, "all", n).await;
    }
    for c in &mut clients {
        same_per_stream(&c.notes(3).await, &[("all", 0), ("all", 1), ("all", 2)]);
    }
    let after = app
        .metric("hub_notifications_published_total{source=\"api\"}")
        .await;
    assert_eq!(after - before, 3.0, "one publish per broadcast");
    assert_eq!(app.metric("hub_channels").await, 1.0);
    assert_eq!(app.metric("hub_channel_subscriptions").await, 20.0);
    drop(clients);
    let deadline = Deadline::after(STEP);
    while app.metric("hub_channel_subscriptions").await != 0.0 {
        deadline.retry(|| "subscriptions released").await;
    }
    assert_eq!(app.metric("hub_channels").await, 0.0);
}
