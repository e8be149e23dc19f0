//! The three-broker test cluster (`HUB_TEST_KAFKA_CLUSTER_BROKERS`, default
//! `127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194`; `make test` starts it with
//! `infra/local/kafka.sh cluster-start`): replicated topics, who leads a partition, killing a
//! broker with SIGKILL and bringing it back, and how many members a consumer group has.
//!
//! A test that kills brokers holds the cluster alone ([`KafkaCluster::acquire`]), so that two
//! such tests of one suite never take down two of the three brokers at once. The cluster not
//! being there fails the test: it is never skipped.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::metadata::Metadata;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Mutex, MutexGuard};

use crate::kafka::create_topics_with;
use crate::wait::Deadline;

/// Brokers of the cluster, every topic's replication factor.
pub const REPLICAS: i32 = 3;

/// How long a killed broker may take to start again and rejoin (three JVMs on a small machine).
const RESTART_LIMIT: Duration = Duration::from_secs(120);

/// How long the metadata may take to show what a test waits for (a new leader, a full ISR).
const METADATA_LIMIT: Duration = Duration::from_secs(60);

static EXCLUSIVE: Mutex<()> = Mutex::const_new(());

/// The cluster's bootstrap list.
pub fn cluster_brokers() -> String {
    std::env::var("HUB_TEST_KAFKA_CLUSTER_BROKERS")
        .unwrap_or_else(|_| "127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194".to_owned())
}

/// The cluster, held by one test at a time.
pub struct KafkaCluster {
    brokers: String,
    _exclusive: MutexGuard<'static, ()>,
}

/// One partition as the metadata shows it.
#[derive(Debug, Clone)]
pub struct PartitionState {
    /// The partition.
    pub id: i32,
    /// Node id of its leader (-1 while it has none).
    pub leader: i32,
    /// Node ids of its replicas.
    pub replicas: Vec<i32>,
    /// Node ids of its in-sync replicas.
    pub isr: Vec<i32>,
}

fn metadata_client(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .expect("Kafka metadata client")
}

/// Runs `infra/local/kafka.sh ARGS` with the cluster's first port; panics with its output
/// when it fails.
async fn script(brokers: &str, args: &[&str]) {
    let first_port = brokers
        .split(',')
        .next()
        .and_then(|b| b.rsplit(':').next())
        .unwrap_or_default()
        .to_owned();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../infra/local/kafka.sh");
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    all.extend(["--port".to_owned(), first_port]);
    let shown = all.join(" ");
    let out = tokio::task::spawn_blocking(move || Command::new(&path).args(&all).output())
        .await
        .expect("kafka.sh task")
        .expect("run infra/local/kafka.sh");
    assert!(
        out.status.success(),
        "infra/local/kafka.sh {shown} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl KafkaCluster {
    /// Waits for the other tests using the cluster, then checks that all three brokers are up
    /// (restarting one a failed test left down); panics when the cluster is not there.
    pub async fn acquire() -> KafkaCluster {
        let guard = EXCLUSIVE.lock().await;
        let cluster = KafkaCluster {
            brokers: cluster_brokers(),
            _exclusive: guard,
        };
        let alive = cluster.try_broker_ids().await;
        assert!(
            !alive.is_empty(),
            "no Kafka cluster answers on {} (HUB_TEST_KAFKA_CLUSTER_BROKERS): run `make test`, \
             or `infra/local/kafka.sh cluster-start` first",
            cluster.brokers
        );
        if alive.len() < REPLICAS as usize {
            // A node of ours that a failed test killed comes back.
            script(&cluster.brokers, &["cluster-start"]).await;
            cluster
                .wait_brokers(REPLICAS as usize, METADATA_LIMIT)
                .await;
        }
        cluster
    }

    /// The bootstrap list.
    pub fn brokers(&self) -> String {
        self.brokers.clone()
    }

    async fn metadata(&self, topic: Option<&str>) -> Result<Metadata, String> {
        let brokers = self.brokers.clone();
        let topic = topic.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            metadata_client(&brokers)
                .fetch_metadata(topic.as_deref(), Duration::from_secs(5))
                .map_err(|e| format!("metadata from {brokers}: {e}"))
        })
        .await
        .expect("metadata task")
    }

    async fn try_broker_ids(&self) -> Vec<i32> {
        match self.metadata(None).await {
            Ok(m) => m.brokers().iter().map(|b| b.id()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until the metadata lists `count` live brokers.
    async fn wait_brokers(&self, count: usize, limit: Duration) {
        let deadline = Deadline::after(limit);
        loop {
            let ids = self.try_broker_ids().await;
            if ids.len() == count {
                return;
            }
            deadline
                .retry_every(Duration::from_millis(200), || {
                    format!(
                        "the Kafka cluster on {} lists brokers {ids:?}, wanted {count} within {limit:?} \
                         (make test starts it: infra/local/kafka.sh cluster-start)",
                        self.brokers
                    )
                })
                .await;
        }
    }

    /// Creates `names` with `partitions` partitions, replicated on every broker, and waits
    /// until each partition has a leader and three in-sync replicas.
    pub async fn create_topics(&self, names: &[&str], partitions: i32) {
        create_topics_with(&self.brokers, names, partitions, REPLICAS).await;
        for name in names {
            self.wait_in_sync(name, partitions).await;
        }
    }

    /// The partitions of `topic`.
    pub async fn partitions(&self, topic: &str) -> Result<Vec<PartitionState>, String> {
        let m = self.metadata(Some(topic)).await?;
        let t = m
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| format!("{topic} not in the metadata"))?;
        if let Some(e) = t.error() {
            return Err(format!("{topic}: {e:?}"));
        }
        let mut out: Vec<PartitionState> = t
            .partitions()
            .iter()
            .map(|p| PartitionState {
                id: p.id(),
                leader: p.leader(),
                replicas: p.replicas().to_vec(),
                isr: p.isr().to_vec(),
            })
            .collect();
        out.sort_by_key(|p| p.id);
        Ok(out)
    }

    /// Waits until every one of the `partitions` of `topic` has a leader and all its
    /// [`REPLICAS`] in sync (after a creation, or after a killed broker came back).
    pub async fn wait_in_sync(&self, topic: &str, partitions: i32) {
        let deadline = Deadline::after(METADATA_LIMIT);
        loop {
            let state = self.partitions(topic).await;
            let ok = state.as_ref().is_ok_and(|ps| {
                ps.len() == partitions as usize
                    && ps.iter().all(|p| {
                        p.leader >= 0
                            && p.replicas.len() == REPLICAS as usize
                            && p.isr.len() == REPLICAS as usize
                    })
            });
            if ok {
                return;
            }
            deadline
                .retry_every(Duration::from_millis(200), || {
                    format!("{topic}: not fully replicated within {METADATA_LIMIT:?}: {state:?}")
                })
                .await;
        }
    }

    /// The node id leading `partition` of `topic`.
    pub async fn leader(&self, topic: &str, partition: i32) -> i32 {
        let state = self
            .partitions(topic)
            .await
            .unwrap_or_else(|e| panic!("leader of {topic}/{partition}: {e}"));
        let leader = state
            .iter()
            .find(|p| p.id == partition)
            .map_or(-1, |p| p.leader);
        assert!(leader >= 0, "{topic}/{partition} has no leader: {state:?}");
        leader
    }

    /// Kills node `node` (SIGKILL, as a crash would) and waits until the metadata no longer
    /// lists it and no partition of `topic` is led by it.
    pub async fn kill(&self, node: i32, topic: &str) {
        script(&self.brokers, &["cluster-kill", &node.to_string()]).await;
        let deadline = Deadline::after(METADATA_LIMIT);
        loop {
            let ids = self.try_broker_ids().await;
            let state = self.partitions(topic).await;
            let moved = state
                .as_ref()
                .is_ok_and(|ps| ps.iter().all(|p| p.leader >= 0 && p.leader != node));
            if !ids.contains(&node) && moved {
                return;
            }
            deadline
                .retry_every(Duration::from_millis(200), || {
                    format!(
                        "after killing node {node}: brokers {ids:?}, {topic}: {state:?} within {METADATA_LIMIT:?}"
                    )
                })
                .await;
        }
    }

    /// Starts the killed node again (with its data) and waits until it is back in the
    /// metadata and in sync on every partition of `topic`.
    pub async fn restart(&self, topic: &str, partitions: i32) {
        let limit = RESTART_LIMIT;
        tokio::time::timeout(limit, script(&self.brokers, &["cluster-start"]))
            .await
            .unwrap_or_else(|_| panic!("the killed broker did not start within {limit:?}"));
        self.wait_brokers(REPLICAS as usize, METADATA_LIMIT).await;
        self.wait_in_sync(topic, partitions).await;
    }

    /// Members of consumer group `group` (0 when it has none or is unknown).
    pub async fn group_members(&self, group: &str) -> usize {
        let brokers = self.brokers.clone();
        let group = group.to_owned();
        tokio::task::spawn_blocking(move || {
            metadata_client(&brokers)
                .fetch_group_list(Some(&group), Duration::from_secs(5))
                .ok()
                .and_then(|list| {
                    list.groups()
                        .iter()
                        .find(|g| g.name() == group && g.state() == "Stable")
                        .map(|g| g.members().len())
                })
                .unwrap_or(0)
        })
        .await
        .expect("group list task")
    }

    /// Waits until consumer group `group` is stable with exactly `count` members.
    pub async fn wait_group_members(&self, group: &str, count: usize, limit: Duration) {
        let deadline = Deadline::after(limit);
        loop {
            let got = self.group_members(group).await;
            if got == count {
                return;
            }
            deadline
                .retry_every(Duration::from_millis(200), || {
                    format!(
                        "group {group}: {got} members when stable, wanted {count} within {limit:?}"
                    )
                })
                .await;
        }
    }
    /// Waits until consumer group `group` has committed the end of every partition of
    /// `topic`: everything in it has been handled, and nothing it led to is still on its way.
    pub async fn wait_caught_up(&self, group: &str, topic: &str, limit: Duration) {
        let deadline = Deadline::after(limit);
        loop {
            let behind = self.behind(group, topic).await;
            if behind.as_ref().is_ok_and(Vec::is_empty) {
                return;
            }
            deadline
                .retry_every(Duration::from_millis(200), || {
                    format!("group {group} not at the end of {topic} within {limit:?}: {behind:?}")
                })
                .await;
        }
    }

    /// `(partition, committed, end)` of every partition of `topic` where `group` has not
    /// committed up to the end.
    async fn behind(&self, group: &str, topic: &str) -> Result<Vec<(i32, i64, i64)>, String> {
        let partitions = self.partitions(topic).await?;
        let brokers = self.brokers.clone();
        let (group, topic) = (group.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()
                .map_err(|e| e.to_string())?;
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(&topic, p.id);
            }
            let committed = consumer
                .committed_offsets(tpl, Duration::from_secs(5))
                .map_err(|e| format!("committed offsets of {group}: {e}"))?;
            let mut behind = Vec::new();
            for e in committed.elements() {
                let (_, end) = consumer
                    .fetch_watermarks(&topic, e.partition(), Duration::from_secs(5))
                    .map_err(|e| format!("watermarks of {topic}: {e}"))?;
                let at = match e.offset() {
                    Offset::Offset(n) => n,
                    _ => 0,
                };
                if at < end {
                    behind.push((e.partition(), at, end));
                }
            }
            Ok(behind)
        })
        .await
        .expect("committed offsets task")
    }
}
