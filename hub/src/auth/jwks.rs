//! Keys from a JWKS endpoint, cached by (issuer, kid).
//!
//! The URL comes from configuration only, never from a token (`jku`/`x5u` are ignored). A
//! token naming an unknown `kid` triggers a refresh, at most one per `min_refresh` (a token
//! stream with random kids cannot make the hub hammer the endpoint); concurrent misses share
//! one fetch. A periodic refresh drops keys the issuer removed.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::RwLock;

use super::AuthError;

type KeyMap = HashMap<(String, String), (DecodingKey, Algorithm)>;

/// Largest JWKS document read; an issuer's key set is a few KiB.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A cached JWKS; cheap to clone.
#[derive(Clone)]
pub struct Jwks {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    issuer: String,
    client: reqwest::Client,
    /// Read on every handshake, written only by a refresh; never held across `.await`.
    keys: RwLock<KeyMap>,
    /// Serialises refreshes so concurrent misses share one fetch.
    refreshing: tokio::sync::Mutex<()>,
    limiter: DefaultDirectRateLimiter,
}

impl Jwks {
    /// A cache for `url` whose keys belong to `issuer` (empty when no issuer is configured).
    /// The URL must be `https://` (plain `http://` only to a loopback host, for tests).
    pub fn new(url: String, issuer: String, min_refresh: Duration) -> Result<Self, String> {
        check_url(&url)?;
        let period = min_refresh.max(Duration::from_millis(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!url.starts_with("http://"))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Jwks {
            inner: Arc::new(Inner {
                url,
                issuer,
                client,
                keys: RwLock::new(HashMap::new()),
                refreshing: tokio::sync::Mutex::new(()),
                limiter: RateLimiter::direct(quota),
            }),
        })
    }

    /// The key and algorithm for `kid`, refreshing once (rate-limited) when it is unknown.
    pub async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), AuthError> {
        if let Some(found) = self.cached(kid) {
            return Ok(found);
        }
        let _guard = self.inner.refreshing.lock().await;
        // Another handshake may have refreshed while this one waited.
        if let Some(found) = self.cached(kid) {
            return Ok(found);
        }
        if self.inner.limiter.check().is_err() {
            return Err(AuthError::UnknownKey);
        }
        match Box::pin(self.fetch()).await {
            Ok(keys) => *self.inner.keys.write() = keys,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed");
                if self.inner.keys.read().is_empty() {
                    return Err(AuthError::KeysUnavailable);
                }
            }
        }
        self.cached(kid).ok_or(AuthError::UnknownKey)
    }

    fn cached(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        self.inner
            .keys
            .read()
            .get(&(self.inner.issuer.clone(), kid.to_owned()))
            .cloned()
    }

    /// Fetches and replaces the key set now (at start and periodically).
    pub async fn refresh(&self) -> Result<usize, String> {
        let _guard = self.inner.refreshing.lock().await;
        let keys = self.fetch().await?;
        let n = keys.len();
        *self.inner.keys.write() = keys;
        Ok(n)
    }

    /// Refreshes every `every` in the background while the returned task runs.
    pub fn spawn_refresher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match this.refresh().await {
                    Ok(n) => tracing::debug!(keys = n, "JWKS refreshed"),
                    Err(e) => tracing::warn!(error = %e, "JWKS refresh failed"),
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    async fn fetch(&self) -> Result<KeyMap, String> {
        let response = self
            .inner
            .client
            .get(&self.inner.url)
            .send()
            .await
            .map_err(|e| format!("fetch: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("fetch: HTTP {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("read: larger than {MAX_JWKS_BYTES} bytes"));
        }
        // Read chunk by chunk so a server that lies about (or omits) the length cannot make
        // the hub buffer more than the cap.
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("read: {e}"))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("read: larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_set(&body, &self.inner.issuer)
    }
}

/// `https://`, or `http://` to a loopback host only.
fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err("must be an https:// URL".to_owned());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err("must be an https:// URL (http:// is accepted only for a loopback host)".to_owned())
    }
}

/// Parses a JWKS document into usable verification keys; keys without a `kid`, with an
/// unsupported type, or meant for encryption are skipped.
fn parse_set(body: &[u8], issuer: &str) -> Result<KeyMap, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("parse: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(&jwk.common.public_key_use, Some(u) if *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
        {
            continue;
        }
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
            (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
            (Some(KeyAlgorithm::EdDSA), _) => Algorithm::EdDSA,
            (Some(_), _) => continue,
            (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            (None, AlgorithmParameters::OctetKeyPair(p)) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.insert((issuer.to_owned(), kid), (key, alg));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rsa_and_skips_unusable_keys() {
        let doc = br#"{"keys":[
          {"kty":"RSA","kid":"k1","use":"sig","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
          {"kty":"RSA","use":"sig","n":"AQAB","e":"AQAB"},
          {"kty":"oct","kid":"k3","k":"c2VjcmV0"}
        ]}"#;
        let keys = parse_set(doc, "iss").unwrap();
        assert_eq!(keys.len(), 1);
        let (_, alg) = keys.get(&("iss".to_owned(), "k1".to_owned())).unwrap();
        assert_eq!(*alg, Algorithm::RS256);
    }

    #[test]
    fn only_https_or_loopback_http_urls_are_accepted() {
        for ok in [
            "https://issuer.example/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/k",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://issuer.example/jwks.json",
            "http://127.0.0.1.evil.example/k",
            "ftp://x",
            "http://10.0.0.1/k",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_set(b"not json", "").is_err());
    }
}
