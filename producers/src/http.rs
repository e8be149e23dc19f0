//! What every service's HTTP listener shares: the error type mapped to JSON responses, health,
//! readiness and metrics routes, CORS for the demo page, a body limit.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;

use crate::metrics::Metrics;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// An error answered to a client as `{"error": "..."}`; internals are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 with the reason.
    #[error("{0}")]
    BadRequest(String),
    /// 401 with the reason.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404.
    #[error("{0}")]
    NotFound(&'static str),
    /// 503: the database did not answer.
    #[error("service unavailable")]
    Unavailable(#[source] sqlx::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Unavailable(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::BadRequest(e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(e) => {
                tracing::error!(error = %e, "database error");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({"error": self.to_string()}))).into_response()
    }
}

/// `/healthz`, `/readyz` (the database answers and the process is not stopping) and `/metrics`.
pub fn ops_routes(pool: sqlx::PgPool, metrics: Metrics, stopping: CancellationToken) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let (pool, stopping) = (pool.clone(), stopping.clone());
                async move {
                    if stopping.is_cancelled() {
                        return (StatusCode::SERVICE_UNAVAILABLE, "stopping");
                    }
                    let ping = sqlx::query("SELECT 1").execute(&pool);
                    match tokio::time::timeout(Duration::from_secs(2), ping).await {
                        Ok(Ok(_)) => (StatusCode::OK, "ready"),
                        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
}

/// The API's middleware: a body limit, and CORS for the listed browser origins.
pub fn with_api_layers(router: Router, allowed_origins: &[String]) -> Router {
    let router = router.layer(RequestBodyLimitLayer::new(BODY_LIMIT));
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
            ])
            .expose_headers([HeaderName::from_static("idempotent-replayed")])
            .max_age(Duration::from_secs(600)),
    )
}

/// A JSON body, or a 400 naming what is wrong with it.
pub fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    Ok(body?.0)
}
