//! Hub nodes behind Redis Sentinel (`HUB_REDIS_SENTINEL_URLS`, `HUB_REDIS_SENTINEL_MASTER`):
//! the master the Sentinels name is used, and when it dies and a replica is promoted the nodes
//! follow by themselves, with nothing lost or repeated for their clients.

use std::sync::Arc;

use test_support::STEP;

use crate::helpers::app::{Credentials, wait_status};
use crate::helpers::processes::HubProcess;
use crate::helpers::redis::{RedisSentinel, SENTINEL_MASTER, redis_prefix};
use crate::redis_cluster::{FAILOVER_ENV, burst_through};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_a_killed_master_is_followed_to_its_promoted_replica_losing_and_repeating_nothing()
 {
    let redis = RedisSentinel::start().await;
    // A Sentinel that is down (nothing listens on port 1) comes first in the list: the next
    // one is asked.
    let urls = format!("redis://127.0.0.1:1,{}", redis.url());
    let prefix = redis_prefix();
    let creds = Credentials::random();
    let mut env = vec![
        ("HUB_REDIS_SENTINEL_URLS", urls.as_str()),
        ("HUB_REDIS_SENTINEL_MASTER", SENTINEL_MASTER),
        ("HUB_REDIS_PREFIX", prefix.as_str()),
        ("HUB_DRAIN_WINDOW", "100ms"),
        ("HUB_HISTORY_SIZE", "1000"),
        ("HUB_LOG", "warn"),
    ];
    env.extend_from_slice(&FAILOVER_ENV);
    let a = HubProcess::start_with_credentials(&creds, &env).await;
    let b = HubProcess::start_with_credentials(&creds, &env).await;
    let nodes = [Arc::new(a.as_app()), Arc::new(b.as_app())];
    wait_status(&nodes[0], "/readyz", 200, STEP).await;
    let users: Vec<String> = (0..8).map(|i| format!("sn-{i}")).collect();
    let victim = redis.master_port();
    let redis = Arc::new(tokio::sync::Mutex::new(redis));
    let killer = redis.clone();
    burst_through(nodes.clone(), users, 60, async move {
        let mut redis = killer.lock().await;
        redis.kill(victim);
        redis.wait_promoted(victim).await;
        // Until the other replica follows the new master no replica can confirm a publish
        // (HUB_REDIS_SYNC_REPLICAS=1), and publishes answer 503.
        redis.wait_replicated().await;
    })
    .await;
    assert_ne!(
        redis.lock().await.master_port(),
        victim,
        "a replica was promoted"
    );
    for node in &nodes {
        wait_status(node, "/readyz", 200, STEP).await;
        assert!(
            node.metric("hub_backplane_reconnects_total").await >= 1.0,
            "the node moved its pub/sub connection to the new master"
        );
    }
}
