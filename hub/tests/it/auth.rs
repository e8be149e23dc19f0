//! Every refused token gets 401 with a JSON reason before any upgrade or stream starts; tokens
//! from independent signers are accepted.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use test_support::clients::{Refused, SseClient, WsClient};

use crate::helpers::app::{TestApp, spawn_app_with};
use crate::helpers::fixture;
use crate::helpers::tokens::{hs256, now_s, rs256_openssl};

/// Tries a token on both transports and returns the two refusals.
async fn refused_everywhere(app: &TestApp, token: &str) -> Vec<Refused> {
    let mut out = Vec::new();
    match WsClient::connect(app, token, "").await {
        Ok(_) => panic!("WebSocket accepted a bad token"),
        Err(r) => out.push(r),
    }
    match SseClient::connect(app, token, "").await {
        Ok(_) => panic!("SSE accepted a bad token"),
        Err(r) => out.push(r),
    }
    for r in &out {
        assert_eq!(r.status, 401, "body: {}", r.body);
        let body: Value = serde_json::from_str(&r.body).expect("JSON error body");
        assert!(body["error"].is_string());
        assert!(!r.body.contains(token), "the token is echoed");
    }
    out
}

fn reason(r: &[Refused]) -> String {
    let v: Value = serde_json::from_str(&r[0].body).expect("json");
    v["error"].as_str().unwrap_or_default().to_owned()
}

fn jwt_encode(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

#[tokio::test]
async fn bad_hs256_tokens_are_refused_with_a_reason() {
    let app = spawn_app_with(&[
        ("HUB_JWT_ISSUER", "https://issuer.test"),
        ("HUB_JWT_AUDIENCE", "hub"),
    ])
    .await;
    let good =
        json!({"sub": "u1", "exp": now_s() + 600, "iss": "https://issuer.test", "aud": "hub"});
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    // The baseline is accepted, so each refusal below is about the one thing changed.
    let mut ok = WsClient::connect(&app, &hs256(&app.secret, &good), "")
        .await
        .expect("baseline");
    assert_eq!(ok.envelope().await["type"], "hub.connected");

    let none = {
        let h = base64_json(&json!({"alg": "none", "typ": "JWT"}));
        format!("{h}.{}.", base64_json(&good))
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", none, "algorithm"),
        (
            "wrong signature",
            hs256(&"x".repeat(40), &good),
            "signature",
        ),
        (
            "expired",
            hs256(&app.secret, &with(json!({"exp": now_s() - 120}))),
            "expired",
        ),
        (
            "nbf in the future",
            hs256(&app.secret, &with(json!({"nbf": now_s() + 300}))),
            "not yet valid",
        ),
        (
            "missing exp",
            hs256(&app.secret, &with(json!({"exp": null}))),
            "exp",
        ),
        (
            "string exp",
            hs256(
                &app.secret,
                &with(json!({"exp": (now_s() + 600).to_string()})),
            ),
            "exp",
        ),
        (
            "wrong iss",
            hs256(&app.secret, &with(json!({"iss": "https://evil.test"}))),
            "issuer",
        ),
        (
            "wrong aud",
            hs256(&app.secret, &with(json!({"aud": "other"}))),
            "audience",
        ),
        ("garbage", "not.a.jwt".to_owned(), "malformed"),
        (
            "HS512 with the right secret",
            hs_other(&app.secret, &good),
            "algorithm",
        ),
    ];
    for (name, token, expect) in cases {
        let r = refused_everywhere(&app, &token).await;
        let why = reason(&r);
        assert!(
            why.contains(expect),
            "{name}: reason {why:?} should mention {expect:?}"
        );
    }
    let missing = SseClient::connect_with(&app, "/sse", &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(missing.status, 401);
    assert!(missing.body.contains("missing token"));
    app.wait_metric(
        "hub_handshake_rejections_total{reason=\"invalid_token\"}",
        20.0,
    )
    .await;
    app.stop().await;
}

fn base64_json(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn hs_other(secret: &str, claims: &Value) -> String {
    jwt_encode(
        Algorithm::HS512,
        None,
        &EncodingKey::from_secret(secret.as_bytes()),
        claims,
    )
}

#[tokio::test]
async fn rsa_key_file_accepts_rs256_only() {
    let pem = fixture("rsa_public.pem");
    let app =
        spawn_app_with(&[("HUB_JWT_PUBLIC_KEY_FILE", pem.to_str().expect("utf-8 path"))]).await;
    let claims = json!({"sub": "rsa-user", "exp": now_s() + 600});
    // Signed by openssl, an implementation independent of the hub.
    let token = rs256_openssl(
        &fixture("rsa_private.pem"),
        &json!({"alg": "RS256", "typ": "JWT"}),
        &claims,
    );
    let mut ws = WsClient::connect(&app, &token, "")
        .await
        .expect("RS256 accepted");
    assert_eq!(ws.envelope().await["data"]["user"], "rsa-user");
    let mut sse = SseClient::connect(&app, &token, "")
        .await
        .expect("RS256 accepted on SSE");
    assert_eq!(sse.event().await.data["type"], "hub.connected");

    // Key confusion: HS256 signed with the public key bytes as the secret.
    let public = std::fs::read_to_string(&pem).expect("pem");
    let confused = hs256(&public, &claims);
    let why = reason(&refused_everywhere(&app, &confused).await);
    assert!(why.contains("algorithm"), "{why}");
    // A token signed by another RSA key.
    let other = rs256_openssl(
        &fixture("ec_private.pem"),
        &json!({"alg": "RS256"}),
        &claims,
    );
    refused_everywhere(&app, &other).await;
    app.stop().await;
}

#[tokio::test]
async fn ec_and_ed25519_key_files_verify_their_own_algorithm() {
    for (public, private, alg) in [
        ("ec_public.pem", "ec_private.pem", Algorithm::ES256),
        ("ed_public.pem", "ed_private.pem", Algorithm::EdDSA),
    ] {
        let path = fixture(public);
        let app =
            spawn_app_with(&[("HUB_JWT_PUBLIC_KEY_FILE", path.to_str().expect("path"))]).await;
        let pem = std::fs::read(fixture(private)).expect("pem");
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .expect("key");
        let token = jwt_encode(alg, None, &key, &json!({"sub": "k", "exp": now_s() + 600}));
        let mut ws = WsClient::connect(&app, &token, "").await.expect("accepted");
        assert_eq!(ws.envelope().await["type"], "hub.connected");
        app.stop().await;
    }
}

/// Serves a JWKS document and counts fetches.
async fn jwks_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let doc = std::fs::read_to_string(fixture("jwks.json")).expect("jwks fixture");
    let counter = hits.clone();
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let doc = doc.clone();
            async move { ([("content-type", "application/json")], doc) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{addr}/jwks.json"), hits)
}

#[tokio::test]
async fn jwks_keys_by_kid_and_unknown_kid_is_refused_with_rate_limited_refresh() {
    use std::sync::atomic::Ordering;
    let (url, hits) = jwks_server().await;
    let app = spawn_app_with(&[
        ("HUB_JWT_JWKS_URL", &url),
        ("HUB_JWT_JWKS_MIN_REFRESH", "1h"),
    ])
    .await;
    let claims = json!({"sub": "jwks-user", "exp": now_s() + 600});
    let good = rs256_openssl(
        &fixture("rsa_private.pem"),
        &json!({"alg": "RS256", "kid": "test-rsa"}),
        &claims,
    );
    let mut ws = WsClient::connect(&app, &good, "").await.expect("kid known");
    assert_eq!(ws.envelope().await["data"]["user"], "jwks-user");
    let before = hits.load(Ordering::SeqCst);
    for _ in 0..5 {
        let unknown = rs256_openssl(
            &fixture("rsa_private.pem"),
            &json!({"alg": "RS256", "kid": "rotated-away"}),
            &claims,
        );
        let why = reason(&refused_everywhere(&app, &unknown).await);
        assert!(why.contains("unknown key"), "{why}");
    }
    // Ten unknown-kid handshakes caused at most one refresh.
    assert!(hits.load(Ordering::SeqCst) <= before + 1);
    // A token without kid cannot pick a key.
    let no_kid = rs256_openssl(
        &fixture("rsa_private.pem"),
        &json!({"alg": "RS256"}),
        &claims,
    );
    refused_everywhere(&app, &no_kid).await;
    app.stop().await;
}

#[tokio::test]
async fn token_sources_header_query_and_cookie() {
    let app = spawn_app_with(&[("HUB_ALLOWED_ORIGINS", "https://app.test")]).await;
    let token = app.token("src");
    let mut a = WsClient::connect_with(
        &app.ws_url(""),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("header");
    assert_eq!(a.envelope().await["type"], "hub.connected");
    let mut b = SseClient::connect_with(
        &app,
        "/sse",
        &[
            ("Cookie", &format!("hub_token={token}")),
            ("Origin", "https://app.test"),
        ],
    )
    .await
    .expect("cookie from an allowed origin");
    assert_eq!(b.event().await.data["type"], "hub.connected");
    let _ = tokio::time::timeout(Duration::from_millis(10), async {}).await;
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_jwks_document_is_not_read_and_keys_stay_unavailable() {
    // A valid key set padded past the 256 KiB cap (an unknown member is otherwise ignored).
    let doc = std::fs::read_to_string(fixture("jwks.json")).expect("jwks fixture");
    let mut value: serde_json::Value = serde_json::from_str(&doc).expect("json");
    value["padding"] = json!("x".repeat(300 * 1024));
    let big = value.to_string();
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let big = big.clone();
            async move { ([("content-type", "application/json")], big) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let app = spawn_app_with(&[("HUB_JWT_JWKS_URL", &format!("http://{addr}/jwks.json"))]).await;
    let token = rs256_openssl(
        &fixture("rsa_private.pem"),
        &json!({"alg": "RS256", "kid": "test-rsa"}),
        &json!({"sub": "big-jwks", "exp": now_s() + 600}),
    );
    let Err(r) = WsClient::connect(&app, &token, "").await else {
        panic!("a key from an oversized JWKS was used");
    };
    assert_eq!(r.status, 503, "{}", r.body);
    app.stop().await;
}
