//! `hub-loadgen`: load generator for the notification hub.
//!
//! `hub-loadgen run` opens many WebSocket/SSE connections through worker processes,
//! publishes through the hub's HTTP API at a set rate and reports connect speed, server
//! memory per connection, delivery latency and loss, and the CPU the hub processes spend
//! per delivery. `hub-loadgen worker` is the internal mode those worker processes run in.

mod conn;
mod cpu;
mod ipc;
mod proc;
mod publish;
mod report;
mod run;
mod saga;
mod sse;
mod stats;
mod streams;
mod target;
mod token;
mod worker;
mod ws;

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::conn::TransportMode;
use crate::cpu::CpuPid;
use crate::publish::PublishMode;
use crate::streams::Scenario;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "hub-loadgen",
    version,
    about = "Load generator for the notification hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Open connections, publish at a rate, and report.
    Run(Box<RunArgs>),
    /// Place orders through the order service and time each status notification.
    Saga(Box<saga::SagaArgs>),
    /// Internal: a worker process driven by `run` over stdin/stdout.
    #[command(hide = true)]
    Worker {
        /// Worker number, 0-based.
        #[arg(long)]
        id: usize,
    },
}

/// Options of `hub-loadgen run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Hub base URL, e.g. http://127.0.0.1:8080; repeat for several nodes. User i
    /// connects and is published to via hub i % H.
    #[arg(long = "hub", value_name = "URL", required = true)]
    pub hubs: Vec<String>,

    /// Transport of the connections; mixed alternates per connection.
    #[arg(long, value_enum, default_value_t = TransportMode::Ws)]
    pub transport: TransportMode,

    /// Connections to open in total.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub connections: usize,

    /// Distinct users; connection j belongs to user j % M [default: N].
    #[arg(long, value_name = "M")]
    pub users: Option<usize>,

    /// Prefix of the user names (lt-0, lt-1, …).
    #[arg(long, value_name = "PREFIX", default_value = "lt-")]
    pub user_prefix: String,

    /// HS256 secret the hub verifies connection tokens with.
    #[arg(long, value_name = "SECRET")]
    pub jwt_secret: String,

    /// API key for the publish API (required when --rate > 0).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Lifetime of the minted connection tokens.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,

    /// Notifications per second in total; 0 publishes nothing and only holds the
    /// connections (for --duration).
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate: f64,

    /// How long to publish.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Idle time after all connections are up, before measuring RSS and publishing.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// After publishing, how long to wait at most for in-flight deliveries.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain: Duration,

    /// Handshakes in flight at once, per worker process.
    #[arg(long, value_name = "C", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_concurrency: u32,

    /// Limit for one connection attempt, up to its hub.connected.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Limit for the whole connect phase; connections not up by then count as failed.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_connect_time: Duration,

    /// Worker processes holding the connections [default: ceil(N / 15000)]; at most
    /// 18 000 connections fit in one process.
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u32).range(1..))]
    pub processes: Option<u32>,

    /// Local address to bind connections to, round-robin; repeat to get past the
    /// ~28k ephemeral ports of one address.
    #[arg(long = "source-ip", value_name = "IP")]
    pub source_ips: Vec<IpAddr>,

    /// Bind connection j to local address j % S (S = --source-ip count, or 127.0.0.1) and
    /// port BASE + j / S instead of letting the kernel search for a free ephemeral port,
    /// which costs more CPU the more ports are in use (the search, not the hub, then
    /// dominates the connect rate on loopback). Keep BASE + N / S below 32768, the start of
    /// the ephemeral range, so no other socket holds those ports.
    #[arg(long, value_name = "BASE")]
    pub source_port_base: Option<u16>,

    /// PID of a hub process whose VmRSS to measure; the k-th pairs with the k-th --hub.
    #[arg(long = "server-pid", value_name = "PID")]
    pub server_pids: Vec<u32>,

    /// Publish connections, each with one request in flight.
    #[arg(long, value_name = "S", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub publish_concurrency: u32,

    /// Publish through the hubs round-robin and spread connection j over hub j % H
    /// regardless of its user (for nodes that share a backplane).
    #[arg(long)]
    pub publish_any: bool,

    /// Send the publish requests to this hub URL instead of the connection hubs; repeat
    /// for several, used round-robin, each for any user (the nodes must share a
    /// backplane). Connections still follow --hub.
    #[arg(
        long = "publish-via",
        value_name = "URL",
        conflicts_with = "kafka_brokers"
    )]
    pub publish_via: Vec<String>,

    /// One notification per POST /api/publish (http), or --batch-size notifications per
    /// POST /api/publish/batch (batch); --rate counts notifications either way.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = PublishMode::Http)]
    pub publish_mode: PublishMode,

    /// Notifications per request with --publish-mode batch (the hub takes at most 1000).
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch_size: u32,

    /// A server process whose CPU time to report per delivered notification, over the
    /// window from publish start to drain end, as NAME=PID (e.g. node-a=1234); repeat
    /// for each process (hub nodes, Redis, Kafka).
    #[arg(long = "cpu-pid", value_name = "NAME=PID", value_parser = cpu::parse_cpu_pid)]
    pub cpu_pids: Vec<CpuPid>,

    /// Publish by producing JSON records to this Kafka cluster instead of the HTTP API
    /// (`{"event_id","user_id","sent_us","seq"}`, key = user, `content-type:
    /// application/json`); the hub must route the topic to `type = "load"` with
    /// `data = {sent_us, seq}` (see docs/benchmarks.md). Latency is then Kafka → client.
    #[arg(long, value_name = "HOST:PORT", requires = "kafka_topic")]
    pub kafka_brokers: Option<String>,

    /// Topic for --kafka-brokers.
    #[arg(long, value_name = "TOPIC")]
    pub kafka_topic: Option<String>,

    /// What the connections listen to and what is published: personal streams only;
    /// `broadcast`, one channel every connection holds (its token's `channels` claim);
    /// `mixed`, personal streams plus a shared channel and a channel per group, with
    /// resumes. Channel scenarios spread connections over the hubs by index and publish
    /// through any hub: the nodes must share a backplane.
    #[arg(long, value_enum, default_value_t = Scenario::Personal)]
    pub scenario: Scenario,

    /// Publishes per second to each channel (broadcast: the one channel; mixed: the
    /// shared one and each group's), besides --rate's personal ones.
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = parse_rate)]
    pub channel_rate: f64,

    /// Group channels with --scenario mixed; user u is in group u % G.
    #[arg(long, value_name = "G", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub groups: u32,

    /// With --scenario mixed, WebSocket connections join their group's channel with a
    /// `subscribe` message and a channel token (and again after a resume) instead of by
    /// their token's claim; SSE connections, which cannot send, keep the claim.
    #[arg(long)]
    pub subscribe_groups: bool,

    /// Prefix of the channel names (`<prefix>all`, `<prefix>g0`, …).
    #[arg(long, value_name = "PREFIX", default_value = "load:")]
    pub channel_prefix: String,

    /// Fraction of the connections that drop in the middle of the publishing window,
    /// stay away --offline, and resume on the next hub from the last envelope id they
    /// saw (WS since=, SSE Last-Event-ID) [default: 0.1 with --scenario mixed, else 0].
    #[arg(long, value_name = "F", value_parser = parse_fraction)]
    pub resume_fraction: Option<f64>,

    /// How long a resuming connection stays away.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub offline: Duration,

    /// Print the figures as one JSON object on stdout (the summary goes to stderr).
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The fraction of connections that resume, with the scenario's default.
    pub fn resume_fraction(&self) -> f64 {
        self.resume_fraction.unwrap_or(match self.scenario {
            Scenario::Mixed => 0.1,
            Scenario::Personal | Scenario::Broadcast => 0.0,
        })
    }
}

/// Parses `--rate`: a finite, non-negative number.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a non-negative number")),
    }
}

/// Parses `--resume-fraction`: a number from 0 to 1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a number from 0 to 1")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        // The target machines have two cores; more threads would only add contention.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|runtime| {
            let result = runtime.block_on(async {
                match cli.command {
                    Commands::Run(args) => run::run(*args).await,
                    Commands::Saga(args) => saga::run(*args).await,
                    Commands::Worker { id } => worker::run(id)
                        .await
                        .with_context(|| format!("worker {id}")),
                }
            });
            // A worker's stdin reader sits in a blocking read that never returns on its
            // own; do not let it hold up the exit.
            runtime.shutdown_timeout(Duration::from_millis(200));
            result
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hub-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_full_run_command_line() -> Result<()> {
        let cli = Cli::try_parse_from([
            "hub-loadgen",
            "run",
            "--hub",
            "http://127.0.0.1:8080",
            "--hub",
            "http://127.0.0.1:8081",
            "--transport",
            "mixed",
            "--connections",
            "50000",
            "--users",
            "100",
            "--jwt-secret",
            "s",
            "--api-key",
            "k",
            "--token-ttl",
            "2h",
            "--rate",
            "10000",
            "--duration",
            "30s",
            "--hold",
            "5s",
            "--drain",
            "1s",
            "--processes",
            "3",
            "--source-ip",
            "127.0.0.2",
            "--source-ip",
            "127.0.0.3",
            "--server-pid",
            "42",
            "--publish-any",
            "--publish-via",
            "http://127.0.0.1:8082",
            "--publish-mode",
            "batch",
            "--batch-size",
            "1000",
            "--cpu-pid",
            "node-a=42",
            "--cpu-pid",
            "redis=43",
            "--json",
        ])?;
        let Commands::Run(args) = cli.command else {
            anyhow::bail!("expected run");
        };
        assert_eq!(args.hubs.len(), 2);
        assert_eq!(args.transport, TransportMode::Mixed);
        assert_eq!(args.token_ttl, Duration::from_secs(7200));
        assert_eq!(args.drain, Duration::from_secs(1));
        assert_eq!(args.processes, Some(3));
        assert_eq!(args.source_ips.len(), 2);
        assert!(args.publish_any && args.json);
        assert_eq!(args.publish_via, ["http://127.0.0.1:8082"]);
        assert_eq!(args.publish_mode, PublishMode::Batch);
        assert_eq!(args.batch_size, 1000);
        let cpu: Vec<(&str, u32)> = args
            .cpu_pids
            .iter()
            .map(|p| (p.name.as_str(), p.pid))
            .collect();
        assert_eq!(cpu, [("node-a", 42), ("redis", 43)]);
        Ok(())
    }

    #[test]
    fn channel_scenarios_parse_with_their_defaults() -> Result<()> {
        let parse = |extra: &[&str]| -> Result<RunArgs> {
            let base = [
                "hub-loadgen",
                "run",
                "--hub",
                "http://h:1",
                "--jwt-secret",
                "s",
            ];
            match Cli::try_parse_from(base.iter().chain(extra))?.command {
                Commands::Run(args) => Ok(*args),
                _ => anyhow::bail!("expected run"),
            }
        };
        let personal = parse(&[])?;
        assert_eq!(personal.scenario, Scenario::Personal);
        assert_eq!(
            (personal.channel_rate, personal.resume_fraction()),
            (0.0, 0.0)
        );
        let broadcast = parse(&["--scenario", "broadcast", "--channel-rate", "20"])?;
        assert_eq!(broadcast.channel_rate, 20.0);
        assert_eq!(broadcast.resume_fraction(), 0.0);
        let mixed = parse(&["--scenario", "mixed", "--groups", "4", "--offline", "2s"])?;
        assert_eq!((mixed.groups, mixed.resume_fraction()), (4, 0.1));
        assert!(!mixed.subscribe_groups);
        assert!(parse(&["--scenario", "mixed", "--subscribe-groups"])?.subscribe_groups);
        assert_eq!(mixed.offline, Duration::from_secs(2));
        assert_eq!(mixed.channel_prefix, "load:");
        let none = parse(&["--scenario", "mixed", "--resume-fraction", "0"])?;
        assert_eq!(none.resume_fraction(), 0.0);
        Ok(())
    }

    #[test]
    fn publishing_defaults_are_unchanged() -> Result<()> {
        let cli = Cli::try_parse_from([
            "hub-loadgen",
            "run",
            "--hub",
            "http://h:1",
            "--jwt-secret",
            "s",
        ])?;
        let Commands::Run(args) = cli.command else {
            anyhow::bail!("expected run");
        };
        assert!(args.publish_via.is_empty() && args.cpu_pids.is_empty());
        assert_eq!(
            (args.publish_mode, args.batch_size),
            (PublishMode::Http, 100)
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_values() {
        let base = [
            "hub-loadgen",
            "run",
            "--hub",
            "http://h:1",
            "--jwt-secret",
            "s",
        ];
        for extra in [
            ["--rate", "-1"],
            ["--rate", "NaN"],
            ["--processes", "0"],
            ["--hold", "5 parsecs"],
            ["--publish-mode", "bulk"],
            ["--batch-size", "0"],
            ["--batch-size", "1001"],
            ["--cpu-pid", "1234"],
            ["--cpu-pid", "redis="],
            ["--cpu-pid", "redis=12 34"],
            ["--scenario", "fanout"],
            ["--channel-rate", "-2"],
            ["--groups", "0"],
            ["--resume-fraction", "1.5"],
            ["--offline", "soon"],
        ] {
            let args = base.iter().chain(extra.iter());
            assert!(
                Cli::try_parse_from(args).is_err(),
                "{extra:?} should be rejected"
            );
        }
        assert!(Cli::try_parse_from(["hub-loadgen", "run", "--jwt-secret", "s"]).is_err());
        let via_kafka = base.iter().chain(&[
            "--publish-via",
            "http://h:2",
            "--kafka-brokers",
            "k:9092",
            "--kafka-topic",
            "t",
        ]);
        assert!(Cli::try_parse_from(via_kafka).is_err());
    }
}
