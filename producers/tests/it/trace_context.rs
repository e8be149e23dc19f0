//! W3C trace context across the saga: the `traceparent` given to `POST /orders` (or a new one)
//! reaches every `order.status.changed` record of the order through the outbox, Kafka headers,
//! and the payment, delivery and order consumers; request ids and trace ids in the JSON logs.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use test_support::hex;

use crate::helpers::kafka::read_topic;
use crate::helpers::processes::Kind;
use crate::helpers::stack::Stack;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// `(trace id, span id)` of a valid version-00 `traceparent`, else `None`.
fn parts(traceparent: &str) -> Option<(String, String)> {
    let fields: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = fields.len() == 4
        && fields[0] == "00"
        && hex(fields[1], 32)
        && hex(fields[2], 16)
        && hex(fields[3], 2)
        && fields[1] != "0".repeat(32)
        && fields[2] != "0".repeat(16);
    ok.then(|| (fields[1].to_owned(), fields[2].to_owned()))
}

/// POST /orders as `user` with extra headers; returns the order id and the response's
/// `x-request-id`.
async fn place(stack: &Stack, user: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut req = reqwest::Client::new()
        .post(stack.service(Kind::Order).url("/orders"))
        .bearer_auth(stack.token(Kind::Order, user))
        .json(&json!({
            "items": [{"product_id": "p1", "quantity": 1, "price_cents": 100}],
            "delivery_address": "1 Trace Street",
        }));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("POST /orders");
    assert_eq!(resp.status(), 201);
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id in the response")
        .to_owned();
    let body: Value = resp.json().await.expect("JSON");
    let order = body["order_id"].as_str().expect("order_id").to_owned();
    (order, request_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_trace_id_reaches_every_status_record_and_its_log_lines() {
    let mut stack = Stack::prepare("trace-context").await;
    stack
        .extra
        .insert("order", vec![("LOG_FORMAT".into(), "json".into())]);
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery] {
        stack.start_service(kind);
    }
    let user = format!("tracy-{}", hex(3));
    let given = format!("00-{TRACE_ID}-{PARENT}-01");
    let (traced, request_id) = place(
        &stack,
        &user,
        &[("traceparent", &given), ("x-request-id", "it-request-1")],
    )
    .await;
    assert_eq!(
        request_id, "it-request-1",
        "the caller's request id is kept"
    );
    let (untraced, fresh_id) = place(&stack, &user, &[]).await;
    assert_eq!(fresh_id.len(), 16, "a fresh request id: {fresh_id}");

    // Both orders walk the whole path: five status records each.
    let topic = stack.topics.name("order.status.changed");
    let records = read_topic(&topic, |rs| {
        [&traced, &untraced]
            .iter()
            .all(|o| rs.iter().filter(|r| &&r.key_text() == o).count() >= 5)
    })
    .await;
    for r in records.iter().filter(|r| r.key_text() == traced) {
        let header = r.headers.get("traceparent").expect("traceparent header");
        let (trace, span) =
            parts(header).unwrap_or_else(|| panic!("invalid traceparent {header:?}"));
        assert_eq!(trace, TRACE_ID, "{header}");
        assert_ne!(span, PARENT, "a span of its own: {header}");
    }
    let traces: BTreeSet<String> = records
        .iter()
        .filter(|r| r.key_text() == untraced)
        .map(|r| {
            let header = r.headers.get("traceparent").expect("traceparent header");
            parts(header)
                .unwrap_or_else(|| panic!("invalid traceparent {header:?}"))
                .0
        })
        .collect();
    assert_eq!(traces.len(), 1, "one trace for the whole order: {traces:?}");
    assert!(!traces.contains(TRACE_ID));

    // order.created carries it too (the payment service continued from it).
    let created = read_topic(&stack.topics.name("order.created"), |rs| {
        rs.iter().any(|r| r.key_text() == traced)
    })
    .await;
    let header = &created
        .iter()
        .find(|r| r.key_text() == traced)
        .expect("order.created")
        .headers["traceparent"];
    assert_eq!(parts(header).map(|p| p.0).as_deref(), Some(TRACE_ID));

    // The order service's JSON log: the creation, in the request's span, names the trace; the
    // status changes name it too.
    let log = std::fs::read_to_string(stack.out.join("order.log")).expect("order log");
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let created_line = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "order created" && l["fields"]["order_id"] == traced.as_str()
        })
        .unwrap_or_else(|| panic!("no JSON line for the creation in:\n{log}"));
    assert_eq!(created_line["fields"]["trace_id"], TRACE_ID);
    assert_eq!(created_line["span"]["request_id"], "it-request-1");
    let changed = lines
        .iter()
        .filter(|l| {
            l["fields"]["message"] == "order status changed"
                && l["fields"]["order_id"] == traced.as_str()
        })
        .count();
    assert!(
        changed >= 4,
        "PAID, IN_TRANSIT, OUT_FOR_DELIVERY, DELIVERED: {changed}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == "order status changed"
                && l["fields"]["order_id"] == traced.as_str())
            .all(|l| l["fields"]["trace_id"] == TRACE_ID)
    );
    stack.cleanup().await;
}
