//! Kafka for the ingest tests: a topic and its DLQ with a random suffix, records produced by
//! this process (rdkafka) or by `kcat` (an independent client), and the offsets a consumer
//! group committed.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use test_support::cluster::KafkaCluster;
use test_support::kafka::{self, PARTITIONS, brokers, create_topics, delete_topics, read_topic};
use test_support::wait::Deadline;
use test_support::{STEP, hex};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// A test's own topic and its DLQ, with a random suffix.
pub struct Topic {
    /// The topic's name.
    pub name: String,
    /// The Kafka it is on.
    pub brokers: String,
}

impl Topic {
    /// Creates `<stem>-<hex>` and `<stem>-<hex>.dlq`.
    pub async fn create(stem: &str) -> Topic {
        let name = format!("{stem}-{}", hex(5));
        let dlq = format!("{name}.dlq");
        create_topics(&brokers(), &[name.as_str(), dlq.as_str()]).await;
        Topic {
            name,
            brokers: brokers(),
        }
    }

    /// The same on the three-broker cluster, with `partitions` partitions replicated three
    /// times, once every replica is in sync.
    pub async fn create_replicated(cluster: &KafkaCluster, stem: &str, partitions: i32) -> Topic {
        let name = format!("{stem}-{}", hex(5));
        let dlq = format!("{name}.dlq");
        cluster
            .create_topics(&[name.as_str(), dlq.as_str()], partitions)
            .await;
        Topic {
            name,
            brokers: cluster.brokers(),
        }
    }

    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.name)
    }

    /// Deletes the topic and its DLQ (at the end of a passing test; a failing one leaves them
    /// for a look with kcat).
    pub async fn delete(self) {
        let dlq = self.dlq();
        delete_topics(&self.brokers, &[self.name.as_str(), dlq.as_str()]).await;
    }
}

/// A producer like a well-behaved service's: idempotent, so per partition Kafka keeps the
/// order records were sent in.
pub fn producer() -> FutureProducer {
    producer_on(&brokers())
}

/// [`producer`] on the Kafka at `brokers` (idempotence implies `acks=all`: on a replicated
/// topic a record is acknowledged once `min.insync.replicas` brokers have it).
pub fn producer_on(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("Kafka producer")
}

/// One record to produce.
#[derive(Clone)]
pub struct Record {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The `content-type` header, if any.
    pub content_type: Option<&'static str>,
}

/// Produces `records` to `topic` in this order and returns where each landed (partition,
/// offset), once all are acknowledged.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    records: &[Record],
) -> Vec<(i32, i64)> {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut record = FutureRecord::to(topic).key(&r.key).payload(&r.value);
        if let Some(content_type) = r.content_type {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(content_type),
            }));
        }
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("record enqueued in the producer");
        pending.push(delivery);
    }
    let mut landed = Vec::with_capacity(pending.len());
    for delivery in pending {
        let d = timeout(Duration::from_secs(30), delivery)
            .await
            .expect("delivery report within 30 s")
            .expect("producer alive")
            .map_err(|(e, _)| e)
            .expect("record acknowledged by Kafka");
        landed.push((d.partition, d.offset));
    }
    landed
}

/// Produces `records` in batches of `batch`, `pause` apart, so that the stream lasts a while.
pub fn stream(topic: &str, records: Vec<Record>, batch: usize, pause: Duration) -> JoinHandle<()> {
    stream_on(&brokers(), topic, records, batch, pause)
}

/// [`stream`] to the Kafka at `brokers`.
pub fn stream_on(
    brokers: &str,
    topic: &str,
    records: Vec<Record>,
    batch: usize,
    pause: Duration,
) -> JoinHandle<()> {
    let topic = topic.to_owned();
    let producer = producer_on(brokers);
    tokio::spawn(async move {
        for chunk in records.chunks(batch) {
            produce(&producer, &topic, chunk).await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// Produces `key:value` lines with `kcat` (an independent Kafka client: librdkafka through
/// its own command line, not this test's code), each with `content-type: application/json`.
pub async fn kcat_produce(topic: &str, lines: &[(String, Vec<u8>)]) {
    let mut input = Vec::new();
    for (key, value) in lines {
        assert!(!value.contains(&b'\n'), "one record per line");
        input.extend_from_slice(key.as_bytes());
        input.push(b':');
        input.extend_from_slice(value);
        input.push(b'\n');
    }
    let mut child = tokio::process::Command::new("kcat")
        .args(["-P", "-b", &brokers(), "-t", topic, "-K:"])
        .args(["-H", "content-type=application/json"])
        .args(["-X", "enable.idempotence=true"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kcat runs (apt-get install kcat; infra/local/deps.sh installs it)");
    let mut stdin = child.stdin.take().expect("kcat stdin");
    stdin.write_all(&input).await.expect("write to kcat");
    drop(stdin);
    let out = timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("kcat finished within 30 s")
        .expect("kcat output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("ERROR"),
        "kcat failed ({}): {stderr}",
        out.status
    );
}

/// The offsets `group` has committed on `topic`, summed over partitions (a partition without
/// a commit counts 0): how far ingest says it is done.
pub async fn committed(group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("Kafka consumer for committed offsets");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = tokio::task::spawn_blocking(move || {
        consumer.committed_offsets(tpl, Duration::from_secs(5))
    })
    .await
    .expect("committed offsets task")
    .expect("committed offsets of the group");
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        })
        .sum()
}

/// Waits until `group` has committed `want` records of `topic` in total.
pub async fn wait_committed(group: &str, topic: &str, want: i64, limit: Duration) {
    let deadline = Deadline::after(limit);
    loop {
        let got = committed(group, topic).await;
        if got == want {
            return;
        }
        deadline
            .retry_every(Duration::from_millis(100), || {
                format!("group {group} committed {got} records of {topic}, wanted {want} within {limit:?}")
            })
            .await;
    }
}

/// Reads `count` records from `topic` (every partition, from the beginning).
pub async fn consume(topic: &str, count: usize) -> Vec<kafka::Record> {
    read_topic(topic, STEP, |records| records.len() >= count).await
}
