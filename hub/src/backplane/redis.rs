//! Redis backplane: one per-user history shared by every node, and routing through pub/sub.
//!
//! # Keys and channels (user `u`, prefix `P`)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:m:{u}` | hash | `epoch` (hex, random per history incarnation), `seq` (last id's sequence) |
//! | `P:h:{u}` | stream | entries `<seq>-1` with `e` = envelope JSON, `u` = acceptance time (µs) |
//! | `P:i:{u}:<key>` | string | the id an API idempotency key was first published under (`HUB_IDEMPOTENCY_TTL`) |
//! | `P:e:{u}` | sorted set | the user's recent ingested events (hash of route + event id), scored by sequence, about `HUB_DEDUPE_WINDOW` of them |
//! | `P:c:{u}` | channel | `<id> <µs> <envelope JSON>` for every accepted notification |
//! | `P:p:{u}:<node>` | string | presence: that node's count of the user's connections (expires unless the node rewrites it) |
//! | `P:q:{{c}:<node>` | hash | channel presence: user → that user's connections to channel `c` on that node (expires likewise) |
//! | `P:r:{u}` | string | `<issued before> <until>`: the user's revoked tokens (disconnect API) |
//! | `P:ctl` | channel | `d <request> <issued before> <until> <user>`: disconnect requests to every node |
//! | `P:dr:<request>` | list | each node's count of connections it closed for that request |
//!
//! User ids hold no `{` or `}` (see [`crate::envelope::check_user_id`]), so the hash tag is
//! exactly the user and `P:i:{u}:<key>` names one (user, key) pair whatever the key holds.
//!
//! A channel `c` is a stream like a user's, named `{c` ([`crate::envelope::channel_stream`]):
//! its keys and pub/sub channel are the same with `{c` for `u` (`P:m:{{c}`, `P:c:{{c}`, ...),
//! whose hash tag `{c` no user can have.
//!
//! Every key and the channel of one user share the hash tag `{u}`, so in a Redis Cluster they
//! live in one slot, and a later move to sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`) needs no
//! data migration. All keys expire `HUB_HISTORY_TTL` after the user's last notification.
//!
//! # Publishing
//!
//! One server-side script checks the idempotency key, creates the history with a fresh epoch
//! if there is none, assigns the next sequence number, appends to the stream (trimmed to about
//! `HUB_HISTORY_SIZE`), refreshes the TTLs and publishes to the user's channel. So the id a
//! subscriber sees is the id in history, and per user, ids and channel order agree.
//!
//! # Subscribing and failures
//!
//! A single task per node owns the pub/sub connection. It subscribes a user's channel when
//! the user's first local connection arrives and unsubscribes after the last one leaves,
//! batching whatever changed since its last round into one `SUBSCRIBE` / `UNSUBSCRIBE`. It
//! remembers, per subscribed user, the last id it handed to the node. When the connection
//! drops or Redis restarts it reconnects with backoff, resubscribes every local user, and then
//! reads each user's history after that last id and delivers what was missed; if the history
//! is gone (a different epoch), the user's connections get `hub.gap` first.
//!
//! Behind Redis Sentinel the node asks the Sentinels for the master at start and then every
//! second; when they name another one (a failover), the command connections are replaced
//! and the pub/sub connection is made again on the new master, with the catch-up above.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGaugeVec};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use service_kit::Backoff;
use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use super::{
    Backplane, BackplaneError, ChannelPresence, Dedupe, Publish, Published, Replay, Revocation,
    Revocations, Sink,
};
use crate::envelope::{Id, Notification, now_micros};

/// Connection and history settings of the Redis backplane.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// The server or cluster.
    pub endpoint: RedisEndpoint,
    /// PEM CA bundle that signs the server's certificate (`rediss://`); the system roots
    /// otherwise.
    pub ca_file: Option<std::path::PathBuf>,
    /// Key and channel prefix.
    pub prefix: String,
    /// Multiplexed command connections (each pipelines every concurrent command).
    pub pool_size: usize,
    /// How long a single publish may wait for others to share its script call.
    pub linger: Duration,
    /// Deadline for one command or connection attempt.
    pub timeout: Duration,
    /// Replicas that must confirm a publish before it is acknowledged (`WAIT`); 0: none.
    pub sync_replicas: u32,
    /// A node whose presence heartbeat is older than this is counted out of presence.
    pub presence_timeout: Duration,
    /// Notifications kept per user (approximately; trimming is lazy).
    pub history_size: usize,
    /// History lifetime after the last notification.
    pub history_ttl: Duration,
    /// How long an API idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// Recent ingested events remembered per user (the dedupe window).
    pub event_window: usize,
}

/// Where the backplane's Redis is.
#[derive(Debug, Clone)]
pub enum RedisEndpoint {
    /// One server (`HUB_REDIS_URL`): `redis://` or `rediss://` URL.
    Single(String),
    /// A Redis Cluster by its seed URLs (`HUB_REDIS_CLUSTER_URLS`): commands go to the shard
    /// owning each user's slot and pub/sub is sharded (`SPUBLISH` / `SSUBSCRIBE`).
    Cluster(Vec<String>),
    /// The master that Redis Sentinels name (`HUB_REDIS_SENTINEL_URLS`,
    /// `HUB_REDIS_SENTINEL_MASTER`), followed through failovers.
    Sentinel {
        /// The Sentinels' `redis://` URLs.
        sentinels: Vec<String>,
        /// The master's name they monitor.
        master: String,
        /// The master's (and replicas') password.
        password: Option<String>,
    },
}

/// How often the Sentinels are asked which server is the master.
const MASTER_CHECK: Duration = Duration::from_secs(1);

/// The master behind Sentinels, and the connections to it.
struct Master {
    sentinel: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    current: parking_lot::RwLock<MasterConns>,
    /// Bumped when the Sentinels name another master (the pub/sub task reconnects).
    switched: watch::Sender<u64>,
}

/// The current master's client and command connections.
struct MasterConns {
    client: redis::Client,
    conns: Vec<Conn>,
}

/// Observability handles the backplane updates.
#[derive(Clone)]
pub struct RedisTelemetry {
    /// Reconnects of the pub/sub connection.
    pub reconnects: IntCounter,
    /// Acceptance → receipt by this node of the latest pub/sub message.
    pub lag_seconds: Gauge,
    /// Per cluster master (`host:port`): answered the last probe.
    pub shard_up: IntGaugeVec,
    /// Per cluster master: times it answered a probe again after failing one.
    pub shard_recoveries: IntCounterVec,
    /// Users whose connection count this node wrote to presence.
    pub presence_reports: IntCounter,
}

/// Publishes any number of notifications in one call (so the script's per-call cost is paid
/// once per batch, not per notification). KEYS: four per notification — meta, stream, channel,
/// dedupe key (the meta key again when there is none). ARGV: maxlen, TTL (ms, the keys'
/// lifetime), refresh interval (µs), dedupe window, API key TTL (ms), then five per
/// notification — fresh epoch, acceptance time (µs), envelope tail, dedupe mode (`k`: an API
/// key, the dedupe key a string that lives `HUB_IDEMPOTENCY_TTL`; `e`: an ingested event, the
/// dedupe key the user's sorted set of recent event hashes scored by sequence, trimmed to about
/// the window; empty: none), event hash. The keys' TTLs are refreshed at most once per interval
/// (the time of the last refresh is the meta hash's `x`), not on every notification; the TTL
/// set covers the interval too, so a history still lives at least `HUB_HISTORY_TTL` after its
/// last notification. Returns `fresh, id` per notification (`fresh` 0: a repeat, with the
/// first id).
const PUBLISH_SCRIPT: &str = r#"
local maxlen, ttl, every, window, key_ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local out = {}
for i = 0, n - 1 do
  local meta, stream, channel, dedupe = K[i * 4 + 1], K[i * 4 + 2], K[i * 4 + 3], K[i * 4 + 4]
  local a = 5 + i * 5
  local fresh_epoch, us, tail, mode, member = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local m = redis.call('HMGET', meta, 'epoch', 'x')
  local epoch, refreshed = m[1], m[2]
  local first = false
  if mode == 'k' then
    first = redis.call('GET', dedupe)
  elseif mode == 'e' and epoch then
    local seen = redis.call('ZSCORE', dedupe, member)
    if seen then first = epoch .. '-' .. seen end
  end
  if first then
    out[#out + 1] = 0
    out[#out + 1] = first
  else
    if not epoch then
      epoch = fresh_epoch
      redis.call('DEL', stream)
      redis.call('HSET', meta, 'epoch', epoch)
      if mode == 'e' then redis.call('DEL', dedupe) end
      refreshed = false
    end
    local seq = redis.call('HINCRBY', meta, 'seq', 1)
    local id = epoch .. '-' .. seq
    local env = '{"id":"' .. id .. '",' .. tail
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, seq .. '-1', 'e', env, 'u', us)
    if mode == 'k' then
      redis.call('SET', dedupe, id, 'PX', key_ttl)
    elseif mode == 'e' then
      redis.call('ZADD', dedupe, seq, member)
      if seq % 32 == 0 then redis.call('ZREMRANGEBYRANK', dedupe, 0, -tonumber(window) - 1) end
    end
    if not refreshed or tonumber(us) - tonumber(refreshed) >= every then
      redis.call('HSET', meta, 'x', us)
      redis.call('PEXPIRE', meta, ttl)
      redis.call('PEXPIRE', stream, ttl)
      if mode == 'e' then redis.call('PEXPIRE', dedupe, ttl) end
    end
    redis.call('PUBLISH', channel, id .. ' ' .. us .. ' ' .. env)
    out[#out + 1] = 1
    out[#out + 1] = id
  end
end
return out
"#;

/// How [`PUBLISH_SCRIPT`] finds its keys on one server: `n` notifications, their keys `K`
/// declared as `KEYS`.
const SINGLE_PRELUDE: &str = "local K, n = KEYS, #KEYS / 4\n";

/// How [`PUBLISH_SCRIPT`] finds its keys on a cluster, where one call carries notifications
/// of every slot its node serves: only the first meta key is declared (it routes the call),
/// the keys of all `n` notifications follow the other arguments, and the flag lets the script
/// touch keys of several slots of this node. Before anything is written, every meta key is
/// checked to be served here; if one is not (the node's slot map was stale), nothing runs and
/// the reply is `{-1}`.
const CLUSTER_PRELUDE: &str = "#!lua flags=allow-cross-slot-keys
local n = (#ARGV - 5) / 9
local K = {}
for j = 1, n * 4 do K[j] = ARGV[5 + n * 5 + j] end
for j = 0, n - 1 do
  local r = redis.pcall('EXISTS', K[j * 4 + 1])
  if type(r) == 'table' and r.err then return {-1} end
end
";

/// Reads a user's history atomically. KEYS: meta, stream. ARGV: first entry id wanted,
/// most entries. Returns the epoch, the last sequence number, the first retained entry and
/// the entries from the given id on.
const READ_SCRIPT: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local items = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
return {m[1], m[2], first, items}
"#;

/// What [`READ_SCRIPT`] found.
struct HistoryRead {
    epoch: u64,
    last: u64,
    first: redis::streams::StreamRangeReply,
    items: redis::streams::StreamRangeReply,
}

/// Most notifications in one script call: a script blocks Redis while it runs, so a large
/// batch goes out as several calls (pipelined) and other clients are served in between.
const SCRIPT_BATCH: usize = 64;

/// Most notifications one coalescing round gathers (its script calls are pipelined).
const COALESCE: usize = 4 * SCRIPT_BATCH;

/// Jobs (publishes and small batches) waiting for the coalescer at most; past it a publish
/// waits to queue.
const JOB_QUEUE: usize = 4096;

/// The cluster pub/sub loop's view of its subscriptions.
struct ShardedSubs {
    conn: ClusterConnection,
    /// Users whose sharded subscription the cluster confirmed (and has not ended since).
    on_redis: HashSet<Arc<str>>,
    /// The control channel is subscribed.
    control: bool,
}

/// What the pub/sub task subscribes through (made once per backplane, so the size of its
/// variants does not matter).
#[allow(clippy::large_enum_variant)]
enum PubSubClient {
    Single(redis::Client),
    /// A RESP3 cluster client and the receiver of its connections' pushes.
    Cluster(ClusterClient, mpsc::UnboundedReceiver<redis::PushInfo>),
}

/// A publish (or a small batch, kept together and in order) waiting for the coalescer.
struct Job {
    msgs: Vec<Publish>,
    done: tokio::sync::oneshot::Sender<Result<Vec<Published>, BackplaneError>>,
}

/// Cheap-to-clone handle on the Redis backplane.
#[derive(Clone)]
pub struct RedisBackplane {
    inner: Arc<Inner>,
}

struct Inner {
    /// Multiplexed connections, used round-robin: concurrent commands share a socket and
    /// go out pipelined; each reconnects by itself after a failure.
    conns: Vec<Conn>,
    next: std::sync::atomic::AtomicUsize,
    /// The coalescing task's queue of publishes and small batches (see
    /// [`RedisBackplane::coalesce`]).
    jobs: mpsc::Sender<Job>,
    client: Client,
    /// Behind Sentinels: the master now (its connections replace `conns`).
    master: Option<Master>,
    /// A Redis Cluster: scripts and pipelines are split per slot, pub/sub is sharded.
    cluster: bool,
    /// On a cluster: for each slot, which master serves it (an index among the masters),
    /// from the last `CLUSTER SLOTS`; `None` until known or after it proved stale.
    owners: parking_lot::RwLock<Option<Arc<Vec<u16>>>>,
    settings: RedisSettings,
    publish: redis::Script,
    read: redis::Script,
    sink: Arc<dyn Sink>,
    /// Users with local connections: reference count and the last id handed to the sink.
    /// Locked briefly by handshakes and the pub/sub task, never across `.await`.
    subs: Mutex<HashMap<Arc<str>, SubState>>,
    /// Wakes the pub/sub task when `subs` changed.
    changed: mpsc::Sender<()>,
    /// Bumped by the pub/sub task whenever a batch of subscriptions is live in Redis;
    /// handshakes wait on it.
    live: watch::Sender<u64>,
    connected: AtomicBool,
    telemetry: RedisTelemetry,
    revocations: Revocations,
    /// This node's name in presence (random per process).
    node: String,
    /// (stream, user) pairs whose local connection count changed since the presence task
    /// last wrote them (a user's personal stream is the user itself).
    presence_dirty: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    /// Pub/sub channel names made once (every message is matched against them).
    channel_prefix: String,
    control_channel: String,
}

struct SubState {
    refs: usize,
    /// Subscribed in Redis on the current pub/sub connection.
    live: bool,
    /// Last id delivered to the sink for this user (from pub/sub or a catch-up read).
    last: Option<Id>,
    /// From a pub/sub reconnect until this user's catch-up ran: live messages wait in `held`,
    /// so none overtakes (and hides) the missed ones the catch-up reads from history.
    catching_up: bool,
    held: Vec<Arc<Notification>>,
}

/// A command connection to a server or a cluster; both pipeline concurrent commands and
/// repair themselves after a failure.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// A one-off connection to a server, not repaired after a failure.
    Once(redis::aio::MultiplexedConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Once(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Once(c) => c.req_packed_commands(pipe, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Once(c) => c.get_db(),
        }
    }
}

/// What a rare request that needs a connection of its own (a blocking pop) opens it with
/// (one per backplane, so the size of its variants does not matter).
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// `read` retried with backoff until it succeeds or `until` has passed.
async fn patiently<T, F, Fut>(until: tokio::time::Instant, read: F) -> Result<T, BackplaneError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, BackplaneError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let result = read().await;
        if result.is_ok() || tokio::time::Instant::now() >= until {
            return result;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Longest a head read waits for the node's pub/sub to catch up with it.
const HEAD_WAIT: Duration = Duration::from_millis(500);

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The cluster slot of a user's keys: CRC16 (XMODEM) of the hash tag, which is exactly the
/// user (user ids hold no braces; the prefix neither).
fn user_slot(user: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(user.as_bytes()) % SLOTS
}

/// The PEM CA bundle of `HUB_REDIS_CA_FILE`, as the client's root certificates.
fn certificates(path: &std::path::Path) -> Result<redis::TlsCertificates, BackplaneError> {
    let pem = std::fs::read(path)
        .map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))?;
    Ok(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    })
}

/// A cluster client on the seeds with the backplane's deadlines; `pushes` receives the
/// pub/sub messages (RESP3) of the connections it opens.
fn cluster_client(
    seeds: &[String],
    settings: &RedisSettings,
    pushes: Option<mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<ClusterClient, BackplaneError> {
    let mut builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(settings.timeout)
        .response_timeout(settings.timeout)
        .retries(2)
        .min_retry_wait(50)
        .max_retry_wait(1000);
    if let Some(path) = &settings.ca_file {
        builder = builder.certs(certificates(path)?);
    }
    if let Some(pushes) = pushes {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes);
    }
    builder.build().map_err(unavailable)
}

/// How often a node writes the presence changes of its users.
const PRESENCE_FLUSH: Duration = Duration::from_secs(1);

/// How often a node writes the presence of all its users again (their keys live twice as
/// long).
const PRESENCE_REFRESH: Duration = Duration::from_secs(600);

/// How often a node on a cluster probes each master (`hub_backplane_shard_up`).
const SHARD_PROBE: Duration = Duration::from_secs(5);

/// How long a catch-up keeps retrying failed history reads before it gives up with a gap.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(15);

/// "The user had no history when this node subscribed."
const EMPTY: Id = Id { epoch: 0, seq: 0 };

/// A script call that reached a node not serving all its keys (retrying resolves it).
fn moved() -> BackplaneError {
    unavailable("a slot moved during the publish")
}

/// Indices of `items` grouped by `key` (first-seen order; within a group, `items`' order);
/// items without a key each form a group of their own.
fn group_by<T, K: std::hash::Hash + Eq>(
    items: &[T],
    key: impl Fn(&T) -> Option<K>,
) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut index: HashMap<K, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let Some(k) = key(item) else {
            groups.push(vec![i]);
            continue;
        };
        let g = *index.entry(k).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        if let Some(members) = groups.get_mut(g) {
            members.push(i);
        }
    }
    groups
}

fn unavailable(e: impl std::fmt::Display) -> BackplaneError {
    BackplaneError::Unavailable(e.to_string())
}

/// A publish error: permanent only when Redis refuses this notification for its size (the
/// same one can never succeed); everything else (connection, OOM, failover, ACL) is retried,
/// so a misconfigured or recovering Redis never sends good records to a DLQ.
fn publish_error(e: redis::RedisError) -> BackplaneError {
    let text = e.to_string().to_ascii_lowercase();
    let too_big = [
        "exceeds maximum",
        "too large",
        "too big",
        "invalid bulk length",
    ]
    .iter()
    .any(|s| text.contains(s));
    if too_big && !e.is_io_error() && !e.is_timeout() {
        BackplaneError::Rejected(e.to_string())
    } else {
        unavailable(e)
    }
}

/// Completes when the Sentinels have named another master (never without Sentinels).
async fn master_switched(switched: &mut Option<watch::Receiver<u64>>) {
    match switched {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

impl RedisBackplane {
    /// Connects the command pool and starts the pub/sub task. Fails when Redis cannot be
    /// reached at start (so a misconfigured URL is reported at once).
    pub async fn connect(
        settings: RedisSettings,
        sink: Arc<dyn Sink>,
        telemetry: RedisTelemetry,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), BackplaneError> {
        let mut master = None;
        let (conns, client, pubsub) = match &settings.endpoint {
            RedisEndpoint::Single(url) => {
                let client = match &settings.ca_file {
                    None => redis::Client::open(url.as_str()).map_err(unavailable)?,
                    Some(path) => redis::Client::build_with_tls(url.as_str(), certificates(path)?)
                        .map_err(unavailable)?,
                };
                let conns = Self::single_connections(&client, &settings)?;
                (
                    conns,
                    Client::Single(client.clone()),
                    PubSubClient::Single(client),
                )
            }
            RedisEndpoint::Sentinel {
                sentinels,
                master: name,
                password,
            } => {
                let mut node = redis::RedisConnectionInfo::default();
                if let Some(p) = password {
                    node = node.set_password(p);
                }
                let mut sentinel = redis::sentinel::SentinelClient::build(
                    sentinels.clone(),
                    name.as_str(),
                    Some(
                        redis::sentinel::SentinelNodeConnectionInfo::default()
                            .set_redis_connection_info(node),
                    ),
                    redis::sentinel::SentinelServerType::Master,
                )
                .map_err(unavailable)?;
                let client = tokio::time::timeout(settings.timeout, sentinel.async_get_client())
                    .await
                    .map_err(|_| unavailable("timed out asking the Sentinels for the master"))?
                    .map_err(unavailable)?;
                tracing::info!(master = %client.get_connection_info().addr(), "Redis master named by the Sentinels");
                let conns = Self::single_connections(&client, &settings)?;
                let (switched, _) = watch::channel(0);
                master = Some(Master {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    current: parking_lot::RwLock::new(MasterConns {
                        client: client.clone(),
                        conns: conns.clone(),
                    }),
                    switched,
                });
                (
                    conns,
                    Client::Single(client.clone()),
                    PubSubClient::Single(client),
                )
            }
            RedisEndpoint::Cluster(seeds) => {
                let client = cluster_client(seeds, &settings, None)?;
                let mut conns = Vec::new();
                for _ in 0..settings.pool_size.max(1) {
                    let conn =
                        tokio::time::timeout(settings.timeout, client.get_async_connection())
                            .await
                            .map_err(|_| unavailable("timed out connecting to the cluster"))?
                            .map_err(unavailable)?;
                    conns.push(Conn::Cluster(conn));
                }
                let (tx, rx) = mpsc::unbounded_channel();
                let pubsub = cluster_client(seeds, &settings, Some(tx))?;
                (
                    conns,
                    Client::Cluster(client),
                    PubSubClient::Cluster(pubsub, rx),
                )
            }
        };
        let cluster = matches!(client, Client::Cluster(_));
        let script = if cluster {
            format!(
                "{CLUSTER_PRELUDE}{}",
                PUBLISH_SCRIPT.replace("'PUBLISH'", "'SPUBLISH'")
            )
        } else {
            format!("{SINGLE_PRELUDE}{PUBLISH_SCRIPT}")
        };
        let channel_prefix = format!("{}:c:{{", settings.prefix);
        let control_channel = format!("{}:ctl", settings.prefix);
        let (changed, changes) = mpsc::channel(1);
        let (live, _) = watch::channel(0);
        let (jobs_tx, jobs) = mpsc::channel::<Job>(JOB_QUEUE);
        let this = RedisBackplane {
            inner: Arc::new(Inner {
                conns,
                next: std::sync::atomic::AtomicUsize::new(0),
                jobs: jobs_tx,
                client,
                master,
                cluster,
                owners: parking_lot::RwLock::new(None),
                settings,
                publish: redis::Script::new(&script),
                read: redis::Script::new(READ_SCRIPT),
                sink,
                subs: Mutex::new(HashMap::new()),
                changed,
                live,
                connected: AtomicBool::new(false),
                telemetry,
                revocations: Revocations::default(),
                node: format!("{:016x}", rand::random::<u64>()),
                presence_dirty: Mutex::new(HashSet::new()),
                channel_prefix,
                control_channel,
            }),
        };
        this.ping().await?;
        // Each part in a task of its own (a wake-up of one does not poll the others), held by
        // one task: aborting it aborts them all.
        let pubsub = {
            let this = this.clone();
            async move {
                match pubsub {
                    PubSubClient::Single(client) => this.pubsub_task(client, changes).await,
                    PubSubClient::Cluster(client, pushes) => {
                        this.cluster_pubsub_task(client, pushes, changes).await;
                    }
                }
            }
        };
        let mut parts = vec![
            AbortOnDropHandle::new(tokio::spawn(pubsub)),
            AbortOnDropHandle::new(tokio::spawn(this.clone().coalesce(jobs))),
            AbortOnDropHandle::new(tokio::spawn(this.clone().presence_task())),
        ];
        if this.inner.master.is_some() {
            parts.push(AbortOnDropHandle::new(tokio::spawn(
                this.clone().master_task(),
            )));
        }
        let task = tokio::spawn(async move {
            futures_util::future::join_all(parts).await;
        });
        Ok((this, task))
    }

    /// The command connections to one server (lazy: the first command connects).
    fn single_connections(
        client: &redis::Client,
        settings: &RedisSettings,
    ) -> Result<Vec<Conn>, BackplaneError> {
        // redis-rs gives every connection a 500 ms response timeout of its own; the
        // configured deadline must be the one that applies.
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.timeout))
            .set_connection_timeout(Some(settings.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conns = (0..settings.pool_size.max(1))
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                    .map(Conn::Single)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        Ok(conns)
    }

    /// Behind Sentinels: asks them every [`MASTER_CHECK`] which server is the master; when
    /// they name another one, new command connections to it replace the old ones and the
    /// pub/sub task is told to reconnect (it then catches every local user up from history).
    /// A Sentinel or master that does not answer is skipped until the next check.
    async fn master_task(self) {
        let Some(master) = &self.inner.master else {
            return;
        };
        let mut tick = tokio::time::interval(MASTER_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let found = {
                let mut sentinel = master.sentinel.lock().await;
                tokio::time::timeout(self.inner.settings.timeout, sentinel.async_get_client()).await
            };
            let client = match found {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "asking the Sentinels for the master failed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!("asking the Sentinels for the master timed out");
                    continue;
                }
            };
            let now = client.get_connection_info().addr().to_string();
            let before = master
                .current
                .read()
                .client
                .get_connection_info()
                .addr()
                .to_string();
            if now == before {
                continue;
            }
            let conns = match Self::single_connections(&client, &self.inner.settings) {
                Ok(conns) => conns,
                Err(e) => {
                    tracing::warn!(error = %e, master = %now, "connecting to the new master failed");
                    continue;
                }
            };
            tracing::warn!(from = %before, to = %now, "the Sentinels named another Redis master; switching to it");
            *master.current.write() = MasterConns { client, conns };
            master.switched.send_modify(|n| *n += 1);
        }
    }

    /// The client of the server to talk to: behind Sentinels the master now, else the one
    /// server's.
    fn single_client(&self, client: &redis::Client) -> redis::Client {
        match &self.inner.master {
            Some(m) => m.current.read().client.clone(),
            None => client.clone(),
        }
    }

    /// On a cluster: whether the node currently knows which master serves each slot (so a
    /// batch goes out as one script call per master).
    pub fn knows_slot_owners(&self) -> bool {
        self.inner.owners.read().is_some()
    }

    /// The publish script's `EVALSHA` for a chunk of notifications.
    fn publish_cmd(&self, msgs: &[&Publish], accepted_us: u64) -> redis::Cmd {
        let settings = &self.inner.settings;
        let every = refresh_interval(settings.history_ttl);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.inner.publish.get_hash());
        let cluster = self.inner.cluster;
        if cluster {
            // The first meta key routes the call; every key follows the arguments.
            let first = msgs
                .first()
                .map_or(String::new(), |m| self.key("m", &m.user));
            cmd.arg(1).arg(first);
        } else {
            cmd.arg(msgs.len() * 4);
            self.publish_keys(&mut cmd, msgs);
        }
        cmd.arg(settings.history_size)
            .arg((settings.history_ttl + every).as_millis() as u64)
            .arg(every.as_micros() as u64)
            .arg(settings.event_window.max(1))
            .arg(settings.idempotency_ttl.as_millis().max(1) as u64);
        // The epoch a stream starts with when it has none (new, or its history expired): one
        // fresh value per call serves every stream of the call.
        let fresh_epoch = format!("{:x}", (rand::random::<u64>() >> 16).max(1));
        for msg in msgs {
            let (mode, member) = match &msg.dedupe {
                None => ("", String::new()),
                Some(Dedupe::Key(_)) => ("k", String::new()),
                Some(Dedupe::Event(event)) => ("e", event_member(event)),
            };
            cmd.arg(fresh_epoch.as_str())
                .arg(accepted_us)
                .arg(Notification::envelope_tail(
                    &msg.user,
                    &msg.kind,
                    &msg.data,
                    accepted_us,
                ))
                .arg(mode)
                .arg(member);
        }
        if cluster {
            self.publish_keys(&mut cmd, msgs);
        }
        cmd
    }

    /// The four keys of each notification: meta, stream, channel, dedupe.
    fn publish_keys(&self, cmd: &mut redis::Cmd, msgs: &[&Publish]) {
        for msg in msgs {
            let meta = self.key("m", &msg.user);
            let dedupe = match &msg.dedupe {
                None => meta.clone(),
                Some(Dedupe::Key(key)) => format!("{}:{key}", self.key("i", &msg.user)),
                Some(Dedupe::Event(_)) => self.key("e", &msg.user),
            };
            cmd.arg(meta)
                .arg(self.key("h", &msg.user))
                .arg(self.key("c", &msg.user))
                .arg(dedupe);
        }
    }

    /// Publishes through the script, in order per user. On one server, one call per
    /// [`SCRIPT_BATCH`] notifications, the calls pipelined on one connection (so their order
    /// holds). On a cluster the notifications are grouped by the master that serves their
    /// user's slot, one call per group (see [`CLUSTER_PRELUDE`]), the groups concurrently;
    /// without a current slot map, or when a group's master no longer serves one of its
    /// slots, they are grouped by slot instead.
    async fn run_scripts(&self, msgs: &[Publish]) -> Result<Vec<Published>, BackplaneError> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let accepted_us = now_micros();
        let msgs: Vec<&Publish> = msgs.iter().collect();
        if !self.inner.cluster {
            return self.run_group(&msgs, accepted_us).await?.ok_or_else(moved);
        }
        let owners = self.inner.owners.read().clone();
        match owners {
            Some(owners) => {
                let groups = group_by(&msgs, |m| {
                    owners.get(usize::from(user_slot(&m.user))).copied()
                });
                self.run_groups(&msgs, groups, |group| {
                    self.run_node_group(group, accepted_us)
                })
                .await
            }
            None => self.run_per_slot(&msgs, accepted_us).await,
        }
    }

    /// [`Self::run_scripts`] on a cluster with the notifications grouped by slot.
    async fn run_per_slot(
        &self,
        msgs: &[&Publish],
        accepted_us: u64,
    ) -> Result<Vec<Published>, BackplaneError> {
        let groups = group_by(msgs, |m| Some(user_slot(&m.user)));
        self.run_groups(msgs, groups, |group| async move {
            self.run_group(&group, accepted_us).await?.ok_or_else(moved)
        })
        .await
    }

    /// The notifications of one master, one script call per [`SCRIPT_BATCH`] in order; from
    /// the first call whose keys are not all served there (nothing of it ran), the slot map
    /// is dropped and the rest go slot by slot.
    async fn run_node_group(
        &self,
        msgs: Vec<&Publish>,
        accepted_us: u64,
    ) -> Result<Vec<Published>, BackplaneError> {
        let mut out = Vec::with_capacity(msgs.len());
        for (k, chunk) in msgs.chunks(SCRIPT_BATCH).enumerate() {
            if let Some(published) = self.run_group(chunk, accepted_us).await? {
                out.extend(published);
                continue;
            }
            *self.inner.owners.write() = None;
            let rest = msgs.get(k * SCRIPT_BATCH..).unwrap_or_default();
            out.extend(self.run_per_slot(rest, accepted_us).await?);
            break;
        }
        Ok(out)
    }

    /// Runs `groups` of `msgs` (indices) concurrently with `run` and puts the results back
    /// in the order of `msgs`.
    async fn run_groups<'a, F, Fut>(
        &self,
        msgs: &[&'a Publish],
        groups: Vec<Vec<usize>>,
        run: F,
    ) -> Result<Vec<Published>, BackplaneError>
    where
        F: Fn(Vec<&'a Publish>) -> Fut,
        Fut: Future<Output = Result<Vec<Published>, BackplaneError>>,
    {
        let mut calls = Vec::with_capacity(groups.len());
        for members in &groups {
            calls.push(run(members
                .iter()
                .filter_map(|&i| msgs.get(i).copied())
                .collect()));
        }
        let results = futures_util::future::join_all(calls).await;
        let mut out: Vec<Option<Published>> = vec![None; msgs.len()];
        for (members, result) in groups.iter().zip(results) {
            for (&i, p) in members.iter().zip(result?) {
                if let Some(entry) = out.get_mut(i) {
                    *entry = Some(p);
                }
            }
        }
        out.into_iter()
            .map(|p| p.ok_or_else(|| unavailable("the store answered too few replies")))
            .collect()
    }

    /// Runs the script over notifications of one slot, one master or one server: `None`
    /// when a call found keys its node does not serve (and so ran nothing).
    async fn run_group(
        &self,
        msgs: &[&Publish],
        accepted_us: u64,
    ) -> Result<Option<Vec<Published>>, BackplaneError> {
        let mut pipe = redis::pipe();
        for chunk in msgs.chunks(SCRIPT_BATCH) {
            pipe.add_command(self.publish_cmd(chunk, accepted_us));
        }
        let replicas = self.inner.settings.sync_replicas;
        if replicas > 0 {
            // Acknowledged only once that many replicas have it: a failover that promotes
            // one of them loses nothing a publisher was told is accepted.
            let wait_ms = self.inner.settings.timeout.as_millis().max(1) as u64;
            pipe.cmd("WAIT").arg(replicas).arg(wait_ms);
        }
        let mut replies: Vec<redis::Value> = self
            .bounded(async {
                let mut conn = self.conn();
                match pipe.query_async(&mut conn).await {
                    // The script is not in this server's cache (a restart or failover since
                    // it was loaded): no call of the pipeline ran, so load it and resend.
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        self.inner
                            .publish
                            .prepare_invoke()
                            .load_async(&mut conn)
                            .await
                            .map_err(publish_error)?;
                        pipe.query_async(&mut conn).await.map_err(publish_error)
                    }
                    other => other.map_err(publish_error),
                }
            })
            .await?;
        if replicas > 0 {
            let acked: u64 = replies
                .pop()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or(0);
            if acked < u64::from(replicas) {
                return Err(unavailable(format!(
                    "{acked} of {replicas} replicas confirmed in time (HUB_REDIS_SYNC_REPLICAS)"
                )));
            }
        }
        let mut out = Vec::with_capacity(msgs.len());
        for reply in replies {
            let redis::Value::Array(reply) = reply else {
                return Err(unavailable("store returned a malformed reply"));
            };
            if let [redis::Value::Int(-1)] = reply.as_slice() {
                return Ok(None);
            }
            for pair in reply.chunks(2) {
                let [redis::Value::Int(fresh), redis::Value::BulkString(id)] = pair else {
                    return Err(unavailable("store returned a malformed reply"));
                };
                let id = std::str::from_utf8(id)
                    .ok()
                    .and_then(|id| id.parse::<Id>().ok())
                    .ok_or_else(|| unavailable("store returned a malformed id"))?;
                out.push(Published {
                    id,
                    duplicate: *fresh == 0,
                });
            }
        }
        if out.len() != msgs.len() {
            return Err(unavailable(
                "the store answered a different number of replies",
            ));
        }
        Ok(Some(out))
    }

    /// Gathers the publishes and small batches that are waiting (up to [`COALESCE`]
    /// notifications) into one round of script calls, so concurrent API requests, gRPC streams
    /// and ingest partitions share the script's per-call cost and one round trip (each job's
    /// notifications stay together and in order). Up to one round per command connection is
    /// in flight; while they all are, new publishes wait and join the next round, so rounds
    /// grow with the load.
    async fn coalesce(self, mut jobs: mpsc::Receiver<Job>) {
        let linger = self.inner.settings.linger;
        let in_flight = Arc::new(tokio::sync::Semaphore::new(self.inner.conns.len()));
        // Dropped with this task (the backplane stopped): the rounds in flight end too.
        let mut rounds = tokio::task::JoinSet::new();
        while let Some(first) = jobs.recv().await {
            let Ok(slot) = in_flight.clone().acquire_owned().await else {
                return;
            };
            while rounds.try_join_next().is_some() {}
            let mut count = first.msgs.len();
            let mut batch: Vec<Job> = Vec::with_capacity(jobs.len() + 1);
            batch.push(first);
            let until = tokio::time::Instant::now() + linger;
            while count < COALESCE {
                let job = match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) if linger.is_zero() => break,
                    Err(_) => match tokio::time::timeout_at(until, jobs.recv()).await {
                        Ok(Some(job)) => job,
                        Ok(None) | Err(_) => break,
                    },
                };
                count += job.msgs.len();
                batch.push(job);
            }
            let this = self.clone();
            rounds.spawn(async move {
                this.round(batch).await;
                drop(slot);
            });
        }
    }

    /// Hands notifications to the coalescer (kept together, in order) and waits for their
    /// round.
    async fn coalesced(&self, msgs: Vec<Publish>) -> Result<Vec<Published>, BackplaneError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.inner
            .jobs
            .send(Job { msgs, done })
            .await
            .map_err(|_| unavailable("the publishing task stopped"))?;
        answer
            .await
            .map_err(|_| unavailable("the publishing task stopped"))?
    }

    /// One coalesced round: publishes the jobs' notifications and answers each job.
    async fn round(&self, batch: Vec<Job>) {
        let mut msgs = Vec::with_capacity(batch.iter().map(|j| j.msgs.len()).sum());
        let mut dones = Vec::with_capacity(batch.len());
        for job in batch {
            dones.push((job.msgs.len(), job.done));
            msgs.extend(job.msgs);
        }
        match self.run_scripts(&msgs).await {
            Ok(published) => {
                let mut published = published.into_iter();
                for (n, done) in dones {
                    let _ = done.send(Ok(published.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                for (_, done) in dones {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }

    /// A command connection (cheap clone of a multiplexed one).
    fn conn(&self) -> Conn {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        if let Some(m) = &self.inner.master {
            let current = m.current.read();
            if let Some(conn) = current.conns.get(i) {
                return conn.clone();
            }
        }
        self.inner.conns[i].clone()
    }

    fn key(&self, kind: &str, user: &str) -> String {
        format!("{}:{kind}:{{{user}}}", self.inner.settings.prefix)
    }

    /// `P:c:{`, what every stream's pub/sub channel name starts with.
    fn channel_prefix(&self) -> &str {
        &self.inner.channel_prefix
    }

    async fn ping(&self) -> Result<(), BackplaneError> {
        self.query::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    /// Bounds a backplane operation by `HUB_REDIS_TIMEOUT`; running out of it is
    /// "unavailable".
    async fn bounded<T>(
        &self,
        f: impl Future<Output = Result<T, BackplaneError>>,
    ) -> Result<T, BackplaneError> {
        tokio::time::timeout(self.inner.settings.timeout, f)
            .await
            .unwrap_or_else(|_| Err(unavailable("timed out")))
    }

    /// Runs one command on a command connection, bounded by `HUB_REDIS_TIMEOUT`.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BackplaneError> {
        self.bounded(async { cmd.query_async(&mut self.conn()).await.map_err(unavailable) })
            .await
    }

    /// Runs one pipeline (keys of one slot) on a command connection, bounded likewise.
    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, BackplaneError> {
        self.bounded(async {
            pipe.query_async(&mut self.conn())
                .await
                .map_err(unavailable)
        })
        .await
    }

    /// Most entries one history read returns: the stream is trimmed to about
    /// `HUB_HISTORY_SIZE` (`MAXLEN ~` may keep up to one macro node more).
    fn read_limit(&self) -> usize {
        self.inner.settings.history_size.saturating_add(256)
    }

    /// Reads a user's history: (epoch, items in order). `None` when there is none.
    async fn read_history(
        &self,
        user: &str,
    ) -> Result<Option<(u64, Vec<Arc<Notification>>)>, BackplaneError> {
        Ok(self
            .read(user, "-")
            .await?
            .map(|read| (read.epoch, to_notifications(user, read.epoch, read.items))))
    }

    /// Reads only what follows `after` (plus where the history starts and ends, to tell a
    /// gap); `None` when `after` is not contiguous with the retained history.
    async fn read_after(
        &self,
        user: &str,
        after: Id,
    ) -> Result<Option<Vec<Arc<Notification>>>, BackplaneError> {
        let from = format!("{}-0", after.seq.saturating_add(1));
        let Some(read) = self.read(user, &from).await? else {
            // No history: nothing was missed by a client positioned before the first.
            return Ok((after == Id::START).then(Vec::new));
        };
        let first_seq = to_notifications(user, read.epoch, read.first)
            .first()
            .map_or(read.last.saturating_add(1), |n| n.id.seq);
        Ok(super::contiguous(after, read.epoch, first_seq, read.last)
            .then(|| to_notifications(user, read.epoch, read.items)))
    }

    /// One atomic read of a user's history through [`READ_SCRIPT`] (a single command, so a
    /// cluster routes it to the user's shard and follows a moved slot): `None` when the user
    /// has no history.
    async fn read(&self, user: &str, from: &str) -> Result<Option<HistoryRead>, BackplaneError> {
        let mut invocation = self.inner.read.key(self.key("m", user));
        invocation
            .key(self.key("h", user))
            .arg(from)
            .arg(self.read_limit());
        let (epoch, last, first, items): (
            Option<String>,
            Option<u64>,
            redis::streams::StreamRangeReply,
            redis::streams::StreamRangeReply,
        ) = self
            .bounded(async {
                let mut conn = self.conn();
                invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        let Some(epoch) = epoch.and_then(|e| u64::from_str_radix(&e, 16).ok()) else {
            return Ok(None);
        };
        Ok(Some(HistoryRead {
            epoch,
            last: last.unwrap_or(0),
            first,
            items,
        }))
    }

    /// Closes the user's local connections for a disconnect request seen on the control
    /// channel, records its revocation, and reports the count to the requester.
    fn on_control(&self, payload: &[u8]) {
        let Some((request, revocation, user)) = parse_control(payload) else {
            tracing::warn!("undecodable control message skipped");
            return;
        };
        if let Some(r) = revocation {
            self.inner.revocations.insert(user, r);
        }
        let closed = self.inner.sink.disconnect(user);
        let reply = format!("{}:dr:{request}", self.inner.settings.prefix);
        let this = self.clone();
        tokio::spawn(async move {
            let done = this
                .bounded(async {
                    let mut conn = this.conn();
                    redis::pipe()
                        .rpush(&reply, closed)
                        .pexpire(&reply, 10_000)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(unavailable)
                })
                .await;
            if let Err(e) = done {
                tracing::warn!(error = %e, "cannot report a disconnect");
            }
        });
    }

    /// Loads every revocation still in force (after a (re)connect of the pub/sub
    /// connection, so none published while it was down is missed).
    async fn load_revocations(&self) -> Result<(), BackplaneError> {
        let now = now_micros() / 1_000_000;
        let found: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.revocations_key())
                    .arg(now.saturating_add(1))
                    .arg("+inf"),
            )
            .await?;
        for member in found {
            if let Some((user, r)) = parse_revocation_member(&member) {
                self.inner.revocations.insert(user, r);
            }
        }
        if !self.inner.cluster {
            self.load_legacy_revocations().await?;
        }
        Ok(())
    }

    /// Revocations stored by versions before the sorted set (one string per user,
    /// `P:r:{u}` = `<issued before> <until>`, expiring by themselves), so an upgrade keeps
    /// them in force. Only on one server, where those versions ran; remove once every
    /// deployment has run a newer version for `HUB_JWT_MAX_LIFETIME`.
    async fn load_legacy_revocations(&self) -> Result<(), BackplaneError> {
        let pattern = format!("{}:r:{{*", self.inner.settings.prefix);
        let prefix_len = pattern.len() - 1;
        let found: Vec<(String, Option<String>)> = self
            .bounded(async {
                let mut conn = self.conn();
                let mut keys: Vec<String> = Vec::new();
                let mut cursor: u64 = 0;
                loop {
                    let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    keys.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
                let mut out = Vec::with_capacity(keys.len());
                for chunk in keys.chunks(500) {
                    let values: Vec<Option<String>> = redis::cmd("MGET")
                        .arg(chunk)
                        .query_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    out.extend(chunk.iter().cloned().zip(values));
                }
                Ok(out)
            })
            .await?;
        for (key, value) in found {
            let user = key
                .get(prefix_len..)
                .and_then(|rest| rest.strip_suffix('}'));
            let revocation = value.and_then(|v| {
                let (before, until) = v.split_once(' ')?;
                Some(Revocation {
                    issued_before: before.parse().ok()?,
                    until: until.parse().ok()?,
                })
            });
            if let (Some(user), Some(r)) = (user, revocation) {
                self.inner.revocations.insert(user, r);
            }
        }
        Ok(())
    }

    /// The sorted set of revocations in force: member `<issued before> <until> <user>`,
    /// scored by `until`. One key for every user, so a node loads them all with one read on
    /// a server or a cluster alike; expired members are removed as new ones are added.
    fn revocations_key(&self) -> String {
        format!("{}:rv", self.inner.settings.prefix)
    }

    /// Marks a stream's local count of `user` as changed for the presence task.
    fn presence_changed(&self, stream: &Arc<str>, user: &Arc<str>) {
        self.inner
            .presence_dirty
            .lock()
            .insert((stream.clone(), user.clone()));
    }

    /// The sorted set of nodes reporting presence, scored by their last heartbeat (ms).
    fn presence_nodes_key(&self) -> String {
        format!("{}:pn", self.inner.settings.prefix)
    }

    /// Keeps this node's part of presence in Redis: every [`PRESENCE_FLUSH`], each user and
    /// channel member whose local connection count changed gets it written (see
    /// [`Self::write_presence`]); a heartbeat in `P:pn` every quarter of the presence timeout
    /// tells readers this node's counts are current; every [`PRESENCE_REFRESH`] (and after
    /// Redis was out of reach) all of them are written again, so their keys (which expire
    /// after twice that) outlive no node that still holds them.
    async fn presence_task(self) {
        let mut tick = tokio::time::interval(PRESENCE_FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeat_every = (self.inner.settings.presence_timeout / 4).max(PRESENCE_FLUSH / 4);
        let mut last_heartbeat: Option<tokio::time::Instant> = None;
        let mut last_refresh = tokio::time::Instant::now();
        let mut failing = false;
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let mut recovered = false;
            if last_heartbeat.is_none_or(|at| now.duration_since(at) >= heartbeat_every) {
                match self.presence_heartbeat().await {
                    Ok(()) => {
                        last_heartbeat = Some(now);
                        // Back after Redis was out of reach (perhaps long enough for this
                        // node's keys to expire, or Redis lost them): write everything again.
                        recovered = std::mem::take(&mut failing);
                    }
                    Err(e) => {
                        failing = true;
                        tracing::warn!(error = %e, "presence heartbeat failed");
                    }
                }
            }
            if recovered || now.duration_since(last_refresh) >= PRESENCE_REFRESH {
                last_refresh = now;
                let all: Vec<Arc<str>> = self.inner.subs.lock().keys().cloned().collect();
                for stream in all {
                    // A user's stream is counted for the user; a channel's per member.
                    let users: Vec<Arc<str>> = match crate::envelope::channel_of(&stream) {
                        Some(_) => self
                            .inner
                            .sink
                            .channel_members(&stream)
                            .into_iter()
                            .map(|(u, _)| u)
                            .collect(),
                        None => vec![stream.clone()],
                    };
                    let mut dirty = self.inner.presence_dirty.lock();
                    dirty.extend(users.into_iter().map(|user| (stream.clone(), user)));
                }
            }
            let dirty: Vec<(Arc<str>, Arc<str>)> =
                self.inner.presence_dirty.lock().drain().collect();
            if dirty.is_empty() {
                continue;
            }
            match self.write_presence(&dirty).await {
                Ok(()) => self
                    .inner
                    .telemetry
                    .presence_reports
                    .inc_by(dirty.len() as u64),
                Err(e) => {
                    tracing::warn!(error = %e, "writing presence failed; retrying");
                    self.inner.presence_dirty.lock().extend(dirty);
                }
            }
        }
    }

    /// This node's heartbeat, and nodes silent for an hour forgotten.
    async fn presence_heartbeat(&self) -> Result<(), BackplaneError> {
        let now_ms = now_micros() / 1000;
        self.query_pipe(
            redis::pipe()
                .cmd("ZADD")
                .arg(self.presence_nodes_key())
                .arg(now_ms)
                .arg(&self.inner.node)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(self.presence_nodes_key())
                .arg("-inf")
                .arg(now_ms.saturating_sub(3_600_000))
                .ignore(),
        )
        .await
    }

    /// Writes this node's current connection count of each (stream, user) pair: a user's
    /// into `P:p:{u}:<node>`, a channel member's into the field `user` of
    /// `P:q:{{c}:<node>` (removed at zero). One pipeline per stream, as a stream's keys live
    /// in its own slot; all in flight at once.
    async fn write_presence(&self, pairs: &[(Arc<str>, Arc<str>)]) -> Result<(), BackplaneError> {
        let ttl_ms = (PRESENCE_REFRESH * 2).as_millis() as u64;
        let mut by_stream: HashMap<&Arc<str>, Vec<&Arc<str>>> = HashMap::new();
        for (stream, user) in pairs {
            by_stream.entry(stream).or_default().push(user);
        }
        let mut writes = Vec::with_capacity(by_stream.len());
        for (stream, users) in by_stream {
            let mut pipe = redis::pipe();
            if crate::envelope::channel_of(stream).is_none() {
                let key = self.presence_key("p", stream, &self.inner.node);
                match self.inner.sink.connections(stream) {
                    0 => pipe.cmd("DEL").arg(&key).ignore(),
                    n => pipe
                        .cmd("SET")
                        .arg(&key)
                        .arg(n)
                        .arg("PX")
                        .arg(ttl_ms)
                        .ignore(),
                };
                writes.push(pipe);
                continue;
            }
            let members: HashMap<Arc<str>, usize> = self
                .inner
                .sink
                .channel_members(stream)
                .into_iter()
                .collect();
            let key = self.presence_key("q", stream, &self.inner.node);
            for user in users {
                match members.get(user) {
                    Some(n) if *n > 0 => pipe.cmd("HSET").arg(&key).arg(&**user).arg(*n).ignore(),
                    _ => pipe.cmd("HDEL").arg(&key).arg(&**user).ignore(),
                };
            }
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
            writes.push(pipe);
        }
        self.run_pipelines(writes).await
    }

    /// A node's presence key of a stream: `P:<kind>:{<stream>}:<node>`, in the stream's
    /// slot, written only by that node, so a node that dies leaves keys that expire.
    fn presence_key(&self, kind: &str, stream: &str, node: &str) -> String {
        format!("{}:{node}", self.key(kind, stream))
    }

    /// The nodes whose presence heartbeat is recent enough, this one left out.
    async fn other_live_nodes(&self) -> Result<Vec<String>, BackplaneError> {
        let since = (now_micros() / 1000)
            .saturating_sub(self.inner.settings.presence_timeout.as_millis() as u64);
        let alive: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.presence_nodes_key())
                    .arg(since)
                    .arg("+inf"),
            )
            .await?;
        Ok(alive
            .into_iter()
            .filter(|node| *node != self.inner.node)
            .collect())
    }

    /// Runs pipelines (each of one slot's keys), up to 256 in flight, within the timeout.
    async fn run_pipelines(&self, pipes: Vec<redis::Pipeline>) -> Result<(), BackplaneError> {
        const IN_FLIGHT: usize = 256;
        let writes = pipes.into_iter().map(|pipe| {
            let mut conn = self.conn();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        let results: Vec<redis::RedisResult<()>> = self
            .bounded(async {
                Ok(futures_util::stream::iter(writes)
                    .buffer_unordered(IN_FLIGHT)
                    .collect()
                    .await)
            })
            .await?;
        results
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(drop)
            .map_err(unavailable)
    }

    /// A connection of its own, for a command that blocks.
    async fn own_connection(&self) -> Result<Conn, BackplaneError> {
        let timeout = self.inner.settings.timeout;
        match &self.inner.client {
            Client::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout));
                let conn = self
                    .single_client(client)
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(unavailable)?;
                Ok(Conn::Once(conn))
            }
            Client::Cluster(client) => tokio::time::timeout(timeout, client.get_async_connection())
                .await
                .map_err(|_| unavailable("timed out connecting to the cluster"))?
                .map(Conn::Cluster)
                .map_err(unavailable),
        }
    }

    /// `P:ctl`, the channel of disconnect requests.
    fn control_channel(&self) -> &str {
        &self.inner.control_channel
    }

    /// Hands a pub/sub message to the sink unless a catch-up read already delivered it.
    fn on_message(&self, channel: &str, payload: &[u8]) {
        if channel == self.control_channel() {
            self.on_control(payload);
            return;
        }
        let Some(user) = self.user_of(channel) else {
            return;
        };
        let Some((id, us, json)) = parse_payload(payload) else {
            tracing::warn!("undecodable pub/sub message skipped");
            return;
        };
        let lag = now_micros().saturating_sub(us) as f64 / 1e6;
        self.inner.telemetry.lag_seconds.set(lag);
        {
            let mut subs = self.inner.subs.lock();
            let Some(state) = subs.get_mut(user) else {
                return;
            };
            if state.catching_up {
                state.held.push(Arc::new(Notification::from_json(
                    user,
                    id,
                    json.to_owned(),
                    us,
                )));
                return;
            }
            if let Some(last) = state.last
                && last.epoch == id.epoch
                && id.seq <= last.seq
            {
                return;
            }
            state.last = Some(id);
        }
        let n = Arc::new(Notification::from_json(user, id, json.to_owned(), us));
        self.inner.sink.deliver(user, &n);
    }

    /// After a reconnect: delivers what each subscribed user missed, or a gap marker, then
    /// the live messages held meanwhile.
    async fn catch_up(&self, users: Vec<(Arc<str>, Option<Id>)>) {
        // Reads that fail are retried for a while: after a failover or a moved slot the first
        // ones may fail until the command connections have learnt the new topology (the
        // users' live messages are held meanwhile). Past it, what was missed is unknown and
        // the clients get `hub.gap`.
        let patience =
            tokio::time::Instant::now() + CATCH_UP_PATIENCE.max(self.inner.settings.timeout * 4);
        for (user, last) in users {
            // Where the node's position is known, only what follows it is read (usually
            // nothing); the whole history only when that position is not contiguous with it.
            let tail = match last {
                Some(l) if l != EMPTY => {
                    match patiently(patience, || self.read_after(&user, l)).await {
                        Ok(Some(items)) => Some(Ok(Some((l.epoch, items)))),
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    }
                }
                _ => None,
            };
            let contiguous = matches!(tail, Some(Ok(_)));
            let history = match tail {
                Some(read) => read,
                None => patiently(patience, || self.read_history(&user)).await,
            };
            let mut deliver = Vec::new();
            {
                let mut subs = self.inner.subs.lock();
                let Some(state) = subs.get_mut(&user) else {
                    continue;
                };
                let held = std::mem::take(&mut state.held);
                state.catching_up = false;
                match history {
                    Err(e) => {
                        // What was missed is unknown: the client must refetch.
                        tracing::warn!(error = %e, "catch-up read failed");
                        deliver.push(Arc::new(Notification::gap_marker(
                            &user,
                            Id { epoch: 0, seq: 0 },
                            "history unavailable after reconnect",
                        )));
                        state.last = None;
                    }
                    Ok(history) => {
                        let (epoch, items) = history.unwrap_or((0, Vec::new()));
                        let lost = match last {
                            _ if contiguous => false,
                            Some(l) if l != EMPTY => {
                                l.epoch != epoch
                                    || items.first().is_some_and(|f| f.id.seq > l.seq + 1)
                                    || items.last().is_none_or(|n| n.id.seq < l.seq)
                            }
                            _ => false,
                        };
                        if lost {
                            // Positioned just before the first retained one: a connection
                            // that already has everything up to there ignores it (the seam
                            // filter), any other is told and takes what follows.
                            let before = items.first().map_or(0, |f| f.id.seq.saturating_sub(1));
                            deliver.push(Arc::new(Notification::gap_marker(
                                &user,
                                Id { epoch, seq: before },
                                "history lost while connected",
                            )));
                            state.last = None;
                        }
                        for n in items {
                            let new = match state.last {
                                Some(l) => l.epoch != n.id.epoch || n.id.seq > l.seq,
                                // After a gap marker, everything retained is new.
                                None => lost,
                            };
                            if new {
                                state.last = Some(n.id);
                                deliver.push(n);
                            }
                        }
                    }
                }
                for n in held {
                    let new = match state.last {
                        Some(l) => l.epoch != n.id.epoch || n.id.seq > l.seq,
                        None => true,
                    };
                    if new {
                        state.last = Some(n.id);
                        deliver.push(n);
                    }
                }
            }
            for n in &deliver {
                self.inner.sink.deliver(&user, n);
            }
        }
    }

    /// Reads where a stream's history stands (see [`head_id`]).
    fn head_cmd(&self, stream: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key("m", stream)).arg("epoch").arg("seq");
        cmd
    }

    /// Records where each user's history stands before subscribing them, so a catch-up
    /// after a later reconnect knows what this node has seen. Read before `SUBSCRIBE`: a
    /// notification published in between then counts as not yet seen (the handshake's own
    /// history read covers resuming clients), never as seen-but-not-delivered.
    async fn record_heads(&self, users: &[Arc<str>]) -> Result<(), BackplaneError> {
        if users.is_empty() {
            return Ok(());
        }
        let heads: Vec<(Option<String>, Option<u64>)> = self
            .bounded(async {
                let mut conn = self.conn();
                if self.inner.cluster {
                    // Users live in different slots: one command each, all in flight at once.
                    let mut reads = Vec::with_capacity(users.len());
                    for user in users {
                        let mut conn = conn.clone();
                        let cmd = self.head_cmd(user);
                        reads.push(async move { cmd.query_async(&mut conn).await });
                    }
                    futures_util::future::try_join_all(reads)
                        .await
                        .map_err(unavailable)
                } else {
                    let mut pipe = redis::pipe();
                    for user in users {
                        pipe.add_command(self.head_cmd(user));
                    }
                    pipe.query_async(&mut conn).await.map_err(unavailable)
                }
            })
            .await?;
        let mut subs = self.inner.subs.lock();
        for (user, head) in users.iter().zip(heads) {
            // No history yet: epoch 0 matches none, so whatever comes is new.
            let head = head_id(head).unwrap_or(EMPTY);
            if let Some(state) = subs.get_mut(user)
                && state.last.is_none()
            {
                state.last = Some(head);
            }
        }
        Ok(())
    }

    async fn pubsub_task(self, client: redis::Client, mut changes: mpsc::Receiver<()>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut first = true;
        let mut switched = self.inner.master.as_ref().map(|m| m.switched.subscribe());
        loop {
            // Seen before the master is read: a switch from here on ends this connection.
            if let Some(s) = &mut switched {
                s.mark_unchanged();
            }
            let client = self.single_client(&client);
            let connected =
                tokio::time::timeout(self.inner.settings.timeout, client.get_async_pubsub()).await;
            let pubsub = match connected {
                Ok(Ok(p)) => p,
                failed => {
                    match failed {
                        Ok(Err(e)) => tracing::warn!(error = %e, "pub/sub connect failed"),
                        _ => tracing::warn!("pub/sub connect timed out"),
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if !first {
                self.inner.telemetry.reconnects.inc();
                tracing::info!("pub/sub reconnected");
            }
            first = false;
            backoff.reset();
            let (mut sink, mut stream) = pubsub.split();
            // Everything subscribed before is gone with the old connection.
            let catch_up: Vec<(Arc<str>, Option<Id>)> = {
                let mut subs = self.inner.subs.lock();
                subs.values_mut().for_each(|s| {
                    s.live = false;
                    s.catching_up = true;
                });
                subs.iter().map(|(u, s)| (u.clone(), s.last)).collect()
            };
            let mut on_redis: HashSet<Arc<str>> = HashSet::new();
            // Control first, then the revocations stored meanwhile: none is missed.
            if self
                .pubsub_command(sink.subscribe(self.control_channel()))
                .await
                .is_err()
            {
                continue;
            }
            if let Err(e) = self.load_revocations().await {
                tracing::warn!(error = %e, "loading revocations failed");
                continue;
            }
            if self.sync(&mut sink, &mut on_redis).await.is_err() {
                continue;
            }
            self.inner.connected.store(true, Ordering::Release);
            // Read while catching up, so messages published meanwhile are not held back; the
            // last-id check drops whichever copy comes second.
            let catch_up_done = self.catch_up(catch_up);
            tokio::pin!(catch_up_done);
            let mut catching_up = true;
            loop {
                tokio::select! {
                    () = &mut catch_up_done, if catching_up => catching_up = false,
                    msg = stream.next() => match msg {
                        Some(msg) => self.on_message(msg.get_channel_name(), msg.get_payload_bytes()),
                        None => break,
                    },
                    changed = changes.recv() => {
                        if changed.is_none() {
                            return;
                        }
                        if self.sync(&mut sink, &mut on_redis).await.is_err() {
                            break;
                        }
                    }
                    () = master_switched(&mut switched) => {
                        tracing::info!("pub/sub moving to the new master");
                        break;
                    }
                }
            }
            self.inner.connected.store(false, Ordering::Release);
            tracing::warn!("pub/sub connection lost; reconnecting");
        }
    }

    /// The pub/sub loop on a Redis Cluster. One cluster connection (RESP3) holds a sharded
    /// subscription (`SSUBSCRIBE`) per local user on the shard that owns the user's slot,
    /// plus the control channel; messages arrive as pushes. The client repairs its node
    /// connections by itself; this loop makes sure nothing is missed meanwhile:
    /// - a lost node connection (a failover, a restart): every subscription is made again,
    ///   each user's live messages are held until its subscription is confirmed, then what it
    ///   missed is read from history (as after a reconnect on one server);
    /// - a slot moved away (resharding): the server ends the slot's subscriptions; each is
    ///   made again on the new owner, then caught up the same way.
    ///
    /// Subscriptions that fail (a shard unreachable) are retried with backoff, and readiness
    /// is off until every one of them is live.
    async fn cluster_pubsub_task(
        self,
        client: ClusterClient,
        mut pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
        mut changes: mpsc::Receiver<()>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let conn = loop {
            match tokio::time::timeout(self.inner.settings.timeout, client.get_async_connection())
                .await
            {
                Ok(Ok(conn)) => break conn,
                Ok(Err(e)) => tracing::warn!(error = %e, "pub/sub connect failed"),
                Err(_) => tracing::warn!("pub/sub connect timed out"),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        };
        backoff.reset();
        let mut state = ShardedSubs {
            conn,
            on_redis: HashSet::new(),
            control: false,
        };
        let mut retry: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
        let mut probe = tokio::time::interval(SHARD_PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shards: HashMap<String, bool> = HashMap::new();
        loop {
            let wake = async {
                match retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                push = pushes.recv() => match push {
                    Some(push) => {
                        if self.on_push(push, &mut state) {
                            retry = Some(tokio::time::Instant::now());
                        }
                    }
                    None => return,
                },
                changed = changes.recv() => {
                    if changed.is_none() {
                        return;
                    }
                    retry = Some(tokio::time::Instant::now());
                }
                _ = probe.tick() => self.probe_shards(&mut shards).await,
                () = wake => {
                    if self.sharded_sync(&mut state).await {
                        backoff.reset();
                        retry = None;
                    } else {
                        retry = Some(tokio::time::Instant::now() + backoff.next_delay());
                    }
                }
            }
        }
    }

    /// Pings every master the cluster names (by address), for the per-shard metrics: up or
    /// not, and a recovery counted when one answers again after failing.
    async fn probe_shards(&self, known: &mut HashMap<String, bool>) {
        let Conn::Cluster(mut conn) = self.conn() else {
            return;
        };
        let telemetry = &self.inner.telemetry;
        let slots = self
            .bounded(async {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<redis::Value>(&mut conn)
                    .await
                    .map_err(unavailable)
            })
            .await;
        let Ok(slots) = slots else {
            return;
        };
        let ranges = slot_ranges(&slots);
        let masters = masters_of(&ranges);
        *self.inner.owners.write() = slot_owners(&ranges, &masters).map(Arc::new);
        for (host, port) in &masters {
            let routing = redis::cluster_routing::RoutingInfo::SingleNode(
                redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                },
            );
            let ping = conn.route_command(redis::cmd("PING"), routing);
            let up = matches!(
                tokio::time::timeout(self.inner.settings.timeout, ping).await,
                Ok(Ok(_))
            );
            let shard = format!("{host}:{port}");
            if up && known.get(&shard) == Some(&false) {
                telemetry
                    .shard_recoveries
                    .with_label_values(&[&shard])
                    .inc();
            }
            telemetry
                .shard_up
                .with_label_values(&[&shard])
                .set(i64::from(up));
            known.insert(shard, up);
        }
        // A master replaced by its replica is no shard any more.
        known.retain(|shard, _| {
            let current = masters.iter().any(|(h, p)| format!("{h}:{p}") == *shard);
            if !current {
                let _ = telemetry.shard_up.remove_label_values(&[shard]);
            }
            current
        });
    }

    /// Handles one push of the cluster pub/sub connection; true when subscriptions must be
    /// made again.
    fn on_push(&self, push: redis::PushInfo, state: &mut ShardedSubs) -> bool {
        fn text(v: Option<&redis::Value>) -> Option<&[u8]> {
            match v {
                Some(redis::Value::BulkString(b)) => Some(b.as_slice()),
                Some(redis::Value::SimpleString(s)) => Some(s.as_bytes()),
                _ => None,
            }
        }
        match push.kind {
            redis::PushKind::SMessage | redis::PushKind::Message => {
                if let (Some(channel), Some(payload)) =
                    (text(push.data.first()), text(push.data.get(1)))
                    && let Ok(channel) = std::str::from_utf8(channel)
                {
                    self.on_message(channel, payload);
                }
                false
            }
            redis::PushKind::Disconnection => {
                // Whatever the lost connection held is gone: make every subscription again.
                tracing::warn!("a cluster pub/sub connection was lost; resubscribing");
                self.inner.telemetry.reconnects.inc();
                self.inner.connected.store(false, Ordering::Release);
                state.control = false;
                state.on_redis.clear();
                let mut subs = self.inner.subs.lock();
                subs.values_mut().for_each(|s| {
                    s.live = false;
                    s.catching_up = true;
                });
                true
            }
            redis::PushKind::SUnsubscribe => {
                // Ours are forgotten before they are sent; any other ended on the server's
                // side (its slot moved): subscribe again on the new owner and catch up.
                let Some(channel) = text(push.data.first()) else {
                    return false;
                };
                let Ok(channel) = std::str::from_utf8(channel) else {
                    return false;
                };
                if channel == self.control_channel() {
                    state.control = false;
                    self.inner.connected.store(false, Ordering::Release);
                    return true;
                }
                let Some(user) = self.user_of(channel) else {
                    return false;
                };
                if !state.on_redis.remove(user) {
                    return false;
                }
                tracing::info!("a sharded subscription moved; resubscribing");
                if let Some(s) = self.inner.subs.lock().get_mut(user) {
                    s.live = false;
                    s.catching_up = true;
                }
                true
            }
            _ => false,
        }
    }

    /// Brings the cluster's sharded subscriptions in line with `subs`: one command per
    /// channel (a sharded subscribe names one slot), all in flight at once. Users whose
    /// subscription is live again catch up from history. False when something failed and
    /// must be retried.
    async fn sharded_sync(&self, state: &mut ShardedSubs) -> bool {
        const IN_FLIGHT: usize = 256;
        if !state.control {
            let subscribed = self
                .pubsub_command(state.conn.ssubscribe(self.control_channel()))
                .await;
            // Subscribed first, then the revocations stored meanwhile: none is missed.
            if subscribed.is_err() || self.load_revocations().await.is_err() {
                return false;
            }
            state.control = true;
        }
        let (add, remove) = self.subscription_changes(&state.on_redis);
        let channel = |u: &Arc<str>| self.user_channel(u);
        for u in &remove {
            state.on_redis.remove(u);
        }
        // An unsubscribe that fails leaves a subscription nobody listens to, which costs
        // nothing but its messages (dropped, no local user); it ends with its connection.
        let mut unsubscribes = Vec::with_capacity(remove.len());
        for u in &remove {
            let mut conn = state.conn.clone();
            let name = channel(u);
            unsubscribes.push(async move {
                let _ = self.pubsub_command(conn.sunsubscribe(name)).await;
            });
        }
        futures_util::stream::iter(unsubscribes)
            .buffer_unordered(IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;
        let fresh: Vec<Arc<str>> = {
            let subs = self.inner.subs.lock();
            add.iter()
                .filter(|u| subs.get(*u).is_some_and(|s| s.last.is_none()))
                .cloned()
                .collect()
        };
        if let Err(e) = self.record_heads(&fresh).await {
            tracing::warn!(error = %e, "reading history heads failed");
            return false;
        }
        let mut subscribes = Vec::with_capacity(add.len());
        for u in add {
            let mut conn = state.conn.clone();
            let name = channel(&u);
            subscribes.push(async move {
                let result = self.pubsub_command(conn.ssubscribe(name)).await;
                (u, result)
            });
        }
        let results: Vec<(Arc<str>, Result<(), ()>)> = futures_util::stream::iter(subscribes)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut complete = true;
        let mut catch_up = Vec::new();
        {
            let mut subs = self.inner.subs.lock();
            for (u, result) in results {
                if result.is_err() {
                    complete = false;
                    continue;
                }
                state.on_redis.insert(u.clone());
                if let Some(s) = subs.get_mut(&u) {
                    s.live = true;
                    if s.catching_up {
                        catch_up.push((u, s.last));
                    }
                }
            }
        }
        self.inner.live.send_modify(|v| *v += 1);
        self.inner.connected.store(complete, Ordering::Release);
        if !catch_up.is_empty() {
            let this = self.clone();
            tokio::spawn(async move { this.catch_up(catch_up).await });
        }
        complete
    }

    /// What to subscribe (users not yet live, or not subscribed in Redis) and unsubscribe
    /// (subscribed in Redis, no local connection left) to bring `on_redis` in line with the
    /// local users. Not yet live includes a user who left and came back before the pub/sub
    /// task saw it leave: still subscribed in Redis, but its new state waits to be marked live.
    fn subscription_changes(&self, on_redis: &HashSet<Arc<str>>) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let subs = self.inner.subs.lock();
        let add = subs
            .iter()
            .filter(|(u, s)| !s.live || !on_redis.contains(*u))
            .map(|(u, _)| u.clone())
            .collect();
        let remove = on_redis
            .iter()
            .filter(|u| !subs.contains_key(*u))
            .cloned()
            .collect();
        (add, remove)
    }

    /// The pub/sub channel of a user.
    fn user_channel(&self, user: &str) -> String {
        format!("{}{user}}}", self.channel_prefix())
    }

    /// The user a pub/sub channel name belongs to.
    fn user_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.channel_prefix())
            .and_then(|rest| rest.strip_suffix('}'))
    }

    /// Brings Redis' subscriptions in line with `subs`, in batches; marks them live.
    async fn sync(
        &self,
        sink: &mut redis::aio::PubSubSink,
        on_redis: &mut HashSet<Arc<str>>,
    ) -> Result<(), ()> {
        const BATCH: usize = 2000;
        let (add, remove) = self.subscription_changes(on_redis);
        let channel = |u: &Arc<str>| self.user_channel(u);
        for batch in remove.chunks(BATCH) {
            let names: Vec<String> = batch.iter().map(channel).collect();
            self.pubsub_command(sink.unsubscribe(&names)).await?;
            for u in batch {
                on_redis.remove(u);
            }
        }
        for batch in add.chunks(BATCH) {
            let fresh: Vec<Arc<str>> = {
                let subs = self.inner.subs.lock();
                batch
                    .iter()
                    .filter(|u| subs.get(*u).is_some_and(|s| s.last.is_none()))
                    .cloned()
                    .collect()
            };
            if let Err(e) = self.record_heads(&fresh).await {
                tracing::warn!(error = %e, "reading history heads failed");
                return Err(());
            }
            let names: Vec<String> = batch.iter().map(channel).collect();
            self.pubsub_command(sink.subscribe(&names)).await?;
            on_redis.extend(batch.iter().cloned());
            {
                let mut subs = self.inner.subs.lock();
                for u in batch {
                    if let Some(s) = subs.get_mut(u) {
                        s.live = true;
                    }
                }
            }
            self.inner.live.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    /// Runs a command on the pub/sub connection within `HUB_REDIS_TIMEOUT`, logging why it
    /// failed (the caller then reconnects).
    async fn pubsub_command(
        &self,
        f: impl Future<Output = redis::RedisResult<()>>,
    ) -> Result<(), ()> {
        match tokio::time::timeout(self.inner.settings.timeout, f).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "pub/sub command failed");
                Err(())
            }
            Err(_) => {
                tracing::warn!("pub/sub command timed out");
                Err(())
            }
        }
    }
}

/// The slot ranges of a `CLUSTER SLOTS` reply, each as (first slot, last slot, master host,
/// master port); malformed entries are skipped.
pub fn slot_ranges(slots: &redis::Value) -> Vec<(u16, u16, String, u16)> {
    let redis::Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to))) =
            (parts.first(), parts.get(1))
        else {
            continue;
        };
        let Some(redis::Value::Array(master)) = parts.get(2) else {
            continue;
        };
        let host = match master.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let (Some(redis::Value::Int(port)), Ok(from), Ok(to)) =
            (master.get(1), u16::try_from(*from), u16::try_from(*to))
        else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        out.push((from, to, host, port));
    }
    out
}

/// The masters of [`slot_ranges`] (host, port), each once.
fn masters_of(ranges: &[(u16, u16, String, u16)]) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for (_, _, host, port) in ranges {
        if !out.iter().any(|(h, p)| h == host && p == port) {
            out.push((host.clone(), *port));
        }
    }
    out
}

/// For each slot, the index in `masters` of the master serving it; `None` unless
/// [`slot_ranges`] assign every slot.
fn slot_owners(ranges: &[(u16, u16, String, u16)], masters: &[(String, u16)]) -> Option<Vec<u16>> {
    let mut owners = vec![u16::MAX; usize::from(SLOTS)];
    for (from, to, host, port) in ranges {
        let owner = masters
            .iter()
            .position(|(h, p)| h == host && p == port)
            .and_then(|i| u16::try_from(i).ok())?;
        owners
            .get_mut(usize::from(*from)..=usize::from(*to))?
            .fill(owner);
    }
    owners.iter().all(|o| *o != u16::MAX).then_some(owners)
}

/// The member an event is remembered by: a 128-bit hash (XXH3) of the route and event id,
/// 32 hex digits, so every member is short whatever the event id (Redis keeps a small sorted
/// set of short members compact).
fn event_member(event: &str) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(event.as_bytes()))
}

/// How often a busy user's key TTLs are refreshed: a hundredth of the TTL, at most a minute.
fn refresh_interval(ttl: Duration) -> Duration {
    (ttl / 100).min(Duration::from_secs(60))
}

/// The last id of a history from its meta hash's `epoch` and `seq` ([`RedisBackplane::head_cmd`]);
/// `None` when there is no history.
fn head_id((epoch, seq): (Option<String>, Option<u64>)) -> Option<Id> {
    let epoch = u64::from_str_radix(&epoch?, 16).ok()?;
    Some(Id {
        epoch,
        seq: seq.unwrap_or(0),
    })
}

/// Stream entries of `stream` → notifications of `epoch`.
fn to_notifications(
    stream: &str,
    epoch: u64,
    entries: redis::streams::StreamRangeReply,
) -> Vec<Arc<Notification>> {
    let mut items = Vec::with_capacity(entries.ids.len());
    for entry in entries.ids {
        let seq = entry
            .id
            .split_once('-')
            .and_then(|(s, _)| s.parse::<u64>().ok());
        let json: Option<String> = entry.get("e");
        let us: Option<u64> = entry.get("u");
        if let (Some(seq), Some(json)) = (seq, json) {
            items.push(Arc::new(Notification::from_json(
                stream,
                Id { epoch, seq },
                json,
                us.unwrap_or(0),
            )));
        }
    }
    items
}

/// `<issued before> <until> <user>` → the user and the revocation.
fn parse_revocation_member(value: &str) -> Option<(&str, Revocation)> {
    let mut parts = value.splitn(3, ' ');
    let issued_before = parts.next()?.parse().ok()?;
    let until = parts.next()?.parse().ok()?;
    let user = parts.next()?;
    Some((
        user,
        Revocation {
            issued_before,
            until,
        },
    ))
}

/// `d <request> <issued before> <until> <user>` → parts (a zero cut-off: no revocation).
fn parse_control(payload: &[u8]) -> Option<(&str, Option<Revocation>, &str)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(5, ' ');
    if parts.next()? != "d" {
        return None;
    }
    let request = parts.next()?;
    let before: u64 = parts.next()?.parse().ok()?;
    let until: u64 = parts.next()?.parse().ok()?;
    let user = parts.next()?;
    let revocation = (before > 0).then_some(Revocation {
        issued_before: before,
        until,
    });
    Some((request, revocation, user))
}

/// `<id> <µs> <json>` → parts.
fn parse_payload(payload: &[u8]) -> Option<(Id, u64, &str)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (id, rest) = text.split_once(' ')?;
    let (us, json) = rest.split_once(' ')?;
    Some((id.parse().ok()?, us.parse().ok()?, json))
}

#[async_trait]
impl Backplane for RedisBackplane {
    async fn publish(&self, msg: Publish) -> Result<Published, BackplaneError> {
        self.coalesced(vec![msg])
            .await?
            .pop()
            .ok_or_else(|| unavailable("the store answered too few replies"))
    }

    async fn publish_batch(&self, msgs: Vec<Publish>) -> Result<Vec<Published>, BackplaneError> {
        // A small batch (an ingest partition or a gRPC stream at a moderate rate) goes the
        // single-publish way, where it may share a script call with concurrent publishes.
        if msgs.len() < SCRIPT_BATCH {
            return self.coalesced(msgs).await;
        }
        self.run_scripts(&msgs).await
    }

    async fn subscribe(&self, stream: &Arc<str>, user: &Arc<str>) -> Result<(), BackplaneError> {
        let mut live = self.inner.live.subscribe();
        {
            let mut subs = self.inner.subs.lock();
            let state = subs.entry(stream.clone()).or_insert(SubState {
                refs: 0,
                live: false,
                last: None,
                catching_up: false,
                held: Vec::new(),
            });
            state.refs += 1;
            self.presence_changed(stream, user);
            if state.live {
                return Ok(());
            }
        }
        let _ = self.inner.changed.try_send(());
        let wait = async {
            loop {
                if self.inner.subs.lock().get(stream).is_some_and(|s| s.live) {
                    return Ok(());
                }
                if live.changed().await.is_err() {
                    return Err(unavailable("pub/sub task stopped"));
                }
            }
        };
        match tokio::time::timeout(self.inner.settings.timeout, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.unsubscribe(stream, user);
                Err(e)
            }
            Err(_) => {
                self.unsubscribe(stream, user);
                Err(unavailable("subscribe timed out"))
            }
        }
    }

    fn unsubscribe(&self, stream: &str, user: &Arc<str>) {
        let mut subs = self.inner.subs.lock();
        let Some(state) = subs.get_mut(stream) else {
            return;
        };
        state.refs = state.refs.saturating_sub(1);
        if state.refs == 0 {
            if let Some((stream, _)) = subs.remove_entry(stream) {
                self.presence_changed(&stream, user);
            }
            drop(subs);
            let _ = self.inner.changed.try_send(());
        } else if let Some((stream, _)) = subs.get_key_value(stream) {
            self.presence_changed(stream, user);
        }
    }

    async fn head(&self, stream: &str) -> Result<Option<Id>, BackplaneError> {
        let read = self.query(&self.head_cmd(stream)).await?;
        let Some(head) = head_id(read) else {
            return Ok(None);
        };
        // Everything up to the head was published before it was read; its pub/sub messages
        // may still be on their way to this node. Wait (briefly) until the node has them.
        let deadline = tokio::time::Instant::now() + self.inner.settings.timeout.min(HEAD_WAIT);
        loop {
            let handed = match self.inner.subs.lock().get(stream) {
                None => true,
                Some(state) => {
                    !state.catching_up
                        && state
                            .last
                            .is_some_and(|l| l.epoch == head.epoch && l.seq >= head.seq)
                }
            };
            // Past the wait, what is missing was published before this node's subscription
            // went live (between its head read and `SUBSCRIBE`), so it never comes by pub/sub
            // and no connection here is owed it.
            if handed || tokio::time::Instant::now() >= deadline {
                return Ok(Some(head));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn channel_presence(&self, stream: &str) -> Result<ChannelPresence, BackplaneError> {
        let local = self.inner.sink.channel_members(stream);
        let others = self.other_live_nodes().await?;
        let remote: Vec<HashMap<String, usize>> = if others.is_empty() {
            Vec::new()
        } else {
            // Every node's hash of the channel lives in the channel's slot: one pipeline.
            let mut pipe = redis::pipe();
            for node in &others {
                pipe.cmd("HGETALL")
                    .arg(self.presence_key("q", stream, node));
            }
            self.query_pipe(&pipe).await?
        };
        Ok(ChannelPresence::from_counts(
            local.iter().map(|(u, n)| (&**u, *n)).chain(
                remote
                    .iter()
                    .flat_map(|counts| counts.iter().map(|(u, n)| (u.as_str(), *n))),
            ),
        ))
    }

    async fn history_after(&self, user: &str, after: Id) -> Result<Replay, BackplaneError> {
        if let Some(items) = self.read_after(user, after).await? {
            return Ok(Replay { gap: false, items });
        }
        let items = self
            .read_history(user)
            .await?
            .map(|(_, items)| items)
            .unwrap_or_default();
        Ok(Replay { gap: true, items })
    }

    async fn ready(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire) && self.ping().await.is_ok()
    }

    async fn disconnect(
        &self,
        user: &str,
        revoke: Option<Revocation>,
    ) -> Result<usize, BackplaneError> {
        let request = format!("{:016x}", rand::random::<u64>());
        let (before, until) = revoke.map_or((0, 0), |r| (r.issued_before, r.until));
        let message = format!("d {request} {before} {until} {user}");
        let reply = format!("{}:dr:{request}", self.inner.settings.prefix);
        // Stored before it is announced, so a node that (re)loads the revocations between
        // the two misses neither.
        if let Some(r) = revoke {
            let key = self.revocations_key();
            let now = now_micros() / 1_000_000;
            self.query_pipe::<()>(
                redis::pipe()
                    .cmd("ZADD")
                    .arg(&key)
                    .arg(r.until)
                    .arg(format!("{} {} {user}", r.issued_before, r.until))
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore(),
            )
            .await?;
        }
        let publish = if self.inner.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let receivers: usize = self
            .query(
                redis::cmd(publish)
                    .arg(self.control_channel())
                    .arg(&message),
            )
            .await?;
        // Every subscribed node (each holds one pub/sub connection) answers with its count;
        // wait for all of them, within the command deadline.
        let wait = self.inner.settings.timeout.mul_f64(0.8);
        let deadline = tokio::time::Instant::now() + wait;
        let mut closed = 0usize;
        // A blocking pop must not stall the shared, pipelined connections: a connection of
        // its own for this rare request.
        let mut conn = self.own_connection().await?;
        for _ in 0..receivers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                tracing::warn!("not every node reported its disconnect count in time");
                break;
            }
            let popped: Option<(String, usize)> = redis::cmd("BLPOP")
                .arg(&reply)
                .arg(left.as_secs_f64().max(0.01))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            match popped {
                Some((_, n)) => closed = closed.saturating_add(n),
                None => {
                    tracing::warn!("not every node reported its disconnect count in time");
                    break;
                }
            }
        }
        Ok(closed)
    }

    fn revoked_before(&self, user: &str) -> Option<u64> {
        self.inner.revocations.before(user)
    }

    async fn presence(&self, user: &str) -> Result<usize, BackplaneError> {
        let local = self.inner.sink.connections(user);
        let others = self.other_live_nodes().await?;
        if others.is_empty() {
            return Ok(local);
        }
        // Every node's key of the user lives in the user's slot: one MGET.
        let keys: Vec<String> = others
            .iter()
            .map(|node| self.presence_key("p", user, node))
            .collect();
        let counts: Vec<Option<usize>> = self.query(redis::cmd("MGET").arg(&keys)).await?;
        Ok(counts
            .into_iter()
            .flatten()
            .fold(local, usize::saturating_add))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_garbage_does_not() {
        let (id, us, json) = parse_payload(b"ab-3 1700 {\"id\":\"ab-3\"}").unwrap();
        assert_eq!(
            id,
            Id {
                epoch: 0xab,
                seq: 3
            }
        );
        assert_eq!(us, 1700);
        assert_eq!(json, "{\"id\":\"ab-3\"}");
        assert!(parse_payload(b"nonsense").is_none());
        assert!(parse_payload(&[0xff, 0x20, 0x31]).is_none());
    }

    #[test]
    fn user_slots_are_the_clusters_key_slots() {
        // `CLUSTER KEYSLOT` of these keys on a real cluster.
        assert_eq!(user_slot("a"), 15495);
        assert_eq!(user_slot("b"), 3300);
        assert_eq!(user_slot("h"), 11694);
        // A channel's keys (`P:m:{{news}`): the tag is `{news`, the channel's stream name.
        assert_eq!(user_slot(&crate::envelope::channel_stream("news")), 9552);
        assert_eq!(
            user_slot(&crate::envelope::channel_stream("order:o-1")),
            10702
        );
    }

    #[test]
    fn slot_owners_need_every_slot_assigned() {
        use redis::Value::{Array, BulkString, Int};
        let node = |port: i64| Array(vec![BulkString(b"h".to_vec()), Int(port)]);
        let full = slot_ranges(&Array(vec![
            Array(vec![Int(0), Int(8000), node(1)]),
            Array(vec![Int(8001), Int(16383), node(2)]),
        ]));
        let masters = masters_of(&full);
        let owners = slot_owners(&full, &masters).expect("every slot assigned");
        assert_eq!(
            (owners[0], owners[8000], owners[8001], owners[16383]),
            (0, 0, 1, 1)
        );
        let partial = slot_ranges(&Array(vec![Array(vec![Int(0), Int(8000), node(1)])]));
        assert!(slot_owners(&partial, &masters_of(&partial)).is_none());
        let out_of_range = slot_ranges(&Array(vec![Array(vec![Int(0), Int(20000), node(1)])]));
        assert!(slot_owners(&out_of_range, &masters_of(&out_of_range)).is_none());
    }

    #[test]
    fn masters_are_read_from_cluster_slots_once_each() {
        use redis::Value::{Array, BulkString, Int};
        let node = |port: i64| Array(vec![BulkString(b"10.0.0.1".to_vec()), Int(port)]);
        let slots = Array(vec![
            Array(vec![Int(0), Int(5460), node(7001), node(7004)]),
            Array(vec![Int(5461), Int(10922), node(7002)]),
            Array(vec![Int(10923), Int(10999), node(7001)]),
            Array(vec![Int(11000), Int(16383)]),
        ]);
        assert_eq!(
            masters_of(&slot_ranges(&slots)),
            [("10.0.0.1".to_owned(), 7001), ("10.0.0.1".to_owned(), 7002)]
        );
        assert!(masters_of(&slot_ranges(&Int(3))).is_empty());
    }

    #[test]
    fn control_messages_parse_and_keep_spaces_in_the_user() {
        let (req, rev, user) = parse_control(b"d ab12 0 0 some user").unwrap();
        assert_eq!((req, rev, user), ("ab12", None, "some user"));
        let (_, rev, _) = parse_control(b"d ab12 100 200 u").unwrap();
        assert_eq!(
            rev,
            Some(Revocation {
                issued_before: 100,
                until: 200
            })
        );
        assert!(parse_control(b"x ab12 0 0 u").is_none());
        assert!(parse_control(b"d ab12 -1 0 u").is_none());
        assert_eq!(
            parse_revocation_member("5 9 some user"),
            Some((
                "some user",
                Revocation {
                    issued_before: 5,
                    until: 9
                }
            ))
        );
        assert!(parse_revocation_member("5 9").is_none());
    }
}
