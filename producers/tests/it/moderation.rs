//! Moderation: a report becomes a task, a worker decides it, the hub tells the reporter, and
//! the target's owner too when the target was removed. The owner comes from the service's
//! catalogue of ads (or is the reported user), never from the request. Workers share tasks,
//! one decision each. Reports are rate limited per reporter.

use serde_json::{Value, json};
use test_support::hex;
use test_support::wait::eventually;

use crate::helpers::STEP;
use crate::helpers::clients::{Inbox, Transport};
use crate::helpers::http::{get, post};
use crate::helpers::kafka::read_topic;
use crate::helpers::processes::{Kind, ServiceProcess};
use crate::helpers::stack::Stack;

async fn post_report(stack: &Stack, reporter: &str, body: &Value) -> (u16, Value) {
    post(
        &stack.service(Kind::Moderation).url("/reports"),
        Some(&stack.token(Kind::Moderation, reporter)),
        body,
    )
    .await
}

async fn report(stack: &Stack, reporter: &str, ad: &str, reason: &str) -> String {
    let (status, body) = post_report(
        stack,
        reporter,
        &json!({"target_type": "ad", "target_id": ad, "reason": reason}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    body["report_id"].as_str().expect("report_id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_target_notifies_reporter_and_owner_a_dismissed_one_only_the_reporter() {
    let stack = Stack::start("moderation-notify").await;
    let (reporter, owner) = (format!("ivy-{}", hex(3)), format!("jack-{}", hex(3)));
    let r = Inbox::connect(stack.hub(), &stack.secret, &reporter, Transport::Ws).await;
    let o = Inbox::connect(stack.hub(), &stack.secret, &owner, Transport::Sse).await;
    let results_topic = stack.topics.name("moderation.results");
    // The owner publishes the ad; the reporter names only the ad.
    let ad = stack.post_ad(&owner, "Designer handbag, 90% off").await;

    let dismissed = report(&stack, &reporter, &ad, "I just do not like it").await;
    r.wait("dismissed result", |e| {
        e.iter()
            .any(|v| v["data"]["report_id"] == dismissed.as_str())
    })
    .await;
    // The hub has finished with the record (both routes evaluated) before the owner is checked.
    eventually("hub ingested the result", STEP, || async {
        (stack
            .hub()
            .metric("hub_ingest_events_total", &[("topic", &results_topic)])
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    let got = r.of_type("moderation.result");
    assert_eq!(
        got[0]["data"],
        json!({"report_id": dismissed, "target_type": "AD", "target_id": ad, "decision": "DISMISSED", "role": "reporter"})
    );
    assert!(
        o.of_type("moderation.result").is_empty(),
        "owner heard of a dismissed report: {:?}",
        o.events()
    );

    let removed = report(&stack, &reporter, &ad, "This ad is a SCAM").await;
    o.wait("owner's removal", |e| {
        e.iter().any(|v| v["data"]["report_id"] == removed.as_str())
    })
    .await;
    r.wait("reporter's removal", |e| {
        e.iter().any(|v| v["data"]["report_id"] == removed.as_str())
    })
    .await;
    assert_eq!(
        o.of_type("moderation.result")[0]["data"],
        json!({"report_id": removed, "target_type": "AD", "target_id": ad, "decision": "REMOVED", "role": "owner"})
    );
    assert_eq!(
        r.of_type("moderation.result")[1]["data"]["role"],
        "reporter"
    );
    assert_eq!(o.of_type("moderation.result").len(), 1);

    // The reporter can look the decision up; bad reports are explained.
    let (status, body) = get(
        &stack
            .service(Kind::Moderation)
            .url(&format!("/reports/{removed}")),
        Some(&stack.token(Kind::Moderation, &reporter)),
    )
    .await;
    assert_eq!((status, body["decision"].clone()), (200, json!("REMOVED")));
    let (status, body) = post_report(
        &stack,
        &reporter,
        &json!({"target_type": "car", "target_id": "x", "reason": "z"}),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            400,
            json!({"error": "target_type: must be \"ad\" or \"user\""})
        )
    );
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_comes_from_the_catalogue_never_from_the_reporter() {
    let stack = Stack::start("moderation-owner").await;
    let (reporter, owner, mallory) = (
        format!("liz-{}", hex(3)),
        format!("mo-{}", hex(3)),
        format!("mallory-{}", hex(3)),
    );
    let ad = stack.post_ad(&owner, "Used bicycle").await;
    let m = Inbox::connect(stack.hub(), &stack.secret, &mallory, Transport::Ws).await;
    let o = Inbox::connect(stack.hub(), &stack.secret, &owner, Transport::Ws).await;

    // A reporter who tries to name the owner (to aim a removal notice at someone) is refused.
    let (status, body) = post_report(
        &stack,
        &reporter,
        &json!({"target_type": "ad", "target_id": ad, "target_owner_id": mallory, "reason": "scam"}),
    )
    .await;
    test_support::assert_refused(status, &body, 400, "unknown field `target_owner_id`");
    // An ad that is not in the catalogue.
    let (status, body) = post_report(
        &stack,
        &reporter,
        &json!({"target_type": "ad", "target_id": "ad-nonexistent", "reason": "scam"}),
    )
    .await;
    assert_eq!((status, body), (404, json!({"error": "no such ad"})));
    // A user id that cannot be one.
    let (status, body) = post_report(
        &stack,
        &reporter,
        &json!({"target_type": "user", "target_id": "a{b}", "reason": "spam"}),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            400,
            json!({"error": "target_id: user id must not contain '{', '}' or control characters"})
        )
    );

    // Removed: the catalogue's owner is told, and nobody else.
    let removed = report(&stack, &reporter, &ad, "fraud, asks for a deposit").await;
    o.wait("the ad's owner is told", |e| {
        e.iter().any(|v| {
            v["type"] == "moderation.result"
                && v["data"]["report_id"] == removed.as_str()
                && v["data"]["role"] == "owner"
        })
    })
    .await;
    // A reported user is the owner of the target.
    let (status, body) = post_report(
        &stack,
        &reporter,
        &json!({"target_type": "user", "target_id": mallory, "reason": "sends spam"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let user_report = body["report_id"].as_str().expect("report_id").to_owned();
    m.wait("the reported user is told", |e| {
        e.iter().any(|v| {
            v["type"] == "moderation.result"
                && v["data"]["report_id"] == user_report.as_str()
                && v["data"]["role"] == "owner"
        })
    })
    .await;
    assert_eq!(
        m.of_type("moderation.result").len(),
        1,
        "mallory heard only of the report on her: {:?}",
        m.events()
    );
    let db = stack.db(Kind::Moderation);
    assert_eq!(
        db.count(
            "SELECT count(*) FROM reports WHERE target_owner_id = $1",
            &owner
        )
        .await,
        1
    );
    // The catalogue lists the ad with its owner.
    let (status, body) = get(&stack.service(Kind::Moderation).url("/ads"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["ads"][0],
        json!({"ad_id": ad, "owner_id": owner, "title": "Used bicycle"})
    );
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_over_the_limit_gets_429_and_another_reporter_is_unaffected() {
    let mut stack = Stack::prepare("moderation-limit").await;
    stack.extra.insert(
        "moderation",
        vec![
            ("REPORTS_PER_MINUTE".into(), "1".into()),
            ("REPORTS_BURST".into(), "3".into()),
        ],
    );
    stack.start_service(Kind::Moderation);
    let ad = stack.post_ad("nina", "Old phone").await;
    let (busy, other) = (format!("oli-{}", hex(3)), format!("pat-{}", hex(3)));
    for i in 0..3 {
        report(&stack, &busy, &ad, &format!("report {i}")).await;
    }
    let resp = reqwest::Client::new()
        .post(stack.service(Kind::Moderation).url("/reports"))
        .bearer_auth(stack.token(Kind::Moderation, &busy))
        .json(&json!({"target_type": "ad", "target_id": ad, "reason": "one more"}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"error": format!("too many reports; retry in {retry_after} s")})
    );
    // Another reporter has a bucket of their own.
    report(&stack, &other, &ad, "looks fine, just checking").await;
    let db = stack.db(Kind::Moderation);
    assert_eq!(
        db.count("SELECT count(*) FROM reports WHERE reporter_id = $1", &busy)
            .await,
        3
    );
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_tasks_and_each_task_is_decided_once() {
    let mut stack = Stack::prepare("moderation-workers").await;
    stack.start_service(Kind::Moderation);
    // A second process in the same consumer group.
    let log = stack.out.join("moderation-2.log");
    let second = ServiceProcess::start(Kind::Moderation, &stack.env(Kind::Moderation), &log);
    let db = stack.db(Kind::Moderation);
    let reporter = format!("kim-{}", hex(3));
    let ad = stack.post_ad("owner", "Lamp").await;
    let mut reports = Vec::new();
    // Waves of reports until both workers have decided some (the group may still be settling
    // its partitions when the first wave arrives).
    let deadline = tokio::time::Instant::now() + STEP * 3;
    let workers = loop {
        for i in 0..10 {
            reports.push(report(&stack, &reporter, &ad, &format!("report {i}")).await);
        }
        let all = reports.len() as i64;
        eventually("the wave is decided", STEP, || async {
            (db.count("SELECT count(*) FROM decisions WHERE report_id <> $1", "")
                .await
                == all)
                .then_some(())
        })
        .await;
        let workers = db
            .count(
                "SELECT count(DISTINCT worker) FROM decisions WHERE report_id <> $1",
                "",
            )
            .await;
        if workers == 2 || tokio::time::Instant::now() > deadline {
            break workers;
        }
    };
    assert_eq!(workers, 2);
    // Every report decided exactly once, and one result each on Kafka.
    let results = read_topic(&stack.topics.name("moderation.results"), |r| {
        r.len() >= reports.len()
    })
    .await;
    for id in &reports {
        assert_eq!(
            results.iter().filter(|r| &r.key_text() == id).count(),
            1,
            "report {id}"
        );
    }
    drop(second);
    stack.cleanup().await;
}
