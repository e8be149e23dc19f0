//! The order saga end to end: REST → order service → Kafka → payment → delivery → order
//! service → `order.status.changed` → hub → WebSocket and SSE clients.

use serde_json::json;
use test_support::hex;
use test_support::wait::eventually;

use crate::helpers::STEP;
use crate::helpers::clients::{Inbox, Transport};
use crate::helpers::http::{get, post};
use crate::helpers::processes::Kind;
use crate::helpers::stack::{DELIVERED_PATH, Stack};
use crate::helpers::tokens::token_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_reaches_delivered_once_each_in_order_and_nobody_else_hears_of_it() {
    let stack = Stack::start("saga-delivered").await;
    let (alice, bob) = (format!("alice-{}", hex(3)), format!("bob-{}", hex(3)));
    let ws = Inbox::connect(stack.hub(), &stack.secret, &alice, Transport::Ws).await;
    let sse = Inbox::connect(stack.hub(), &stack.secret, &alice, Transport::Sse).await;
    let other = Inbox::connect(stack.hub(), &stack.secret, &bob, Transport::Ws).await;

    let order = stack.place_order(&alice, 14_999).await;
    for inbox in [&ws, &sse] {
        inbox.wait_status(&order, "DELIVERED").await;
        assert_eq!(
            inbox.statuses(&order),
            DELIVERED_PATH,
            "{:?}",
            inbox.transport
        );
        // Each notification names the status it left.
        let previous: Vec<_> = inbox
            .of_type("order.status")
            .iter()
            .map(|v| {
                v["data"]["previous_status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            previous,
            [
                "UNSPECIFIED",
                "CREATED",
                "PAID",
                "IN_TRANSIT",
                "OUT_FOR_DELIVERY"
            ]
        );
        // Ids increase in delivery order.
        let ids: Vec<_> = inbox
            .of_type("order.status")
            .iter()
            .map(|v| v["id"].clone())
            .collect();
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "no id twice");
    }
    assert!(
        other.of_type("order.status").is_empty(),
        "bob heard: {:?}",
        other.events()
    );

    // The order as its owner sees it; nobody else sees it.
    let url = stack.service(Kind::Order).url(&format!("/orders/{order}"));
    let (status, body) = get(&url, Some(&stack.token(Kind::Order, &alice))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "DELIVERED");
    assert_eq!(body["user_id"], alice.as_str());
    assert_eq!(body["total_cents"], 29_998);
    assert_eq!(body["history"].as_array().map(Vec::len), Some(5));
    let (status, body) = get(&url, Some(&stack.token(Kind::Order, &bob))).await;
    assert_eq!((status, body), (404, json!({"error": "no such order"})));
    let (status, body) = get(
        &stack.service(Kind::Order).url("/orders"),
        Some(&stack.token(Kind::Order, &bob)),
    )
    .await;
    assert_eq!((status, body), (200, json!({"orders": []})));

    // The payment debited the opening balance once.
    let balance: i64 = sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE user_id = $1")
        .bind(&alice)
        .fetch_one(&stack.db(Kind::Payment).pool)
        .await
        .expect("account");
    assert_eq!(balance, 10_000_000 - 29_998);
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_who_cannot_pay_gets_payment_failed_and_no_delivery_exists() {
    let stack = Stack::start("saga-broke").await;
    // `broke` is the demo's unfunded user; the test's user is made unfunded the same way.
    let broke = format!("broke-{}", hex(3));
    let mut stack = stack;
    stack.extra.insert(
        "payment",
        vec![("UNFUNDED_USERS".into(), format!("broke,{broke}"))],
    );
    stack.take_service(Kind::Payment).terminate().await;
    stack.start_service(Kind::Payment);

    let inbox = Inbox::connect(stack.hub(), &stack.secret, &broke, Transport::Sse).await;
    let order = stack.place_order(&broke, 100).await;
    inbox.wait_status(&order, "PAYMENT_FAILED").await;
    assert_eq!(inbox.statuses(&order), ["CREATED", "PAYMENT_FAILED"]);

    // The delivery service has seen the failed payment, and made nothing of it.
    let delivery = stack.db(Kind::Delivery);
    eventually("delivery service consumed the payment", STEP, || async {
        (delivery
            .count(
                "SELECT count(*) FROM processed_events WHERE consumer = $1",
                "delivery-service",
            )
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert_eq!(
        delivery
            .count(
                "SELECT count(*) FROM deliveries WHERE order_id = $1",
                &order
            )
            .await,
        0
    );
    let payment = stack.db(Kind::Payment);
    assert_eq!(
        payment.count("SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'INSUFFICIENT_FUNDS'", &order).await,
        1
    );
    // The order stays failed.
    let (_, body) = get(
        &stack.service(Kind::Order).url(&format!("/orders/{order}")),
        Some(&stack.token(Kind::Order, &broke)),
    )
    .await;
    assert_eq!(body["status"], "PAYMENT_FAILED");
    assert_eq!(inbox.statuses(&order), ["CREATED", "PAYMENT_FAILED"]);
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_api_takes_the_user_from_the_token_and_explains_bad_input() {
    let mut stack = Stack::prepare("saga-api").await;
    stack.start_service(Kind::Order);
    let url = stack.service(Kind::Order).url("/orders");
    let token = stack.token(Kind::Order, "carol");
    let item = json!({"product_id": "p1", "quantity": 1, "price_cents": 100});
    let cases = [
        (
            json!({"items": [], "delivery_address": "x"}),
            "items: at least one item is required",
        ),
        (
            json!({"items": [item], "delivery_address": ""}),
            "delivery_address: required, at most 500 bytes",
        ),
        (
            json!({"items": [{"product_id": "p1", "quantity": 0, "price_cents": 1}], "delivery_address": "x"}),
            "items[0].quantity: must be 1..=1000",
        ),
    ];
    for (body, reason) in cases {
        let (status, answer) = post(&url, Some(&token), &body).await;
        assert_eq!((status, answer), (400, json!({"error": reason})));
    }
    // The user is never taken from the body.
    let (status, answer) = post(
        &url,
        Some(&token),
        &json!({"items": [item], "delivery_address": "x", "user_id": "mallory"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown field `user_id`"),
        "{answer}"
    );
    // Malformed JSON, no token, a token signed with another secret.
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 400);
    let (status, answer) = post(&url, None, &json!({})).await;
    assert_eq!(
        (status, answer),
        (401, json!({"error": "missing Authorization: Bearer token"}))
    );
    let forged = token_for(&hex(24), "carol", Some("orders"));
    let (status, answer) = post(
        &url,
        Some(&forged),
        &json!({"items": [item], "delivery_address": "x"}),
    )
    .await;
    assert_eq!(
        (status, answer),
        (401, json!({"error": "bad token signature"}))
    );
    // A retried request with the same Idempotency-Key gets the first order, not a second one.
    let order = json!({"items": [item], "delivery_address": "x"});
    let send = |key: &'static str| {
        reqwest::Client::new()
            .post(&url)
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&order)
            .send()
    };
    let first = send("retry-1").await.expect("post");
    assert_eq!(first.status(), 201);
    let first: serde_json::Value = first.json().await.expect("json");
    let again = send("retry-1").await.expect("post");
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: serde_json::Value = again.json().await.expect("json");
    assert_eq!(first["order_id"], again["order_id"]);
    let other: serde_json::Value = send("retry-2")
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_ne!(first["order_id"], other["order_id"]);
    let orders = stack.db(Kind::Order);
    assert_eq!(
        orders
            .count("SELECT count(*) FROM orders WHERE user_id = $1", "carol")
            .await,
        2
    );
    // Another user's key is their own.
    let theirs = reqwest::Client::new()
        .post(&url)
        .bearer_auth(stack.token(Kind::Order, "dan"))
        .header("idempotency-key", "retry-1")
        .json(&order)
        .send()
        .await
        .expect("post");
    assert_eq!(theirs.status(), 201);
    let theirs: serde_json::Value = theirs.json().await.expect("json");
    assert_ne!(theirs["order_id"], first["order_id"]);
    // Nothing else was written: every refused request above left no order.
    assert_eq!(
        orders
            .count("SELECT count(*) FROM orders WHERE user_id <> $1", "")
            .await,
        3
    );
    stack.cleanup().await;
}
