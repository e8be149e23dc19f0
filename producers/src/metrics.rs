//! Every metric of the services, defined once. Labels are topics and outcomes, never users.

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Cheap-to-clone handle to the service's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Outbox events published to Kafka.
    pub outbox_published: IntCounter,
    /// Outbox events whose publish failed (they stay in the table and are retried).
    pub outbox_failures: IntCounter,
    /// Consumed records by topic and outcome (`applied`, `duplicate`, `dlq`, `retry`).
    pub consumed: IntCounterVec,
    /// Events waiting in the outbox (sampled by the relay when it has nothing to publish, or
    /// while publishing fails).
    pub outbox_waiting: IntGauge,
    /// Age of the oldest waiting event, in seconds (0 when none waits).
    pub outbox_oldest_age: Gauge,
    /// Requests refused by a per-user rate limit, by limit (`orders`, `reports`).
    pub rate_limited: IntCounterVec,
}

impl Metrics {
    /// Registers every metric with a fresh registry labelled with the service's name.
    pub fn new(service: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some(
                [("service".to_owned(), service.to_owned())]
                    .into_iter()
                    .collect(),
            ),
        )
        .unwrap_or_default();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let outbox_published = counter(
            "producers_outbox_published_total",
            "Outbox events published to Kafka.",
        );
        let outbox_failures = counter(
            "producers_outbox_publish_failures_total",
            "Outbox events whose publish failed; they stay in the outbox and are retried.",
        );
        let consumed = IntCounterVec::new(
            Opts::new(
                "producers_events_consumed_total",
                "Consumed Kafka records by topic and outcome (applied, duplicate, dlq, retry).",
            ),
            &["topic", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric producers_events_consumed_total: {e}"));
        let _ = registry.register(Box::new(consumed.clone()));
        let outbox_waiting = IntGauge::new(
            "producers_outbox_waiting",
            "Events waiting in the outbox to be published.",
        )
        .unwrap_or_else(|e| panic!("metric producers_outbox_waiting: {e}"));
        let _ = registry.register(Box::new(outbox_waiting.clone()));
        let outbox_oldest_age = Gauge::new(
            "producers_outbox_oldest_age_seconds",
            "Age of the oldest event waiting in the outbox (0 when none waits).",
        )
        .unwrap_or_else(|e| panic!("metric producers_outbox_oldest_age_seconds: {e}"));
        let _ = registry.register(Box::new(outbox_oldest_age.clone()));
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "producers_rate_limited_total",
                "Requests refused with 429 by a per-user rate limit, by limit (orders, reports).",
            ),
            &["limit"],
        )
        .unwrap_or_else(|e| panic!("metric producers_rate_limited_total: {e}"));
        let _ = registry.register(Box::new(rate_limited.clone()));
        Metrics {
            registry,
            outbox_published,
            outbox_failures,
            consumed,
            outbox_waiting,
            outbox_oldest_age,
            rate_limited,
        }
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
