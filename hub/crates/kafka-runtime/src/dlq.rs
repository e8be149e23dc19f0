//! The dead-letter queue: a record that can never be handled is copied to `<topic>.dlq` with
//! its key, value and headers plus four headers of its own:
//!
//! | header | value |
//! |---|---|
//! | [`ERROR`] `dlq-error` | why it could not be handled |
//! | [`SOURCE_TOPIC`] `dlq-source-topic` | the topic it came from |
//! | [`SOURCE_PARTITION`] `dlq-source-partition` | its partition |
//! | [`SOURCE_OFFSET`] `dlq-source-offset` | its offset |
//!
//! A record replayed from a DLQ and refused again carries only the new four: its old ones
//! are dropped, so a reader never sees two reasons.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::message::{Header, Headers as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use service_kit::Backoff;
use tokio_util::sync::CancellationToken;

use crate::Producer;
use crate::context::Observer;

/// Why the record could not be handled.
pub const ERROR: &str = "dlq-error";
/// The topic it was consumed from.
pub const SOURCE_TOPIC: &str = "dlq-source-topic";
/// The partition it was consumed from.
pub const SOURCE_PARTITION: &str = "dlq-source-partition";
/// Its offset there.
pub const SOURCE_OFFSET: &str = "dlq-source-offset";

/// The DLQ topic of `topic`.
pub fn topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// The headers of a DLQ copy: the original ones (minus an earlier DLQ's), then the scheme's.
pub fn headers(
    original: Option<&OwnedHeaders>,
    reason: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> OwnedHeaders {
    let ours = [ERROR, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET];
    let mut headers = OwnedHeaders::new();
    for h in original.iter().flat_map(|h| h.iter()) {
        if !ours.iter().any(|k| k.eq_ignore_ascii_case(h.key)) {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let partition = partition.to_string();
    let offset = offset.to_string();
    for (key, value) in [
        (ERROR, reason),
        (SOURCE_TOPIC, topic),
        (SOURCE_PARTITION, partition.as_str()),
        (SOURCE_OFFSET, offset.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// Writes poison records to their DLQ topic.
#[derive(Clone)]
pub struct DlqWriter {
    producer: Producer,
    observer: Arc<dyn Observer>,
}

impl DlqWriter {
    /// Writes with `producer`, telling `observer` of each record written.
    pub fn new(producer: Producer, observer: Arc<dyn Observer>) -> Self {
        DlqWriter { producer, observer }
    }

    /// Copies `message` to its DLQ, retrying until Kafka takes it (a missing DLQ topic stalls
    /// the partition rather than losing the record). False when `stop` came first.
    pub async fn write(
        &self,
        message: &OwnedMessage,
        reason: &str,
        stop: &CancellationToken,
    ) -> bool {
        let source = message.topic();
        let dlq = topic(source);
        let trace_id = crate::record::trace_id(crate::record::header(message, "traceparent"));
        tracing::warn!(
            topic = source,
            partition = message.partition(),
            offset = message.offset(),
            trace_id = trace_id.unwrap_or_default(),
            reason,
            "kafka: record to the DLQ"
        );
        // Built once: only the send is retried.
        let headers = headers(
            message.headers(),
            reason,
            source,
            message.partition(),
            message.offset(),
        );
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&dlq).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self.producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    self.observer.dlq(source);
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(dlq, error = %e, "kafka: DLQ write failed; retrying (the partition waits)");
                    if !crate::pause::wait(&mut backoff, stop).await {
                        return false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(headers: &OwnedHeaders) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                (h.key.to_owned(), value)
            })
            .collect()
    }

    #[test]
    fn the_scheme_follows_the_original_headers_and_replaces_an_earlier_dlq() {
        let original = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
            .insert(Header {
                key: "dlq-error",
                value: Some("an earlier reason"),
            });
        let built = headers(Some(&original), "undecodable: x", "orders", 3, 42);
        let expected = [
            ("content-type", "application/json"),
            ("dlq-error", "undecodable: x"),
            ("dlq-source-topic", "orders"),
            ("dlq-source-partition", "3"),
            ("dlq-source-offset", "42"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(pairs(&built), expected);
        assert_eq!(pairs(&headers(None, "r", "t", 0, 0)).len(), 4);
        assert_eq!(topic("orders"), "orders.dlq");
    }
}
