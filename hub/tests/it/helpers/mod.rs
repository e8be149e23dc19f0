//! Test harness of the hub suite. What the producers' suite needs as well (the in-process
//! node, the WebSocket and SSE clients, Kafka topics, deadlines, signals, temp dirs) lives in
//! the `test-support` crate; this holds what only the hub's tests use.
//!
//! # Layout
//! - [`app`]: a node in-process with random credentials, its HTTP API and metrics.
//! - [`clients`]: both transports opened and read the same way; refusals on both.
//! - [`kafka`]: topics with a random suffix, producing records, committed offsets.
//! - [`processes`]: the `hub` binary as `serve` and `ingest` processes.
//! - [`redis`]: the shared Redis with a key prefix, or a private server.
//! - [`tokens`]: tokens signed by the tests, independent of the hub's JWT library.

use std::path::PathBuf;

pub mod app;
pub mod clients;
pub mod kafka;
pub mod processes;
pub mod redis;
pub mod tokens;

/// Path of a test fixture.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
