//! JWT minting for the connections' `?token=` query parameter.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// Claims the hub expects in a connection token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user the connection belongs to.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issue time, Unix seconds.
    pub iat: u64,
    /// Audience, when the receiving service checks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Channels the connection holds from its handshake on (the hub's `channels` claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// The channel a WebSocket `subscribe` may join with this token (the `channel` claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

/// Mints HS256 tokens with one secret and lifetime.
pub struct TokenMinter {
    key: EncodingKey,
    header: Header,
    ttl: Duration,
    aud: Option<String>,
}

impl TokenMinter {
    /// Creates a minter signing with `secret` and tokens valid for `ttl`.
    pub fn new(secret: &str, ttl: Duration) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            ttl,
            aud: None,
        }
    }

    /// The same minter, putting `aud` into every token (for a hub or service that checks
    /// its audience).
    pub fn with_audience(mut self, aud: Option<String>) -> Self {
        self.aud = aud;
        self
    }

    /// Mints a token for `user`, issued now.
    pub fn mint(&self, user: &str) -> Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_secs();
        self.mint_at(user, now)
    }

    /// Mints a token for `user`, issued now, that also grants `channels`.
    pub fn mint_with_channels(&self, user: &str, channels: &[String]) -> Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_secs();
        self.sign(user, now, channels, None)
    }

    /// Mints a token for `user`, issued now, that lets a WebSocket `subscribe` to `channel`.
    pub fn mint_for_channel(&self, user: &str, channel: &str) -> Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_secs();
        self.sign(user, now, &[], Some(channel))
    }

    /// Mints a token for `user` issued at `iat` (Unix seconds).
    pub fn mint_at(&self, user: &str, iat: u64) -> Result<String> {
        self.sign(user, iat, &[], None)
    }

    fn sign(
        &self,
        user: &str,
        iat: u64,
        channels: &[String],
        channel: Option<&str>,
    ) -> Result<String> {
        let claims = Claims {
            sub: user.to_owned(),
            exp: iat.saturating_add(self.ttl.as_secs()),
            iat,
            aud: self.aud.clone(),
            channels: channels.to_vec(),
            channel: channel.map(str::to_owned),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
            .with_context(|| format!("signing token for {user}"))
    }
}

/// Name of user number `index`, e.g. `lt-17`.
pub fn user_name(prefix: &str, index: usize) -> String {
    format!("{prefix}{index}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::{DecodingKey, Validation};

    fn decode(token: &str, secret: &str) -> jsonwebtoken::errors::Result<Claims> {
        let validation = Validation::new(Algorithm::HS256);
        jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map(|data| data.claims)
    }

    #[test]
    fn minted_token_verifies_with_same_secret() -> Result<()> {
        let minter = TokenMinter::new("s3cret", Duration::from_secs(3600));
        let token = minter.mint("lt-17")?;
        let claims = decode(&token, "s3cret")?;
        assert_eq!(claims.sub, "lt-17");
        assert_eq!(claims.exp - claims.iat, 3600);
        let header = jsonwebtoken::decode_header(&token)?;
        assert_eq!(header.alg, Algorithm::HS256);
        Ok(())
    }

    #[test]
    fn channels_go_into_the_claim_only_when_there_are_some() -> Result<()> {
        let minter = TokenMinter::new("s3cret", Duration::from_secs(60));
        let names = ["load:all".to_owned(), "load:g3".to_owned()];
        let claims = decode(&minter.mint_with_channels("lt-1", &names)?, "s3cret")?;
        assert_eq!(claims.channels, names);
        // A personal-only token has no `channels` member at all.
        let token = minter.mint("lt-1")?;
        let payload = token.split('.').nth(1).context("no payload")?;
        use base64::Engine as _;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
        let claims: serde_json::Value = serde_json::from_slice(&json)?;
        assert!(claims.get("channels").is_none(), "{claims}");
        let sub = decode(&minter.mint_for_channel("lt-1", "load:g2")?, "s3cret")?;
        assert_eq!(sub.channel.as_deref(), Some("load:g2"));
        assert!(sub.channels.is_empty());
        Ok(())
    }

    #[test]
    fn token_is_rejected_with_other_secret() -> Result<()> {
        let token = TokenMinter::new("s3cret", Duration::from_secs(60)).mint("lt-1")?;
        let err = decode(&token, "other").err().map(|e| e.into_kind());
        assert!(matches!(err, Some(ErrorKind::InvalidSignature)), "{err:?}");
        Ok(())
    }

    #[test]
    fn old_token_is_expired() -> Result<()> {
        let token = TokenMinter::new("k", Duration::from_secs(60)).mint_at("lt-1", 1_000_000)?;
        let err = decode(&token, "k").err().map(|e| e.into_kind());
        assert!(matches!(err, Some(ErrorKind::ExpiredSignature)), "{err:?}");
        Ok(())
    }

    #[test]
    fn user_names_use_prefix() {
        assert_eq!(user_name("lt-", 17), "lt-17");
        assert_eq!(user_name("bench_", 0), "bench_0");
    }
}
