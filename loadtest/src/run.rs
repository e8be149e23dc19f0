//! `hub-loadgen run`: the parent process.
//!
//! It plans the run, spawns the worker processes, measures server memory around the
//! connect phase and server CPU around the publishing window, publishes, collects the
//! workers' reports and prints the result.
//! Every wait has a deadline, and the workers are killed if the parent bails out, so a
//! run always ends by itself.

use std::io::Write as _;
use std::ops::Range;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout, timeout_at};

use crate::RunArgs;
use crate::conn::Layout;
use crate::cpu::{self, CpuSamples};
use crate::ipc::{self, Command, ConnectedReport, Event, FinalReport, ResumeSpec, WorkerSpec};
use crate::proc;
use crate::publish::{self, PublishConfig, PublishMode, PublishOutcome};
use crate::report::{self, Measurements, ServerRss};
use crate::streams::{Scenario, StreamPlan};
use crate::target::HubAddr;

/// Most connections one worker may hold: each process may have at most 20 000 open
/// files here, and the worker needs some for itself.
pub const MAX_PER_PROCESS: usize = 18_000;
/// Connections per worker when --processes is not given.
const DEFAULT_PER_PROCESS: usize = 15_000;
/// Allowance for process start-up, reporting and wind-down in each deadline.
const SLACK: Duration = Duration::from_secs(30);
/// How often connect progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long exiting workers get before they are killed.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// The derived shape of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Worker processes.
    pub processes: usize,
    /// Connection index range of each worker.
    pub slices: Vec<Range<usize>>,
    /// Mapping of connections to users, hubs, transports and sources.
    pub layout: Layout,
    /// The streams: users' personal ones and the scenario's channels.
    pub streams: StreamPlan,
    /// Limit for the whole run; workers exit when it passes.
    pub deadline: Duration,
}

/// Validates the arguments and works out processes, slices and deadlines.
pub fn plan(args: &RunArgs) -> Result<Plan> {
    ensure!(!args.hubs.is_empty(), "at least one --hub is required");
    let connections = args.connections;
    let users = args.users.unwrap_or(connections.max(1));
    ensure!(users > 0, "--users must be at least 1");
    ensure!(
        args.server_pids.len() <= args.hubs.len(),
        "more --server-pid than --hub: the k-th pid pairs with the k-th hub"
    );
    ensure!(
        args.rate == 0.0 || args.api_key.is_some() || args.kafka_brokers.is_some(),
        "--api-key is required when --rate is above 0"
    );
    let channels = args.scenario != Scenario::Personal;
    ensure!(
        args.channel_rate == 0.0 || channels,
        "--channel-rate needs a scenario with channels (--scenario broadcast or mixed)"
    );
    ensure!(
        args.channel_rate == 0.0 || args.api_key.is_some(),
        "--api-key is required when --channel-rate is above 0"
    );
    ensure!(
        !channels || args.kafka_brokers.is_none(),
        "--scenario {} publishes to channels through the hub's API; it does not combine \
         with --kafka-brokers",
        args.scenario
    );
    ensure!(
        !args.subscribe_groups || args.scenario == Scenario::Mixed,
        "--subscribe-groups needs --scenario mixed (the group channels)"
    );
    let streams = StreamPlan::new(
        args.scenario,
        users,
        args.groups as usize,
        &args.channel_prefix,
    )
    .subscribing_groups(args.subscribe_groups);
    streams
        .check()
        .map_err(|e| anyhow::anyhow!("--channel-prefix: {e}"))?;
    ensure!(
        args.kafka_brokers.is_none() || args.publish_mode == PublishMode::Http,
        "--publish-mode batch and grpc call the hub's APIs; they do not combine with --kafka-brokers"
    );
    cpu::check_unique(&args.cpu_pids)?;
    let processes = args
        .processes
        .map_or_else(|| connections.div_ceil(DEFAULT_PER_PROCESS), |p| p as usize)
        // A worker without connections would be pointless.
        .clamp(1, connections.max(1));
    let per_process = connections.div_ceil(processes);
    ensure!(
        per_process <= MAX_PER_PROCESS,
        "{connections} connections over {processes} process(es) is {per_process} per process, \
         but at most {MAX_PER_PROCESS} fit under the open-files limit; use --processes {}",
        connections.div_ceil(MAX_PER_PROCESS)
    );
    let slices = (0..processes)
        .map(|w| w * connections / processes..(w + 1) * connections / processes)
        .collect();
    let deadline = args.max_connect_time
        + args.hold
        + args.duration
        + args.offline
        + publish::CONNECT_TIMEOUT
        + publish::REQUEST_TIMEOUT
        + args.drain
        + SLACK * 3;
    Ok(Plan {
        processes,
        slices,
        layout: Layout {
            connections,
            users,
            hubs: args.hubs.len(),
            // A channel's subscribers are on every hub whatever their user: the nodes
            // share a backplane, so connections spread by index.
            publish_any: args.publish_any || channels,
            mode: args.transport,
            sources: args.source_ips.len(),
        },
        streams,
        deadline,
    })
}

/// Warns when connections to one hub are likely to run out of ephemeral ports.
fn warn_about_ports(plan: &Plan) {
    let Some(ports) = proc::local_port_count() else {
        return;
    };
    let per_hub = plan.layout.connections.div_ceil(plan.layout.hubs);
    let per_source = plan.layout.connections.div_ceil(plan.layout.sources.max(1));
    // Unbound sockets get ports per destination; bound ones per source address.
    let (needed, advice) = if plan.layout.sources == 0 {
        (
            per_hub,
            "add --source-ip addresses (e.g. 127.0.0.2, 127.0.0.3)",
        )
    } else {
        (per_source, "add more --source-ip addresses")
    };
    if needed as u64 > ports {
        eprintln!(
            "warning: about {needed} connections per port pool but only {ports} local ports \
             are configured; {advice}"
        );
    }
}

/// A line from a worker, or the end of its output.
#[derive(Debug)]
enum Incoming {
    Event(Event),
    Garbage(anyhow::Error),
    Closed,
}

/// The worker processes and their pipes.
struct WorkerPool {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    events: mpsc::UnboundedReceiver<(usize, Incoming)>,
    /// Which workers have sent their final report (and may therefore exit).
    reported: Vec<bool>,
}

impl WorkerPool {
    /// Starts `count` copies of this executable in worker mode.
    fn spawn(count: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the hub-loadgen executable")?;
        let (tx, events) = mpsc::unbounded_channel();
        let mut children = Vec::with_capacity(count);
        let mut stdins = Vec::with_capacity(count);
        for worker in 0..count {
            let mut child = tokio::process::Command::new(&exe)
                .args(["worker", "--id", &worker.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // If the parent bails out, its workers must not linger.
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {worker}"))?;
            stdins.push(child.stdin.take().context("worker stdin not piped")?);
            let stdout = child.stdout.take().context("worker stdout not piped")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                let last = loop {
                    let incoming = match lines.next_line().await {
                        Ok(Some(line)) => match ipc::decode::<Event>(&line) {
                            Ok(event) => Incoming::Event(event),
                            Err(e) => Incoming::Garbage(e),
                        },
                        Ok(None) => break Incoming::Closed,
                        Err(e) => {
                            break Incoming::Garbage(
                                anyhow::Error::new(e).context("reading worker output"),
                            );
                        }
                    };
                    if tx.send((worker, incoming)).is_err() {
                        return;
                    }
                };
                // The receiver may be gone at shutdown; nothing to do then.
                let _ = tx.send((worker, last));
            });
            children.push(child);
        }
        Ok(Self {
            children,
            stdins,
            events,
            reported: vec![false; count],
        })
    }

    /// The workers' process ids, where known.
    fn pids(&self) -> Vec<Option<u32>> {
        self.children.iter().map(Child::id).collect()
    }

    /// Sends `command` to one worker.
    async fn send(&mut self, worker: usize, command: &Command) -> Result<()> {
        let mut line = Vec::new();
        ipc::send_line(&mut line, command)?;
        let stdin = self
            .stdins
            .get_mut(worker)
            .with_context(|| format!("no worker {worker}"))?;
        stdin
            .write_all(&line)
            .await
            .with_context(|| format!("writing to worker {worker}"))?;
        stdin
            .flush()
            .await
            .with_context(|| format!("writing to worker {worker}"))
    }

    /// Sends `command` to every worker.
    async fn broadcast(&mut self, command: &Command) -> Result<()> {
        for worker in 0..self.stdins.len() {
            self.send(worker, command).await?;
        }
        Ok(())
    }

    /// Waits for the next event from any worker; a worker failing, or exiting before its
    /// final report, is an error.
    async fn next(&mut self, deadline: Instant, waiting_for: &str) -> Result<(usize, Event)> {
        loop {
            let received = timeout_at(deadline, self.events.recv())
                .await
                .with_context(|| format!("timed out waiting for {waiting_for}"))?;
            match received {
                None => bail!("all workers are gone while waiting for {waiting_for}"),
                Some((worker, Incoming::Event(Event::Failed { message, .. }))) => {
                    bail!("worker {worker} failed: {message}")
                }
                Some((worker, Incoming::Event(event))) => {
                    if matches!(event, Event::Report(_))
                        && let Some(done) = self.reported.get_mut(worker)
                    {
                        *done = true;
                    }
                    return Ok((worker, event));
                }
                Some((worker, Incoming::Garbage(e))) => {
                    return Err(e.context(format!("from worker {worker}")));
                }
                // A worker exits right after its final report, possibly while others
                // are still draining.
                Some((worker, Incoming::Closed)) if self.reported.get(worker) == Some(&true) => {}
                Some((worker, Incoming::Closed)) => {
                    let status = self.exit_status(worker).await;
                    bail!("worker {worker} exited ({status}) while waiting for {waiting_for}")
                }
            }
        }
    }

    /// Describes how a worker whose output ended has exited, waiting briefly for it.
    async fn exit_status(&mut self, worker: usize) -> String {
        let Some(child) = self.children.get_mut(worker) else {
            return "unknown worker".to_owned();
        };
        match timeout(Duration::from_secs(1), child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("status unknown: {e}"),
            Err(_) => "closed its output but is still running".to_owned(),
        }
    }

    /// Waits until every worker has finished connecting, printing progress.
    async fn wait_connected(
        &mut self,
        deadline: Instant,
        total: usize,
    ) -> Result<Vec<ConnectedReport>> {
        let count = self.children.len();
        let mut reports: Vec<Option<ConnectedReport>> = vec![None; count];
        let mut progress = vec![(0u64, 0u64); count];
        let started = Instant::now();
        let mut last_print = started;
        while reports.iter().any(Option::is_none) {
            match self.next(deadline, "workers to connect").await? {
                (
                    worker,
                    Event::Progress {
                        established,
                        failed,
                        ..
                    },
                ) => {
                    progress[worker] = (established, failed);
                    if last_print.elapsed() >= PROGRESS_EVERY {
                        last_print = Instant::now();
                        let (up, failed) = progress
                            .iter()
                            .fold((0, 0), |(u, f), (pu, pf)| (u + pu, f + pf));
                        eprintln!(
                            "connecting: {up}/{total} established, {failed} failed, {:.1} s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
                (worker, Event::Connected(report)) => {
                    progress[worker] = (report.established, report.failed);
                    reports[worker] = Some(report);
                }
                (worker, other) => bail!("worker {worker} sent {other:?} while connecting"),
            }
        }
        Ok(reports.into_iter().flatten().collect())
    }

    /// Waits until every worker has drained; returns each worker's CPU time then, ms.
    async fn wait_drained(&mut self, deadline: Instant) -> Result<Vec<u64>> {
        let mut cpu: Vec<Option<u64>> = vec![None; self.reported.len()];
        while cpu.iter().any(Option::is_none) {
            match self.next(deadline, "the workers to drain").await? {
                (worker, Event::Drained { cpu_ms, .. }) => {
                    if let Some(slot) = cpu.get_mut(worker) {
                        *slot = Some(cpu_ms);
                    }
                }
                // Late progress lines are harmless.
                (_, Event::Progress { .. }) => {}
                (worker, other) => bail!("worker {worker} sent {other:?} instead of drained"),
            }
        }
        Ok(cpu.into_iter().flatten().collect())
    }

    /// Waits for every worker's final report.
    async fn wait_reports(&mut self, deadline: Instant) -> Result<Vec<FinalReport>> {
        let mut reports: Vec<Option<FinalReport>> = vec![None; self.reported.len()];
        while reports.iter().any(Option::is_none) {
            match self.next(deadline, "final reports").await? {
                (worker, Event::Report(report)) => reports[worker] = Some(*report),
                // Late progress lines are harmless.
                (_, Event::Progress { .. }) => {}
                (worker, other) => bail!("worker {worker} sent {other:?} instead of its report"),
            }
        }
        Ok(reports.into_iter().flatten().collect())
    }

    /// Closes the pipes and waits briefly for the workers to exit, killing stragglers.
    async fn shutdown(mut self) {
        self.stdins.clear();
        for (worker, child) in self.children.iter_mut().enumerate() {
            match timeout(EXIT_WAIT, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => eprintln!("warning: worker {worker} exited with {status}"),
                Ok(Err(e)) => eprintln!("warning: waiting for worker {worker}: {e}"),
                Err(_) => {
                    eprintln!("warning: worker {worker} did not exit; killing it");
                    if let Err(e) = child.kill().await {
                        eprintln!("warning: killing worker {worker}: {e}");
                    }
                }
            }
        }
    }
}

/// Reads the VmRSS of each `--server-pid`.
fn server_rss(pids: &[u32]) -> Result<Vec<u64>> {
    pids.iter()
        .map(|&pid| proc::rss_kib(Some(pid)).with_context(|| format!("--server-pid {pid}")))
        .collect()
}

/// The load generator's own CPU time (parent and workers) when publishing starts.
struct OwnCpu {
    parent: Duration,
    /// None if a worker's CPU time could not be read.
    workers: Option<Duration>,
}

impl OwnCpu {
    fn read(pool: &WorkerPool) -> Self {
        let workers = pool
            .pids()
            .into_iter()
            .map(|pid| pid.and_then(|pid| proc::cpu_time_of(pid).ok()))
            .sum::<Option<Duration>>();
        Self {
            parent: proc::cpu_time().unwrap_or_default(),
            workers,
        }
    }

    /// CPU time used since this reading, given the workers' totals at the end of their
    /// drain.
    fn since(&self, workers_cpu_ms: &[u64]) -> Option<Duration> {
        let workers_now: Duration = workers_cpu_ms
            .iter()
            .copied()
            .map(Duration::from_millis)
            .sum();
        let parent = proc::cpu_time().ok()?.saturating_sub(self.parent);
        Some(parent + workers_now.saturating_sub(self.workers?))
    }
}

/// Runs the whole load test and prints the report.
pub async fn run(args: RunArgs) -> Result<()> {
    let plan = plan(&args)?;
    let started = Instant::now();
    let deadline = started + plan.deadline;
    let nofile = proc::raise_nofile_limit()?;
    proc::check_nofile(
        nofile,
        args.publish_concurrency as u64 + 2 * plan.processes as u64 + 64,
    )?;
    warn_about_ports(&plan);

    let hubs = resolve_all("--hub", &args.hubs).await?;
    let publish_hubs = resolve_all("--publish-via", &args.publish_via).await?;
    let rss_before = server_rss(&args.server_pids)?;
    // Fail on a wrong --cpu-pid now rather than after connecting.
    cpu::sample(&args.cpu_pids)?;

    let mut pool = WorkerPool::spawn(plan.processes)?;
    configure_workers(&mut pool, &args, &plan, &hubs).await?;
    eprintln!(
        "hub-loadgen: {} {} connection(s) to {} hub(s) from {} worker process(es)",
        plan.layout.connections,
        plan.layout.mode,
        hubs.len(),
        plan.processes
    );
    let connect_deadline = (started + args.max_connect_time + SLACK).min(deadline);
    let connected = pool
        .wait_connected(connect_deadline, plan.layout.connections)
        .await?;
    let established: u64 = connected.iter().map(|r| r.established).sum();
    eprintln!(
        "connected: {established}/{}; holding for {}",
        plan.layout.connections,
        humantime::format_duration(args.hold)
    );

    sleep(args.hold).await;
    let rss_after = server_rss(&args.server_pids)?;

    let cpu_before = cpu::sample(&args.cpu_pids)?;
    let own_cpu_before = OwnCpu::read(&pool);
    let window_start = Instant::now();
    pool.broadcast(&Command::Start).await?;
    let outcome = publish_phase(&args, &plan, &hubs, &publish_hubs).await?;

    eprintln!(
        "draining for up to {}",
        humantime::format_duration(args.drain)
    );
    pool.broadcast(&Command::Drain {
        published: outcome.published.clone(),
        timeout_ms: millis(args.drain),
    })
    .await?;
    let drained_cpu = pool
        .wait_drained((Instant::now() + args.drain + SLACK).min(deadline))
        .await?;
    // The window ends when the deliveries are done, while the connections are still
    // open: closing them costs the hubs work that is not delivery.
    let window = window_start.elapsed();
    let cpu_after = cpu::sample(&args.cpu_pids);
    let own_cpu = own_cpu_before.since(&drained_cpu);
    pool.broadcast(&Command::Finish).await?;
    let finals = pool
        .wait_reports((Instant::now() + SLACK).min(deadline))
        .await?;
    pool.shutdown().await;
    // A server process that vanished spoils only the CPU figures: print the rest, then
    // fail the run.
    let (cpu, cpu_error) = cpu_figures(&args, cpu_before, cpu_after, own_cpu, window);

    let servers = args
        .server_pids
        .iter()
        .enumerate()
        .map(|(hub, &pid)| ServerRss {
            hub,
            pid,
            before_kib: rss_before[hub],
            after_kib: rss_after[hub],
        })
        .collect();
    let report = report::build(&Measurements {
        args: &args,
        plan: &plan,
        connected: &connected,
        finals: &finals,
        publish: &outcome,
        servers,
        cpu,
        parent_cpu: proc::cpu_time().unwrap_or_default(),
        parent_rss_kib: proc::rss_kib(None).unwrap_or(0),
    })?;
    print_report(&report, args.json)?;
    cpu_error.map_or(Ok(()), Err)
}

/// Resolves every URL given with `flag`.
async fn resolve_all(flag: &str, urls: &[String]) -> Result<Vec<HubAddr>> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        out.push(HubAddr::resolve(flag, url).await?);
    }
    Ok(out)
}

/// Sends each worker process its slice of the connections.
async fn configure_workers(
    pool: &mut WorkerPool,
    args: &RunArgs,
    plan: &Plan,
    hubs: &[HubAddr],
) -> Result<()> {
    for (worker, slice) in plan.slices.iter().enumerate() {
        let spec = WorkerSpec {
            worker,
            first: slice.start,
            end: slice.end,
            layout: plan.layout.clone(),
            hubs: hubs.to_vec(),
            source_ips: args.source_ips.clone(),
            source_port_base: args.source_port_base,
            user_prefix: args.user_prefix.clone(),
            jwt_secret: args.jwt_secret.clone(),
            token_ttl_secs: args.token_ttl.as_secs(),
            connect_concurrency: args.connect_concurrency as usize,
            connect_timeout_ms: millis(args.connect_timeout),
            max_connect_ms: millis(args.max_connect_time),
            deadline_ms: millis(plan.deadline),
            streams: plan.streams.clone(),
            resume: ResumeSpec {
                fraction: args.resume_fraction(),
                offline_ms: millis(args.offline),
                window_ms: millis(args.duration),
            },
        };
        pool.send(worker, &Command::Configure(Box::new(spec)))
            .await?;
    }
    Ok(())
}

/// Publishes at the configured rate (or, with none, keeps the connections open as long).
async fn publish_phase(
    args: &RunArgs,
    plan: &Plan,
    hubs: &[HubAddr],
    publish_hubs: &[HubAddr],
) -> Result<PublishOutcome> {
    let outcome = if args.rate > 0.0 || args.channel_rate > 0.0 {
        if args.channel_rate > 0.0 {
            eprintln!(
                "publishing {}/s personal and {}/s to each of {} channel(s) for {}",
                args.rate,
                args.channel_rate,
                plan.streams.channels(),
                humantime::format_duration(args.duration)
            );
        } else {
            eprintln!(
                "publishing {}/s for {}",
                args.rate,
                humantime::format_duration(args.duration)
            );
        }
        let via_any = !publish_hubs.is_empty();
        publish::run(PublishConfig {
            hubs: if via_any {
                publish_hubs.to_vec()
            } else {
                hubs.to_vec()
            },
            api_key: args.api_key.clone().unwrap_or_default(),
            users: plan.layout.users,
            user_prefix: args.user_prefix.clone(),
            rate: args.rate,
            duration: args.duration,
            concurrency: args.publish_concurrency as usize,
            publish_any: plan.layout.publish_any || via_any,
            mode: args.publish_mode,
            batch_size: args.batch_size as usize,
            kafka: args
                .kafka_brokers
                .clone()
                .zip(args.kafka_topic.clone())
                .map(|(brokers, topic)| publish::KafkaTarget { brokers, topic }),
            channels: plan.streams.channel_names(),
            channel_rate: args.channel_rate,
            // Order is checked per stream in the channel scenarios; each user's
            // notifications then leave one at a time from one sender.
            ordered: args.scenario != Scenario::Personal,
        })
        .await?
    } else {
        // Nothing to publish: keep the connections open for the same time anyway, so
        // that idle stability (pings, heartbeats, disconnects) is observed.
        sleep(args.duration).await;
        PublishOutcome::nothing(plan.streams.streams())
    };
    Ok(outcome)
}

/// The CPU figures of the window, or why there are none.
fn cpu_figures(
    args: &RunArgs,
    before: Vec<Duration>,
    after: Result<Vec<Duration>>,
    loadgen: Option<Duration>,
    window: Duration,
) -> (Option<CpuSamples>, Option<anyhow::Error>) {
    match after {
        Ok(_) if args.cpu_pids.is_empty() => (None, None),
        Ok(after) => (
            Some(CpuSamples {
                pids: args.cpu_pids.clone(),
                before,
                after,
                loadgen,
                window,
            }),
            None,
        ),
        Err(e) => (
            None,
            Some(e.context("a --cpu-pid process ended during the run: no CPU figures")),
        ),
    }
}

/// Writes the report to stdout (as JSON with `--json`, the text then on stderr).
fn print_report(report: &report::Report, json: bool) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if json {
        eprint!("{report}");
        let json = serde_json::to_string(report).context("encoding the JSON report")?;
        writeln!(stdout, "{json}").context("writing the report")?;
    } else {
        write!(stdout, "{report}").context("writing the report")?;
    }
    stdout.flush().context("writing the report")
}

/// A duration in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<RunArgs> {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: RunArgs,
        }
        let base = ["x", "--hub", "http://127.0.0.1:8080", "--jwt-secret", "s"];
        Ok(Wrapper::try_parse_from(base.iter().chain(extra))?.args)
    }

    #[test]
    fn default_processes_follow_connection_count() -> Result<()> {
        assert_eq!(plan(&args(&["--connections", "10000"])?)?.processes, 1);
        assert_eq!(plan(&args(&["--connections", "15001"])?)?.processes, 2);
        assert_eq!(plan(&args(&["--connections", "50000"])?)?.processes, 4);
        assert_eq!(plan(&args(&["--connections", "0"])?)?.processes, 1);
        Ok(())
    }

    #[test]
    fn slices_cover_all_connections_evenly() -> Result<()> {
        let p = plan(&args(&["--connections", "50000", "--processes", "3"])?)?;
        assert_eq!(p.slices, vec![0..16666, 16666..33333, 33333..50000]);
        let p = plan(&args(&["--connections", "2", "--processes", "5"])?)?;
        assert_eq!(p.slices, vec![0..1, 1..2]);
        Ok(())
    }

    #[test]
    fn rejects_impossible_plans() -> Result<()> {
        // 19k in one process exceeds the open-files budget.
        assert!(plan(&args(&["--connections", "19000", "--processes", "1"])?).is_err());
        assert!(plan(&args(&["--connections", "0"])?).is_ok());
        assert!(plan(&args(&["--connections", "0", "--users", "0"])?).is_err());
        assert!(
            plan(&args(&["--rate", "10"])?).is_err(),
            "rate needs an api key"
        );
        assert!(plan(&args(&["--server-pid", "1", "--server-pid", "2"])?).is_err());
        assert!(plan(&args(&["--rate", "10", "--api-key", "k"])?).is_ok());
        let kafka = ["--kafka-brokers", "k:9092", "--kafka-topic", "t"];
        assert!(plan(&args(&kafka)?).is_ok());
        let batch_kafka = [&kafka[..], &["--publish-mode", "batch"]].concat();
        assert!(plan(&args(&batch_kafka)?).is_err());
        let same_name = ["--cpu-pid", "a=1", "--cpu-pid", "a=2"];
        assert!(plan(&args(&same_name)?).is_err());
        Ok(())
    }

    /// A pool without processes, fed through its event channel.
    fn fake_pool(workers: usize) -> (WorkerPool, mpsc::UnboundedSender<(usize, Incoming)>) {
        let (tx, events) = mpsc::unbounded_channel();
        let pool = WorkerPool {
            children: Vec::new(),
            stdins: Vec::new(),
            events,
            reported: vec![false; workers],
        };
        (pool, tx)
    }

    fn final_report(worker: usize) -> Incoming {
        Incoming::Event(Event::Report(Box::new(FinalReport {
            worker,
            ..Default::default()
        })))
    }

    #[tokio::test]
    async fn a_worker_exiting_after_its_report_is_fine() -> Result<()> {
        let (mut pool, tx) = fake_pool(2);
        tx.send((1, final_report(1)))?;
        tx.send((1, Incoming::Closed))?;
        tx.send((0, final_report(0)))?;
        let reports = pool
            .wait_reports(Instant::now() + Duration::from_secs(5))
            .await?;
        assert_eq!(reports.iter().map(|r| r.worker).collect::<Vec<_>>(), [0, 1]);
        Ok(())
    }

    #[tokio::test]
    async fn a_worker_exiting_before_its_report_fails_the_run() -> Result<()> {
        let (mut pool, tx) = fake_pool(2);
        tx.send((1, final_report(1)))?;
        tx.send((0, Incoming::Closed))?;
        let err = pool
            .wait_reports(Instant::now() + Duration::from_secs(5))
            .await
            .err()
            .context("expected an error")?;
        assert!(err.to_string().contains("worker 0 exited"), "{err:#}");

        let (mut pool, _tx) = fake_pool(1);
        let err = pool
            .wait_reports(Instant::now() + Duration::from_millis(10))
            .await;
        assert!(err.is_err(), "waiting must end at the deadline");
        Ok(())
    }

    #[tokio::test]
    async fn waits_for_every_worker_to_drain() -> Result<()> {
        let (mut pool, tx) = fake_pool(2);
        let drained = |worker, cpu_ms| Incoming::Event(Event::Drained { worker, cpu_ms });
        tx.send((1, drained(1, 70)))?;
        tx.send((
            0,
            Incoming::Event(Event::Progress {
                worker: 0,
                established: 1,
                failed: 0,
            }),
        ))?;
        tx.send((0, drained(0, 30)))?;
        let cpu = pool
            .wait_drained(Instant::now() + Duration::from_secs(5))
            .await?;
        assert_eq!(cpu, [30, 70]);

        let (mut pool, tx) = fake_pool(2);
        tx.send((1, drained(1, 70)))?;
        tx.send((0, Incoming::Closed))?;
        let err = pool
            .wait_drained(Instant::now() + Duration::from_secs(5))
            .await
            .err()
            .context("expected an error")?;
        assert!(err.to_string().contains("worker 0 exited"), "{err:#}");
        Ok(())
    }

    #[test]
    fn channel_scenarios_spread_connections_and_check_their_settings() -> Result<()> {
        let p = plan(&args(&["--scenario", "broadcast", "--connections", "10"])?)?;
        assert!(
            p.layout.publish_any,
            "a channel's subscribers are on every hub"
        );
        assert_eq!(p.streams.channel_names(), ["load:all"]);
        assert_eq!(p.streams.streams(), 11);
        let p = plan(&args(&[
            "--scenario",
            "mixed",
            "--users",
            "6",
            "--groups",
            "3",
        ])?)?;
        assert_eq!(p.streams.streams(), 6 + 1 + 3);
        assert!(!plan(&args(&[])?)?.layout.publish_any);
        // A channel rate needs channels and a key; Kafka publishes no channels.
        assert!(plan(&args(&["--channel-rate", "5", "--api-key", "k"])?).is_err());
        assert!(plan(&args(&["--scenario", "broadcast", "--subscribe-groups"])?).is_err());
        let p = plan(&args(&["--scenario", "mixed", "--subscribe-groups"])?)?;
        assert!(p.streams.subscribe_groups);
        assert!(plan(&args(&["--scenario", "broadcast", "--channel-rate", "5"])?).is_err());
        let kafka = ["--kafka-brokers", "k:9092", "--kafka-topic", "t"];
        let mixed_kafka = [&kafka[..], &["--scenario", "mixed"]].concat();
        assert!(plan(&args(&mixed_kafka)?).is_err());
        let e = plan(&args(&["--scenario", "mixed", "--channel-prefix", "a b"])?)
            .err()
            .context("a space is no channel character")?;
        assert!(e.to_string().contains("--channel-prefix"), "{e}");
        Ok(())
    }

    #[test]
    fn users_default_to_connections() -> Result<()> {
        assert_eq!(plan(&args(&["--connections", "7"])?)?.layout.users, 7);
        assert_eq!(
            plan(&args(&["--connections", "7", "--users", "3"])?)?
                .layout
                .users,
            3
        );
        Ok(())
    }
}
