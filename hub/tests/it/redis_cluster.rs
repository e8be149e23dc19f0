//! Hub nodes on a Redis Cluster (`HUB_REDIS_CLUSTER_URLS`): per-user keys and sharded pub/sub
//! spread over the shards, and what clients see when a master is killed and its replica
//! promoted, or when a busy user's slot moves to another master mid-stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use test_support::STEP;
use test_support::wait::Deadline;
use tokio::task::JoinHandle;

use crate::cluster::{
    END, NOTE, Progress, Seen, assert_no_problems, check_exactly, follow, wait_until,
};
use crate::helpers::app::{Credentials, TestApp, wait_status};
use crate::helpers::clients::{Conn, Kind};
use crate::helpers::processes::HubProcess;
use crate::helpers::redis::{RedisCluster, redis_cluster_urls, redis_prefix};

/// Settings of a node on the cluster at `urls`.
fn cluster_env<'a>(
    urls: &'a str,
    prefix: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("HUB_REDIS_CLUSTER_URLS", urls),
        ("HUB_REDIS_PREFIX", prefix),
        ("HUB_DRAIN_WINDOW", "100ms"),
        ("HUB_HISTORY_SIZE", "1000"),
        ("HUB_LOG", "warn"),
    ];
    env.extend_from_slice(extra);
    env
}

/// Settings for the failure tests: an outage is noticed fast, a publish is acknowledged only
/// once the master's replica has it (so a promoted replica lacks nothing acknowledged), and
/// clients hear pings while nothing is published (they give up after 10 s of silence, and a
/// failover on a busy machine can take that long).
pub(crate) const FAILOVER_ENV: [(&str, &str); 3] = [
    ("HUB_REDIS_TIMEOUT", "500ms"),
    ("HUB_REDIS_SYNC_REPLICAS", "1"),
    ("HUB_PING_INTERVAL", "1s"),
];

/// Publishes `data` for `user` until the hub accepts it (a 503 while a shard fails over or
/// a slot moves is retried with the same idempotency key, so nothing is published twice).
async fn publish_until_accepted(
    app: &TestApp,
    user: &str,
    kind: &str,
    data: Value,
    key: &str,
) -> String {
    let body = json!({"user_id": user, "type": kind, "data": data, "idempotency_key": key});
    let deadline = Deadline::after(STEP * 3);
    loop {
        let (status, reply) = app.publish_raw(&body).await;
        if status == 200 {
            return reply["id"].as_str().expect("id").to_owned();
        }
        assert_eq!(status, 503, "only an unavailable store may refuse: {reply}");
        deadline
            .retry_every(Duration::from_millis(50), || {
                format!("{user}: {key} never accepted: {reply}")
            })
            .await;
    }
}

/// Users whose keys land on every master of the shared cluster (user ids hash freely).
fn user(i: usize) -> String {
    format!("cu-{i:03}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_every_user_gets_exactly_their_notifications_across_nodes() {
    const USERS: usize = 60;
    const PER_USER: usize = 20;
    let creds = Credentials::random();
    let (urls, prefix) = (redis_cluster_urls(), redis_prefix());
    let env = cluster_env(&urls, &prefix, &[]);
    let a = HubProcess::start_with_credentials(&creds, &env).await;
    let b = HubProcess::start_with_credentials(&creds, &env).await;
    let nodes = [Arc::new(a.as_app()), Arc::new(b.as_app())];
    wait_status(&nodes[0], "/readyz", 200, STEP).await;

    let mut readers: Vec<JoinHandle<Seen>> = Vec::new();
    for i in 0..USERS {
        let kind = if (i / 2).is_multiple_of(2) {
            Kind::Ws
        } else {
            Kind::Sse
        };
        let (conn, _) = Conn::open(kind, &nodes[i % 2], &user(i), None).await;
        readers.push(tokio::spawn(follow(
            kind,
            user(i),
            conn,
            None,
            Arc::new(Progress::default()),
        )));
    }
    // Half the notifications one by one through the other node, half in batches that mix
    // users of every shard: each user's items keep their order inside and across batches.
    let mut published: Vec<Vec<String>> = vec![Vec::new(); USERS];
    for seq in 0..PER_USER {
        if seq.is_multiple_of(2) {
            for (i, ids) in published.iter_mut().enumerate() {
                let data = json!({"user": user(i), "seq": seq});
                ids.push(nodes[(i + 1) % 2].publish(&user(i), NOTE, data).await);
            }
        } else {
            let items: Vec<Value> = (0..USERS)
                .rev()
                .map(|i| json!({"user_id": user(i), "type": NOTE, "data": {"user": user(i), "seq": seq}}))
                .collect();
            let (status, reply) = nodes[seq % 2]
                .post_api("/api/publish/batch", &json!({"notifications": items}))
                .await;
            assert_eq!(status, 200, "batch: {reply}");
            let ids = reply["ids"].as_array().expect("ids");
            assert_eq!(ids.len(), USERS);
            for (k, id) in ids.iter().enumerate() {
                published[USERS - 1 - k].push(id.as_str().expect("id").to_owned());
            }
        }
    }
    let mut ends = Vec::new();
    for i in 0..USERS {
        ends.push(
            nodes[i % 2]
                .publish(&user(i), END, json!({"user": user(i)}))
                .await,
        );
    }
    let mut problems = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = tokio::time::timeout(STEP, reader)
            .await
            .unwrap_or_else(|_| panic!("{} did not get its end marker", user(i)))
            .expect("reader finished");
        problems.extend(check_exactly(&user(i), &seen, &published[i], &ends[i]).err());
    }
    assert_no_problems(&problems, USERS);

    // Each node probes each of the three masters.
    for node in &nodes {
        let deadline = Deadline::after(STEP);
        loop {
            let (_, text) = node.get("/metrics").await;
            let up = text
                .lines()
                .filter(|l| l.starts_with("hub_backplane_shard_up{") && l.ends_with(" 1"))
                .count();
            if up == 3 {
                break;
            }
            deadline
                .retry(|| format!("{up} of 3 shards up: {text}"))
                .await;
        }
    }

    // A resume reads the user's history from its shard.
    let (mut again, hello) =
        Conn::open(Kind::Sse, &nodes[1], &user(7), Some(&published[7][4])).await;
    assert_eq!(hello["resumed"], true);
    for id in &published[7][5..] {
        assert_eq!(again.envelope().await["id"], id.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_burst_and_its_replica_promoted_loses_and_repeats_nothing() {
    let cluster = RedisCluster::start().await;
    let (urls, prefix) = (cluster.urls(), redis_prefix());
    let creds = Credentials::random();
    let env = cluster_env(&urls, &prefix, &FAILOVER_ENV);
    let a = HubProcess::start_with_credentials(&creds, &env).await;
    let b = HubProcess::start_with_credentials(&creds, &env).await;
    let nodes = [Arc::new(a.as_app()), Arc::new(b.as_app())];
    wait_status(&nodes[0], "/readyz", 200, STEP).await;
    let users: Vec<String> = (0..12).map(|i| format!("fo-{i}")).collect();
    // The master of the first user's slot is the one that dies.
    let slot = cluster.slot_of(&format!("{{{}}}", users[0]));
    let victim = cluster.master_of(slot);
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let killer = cluster.clone();
    burst_through(nodes.clone(), users, 60, async move {
        let mut cluster = killer.lock().await;
        cluster.kill(victim);
        cluster.wait_served(slot, victim).await;
        // Back as the new master's replica: until then no replica can confirm a publish
        // of that shard (HUB_REDIS_SYNC_REPLICAS=1), and publishes to it answer 503.
        cluster.restart(victim).await;
    })
    .await;
    for node in &nodes {
        wait_status(node, "/readyz", 200, STEP).await;
        assert!(
            node.metric("hub_backplane_reconnects_total").await >= 1.0,
            "the lost connection was noticed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_users_slot_moved_to_another_master_mid_stream_loses_and_repeats_nothing() {
    let cluster = RedisCluster::start().await;
    let (urls, prefix) = (cluster.urls(), redis_prefix());
    let creds = Credentials::random();
    let env = cluster_env(&urls, &prefix, &[("HUB_REDIS_TIMEOUT", "500ms")]);
    let a = HubProcess::start_with_credentials(&creds, &env).await;
    let b = HubProcess::start_with_credentials(&creds, &env).await;
    let nodes = [Arc::new(a.as_app()), Arc::new(b.as_app())];
    wait_status(&nodes[0], "/readyz", 200, STEP).await;
    // One busy user, followed on both nodes (WS and SSE), and a quiet one elsewhere.
    let hot = "hot-user".to_owned();
    let users = vec![hot.clone(), hot.clone(), "quiet".to_owned()];
    let slot = cluster.slot_of(&format!("{{{hot}}}"));
    let from = cluster.master_of(slot);
    let to = cluster.other_master(from);
    let cluster = Arc::new(cluster);
    let mover = cluster.clone();
    burst_through(nodes, users, 150, async move {
        mover.move_slot(slot, to);
    })
    .await;
    assert_eq!(cluster.master_of(slot), to, "the slot moved");
}

/// The ids a publisher got for one user: its notes in order, then its end marker.
type Published = (Vec<String>, String);

/// Follows each of `followers` (a user may be named twice: two clients of one user) over
/// WS and SSE on both nodes, publishes `per_user` notes to each distinct user through
/// alternating nodes (retrying while the store is unavailable), runs `disrupt` once a third
/// is published, then checks every client got exactly its user's notes, in order, no gap.
pub(crate) async fn burst_through(
    nodes: [Arc<TestApp>; 2],
    followers: Vec<String>,
    per_user: usize,
    disrupt: impl Future<Output = ()>,
) {
    let mut readers = Vec::new();
    for (i, u) in followers.iter().enumerate() {
        let kind = if i.is_multiple_of(2) {
            Kind::Ws
        } else {
            Kind::Sse
        };
        let (conn, _) = Conn::open(kind, &nodes[i % 2], u, None).await;
        let fallback = Some(nodes[(i + 1) % 2].clone());
        readers.push((
            u.clone(),
            tokio::spawn(follow(
                kind,
                u.clone(),
                conn,
                fallback,
                Arc::new(Progress::default()),
            )),
        ));
    }
    let mut users = followers.clone();
    users.sort();
    users.dedup();
    let total = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<(String, JoinHandle<Published>)> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let (nodes, total, u2) = (nodes.clone(), total.clone(), u.clone());
            (
                u.clone(),
                tokio::spawn(async move {
                    let u = u2;
                    let mut ids = Vec::new();
                    for seq in 0..per_user {
                        let data = json!({"user": u, "seq": seq});
                        let key = format!("{u}-{seq}");
                        ids.push(
                            publish_until_accepted(&nodes[(i + seq) % 2], &u, NOTE, data, &key)
                                .await,
                        );
                        total.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let end = publish_until_accepted(
                        &nodes[i % 2],
                        &u,
                        END,
                        json!({"user": u}),
                        &format!("{u}-end"),
                    )
                    .await;
                    (ids, end)
                }),
            )
        })
        .collect();
    let third = users.len() * per_user / 3;
    wait_until("a third of the burst was published", STEP * 3, || {
        total.load(Ordering::SeqCst) >= third
    })
    .await;
    disrupt.await;
    let mut published = std::collections::HashMap::new();
    for (u, p) in publishers {
        published.insert(u, p.await.expect("publisher finished"));
    }
    let mut problems = Vec::new();
    for (u, reader) in readers {
        let (ids, end) = &published[&u];
        let seen = tokio::time::timeout(STEP * 3, reader)
            .await
            .unwrap_or_else(|_| panic!("{u} did not get its end marker"))
            .expect("reader finished");
        problems.extend(check_exactly(&u, &seen, ids, end).err());
        if seen.gaps > 0 {
            problems.push(format!("{u}: hub.gap although nothing was lost"));
        }
    }
    assert_no_problems(&problems, followers.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_disconnect_api_reaches_every_node_and_revocations_hold() {
    let (urls, prefix) = (redis_cluster_urls(), redis_prefix());
    crate::edge::disconnect_on_every_node(
        &[
            ("HUB_REDIS_CLUSTER_URLS", urls.as_str()),
            ("HUB_REDIS_PREFIX", prefix.as_str()),
        ],
        &[],
    )
    .await;
}
