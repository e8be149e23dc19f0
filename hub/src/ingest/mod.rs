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
//!   recovers. A record that cannot be decoded or routed, has an unsupported `content-type`,
//!   is larger than `HUB_INGEST_MAX_RECORD_BYTES`, names an invalid user, is refused by the
//!   backplane as permanently unpublishable, or makes its processing panic goes to
//!   `<topic>.dlq` with headers naming the error and its source topic, partition and offset
//!   (the scheme of [`kafka_runtime::dlq`]), and the partition moves on.
//!
//! The partition workers, batching, retries, the DLQ and offset handling are the workspace's
//! Kafka runtime ([`kafka_runtime`]); this module is the hub's [`Handler`]: decode, route and
//! publish a batch.

pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kafka_runtime::{
    Consumer, ConsumerError, ConsumerSettings, Handler, Observer, Outcome, Record, Security,
};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::backplane::{Backplane, BackplaneError, Dedupe, Publish, Published};
use crate::envelope::now_micros;
use crate::metrics::IngestMetrics;
pub use routes::{Recipient, RouteError, Routed, Routes, RoutesError};

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
    /// Security settings (SASL, TLS) of every client.
    pub security: Security,
    /// How long the broker may hold a fetch for more records (records come in groups; each
    /// partition's group is one batch).
    pub linger: Duration,
}

impl Observer for IngestMetrics {
    fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.set_lag(topic, partition, lag);
    }

    fn dlq(&self, topic: &str) {
        if let Some(c) = self.topic(topic) {
            c.dlq.inc();
            c.dlq_outcome.inc();
        }
    }
}

/// Ingest could not start, or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The Kafka client could not be created or subscribe.
    #[error("config: HUB_KAFKA_BROKERS: {0}")]
    Kafka(String),
    /// A partition worker stopped unexpectedly; ingest cannot go on safely.
    #[error("ingest: a partition worker stopped unexpectedly")]
    WorkerStopped,
    /// The brokers refused the credentials, or their certificate is not trusted: retrying
    /// cannot mend it (the line names the settings to check).
    #[error("{0}")]
    Refused(String),
}

impl From<ConsumerError> for IngestError {
    fn from(e: ConsumerError) -> Self {
        match e {
            ConsumerError::Kafka(e) => IngestError::Kafka(e.to_string()),
            ConsumerError::WorkerStopped => IngestError::WorkerStopped,
        }
    }
}

/// The DLQ writer: idempotent, acknowledged by every replica, sent at once.
fn producer(
    settings: &IngestSettings,
    context: &kafka_runtime::KafkaContext,
) -> Result<kafka_runtime::Producer, IngestError> {
    settings
        .security
        .client_config(&settings.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000")
        .create_with_context(context.clone())
        .map_err(|e| IngestError::Kafka(e.to_string()))
}

/// Runs ingest until `stop` is cancelled, then finishes in-flight records, commits and returns.
pub async fn run(
    settings: IngestSettings,
    backplane: Arc<dyn Backplane>,
    metrics: IngestMetrics,
    stop: CancellationToken,
) -> Result<(), IngestError> {
    let (context, auth) = kafka_runtime::KafkaContext::new();
    let dlq = producer(&settings, &context)?;
    let topics = settings.routes.topics();
    let consumer = Consumer::new(
        &ConsumerSettings {
            brokers: settings.brokers.clone(),
            security: settings.security.clone(),
            group: settings.group.clone(),
            topics: topics.clone(),
            max_batch: MAX_BATCH,
            linger: settings.linger,
            queue: MAX_BATCH,
            // The client commits what is stored every second (plus on revoke and shutdown).
            commit_interval: Duration::from_secs(1),
        },
        &context,
        Arc::new(metrics.clone()),
        dlq,
    )?;
    tracing::info!(topics = ?topics, group = %settings.group, "ingest started");
    let failed = metrics.failed.clone();
    let handler = Ingest {
        backplane,
        routes: settings.routes.clone(),
        metrics,
        max_record_bytes: settings.max_record_bytes,
    };
    // A refusal stops ingest as the node's shutdown would: in-flight records finish, and the
    // partitions go to the group's other members, which may have working settings.
    let until = stop.child_token();
    let run = consumer.run(handler, until.clone());
    tokio::pin!(run);
    let result = tokio::select! {
        result = &mut run => result.map_err(IngestError::from),
        refusal = auth.wait() => {
            let line = refusal.explain("HUB_", settings.security.username.as_deref());
            until.cancel();
            let _ = run.await;
            Err(IngestError::Refused(line))
        }
    };
    tracing::info!("ingest stopped");
    if result.is_err() {
        failed.set(1);
    }
    result
}

/// The hub's handler: decode and route each record, publish a batch's notifications together.
struct Ingest {
    backplane: Arc<dyn Backplane>,
    routes: Arc<Routes>,
    metrics: IngestMetrics,
    max_record_bytes: usize,
}

/// Why a publish did not happen.
enum NotPublished {
    /// Transient (the backplane unreachable); the records are handed again.
    Transient(String),
    /// The backplane refuses for good.
    Refused(String),
}

#[async_trait]
impl Handler for Ingest {
    /// Every notification of a batch goes to the backplane in one round trip; a batch the
    /// backplane refuses for good is published record by record to find the refused one.
    async fn handle(&self, records: &[Record<'_>]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ok; records.len()];
        let mut pending: Vec<(usize, Vec<Publish>)> = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            match self.prepare(record) {
                Err(e) => outcomes[index] = Outcome::Dlq(e.to_string()),
                Ok(msgs) if msgs.is_empty() => {
                    if let Some(c) = self.metrics.topic(record.topic()) {
                        c.filtered.inc();
                    }
                }
                Ok(msgs) => pending.push((index, msgs)),
            }
        }
        if pending.is_empty() {
            return outcomes;
        }
        let all: Vec<Publish> = pending
            .iter()
            .flat_map(|(_, m)| m.iter().cloned())
            .collect();
        match self.publish(all).await {
            Ok(published) => {
                let mut results = published.into_iter();
                for (index, msgs) in &pending {
                    let outcomes: Vec<Published> = results.by_ref().take(msgs.len()).collect();
                    self.count(&records[*index], &outcomes);
                }
            }
            Err(NotPublished::Transient(why)) => {
                // Everything before the first unpublished record is done (in the DLQ or
                // filtered); that record and the rest are handed again.
                outcomes[pending[0].0] = Outcome::Retry(why);
            }
            Err(NotPublished::Refused(_)) => self.one_by_one(records, pending, &mut outcomes).await,
        }
        outcomes
    }
}

impl Ingest {
    /// Publishes each record's notifications on their own; the refused ones go to the DLQ.
    async fn one_by_one(
        &self,
        records: &[Record<'_>],
        pending: Vec<(usize, Vec<Publish>)>,
        outcomes: &mut [Outcome],
    ) {
        for (index, msgs) in pending {
            match self.publish(msgs).await {
                Ok(published) => self.count(&records[index], &published),
                Err(NotPublished::Refused(why)) => {
                    outcomes[index] = Outcome::Dlq(RouteError::Refused(why).to_string());
                }
                Err(NotPublished::Transient(why)) => {
                    outcomes[index] = Outcome::Retry(why);
                    return;
                }
            }
        }
    }

    /// Publishes notifications in one backplane round trip.
    async fn publish(&self, msgs: Vec<Publish>) -> Result<Vec<Published>, NotPublished> {
        match self.backplane.publish_batch(msgs).await {
            Ok(p) => Ok(p),
            Err(BackplaneError::Rejected(why)) => Err(NotPublished::Refused(why)),
            Err(e) => Err(NotPublished::Transient(format!("publish failed: {e}"))),
        }
    }

    /// Counts what one record's notifications did, and logs them (at debug) with the
    /// record's W3C trace id, so one order can be followed from its API call through the
    /// outbox and Kafka into the hub.
    fn count(&self, record: &Record<'_>, published: &[Published]) {
        let topic = record.topic();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let trace_id = record.trace_id();
            for p in published {
                tracing::debug!(
                    topic,
                    partition = record.partition(),
                    offset = record.offset(),
                    trace_id,
                    id = %p.id,
                    duplicate = p.duplicate,
                    "ingested record published"
                );
            }
        }
        let kafka_ms = record.timestamp_millis();
        let counters = self.metrics.topic(topic);
        for p in published {
            if p.duplicate {
                if let Some(c) = counters {
                    c.duplicate.inc();
                }
                continue;
            }
            self.metrics.published.inc();
            if let Some(c) = counters {
                c.published.inc();
            }
            if let Some(ms) = kafka_ms {
                let lag = (now_micros() / 1000).saturating_sub(ms.max(0) as u64);
                self.metrics.latency.observe(lag as f64 / 1000.0);
            }
        }
    }

    /// Decodes and routes one record into the notifications it makes (none when the routes
    /// filter it out).
    fn prepare(&self, record: &Record<'_>) -> Result<Vec<Publish>, RouteError> {
        let payload = record.payload();
        if payload.len() > self.max_record_bytes {
            return Err(RouteError::TooLarge(format!(
                "record of {} bytes is larger than HUB_INGEST_MAX_RECORD_BYTES ({})",
                payload.len(),
                self.max_record_bytes
            )));
        }
        let json = record.content_type() == proto::ContentType::Json;
        let routed = self.routes.route(record.topic(), payload, json)?;
        let mut out = Vec::with_capacity(routed.len());
        for r in routed {
            // A channel's name was checked when the route rendered it.
            let stream = match r.to {
                Recipient::User(user) => {
                    if let Err(bad) = crate::envelope::check_user_id(&user) {
                        return Err(RouteError::Unroutable(format!("recipient: {bad}")));
                    }
                    user
                }
                Recipient::Channel(channel) => crate::envelope::channel_stream(&channel),
            };
            let Ok(data) = RawValue::from_string(r.data.to_string()) else {
                return Err(RouteError::Decode("data is not JSON".to_owned()));
            };
            out.push(Publish {
                user: stream,
                kind: r.kind,
                data,
                dedupe: Some(Dedupe::Event(r.idempotency_key)),
            });
        }
        Ok(out)
    }
}
