//! Every metric of the services, defined once. Labels are topics and outcomes, never users.

use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

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
        Metrics {
            registry,
            outbox_published,
            outbox_failures,
            consumed,
        }
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
