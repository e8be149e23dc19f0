//! Ingest on a replicated Kafka: the three-broker cluster of `infra/local/kafka.sh
//! cluster-start` (brokers from `HUB_TEST_KAFKA_CLUSTER_BROKERS`; `make test` starts it), with
//! topics of 6 partitions replicated 3 times and `min.insync.replicas` 2. A broker killed with
//! SIGKILL while events are produced and ingested, and `hub ingest` processes joining and
//! leaving their group mid-stream, must not cost a client a notification nor give it one twice.
//!
//! The tests hold the cluster alone (`KafkaCluster::acquire`): one kills a broker, and the
//! other must not see that happen under it. The cluster missing fails them.

use std::sync::Arc;
use std::time::Duration;

use test_support::cluster::KafkaCluster;
use test_support::process::Signal;
use tokio::time::Instant;

use crate::helpers::kafka::{Topic, produce, producer_on, stream_on};
use crate::helpers::processes::IngestProcess;
use crate::helpers::redis::redis_url;
use crate::ingest::{
    Client, LIFECYCLE, Plan, Setup, assert_exactly, connect_all, count, finish, ingested,
    order_route, wait_received, ws_received,
};

/// Partitions of the test topics: more than the ingest processes, so each owns some.
const PARTITIONS: i32 = 6;

/// How long the clients may take to get everything, failover and rebalances included.
const DELIVERY_LIMIT: Duration = Duration::from_secs(60);

/// Waits until the WebSocket clients (one per user) have `want` notifications in total.
async fn wait_ws_received(clients: &[Client], want: usize, what: &str) {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    while ws_received(clients) < want {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {want} notifications within {limit:?}",
            ws_received(clients)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_while_events_are_produced_and_ingested_costs_no_notification_and_repeats_none()
 {
    // An ingesting node (clients' WebSockets on it) and a serving node (their SSE streams)
    // share a Redis prefix. 60 orders of 12 users go through four statuses while the broker
    // leading partition 0 is killed: producers and the consumer move to the new leaders. The
    // broker comes back, catches up, and the last status of every order follows.
    let cluster = KafkaCluster::acquire().await;
    let topic = Topic::create_replicated(&cluster, "it-replicated", PARTITIONS).await;
    let setup = Setup::with_topic(redis_url(), topic, order_route);
    let name = setup.topic.name.clone();
    let a = setup.ingest_node().await;
    let b = setup.node().await;
    let (a_app, b_app) = (Arc::new(a.as_app()), Arc::new(b.as_app()));
    let plan = Plan::new(12, 5);
    let clients = connect_all(&plan.users(), &a_app, &b_app).await;
    let streamed = plan.changes(0..LIFECYCLE.len() - 1);
    let last = plan.changes(LIFECYCLE.len() - 1..LIFECYCLE.len());
    let everything = plan.changes(0..LIFECYCLE.len());

    // 240 events in batches of 4, 50 ms apart: the stream lasts about 3 s and more while the
    // producer waits for the new leaders.
    let producing = stream_on(
        &setup.brokers,
        &name,
        plan.protobuf(&streamed),
        4,
        Duration::from_millis(50),
    );
    wait_ws_received(&clients, streamed.len() / 4, "before the kill").await;
    let victim = cluster.leader(&name, 0).await;
    assert!(
        !producing.is_finished(),
        "the stream ended before the kill: the test would prove nothing"
    );
    cluster.kill(victim, &name).await;

    // With two brokers of three, everything streamed arrives.
    producing.await.expect("producer task");
    let before_restart = plan.expected(&streamed);
    wait_received(&clients, |u| count(&before_restart, u), DELIVERY_LIMIT).await;

    cluster.restart(&name, PARTITIONS).await;
    produce(&producer_on(&setup.brokers), &name, &plan.protobuf(&last)).await;

    let expected = plan.expected(&everything);
    wait_received(&clients, |u| count(&expected, u), DELIVERY_LIMIT).await;
    let seen = finish(&b_app, clients).await;
    assert_exactly(&seen, &expected, "order.status", false);
    assert_eq!(
        ingested(&a_app, &name, "published").await,
        everything.len() as f64,
        "every event published once (records read again count as duplicates)"
    );
    assert_eq!(
        ingested(&a_app, &name, "dlq").await,
        0.0,
        "nothing to the DLQ"
    );
    drop((a, b));
    setup.topic.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_ingest_processes_on_six_partitions_one_added_and_one_killed_mid_stream_deliver_each_event_once()
 {
    // Three `hub ingest` processes share one consumer group on a 6-partition topic and publish
    // into Redis; the clients are on a serving node. Mid-stream a fourth process joins, then
    // one of the first three is killed (SIGKILL): its partitions go to the others after the
    // session timeout, and what it had published but not committed is read again, which the
    // event ids must absorb.
    let cluster = KafkaCluster::acquire().await;
    let topic = Topic::create_replicated(&cluster, "it-replicated", PARTITIONS).await;
    let setup = Setup::with_topic(redis_url(), topic, order_route);
    let name = setup.topic.name.clone();
    let mut ingest_env = vec![
        ("HUB_REDIS_URL", setup.redis.as_str()),
        ("HUB_REDIS_PREFIX", &setup.prefix),
        ("HUB_REDIS_TIMEOUT", "500ms"),
    ];
    ingest_env.extend(setup.kafka_env());
    let mut ingests: Vec<IngestProcess> =
        (0..3).map(|_| IngestProcess::start(&ingest_env)).collect();
    let b = setup.node().await;
    let b_app = Arc::new(b.as_app());
    let plan = Plan::new(12, 6);
    let clients = connect_all(&plan.users(), &b_app, &b_app).await;
    let group_limit = Duration::from_secs(30);
    cluster
        .wait_group_members(&setup.group, 3, group_limit)
        .await;

    let streamed = plan.changes(0..LIFECYCLE.len() - 1);
    let last = plan.changes(LIFECYCLE.len() - 1..LIFECYCLE.len());
    let everything = plan.changes(0..LIFECYCLE.len());
    // 288 events in batches of 2, 40 ms apart: about 6 s of stream.
    let producing = stream_on(
        &setup.brokers,
        &name,
        plan.protobuf(&streamed),
        2,
        Duration::from_millis(40),
    );
    wait_ws_received(&clients, streamed.len() / 5, "before the fourth process").await;
    ingests.push(IngestProcess::start(&ingest_env));
    cluster
        .wait_group_members(&setup.group, 4, group_limit)
        .await;

    wait_ws_received(&clients, streamed.len() * 2 / 5, "before the kill").await;
    assert!(
        !producing.is_finished(),
        "the stream ended before the kill: the test would prove nothing"
    );
    let mut killed = ingests.remove(0);
    killed.signal(Signal::SIGKILL);
    killed
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the killed process exits");
    // Its partitions move to the other three once the group notices (session timeout).
    cluster
        .wait_group_members(&setup.group, 3, group_limit)
        .await;

    producing.await.expect("producer task");
    produce(&producer_on(&setup.brokers), &name, &plan.protobuf(&last)).await;
    let expected = plan.expected(&everything);
    wait_received(&clients, |u| count(&expected, u), DELIVERY_LIMIT).await;
    let seen = finish(&b_app, clients).await;
    assert_exactly(&seen, &expected, "order.status", false);

    for mut ingest in ingests {
        ingest.signal(Signal::SIGTERM);
        let status = ingest
            .wait_exit(Duration::from_secs(20))
            .await
            .expect("hub ingest stops on SIGTERM");
        assert!(status.success(), "hub ingest exits cleanly: {status}");
    }
    drop(b);
    setup.topic.delete().await;
}
