//! Kafka ingest: consume domain events, route them into per-user notifications, publish them
//! through the backplane, and only then let the offsets move.
//!
//! - **At least once, no duplicates:** a record's offset is stored (and later committed, every
//!   second, on revoke and at shutdown) only after every notification it produces is durable
//!   in history, or the record is safely in the DLQ. A redelivered record publishes with the
//!   same idempotency key (route name + `event_id`), so it makes no second notification.
//! - **Order:** one worker task per partition processes that partition's records in order;
//!   partitions proceed in parallel. A worker takes what is ready (up to 256 records) and
//!   publishes all their notifications in one backplane round trip; the batch's last offset
//!   is stored only after the whole batch is durable (or in the DLQ), so a crash mid-batch
//!   re-reads the batch and the idempotency keys absorb what was already published.
//! - **Failures:** a transient failure (the backplane unreachable) retries the same record with
//!   backoff, never skipping it; its worker's queue fills and consumption pauses until it
//!   recovers. A record that cannot be decoded or routed, is larger than
//!   `HUB_INGEST_MAX_RECORD_BYTES`, names an invalid user, is refused by the backplane as
//!   permanently unpublishable, or makes its processing panic goes to `<topic>.dlq` with
//!   headers naming the error and its source topic, partition and offset, and the partition
//!   moves on.

pub mod routes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, IntCounterVec, IntGaugeVec};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backplane::{Backplane, BackplaneError, Dedupe, Publish, Published};
use crate::envelope::now_micros;
pub use routes::{RouteError, Routed, Routes, RoutesError};

/// Most records of one partition processed (and published) together.
const MAX_BATCH: usize = 256;

/// What ingest needs to run.
#[derive(Clone)]
pub struct IngestSettings {
    /// `host:port,...`.
    pub brokers: String,
    /// Consumer group.
    pub group: String,
    /// Validated routes.
    pub routes: Arc<Routes>,
    /// Largest record value accepted; larger ones go to the DLQ.
    pub max_record_bytes: usize,
    /// librdkafka security properties (SASL, TLS) for every client.
    pub security: Vec<(&'static str, String)>,
}

/// The features this build's librdkafka has (`ssl`, `sasl_scram`, ...).
fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map(|f| f.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_default()
}

/// Refuses security settings this build's Kafka client cannot honour, naming the setting,
/// instead of failing later on every connection attempt.
pub fn check_security(security: &[(&'static str, String)]) -> Result<(), IngestError> {
    let features = builtin_features();
    let has = |f: &str| features.iter().any(|x| x == f);
    for (key, value) in security {
        let tls = *key == "security.protocol" && value.ends_with("ssl");
        if tls && !has("ssl") {
            return Err(IngestError::Setting(
                "HUB_KAFKA_SECURITY_PROTOCOL",
                format!("{value} needs librdkafka with SSL, and this build has none"),
            ));
        }
        if *key == "sasl.mechanism" && value.starts_with("SCRAM") && !has("sasl_scram") {
            return Err(IngestError::Setting(
                "HUB_KAFKA_SASL_MECHANISM",
                format!("{value} needs librdkafka with SSL, and this build has none"),
            ));
        }
    }
    Ok(())
}

/// A client configuration with the brokers and security settings.
fn base_config(settings: &IngestSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (key, value) in &settings.security {
        config.set(*key, value);
    }
    config
}

/// Observability handles.
#[derive(Clone)]
pub struct IngestMetrics {
    /// `hub_ingest_events_total{topic,outcome}`.
    pub events: IntCounterVec,
    /// `hub_ingest_dlq_total{topic}`.
    pub dlq: IntCounterVec,
    /// `hub_ingest_consumer_lag{topic,partition}`.
    pub lag: IntGaugeVec,
    /// Kafka record timestamp → notification in history.
    pub latency: Histogram,
    /// Notifications published from Kafka.
    pub published: prometheus::IntCounter,
}

/// Ingest could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The Kafka client could not be created or subscribe.
    #[error("config: HUB_KAFKA_BROKERS: {0}")]
    Kafka(String),
    /// A setting this build cannot honour.
    #[error("config: {0}: {1}")]
    Setting(&'static str, String),
    /// A partition worker stopped unexpectedly; ingest cannot go on safely.
    #[error("ingest: a partition worker stopped unexpectedly")]
    WorkerStopped,
}

struct Context {
    metrics: IngestMetrics,
}

/// A subscribed topic that does not exist yet (a built-in route's topic on a cluster that
/// does not carry it): expected, and retried by the client, so not an error worth shouting.
fn is_missing_topic(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_missing_topic(&error) {
            tracing::debug!(%reason, "subscribed topic not available yet");
        } else {
            tracing::error!(%error, %reason, "kafka client error");
        }
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if p.partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        // Hand over what is done before the partitions move to another instance.
        if let Rebalance::Revoke(_) = rebalance
            && let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
        {
            tracing::debug!(error = %e, "commit on revoke");
        }
    }
}

type Ingestor = StreamConsumer<Context>;

/// Builds the consumer with low-latency settings.
fn consumer(settings: &IngestSettings, metrics: IngestMetrics) -> Result<Ingestor, IngestError> {
    base_config(settings)
        .set("group.id", &settings.group)
        // Offsets are stored by hand after the history append and committed by the client
        // every second (plus on revoke and shutdown).
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Latency: answer fetches as soon as one record is there, no Nagle delay.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.min.bytes", "1")
        .set("socket.nagle.disable", "true")
        // Notice a dead instance within seconds so its partitions move.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000")
        .create_with_context(Context { metrics })
        .map_err(|e| IngestError::Kafka(e.to_string()))
}

fn producer(settings: &IngestSettings) -> Result<FutureProducer, IngestError> {
    base_config(settings)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|e| IngestError::Kafka(e.to_string()))
}

/// Runs ingest until `stop` is cancelled, then finishes in-flight records, commits and returns.
pub async fn run(
    settings: IngestSettings,
    backplane: Arc<dyn Backplane>,
    metrics: IngestMetrics,
    stop: CancellationToken,
) -> Result<(), IngestError> {
    let consumer = Arc::new(consumer(&settings, metrics.clone())?);
    let dlq = producer(&settings)?;
    let topics = settings.routes.topics();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| IngestError::Kafka(e.to_string()))?;
    tracing::info!(topics = ?topics, group = %settings.group, "ingest started");

    let worker = Worker {
        consumer: consumer.clone(),
        dlq,
        backplane,
        routes: settings.routes.clone(),
        metrics,
        stop: stop.clone(),
        max_record_bytes: settings.max_record_bytes,
    };
    let mut failed = false;
    let mut partitions: HashMap<(String, i32), mpsc::Sender<OwnedMessage>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => break,
            r = consumer.recv() => r,
        };
        let message = match received {
            Ok(m) => m.detach(),
            Err(e) if is_missing_topic(&e) => {
                tracing::debug!(error = %e, "subscribed topic not available yet");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive error");
                continue;
            }
        };
        let key = (message.topic().to_owned(), message.partition());
        let tx = partitions.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(256);
            tasks.spawn(worker.clone().partition(rx));
            tx
        });
        // A full queue means that partition's worker is retrying: wait, which pauses intake.
        tokio::select! {
            () = stop.cancelled() => break,
            sent = tx.send(message) => {
                if sent.is_err() {
                    // Workers catch panics per record, so this is not expected; stop rather
                    // than skip records, and let the caller report it.
                    tracing::error!("a partition worker stopped; ingest stops");
                    failed = true;
                    break;
                }
            }
        }
    }
    drop(partitions);
    // Finish what was handed to workers (they stop retrying once `stop` is cancelled).
    while tasks.join_next().await.is_some() {}
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit");
    }
    tracing::info!("ingest stopped");
    if failed {
        return Err(IngestError::WorkerStopped);
    }
    Ok(())
}

#[derive(Clone)]
struct Worker {
    consumer: Arc<Ingestor>,
    dlq: FutureProducer,
    backplane: Arc<dyn Backplane>,
    routes: Arc<Routes>,
    metrics: IngestMetrics,
    stop: CancellationToken,
    max_record_bytes: usize,
}

/// How processing records ended: finished (their offsets may be stored) or abandoned at
/// shutdown (they are read again after a restart).
enum Outcome {
    Finished,
    Abandoned,
}

/// What one record turned into before publishing.
enum Prepared {
    /// Notifications to publish (none when the routes filtered it out).
    Publish(Vec<Publish>),
    /// The record goes to the DLQ for this reason.
    Dlq(RouteError),
}

/// The trace id of a record's W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`).
fn trace_id(message: &OwnedMessage) -> Option<&str> {
    let value = message.headers().and_then(|h| {
        h.iter()
            .find(|header| header.key.eq_ignore_ascii_case("traceparent"))
            .and_then(|header| header.value)
    })?;
    let text = std::str::from_utf8(value).ok()?;
    let id = text.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The text of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

impl Worker {
    /// Processes a partition's records in order, in batches of what is ready (up to
    /// [`MAX_BATCH`]): every notification of a batch goes to the backplane in one round trip,
    /// and the batch's last offset is stored only once all of it is durable (or in the DLQ).
    async fn partition(self, mut rx: mpsc::Receiver<OwnedMessage>) {
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            match self.process_batch(&batch).await {
                Outcome::Finished => {
                    if let Some(last) = batch.last()
                        && let Err(e) = self.consumer.store_offset(
                            last.topic(),
                            last.partition(),
                            last.offset(),
                        )
                    {
                        // The partition was revoked meanwhile; its new owner re-reads the
                        // records and the idempotency keys absorb the repeats.
                        tracing::debug!(error = %e, "offset not stored");
                    }
                }
                // Not stored: the records are read again after a restart.
                Outcome::Abandoned => return,
            }
            batch.clear();
            if batch.capacity() > MAX_BATCH {
                batch.shrink_to(MAX_BATCH);
            }
        }
    }

    async fn process_batch(&self, batch: &[OwnedMessage]) -> Outcome {
        // Decode and route each record; a record that cannot be (or whose routing panics)
        // goes to the DLQ now, the others' notifications are published together below.
        let mut pending: Vec<(usize, Vec<Publish>)> = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            let prepared =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.prepare(message)))
                    .unwrap_or_else(|panic| {
                        let what = panic_text(panic.as_ref());
                        tracing::error!(panic = %what, "processing a record panicked");
                        Prepared::Dlq(RouteError::Internal(format!("processing panicked: {what}")))
                    });
            match prepared {
                Prepared::Dlq(e) => {
                    if let Outcome::Abandoned = self.to_dlq(message, &e).await {
                        return Outcome::Abandoned;
                    }
                }
                Prepared::Publish(msgs) if msgs.is_empty() => {
                    self.metrics
                        .events
                        .with_label_values(&[message.topic(), "filtered"])
                        .inc();
                }
                Prepared::Publish(msgs) => pending.push((index, msgs)),
            }
        }
        if pending.is_empty() {
            return Outcome::Finished;
        }
        let all: Vec<Publish> = pending
            .iter()
            .flat_map(|(_, m)| m.iter().cloned())
            .collect();
        match self.publish_retrying(all).await {
            Ok(Some(published)) => {
                let mut results = published.into_iter();
                for (index, msgs) in &pending {
                    let outcomes: Vec<Published> = results.by_ref().take(msgs.len()).collect();
                    self.count(&batch[*index], &outcomes);
                }
                Outcome::Finished
            }
            Ok(None) => Outcome::Abandoned,
            // One of them is refused for good: find it, record by record.
            Err(_) => {
                for (index, msgs) in pending {
                    let message = &batch[index];
                    match self.publish_retrying(msgs).await {
                        Ok(Some(published)) => self.count(message, &published),
                        Ok(None) => return Outcome::Abandoned,
                        Err(why) => {
                            if let Outcome::Abandoned =
                                self.to_dlq(message, &RouteError::Refused(why)).await
                            {
                                return Outcome::Abandoned;
                            }
                        }
                    }
                }
                Outcome::Finished
            }
        }
    }

    /// Publishes, retrying transient failures with backoff until it succeeds (`Some`), the
    /// node stops (`None`), or the backplane refuses for good (`Err` with the reason).
    async fn publish_retrying(&self, msgs: Vec<Publish>) -> Result<Option<Vec<Published>>, String> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.backplane.publish_batch(msgs.clone()).await {
                Ok(p) => return Ok(Some(p)),
                Err(BackplaneError::Rejected(why)) => return Err(why),
                Err(e) => {
                    tracing::warn!(error = %e, "publish failed, retrying the records");
                    tokio::select! {
                        () = self.stop.cancelled() => return Ok(None),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Counts what one record's notifications did, and logs them (at debug) with the
    /// record's W3C trace id, so one order can be followed from its API call through the
    /// outbox and Kafka into the hub.
    fn count(&self, message: &OwnedMessage, published: &[Published]) {
        let topic = message.topic();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let trace_id = trace_id(message).unwrap_or_default();
            for p in published {
                tracing::debug!(
                    topic,
                    partition = message.partition(),
                    offset = message.offset(),
                    trace_id,
                    id = %p.id,
                    duplicate = p.duplicate,
                    "ingested record published"
                );
            }
        }
        let kafka_ms = message.timestamp().to_millis();
        for p in published {
            let outcome = if p.duplicate {
                "duplicate"
            } else {
                self.metrics.published.inc();
                if let Some(ms) = kafka_ms {
                    let lag = (now_micros() / 1000).saturating_sub(ms.max(0) as u64);
                    self.metrics.latency.observe(lag as f64 / 1000.0);
                }
                "published"
            };
            self.metrics
                .events
                .with_label_values(&[topic, outcome])
                .inc();
        }
    }

    /// Decodes and routes one record into the notifications it makes.
    fn prepare(&self, message: &OwnedMessage) -> Prepared {
        let topic = message.topic();
        // Read as the contract crate reads it: case and parameters ignored. An unknown
        // content type is left to the decoder (protobuf), as before.
        let content_type = message.headers().and_then(|h| {
            h.iter()
                .find(|header| header.key.eq_ignore_ascii_case("content-type"))
                .map(|header| header.value.unwrap_or_default())
        });
        let json = matches!(
            proto::ContentType::from_header(content_type),
            Ok(proto::ContentType::Json)
        );
        let payload = message.payload().unwrap_or_default();
        if payload.len() > self.max_record_bytes {
            return Prepared::Dlq(RouteError::TooLarge(format!(
                "record of {} bytes is larger than HUB_INGEST_MAX_RECORD_BYTES ({})",
                payload.len(),
                self.max_record_bytes
            )));
        }
        let routed = match self.routes.route(topic, payload, json) {
            Ok(r) => r,
            Err(e) => return Prepared::Dlq(e),
        };
        let mut out = Vec::with_capacity(routed.len());
        for r in routed {
            if let Err(bad) = crate::envelope::check_user_id(&r.user) {
                return Prepared::Dlq(RouteError::Unroutable(format!("recipient: {bad}")));
            }
            let Ok(data) = RawValue::from_string(r.data.to_string()) else {
                return Prepared::Dlq(RouteError::Decode("data is not JSON".to_owned()));
            };
            out.push(Publish {
                user: r.user,
                kind: r.kind,
                data,
                dedupe: Some(Dedupe::Event(r.idempotency_key)),
            });
        }
        Prepared::Publish(out)
    }

    async fn to_dlq(&self, message: &OwnedMessage, error: &RouteError) -> Outcome {
        let topic = message.topic();
        let dlq_topic = format!("{topic}.dlq");
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let reason = error.to_string();
        let trace_id = trace_id(message).unwrap_or_default();
        tracing::warn!(topic, partition = message.partition(), offset = message.offset(), trace_id, %reason, "record to DLQ");
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "hub-error",
                    value: Some(reason.as_str()),
                })
                .insert(Header {
                    key: "hub-source-topic",
                    value: Some(topic),
                })
                .insert(Header {
                    key: "hub-source-partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "hub-source-offset",
                    value: Some(offset.as_str()),
                });
            if let Some(original) = message.headers() {
                for h in original.iter() {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&dlq_topic).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self.dlq.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    self.metrics.dlq.with_label_values(&[topic]).inc();
                    self.metrics.events.with_label_values(&[topic, "dlq"]).inc();
                    return Outcome::Finished;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, dlq = %dlq_topic, "DLQ write failed, retrying");
                    tokio::select! {
                        () = self.stop.cancelled() => return Outcome::Abandoned,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
