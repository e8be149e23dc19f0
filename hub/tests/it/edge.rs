//! The hardened edge: what an outside attacker tried, each held by a test on a real node
//! (and a real Redis where it applies).

use std::time::Duration;

use serde_json::{Value, json};
use test_support::STEP;
use test_support::clients::{SseClient, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

use crate::helpers::app::{
    Credentials, TestApp, spawn_app, spawn_app_with, wait_metric_eq, wait_status,
};
use crate::helpers::clients::assert_json_error;
use crate::helpers::processes::HubProcess;
use crate::helpers::redis::{redis_prefix, redis_url};
use crate::helpers::tokens::{hs256, now_s};

/// Largest publish body (§4).
const MAX_BODY: usize = 64 * 1024;

/// A publish body of exactly `len` bytes for `user`, its `data` padded with a string.
fn body_of_len(user: &str, len: usize) -> String {
    let head = format!(r#"{{"user_id":"{user}","type":"big","data":{{"pad":""#);
    let tail = r#""}}"#;
    let pad = len - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(body.len(), len);
    body
}

async fn post(app: &TestApp, path: &str, body: String) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", app.base()))
        .bearer_auth(&app.api_key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Reads until the peer closes; returns what it sent. Fails after `limit`.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection stayed open for {limit:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// A TCP connection from a chosen loopback source address.
async fn connect_from(source: &str, app: &TestApp) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind source");
    socket.connect(app.addr).await.expect("connect")
}

#[tokio::test]
async fn a_notification_at_the_body_limit_reaches_ws_and_sse_intact_and_replays() {
    let app = spawn_app().await;
    let user = "big-1";
    let mut ws = WsClient::connect(&app, &app.token(user), "")
        .await
        .expect("ws");
    ws.envelope().await;
    let mut sse = SseClient::connect(&app, &app.token(user), "")
        .await
        .expect("sse");
    sse.event().await;
    let first = app.publish(user, "small", json!({"n": 1})).await;
    ws.envelope().await;
    sse.event().await;

    let (status, body) = post(&app, "/api/publish", body_of_len(user, MAX_BODY)).await;
    assert_eq!(status, 200, "{body}");
    let pad_len =
        MAX_BODY - format!(r#"{{"user_id":"{user}","type":"big","data":{{"pad":""}}}}"#).len();
    let e = ws.envelope().await;
    assert_eq!(e["type"], "big");
    assert_eq!(e["data"]["pad"].as_str().map(str::len), Some(pad_len));
    let e = sse.event().await;
    assert_eq!(e.data["data"]["pad"].as_str().map(str::len), Some(pad_len));
    // And the socket still works afterwards.
    app.publish(user, "after", json!({})).await;
    assert_eq!(ws.envelope().await["type"], "after");

    // A resume replays it over WebSocket as well.
    let mut again = WsClient::connect(&app, &app.token(user), &format!("since={first}"))
        .await
        .expect("resume");
    assert_eq!(again.envelope().await["data"]["resumed"], true);
    let e = again.envelope().await;
    assert_eq!(e["data"]["pad"].as_str().map(str::len), Some(pad_len));
    assert_eq!(again.envelope().await["type"], "after");
    app.stop().await;
}

#[tokio::test]
async fn line_breaks_inside_data_reach_sse_as_one_event() {
    let app = spawn_app().await;
    let mut sse = SseClient::connect(&app, &app.token("nl-1"), "")
        .await
        .expect("sse");
    sse.event().await;
    let body = "{\n  \"user_id\": \"nl-1\",\n  \"type\": \"pretty\",\n  \"data\": {\r\n    \"a\": [1,\n 2],\n    \"s\": \"x\\ny\"\n  }\n}";
    let (status, reply) = post(&app, "/api/publish", body.to_owned()).await;
    assert_eq!(status, 200, "{reply}");
    let e = sse.event().await;
    assert_eq!(e.data["type"], "pretty");
    assert_eq!(e.data["data"], json!({"a": [1, 2], "s": "x\ny"}));
    assert_eq!(e.id.as_deref(), reply["id"].as_str());
    app.stop().await;
}

#[tokio::test]
async fn configured_issuer_and_audience_must_be_present() {
    let app = spawn_app_with(&[
        ("HUB_JWT_ISSUER", "https://issuer.example"),
        ("HUB_JWT_AUDIENCE", "hub"),
    ])
    .await;
    let exp = now_s() + 600;
    let cases = [
        (
            json!({"sub": "c1", "exp": exp, "iss": "https://issuer.example"}),
            "missing claim: aud",
        ),
        (
            json!({"sub": "c1", "exp": exp, "aud": "hub"}),
            "missing claim: iss",
        ),
        (
            json!({"sub": "c1", "iss": "https://issuer.example", "aud": "hub"}),
            "missing claim: exp",
        ),
        (
            json!({"exp": exp, "iss": "https://issuer.example", "aud": "hub"}),
            "missing claim: sub",
        ),
        (
            json!({"sub": "c1", "exp": exp, "iss": "https://issuer.example", "aud": "orders"}),
            "wrong audience",
        ),
    ];
    for (claims, reason) in cases {
        let token = hs256(&app.secret, &claims);
        let Err(r) = WsClient::connect(&app, &token, "").await else {
            panic!("{claims} was accepted");
        };
        assert_eq!(r.status, 401, "{claims}");
        let v: Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(v["error"], reason, "{claims}");
        let Err(r) = SseClient::connect(&app, &token, "").await else {
            panic!("{claims} was accepted over SSE");
        };
        assert_eq!(r.status, 401);
    }
    let good = hs256(
        &app.secret,
        &json!({"sub": "c1", "exp": exp, "iss": "https://issuer.example", "aud": "hub"}),
    );
    let mut ws = WsClient::connect(&app, &good, "")
        .await
        .expect("both present");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    app.stop().await;
}

#[tokio::test]
async fn a_huge_exp_is_refused_without_harm_and_lifetimes_are_capped() {
    let app = spawn_app_with(&[("HUB_JWT_MAX_LIFETIME", "2h")]).await;
    for exp in [
        json!(10_000_000_000_000_000_000u64),
        json!(now_s() + 3 * 3600),
    ] {
        let token = hs256(&app.secret, &json!({"sub": "x1", "exp": exp}));
        let Err(r) = WsClient::connect(&app, &token, "").await else {
            panic!("exp {exp} accepted");
        };
        assert_eq!(r.status, 401);
        assert!(r.body.contains("lifetime"), "{}", r.body);
    }
    let float = hs256(&app.secret, &json!({"sub": "x1", "exp": 1e19}));
    let Err(r) = SseClient::connect(&app, &float, "").await else {
        panic!("a float exp was accepted");
    };
    assert_eq!(r.status, 401);
    assert!(r.body.contains("exp must be a whole number"), "{}", r.body);
    // The node is unharmed.
    let mut ws = WsClient::connect(&app, &app.token("x1"), "")
        .await
        .expect("ws");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    app.stop().await;
}

#[tokio::test]
async fn user_ids_cannot_move_the_redis_hash_tag_and_keys_stay_per_user() {
    let prefix = redis_prefix();
    let url = redis_url();
    let app = spawn_app_with(&[("HUB_REDIS_URL", &url), ("HUB_REDIS_PREFIX", &prefix)]).await;
    // The attack: `a` with key `b}:c` and `a}:b` with key `c` used to share one key.
    let (status, body) = app
        .publish_raw(&json!({"user_id": "a}:b", "type": "t", "data": {}, "idempotency_key": "c"}))
        .await;
    test_support::assert_refused(status, &body, 400, "user_id");
    // Users and keys that look alike stay apart.
    let mut seen = Vec::new();
    for (user, key) in [("a", "b}:c"), ("a", "b:c"), ("a:b", "c"), ("a:b", "b}:c")] {
        let mut ws = WsClient::connect(&app, &app.token(user), "")
            .await
            .expect("ws");
        ws.envelope().await;
        let (status, body) = app
            .publish_raw(
                &json!({"user_id": user, "type": "t", "data": {"k": key}, "idempotency_key": key}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let e = ws.envelope().await;
        assert_eq!(
            e["data"]["k"], key,
            "{user} got another user's notification"
        );
        seen.push(body["id"].as_str().expect("id").to_owned());
    }
    // The same key again for one of them is a duplicate of that user's own notification.
    let (_, body) = app
        .publish_raw(&json!({"user_id": "a:b", "type": "t", "data": {}, "idempotency_key": "c"}))
        .await;
    assert_eq!(body["id"].as_str(), Some(seen[2].as_str()));
    // A token whose sub would break the tag is refused at the handshake.
    let bad = hs256(&app.secret, &json!({"sub": "x}y", "exp": now_s() + 60}));
    let Err(r) = WsClient::connect(&app, &bad, "").await else {
        panic!("a sub with a brace was accepted");
    };
    assert_eq!(r.status, 401);
    app.stop().await;
}

#[tokio::test]
async fn every_request_of_a_kept_alive_connection_has_the_head_limit_and_timeout() {
    let app = spawn_app_with(&[("HUB_HANDSHAKE_TIMEOUT", "1s")]).await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .expect("first request");
    let mut buf = vec![0u8; 1024];
    let n = timeout(STEP, stream.read(&mut buf))
        .await
        .expect("answer")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A 300 KB header on the second request of the same connection.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(300_000)
    );
    let _ = stream.write_all(big.as_bytes()).await;
    let answer = read_to_close(&mut stream, STEP).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(!text.contains("200 OK"), "a 300 KB head was served: {text}");

    // A partial head on a kept-alive connection is closed within the handshake timeout.
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .expect("first request");
    let _ = timeout(STEP, stream.read(&mut buf)).await.expect("answer");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .await
        .expect("partial");
    let started = Instant::now();
    read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(4));
    app.stop().await;
}

#[tokio::test]
async fn idle_sockets_beyond_the_per_address_cap_are_closed_and_other_addresses_are_not() {
    let app = spawn_app_with(&[
        ("HUB_MAX_CONNECTIONS_PER_IP", "50"),
        ("HUB_HANDSHAKE_TIMEOUT", "30s"),
    ])
    .await;
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(connect_from("127.0.0.7", &app).await);
    }
    // The ten beyond the cap are closed at once, the fifty others stay open: once the node
    // counted ten refusals, every socket is read at the same time for a while.
    app.wait_metric("hub_handshake_rejections_total{reason=\"ip_limit\"}", 10.0)
        .await;
    let reads = idle.iter_mut().map(|s| async move {
        let mut b = [0u8; 1];
        match timeout(Duration::from_secs(2), s.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) => panic!("an idle socket was sent data"),
            Err(_) => false,
        }
    });
    let closed = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    assert_eq!(closed, 10);
    // Another address is unaffected.
    let mut other = connect_from("127.0.0.8", &app).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let answer = read_to_close(&mut other, STEP).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    // Closing some frees their slots.
    idle.truncate(40);
    let deadline = Instant::now() + STEP;
    loop {
        let mut s = connect_from("127.0.0.7", &app).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        if String::from_utf8_lossy(&read_to_close(&mut s, STEP).await).starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "slots were not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn slow_heads_are_cut_at_the_handshake_timeout_and_capped_while_clients_connect() {
    let app = spawn_app_with(&[
        ("HUB_HANDSHAKE_TIMEOUT", "1s"),
        ("HUB_MAX_PENDING_HANDSHAKES", "20"),
    ])
    .await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..30 {
        let mut s = connect_from(&format!("127.0.1.{}", i + 1), &app).await;
        let _ = s.write_all(b"GET /ws?token=").await;
        slow.push(s);
    }
    // A normal client still gets in once a pending slot frees (within the timeout).
    let deadline = Instant::now() + STEP;
    let url = app.ws_url(&format!("token={}", app.token("fine")));
    loop {
        // Refused at accept (reset) while the pending slots are full: try again.
        if let Ok(Ok((mut ws, _))) = timeout(STEP, tokio_tungstenite::connect_async(&url)).await {
            use futures_util::StreamExt;
            let first = timeout(STEP, ws.next()).await.expect("greeting");
            assert!(
                matches!(first, Some(Ok(m)) if m.to_text().unwrap_or_default().contains("hub.connected"))
            );
            break;
        }
        assert!(Instant::now() < deadline, "a normal client never got in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in &mut slow {
        read_to_close(s, Duration::from_secs(5)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "slow heads lived past the timeout"
    );
    app.wait_metric(
        "hub_handshake_rejections_total{reason=\"pending_limit\"}",
        10.0,
    )
    .await;
    app.wait_metric("hub_handshake_rejections_total{reason=\"timeout\"}", 20.0)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn a_user_reconnecting_in_a_loop_is_rate_limited_and_others_are_not() {
    let app = spawn_app_with(&[
        ("HUB_USER_HANDSHAKES_PER_SECOND", "1"),
        ("HUB_USER_HANDSHAKE_BURST", "3"),
    ])
    .await;
    let token = app.token("looper");
    for _ in 0..3 {
        let ws = WsClient::connect(&app, &token, "")
            .await
            .expect("within the burst");
        ws.close().await;
    }
    // Beyond the burst, at most one more per second gets in: of five quick attempts, at
    // least four are refused whatever the machine's speed.
    let mut refused = Vec::new();
    for _ in 0..5 {
        if let Err(r) = SseClient::connect(&app, &token, "").await {
            refused.push(r);
        }
    }
    assert!(refused.len() >= 4, "only {} of 5 refused", refused.len());
    for r in &refused {
        assert_eq!(r.status, 429);
        assert_json_error(&r.body, "user rate");
    }
    let mut other = WsClient::connect(&app, &app.token("calm"), "")
        .await
        .expect("another user");
    assert_eq!(other.envelope().await["type"], "hub.connected");
    app.stop().await;
}

#[tokio::test]
async fn a_websocket_flooding_messages_is_closed_with_1008() {
    let app = spawn_app_with(&[("HUB_WS_MESSAGES_PER_SECOND", "5")]).await;
    let mut ws = WsClient::connect(&app, &app.token("flood"), "")
        .await
        .expect("ws");
    ws.envelope().await;
    for _ in 0..50 {
        ws.send_text(r#"{"type":"nope"}"#.to_owned()).await;
    }
    assert_eq!(ws.closed().await, Some(1008));
    app.wait_metric("hub_inbound_rate_closes_total", 1.0).await;
    app.stop().await;
}

#[tokio::test]
async fn an_sse_client_sending_bytes_is_closed_and_frees_its_slot() {
    let app = spawn_app().await;
    let token = app.token("chatty");
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(format!("GET /sse?token={token} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut buf = vec![0u8; 4096];
    let n = timeout(STEP, stream.read(&mut buf))
        .await
        .expect("head")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    wait_metric_eq(&app, "hub_connections{transport=\"sse\"}", 1.0).await;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .expect("unexpected input");
    read_to_close(&mut stream, STEP).await;
    wait_metric_eq(&app, "hub_connections{transport=\"sse\"}", 0.0).await;
    app.stop().await;
}

#[tokio::test]
async fn the_disconnect_api_closes_every_connection_on_every_node_and_revokes_tokens() {
    let prefix = redis_prefix();
    let url = redis_url();
    // A token revoked by an earlier version of the hub (one string key per user), which an
    // upgrade must keep in force.
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    redis::cmd("SET")
        .arg(format!("{prefix}:r:{{legacy}}"))
        .arg(format!("{} {}", now_s(), now_s() + 600))
        .arg("EX")
        .arg(600)
        .query::<()>(&mut conn)
        .expect("SET");
    disconnect_on_every_node(
        &[
            ("HUB_REDIS_URL", url.as_str()),
            ("HUB_REDIS_PREFIX", prefix.as_str()),
        ],
        &["legacy"],
    )
    .await;
}

/// Two nodes on the backplane of `env`: the disconnect API closes a user's connections on
/// both and revokes the user's older tokens everywhere, a node started afterwards included
/// (so are the tokens of the `also_revoked` users, revoked before the nodes started); a
/// plain disconnect lets the same token back in; bad requests get 400.
pub(crate) async fn disconnect_on_every_node(env: &[(&str, &str)], also_revoked: &[&str]) {
    let creds = Credentials::random();
    let mut env = env.to_vec();
    env.push(("HUB_JWT_LEEWAY", "0s"));
    let a = HubProcess::start_with_credentials(&creds, &env).await;
    let b = HubProcess::start_with_credentials(&creds, &env).await;
    let (a, b) = (a.as_app(), b.as_app());
    wait_status(&a, "/readyz", 200, STEP).await;
    wait_status(&b, "/readyz", 200, STEP).await;
    let old = hs256(
        &a.secret,
        &json!({"sub": "banned", "exp": now_s() + 600, "iat": now_s() - 10}),
    );
    let mut ws = WsClient::connect(&a, &old, "").await.expect("ws on A");
    ws.envelope().await;
    let mut sse = SseClient::connect(&b, &old, "").await.expect("sse on B");
    sse.event().await;
    let mut bystander = WsClient::connect(&b, &a.token("bystander"), "")
        .await
        .expect("other user");
    bystander.envelope().await;

    // Without the API key: refused.
    let r = reqwest::Client::new()
        .post(format!("{}/api/disconnect", a.base()))
        .json(&json!({"user_id": "banned"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 401);

    let cut = now_s();
    let (status, body) = post(
        &a,
        "/api/disconnect",
        json!({"user_id": "banned", "revoke_tokens_issued_before": cut}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected"], 2, "{body}");
    assert_eq!(ws.closing("disconnected").await, Some(4010));
    sse.closing("disconnected").await;

    // The old token is refused on both nodes; one issued after the cut is accepted; the
    // bystander was untouched.
    for node in [&a, &b] {
        let Err(r) = WsClient::connect(node, &old, "").await else {
            panic!("a revoked token was accepted");
        };
        assert_eq!(r.status, 401);
        assert!(r.body.contains("revoked"), "{}", r.body);
        let no_iat = hs256(&a.secret, &json!({"sub": "banned", "exp": now_s() + 600}));
        assert_eq!(
            SseClient::connect(node, &no_iat, "")
                .await
                .err()
                .map(|r| r.status),
            Some(401)
        );
    }
    let fresh = hs256(
        &a.secret,
        &json!({"sub": "banned", "exp": now_s() + 600, "iat": cut}),
    );
    let mut again = WsClient::connect(&b, &fresh, "")
        .await
        .expect("a token issued after the cut");
    assert_eq!(again.envelope().await["type"], "hub.connected");
    b.publish("bystander", "still", json!({})).await;
    assert_eq!(bystander.envelope().await["type"], "still");

    // A plain disconnect (no revocation) closes and lets the same token back in.
    let (status, body) = post(
        &b,
        "/api/disconnect",
        json!({"user_id": "banned"}).to_string(),
    )
    .await;
    assert_eq!((status, body["disconnected"].clone()), (200, json!(1)));
    assert_eq!(again.closing("disconnected").await, Some(4010));
    WsClient::connect(&a, &fresh, "")
        .await
        .expect("same token after a plain disconnect");

    // A node that starts later loads the revocations in force: the old token is refused
    // there too, and so are those revoked before.
    let c = HubProcess::start_with_credentials(&creds, &env).await;
    let c = c.as_app();
    wait_status(&c, "/readyz", 200, STEP).await;
    let mut refused = vec![(old.clone(), "banned".to_owned())];
    for who in also_revoked {
        let token = hs256(
            &a.secret,
            &json!({"sub": who, "exp": now_s() + 600, "iat": now_s() - 10}),
        );
        refused.push((token, (*who).to_owned()));
    }
    for (token, who) in &refused {
        let Err(r) = WsClient::connect(&c, token, "").await else {
            panic!("{who}: a revoked token was accepted by a node started afterwards");
        };
        assert_eq!(r.status, 401, "{who}");
    }

    // Bad input gets a clear 400.
    for bad in [
        json!({}),
        json!({"user_id": "x", "revoke_tokens_issued_before": "soon"}),
        json!({"user_id": "a}b"}),
    ] {
        let (status, body) = post(&a, "/api/disconnect", bad.to_string()).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn the_disconnect_api_works_on_the_embedded_backplane() {
    let app = spawn_app().await;
    let mut ws = WsClient::connect(&app, &app.token("solo"), "")
        .await
        .expect("ws");
    ws.envelope().await;
    let (status, body) = post(
        &app,
        "/api/disconnect",
        json!({"user_id": "solo", "revoke_tokens_issued_before": now_s() + 1}).to_string(),
    )
    .await;
    assert_eq!((status, body["disconnected"].clone()), (200, json!(1)));
    assert_eq!(ws.closing("disconnected").await, Some(4010));
    let Err(r) = WsClient::connect(&app, &app.token("solo"), "").await else {
        panic!("a revoked token (no iat) was accepted");
    };
    assert_eq!(r.status, 401);
    app.wait_metric("hub_api_disconnects_total", 1.0).await;
    app.stop().await;
}

#[tokio::test]
async fn publish_bodies_must_be_json_objects() {
    let app = spawn_app().await;
    for (data, want) in [
        (json!(null), 400),
        (json!("text"), 400),
        (json!([1]), 400),
        (json!({}), 200),
    ] {
        let (status, body) = app
            .publish_raw(&json!({"user_id": "p", "type": "t", "data": data}))
            .await;
        assert_eq!(status, want, "{data}: {body}");
    }
    let r = reqwest::Client::new()
        .post(format!("{}/api/publish", app.base()))
        .bearer_auth(&app.api_key)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"user_id":"p","type":"t","data":{}}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 415);
    app.stop().await;
}

#[tokio::test]
async fn sse_preflight_allows_header_auth_for_accepted_origins_only() {
    let app = spawn_app_with(&[("HUB_ALLOWED_ORIGINS", "https://app.example")]).await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{}/sse", app.base()))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization, last-event-id",
            )
            .send()
    };
    let r = preflight("https://app.example").await.expect("preflight");
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap_or_default()
            .contains("GET")
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        allowed.contains("authorization") && allowed.contains("last-event-id"),
        "{allowed}"
    );
    let r = preflight("https://evil.example").await.expect("preflight");
    assert_eq!(r.status(), 403);
    // The refusal is readable by the page that made it.
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://evil.example"
    );
    assert_json_error(&r.text().await.unwrap_or_default(), "refused preflight");

    // The same on a kept-alive connection (the second request goes through the router).
    let r = client
        .get(format!("{}/healthz", app.base()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    let r = preflight("https://app.example")
        .await
        .expect("second preflight");
    assert_eq!(r.status(), 204);

    // And the real request with the token in a header, from the allowed origin.
    let mut sse = SseClient::connect_with(
        &app,
        "/sse",
        &[
            ("authorization", &format!("Bearer {}", app.token("cors"))),
            ("origin", "https://app.example"),
        ],
    )
    .await
    .expect("sse with a header token");
    assert_eq!(sse.event().await.data["type"], "hub.connected");
    app.stop().await;
}

#[tokio::test]
async fn every_api_response_carries_a_request_id() {
    let app = spawn_app().await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/healthz", app.base()))
        .send()
        .await
        .expect("GET");
    let made = r.headers()["x-request-id"]
        .to_str()
        .expect("text")
        .to_owned();
    assert_eq!(made.len(), 16, "a fresh id: {made}");
    let r = client
        .get(format!("{}/readyz", app.base()))
        .header("x-request-id", "from-the-caller-1")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.headers()["x-request-id"], "from-the-caller-1");
    app.stop().await;
}
