//! The subscription, one worker per partition, offset storing and the drain at shutdown.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt as _;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use service_kit::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::{KafkaContext, Observer, is_missing_topic};
use crate::dlq::DlqWriter;
use crate::record::Record;
use crate::{Producer, Security};

/// What a handler made of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (acted on, filtered out or a duplicate): the offset may move past it.
    Ok,
    /// A transient failure: hand this record (and those after it) again after a backoff.
    Retry(String),
    /// It can never be handled: copy it to the DLQ with this reason and move on.
    Dlq(String),
}

/// A consumer's reaction to its records: decode, route and act.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles records of one partition, in order, and says what became of each: one outcome
    /// per record, in the same order. Outcomes after the first [`Outcome::Retry`] are ignored
    /// (those records are handed again), so acting on them must be safe to repeat. A panic
    /// hands the records again one at a time, and the one that panics goes to the DLQ.
    async fn handle(&self, records: &[Record<'_>]) -> Vec<Outcome>;
}

/// What a consumer needs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// `host:port,...`.
    pub brokers: String,
    /// Security settings (validated at start by the caller's config).
    pub security: Security,
    /// Consumer group.
    pub group: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Most records of one partition handed to the handler at once.
    pub max_batch: usize,
    /// How long the broker may hold a fetch for more records (zero: a fetch is answered as
    /// soon as one record is there). Records then come in groups, one fetch round trip per
    /// group, and each partition's group is one batch: fewer, larger batches cost less per
    /// record at a steady rate, at up to this much latency.
    pub linger: Duration,
    /// Records waiting per partition worker; a full queue pauses intake (bounded memory).
    pub queue: usize,
    /// How often stored offsets are committed.
    pub commit_interval: Duration,
}

/// The consumer could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The Kafka client could not be created or subscribe.
    #[error("{0}")]
    Kafka(#[from] KafkaError),
    /// A partition worker stopped unexpectedly; consuming cannot go on safely.
    #[error("a partition worker stopped unexpectedly")]
    WorkerStopped,
}

/// First and longest pause before a transient failure's records are handed again.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A subscribed consumer, ready to run.
pub struct Consumer {
    consumer: Arc<StreamConsumer<KafkaContext>>,
    dlq: DlqWriter,
    observer: Arc<dyn Observer>,
    max_batch: usize,
    queue: usize,
}

impl Consumer {
    /// Subscribes; DLQ records are written with `dlq`, and `observer` hears of lag, DLQ
    /// writes and retries.
    pub fn new(
        settings: &ConsumerSettings,
        context: &KafkaContext,
        observer: Arc<dyn Observer>,
        dlq: Producer,
    ) -> Result<Self, ConsumerError> {
        let interval = settings.commit_interval.as_millis().max(1).to_string();
        // Without a linger, a fetch is answered as soon as one record is there (within 10 ms
        // when none is). With one, the broker holds each fetch for up to the linger unless
        // a megabyte is waiting: records come in groups, with one fetch round trip (and one
        // wake-up of this client's and the broker's threads) per group instead of per record.
        let (fetch_min_bytes, fetch_wait_ms) = if settings.linger.is_zero() {
            ("1".to_owned(), "10".to_owned())
        } else {
            (
                (1 << 20).to_string(),
                settings.linger.as_millis().clamp(1, 1000).to_string(),
            )
        };
        let consumer: StreamConsumer<KafkaContext> = settings
            .security
            .client_config(&settings.brokers)
            .set("group.id", &settings.group)
            // Offsets are stored by hand once a batch is done, and only stored offsets are
            // committed (every interval, on revoke and at the drain).
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", &interval)
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", &fetch_wait_ms)
            .set("fetch.min.bytes", &fetch_min_bytes)
            .set("socket.nagle.disable", "true")
            // A member gone without leaving is noticed within 6 s (the broker's minimum), so
            // its partitions move quickly.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("statistics.interval.ms", "5000")
            .create_with_context(context.observed(observer.clone()))?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Consumer {
            consumer: Arc::new(consumer),
            dlq: DlqWriter::new(dlq, observer.clone()),
            observer,
            max_batch: settings.max_batch.max(1),
            queue: settings.queue.max(1),
        })
    }

    /// Consumes until `stop` is cancelled, then lets the workers finish what they were handed
    /// (without retrying), commits and returns.
    pub async fn run<H: Handler>(
        self,
        handler: H,
        stop: CancellationToken,
    ) -> Result<(), ConsumerError> {
        let worker = Worker {
            consumer: self.consumer.clone(),
            dlq: self.dlq,
            handler: Arc::new(handler),
            observer: self.observer,
            stop: stop.clone(),
            max_batch: self.max_batch,
        };
        let mut failed = false;
        let mut partitions: HashMap<(String, i32), mpsc::Sender<OwnedMessage>> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut last_error_log: Option<Instant> = None;
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => break,
                r = self.consumer.recv() => r,
            };
            let message = match received {
                Ok(m) => m.detach(),
                Err(e) => {
                    // librdkafka reconnects by itself and queues an error per failed attempt
                    // meanwhile: drain them quickly, and say so once a second at most.
                    if is_missing_topic(&e) {
                        tracing::debug!(error = %e, "kafka: subscribed topic not available yet");
                    } else if last_error_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
                    {
                        tracing::warn!(error = %e, "kafka: consume error");
                        last_error_log = Some(Instant::now());
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(10)) => continue,
                    }
                }
            };
            let key = (message.topic().to_owned(), message.partition());
            let tx = partitions.entry(key).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(self.queue);
                tasks.spawn(worker.clone().partition(rx));
                tx
            });
            // A full queue means that partition's worker is retrying: wait, which pauses intake.
            tokio::select! {
                () = stop.cancelled() => break,
                sent = tx.send(message) => if sent.is_err() {
                    // Workers catch handler panics, so this is not expected; stop rather than
                    // skip records, and let the caller report it.
                    tracing::error!("kafka: a partition worker stopped; the consumer stops");
                    failed = true;
                    break;
                },
            }
        }
        drop(partitions);
        while tasks.join_next().await.is_some() {}
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "kafka: final commit");
        }
        if failed {
            return Err(ConsumerError::WorkerStopped);
        }
        Ok(())
    }
}

struct Worker<H> {
    consumer: Arc<StreamConsumer<KafkaContext>>,
    dlq: DlqWriter,
    handler: Arc<H>,
    observer: Arc<dyn Observer>,
    stop: CancellationToken,
    max_batch: usize,
}

impl<H> Clone for Worker<H> {
    fn clone(&self) -> Self {
        Worker {
            consumer: self.consumer.clone(),
            dlq: self.dlq.clone(),
            handler: self.handler.clone(),
            observer: self.observer.clone(),
            stop: self.stop.clone(),
            max_batch: self.max_batch,
        }
    }
}

/// How far the outcomes of one handler call got.
enum Settled {
    /// Every record is done.
    All,
    /// Records from this index on are to be handed again.
    RetryFrom(usize, String),
    /// Stopping before a DLQ write succeeded.
    Abandoned,
}

/// The text of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

impl<H: Handler> Worker<H> {
    /// A partition's records in order, in batches of what is ready (up to `max_batch`); the
    /// batch's last offset is stored once all of it is done.
    async fn partition(self, mut rx: mpsc::Receiver<OwnedMessage>) {
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(self.max_batch);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if !self.process(&batch).await {
                // Not stored: the records are read again after a restart.
                return;
            }
            if let Some(last) = batch.last()
                && let Err(e) =
                    self.consumer
                        .store_offset(last.topic(), last.partition(), last.offset())
            {
                // Revoked meanwhile: the new owner reads the records again, which handlers
                // absorb (idempotency keys, processed-event claims).
                tracing::debug!(error = %e, "kafka: offset not stored");
            }
            batch.clear();
            batch.shrink_to(self.max_batch);
        }
    }

    /// Handles a batch until every record is done; false when stopping before that.
    async fn process(&self, batch: &[OwnedMessage]) -> bool {
        let mut records = Vec::with_capacity(batch.len());
        for message in batch {
            match Record::new(message) {
                Ok(record) => records.push(record),
                Err(reason) => {
                    if !self.dlq.write(message, &reason, &self.stop).await {
                        return false;
                    }
                }
            }
        }
        let mut start = 0;
        let mut one_at_a_time = false;
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        while start < records.len() {
            let end = if one_at_a_time {
                start + 1
            } else {
                records.len()
            };
            let rest = &records[start..end];
            let outcomes = match AssertUnwindSafe(self.handler.handle(rest))
                .catch_unwind()
                .await
            {
                Ok(outcomes) => outcomes,
                Err(panic) if rest.len() > 1 => {
                    tracing::warn!(panic = %panic_text(panic.as_ref()), "kafka: handling a batch panicked; handing its records one at a time");
                    one_at_a_time = true;
                    continue;
                }
                Err(panic) => {
                    let what = panic_text(panic.as_ref());
                    tracing::error!(panic = %what, "kafka: handling a record panicked");
                    vec![crate::Outcome::Dlq(format!("processing panicked: {what}"))]
                }
            };
            match self.settle(rest, outcomes).await {
                Settled::All => start = end,
                Settled::Abandoned => return false,
                Settled::RetryFrom(index, why) => {
                    let record = &rest[index];
                    self.observer.retry(record.topic());
                    tracing::warn!(
                        topic = record.topic(),
                        partition = record.partition(),
                        offset = record.offset(),
                        error = %why,
                        "kafka: record not handled; retrying"
                    );
                    if index > 0 {
                        backoff.reset();
                    }
                    start += index;
                    if !crate::pause::wait(&mut backoff, &self.stop).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Acts on a handler's outcomes in order, up to the first retry.
    async fn settle(&self, records: &[Record<'_>], outcomes: Vec<Outcome>) -> Settled {
        let given = outcomes.len();
        for (index, (record, outcome)) in records.iter().zip(outcomes).enumerate() {
            match outcome {
                Outcome::Ok => {}
                Outcome::Retry(why) => return Settled::RetryFrom(index, why),
                Outcome::Dlq(reason) => {
                    if !self.dlq.write(record.message(), &reason, &self.stop).await {
                        return Settled::Abandoned;
                    }
                }
            }
        }
        if given < records.len() {
            // A handler bug; never skip a record for it.
            return Settled::RetryFrom(given, "the handler gave no outcome".to_owned());
        }
        Settled::All
    }
}
