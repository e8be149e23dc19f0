//! Moderation: a report becomes a task, a worker decides it, the hub tells the reporter, and
//! the target's owner too when the target was removed. Workers share tasks, one decision each.

use serde_json::json;

use crate::helpers::*;

async fn report(stack: &Stack, reporter: &str, owner: &str, reason: &str) -> String {
    let (status, body) = post(
        &stack.service(Kind::Moderation).url("/reports"),
        Some(&stack.token(reporter)),
        &json!({"target_type": "ad", "target_id": "ad-42", "target_owner_id": owner, "reason": reason}),
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

    let dismissed = report(&stack, &reporter, &owner, "I just do not like it").await;
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
        json!({"report_id": dismissed, "target_type": "AD", "target_id": "ad-42", "decision": "DISMISSED", "role": "reporter"})
    );
    assert!(
        o.of_type("moderation.result").is_empty(),
        "owner heard of a dismissed report: {:?}",
        o.events()
    );

    let removed = report(&stack, &reporter, &owner, "This ad is a SCAM").await;
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
        json!({"report_id": removed, "target_type": "AD", "target_id": "ad-42", "decision": "REMOVED", "role": "owner"})
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
        Some(&stack.token(&reporter)),
    )
    .await;
    assert_eq!((status, body["decision"].clone()), (200, json!("REMOVED")));
    let (status, body) = post(
        &stack.service(Kind::Moderation).url("/reports"),
        Some(&stack.token(&reporter)),
        &json!({"target_type": "car", "target_id": "x", "target_owner_id": "y", "reason": "z"}),
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
async fn two_workers_share_the_tasks_and_each_task_is_decided_once() {
    let mut stack = Stack::prepare("moderation-workers").await;
    stack.start_service(Kind::Moderation);
    // A second process in the same consumer group.
    let log = stack.out.join("moderation-2.log");
    let second = ServiceProcess::start(Kind::Moderation, &stack.env(Kind::Moderation), &log);
    let db = stack.db(Kind::Moderation);
    let reporter = format!("kim-{}", hex(3));
    let mut reports = Vec::new();
    // Waves of reports until both workers have decided some (the group may still be settling
    // its partitions when the first wave arrives).
    let deadline = tokio::time::Instant::now() + STEP * 3;
    let workers = loop {
        for i in 0..10 {
            reports.push(report(&stack, &reporter, "owner", &format!("report {i}")).await);
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
            results.iter().filter(|r| &r.key == id).count(),
            1,
            "report {id}"
        );
    }
    drop(second);
    stack.cleanup().await;
}
