//! Tokens signed with the suite's secret: for the hub (no audience) and for a service's API
//! (its audience).

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

/// A token for the hub (no audience).
pub fn token(secret: &str, user: &str) -> String {
    token_for(secret, user, None)
}

/// A token of `user` with `aud` when given.
pub fn token_for(secret: &str, user: &str, aud: Option<&str>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let mut claims = json!({"sub": user, "exp": exp});
    if let Some(aud) = aud {
        claims["aud"] = json!(aud);
    }
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}
