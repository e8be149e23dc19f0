//! The line protocol between the parent and its worker processes.
//!
//! The parent writes [`Command`]s to a worker's stdin and the worker answers with
//! [`Event`]s on stdout, one JSON object per line each way. The worker's configuration
//! travels as the first command rather than as arguments so the JWT secret does not
//! show up in `ps`.

use std::io::Write;
use std::net::IpAddr;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::conn::Layout;
use crate::stats::{DeliveryCounters, ErrorTally};
use crate::streams::StreamPlan;
use crate::target::HubAddr;

/// Everything a worker needs to open and track its slice of connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Worker number, 0-based.
    pub worker: usize,
    /// First connection index (over all workers) this worker opens.
    pub first: usize,
    /// One past the last connection index this worker opens.
    pub end: usize,
    /// How connections map to users, hubs, transports and sources.
    pub layout: Layout,
    /// Resolved hub nodes.
    pub hubs: Vec<HubAddr>,
    /// Local addresses to bind, round-robin.
    pub source_ips: Vec<IpAddr>,
    /// Explicit local port base: connection j binds BASE + j.
    #[serde(default)]
    pub source_port_base: Option<u16>,
    /// User name prefix.
    pub user_prefix: String,
    /// HS256 secret for connection tokens.
    pub jwt_secret: String,
    /// Token lifetime in seconds.
    pub token_ttl_secs: u64,
    /// Handshakes in flight at once.
    pub connect_concurrency: usize,
    /// Limit for one connection attempt, up to its hub.connected, in ms.
    pub connect_timeout_ms: u64,
    /// Limit for the whole connect phase, in ms.
    pub max_connect_ms: u64,
    /// Hard limit for the worker's whole life, in ms; it exits when this passes.
    pub deadline_ms: u64,
    /// The streams: which channels each connection holds and how they are numbered.
    pub streams: StreamPlan,
    /// The resumes: which connections drop mid-run and come back.
    pub resume: ResumeSpec,
}

/// Which connections disconnect in the publishing window and resume from their last id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResumeSpec {
    /// Fraction of the connections that do (0 = none).
    pub fraction: f64,
    /// How long a connection stays away before it reconnects, ms.
    pub offline_ms: u64,
    /// Length of the publishing window, ms (the drops fall in its middle half).
    pub window_ms: u64,
}

/// Parent → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// First line: what to do.
    Configure(Box<WorkerSpec>),
    /// Publishing begins now.
    Start,
    /// Publishing has ended; wait for stragglers, then answer `drained`.
    Drain {
        /// Successfully published notifications per user index.
        published: Vec<u64>,
        /// How long to wait for missing deliveries, in ms.
        timeout_ms: u64,
    },
    /// Every worker has drained: close the connections and send the final report.
    Finish,
}

/// Worker → parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Periodic progress during the connect phase.
    Progress {
        /// Worker number.
        worker: usize,
        /// Connections established so far.
        established: u64,
        /// Connection attempts failed so far.
        failed: u64,
    },
    /// The connect phase is over.
    Connected(ConnectedReport),
    /// The drain is over; the connections stay open until `finish`.
    Drained {
        /// Worker number.
        worker: usize,
        /// The worker's CPU time at the end of its drain, ms.
        cpu_ms: u64,
    },
    /// Final counters after the drain.
    Report(Box<FinalReport>),
    /// The worker gave up.
    Failed {
        /// Worker number.
        worker: usize,
        /// What went wrong.
        message: String,
    },
}

/// A worker's connect-phase figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectedReport {
    /// Worker number.
    pub worker: usize,
    /// Connections this worker was assigned.
    pub assigned: u64,
    /// Connections attempted.
    pub attempted: u64,
    /// Connections that got their hub.connected.
    pub established: u64,
    /// Assigned connections that did not get established.
    pub failed: u64,
    /// Established connections per hub index.
    pub established_per_hub: Vec<u64>,
    /// Why connections failed.
    pub errors: ErrorTally,
    /// When the first attempt started, µs since the Unix epoch (0 if none).
    pub first_attempt_us: u64,
    /// When the last hub.connected arrived, µs since the Unix epoch (0 if none).
    pub last_connected_us: u64,
    /// The worker's resident memory after connecting, KiB.
    pub rss_kib: u64,
}

/// A worker's final figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalReport {
    /// Worker number.
    pub worker: usize,
    /// Delivery and loss counters.
    pub delivery: DeliveryCounters,
    /// Connections that ended before the run told them to.
    pub disconnects: u64,
    /// Why they ended.
    pub disconnect_errors: ErrorTally,
    /// `hub.gap` envelopes, by kind (`personal`, `channel`) with the channels as samples.
    #[serde(default)]
    pub gaps: ErrorTally,
    /// Why resumes failed.
    #[serde(default)]
    pub resume_errors: ErrorTally,
    /// SSE comment lines (heartbeats) received.
    pub sse_comments: u64,
    /// How long the drain took, ms.
    pub drain_ms: u64,
    /// The worker's CPU time, ms.
    pub cpu_ms: u64,
    /// The worker's resident memory at the end, KiB.
    pub rss_kib: u64,
    /// Delivery latency histogram, base64 of HdrHistogram V2.
    pub latency: String,
}

/// Parses one line received over the pipe.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T> {
    serde_json::from_str(line).with_context(|| {
        let mut shown = line.to_owned();
        crate::stats::truncate_on_char_boundary(&mut shown, 200);
        format!("bad protocol line {shown:?}")
    })
}

/// Writes `message` as one line and flushes, so the other side sees it at once.
pub fn send_line<T: Serialize>(out: &mut impl Write, message: &T) -> Result<()> {
    let mut line = serde_json::to_vec(message).context("encoding protocol line")?;
    line.push(b'\n');
    out.write_all(&line).context("writing protocol line")?;
    out.flush().context("flushing protocol line")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::TransportMode;
    use crate::streams::Scenario;

    #[test]
    fn commands_round_trip_as_single_lines() -> Result<()> {
        let spec = WorkerSpec {
            worker: 1,
            first: 100,
            end: 200,
            layout: Layout {
                connections: 300,
                users: 300,
                hubs: 1,
                publish_any: false,
                mode: TransportMode::Mixed,
                sources: 1,
            },
            hubs: vec![HubAddr {
                url: "http://127.0.0.1:8080".into(),
                authority: "127.0.0.1:8080".into(),
                prefix: String::new(),
                addr: "127.0.0.1:8080".parse()?,
            }],
            source_ips: vec!["127.0.0.2".parse()?],
            source_port_base: None,
            user_prefix: "lt-".into(),
            jwt_secret: "s".into(),
            token_ttl_secs: 3600,
            connect_concurrency: 256,
            connect_timeout_ms: 10_000,
            max_connect_ms: 60_000,
            deadline_ms: 120_000,
            streams: StreamPlan::new(Scenario::Mixed, 300, 4, "load:"),
            resume: ResumeSpec {
                fraction: 0.1,
                offline_ms: 1000,
                window_ms: 20_000,
            },
        };
        for command in [
            Command::Configure(Box::new(spec)),
            Command::Start,
            Command::Drain {
                published: vec![3, 0, 7],
                timeout_ms: 5000,
            },
            Command::Finish,
        ] {
            let mut out = Vec::new();
            send_line(&mut out, &command)?;
            let text = String::from_utf8(out)?;
            assert_eq!(text.matches('\n').count(), 1);
            assert_eq!(decode::<Command>(&text)?, command);
        }
        assert_eq!(decode::<Command>(r#"{"cmd":"start"}"#)?, Command::Start);
        Ok(())
    }

    #[test]
    fn events_are_tagged() -> Result<()> {
        let event = Event::Connected(ConnectedReport {
            worker: 2,
            established: 5,
            ..Default::default()
        });
        let text = serde_json::to_string(&event)?;
        assert!(
            text.starts_with(r#"{"event":"connected","worker":2"#),
            "{text}"
        );
        assert_eq!(decode::<Event>(&text)?, event);
        assert!(decode::<Event>(r#"{"event":"nope"}"#).is_err());
        assert_eq!(
            decode::<Event>(r#"{"event":"drained","worker":1,"cpu_ms":250}"#)?,
            Event::Drained {
                worker: 1,
                cpu_ms: 250
            }
        );
        Ok(())
    }
}
