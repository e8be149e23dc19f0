//! Kafka with SASL: the services run the saga through a broker's SASL_PLAINTEXT listener with
//! their credentials, and a wrong password stops a service with one clear line instead of
//! retrying in silence. The broker is a private one (`infra/local/kafka.sh --port`), whose
//! SASL/PLAIN listener on port + 2 knows the user `services` / `services-secret`.

use std::time::Duration;

use test_support::hex;

use crate::helpers::clients::{Inbox, Transport};
use crate::helpers::kafka::PrivateKafka;
use crate::helpers::processes::{Kind, ServiceProcess};
use crate::helpers::stack::{DELIVERED_PATH, Stack};

fn sasl(kafka: &PrivateKafka, password: &str) -> Vec<(String, String)> {
    vec![
        ("KAFKA_BROKERS".into(), kafka.sasl_brokers()),
        ("KAFKA_SECURITY_PROTOCOL".into(), "sasl_plaintext".into()),
        ("KAFKA_SASL_MECHANISM".into(), "PLAIN".into()),
        ("KAFKA_SASL_USERNAME".into(), "services".into()),
        ("KAFKA_SASL_PASSWORD".into(), password.into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_runs_through_the_sasl_listener_and_a_wrong_password_stops_a_service_clearly() {
    let kafka = PrivateKafka::start().await;
    // Topics are created (and the hub ingests) on the PLAINTEXT listener of the same broker.
    let mut stack = Stack::prepare_on("kafka-sasl", &kafka.brokers()).await;
    stack.start_hub().await;
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery] {
        stack
            .extra
            .insert(kind.name(), sasl(&kafka, "services-secret"));
        stack.start_service(kind);
    }
    let user = format!("vic-{}", hex(3));
    let inbox = Inbox::connect(stack.hub(), &stack.secret, &user, Transport::Ws).await;
    let order = stack.place_order(&user, 500).await;
    inbox.wait_status(&order, "DELIVERED").await;
    assert_eq!(inbox.statuses(&order), DELIVERED_PATH);

    // The same service with a wrong password: it stops within a bounded time, naming the
    // settings to check, and its readiness never claims otherwise.
    let mut env = stack.env(Kind::Payment);
    env.retain(|(k, _)| k != "KAFKA_GROUP");
    env.push(("KAFKA_GROUP".into(), format!("{}bad", stack.topics.prefix)));
    env.extend(sasl(&kafka, "not-the-password"));
    let log = stack.out.join("payment-bad-password.log");
    let mut bad = ServiceProcess::start(Kind::Payment, &env, &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = bad.try_wait() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service with a wrong password still runs after 30 s; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "payment-service: kafka: the brokers refused authentication as \"services\" (check PAYMENT_KAFKA_SASL_USERNAME, PAYMENT_KAFKA_SASL_PASSWORD"
        ),
        "{text}"
    );
    assert!(
        !last.contains("not-the-password"),
        "the password leaked: {last}"
    );
    stack.cleanup().await;
}
