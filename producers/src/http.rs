//! What every service's HTTP listener shares: the error type mapped to JSON responses, health,
//! readiness and metrics routes, CORS for the demo page, a body limit, body and request
//! timeouts, and the listener itself (with a timeout on reading a request head).

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::metrics::Metrics;

pub use service_kit::http::BODY_LIMIT;

/// An error answered to a client as `{"error": "..."}`; a database error is logged and
/// answered as 503 without its text.
pub type ApiError = service_kit::http::ApiError<sqlx::Error>;

/// What the operational routes need.
#[derive(Clone)]
struct Ops {
    pool: sqlx::PgPool,
    metrics: Metrics,
    stopping: CancellationToken,
    kafka_auth: crate::kafka::AuthFailure,
}

/// `/healthz`, `/readyz` (the database answers, Kafka has neither refused our credentials nor
/// presented a certificate we do not trust, and the process is not stopping) and `/metrics`.
pub fn ops_routes(
    pool: sqlx::PgPool,
    metrics: Metrics,
    stopping: CancellationToken,
    kafka_auth: crate::kafka::AuthFailure,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(Ops {
            pool,
            metrics,
            stopping,
            kafka_auth,
        })
}

/// The operational routes' part of each service's OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(healthz, readyz, metrics_page))]
pub struct OpsDoc;

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses(
    (status = 200, description = "Running", content_type = "text/plain", body = String),
))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers, Kafka has neither refused the credentials nor presented an
/// untrusted certificate, not stopping.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready", content_type = "text/plain", body = String),
    (status = 503, description = "Stopping, the database unreachable, or Kafka refused our credentials or is not trusted", content_type = "text/plain", body = String),
))]
async fn readyz(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping");
    }
    if let Some(refusal) = ops.kafka_auth.get() {
        return (StatusCode::SERVICE_UNAVAILABLE, refusal.summary());
    }
    let ping = sqlx::query("SELECT 1").execute(&ops.pool);
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4", body = String),
))]
async fn metrics_page(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.metrics.render(),
    )
}

/// Makes request ids: a random 64-bit value in hex, for requests that come without one.
#[derive(Clone, Copy)]
struct RequestIds;

impl tower_http::request_id::MakeRequestId for RequestIds {
    fn make_request_id<B>(
        &mut self,
        _: &axum::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        let id = format!("{:016x}", rand::random::<u64>());
        HeaderValue::from_str(&id)
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

/// Every request gets an id (`x-request-id`: the caller's, or a fresh one), which is in the
/// request's log span, so in every line logged while it is handled, and in the response. The
/// span also has a `trace_id`, which handlers that know the request's trace fill in.
pub fn with_request_ids(router: Router) -> Router {
    use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::trace::{DefaultOnFailure, DefaultOnRequest, DefaultOnResponse, TraceLayer};
    router
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            // The path only: a query string is the client's business.
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "http",
                        method = %req.method(),
                        path = %req.uri().path(),
                        request_id,
                        trace_id = tracing::field::Empty
                    )
                })
                .on_request(DefaultOnRequest::new().level(tracing::Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(tracing::Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(SetRequestIdLayer::x_request_id(RequestIds))
}

/// The API's middleware: a body limit, and CORS for the listed browser origins.
pub fn with_api_layers(router: Router, allowed_origins: &[String]) -> Router {
    // Enforced by the JSON extractor, so that a larger body is answered like any other error:
    // 413 with `{"error": ...}` (see `ApiError::from_json_rejection`).
    let router = router.layer(DefaultBodyLimit::max(BODY_LIMIT));
    let origins: Vec<HeaderValue> = allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return router;
    }
    router.layer(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("traceparent"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([
                HeaderName::from_static("idempotent-replayed"),
                HeaderName::from_static("x-request-id"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// A JSON body, or a 400 naming what is wrong with it.
pub fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(ApiError::from_json_rejection)
}

/// Every route's timeouts: the request body must keep arriving (`body`, between chunks) and the
/// answer must be ready within `request` (else 408 with a JSON error).
pub fn with_timeouts(router: Router, body: Duration, request: Duration) -> Router {
    router
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| async move {
                match tokio::time::timeout(request, next.run(req)).await {
                    Ok(response) => response,
                    Err(_) => ApiError::RequestTimeout.into_response(),
                }
            },
        ))
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets requests in progress
/// finish. A client that has not sent a whole request head within `header_timeout` is
/// disconnected (hyper's `header_read_timeout`), so idle or trickling connections cannot pile
/// up.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, usually: wait a little rather than spin.
                tracing::warn!(error = %e, "http: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http: connection ended with an error");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}
