//! The test broker (`HUB_TEST_KAFKA_BROKERS`, default 127.0.0.1:9092; `make test` starts it):
//! topics created and deleted by name, and a topic read back from the beginning.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::time::timeout;

use crate::hex;
use crate::wait::Deadline;

/// Partitions of every test topic.
pub const PARTITIONS: i32 = 3;

/// How long the broker may take to create or delete topics.
const ADMIN_LIMIT: Duration = Duration::from_secs(20);

/// The broker the suites run against.
pub fn brokers() -> String {
    std::env::var("HUB_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("Kafka admin client")
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// Creates `names` on `brokers` with [`PARTITIONS`] partitions each, keeping those that
/// already exist (the broker does not create topics by itself).
pub async fn create_topics(brokers: &str, names: &[&str]) {
    create_topics_with(brokers, names, PARTITIONS, 1).await;
}

/// [`create_topics`] with `partitions` partitions of `replication` replicas each.
pub async fn create_topics_with(brokers: &str, names: &[&str], partitions: i32, replication: i32) {
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let results = timeout(
        ADMIN_LIMIT,
        admin(brokers).create_topics(&new, &admin_options()),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("Kafka on {brokers} did not answer CreateTopics (run `make infra-up`)")
    })
    .unwrap_or_else(|e| panic!("Kafka on {brokers} (run `make infra-up`): {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => panic!("creating topic {name}: {code}"),
        }
    }
}

/// Deletes `names` (at the end of a passing test; a failing one leaves them for a look).
pub async fn delete_topics(brokers: &str, names: &[&str]) {
    let _ = timeout(
        ADMIN_LIMIT,
        admin(brokers).delete_topics(names, &admin_options()),
    )
    .await;
}

/// One record read back from a topic.
#[derive(Debug)]
pub struct Record {
    /// The key, if any.
    pub key: Option<Vec<u8>>,
    /// The value, if any.
    pub payload: Option<Vec<u8>>,
    /// Headers, values as (lossy) UTF-8.
    pub headers: BTreeMap<String, String>,
}

impl Record {
    /// The key as (lossy) UTF-8, empty when there is none.
    pub fn key_text(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    /// The value, empty when there is none.
    pub fn value(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }
}

/// Reads `topic` on [`brokers`] from the beginning of every partition until `enough(records)`
/// holds; panics after `limit`.
pub async fn read_topic(
    topic: &str,
    limit: Duration,
    enough: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("it-reader-{}", hex(4)))
        .set("enable.auto.commit", "false")
        .create()
        .expect("Kafka consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition offset");
    }
    consumer.assign(&tpl).expect("assign the partitions");
    let deadline = Deadline::after(limit);
    let mut out = Vec::new();
    while !enough(&out) {
        let Ok(m) = timeout(deadline.left(), consumer.recv()).await else {
            panic!(
                "{topic}: wanted records not there within {limit:?} ({} read)",
                out.len()
            );
        };
        let m = m.unwrap_or_else(|e| panic!("{topic}: {e}"));
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                        (h.key.to_owned(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    out
}
