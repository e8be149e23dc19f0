//! Test harness: a fresh PostgreSQL database per service, Kafka topics with a random prefix,
//! the service binaries as real processes (so they can be killed), a hub node in-process with
//! Kafka ingest on the test's topics, and WebSocket / SSE clients that collect envelopes.
//!
//! Services: PostgreSQL from `PRODUCERS_TEST_DATABASE_URL` (an admin URL that may create
//! databases; default `postgres://notify:notify@127.0.0.1:5432/postgres`), Kafka from
//! `HUB_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`). `make test` starts both.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header, encode};
use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};

/// How long one expected event may take.
pub const STEP: Duration = Duration::from_secs(20);
/// Partitions of every test topic.
pub const PARTITIONS: i32 = 3;

pub fn hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

pub fn brokers() -> String {
    std::env::var("HUB_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn admin_database_url() -> String {
    std::env::var("PRODUCERS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://notify:notify@127.0.0.1:5432/postgres".to_owned())
}

/// Where tests write logs and screenshots: `target/test-output/<name>`.
pub fn output_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-output")
        .join(name);
    std::fs::create_dir_all(&dir).expect("output dir");
    dir
}

/// Waits until `check` returns `Some`, polling; panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A database of its own for one service of one test.
#[derive(Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create(service: &str) -> TestDb {
        let admin = admin_database_url();
        let name = format!("it_{service}_{}", hex(5));
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} (run `make infra-up`): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        let url = format!("{base}/{name}");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy(&url)
            .expect("pool");
        TestDb { name, url, pool }
    }

    /// `SELECT count(*) ...`.
    pub async fn count(&self, sql: &str, bind: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(bind)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Drops the database (at the end of a passing test).
    pub async fn drop_db(self) {
        self.pool.close().await;
        if let Ok(mut conn) = PgConnection::connect(&admin_database_url()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

/// The saga's topics and their DLQs.
pub const TOPICS: [&str; 6] = [
    "order.created",
    "payment.completed",
    "delivery.status.updated",
    "order.status.changed",
    "moderation.tasks",
    "moderation.results",
];

/// Creates `names` on `brokers` (ignoring those that exist).
pub async fn create_topics(brokers: &str, names: &[String]) {
    let new: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = timeout(STEP, admin(brokers).create_topics(&new, &opts))
        .await
        .expect("create topics within the deadline")
        .unwrap_or_else(|e| panic!("Kafka at {brokers} (run `make infra-up`): {e}"));
    for r in results {
        if let Err((name, code)) = r {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "creating topic {name}"
            );
        }
    }
}

/// A random topic prefix with every saga topic (and DLQ) created under it.
pub struct Topics {
    pub prefix: String,
    pub brokers: String,
}

impl Topics {
    pub async fn create(brokers: &str) -> Topics {
        let prefix = format!("it-{}.", hex(4));
        let mut all = Vec::new();
        for t in TOPICS {
            all.push(format!("{prefix}{t}"));
            all.push(format!("{prefix}{t}.dlq"));
        }
        create_topics(brokers, &all).await;
        Topics {
            prefix,
            brokers: brokers.to_owned(),
        }
    }

    pub fn name(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    pub async fn delete(self) {
        let mut all = Vec::new();
        for t in TOPICS {
            all.push(format!("{}{t}", self.prefix));
            all.push(format!("{}{t}.dlq", self.prefix));
        }
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let _ = timeout(STEP, admin(&self.brokers).delete_topics(&names, &opts)).await;
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer")
}

/// Produces `value` under `key` to `topic` (headers: name, value).
pub async fn produce(topic: &str, key: &str, value: &[u8], headers: &[(&str, &str)]) {
    let mut h = rdkafka::message::OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(rdkafka::message::Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    producer()
        .send(
            FutureRecord::to(topic).key(key).payload(value).headers(h),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
}

/// One record read back from a topic.
pub struct Read {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Every record of `topic` from the beginning, reading until `want(records)` holds.
pub async fn read_topic(topic: &str, want: impl Fn(&[Read]) -> bool) -> Vec<Read> {
    use rdkafka::message::Headers as _;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("it-reader-{}", hex(4)))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + STEP;
    let mut stream = consumer.stream();
    while !want(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(Ok(m))) = timeout(left, stream.next()).await else {
            panic!(
                "{topic}: wanted records not there within {STEP:?} ({} read)",
                out.len()
            );
        };
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Read {
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            value: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    drop(stream);
    out
}

// ---------------------------------------------------------------------------------------------
// Service processes

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Order,
    Payment,
    Delivery,
    Moderation,
}

impl Kind {
    /// The service's binary, without the settings of the developer's shell (only what the
    /// test gives).
    pub fn command(self) -> Command {
        let mut cmd = Command::new(self.binary());
        for (k, _) in std::env::vars() {
            if k.starts_with(self.prefix()) {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    fn binary(self) -> &'static str {
        match self {
            Kind::Order => env!("CARGO_BIN_EXE_order-service"),
            Kind::Payment => env!("CARGO_BIN_EXE_payment-service"),
            Kind::Delivery => env!("CARGO_BIN_EXE_delivery-service"),
            Kind::Moderation => env!("CARGO_BIN_EXE_moderation-service"),
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Order => "ORDER_",
            Kind::Payment => "PAYMENT_",
            Kind::Delivery => "DELIVERY_",
            Kind::Moderation => "MODERATION_",
        }
    }

    /// The `aud` the service's API wants (its default `JWT_AUDIENCE`).
    pub fn audience(self) -> &'static str {
        match self {
            Kind::Order => "orders",
            Kind::Moderation => "moderation",
            Kind::Payment => "payment",
            Kind::Delivery => "delivery",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Order => "order",
            Kind::Payment => "payment",
            Kind::Delivery => "delivery",
            Kind::Moderation => "moderation",
        }
    }
}

/// A running service binary.
pub struct ServiceProcess {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
}

impl ServiceProcess {
    /// Starts `kind` with `env` (names without the prefix) and waits for its listening line.
    pub fn start(kind: Kind, env: &[(String, String)], log: &std::path::Path) -> ServiceProcess {
        let mut cmd = kind.command();
        for (k, v) in env {
            cmd.env(format!("{}{k}", kind.prefix()), v);
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn service");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(STEP).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "{} did not start within {STEP:?}; log: {}",
                kind.name(),
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        let addr = line
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        ServiceProcess { kind, addr, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The exit status, once the process has exited by itself.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + STEP;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not exit after SIGTERM",
                self.kind.name()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of a metric (summed over label sets containing every `labels` pair).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        fetch_metric(&self.url("/metrics"), name, labels).await
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `url` (a `/metrics` page) and sums `name` over the label sets matching `labels`.
async fn fetch_metric(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    sum_metric(&text, name, labels)
}

/// Sums the samples of `name` whose labels include every pair of `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The whole flow

/// Every part of the saga for one test: databases, topics, the four services, a hub.
pub struct Stack {
    pub topics: Topics,
    pub secret: String,
    pub dbs: BTreeMap<&'static str, TestDb>,
    pub services: BTreeMap<&'static str, ServiceProcess>,
    pub hub: Option<Hub>,
    /// Extra settings per service, applied at every (re)start.
    pub extra: BTreeMap<&'static str, Vec<(String, String)>>,
    pub out: PathBuf,
}

impl Stack {
    /// Databases and topics; no process yet.
    pub async fn prepare(name: &str) -> Stack {
        Stack::prepare_on(name, &brokers()).await
    }

    /// The same on the Kafka at `brokers`.
    pub async fn prepare_on(name: &str, brokers: &str) -> Stack {
        let topics = Topics::create(brokers).await;
        let mut dbs = BTreeMap::new();
        for kind in [Kind::Order, Kind::Payment, Kind::Delivery, Kind::Moderation] {
            dbs.insert(kind.name(), TestDb::create(kind.name()).await);
        }
        Stack {
            topics,
            secret: hex(24),
            dbs,
            services: BTreeMap::new(),
            hub: None,
            extra: BTreeMap::new(),
            out: output_dir(name),
        }
    }

    /// Everything: the four services and a hub ingesting the test's topics.
    pub async fn start(name: &str) -> Stack {
        let mut stack = Stack::prepare(name).await;
        stack.start_hub().await;
        for kind in [Kind::Order, Kind::Payment, Kind::Delivery, Kind::Moderation] {
            stack.start_service(kind);
        }
        stack
    }

    /// The settings a service gets.
    pub fn env(&self, kind: Kind) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), self.dbs[kind.name()].url.clone()),
            ("DATABASE_POOL_SIZE".into(), "4".into()),
            ("KAFKA_BROKERS".into(), self.topics.brokers.clone()),
            (
                "KAFKA_GROUP".into(),
                format!("{}{}", self.topics.prefix, kind.name()),
            ),
            ("TOPIC_PREFIX".into(), self.topics.prefix.clone()),
            ("ADDR".into(), "127.0.0.1:0".into()),
            ("LOG".into(), "info".into()),
        ];
        match kind {
            Kind::Order | Kind::Moderation => {
                env.push(("JWT_SECRET".into(), self.secret.clone()));
                // Tests that are not about rate limits are never limited.
                let (rate, burst) = match kind {
                    Kind::Order => ("ORDERS_PER_MINUTE", "ORDERS_BURST"),
                    _ => ("REPORTS_PER_MINUTE", "REPORTS_BURST"),
                };
                env.push((rate.into(), "100000".into()));
                env.push((burst.into(), "100000".into()));
                if let Some(hub) = &self.hub {
                    env.push(("ALLOWED_ORIGINS".into(), hub.base()));
                }
            }
            Kind::Delivery => env.push(("STEP_INTERVAL".into(), "150ms".into())),
            Kind::Payment => {}
        }
        if let Some(extra) = self.extra.get(kind.name()) {
            env.extend(extra.iter().cloned());
        }
        env
    }

    pub fn start_service(&mut self, kind: Kind) -> &ServiceProcess {
        let log = self.out.join(format!("{}.log", kind.name()));
        let process = ServiceProcess::start(kind, &self.env(kind), &log);
        self.services.insert(kind.name(), process);
        &self.services[kind.name()]
    }

    pub fn service(&self, kind: Kind) -> &ServiceProcess {
        &self.services[kind.name()]
    }

    pub fn take_service(&mut self, kind: Kind) -> ServiceProcess {
        self.services.remove(kind.name()).expect("service running")
    }

    pub fn db(&self, kind: Kind) -> TestDb {
        self.dbs[kind.name()].clone()
    }

    pub async fn start_hub(&mut self) {
        self.hub = Some(Hub::start(&self.secret, &self.topics, false).await);
    }

    pub async fn start_dev_hub(&mut self) {
        self.hub = Some(Hub::start(&self.secret, &self.topics, true).await);
    }

    pub fn hub(&self) -> &Hub {
        self.hub.as_ref().expect("hub started")
    }

    /// A token of `user` for the API of `kind` (with its audience).
    pub fn token(&self, kind: Kind, user: &str) -> String {
        token_for(&self.secret, user, Some(kind.audience()))
    }

    /// Publishes an ad of `owner` in the moderation service's catalogue; returns its id.
    pub async fn post_ad(&self, owner: &str, title: &str) -> String {
        let (status, body) = post(
            &self.service(Kind::Moderation).url("/ads"),
            Some(&self.token(Kind::Moderation, owner)),
            &json!({"title": title}),
        )
        .await;
        assert_eq!(status, 201, "POST /ads: {body}");
        assert_eq!(body["owner_id"], owner);
        body["ad_id"].as_str().expect("ad_id").to_owned()
    }

    /// POST /orders as `user`; returns the order id.
    pub async fn place_order(&self, user: &str, price_cents: i64) -> String {
        let (status, body) = post(
            &self.service(Kind::Order).url("/orders"),
            Some(&self.token(Kind::Order, user)),
            &json!({
                "items": [{"product_id": "p1", "quantity": 2, "price_cents": price_cents}],
                "delivery_address": "1 Test Street",
            }),
        )
        .await;
        assert_eq!(status, 201, "POST /orders: {body}");
        assert_eq!(body["status"], "CREATED");
        body["order_id"].as_str().expect("order_id").to_owned()
    }

    /// Stops everything and removes the test's databases and topics.
    pub async fn cleanup(mut self) {
        self.services.clear();
        if let Some(hub) = self.hub.take() {
            hub.stop().await;
        }
        for (_, db) in std::mem::take(&mut self.dbs) {
            db.drop_db().await;
        }
        self.topics.delete().await;
    }
}

/// A token for the hub (no audience).
pub fn token(secret: &str, user: &str) -> String {
    token_for(secret, user, None)
}

/// A token of `user` with `aud` when given.
pub fn token_for(secret: &str, user: &str, aud: Option<&str>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let mut claims = json!({"sub": user, "exp": exp});
    if let Some(aud) = aud {
        claims["aud"] = json!(aud);
    }
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

pub async fn post(url: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------------------------
// Hub

/// A hub node in the test's runtime (memory backplane) ingesting the test's topics (and not the
/// shared unprefixed ones, which may hold anything, e.g. what `make demo` produced).
pub struct Hub {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    _routes: tempfile_dir::TempDir,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The hub's built-in routes, on the test's prefixed topics.
fn routes(prefix: &str) -> String {
    format!(
        r#"
[[route]]
name = "it-order-status"
topic = "{prefix}order.status.changed"
message = "notifications.orders.v1.OrderStatusChanged"
type = "order.status"
recipients = ["user_id"]
data = {{ order_id = "order_id", status = "status", previous_status = "previous_status" }}

[[route]]
name = "it-moderation-reporter"
topic = "{prefix}moderation.results"
message = "notifications.moderation.v1.ModerationResult"
type = "moderation.result"
recipients = ["reporter_id"]
data = {{ report_id = "report_id", target_type = "target_type", target_id = "target_id", decision = "decision" }}
constants = {{ role = "reporter" }}

[[route]]
name = "it-moderation-owner"
topic = "{prefix}moderation.results"
message = "notifications.moderation.v1.ModerationResult"
type = "moderation.result"
recipients = ["target_owner_id"]
filter = [{{ field = "decision", in = ["REMOVED"] }}]
data = {{ report_id = "report_id", target_type = "target_type", target_id = "target_id", decision = "decision" }}
constants = {{ role = "owner" }}
"#
    )
}

impl Hub {
    async fn start(secret: &str, topics: &Topics, dev: bool) -> Hub {
        let dir = std::env::temp_dir().join(format!("producers-it-{}", hex(6)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let routes_file = dir.join("routes.toml");
        std::fs::write(&routes_file, routes(&topics.prefix)).expect("routes file");
        let routes_path = routes_file.to_string_lossy().into_owned();
        let group = format!("{}hub", topics.prefix);
        let brokers = topics.brokers.clone();
        let api_key = hex(16);
        let settings = hub::config::Settings::load_from_pairs([
            ("HUB_ADDR", "127.0.0.1:0"),
            ("HUB_JWT_SECRET", secret),
            ("HUB_API_KEY", api_key.as_str()),
            ("HUB_KAFKA_BROKERS", brokers.as_str()),
            ("HUB_KAFKA_GROUP", group.as_str()),
            ("HUB_INGEST_ROUTES", routes_path.as_str()),
            // The same routes as the built-in ones, on the test's topics only.
            ("HUB_INGEST_BUILTIN_ROUTES", "false"),
            ("HUB_HISTORY_SIZE", "1000"),
            ("HUB_DRAIN_WINDOW", "100ms"),
            ("HUB_PING_INTERVAL", "2s"),
        ])
        .expect("hub settings");
        let app = hub::app::Application::build(settings, hub::app::Options { dev })
            .await
            .expect("hub builds");
        let addr: SocketAddr = ([127, 0, 0, 1], app.port()).into();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = app
                .run_until_stopped(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Hub {
            addr,
            stop: Some(stop),
            done: Some(done),
            _routes: tempfile_dir::TempDir(dir),
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        fetch_metric(&format!("{}/metrics", self.base()), name, labels).await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = timeout(STEP, done).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Ws,
    Sse,
}

/// A client connection that collects every envelope it receives.
pub struct Inbox {
    pub transport: Transport,
    events: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Inbox {
    /// Connects `user` and waits for `hub.connected`.
    pub async fn connect(hub: &Hub, secret: &str, user: &str, transport: Transport) -> Inbox {
        let token = token(secret, user);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = match transport {
            Transport::Ws => {
                let url = format!("ws://{}/ws?token={token}", hub.addr);
                let (mut ws, _) = timeout(STEP, tokio_tungstenite::connect_async(url))
                    .await
                    .expect("WS connect in time")
                    .expect("WS connect");
                tokio::spawn(async move {
                    while let Some(Ok(m)) = ws.next().await {
                        if let tokio_tungstenite::tungstenite::Message::Text(t) = m
                            && let Ok(v) = serde_json::from_str::<Value>(&t)
                        {
                            sink.lock().push(v);
                        }
                    }
                })
            }
            Transport::Sse => {
                let url = format!("http://{}/sse?token={token}", hub.addr);
                let mut resp = reqwest::get(url).await.expect("SSE connect");
                assert_eq!(resp.status(), 200, "SSE refused");
                tokio::spawn(async move {
                    let mut buf = String::new();
                    while let Ok(Some(chunk)) = resp.chunk().await {
                        buf.push_str(&String::from_utf8_lossy(&chunk));
                        while let Some(end) = buf.find("\n\n") {
                            let event: String = buf.drain(..end + 2).collect();
                            for line in event.lines() {
                                if let Some(data) = line.strip_prefix("data: ")
                                    && let Ok(v) = serde_json::from_str::<Value>(data)
                                {
                                    sink.lock().push(v);
                                }
                            }
                        }
                    }
                })
            }
        };
        let inbox = Inbox {
            transport,
            events,
            task,
        };
        inbox
            .wait("hub.connected", |e| {
                e.iter().any(|v| v["type"] == "hub.connected")
            })
            .await;
        inbox
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().clone()
    }

    /// Envelopes of `kind`.
    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|v| v["type"] == kind)
            .collect()
    }

    /// The statuses of `order_id`, in arrival order.
    pub fn statuses(&self, order_id: &str) -> Vec<String> {
        self.of_type("order.status")
            .iter()
            .filter(|v| v["data"]["order_id"] == order_id)
            .map(|v| v["data"]["status"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until `done(events)` holds.
    pub async fn wait(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        self.wait_within(what, STEP, done).await;
    }

    /// Waits until `done(events)` holds, for at most `limit`.
    pub async fn wait_within(&self, what: &str, limit: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.events.lock()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} ({:?}): not within {limit:?}; received: {:?}",
                self.transport,
                self.events()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `order_id` reached `status`.
    pub async fn wait_status(&self, order_id: &str, status: &str) {
        self.wait_status_within(order_id, status, STEP).await;
    }

    /// Waits until `order_id` reached `status`, for at most `limit`.
    pub async fn wait_status_within(&self, order_id: &str, status: &str, limit: Duration) {
        self.wait_within(&format!("order {order_id} {status}"), limit, |events| {
            events.iter().any(|v| {
                v["type"] == "order.status"
                    && v["data"]["order_id"] == order_id
                    && v["data"]["status"] == status
            })
        })
        .await;
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The happy path's statuses.
pub const DELIVERED_PATH: [&str; 5] = [
    "CREATED",
    "PAID",
    "IN_TRANSIT",
    "OUT_FOR_DELIVERY",
    "DELIVERED",
];

// ---------------------------------------------------------------------------------------------
// A Kafka broker of the test's own

/// A broker on three free ports (`infra/local/kafka.sh --port`: PLAINTEXT on `port`, the
/// controller on `port + 1`, SASL_PLAINTEXT on `port + 2`), for a test that stops and restarts
/// Kafka, or needs the SASL listener, without disturbing the others. Stopped, and its data
/// removed, on drop.
pub struct PrivateKafka {
    pub port: u16,
}

fn kafka_script(args: &[&str]) -> std::process::Output {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/local/kafka.sh");
    Command::new(script)
        .args(args)
        .output()
        .expect("run infra/local/kafka.sh")
}

impl PrivateKafka {
    pub async fn start() -> PrivateKafka {
        let port = loop {
            let p = 20_000 + 3 * (rand::random::<u16>() % 10_000);
            let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
            if free(p) && free(p + 1) && free(p + 2) {
                break p;
            }
        };
        let kafka = PrivateKafka { port };
        kafka.resume().await;
        kafka
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SASL_PLAINTEXT listener (SASL/PLAIN; users `hub`, `services`).
    pub fn sasl_brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port + 2)
    }

    /// (Re)starts the broker with its data.
    pub async fn resume(&self) {
        let port = self.port.to_string();
        let out = tokio::task::spawn_blocking(move || kafka_script(&["start", "--port", &port]))
            .await
            .expect("join");
        assert!(
            out.status.success(),
            "private Kafka on {} did not start: {}{}",
            self.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the broker (SIGTERM, as an operator would).
    pub async fn stop(&self) {
        let port = self.port.to_string();
        let out = tokio::task::spawn_blocking(move || kafka_script(&["stop", "--port", &port]))
            .await
            .expect("join");
        assert!(out.status.success(), "private Kafka did not stop");
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        let port = self.port.to_string();
        let _ = kafka_script(&["stop", "--port", &port]);
        let run = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.run/kafka");
        let _ = std::fs::remove_dir_all(run.join("data").join(&port));
    }
}
