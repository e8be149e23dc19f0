//! The notification hub: a node that authenticates clients at the handshake, keeps a short
//! per-user history, and pushes notifications over WebSocket and Server-Sent Events.
//!
//! # Layout
//!
//! - [`config`]: typed settings from `HUB_*` variables and an optional TOML file.
//! - [`auth`]: JWT verification (secret, PEM key, JWKS) and the origin policy.
//! - [`envelope`]: the wire envelope, notification ids and stream names (users, channels),
//!   rendered once per notification.
//! - [`cursor`]: the one cursor, a connection's position in every stream it follows.
//! - [`sharded`]: the map in independently locked shards that the registry and the in-process
//!   history share.
//! - [`fanout`]: the local registry stream → connections and bounded per-connection queues.
//! - [`backplane`]: where notifications are accepted, stored and routed (in memory for one
//!   node, Redis for many).
//! - [`transport`]: the front door, the handshake, and WebSocket / SSE connections.
//! - [`ingest`]: Kafka consumer, config-driven routes, dedupe, DLQ, commits.
//! - [`api`]: publish API (single, batch), disconnect API, health, readiness, metrics, dev
//!   login, demo page.
//! - [`grpc`]: the gRPC publish API (`Publish`, `PublishBatch`, `PublishStream`).
//! - [`metrics`]: every metric, defined once.
//! - [`shutdown`]: the drain state.
//! - [`app`]: builds a node from settings and runs it until drained.

pub mod api;
pub mod app;
pub mod auth;
pub mod backplane;
pub mod config;
pub mod cursor;
pub mod envelope;
pub mod fanout;
pub mod grpc;
pub mod ingest;
pub mod metrics;
pub mod sharded;
pub mod shutdown;
pub mod transport;
