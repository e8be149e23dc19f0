//! The user behind a REST request: an HS256 JWT (the hub's own secret) in
//! `Authorization: Bearer`, its `sub` the user. The body never names the user. Each service
//! has its own audience: a token must carry the service's `aud` (`orders`, `moderation`), so a
//! token minted for the hub (or another service) is refused.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;

use crate::http::ApiError;

/// Verifies tokens; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    shared: Arc<(DecodingKey, Validation)>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret` for `audience`; `exp`, `sub` and `aud`
    /// are required.
    pub fn hs256(secret: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.set_audience(&[audience]);
        validation.leeway = 5;
        Verifier {
            shared: Arc::new((DecodingKey::from_secret(secret.as_bytes()), validation)),
        }
    }

    /// The user id of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        let (key, validation) = &*self.shared;
        let data = decode::<Claims>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let reason = match e.kind() {
                ErrorKind::ExpiredSignature => "token expired",
                ErrorKind::ImmatureSignature => "token not yet valid",
                ErrorKind::InvalidSignature => "bad token signature",
                ErrorKind::InvalidAlgorithm => "token algorithm not allowed",
                ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => {
                    "token audience (aud) is missing"
                }
                ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim (exp, sub)",
                ErrorKind::InvalidAudience => "wrong audience",
                _ => "malformed token",
            };
            ApiError::Unauthorized(reason)
        })?;
        if proto::user_id::check(&data.claims.sub).is_err() {
            return Err(ApiError::Unauthorized(
                "token subject is not a valid user id",
            ));
        }
        Ok(data.claims.sub)
    }
}

/// The authenticated user of a request.
pub struct User(pub String);

impl<S> FromRequestParts<S> for User
where
    S: Send + Sync,
    Verifier: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header =
            parts
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .ok_or(ApiError::Unauthorized(
                    "missing Authorization: Bearer token",
                ))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized(
                "Authorization must be: Bearer <token>",
            ))?;
        Verifier::from_ref(state).verify(token).map(User)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn token(alg: Algorithm, secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encodes")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    #[test]
    fn accepts_a_valid_token_and_names_what_is_wrong_otherwise() {
        let v = Verifier::hs256(SECRET, "orders");
        let good = token(
            Algorithm::HS256,
            SECRET,
            json!({"sub": "alice", "exp": now() + 60, "aud": "orders"}),
        );
        assert_eq!(v.verify(&good).expect("valid"), "alice");
        let listed = token(
            Algorithm::HS256,
            SECRET,
            json!({"sub": "alice", "exp": now() + 60, "aud": ["hub", "orders"]}),
        );
        assert_eq!(v.verify(&listed).expect("valid"), "alice");
        let cases = [
            (
                token(
                    Algorithm::HS256,
                    SECRET,
                    json!({"sub": "a", "exp": now() - 60, "aud": "orders"}),
                ),
                "token expired",
            ),
            (
                token(
                    Algorithm::HS256,
                    "another secret of thirty-two bytes",
                    json!({"sub": "a", "exp": now() + 60, "aud": "orders"}),
                ),
                "bad token signature",
            ),
            (
                token(
                    Algorithm::HS512,
                    SECRET,
                    json!({"sub": "a", "exp": now() + 60, "aud": "orders"}),
                ),
                "token algorithm not allowed",
            ),
            (
                token(
                    Algorithm::HS256,
                    SECRET,
                    json!({"sub": "a", "aud": "orders"}),
                ),
                "token lacks a required claim (exp, sub)",
            ),
            (
                token(
                    Algorithm::HS256,
                    SECRET,
                    json!({"sub": "", "exp": now() + 60, "aud": "orders"}),
                ),
                "token subject is not a valid user id",
            ),
            ("garbage".to_owned(), "malformed token"),
            (
                token(
                    Algorithm::HS256,
                    SECRET,
                    json!({"sub": "a", "exp": now() + 60, "aud": "hub"}),
                ),
                "wrong audience",
            ),
            (
                token(
                    Algorithm::HS256,
                    SECRET,
                    json!({"sub": "a", "exp": now() + 60}),
                ),
                "token audience (aud) is missing",
            ),
        ];
        for (t, reason) in cases {
            match v.verify(&t) {
                Err(ApiError::Unauthorized(r)) => assert_eq!(r, reason),
                other => panic!("{reason}: got {:?}", other.map_err(|e| e.to_string())),
            }
        }
    }
}
