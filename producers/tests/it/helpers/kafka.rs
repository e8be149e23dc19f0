//! Kafka: the saga's topics under a random prefix on the suite's broker (or a private one),
//! records produced and read back, and a broker of a test's own that it may stop and restart.

use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use test_support::cluster::KafkaCluster;
use test_support::hex;
use test_support::kafka::{self, PARTITIONS, Record, brokers, create_topics, delete_topics};

use crate::helpers::STEP;

/// The saga's topics and their DLQs.
pub const TOPICS: [&str; 6] = [
    "order.created",
    "payment.completed",
    "delivery.status.updated",
    "order.status.changed",
    "moderation.tasks",
    "moderation.results",
];

/// A random topic prefix with every saga topic (and DLQ) created under it.
pub struct Topics {
    pub prefix: String,
    pub brokers: String,
}

impl Topics {
    pub async fn create(brokers: &str) -> Topics {
        let topics = Topics {
            prefix: format!("it-{}.", hex(4)),
            brokers: brokers.to_owned(),
        };
        let all = topics.all();
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        create_topics(brokers, &names).await;
        topics
    }

    /// The same on the three-broker cluster: every topic replicated three times, created once
    /// all its replicas are in sync.
    pub async fn create_replicated(cluster: &KafkaCluster) -> Topics {
        let topics = Topics {
            prefix: format!("it-{}.", hex(4)),
            brokers: cluster.brokers(),
        };
        let all = topics.all();
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        cluster.create_topics(&names, PARTITIONS).await;
        topics
    }

    /// Every topic and DLQ under the prefix.
    fn all(&self) -> Vec<String> {
        let mut all = Vec::new();
        for t in TOPICS {
            all.push(format!("{}{t}", self.prefix));
            all.push(format!("{}{t}.dlq", self.prefix));
        }
        all
    }

    pub fn name(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    pub async fn delete(self) {
        let all = self.all();
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        delete_topics(&self.brokers, &names).await;
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

/// Every record of `topic` from the beginning, reading until `enough(records)` holds.
pub async fn read_topic(topic: &str, enough: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    kafka::read_topic(topic, STEP, enough).await
}

/// A broker on four free ports (`infra/local/kafka.sh --port`: PLAINTEXT on `port`, the
/// controller on `port + 1`, SASL_PLAINTEXT on `port + 2`, SASL_SSL on `port + 3`), for a test
/// that stops and restarts Kafka, or needs the SASL listeners, without disturbing the others.
/// Stopped, and its data removed, on drop.
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
            let p = 20_000 + 4 * (rand::random::<u16>() % 7_500);
            let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
            if (p..p + 4).all(free) {
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

    /// The SASL_SSL listener (PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512).
    pub fn tls_brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port + 3)
    }

    /// The CA certificate that signs the TLS listener's (made by `kafka.sh`).
    pub fn tls_ca(&self) -> String {
        let out = kafka_script(&["tls-ca"]);
        assert!(out.status.success(), "kafka.sh tls-ca: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
