//! One client session, written once for both transports: the greeting, the replay, live
//! notifications in batches with the replay/live seam de-duplicated by id, the delivery
//! metrics, heartbeats, client messages, token expiry, drain, and how the session ends.
//!
//! A transport supplies a [`Connection`]: how each message is framed and written to its
//! socket, and what the client did. It decides nothing about what to send or when to stop.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::handshake::{Session, is_new};
use super::inbound::{self, Inbound};
use super::streams::{self, Streams};
use super::{Context, Timing, drain_delay, expiry_instant};
use crate::envelope::{Control, Id, Notification, now_micros};

/// Notifications written per flush when several are queued.
const BATCH: usize = 64;
/// Time allowed for the goodbye: the `hub.closing` envelope and the transport's own close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The token expired (not refreshed in time).
    Expired,
    /// A token refresh was refused.
    RefreshRefused,
    /// The connection's queue overflowed.
    SlowConsumer,
    /// The node is draining.
    Draining,
    /// The disconnect API closed it.
    Disconnected,
    /// Client messages came faster than the inbound rate.
    Flood,
    /// A client message was over the inbound size limit.
    TooBig,
    /// The peer closed, vanished, or broke the protocol: nothing more to say.
    Gone,
    /// A write made no progress within the write timeout.
    Stalled,
}

impl SessionEnd {
    /// The `hub.closing` reason sent first, for the ends the hub chose and explains.
    pub fn closing_reason(self) -> Option<&'static str> {
        match self {
            SessionEnd::Expired => Some("expired"),
            SessionEnd::Draining => Some("draining"),
            SessionEnd::Disconnected => Some("disconnected"),
            SessionEnd::SlowConsumer => Some("slow_consumer"),
            _ => None,
        }
    }

    /// Whether the peer can still be told why (it neither vanished nor stopped reading).
    fn peer_listens(self) -> bool {
        !matches!(self, SessionEnd::Gone | SessionEnd::Stalled)
    }

    /// Why the fan-out dropped this session's connection.
    fn evicted(session: &Session) -> Self {
        if session.disconnected_by_api() {
            SessionEnd::Disconnected
        } else {
            SessionEnd::SlowConsumer
        }
    }
}

/// What the client did, as far as the session is concerned.
pub enum Heard {
    /// A text message, answered by the session.
    Text(Utf8Bytes),
    /// A binary message, refused with `hub.error`.
    Binary,
    /// A protocol ping: the transport queued its answer, which a flush sends.
    Ping,
    /// Anything else that shows the client is alive (a pong).
    Alive,
    /// The client left or broke the protocol.
    End(SessionEnd),
}

/// One client connection as the session sees it: the transport's framing and socket writer.
/// Every write also flushes, so what the session wrote has left when it resolves.
pub trait Connection: Send {
    /// A failed write; any failure ends the session as [`SessionEnd::Gone`].
    type Error;
    /// Whether the client answers heartbeats (WebSocket pongs), so that silence after one
    /// within the pong timeout ends the session.
    const HEARTBEAT_ANSWERED: bool;

    /// Writes `hub.connected` and, when the resume point is lost, `hub.gap`.
    fn greet(
        &mut self,
        timing: &Timing,
        connected: Control,
        gap: Option<Control>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Writes notifications rendered once for every connection (shared bytes, no copy).
    fn notifications(
        &mut self,
        ns: &[Arc<Notification>],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Writes one control envelope.
    fn control(&mut self, c: Control) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Writes a heartbeat.
    fn heartbeat(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Sends whatever the transport queued by itself.
    fn flush(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The client's next action. Cancel-safe: the session waits on it beside everything else.
    fn heard(&mut self) -> impl Future<Output = Heard> + Send;
    /// Ends the connection in the transport's way, after any `hub.closing`.
    fn close(&mut self, end: SessionEnd) -> impl Future<Output = ()> + Send;
}

/// Logs and counts, in this one place, an end the node caused.
fn record(ctx: &Context, end: SessionEnd) {
    let m = &ctx.metrics;
    match end {
        SessionEnd::SlowConsumer => {
            tracing::debug!("slow consumer disconnected");
            m.slow_consumers().inc();
        }
        SessionEnd::Stalled => {
            tracing::debug!("socket write stalled");
            m.write_timeouts().inc();
        }
        SessionEnd::Disconnected => {
            tracing::debug!("closed by the disconnect API");
            m.api_disconnects().inc();
        }
        SessionEnd::Flood => {
            tracing::debug!("client message flood");
            m.inbound_rate_closes().inc();
        }
        _ => {}
    }
}

/// Runs an admitted session on `conn` until it ends, then says why and closes.
pub async fn run<C: Connection>(ctx: Context, mut conn: C, mut session: Session) {
    let end = match serve(&ctx, &mut conn, &mut session).await {
        Err(end) => end,
        Ok(never) => match never {},
    };
    record(&ctx, end);
    if end.peer_listens() {
        let _ = timeout(CLOSE_GRACE, async {
            if let Some(reason) = end.closing_reason()
                && conn.control(Control::closing(reason)).await.is_err()
            {
                return;
            }
            conn.close(end).await;
        })
        .await;
    }
}

/// The session until it ends: greeting and replay, then live notifications, heartbeats and
/// client messages until the token expires, the node drains or something ends it sooner.
async fn serve<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
) -> Result<Infallible, SessionEnd> {
    let timing = ctx.timing;
    // The last id the client has: the seam filter between replayed and live notifications.
    let mut last = session.resume_from;
    greet_and_replay(ctx, conn, session, &mut last).await?;

    let leeway = ctx.verifier.leeway();
    let mut close_at = Box::pin(sleep_until(expiry_instant(session.exp, leeway)));
    let mut closing = SessionEnd::Expired;
    let heartbeat = sleep(timing.ping_interval);
    tokio::pin!(heartbeat);
    let mut awaiting_answer = false;
    let mut draining = false;
    // Made once: a new wait for the drain on every message would register and unregister
    // with the drain token each time.
    let drain_started = ctx.lifecycle.drain_started();
    tokio::pin!(drain_started);
    // Created at the first client message: idle connections do not pay for it.
    let mut inbound_rate: Option<Box<governor::DefaultDirectRateLimiter>> = None;
    let mut batch: Vec<Arc<Notification>> = Vec::new();
    loop {
        tokio::select! {
            next = session.queue.recv() => {
                let Some(first) = next else { return Err(SessionEnd::evicted(session)) };
                deliver(ctx, conn, session, first, &mut batch, &mut last).await?;
            }
            heard = conn.heard() => {
                if awaiting_answer {
                    awaiting_answer = false;
                    heartbeat.as_mut().reset(Instant::now() + timing.ping_interval);
                }
                let refreshed =
                    answer(ctx, conn, session, heard, &mut inbound_rate, &mut last).await?;
                if let Some(exp) = refreshed
                    && !draining
                {
                    close_at.as_mut().reset(expiry_instant(exp, leeway));
                }
            }
            () = &mut heartbeat => {
                if awaiting_answer {
                    tracing::debug!("no pong in time");
                    return Err(SessionEnd::Gone);
                }
                write_within(timing.write_timeout, session, conn.heartbeat()).await?;
                let next = if C::HEARTBEAT_ANSWERED {
                    awaiting_answer = true;
                    timing.pong_timeout
                } else {
                    timing.ping_interval
                };
                heartbeat.as_mut().reset(Instant::now() + next);
            }
            () = &mut close_at => return Err(closing),
            () = &mut drain_started, if !draining => {
                draining = true;
                let at = Instant::now() + drain_delay(timing.drain_window);
                if at < close_at.deadline() {
                    close_at.as_mut().reset(at);
                    closing = SessionEnd::Draining;
                }
            }
        }
    }
}

/// `hub.connected`, then `hub.gap` when the resume point is lost, then the replay, before
/// anything live.
async fn greet_and_replay<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
    last: &mut Option<Id>,
) -> Result<(), SessionEnd> {
    let limit = ctx.timing.write_timeout;
    let (resumed, gap) = session
        .replay
        .as_ref()
        .map_or((false, false), |r| (!r.gap, r.gap));
    let connected = match session.streams.as_ref() {
        None => Control::connected(&session.user, resumed, None),
        Some(streams) => {
            let channels: Vec<&str> = streams.channels.iter().map(|c| &*c.name).collect();
            let cursor = streams.cursor();
            Control::connected(&session.user, resumed, Some((&channels, &cursor)))
        }
    };
    let gap = gap.then(|| Control::gap(Control::RESUME_LOST, None));
    write_within(limit, session, conn.greet(&ctx.timing, connected, gap)).await?;
    if session.streams.is_some() {
        return Box::pin(replay_streams(ctx, conn, session)).await;
    }
    // Taken only now: the greeting's state need not sit beside it.
    let Some(replay) = session.replay.take() else {
        return Ok(());
    };
    let delivered = &session.transport().metrics(&ctx.metrics).delivered;
    let mut rest = &replay.items[..];
    // Runs of notifications the client does not have, written straight from the replay.
    while let Some(start) = rest.iter().position(|n| is_new(last, n)) {
        let mut end = start + 1;
        while end < rest.len() && end - start < BATCH && is_new(last, &rest[end]) {
            end += 1;
        }
        write_within(limit, session, conn.notifications(&rest[start..end])).await?;
        delivered.inc_by((end - start) as u64);
        rest = &rest[end..];
    }
    Ok(())
}

/// The replays of a connection with channels: the personal one, then each channel's (its
/// `hub.gap` first when its position was lost), every notification with the cursor.
async fn replay_streams<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
) -> Result<(), SessionEnd> {
    let Some(mut streams) = session.streams.take() else {
        return Ok(());
    };
    let personal = session.replay.take().map(|r| r.items).unwrap_or_default();
    let result = async {
        write_accepted(ctx, conn, session, &mut streams, &personal).await?;
        for (name, replay) in std::mem::take(&mut streams.replays) {
            if replay.gap {
                let gap = Control::gap(Control::RESUME_LOST, Some(&name));
                write_within(ctx.timing.write_timeout, session, conn.control(gap)).await?;
            }
            write_accepted(ctx, conn, session, &mut streams, &replay.items).await?;
        }
        Ok(())
    }
    .await;
    session.streams = Some(streams);
    result
}

/// Writes the notifications of `items` the connection does not have yet, each with its
/// cursor, in runs of up to [`BATCH`].
async fn write_accepted<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &Session,
    streams: &mut Streams,
    items: &[Arc<Notification>],
) -> Result<(), SessionEnd> {
    let delivered = &session.transport().metrics(&ctx.metrics).delivered;
    for run in items.chunks(BATCH) {
        let out: Vec<Arc<Notification>> = run.iter().filter_map(|n| streams.accept(n)).collect();
        if out.is_empty() {
            continue;
        }
        write_within(ctx.timing.write_timeout, session, conn.notifications(&out)).await?;
        delivered.inc_by(out.iter().filter(|n| !n.gap).count() as u64);
    }
    Ok(())
}

/// Writes `first` and whatever else is queued (up to [`BATCH`]) that the client does not
/// have yet, and counts the deliveries and their latency from acceptance to the write.
async fn deliver<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
    first: Arc<Notification>,
    batch: &mut Vec<Arc<Notification>>,
    last: &mut Option<Id>,
) -> Result<(), SessionEnd> {
    session.fill_batch(first, batch, BATCH);
    match session.streams.as_deref_mut() {
        // Each kept one replaced, in place, by this connection's copy (its cursor as the id).
        Some(streams) => batch.retain_mut(|n| match streams.accept(n) {
            Some(mine) => {
                *n = mine;
                true
            }
            None => false,
        }),
        None => batch.retain(|n| is_new(last, n)),
    }
    write_within(ctx.timing.write_timeout, session, conn.notifications(batch)).await?;
    let now = now_micros();
    let delivered = &session.transport().metrics(&ctx.metrics).delivered;
    let latency = ctx.metrics.delivery_latency();
    for n in batch.drain(..) {
        if !n.gap {
            delivered.inc();
            latency.observe(now.saturating_sub(n.accepted_us) as f64 / 1e6);
        }
    }
    if batch.capacity() > BATCH {
        batch.shrink_to(BATCH);
    }
    Ok(())
}

/// Acts on what the client did. Returns the new token expiry when a refresh was accepted.
async fn answer<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
    heard: Heard,
    rate: &mut Option<Box<governor::DefaultDirectRateLimiter>>,
    last: &mut Option<Id>,
) -> Result<Option<u64>, SessionEnd> {
    if matches!(heard, Heard::Text(_) | Heard::Binary | Heard::Ping) {
        let limiter =
            rate.get_or_insert_with(|| Box::new(governor::RateLimiter::direct(ctx.ws_inbound)));
        if limiter.check().is_err() {
            return Err(SessionEnd::Flood);
        }
    }
    let limit = ctx.timing.write_timeout;
    let reply = match heard {
        // Boxed: client messages are rare and a refresh may fetch keys; its state should not
        // size every connection's task.
        Heard::Text(text) => return Box::pin(answer_text(ctx, conn, session, text, last)).await,
        Heard::Binary => Control::error("binary messages are not accepted"),
        Heard::Ping => {
            write_within(limit, session, conn.flush()).await?;
            return Ok(None);
        }
        Heard::Alive => return Ok(None),
        Heard::End(end) => return Err(end),
    };
    write_within(limit, session, conn.control(reply)).await?;
    Ok(None)
}

/// Answers a client's text message.
async fn answer_text<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
    text: Utf8Bytes,
    last: &mut Option<Id>,
) -> Result<Option<u64>, SessionEnd> {
    let mut refreshed = None;
    let reply = match inbound::answer(ctx, session, text.as_str()).await {
        Inbound::Refreshed(exp) => {
            session.exp = exp;
            refreshed = Some(exp);
            Control::refreshed(exp)
        }
        Inbound::Refused => return Err(SessionEnd::RefreshRefused),
        Inbound::Reply(c) => c,
        Inbound::Subscribe { channel, token } => {
            subscribe(ctx, conn, session, last, channel, token).await?;
            return Ok(None);
        }
        Inbound::Unsubscribe(channel) => unsubscribe(ctx, session, &channel),
    };
    write_within(ctx.timing.write_timeout, session, conn.control(reply)).await?;
    Ok(refreshed)
}

/// A WebSocket `subscribe`: the token must be the connection user's, unrevoked, and grant
/// the channel in its `channel` claim. The connection then follows the channel from the
/// position its resume cursor held for it (replayed after `hub.subscribed`), or from now.
async fn subscribe<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
    last: &mut Option<Id>,
    channel: String,
    token: String,
) -> Result<(), SessionEnd> {
    let limit = ctx.timing.write_timeout;
    let refuse = |reason: String, metric: &str| {
        ctx.metrics.channel_refused(metric);
        Control::error(&reason)
    };
    let verdict = match ctx.verifier.verify(&token).await {
        Err(e) => Err(refuse(format!("subscribe token refused: {e}"), "token")),
        Ok(id) if *id.user != *session.user => Err(refuse(
            "the subscribe token is for another user".to_owned(),
            "token",
        )),
        Ok(id) if ctx.backplane.revokes(&session.user, id.iat) => {
            Err(refuse("subscribe token revoked".to_owned(), "token"))
        }
        Ok(id) if id.channel.as_deref() != Some(channel.as_str()) => Err(refuse(
            format!("the token does not grant channel {channel}"),
            "token",
        )),
        Ok(_) => Ok(()),
    };
    if let Err(reply) = verdict {
        return write_within(limit, session, conn.control(reply)).await;
    }
    if let Some(streams) = session.streams.as_ref()
        && streams.followed(&channel).is_some()
    {
        let again = Control::subscribed(&channel, &streams.cursor());
        return write_within(limit, session, conn.control(again)).await;
    }
    if session.streams.is_none()
        && let Err(reply) = with_cursor(ctx, conn, session, last).await?
    {
        return write_within(limit, session, conn.control(reply)).await;
    }
    let Some(mut streams) = session.streams.take() else {
        return Ok(());
    };
    let result = async {
        if streams.channels.len() >= ctx.max_channels {
            let refusal = streams::Refusal::Limit(ctx.max_channels);
            let reply = refuse(refusal.reason(&channel), refusal.metric());
            return write_within(limit, session, conn.control(reply)).await;
        }
        let tag = crate::cursor::tag(&channel);
        let after = streams.take_pending(tag);
        let user = session.user.clone();
        match streams::join(ctx, session.registration(), &user, &channel, after).await {
            Err(refusal) => {
                if let Some(at) = after {
                    streams.pending.push((tag, at));
                }
                let reply = refuse(refusal.reason(&channel), refusal.metric());
                write_within(limit, session, conn.control(reply)).await
            }
            Ok((followed, replay)) => {
                streams.channels.push(followed);
                while streams.count() > ctx.max_channels && !streams.pending.is_empty() {
                    streams.pending.remove(0);
                }
                let ok = Control::subscribed(&channel, &streams.cursor());
                write_within(limit, session, conn.control(ok)).await?;
                let Some(replay) = replay else { return Ok(()) };
                ctx.metrics.resumed(replay.gap);
                if replay.gap {
                    let gap = Control::gap(Control::RESUME_LOST, Some(&channel));
                    write_within(limit, session, conn.control(gap)).await?;
                }
                write_accepted(ctx, conn, session, &mut streams, &replay.items).await
            }
        }
    }
    .await;
    session.streams = Some(streams);
    result
}

/// Turns a connection without channels into one with a cursor: its personal position is
/// the history's head, once everything up to it that reached the connection's queue is
/// written (so no cursor ever claims a notification the client was not sent).
async fn with_cursor<C: Connection>(
    ctx: &Context,
    conn: &mut C,
    session: &mut Session,
    last: &mut Option<Id>,
) -> Result<Result<(), Control>, SessionEnd> {
    let Ok(head) = ctx.backplane.head(&session.user).await else {
        let refusal = streams::Refusal::Unavailable;
        ctx.metrics.channel_refused(refusal.metric());
        return Ok(Err(Control::error(&refusal.reason(""))));
    };
    let mut batch = Vec::new();
    while let Ok(first) = session.queue.try_recv() {
        deliver(ctx, conn, session, first, &mut batch, last).await?;
    }
    let personal = match (*last, head) {
        (Some(l), Some(h)) if l.epoch == h.epoch && l.seq > h.seq => l,
        (_, Some(h)) => h,
        (Some(l), None) => l,
        (None, None) => Id::START,
    };
    session.streams = Some(Box::new(Streams {
        personal,
        channels: Vec::new(),
        pending: Vec::new(),
        replays: Vec::new(),
    }));
    Ok(Ok(()))
}

/// A WebSocket `unsubscribe`.
fn unsubscribe(ctx: &Context, session: &mut Session, channel: &str) -> Control {
    let Some(mut streams) = session.streams.take() else {
        return Control::error(&format!("not subscribed to {channel}"));
    };
    let reply = match streams.channels.iter().position(|c| &*c.name == channel) {
        Some(i) => {
            let followed = streams.channels.remove(i);
            let user = session.user.clone();
            streams::leave(ctx, session.registration(), &user, &followed);
            Control::unsubscribed(channel)
        }
        None => Control::error(&format!("not subscribed to {channel}")),
    };
    session.streams = Some(streams);
    reply
}

/// Runs one write with the write timeout, cut short when the fan-out drops the connection
/// (it may be blocked on a client that stopped reading).
async fn write_within<F, T, E>(limit: Duration, session: &Session, f: F) -> Result<T, SessionEnd>
where
    F: Future<Output = Result<T, E>>,
{
    let mut f = std::pin::pin!(f);
    // Most writes finish at once (the socket has room): those need no timer and no wait
    // for eviction.
    if let Some(done) = futures_util::FutureExt::now_or_never(f.as_mut()) {
        return done.map_err(|_| SessionEnd::Gone);
    }
    tokio::select! {
        r = timeout(limit, f) => match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(SessionEnd::Gone),
            Err(_) => Err(SessionEnd::Stalled),
        },
        () = session.evicted() => Err(SessionEnd::evicted(session)),
    }
}
