//! Backplane scenarios, written once against the trait and run for each implementation.

use std::sync::Arc;
use std::time::Duration;

use hub::backplane::memory::MemoryBackplane;
use hub::backplane::redis::{RedisBackplane, RedisEndpoint, RedisSettings, RedisTelemetry};
use hub::backplane::{Backplane, Dedupe, Publish, Sink};
use hub::envelope::{Id, Notification};
use parking_lot::Mutex;
use serde_json::value::RawValue;

use crate::helpers::redis::{
    RedisCluster, RedisServer, redis_cluster_urls, redis_prefix, redis_url,
};

/// Records what the backplane hands to the node.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<(String, Id, String)>>,
    disconnects: Mutex<Vec<String>>,
}

impl Sink for Recorder {
    fn deliver(&self, user: &str, n: &Arc<Notification>) {
        self.got
            .lock()
            .push((user.to_owned(), n.id, n.json.as_str().to_owned()));
    }

    /// Every user counts as having one connection here.
    fn disconnect(&self, user: &str) -> usize {
        self.disconnects.lock().push(user.to_owned());
        1
    }
}

fn msg(user: &str, n: u32, key: Option<&str>) -> Publish {
    Publish {
        user: user.to_owned(),
        kind: "t".to_owned(),
        data: RawValue::from_string(format!("{{\"n\":{n}}}")).expect("json"),
        dedupe: Dedupe::key(key.map(str::to_owned)),
    }
}

/// Deliveries recorded for one user.
fn of(rec: &Recorder, user: &str) -> Vec<(String, Id, String)> {
    rec.got
        .lock()
        .iter()
        .filter(|(u, _, _)| u == user)
        .cloned()
        .collect()
}

/// Waits until the recorder holds `n` deliveries for `user` (pub/sub is asynchronous).
async fn delivered(rec: &Recorder, user: &str, n: usize) -> Vec<(String, Id, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = of(rec, user);
        if got.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} delivered",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn ids_increase_and_reach_subscribers(bp: &dyn Backplane, rec: &Recorder) {
    bp.subscribe(&Arc::from("a"), &Arc::from("a"))
        .await
        .expect("subscribe");
    // Not subscribed here: published and stored, but not routed to this node.
    bp.publish(msg("elsewhere", 0, None))
        .await
        .expect("publish");
    let mut last: Option<Id> = None;
    for n in 0..20 {
        let p = bp.publish(msg("a", n, None)).await.expect("publish");
        assert!(!p.duplicate);
        if let Some(l) = last {
            assert_eq!(p.id.epoch, l.epoch);
            assert!(p.id.seq > l.seq);
        }
        last = Some(p.id);
    }
    let got = delivered(rec, "a", 20).await;
    assert_eq!(got.len(), 20);
    assert!(got.windows(2).all(|w| w[0].1.seq < w[1].1.seq));
    // The stored bytes are the envelope with the id that was returned.
    let v: serde_json::Value = serde_json::from_str(&got[19].2).expect("envelope");
    assert_eq!(v["id"], got[19].1.to_string());
    assert_eq!(v["data"]["n"], 19);
}

async fn history_after_returns_the_rest_in_order(bp: &dyn Backplane) {
    let ids: Vec<Id> = {
        let mut v = Vec::new();
        for n in 0..8 {
            v.push(bp.publish(msg("h", n, None)).await.expect("publish").id);
        }
        v
    };
    let r = bp.history_after("h", ids[4]).await.expect("history");
    assert!(!r.gap);
    assert_eq!(
        r.items.iter().map(|n| n.id).collect::<Vec<_>>(),
        ids[5..].to_vec()
    );
    let r = bp.history_after("h", ids[7]).await.expect("history");
    assert!(!r.gap && r.items.is_empty());
}

async fn trimmed_or_foreign_resume_points_are_gaps(bp: &dyn Backplane, size: usize) {
    let first = bp.publish(msg("g", 0, None)).await.expect("publish").id;
    for n in 1..(size as u32 + 5) {
        bp.publish(msg("g", n, None)).await.expect("publish");
    }
    let r = bp.history_after("g", first).await.expect("history");
    assert!(r.gap, "trimmed resume point must be a gap");
    assert_eq!(r.items.len(), size, "a gap still replays what is retained");
    let foreign = Id {
        epoch: first.epoch ^ 1,
        seq: 3,
    };
    assert!(bp.history_after("g", foreign).await.expect("history").gap);
    let future = Id {
        epoch: first.epoch,
        seq: 10_000,
    };
    assert!(bp.history_after("g", future).await.expect("history").gap);
    assert!(
        bp.history_after("nobody", first)
            .await
            .expect("history")
            .gap
    );
}

async fn idempotency_keys_publish_once(bp: &dyn Backplane, rec: &Recorder) {
    bp.subscribe(&Arc::from("i"), &Arc::from("i"))
        .await
        .expect("subscribe");
    let before = of(rec, "i").len();
    let a = bp.publish(msg("i", 1, Some("k1"))).await.expect("publish");
    let b = bp.publish(msg("i", 2, Some("k1"))).await.expect("publish");
    assert_eq!(a.id, b.id);
    assert!(b.duplicate);
    // Keys are per user.
    let c = bp.publish(msg("j", 3, Some("k1"))).await.expect("publish");
    assert!(!c.duplicate);
    // Nothing arrives for the repeat: the next delivery for "i" is the marker.
    let marker = bp.publish(msg("i", 4, None)).await.expect("publish");
    let got = delivered(rec, "i", before + 2).await;
    assert_eq!(got[before].1, a.id);
    assert_eq!(got[before + 1].1, marker.id);
}

fn event(user: &str, n: u32, event: &str) -> Publish {
    Publish {
        dedupe: Some(Dedupe::Event(event.to_owned())),
        ..msg(user, n, None)
    }
}

/// Ingested events are recognized within the user's window (8 here), per user, and apart
/// from API keys of the same text; beyond the window a repeat is published again (the
/// documented limit).
async fn events_are_recognized_within_the_window(bp: &dyn Backplane, rec: &Recorder) {
    bp.subscribe(&Arc::from("ev"), &Arc::from("ev"))
        .await
        .expect("subscribe");
    let before = of(rec, "ev").len();
    let first = bp
        .publish(event("ev", 0, "route:e0"))
        .await
        .expect("publish");
    let again = bp
        .publish(event("ev", 0, "route:e0"))
        .await
        .expect("publish");
    assert!(again.duplicate && again.id == first.id);
    assert!(
        !bp.publish(event("other", 0, "route:e0"))
            .await
            .expect("p")
            .duplicate
    );
    assert!(
        !bp.publish(msg("ev", 1, Some("route:e0")))
            .await
            .expect("p")
            .duplicate
    );
    // Seven more events: e0 is still among the last eight.
    for n in 1..8 {
        bp.publish(event("ev", n, &format!("route:e{n}")))
            .await
            .expect("publish");
    }
    assert!(
        bp.publish(event("ev", 0, "route:e0"))
            .await
            .expect("p")
            .duplicate
    );
    // Many more: e0 has left the window.
    for n in 8..100 {
        bp.publish(event("ev", n, &format!("route:e{n}")))
            .await
            .expect("publish");
    }
    assert!(
        bp.publish(event("ev", 99, "route:e99"))
            .await
            .expect("p")
            .duplicate
    );
    let late = bp
        .publish(event("ev", 0, "route:e0"))
        .await
        .expect("publish");
    assert!(
        !late.duplicate,
        "beyond the window a repeat is published again"
    );
    delivered(rec, "ev", before + 1 + 1 + 99 + 1).await;
}

async fn run_scenarios(bp: &dyn Backplane, rec: &Recorder, size: usize) {
    ids_increase_and_reach_subscribers(bp, rec).await;
    history_after_returns_the_rest_in_order(bp).await;
    trimmed_or_foreign_resume_points_are_gaps(bp, size).await;
    idempotency_keys_publish_once(bp, rec).await;
    assert!(bp.ready().await);
}

#[tokio::test]
async fn memory_backplane_scenarios() {
    let size = 10;
    let rec = Arc::new(Recorder::default());
    let bp = MemoryBackplane::new(rec.clone(), size, Duration::from_secs(3600))
        .with_dedupe(Duration::from_secs(600), 8);
    run_scenarios(&bp, &rec, size).await;
    events_are_recognized_within_the_window(&bp, &rec).await;
}

#[tokio::test]
async fn redis_backplane_scenarios() {
    let rec = Arc::new(Recorder::default());
    let (bp, _task) = redis_backplane(rec.clone(), 10).await;
    redis_scenarios(&bp, &rec, 10).await;
}

#[tokio::test]
async fn redis_cluster_backplane_scenarios() {
    let rec = Arc::new(Recorder::default());
    let endpoint =
        RedisEndpoint::Cluster(redis_cluster_urls().split(',').map(str::to_owned).collect());
    let (bp, _task) = redis_backplane_on(endpoint, rec.clone(), 10, &redis_prefix()).await;
    redis_scenarios(&bp, &rec, 10).await;
    // A batch naming users of every shard, interleaved: one script call per slot, each
    // user's items in order, the answers in the batch's order.
    let users: Vec<String> = (0..30).map(|i| format!("spread-{i}")).collect();
    for u in &users {
        let u: Arc<str> = Arc::from(u.as_str());
        bp.subscribe(&u, &u).await.expect("subscribe");
    }
    let batch: Vec<Publish> = (0..3)
        .flat_map(|n| users.iter().map(move |u| msg(u, n, None)))
        .collect();
    let published = bp.publish_batch(batch).await.expect("batch");
    for (k, u) in users.iter().enumerate() {
        let ids: Vec<Id> = (0..3).map(|n| published[n * users.len() + k].id).collect();
        assert!(
            ids.windows(2)
                .all(|w| w[0].epoch == w[1].epoch && w[0].seq + 1 == w[1].seq),
            "{u}: {ids:?}"
        );
        let got = delivered(&rec, u, 3).await;
        let got_ids: Vec<Id> = got.iter().map(|(_, id, _)| *id).collect();
        assert_eq!(got_ids, ids, "{u}: delivered in order, once");
    }
}

#[tokio::test]
async fn on_a_cluster_a_publish_right_after_its_slot_moved_is_accepted_once() {
    let cluster = RedisCluster::start().await;
    let rec = Arc::new(Recorder::default());
    let endpoint = RedisEndpoint::Cluster(cluster.urls().split(',').map(str::to_owned).collect());
    let (bp, _task) = redis_backplane_on(endpoint, rec.clone(), 100, &redis_prefix()).await;
    let users: Vec<String> = (0..12).map(|i| format!("mover-{i}")).collect();
    for u in &users {
        let u: Arc<str> = Arc::from(u.as_str());
        bp.subscribe(&u, &u).await.expect("subscribe");
    }
    let batch = |n: u32| -> Vec<Publish> { users.iter().map(|u| msg(u, n, None)).collect() };
    // Wait until the node knows which master serves which slot (its first probe), so the
    // batch goes out as one call per master.
    let deadline = test_support::wait::Deadline::after(test_support::STEP);
    while !bp.knows_slot_owners() {
        deadline.retry(|| "no slot map").await;
    }
    let first = bp
        .publish_batch(batch(0))
        .await
        .expect("batch before the move");
    // Move the first user's slot; the node's slot map is now stale for it, so the call for
    // that master finds a key it does not serve, runs nothing, and goes slot by slot.
    let slot = cluster.slot_of(&format!("{{{}}}", users[0]));
    let from = cluster.master_of(slot);
    cluster.move_slot(slot, cluster.other_master(from));
    let second = bp
        .publish_batch(batch(1))
        .await
        .expect("batch after the move");
    for (k, u) in users.iter().enumerate() {
        assert_eq!(second[k].id.epoch, first[k].id.epoch, "{u}");
        assert_eq!(
            second[k].id.seq,
            first[k].id.seq + 1,
            "{u}: the next id, once"
        );
        let got: Vec<Id> = delivered(&rec, u, 2)
            .await
            .iter()
            .map(|(_, id, _)| *id)
            .collect();
        assert_eq!(
            got,
            [first[k].id, second[k].id],
            "{u}: each delivered once, in order"
        );
    }
}

/// The Redis backplane's behaviour on one server or a cluster alike.
async fn redis_scenarios(bp: &RedisBackplane, rec: &Recorder, size: usize) {
    // Redis trims approximately (MAXLEN ~), in whole nodes of 100 entries: with a size of 10
    // it may keep more than 10, so the scenario measures what it kept.
    let bp = bp.clone();
    ids_increase_and_reach_subscribers(&bp, rec).await;
    history_after_returns_the_rest_in_order(&bp).await;
    let first = bp.publish(msg("g", 0, None)).await.expect("publish").id;
    for n in 1..250 {
        bp.publish(msg("g", n, None)).await.expect("publish");
    }
    let r = bp.history_after("g", first).await.expect("history");
    assert!(r.gap, "trimmed resume point must be a gap");
    assert!(
        r.items.len() >= size && r.items.len() < 250,
        "kept {}",
        r.items.len()
    );
    assert!(r.items.windows(2).all(|w| w[0].id.seq + 1 == w[1].id.seq));
    assert!(
        bp.history_after(
            "g",
            Id {
                epoch: first.epoch ^ 1,
                seq: 3
            }
        )
        .await
        .expect("h")
        .gap
    );
    assert!(
        bp.history_after("nobody", first)
            .await
            .expect("history")
            .gap
    );
    idempotency_keys_publish_once(&bp, rec).await;
    events_are_recognized_within_the_window(&bp, rec).await;
    assert!(bp.ready().await);
}

#[tokio::test]
async fn redis_dedupe_memory_follows_users_not_events() {
    let rec = Arc::new(Recorder::default());
    let prefix = redis_prefix();
    let (bp, _task) = redis_backplane_with(rec.clone(), 10, &prefix).await;
    // 1 000 ingested events for each of three users: no key per event, and each user's
    // window holds about 8 (trimmed every 32 sequence numbers).
    let users = ["m1", "m2", "m3"];
    for n in 0..1000u32 {
        let batch: Vec<Publish> = users
            .iter()
            .map(|u| event(u, n, &format!("route:{u}-{n}")))
            .collect();
        bp.publish_batch(batch).await.expect("publish");
    }
    let mut conn = redis::Client::open(redis_url())
        .and_then(|c| c.get_connection())
        .expect("redis");
    // The users' keys (the node's presence heartbeat `P:pn` is not a user's).
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*{{*"))
        .query(&mut conn)
        .expect("KEYS");
    assert_eq!(keys.len(), 9, "meta, history and window per user: {keys:?}");
    for u in users {
        let window: usize = redis::cmd("ZCARD")
            .arg(format!("{prefix}:e:{{{u}}}"))
            .query(&mut conn)
            .expect("ZCARD");
        assert!((8..=8 + 32).contains(&window), "{u}: {window} remembered");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}:e:{{{u}}}"))
            .query(&mut conn)
            .expect("PTTL");
        assert!(ttl > 0, "the window expires with the history");
    }
    // An API key lives in its own key with the idempotency TTL.
    bp.publish(msg("m1", 0, Some("api-key")))
        .await
        .expect("publish");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}:i:{{m1}}:api-key"))
        .query(&mut conn)
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");
}

async fn redis_backplane(
    sink: Arc<Recorder>,
    size: usize,
) -> (RedisBackplane, tokio::task::JoinHandle<()>) {
    redis_backplane_with(sink, size, &redis_prefix()).await
}

async fn redis_backplane_with(
    sink: Arc<Recorder>,
    size: usize,
    prefix: &str,
) -> (RedisBackplane, tokio::task::JoinHandle<()>) {
    redis_backplane_on(RedisEndpoint::Single(redis_url()), sink, size, prefix).await
}

async fn redis_backplane_on(
    endpoint: RedisEndpoint,
    sink: Arc<Recorder>,
    size: usize,
    prefix: &str,
) -> (RedisBackplane, tokio::task::JoinHandle<()>) {
    connect_with(test_settings(endpoint, size, prefix), sink).await
}

fn test_settings(endpoint: RedisEndpoint, size: usize, prefix: &str) -> RedisSettings {
    RedisSettings {
        endpoint,
        sync_replicas: 0,
        presence_timeout: Duration::from_secs(20),
        ca_file: None,
        prefix: prefix.to_owned(),
        pool_size: 4,
        linger: Duration::ZERO,
        timeout: Duration::from_secs(2),
        history_size: size,
        history_ttl: Duration::from_secs(600),
        idempotency_ttl: Duration::from_secs(600),
        event_window: 8,
    }
}

async fn connect_with(
    settings: RedisSettings,
    sink: Arc<Recorder>,
) -> (RedisBackplane, tokio::task::JoinHandle<()>) {
    RedisBackplane::connect(
        settings,
        sink,
        RedisTelemetry {
            reconnects: prometheus::IntCounter::new("r", "r").expect("counter"),
            lag_seconds: prometheus::Gauge::new("l", "l").expect("gauge"),
            shard_up: prometheus::IntGaugeVec::new(prometheus::Opts::new("u", "u"), &["shard"])
                .expect("gauge"),
            shard_recoveries: prometheus::IntCounterVec::new(
                prometheus::Opts::new("s", "s"),
                &["shard"],
            )
            .expect("counter"),
            presence_reports: prometheus::IntCounter::new("p", "p").expect("counter"),
        },
    )
    .await
    .expect("Redis reachable (make test starts it and the cluster; HUB_TEST_REDIS_URL and HUB_TEST_REDIS_CLUSTER_URLS override the URLs)")
}

/// Script calls a server has run (`INFO commandstats`).
fn evalsha_calls(server: &RedisServer) -> u64 {
    let info: String = server
        .cmd(&["INFO", "commandstats"])
        .ok()
        .and_then(|v| redis::from_redis_value(v).ok())
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a call count"))
}

/// Single publishes arriving together share script calls (one round per lingering window
/// instead of a call each), and each still gets its own id: per user one epoch, sequence
/// numbers without holes, every notification delivered once in id order.
#[tokio::test]
async fn concurrent_single_publishes_share_script_calls_and_each_gets_its_own_id() {
    let server = RedisServer::start().await;
    let rec = Arc::new(Recorder::default());
    let mut settings = test_settings(RedisEndpoint::Single(server.url()), 100, &redis_prefix());
    settings.linger = Duration::from_millis(50);
    let (bp, task) = connect_with(settings, rec.clone()).await;
    let users: Vec<String> = (0..20).map(|u| format!("co{u}")).collect();
    for u in &users {
        let u: Arc<str> = Arc::from(u.as_str());
        bp.subscribe(&u, &u).await.expect("subscribe");
    }
    // The first call loads the script (a refused call and a repeat): not counted below.
    bp.publish(msg("co-warm", 0, None)).await.expect("publish");
    let before = evalsha_calls(&server);
    let publishes = users
        .iter()
        .flat_map(|u| (0..3).map(move |n| (u.as_str(), n)))
        .map(|(u, n)| {
            let bp = bp.clone();
            async move { (u, bp.publish(msg(u, n, None)).await.expect("publish").id) }
        });
    // Small batches (a gRPC stream's or an ingest partition's) join the same round, each in
    // its items' order.
    let batches = (0..4).map(|b| {
        let bp = bp.clone();
        async move {
            let items = (0..5).map(|n| msg("co-batch", b * 10 + n, None)).collect();
            bp.publish_batch(items).await.expect("publish batch")
        }
    });
    let (ids, batches) = tokio::join!(
        futures_util::future::join_all(publishes),
        futures_util::future::join_all(batches)
    );
    let calls = evalsha_calls(&server) - before;
    for batch in &batches {
        assert!(
            batch.windows(2).all(|w| w[0].id.seq < w[1].id.seq),
            "a batch's ids follow its items' order: {batch:?}"
        );
    }
    // 80 notifications in one lingering window: one round, two calls of at most 64 (a queue
    // per connection, or batches apart, would have made a call per connection or batch).
    assert!(
        (1..=2).contains(&calls),
        "{calls} script calls for 60 publishes and 4 batches made together"
    );
    for u in &users {
        let mut mine: Vec<Id> = ids
            .iter()
            .filter(|(x, _)| x == u)
            .map(|(_, id)| *id)
            .collect();
        mine.sort_by_key(|id| id.seq);
        assert_eq!(
            mine.iter().map(|id| id.seq).collect::<Vec<_>>(),
            (1..=3).collect::<Vec<u64>>(),
            "{u}'s sequence numbers"
        );
        assert!(mine.iter().all(|id| id.epoch == mine[0].epoch));
        let got: Vec<Id> = delivered(&rec, u, 3).await.iter().map(|g| g.1).collect();
        assert_eq!(got, mine, "{u} got each notification once, in id order");
    }
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn memory_history_expires_after_ttl_and_resume_becomes_a_gap() {
    let rec = Arc::new(Recorder::default());
    let bp = MemoryBackplane::new(rec.clone(), 10, Duration::from_secs(60));
    let id = bp
        .publish(msg("t", 1, Some("once")))
        .await
        .expect("publish")
        .id;
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(!bp.history_after("t", id).await.expect("history").gap);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(bp.sweep(), 1);
    assert!(bp.history_after("t", id).await.expect("history").gap);
    // The idempotency key expired with the history.
    assert!(
        !bp.publish(msg("t", 2, Some("once")))
            .await
            .expect("publish")
            .duplicate
    );
}
