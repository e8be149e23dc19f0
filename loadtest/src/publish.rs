//! Publishing through the hub's HTTP API at a paced rate.
//!
//! A fixed set of senders each own one HTTP/1.1 keep-alive connection (hyper's
//! low-level client) and keep one request in flight on it. Each sender is paced by a
//! token bucket at its share of the total rate: it sends on a fixed schedule and, when
//! it falls behind, catches up with at most [`MAX_BACKLOG`] worth of requests rather
//! than bursting the whole deficit. Per-user sequence numbers and success counts are
//! shared atomics, so any sender can publish to any user.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};

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

/// What to publish, where and how fast.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// Hub nodes.
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
    /// Produce to Kafka instead of calling the HTTP API.
    pub kafka: Option<KafkaTarget>,
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
    /// Publishes answered 200, per user index.
    pub published: Vec<u64>,
    /// Total publishes answered 200.
    pub ok: u64,
    /// Publishes that failed (non-200, transport error, timeout, no connection).
    pub failed: u64,
    /// Why publishes failed.
    pub errors: ErrorTally,
    /// From the first send to the last response.
    pub elapsed: Duration,
    /// Round-trip time of successful publish requests, µs.
    pub request_latency: Histogram<u64>,
    /// Number of senders used.
    pub senders: usize,
}

impl PublishOutcome {
    /// The outcome of not publishing at all.
    pub fn nothing(users: usize) -> Self {
        Self {
            published: vec![0; users],
            ok: 0,
            failed: 0,
            errors: ErrorTally::default(),
            elapsed: Duration::ZERO,
            request_latency: new_histogram(),
            senders: 0,
        }
    }
}

#[derive(Serialize)]
struct PublishBody<'a> {
    user_id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    data: LoadData,
}

#[derive(Serialize)]
struct LoadData {
    sent_us: u64,
    seq: u64,
}

/// Encodes the request body for one notification.
fn publish_body(user_id: &str, sent_us: u64, seq: u64) -> Result<Vec<u8>> {
    serde_json::to_vec(&PublishBody {
        user_id,
        kind: "load",
        data: LoadData { sent_us, seq },
    })
    .context("encoding publish body")
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
    user_names: Vec<String>,
    seqs: Vec<AtomicU64>,
    ok: Vec<AtomicU64>,
    /// Round-robin cursor per hub (a single one with `publish_any`).
    cursors: Vec<AtomicU64>,
    failed: AtomicU64,
    errors: Mutex<ErrorTally>,
    producer: Option<FutureProducer>,
    paths: Vec<String>,
    hosts: Vec<HeaderValue>,
    auth: HeaderValue,
}

impl Shared {
    fn new(config: PublishConfig) -> Result<Self> {
        let users = config.users;
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
            user_names: (0..users)
                .map(|i| user_name(&config.user_prefix, i))
                .collect(),
            seqs: (0..users).map(|_| AtomicU64::new(0)).collect(),
            ok: (0..users).map(|_| AtomicU64::new(0)).collect(),
            cursors: config.hubs.iter().map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicU64::new(0),
            errors: Mutex::new(ErrorTally::default()),
            paths: config.hubs.iter().map(|h| h.path("/api/publish")).collect(),
            hosts,
            auth,
            config,
        })
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

    fn fail(&self, kind: &str, detail: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(kind, detail);
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
        let name = &self.user_names[user];
        let event = KafkaEvent {
            event_id: format!("{name}-{seq}"),
            user_id: name,
            sent_us: unix_micros(),
            seq,
        };
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(e) => return self.fail("encode", &e.to_string()),
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
            Err((e, _)) => self.fail("kafka produce", &e.to_string()),
        }
    }

    /// Publishes one notification via `hub`, reusing or replacing `conn`.
    async fn publish_one(
        &self,
        hub: usize,
        conn: &mut Option<Sender>,
        latency: &mut Histogram<u64>,
    ) {
        if let Some(producer) = &self.producer {
            return self.produce_one(producer, hub, latency).await;
        }
        // Get a usable connection before taking a seq, so that a keep-alive connection
        // the server closed while idle costs a reconnect instead of a failed publish.
        let mut sender = match self.ready(hub, conn.take()).await {
            Ok(sender) => sender,
            Err(failure) => {
                self.fail(&failure.kind, &failure.detail);
                sleep(RECONNECT_PAUSE).await;
                return;
            }
        };
        let user = self.pick_user(hub);
        let seq = self.seqs[user].fetch_add(1, Ordering::Relaxed) + 1;
        let body = match publish_body(&self.user_names[user], unix_micros(), seq) {
            Ok(body) => body,
            Err(e) => return self.fail("encode", &format!("{e:#}")),
        };
        let request = Request::post(self.paths[hub].as_str())
            .header(HOST, self.hosts[hub].clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)));
        let request = match request {
            Ok(request) => request,
            Err(e) => return self.fail("request", &e.to_string()),
        };
        let started = Instant::now();
        match timeout(REQUEST_TIMEOUT, exchange(&mut sender, request)).await {
            Ok(Ok((StatusCode::OK, _))) => {
                self.ok[user].fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                latency.saturating_record(us);
                *conn = Some(sender);
            }
            Ok(Ok((status, body))) => {
                self.fail(
                    &format!("http {}", status.as_u16()),
                    String::from_utf8_lossy(&body).trim(),
                );
                *conn = Some(sender);
            }
            // The connection is in an unknown state after these; drop it.
            Ok(Err(e)) => self.fail("publish transport", &format!("{e:#}")),
            Err(_) => self.fail("publish timeout", "no response within 10 s"),
        }
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

/// One sender: publishes via `hub` every `interval` from `first` until `end`.
async fn run_sender(
    shared: Arc<Shared>,
    hub: usize,
    interval: Duration,
    first: Instant,
    end: Instant,
) -> Histogram<u64> {
    let mut latency = new_histogram();
    let mut conn = None;
    let mut next = first;
    while next < end {
        let now = Instant::now();
        if next > now {
            sleep_until(next).await;
        } else if now.duration_since(next) > MAX_BACKLOG {
            // Token bucket depth: forget a deficit beyond MAX_BACKLOG so that a stall
            // (ours or the hub's) is not followed by an unbounded burst.
            next = now.checked_sub(MAX_BACKLOG).unwrap_or(now);
        }
        next += interval;
        shared.publish_one(hub, &mut conn, &mut latency).await;
    }
    latency
}

/// Publishes at `config.rate` for `config.duration` and reports what was accepted.
pub async fn run(config: PublishConfig) -> Result<PublishOutcome> {
    let users = config.users;
    if config.rate <= 0.0 || users == 0 || config.hubs.is_empty() {
        return Ok(PublishOutcome::nothing(users));
    }
    // No more senders than requests per second: a sender slower than 1/s would leave
    // most of the window idle before its first request.
    let wanted = config.concurrency.min(config.rate.ceil() as usize);
    let hubs_of_senders = sender_hubs(config.hubs.len(), users, wanted, config.publish_any);
    let senders = hubs_of_senders.len();
    let interval = Duration::from_secs_f64(senders as f64 / config.rate);
    let shared = Arc::new(Shared::new(config.clone())?);

    let start = Instant::now();
    let end = start + config.duration;
    let mut tasks = JoinSet::new();
    for (index, hub) in hubs_of_senders.into_iter().enumerate() {
        // Stagger the senders over one interval so requests are spread evenly in time.
        let first = start + interval.mul_f64(index as f64 / senders as f64);
        tasks.spawn(run_sender(shared.clone(), hub, interval, first, end));
    }
    let mut request_latency = new_histogram();
    while let Some(joined) = tasks.join_next().await {
        let hist = joined.context("publish sender panicked")?;
        merge_histogram(&mut request_latency, &hist)?;
    }
    let elapsed = start.elapsed();

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
        let body: serde_json::Value = serde_json::from_slice(&publish_body("lt-17", 123, 4)?)?;
        assert_eq!(
            body,
            serde_json::json!({"user_id": "lt-17", "type": "load", "data": {"sent_us": 123, "seq": 4}})
        );
        Ok(())
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
            kafka: None,
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
            kafka: None,
        };
        assert!(Shared::new(config).is_err());
    }
}
