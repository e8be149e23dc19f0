//! The handshake shared by both transports and both paths (raw front door and axum): drain
//! check, origin, token, caps, subscribe, and the resume read, all before any upgrade or
//! stream starts, so every refusal is a plain HTTP status with a JSON reason.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use prometheus::IntGauge;

use super::Context;
use super::gate::IpSlot;
use crate::auth::{self, AuthError, OriginCheck};
use crate::backplane::{Backplane, Replay};
use crate::envelope::{Id, Notification};
use crate::fanout::{Queue, RegisterError, Registration};
use crate::metrics::{Transport, reason};

/// A refused handshake: status, a reason safe to show the client, and the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status.
    pub status: StatusCode,
    /// Sent as `{"error": reason}`; never contains the token.
    pub reason: String,
    /// `hub_handshake_rejections_total{reason}`.
    pub metric: &'static str,
}

impl Rejection {
    fn new(status: StatusCode, reason: impl Into<String>, metric: &'static str) -> Self {
        Rejection {
            status,
            reason: reason.into(),
            metric,
        }
    }

    /// A malformed request.
    pub fn bad_request(reason: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason, reason::BAD_REQUEST)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.reason }).to_string()
    }
}

impl axum::response::IntoResponse for Rejection {
    fn into_response(self) -> axum::response::Response {
        let body = self.body();
        (
            self.status,
            [(http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// The parts of a request the handshake reads.
pub struct RequestInfo<'a> {
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
        self.backplane.unsubscribe(&self.user);
    }
}

/// Runs every check of the handshake. `resume` is the raw resume id the transport found.
pub async fn admit(
    ctx: &Context,
    req: &RequestInfo<'_>,
    transport: Transport,
    resume: Option<&str>,
) -> Result<Session, Rejection> {
    let result = admit_inner(ctx, req, transport, resume).await;
    if let Err(r) = &result {
        ctx.metrics.rejected(r.metric);
    }
    result
}

async fn admit_inner(
    ctx: &Context,
    req: &RequestInfo<'_>,
    transport: Transport,
    resume: Option<&str>,
) -> Result<Session, Rejection> {
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
    let user: Arc<str> = identity.user.into();
    if ctx.user_rate.check_key(&user).is_err() {
        return Err(Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connection attempts for this user, retry later",
            reason::USER_RATE,
        ));
    }
    let revoked = |ctx: &Context| {
        ctx.backplane
            .revoked_before(&user)
            .is_some_and(|before| identity.iat.is_none_or(|iat| iat < before))
    };
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
    let unavailable = |_| {
        Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backplane unavailable",
            reason::UNAVAILABLE,
        )
    };
    ctx.backplane.subscribe(&user).await.map_err(unavailable)?;
    let gauge = ctx.metrics.transport(transport).connections.clone();
    gauge.inc();
    ctx.metrics.transport(transport).connections_total.inc();
    let guard = Guard {
        registration,
        user: user.clone(),
        backplane: ctx.backplane.clone(),
        gauge,
        transport,
    };
    let (replay, resume_from) = match resume {
        None => (None, None),
        Some(raw) => {
            // An id this hub never issued reads as epoch 0, which no history has: a gap.
            let id = raw.parse::<Id>().unwrap_or(Id { epoch: 0, seq: 0 });
            let replay = ctx
                .backplane
                .history_after(&user, id)
                .await
                .map_err(unavailable)?;
            let from = (!replay.gap).then_some(id);
            (Some(replay), from)
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
        guard,
        ip: None,
    })
}

/// The seam filter: true for a notification the client does not have yet (it is after the
/// resume point and after everything replayed), and then records it as the last one sent.
/// Within one history epoch ids only grow; a new epoch (history recreated) starts afresh.
pub fn is_new(last: &mut Option<Id>, n: &Notification) -> bool {
    if let Some(l) = last
        && l.epoch == n.id.epoch
        && n.id.seq <= l.seq
    {
        return false;
    }
    *last = Some(n.id);
    true
}
