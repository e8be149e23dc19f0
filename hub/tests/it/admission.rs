//! One admission for both paths: the first request of a connection (the hub's own front door)
//! and a later request on a kept-alive connection (hyper and axum) are refused by the same
//! rules, within the same handshake timeout, and counted under the same rejection reasons.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

use crate::helpers::app::{TestApp, spawn_app, spawn_app_with, wait_metric_eq};
use crate::helpers::clients::assert_json_error;
use crate::helpers::fixture;
use crate::helpers::tokens::{now_s, rs256_openssl};
use test_support::STEP;

/// Which path serves the request under test.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// The first request of a TCP connection.
    FrontDoor,
    /// The second request of a kept-alive connection, after a `GET /healthz`.
    KeptAlive,
}

/// A status line and body read off a raw connection.
struct Answer {
    status: u16,
    body: String,
}

/// Reads one HTTP/1.1 response (head, then `content-length` bytes of body).
async fn read_answer(stream: &mut TcpStream, limit: Duration) -> Option<Answer> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer within {limit:?}"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_len + length {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("body not complete within {limit:?}"),
        }
    }
    Some(Answer {
        status,
        body: String::from_utf8_lossy(&buf[head_len..]).into_owned(),
    })
}

/// Sends `request` on the chosen path and reads the answer to it.
async fn ask(app: &TestApp, path: Path, request: &str, limit: Duration) -> Option<Answer> {
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    if let Path::KeptAlive = path {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .expect("first request");
        let first = read_answer(&mut stream, STEP)
            .await
            .expect("healthz answer");
        assert_eq!(first.status, 200, "{}", first.body);
    }
    stream.write_all(request.as_bytes()).await.expect("request");
    read_answer(&mut stream, limit).await
}

const REASON_BAD_REQUEST: &str = "hub_handshake_rejections_total{reason=\"bad_request\"}";
const REASON_TIMEOUT: &str = "hub_handshake_rejections_total{reason=\"timeout\"}";

#[tokio::test]
async fn a_websocket_upgrade_without_a_valid_key_is_refused_and_counted_on_both_paths() {
    let app = spawn_app().await;
    let token = app.token("no-key");
    let upgrade = |key: &str| {
        format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}\r\n"
        )
    };
    // No key; not base64; base64 of 15 and of 17 bytes (RFC 6455 wants a 16-byte nonce).
    let requests = [
        upgrade(""),
        upgrade("Sec-WebSocket-Key: not base64 at all!!!!!\r\n"),
        upgrade("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n"),
        upgrade("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA=\r\n"),
    ];
    let mut refused = 0;
    for request in &requests {
        for path in [Path::FrontDoor, Path::KeptAlive] {
            let answer = ask(&app, path, request, STEP)
                .await
                .unwrap_or_else(|| panic!("{path:?}: closed without an answer"));
            assert_eq!(answer.status, 400, "{path:?} {request}: {}", answer.body);
            assert!(
                answer.body.contains("Sec-WebSocket-Key"),
                "{path:?}: {}",
                answer.body
            );
            refused += 1;
            wait_metric_eq(&app, REASON_BAD_REQUEST, f64::from(refused)).await;
        }
    }
    // The RFC's own sample key is accepted on both paths.
    let good = upgrade("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
    for path in [Path::FrontDoor, Path::KeptAlive] {
        let answer = ask(&app, path, &good, STEP).await;
        assert_eq!(answer.map(|a| a.status), Some(101), "{path:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_stream_request_that_is_not_get_is_refused_and_counted_on_both_paths() {
    let app = spawn_app().await;
    let token = app.token("not-get");
    let request =
        format!("POST /sse?token={token} HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n\r\n");
    for (n, path) in [Path::FrontDoor, Path::KeptAlive].into_iter().enumerate() {
        let answer = ask(&app, path, &request, STEP)
            .await
            .unwrap_or_else(|| panic!("{path:?}: closed without an answer"));
        assert_eq!(answer.status, 400, "{path:?}: {}", answer.body);
        assert_json_error(&answer.body, &format!("{path:?}"));
        wait_metric_eq(&app, REASON_BAD_REQUEST, (n + 1) as f64).await;
    }
    app.stop().await;
}

/// A JWKS endpoint that accepts connections and never answers: every key fetch hangs.
async fn silent_jwks() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{addr}/jwks.json")
}

#[tokio::test]
async fn a_handshake_that_outlives_the_timeout_is_refused_and_counted_on_both_paths() {
    let url = silent_jwks().await;
    let app = spawn_app_with(&[
        ("HUB_JWT_JWKS_URL", &url),
        // Every handshake may fetch the keys (and hang on it), none is refused by the limit.
        ("HUB_JWT_JWKS_MIN_REFRESH", "1ms"),
        ("HUB_HANDSHAKE_TIMEOUT", "1s"),
    ])
    .await;
    let token = rs256_openssl(
        &fixture("rsa_private.pem"),
        &json!({"alg": "RS256", "kid": "test-rsa"}),
        &json!({"sub": "slow-keys", "exp": now_s() + 600}),
    );
    let ws = format!(
        "GET /ws HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let sse = format!("GET /sse HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n");
    let mut counted = 0.0;
    for path in [Path::FrontDoor, Path::KeptAlive] {
        for request in [&ws, &sse] {
            let started = Instant::now();
            let answer = ask(&app, path, request, Duration::from_secs(4))
                .await
                .unwrap_or_else(|| panic!("{path:?}: closed without an answer"));
            let took = started.elapsed();
            assert_eq!(answer.status, 408, "{path:?}: {}", answer.body);
            assert_json_error(&answer.body, &format!("{path:?}"));
            assert!(
                took >= Duration::from_millis(900) && took < Duration::from_secs(3),
                "{path:?}: answered after {took:?}"
            );
            counted += 1.0;
            wait_metric_eq(&app, REASON_TIMEOUT, counted).await;
        }
    }
    app.stop().await;
}
