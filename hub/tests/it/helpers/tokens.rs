//! Tokens made by the tests themselves, with implementations independent of the hub's JWT
//! library: HS256 signed by hand, RS256 signed by the `openssl` command.

use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    hub::envelope::now_micros() / 1_000_000
}

/// Signs HS256 by hand (HMAC-SHA256 over base64url JSON), independent of the hub's library.
pub fn hs256(secret: &str, claims: &Value) -> String {
    hs256_with_header(secret, &json!({"alg": "HS256", "typ": "JWT"}), claims)
}

/// Signs HS256 with an arbitrary header.
pub fn hs256_with_header(secret: &str, header: &Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Signs RS256 with the `openssl` command line tool, an implementation independent of the hub.
pub fn rs256_openssl(private_pem: &Path, header: &Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(private_pem)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(signing_input.as_bytes())
            .expect("write to openssl");
    }
    let out = child.wait_with_output().expect("openssl output");
    assert!(out.status.success(), "openssl failed");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(out.stdout))
}
