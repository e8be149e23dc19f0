//! Publishing through the hub's HTTP API at a paced rate.
//!
//! A fixed set of senders each own one HTTP/1.1 keep-alive connection (hyper's
//! low-level client) and keep one request in flight on it. A request carries one
//! notification (`POST /api/publish`) or a batch of them (`POST /api/publish/batch`).
//! Each sender is paced by a token bucket at its share of the total rate: it sends on a
//! fixed schedule and, when it falls behind, catches up with at most [`MAX_BACKLOG`]
//! (or one request, if longer) worth of requests rather than bursting the whole
//! deficit. Per-user sequence numbers and success counts are shared atomics, so any
//! sender can publish to any user.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::ValueEnum;
use hdrhistogram::Histogram;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hub::grpc::PublisherClient;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use proto::hub::v1::PublishRequest;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use crate::conn::{Failure, tcp_connect};
use crate::stats::{ErrorTally, merge_histogram, new_histogram, unix_micros};
use crate::target::HubAddr;
use crate::token::user_name;

/// Limit for one publish request, response body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for opening a publish connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest backlog a sender may catch up on after a stall, as time at its rate.
const MAX_BACKLOG: Duration = Duration::from_millis(100);
/// Pause after a failed connect so a down hub is not hammered in a tight loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

type Sender = http1::SendRequest<Full<Bytes>>;

/// How notifications go to the publish API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// One notification per `POST /api/publish`.
    Http,
    /// `--batch-size` notifications per `POST /api/publish/batch`.
    Batch,
    /// One gRPC `PublishStream` per sender, one request per notification; the publish
    /// targets (`--publish-via`, else `--hub`) are then the nodes' gRPC listeners.
    Grpc,
}

impl std::fmt::Display for PublishMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Http => "http",
            Self::Batch => "batch",
            Self::Grpc => "grpc",
        })
    }
}

/// What to publish, where and how fast.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// Hub nodes to send the publish requests to.
    pub hubs: Vec<HubAddr>,
    /// API key for `Authorization: Bearer`.
    pub api_key: String,
    /// Number of users; user i lives on hub i % hubs unless `publish_any`.
    pub users: usize,
    /// User name prefix.
    pub user_prefix: String,
    /// Total notifications per second.
    pub rate: f64,
    /// How long to publish.
    pub duration: Duration,
    /// Upper bound on the number of senders (connections with a request in flight).
    pub concurrency: usize,
    /// Publish through any hub, round-robin, instead of the user's own.
    pub publish_any: bool,
    /// Single or batched publish requests (HTTP API only).
    pub mode: PublishMode,
    /// Notifications per request in batch mode.
    pub batch_size: usize,
    /// Produce to Kafka instead of calling the HTTP API.
    pub kafka: Option<KafkaTarget>,
    /// Channels to publish to as well, streams `users..users + channels.len()`.
    pub channels: Vec<String>,
    /// Publishes per second to each channel.
    pub channel_rate: f64,
    /// Publish each user's notifications through one sender only, so that they reach the
    /// hub in seq order and order can be checked at the receiving end (needs
    /// `publish_any`: a sender's users live on any hub).
    pub ordered: bool,
}

/// Where Kafka-mode publishing produces to.
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Topic.
    pub topic: String,
}

#[derive(Serialize)]
struct KafkaEvent<'a> {
    event_id: String,
    user_id: &'a str,
    sent_us: u64,
    seq: u64,
}

/// What publishing achieved.
#[derive(Debug)]
pub struct PublishOutcome {
    /// Notifications accepted (answered 200), per stream (users, then channels).
    pub published: Vec<u64>,
    /// Total notifications accepted.
    pub ok: u64,
    /// Notifications that failed (non-200, transport error, timeout, no connection).
    pub failed: u64,
    /// Why notifications failed, counted per notification (a failed batch counts each).
    pub errors: ErrorTally,
    /// Requests answered 200 (equal to `ok` unless batching).
    pub requests_ok: u64,
    /// From the first send to the last response, and at least the publishing duration.
    pub elapsed: Duration,
    /// Round-trip time of successful publish requests, µs.
    pub request_latency: Histogram<u64>,
    /// Number of senders used.
    pub senders: usize,
}

impl PublishOutcome {
    /// The outcome of not publishing at all, to `streams` streams.
    pub fn nothing(streams: usize) -> Self {
        Self {
            published: vec![0; streams],
            ok: 0,
            failed: 0,
            errors: ErrorTally::default(),
            requests_ok: 0,
            elapsed: Duration::ZERO,
            request_latency: new_histogram(),
            senders: 0,
        }
    }
}

#[derive(Serialize)]
struct PublishBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
    data: LoadData,
}

#[derive(Serialize)]
struct LoadData {
    sent_us: u64,
    seq: u64,
}

/// Who a notification goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To<'a> {
    User(&'a str),
    Channel(&'a str),
}

impl<'a> PublishBody<'a> {
    fn load(to: To<'a>, sent_us: u64, seq: u64) -> Self {
        let (user_id, channel) = match to {
            To::User(user) => (Some(user), None),
            To::Channel(channel) => (None, Some(channel)),
        };
        Self {
            user_id,
            channel,
            kind: "load",
            data: LoadData { sent_us, seq },
        }
    }
}

#[derive(Serialize)]
struct BatchBody<'a> {
    notifications: Vec<PublishBody<'a>>,
}

/// The part of a batch answer that is checked: one id per item.
#[derive(Deserialize)]
struct BatchAnswer {
    ids: Vec<serde::de::IgnoredAny>,
}

/// Encodes the request body for one notification.
fn publish_body(to: To<'_>, sent_us: u64, seq: u64) -> Result<Vec<u8>> {
    serde_json::to_vec(&PublishBody::load(to, sent_us, seq)).context("encoding publish body")
}

/// Encodes a batch request body: `(recipient, seq)` items, all stamped `sent_us`.
fn batch_body<'a>(items: impl IntoIterator<Item = (To<'a>, u64)>, sent_us: u64) -> Result<Vec<u8>> {
    let notifications = items
        .into_iter()
        .map(|(to, seq)| PublishBody::load(to, sent_us, seq))
        .collect();
    serde_json::to_vec(&BatchBody { notifications }).context("encoding batch body")
}

/// Notifications per request: the batch size in batch mode, otherwise one.
fn per_request(mode: PublishMode, batch_size: usize) -> usize {
    match mode {
        PublishMode::Http | PublishMode::Grpc => 1,
        PublishMode::Batch => batch_size.max(1),
    }
}

/// How many senders to use for `rate` notifications/s with `per_request` in each
/// request, at most `concurrency`.
fn senders_wanted(rate: f64, per_request: usize, concurrency: usize) -> usize {
    // No more senders than requests per second: a sender slower than 1/s would leave
    // most of the window idle before its first request.
    let requests_per_sec = rate / per_request.max(1) as f64;
    concurrency.min(requests_per_sec.ceil() as usize).max(1)
}

/// Time between one sender's requests, so that `senders` together publish `rate`
/// notifications/s with `per_request` in each request.
fn send_interval(rate: f64, per_request: usize, senders: usize) -> Duration {
    Duration::from_secs_f64(senders as f64 * per_request.max(1) as f64 / rate)
}

/// Number of users i < `users` with i % `hubs` == `hub`.
fn users_on_hub(users: usize, hubs: usize, hub: usize) -> usize {
    if hub >= users {
        0
    } else {
        (users - hub).div_ceil(hubs)
    }
}

/// Hub index of each sender: as many senders as wanted, evenly over the hubs that have
/// users to publish to (every hub with `publish_any`).
fn sender_hubs(hubs: usize, users: usize, wanted: usize, publish_any: bool) -> Vec<usize> {
    let eligible = if publish_any { hubs } else { hubs.min(users) };
    if eligible == 0 {
        return Vec::new();
    }
    let total = wanted.max(1).div_ceil(eligible) * eligible;
    (0..total).map(|s| s % eligible).collect()
}

/// State shared by all senders.
struct Shared {
    config: PublishConfig,
    /// Users' names, then channels' names: one per stream.
    names: Vec<String>,
    seqs: Vec<AtomicU64>,
    ok: Vec<AtomicU64>,
    /// Round-robin cursor per hub (a single one with `publish_any`).
    cursors: Vec<AtomicU64>,
    failed: AtomicU64,
    requests_ok: AtomicU64,
    errors: Mutex<ErrorTally>,
    producer: Option<FutureProducer>,
    paths: Vec<String>,
    hosts: Vec<HeaderValue>,
    auth: HeaderValue,
}

impl Shared {
    fn new(config: PublishConfig) -> Result<Self> {
        let users = config.users;
        let streams = users + config.channels.len();
        let hosts = config
            .hubs
            .iter()
            .map(|h| {
                HeaderValue::from_str(&h.authority)
                    .with_context(|| format!("{} is not a valid Host header", h.authority))
            })
            .collect::<Result<_>>()?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", config.api_key))
            .context("--api-key contains characters not allowed in a header")?;
        let producer = match &config.kafka {
            Some(k) => Some(
                ClientConfig::new()
                    .set("bootstrap.servers", &k.brokers)
                    .set("acks", "all")
                    .set("enable.idempotence", "true")
                    .set("linger.ms", "0")
                    .set("socket.nagle.disable", "true")
                    .create::<FutureProducer>()
                    .context("creating the Kafka producer")?,
            ),
            None => None,
        };
        Ok(Self {
            producer,
            names: (0..users)
                .map(|i| user_name(&config.user_prefix, i))
                .chain(config.channels.iter().cloned())
                .collect(),
            seqs: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            ok: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            cursors: config.hubs.iter().map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicU64::new(0),
            requests_ok: AtomicU64::new(0),
            errors: Mutex::new(ErrorTally::default()),
            paths: config
                .hubs
                .iter()
                .map(|h| {
                    h.path(match config.mode {
                        PublishMode::Http | PublishMode::Grpc => "/api/publish",
                        PublishMode::Batch => "/api/publish/batch",
                    })
                })
                .collect(),
            hosts,
            auth,
            config,
        })
    }

    /// The recipient of stream `stream`.
    fn to(&self, stream: usize) -> To<'_> {
        let name = self.names[stream].as_str();
        if stream < self.config.users {
            To::User(name)
        } else {
            To::Channel(name)
        }
    }

    /// Picks the next user for a sender on `hub`, round-robin over the eligible users.
    fn pick_user(&self, hub: usize) -> usize {
        let users = self.config.users;
        if self.config.publish_any {
            let k = self.cursors[0].fetch_add(1, Ordering::Relaxed);
            return (k % users as u64) as usize;
        }
        let hubs = self.config.hubs.len();
        let on_hub = users_on_hub(users, hubs, hub).max(1) as u64;
        let k = self.cursors[hub].fetch_add(1, Ordering::Relaxed) % on_hub;
        hub + hubs * k as usize
    }

    /// Counts `count` notifications as failed for one reason.
    fn fail(&self, count: usize, kind: &str, detail: &str) {
        self.failed.fetch_add(count as u64, Ordering::Relaxed);
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record_n(kind, detail, count as u64);
    }

    async fn connect(&self, hub: usize) -> Result<Sender, Failure> {
        let addr = self.config.hubs[hub].addr;
        let tcp = timeout(CONNECT_TIMEOUT, tcp_connect(addr, None))
            .await
            .map_err(|_| Failure::new("publish connect timeout", addr.to_string()))??;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Failure::new("publish handshake", e.to_string()))?;
        tokio::spawn(async move {
            // Ends when either side closes the connection; the sender then reports an
            // error on its next use and is replaced, so the result itself is not needed.
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Returns `previous` if it can take a request, or a fresh connection.
    async fn ready(&self, hub: usize, previous: Option<Sender>) -> Result<Sender, Failure> {
        if let Some(mut sender) = previous
            && sender.ready().await.is_ok()
        {
            return Ok(sender);
        }
        self.connect(hub).await
    }

    /// Produces one event to Kafka (Kafka mode).
    async fn produce_one(
        &self,
        producer: &FutureProducer,
        hub: usize,
        latency: &mut Histogram<u64>,
    ) {
        let Some(target) = &self.config.kafka else {
            return;
        };
        let user = self.pick_user(hub);
        let seq = self.seqs[user].fetch_add(1, Ordering::Relaxed) + 1;
        let name = &self.names[user];
        let event = KafkaEvent {
            event_id: format!("{name}-{seq}"),
            user_id: name,
            sent_us: unix_micros(),
            seq,
        };
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(e) => return self.fail(1, "encode", &e.to_string()),
        };
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/json"),
        });
        // Keyed by user: one user's events stay in one partition, so in order.
        let record = FutureRecord::to(&target.topic)
            .key(name.as_str())
            .payload(&body)
            .headers(headers);
        let started = Instant::now();
        match producer.send(record, REQUEST_TIMEOUT).await {
            Ok(_) => {
                self.ok[user].fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                latency.saturating_record(us);
            }
            Err((e, _)) => self.fail(1, "kafka produce", &e.to_string()),
        }
    }

    /// Publishes one request's worth of notifications via `hub` to the streams `picker`
    /// chooses, reusing or replacing `conn`.
    async fn publish_one(
        &self,
        hub: usize,
        picker: &mut Picker,
        conn: &mut Option<Sender>,
        latency: &mut Histogram<u64>,
    ) {
        if let Some(producer) = &self.producer {
            return self.produce_one(producer, hub, latency).await;
        }
        let count = per_request(self.config.mode, self.config.batch_size);
        // Get a usable connection before taking seqs, so that a keep-alive connection
        // the server closed while idle costs a reconnect instead of a failed publish.
        let mut sender = match self.ready(hub, conn.take()).await {
            Ok(sender) => sender,
            Err(failure) => {
                self.fail(count, &failure.kind, &failure.detail);
                sleep(RECONNECT_PAUSE).await;
                return;
            }
        };
        let users: Vec<usize> = (0..count).map(|_| picker.next(self, hub)).collect();
        let items: Vec<(To<'_>, u64)> = users
            .iter()
            .map(|&stream| {
                let seq = self.seqs[stream].fetch_add(1, Ordering::Relaxed) + 1;
                (self.to(stream), seq)
            })
            .collect();
        let sent_us = unix_micros();
        let body = match (self.config.mode, items.as_slice()) {
            (PublishMode::Http, &[(to, seq)]) => publish_body(to, sent_us, seq),
            _ => batch_body(items, sent_us),
        };
        let body = match body {
            Ok(body) => body,
            Err(e) => return self.fail(count, "encode", &format!("{e:#}")),
        };
        let request = Request::post(self.paths[hub].as_str())
            .header(HOST, self.hosts[hub].clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)));
        let request = match request {
            Ok(request) => request,
            Err(e) => return self.fail(count, "request", &e.to_string()),
        };
        let started = Instant::now();
        match timeout(REQUEST_TIMEOUT, exchange(&mut sender, request)).await {
            Ok(Ok((StatusCode::OK, body))) => {
                for &user in &users {
                    self.ok[user].fetch_add(1, Ordering::Relaxed);
                }
                self.requests_ok.fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                latency.saturating_record(us);
                if self.config.mode == PublishMode::Batch {
                    self.check_batch_answer(&body, count);
                }
                *conn = Some(sender);
            }
            Ok(Ok((status, body))) => {
                self.fail(
                    count,
                    &format!("http {}", status.as_u16()),
                    String::from_utf8_lossy(&body).trim(),
                );
                *conn = Some(sender);
            }
            // The connection is in an unknown state after these; drop it.
            Ok(Err(e)) => self.fail(count, "publish transport", &format!("{e:#}")),
            Err(_) => self.fail(count, "publish timeout", "no response within 10 s"),
        }
    }

    /// Notes a 200 batch answer without one id per item. The items still count as
    /// published: the hub accepted the request, and whatever it did not deliver shows
    /// up as missing.
    fn check_batch_answer(&self, body: &[u8], count: usize) {
        let problem = match serde_json::from_slice::<BatchAnswer>(body) {
            Ok(answer) if answer.ids.len() == count => return,
            Ok(answer) => format!("{} ids for {count} notifications", answer.ids.len()),
            Err(e) => format!("not {{\"ids\": [...]}}: {e}"),
        };
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record("batch answer", &problem);
    }
}

/// Sends one request and reads the whole response.
async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes)> {
    let response = sender
        .send_request(request)
        .await
        .context("sending publish request")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading publish response")?
        .to_bytes();
    Ok((status, body))
}

/// How a sender chooses the stream of each notification.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Picker {
    /// Round-robin over the users of its hub, shared with the hub's other senders.
    Users,
    /// Round-robin over streams only this sender publishes to, so each stream's
    /// notifications leave in seq order, one request at a time.
    Own { streams: Vec<usize>, next: usize },
}

impl Picker {
    /// The streams sender `index` of `senders` owns among `users` users.
    fn own_users(index: usize, senders: usize, users: usize) -> Self {
        Self::Own {
            streams: (index..users).step_by(senders.max(1)).collect(),
            next: 0,
        }
    }

    fn next(&mut self, shared: &Shared, hub: usize) -> usize {
        match self {
            Self::Users => shared.pick_user(hub),
            // Never empty as planned; the shared round-robin is the harmless fallback.
            Self::Own { streams, .. } if streams.is_empty() => shared.pick_user(hub),
            Self::Own { streams, next } => {
                let stream = streams[*next % streams.len()];
                *next = (*next + 1) % streams.len();
                stream
            }
        }
    }
}

/// One sender: publishes via `hub` every `interval` from `first` until `end`.
async fn run_sender(
    shared: Arc<Shared>,
    hub: usize,
    mut picker: Picker,
    interval: Duration,
    first: Instant,
    end: Instant,
) -> Histogram<u64> {
    let mut latency = new_histogram();
    let mut conn = None;
    let mut pacer = Pacer::new(interval, first, end);
    while pacer.wait().await {
        shared
            .publish_one(hub, &mut picker, &mut conn, &mut latency)
            .await;
    }
    latency
}

/// A sender's schedule: a request every `interval` from `first` until `end`.
struct Pacer {
    next: Instant,
    end: Instant,
    interval: Duration,
    /// Token bucket depth: a deficit beyond this is forgotten, so that a stall (ours or
    /// the hub's) is not followed by an unbounded burst. At least one request, so that a
    /// batch sender whose request took a little longer than its interval catches up.
    backlog: Duration,
}

impl Pacer {
    fn new(interval: Duration, first: Instant, end: Instant) -> Self {
        Pacer {
            next: first,
            end,
            interval,
            backlog: MAX_BACKLOG.max(interval),
        }
    }

    /// Waits for the next slot; false once the schedule is over.
    async fn wait(&mut self) -> bool {
        if self.next >= self.end {
            return false;
        }
        let now = Instant::now();
        if self.next > now {
            sleep_until(self.next).await;
        } else if now.duration_since(self.next) > self.backlog {
            self.next = now.checked_sub(self.backlog).unwrap_or(now);
        }
        self.next += self.interval;
        true
    }
}

/// gRPC requests sent and not answered yet, in order: (user, send time).
type Pending = Arc<Mutex<VecDeque<(usize, Instant)>>>;

/// One gRPC sender: a `PublishStream` to `hub`'s gRPC listener, a request every `interval`
/// from `first` until `end`; the answers (in order) are matched to the requests sent.
async fn run_grpc_sender(
    shared: Arc<Shared>,
    hub: usize,
    mut picker: Picker,
    interval: Duration,
    first: Instant,
    end: Instant,
) -> Histogram<u64> {
    let mut latency = new_histogram();
    let Some(client) = connect_grpc(&shared, hub).await else {
        return latency;
    };
    let Ok(auth) = format!("Bearer {}", shared.config.api_key).parse() else {
        shared.fail(0, "grpc", "--api-key is not valid metadata");
        return latency;
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<PublishRequest>(1024);
    let pending = Pending::default();
    let reader = tokio::spawn(read_grpc_answers(
        shared.clone(),
        client,
        rx,
        auth,
        pending.clone(),
    ));
    let mut pacer = Pacer::new(interval, first, end);
    while pacer.wait().await {
        let user = picker.next(&shared, hub);
        let Some(req) = grpc_request(&shared, user) else {
            continue;
        };
        pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back((user, Instant::now()));
        if tx.send(req).await.is_err() {
            shared.fail(1, "grpc stream", "the stream ended");
            break;
        }
    }
    drop(tx);
    match timeout(REQUEST_TIMEOUT, reader).await {
        Ok(Ok(answers)) => {
            if let Err(e) = merge_histogram(&mut latency, &answers) {
                shared.fail(0, "grpc", &format!("{e:#}"));
            }
        }
        Ok(Err(e)) => shared.fail(0, "grpc reader", &e.to_string()),
        Err(_) => shared.fail(
            0,
            "grpc",
            "answers still missing 10 s after the last request",
        ),
    }
    latency
}

/// Connects to `hub`'s gRPC listener; on failure notes why and returns None.
async fn connect_grpc(shared: &Shared, hub: usize) -> Option<PublisherClient<Channel>> {
    let url = format!("http://{}", shared.config.hubs[hub].addr);
    match timeout(CONNECT_TIMEOUT, PublisherClient::connect(url.clone())).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            shared.fail(0, "grpc connect", &format!("{url}: {e}"));
            None
        }
        Err(_) => {
            shared.fail(0, "grpc connect", &format!("{url}: timed out"));
            None
        }
    }
}

/// The next notification to stream `stream` as a gRPC request, its seq taken; None
/// (noted as a failure) if it cannot be encoded.
fn grpc_request(shared: &Shared, stream: usize) -> Option<PublishRequest> {
    let seq = shared.seqs[stream].fetch_add(1, Ordering::Relaxed) + 1;
    let data = match serde_json::to_vec(&LoadData {
        sent_us: unix_micros(),
        seq,
    }) {
        Ok(d) => d,
        Err(e) => {
            shared.fail(1, "encode", &e.to_string());
            return None;
        }
    };
    let (user_id, channel) = match shared.to(stream) {
        To::User(user) => (user.to_owned(), String::new()),
        To::Channel(channel) => (String::new(), channel.to_owned()),
    };
    Some(PublishRequest {
        user_id,
        channel,
        r#type: "load".to_owned(),
        data,
        ..Default::default()
    })
}

/// Opens the `PublishStream` that carries what arrives on `outbound`, and matches each
/// answer to the oldest pending request; returns the round trips.
async fn read_grpc_answers(
    shared: Arc<Shared>,
    mut client: PublisherClient<Channel>,
    outbound: tokio::sync::mpsc::Receiver<PublishRequest>,
    auth: AsciiMetadataValue,
    pending: Pending,
) -> Histogram<u64> {
    let mut latency = new_histogram();
    let outbound = futures_util::stream::unfold(outbound, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let mut request = tonic::Request::new(outbound);
    request.metadata_mut().insert("authorization", auth);
    let mut answers = match client.publish_stream(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            shared.fail(0, "grpc stream", status.message());
            return latency;
        }
    };
    loop {
        match answers.message().await {
            Ok(Some(_)) => {
                let sent = pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                if let Some((user, at)) = sent {
                    shared.ok[user].fetch_add(1, Ordering::Relaxed);
                    shared.requests_ok.fetch_add(1, Ordering::Relaxed);
                    let us = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                    latency.saturating_record(us);
                }
            }
            Ok(None) => return latency,
            Err(status) => {
                let left = pending.lock().unwrap_or_else(PoisonError::into_inner).len();
                shared.fail(left, "grpc stream", status.message());
                return latency;
            }
        }
    }
}

/// One sender to start: where it publishes, what, and how often.
#[derive(Debug, Clone, PartialEq)]
struct SenderPlan {
    hub: usize,
    picker: Picker,
    interval: Duration,
    /// Delay of its first request after the start.
    offset: Duration,
}

/// The senders of a run: the personal ones at `rate` (as many as wanted, each owning its
/// users when `ordered`), then one per channel at `channel_rate`, on the hubs in turn.
fn plan_senders(config: &PublishConfig) -> Vec<SenderPlan> {
    let users = config.users;
    let hubs = config.hubs.len();
    let per_request = if config.kafka.is_some() {
        1
    } else {
        per_request(config.mode, config.batch_size)
    };
    let mut plans = Vec::new();
    if config.rate > 0.0 && users > 0 && hubs > 0 {
        let mut wanted = senders_wanted(config.rate, per_request, config.concurrency);
        if config.ordered {
            // A sender without users would have nothing to publish.
            wanted = wanted.min(users);
        }
        let mut hubs_of_senders = sender_hubs(hubs, users, wanted, config.publish_any);
        if config.ordered {
            hubs_of_senders.truncate(wanted);
        }
        let senders = hubs_of_senders.len();
        let interval = send_interval(config.rate, per_request, senders);
        for (index, hub) in hubs_of_senders.into_iter().enumerate() {
            plans.push(SenderPlan {
                hub,
                picker: if config.ordered {
                    Picker::own_users(index, senders, users)
                } else {
                    Picker::Users
                },
                interval,
                // Stagger the senders over one interval so requests are spread evenly.
                offset: interval.mul_f64(index as f64 / senders as f64),
            });
        }
    }
    if config.channel_rate > 0.0 && hubs > 0 {
        let channels = config.channels.len();
        let interval = send_interval(config.channel_rate, per_request, 1);
        for c in 0..channels {
            plans.push(SenderPlan {
                hub: c % hubs,
                picker: Picker::Own {
                    streams: vec![users + c],
                    next: 0,
                },
                interval,
                offset: interval.mul_f64(c as f64 / channels as f64),
            });
        }
    }
    plans
}

/// Publishes at `config.rate` (and `channel_rate` per channel) for `config.duration` and
/// reports what was accepted.
pub async fn run(config: PublishConfig) -> Result<PublishOutcome> {
    let streams = config.users + config.channels.len();
    let plans = plan_senders(&config);
    if plans.is_empty() {
        return Ok(PublishOutcome::nothing(streams));
    }
    let senders = plans.len();
    let shared = Arc::new(Shared::new(config.clone())?);

    let start = Instant::now();
    let end = start + config.duration;
    let mut tasks = JoinSet::new();
    for plan in plans {
        let first = start + plan.offset;
        let (hub, picker, interval) = (plan.hub, plan.picker, plan.interval);
        if config.mode == PublishMode::Grpc && config.kafka.is_none() {
            tasks.spawn(run_grpc_sender(
                shared.clone(),
                hub,
                picker,
                interval,
                first,
                end,
            ));
        } else {
            tasks.spawn(run_sender(
                shared.clone(),
                hub,
                picker,
                interval,
                first,
                end,
            ));
        }
    }
    let mut request_latency = new_histogram();
    while let Some(joined) = tasks.join_next().await {
        let hist = joined.context("publish sender panicked")?;
        merge_histogram(&mut request_latency, &hist)?;
    }
    // The schedule covers the whole duration even though its last request goes out up
    // to one spacing (interval / senders, large when batching) before the end.
    let elapsed = start.elapsed().max(config.duration);

    let published: Vec<u64> = shared
        .ok
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(PublishOutcome {
        ok: published.iter().sum(),
        published,
        failed: shared.failed.load(Ordering::Relaxed),
        errors,
        requests_ok: shared.requests_ok.load(Ordering::Relaxed),
        elapsed,
        request_latency,
        senders,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_wire_shape() -> Result<()> {
        let body: serde_json::Value =
            serde_json::from_slice(&publish_body(To::User("lt-17"), 123, 4)?)?;
        assert_eq!(
            body,
            serde_json::json!({"user_id": "lt-17", "type": "load", "data": {"sent_us": 123, "seq": 4}})
        );
        let body: serde_json::Value =
            serde_json::from_slice(&publish_body(To::Channel("load:all"), 5, 1)?)?;
        assert_eq!(
            body,
            serde_json::json!({"channel": "load:all", "type": "load", "data": {"sent_us": 5, "seq": 1}})
        );
        Ok(())
    }

    #[test]
    fn batch_body_carries_single_publish_items() -> Result<()> {
        let body: serde_json::Value = serde_json::from_slice(&batch_body(
            [(To::User("lt-1"), 7), (To::Channel("c"), 1)],
            99,
        )?)?;
        let item = |to: To<'_>, seq: u64| {
            serde_json::from_slice::<serde_json::Value>(&publish_body(to, 99, seq)?)
                .context("decoding")
        };
        assert_eq!(
            body,
            serde_json::json!({"notifications": [item(To::User("lt-1"), 7)?, item(To::Channel("c"), 1)?]})
        );
        assert_eq!(
            body["notifications"][0],
            serde_json::json!({"user_id": "lt-1", "type": "load", "data": {"sent_us": 99, "seq": 7}})
        );
        Ok(())
    }

    #[test]
    fn paces_batches_to_the_notification_rate() {
        // 5 000/s in batches of 100 = 50 requests/s: 32 senders, each every 0.64 s.
        assert_eq!(senders_wanted(5000.0, 100, 32), 32);
        assert_eq!(send_interval(5000.0, 100, 32), Duration::from_millis(640));
        // 500/s in batches of 50 = 10 requests/s: no more senders than that.
        assert_eq!(senders_wanted(500.0, 50, 32), 10);
        assert_eq!(send_interval(500.0, 50, 10), Duration::from_secs(1));
        // Fewer requests than one per second still get one sender.
        assert_eq!(senders_wanted(10.0, 1000, 32), 1);
        assert_eq!(send_interval(10.0, 1000, 1), Duration::from_secs(100));
        // Single publishes as before: senders / rate.
        assert_eq!(senders_wanted(5000.0, 1, 32), 32);
        assert_eq!(send_interval(5000.0, 1, 32), Duration::from_micros(6400));
        assert_eq!(per_request(PublishMode::Http, 100), 1);
        assert_eq!(per_request(PublishMode::Batch, 100), 100);
    }

    #[test]
    fn counts_users_per_hub() {
        assert_eq!(
            (0..3).map(|h| users_on_hub(10, 3, h)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!(users_on_hub(2, 3, 2), 0);
        assert_eq!(users_on_hub(1, 1, 0), 1);
    }

    #[test]
    fn senders_cover_hubs_with_users() {
        assert_eq!(sender_hubs(1, 100, 4, false), [0, 0, 0, 0]);
        assert_eq!(sender_hubs(3, 100, 4, false), [0, 1, 2, 0, 1, 2]);
        // Two users on three hubs: the third hub has nobody to publish to.
        assert_eq!(sender_hubs(3, 2, 1, false), [0, 1]);
        assert_eq!(sender_hubs(3, 2, 1, true), [0, 1, 2]);
        assert!(sender_hubs(0, 5, 4, true).is_empty());
    }

    fn shared(users: usize, hubs: usize, publish_any: bool) -> Result<Shared> {
        shared_in(users, hubs, publish_any, PublishMode::Http)
    }

    fn shared_in(
        users: usize,
        hubs: usize,
        publish_any: bool,
        mode: PublishMode,
    ) -> Result<Shared> {
        let hub = HubAddr {
            url: "http://127.0.0.1:1".into(),
            authority: "127.0.0.1:1".into(),
            prefix: String::new(),
            addr: "127.0.0.1:1".parse()?,
        };
        Shared::new(PublishConfig {
            hubs: vec![hub; hubs],
            api_key: "k".into(),
            users,
            user_prefix: "lt-".into(),
            rate: 1.0,
            duration: Duration::ZERO,
            concurrency: 1,
            publish_any,
            mode,
            batch_size: 3,
            kafka: None,
            channels: Vec::new(),
            channel_rate: 0.0,
            ordered: false,
        })
    }

    #[test]
    fn picks_only_users_living_on_the_hub() -> Result<()> {
        let s = shared(10, 3, false)?;
        let picked: Vec<usize> = (0..8).map(|_| s.pick_user(1)).collect();
        assert_eq!(picked, [1, 4, 7, 1, 4, 7, 1, 4]);
        let s = shared(5, 3, true)?;
        let picked: Vec<usize> = (0..6).map(|_| s.pick_user(2)).collect();
        assert_eq!(picked, [0, 1, 2, 3, 4, 0]);
        Ok(())
    }

    #[test]
    fn batch_mode_posts_to_the_batch_endpoint_and_checks_the_answer() -> Result<()> {
        assert_eq!(shared(1, 1, false)?.paths, ["/api/publish"]);
        let s = shared_in(1, 1, false, PublishMode::Batch)?;
        assert_eq!(s.paths, ["/api/publish/batch"]);
        s.check_batch_answer(br#"{"ids":["a","b","c"]}"#, 3);
        assert!(lock_errors(&s).is_empty());
        s.check_batch_answer(br#"{"ids":["a"]}"#, 3);
        s.check_batch_answer(b"ok", 3);
        let errors = lock_errors(&s);
        assert_eq!(errors.counts.get("batch answer"), Some(&2));
        assert!(errors.samples[0].contains("1 ids for 3"), "{errors:?}");
        // A wrong answer is noted, not counted as a failed notification.
        assert_eq!(s.failed.load(Ordering::Relaxed), 0);
        Ok(())
    }

    fn lock_errors(s: &Shared) -> ErrorTally {
        s.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[test]
    fn rejects_api_key_that_cannot_be_a_header() {
        let hub = HubAddr {
            url: String::new(),
            authority: "h".into(),
            prefix: String::new(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        };
        let config = PublishConfig {
            hubs: vec![hub],
            api_key: "bad\nkey".into(),
            users: 1,
            user_prefix: "lt-".into(),
            rate: 1.0,
            duration: Duration::ZERO,
            concurrency: 1,
            publish_any: false,
            mode: PublishMode::Http,
            batch_size: 1,
            kafka: None,
            channels: Vec::new(),
            channel_rate: 0.0,
            ordered: false,
        };
        assert!(Shared::new(config).is_err());
    }

    fn config(users: usize, hubs: usize) -> Result<PublishConfig> {
        let hub = HubAddr {
            url: String::new(),
            authority: "h".into(),
            prefix: String::new(),
            addr: "127.0.0.1:1".parse()?,
        };
        Ok(PublishConfig {
            hubs: vec![hub; hubs],
            api_key: "k".into(),
            users,
            user_prefix: "lt-".into(),
            rate: 0.0,
            duration: Duration::ZERO,
            concurrency: 4,
            publish_any: true,
            mode: PublishMode::Http,
            batch_size: 1,
            kafka: None,
            channels: vec!["load:all".into(), "load:g0".into(), "load:g1".into()],
            channel_rate: 0.0,
            ordered: true,
        })
    }

    #[test]
    fn channel_streams_follow_the_users_and_publish_by_channel() -> Result<()> {
        let s = Shared::new(config(2, 1)?)?;
        assert_eq!(s.names, ["lt-0", "lt-1", "load:all", "load:g0", "load:g1"]);
        assert_eq!((s.seqs.len(), s.ok.len()), (5, 5));
        assert_eq!(s.to(1), To::User("lt-1"));
        assert_eq!(s.to(3), To::Channel("load:g0"));
        let req = grpc_request(&s, 2).context("encodable")?;
        assert_eq!(
            (req.user_id.as_str(), req.channel.as_str()),
            ("", "load:all")
        );
        let req = grpc_request(&s, 0).context("encodable")?;
        assert_eq!((req.user_id.as_str(), req.channel.as_str()), ("lt-0", ""));
        Ok(())
    }

    #[test]
    fn each_channel_gets_one_sender_of_its_own() -> Result<()> {
        let mut c = config(10, 2)?;
        c.channel_rate = 4.0;
        let plans = plan_senders(&c);
        // No personal rate: channel senders only, one per channel, on the hubs in turn.
        assert_eq!(plans.len(), 3);
        for (i, p) in plans.iter().enumerate() {
            assert_eq!(p.hub, i % 2);
            assert_eq!(
                p.picker,
                Picker::Own {
                    streams: vec![10 + i],
                    next: 0
                }
            );
            assert_eq!(p.interval, Duration::from_millis(250));
        }
        assert!(plans[1].offset > plans[0].offset && plans[2].offset < plans[0].interval);
        Ok(())
    }

    #[test]
    fn ordered_personal_senders_own_disjoint_users() -> Result<()> {
        let mut c = config(10, 2)?;
        c.rate = 1000.0;
        let plans = plan_senders(&c);
        assert_eq!(plans.len(), 4);
        let mut owned = Vec::new();
        for p in &plans {
            let Picker::Own { streams, .. } = &p.picker else {
                anyhow::bail!("ordered senders own their users");
            };
            owned.extend(streams.iter().copied());
        }
        owned.sort_unstable();
        assert_eq!(owned, (0..10).collect::<Vec<_>>());
        // Three users for four wanted senders: three senders.
        let mut few = config(3, 2)?;
        few.rate = 1000.0;
        assert_eq!(plan_senders(&few).len(), 3);
        // Unordered: the shared round-robin, as before.
        let mut loose = config(10, 2)?;
        loose.rate = 1000.0;
        loose.ordered = false;
        assert!(
            plan_senders(&loose)
                .iter()
                .all(|p| p.picker == Picker::Users)
        );
        Ok(())
    }

    #[test]
    fn an_own_picker_cycles_its_streams() -> Result<()> {
        let s = Shared::new(config(10, 1)?)?;
        let mut p = Picker::own_users(1, 4, 10);
        let picked: Vec<usize> = (0..5).map(|_| p.next(&s, 0)).collect();
        assert_eq!(picked, [1, 5, 9, 1, 5]);
        Ok(())
    }
}
