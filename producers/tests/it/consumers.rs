//! Every consumer is idempotent (the same event twice makes one effect) and sends what it
//! cannot handle to `<topic>.dlq`, moving on.

use proto::delivery::v1::{DeliveryStatus, DeliveryStatusUpdated};
use proto::moderation::v1::{ModerationTask, TargetType};
use proto::orders::v1::{OrderCreated, OrderItem};
use proto::payments::v1::{PaymentCompleted, PaymentStatus};
use test_support::hex;
use test_support::wait::eventually;

use crate::helpers::STEP;
use crate::helpers::kafka::{produce, read_topic};
use crate::helpers::processes::{Kind, ServiceProcess};
use crate::helpers::stack::Stack;

/// Produces `value` twice under `key`, once as protobuf and once as JSON.
async fn twice<T: prost::Message + serde::Serialize + prost::Name>(
    topic: &str,
    key: &str,
    event: &T,
) {
    produce(topic, key, &proto::encode_protobuf(event), &[]).await;
    let json = proto::encode_json(event).expect("json");
    produce(topic, key, &json, &[("content-type", "application/json")]).await;
}

async fn consumed(service: &ServiceProcess, topic: &str, outcome: &str) -> f64 {
    service
        .metric(
            "producers_events_consumed_total",
            &[("topic", topic), ("outcome", outcome)],
        )
        .await
}

async fn wait_consumed(service: &ServiceProcess, topic: &str, outcome: &str, want: f64) {
    eventually(&format!("{topic} {outcome} = {want}"), STEP, || async {
        (consumed(service, topic, outcome).await >= want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_given_the_same_event_twice_makes_one_effect() {
    let mut stack = Stack::prepare("consumers-idempotent").await;
    // A slow delivery pace keeps the stepper out of the way of the counts below.
    stack
        .extra
        .insert("delivery", vec![("STEP_INTERVAL".into(), "1h".into())]);
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery, Kind::Moderation] {
        stack.start_service(kind);
    }
    let t = |name: &str| stack.topics.name(name);
    let user = format!("gina-{}", hex(3));

    // Payment: one order announced twice → one debit, one payment.completed.
    let order_id = uuid::Uuid::now_v7().to_string();
    let created = OrderCreated {
        event_id: "evt-created-1".into(),
        order_id: order_id.clone(),
        user_id: user.clone(),
        items: vec![OrderItem {
            product_id: "p1".into(),
            quantity: 1,
            price_cents: 700,
        }],
        total_cents: 700,
        delivery_address: "x".into(),
        occurred_at: None,
    };
    twice(&t("order.created"), &order_id, &created).await;
    let payment = stack.service(Kind::Payment);
    wait_consumed(payment, &t("order.created"), "duplicate", 1.0).await;
    assert_eq!(consumed(payment, &t("order.created"), "applied").await, 1.0);
    let db = stack.db(Kind::Payment);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM payments WHERE order_id = $1",
            &order_id
        )
        .await,
        1
    );
    let balance: i64 = sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE user_id = $1")
        .bind(&user)
        .fetch_one(&db.pool)
        .await
        .expect("account");
    assert_eq!(balance, 10_000_000 - 700);
    let paid = read_topic(&t("payment.completed"), |r| {
        r.iter().any(|r| r.key_text() == order_id)
    })
    .await;

    // Delivery: the same payment twice → one delivery. (The real payment event above also
    // reaches it: that one creates the delivery, the two copies below are duplicates of it.)
    let payment_event: PaymentCompleted = proto::decode_protobuf(
        paid.iter()
            .find(|r| r.key_text() == order_id)
            .expect("payment")
            .value(),
    )
    .expect("decodes");
    assert_eq!(payment_event.status(), PaymentStatus::Success);
    twice(&t("payment.completed"), &order_id, &payment_event).await;
    let delivery = stack.service(Kind::Delivery);
    wait_consumed(delivery, &t("payment.completed"), "duplicate", 2.0).await;
    assert_eq!(
        consumed(delivery, &t("payment.completed"), "applied").await,
        1.0
    );
    assert_eq!(
        stack
            .db(Kind::Delivery)
            .count(
                "SELECT count(*) FROM deliveries WHERE order_id = $1",
                &order_id
            )
            .await,
        1
    );

    // Order service: a real order; its payment and a delivery step, each twice → one change each.
    let order = stack.place_order(&user, 10).await;
    let paid = PaymentCompleted {
        event_id: "evt-paid-1".into(),
        order_id: order.clone(),
        user_id: user.clone(),
        status: PaymentStatus::Success.into(),
        amount_cents: 20,
        occurred_at: None,
    };
    twice(&t("payment.completed"), &order, &paid).await;
    let step = DeliveryStatusUpdated {
        event_id: "evt-step-1".into(),
        delivery_id: "d1".into(),
        order_id: order.clone(),
        user_id: user.clone(),
        status: DeliveryStatus::InTransit.into(),
        occurred_at: None,
    };
    twice(&t("delivery.status.updated"), &order, &step).await;
    let orders = stack.service(Kind::Order);
    wait_consumed(orders, &t("delivery.status.updated"), "duplicate", 1.0).await;
    // The order service also consumed the real payment of the first order above (unknown to
    // it: that one went to the DLQ). Its own order's payment: one applied, one duplicate.
    let changes = read_topic(&t("order.status.changed"), |r| {
        r.iter().filter(|r| r.key_text() == order).count() >= 3
    })
    .await;
    let statuses: Vec<String> = changes
        .iter()
        .filter(|r| r.key_text() == order)
        .map(|r| {
            let e: proto::orders::v1::OrderStatusChanged =
                proto::decode_protobuf(r.value()).expect("decodes");
            e.status().short_name().to_owned()
        })
        .collect();
    assert_eq!(statuses, ["CREATED", "PAID", "IN_TRANSIT"]);
    let history = stack
        .db(Kind::Order)
        .count(
            "SELECT count(*) FROM order_status_history WHERE order_id::text = $1",
            &order,
        )
        .await;
    assert_eq!(history, 3);

    // Moderation worker: one task twice → one decision, one result.
    let task = ModerationTask {
        event_id: "evt-task-1".into(),
        report_id: "r-1".into(),
        reporter_id: user.clone(),
        target_type: TargetType::Ad.into(),
        target_id: "ad-1".into(),
        target_owner_id: "owner-1".into(),
        reason: "a scam".into(),
        occurred_at: None,
    };
    twice(&t("moderation.tasks"), "r-1", &task).await;
    let moderation = stack.service(Kind::Moderation);
    wait_consumed(moderation, &t("moderation.tasks"), "duplicate", 1.0).await;
    assert_eq!(
        stack
            .db(Kind::Moderation)
            .count("SELECT count(*) FROM decisions WHERE report_id = $1", "r-1")
            .await,
        1
    );
    let results = read_topic(&t("moderation.results"), |r| !r.is_empty()).await;
    assert_eq!(results.iter().filter(|r| r.key_text() == "r-1").count(), 1);
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_handled_goes_to_the_dlq_and_the_partition_moves_on() {
    let mut stack = Stack::prepare("consumers-dlq").await;
    stack.start_service(Kind::Payment);
    let topic = stack.topics.name("order.created");
    let key = "same-partition";
    produce(&topic, key, b"\x08\xff\xff garbage", &[]).await;
    produce(
        &topic,
        key,
        br#"{"eventId": "e", "orderId": "o", "userId": "u", "totalCents": "-5"}"#,
        &[("content-type", "application/json")],
    )
    .await;
    // A valid event under a content type nobody decodes: refused, not guessed at (the
    // workspace's one content-type rule, shared with the hub's ingest).
    let mistyped = OrderCreated {
        event_id: "evt-mistyped".into(),
        order_id: "order-mistyped".into(),
        user_id: format!("hank-{}", hex(3)),
        total_cents: 5,
        ..Default::default()
    };
    produce(
        &topic,
        key,
        &proto::encode_protobuf(&mistyped),
        &[("content-type", "text/plain")],
    )
    .await;
    let good = OrderCreated {
        event_id: "evt-good".into(),
        order_id: "order-after-poison".into(),
        user_id: format!("hank-{}", hex(3)),
        total_cents: 5,
        ..Default::default()
    };
    produce(&topic, key, &proto::encode_protobuf(&good), &[]).await;
    let db = stack.db(Kind::Payment);
    eventually(
        "the record after the poison ones is handled",
        STEP,
        || async {
            (db.count(
                "SELECT count(*) FROM payments WHERE order_id = $1",
                "order-after-poison",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    let dlq = read_topic(&format!("{topic}.dlq"), |r| r.len() >= 3).await;
    assert_eq!(dlq.len(), 3);
    assert!(
        dlq[0].headers["dlq-error"].starts_with("undecodable"),
        "{:?}",
        dlq[0].headers
    );
    assert_eq!(dlq[1].headers["dlq-error"], "negative total -5");
    assert!(
        dlq[2].headers["dlq-error"].starts_with("bad content-type: ")
            && dlq[2].headers["dlq-error"].contains("text/plain"),
        "{:?}",
        dlq[2].headers
    );
    assert_eq!(dlq[2].headers["content-type"], "text/plain");
    assert_eq!(
        db.count(
            "SELECT count(*) FROM payments WHERE order_id = $1",
            "order-mistyped"
        )
        .await,
        0
    );
    for r in &dlq {
        assert_eq!(r.key_text(), key);
        assert_eq!(r.headers["dlq-source-topic"], topic);
        assert!(r.headers.contains_key("dlq-source-partition"));
        assert!(r.headers.contains_key("dlq-source-offset"));
    }
    assert_eq!(
        stack
            .service(Kind::Payment)
            .metric("producers_events_consumed_total", &[("outcome", "dlq")])
            .await,
        3.0
    );
    stack.cleanup().await;
}
