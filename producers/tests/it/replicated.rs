//! The saga on a replicated Kafka: the three-broker cluster of `infra/local/kafka.sh
//! cluster-start` (brokers from `HUB_TEST_KAFKA_CLUSTER_BROKERS`; `make test` starts it),
//! every topic replicated 3 times with `min.insync.replicas` 2. A broker killed with SIGKILL in
//! the middle of many orders' flows, and brought back, must cost no order a status and give
//! none a status twice. The cluster missing fails the test.

use std::time::Duration;

use test_support::cluster::KafkaCluster;
use test_support::hex;

use crate::helpers::clients::{Inbox, Transport};
use crate::helpers::processes::Kind;
use crate::helpers::stack::{DELIVERED_PATH, Stack};

/// How long an order may take to complete across a failover.
const RECOVERY: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_in_the_middle_of_the_saga_costs_no_order_a_status_and_repeats_none() {
    let cluster = KafkaCluster::acquire().await;
    let mut stack = Stack::prepare_replicated("replicated-broker-kill", &cluster).await;
    stack.start_hub().await;
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery] {
        // A publish that fails (its partition between leaders) gives up after 5 s and is
        // retried from the outbox.
        stack
            .extra
            .insert(kind.name(), vec![("KAFKA_TIMEOUT".into(), "5s".into())]);
        stack.start_service(kind);
    }
    let users: Vec<String> = (0..4).map(|i| format!("rita{i}-{}", hex(3))).collect();
    let mut inboxes = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let transport = if i % 2 == 0 {
            Transport::Ws
        } else {
            Transport::Sse
        };
        inboxes.push(Inbox::connect(stack.hub(), &stack.secret, u, transport).await);
    }
    // (user index, order id) of every order placed.
    let mut orders: Vec<(usize, String)> = Vec::new();
    for round in 0..2 {
        for (i, u) in users.iter().enumerate() {
            orders.push((i, stack.place_order(u, 100 + round).await));
        }
    }

    // The broker leading the first partition of order.created dies while the first orders are
    // between their statuses; orders keep coming in during the failover.
    inboxes[0].wait_status(&orders[0].1, "PAID").await;
    let created = stack.topics.name("order.created");
    let victim = cluster.leader(&created, 0).await;
    let unfinished = orders
        .iter()
        .filter(|(i, o)| !inboxes[*i].statuses(o).iter().any(|s| s == "DELIVERED"))
        .count();
    assert!(
        unfinished > 0,
        "every order was delivered before the kill: the test would prove nothing"
    );
    cluster.kill(victim, &created).await;
    for round in 2..4 {
        for (i, u) in users.iter().enumerate() {
            orders.push((i, stack.place_order(u, 100 + round).await));
        }
    }
    // With two brokers of three, the flows go on; then the broker comes back with its data.
    for (i, order) in &orders {
        inboxes[*i]
            .wait_status_within(order, "DELIVERED", RECOVERY)
            .await;
    }
    cluster
        .restart(&created, test_support::kafka::PARTITIONS)
        .await;
    for (i, u) in users.iter().enumerate() {
        orders.push((i, stack.place_order(u, 200).await));
    }
    for (i, order) in &orders {
        inboxes[*i]
            .wait_status_within(order, "DELIVERED", RECOVERY)
            .await;
    }

    // Nothing is on its way any more: every service and the hub have committed the end of
    // what they read, in the saga's order. Only then is "no status twice" a fact.
    let groups = [
        (Kind::Payment.name(), "order.created"),
        (Kind::Delivery.name(), "payment.completed"),
        (Kind::Order.name(), "payment.completed"),
        (Kind::Order.name(), "delivery.status.updated"),
        ("hub", "order.status.changed"),
    ];
    for (group, topic) in groups {
        let group = format!("{}{group}", stack.topics.prefix);
        cluster
            .wait_caught_up(&group, &stack.topics.name(topic), RECOVERY)
            .await;
    }
    let mut problems = Vec::new();
    for (i, order) in &orders {
        let got = inboxes[*i].statuses(order);
        if got != DELIVERED_PATH {
            problems.push(format!("user {i}, order {order}: {got:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} orders did not get each status once, in order:\n{}",
        problems.len(),
        orders.len(),
        problems.join("\n")
    );
    stack.cleanup().await;
}
