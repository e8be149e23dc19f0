//! Every metric the hub exports, defined once, with low-cardinality labels only.
//!
//! Hot paths hold pre-resolved label children (`ws`, `sse`, ...) so a delivery costs an
//! atomic add, not a label lookup. No label ever takes a user id, a token or a raw path.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Per-transport children of the labelled metrics.
#[derive(Clone)]
pub struct TransportMetrics {
    /// `hub_connections{transport}`.
    pub connections: IntGauge,
    /// `hub_connections_total{transport}`.
    pub connections_total: IntCounter,
    /// `hub_messages_delivered_total{transport}`.
    pub delivered: IntCounter,
}

/// Cheap-to-clone handle on the registry and every metric.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    ws: TransportMetrics,
    sse: TransportMetrics,
    rejections: IntCounterVec,
    published_api: IntCounter,
    published_kafka: IntCounter,
    publish_duplicates: IntCounter,
    delivery_latency: Histogram,
    slow_consumers: IntCounter,
    api_disconnects: IntCounter,
    inbound_rate_closes: IntCounter,
    resumes: IntCounterVec,
    write_timeouts: IntCounter,
    backplane_reconnects: IntCounter,
    backplane_lag: prometheus::Gauge,
    backplane_shard_up: IntGaugeVec,
    presence_reports: IntCounter,
    channels: IntGauge,
    channel_subscriptions: IntGauge,
    channel_refusals: IntCounterVec,
    presence_requests: IntCounterVec,
    backplane_shard_recoveries: IntCounterVec,
    ingest: IngestFamilies,
}

/// Kafka ingest's counters of one topic (`hub_ingest_events_total{topic,outcome}` and
/// `hub_ingest_dlq_total{topic}`), resolved once so a record costs no label lookup.
#[derive(Clone)]
pub struct TopicCounters {
    /// Records that became notifications.
    pub published: IntCounter,
    /// Records whose event was already in history.
    pub duplicate: IntCounter,
    /// Records the routes filtered out.
    pub filtered: IntCounter,
    /// Records sent to the DLQ (the `dlq` outcome).
    pub dlq_outcome: IntCounter,
    /// Records sent to the DLQ (`hub_ingest_dlq_total`).
    pub dlq: IntCounter,
}

/// Kafka ingest's metrics.
#[derive(Clone)]
pub struct IngestMetrics {
    topics: Arc<HashMap<String, TopicCounters>>,
    lag: IntGaugeVec,
    /// Kafka record timestamp → notification in history.
    pub latency: Histogram,
    /// Notifications published from Kafka (`hub_notifications_published_total{source="kafka"}`).
    pub published: IntCounter,
    /// 1 once ingest has stopped on a failure retrying cannot mend (`hub_ingest_failed`).
    pub failed: IntGauge,
}

impl IngestMetrics {
    /// The counters of a consumed topic.
    pub fn topic(&self, topic: &str) -> Option<&TopicCounters> {
        self.topics.get(topic)
    }

    /// Sets the consumer group's lag on a partition.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(lag);
    }
}

/// Reasons a handshake is refused (`hub_handshake_rejections_total{reason}`).
pub mod reason {
    /// No token in any accepted place.
    pub const MISSING_TOKEN: &str = "missing_token";
    /// Token refused (signature, algorithm, claims, expiry, key).
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// `Origin` not in the allow-list.
    pub const ORIGIN: &str = "origin";
    /// Per-user cap reached.
    pub const USER_LIMIT: &str = "user_limit";
    /// Per-node cap reached.
    pub const NODE_LIMIT: &str = "node_limit";
    /// The node is draining.
    pub const DRAINING: &str = "draining";
    /// Malformed request (bad method, bad resume id, bad upgrade headers).
    pub const BAD_REQUEST: &str = "bad_request";
    /// The backplane could not be reached during the handshake.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The request head did not arrive in time.
    pub const TIMEOUT: &str = "timeout";
    /// Too many open connections from the client's address (closed at accept).
    pub const IP_LIMIT: &str = "ip_limit";
    /// Too many connections still in their handshake (closed at accept).
    pub const PENDING_LIMIT: &str = "pending_limit";
    /// The user opened connections faster than the per-user handshake rate.
    pub const USER_RATE: &str = "user_rate";
    /// The user's tokens issued before a time were revoked (disconnect API).
    pub const REVOKED: &str = "revoked";
    /// The token grants more channels than a connection may follow.
    pub const CHANNEL_LIMIT: &str = "channel_limit";
    /// A channel of the token has its maximum of subscribers on this node.
    pub const CHANNEL_FULL: &str = "channel_full";
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, Box::new(c.clone()));
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, Box::new(c.clone()));
    c
}

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
    // Names are constants defined once below; a clash is a programming error caught by tests.
    if let Err(e) = registry.register(c) {
        panic!("metric registration: {e}");
    }
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, Box::new(h.clone()));
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, Box::new(g.clone()));
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, Box::new(g.clone()));
    g
}

/// `hub_connections`, `hub_connections_total` and `hub_messages_delivered_total`, resolved
/// once per transport.
fn transport_metrics(registry: &Registry) -> (TransportMetrics, TransportMetrics) {
    let gauges = gauge_vec(
        registry,
        "hub_connections",
        "Open client connections",
        &["transport"],
    );
    let totals = counter_vec(
        registry,
        "hub_connections_total",
        "Client connections accepted",
        &["transport"],
    );
    let delivered = counter_vec(
        registry,
        "hub_messages_delivered_total",
        "Notifications written to client sockets",
        &["transport"],
    );
    let per = |label: &str| TransportMetrics {
        connections: gauges.with_label_values(&[label]),
        connections_total: totals.with_label_values(&[label]),
        delivered: delivered.with_label_values(&[label]),
    };
    (per("ws"), per("sse"))
}

/// A one-label counter family with each of `values` present (at zero) from the start.
fn labelled_from_start(c: IntCounterVec, values: &[&str]) -> IntCounterVec {
    for v in values {
        c.with_label_values(&[v]);
    }
    c
}

/// `hub_handshake_rejections_total`, every reason present from the start.
fn rejection_counter(registry: &Registry) -> IntCounterVec {
    let rejections = counter_vec(
        registry,
        "hub_handshake_rejections_total",
        "Client handshakes refused, by reason",
        &["reason"],
    );
    for r in [
        reason::MISSING_TOKEN,
        reason::INVALID_TOKEN,
        reason::ORIGIN,
        reason::USER_LIMIT,
        reason::NODE_LIMIT,
        reason::DRAINING,
        reason::BAD_REQUEST,
        reason::UNAVAILABLE,
        reason::TIMEOUT,
        reason::IP_LIMIT,
        reason::PENDING_LIMIT,
        reason::USER_RATE,
        reason::REVOKED,
        reason::CHANNEL_LIMIT,
        reason::CHANNEL_FULL,
    ] {
        rejections.with_label_values(&[r]);
    }
    rejections
}

/// The Kafka ingest families.
struct IngestFamilies {
    events: IntCounterVec,
    dlq: IntCounterVec,
    lag: IntGaugeVec,
    latency: Histogram,
    failed: IntGauge,
}

impl IngestFamilies {
    fn new(registry: &Registry) -> Self {
        IngestFamilies {
            events: counter_vec(
                registry,
                "hub_ingest_events_total",
                "Kafka records handled by ingest, by outcome (published, duplicate, filtered, dlq)",
                &["topic", "outcome"],
            ),
            dlq: counter_vec(
                registry,
                "hub_ingest_dlq_total",
                "Kafka records sent to the topic's DLQ",
                &["topic"],
            ),
            lag: gauge_vec(
                registry,
                "hub_ingest_consumer_lag",
                "Records behind the partition's end",
                &["topic", "partition"],
            ),
            failed: gauge(
                registry,
                "hub_ingest_failed",
                "1 when Kafka ingest has stopped on a failure retrying cannot mend (credentials or certificate refused, a partition worker stopped); the node goes on serving",
            ),
            latency: histogram(
                registry,
                "hub_ingest_latency_seconds",
                "From the Kafka record's timestamp to the notification in history",
                &[
                    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                ],
            ),
        }
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        let (ws, sse) = transport_metrics(&registry);
        let published = counter_vec(
            &registry,
            "hub_notifications_published_total",
            "Notifications accepted into history",
            &["source"],
        );
        let resumes = counter_vec(
            &registry,
            "hub_resumes_total",
            "Connections that asked to resume, by outcome (replayed or gap)",
            &["outcome"],
        );
        resumes.with_label_values(&["replayed"]);
        resumes.with_label_values(&["gap"]);
        let backplane_lag = prometheus::Gauge::new(
            "hub_backplane_lag_seconds",
            "Acceptance to receipt by this node of the latest backplane message",
        )
        .unwrap_or_else(|e| panic!("metric hub_backplane_lag_seconds: {e}"));
        register(&registry, Box::new(backplane_lag.clone()));
        let counter = |name, help| counter(&registry, name, help);
        let inner = Inner {
            ws,
            sse,
            rejections: rejection_counter(&registry),
            published_api: published.with_label_values(&["api"]),
            published_kafka: published.with_label_values(&["kafka"]),
            publish_duplicates: counter(
                "hub_publish_duplicates_total",
                "Publishes answered from an idempotency key without publishing",
            ),
            delivery_latency: histogram(
                &registry,
                "hub_delivery_latency_seconds",
                "From acceptance by the hub to the write to the client socket",
                &[
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            slow_consumers: counter(
                "hub_slow_consumer_disconnects_total",
                "Connections dropped because their send queue was full",
            ),
            api_disconnects: counter(
                "hub_api_disconnects_total",
                "Connections closed by the disconnect API",
            ),
            inbound_rate_closes: counter(
                "hub_inbound_rate_closes_total",
                "WebSocket connections closed for sending messages faster than allowed",
            ),
            resumes,
            write_timeouts: counter(
                "hub_write_timeouts_total",
                "Connections closed because a socket write made no progress in time",
            ),
            backplane_reconnects: counter(
                "hub_backplane_reconnects_total",
                "Reconnects of this node's backplane pub/sub connection",
            ),
            backplane_lag,
            backplane_shard_up: gauge_vec(
                &registry,
                "hub_backplane_shard_up",
                "Whether each Redis Cluster master answered this node's last probe (1) or not (0)",
                &["shard"],
            ),
            backplane_shard_recoveries: counter_vec(
                &registry,
                "hub_backplane_shard_recoveries_total",
                "Times a Redis Cluster master answered this node's probe again after failing it",
                &["shard"],
            ),
            presence_reports: counter(
                "hub_presence_reports_total",
                "Users (and channel members) whose connection count on this node was written to the backplane's presence",
            ),
            channels: gauge(
                &registry,
                "hub_channels",
                "Channels with at least one subscribed connection on this node",
            ),
            channel_subscriptions: gauge(
                &registry,
                "hub_channel_subscriptions",
                "Channel subscriptions of this node's connections",
            ),
            channel_refusals: labelled_from_start(
                counter_vec(
                    &registry,
                    "hub_channel_refusals_total",
                    "Channel subscriptions refused, by reason",
                    &["reason"],
                ),
                &["token", "limit", "full", "unavailable"],
            ),
            presence_requests: labelled_from_start(
                counter_vec(
                    &registry,
                    "hub_presence_requests_total",
                    "Presence API requests, by kind (user, channel)",
                    &["kind"],
                ),
                &["user", "channel"],
            ),
            ingest: IngestFamilies::new(&registry),
            registry,
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// The children for WebSocket connections (`transport="ws"`).
    pub fn ws(&self) -> &TransportMetrics {
        &self.inner.ws
    }

    /// The children for SSE connections (`transport="sse"`).
    pub fn sse(&self) -> &TransportMetrics {
        &self.inner.sse
    }

    /// Counts a refused handshake.
    pub fn rejected(&self, reason: &'static str) {
        self.inner.rejections.with_label_values(&[reason]).inc();
    }

    /// Counts an accepted notification by source.
    pub fn published_api(&self) -> &IntCounter {
        &self.inner.published_api
    }

    /// Counts a Kafka-sourced notification.
    pub fn published_kafka(&self) -> &IntCounter {
        &self.inner.published_kafka
    }

    /// Counts an idempotent repeat.
    pub fn publish_duplicates(&self) -> &IntCounter {
        &self.inner.publish_duplicates
    }

    /// Acceptance → socket write.
    pub fn delivery_latency(&self) -> &Histogram {
        &self.inner.delivery_latency
    }

    /// Slow-consumer disconnects.
    pub fn slow_consumers(&self) -> &IntCounter {
        &self.inner.slow_consumers
    }

    /// Connections closed by the disconnect API.
    pub fn api_disconnects(&self) -> &IntCounter {
        &self.inner.api_disconnects
    }

    /// WebSocket connections closed for an inbound message flood.
    pub fn inbound_rate_closes(&self) -> &IntCounter {
        &self.inner.inbound_rate_closes
    }

    /// Stalled writes.
    pub fn write_timeouts(&self) -> &IntCounter {
        &self.inner.write_timeouts
    }

    /// Backplane pub/sub reconnects.
    pub fn backplane_reconnects(&self) -> &IntCounter {
        &self.inner.backplane_reconnects
    }

    /// Presence counts this node wrote to Redis.
    pub fn presence_reports(&self) -> &IntCounter {
        &self.inner.presence_reports
    }

    /// `hub_channels` (handed to the fan-out, which keeps it).
    pub fn channels(&self) -> &IntGauge {
        &self.inner.channels
    }

    /// `hub_channel_subscriptions` (handed to the fan-out, which keeps it).
    pub fn channel_subscriptions(&self) -> &IntGauge {
        &self.inner.channel_subscriptions
    }

    /// Counts a refused channel subscription: `token` (no grant, bad or foreign token),
    /// `limit` (channels per connection), `full` (subscribers per channel on this node),
    /// `unavailable` (backplane).
    pub fn channel_refused(&self, reason: &str) {
        self.inner
            .channel_refusals
            .with_label_values(&[reason])
            .inc();
    }

    /// Counts a presence request of `kind` (`user` or `channel`).
    pub fn presence_requested(&self, kind: &str) {
        self.inner
            .presence_requests
            .with_label_values(&[kind])
            .inc();
    }

    /// Per Redis Cluster master: answered the last probe.
    pub fn backplane_shard_up(&self) -> &IntGaugeVec {
        &self.inner.backplane_shard_up
    }

    /// Per Redis Cluster master: recoveries after a failed probe.
    pub fn backplane_shard_recoveries(&self) -> &IntCounterVec {
        &self.inner.backplane_shard_recoveries
    }

    /// Backplane pub/sub lag.
    pub fn backplane_lag(&self) -> &prometheus::Gauge {
        &self.inner.backplane_lag
    }

    /// Handles for Kafka ingest of `topics`, each topic's counters resolved once.
    pub fn ingest(&self, topics: &[String]) -> IngestMetrics {
        let f = &self.inner.ingest;
        let topics = topics
            .iter()
            .map(|t| {
                let outcome = |o: &str| f.events.with_label_values(&[t.as_str(), o]);
                let counters = TopicCounters {
                    published: outcome("published"),
                    duplicate: outcome("duplicate"),
                    filtered: outcome("filtered"),
                    dlq_outcome: outcome("dlq"),
                    dlq: f.dlq.with_label_values(&[t.as_str()]),
                };
                (t.clone(), counters)
            })
            .collect();
        IngestMetrics {
            topics: Arc::new(topics),
            lag: f.lag.clone(),
            latency: f.latency.clone(),
            published: self.inner.published_kafka.clone(),
            failed: f.failed.clone(),
        }
    }

    /// Counts a resume by outcome.
    pub fn resumed(&self, gap: bool) {
        let outcome = if gap { "gap" } else { "replayed" };
        self.inner.resumes.with_label_values(&[outcome]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding our own well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exposed() {
        let m = Metrics::new();
        m.ws().connections.inc();
        m.delivery_latency().observe(0.001);
        let text = m.render();
        for name in [
            "hub_connections{transport=\"ws\"}",
            "hub_connections{transport=\"sse\"}",
            "hub_connections_total{transport=\"ws\"}",
            "hub_handshake_rejections_total{reason=\"invalid_token\"}",
            "hub_notifications_published_total{source=\"api\"}",
            "hub_messages_delivered_total{transport=\"sse\"}",
            "hub_delivery_latency_seconds_bucket",
            "hub_slow_consumer_disconnects_total",
            "hub_resumes_total{outcome=\"gap\"}",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
