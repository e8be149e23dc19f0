//! Worker process: opens its slice of the connections, counts what arrives on them and
//! reports to the parent over stdout.
//!
//! Phases follow the parent's commands on stdin: configure → connect (report
//! `connected`) → wait for `start` → wait for `drain` → drain (report `report`) → exit.
//! The worker exits on its own when stdin closes (the parent died) or when the run's
//! deadline passes, so it never outlives a run.
//!
//! A connection listens to its streams (its user's personal stream and the channels of the
//! scenario, see [`crate::streams`]) and checks each: every seq once, in order. With
//! resumes, some connections drop in the publishing window, stay away a while, and come
//! back on the next hub with the id of the last envelope they saw.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, sleep_until, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::conn::{Conn, ConnPlan, Envelope, Failure, Transport, parse_envelope};
use crate::ipc::{self, Command, ConnectedReport, Event, FinalReport, WorkerSpec};
use crate::proc;
use crate::stats::{
    DeliveryCounters, ErrorTally, encode_histogram, new_histogram, truncate_on_char_boundary,
    unix_micros,
};
use crate::streams::{Arrival, StreamTracker, drop_point, resumes};
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
/// How long a dropped connection keeps trying to come back.
const RESUME_WITHIN: Duration = Duration::from_secs(15);
/// Pause between failed attempts to come back.
const RESUME_RETRY: Duration = Duration::from_millis(500);

/// Lifecycle of one connection slot.
const PENDING: u8 = 0;
const ALIVE: u8 = 1;
const FAILED: u8 = 2;
const GONE: u8 = 3;
/// Away on purpose, coming back: still owed its deliveries.
const AWAY: u8 = 4;

/// Flags of what went wrong on one connection.
const SAW_DUPLICATE: u8 = 1;
const SAW_DISORDER: u8 = 2;

/// Per-connection figures the worker's main task reads while the connection runs.
struct Slot {
    unique: AtomicU64,
    state: AtomicU8,
    flags: AtomicU8,
}

/// What one connection tracks per stream.
struct ConnStreams {
    /// Stream indices, personal first (see [`crate::streams::StreamPlan::streams_of`]).
    streams: Vec<usize>,
    trackers: Vec<StreamTracker>,
    /// Id of the last notification received, kept only by connections that resume.
    last_id: Option<String>,
    keep_id: bool,
    /// Notifications sent before this moment (µs) are replays of a resume.
    replay_before_us: u64,
}

impl ConnStreams {
    fn new(streams: Vec<usize>, keep_id: bool) -> Self {
        Self {
            trackers: streams.iter().map(|_| StreamTracker::default()).collect(),
            streams,
            last_id: None,
            keep_id,
            replay_before_us: 0,
        }
    }
}

/// State shared by the worker's main task and all its connection tasks.
struct Shared {
    spec: WorkerSpec,
    minter: TokenMinter,
    /// Channel name → stream index.
    channel_streams: HashMap<String, usize>,
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
    out_of_order: AtomicU64,
    other_messages: AtomicU64,
    bad_messages: AtomicU64,
    foreign: AtomicU64,
    sse_comments: AtomicU64,
    disconnects: AtomicU64,
    disconnect_errors: Mutex<ErrorTally>,
    gaps: Mutex<ErrorTally>,
    gap_count: AtomicU64,
    replayed: AtomicU64,
    resumes: AtomicU64,
    not_resumed: AtomicU64,
    resume_failures: AtomicU64,
    resume_errors: Mutex<ErrorTally>,
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
            channel_streams: spec
                .streams
                .channel_names()
                .into_iter()
                .enumerate()
                .map(|(c, name)| (name, spec.streams.channel_stream(c)))
                .collect(),
            slots: (0..count)
                .map(|_| Slot {
                    unique: AtomicU64::new(0),
                    state: AtomicU8::new(PENDING),
                    flags: AtomicU8::new(0),
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
            out_of_order: AtomicU64::new(0),
            other_messages: AtomicU64::new(0),
            bad_messages: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            sse_comments: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            disconnect_errors: Mutex::new(ErrorTally::default()),
            gaps: Mutex::new(ErrorTally::default()),
            gap_count: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            not_resumed: AtomicU64::new(0),
            resume_failures: AtomicU64::new(0),
            resume_errors: Mutex::new(ErrorTally::default()),
            latency: Mutex::new(new_histogram()),
            spec,
        }
    }

    /// Connection attempts that have finished one way or the other.
    fn resolved(&self) -> u64 {
        self.established.load(Relaxed) + self.failed.load(Relaxed)
    }

    /// The token of `plan`'s user, granting the channels it does not join by message.
    fn token(&self, plan: ConnPlan) -> Result<String, Failure> {
        let name = user_name(&self.spec.user_prefix, plan.user);
        let channels: Vec<String> = self
            .spec
            .streams
            .claimed_of(plan.user, plan.transport == Transport::Ws)
            .into_iter()
            .map(|c| self.spec.streams.channel_name(c))
            .collect();
        self.minter
            .mint_with_channels(&name, &channels)
            .map_err(|e| Failure::new("token", format!("{e:#}")))
    }

    /// The local address connection `j` binds to, if any.
    fn source(&self, j: usize, plan: ConnPlan) -> Result<Option<std::net::SocketAddr>, Failure> {
        let ip = plan
            .source
            .and_then(|i| self.spec.source_ips.get(i).copied());
        Ok(match self.spec.source_port_base {
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
        })
    }

    /// Opens the connection for `plan` on hub `hub` (resuming after `resume`, binding to
    /// `source`) and waits for its first envelope.
    async fn open(
        &self,
        plan: ConnPlan,
        hub: usize,
        resume: Option<&str>,
        source: Option<std::net::SocketAddr>,
    ) -> Result<(Conn, Bytes), Failure> {
        let addr = self
            .spec
            .hubs
            .get(hub)
            .ok_or_else(|| Failure::new("config", format!("no hub #{hub}")))?;
        let token = self.token(plan)?;
        let mut conn = Conn::open(plan.transport, addr, &token, resume, source).await?;
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

    /// Sends a `subscribe` (with a channel token) for each channel `plan`'s connection joins
    /// by message; returns their names.
    async fn send_subscribes(
        &self,
        conn: &mut Conn,
        plan: ConnPlan,
    ) -> Result<Vec<String>, Failure> {
        let user = user_name(&self.spec.user_prefix, plan.user);
        let mut names = Vec::new();
        for c in self
            .spec
            .streams
            .subscribed_of(plan.user, plan.transport == Transport::Ws)
        {
            let channel = self.spec.streams.channel_name(c);
            let token = self
                .minter
                .mint_for_channel(&user, &channel)
                .map_err(|e| Failure::new("token", format!("{e:#}")))?;
            let message =
                serde_json::json!({"type": "subscribe", "channel": channel, "token": token});
            conn.send_text(message.to_string())
                .await
                .map_err(|e| Failure::new("subscribe", format!("{e:#}")))?;
            names.push(channel);
        }
        Ok(names)
    }

    /// Joins `plan`'s channels by message and waits until the hub confirms each, accounting
    /// for whatever arrives meanwhile.
    async fn join_by_message(
        &self,
        conn: &mut Conn,
        plan: ConnPlan,
        slot: &Slot,
        streams: &mut ConnStreams,
    ) -> Result<(), Failure> {
        let mut pending = self.send_subscribes(conn, plan).await?;
        while !pending.is_empty() {
            let payload = conn
                .next_payload()
                .await
                .map_err(|e| Failure::new("closed before hub.subscribed", format!("{e:#}")))?;
            match parse_envelope(&payload) {
                Ok(Envelope::Refused { reason }) => {
                    return Err(Failure::new("subscribe refused", reason));
                }
                Ok(Envelope::Subscribed {
                    channel: Some(channel),
                    ..
                }) => pending.retain(|c| *c != channel),
                _ => {}
            }
            self.receive(slot, streams, &payload);
        }
        Ok(())
    }

    fn connect_failed(&self, slot: &Slot, kind: &str, detail: &str) {
        slot.state.store(FAILED, Relaxed);
        lock(&self.connect_errors).record(kind, detail);
        self.failed.fetch_add(1, Relaxed);
    }

    /// Accounts for one received payload.
    fn receive(&self, slot: &Slot, conn: &mut ConnStreams, payload: &[u8]) {
        match parse_envelope(payload) {
            Ok(Envelope::Load {
                sent_us,
                seq,
                channel,
                id,
            }) => {
                let stream = match channel.as_deref() {
                    None => conn.streams.first().copied(),
                    Some(name) => self.channel_streams.get(name).copied(),
                };
                // A channel this connection does not hold, or a stream it is not on, is a
                // leak between streams, not a delivery.
                let Some(k) = stream.and_then(|s| conn.streams.iter().position(|&x| x == s)) else {
                    self.foreign.fetch_add(1, Relaxed);
                    return;
                };
                self.deliveries.fetch_add(1, Relaxed);
                if sent_us < conn.replay_before_us {
                    self.replayed.fetch_add(1, Relaxed);
                } else {
                    let latency_us = unix_micros().saturating_sub(sent_us);
                    lock(&self.latency).saturating_record(latency_us);
                }
                if conn.keep_id
                    && let Some(id) = id
                {
                    conn.last_id = Some(id.into_owned());
                }
                match conn.trackers[k].observe(seq) {
                    Arrival::InOrder => {
                        slot.unique.fetch_add(1, Relaxed);
                    }
                    Arrival::OutOfOrder => {
                        slot.unique.fetch_add(1, Relaxed);
                        slot.flags.fetch_or(SAW_DISORDER, Relaxed);
                        self.out_of_order.fetch_add(1, Relaxed);
                    }
                    Arrival::Duplicate => {
                        slot.flags.fetch_or(SAW_DUPLICATE, Relaxed);
                        self.duplicates.fetch_add(1, Relaxed);
                    }
                    Arrival::OutOfRange => {
                        self.out_of_range.fetch_add(1, Relaxed);
                    }
                }
            }
            Ok(Envelope::Gap { channel }) => {
                self.gap_count.fetch_add(1, Relaxed);
                let (kind, detail) = match channel.as_deref() {
                    Some(name) => ("channel", name),
                    None => ("personal", ""),
                };
                lock(&self.gaps).record(kind, detail);
            }
            Ok(Envelope::Connected { cursor, .. } | Envelope::Subscribed { cursor, .. }) => {
                // Before any notification, the greeting's (or a later subscription's) cursor
                // is the resume point.
                if conn.keep_id
                    && let Some(cursor) = cursor
                {
                    conn.last_id = Some(cursor.into_owned());
                }
                self.other_messages.fetch_add(1, Relaxed);
            }
            Ok(Envelope::Refused { reason }) => {
                // A refused resubscribe after a resume, say: the channel's notifications will
                // show up as missing; say why.
                lock(&self.resume_errors).record("hub.error", &reason);
                self.other_messages.fetch_add(1, Relaxed);
            }
            Ok(Envelope::Other) => {
                self.other_messages.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.bad_messages.fetch_add(1, Relaxed);
            }
        }
    }

    /// Connection index (over all workers) of local slot `local`.
    fn index_of(&self, local: usize) -> usize {
        self.spec.first + local
    }

    /// User index of local slot `local`.
    fn user_of(&self, local: usize) -> usize {
        self.index_of(local) % self.spec.layout.users.max(1)
    }

    /// Notifications published to the streams local slot `local` listens to.
    fn owed(&self, local: usize, published: &[u64]) -> u64 {
        self.spec
            .streams
            .streams_of(self.user_of(local))
            .into_iter()
            .map(|s| published.get(s).copied().unwrap_or(0))
            .sum()
    }

    /// Deliveries still owed to connections that are alive (or away and coming back).
    fn outstanding(&self, published: &[u64]) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| matches!(slot.state.load(Relaxed), ALIVE | AWAY))
            .map(|(local, slot)| {
                self.owed(local, published)
                    .saturating_sub(slot.unique.load(Relaxed))
            })
            .sum()
    }

    /// Delivery counters against the parent's per-stream publish counts.
    fn delivery(&self, published: &[u64]) -> DeliveryCounters {
        let mut counters = DeliveryCounters {
            deliveries: self.deliveries.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            out_of_range: self.out_of_range.load(Relaxed),
            out_of_order: self.out_of_order.load(Relaxed),
            other_messages: self.other_messages.load(Relaxed),
            bad_messages: self.bad_messages.load(Relaxed) + self.foreign.load(Relaxed),
            gaps: self.gap_count.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            resumes: self.resumes.load(Relaxed),
            resumes_not_resumed: self.not_resumed.load(Relaxed),
            resume_failures: self.resume_failures.load(Relaxed),
            ..DeliveryCounters::default()
        };
        for (local, slot) in self.slots.iter().enumerate() {
            // Connections that dropped out still count: what they missed is lost.
            if !matches!(slot.state.load(Relaxed), ALIVE | GONE | AWAY) {
                continue;
            }
            let owed = self.owed(local, published);
            let unique = slot.unique.load(Relaxed);
            counters.expected += owed;
            counters.missing += owed.saturating_sub(unique);
            counters.unexpected += unique.saturating_sub(owed);
            counters.connections_missing += u64::from(unique < owed);
            let flags = slot.flags.load(Relaxed);
            counters.connections_with_duplicates += u64::from(flags & SAW_DUPLICATE != 0);
            counters.connections_out_of_order += u64::from(flags & SAW_DISORDER != 0);
        }
        counters
    }

    /// Connection `j`'s drop time, if it is one that resumes: a point in the middle of
    /// the publishing window that starts at `start`.
    fn drop_time(&self, j: usize, start: Instant) -> Option<Instant> {
        let resume = &self.spec.resume;
        if !resumes(j, resume.fraction) || self.spec.hubs.is_empty() {
            return None;
        }
        let window = Duration::from_millis(resume.window_ms);
        Some(start + window.mul_f64(drop_point(j)))
    }

    /// Brings a dropped connection back on the hub after `hub`, resuming from its last
    /// id; retries for [`RESUME_WITHIN`]. None if it could not.
    async fn come_back(
        &self,
        j: usize,
        plan: ConnPlan,
        hub: usize,
        streams: &mut ConnStreams,
    ) -> Option<Conn> {
        let next_hub = (hub + 1) % self.spec.hubs.len().max(1);
        let give_up = Instant::now() + RESUME_WITHIN;
        let mut last = Failure::new("resume", "never tried");
        while Instant::now() < give_up {
            // The source port of the first connection may still be in TIME_WAIT: let the
            // kernel choose this time.
            let source = self
                .source(j, plan)
                .ok()
                .flatten()
                .map(|a| std::net::SocketAddr::new(a.ip(), 0));
            let attempt = timeout_at(
                give_up,
                self.open(plan, next_hub, streams.last_id.as_deref(), source),
            )
            .await;
            match attempt {
                Ok(Ok((mut conn, first))) => {
                    // The channels joined by message come back by message (the hub resumes
                    // them from the cursor); their confirmations arrive with the rest.
                    if let Err(f) = self.send_subscribes(&mut conn, plan).await {
                        last = f;
                        sleep(RESUME_RETRY).await;
                        continue;
                    }
                    streams.replay_before_us = unix_micros();
                    self.resumes.fetch_add(1, Relaxed);
                    // A connection that had seen nothing yet has nothing to resume.
                    if streams.last_id.is_some()
                        && matches!(
                            parse_envelope(&first),
                            Ok(Envelope::Connected { resumed: false, .. })
                        )
                    {
                        self.not_resumed.fetch_add(1, Relaxed);
                    }
                    self.receive(&self.slots[j - self.spec.first], streams, &first);
                    return Some(conn);
                }
                Ok(Err(failure)) => last = failure,
                Err(_) => last = Failure::new("resume timeout", "no hub.connected in time"),
            }
            sleep(RESUME_RETRY).await;
        }
        self.resume_failures.fetch_add(1, Relaxed);
        lock(&self.resume_errors).record(&last.kind, &last.detail);
        None
    }
}

/// Runs one connection from attempt to stop.
async fn connection(
    shared: Arc<Shared>,
    local: usize,
    permit: OwnedSemaphorePermit,
    stop: CancellationToken,
    connect_by: Instant,
    mut started: watch::Receiver<Option<Instant>>,
) {
    let slot = &shared.slots[local];
    let j = shared.index_of(local);
    let plan = shared.spec.layout.plan(j);
    shared.first_attempt_us.fetch_min(unix_micros(), Relaxed);

    let limit =
        connect_by.min(Instant::now() + Duration::from_millis(shared.spec.connect_timeout_ms));
    let opened = match shared.source(j, plan) {
        Ok(source) => timeout_at(limit, shared.open(plan, plan.hub, None, source)).await,
        Err(failure) => Ok(Err(failure)),
    };
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
    let will_resume = resumes(j, shared.spec.resume.fraction);
    let mut streams = ConnStreams::new(shared.spec.streams.streams_of(plan.user), will_resume);
    shared.receive(slot, &mut streams, &first);
    // Channels joined by message count as joined once the hub has confirmed them.
    let joined = timeout_at(
        limit,
        shared.join_by_message(&mut conn, plan, slot, &mut streams),
    )
    .await;
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => return shared.connect_failed(slot, &failure.kind, &failure.detail),
        Err(_) => {
            return shared.connect_failed(
                slot,
                "timeout",
                "no hub.subscribed within the connect timeout",
            );
        }
    }
    slot.state.store(ALIVE, Relaxed);
    shared.per_hub[plan.hub].fetch_add(1, Relaxed);
    shared.last_connected_us.fetch_max(unix_micros(), Relaxed);
    shared.established.fetch_add(1, Relaxed);

    // When to drop, once publishing has started (never, for most connections).
    let mut drop_at: Option<Instant> = None;
    let mut waiting_for_start = will_resume;
    let ended = loop {
        let drop_due = async {
            match drop_at {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break None,
            changed = started.changed(), if waiting_for_start => {
                if changed.is_err() {
                    waiting_for_start = false;
                } else if let Some(start) = *started.borrow_and_update() {
                    waiting_for_start = false;
                    drop_at = shared.drop_time(j, start);
                }
            }
            () = drop_due => {
                drop_at = None;
                if let Conn::Sse(sse) = &conn {
                    shared.sse_comments.fetch_add(sse.comments(), Relaxed);
                }
                slot.state.store(AWAY, Relaxed);
                // Dropping the socket is what a client losing its network does.
                drop(conn);
                sleep(Duration::from_millis(shared.spec.resume.offline_ms)).await;
                match shared.come_back(j, plan, plan.hub, &mut streams).await {
                    Some(back) => {
                        conn = back;
                        slot.state.store(ALIVE, Relaxed);
                    }
                    None => {
                        slot.state.store(GONE, Relaxed);
                        return;
                    }
                }
            }
            payload = conn.next_payload() => match payload {
                Ok(payload) => shared.receive(slot, &mut streams, &payload),
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
    // When publishing started: connections that drop and resume time their drop from it.
    let (start_tx, start_rx) = watch::channel(None);

    let phase = ConnectPhase {
        id,
        connect_by,
        parent_gone: &parent_gone,
        stop: &stop,
        started: start_rx,
    };
    let spawned = connect_phase(&shared, phase, &mut tasks).await?;
    report_connected(id, &shared, spawned)?;

    // Hold and publish phases: the connection tasks do the work; we wait for orders.
    match next_command(&mut commands, deadline).await? {
        Command::Start => {
            start_tx.send_replace(Some(Instant::now()));
        }
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

/// What the connect phase hands each connection task, and its limits.
struct ConnectPhase<'a> {
    id: usize,
    connect_by: Instant,
    parent_gone: &'a CancellationToken,
    stop: &'a CancellationToken,
    started: watch::Receiver<Option<Instant>>,
}

/// Opens the worker's connections; returns how many attempts were started.
///
/// Attempts are spawned as handshake permits free up, until all are resolved or the
/// phase's time is up.
async fn connect_phase(
    shared: &Arc<Shared>,
    phase: ConnectPhase<'_>,
    tasks: &mut JoinSet<()>,
) -> Result<usize> {
    let ConnectPhase {
        id,
        connect_by,
        parent_gone,
        stop,
        started,
    } = phase;
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
                tasks.spawn(connection(
                    shared.clone(),
                    spawned,
                    permit,
                    stop.clone(),
                    connect_by,
                    started.clone(),
                ));
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
        gaps: lock(&shared.gaps).clone(),
        resume_errors: lock(&shared.resume_errors).clone(),
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
    use crate::ipc::ResumeSpec;
    use crate::streams::{Scenario, StreamPlan};
    use crate::target::HubAddr;

    fn shared_with(
        first: usize,
        end: usize,
        users: usize,
        streams: StreamPlan,
        resume: ResumeSpec,
    ) -> Result<Shared> {
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
            streams,
            resume,
        }))
    }

    fn shared(first: usize, end: usize, users: usize) -> Result<Shared> {
        let streams = StreamPlan::new(Scenario::Personal, users, 0, "load:");
        shared_with(first, end, users, streams, ResumeSpec::default())
    }

    fn load(seq: u64) -> Vec<u8> {
        format!(
            r#"{{"id":"x","type":"load","data":{{"sent_us":{},"seq":{seq}}}}}"#,
            unix_micros()
        )
        .into_bytes()
    }

    fn on_channel(channel: &str, seq: u64, id: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"{id}","type":"load","channel":"{channel}","data":{{"sent_us":{},"seq":{seq}}}}}"#,
            unix_micros()
        )
        .into_bytes()
    }

    /// The streams local slot `local` of `s` listens to.
    fn streams_of(s: &Shared, local: usize, keep_id: bool) -> ConnStreams {
        ConnStreams::new(s.spec.streams.streams_of(s.user_of(local)), keep_id)
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

        let mut seqs = streams_of(&s, 0, false);
        for seq in [1, 2, 2, 3] {
            s.receive(&s.slots[0], &mut seqs, &load(seq));
        }
        let mut seqs = streams_of(&s, 1, false);
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
        assert_eq!(d.connections_missing, 2);
        assert_eq!(d.connections_with_duplicates, 1);
        assert_eq!(d.out_of_order, 0);
        assert_eq!(lock(&s.latency).len(), 5);
        Ok(())
    }

    #[test]
    fn each_stream_is_checked_on_its_own() -> Result<()> {
        // Mixed, 4 users in 2 groups: user 1 holds lt-1, load:all and load:g1.
        let plan = StreamPlan::new(Scenario::Mixed, 4, 2, "load:");
        let s = shared_with(1, 2, 4, plan, ResumeSpec::default())?;
        s.slots[0].state.store(ALIVE, Relaxed);
        let mut conn = streams_of(&s, 0, true);
        assert_eq!(conn.streams, [1, 4, 6]);
        // Streams: 4 users, then load:all (4), load:g0 (5), load:g1 (6).
        let mut published = vec![0; 7];
        published[1] = 2;
        published[4] = 3;
        published[6] = 1;
        published[5] = 9; // the other group: not owed to this connection

        s.receive(&s.slots[0], &mut conn, &load(1));
        s.receive(&s.slots[0], &mut conn, &on_channel("load:all", 1, "a"));
        // Each stream has its own seq 1: no duplicate across streams.
        s.receive(&s.slots[0], &mut conn, &on_channel("load:g1", 1, "b"));
        s.receive(&s.slots[0], &mut conn, &on_channel("load:all", 3, "c"));
        s.receive(&s.slots[0], &mut conn, &on_channel("load:all", 2, "d"));
        s.receive(&s.slots[0], &mut conn, &load(2));
        assert_eq!(conn.last_id.as_deref(), Some("x"));
        // A channel the connection does not hold is not a delivery.
        s.receive(&s.slots[0], &mut conn, &on_channel("load:g0", 1, "e"));
        s.receive(&s.slots[0], &mut conn, &on_channel("nobody", 1, "f"));
        s.receive(
            &s.slots[0],
            &mut conn,
            br#"{"type":"hub.gap","data":{"channel":"load:g1"}}"#,
        );

        assert_eq!(s.outstanding(&published), 0);
        let d = s.delivery(&published);
        assert_eq!((d.deliveries, d.expected, d.missing), (6, 6, 0));
        assert_eq!((d.out_of_order, d.connections_out_of_order), (1, 1));
        assert_eq!(d.bad_messages, 2, "two notifications of foreign streams");
        assert_eq!(d.gaps, 1);
        assert_eq!(lock(&s.gaps).counts.get("channel"), Some(&1));
        assert!(lock(&s.gaps).samples[0].contains("load:g1"));
        Ok(())
    }

    #[test]
    fn a_greetings_cursor_is_the_resume_point_until_a_notification_comes() -> Result<()> {
        let plan = StreamPlan::new(Scenario::Broadcast, 1, 0, "load:");
        let s = shared_with(0, 1, 1, plan, ResumeSpec::default())?;
        let hello = br#"{"type":"hub.connected","data":{"user":"lt-0","resumed":false,"cursor":"a-1.0a0b0c0d~0-0"}}"#;
        let mut conn = streams_of(&s, 0, true);
        s.receive(&s.slots[0], &mut conn, hello);
        assert_eq!(conn.last_id.as_deref(), Some("a-1.0a0b0c0d~0-0"));
        s.receive(
            &s.slots[0],
            &mut conn,
            &on_channel("load:all", 1, "a-1.0a0b0c0d~b-1"),
        );
        assert_eq!(conn.last_id.as_deref(), Some("a-1.0a0b0c0d~b-1"));
        // Only connections that resume keep ids.
        let mut quiet = streams_of(&s, 0, false);
        s.receive(&s.slots[0], &mut quiet, hello);
        assert_eq!(quiet.last_id, None);
        Ok(())
    }

    #[test]
    fn replays_after_a_resume_stay_out_of_the_latency() -> Result<()> {
        let s = shared(0, 1, 1)?;
        s.slots[0].state.store(AWAY, Relaxed);
        let mut conn = streams_of(&s, 0, true);
        conn.replay_before_us = unix_micros() + 1_000_000;
        s.receive(&s.slots[0], &mut conn, &load(1));
        conn.replay_before_us = 0;
        s.receive(&s.slots[0], &mut conn, &load(2));
        let d = s.delivery(&[3]);
        assert_eq!((d.deliveries, d.replayed, d.missing), (2, 1, 1));
        assert_eq!(lock(&s.latency).len(), 1);
        // Away connections are still owed what they have not had.
        assert_eq!(s.outstanding(&[3]), 1);
        Ok(())
    }

    #[test]
    fn only_the_chosen_fraction_drops_in_the_window() -> Result<()> {
        let resume = ResumeSpec {
            fraction: 0.5,
            offline_ms: 100,
            window_ms: 10_000,
        };
        let plan = StreamPlan::new(Scenario::Mixed, 4, 2, "load:");
        let s = shared_with(0, 4, 4, plan, resume)?;
        let start = Instant::now();
        let drops: Vec<Option<Instant>> = (0..4).map(|j| s.drop_time(j, start)).collect();
        assert_eq!(drops.iter().filter(|d| d.is_some()).count(), 2);
        for at in drops.into_iter().flatten() {
            let into = at - start;
            assert!(into >= Duration::from_millis(2500) && into < Duration::from_millis(7500));
        }
        Ok(())
    }
}
