//! The one admission of a client connection, shared by both transports and both paths (the
//! raw front door and axum): the transport's request rules, drain check, origin, token, caps,
//! subscribe, and the resume read, all within the handshake timeout and before any upgrade or
//! stream starts, so every refusal is a plain HTTP status with a JSON reason, counted once.

use base64::Engine as _;
use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use prometheus::IntGauge;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Transport;
use super::front::ConnSlot;
use super::gate::IpSlot;
use super::http1::{self, Head};
use super::streams::{self, Streams};
use super::{Context, sse};
use crate::auth::{self, AuthError, OriginCheck};
use crate::backplane::{Backplane, Replay};
use crate::cursor::{self, Cursor};
use crate::envelope::{Id, Notification};
use crate::fanout::{Queue, RegisterError, Registration};
use crate::metrics::reason;

/// A refused handshake: status, a reason safe to show the client, and the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status.
    pub status: StatusCode,
    /// Sent as `{"error": reason}`; never contains the token.
    pub reason: String,
    /// `hub_handshake_rejections_total{reason}`.
    pub metric: &'static str,
    /// Extra response headers (CORS on a refused SSE origin, so the page can read why).
    pub headers: Vec<(HeaderName, String)>,
}

impl Rejection {
    fn new(status: StatusCode, reason: impl Into<String>, metric: &'static str) -> Self {
        Rejection {
            status,
            reason: reason.into(),
            metric,
            headers: Vec::new(),
        }
    }

    /// A malformed request.
    pub fn bad_request(reason: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason, reason::BAD_REQUEST)
    }

    /// The backplane could not be reached (whatever the error, the client retries).
    fn unavailable<E>(_: E) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backplane unavailable",
            reason::UNAVAILABLE,
        )
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.reason }).to_string()
    }

    /// The refusal as a complete HTTP/1.1 response that closes the connection (front door).
    pub fn to_http1(&self) -> Vec<u8> {
        http1::response(self.status, &self.headers, &self.body())
    }
}

impl axum::response::IntoResponse for Rejection {
    fn into_response(self) -> axum::response::Response {
        let body = self.body();
        super::response(self.status, self.headers, body)
    }
}

/// The parts of a request the handshake reads.
pub struct RequestInfo<'a> {
    /// Request method.
    pub method: &'a Method,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Raw query string, if any.
    pub query: Option<&'a str>,
}

/// An admitted connection, registered and subscribed, with what it must replay first.
pub struct Session {
    /// The user.
    pub user: Arc<str>,
    /// Token expiry (seconds since the Unix epoch).
    pub exp: u64,
    /// The connection's bounded queue of live notifications.
    pub queue: Queue,
    /// Present when the client asked to resume.
    pub replay: Option<Replay>,
    /// Where the `Origin` stood (SSE echoes an allowed one for CORS).
    pub origin: OriginCheck,
    /// Last id the client has (resume point), to drop duplicates at the replay/live seam.
    pub resume_from: Option<Id>,
    /// The channels followed and the position in every stream, for a connection with
    /// channels (boxed: a connection without carries one pointer).
    pub streams: Option<Box<Streams>>,
    guard: Guard,
    /// The client address's connection slot, released when the session ends.
    ip: Option<IpSlot>,
}

impl Session {
    /// The transport this session runs on.
    pub fn transport(&self) -> Transport {
        self.guard.transport
    }

    /// Moves `first` and whatever else is already queued (up to `max` in all) into `batch`,
    /// so a burst is written with one flush.
    pub fn fill_batch(
        &mut self,
        first: Arc<Notification>,
        batch: &mut Vec<Arc<Notification>>,
        max: usize,
    ) {
        batch.push(first);
        while batch.len() < max {
            match self.queue.try_recv() {
                Ok(n) => batch.push(n),
                Err(_) => break,
            }
        }
    }

    /// Resolves when the fan-out dropped this connection (slow consumer or disconnect API).
    pub async fn evicted(&self) {
        self.guard.registration.evicted().await;
    }

    /// Whether the disconnect API closed this connection.
    pub fn disconnected_by_api(&self) -> bool {
        self.guard.registration.disconnected_by_api()
    }

    /// Keeps the client address's connection slot for as long as the session lives.
    pub fn hold(&mut self, slot: IpSlot) {
        self.ip = Some(slot);
    }

    /// The connection's entry in the fan-out (to join and leave channels).
    pub fn registration(&mut self) -> &mut Registration {
        &mut self.guard.registration
    }
}

/// Releases everything the handshake took, whatever way the connection ends.
struct Guard {
    registration: Registration,
    user: Arc<str>,
    backplane: Arc<dyn Backplane>,
    gauge: IntGauge,
    transport: Transport,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.gauge.dec();
        self.backplane.unsubscribe(&self.user, &self.user);
        for stream in self.registration.joined() {
            self.backplane.unsubscribe(stream, &self.user);
        }
    }
}

/// Admits a client connection on `transport`, or says why not: the same rules, timeout and
/// rejection metrics whichever path the request came by.
pub async fn admit(
    ctx: &Context,
    transport: Transport,
    req: &RequestInfo<'_>,
) -> Result<Session, Rejection> {
    // Boxed: the handshake's state (token checks, key fetches) is freed once it is done
    // instead of sizing the connection's task.
    let checks = Box::pin(async {
        request_rules(transport, req)?;
        let resume = resume_id(transport, req);
        checks(ctx, req, transport, resume.as_deref()).await
    });
    let mut result = match tokio::time::timeout(ctx.timing.handshake_timeout, checks).await {
        Ok(result) => result,
        Err(_) => Err(Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "handshake timed out",
            reason::TIMEOUT,
        )),
    };
    if let Err(r) = &mut result {
        ctx.metrics.rejected(r.metric);
        tracing::debug!(
            transport = transport.as_str(),
            status = r.status.as_u16(),
            reason = %r.reason,
            "handshake refused"
        );
        if transport == Transport::Sse && r.status == StatusCode::FORBIDDEN {
            r.headers = sse::refused_origin_headers(req.headers);
        }
    }
    result
}

/// [`admit`] on the front door: a refusal is written to the socket (and `None` returned); an
/// admitted session keeps the client address's slot.
pub async fn admit_raw(
    ctx: &Context,
    transport: Transport,
    head: &Head,
    stream: &mut TcpStream,
    slot: IpSlot,
) -> Option<Session> {
    let req = RequestInfo {
        method: &head.method,
        headers: &head.headers,
        query: head.query.as_deref(),
    };
    match admit(ctx, transport, &req).await {
        Ok(mut session) => {
            session.hold(slot);
            Some(session)
        }
        Err(rejection) => {
            let _ = stream.write_all(&rejection.to_http1()).await;
            None
        }
    }
}

/// [`admit`] on the axum path: an admitted session takes the connection's address slot from
/// the request (so it lives as long as the stream); a refused request leaves it with the
/// connection.
pub async fn admit_request<B>(
    ctx: &Context,
    transport: Transport,
    req: &mut http::Request<B>,
) -> Result<Session, Rejection> {
    let info = RequestInfo {
        method: req.method(),
        headers: req.headers(),
        query: req.uri().query(),
    };
    let mut session = admit(ctx, transport, &info).await?;
    if let Some(slot) = req
        .extensions_mut()
        .get_mut::<ConnSlot>()
        .and_then(ConnSlot::take)
    {
        session.hold(slot);
    }
    Ok(session)
}

/// What a transport accepts before any token check: a WebSocket upgrade (version 13, with a
/// key), or a `GET` for a stream.
fn request_rules(transport: Transport, req: &RequestInfo<'_>) -> Result<(), Rejection> {
    match transport {
        Transport::Ws => websocket_key(req.headers).map(drop),
        Transport::Sse if req.method != Method::GET => Err(Rejection::bad_request("use GET")),
        Transport::Sse => Ok(()),
    }
}

/// Checks the upgrade headers of a WebSocket request and returns its `Sec-WebSocket-Key`.
pub fn websocket_key(headers: &HeaderMap) -> Result<&http::HeaderValue, Rejection> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(Rejection::bad_request("expected a WebSocket upgrade"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(Rejection::bad_request(
            "unsupported WebSocket version, use 13",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| Rejection::bad_request("missing Sec-WebSocket-Key"))?;
    // RFC 6455 §4.1: the key is a random 16-byte nonce, base64-encoded (24 characters).
    let nonce = (key.len() == 24)
        .then(|| {
            base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .ok()
        })
        .flatten();
    if nonce.is_none_or(|n| n.len() != 16) {
        return Err(Rejection::bad_request(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    Ok(key)
}

/// The last id the client has: WebSocket `since=`; SSE `Last-Event-ID`, or `last_event_id=`
/// for a first connect (`EventSource` cannot set headers).
fn resume_id<'a>(transport: Transport, req: &RequestInfo<'a>) -> Option<Cow<'a, str>> {
    match transport {
        Transport::Ws => auth::query_param(req.query, "since"),
        Transport::Sse => req
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(Cow::Borrowed)
            .or_else(|| auth::query_param(req.query, "last_event_id")),
    }
}

/// Drain check, origin and token: who is asking, from where.
async fn identify(
    ctx: &Context,
    req: &RequestInfo<'_>,
) -> Result<(OriginCheck, auth::Identity), Rejection> {
    if ctx.lifecycle.is_draining() {
        return Err(Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node draining, reconnect to another node",
            reason::DRAINING,
        ));
    }
    let origin = ctx
        .origins
        .check(req.headers)
        .map_err(|e| Rejection::new(StatusCode::FORBIDDEN, e.to_string(), reason::ORIGIN))?;
    let token = auth::extract_token(req.headers, req.query, origin).ok_or_else(|| {
        Rejection::new(
            StatusCode::UNAUTHORIZED,
            AuthError::Missing.to_string(),
            reason::MISSING_TOKEN,
        )
    })?;
    let identity = ctx.verifier.verify(&token).await.map_err(|e| {
        let status = if e == AuthError::KeysUnavailable {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        };
        Rejection::new(status, e.to_string(), reason::INVALID_TOKEN)
    })?;
    Ok((origin, identity))
}

/// Every check after the transport's own rules. `resume` is the raw resume id.
async fn checks(
    ctx: &Context,
    req: &RequestInfo<'_>,
    transport: Transport,
    resume: Option<&str>,
) -> Result<Session, Rejection> {
    let (origin, identity) = identify(ctx, req).await?;
    // A resume id is a plain id or a cursor; one this hub never issued resumes nothing (a gap).
    let resume = resume.map(|raw| {
        Cursor::parse(raw).unwrap_or(Cursor {
            personal: Some(Id::UNKNOWN),
            channels: Vec::new(),
        })
    });
    if identity.channels.len() > ctx.max_channels {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            format!(
                "the token grants {} channels, at most {} per connection (HUB_MAX_CHANNELS_PER_CONNECTION)",
                identity.channels.len(),
                ctx.max_channels
            ),
            reason::CHANNEL_LIMIT,
        ));
    }
    let user: Arc<str> = identity.user.into();
    if ctx.user_rate.check_key(&user).is_err() {
        return Err(Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connection attempts for this user, retry later",
            reason::USER_RATE,
        ));
    }
    let revoked = |ctx: &Context| ctx.backplane.revokes(&user, identity.iat);
    let refused = || {
        Rejection::new(
            StatusCode::UNAUTHORIZED,
            AuthError::Revoked.to_string(),
            reason::REVOKED,
        )
    };
    if revoked(ctx) {
        return Err(refused());
    }
    let (registration, queue) = ctx.fanout.register(user.clone()).map_err(|e| match e {
        RegisterError::UserLimit => Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            e.to_string(),
            reason::USER_LIMIT,
        ),
        RegisterError::NodeLimit => Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
            reason::NODE_LIMIT,
        ),
    })?;
    // Checked again once registered: a disconnect that revoked the token while this
    // handshake ran either sees this registration or is seen here.
    if revoked(ctx) {
        return Err(refused());
    }
    // Subscribe before reading history: a notification published in between is then both
    // in the replay and in the queue, and the session drops the copy by id.
    ctx.backplane
        .subscribe(&user, &user)
        .await
        .map_err(Rejection::unavailable)?;
    let gauge = transport.metrics(&ctx.metrics).connections.clone();
    gauge.inc();
    transport.metrics(&ctx.metrics).connections_total.inc();
    let mut guard = Guard {
        registration,
        user: user.clone(),
        backplane: ctx.backplane.clone(),
        gauge,
        transport,
    };
    let with_channels =
        !identity.channels.is_empty() || resume.as_ref().is_some_and(|c| !c.channels.is_empty());
    let (replay, resume_from, streams) = if with_channels {
        let (replay, streams) =
            Box::pin(follow(ctx, &mut guard, &identity.channels, resume)).await?;
        (replay, None, Some(streams))
    } else {
        match resume {
            None => (None, None, None),
            Some(cursor) => {
                let id = cursor.personal.unwrap_or(Id::UNKNOWN);
                let replay = ctx
                    .backplane
                    .history_after(&user, id)
                    .await
                    .map_err(Rejection::unavailable)?;
                let from = (!replay.gap).then_some(id);
                (Some(replay), from, None)
            }
        }
    };
    if let Some(r) = &replay {
        ctx.metrics.resumed(r.gap);
    }
    Ok(Session {
        user,
        exp: identity.exp,
        queue,
        replay,
        origin,
        resume_from,
        streams,
        guard,
        ip: None,
    })
}

/// A connection with channels: joins the token's channels and positions every stream, from
/// the resume cursor where it has a position, at the stream's head where not. Returns the
/// personal replay (when resuming) and the streams.
async fn follow(
    ctx: &Context,
    guard: &mut Guard,
    channels: &[String],
    resume: Option<Cursor>,
) -> Result<(Option<Replay>, Box<Streams>), Rejection> {
    let user = guard.user.clone();
    let mut followed = Vec::with_capacity(channels.len());
    let mut replays = Vec::new();
    for name in channels {
        let after = resume.as_ref().and_then(|c| c.channel(cursor::tag(name)));
        let (f, replay) = streams::join(ctx, &mut guard.registration, &user, name, after)
            .await
            .map_err(|refusal| {
                ctx.metrics.channel_refused(refusal.metric());
                // The channel limit was checked against the token before; what remains is
                // this node's capacity or the backplane, both 503.
                let metric = match refusal {
                    streams::Refusal::Full => reason::CHANNEL_FULL,
                    _ => reason::UNAVAILABLE,
                };
                Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    refusal.reason(name),
                    metric,
                )
            })?;
        if let Some(r) = replay {
            ctx.metrics.resumed(r.gap);
            replays.push((f.name.clone(), r));
        }
        followed.push(f);
    }
    let after = resume.as_ref().map(|c| c.personal.unwrap_or(Id::UNKNOWN));
    let (personal, replay) = streams::start(&*ctx.backplane, &user, after)
        .await
        .map_err(Rejection::unavailable)?;
    // The cursor's other channels wait for a WebSocket `subscribe`, within the limit.
    let room = ctx.max_channels.saturating_sub(followed.len());
    let pending = resume
        .map(|c| c.channels)
        .unwrap_or_default()
        .into_iter()
        .filter(|(tag, _)| !followed.iter().any(|f| f.tag == *tag))
        .take(room)
        .collect();
    Ok((
        replay,
        Box::new(Streams {
            personal,
            channels: followed,
            pending,
            replays,
        }),
    ))
}

/// The seam filter of a connection without channels: true for a notification the client does
/// not have yet (it is after the resume point and after everything replayed), and then records
/// it as the last one sent. The same rule as a cursor's positions ([`streams::advance`]): a
/// client with nothing yet is at no position, and every unpositioned gap marker is passed on.
pub fn is_new(last: &mut Option<Id>, n: &Notification) -> bool {
    let mut at = last.unwrap_or(Id::UNKNOWN);
    if !streams::advance(&mut at, n) {
        return false;
    }
    *last = Some(at);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> Id {
        Id { epoch, seq }
    }

    #[test]
    fn the_seam_filter_passes_each_unpositioned_gap_and_drops_what_the_client_has() {
        let unreadable = || Notification::gap_marker("u", Id::UNKNOWN, "history_unavailable");
        let at = |i: Id| Notification::gap_marker("u", i, "resume_lost");
        let mut last = Some(id(7, 5));
        assert!(!is_new(&mut last, &at(id(7, 5))), "already has it");
        assert!(!is_new(&mut last, &at(id(7, 3))), "older");
        assert!(is_new(&mut last, &at(id(7, 6))));
        // History unreadable twice: each time the client may have missed something.
        assert!(is_new(&mut last, &unreadable()));
        assert!(is_new(&mut last, &unreadable()));
        // After that, whatever the history holds next is new.
        assert!(is_new(&mut last, &at(id(7, 2))));
        assert_eq!(last, Some(id(7, 2)));
        // A client with nothing yet takes the first of any epoch.
        let mut none = None;
        assert!(is_new(&mut none, &at(id(9, 1))));
        assert!(!is_new(&mut none, &at(id(9, 1))));
    }
}
