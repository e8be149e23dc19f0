//! Worker process: opens its slice of the connections, counts what arrives on them and
//! reports to the parent over stdout.
//!
//! Phases follow the parent's commands on stdin: configure → connect (report
//! `connected`) → wait for `start` → wait for `drain` → drain (report `report`) → exit.
//! The worker exits on its own when stdin closes (the parent died) or when the run's
//! deadline passes, so it never outlives a run.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::conn::{Conn, ConnPlan, Envelope, Failure, parse_envelope};
use crate::ipc::{self, Command, ConnectedReport, Event, FinalReport, WorkerSpec};
use crate::proc;
use crate::stats::{
    DeliveryCounters, ErrorTally, SeqOutcome, SeqTracker, encode_histogram, new_histogram,
    truncate_on_char_boundary, unix_micros,
};
use crate::token::{TokenMinter, user_name};

/// How long a fresh worker waits for its configuration.
const CONFIGURE_WAIT: Duration = Duration::from_secs(30);
/// How often the connect and drain loops look at the counters.
const POLL: Duration = Duration::from_millis(50);
/// How often connect progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long connection tasks get to wind down after the drain.
const WIND_DOWN: Duration = Duration::from_secs(5);
/// File descriptors a worker needs besides its connections.
const SPARE_FDS: u64 = 64;

/// Lifecycle of one connection slot.
const PENDING: u8 = 0;
const ALIVE: u8 = 1;
const FAILED: u8 = 2;
const GONE: u8 = 3;

/// Per-connection figures the worker's main task reads while the connection runs.
struct Slot {
    unique: AtomicU64,
    state: AtomicU8,
}

/// State shared by the worker's main task and all its connection tasks.
struct Shared {
    spec: WorkerSpec,
    minter: TokenMinter,
    slots: Vec<Slot>,
    established: AtomicU64,
    failed: AtomicU64,
    per_hub: Vec<AtomicU64>,
    first_attempt_us: AtomicU64,
    last_connected_us: AtomicU64,
    connect_errors: Mutex<ErrorTally>,
    deliveries: AtomicU64,
    duplicates: AtomicU64,
    out_of_range: AtomicU64,
    other_messages: AtomicU64,
    bad_messages: AtomicU64,
    sse_comments: AtomicU64,
    disconnects: AtomicU64,
    disconnect_errors: Mutex<ErrorTally>,
    latency: Mutex<Histogram<u64>>,
}

/// Locks a mutex, carrying on if a panicking task poisoned it: the counters inside stay
/// meaningful, and a report with them beats no report.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(spec: WorkerSpec) -> Self {
        let count = spec.end - spec.first;
        Self {
            minter: TokenMinter::new(&spec.jwt_secret, Duration::from_secs(spec.token_ttl_secs)),
            slots: (0..count)
                .map(|_| Slot {
                    unique: AtomicU64::new(0),
                    state: AtomicU8::new(PENDING),
                })
                .collect(),
            established: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            per_hub: spec.hubs.iter().map(|_| AtomicU64::new(0)).collect(),
            first_attempt_us: AtomicU64::new(u64::MAX),
            last_connected_us: AtomicU64::new(0),
            connect_errors: Mutex::new(ErrorTally::default()),
            deliveries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_range: AtomicU64::new(0),
            other_messages: AtomicU64::new(0),
            bad_messages: AtomicU64::new(0),
            sse_comments: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            disconnect_errors: Mutex::new(ErrorTally::default()),
            latency: Mutex::new(new_histogram()),
            spec,
        }
    }

    /// Connection attempts that have finished one way or the other.
    fn resolved(&self) -> u64 {
        self.established.load(Relaxed) + self.failed.load(Relaxed)
    }

    /// Opens the connection for `plan` and waits for its first envelope.
    async fn open(&self, j: usize, plan: ConnPlan) -> Result<(Conn, Bytes), Failure> {
        let hub = self
            .spec
            .hubs
            .get(plan.hub)
            .ok_or_else(|| Failure::new("config", format!("no hub #{}", plan.hub)))?;
        let user = user_name(&self.spec.user_prefix, plan.user);
        let token = self
            .minter
            .mint(&user)
            .map_err(|e| Failure::new("token", format!("{e:#}")))?;
        let ip = plan
            .source
            .and_then(|i| self.spec.source_ips.get(i).copied());
        let source = match self.spec.source_port_base {
            // Explicit ports: connection j takes address j % S and port BASE + j / S, a
            // distinct (address, port) per connection with no kernel port search.
            Some(base) => {
                let ips = &self.spec.source_ips;
                let (ip, rank) = match ips.len() {
                    0 => (std::net::Ipv4Addr::LOCALHOST.into(), j),
                    n => (ips[j % n], j / n),
                };
                let port = u16::try_from(usize::from(base) + rank).map_err(|_| {
                    Failure::new("config", "--source-port-base + N / sources exceeds 65535")
                })?;
                Some(std::net::SocketAddr::new(ip, port))
            }
            None => ip.map(|ip| std::net::SocketAddr::new(ip, 0)),
        };
        let mut conn = Conn::open(plan.transport, hub, &token, source).await?;
        let first = conn
            .next_payload()
            .await
            .map_err(|e| Failure::new("closed before hub.connected", format!("{e:#}")))?;
        // Any envelope proves the connection is subscribed; anything else (say, an
        // error object before a close) means it is not.
        if parse_envelope(&first).is_err() {
            let mut shown = String::from_utf8_lossy(&first).into_owned();
            truncate_on_char_boundary(&mut shown, 200);
            return Err(Failure::new("bad first message", shown));
        }
        Ok((conn, first))
    }

    fn connect_failed(&self, slot: &Slot, kind: &str, detail: &str) {
        slot.state.store(FAILED, Relaxed);
        lock(&self.connect_errors).record(kind, detail);
        self.failed.fetch_add(1, Relaxed);
    }

    /// Accounts for one received payload.
    fn receive(&self, slot: &Slot, seqs: &mut SeqTracker, payload: &[u8]) {
        match parse_envelope(payload) {
            Ok(Envelope::Load { sent_us, seq }) => {
                let latency_us = unix_micros().saturating_sub(sent_us);
                lock(&self.latency).saturating_record(latency_us);
                self.deliveries.fetch_add(1, Relaxed);
                match seqs.observe(seq) {
                    SeqOutcome::New => slot.unique.fetch_add(1, Relaxed),
                    SeqOutcome::Duplicate => self.duplicates.fetch_add(1, Relaxed),
                    SeqOutcome::OutOfRange => self.out_of_range.fetch_add(1, Relaxed),
                };
            }
            Ok(Envelope::Connected | Envelope::Other) => {
                self.other_messages.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.bad_messages.fetch_add(1, Relaxed);
            }
        }
    }

    /// User index of local slot `local`.
    fn user_of(&self, local: usize) -> usize {
        (self.spec.first + local) % self.spec.layout.users.max(1)
    }

    /// Deliveries still owed to connections that are alive.
    fn outstanding(&self, published: &[u64]) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.state.load(Relaxed) == ALIVE)
            .map(|(local, slot)| {
                let owed = published.get(self.user_of(local)).copied().unwrap_or(0);
                owed.saturating_sub(slot.unique.load(Relaxed))
            })
            .sum()
    }

    /// Delivery counters against the parent's per-user publish counts.
    fn delivery(&self, published: &[u64]) -> DeliveryCounters {
        let mut counters = DeliveryCounters {
            deliveries: self.deliveries.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            out_of_range: self.out_of_range.load(Relaxed),
            other_messages: self.other_messages.load(Relaxed),
            bad_messages: self.bad_messages.load(Relaxed),
            ..DeliveryCounters::default()
        };
        for (local, slot) in self.slots.iter().enumerate() {
            // Connections that dropped out still count: what they missed is lost.
            if !matches!(slot.state.load(Relaxed), ALIVE | GONE) {
                continue;
            }
            let owed = published.get(self.user_of(local)).copied().unwrap_or(0);
            let unique = slot.unique.load(Relaxed);
            counters.expected += owed;
            counters.missing += owed.saturating_sub(unique);
            counters.unexpected += unique.saturating_sub(owed);
        }
        counters
    }
}

/// Runs one connection from attempt to stop.
async fn connection(
    shared: Arc<Shared>,
    local: usize,
    permit: OwnedSemaphorePermit,
    stop: CancellationToken,
    connect_by: Instant,
) {
    let slot = &shared.slots[local];
    let plan = shared.spec.layout.plan(shared.spec.first + local);
    shared.first_attempt_us.fetch_min(unix_micros(), Relaxed);

    let limit =
        connect_by.min(Instant::now() + Duration::from_millis(shared.spec.connect_timeout_ms));
    let opened = timeout_at(limit, shared.open(shared.spec.first + local, plan)).await;
    // The permit bounds handshakes in flight, not open connections.
    drop(permit);
    let (mut conn, first) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(failure)) => return shared.connect_failed(slot, &failure.kind, &failure.detail),
        Err(_) => {
            return shared.connect_failed(
                slot,
                "timeout",
                "no hub.connected within the connect timeout",
            );
        }
    };
    slot.state.store(ALIVE, Relaxed);
    shared.per_hub[plan.hub].fetch_add(1, Relaxed);
    shared.last_connected_us.fetch_max(unix_micros(), Relaxed);
    shared.established.fetch_add(1, Relaxed);

    let mut seqs = SeqTracker::default();
    shared.receive(slot, &mut seqs, &first);
    let ended = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break None,
            payload = conn.next_payload() => match payload {
                Ok(payload) => shared.receive(slot, &mut seqs, &payload),
                Err(e) => break Some(e),
            },
        }
    };
    if let Conn::Sse(sse) = &conn {
        shared.sse_comments.fetch_add(sse.comments(), Relaxed);
    }
    if let Some(e) = ended {
        slot.state.store(GONE, Relaxed);
        shared.disconnects.fetch_add(1, Relaxed);
        // The outermost message is short and stable enough to count by; its cause
        // (e.g. the I/O error) is the detail.
        let cause = e
            .chain()
            .nth(1)
            .map(ToString::to_string)
            .unwrap_or_default();
        lock(&shared.disconnect_errors).record(&e.to_string(), &cause);
    }
}

/// Writes one event line to stdout.
fn emit(event: &Event) -> Result<()> {
    ipc::send_line(&mut std::io::stdout().lock(), event)
}

/// Reads commands from stdin; the token is cancelled when stdin closes.
fn read_commands() -> (mpsc::Receiver<Result<Command>>, CancellationToken) {
    let (tx, rx) = mpsc::channel(4);
    let closed = CancellationToken::new();
    let closed_on_exit = closed.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim().is_empty() {
                continue;
            }
            if tx.send(ipc::decode::<Command>(&line)).await.is_err() {
                break;
            }
        }
        closed_on_exit.cancel();
    });
    (rx, closed)
}

/// This process's CPU time in ms, or 0 if it cannot be read.
fn cpu_ms() -> u64 {
    proc::cpu_time()
        .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Waits for the next command, failing if stdin closes or the deadline passes.
async fn next_command(
    commands: &mut mpsc::Receiver<Result<Command>>,
    deadline: Instant,
) -> Result<Command> {
    match timeout_at(deadline, commands.recv()).await {
        Ok(Some(command)) => command,
        Ok(None) => bail!("parent closed stdin"),
        Err(_) => bail!("run deadline passed while waiting for the parent"),
    }
}

/// Entry point of `hub-loadgen worker`: runs and reports failure to the parent.
pub async fn run(id: usize) -> Result<()> {
    let result = run_phases(id).await;
    if let Err(e) = &result {
        // Best effort: the parent may be gone, which is often why we failed.
        let _ = emit(&Event::Failed {
            worker: id,
            message: format!("{e:#}"),
        });
    }
    result
}

/// Goes through the phases the parent orders, from configuration to the final report.
async fn run_phases(id: usize) -> Result<()> {
    let started = Instant::now();
    let (mut commands, parent_gone) = read_commands();
    let spec = receive_spec(id, &mut commands, started + CONFIGURE_WAIT).await?;
    let count = spec.end - spec.first;
    let nofile = proc::raise_nofile_limit()?;
    proc::check_nofile(nofile, count as u64 + SPARE_FDS)?;
    let deadline = started + Duration::from_millis(spec.deadline_ms);
    let connect_by = Instant::now() + Duration::from_millis(spec.max_connect_ms);
    let shared = Arc::new(Shared::new(spec));
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let spawned = connect_phase(id, &shared, connect_by, &parent_gone, &stop, &mut tasks).await?;
    report_connected(id, &shared, spawned)?;

    // Hold and publish phases: the connection tasks do the work; we wait for orders.
    match next_command(&mut commands, deadline).await? {
        Command::Start => {}
        other => bail!("expected start, got {other:?}"),
    }
    let (published, drain_timeout) = match next_command(&mut commands, deadline).await? {
        Command::Drain {
            published,
            timeout_ms,
        } => (published, Duration::from_millis(timeout_ms)),
        other => bail!("expected drain, got {other:?}"),
    };

    let drain_ms = drain(&shared, &published, deadline, drain_timeout, &parent_gone).await?;
    // Keep the connections open until every worker has drained and the parent has read
    // the servers' CPU time: closing them sets the hubs to work on disconnects, which is
    // no part of what a delivery costs.
    emit(&Event::Drained {
        worker: id,
        cpu_ms: cpu_ms(),
    })?;
    match next_command(&mut commands, deadline).await? {
        Command::Finish => {}
        other => bail!("expected finish, got {other:?}"),
    }
    close_connections(&stop, &mut tasks).await;
    report_final(id, &shared, &published, drain_ms)
}

/// Waits for this worker's configuration and checks that it is usable.
async fn receive_spec(
    id: usize,
    commands: &mut mpsc::Receiver<Result<Command>>,
    wait_until: Instant,
) -> Result<WorkerSpec> {
    let spec = match next_command(commands, wait_until).await? {
        Command::Configure(spec) => *spec,
        other => bail!("expected configuration first, got {other:?}"),
    };
    ensure!(
        spec.worker == id,
        "configuration for worker {} sent to worker {id}",
        spec.worker
    );
    ensure!(spec.first <= spec.end, "empty or inverted connection range");
    ensure!(
        spec.hubs.len() == spec.layout.hubs && !spec.hubs.is_empty(),
        "layout does not match the hub list"
    );
    Ok(spec)
}

/// Opens the worker's connections; returns how many attempts were started.
///
/// Attempts are spawned as handshake permits free up, until all are resolved or the
/// phase's time is up.
async fn connect_phase(
    id: usize,
    shared: &Arc<Shared>,
    connect_by: Instant,
    parent_gone: &CancellationToken,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<usize> {
    let count = shared.slots.len();
    let permits = Arc::new(Semaphore::new(shared.spec.connect_concurrency.max(1)));
    let mut tick = interval(POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_progress = Instant::now();
    let mut spawned = 0;
    loop {
        let now = Instant::now();
        if spawned == count && shared.resolved() == count as u64 {
            break;
        }
        // Attempts are themselves bounded by connect_by; the second is their grace.
        if now >= connect_by + Duration::from_secs(1) {
            break;
        }
        if now.duration_since(last_progress) >= PROGRESS_EVERY {
            last_progress = now;
            emit(&Event::Progress {
                worker: id,
                established: shared.established.load(Relaxed),
                failed: shared.failed.load(Relaxed),
            })?;
        }
        tokio::select! {
            biased;
            () = parent_gone.cancelled() => bail!("parent closed stdin during the connect phase"),
            permit = permits.clone().acquire_owned(), if spawned < count && now < connect_by => {
                let permit = permit.context("connect semaphore closed")?;
                tasks.spawn(connection(shared.clone(), spawned, permit, stop.clone(), connect_by));
                spawned += 1;
            }
            _ = tick.tick() => {}
        }
    }
    Ok(spawned)
}

/// Tells the parent how the connect phase went.
fn report_connected(id: usize, shared: &Shared, spawned: usize) -> Result<()> {
    let count = shared.slots.len();
    let mut connect_errors = lock(&shared.connect_errors).clone();
    let never_tried = (count - spawned) as u64;
    if never_tried > 0 {
        connect_errors.record_n(
            "not attempted",
            "the connect phase ran out of time (--max-connect-time)",
            never_tried,
        );
    }
    let established = shared.established.load(Relaxed);
    let first_attempt = shared.first_attempt_us.load(Relaxed);
    emit(&Event::Connected(ConnectedReport {
        worker: id,
        assigned: count as u64,
        attempted: spawned as u64,
        established,
        failed: count as u64 - established,
        established_per_hub: shared.per_hub.iter().map(|n| n.load(Relaxed)).collect(),
        errors: connect_errors,
        first_attempt_us: if first_attempt == u64::MAX {
            0
        } else {
            first_attempt
        },
        last_connected_us: shared.last_connected_us.load(Relaxed),
        rss_kib: proc::rss_kib(None).unwrap_or(0),
    }))
}

/// Waits until every live connection has everything that was published to its user, or
/// until the drain time is up; returns how long that took, in ms.
async fn drain(
    shared: &Shared,
    published: &[u64],
    deadline: Instant,
    drain_timeout: Duration,
    parent_gone: &CancellationToken,
) -> Result<u64> {
    let drain_started = Instant::now();
    let drain_by = deadline.min(drain_started + drain_timeout);
    while shared.outstanding(published) > 0 && Instant::now() < drain_by {
        tokio::select! {
            () = parent_gone.cancelled() => bail!("parent closed stdin during the drain"),
            () = sleep(POLL) => {}
        }
    }
    Ok(u64::try_from(drain_started.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// Stops the connection tasks and waits for them, at most [`WIND_DOWN`].
async fn close_connections(stop: &CancellationToken, tasks: &mut JoinSet<()>) {
    stop.cancel();
    // Let the tasks record their last figures (SSE heartbeat counts); bounded.
    let _ = timeout(WIND_DOWN, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Sends the parent the worker's final figures.
fn report_final(id: usize, shared: &Shared, published: &[u64], drain_ms: u64) -> Result<()> {
    let latency = encode_histogram(&lock(&shared.latency))?;
    emit(&Event::Report(Box::new(FinalReport {
        worker: id,
        delivery: shared.delivery(published),
        disconnects: shared.disconnects.load(Relaxed),
        disconnect_errors: lock(&shared.disconnect_errors).clone(),
        sse_comments: shared.sse_comments.load(Relaxed),
        drain_ms,
        cpu_ms: cpu_ms(),
        rss_kib: proc::rss_kib(None).unwrap_or(0),
        latency,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Layout, TransportMode};
    use crate::target::HubAddr;

    fn shared(first: usize, end: usize, users: usize) -> Result<Shared> {
        Ok(Shared::new(WorkerSpec {
            worker: 0,
            first,
            end,
            layout: Layout {
                connections: end,
                users,
                hubs: 1,
                publish_any: false,
                mode: TransportMode::Ws,
                sources: 0,
            },
            hubs: vec![HubAddr {
                url: String::new(),
                authority: "h".into(),
                prefix: String::new(),
                addr: "127.0.0.1:1".parse()?,
            }],
            source_ips: Vec::new(),
            source_port_base: None,
            user_prefix: "lt-".into(),
            jwt_secret: "s".into(),
            token_ttl_secs: 60,
            connect_concurrency: 1,
            connect_timeout_ms: 1,
            max_connect_ms: 1,
            deadline_ms: 1,
        }))
    }

    fn load(seq: u64) -> Vec<u8> {
        format!(
            r#"{{"id":"x","type":"load","data":{{"sent_us":{},"seq":{seq}}}}}"#,
            unix_micros()
        )
        .into_bytes()
    }

    #[test]
    fn missing_and_duplicates_follow_published_counts() -> Result<()> {
        // Connections 4..8 of users 0..3: local slots map to users 1, 2, 0, 1.
        let s = shared(4, 8, 3)?;
        assert_eq!(
            (0..4).map(|l| s.user_of(l)).collect::<Vec<_>>(),
            [1, 2, 0, 1]
        );
        let published = [1, 2, 3]; // per user index
        for slot in &s.slots[..3] {
            slot.state.store(ALIVE, Relaxed);
        }
        s.slots[3].state.store(FAILED, Relaxed);

        let mut seqs = SeqTracker::default();
        for seq in [1, 2, 2, 3] {
            s.receive(&s.slots[0], &mut seqs, &load(seq));
        }
        let mut seqs = SeqTracker::default();
        s.receive(&s.slots[1], &mut seqs, &load(3));
        s.receive(&s.slots[1], &mut seqs, b"{not json");
        s.receive(
            &s.slots[1],
            &mut seqs,
            br#"{"type":"hub.connected","data":{}}"#,
        );

        // Slot 0 (user 1, 2 published) got 1,2,3 (3 unexpected), slot 1 (user 2, 3
        // published) got only 3, slot 2 (user 0) nothing, slot 3 failed to connect.
        assert_eq!(s.outstanding(&published), 2 + 1);
        s.slots[2].state.store(GONE, Relaxed);
        assert_eq!(s.outstanding(&published), 2);

        let d = s.delivery(&published);
        assert_eq!(d.deliveries, 5);
        assert_eq!(d.duplicates, 1);
        assert_eq!(d.expected, 2 + 3 + 1);
        assert_eq!(d.missing, 2 + 1);
        assert_eq!(d.unexpected, 1);
        assert_eq!(d.bad_messages, 1);
        assert_eq!(d.other_messages, 1);
        assert_eq!(lock(&s.latency).len(), 5);
        Ok(())
    }
}
