//! JWT verification at the handshake, key sources, and the origin policy.
//!
//! The accepted algorithm is fixed by the configured key, never taken from the token: a secret
//! means HS256 only; a PEM public key means that key's own algorithm; a JWKS means the
//! algorithm of the key the `kid` names. `exp` is required and must be a number, `nbf`, `iss`
//! and `aud` are checked, and the leeway is bounded by configuration (at most 60 s).

mod jwks;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE, ORIGIN};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
pub use jwks::Jwks;

/// Query parameter carrying a token.
pub const TOKEN_PARAM: &str = "token";
/// Cookie carrying a token (accepted only from an allowed Origin).
pub const TOKEN_COOKIE: &str = "hub_token";

/// Why a token was refused; `Display` is the reason sent to the client (never the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the header, query or an acceptable cookie.
    #[error("missing token")]
    Missing,
    /// Not three base64url parts with JSON header and claims.
    #[error("malformed token")]
    Malformed,
    /// `alg` is `none`, unknown, or not the configured key's algorithm.
    #[error("algorithm not allowed")]
    Algorithm,
    /// Signature does not verify with the configured key.
    #[error("invalid signature")]
    Signature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` does not match.
    #[error("wrong issuer")]
    Issuer,
    /// `aud` does not match.
    #[error("wrong audience")]
    Audience,
    /// A required claim is absent.
    #[error("missing claim: {0}")]
    MissingClaim(&'static str),
    /// A claim has the wrong type or an unusable value.
    #[error("invalid claim: {0}")]
    Claim(&'static str),
    /// `exp` lies further ahead than the configured maximum token lifetime.
    #[error("token lifetime too long: exp is more than the allowed maximum ahead")]
    TooLong,
    /// The user revoked tokens issued before a time, and this one is older (or has no `iat`).
    #[error("token revoked")]
    Revoked,
    /// The JWKS has no key with the token's `kid`.
    #[error("unknown key id")]
    UnknownKey,
    /// The key source cannot be reached and holds no usable key.
    #[error("token keys unavailable")]
    KeysUnavailable,
}

/// The verified identity of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub`).
    pub user: String,
    /// Expiry (`exp`, seconds since the Unix epoch).
    pub exp: u64,
    /// Issued at (`iat`), when the token has it.
    pub iat: Option<u64>,
    /// Channels the token subscribes its connection to (`channels`), each named once.
    pub channels: Vec<String>,
    /// The channel a WebSocket `subscribe` token grants (`channel`).
    pub channel: Option<String>,
}

/// Claims the hub signs (`hub token`, the dev login, tests).
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Channels the connection is subscribed to at the handshake.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// The channel a WebSocket `subscribe` message may join with this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

enum Keys {
    Static { key: DecodingKey, alg: Algorithm },
    Jwks(Jwks),
}

/// Verifies tokens against the configured key source; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<VerifierInner>,
}

struct VerifierInner {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    max_lifetime: Duration,
}

/// A key source that could not be loaded at start.
#[derive(Debug, thiserror::Error)]
#[error("config: {setting}: {problem}")]
pub struct KeyError {
    setting: &'static str,
    problem: String,
}

impl Verifier {
    /// Builds the verifier from settings. `dev_secret` is used when no key is configured.
    pub fn from_settings(s: &Settings, dev_secret: Option<&str>) -> Result<Self, KeyError> {
        let keys = if let Some(secret) = s.jwt_secret.as_deref().or(dev_secret) {
            Keys::Static {
                key: DecodingKey::from_secret(secret.as_bytes()),
                alg: Algorithm::HS256,
            }
        } else if let Some(path) = &s.jwt_public_key_file {
            let pem = std::fs::read(path).map_err(|e| KeyError {
                setting: "HUB_JWT_PUBLIC_KEY_FILE",
                problem: format!("cannot read {}: {e}", path.display()),
            })?;
            let (key, alg) = public_key_from_pem(&pem).ok_or(KeyError {
                setting: "HUB_JWT_PUBLIC_KEY_FILE",
                problem: "not a PEM RSA, EC P-256 or Ed25519 public key".to_owned(),
            })?;
            Keys::Static { key, alg }
        } else if let Some(url) = &s.jwt_jwks_url {
            Keys::Jwks(
                Jwks::new(
                    url.clone(),
                    s.jwt_issuer.clone().unwrap_or_default(),
                    s.jwt_jwks_min_refresh,
                )
                .map_err(|problem| KeyError {
                    setting: "HUB_JWT_JWKS_URL",
                    problem,
                })?,
            )
        } else {
            return Err(KeyError {
                setting: "HUB_JWT_SECRET",
                problem: "no token key configured: set HUB_JWT_SECRET, HUB_JWT_PUBLIC_KEY_FILE or HUB_JWT_JWKS_URL (or run with --dev)".to_owned(),
            });
        };
        Ok(Verifier {
            inner: Arc::new(VerifierInner {
                keys,
                issuer: s.jwt_issuer.clone(),
                audience: s.jwt_audience.clone(),
                leeway: s.jwt_leeway,
                max_lifetime: s.jwt_max_lifetime,
            }),
        })
    }

    /// The JWKS source, when tokens are verified against one.
    pub fn jwks(&self) -> Option<&Jwks> {
        match &self.inner.keys {
            Keys::Jwks(j) => Some(j),
            Keys::Static { .. } => None,
        }
    }

    /// Configured clock leeway.
    pub fn leeway(&self) -> Duration {
        self.inner.leeway
    }

    /// Verifies a token and returns who it names.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                AuthError::Algorithm
            }
            // A readable header whose `alg` the library does not know (`none`, ...).
            _ if raw_header_alg(token).is_some() => AuthError::Algorithm,
            _ => AuthError::Malformed,
        })?;
        let (key, alg) = match &self.inner.keys {
            Keys::Static { key, alg } => (key.clone(), *alg),
            Keys::Jwks(jwks) => {
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                jwks.key(kid).await?
            }
        };
        if header.alg != alg {
            return Err(AuthError::Algorithm);
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.inner.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // A configured issuer or audience must be present, not merely match when present.
        let mut required = vec!["exp", "sub"];
        match &self.inner.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.inner.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(map_error)?;
        let identity = identity_from_claims(&data.claims)?;
        let now = crate::envelope::now_micros() / 1_000_000;
        if identity.exp.saturating_sub(now) > self.inner.max_lifetime.as_secs() {
            return Err(AuthError::TooLong);
        }
        Ok(identity)
    }
}

/// Reads the claims the hub uses, naming the claim that is missing or mistyped.
fn identity_from_claims(
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<Identity, AuthError> {
    let seconds = |name: &'static str| -> Result<Option<u64>, AuthError> {
        match claims.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(AuthError::Claim(match name {
                "exp" => "exp must be a whole number of seconds since the epoch",
                "iat" => "iat must be a whole number of seconds since the epoch",
                _ => "nbf must be a whole number of seconds since the epoch",
            })),
        }
    };
    let exp = seconds("exp")?.ok_or(AuthError::MissingClaim("exp"))?;
    seconds("nbf")?;
    let iat = seconds("iat")?;
    let sub = match claims.get("sub") {
        None | Some(serde_json::Value::Null) => return Err(AuthError::MissingClaim("sub")),
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(AuthError::Claim("sub must be a string")),
    };
    crate::envelope::check_user_id(sub).map_err(AuthError::Claim)?;
    const CHANNELS: &str =
        "channels must be a list of channel names (1-128 of A-Z a-z 0-9 _ . : @ / -)";
    let mut channels: Vec<String> = Vec::new();
    match claims.get("channels") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(list)) => {
            for v in list {
                let name = v.as_str().ok_or(AuthError::Claim(CHANNELS))?;
                crate::envelope::check_channel(name).map_err(|_| AuthError::Claim(CHANNELS))?;
                if !channels.iter().any(|c| c == name) {
                    channels.push(name.to_owned());
                }
            }
        }
        Some(_) => return Err(AuthError::Claim(CHANNELS)),
    }
    let channel = match claims.get("channel") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(name)) if crate::envelope::check_channel(name).is_ok() => {
            Some(name.clone())
        }
        Some(_) => {
            return Err(AuthError::Claim(
                "channel must be a channel name (1-128 of A-Z a-z 0-9 _ . : @ / -)",
            ));
        }
    };
    Ok(Identity {
        user: sub.clone(),
        exp,
        iat,
        channels,
        channel,
    })
}

/// The `alg` of a header that is valid base64url JSON, whatever its value.
fn raw_header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let first = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(first)
        .ok()?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    header.get("alg")?.as_str().map(str::to_owned)
}

fn map_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => AuthError::Algorithm,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(match c.as_str() {
            "exp" => "exp",
            "sub" => "sub",
            "iss" => "iss",
            "aud" => "aud",
            "nbf" => "nbf",
            _ => "a required claim",
        }),
        ErrorKind::InvalidClaimFormat(c) => AuthError::Claim(match c.as_str() {
            "exp" => "exp must be a whole number of seconds since the epoch",
            "nbf" => "nbf must be a whole number of seconds since the epoch",
            _ => "a claim has the wrong type",
        }),
        ErrorKind::InvalidSubject => AuthError::Claim("sub"),
        // Claims that are not a JSON object.
        ErrorKind::Json(_) => AuthError::Malformed,
        _ => AuthError::Malformed,
    }
}

/// Reads a PEM public key and the one algorithm it may verify.
fn public_key_from_pem(pem: &[u8]) -> Option<(DecodingKey, Algorithm)> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Some((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Some((k, Algorithm::ES256));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Some((k, Algorithm::EdDSA));
    }
    None
}

/// Signs an HS256 token for `sub` valid for `ttl` (for `hub token`, `--dev` and tests).
pub fn sign_hs256(
    secret: &str,
    sub: &str,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    sign_hs256_for(secret, sub, ttl, None, None)
}

/// As [`sign_hs256`], with an audience and an issuer when given.
pub fn sign_hs256_for(
    secret: &str,
    sub: &str,
    ttl: Duration,
    aud: Option<&str>,
    iss: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    sign_hs256_claims(secret, &Claims::new(sub, ttl, aud, iss))
}

impl Claims {
    /// Claims of `sub` issued now for `ttl`, with an audience and an issuer when given, and
    /// no channels.
    pub fn new(sub: &str, ttl: Duration, aud: Option<&str>, iss: Option<&str>) -> Self {
        let now = crate::envelope::now_micros() / 1_000_000;
        Claims {
            sub: sub.to_owned(),
            exp: now.saturating_add(ttl.as_secs()),
            nbf: None,
            iat: Some(now),
            aud: aud.map(str::to_owned),
            iss: iss.map(str::to_owned),
            channels: Vec::new(),
            channel: None,
        }
    }
}

/// Signs any [`Claims`] with HS256.
pub fn sign_hs256_claims(
    secret: &str,
    claims: &Claims,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// The request's `Origin` is not in a non-empty allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("origin not allowed")]
pub struct ForeignOrigin;

/// The origin allow-list.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    allowed: Arc<[String]>,
}

/// Where the request's `Origin` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin` header (not a browser, or a same-origin request that sends none).
    Absent,
    /// Listed in the allow-list.
    Allowed,
    /// Present and the list is empty: accepted, but not trusted for the cookie.
    Unlisted,
}

impl OriginPolicy {
    /// A policy allowing exactly these origins (empty: any origin, cookie never).
    pub fn new(allowed: &[String]) -> Self {
        OriginPolicy {
            allowed: allowed.iter().cloned().collect(),
        }
    }

    /// Checks the `Origin` header; `Err` means 403.
    pub fn check(&self, headers: &HeaderMap) -> Result<OriginCheck, ForeignOrigin> {
        let Some(origin) = headers.get(ORIGIN) else {
            return Ok(OriginCheck::Absent);
        };
        let listed = origin
            .to_str()
            .is_ok_and(|o| self.allowed.iter().any(|a| a == o));
        match (listed, self.allowed.is_empty()) {
            (true, _) => Ok(OriginCheck::Allowed),
            (false, true) => Ok(OriginCheck::Unlisted),
            (false, false) => Err(ForeignOrigin),
        }
    }
}

/// Finds the token: `Authorization: Bearer`, then the `token` query parameter, then the
/// `hub_token` cookie when the origin is allowed.
pub fn extract_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    origin: OriginCheck,
) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let mut parts = value.splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
            && !token.trim().is_empty()
        {
            return Some(token.trim().into());
        }
    }
    if let Some(token) = query_param(query, TOKEN_PARAM) {
        return Some(token);
    }
    if origin == OriginCheck::Allowed {
        for value in headers.get_all(COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            for pair in value.split(';') {
                if let Some((name, token)) = pair.trim().split_once('=')
                    && name == TOKEN_COOKIE
                    && !token.is_empty()
                {
                    return Some(token.into());
                }
            }
        }
    }
    None
}

/// Reads one query parameter (percent-decoded); an empty value counts as absent.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn header_beats_query_beats_cookie() {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("a=b; hub_token=C"));
        assert_eq!(
            extract_token(&h, Some("token=Q"), OriginCheck::Allowed).as_deref(),
            Some("Q")
        );
        assert_eq!(
            extract_token(&h, None, OriginCheck::Allowed).as_deref(),
            Some("C")
        );
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer H"));
        assert_eq!(
            extract_token(&h, Some("token=Q"), OriginCheck::Allowed).as_deref(),
            Some("H")
        );
    }

    #[test]
    fn cookie_only_from_an_allowed_origin() {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("hub_token=C"));
        for o in [OriginCheck::Absent, OriginCheck::Unlisted] {
            assert_eq!(extract_token(&h, None, o), None);
        }
    }

    #[test]
    fn origin_policy() {
        let p = OriginPolicy::new(&["https://app.example".to_owned()]);
        let mut h = HeaderMap::new();
        assert_eq!(p.check(&h), Ok(OriginCheck::Absent));
        h.insert(ORIGIN, HeaderValue::from_static("https://app.example"));
        assert_eq!(p.check(&h), Ok(OriginCheck::Allowed));
        h.insert(ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert_eq!(p.check(&h), Err(ForeignOrigin));
        assert_eq!(OriginPolicy::new(&[]).check(&h), Ok(OriginCheck::Unlisted));
    }

    #[test]
    fn query_params_are_percent_decoded() {
        assert_eq!(
            query_param(Some("since=abc-1&last_event_id=a%2Db%20c"), "last_event_id").as_deref(),
            Some("a-b c")
        );
        assert_eq!(query_param(Some("x=%zz"), "x").as_deref(), Some("%zz"));
        assert_eq!(query_param(Some("x=%4"), "x").as_deref(), Some("%4"));
        assert_eq!(query_param(Some("token="), "token"), None);
    }

    mod fuzz {
        //! Tokens and claims from outside: any input is refused with a reason, never a panic.

        use proptest::prelude::*;

        use super::super::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(|f| serde_json::json!(f)),
                "\\PC{0,20}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_claims_object_gives_an_identity_or_a_reason(
                sub in prop_oneof![json_value(), "\\PC{0,20}".prop_map(serde_json::Value::from)],
                exp in json_value(),
                iat in json_value(),
                extra in json_value(),
            ) {
                let mut claims = serde_json::Map::new();
                claims.insert("sub".to_owned(), sub);
                claims.insert("exp".to_owned(), exp);
                claims.insert("iat".to_owned(), iat);
                claims.insert("x".to_owned(), extra);
                match identity_from_claims(&claims) {
                    Ok(id) => prop_assert!(crate::envelope::check_user_id(&id.user).is_ok()),
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }

            #[test]
            fn signed_tokens_with_any_claims_never_panic(claims in json_value()) {
                let secret = "0123456789abcdef0123456789abcdef";
                let settings = crate::config::Settings::load_from_pairs([("HUB_JWT_SECRET", secret)])
                    .expect("settings");
                let verifier = Verifier::from_settings(&settings, None).expect("verifier");
                let token = jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &claims,
                    &EncodingKey::from_secret(secret.as_bytes()),
                );
                if let Ok(token) = token {
                    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                    let _ = runtime.block_on(verifier.verify(&token));
                }
            }

            #[test]
            fn any_token_text_is_refused_without_panic(token in "[A-Za-z0-9_.=-]{0,300}") {
                let settings = crate::config::Settings::load_from_pairs([
                    ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ])
                .expect("settings");
                let verifier = Verifier::from_settings(&settings, None).expect("verifier");
                let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                prop_assert!(runtime.block_on(verifier.verify(&token)).is_err());
            }
        }
    }
}
