//! What the OpenAPI 3.1 documents of the order and moderation services share: the error body,
//! the bearer JWT scheme (naming the audience the service wants), the operational routes, and
//! the route that serves a document at `GET /api/openapi.json` (public, like the probes).

use axum::Router;
use axum::http::header;
use axum::routing::get;
use utoipa::openapi::OpenApi;

pub use service_kit::http::ErrorBody;

/// A service's document, completed: the operational routes (`/healthz`, `/readyz`,
/// `/metrics`) and the `bearer` scheme of its API, whose tokens must carry `audience`.
pub fn finish(mut doc: OpenApi, audience: &str) -> String {
    use utoipa::OpenApi as _;
    doc.merge(crate::http::OpsDoc::openapi());
    service_kit::http::add_bearer_scheme(
        &mut doc,
        "bearer",
        Some("JWT"),
        format!(
            "An HS256 JWT signed with the hub's secret (`JWT_SECRET`), with `exp`, `sub` (the \
             user) and `aud`, which must be `{audience}` (`JWT_AUDIENCE`); a token for the hub \
             or another service is refused with 401."
        ),
    );
    doc.to_json().unwrap_or_default()
}

/// `GET /api/openapi.json`, answering `json` (made once, at start).
pub fn route(json: String) -> Router {
    let json = axum::body::Bytes::from(json);
    Router::new().route(
        "/api/openapi.json",
        get(move || {
            let json = json.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], json) }
        }),
    )
}
