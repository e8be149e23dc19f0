//! The transactional outbox: an order committed but not yet published survives a kill -9 of
//! the order service, and events wait in the table while Kafka is unreachable.

use std::time::Duration;

use test_support::hex;
use test_support::wait::eventually;

use crate::helpers::STEP;
use crate::helpers::clients::{Inbox, Transport};
use crate::helpers::http::{get, post};
use crate::helpers::kafka::{PrivateKafka, read_topic};
use crate::helpers::processes::{Kind, ServiceProcess};
use crate::helpers::stack::{DELIVERED_PATH, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_committed_before_a_kill_9_is_published_after_the_restart_exactly_once() {
    let mut stack = Stack::prepare("outbox-kill9").await;
    stack.start_hub().await;
    for kind in [Kind::Payment, Kind::Delivery] {
        stack.start_service(kind);
    }
    // The relay is off: the order is committed with its events, and nothing is published,
    // exactly the state of a process killed between the commit and the publish.
    stack
        .extra
        .insert("order", vec![("OUTBOX_RELAY".into(), "false".into())]);
    stack.start_service(Kind::Order);
    let user = format!("dave-{}", hex(3));
    let inbox = Inbox::connect(stack.hub(), &stack.secret, &user, Transport::Ws).await;
    let order = stack.place_order(&user, 500).await;
    let orders = stack.db(Kind::Order);
    assert_eq!(
        orders
            .count("SELECT count(*) FROM outbox WHERE key = $1", &order)
            .await,
        2
    );
    stack.take_service(Kind::Order).kill9();
    assert!(inbox.of_type("order.status").is_empty());

    stack.extra.remove("order");
    stack.start_service(Kind::Order);
    inbox.wait_status(&order, "DELIVERED").await;
    assert_eq!(inbox.statuses(&order), DELIVERED_PATH);
    // The relay deletes a row when Kafka has acknowledged it, so the last status can reach
    // the user a moment before its row is gone.
    eventually("the order's outbox rows deleted", STEP, || async {
        (orders
            .count("SELECT count(*) FROM outbox WHERE key = $1", &order)
            .await
            == 0)
            .then_some(())
    })
    .await;
    // Kafka got each event once.
    let created = read_topic(&stack.topics.name("order.created"), |r| !r.is_empty()).await;
    assert_eq!(created.iter().filter(|r| r.key_text() == order).count(), 1);
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_in_the_middle_of_many_flows_loses_and_repeats_nothing() {
    let mut stack = Stack::start("outbox-kill9-flows").await;
    let users: Vec<String> = (0..6).map(|i| format!("erin{i}-{}", hex(3))).collect();
    let mut inboxes = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let t = if i % 2 == 0 {
            Transport::Ws
        } else {
            Transport::Sse
        };
        inboxes.push(Inbox::connect(stack.hub(), &stack.secret, u, t).await);
    }
    let mut orders = Vec::new();
    for u in &users {
        orders.push(stack.place_order(u, 250).await);
    }
    // Kill while the flows are under way (after some PAID), then restart.
    inboxes[0].wait_status(&orders[0], "PAID").await;
    stack.take_service(Kind::Order).kill9();
    stack.start_service(Kind::Order);
    for u in &users {
        orders.push(stack.place_order(u, 250).await);
    }
    for (i, inbox) in inboxes.iter().enumerate() {
        for order in [&orders[i], &orders[i + users.len()]] {
            inbox.wait_status(order, "DELIVERED").await;
            assert_eq!(
                inbox.statuses(order),
                DELIVERED_PATH,
                "user {i} order {order}"
            );
        }
    }
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_kafka_is_unreachable_events_wait_in_the_outbox_and_the_api_keeps_working() {
    let mut stack = Stack::prepare("outbox-kafka-down").await;
    stack.start_hub().await;
    // A port nothing listens on stands for a Kafka that is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr").to_string();
    drop(closed);
    stack.extra.insert(
        "order",
        vec![
            ("KAFKA_BROKERS".into(), dead),
            ("KAFKA_TIMEOUT".into(), "300ms".into()),
        ],
    );
    stack.start_service(Kind::Order);
    let user = format!("frank-{}", hex(3));
    let inbox = Inbox::connect(stack.hub(), &stack.secret, &user, Transport::Sse).await;
    let first = stack.place_order(&user, 100).await;
    let second = stack.place_order(&user, 100).await;
    let service = stack.service(Kind::Order);
    eventually("publish attempts failed", STEP, || async {
        (service
            .metric("producers_outbox_publish_failures_total", &[])
            .await
            >= 2.0)
            .then_some(())
    })
    .await;
    let orders = stack.db(Kind::Order);
    assert_eq!(
        orders
            .count(
                "SELECT count(*) FROM outbox WHERE topic LIKE '%' || $1",
                "order.created"
            )
            .await,
        2
    );
    let (status, _) = get(&service.url("/healthz"), None).await;
    assert_eq!(status, 200);
    // Operators see the backlog.
    eventually("the backlog is reported", STEP, || async {
        (service.metric("producers_outbox_waiting", &[]).await == 4.0).then_some(())
    })
    .await;
    assert!(
        service
            .metric("producers_outbox_oldest_age_seconds", &[])
            .await
            > 0.0
    );

    // Kafka "comes back": the same database with a reachable broker publishes the backlog.
    // SIGTERM with Kafka down: a clean exit all the same.
    let status = stack.take_service(Kind::Order).terminate().await;
    assert!(status.success(), "exit status {status}");
    stack.extra.remove("order");
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery] {
        stack.start_service(kind);
    }
    for order in [&first, &second] {
        inbox.wait_status(order, "DELIVERED").await;
        assert_eq!(inbox.statuses(order), DELIVERED_PATH);
    }
    eventually("the backlog's outbox rows deleted", STEP, || async {
        (orders
            .count("SELECT count(*) FROM outbox WHERE key <> $1", "")
            .await
            == 0)
            .then_some(())
    })
    .await;
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_restart_in_the_middle_of_the_flow_loses_and_repeats_nothing() {
    let kafka = PrivateKafka::start().await;
    let mut stack = Stack::prepare_on("outbox-kafka-restart", &kafka.brokers()).await;
    stack.start_hub().await;
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery] {
        // Failed publishes give up after 2 s and are retried from the outbox.
        stack
            .extra
            .insert(kind.name(), vec![("KAFKA_TIMEOUT".into(), "2s".into())]);
        stack.start_service(kind);
    }
    let user = format!("olga-{}", hex(3));
    let inbox = Inbox::connect(stack.hub(), &stack.secret, &user, Transport::Sse).await;
    let before = stack.place_order(&user, 100).await;
    inbox.wait_status(&before, "PAID").await;

    // Kafka goes down mid-flow; orders are still accepted, their events wait in the outbox.
    kafka.stop().await;
    let mut during = Vec::new();
    for _ in 0..3 {
        during.push(stack.place_order(&user, 100).await);
    }
    let order_service = stack.service(Kind::Order);
    eventually("publishes failed while Kafka was down", STEP, || async {
        (order_service
            .metric("producers_outbox_publish_failures_total", &[])
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    let waiting = stack
        .db(Kind::Order)
        .count("SELECT count(*) FROM outbox WHERE key <> $1", "")
        .await;
    assert!(
        waiting >= 6,
        "3 orders × 2 events wait in the outbox, found {waiting}"
    );

    kafka.resume().await;
    // Consumers and the hub reconnect by themselves; every order completes, each status once.
    let recovery = Duration::from_secs(60);
    for order in std::iter::once(&before).chain(&during) {
        inbox.wait_status_within(order, "DELIVERED", recovery).await;
        assert_eq!(inbox.statuses(order), DELIVERED_PATH, "order {order}");
    }
    stack.cleanup().await;
    drop(kafka);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_order_service_processes_share_the_outbox_and_each_orders_events_stay_in_order() {
    let stack = Stack::start("outbox-two-relays").await;
    // A second process on the same database: a second relay and a second group member.
    let log = stack.out.join("order-2.log");
    let second = ServiceProcess::start(Kind::Order, &stack.env(Kind::Order), &log);
    let users: Vec<String> = (0..4).map(|i| format!("pia{i}-{}", hex(3))).collect();
    let mut inboxes = Vec::new();
    for u in &users {
        inboxes.push(Inbox::connect(stack.hub(), &stack.secret, u, Transport::Ws).await);
    }
    let mut orders = Vec::new();
    for (i, u) in users.iter().enumerate() {
        for api in [
            stack.service(Kind::Order).url("/orders"),
            second.url("/orders"),
        ] {
            let (status, body) = post(
                &api,
                Some(&stack.token(Kind::Order, u)),
                &serde_json::json!({
                    "items": [{"product_id": "p1", "quantity": 1, "price_cents": 10}],
                    "delivery_address": "x",
                }),
            )
            .await;
            assert_eq!(status, 201, "{body}");
            orders.push((i, body["order_id"].as_str().expect("id").to_owned()));
        }
    }
    for (i, order) in &orders {
        inboxes[*i].wait_status(order, "DELIVERED").await;
        assert_eq!(inboxes[*i].statuses(order), DELIVERED_PATH, "order {order}");
    }
    drop(second);
    stack.cleanup().await;
}
