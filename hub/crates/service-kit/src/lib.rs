//! What the hub and the services share at start and in their retry loops, so that a setting
//! error, a log line, a stop signal and a retry look the same in every process.
//!
//! # Layout
//! - [`settings`]: the one-line setting error, range checks and the serde helpers for values
//!   that come from the environment or a TOML file.
//! - [`telemetry`]: log lines (text or JSON) filtered by an `EnvFilter` directive.
//! - [`signal`]: the stop signal (SIGINT or SIGTERM).
//! - [`backoff`]: capped exponential retry delays.
//! - [`http`]: the one error type of the HTTP APIs, answered as `{"error": "..."}`.

pub mod backoff;
pub mod http;
pub mod settings;
pub mod signal;
pub mod telemetry;

pub use backoff::Backoff;
pub use settings::{ConfigError, LogFormat};
