//! Log lines for a process: one `EnvFilter` directive, text or JSON.

use std::io::IsTerminal as _;

use crate::settings::LogFormat;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// Standard output (the hub: its logs are its output).
    Stdout,
    /// Standard error (the services: stdout carries only the line scripts wait for).
    Stderr,
}

/// Installs the global subscriber. A directive that does not parse falls back to `info`
/// (the settings have already been validated; this only guards the default). Colour only for
/// a terminal: a log file or pipe gets plain text, so `grep trace_id=...` finds its lines.
pub fn init(directive: &str, format: LogFormat, output: LogOutput) {
    let filter = tracing_subscriber::EnvFilter::try_new(directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match output {
        LogOutput::Stdout => {
            let b = builder
                .with_target(false)
                .with_ansi(std::io::stdout().is_terminal());
            match format {
                LogFormat::Json => b.json().init(),
                LogFormat::Text => b.init(),
            }
        }
        LogOutput::Stderr => {
            let b = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr);
            match format {
                LogFormat::Json => b.json().init(),
                LogFormat::Text => b.init(),
            }
        }
    }
}
