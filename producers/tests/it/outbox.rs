//! The transactional outbox: an order committed but not yet published survives a kill -9 of
//! the order service, and events wait in the table while Kafka is unreachable.

use crate::helpers::*;

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
    assert_eq!(
        orders
            .count("SELECT count(*) FROM outbox WHERE key = $1", &order)
            .await,
        0
    );
    // Kafka got each event once.
    let created = read_topic(&stack.topics.name("order.created"), |r| !r.is_empty()).await;
    assert_eq!(created.iter().filter(|r| r.key == order).count(), 1);
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

    // Kafka "comes back": the same database with a reachable broker publishes the backlog.
    stack.take_service(Kind::Order).terminate();
    stack.extra.remove("order");
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery] {
        stack.start_service(kind);
    }
    for order in [&first, &second] {
        inbox.wait_status(order, "DELIVERED").await;
        assert_eq!(inbox.statuses(order), DELIVERED_PATH);
    }
    assert_eq!(
        orders
            .count("SELECT count(*) FROM outbox WHERE key <> $1", "")
            .await,
        0
    );
    stack.cleanup().await;
}
