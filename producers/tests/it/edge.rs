//! The services' HTTP edge: each API takes only tokens for its own audience, orders are rate
//! limited per user, and slow clients (a request head or body that never completes) are cut off
//! without holding up anyone else.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::helpers::http::{get, post};
use crate::helpers::processes::Kind;
use crate::helpers::stack::Stack;
use crate::helpers::tokens::token_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_accepts_only_tokens_minted_for_its_own_audience() {
    let mut stack = Stack::prepare("edge-audience").await;
    stack.start_service(Kind::Order);
    stack.start_service(Kind::Moderation);
    let order = json!({"items": [{"product_id": "p1", "quantity": 1, "price_cents": 100}], "delivery_address": "x"});
    let orders = stack.service(Kind::Order).url("/orders");
    let ads = stack.service(Kind::Moderation).url("/ads");
    let ad = json!({"title": "Chair"});
    for (url, body) in [(&orders, &order), (&ads, &ad)] {
        // A token for the hub (as the hub's dev login mints with HUB_JWT_AUDIENCE=hub).
        let hub = token_for(&stack.secret, "quinn", Some("hub"));
        assert_eq!(
            post(url, Some(&hub), body).await,
            (401, json!({"error": "wrong audience"})),
            "{url}"
        );
        // A token with no audience at all.
        let none = token_for(&stack.secret, "quinn", None);
        assert_eq!(
            post(url, Some(&none), body).await,
            (401, json!({"error": "token audience (aud) is missing"})),
            "{url}"
        );
    }
    // A token for one service is refused by the other.
    let (status, answer) = post(&ads, Some(&stack.token(Kind::Order, "quinn")), &ad).await;
    assert_eq!((status, answer), (401, json!({"error": "wrong audience"})));
    let (status, answer) = post(
        &orders,
        Some(&stack.token(Kind::Moderation, "quinn")),
        &order,
    )
    .await;
    assert_eq!((status, answer), (401, json!({"error": "wrong audience"})));
    // The right audience is accepted.
    let (status, answer) = post(&orders, Some(&stack.token(Kind::Order, "quinn")), &order).await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = post(&ads, Some(&stack.token(Kind::Moderation, "quinn")), &ad).await;
    assert_eq!(status, 201, "{answer}");
    // ORDER_JWT_AUDIENCE changes what the order service wants.
    stack.take_service(Kind::Order).terminate().await;
    stack
        .extra
        .insert("order", vec![("JWT_AUDIENCE".into(), "shop-orders".into())]);
    stack.start_service(Kind::Order);
    let orders = stack.service(Kind::Order).url("/orders");
    let (status, _) = post(&orders, Some(&stack.token(Kind::Order, "quinn")), &order).await;
    assert_eq!(status, 401);
    let custom = token_for(&stack.secret, "quinn", Some("shop-orders"));
    let (status, answer) = post(&orders, Some(&custom), &order).await;
    assert_eq!(status, 201, "{answer}");
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_over_the_per_user_limit_get_429_with_retry_after_and_others_are_served() {
    let mut stack = Stack::prepare("edge-order-limit").await;
    stack.extra.insert(
        "order",
        vec![
            ("ORDERS_PER_MINUTE".into(), "1".into()),
            ("ORDERS_BURST".into(), "2".into()),
        ],
    );
    stack.start_service(Kind::Order);
    stack.place_order("rita", 100).await;
    stack.place_order("rita", 100).await;
    let resp = reqwest::Client::new()
        .post(stack.service(Kind::Order).url("/orders"))
        .bearer_auth(stack.token(Kind::Order, "rita"))
        .json(&json!({"items": [{"product_id": "p1", "quantity": 1, "price_cents": 100}], "delivery_address": "x"}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"error": format!("too many orders; retry in {retry_after} s")})
    );
    // Another user is not slowed down by rita.
    stack.place_order("sam", 100).await;
    assert_eq!(
        stack
            .service(Kind::Order)
            .metric("producers_rate_limited_total", &[("limit", "orders")])
            .await,
        1.0
    );
    let orders = stack.db(Kind::Order);
    assert_eq!(
        orders
            .count("SELECT count(*) FROM orders WHERE user_id = $1", "rita")
            .await,
        2
    );
    stack.cleanup().await;
}

/// Reads from `stream` until the server closes it; returns what it sent and when it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&got).into(), Instant::now());
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept the connection open for {limit:?}; it sent {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_within_the_timeouts_while_others_are_served() {
    let mut stack = Stack::prepare("edge-timeouts").await;
    stack.extra.insert(
        "order",
        vec![
            ("HTTP_HEADER_TIMEOUT".into(), "1s".into()),
            ("HTTP_BODY_TIMEOUT".into(), "1s".into()),
            ("HTTP_REQUEST_TIMEOUT".into(), "2s".into()),
        ],
    );
    stack.start_service(Kind::Order);
    let addr = stack.service(Kind::Order).addr;

    // A client that starts a request head and never finishes it.
    let mut slow_head = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    slow_head
        .write_all(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        .await
        .expect("write");
    // A client that sends its head but only part of the body it announced.
    let mut slow_body = TcpStream::connect(addr).await.expect("connect");
    let token = stack.token(Kind::Order, "tess");
    slow_body
        .write_all(
            format!(
                "POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"items\": ["
            )
            .as_bytes(),
        )
        .await
        .expect("write");

    // A client that trickles its body, a byte every 300 ms: never idle for the body timeout,
    // but the whole request outlasts the request timeout.
    let mut trickle = TcpStream::connect(addr).await.expect("connect");
    trickle
        .write_all(
            format!(
                "POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let (mut trickle_read, mut trickle_write) = trickle.into_split();
    let dripping = tokio::spawn(async move {
        while trickle_write.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    // Meanwhile everyone else is served at once.
    for _ in 0..3 {
        let t0 = Instant::now();
        let (status, _) = get(&stack.service(Kind::Order).url("/readyz"), None).await;
        assert_eq!(status, 200);
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }
    let order = stack.place_order("uma", 100).await;
    assert!(!order.is_empty());

    // The head that never completes: the connection is closed soon after the header timeout.
    let (sent, closed) = read_until_closed(&mut slow_head, Duration::from_secs(5)).await;
    let after = closed - started;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
    assert!(
        sent.is_empty() || sent.starts_with("HTTP/1.1 408"),
        "answered {sent:?}"
    );
    // The body that never completes: 408 with a JSON error, then the connection closes.
    let (sent, closed) = read_until_closed(&mut slow_body, Duration::from_secs(5)).await;
    let after = closed - started;
    assert!(after < Duration::from_secs(4), "closed after {after:?}");
    assert!(sent.starts_with("HTTP/1.1 408"), "answered {sent:?}");
    assert!(
        sent.ends_with(r#"{"error":"request body not received within the time allowed"}"#),
        "answered {sent:?}"
    );
    // The trickling body: 408 once the request timeout is over.
    let mut sent = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(6);
    while !String::from_utf8_lossy(&sent).contains("allowed\"}") {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, trickle_read.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => sent.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let sent = String::from_utf8_lossy(&sent);
    let after = Instant::now() - started;
    assert!(sent.starts_with("HTTP/1.1 408"), "answered {sent:?}");
    assert!(
        sent.ends_with(r#"{"error":"request not completed within the time allowed"}"#),
        "answered {sent:?}"
    );
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
        "answered after {after:?}"
    );
    dripping.abort();
    // Nothing was created by any of them.
    let orders = stack.db(Kind::Order);
    assert_eq!(
        orders
            .count("SELECT count(*) FROM orders WHERE user_id = $1", "tess")
            .await,
        0
    );
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_serve_their_openapi_document_and_answer_errors_in_json_with_a_request_id() {
    let mut stack = Stack::prepare("edge-openapi").await;
    stack.start_service(Kind::Order);
    stack.start_service(Kind::Moderation);
    for (kind, path, audience) in [
        (Kind::Order, "/orders", "`orders`"),
        (Kind::Moderation, "/reports", "`moderation`"),
    ] {
        let service = stack.service(kind);
        // Public: no token.
        let resp = reqwest::get(service.url("/api/openapi.json"))
            .await
            .expect("GET /api/openapi.json");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(
            resp.headers()["x-request-id"].len(),
            16,
            "a fresh request id"
        );
        let doc: Value = resp.json().await.expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"][path]["post"].is_object(), "{path}");
        let scheme = doc["components"]["securitySchemes"]["bearer"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(scheme.contains(audience), "{scheme}");

        // A body over 64 KiB: 413 with a JSON error, and the caller's request id back.
        let big = json!({"items": [], "delivery_address": "x".repeat(70 * 1024)});
        let resp = reqwest::Client::new()
            .post(service.url(path))
            .bearer_auth(stack.token(kind, "quinn"))
            .header("x-request-id", "it-too-large")
            .json(&big)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 413, "{path}");
        assert_eq!(resp.headers()["x-request-id"], "it-too-large");
        let body: Value = resp.json().await.expect("JSON error");
        assert_eq!(body, json!({"error": "body larger than 64 KiB"}));
    }
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_orders_owner_gets_a_hub_token_for_the_orders_channel() {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};

    let mut stack = Stack::prepare("edge-subscription").await;
    stack.start_service(Kind::Order);
    let id = stack.place_order("nora", 100).await;
    let url = stack
        .service(Kind::Order)
        .url(&format!("/orders/{id}/subscription"));
    let claims_of = |token: &str, secret: &str| {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_aud = false;
        decode::<Value>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map(|d| d.claims)
    };

    let (status, answer) = post(&url, Some(&stack.token(Kind::Order, "nora")), &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    let channel = format!("order:{id}");
    assert_eq!(answer["channel"], channel.as_str());
    let token = answer["token"].as_str().expect("a token");
    // Signed with the key the hub shares, for the owner, granting the order's channel.
    let claims = claims_of(token, &stack.secret).expect("the hub's key verifies it");
    assert_eq!(claims["sub"], "nora");
    assert_eq!(claims["channel"], channel.as_str());
    assert_eq!(claims["channels"], json!([channel]));
    assert_eq!(claims["exp"], answer["expires_at"]);
    assert!(
        claims.get("aud").is_none(),
        "no hub audience configured: {claims}"
    );
    assert!(claims_of(token, "another-secret-another-secret-0123").is_err());

    // Another user's order is answered like a missing one; no token, no answer.
    let (status, _) = post(&url, Some(&stack.token(Kind::Order, "otto")), &json!({})).await;
    assert_eq!(status, 404);
    let missing = stack
        .service(Kind::Order)
        .url("/orders/0193a0c2-7d4e-7b7a-9c1e-2f4b8a6d5e10/subscription");
    let (status, _) = post(
        &missing,
        Some(&stack.token(Kind::Order, "nora")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 404);
    let garbage = stack
        .service(Kind::Order)
        .url("/orders/not-a-uuid/subscription");
    let (status, _) = post(
        &garbage,
        Some(&stack.token(Kind::Order, "nora")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = post(&url, None, &json!({})).await;
    assert_eq!(status, 401);
    // A hub token is not an order-API token.
    let (status, _) = post(&url, Some(token), &json!({})).await;
    assert_eq!(status, 401);

    // ORDER_HUB_AUDIENCE: the tokens carry the hub's audience.
    stack.take_service(Kind::Order).terminate().await;
    stack
        .extra
        .insert("order", vec![("HUB_AUDIENCE".into(), "hub".into())]);
    stack.start_service(Kind::Order);
    let url = stack
        .service(Kind::Order)
        .url(&format!("/orders/{id}/subscription"));
    let (status, answer) = post(&url, Some(&stack.token(Kind::Order, "nora")), &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    let claims = claims_of(answer["token"].as_str().expect("token"), &stack.secret).expect("valid");
    assert_eq!(claims["aud"], "hub");
    stack.cleanup().await;
}
