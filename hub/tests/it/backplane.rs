//! Backplane scenarios, written once against the trait and run for each implementation.

use std::sync::Arc;
use std::time::Duration;

use hub::backplane::memory::MemoryBackplane;
use hub::backplane::{Backplane, Publish, Sink};
use hub::envelope::{Id, Notification};
use parking_lot::Mutex;
use serde_json::value::RawValue;

/// Records what the backplane hands to the node.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<(String, Id, String)>>,
}

impl Sink for Recorder {
    fn deliver(&self, user: &str, n: &Arc<Notification>) {
        self.got
            .lock()
            .push((user.to_owned(), n.id, n.json.as_str().to_owned()));
    }
}

fn msg(user: &str, n: u32, key: Option<&str>) -> Publish {
    Publish {
        user: user.to_owned(),
        kind: "t".to_owned(),
        data: RawValue::from_string(format!("{{\"n\":{n}}}")).expect("json"),
        idempotency_key: key.map(str::to_owned),
    }
}

async fn ids_increase_and_reach_subscribers(bp: &dyn Backplane, rec: &Recorder) {
    bp.subscribe(&Arc::from("a")).await.expect("subscribe");
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
    let got = rec.got.lock();
    assert_eq!(got.len(), 20);
    assert!(got.windows(2).all(|w| w[0].1.seq < w[1].1.seq));
    assert!(got.iter().all(|(u, _, _)| u == "a"));
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
    let before = rec.got.lock().len();
    let a = bp.publish(msg("i", 1, Some("k1"))).await.expect("publish");
    let b = bp.publish(msg("i", 2, Some("k1"))).await.expect("publish");
    assert_eq!(a.id, b.id);
    assert!(b.duplicate);
    // Keys are per user.
    let c = bp.publish(msg("j", 3, Some("k1"))).await.expect("publish");
    assert!(!c.duplicate);
    assert_eq!(rec.got.lock().len(), before + 2);
}

#[tokio::test]
async fn memory_backplane_scenarios() {
    let size = 10;
    let rec = Arc::new(Recorder::default());
    let bp = MemoryBackplane::new(rec.clone(), size, Duration::from_secs(3600));
    ids_increase_and_reach_subscribers(&bp, &rec).await;
    history_after_returns_the_rest_in_order(&bp).await;
    trimmed_or_foreign_resume_points_are_gaps(&bp, size).await;
    idempotency_keys_publish_once(&bp, &rec).await;
    assert!(bp.ready().await);
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
