//! `hub-loadgen saga`: drives the order saga end to end. Users listen on the hub over SSE while
//! orders are placed at a steady rate through the order service's REST API; every
//! `order.status` notification is matched to its order. Reports, per order status, the time
//! from sending `POST /orders` to the notification's arrival, and whether every order went
//! through its statuses once each, in order.
//!
//! One process; meant for hundreds of users and tens to hundreds of orders per second (the
//! services, not the hub, set the pace: each order is several database transactions and Kafka
//! round trips).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::conn::tcp_connect;
use crate::sse::SseConn;
use crate::stats::new_histogram;
use crate::target::HubAddr;
use crate::token::{TokenMinter, user_name};

/// Options of `hub-loadgen saga`.
#[derive(Debug, Clone, Args)]
pub struct SagaArgs {
    /// Hub base URL the users listen on (SSE).
    #[arg(long, value_name = "URL")]
    pub hub: String,

    /// Order service base URL.
    #[arg(long, value_name = "URL")]
    pub orders: String,

    /// HS256 secret shared by the hub and the order service.
    #[arg(long, value_name = "SECRET")]
    pub jwt_secret: String,

    /// Audience of the tokens the listeners give the hub (its HUB_JWT_AUDIENCE; `make demo`
    /// sets `hub`); empty for none.
    #[arg(long, value_name = "AUD", default_value = "hub")]
    pub hub_audience: String,

    /// Audience of the tokens orders are placed with (ORDER_JWT_AUDIENCE).
    #[arg(long, value_name = "AUD", default_value = "orders")]
    pub orders_audience: String,

    /// Users listening (orders go to them in turn).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub users: usize,

    /// Prefix of the user names [default: a random one, so balances start fresh].
    #[arg(long, value_name = "PREFIX")]
    pub user_prefix: Option<String>,

    /// Orders per second.
    #[arg(long, value_name = "R", default_value_t = 20.0)]
    pub rate: f64,

    /// How long to place orders.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// After the last order, how long to wait at most for every order to finish.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain: Duration,

    /// Keep-alive connections to the order service placing orders.
    #[arg(long, value_name = "C", default_value_t = 4)]
    pub senders: usize,
}

/// Statuses of a paid order, in order.
const PATH: [&str; 5] = [
    "CREATED",
    "PAID",
    "IN_TRANSIT",
    "OUT_FOR_DELIVERY",
    "DELIVERED",
];

/// What happened to one order.
#[derive(Debug, Default)]
struct Track {
    /// When its `POST /orders` was sent.
    posted: Option<Instant>,
    /// Statuses as they arrived.
    seen: Vec<(String, Instant)>,
}

impl Track {
    fn finished(&self) -> bool {
        self.seen
            .iter()
            .any(|(s, _)| s == "DELIVERED" || s == "PAYMENT_FAILED")
    }

    /// The statuses are a prefix of a valid path, each once.
    fn in_order(&self) -> bool {
        let seen: Vec<&str> = self.seen.iter().map(|(s, _)| s.as_str()).collect();
        let failed = ["CREATED", "PAYMENT_FAILED"];
        PATH.starts_with(&seen) || failed.starts_with(&seen)
    }
}

type Tracks = Arc<Mutex<HashMap<String, Track>>>;

/// Why order requests failed, as they happened.
type Failures = Arc<Mutex<Vec<String>>>;

fn lock(tracks: &Tracks) -> std::sync::MutexGuard<'_, HashMap<String, Track>> {
    tracks.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the scenario and prints the report.
pub async fn run(args: SagaArgs) -> Result<()> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be above 0");
    anyhow::ensure!(
        args.users > 0 && args.senders > 0,
        "--users and --senders must be above 0"
    );
    let hub = HubAddr::resolve("--hub", &args.hub).await?;
    let orders = HubAddr::resolve("--orders", &args.orders).await?;
    let (tokens, order_tokens) = mint_tokens(&args)?;
    let tracks: Tracks = Arc::default();

    // Listeners first: a notification never arrives before its user listens.
    listen(&hub, &tokens, &tracks).await?;
    eprintln!(
        "saga: {} users listening on {}; placing {} orders/s for {:?} through {}",
        tokens.len(),
        hub.url,
        args.rate,
        args.duration,
        orders.url
    );

    let start = Instant::now();
    let failures: Failures = Arc::default();
    place_orders(&args, &orders, &order_tokens, &tracks, &failures, start).await?;
    let placing = start.elapsed();

    wait_for_orders(&tracks, args.drain).await;
    report(&tracks, &failures, placing, start);
    Ok(())
}

/// Each user's token for the hub and for the order service, in user order.
fn mint_tokens(args: &SagaArgs) -> Result<(Vec<String>, Vec<String>)> {
    let audience = |a: &str| (!a.is_empty()).then(|| a.to_owned());
    let minter = TokenMinter::new(&args.jwt_secret, Duration::from_secs(3600))
        .with_audience(audience(&args.hub_audience));
    let order_minter = TokenMinter::new(&args.jwt_secret, Duration::from_secs(3600))
        .with_audience(audience(&args.orders_audience));
    let prefix = args
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("saga-{:04x}-", rand::random::<u16>()));
    let users: Vec<String> = (0..args.users).map(|i| user_name(&prefix, i)).collect();
    let tokens = users
        .iter()
        .map(|u| minter.mint(u))
        .collect::<Result<Vec<_>>>()?;
    let order_tokens = users
        .iter()
        .map(|u| order_minter.mint(u))
        .collect::<Result<Vec<_>>>()?;
    Ok((tokens, order_tokens))
}

/// Opens one SSE listener per token, each recording its user's order statuses.
async fn listen(hub: &HubAddr, tokens: &[String], tracks: &Tracks) -> Result<()> {
    for token in tokens {
        let conn = SseConn::connect(hub, token, None, None)
            .await
            .map_err(|f| anyhow!("SSE connect: {} {}", f.kind, f.detail))?;
        tokio::spawn(record_statuses(conn, tracks.clone()));
    }
    Ok(())
}

/// Notes every `order.status` notification arriving on `conn` until it ends.
async fn record_statuses(mut conn: SseConn, tracks: Tracks) {
    while let Ok(payload) = conn.next_payload().await {
        let Ok(envelope) = serde_json::from_slice::<Value>(&payload) else {
            continue;
        };
        if envelope["type"] != "order.status" {
            continue;
        }
        let (Some(order), Some(status)) = (
            envelope["data"]["order_id"].as_str(),
            envelope["data"]["status"].as_str(),
        ) else {
            continue;
        };
        lock(&tracks)
            .entry(order.to_owned())
            .or_default()
            .seen
            .push((status.to_owned(), Instant::now()));
    }
}

/// When one sender places its orders, and for whom.
struct Schedule {
    /// Its first order.
    first: Instant,
    /// Time between two of its orders.
    interval: Duration,
    /// No order at or after this.
    end: Instant,
    /// The user its first order is for.
    user: usize,
    /// How far apart the users of two consecutive orders are (the number of senders).
    step: usize,
}

/// Places orders at `--rate` for `--duration` from `start`, over `--senders` connections.
async fn place_orders(
    args: &SagaArgs,
    orders: &HubAddr,
    order_tokens: &[String],
    tracks: &Tracks,
    failures: &Failures,
    start: Instant,
) -> Result<()> {
    let end = start + args.duration;
    let interval = Duration::from_secs_f64(args.senders as f64 / args.rate);
    let mut senders = Vec::new();
    for s in 0..args.senders {
        let schedule = Schedule {
            first: start + interval.mul_f64(s as f64 / args.senders as f64),
            interval,
            end,
            user: s,
            step: args.senders,
        };
        senders.push(tokio::spawn(run_sender(
            schedule,
            orders.clone(),
            order_tokens.to_vec(),
            tracks.clone(),
            failures.clone(),
        )));
    }
    for s in senders {
        s.await.context("sender task")?;
    }
    Ok(())
}

/// One sender: places an order per `schedule` tick on its own keep-alive connection.
async fn run_sender(
    schedule: Schedule,
    orders: HubAddr,
    tokens: Vec<String>,
    tracks: Tracks,
    failures: Failures,
) {
    let mut sender = None;
    let mut next = schedule.first;
    let mut k = schedule.user;
    while next < schedule.end {
        sleep_until(next).await;
        next += schedule.interval;
        let token = &tokens[k % tokens.len()];
        // Sender s of C places for users s, s + C, s + 2C, …
        k += schedule.step;
        match place(&orders, &mut sender, token).await {
            Ok((order, posted)) => {
                lock(&tracks).entry(order).or_default().posted = Some(posted);
            }
            Err(e) => {
                sender = None;
                failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(format!("{e:#}"));
            }
        }
    }
}

/// Waits for every placed order to finish, or for `drain` to pass.
async fn wait_for_orders(tracks: &Tracks, drain: Duration) {
    let deadline = Instant::now() + drain;
    loop {
        let open = lock(tracks)
            .values()
            .filter(|t| t.posted.is_some() && !t.finished())
            .count();
        if open == 0 || Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// `POST /orders` on a keep-alive connection; returns the order id and when it was sent.
async fn place(
    orders: &HubAddr,
    sender: &mut Option<http1::SendRequest<Full<Bytes>>>,
    token: &str,
) -> Result<(String, Instant)> {
    if sender.as_mut().map(|s| s.is_ready()) != Some(true) {
        let tcp = tcp_connect(orders.addr, None)
            .await
            .map_err(|f| anyhow!("connect: {} {}", f.kind, f.detail))?;
        let (s, connection) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *sender = Some(s);
    }
    let s = sender
        .as_mut()
        .context("no connection to the order service")?;
    let body = json!({
        "items": [{"product_id": "p1", "quantity": 1, "price_cents": 100}],
        "delivery_address": "1 Load Street",
    });
    let request = Request::post(orders.path("/orders"))
        .header(header::HOST, &orders.authority)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let posted = Instant::now();
    let response = timeout(Duration::from_secs(10), s.send_request(request))
        .await
        .context("POST /orders timed out")??;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.as_u16() == 201,
        "POST /orders: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    let answer: Value = serde_json::from_slice(&bytes)?;
    let order = answer["order_id"]
        .as_str()
        .context("no order_id in the answer")?;
    Ok((order.to_owned(), posted))
}

fn report(tracks: &Tracks, failures: &Failures, placing: Duration, start: Instant) {
    let tracks = lock(tracks);
    let failures = failures.lock().unwrap_or_else(PoisonError::into_inner);
    let mut hist: HashMap<&str, Histogram<u64>> = HashMap::new();
    let (mut placed, mut delivered, mut payment_failed, mut unfinished, mut disordered) =
        (0, 0, 0, 0, 0);
    let mut last_finish = start;
    for track in tracks.values() {
        let Some(posted) = track.posted else { continue };
        placed += 1;
        if !track.in_order() {
            disordered += 1;
        }
        for (status, at) in &track.seen {
            let us =
                u64::try_from(at.saturating_duration_since(posted).as_micros()).unwrap_or(u64::MAX);
            let h = hist.entry(status.as_str()).or_insert_with(new_histogram);
            let _ = h.record(us.max(1));
            if status == "DELIVERED" || status == "PAYMENT_FAILED" {
                last_finish = last_finish.max(*at);
            }
        }
        match track.seen.last().map(|(s, _)| s.as_str()) {
            Some("DELIVERED") => delivered += 1,
            Some("PAYMENT_FAILED") => payment_failed += 1,
            _ => unfinished += 1,
        }
    }
    println!(
        "orders placed {placed} in {:.1} s ({:.1}/s), refused or failed requests {}",
        placing.as_secs_f64(),
        placed as f64 / placing.as_secs_f64().max(0.001),
        failures.len()
    );
    if let Some(first) = failures.first() {
        println!("  first failure: {first}");
    }
    println!(
        "finished: delivered {delivered}, payment failed {payment_failed}, unfinished {unfinished}; \
         statuses missing, repeated or out of order: {disordered}"
    );
    println!(
        "completion rate {:.1} orders/s (first order sent → last order finished)",
        (delivered + payment_failed) as f64
            / last_finish.duration_since(start).as_secs_f64().max(0.001)
    );
    println!("time from POST /orders to the notification (ms):");
    println!(
        "  {:<17} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "status", "count", "p50", "p90", "p99", "max"
    );
    for status in PATH.iter().chain(&["PAYMENT_FAILED"]) {
        if let Some(h) = hist.get(status) {
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "  {:<17} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                status,
                h.len(),
                ms(0.5),
                ms(0.9),
                ms(0.99),
                h.max() as f64 / 1000.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(statuses: &[&str]) -> Track {
        let now = Instant::now();
        Track {
            posted: Some(now),
            seen: statuses.iter().map(|s| ((*s).to_owned(), now)).collect(),
        }
    }

    #[test]
    fn a_track_is_in_order_only_along_a_valid_path_each_status_once() {
        assert!(track(&["CREATED", "PAID"]).in_order());
        assert!(track(&PATH).in_order());
        assert!(track(&["CREATED", "PAYMENT_FAILED"]).in_order());
        assert!(!track(&["CREATED", "CREATED"]).in_order());
        assert!(!track(&["PAID", "CREATED"]).in_order());
        assert!(!track(&["CREATED", "PAID", "PAYMENT_FAILED"]).in_order());
        assert!(track(&PATH).finished());
        assert!(!track(&["CREATED"]).finished());
    }
}
