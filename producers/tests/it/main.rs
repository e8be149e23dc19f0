//! Integration tests of the producer services on real PostgreSQL and Kafka, with a real hub
//! and real WebSocket / SSE clients (and, in `browser`, headless Chromium).

mod browser;
mod cli;
mod consumers;
mod edge;
mod helpers;
mod kafka_sasl;
mod moderation;
mod outbox;
mod replicated;
mod saga;
mod trace_context;
