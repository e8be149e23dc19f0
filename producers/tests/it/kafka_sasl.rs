//! Kafka with SASL and TLS: the services run the saga through a broker's SASL listeners with
//! their credentials (SASL/PLAIN in the clear, SCRAM over TLS trusting the broker's CA), and a
//! wrong password or an untrusted certificate stops a service with one clear line instead of
//! retrying in silence. The broker is a private one (`infra/local/kafka.sh --port`), whose
//! SASL_PLAINTEXT listener on port + 2 and SASL_SSL listener on port + 3 know the user
//! `services` / `services-secret`.

use std::time::Duration;

use test_support::files::{temp_dir, unrelated_ca};
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

fn scram_tls(kafka: &PrivateKafka, mechanism: &str, ca: &str) -> Vec<(String, String)> {
    vec![
        ("KAFKA_BROKERS".into(), kafka.tls_brokers()),
        ("KAFKA_SECURITY_PROTOCOL".into(), "sasl_ssl".into()),
        ("KAFKA_SASL_MECHANISM".into(), mechanism.into()),
        ("KAFKA_SASL_USERNAME".into(), "services".into()),
        ("KAFKA_SASL_PASSWORD".into(), "services-secret".into()),
        ("KAFKA_SSL_CA_FILE".into(), ca.into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_runs_through_sasl_and_tls_and_a_wrong_password_or_ca_stops_a_service_clearly() {
    let kafka = PrivateKafka::start().await;
    // Topics are created (and the hub ingests) on the PLAINTEXT listener of the same broker.
    let mut stack = Stack::prepare_on("kafka-sasl", &kafka.brokers()).await;
    stack.start_hub().await;
    // One service per way in: SCRAM-SHA-512 and SCRAM-SHA-256 over TLS, PLAIN in the clear.
    let ca = kafka.tls_ca();
    let ways = [
        (Kind::Order, scram_tls(&kafka, "SCRAM-SHA-512", &ca)),
        (Kind::Payment, scram_tls(&kafka, "SCRAM-SHA-256", &ca)),
        (Kind::Delivery, sasl(&kafka, "services-secret")),
    ];
    for (kind, security) in ways {
        stack.extra.insert(kind.name(), security);
        stack.start_service(kind);
    }
    let user = format!("vic-{}", hex(3));
    let inbox = Inbox::connect(stack.hub(), &stack.secret, &user, Transport::Ws).await;
    let order = stack.place_order(&user, 500).await;
    inbox.wait_status(&order, "DELIVERED").await;
    assert_eq!(inbox.statuses(&order), DELIVERED_PATH);

    // The same service with a wrong password, then with a CA that did not sign the broker's
    // certificate: it stops within a bounded time, naming the settings to check, and its
    // readiness never claims otherwise.
    let dir = temp_dir("services-kafka-ca");
    let untrusted = unrelated_ca(dir.path());
    let cases = [
        (
            "bad-password",
            sasl(&kafka, "not-the-password"),
            "payment-service: kafka: the brokers refused authentication as \"services\" (check PAYMENT_KAFKA_SASL_USERNAME, PAYMENT_KAFKA_SASL_PASSWORD",
        ),
        (
            "untrusted-ca",
            scram_tls(&kafka, "SCRAM-SHA-256", &untrusted),
            "payment-service: kafka: the brokers' certificate is not trusted (check PAYMENT_KAFKA_SSL_CA_FILE, ",
        ),
    ];
    for (name, security, expected) in cases {
        let mut env = stack.env(Kind::Payment);
        // Its own group, and only this case's way to the brokers.
        env.retain(|(k, _)| {
            k != "KAFKA_GROUP"
                && k != "KAFKA_BROKERS"
                && !k.starts_with("KAFKA_SASL_")
                && !k.starts_with("KAFKA_SSL_")
                && k != "KAFKA_SECURITY_PROTOCOL"
        });
        env.push((
            "KAFKA_GROUP".into(),
            format!("{}{name}", stack.topics.prefix),
        ));
        env.extend(security);
        let log = stack.out.join(format!("payment-{name}.log"));
        let mut bad = ServiceProcess::start(Kind::Payment, &env, &log);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = bad.try_wait() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the service with {name} still runs after 30 s; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(status.code(), Some(1), "{name}");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let last = text.lines().last().unwrap_or_default();
        assert!(last.starts_with(expected), "{name}: {text}");
        assert!(
            !last.contains("not-the-password"),
            "the password leaked: {last}"
        );
    }
    stack.cleanup().await;
}
