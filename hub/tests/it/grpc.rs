//! The gRPC publish API on a real node: the three calls, the API key, and errors with the
//! HTTP API's rules and limits.

use hub::grpc::PublisherClient;
use proto::hub::v1::{PublishBatchRequest, PublishRequest};
use serde_json::json;
use test_support::clients::{SseClient, WsClient};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::helpers::app::{TestApp, spawn_app_with};

async fn grpc_app(pairs: &[(&str, &str)]) -> (TestApp, PublisherClient<Channel>) {
    let mut all = vec![("HUB_GRPC_ADDR", "127.0.0.1:0")];
    all.extend_from_slice(pairs);
    let app = spawn_app_with(&all).await;
    let addr = app.grpc.expect("gRPC listener");
    let client = PublisherClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC connect");
    (app, client)
}

fn req(user: &str, kind: &str, data: serde_json::Value) -> PublishRequest {
    PublishRequest {
        user_id: user.to_owned(),
        r#type: kind.to_owned(),
        data: data.to_string().into_bytes(),
        ..Default::default()
    }
}

fn authed<T>(app: &TestApp, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {}", app.api_key).parse().expect("metadata");
    r.metadata_mut().insert("authorization", value);
    r
}

#[tokio::test]
async fn publish_batch_and_stream_reach_clients_in_order_with_ids() {
    let (app, mut client) = grpc_app(&[]).await;
    let mut ws = WsClient::connect(&app, &app.token("g1"), "")
        .await
        .expect("ws");
    ws.envelope().await;
    let mut sse = SseClient::connect(&app, &app.token("g2"), "")
        .await
        .expect("sse");
    sse.event().await;

    let one = client
        .publish(authed(&app, req("g1", "single", json!({"n": 0}))))
        .await
        .expect("publish")
        .into_inner();
    let e = ws.envelope().await;
    assert_eq!(
        (e["type"].clone(), e["id"].clone()),
        (json!("single"), json!(one.id))
    );

    let batch: Vec<PublishRequest> = (1..=50)
        .map(|n| {
            req(
                if n % 2 == 0 { "g1" } else { "g2" },
                "batch",
                json!({"n": n}),
            )
        })
        .collect();
    let ids = client
        .publish_batch(authed(
            &app,
            PublishBatchRequest {
                notifications: batch,
            },
        ))
        .await
        .expect("batch")
        .into_inner()
        .ids;
    assert_eq!(ids.len(), 50);
    for n in (1..=50).filter(|n| n % 2 == 0) {
        let e = ws.envelope().await;
        assert_eq!(
            (e["data"]["n"].clone(), e["id"].clone()),
            (json!(n), json!(ids[n - 1]))
        );
    }
    for n in (1..=50).filter(|n| n % 2 == 1) {
        let e = sse.event().await;
        assert_eq!(e.data["data"]["n"], n);
    }

    // A stream: one answer per request, in order, and the user's notifications in that order.
    // Fewer than the send queue (256): this client reads only after the stream ends.
    let requests: Vec<PublishRequest> = (0..200)
        .map(|n| req("g1", "stream", json!({"n": n})))
        .collect();
    let outbound = futures_util::stream::iter(requests);
    let mut answers = client
        .publish_stream(authed(&app, outbound))
        .await
        .expect("stream")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(answer) = answers.message().await.expect("answer") {
        ids.push(answer.id);
    }
    assert_eq!(ids.len(), 200);
    for (n, id) in ids.iter().enumerate() {
        let e = ws.envelope().await;
        assert_eq!(
            (e["data"]["n"].clone(), e["id"].clone()),
            (json!(n), json!(id))
        );
    }
    app.wait_metric("hub_notifications_published_total{source=\"api\"}", 251.0)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn the_three_calls_publish_to_a_channel_and_reach_its_subscribers_in_order() {
    let (app, mut client) = grpc_app(&[]).await;
    let token = crate::helpers::tokens::hs256(
        &app.secret,
        &json!({"sub": "g4", "exp": crate::helpers::tokens::now_s() + 600, "channels": ["room:9"]}),
    );
    let mut sse = SseClient::connect(&app, &token, "").await.expect("sse");
    sse.event().await;
    let to_room = |n: u64| PublishRequest {
        channel: "room:9".to_owned(),
        r#type: "chat".to_owned(),
        data: json!({"n": n}).to_string().into_bytes(),
        ..Default::default()
    };
    client
        .publish(authed(&app, to_room(0)))
        .await
        .expect("publish");
    client
        .publish_batch(authed(
            &app,
            PublishBatchRequest {
                notifications: (1..4).map(to_room).collect(),
            },
        ))
        .await
        .expect("batch");
    let mut answers = client
        .publish_stream(authed(
            &app,
            futures_util::stream::iter((4..6).map(to_room)),
        ))
        .await
        .expect("stream")
        .into_inner();
    while answers.message().await.expect("answer").is_some() {}
    for n in 0..6 {
        let e = sse.event().await;
        assert_eq!(
            (e.data["channel"].clone(), e.data["data"]["n"].clone()),
            (json!("room:9"), json!(n))
        );
        assert_eq!(e.id.as_deref(), e.data["id"].as_str());
    }
    app.stop().await;
}

#[tokio::test]
async fn the_api_key_and_the_http_rules_apply() {
    let (app, mut client) = grpc_app(&[]).await;
    let status = client
        .publish(tonic::Request::new(req("g3", "t", json!({}))))
        .await
        .expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(req("g3", "t", json!({})));
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer nope-nope-nope-nope".parse().expect("metadata"),
    );
    assert_eq!(
        client.publish(wrong).await.expect_err("wrong key").code(),
        Code::Unauthenticated
    );

    let mut bad_json = req("g3", "t", json!({}));
    bad_json.data = b"{not json".to_vec();
    let mut big = req("g3", "t", json!({}));
    big.data = format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024)).into_bytes();
    let mut both = req("g3", "t", json!({}));
    both.channel = "room:1".to_owned();
    let mut bad_channel = req("", "t", json!({}));
    bad_channel.channel = "room 1".to_owned();
    for (r, code) in [
        (req("g3", "hub.reserved", json!({})), Code::InvalidArgument),
        (req("g}3", "t", json!({})), Code::InvalidArgument),
        (req("g3", "t", json!("text")), Code::InvalidArgument),
        (bad_json, Code::InvalidArgument),
        (big, Code::ResourceExhausted),
        (both, Code::InvalidArgument),
        (bad_channel, Code::InvalidArgument),
        (req("", "t", json!({})), Code::InvalidArgument),
    ] {
        let status = client.publish(authed(&app, r)).await.expect_err("refused");
        assert_eq!(status.code(), code, "{}", status.message());
    }

    // A batch with one invalid item names it and publishes nothing; too many items.
    let mut ws = WsClient::connect(&app, &app.token("g3"), "")
        .await
        .expect("ws");
    ws.envelope().await;
    let items = vec![req("g3", "t", json!({})), req("g3", "hub.x", json!({}))];
    let status = client
        .publish_batch(authed(
            &app,
            PublishBatchRequest {
                notifications: items,
            },
        ))
        .await
        .expect_err("invalid item");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("notifications[1]"),
        "{}",
        status.message()
    );
    let many = (0..1001).map(|_| req("g3", "t", json!({}))).collect();
    let status = client
        .publish_batch(authed(
            &app,
            PublishBatchRequest {
                notifications: many,
            },
        ))
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::ResourceExhausted);

    // A stream stops at its first invalid request, after answering the ones before it.
    let requests = vec![
        req("g3", "ok", json!({"n": 1})),
        req("g3", "hub.no", json!({})),
        req("g3", "ok", json!({"n": 3})),
    ];
    let mut answers = client
        .publish_stream(authed(&app, futures_util::stream::iter(requests)))
        .await
        .expect("stream")
        .into_inner();
    let first = answers
        .message()
        .await
        .expect("first answer")
        .expect("an id");
    let status = answers.message().await.expect_err("the invalid request");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("notifications[1]"),
        "{}",
        status.message()
    );
    let e = ws.envelope().await;
    assert_eq!(
        (e["type"].clone(), e["id"].clone()),
        (json!("ok"), json!(first.id))
    );
    // Nothing else arrived: the next one is this marker.
    app.publish("g3", "marker", json!({})).await;
    assert_eq!(ws.envelope().await["type"], "marker");
    app.stop().await;
}

#[tokio::test]
async fn without_an_api_key_every_call_is_refused() {
    let settings = hub::config::Settings::load_from_pairs([
        ("HUB_ADDR", "127.0.0.1:0"),
        ("HUB_GRPC_ADDR", "127.0.0.1:0"),
        ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
    ])
    .expect("settings");
    let app = hub::app::Application::build(settings, hub::app::Options::default())
        .await
        .expect("builds");
    let port = app.grpc_port().expect("gRPC port");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let mut client = PublisherClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let mut r = tonic::Request::new(req("g4", "t", json!({})));
    r.metadata_mut().insert(
        "authorization",
        "Bearer anything-at-all".parse().expect("metadata"),
    );
    assert_eq!(
        client.publish(r).await.expect_err("disabled").code(),
        Code::Unauthenticated
    );
    let _ = stop.send(());
    let _ = run.await;
}
