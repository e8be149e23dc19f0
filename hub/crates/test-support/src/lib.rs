//! What the integration tests of the hub and of the producer services share, so that both
//! suites start a hub, read a stream, name a topic and wait on a condition the same way.
//!
//! # Layout
//! - [`app`]: a hub node running inside the test's runtime on a random port.
//! - [`clients`]: a WebSocket and an SSE client that read envelopes with a deadline.
//! - [`kafka`]: the test broker, topics created and deleted by name, reading a topic back.
//! - [`cluster`]: the three-broker test cluster: replicated topics, killing and restarting a
//!   broker, consumer group members.
//! - [`process`]: child processes: free ports, signals, waiting for a listener or an exit.
//! - [`files`]: temporary directories and the files tests write into them.
//! - [`wait`]: waiting on a condition with a deadline instead of sleeping and hoping.

use std::time::Duration;

pub mod app;
pub mod clients;
pub mod cluster;
pub mod files;
pub mod kafka;
pub mod process;
pub mod wait;

/// How long any single expected event may take.
pub const STEP: Duration = Duration::from_secs(10);

/// `bytes` random bytes as lower-case hex: a suffix no other test run uses.
pub fn hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Asserts an API refusal: `status` is `expected` and the JSON body's `error` names `needle`.
pub fn assert_refused(status: u16, body: &serde_json::Value, expected: u16, needle: &str) {
    assert_eq!(status, expected, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(needle),
        "expected an error naming {needle:?}: {body}"
    );
}
