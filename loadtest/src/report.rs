//! The final report: merging the workers' figures with the parent's, and rendering
//! them as a human summary ([`fmt::Display`]) or JSON ([`serde::Serialize`]).

use std::fmt;
use std::time::Duration;

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::RunArgs;
use crate::conn::TransportMode;
use crate::cpu::{CpuReport, CpuSamples};
use crate::ipc::{ConnectedReport, FinalReport};
use crate::publish::{PublishMode, PublishOutcome};
use crate::run::Plan;
use crate::stats::{
    DeliveryCounters, ErrorTally, LatencySummary, add_per_hub, decode_histogram, merge_histogram,
    new_histogram,
};
use crate::streams::Scenario;

/// RSS of one hub process before connecting and after the hold.
#[derive(Debug, Clone, Copy)]
pub struct ServerRss {
    /// Hub index the pid pairs with.
    pub hub: usize,
    /// The pid.
    pub pid: u32,
    /// VmRSS before connecting, KiB.
    pub before_kib: u64,
    /// VmRSS after the hold, KiB.
    pub after_kib: u64,
}

/// Everything measured during a run, as input to [`build`].
pub struct Measurements<'a> {
    /// The command line.
    pub args: &'a RunArgs,
    /// The derived plan.
    pub plan: &'a Plan,
    /// Each worker's connect-phase report.
    pub connected: &'a [ConnectedReport],
    /// Each worker's final report.
    pub finals: &'a [FinalReport],
    /// What publishing achieved.
    pub publish: &'a PublishOutcome,
    /// Server memory readings.
    pub servers: Vec<ServerRss>,
    /// Server CPU readings around the publishing window, with `--cpu-pid`.
    pub cpu: Option<CpuSamples>,
    /// The parent's own CPU time.
    pub parent_cpu: Duration,
    /// The parent's own RSS, KiB.
    pub parent_rss_kib: u64,
}

/// The run's settings, echoed for the record.
#[derive(Debug, Serialize)]
pub struct Setup {
    /// Hub URLs.
    pub hubs: Vec<String>,
    /// Transport choice.
    pub transport: TransportMode,
    /// Connections requested.
    pub connections: usize,
    /// Distinct users.
    pub users: usize,
    /// Worker processes.
    pub processes: usize,
    /// Target publish rate, per second.
    pub rate: f64,
    /// Publishing time, s.
    pub duration_secs: f64,
    /// Hold time, s.
    pub hold_secs: f64,
    /// Drain limit, s.
    pub drain_secs: f64,
    /// Whether connections and publishes were spread over hubs regardless of user.
    pub publish_any: bool,
    /// Hub URLs the publish requests went to instead of `hubs`, if any.
    pub publish_via: Vec<String>,
    /// Single or batched publish requests.
    pub publish_mode: PublishMode,
    /// Notifications per batch request; absent for single publishes.
    pub batch_size: Option<u32>,
    /// Number of source addresses.
    pub source_ips: usize,
    /// What the connections listen to.
    pub scenario: Scenario,
    /// The channels' names.
    pub channels: Vec<String>,
    /// Publishes per second to each channel.
    pub channel_rate: f64,
    /// Whether WebSocket connections joined their group channel by a `subscribe` message.
    pub subscribe_groups: bool,
    /// Fraction of the connections that dropped and resumed.
    pub resume_fraction: f64,
    /// How long they stayed away, s.
    pub offline_secs: f64,
}

/// Connect-phase figures.
#[derive(Debug, Serialize)]
pub struct Connections {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections that received hub.connected.
    pub established: u64,
    /// Connections not established.
    pub failed: u64,
    /// Why they failed.
    pub errors: ErrorTally,
    /// From the first attempt to the last hub.connected, s.
    pub connect_secs: f64,
    /// Established connections per second over `connect_secs`.
    pub connect_rate: f64,
    /// Established connections per hub index.
    pub established_per_hub: Vec<u64>,
}

/// Memory of one hub process.
#[derive(Debug, Serialize)]
pub struct ServerMemory {
    /// Hub URL.
    pub hub: String,
    /// Process id.
    pub pid: u32,
    /// VmRSS before connecting, KiB.
    pub rss_before_kib: u64,
    /// VmRSS after the hold, KiB.
    pub rss_after_kib: u64,
    /// Established connections on that hub.
    pub connections: u64,
    /// (after − before) / connections, KiB; absent without connections.
    pub kib_per_connection: Option<f64>,
}

/// Publishing figures.
#[derive(Debug, Serialize)]
pub struct Publishing {
    /// Target rate, per second.
    pub target_rate: f64,
    /// Publishes answered 200.
    pub ok: u64,
    /// Publishes that failed.
    pub failed: u64,
    /// Why they failed.
    pub errors: ErrorTally,
    /// Publishing time, s.
    pub secs: f64,
    /// ok / secs.
    pub achieved_rate: f64,
    /// Requests answered 200 (fewer than `ok` when batching).
    pub requests_ok: u64,
    /// Concurrent senders used.
    pub senders: usize,
    /// Publish request round trip.
    pub request_latency: LatencySummary,
}

/// Delivery figures.
#[derive(Debug, Serialize)]
pub struct Delivery {
    /// Counters merged over all workers.
    #[serde(flatten)]
    pub counters: DeliveryCounters,
    /// Publishing time plus the longest drain, s.
    pub window_secs: f64,
    /// The longest worker drain, s.
    pub drain_secs: f64,
    /// deliveries / window_secs.
    pub per_sec: f64,
    /// Publish-to-receipt latency.
    pub latency: LatencySummary,
    /// SSE heartbeat comments received.
    pub sse_heartbeats: u64,
    /// `hub.gap` envelopes by stream kind, with channel names as samples.
    pub gap_streams: ErrorTally,
    /// Why resumes failed.
    pub resume_errors: ErrorTally,
}

/// Connections that ended before the run stopped them.
#[derive(Debug, Serialize)]
pub struct Disconnects {
    /// How many.
    pub count: u64,
    /// Why.
    pub errors: ErrorTally,
}

/// The load generator's own resource use.
#[derive(Debug, Serialize)]
pub struct Loadgen {
    /// CPU time of the parent and all workers, s.
    pub cpu_secs: f64,
    /// The parent's RSS at the end, KiB.
    pub parent_rss_kib: u64,
    /// The workers' RSS after connecting, summed, KiB.
    pub workers_rss_kib: u64,
}

/// All figures of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Settings.
    pub setup: Setup,
    /// Connect phase.
    pub connections: Connections,
    /// Hub process memory.
    pub servers: Vec<ServerMemory>,
    /// Publishing.
    pub publish: Publishing,
    /// Deliveries.
    pub delivery: Delivery,
    /// Unexpected disconnects.
    pub disconnects: Disconnects,
    /// Own resource use.
    pub loadgen: Loadgen,
    /// Server CPU per delivery, with `--cpu-pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuReport>,
}

/// `n / secs`, or 0 when no time passed.
fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Merges the measurements into a report.
pub fn build(m: &Measurements<'_>) -> Result<Report> {
    let connections = merge_connected(m.connected);
    let servers = server_memory(m, &connections.established_per_hub);
    let totals = WorkerTotals::merge(m.finals, m.parent_cpu)?;
    let publish = publishing(m.args, m.plan, m.publish);
    let drain_secs = totals.drain_ms as f64 / 1000.0;
    let window_secs = publish.secs + drain_secs;
    let counters = totals.counters;
    Ok(Report {
        setup: setup(m.args, m.plan),
        connections,
        servers,
        publish,
        cpu: m.cpu.as_ref().map(|c| c.report(counters.deliveries)),
        delivery: Delivery {
            per_sec: per_sec(counters.deliveries, window_secs),
            counters,
            window_secs,
            drain_secs,
            latency: LatencySummary::from_histogram(&totals.latency),
            sse_heartbeats: totals.sse_heartbeats,
            gap_streams: totals.gaps,
            resume_errors: totals.resume_errors,
        },
        disconnects: totals.disconnects,
        loadgen: Loadgen {
            cpu_secs: totals.cpu.as_secs_f64(),
            parent_rss_kib: m.parent_rss_kib,
            workers_rss_kib: m.connected.iter().map(|r| r.rss_kib).sum(),
        },
    })
}

/// The run's settings as the report echoes them.
fn setup(args: &RunArgs, plan: &Plan) -> Setup {
    Setup {
        hubs: args.hubs.clone(),
        transport: args.transport,
        connections: plan.layout.connections,
        users: plan.layout.users,
        processes: plan.processes,
        rate: args.rate,
        duration_secs: args.duration.as_secs_f64(),
        hold_secs: args.hold.as_secs_f64(),
        drain_secs: args.drain.as_secs_f64(),
        publish_any: args.publish_any,
        publish_via: args.publish_via.clone(),
        publish_mode: args.publish_mode,
        batch_size: (args.publish_mode == PublishMode::Batch).then_some(args.batch_size),
        source_ips: args.source_ips.len(),
        scenario: args.scenario,
        channels: plan.streams.channel_names(),
        channel_rate: args.channel_rate,
        subscribe_groups: plan.streams.subscribe_groups,
        resume_fraction: args.resume_fraction(),
        offline_secs: args.offline.as_secs_f64(),
    }
}

/// Sums the workers' connect-phase reports; the connect time runs from the earliest
/// attempt in any worker to the latest `hub.connected` in any worker.
fn merge_connected(connected: &[ConnectedReport]) -> Connections {
    let mut errors = ErrorTally::default();
    let mut per_hub = Vec::new();
    let (mut attempted, mut established, mut failed) = (0, 0, 0);
    let mut first_attempt = u64::MAX;
    let mut last_connected = 0;
    for r in connected {
        attempted += r.attempted;
        established += r.established;
        failed += r.failed;
        errors.merge(&r.errors);
        add_per_hub(&mut per_hub, &r.established_per_hub);
        if r.first_attempt_us > 0 {
            first_attempt = first_attempt.min(r.first_attempt_us);
        }
        last_connected = last_connected.max(r.last_connected_us);
    }
    let connect_secs = last_connected.saturating_sub(first_attempt) as f64 / 1e6;
    Connections {
        attempted,
        established,
        failed,
        errors,
        connect_secs,
        connect_rate: per_sec(established, connect_secs),
        established_per_hub: per_hub,
    }
}

/// Each `--server-pid` process's memory growth, shared out over its hub's connections.
fn server_memory(m: &Measurements<'_>, per_hub: &[u64]) -> Vec<ServerMemory> {
    m.servers
        .iter()
        .map(|s| {
            let connections = per_hub.get(s.hub).copied().unwrap_or(0);
            let grown = s.after_kib as f64 - s.before_kib as f64;
            ServerMemory {
                hub: m.args.hubs.get(s.hub).cloned().unwrap_or_default(),
                pid: s.pid,
                rss_before_kib: s.before_kib,
                rss_after_kib: s.after_kib,
                connections,
                kib_per_connection: (connections > 0).then(|| grown / connections as f64),
            }
        })
        .collect()
}

/// The publishing figures, against the target rate.
fn publishing(args: &RunArgs, plan: &Plan, publish: &PublishOutcome) -> Publishing {
    let secs = publish.elapsed.as_secs_f64();
    Publishing {
        target_rate: args.rate + args.channel_rate * plan.streams.channels() as f64,
        ok: publish.ok,
        failed: publish.failed,
        errors: publish.errors.clone(),
        secs,
        achieved_rate: per_sec(publish.ok, secs),
        requests_ok: publish.requests_ok,
        senders: publish.senders,
        request_latency: LatencySummary::from_histogram(&publish.request_latency),
    }
}

/// The workers' final reports summed up.
struct WorkerTotals {
    counters: DeliveryCounters,
    latency: Histogram<u64>,
    disconnects: Disconnects,
    /// The longest drain: the workers drain side by side.
    drain_ms: u64,
    sse_heartbeats: u64,
    gaps: ErrorTally,
    resume_errors: ErrorTally,
    /// The workers' CPU time plus the parent's.
    cpu: Duration,
}

impl WorkerTotals {
    fn merge(finals: &[FinalReport], parent_cpu: Duration) -> Result<Self> {
        let mut totals = Self {
            counters: DeliveryCounters::default(),
            latency: new_histogram(),
            disconnects: Disconnects {
                count: 0,
                errors: ErrorTally::default(),
            },
            drain_ms: 0,
            sse_heartbeats: 0,
            gaps: ErrorTally::default(),
            resume_errors: ErrorTally::default(),
            cpu: parent_cpu,
        };
        for r in finals {
            totals.counters.merge(&r.delivery);
            merge_histogram(&mut totals.latency, &decode_histogram(&r.latency)?)?;
            totals.disconnects.count += r.disconnects;
            totals.disconnects.errors.merge(&r.disconnect_errors);
            totals.drain_ms = totals.drain_ms.max(r.drain_ms);
            totals.sse_heartbeats += r.sse_comments;
            totals.gaps.merge(&r.gaps);
            totals.resume_errors.merge(&r.resume_errors);
            totals.cpu += Duration::from_millis(r.cpu_ms);
        }
        Ok(totals)
    }
}

/// Formats KiB as MiB with one decimal.
fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Writes an error tally as indented lines, if it has anything.
fn write_errors(f: &mut fmt::Formatter<'_>, errors: &ErrorTally) -> fmt::Result {
    write_tally(f, "errors", errors)
}

/// Writes a tally as indented lines under `label`, if it has anything.
fn write_tally(f: &mut fmt::Formatter<'_>, label: &str, errors: &ErrorTally) -> fmt::Result {
    if errors.is_empty() {
        return Ok(());
    }
    let counts: Vec<String> = errors
        .counts
        .iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect();
    writeln!(f, "  {label:<11} {}", counts.join(", "))?;
    for sample in &errors.samples {
        writeln!(f, "    e.g.      {sample}")?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.setup;
        writeln!(
            f,
            "== hub-loadgen: {} {} connections, {} users, {} hub(s), {} process(es) ==",
            s.connections,
            s.transport,
            s.users,
            s.hubs.len(),
            s.processes
        )?;
        if s.scenario != Scenario::Personal {
            writeln!(
                f,
                "scenario      {}: channels {} ({}/s each); {:.0}% of connections resume \
                 after {:.1} s away",
                s.scenario,
                s.channels.join(", "),
                s.channel_rate,
                s.resume_fraction * 100.0,
                s.offline_secs
            )?;
            if s.subscribe_groups {
                writeln!(
                    f,
                    "              WebSocket connections join their group by subscribe message"
                )?;
            }
        }
        self.write_connections(f)?;
        self.write_servers(f)?;
        self.write_publish(f)?;
        self.write_delivery(f)?;
        writeln!(f, "disconnects   {} during the run", self.disconnects.count)?;
        write_errors(f, &self.disconnects.errors)?;
        let g = &self.loadgen;
        writeln!(
            f,
            "loadgen       cpu {:.1} s, rss {} workers + {} parent",
            g.cpu_secs,
            mib(g.workers_rss_kib),
            mib(g.parent_rss_kib)
        )?;
        if let Some(cpu) = &self.cpu {
            write!(f, "{cpu}")?;
        }
        Ok(())
    }
}

impl Report {
    /// The connect phase: counts, errors and rate.
    fn write_connections(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.connections;
        writeln!(
            f,
            "connections   {} attempted, {} established, {} failed",
            c.attempted, c.established, c.failed
        )?;
        write_errors(f, &c.errors)?;
        writeln!(
            f,
            "connect       {:.2} s from first attempt to last hub.connected = {:.0} conn/s",
            c.connect_secs, c.connect_rate
        )
    }

    /// One line per hub process measured.
    fn write_servers(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.servers {
            let per_conn = m
                .kib_per_connection
                .map_or_else(|| "n/a".to_owned(), |k| format!("{k:.1} KiB/conn"));
            writeln!(
                f,
                "server rss    {} (pid {}): {} -> {} = {per_conn} over {} conns",
                m.hub,
                m.pid,
                mib(m.rss_before_kib),
                mib(m.rss_after_kib),
                m.connections
            )?;
        }
        Ok(())
    }

    /// What publishing achieved, or that nothing was published.
    fn write_publish(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, p) = (&self.setup, &self.publish);
        if p.ok + p.failed == 0 {
            return writeln!(f, "publish       nothing published");
        }
        writeln!(
            f,
            "publish       {} ok, {} failed in {:.2} s = {:.0}/s (target {}/s, {} senders; \
             request p50 {:.2} ms, p99 {:.2} ms)",
            p.ok,
            p.failed,
            p.secs,
            p.achieved_rate,
            p.target_rate,
            p.senders,
            p.request_latency.p50_ms,
            p.request_latency.p99_ms
        )?;
        if let Some(size) = s.batch_size {
            writeln!(
                f,
                "              {} batch requests of {size} answered 200",
                p.requests_ok
            )?;
        }
        if !s.publish_via.is_empty() {
            writeln!(f, "              via {}", s.publish_via.join(", "))?;
        }
        write_errors(f, &p.errors)
    }

    /// Deliveries, their latency and what was lost.
    fn write_delivery(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.delivery;
        writeln!(
            f,
            "deliveries    {} received of {} expected, {:.0}/s over {:.2} s (drain {:.2} s)",
            d.counters.deliveries, d.counters.expected, d.per_sec, d.window_secs, d.drain_secs
        )?;
        let l = &d.latency;
        if l.count > 0 {
            writeln!(
                f,
                "latency       p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
            )?;
        }
        let c = &d.counters;
        writeln!(
            f,
            "loss          missing {}, duplicates {}, unexpected {}, out of range {}, bad messages {}",
            c.missing, c.duplicates, c.unexpected, c.out_of_range, c.bad_messages
        )?;
        writeln!(
            f,
            "per stream    out of order {}; connections with loss {}, with duplicates {}, \
             out of order {}",
            c.out_of_order,
            c.connections_missing,
            c.connections_with_duplicates,
            c.connections_out_of_order
        )?;
        if c.resumes + c.resume_failures > 0 {
            writeln!(
                f,
                "resumes       {} came back ({} not resumed by the hub), {} failed; {} \
                 notifications replayed (not in the latency)",
                c.resumes, c.resumes_not_resumed, c.resume_failures, c.replayed
            )?;
            write_errors(f, &d.resume_errors)?;
        }
        writeln!(f, "gaps          {} hub.gap", c.gaps)?;
        write_tally(f, "streams", &d.gap_streams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::plan;
    use crate::stats::encode_histogram;
    use anyhow::Context;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: RunArgs,
    }

    /// Two hubs, batched publishing and two `--cpu-pid` processes.
    fn sample_args() -> Result<RunArgs> {
        Ok(Wrapper::try_parse_from([
            "x",
            "--hub",
            "http://a:1",
            "--hub",
            "http://b:1",
            "--jwt-secret",
            "s",
            "--connections",
            "4",
            "--rate",
            "10",
            "--api-key",
            "k",
            "--publish-mode",
            "batch",
            "--batch-size",
            "8",
            "--cpu-pid",
            "node-a=7",
            "--cpu-pid",
            "redis=8",
        ])?
        .args)
    }

    /// Two workers: one established both its connections, the other one of two.
    fn sample_connected() -> [ConnectedReport; 2] {
        [
            ConnectedReport {
                attempted: 2,
                established: 2,
                established_per_hub: vec![1, 1],
                first_attempt_us: 1_000_000,
                last_connected_us: 1_500_000,
                ..Default::default()
            },
            ConnectedReport {
                attempted: 2,
                established: 1,
                failed: 1,
                established_per_hub: vec![1],
                first_attempt_us: 1_100_000,
                last_connected_us: 3_000_000,
                errors: {
                    let mut e = ErrorTally::default();
                    e.record("http 503", "busy");
                    e
                },
                ..Default::default()
            },
        ]
    }

    /// The same two workers' final reports: one got everything, the other missed one
    /// notification and lost a connection.
    fn sample_finals() -> Result<[FinalReport; 2]> {
        let mut h1 = new_histogram();
        h1.record(1000)?;
        let mut h2 = new_histogram();
        h2.record(3000)?;
        Ok([
            FinalReport {
                delivery: DeliveryCounters {
                    deliveries: 10,
                    expected: 10,
                    ..Default::default()
                },
                drain_ms: 500,
                latency: encode_histogram(&h1)?,
                ..Default::default()
            },
            FinalReport {
                delivery: DeliveryCounters {
                    deliveries: 5,
                    expected: 6,
                    missing: 1,
                    ..Default::default()
                },
                disconnects: 1,
                drain_ms: 1500,
                latency: encode_histogram(&h2)?,
                ..Default::default()
            },
        ])
    }

    /// The report of the sample run.
    fn sample_report() -> Result<Report> {
        let args = sample_args()?;
        let plan = plan(&args)?;
        let connected = sample_connected();
        let finals = sample_finals()?;
        let mut publish = PublishOutcome::nothing(4);
        publish.ok = 16;
        publish.requests_ok = 2;
        publish.elapsed = Duration::from_secs(2);
        build(&Measurements {
            args: &args,
            plan: &plan,
            connected: &connected,
            finals: &finals,
            publish: &publish,
            servers: vec![ServerRss {
                hub: 0,
                pid: 7,
                before_kib: 1000,
                after_kib: 1100,
            }],
            cpu: Some(CpuSamples {
                pids: args.cpu_pids.clone(),
                before: vec![Duration::from_secs(1), Duration::ZERO],
                after: vec![Duration::from_millis(1_045), Duration::from_millis(15)],
                loadgen: None,
                window: Duration::from_secs(3),
            }),
            parent_cpu: Duration::from_millis(100),
            parent_rss_kib: 1,
        })
    }

    #[test]
    fn merges_connect_figures_and_server_memory() -> Result<()> {
        let report = sample_report()?;
        assert_eq!(report.connections.established, 3);
        assert_eq!(report.connections.failed, 1);
        assert_eq!(report.connections.established_per_hub, vec![2, 1]);
        assert!((report.connections.connect_secs - 2.0).abs() < 1e-9);
        assert!((report.connections.connect_rate - 1.5).abs() < 1e-9);
        assert_eq!(report.servers[0].kib_per_connection, Some(50.0));
        Ok(())
    }

    #[test]
    fn merges_delivery_and_publish_figures() -> Result<()> {
        let report = sample_report()?;
        assert_eq!(report.delivery.counters.deliveries, 15);
        assert_eq!(report.delivery.counters.missing, 1);
        assert!((report.delivery.window_secs - 3.5).abs() < 1e-9);
        assert_eq!(report.delivery.latency.count, 2);
        assert!((report.delivery.latency.max_ms - 3.0).abs() < 0.01);
        assert_eq!(report.disconnects.count, 1);
        assert!((report.publish.achieved_rate - 8.0).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn shares_server_cpu_over_deliveries() -> Result<()> {
        let report = sample_report()?;
        // 60 ms of server CPU over 15 deliveries.
        let cpu = report.cpu.as_ref().context("cpu figures")?;
        assert_eq!(cpu.deliveries, 15);
        let total_us = cpu.servers_total.us_per_delivery.context("per delivery")?;
        assert!((total_us - 4000.0).abs() < 1e-6, "{total_us}");
        assert_eq!(cpu.processes[1].share_pct.map(f64::round), Some(25.0));
        Ok(())
    }

    #[test]
    fn summary_shows_the_merged_figures() -> Result<()> {
        let text = sample_report()?.to_string();
        assert!(text.contains("3 established, 1 failed"), "{text}");
        assert!(text.contains("http 503 ×1"), "{text}");
        assert!(text.contains("2 batch requests of 8"), "{text}");
        assert!(
            text.contains("cpu per delivery (publish start → drain end, 3.00 s, 15 deliveries)"),
            "{text}"
        );
        assert!(
            text.contains("  servers total    0.06 s  4000.0 µs"),
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn a_channel_scenario_reports_its_streams_resumes_and_gaps() -> Result<()> {
        let args = Wrapper::try_parse_from([
            "x",
            "--hub",
            "http://a:1",
            "--jwt-secret",
            "s",
            "--connections",
            "4",
            "--scenario",
            "mixed",
            "--groups",
            "2",
            "--rate",
            "10",
            "--channel-rate",
            "2",
            "--api-key",
            "k",
        ])?
        .args;
        let plan = plan(&args)?;
        let mut finals = sample_finals()?;
        finals[0].delivery.resumes = 2;
        finals[0].delivery.replayed = 7;
        finals[1].delivery.gaps = 1;
        finals[1].gaps.record("channel", "load:g1");
        finals[1].delivery.out_of_order = 3;
        finals[1].delivery.connections_out_of_order = 1;
        let publish = PublishOutcome::nothing(plan.streams.streams());
        let report = build(&Measurements {
            args: &args,
            plan: &plan,
            connected: &sample_connected(),
            finals: &finals,
            publish: &publish,
            servers: Vec::new(),
            cpu: None,
            parent_cpu: Duration::ZERO,
            parent_rss_kib: 0,
        })?;
        // 10/s personal + 2/s to each of 3 channels.
        assert!((report.publish.target_rate - 16.0).abs() < 1e-9);
        let text = report.to_string();
        assert!(
            text.contains("scenario      mixed: channels load:all, load:g0, load:g1 (2/s each); 10% of connections resume after 1.0 s away"),
            "{text}"
        );
        assert!(
            text.contains("out of order 3; connections with loss 0"),
            "{text}"
        );
        assert!(text.contains("  streams     channel ×1"), "{text}");
        assert!(
            text.contains("resumes       2 came back (0 not resumed by the hub), 0 failed; 7"),
            "{text}"
        );
        assert!(text.contains("gaps          1 hub.gap"), "{text}");
        assert!(text.contains("channel: load:g1"), "{text}");
        let json = serde_json::to_value(&report)?;
        assert_eq!(json["setup"]["scenario"], "mixed");
        assert_eq!(json["delivery"]["gap_streams"]["counts"]["channel"], 1);
        assert_eq!(json["delivery"]["gaps"], 1);
        assert_eq!(json["delivery"]["replayed"], 7);
        Ok(())
    }

    #[test]
    fn json_carries_the_merged_figures() -> Result<()> {
        let json: serde_json::Value = serde_json::to_value(sample_report()?)?;
        assert_eq!(json["setup"]["publish_mode"], "batch");
        assert_eq!(json["setup"]["batch_size"], 8);
        assert_eq!(json["publish"]["requests_ok"], 2);
        assert_eq!(json["cpu"]["processes"][0]["name"], "node-a");
        assert_eq!(json["cpu"]["servers_total"]["cpu_secs"], 0.06);
        assert_eq!(json["delivery"]["missing"], 1);
        assert_eq!(json["servers"][0]["kib_per_connection"], 50.0);
        Ok(())
    }
}
