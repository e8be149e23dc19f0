//! A bad configuration stops a service at start with exit code 2 and one line naming the
//! setting; it never half-starts.

use crate::helpers::processes::Kind;

fn run(kind: Kind, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = kind
        .command()
        .envs(env.iter().copied())
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A service, its environment, and the line it must print.
type Case<'a> = (Kind, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn a_bad_setting_stops_the_service_with_one_line_naming_it() {
    let db = "postgres://notify:notify@127.0.0.1:1/none";
    let cases: [Case; 6] = [
        (
            Kind::Order,
            vec![("ORDER_KAFKA_BROKERS", "127.0.0.1:9092")],
            "order-service: config: ORDER_DATABASE_URL: missing (required)",
        ),
        (
            Kind::Payment,
            vec![
                ("PAYMENT_DATABASE_URL", db),
                ("PAYMENT_KAFKA_BROKERS", "k"),
                ("PAYMENT_STEP_INTERVAL", "1s"),
            ],
            "payment-service: config: PAYMENT_STEP_INTERVAL: not a setting of the payment-service",
        ),
        (
            Kind::Delivery,
            vec![
                ("DELIVERY_DATABASE_URL", db),
                ("DELIVERY_KAFKA_BROKERS", "k"),
                ("DELIVERY_STEP_INTERVAL", "5ms"),
            ],
            "delivery-service: config: DELIVERY_STEP_INTERVAL: must be at least 10ms",
        ),
        (
            Kind::Moderation,
            vec![
                ("MODERATION_DATABASE_URL", db),
                ("MODERATION_KAFKA_BROKERS", "k"),
                ("MODERATION_JWT_SECRET", "short"),
            ],
            "moderation-service: config: MODERATION_JWT_SECRET: must be at least 32 bytes",
        ),
        (
            Kind::Payment,
            vec![
                ("PAYMENT_DATABASE_URL", db),
                ("PAYMENT_KAFKA_BROKERS", "k"),
                ("PAYMENT_KAFKA_SASL_MECHANISM", "PLAIN"),
            ],
            "payment-service: config: PAYMENT_KAFKA_SASL_MECHANISM: needs PAYMENT_KAFKA_SECURITY_PROTOCOL sasl_plaintext or sasl_ssl (it is plaintext)",
        ),
        (
            Kind::Order,
            vec![
                ("ORDER_DATABASE_URL", db),
                ("ORDER_KAFKA_BROKERS", "k"),
                ("ORDER_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("ORDER_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
                ("ORDER_KAFKA_SASL_USERNAME", "services"),
            ],
            "order-service: config: ORDER_KAFKA_SASL_PASSWORD: missing (required with ORDER_KAFKA_SASL_USERNAME)",
        ),
    ];
    for (kind, env, line) in cases {
        let (code, stderr) = run(kind, &env);
        assert_eq!(code, Some(2), "{kind:?}: {stderr}");
        assert_eq!(stderr.trim_end(), line);
    }
}

#[test]
fn an_unreachable_database_is_named_and_the_service_exits() {
    let (code, stderr) = run(
        Kind::Payment,
        &[
            (
                "PAYMENT_DATABASE_URL",
                "postgres://notify:notify@127.0.0.1:1/none",
            ),
            ("PAYMENT_KAFKA_BROKERS", "127.0.0.1:9092"),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("payment-service: database: cannot connect (PAYMENT_DATABASE_URL)"),
        "{stderr}"
    );
}
