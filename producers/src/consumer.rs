//! The Kafka consumer loop every service uses.
//!
//! One worker per assigned partition: records of a partition are handled one at a time, in
//! order (each order's or report's events share a partition), partitions in parallel. The
//! [`Handler`] runs in a database transaction that also claims the event id in
//! `processed_events`; after the transaction commits, the record's offset is stored, and stored
//! offsets are committed explicitly every 200 ms and at shutdown (auto-commit is off, so an
//! offset is never committed before its record was handled). A redelivered record finds its
//! claim and changes nothing. A record that can never be handled (undecodable, unknown order,
//! ...) goes to `<topic>.dlq` with headers naming the error and the source, and the partition
//! moves on. A transient failure (database down) retries the same record with backoff (its
//! partition waits; the others go on).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::Settings;
use crate::kafka::Producer;
use crate::metrics::Metrics;
use crate::outbox::sleep_or_stop;
use crate::trace::TraceContext;

/// One consumed record, as a handler sees it.
pub struct Record<'a> {
    /// Topic (with the configured prefix).
    pub topic: &'a str,
    /// Value.
    pub payload: &'a [u8],
    /// Protobuf unless the record says `content-type: application/json`.
    pub content_type: proto::ContentType,
}

impl Record<'_> {
    /// Decodes the value as `T`; the error is the reason the record goes to the DLQ.
    pub fn decode<T>(&self) -> Result<T, String>
    where
        T: prost::Message + prost::Name + Default + serde::de::DeserializeOwned,
    {
        proto::decode(self.content_type, self.payload).map_err(|e| format!("undecodable: {e}"))
    }
}

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

/// The consumer of one service process.
pub struct Consumer {
    consumer: StreamConsumer<crate::kafka::Context>,
    dlq: Producer,
    pool: PgPool,
    metrics: Metrics,
    /// An offset was stored since the last commit.
    dirty: AtomicBool,
}

/// Records queued per partition worker; a full queue holds up fetching (bounded memory).
const WORKER_QUEUE: usize = 64;
/// How often stored offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

impl Consumer {
    /// Subscribes `group` to `topics`.
    pub fn new(
        settings: &Settings,
        group: &str,
        topics: &[String],
        pool: PgPool,
        dlq: Producer,
        metrics: Metrics,
        context: crate::kafka::Context,
    ) -> anyhow::Result<Self> {
        let consumer: StreamConsumer<crate::kafka::Context> = crate::kafka::client_config(settings)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            // Offsets are stored by the workers after their transaction, never on receipt.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Low latency on a quiet topic: do not wait to fill a fetch.
            .set("fetch.wait.max.ms", "10")
            .set("socket.nagle.disable", "true")
            // A member killed without leaving is noticed within 6 s (the broker's minimum), so
            // a restarted or surviving instance takes its partitions over quickly.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(context)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        Ok(Consumer {
            consumer,
            dlq,
            pool,
            metrics,
            dirty: AtomicBool::new(false),
        })
    }

    /// Consumes until `stop` is cancelled, then commits what was handled.
    pub async fn run<H: Handler>(self, handler: H, stop: CancellationToken) {
        let this = Arc::new(self);
        let handler = Arc::new(handler);
        let mut workers: HashMap<(String, i32), mpsc::Sender<OwnedMessage>> = HashMap::new();
        let mut tasks = JoinSet::new();
        let committer = tokio::spawn(this.clone().commit_periodically(stop.clone()));
        let mut last_error_log: Option<std::time::Instant> = None;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => break,
                m = this.consumer.recv() => m,
            };
            let message = match message {
                Ok(m) => m.detach(),
                Err(e) => {
                    // librdkafka reconnects by itself. While the brokers are away it queues an
                    // error event per failed attempt; pausing long on each would delay the
                    // first records after they are back by as many pauses (tens of seconds), so
                    // the queue is drained quickly and the log says it once a second at most.
                    if last_error_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, "kafka: consume error");
                        last_error_log = Some(std::time::Instant::now());
                    }
                    if sleep_or_stop(Duration::from_millis(10), &stop).await {
                        break;
                    }
                    continue;
                }
            };
            let key = (message.topic().to_owned(), message.partition());
            let queue = workers.entry(key).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                tasks.spawn(this.clone().work(handler.clone(), rx, stop.clone()));
                tx
            });
            tokio::select! {
                () = stop.cancelled() => break,
                sent = queue.send(message) => if sent.is_err() { break },
            }
        }
        drop(workers);
        while tasks.join_next().await.is_some() {}
        let _ = committer.await;
        if let Err(e) = this.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "kafka: final commit");
        }
    }

    /// One partition's worker: its records in order, each handled before the next.
    async fn work<H: Handler>(
        self: Arc<Self>,
        handler: Arc<H>,
        mut queue: mpsc::Receiver<OwnedMessage>,
        stop: CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                m = queue.recv() => match m { Some(m) => m, None => return },
            };
            if !self.process(&*handler, &message, &stop).await {
                return;
            }
            // librdkafka stores `offset + 1`, the next record to read. Not stored when the
            // partition was revoked meanwhile: its new owner redelivers the record, which is
            // harmless.
            if self
                .consumer
                .store_offset(message.topic(), message.partition(), message.offset())
                .is_ok()
            {
                self.dirty.store(true, Ordering::Relaxed);
            }
        }
    }

    async fn commit_periodically(self: Arc<Self>, stop: CancellationToken) {
        while !sleep_or_stop(COMMIT_EVERY, &stop).await {
            if self.dirty.swap(false, Ordering::Relaxed)
                && let Err(e) = self.consumer.commit_consumer_state(CommitMode::Async)
            {
                tracing::warn!(error = %e, "kafka: offset commit failed (records may be redelivered, which is harmless)");
            }
        }
    }

    /// Handles one record until it is applied, a duplicate, or in the DLQ. False when the
    /// process is stopping before that (the record is then redelivered later).
    async fn process<H: Handler>(
        &self,
        handler: &H,
        message: &OwnedMessage,
        stop: &CancellationToken,
    ) -> bool {
        let topic = message.topic();
        // The record's trace continues here (a record without one starts a new trace), so
        // what this handling logs and emits shares the trace id of the order it is about.
        let traceparent = message
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key.eq_ignore_ascii_case(crate::trace::HEADER))
            })
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok());
        let trace = TraceContext::continue_or_start(traceparent);
        let span = tracing::info_span!(
            "record",
            topic,
            partition = message.partition(),
            offset = message.offset(),
            trace_id = %trace.trace_id()
        );
        self.handle(handler, message, &trace, stop)
            .instrument(span)
            .await
    }

    /// [`Consumer::process`] inside the record's span.
    async fn handle<H: Handler>(
        &self,
        handler: &H,
        message: &OwnedMessage,
        trace: &TraceContext,
        stop: &CancellationToken,
    ) -> bool {
        let topic = message.topic();
        let content_type = message
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key.eq_ignore_ascii_case("content-type"))
            })
            .and_then(|h| h.value);
        let content_type = match proto::ContentType::from_header(content_type) {
            Ok(c) => c,
            Err(e) => {
                return self
                    .to_dlq(message, &format!("bad content-type: {e}"), stop)
                    .await;
            }
        };
        let record = Record {
            topic,
            payload: message.payload().unwrap_or_default(),
            content_type,
        };
        let event = match handler.decode(&record) {
            Ok(event) if H::event_id(&event).is_empty() => {
                return self.to_dlq(message, "event_id is empty", stop).await;
            }
            Ok(event) => event,
            Err(reason) => return self.to_dlq(message, &reason, stop).await,
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = async {
                let mut tx = self.pool.begin().await?;
                if !crate::db::claim(&mut tx, H::CONSUMER, H::event_id(&event)).await? {
                    tx.rollback().await?;
                    return Ok(Handled::Duplicate);
                }
                handler.apply(&mut tx, &event, trace).await?;
                tx.commit().await?;
                Ok::<_, HandleError>(Handled::Applied)
            }
            .await;
            match outcome {
                Ok(handled) => {
                    let outcome = match handled {
                        Handled::Applied => "applied",
                        Handled::Duplicate => "duplicate",
                    };
                    self.metrics
                        .consumed
                        .with_label_values(&[topic, outcome])
                        .inc();
                    return true;
                }
                Err(HandleError::Poison(reason)) => {
                    return self.to_dlq(message, &reason, stop).await;
                }
                Err(HandleError::Transient(e)) => {
                    self.metrics
                        .consumed
                        .with_label_values(&[topic, "retry"])
                        .inc();
                    tracing::warn!(topic, error = %e, retry_in = ?backoff, "kafka: record not handled; retrying");
                    if sleep_or_stop(backoff, stop).await {
                        return false;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Copies the record to `<topic>.dlq` (retrying until Kafka takes it).
    async fn to_dlq(&self, message: &OwnedMessage, reason: &str, stop: &CancellationToken) -> bool {
        let topic = message.topic();
        let dlq = crate::topics::dlq(topic);
        tracing::warn!(
            topic,
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "kafka: record to the DLQ"
        );
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let headers = headers
            .insert(Header {
                key: "dlq-error",
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: "dlq-source-topic",
                value: Some(topic.as_bytes()),
            })
            .insert(Header {
                key: "dlq-source-partition",
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: "dlq-source-offset",
                value: Some(offset.as_bytes()),
            });
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut record = FutureRecord::to(&dlq).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self.dlq.send(record, rdkafka::util::Timeout::Never).await {
                Ok(_) => {
                    self.metrics
                        .consumed
                        .with_label_values(&[topic, "dlq"])
                        .inc();
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(dlq, error = %e, "kafka: DLQ write failed; retrying (the partition waits)");
                    if sleep_or_stop(backoff, stop).await {
                        return false;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
