//! The transactional outbox. [`enqueue`] writes an event in the caller's transaction, so the
//! event exists exactly when the state change it announces was committed. The [`Relay`]
//! publishes waiting events to Kafka and deletes them.
//!
//! Order: only the oldest waiting row of each key is eligible (`min(id) GROUP BY key`), locked
//! with `FOR UPDATE SKIP LOCKED`. Several relays (one per process) therefore never publish two
//! rows of one key at once, and a key's next row is published only after the previous one was
//! acknowledged: each order's events reach its partition in the order they were written.
//!
//! Delivery: at least once. The producer is idempotent with `acks=all`; a row is deleted in the
//! same transaction that locked it, after Kafka acknowledged it. A crash between the
//! acknowledgement and the commit publishes the row again with the same `event_id`, which every
//! consumer (and the hub) deduplicates. While Kafka is unreachable rows simply wait.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use service_kit::Backoff;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::kafka::Producer;
use crate::metrics::Metrics;
use crate::trace::TraceContext;

/// PostgreSQL channel the relay listens on; a transaction that enqueues notifies it.
const CHANNEL: &str = "outbox";

/// Writes `payload` for `topic` under `key`, in the caller's transaction, with the trace
/// context of the work that emits it (sent as the Kafka header `traceparent`).
pub async fn enqueue(
    conn: &mut PgConnection,
    topic: &str,
    key: &str,
    event_id: &str,
    payload: Vec<u8>,
    trace: &TraceContext,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (topic, key, event_id, payload, traceparent) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(topic)
    .bind(key)
    .bind(event_id)
    .bind(payload)
    .bind(trace.to_string())
    .execute(&mut *conn)
    .await?;
    // Delivered at commit (and coalesced within the transaction): wakes the relay at once.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// An idempotent producer with `acks=all`, shared by the relay and the DLQ writer.
pub fn producer(
    settings: &Settings,
    client_id: &str,
    context: crate::kafka::KafkaContext,
) -> anyhow::Result<Producer> {
    let timeout_ms = settings.kafka_timeout.as_millis().to_string();
    let producer = crate::kafka::client_config(settings)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", &timeout_ms)
        .set("socket.nagle.disable", "true")
        .create_with_context(context)?;
    Ok(producer)
}

/// Publishes the outbox of one database.
pub struct Relay {
    pool: PgPool,
    producer: Producer,
    batch: i64,
    poll: Duration,
    metrics: Metrics,
}

struct Waiting {
    id: i64,
    topic: String,
    key: String,
    event_id: String,
    payload: Vec<u8>,
    traceparent: Option<String>,
}

impl Relay {
    /// A relay for the outbox in `pool`.
    pub fn new(pool: PgPool, producer: Producer, settings: &Settings, metrics: Metrics) -> Self {
        Relay {
            pool,
            producer,
            batch: i64::from(settings.outbox_batch),
            poll: settings.outbox_poll,
            metrics,
        }
    }

    /// Publishes until `stop` is cancelled; errors are logged and retried with backoff.
    pub async fn run(self, stop: CancellationToken) {
        let mut listener = self.listen().await;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut sampled = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            match self.publish_batch().await {
                Ok(Batch {
                    published,
                    failed: 0,
                }) if published > 0 => {
                    backoff.reset();
                    continue;
                }
                Ok(Batch { failed: 0, .. }) => backoff.reset(),
                Ok(Batch { failed, .. }) => {
                    self.sample_backlog(&mut sampled).await;
                    let delay = backoff.next_delay();
                    tracing::warn!(failed, retry_in = ?delay, "outbox: events not published; retrying");
                    if sleep_or_stop(delay, &stop).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "outbox: database error; retrying");
                    if sleep_or_stop(delay, &stop).await {
                        return;
                    }
                    // The database may have dropped the listening connection too.
                    listener = self.listen().await;
                    continue;
                }
            }
            self.sample_backlog(&mut sampled).await;
            // Nothing waiting: sleep until a transaction notifies, the poll interval passes
            // (a missed notification costs at most that), or the process stops.
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await.map(|_| ()).map_err(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.poll) => {}
                r = notified => if r.is_err() { listener = None; },
            }
            if listener.is_none() {
                listener = self.listen().await;
            }
        }
    }

    /// Updates the backlog gauges, at most once per poll interval (`last` is when it last did),
    /// so a busy relay does not pay a count per batch.
    async fn sample_backlog(&self, last: &mut Option<Instant>) {
        if last.is_some_and(|t| t.elapsed() < self.poll) {
            return;
        }
        *last = Some(Instant::now());
        let row = sqlx::query(
            "SELECT count(*) AS waiting, \
             COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0) AS oldest FROM outbox",
        )
        .fetch_one(&self.pool)
        .await;
        if let Ok(row) = row {
            let waiting: i64 = row.try_get("waiting").unwrap_or_default();
            let oldest: f64 = row.try_get("oldest").unwrap_or_default();
            self.metrics.outbox_waiting.set(waiting);
            self.metrics.outbox_oldest_age.set(oldest);
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(CHANNEL).await.ok()?;
        Some(listener)
    }

    /// One transaction: lock the head row of each key, publish them, delete what Kafka
    /// acknowledged, commit.
    async fn publish_batch(&self) -> Result<Batch, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, topic, key, event_id, payload, traceparent FROM outbox \
             WHERE id IN (SELECT min(id) FROM outbox GROUP BY key) \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Batch::default());
        }
        let waiting = rows
            .iter()
            .map(|r| {
                Ok(Waiting {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    key: r.try_get("key")?,
                    event_id: r.try_get("event_id")?,
                    payload: r.try_get("payload")?,
                    traceparent: r.try_get("traceparent")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let sends = waiting.iter().map(|w| {
            let mut headers = OwnedHeaders::new().insert(Header {
                key: "event-id",
                value: Some(w.event_id.as_bytes()),
            });
            if let Some(traceparent) = &w.traceparent {
                headers = headers.insert(Header {
                    key: crate::trace::HEADER,
                    value: Some(traceparent.as_bytes()),
                });
            }
            let record = FutureRecord::to(&w.topic)
                .key(&w.key)
                .payload(&w.payload)
                .headers(headers);
            // The producer's own message timeout bounds the wait.
            self.producer.send(record, rdkafka::util::Timeout::Never)
        });
        let results = join_all(sends).await;
        let mut done = Vec::with_capacity(waiting.len());
        let mut failed = 0;
        for (w, result) in waiting.iter().zip(results) {
            match result {
                Ok(_) => {
                    tracing::debug!(
                        topic = %w.topic,
                        key = %w.key,
                        event_id = %w.event_id,
                        trace_id = trace_id(w.traceparent.as_deref()),
                        "outbox: published"
                    );
                    done.push(w.id);
                }
                Err((e, _)) => {
                    failed += 1;
                    tracing::debug!(topic = %w.topic, event_id = %w.event_id, trace_id = trace_id(w.traceparent.as_deref()), error = %e, "outbox: publish failed");
                }
            }
        }
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&done)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.metrics.outbox_published.inc_by(done.len() as u64);
        self.metrics.outbox_failures.inc_by(failed as u64);
        Ok(Batch {
            published: done.len(),
            failed,
        })
    }
}

#[derive(Default)]
struct Batch {
    published: usize,
    failed: usize,
}

/// The trace id of a stored `traceparent` (empty when there is none).
fn trace_id(traceparent: Option<&str>) -> String {
    traceparent
        .and_then(TraceContext::parse)
        .map(|t| t.trace_id())
        .unwrap_or_default()
}

/// Sleeps for `d`; true when `stop` was cancelled first.
pub async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}
