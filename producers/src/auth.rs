//! The user behind a REST request: an HS256 JWT (the hub's own secret) in
//! `Authorization: Bearer`, its `sub` the user. The body never names the user. Each service
//! has its own audience: a token must carry the service's `aud` (`orders`, `moderation`), so a
//! token minted for the hub (or another service) is refused.
//!
//! The other way round, a service that knows who may follow a channel issues the hub tokens
//! for it ([`ChannelTokens`]): the order service knows an order's owner, so it alone grants
//! `order:<id>`.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

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

/// Issues hub tokens that grant one channel; cheap to clone.
#[derive(Clone)]
pub struct ChannelTokens {
    shared: Arc<ChannelTokensInner>,
}

struct ChannelTokensInner {
    key: EncodingKey,
    audience: Option<String>,
    ttl: std::time::Duration,
}

/// The claims of a channel token, as the hub reads them (contract §8).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelClaims {
    /// The user: the hub accepts a WebSocket `subscribe` only from a connection of the same one.
    pub sub: String,
    /// The channel a WebSocket `subscribe` may join with this token.
    pub channel: String,
    /// The same channel, so the token also opens an SSE stream of it (with the personal one).
    pub channels: Vec<String>,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// The hub's audience, when it checks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl ChannelTokens {
    /// Signs with the HS256 `secret` shared with the hub; tokens live `ttl` and carry `aud`
    /// `audience` when the hub wants one (`HUB_JWT_AUDIENCE`).
    pub fn hs256(secret: &str, audience: Option<String>, ttl: std::time::Duration) -> Self {
        ChannelTokens {
            shared: Arc::new(ChannelTokensInner {
                key: EncodingKey::from_secret(secret.as_bytes()),
                audience,
                ttl,
            }),
        }
    }

    /// A token of `user` for `channel`, and its expiry (unix seconds).
    pub fn issue(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<(String, u64), jsonwebtoken::errors::Error> {
        let iat = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let exp = iat + self.shared.ttl.as_secs();
        let claims = ChannelClaims {
            sub: user.to_owned(),
            channel: channel.to_owned(),
            channels: vec![channel.to_owned()],
            iat,
            exp,
            aud: self.shared.audience.clone(),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.shared.key)?;
        Ok((token, exp))
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
    fn a_channel_token_grants_its_channel_to_its_user_for_the_hub() {
        let issuer = ChannelTokens::hs256(
            SECRET,
            Some("hub".into()),
            std::time::Duration::from_secs(600),
        );
        let (token, exp) = issuer.issue("alice", "order:o-1").expect("signs");
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&["hub"]);
        let claims = decode::<ChannelClaims>(
            &token,
            &DecodingKey::from_secret(SECRET.as_bytes()),
            &validation,
        )
        .expect("the hub's key verifies it")
        .claims;
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.channel, "order:o-1");
        assert_eq!(claims.channels, ["order:o-1"]);
        assert_eq!((claims.exp, claims.exp - claims.iat), (exp, 600));
        // Not a token for the order API itself.
        assert!(Verifier::hs256(SECRET, "orders").verify(&token).is_err());
        // Without an audience the claim is absent.
        let (token, _) = ChannelTokens::hs256(SECRET, None, std::time::Duration::from_secs(60))
            .issue("bob", "order:o-2")
            .expect("signs");
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_aud = false;
        let claims = decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(SECRET.as_bytes()),
            &validation,
        )
        .expect("verifies")
        .claims;
        assert!(claims.get("aud").is_none(), "{claims}");
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
