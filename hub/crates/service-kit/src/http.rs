//! The error every HTTP API of the workspace answers with: a status and `{"error": "..."}`,
//! never an internal detail (those are logged).

use std::fmt;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Largest request body the APIs accept (their messages name it).
pub const BODY_LIMIT: usize = 64 * 1024;

/// `{"error": "..."}`: why a request was refused (never echoes a secret or an internal error).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A reason meant for people, e.g. `items[0].quantity: must be 1..=1000`.
    #[schema(example = "wrong audience")]
    pub error: String,
}

/// Stands for "no internal error type": an API whose failures all have a text of their own.
#[derive(Debug)]
pub enum NoInternal {}

impl fmt::Display for NoInternal {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

/// An API error. `E` is the internal failure an API converts with `?` (the services: their
/// database error), logged and answered as 503 without its text.
#[derive(Debug, thiserror::Error)]
pub enum ApiError<E: fmt::Display = NoInternal> {
    /// 400 with the reason.
    #[error("{0}")]
    BadRequest(String),
    /// 401 with the reason, and `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403 with the reason.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404 with what was not found.
    #[error("{0}")]
    NotFound(&'static str),
    /// 408: the body did not arrive in time.
    #[error("request body not received within the time allowed")]
    BodyTimeout,
    /// 408: the request was not answered in time.
    #[error("request not completed within the time allowed")]
    RequestTimeout,
    /// 413: the body is larger than [`BODY_LIMIT`].
    #[error("body larger than 64 KiB")]
    TooLarge,
    /// 413 with the limit that was passed (a batch of too many items).
    #[error("{0}")]
    TooMany(String),
    /// 415.
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// 429 with `Retry-After` (seconds).
    #[error("too many {what}; retry in {retry_after} s")]
    TooManyRequests {
        /// What was limited (`orders`, `reports`).
        what: &'static str,
        /// Seconds until one more is allowed.
        retry_after: u64,
    },
    /// 503 with the reason (e.g. "backplane unavailable, retry").
    #[error("{0}")]
    Unavailable(String),
    /// 503: an internal failure, logged; the answer says only "service unavailable".
    #[error("service unavailable")]
    Internal(E),
}

impl<E: fmt::Display> From<E> for ApiError<E> {
    fn from(e: E) -> Self {
        ApiError::Internal(e)
    }
}

impl<E: fmt::Display> ApiError<E> {
    /// The error for a JSON body that could not be read: too slow (408), too large (413) or
    /// not the expected JSON (400 naming what is wrong).
    pub fn from_json_rejection(e: JsonRejection) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            // A body cut short by the body timeout is the client's slowness, not bad JSON.
            if err.is::<tower_http::timeout::TimeoutError>() {
                return ApiError::BodyTimeout;
            }
            source = err.source();
        }
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::TooLarge;
        }
        ApiError::BadRequest(e.body_text())
    }

    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BodyTimeout | ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge | ApiError::TooMany(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Internal(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl<E: fmt::Display> IntoResponse for ApiError<E> {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = %e, "request failed");
        }
        let status = self.status();
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ => {}
        }
        response
    }
}

/// Adds to `doc` a bearer security scheme called `name`: `format` (`JWT`) when the token has
/// one, and what it must be in `description`.
pub fn add_bearer_scheme(
    doc: &mut utoipa::openapi::OpenApi,
    name: &str,
    format: Option<&str>,
    description: String,
) {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    let mut scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .description(Some(description));
    if let Some(format) = format {
        scheme = scheme.bearer_format(format);
    }
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(name, SecurityScheme::Http(scheme.build()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_headers_follow_the_variant() {
        let r = ApiError::<NoInternal>::Unauthorized("wrong API key").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let r = ApiError::<NoInternal>::TooManyRequests {
            what: "orders",
            retry_after: 3,
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        let r = ApiError::<String>::from("db down".to_owned());
        assert_eq!(r.to_string(), "service unavailable");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
