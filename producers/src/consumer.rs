//! How a service consumes: the workspace's Kafka runtime ([`kafka_runtime`]) with a handler
//! that applies each record in a database transaction.
//!
//! The runtime gives every service one worker per assigned partition (records of a partition
//! one at a time, in order; partitions in parallel), retries with backoff, the DLQ and offset
//! handling (see its crate docs). What this module adds: the [`Handler`] of a service runs in
//! a transaction that also claims the event id in `processed_events`; the record's offset is
//! stored only after the transaction commits, and stored offsets are committed every 200 ms and
//! at shutdown. A redelivered record finds its claim and changes nothing. A record that can
//! never be handled (undecodable, unknown order, ...) goes to `<topic>.dlq`; a transient
//! failure (database down) retries the same record (its partition waits; the others go on).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kafka_runtime::{ConsumerSettings, Observer, Outcome};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::Settings;
use crate::kafka::{KafkaContext, Producer};
use crate::metrics::Metrics;
use crate::trace::TraceContext;

pub use kafka_runtime::Record;

/// What became of a record.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    /// The effect was written and committed.
    Applied,
    /// Its event id was claimed before: nothing changed.
    Duplicate,
}

/// Why a handler did not apply a record.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The record can never be handled: it goes to the DLQ.
    #[error("{0}")]
    Poison(String),
    /// Try the same record again later.
    #[error("database: {0}")]
    Transient(#[from] sqlx::Error),
}

/// A service's reaction to the records of its topics. The consumer decodes a record with
/// [`Handler::decode`], claims the event's id in `processed_events` and, only when the claim is
/// new, runs [`Handler::apply`] in the same transaction.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// A record's content, decoded and checked.
    type Event: Send + Sync;
    /// This consumer's name in `processed_events`.
    const CONSUMER: &'static str;

    /// Decodes and checks a record; the error is why it can never be handled (it goes to the
    /// DLQ with that reason).
    fn decode(&self, record: &Record<'_>) -> Result<Self::Event, String>;

    /// The id that makes a redelivered event a duplicate.
    fn event_id(event: &Self::Event) -> &str;

    /// Writes the effect of an event seen for the first time, inside `tx`. `trace` is this
    /// handling's span (the record's trace, a new span id): the events it emits carry it.
    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &Self::Event,
        trace: &TraceContext,
    ) -> Result<(), HandleError>;
}

/// Records queued per partition worker; a full queue holds up fetching (bounded memory).
const WORKER_QUEUE: usize = 64;
/// How often stored offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// The consumer of one service process.
pub struct Consumer {
    consumer: kafka_runtime::Consumer,
    pool: PgPool,
    metrics: Metrics,
}

/// The service's counters for what the runtime does with records.
impl Observer for Metrics {
    fn dlq(&self, topic: &str) {
        self.consumed.with_label_values(&[topic, "dlq"]).inc();
    }

    fn retry(&self, topic: &str) {
        self.consumed.with_label_values(&[topic, "retry"]).inc();
    }
}

impl Consumer {
    /// Subscribes `group` to `topics`.
    pub fn new(
        settings: &Settings,
        group: &str,
        topics: &[String],
        pool: PgPool,
        dlq: Producer,
        metrics: Metrics,
        context: KafkaContext,
    ) -> anyhow::Result<Self> {
        let consumer = kafka_runtime::Consumer::new(
            &ConsumerSettings {
                brokers: settings.kafka_brokers().to_owned(),
                security: settings.kafka_security(),
                group: group.to_owned(),
                topics: topics.to_vec(),
                // One record per transaction: a batch would hold one transaction's locks
                // across unrelated orders.
                max_batch: 1,
                linger: Duration::ZERO,
                queue: WORKER_QUEUE,
                commit_interval: COMMIT_EVERY,
            },
            &context,
            Arc::new(metrics.clone()),
            dlq,
        )?;
        Ok(Consumer {
            consumer,
            pool,
            metrics,
        })
    }

    /// Consumes until `stop` is cancelled, then commits what was handled.
    pub async fn run<H: Handler>(self, handler: H, stop: CancellationToken) {
        let applier = Applier {
            handler,
            pool: self.pool,
            metrics: self.metrics,
        };
        if let Err(e) = self.consumer.run(applier, stop).await {
            tracing::error!(error = %e, "kafka: the consumer stopped");
        }
    }
}

/// A service [`Handler`] as the runtime's handler: each record in its own transaction.
struct Applier<H> {
    handler: H,
    pool: PgPool,
    metrics: Metrics,
}

#[async_trait]
impl<H: Handler> kafka_runtime::Handler for Applier<H> {
    async fn handle(&self, records: &[Record<'_>]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            // The record's trace continues here (a record without one starts a new trace), so
            // what this handling logs and emits shares the trace id of the order it is about.
            let trace = TraceContext::continue_or_start(record.traceparent());
            let span = tracing::info_span!(
                "record",
                topic = record.topic(),
                partition = record.partition(),
                offset = record.offset(),
                trace_id = %trace.trace_id()
            );
            let outcome = self.apply(record, &trace).instrument(span).await;
            let retry = matches!(outcome, Outcome::Retry(_));
            outcomes.push(outcome);
            if retry {
                break;
            }
        }
        outcomes
    }
}

impl<H: Handler> Applier<H> {
    /// Decodes the record, then claims and applies it in one transaction.
    async fn apply(&self, record: &Record<'_>, trace: &TraceContext) -> Outcome {
        let event = match self.handler.decode(record) {
            Ok(event) if H::event_id(&event).is_empty() => {
                return Outcome::Dlq("event_id is empty".to_owned());
            }
            Ok(event) => event,
            Err(reason) => return Outcome::Dlq(reason),
        };
        let outcome = async {
            let mut tx = self.pool.begin().await?;
            if !crate::db::claim(&mut tx, H::CONSUMER, H::event_id(&event)).await? {
                tx.rollback().await?;
                return Ok(Handled::Duplicate);
            }
            self.handler.apply(&mut tx, &event, trace).await?;
            tx.commit().await?;
            Ok::<_, HandleError>(Handled::Applied)
        }
        .await;
        let counted = match outcome {
            Ok(Handled::Applied) => "applied",
            Ok(Handled::Duplicate) => "duplicate",
            Err(HandleError::Poison(reason)) => return Outcome::Dlq(reason),
            Err(e @ HandleError::Transient(_)) => return Outcome::Retry(e.to_string()),
        };
        self.metrics
            .consumed
            .with_label_values(&[record.topic(), counted])
            .inc();
        Outcome::Ok
    }
}
