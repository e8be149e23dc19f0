//! Redis for the backplane tests: the suite's shared server with a key prefix per test, or a
//! private `redis-server` a test may kill, flush or restart.

use std::process::{Child, Command, Stdio};

use test_support::files::{TempDir, temp_dir};
use test_support::process::free_port;
use test_support::wait::Deadline;
use test_support::{STEP, hex};

/// The shared Redis the suite runs against (`make test` starts it and sets the variable).
/// Tests isolate themselves with a random key prefix; a Redis that is not there fails them.
pub fn redis_url() -> String {
    std::env::var("HUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses.
pub fn redis_prefix() -> String {
    format!("test-{}", hex(6))
}

/// A private redis-server on a free port, for tests that kill, flush or restart it.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: TempDir,
    /// More arguments (a replica's `--replicaof`).
    args: Vec<String>,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> RedisServer {
        Self::start_with(Vec::new()).await
    }

    /// Starts a replica of the server on `master`'s port.
    async fn start_replica_of(master: u16) -> RedisServer {
        let args = ["--replicaof", "127.0.0.1", &master.to_string()].map(str::to_owned);
        Self::start_with(args.to_vec()).await
    }

    /// Starts one with more arguments and waits until it answers.
    async fn start_with(args: Vec<String>) -> RedisServer {
        let port = free_port();
        let mut s = RedisServer {
            child: None,
            port,
            dir: temp_dir(&format!("hub-test-redis-{port}")),
            args,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server; make test installs it)");
        self.child = Some(child);
        let deadline = Deadline::after(STEP);
        loop {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection())
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            deadline.retry(|| "redis-server did not start").await;
        }
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command.
    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut c = redis::Client::open(self.url())?.get_connection()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Before the directory goes (the field's own drop).
        self.kill();
    }
}

/// Waits until the server on `port` is a replica whose link to its master is up (a restarted
/// old master, made a replica of the promoted one, has caught up).
async fn wait_replica(port: u16) {
    let deadline = Deadline::after(STEP * 2);
    loop {
        let info = node_cmd(port, &["INFO", "replication"]).map(|v| text(&v));
        if info.is_ok_and(|i| i.contains("role:slave") && i.contains("master_link_status:up")) {
            return;
        }
        deadline
            .retry(|| format!("{port} did not come back as a replica"))
            .await;
    }
}

/// The name the Sentinel of [`RedisSentinel`] monitors its master under.
pub const SENTINEL_MASTER: &str = "hub-master";

/// A master, two replicas and a Sentinel watching them (private processes on free ports),
/// for tests of failovers behind Sentinel. The Sentinel alone decides (quorum 1), 1 s after
/// it last heard from the master; after a failover the other replica follows the new master,
/// so a publish waiting for one replica (`HUB_REDIS_SYNC_REPLICAS=1`) can be confirmed again.
pub struct RedisSentinel {
    servers: Vec<RedisServer>,
    sentinel: Option<Child>,
    /// The Sentinel's port.
    pub port: u16,
    /// Its config file (the Sentinel rewrites it), removed on drop.
    _dir: TempDir,
}

impl RedisSentinel {
    /// Starts the four and waits until the Sentinel knows both replicas.
    pub async fn start() -> RedisSentinel {
        let master = RedisServer::start().await;
        let replicas = [
            RedisServer::start_replica_of(master.port).await,
            RedisServer::start_replica_of(master.port).await,
        ];
        let port = free_port();
        let dir = temp_dir(&format!("hub-test-sentinel-{port}"));
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 10000\n",
                dir.path().display(),
                master.port
            ),
        )
        .expect("sentinel config");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs in Sentinel mode");
        let mut servers = vec![master];
        servers.extend(replicas);
        let s = RedisSentinel {
            servers,
            sentinel: Some(child),
            port,
            _dir: dir,
        };
        let deadline = Deadline::after(STEP);
        loop {
            let replicas = s.ask(&["SENTINEL", "REPLICAS", SENTINEL_MASTER]);
            if matches!(&replicas, Ok(redis::Value::Array(r)) if r.len() == 2) {
                return s;
            }
            deadline
                .retry(|| format!("the Sentinel does not know both replicas: {replicas:?}"))
                .await;
        }
    }

    /// `redis://127.0.0.1:port` of the Sentinel.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ask(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        node_cmd(self.port, args)
    }

    /// The port of the server the Sentinel names as the master.
    pub fn master_port(&self) -> u16 {
        let addr = self
            .ask(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER])
            .expect("the Sentinel answers");
        let redis::Value::Array(parts) = addr else {
            panic!("GET-MASTER-ADDR-BY-NAME answered {addr:?}")
        };
        text(&parts[1]).parse().expect("a port")
    }

    fn server(&mut self, port: u16) -> &mut RedisServer {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .expect("a server of this setup")
    }

    /// Kills the server on `port` (as a crash would).
    pub fn kill(&mut self, port: u16) {
        self.server(port).kill();
    }

    /// Waits until the Sentinel has promoted another server than `not` and that one says it
    /// is the master.
    pub async fn wait_promoted(&self, not: u16) {
        let deadline = Deadline::after(STEP * 2);
        loop {
            let now = self.master_port();
            if now != not
                && node_cmd(now, &["INFO", "replication"])
                    .map(|v| text(&v))
                    .is_ok_and(|i| i.contains("role:master"))
            {
                return;
            }
            deadline
                .retry(|| format!("no replica promoted after {not} died"))
                .await;
        }
    }

    /// Waits until the master the Sentinel names has a replica in sync (after a failover:
    /// the other replica follows the promoted one).
    pub async fn wait_replicated(&self) {
        let deadline = Deadline::after(STEP * 2);
        loop {
            let master = self.master_port();
            let info = node_cmd(master, &["INFO", "replication"]).map(|v| text(&v));
            if info.is_ok_and(|i| i.contains("role:master") && i.contains("state=online")) {
                return;
            }
            deadline
                .retry(|| format!("the master on {master} has no replica in sync"))
                .await;
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The shared Redis Cluster the suite runs against (`make test` starts it with
/// infra/local/redis-cluster.sh and sets the variable): its seed URLs, comma-separated.
pub fn redis_cluster_urls() -> String {
    std::env::var("HUB_TEST_REDIS_CLUSTER_URLS").unwrap_or_else(|_| {
        (7001..=7006)
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// One node of a [`RedisCluster`].
struct ClusterNode {
    port: u16,
    bus: u16,
    child: Option<Child>,
}

/// A private Redis Cluster (3 masters, 3 replicas, one per master) for tests that kill or
/// reshard its nodes. Nodes notice a dead peer after a second (`cluster-node-timeout`).
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: TempDir,
}

/// Runs one command on the node at `port`.
pub fn node_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))?.get_connection()?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut c)
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::VerbatimString { text, .. } => text.clone(),
        other => format!("{other:?}"),
    }
}

impl RedisCluster {
    /// Starts six nodes, joins them into one cluster and waits until it is ok.
    pub async fn start() -> RedisCluster {
        let mut cluster = RedisCluster {
            nodes: (0..6)
                .map(|_| ClusterNode {
                    port: free_port(),
                    bus: free_port(),
                    child: None,
                })
                .collect(),
            dir: temp_dir("hub-test-redis-cluster"),
        };
        let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
        for port in &ports {
            cluster.spawn(*port).await;
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (make test installs redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(&ports).await;
        cluster
    }

    async fn spawn(&mut self, port: u16) {
        let dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir).expect("node directory");
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-port", &node.bus.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server; make test installs it)");
        node.child = Some(child);
        let deadline = Deadline::after(STEP);
        while node_cmd(port, &["PING"]).is_err() {
            deadline
                .retry(|| format!("cluster node {port} did not start"))
                .await;
        }
    }

    /// Seed URLs of every node, comma-separated (for `HUB_REDIS_CLUSTER_URLS`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Waits until every node in `ports` reports `cluster_state:ok`.
    async fn wait_ok(&self, ports: &[u16]) {
        let deadline = Deadline::after(STEP * 2);
        loop {
            let ok = ports.iter().all(|p| {
                node_cmd(*p, &["CLUSTER", "INFO"])
                    .map(|v| text(&v).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                return;
            }
            deadline.retry(|| "the cluster did not become ok").await;
        }
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = self.live_ports()[0];
        match node_cmd(port, &["CLUSTER", "KEYSLOT", key]).expect("CLUSTER KEYSLOT") {
            redis::Value::Int(n) => u16::try_from(n).expect("a slot"),
            other => panic!("CLUSTER KEYSLOT answered {other:?}"),
        }
    }

    /// The port of the master that serves `slot`, as a live node sees it.
    pub fn master_of(&self, slot: u16) -> u16 {
        let port = self.live_ports()[0];
        let slots = node_cmd(port, &["CLUSTER", "SLOTS"]).expect("CLUSTER SLOTS");
        hub::backplane::redis::slot_ranges(&slots)
            .into_iter()
            .find(|(from, to, _, _)| (*from..=*to).contains(&slot))
            .map(|(_, _, _, port)| port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {slots:?}"))
    }

    /// A master other than `port`.
    pub fn other_master(&self, port: u16) -> u16 {
        let masters: Vec<u16> = (0..16384u16)
            .step_by(5461)
            .map(|s| self.master_of(s))
            .collect();
        *masters
            .iter()
            .find(|p| **p != port)
            .expect("another master")
    }

    fn node_id(port: u16) -> String {
        text(&node_cmd(port, &["CLUSTER", "MYID"]).expect("CLUSTER MYID"))
    }

    /// Kills the node (as a crash would).
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node");
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed node again with its cluster config: it rejoins (a promoted replica
    /// keeps its slots, so the old master comes back as its replica); waits until the
    /// cluster is ok and the node has caught up with its master.
    pub async fn restart(&mut self, port: u16) {
        self.spawn(port).await;
        self.wait_ok(&self.live_ports()).await;
        wait_replica(port).await;
    }

    /// Waits until a live master serves `slot` and the live nodes agree the cluster is ok
    /// (after a kill: the replica was promoted).
    pub async fn wait_served(&self, slot: u16, not_by: u16) {
        let deadline = Deadline::after(STEP * 2);
        while self.master_of(slot) == not_by {
            deadline
                .retry(|| format!("slot {slot} still served by {not_by}"))
                .await;
        }
        self.wait_ok(&self.live_ports()).await;
    }

    /// Moves `slot` with its keys to the master at `to`, as `redis-cli --cluster reshard`
    /// does for each slot it moves: importing/migrating states, `MIGRATE` in batches, then
    /// the new owner announced to every master.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let from = self.master_of(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (Self::node_id(from), Self::node_id(to));
        let slot_s = slot.to_string();
        node_cmd(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]).expect("IMPORTING");
        node_cmd(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]).expect("MIGRATING");
        loop {
            let keys = node_cmd(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"])
                .expect("GETKEYSINSLOT");
            let redis::Value::Array(keys) = keys else {
                panic!("GETKEYSINSLOT answered {keys:?}")
            };
            if keys.is_empty() {
                break;
            }
            let keys: Vec<String> = keys.iter().map(text).collect();
            let to_s = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_s, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            node_cmd(from, &args).expect("MIGRATE");
        }
        // The new owner first, then the old one, then the rest (replicas refuse; fine).
        let mut ports = vec![to, from];
        ports.extend(
            self.live_ports()
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for port in ports {
            let _ = node_cmd(port, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
