//! The services that feed the hub: order, payment, delivery and moderation. Each is its own
//! binary with its own PostgreSQL database; they talk only through Kafka, and every event they
//! emit goes through a transactional outbox.
//!
//! # Layout
//!
//! - [`config`]: typed settings per service (`ORDER_*`, `PAYMENT_*`, ...), validated at start.
//! - [`auth`]: the user of a REST request, from the hub's HS256 JWT.
//! - [`http`]: error responses, health/readiness/metrics routes, CORS, body limit, timeouts,
//!   request ids, the listener.
//! - [`openapi`]: what the OpenAPI documents of the two REST APIs share; served at
//!   `GET /api/openapi.json`.
//! - [`trace`]: W3C trace context, carried from the order API through the outbox and Kafka
//!   headers.
//! - [`limit`]: per-user rate limits of the REST APIs.
//! - [`kafka`]: Kafka client config (brokers, security) and the runtime's context that notices a
//!   refused authentication or an untrusted broker certificate.
//! - [`db`]: pool, migrations, the processed-events claim of idempotent consumers.
//! - [`outbox`]: writing events in the caller's transaction; the relay that publishes them.
//! - [`consumer`]: a service's handler on the workspace's Kafka runtime: a transaction per
//!   record, claimed once.
//! - [`metrics`]: every metric, defined once.
//! - [`topics`]: topic names.
//! - [`order`], [`payment`], [`delivery`], [`moderation`]: the four services.
//! - [`service`]: builds a service from its parts and runs it until SIGTERM/SIGINT.

pub mod auth;
pub mod config;
pub mod consumer;
pub mod db;
pub mod delivery;
pub mod http;
pub mod kafka;
pub mod limit;
pub mod metrics;
pub mod moderation;
pub mod openapi;
pub mod order;
pub mod outbox;
pub mod payment;
pub mod service;
pub mod trace;

/// Kafka topics of the saga (before the configured prefix). Keys: the order id for the order
/// saga, the report id for moderation, so each order's or report's events stay in one
/// partition, in order.
pub mod topics {
    /// `OrderCreated`, by the order service.
    pub const ORDER_CREATED: &str = "order.created";
    /// `PaymentCompleted`, by the payment service.
    pub const PAYMENT_COMPLETED: &str = "payment.completed";
    /// `DeliveryStatusUpdated`, by the delivery service.
    pub const DELIVERY_STATUS_UPDATED: &str = "delivery.status.updated";
    /// `OrderStatusChanged`, by the order service; the hub turns it into `order.status`.
    pub const ORDER_STATUS_CHANGED: &str = "order.status.changed";
    /// `ModerationTask`, by the moderation API.
    pub const MODERATION_TASKS: &str = "moderation.tasks";
    /// `ModerationResult`, by the moderation workers; the hub turns it into `moderation.result`.
    pub const MODERATION_RESULTS: &str = "moderation.results";
    /// Where a consumer puts records it cannot handle.
    pub use kafka_runtime::dlq::topic as dlq;
}

/// A fresh event id.
pub fn event_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Now, as a protobuf timestamp.
pub fn now() -> proto::Timestamp {
    proto::timestamp(std::time::SystemTime::now())
}
