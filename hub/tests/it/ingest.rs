//! Kafka ingest end to end, against a real local Kafka (`infra/local/kafka.sh start`; brokers
//! from `HUB_TEST_KAFKA_BROKERS`, default 127.0.0.1:9092) and the suite's Redis: order events
//! produced as protobuf (rdkafka, from this test) and as proto3 JSON (`kcat`, an independent
//! client) become notifications that WebSocket and SSE clients get once each, in partition
//! order, with exactly the route's data; poison records go to `<topic>.dlq` and the partition
//! moves on; a killed, stopped or Redis-less ingest loses and duplicates nothing; routes are
//! configuration, and a broken routes file stops the process with one line.
//!
//! Every test creates its own topics (`it-orders-<hex>` and its `.dlq`, 3 partitions; the
//! broker does not auto-create them), consumer group and Redis prefix, and deletes its topics
//! when it passes. The orders, hubs and clients defined here serve `replicated` as well (the
//! same on the three-broker cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use proto::orders::v1::{OrderStatus, OrderStatusChanged};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use test_support::app::order_status_route;
use test_support::files::{TempDir, temp_dir, unrelated_ca, write};
use test_support::kafka::{PARTITIONS, brokers};
use test_support::process::Signal;
use test_support::{STEP, hex};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use crate::helpers::app::{Credentials, TestApp};
use crate::helpers::clients::{Conn, Kind};
use crate::helpers::kafka::{
    Record, Topic, committed, consume, kcat_produce, produce, producer, stream, wait_committed,
};
use crate::helpers::processes::{HubProcess, IngestProcess};
use crate::helpers::redis::{RedisServer, redis_prefix, redis_url};

/// Type of the marker published (through the API) to every user once all expected
/// notifications arrived: whatever a client sees before it is all it gets.
const END: &str = "test.end";
/// The content type of proto3 JSON records.
const JSON: &str = "application/json";
/// The statuses every test order goes through, in the order they are produced.
pub(crate) const LIFECYCLE: [OrderStatus; 5] = [
    OrderStatus::Created,
    OrderStatus::Paid,
    OrderStatus::InTransit,
    OrderStatus::OutForDelivery,
    OrderStatus::Delivered,
];

/// One `OrderStatusChanged` for user `warm-up` on each partition (by number, not by key).
async fn warm_up(producer: &FutureProducer, topic: &str, round: usize) {
    for partition in 0..PARTITIONS {
        let event = OrderStatusChanged {
            event_id: format!("warm-up-{round}-{partition}"),
            order_id: format!("warm-up-{partition}"),
            user_id: "warm-up".to_owned(),
            status: OrderStatus::Created.into(),
            ..Default::default()
        };
        let value = proto::encode_protobuf(&event);
        let record: FutureRecord<'_, (), _> =
            FutureRecord::to(topic).partition(partition).payload(&value);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("warm-up record acknowledged");
    }
}

// ---------------------------------------------------------------------------------------------
// Orders: what is produced and what each user must see.

/// Orders spread over users; order `i` belongs to user `i % users`, key = order id.
pub(crate) struct Plan {
    /// `(order id, user)`.
    orders: Vec<(String, String)>,
}

/// `(order index, step)`: one status change of one order.
pub(crate) type Change = (usize, usize);

/// Per user, per order: the `data` of every notification, in the order produced.
pub(crate) type Expected = BTreeMap<String, BTreeMap<String, Vec<Value>>>;

impl Plan {
    pub(crate) fn new(users: usize, orders_per_user: usize) -> Plan {
        let orders = (0..users * orders_per_user)
            .map(|i| (format!("ord-{i:04}"), format!("buyer-{:02}", i % users)))
            .collect();
        Plan { orders }
    }

    pub(crate) fn users(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.orders.iter().map(|(_, u)| u).collect();
        set.into_iter().cloned().collect()
    }

    /// `(order index, step)` for `steps` of every order, step after step (orders interleave,
    /// each order's statuses stay in lifecycle order).
    pub(crate) fn changes(&self, steps: Range<usize>) -> Vec<Change> {
        steps
            .flat_map(|step| (0..self.orders.len()).map(move |o| (o, step)))
            .collect()
    }

    fn event(&self, order: usize, step: usize) -> OrderStatusChanged {
        let (order_id, user_id) = &self.orders[order];
        OrderStatusChanged {
            event_id: format!("{order_id}-{step}"),
            order_id: order_id.clone(),
            user_id: user_id.clone(),
            status: LIFECYCLE[step].into(),
            previous_status: previous(step).into(),
            occurred_at: Some(proto::timestamp(SystemTime::now())),
        }
    }

    /// Protobuf records (no content-type header) of `changes`.
    pub(crate) fn protobuf(&self, changes: &[Change]) -> Vec<Record> {
        changes
            .iter()
            .map(|&(o, step)| Record {
                key: self.orders[o].0.clone(),
                value: proto::encode_protobuf(&self.event(o, step)),
                content_type: None,
            })
            .collect()
    }

    /// `(key, proto3 JSON)` of `changes`.
    fn json(&self, changes: &[Change]) -> Vec<(String, Vec<u8>)> {
        changes
            .iter()
            .map(|&(o, step)| {
                let value = proto::encode_json(&self.event(o, step)).expect("proto3 JSON");
                (self.orders[o].0.clone(), value)
            })
            .collect()
    }

    /// What every user must get for `changes` (which must keep each order's step order).
    pub(crate) fn expected(&self, changes: &[Change]) -> Expected {
        let mut out = Expected::new();
        for &(o, step) in changes {
            let (order_id, user) = &self.orders[o];
            out.entry(user.clone())
                .or_default()
                .entry(order_id.clone())
                .or_default()
                .push(order_data(order_id, step));
        }
        out
    }
}

fn previous(step: usize) -> OrderStatus {
    match step {
        0 => OrderStatus::Unspecified,
        n => LIFECYCLE[n - 1],
    }
}

/// The `data` the order route selects: exactly these three fields, enums by short name.
fn order_data(order_id: &str, step: usize) -> Value {
    json!({
        "order_id": order_id,
        "status": LIFECYCLE[step].short_name(),
        "previous_status": previous(step).short_name(),
    })
}

pub(crate) fn count(expected: &Expected, user: &str) -> usize {
    expected
        .get(user)
        .map_or(0, |o| o.values().map(Vec::len).sum())
}

// ---------------------------------------------------------------------------------------------
// Hubs and routes.

/// The built-in order route, on another topic.
pub(crate) fn order_route(topic: &str) -> String {
    order_status_route("it-orders", topic)
}

/// Everything a test's hubs share: credentials, Redis prefix, consumer group, topic, routes.
pub(crate) struct Setup {
    pub(crate) creds: Credentials,
    pub(crate) redis: String,
    pub(crate) prefix: String,
    pub(crate) group: String,
    pub(crate) brokers: String,
    routes: String,
    pub(crate) topic: Topic,
    _dir: TempDir,
}

impl Setup {
    /// A fresh topic named after `stem`, with `routes(topic)` as the routes file.
    async fn new(redis: String, stem: &str, routes: impl Fn(&str) -> String) -> Setup {
        Setup::with_topic(redis, Topic::create(stem).await, routes)
    }

    /// The same with a topic created by the caller (on the Kafka it names).
    pub(crate) fn with_topic(
        redis: String,
        topic: Topic,
        routes: impl Fn(&str) -> String,
    ) -> Setup {
        let dir = temp_dir("hub-it-ingest");
        let routes = write(dir.path(), "routes.toml", &routes(&topic.name));
        Setup {
            creds: Credentials::random(),
            redis,
            prefix: redis_prefix(),
            group: format!("it-ingest-{}", hex(5)),
            brokers: topic.brokers.clone(),
            routes,
            topic,
            _dir: dir,
        }
    }

    /// A serving node without Kafka.
    pub(crate) fn node_env(&self) -> Vec<(&str, &str)> {
        vec![
            ("HUB_REDIS_URL", &self.redis),
            ("HUB_REDIS_PREFIX", &self.prefix),
            ("HUB_REDIS_TIMEOUT", "500ms"),
            ("HUB_HISTORY_SIZE", "1000"),
            ("HUB_DRAIN_WINDOW", "100ms"),
            // Idle clients hear from the node often (the clients give up after 10 s of silence).
            ("HUB_PING_INTERVAL", "1s"),
        ]
    }

    /// Kafka ingest settings.
    pub(crate) fn kafka_env(&self) -> Vec<(&str, &str)> {
        vec![
            ("HUB_KAFKA_BROKERS", &self.brokers),
            ("HUB_KAFKA_GROUP", &self.group),
            ("HUB_INGEST_ROUTES", &self.routes),
            // Only the test's topic: the shared built-in topics may hold anything (e.g. what
            // `make demo` produced), which every fresh group would read first.
            ("HUB_INGEST_BUILTIN_ROUTES", "false"),
        ]
    }

    /// A serving node that also ingests, its partitions' batches lingering 5 ms for more
    /// records (the `hub ingest` processes of these tests take what is ready at once).
    fn ingest_node_env(&self) -> Vec<(&str, &str)> {
        let mut env = self.node_env();
        env.extend(self.kafka_env());
        env.push(("HUB_INGEST_MAX_RECORD_BYTES", "4096"));
        env.push(("HUB_INGEST_LINGER", "5ms"));
        env
    }

    pub(crate) async fn node(&self) -> HubProcess {
        HubProcess::start_with_credentials(&self.creds, &self.node_env()).await
    }

    pub(crate) async fn ingest_node(&self) -> HubProcess {
        HubProcess::start_with_credentials(&self.creds, &self.ingest_node_env()).await
    }
}

/// `name{...}` with every label of `labels` (summed over matching series; 0 when absent).
async fn metric(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = app.get("/metrics").await;
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (series, value) = rest.split_once("} ")?;
            let matches = labels.iter().all(|(k, v)| {
                let pair = format!("{k}=\"{v}\"");
                series.split(',').any(|p| p == pair)
            });
            if matches {
                value.trim().parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// `hub_ingest_events_total` of `topic` with `outcome`.
pub(crate) async fn ingested(app: &TestApp, topic: &str, outcome: &str) -> f64 {
    metric(
        app,
        "hub_ingest_events_total",
        &[("topic", topic), ("outcome", outcome)],
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// What one client saw over its whole life, across reconnects.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// Notifications (not `hub.*`, not the end marker), in arrival order.
    notes: Vec<Value>,
    /// `hub.gap` envelopes.
    gaps: usize,
    /// Reconnects made.
    reconnects: usize,
}

/// A client followed in the background until the end marker.
pub(crate) struct Client {
    pub(crate) kind: Kind,
    pub(crate) user: String,
    got: Arc<AtomicUsize>,
    task: JoinHandle<Seen>,
}

impl Client {
    /// Connects (after the greeting, the node has subscribed the user) and follows.
    async fn connect(kind: Kind, app: &Arc<TestApp>, user: &str) -> Client {
        let conn = Conn::open(kind, app, user, None).await.0;
        let got = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(follow(
            kind,
            app.clone(),
            user.to_owned(),
            conn,
            got.clone(),
        ));
        Client {
            kind,
            user: user.to_owned(),
            got,
            task,
        }
    }

    pub(crate) fn got(&self) -> usize {
        self.got.load(Ordering::SeqCst)
    }
}

/// Reads `conn` until the end marker. A closed connection is reopened on the same node,
/// resuming after the last id seen (waiting out refusals while the node's Redis is away).
async fn follow(
    kind: Kind,
    app: Arc<TestApp>,
    user: String,
    mut conn: Conn,
    got: Arc<AtomicUsize>,
) -> Seen {
    let mut seen = Seen::default();
    let mut last: Option<String> = None;
    loop {
        let Some(env) = conn.next().await else {
            conn = reopen(kind, &app, &user, last.as_deref()).await;
            seen.reconnects += 1;
            continue;
        };
        match env["type"].as_str().expect("type") {
            "hub.gap" => seen.gaps += 1,
            END => {
                assert_eq!(env["data"]["user"], user.as_str(), "isolation: {env}");
                return seen;
            }
            t if t.starts_with("hub.") => panic!("{kind:?} of {user}: unexpected {env}"),
            _ => {
                last = Some(
                    env["id"]
                        .as_str()
                        .expect("notifications have ids")
                        .to_owned(),
                );
                seen.notes.push(env);
                got.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

async fn reopen(kind: Kind, app: &TestApp, user: &str, since: Option<&str>) -> Conn {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        match Conn::open_or_refused(kind, app, user, since).await {
            Ok((conn, _)) => return conn,
            Err(r) => assert!(
                r.status >= 500,
                "{kind:?} of {user}: reconnect refused with {} {}",
                r.status,
                r.body
            ),
        }
        assert!(
            Instant::now() < deadline,
            "{kind:?} of {user}: no reconnect within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A WebSocket and an SSE client per user, on `ws` and `sse` respectively.
pub(crate) async fn connect_all(
    users: &[String],
    ws: &Arc<TestApp>,
    sse: &Arc<TestApp>,
) -> Vec<Client> {
    let mut clients = Vec::new();
    for user in users {
        clients.push(Client::connect(Kind::Ws, ws, user).await);
        clients.push(Client::connect(Kind::Sse, sse, user).await);
    }
    clients
}

/// Notifications received over all WebSocket clients (one per user: one per notification).
pub(crate) fn ws_received(clients: &[Client]) -> usize {
    clients
        .iter()
        .filter(|c| c.kind == Kind::Ws)
        .map(Client::got)
        .sum()
}

/// Waits until every client has at least `want(user)` notifications.
pub(crate) async fn wait_received(
    clients: &[Client],
    want: impl Fn(&str) -> usize,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let behind: Vec<String> = clients
            .iter()
            .filter(|c| c.got() < want(&c.user))
            .map(|c| format!("{:?} of {}: {}/{}", c.kind, c.user, c.got(), want(&c.user)))
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} clients still waiting after {limit:?}: {}",
            behind.len(),
            behind.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes the end marker to every user through `app` and collects what each client saw.
pub(crate) async fn finish(app: &TestApp, clients: Vec<Client>) -> Vec<(Kind, String, Seen)> {
    let users: BTreeSet<String> = clients.iter().map(|c| c.user.clone()).collect();
    for user in &users {
        app.publish(user, END, json!({"user": user})).await;
    }
    let mut out = Vec::new();
    for c in clients {
        let seen = timeout(STEP, c.task)
            .await
            .unwrap_or_else(|_| panic!("{:?} of {} never got the end marker", c.kind, c.user))
            .expect("client task");
        out.push((c.kind, c.user, seen));
    }
    out
}

fn statuses(data: &[Value]) -> Vec<String> {
    data.iter()
        .map(|d| d["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Checks that every client got exactly `expected` for its user: each order's notifications
/// once, in the order produced, with exactly the expected data; and, unless `gaps_allowed`,
/// no `hub.gap`. Fails listing every problem.
pub(crate) fn assert_exactly(
    seen: &[(Kind, String, Seen)],
    expected: &Expected,
    kind: &str,
    gaps_allowed: bool,
) {
    let empty = BTreeMap::new();
    let mut problems = Vec::new();
    for (k, user, s) in seen {
        let who = format!("{k:?} of {user}");
        let want = expected.get(user).unwrap_or(&empty);
        let mut got: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for env in &s.notes {
            if env["type"] != kind {
                problems.push(format!("{who}: unexpected notification {env}"));
                continue;
            }
            let order = env["data"]["order_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            got.entry(order).or_default().push(env["data"].clone());
        }
        for (order, w) in want {
            let g = got.remove(order).unwrap_or_default();
            if g == *w {
                continue;
            }
            if statuses(&g) == statuses(w) {
                problems.push(format!(
                    "{who}, order {order}: data {} instead of {}",
                    Value::from(g),
                    Value::from(w.clone())
                ));
            } else {
                problems.push(format!(
                    "{who}, order {order}: statuses {:?} instead of {:?}",
                    statuses(&g),
                    statuses(w)
                ));
            }
        }
        for (order, g) in got {
            problems.push(format!(
                "{who}: {} notifications of foreign order {order}",
                g.len()
            ));
        }
        if !gaps_allowed && s.gaps > 0 {
            problems.push(format!("{who}: {} hub.gap", s.gaps));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems over {} clients:\n{}",
        problems.len(),
        seen.len(),
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_protobuf_and_json_reach_ws_and_sse_clients_once_each_in_partition_order() {
    // 20 users with 10 orders each, 5 status changes per order: 1 000 events, half produced
    // as protobuf by this test, half as proto3 JSON by kcat. Each user has a WebSocket on the
    // ingesting node and an SSE stream on another node of the same Redis prefix.
    let setup = Setup::new(redis_url(), "it-orders", order_route).await;
    let topic = setup.topic.name.clone();
    let a = setup.ingest_node().await;
    let b = setup.node().await;
    let (a_app, b_app) = (Arc::new(a.as_app()), Arc::new(b.as_app()));
    let plan = Plan::new(20, 10);
    let clients = connect_all(&plan.users(), &a_app, &b_app).await;

    let changes = plan.changes(0..LIFECYCLE.len());
    let (even, odd): (Vec<Change>, Vec<Change>) = changes.iter().partition(|(o, _)| o % 2 == 0);
    let expected = plan.expected(&changes);
    assert_eq!(changes.len(), 1000);
    let producer = producer();
    let protobuf = plan.protobuf(&even);
    let json = plan.json(&odd);
    tokio::join!(
        produce(&producer, &topic, &protobuf),
        kcat_produce(&topic, &json)
    );

    wait_received(&clients, |u| count(&expected, u), Duration::from_secs(30)).await;
    let seen = finish(&b_app, clients).await;
    assert_exactly(&seen, &expected, "order.status", false);
    assert_eq!(
        ingested(&a_app, &topic, "published").await,
        1000.0,
        "every record published once"
    );
    assert_eq!(
        ingested(&a_app, &topic, "dlq").await,
        0.0,
        "nothing to the DLQ"
    );
    drop((a, b));
    setup.topic.delete().await;
}

#[tokio::test]
async fn poison_records_go_to_the_dlq_with_their_reason_and_source_and_the_partition_moves_on() {
    let setup = Setup::new(redis_url(), "it-orders", order_route).await;
    let topic = setup.topic.name.clone();
    let a = setup.ingest_node().await;
    let app = Arc::new(a.as_app());
    let plan = Plan::new(1, 1);
    let (order, user) = plan.orders[0].clone();
    let clients = connect_all(&plan.users(), &app, &app).await;

    let valid = plan.protobuf(&[(0, 0), (0, 1)]);
    let poison = |value: Value| Record {
        key: order.clone(),
        value: value.to_string().into_bytes(),
        content_type: Some(JSON),
    };
    // All with the order's key: one partition, in this order.
    let records = vec![
        valid[0].clone(),
        Record {
            key: order.clone(),
            value: b"\xde\xad\xbe\xef not protobuf".to_vec(),
            content_type: None,
        },
        poison(json!({"eventId": "no-user", "orderId": order, "status": "ORDER_STATUS_PAID"})),
        poison(json!({
            "eventId": "bad-enum", "orderId": order, "userId": user,
            "status": "ORDER_STATUS_TELEPORTED",
        })),
        valid[1].clone(),
        poison(json!({
            "eventId": "too-big", "orderId": order, "userId": user,
            "status": "ORDER_STATUS_PAID", "pad": "x".repeat(5000),
        })),
        poison(json!({
            "eventId": "brace", "orderId": order, "userId": "a}b",
            "status": "ORDER_STATUS_PAID",
        })),
        Record {
            key: order.clone(),
            value: plan.json(&[(0, 2)]).remove(0).1,
            content_type: Some(JSON),
        },
        // A valid protobuf value under a content type nobody decodes: not guessed at.
        Record {
            key: order.clone(),
            value: plan.protobuf(&[(0, 3)]).remove(0).value,
            content_type: Some("text/plain"),
        },
    ];
    let landed = produce(&producer(), &topic, &records).await;
    assert!(
        landed.iter().all(|(p, _)| *p == landed[0].0),
        "one key, one partition: {landed:?}"
    );

    // The valid events behind the poison ones arrive, in order.
    let expected = plan.expected(&[(0, 0), (0, 1), (0, 2)]);
    wait_received(&clients, |u| count(&expected, u), STEP).await;
    let seen = finish(&app, clients).await;
    assert_exactly(&seen, &expected, "order.status", false);

    // Each poison record is in the DLQ with its reason and where it came from.
    let dlq = consume(&setup.topic.dlq(), 6).await;
    let reasons: [(usize, &str, &str); 6] = [
        (1, "undecodable: protobuf", ""),
        (2, "unroutable: no recipient", "user_id"),
        (3, "undecodable: proto3 JSON", "TELEPORTED"),
        (5, "too large: record of", "HUB_INGEST_MAX_RECORD_BYTES"),
        (6, "unroutable: recipient", "'{'"),
        (
            8,
            "bad content-type: unsupported content-type",
            "text/plain",
        ),
    ];
    for (index, prefix, mention) in reasons {
        let (partition, offset) = landed[index];
        let record = dlq
            .iter()
            .find(|r| r.headers.get("dlq-source-offset") == Some(&offset.to_string()))
            .unwrap_or_else(|| panic!("record {index} (offset {offset}) not in the DLQ: {dlq:?}"));
        let error = record.headers.get("dlq-error").expect("dlq-error header");
        assert!(
            error.starts_with(prefix) && error.contains(mention),
            "record {index}: dlq-error {error:?} should start with {prefix:?} and name {mention:?}"
        );
        assert_eq!(
            record.headers.get("dlq-source-topic"),
            Some(&topic),
            "record {index}"
        );
        assert_eq!(
            record.headers.get("dlq-source-partition"),
            Some(&partition.to_string()),
            "record {index}"
        );
        assert_eq!(
            record.payload.as_deref(),
            Some(records[index].value.as_slice()),
            "record {index}: the original value, for a replay"
        );
        assert_eq!(
            record.key.as_deref(),
            Some(order.as_bytes()),
            "record {index}: the original key"
        );
        assert_eq!(
            record.headers.get("content-type").map(String::as_str),
            records[index].content_type,
            "record {index}: the original headers travel along"
        );
    }
    assert_eq!(
        metric(&app, "hub_ingest_dlq_total", &[("topic", &topic)]).await,
        6.0,
        "hub_ingest_dlq_total counts the poison records"
    );
    assert_eq!(ingested(&app, &topic, "dlq").await, 6.0);
    assert_eq!(ingested(&app, &topic, "published").await, 3.0);
    drop(a);
    setup.topic.delete().await;
}

#[tokio::test]
async fn the_content_type_header_is_read_whatever_its_case_and_parameters() {
    // A record with `content-type: application/json` carries proto3 JSON (CONTRACT.md §7);
    // media types are case-insensitive and may have parameters, which is how the contract
    // crate reads the header (`proto::ContentType::from_header`, proto/README.md).
    let setup = Setup::new(redis_url(), "it-orders", order_route).await;
    let topic = setup.topic.name.clone();
    let node = setup.ingest_node().await;
    let app = Arc::new(node.as_app());
    let plan = Plan::new(1, 1);
    let clients = connect_all(&plan.users(), &app, &app).await;
    let changes = plan.changes(0..4);
    let json = plan.json(&changes);
    let protobuf = plan.protobuf(&changes);
    let content_types = [
        "application/json; charset=utf-8",
        "Application/JSON",
        "APPLICATION/JSON;charset=UTF-8",
    ];
    let mut records: Vec<Record> = content_types
        .iter()
        .zip(json)
        .map(|(content_type, (key, value))| Record {
            key,
            value,
            content_type: Some(content_type),
        })
        .collect();
    records.push(Record {
        content_type: Some("application/x-protobuf"),
        ..protobuf[3].clone()
    });
    produce(&producer(), &topic, &records).await;

    let expected = plan.expected(&changes);
    wait_received(&clients, |u| count(&expected, u), STEP).await;
    let seen = finish(&app, clients).await;
    assert_exactly(&seen, &expected, "order.status", false);
    assert_eq!(
        ingested(&app, &topic, "dlq").await,
        0.0,
        "nothing to the DLQ"
    );
    drop(node);
    setup.topic.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_ingesting_node_restarted_in_its_group_loses_and_duplicates_nothing() {
    // Node A ingests; the clients are on node B (same Redis prefix), which stays up. A is
    // killed (-9) mid-stream, so records it processed after its last offset commit are read
    // again by its successor; the idempotency keys must absorb them.
    let setup = Setup::new(redis_url(), "it-orders", order_route).await;
    let topic = setup.topic.name.clone();
    let a = setup.ingest_node().await;
    let b = setup.node().await;
    let b_app = Arc::new(b.as_app());
    let plan = Plan::new(12, 5);
    let clients = connect_all(&plan.users(), &b_app, &b_app).await;
    let changes = plan.changes(0..LIFECYCLE.len());
    let expected = plan.expected(&changes);
    let total = changes.len();

    // 300 events over about 2.5 s.
    let producing = stream(
        &topic,
        plan.protobuf(&changes),
        6,
        Duration::from_millis(40),
    );
    let deadline = Instant::now() + STEP;
    while ws_received(&clients) < total / 3 {
        assert!(Instant::now() < deadline, "ingest did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.signal(Signal::SIGKILL);
    let at_kill = ws_received(&clients);
    assert!(
        at_kill < total,
        "all {total} delivered before the kill: the stream was too short to test anything"
    );
    drop(a);
    let restarted = setup.ingest_node().await;
    producing.await.expect("producer task");

    // The dead member's session (6 s) must expire before its partitions move.
    wait_received(&clients, |u| count(&expected, u), Duration::from_secs(40)).await;
    let seen = finish(&b_app, clients).await;
    assert_exactly(&seen, &expected, "order.status", false);
    for (kind, user, s) in &seen {
        assert_eq!(s.reconnects, 0, "{kind:?} of {user} stayed connected to B");
    }
    drop((restarted, b));
    setup.topic.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_of_two_ingest_instances_stops_the_other_takes_its_partitions() {
    // Two ingesting nodes in one group share the topic's partitions; clients are on a third
    // node. One is stopped (SIGTERM) while events flow; the rest of the stream, on every
    // partition, must come through the other, nothing lost or twice.
    let setup = Setup::new(redis_url(), "it-orders", order_route).await;
    let topic = setup.topic.name.clone();
    let first = setup.ingest_node().await;
    let second = setup.ingest_node().await;
    let (first_app, second_app) = (first.as_app(), second.as_app());
    let c = setup.node().await;
    let c_app = Arc::new(c.as_app());
    let plan = Plan::new(12, 5);
    let clients = connect_all(&plan.users(), &c_app, &c_app).await;
    let streamed = plan.changes(0..LIFECYCLE.len() - 1);
    let after_stop = plan.changes(LIFECYCLE.len() - 1..LIFECYCLE.len());
    let expected = plan.expected(&plan.changes(0..LIFECYCLE.len()));

    // Both instances own partitions of the topic: warm-up events (for a user nobody follows)
    // on every partition until each instance has published some.
    let producer = producer();
    let deadline = Instant::now() + Duration::from_secs(20);
    for round in 0.. {
        warm_up(&producer, &topic, round).await;
        let a = ingested(&first_app, &topic, "published").await;
        let b = ingested(&second_app, &topic, "published").await;
        if a > 0.0 && b > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both instances should own partitions (published {a} and {b})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 240 events over about 2.5 s; one instance stops once a quarter has arrived.
    let producing = stream(
        &topic,
        plan.protobuf(&streamed),
        4,
        Duration::from_millis(40),
    );
    let deadline = Instant::now() + STEP;
    while ws_received(&clients) < streamed.len() / 4 {
        assert!(Instant::now() < deadline, "the stream did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut first = first;
    first.signal(Signal::SIGTERM);
    let status = first
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the stopped instance exits");
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    let second_at_stop = ingested(&second_app, &topic, "published").await;
    producing.await.expect("producer task");
    // The last status of every order, on every partition, after the stop.
    produce(&producer, &topic, &plan.protobuf(&after_stop)).await;

    wait_received(&clients, |u| count(&expected, u), Duration::from_secs(30)).await;
    let seen = finish(&c_app, clients).await;
    assert_exactly(&seen, &expected, "order.status", false);
    let second_after = ingested(&second_app, &topic, "published").await;
    assert!(
        second_after - second_at_stop >= after_stop.len() as f64,
        "the remaining instance published what came after the stop ({second_at_stop} → {second_after})"
    );
    drop((first, second, c));
    setup.topic.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_pauses_while_redis_is_down_and_delivers_everything_after_it_returns() {
    // `hub ingest` alone publishes into a private Redis; the clients are on a serving node.
    // Redis is killed, events keep coming into Kafka, Redis comes back empty: ingest must
    // not move its offsets past what it could not publish, and must deliver all of it after.
    let mut redis = RedisServer::start().await;
    let setup = Setup::new(redis.url(), "it-orders", order_route).await;
    let topic = setup.topic.name.clone();
    let mut ingest_env = vec![
        ("HUB_REDIS_URL", setup.redis.as_str()),
        ("HUB_REDIS_PREFIX", &setup.prefix),
        ("HUB_REDIS_TIMEOUT", "500ms"),
    ];
    ingest_env.extend(setup.kafka_env());
    let mut ingest = IngestProcess::start(&ingest_env);
    let b = setup.node().await;
    let b_app = Arc::new(b.as_app());
    let plan = Plan::new(6, 3);
    let clients = connect_all(&plan.users(), &b_app, &b_app).await;
    let before = plan.changes(0..2);
    let during = plan.changes(2..LIFECYCLE.len());
    let producer = producer();

    produce(&producer, &topic, &plan.protobuf(&before)).await;
    let expected_before = plan.expected(&before);
    wait_received(&clients, |u| count(&expected_before, u), STEP).await;
    wait_committed(&setup.group, &topic, before.len() as i64, STEP).await;

    redis.kill();
    produce(&producer, &topic, &plan.protobuf(&during)).await;
    // Redis stays away for a few seconds while ingest has records it cannot publish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        committed(&setup.group, &topic).await,
        before.len() as i64,
        "no offset moves past a record that was not published"
    );
    redis.restart().await;

    let expected = plan.expected(&plan.changes(0..LIFECYCLE.len()));
    wait_received(&clients, |u| count(&expected, u), Duration::from_secs(30)).await;
    wait_committed(
        &setup.group,
        &topic,
        (before.len() + during.len()) as i64,
        STEP,
    )
    .await;
    let seen = finish(&b_app, clients).await;
    // The restarted Redis is empty: the history is lost, so clients may be told (hub.gap).
    assert_exactly(&seen, &expected, "order.status", true);

    ingest.signal(Signal::SIGTERM);
    let status = ingest
        .wait_exit(STEP)
        .await
        .expect("hub ingest stops on SIGTERM");
    assert!(status.success(), "hub ingest exits cleanly: {status}");
    drop(b);
    setup.topic.delete().await;
}

#[tokio::test]
async fn a_routes_file_turns_a_json_topic_into_notifications_without_code() {
    let routes = |topic: &str| {
        format!(
            r#"
[[route]]
name = "promo"
topic = "{topic}"
message = "json"
type = "promo"
recipients = ["to"]
filter = [{{ field = "kind", in = ["flash"] }}]
data = {{ title = "title", until = "window.end" }}
constants = {{ source = "marketing" }}
"#
        )
    };
    let setup = Setup::new(redis_url(), "it-promo", routes).await;
    let topic = setup.topic.name.clone();
    let node = setup.ingest_node().await;
    let app = Arc::new(node.as_app());
    let users = ["promo-a".to_owned(), "promo-b".to_owned()];
    let mut clients = vec![Client::connect(Kind::Ws, &app, &users[0]).await];
    clients.push(Client::connect(Kind::Sse, &app, &users[1]).await);

    let p1 = json!({"event_id": "p1", "kind": "flash", "title": "50% off",
        "window": {"end": 99}, "to": "promo-a"});
    let records = [
        p1.clone(),
        // Filtered out.
        json!({"event_id": "p2", "kind": "weekly", "title": "digest", "to": "promo-a"}),
        // A list of recipients.
        json!({"event_id": "p3", "kind": "flash", "title": "shoes", "window": {"end": 7},
            "to": ["promo-a", "promo-b"], "extra": {"ignored": true}}),
        // The same event again: no second notification.
        p1,
        // A data field that is absent reads null.
        json!({"event_id": "p4", "kind": "flash", "title": "last", "to": "promo-b"}),
    ];
    // One key: one partition, so the records are handled in this order.
    let lines: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|r| ("promo".to_owned(), r.to_string().into_bytes()))
        .collect();
    kcat_produce(&topic, &lines).await;

    let data =
        |title: &str, until: Value| json!({"title": title, "until": until, "source": "marketing"});
    let want: BTreeMap<&str, Vec<Value>> = BTreeMap::from([
        (
            "promo-a",
            vec![data("50% off", json!(99)), data("shoes", json!(7))],
        ),
        (
            "promo-b",
            vec![data("shoes", json!(7)), data("last", Value::Null)],
        ),
    ]);
    wait_received(&clients, |u| want[u].len(), STEP).await;
    let seen = finish(&app, clients).await;
    for (kind, user, s) in &seen {
        let got: Vec<&Value> = s.notes.iter().map(|n| &n["data"]).collect();
        let expected: Vec<&Value> = want[user.as_str()].iter().collect();
        assert_eq!(
            got, expected,
            "{kind:?} of {user}: data of each promo, once, in order"
        );
        for n in &s.notes {
            assert_eq!(n["type"], "promo", "{kind:?} of {user}: the route's type");
        }
        assert_eq!(s.gaps, 0);
    }
    assert_eq!(ingested(&app, &topic, "filtered").await, 1.0, "p2 filtered");
    assert_eq!(ingested(&app, &topic, "duplicate").await, 1.0, "p1 again");
    assert_eq!(ingested(&app, &topic, "published").await, 4.0);
    assert_eq!(ingested(&app, &topic, "dlq").await, 0.0);
    drop(node);
    setup.topic.delete().await;
}

#[tokio::test]
async fn a_route_publishes_to_rendered_channels_once_and_sends_bad_channel_names_to_the_dlq() {
    use test_support::clients::{SseClient, WsClient};

    let routes = |topic: &str| {
        format!(
            r#"
[[route]]
name = "rooms"
topic = "{topic}"
message = "json"
type = "chat"
recipients = ["to"]
channels = ["room:{{room}}"]
event_id = "id"
data = {{ text = "text" }}
"#
        )
    };
    let setup = Setup::new(redis_url(), "it-rooms", routes).await;
    let topic = setup.topic.name.clone();
    let node = setup.ingest_node().await;
    let app = node.as_app();
    // Watchers of room 1 (by their token's claim), on both transports; the author gets every
    // message of theirs as its recipient.
    let watch = |user: &str| {
        crate::helpers::tokens::hs256(
            &app.secret,
            &json!({"sub": user, "exp": crate::helpers::tokens::now_s() + 600, "channels": ["room:1"]}),
        )
    };
    let mut ws = WsClient::connect(&app, &watch("room-ws"), "")
        .await
        .expect("ws");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    let mut sse = SseClient::connect(&app, &watch("room-sse"), "")
        .await
        .expect("sse");
    assert_eq!(sse.event().await.data["type"], "hub.connected");
    let mut author = Conn::open(Kind::Ws, &app, "room-author", None).await.0;

    let m1 = json!({"id": "m1", "room": 1, "text": "hello", "to": "room-author"});
    let records = [
        m1.clone(),
        // Another room: not to the watchers.
        json!({"id": "m2", "room": "2", "text": "elsewhere", "to": "room-author"}),
        // The same event again: nothing new on the user or the channel.
        m1,
        // Names the hub would refuse, or none: the DLQ, nothing published (the author included).
        json!({"id": "m3", "room": "a b", "text": "space", "to": "room-author"}),
        json!({"id": "m4", "text": "no room", "to": "room-author"}),
        json!({"id": "m5", "room": "x".repeat(130), "text": "long", "to": "room-author"}),
        json!({"id": "m6", "room": "1", "text": "bye", "to": "room-author"}),
    ];
    let lines: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|r| ("rooms".to_owned(), r.to_string().into_bytes()))
        .collect();
    kcat_produce(&topic, &lines).await;

    let texts = |notes: &[Value]| -> Vec<(String, String)> {
        notes
            .iter()
            .map(|n| {
                (
                    n["channel"].as_str().unwrap_or_default().to_owned(),
                    n["data"]["text"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let room1 = vec![
        ("room:1".to_owned(), "hello".to_owned()),
        ("room:1".to_owned(), "bye".to_owned()),
    ];
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(ws.envelope().await);
    }
    assert_eq!(texts(&got), room1, "the WebSocket watcher");
    assert!(got.iter().all(|n| n["type"] == "chat"));
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(sse.event().await.data);
    }
    assert_eq!(texts(&got), room1, "the SSE watcher");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(author.envelope().await);
    }
    let personal = |t: &str| (String::new(), t.to_owned());
    assert_eq!(
        texts(&got),
        [personal("hello"), personal("elsewhere"), personal("bye")],
        "the author, as recipient"
    );
    // Nothing else arrives before a marker published after everything.
    let (status, body) = app
        .publish_raw(&json!({"channel": "room:1", "type": END, "data": {}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ws.envelope().await["type"], END);
    assert_eq!(sse.event().await.data["type"], END);
    app.publish("room-author", END, json!({})).await;
    assert_eq!(author.envelope().await["type"], END);

    let dead = consume(&setup.topic.dlq(), 3).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|r| r.headers.get("dlq-error").cloned().unwrap_or_default())
        .collect();
    assert_eq!(reasons.len(), 3, "m3, m4, m5: {reasons:?}");
    assert!(
        reasons
            .iter()
            .all(|r| r.starts_with("unroutable: ") && r.contains("room")),
        "{reasons:?}"
    );
    // The outcome is counted once the DLQ has the record.
    let deadline = Instant::now() + STEP;
    while ingested(&app, &topic, "dlq").await < 3.0 {
        assert!(Instant::now() < deadline, "three records counted as dlq");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ingested(&app, &topic, "dlq").await, 3.0);
    assert!(ingested(&app, &topic, "duplicate").await >= 1.0, "m1 again");
    drop(node);
    setup.topic.delete().await;
}

#[tokio::test]
async fn a_broken_routes_file_stops_the_hub_with_exit_code_2_and_one_line_naming_the_setting() {
    let dir = temp_dir("hub-it-ingest");
    let cases = [
        (
            "an unknown field path",
            r#"
[[route]]
name = "typo"
topic = "it-typo"
message = "notifications.orders.v1.OrderStatusChanged"
type = "order.status"
recipients = ["buyer_id"]
"#,
            "buyer_id",
        ),
        (
            "a nested path through a scalar",
            r#"
[[route]]
name = "deep"
topic = "it-typo"
message = "notifications.orders.v1.OrderStatusChanged"
type = "order.status"
recipients = ["user_id"]
data = { when = "order_id.seconds" }
"#,
            "order_id",
        ),
        ("bad TOML", "[[route]\nname = \"x\"\n", "routes.toml"),
        (
            "a channel template with an unclosed brace",
            r#"
[[route]]
name = "rooms"
topic = "it-typo"
message = "json"
type = "chat"
channels = ["room:{room"]
"#,
            "room:{room",
        ),
        (
            "a channel template naming no field of the message",
            r#"
[[route]]
name = "follow"
topic = "it-typo"
message = "notifications.orders.v1.OrderStatusChanged"
type = "order.status"
channels = ["order:{order_idd}"]
"#,
            "order_idd",
        ),
        (
            "an unknown key",
            "[[route]]\nname = \"x\"\ntopic = \"t\"\nmessage = \"json\"\ntype = \"t\"\nrecipients = [\"to\"]\nrecipient = \"to\"\n",
            "recipient",
        ),
    ];
    for (i, (what, text, mention)) in cases.into_iter().enumerate() {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir_all(&sub).expect("case dir");
        let path = sub.join("routes.toml");
        std::fs::write(&path, text).expect("routes file");
        for command in ["serve", "ingest"] {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hub"))
                .arg(command)
                .env_clear()
                .env("HUB_ADDR", "127.0.0.1:0")
                .env("HUB_JWT_SECRET", hex(24))
                .env("HUB_REDIS_URL", redis_url())
                .env("HUB_KAFKA_BROKERS", brokers())
                .env("HUB_INGEST_ROUTES", &path)
                .env("HUB_LOG", "warn")
                .output();
            let out = timeout(STEP, out)
                .await
                .unwrap_or_else(|_| panic!("hub {command} with {what} is still running"))
                .expect("hub runs");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "hub {command} with {what}: exit code ({stderr})"
            );
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(
                lines.len(),
                1,
                "hub {command} with {what}: one line, got {stderr:?}"
            );
            assert!(
                lines[0].starts_with("config: HUB_INGEST_ROUTES: ") && lines[0].contains(mention),
                "hub {command} with {what}: {:?} should name HUB_INGEST_ROUTES and {mention:?}",
                lines[0]
            );
        }
    }
}

/// The broker's SASL_PLAINTEXT listener (`infra/local/kafka.sh` runs one on port 9094 with the
/// local test user `hub` / `hub-secret`).
fn sasl_brokers() -> String {
    std::env::var("HUB_TEST_KAFKA_SASL_BROKERS").unwrap_or_else(|_| "127.0.0.1:9094".to_owned())
}

/// The broker's SASL_SSL listener (`infra/local/kafka.sh` runs one on port 9095: PLAIN and
/// SCRAM with the same user, a certificate signed by the script's local CA).
fn tls_brokers() -> String {
    std::env::var("HUB_TEST_KAFKA_TLS_BROKERS").unwrap_or_else(|_| "127.0.0.1:9095".to_owned())
}

/// The local CA that signs the TLS listener's certificate (`kafka.sh tls-ca`).
fn tls_ca() -> String {
    if let Ok(path) = std::env::var("HUB_TEST_KAFKA_CA_FILE") {
        return path;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/local/kafka.sh");
    let out = std::process::Command::new(script)
        .arg("tls-ca")
        .output()
        .expect("run infra/local/kafka.sh tls-ca");
    assert!(out.status.success(), "kafka.sh tls-ca: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A node ingesting through `brokers` with `security` (its `HUB_KAFKA_*` settings) delivers
/// three events produced on the plaintext listener, in order.
async fn ingest_through(name: &str, brokers: String, security: &[(&str, &str)]) {
    let routes = |topic: &str| {
        format!(
            r#"
[[route]]
name = "secure"
topic = "{topic}"
message = "json"
type = "secure"
recipients = ["to"]
data = {{ n = "n" }}
"#
        )
    };
    let mut setup = Setup::new(redis_url(), name, routes).await;
    setup.brokers = brokers;
    let topic = setup.topic.name.clone();
    let mut env = setup.ingest_node_env();
    env.extend(security.iter().copied());
    let node = HubProcess::start_with_credentials(&setup.creds, &env).await;
    let app = Arc::new(node.as_app());
    let user = format!("{name}-user");
    let clients = vec![Client::connect(Kind::Ws, &app, &user).await];
    let lines: Vec<(String, Vec<u8>)> = (1..=3)
        .map(|n| {
            let v = json!({"event_id": format!("s{n}"), "to": user, "n": n});
            ("k".to_owned(), v.to_string().into_bytes())
        })
        .collect();
    kcat_produce(&topic, &lines).await;
    wait_received(&clients, |_| 3, STEP).await;
    let seen = finish(&app, clients).await;
    let got: Vec<Value> = seen[0]
        .2
        .notes
        .iter()
        .map(|n| n["data"]["n"].clone())
        .collect();
    assert_eq!(got, vec![json!(1), json!(2), json!(3)]);
    drop(node);
    setup.topic.delete().await;
}

#[tokio::test]
async fn ingest_reads_through_a_sasl_listener_with_the_configured_credentials() {
    let security = [
        ("HUB_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
        ("HUB_KAFKA_SASL_MECHANISM", "PLAIN"),
        ("HUB_KAFKA_SASL_USERNAME", "hub"),
        ("HUB_KAFKA_SASL_PASSWORD", "hub-secret"),
    ];
    ingest_through("it-sasl", sasl_brokers(), &security).await;
}

#[tokio::test]
async fn ingest_reads_over_tls_with_scram_trusting_the_configured_ca() {
    let ca = tls_ca();
    let security = [
        ("HUB_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("HUB_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("HUB_KAFKA_SASL_USERNAME", "hub"),
        ("HUB_KAFKA_SASL_PASSWORD", "hub-secret"),
        ("HUB_KAFKA_SSL_CA_FILE", ca.as_str()),
    ];
    ingest_through("it-scram", tls_brokers(), &security).await;
}

#[tokio::test]
async fn an_untrusted_broker_certificate_or_a_wrong_password_stops_hub_ingest_with_one_clear_line()
{
    // Neither heals by retrying: `hub ingest` says which settings to check and exits, instead
    // of retrying in silence with its partitions held.
    let mut setup = Setup::new(redis_url(), "it-refused", |topic: &str| {
        format!(
            "[[route]]\nname = \"r\"\ntopic = \"{topic}\"\nmessage = \"json\"\ntype = \"r\"\nrecipients = [\"to\"]\n"
        )
    })
    .await;
    setup.brokers = tls_brokers();
    let dir = temp_dir("hub-kafka-ca");
    let other_ca = unrelated_ca(dir.path());
    let right_ca = tls_ca();
    let secret = hex(24);
    let cases = [
        (
            other_ca.as_str(),
            "hub-secret",
            "kafka: the brokers' certificate is not trusted (check HUB_KAFKA_SSL_CA_FILE, ",
        ),
        (
            right_ca.as_str(),
            "not-the-password",
            "kafka: the brokers refused authentication as \"hub\" (check HUB_KAFKA_SASL_USERNAME, HUB_KAFKA_SASL_PASSWORD, ",
        ),
    ];
    for (ca, password, expected) in cases {
        let mut env = setup.kafka_env();
        env.extend([
            ("HUB_REDIS_URL", setup.redis.as_str()),
            ("HUB_REDIS_PREFIX", setup.prefix.as_str()),
            ("HUB_JWT_SECRET", secret.as_str()),
            ("HUB_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("HUB_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
            ("HUB_KAFKA_SASL_USERNAME", "hub"),
            ("HUB_KAFKA_SASL_PASSWORD", password),
            ("HUB_KAFKA_SSL_CA_FILE", ca),
            ("HUB_LOG", "warn"),
        ]);
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hub"))
            .arg("ingest")
            .env_clear()
            .envs(env)
            .kill_on_drop(true)
            .output();
        let out = timeout(Duration::from_secs(30), out)
            .await
            .unwrap_or_else(|_| panic!("hub ingest expecting {expected:?} still runs after 30 s"))
            .expect("hub runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with(expected), "{stderr}");
        if password != "hub-secret" {
            assert!(!stderr.contains(password), "the password leaked: {stderr}");
        }
    }

    // A serving node with the wrong password goes on serving; its ingest says it has stopped.
    let mut env = setup.ingest_node_env();
    env.extend([
        ("HUB_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("HUB_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("HUB_KAFKA_SASL_USERNAME", "hub"),
        ("HUB_KAFKA_SASL_PASSWORD", "not-the-password"),
        ("HUB_KAFKA_SSL_CA_FILE", right_ca.as_str()),
    ]);
    let node = HubProcess::start_with_credentials(&setup.creds, &env).await;
    let app = node.as_app();
    let failed = |text: &str| {
        text.lines()
            .any(|l| l.strip_prefix("hub_ingest_failed ").map(str::trim) == Some("1"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = app.get("/metrics").await;
        if failed(&text) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hub_ingest_failed is not 1 after 30 s: {}",
            text.lines()
                .filter(|l| l.contains("hub_ingest_failed"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200, "the node must go on serving without ingest");
    let client = Client::connect(Kind::Ws, &Arc::new(app), "refused-serving").await;
    drop(client);
    drop(node);
    setup.topic.delete().await;
}

#[tokio::test]
async fn an_event_is_one_notification_per_route_and_recipient_whatever_its_repeats() {
    // Two routes read the same topic: the same event id makes one notification per route
    // (and per recipient); the event produced again at new offsets (as an outbox relay that
    // crashed after Kafka's ack would) makes no second one.
    let routes = |topic: &str| {
        format!(
            r#"
[[route]]
name = "alert"
topic = "{topic}"
message = "json"
type = "alert"
recipients = ["to"]
data = {{ n = "n" }}

[[route]]
name = "audit"
topic = "{topic}"
message = "json"
type = "audit"
recipients = ["auditor"]
data = {{ n = "n" }}
"#
        )
    };
    let setup = Setup::new(redis_url(), "it-dedupe", routes).await;
    let topic = setup.topic.name.clone();
    let node = setup.ingest_node().await;
    let app = Arc::new(node.as_app());
    let users = ["dd-a", "dd-b", "dd-audit"];
    let mut clients = Vec::new();
    for u in users {
        clients.push(Client::connect(Kind::Ws, &app, u).await);
    }
    let record = |n: u32, to: Value| json!({"event_id": format!("ev-{n}"), "to": to, "auditor": "dd-audit", "n": n});
    let first = [record(1, json!(["dd-a", "dd-b"])), record(2, json!("dd-a"))];
    let lines = |records: &[Value]| -> Vec<(String, Vec<u8>)> {
        records
            .iter()
            .map(|r| ("k".to_owned(), r.to_string().into_bytes()))
            .collect()
    };
    kcat_produce(&topic, &lines(&first)).await;
    // The same events again, later, at new offsets; then a new one to know when all is in.
    let mut again = first.to_vec();
    again.push(record(3, json!("dd-b")));
    kcat_produce(&topic, &lines(&again)).await;
    let want = |u: &str| match u {
        "dd-a" => 2,
        "dd-b" => 2,
        _ => 3,
    };
    wait_received(&clients, want, STEP).await;
    let seen = finish(&app, clients).await;
    for (_, user, s) in &seen {
        let got: Vec<(Value, Value)> = s
            .notes
            .iter()
            .map(|n| (n["type"].clone(), n["data"]["n"].clone()))
            .collect();
        let expected: Vec<(Value, Value)> = match user.as_str() {
            "dd-a" => vec![(json!("alert"), json!(1)), (json!("alert"), json!(2))],
            "dd-b" => vec![(json!("alert"), json!(1)), (json!("alert"), json!(3))],
            _ => (1..=3).map(|n| (json!("audit"), json!(n))).collect(),
        };
        assert_eq!(got, expected, "{user}: once per route and event, in order");
    }
    assert_eq!(
        ingested(&app, &topic, "duplicate").await,
        5.0,
        "the repeats"
    );
    drop(node);
    setup.topic.delete().await;
}
