//! The HTTP API: publish, health, readiness, metrics, the dev login, and the demo page.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::backplane::{Backplane, BackplaneError, Dedupe, Publish, Revocation};
use crate::metrics::Metrics;
use crate::shutdown::Lifecycle;
use service_kit::http::ErrorBody;

/// Largest publish body.
pub const MAX_BODY: usize = service_kit::http::BODY_LIMIT;
/// Largest batch publish body.
pub const MAX_BATCH_BODY: usize = 1024 * 1024;
/// Most notifications in one batch.
pub const MAX_BATCH_ITEMS: usize = 1000;
/// Largest `user_id`, `type` or `idempotency_key`.
const MAX_FIELD: usize = 256;

/// What the API handlers share; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<ApiInner>,
}

/// The parts of [`ApiState`].
pub struct ApiInner {
    /// History and routing.
    pub backplane: Arc<dyn Backplane>,
    /// Metrics.
    pub metrics: Metrics,
    /// Drain state.
    pub lifecycle: Lifecycle,
    /// Publish API key; `None` refuses every publish.
    pub api_key: Option<String>,
    /// Present with `--dev`: the secret the dev login signs with.
    pub dev_secret: Option<String>,
    /// The hub's own `HUB_JWT_AUDIENCE` and `HUB_JWT_ISSUER`, put into dev tokens.
    pub audience: Option<String>,
    /// See [`ApiInner::audience`].
    pub issuer: Option<String>,
    /// How long a revocation lasts: no token accepted before it can outlive this.
    pub revocation_ttl: Duration,
}

impl ApiState {
    /// Wraps the parts.
    pub fn new(inner: ApiInner) -> Self {
        ApiState {
            inner: Arc::new(inner),
        }
    }
}

/// An API error: status and a JSON `{"error": ...}` body that never echoes secrets.
pub type ApiError = service_kit::http::ApiError;

impl From<BackplaneError> for ApiError {
    fn from(e: BackplaneError) -> Self {
        match e {
            BackplaneError::Rejected(why) => ApiError::BadRequest(format!("refused: {why}")),
            BackplaneError::Unavailable(_) => {
                tracing::warn!(error = %e, "publish failed");
                ApiError::Unavailable("backplane unavailable, retry".to_owned())
            }
        }
    }
}

/// Checks an `Authorization` value against the API key (constant-time comparison), for the
/// HTTP and gRPC APIs alike; the error is the reason to answer with.
pub(crate) fn check_api_key(
    expected: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), &'static str> {
    let Some(expected) = expected else {
        return Err("publish API disabled: no API key configured");
    };
    let given = authorization
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or("missing API key")?;
    if bool::from(given.trim().as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err("wrong API key")
    }
}

/// Extractor: the request carries the publish API key.
pub struct ApiKey;

impl FromRequestParts<ApiState> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        check_api_key(state.inner.api_key.as_deref(), authorization)
            .map(|()| ApiKey)
            .map_err(ApiError::Unauthorized)
    }
}

/// One notification to publish, to a user or to a channel (exactly one of the two).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// The recipient: 1–256 bytes, no `{`, `}` or control characters.
    #[serde(default)]
    #[schema(example = "alice")]
    user_id: Option<String>,
    /// The channel: 1–128 characters of `[A-Za-z0-9_.:@/-]`; every connection subscribed to
    /// it receives the notification.
    #[serde(default)]
    #[schema(example = "announcements")]
    channel: Option<String>,
    /// The notification type: 1–256 bytes, not starting with `hub.`.
    #[serde(rename = "type")]
    #[schema(example = "order.status")]
    kind: String,
    /// A JSON object, delivered unchanged (line breaks become spaces).
    #[schema(value_type = Object)]
    data: Box<RawValue>,
    /// A repeat within `HUB_IDEMPOTENCY_TTL` returns the first id and publishes nothing.
    #[serde(default)]
    #[schema(max_length = 256)]
    idempotency_key: Option<String>,
}

/// `{"id": "..."}`: the notification's id in the user's history.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct PublishResponse {
    #[schema(example = "5f1c0a3e2b-42")]
    id: String,
}

/// `{"ids": [...]}`: one id per item, in the items' order.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct BatchResponse {
    ids: Vec<String>,
}

/// `{"disconnected": n}`: connections closed over all nodes.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct DisconnectResponse {
    disconnected: usize,
}

/// A channel's presence over every node.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ChannelPresenceBody {
    /// Users with a subscribed connection, sorted, at most 1 000.
    users: Vec<String>,
    /// How many users in all.
    count: usize,
}

/// A user's presence over every node.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct UserPresence {
    /// At least one connection.
    online: bool,
    /// Open connections (WebSocket and SSE) over every node.
    connections: usize,
}

/// `{"token": "..."}` from the dev login.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct TokenResponse {
    token: String,
}

/// The OpenAPI 3.1 description of this API, generated from the handlers and types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "notification hub HTTP API",
        description = "Publish notifications, disconnect users, probes and metrics. The client endpoints /ws and /sse are described in docs/asyncapi.yaml."
    ),
    paths(
        publish,
        publish_batch,
        disconnect,
        user_presence,
        channel_presence,
        healthz,
        readyz,
        metrics,
        dev_token
    ),
    components(schemas(
        PublishRequest,
        PublishResponse,
        BatchRequest,
        BatchResponse,
        DisconnectRequest,
        DisconnectResponse,
        UserPresence,
        ChannelPresenceBody,
        DevLogin,
        TokenResponse,
        ErrorBody
    )),
    modifiers(&BearerKey)
)]
struct ApiDoc;

/// The API key as a bearer scheme.
struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        service_kit::http::add_bearer_scheme(openapi, "api_key", None, "HUB_API_KEY".to_owned());
    }
}

/// The document served at `GET /api/openapi.json`.
pub fn openapi_json() -> String {
    use utoipa::OpenApi;
    ApiDoc::openapi().to_json().unwrap_or_default()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

/// A user id of a request, or 400 naming `user_id`.
fn valid_user(user: &str) -> Result<(), ApiError> {
    crate::envelope::check_user_id(user).map_err(|e| ApiError::BadRequest(format!("user_id: {e}")))
}

/// A channel name of a request, or 400 naming `channel`.
fn valid_channel(channel: &str) -> Result<(), ApiError> {
    crate::envelope::check_channel(channel)
        .map_err(|e| ApiError::BadRequest(format!("channel: {e}")))
}

fn check_field(name: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::BadRequest(format!("{name} must not be empty")));
    }
    if value.len() > MAX_FIELD {
        return Err(ApiError::BadRequest(format!(
            "{name} longer than {MAX_FIELD} bytes"
        )));
    }
    Ok(())
}

/// A JSON body: no `Content-Type` (curl without `-H`) or `application/json` (with any
/// parameters); anything else is refused so a form post is not read as JSON by accident.
fn json_content_type(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType),
    }
}

/// A JSON request body: the content type checked, the size limit's refusal as `too_large`.
fn read_body(
    headers: &http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    too_large: impl FnOnce() -> ApiError,
) -> Result<Bytes, ApiError> {
    json_content_type(headers)?;
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })
}

/// Parses a JSON body into `T`, a 400 naming what is wrong otherwise.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Reads and checks one publish body.
fn parse_publish(body: &[u8]) -> Result<Publish, ApiError> {
    check_publish(parse_json(body)?)
}

/// Checks one notification's parts as the HTTP API does (for the gRPC API); the error text is
/// the reason to send back.
pub(crate) fn publish_from_parts(
    user_id: Option<String>,
    channel: Option<String>,
    kind: String,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
) -> Result<Publish, String> {
    check_publish(PublishRequest {
        user_id,
        channel,
        kind,
        data,
        idempotency_key,
    })
    .map_err(|e| e.to_string())
}

/// Checks one publish request's fields; the notification to publish.
fn check_publish(req: PublishRequest) -> Result<Publish, ApiError> {
    let stream = match (req.user_id, req.channel) {
        (Some(user), None) => {
            valid_user(&user)?;
            user
        }
        (None, Some(channel)) => {
            valid_channel(&channel)?;
            crate::envelope::channel_stream(&channel)
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "name either user_id or channel, not both".to_owned(),
            ));
        }
        (None, None) => {
            return Err(ApiError::BadRequest(
                "missing field: user_id or channel".to_owned(),
            ));
        }
    };
    check_field("type", &req.kind)?;
    if !req.data.get().starts_with('{') {
        return Err(ApiError::BadRequest(
            "data must be a JSON object".to_owned(),
        ));
    }
    if req.kind.starts_with("hub.") {
        return Err(ApiError::BadRequest(
            "types starting with \"hub.\" are reserved".to_owned(),
        ));
    }
    if let Some(key) = &req.idempotency_key {
        check_field("idempotency_key", key)?;
    }
    Ok(Publish {
        user: stream,
        kind: req.kind,
        data: req.data,
        dedupe: Dedupe::key(req.idempotency_key),
    })
}

/// Publishes one notification to a user.
#[utoipa::path(
    post,
    path = "/api/publish",
    request_body(content = PublishRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted; the id in history (the first id for a repeated key)", body = PublishResponse),
        (status = 400, description = "Bad JSON, a missing, empty or invalid field, a `hub.` type", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (everyone, when none is configured)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Content-Type other than application/json", body = ErrorBody),
        (status = 503, description = "Backplane unreachable; retry with the same idempotency key", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
async fn publish(
    State(state): State<ApiState>,
    _key: ApiKey,
    headers: http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = read_body(&headers, body, || ApiError::TooLarge)?;
    let msg = parse_publish(&body)?;
    let published = state.inner.backplane.publish(msg).await?;
    if published.duplicate {
        state.inner.metrics.publish_duplicates().inc();
    } else {
        state.inner.metrics.published_api().inc();
    }
    Ok(Json(serde_json::json!({ "id": published.id.to_string() })))
}

/// Up to 1 000 notifications (and 1 MiB).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    #[schema(max_items = 1000)]
    notifications: Vec<PublishRequest>,
}

/// `POST /api/publish/batch`: up to 1 000 notifications in one request and one store round
/// trip; all or nothing at validation, ids in the items' order.
#[utoipa::path(
    post,
    path = "/api/publish/batch",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "All accepted; ids in the items' order", body = BatchResponse),
        (status = 400, description = "An invalid item (named by its index); nothing was published", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "More than 1 000 items or a body over 1 MiB", body = ErrorBody),
        (status = 415, description = "Content-Type other than application/json", body = ErrorBody),
        (status = 503, description = "Backplane unreachable; retry (idempotency keys make it safe)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
async fn publish_batch(
    State(state): State<ApiState>,
    _key: ApiKey,
    headers: http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = read_body(&headers, body, || {
        ApiError::TooMany(format!("batch body larger than {MAX_BATCH_BODY} bytes"))
    })?;
    let batch: BatchRequest = parse_json(&body)?;
    if batch.notifications.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::TooMany(format!(
            "{} notifications, at most {MAX_BATCH_ITEMS} per batch",
            batch.notifications.len()
        )));
    }
    if batch.notifications.is_empty() {
        return Err(ApiError::BadRequest(
            "notifications must not be empty".to_owned(),
        ));
    }
    let mut msgs = Vec::with_capacity(batch.notifications.len());
    for (index, item) in batch.notifications.into_iter().enumerate() {
        // As for a single publish: no notification larger than its 64 KiB body.
        if item.data.get().len() > MAX_BODY {
            return Err(ApiError::BadRequest(format!(
                "notifications[{index}]: data larger than 64 KiB"
            )));
        }
        let msg = check_publish(item).map_err(|e| match e {
            ApiError::BadRequest(why) => {
                ApiError::BadRequest(format!("notifications[{index}]: {why}"))
            }
            other => other,
        })?;
        msgs.push(msg);
    }
    let published = state.inner.backplane.publish_batch(msgs).await?;
    let duplicates = published.iter().filter(|p| p.duplicate).count() as u64;
    state.inner.metrics.publish_duplicates().inc_by(duplicates);
    state
        .inner
        .metrics
        .published_api()
        .inc_by(published.len() as u64 - duplicates);
    let ids: Vec<String> = published.iter().map(|p| p.id.to_string()).collect();
    Ok(Json(serde_json::json!({ "ids": ids })))
}

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "Running", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: 200 when the backplane is reachable and the node is not draining.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Ready", body = Object),
    (status = 503, description = "Draining, or the backplane is unreachable", body = Object),
))]
async fn readyz(State(state): State<ApiState>) -> Response {
    if state.inner.lifecycle.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "draining" })),
        )
            .into_response();
    }
    let ready = tokio::time::timeout(Duration::from_secs(2), state.inner.backplane.ready())
        .await
        .unwrap_or(false);
    if ready {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "backplane unavailable" })),
        )
            .into_response()
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4", body = String)))]
async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.inner.metrics.render(),
    )
        .into_response()
}

/// Whom to disconnect, and optionally which of their tokens to refuse from now on.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    #[schema(example = "alice")]
    user_id: String,
    /// Unix seconds: tokens of the user issued earlier (or without `iat`) are refused.
    #[serde(default)]
    revoke_tokens_issued_before: Option<u64>,
}

/// `POST /api/disconnect`: closes every connection of a user on every node and optionally
/// revokes the user's tokens issued before a time.
#[utoipa::path(
    post,
    path = "/api/disconnect",
    request_body(content = DisconnectRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every connection of the user on every node closed (WS 4010, SSE end)", body = DisconnectResponse),
        (status = 400, description = "Bad JSON or user id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Backplane unreachable", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
async fn disconnect(
    State(state): State<ApiState>,
    _key: ApiKey,
    headers: http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = read_body(&headers, body, || ApiError::TooLarge)?;
    let req: DisconnectRequest = parse_json(&body)?;
    valid_user(&req.user_id)?;
    let now = crate::envelope::now_micros() / 1_000_000;
    let revoke = match req.revoke_tokens_issued_before {
        None => None,
        Some(0) => {
            return Err(ApiError::BadRequest(
                "revoke_tokens_issued_before must be a positive unix time in seconds".to_owned(),
            ));
        }
        Some(before) => Some(Revocation {
            issued_before: before,
            until: now.saturating_add(state.inner.revocation_ttl.as_secs()),
        }),
    };
    let closed = state
        .inner
        .backplane
        .disconnect(&req.user_id, revoke)
        .await?;
    tracing::info!(
        connections = closed,
        revoked = revoke.is_some(),
        "user disconnected through the API"
    );
    Ok(Json(serde_json::json!({ "disconnected": closed })))
}

/// `GET /api/presence/users/{user_id}`: whether the user is connected anywhere, and with
/// how many connections (this node's exactly, the others' as of about a second ago).
#[utoipa::path(
    get,
    path = "/api/presence/users/{user_id}",
    params(("user_id" = String, Path, description = "The user: 1–256 bytes, no `{`, `}` or control characters")),
    responses(
        (status = 200, description = "The user's connections over every node", body = UserPresence),
        (status = 400, description = "Bad user id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Backplane unreachable", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
async fn user_presence(
    State(state): State<ApiState>,
    _key: ApiKey,
    user: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<UserPresence>, ApiError> {
    let Path(user) = user.map_err(|e| ApiError::BadRequest(format!("user_id: {e}")))?;
    valid_user(&user)?;
    state.inner.metrics.presence_requested("user");
    let connections = state.inner.backplane.presence(&user).await?;
    Ok(Json(UserPresence {
        online: connections > 0,
        connections,
    }))
}

/// `GET /api/presence/channels/{channel}`: who is subscribed to a channel over every node.
#[utoipa::path(
    get,
    path = "/api/presence/channels/{channel}",
    params(("channel" = String, Path, description = "The channel: 1–128 characters of [A-Za-z0-9_.:@/-]")),
    responses(
        (status = 200, description = "The channel's users over every node (at most 1 000 listed) and their count", body = ChannelPresenceBody),
        (status = 400, description = "Bad channel name", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Backplane unreachable", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
async fn channel_presence(
    State(state): State<ApiState>,
    _key: ApiKey,
    channel: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<ChannelPresenceBody>, ApiError> {
    let Path(channel) = channel.map_err(|e| ApiError::BadRequest(format!("channel: {e}")))?;
    valid_channel(&channel)?;
    state.inner.metrics.presence_requested("channel");
    let presence = state
        .inner
        .backplane
        .channel_presence(&crate::envelope::channel_stream(&channel))
        .await?;
    Ok(Json(ChannelPresenceBody {
        users: presence.users,
        count: presence.count,
    }))
}

/// The dev login's request (only with `hub serve --dev`, loopback clients only).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct DevLogin {
    user_id: String,
    /// The token's `aud`: another service's audience (e.g. `orders`); the hub's own
    /// `HUB_JWT_AUDIENCE` when absent.
    #[serde(default)]
    audience: Option<String>,
    /// Channels the token subscribes its connection to (`channels` claim).
    #[serde(default)]
    channels: Vec<String>,
    /// The channel a WebSocket `subscribe` may join with this token (`channel` claim).
    #[serde(default)]
    channel: Option<String>,
}

/// `POST /api/dev/token` (only with `--dev`): answers loopback clients only, so a dev node
/// reachable from elsewhere does not mint tokens for strangers.
#[utoipa::path(
    post,
    path = "/api/dev/token",
    request_body(content = DevLogin, content_type = "application/json"),
    responses(
        (status = 200, description = "A one-hour token (only with --dev)", body = TokenResponse),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 403, description = "Not a loopback client", body = ErrorBody),
    )
)]
async fn dev_token(
    state: ApiState,
    extensions: http::Extensions,
    body: Bytes,
    secret: &str,
) -> Result<Json<serde_json::Value>, ApiError> {
    let peer = extensions.get::<ConnectInfo<std::net::SocketAddr>>();
    if !peer.is_some_and(|ConnectInfo(addr)| addr.ip().is_loopback()) {
        return Err(ApiError::Forbidden(
            "the dev login answers loopback clients only",
        ));
    }
    let login: DevLogin = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"user_id\": \"...\", \"audience\", \"channels\", \"channel\": optional}}: {e}"
        ))
    })?;
    valid_user(&login.user_id)?;
    if let Some(aud) = &login.audience {
        check_field("audience", aud)?;
    }
    let audience = login
        .audience
        .as_deref()
        .or(state.inner.audience.as_deref());
    for c in login.channels.iter().chain(&login.channel) {
        valid_channel(c)?;
    }
    let claims = crate::auth::Claims {
        channels: login.channels,
        channel: login.channel,
        ..crate::auth::Claims::new(
            &login.user_id,
            Duration::from_secs(3600),
            audience,
            state.inner.issuer.as_deref(),
        )
    };
    let token = crate::auth::sign_hs256_claims(secret, &claims)
        .map_err(|_| ApiError::Unavailable("cannot sign".to_owned()))?;
    Ok(Json(serde_json::json!({ "token": token })))
}

const DEMO_PAGE: &str = include_str!("../../web-demo/index.html");
const DEMO_CLIENT: &str = include_str!("../../web-demo/hub-client.js");

async fn demo_page() -> Html<&'static str> {
    Html(DEMO_PAGE)
}

async fn demo_client() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DEMO_CLIENT,
    )
        .into_response()
}

/// The API routes (without `/ws` and `/sse`, which the transport adds).
pub fn router(state: ApiState) -> axum::Router {
    let mut router = axum::Router::new()
        .route(
            "/api/publish",
            post(publish).layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .route(
            "/api/publish/batch",
            post(publish_batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY)),
        )
        .route(
            "/api/disconnect",
            post(disconnect).layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .route("/api/presence/users/{user_id}", get(user_presence))
        .route("/api/presence/channels/{channel}", get(channel_presence))
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(demo_page))
        .route("/hub-client.js", get(demo_client));
    // The route exists only with `--dev`, and signs with its secret.
    if let Some(secret) = state.inner.dev_secret.clone() {
        let secret: Arc<str> = secret.into();
        router = router.route(
            "/api/dev/token",
            post(
                move |State(state): State<ApiState>, extensions: http::Extensions, body: Bytes| {
                    let secret = secret.clone();
                    async move { dev_token(state, extensions, body, &secret).await }
                },
            ),
        );
    }
    router.with_state(state)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::backplane::memory::MemoryBackplane;

    use crate::backplane::NoSink;

    fn dev_router() -> axum::Router {
        router(ApiState::new(ApiInner {
            backplane: Arc::new(MemoryBackplane::new(
                Arc::new(NoSink),
                10,
                Duration::from_secs(60),
            )),
            metrics: Metrics::new(),
            lifecycle: Lifecycle::new(),
            api_key: Some("0123456789abcdef".to_owned()),
            dev_secret: Some("0123456789abcdef0123456789abcdef".to_owned()),
            audience: None,
            issuer: None,
            revocation_ttl: Duration::from_secs(60),
        }))
    }

    async fn dev_login_from(peer: Option<&str>) -> StatusCode {
        let mut req = http::Request::post("/api/dev/token")
            .body(Body::from(r#"{"user_id": "alice"}"#))
            .expect("request");
        if let Some(peer) = peer {
            let addr: SocketAddr = peer.parse().expect("address");
            req.extensions_mut().insert(ConnectInfo(addr));
        }
        dev_router().oneshot(req).await.expect("answer").status()
    }

    #[test]
    fn the_openapi_document_names_every_route_and_schema() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/api/publish",
            "/api/publish/batch",
            "/api/disconnect",
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/dev/token",
            "/api/presence/users/{user_id}",
            "/api/presence/channels/{channel}",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        let publish = &doc["components"]["schemas"]["PublishRequest"];
        assert_eq!(publish["required"], serde_json::json!(["type", "data"]));
        for field in ["user_id", "channel", "idempotency_key"] {
            assert!(publish["properties"][field].is_object(), "{field} missing");
        }
        assert_eq!(
            doc["paths"]["/api/publish"]["post"]["security"][0]["api_key"],
            serde_json::json!([])
        );
    }

    #[tokio::test]
    async fn the_dev_login_answers_loopback_clients_only() {
        assert_eq!(dev_login_from(Some("127.0.0.1:5000")).await, StatusCode::OK);
        assert_eq!(dev_login_from(Some("[::1]:5000")).await, StatusCode::OK);
        assert_eq!(
            dev_login_from(Some("192.0.2.10:5000")).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(dev_login_from(None).await, StatusCode::FORBIDDEN);
    }

    mod fuzz {
        //! Publish bodies from outside: random bytes, bad UTF-8, deep JSON, huge numbers.

        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_bytes_are_a_request_or_a_400(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Err(e) = parse_publish(&body) {
                    prop_assert!(matches!(e, ApiError::BadRequest(_)));
                }
            }

            #[test]
            fn deep_or_numeric_data_never_panics(
                depth in 0usize..400,
                number in "-?[0-9]{1,500}(\\.[0-9]{1,50})?(e[+-]?[0-9]{1,6})?",
                user in "\\PC{0,40}",
            ) {
                let data = format!("{}{number}{}", "{\"a\":".repeat(depth), "}".repeat(depth));
                let body = format!(
                    r#"{{"user_id":{},"type":"t","data":{data}}}"#,
                    serde_json::to_string(&user).unwrap_or_default()
                );
                if let Ok(req) = parse_publish(body.as_bytes()) {
                    prop_assert!(crate::envelope::check_user_id(&req.user).is_ok());
                    let object = req.data.get().starts_with('{');
                    prop_assert!(object, "data must be an object");
                }
            }
        }
    }
}
