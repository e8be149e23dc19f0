//! Test harness of the producers' suite: a fresh PostgreSQL database per service, the saga's
//! Kafka topics under a random prefix, the service binaries as real processes (so they can be
//! killed), a hub node in-process ingesting the test's topics, and clients that collect
//! envelopes. What the hub's suite needs as well lives in the `test-support` crate.
//!
//! Services: PostgreSQL from `PRODUCERS_TEST_DATABASE_URL` (an admin URL that may create
//! databases; default `postgres://notify:notify@127.0.0.1:5432/postgres`), Kafka from
//! `HUB_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`). `make test` starts both.
//!
//! # Layout
//! - [`stack`]: everything one test runs: databases, topics, the four services, a hub.
//! - [`databases`]: a PostgreSQL database per service per test.
//! - [`kafka`]: the saga's topics under a random prefix; produce, read back; a private broker.
//! - [`processes`]: the service binaries as real processes.
//! - [`hub`]: the in-process hub with routes on the test's topics.
//! - [`clients`]: WebSocket and SSE clients that collect envelopes.
//! - [`http`]: calls to the services' APIs and their metrics.
//! - [`tokens`]: tokens for the hub and for each service's audience.

use std::path::PathBuf;
use std::time::Duration;

pub mod clients;
pub mod databases;
pub mod http;
pub mod hub;
pub mod kafka;
pub mod processes;
pub mod stack;
pub mod tokens;

/// How long one expected event may take.
pub const STEP: Duration = Duration::from_secs(20);

/// Where tests write logs and screenshots: `target/test-output/<name>`.
pub fn output_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-output")
        .join(name);
    std::fs::create_dir_all(&dir).expect("output dir");
    dir
}
