//! Test harness: a hub on a random port (in-process or as a real process), real WebSocket and
//! SSE clients, token minting, and waiting on conditions with a deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use hub::app::{Application, Options};
use hub::config::Settings;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take.
pub const STEP: Duration = Duration::from_secs(10);

/// Path of a test fixture.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    hub::envelope::now_micros() / 1_000_000
}

/// A hub node running inside the test's runtime.
pub struct TestApp {
    /// Listener address.
    pub addr: SocketAddr,
    /// HS256 secret (empty when another key source is configured).
    pub secret: String,
    /// Publish API key.
    pub api_key: String,
    /// gRPC listener, when `HUB_GRPC_ADDR` was set.
    pub grpc: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

/// Starts a node with test defaults overridden by `pairs` (`HUB_*` names).
pub async fn spawn_app_with(pairs: &[(&str, &str)]) -> TestApp {
    let secret = random_hex(24);
    let api_key = random_hex(16);
    let other_key_source = pairs
        .iter()
        .any(|(k, _)| *k == "HUB_JWT_PUBLIC_KEY_FILE" || *k == "HUB_JWT_JWKS_URL");
    let mut all: Vec<(&str, &str)> = vec![
        ("HUB_ADDR", "127.0.0.1:0"),
        ("HUB_API_KEY", &api_key),
        ("HUB_JWT_LEEWAY", "0s"),
        ("HUB_DRAIN_WINDOW", "100ms"),
    ];
    if !other_key_source {
        all.push(("HUB_JWT_SECRET", &secret));
    }
    all.extend_from_slice(pairs);
    let settings = Settings::load_from_pairs(all).expect("test settings are valid");
    let app = Application::build(settings, Options::default())
        .await
        .expect("app builds");
    let addr: SocketAddr = ([127, 0, 0, 1], app.port()).into();
    let grpc = app
        .grpc_port()
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let _ = app
            .run_until_stopped(async {
                let _ = stopped.await;
            })
            .await;
    });
    TestApp {
        addr,
        secret: if other_key_source {
            String::new()
        } else {
            secret
        },
        api_key,
        grpc,
        stop: Some(stop),
        done: Some(done),
        http: reqwest::Client::new(),
    }
}

/// Starts a node with test defaults.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

impl TestApp {
    /// `http://127.0.0.1:port`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://127.0.0.1:port/ws?...`.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// A valid HS256 token for `user`, made by the test (not the hub's signer).
    pub fn token(&self, user: &str) -> String {
        hs256(&self.secret, &json!({"sub": user, "exp": now_s() + 600}))
    }

    /// Publishes and returns the id.
    pub async fn publish(&self, user: &str, kind: &str, data: Value) -> String {
        let r = self
            .publish_raw(&json!({"user_id": user, "type": kind, "data": data}))
            .await;
        assert_eq!(r.0, 200, "publish failed: {}", r.1);
        r.1["id"].as_str().expect("id").to_owned()
    }

    /// Publishes any body; returns status and JSON body.
    pub async fn publish_raw(&self, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/api/publish", self.base()))
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await
            .expect("publish request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET a path; returns status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base()))
            .send()
            .await
            .expect("GET");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// The value of one metric series (`name{labels}` as printed), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    }

    /// Waits until a metric series reaches `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) {
        let deadline = Instant::now() + STEP;
        loop {
            let v = self.metric(series).await;
            if v >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} stayed at {v}, wanted ≥ {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the node (drains first) and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = timeout(Duration::from_secs(30), d).await;
        }
    }
}

/// Waits until a series reads exactly `want` (for gauges going down, which `wait_metric`
/// cannot express).
pub async fn wait_metric_eq(app: &TestApp, series: &str, want: f64) {
    let deadline = Instant::now() + STEP;
    loop {
        let v = app.metric(series).await;
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {v}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that a refusal body is JSON with a non-empty `error` string.
pub fn assert_json_error(body: &str, what: &str) {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body:?}"));
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: no \"error\" string in {body}"
    );
}

/// Asserts that both transports refuse `token` with `status` and a JSON error, and that the
/// refusals were counted under the rejection `reason` (`expected_count` in total).
pub async fn refused_on_both(
    app: &TestApp,
    token: &str,
    status: u16,
    reason: &str,
    expected_count: f64,
    what: &str,
) {
    let Err(r) = WsClient::connect(app, token, "").await else {
        panic!("{what}: a WebSocket was accepted");
    };
    assert_eq!(r.status, status, "{what}, WS: {}", r.body);
    assert_json_error(&r.body, &format!("{what}, WS"));
    let Err(r) = SseClient::connect(app, token, "").await else {
        panic!("{what}: an SSE stream was accepted");
    };
    assert_eq!(r.status, status, "{what}, SSE: {}", r.body);
    assert_json_error(&r.body, &format!("{what}, SSE"));
    let series = format!("hub_handshake_rejections_total{{reason=\"{reason}\"}}");
    assert_eq!(
        app.metric(&series).await,
        expected_count,
        "{what}: {series}"
    );
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
pub fn rs256_openssl(private_pem: &std::path::Path, header: &Value, claims: &Value) -> String {
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

/// What a client saw next.
#[derive(Debug)]
pub enum Event {
    /// One envelope.
    Envelope(Value),
    /// The server closed (WS close code, if any) or ended the stream.
    Closed(Option<u16>),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client.
pub struct WsClient {
    ws: Ws,
}

/// A refused handshake: status and JSON body.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub body: String,
}

impl WsClient {
    /// Connects to `url` with extra headers.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Self, Refused> {
        let mut req = url.into_client_request().expect("valid URL");
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                http::HeaderValue::from_str(v).expect("header value"),
            );
        }
        match timeout(STEP, tokio_tungstenite::connect_async(req)).await {
            Ok(Ok((ws, _))) => Ok(WsClient { ws }),
            Ok(Err(WsError::Http(resp))) => Err(Refused {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Ok(Err(e)) => panic!("ws connect failed: {e}"),
            Err(_) => panic!("ws connect timed out"),
        }
    }

    /// Connects with a token in the query.
    pub async fn connect(app: &TestApp, token: &str, extra_query: &str) -> Result<Self, Refused> {
        let mut q = format!("token={token}");
        if !extra_query.is_empty() {
            q.push('&');
            q.push_str(extra_query);
        }
        Self::connect_with(&app.ws_url(&q), &[]).await
    }

    /// The next envelope or close; pings are answered by the library.
    pub async fn next(&mut self) -> Event {
        loop {
            let msg = timeout(STEP, self.ws.next())
                .await
                .expect("no WebSocket event within the deadline");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Event::Envelope(
                        serde_json::from_str(t.as_str()).expect("JSON envelope"),
                    );
                }
                Some(Ok(Message::Close(frame))) => {
                    // Send the queued close reply now, as a browser would.
                    let _ = self.ws.flush().await;
                    return Event::Closed(frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    /// The next envelope; panics on close.
    pub async fn envelope(&mut self) -> Value {
        match self.next().await {
            Event::Envelope(v) => v,
            Event::Closed(c) => panic!("closed ({c:?}) while an envelope was expected"),
        }
    }

    /// Waits for the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            if let Event::Closed(c) = self.next().await {
                return c;
            }
        }
    }

    /// Expects `hub.closing` with `reason` as the last message, then the close; returns the
    /// close code.
    pub async fn closing(&mut self, reason: &str) -> Option<u16> {
        loop {
            match self.next().await {
                Event::Envelope(v) if v["type"] == "hub.closing" => {
                    assert_eq!(v["data"]["reason"], reason, "hub.closing reason");
                    assert!(v.get("id").is_none(), "control messages carry no id");
                    break;
                }
                Event::Envelope(v) => {
                    assert!(
                        !v["type"].as_str().unwrap_or_default().starts_with("hub."),
                        "unexpected control message before hub.closing: {v}"
                    );
                }
                Event::Closed(c) => panic!("closed ({c:?}) without hub.closing"),
            }
        }
        match self.next().await {
            Event::Closed(c) => c,
            Event::Envelope(v) => panic!("{v} after hub.closing"),
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// One SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `id:` line.
    pub id: Option<String>,
    /// `data:` parsed as JSON.
    pub data: Value,
}

/// A minimal SSE client over a raw socket (chunked transfer decoding included).
pub struct SseClient {
    stream: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    chunked: bool,
    ended: bool,
    /// Response headers (lower-case names).
    pub headers: Vec<(String, String)>,
}

impl SseClient {
    /// Connects to `path_and_query` with extra headers.
    pub async fn connect_with(
        app: &TestApp,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, Refused> {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n",
            app.addr
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let (status, head_len, hdrs) = loop {
            let mut buf = [0u8; 4096];
            let n = timeout(STEP, stream.read(&mut buf))
                .await
                .expect("SSE response within the deadline")
                .expect("read");
            assert!(n > 0, "closed before a response head");
            raw.extend_from_slice(&buf[..n]);
            let mut h = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut h);
            if let httparse::Status::Complete(len) = resp.parse(&raw).expect("HTTP response") {
                let hdrs: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (resp.code.unwrap_or(0), len, hdrs);
            }
        };
        raw.drain(..head_len);
        if status != 200 {
            // Read the rest of a small refusal body.
            let _ = timeout(Duration::from_secs(2), stream.read_to_end(&mut raw)).await;
            return Err(Refused {
                status,
                body: String::from_utf8_lossy(&raw).into_owned(),
            });
        }
        let chunked = hdrs
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        Ok(SseClient {
            stream,
            raw,
            body: Vec::new(),
            chunked,
            ended: false,
            headers: hdrs,
        })
    }

    /// Connects with a token in the query plus `extra_query`.
    pub async fn connect(app: &TestApp, token: &str, extra_query: &str) -> Result<Self, Refused> {
        let mut q = format!("/sse?token={token}");
        if !extra_query.is_empty() {
            q.push('&');
            q.push_str(extra_query);
        }
        Self::connect_with(app, &q, &[]).await
    }

    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        loop {
            let Some(pos) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = String::from_utf8_lossy(&self.raw[..pos]).into_owned();
            let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < pos + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[pos + 2..pos + 2 + size]);
            self.raw.drain(..pos + 2 + size + 2);
        }
    }

    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            let pos = self.body.windows(2).position(|w| w == b"\n\n")?;
            let block = String::from_utf8_lossy(&self.body[..pos]).into_owned();
            self.body.drain(..pos + 2);
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).expect("JSON data"));
                }
            }
            // Comments (heartbeats) and `retry:` blocks carry no data.
            if let Some(data) = data {
                return Some(SseEvent { id, data });
            }
        }
    }

    /// The next event with data, or `None` when the stream ended.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            self.decode();
            if let Some(e) = self.take_event() {
                return Some(e);
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 8192];
            let n = timeout(STEP, self.stream.read(&mut buf))
                .await
                .expect("no SSE event within the deadline")
                .unwrap_or(0);
            if n == 0 {
                self.ended = true;
                self.decode();
                return self.take_event();
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// Expects `hub.closing` with `reason` (no `id:` line), then the end of the stream.
    pub async fn closing(&mut self, reason: &str) {
        let e = self
            .next_event()
            .await
            .expect("stream ended without hub.closing");
        assert_eq!(
            e.data["type"], "hub.closing",
            "expected hub.closing, got {}",
            e.data
        );
        assert_eq!(e.data["data"]["reason"], reason, "hub.closing reason");
        assert!(e.id.is_none(), "control events carry no id: line");
        assert!(
            self.next_event().await.is_none(),
            "the stream carried an event after hub.closing"
        );
    }

    /// The next event; panics when the stream ended.
    pub async fn event(&mut self) -> SseEvent {
        self.next_event()
            .await
            .expect("stream ended while an event was expected")
    }
}

/// A hub running as its own process (for signals, kill and RSS).
pub struct HubProcess {
    child: Child,
    /// Listener address.
    pub addr: SocketAddr,
    /// HS256 secret.
    pub secret: String,
    /// API key.
    pub api_key: String,
}

impl HubProcess {
    /// Starts the `hub` binary on a free port with extra environment settings.
    pub async fn start(env: &[(&str, &str)]) -> HubProcess {
        Self::start_with_args(&[], env).await
    }

    /// Starts `hub serve ARGS` on a free port with extra environment settings.
    pub async fn start_with_args(args: &[&str], env: &[(&str, &str)]) -> HubProcess {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let secret = random_hex(24);
        let api_key = random_hex(16);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hub"));
        cmd.arg("serve")
            .args(args)
            .env_clear()
            .env("HUB_ADDR", addr.to_string())
            .env("HUB_JWT_SECRET", &secret)
            .env("HUB_API_KEY", &api_key)
            .env("HUB_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("hub binary starts");
        let p = HubProcess {
            child,
            addr,
            secret,
            api_key,
        };
        let deadline = Instant::now() + STEP;
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "hub did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, name: &str) {
        signal_child(&self.child, name);
    }

    /// Waits for the process to exit; `None` when it is still running after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_child_exit(&mut self.child, limit).await
    }

    /// A view usable with the clients (shares address, secret and key).
    pub fn as_app(&self) -> TestApp {
        TestApp {
            addr: self.addr,
            secret: self.secret.clone(),
            api_key: self.api_key.clone(),
            grpc: None,
            stop: None,
            done: None,
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared Redis the suite runs against (`make test` starts it and sets the variable).
/// Tests isolate themselves with a random key prefix; a Redis that is not there fails them.
pub fn redis_url() -> String {
    std::env::var("HUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses.
pub fn redis_prefix() -> String {
    format!("test-{}", random_hex(6))
}

/// A private redis-server on a free port, for tests that kill, flush or restart it.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> RedisServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let dir = std::env::temp_dir().join(format!("hub-test-redis-{port}-{}", random_hex(4)));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut s = RedisServer {
            child: None,
            port,
            dir,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server; make test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + STEP;
        loop {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection())
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command.
    pub fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut c = redis::Client::open(self.url())?.get_connection()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The signing secret and publish API key of a cluster: every node sharing a backplane must
/// verify the same tokens and accept the same key.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// HS256 secret.
    pub secret: String,
    /// Publish API key.
    pub api_key: String,
}

impl Credentials {
    /// Fresh random credentials.
    pub fn random() -> Self {
        Credentials {
            secret: random_hex(24),
            api_key: random_hex(16),
        }
    }
}

impl HubProcess {
    /// Starts the `hub` binary with the given credentials (instead of random ones) plus extra
    /// environment settings; several nodes started with the same credentials form a cluster.
    pub async fn start_with_credentials(creds: &Credentials, env: &[(&str, &str)]) -> HubProcess {
        let mut all: Vec<(&str, &str)> = vec![
            ("HUB_JWT_SECRET", &creds.secret),
            ("HUB_API_KEY", &creds.api_key),
        ];
        all.extend_from_slice(env);
        let mut p = Self::start(&all).await;
        p.secret = creds.secret.clone();
        p.api_key = creds.api_key.clone();
        p
    }
}

/// Waits until `GET path` answers `status`; panics with the last answer after `limit`.
pub async fn wait_status(app: &TestApp, path: &str, status: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (got, body) = app.get(path).await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} stayed at {got} ({body}), wanted {status} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `hub ingest` running as its own process: Kafka ingest alone, publishing into Redis. It has
/// no listener, so there is nothing to wait for at start; what it ingests shows at the clients.
pub struct IngestProcess {
    child: Child,
}

impl IngestProcess {
    /// Starts `hub ingest` with exactly these settings (plus `HUB_LOG=warn`).
    pub fn start(env: &[(&str, &str)]) -> IngestProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hub"));
        cmd.arg("ingest")
            .env_clear()
            .env("HUB_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        IngestProcess {
            child: cmd.spawn().expect("hub binary starts"),
        }
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, name: &str) {
        signal_child(&self.child, name);
    }

    /// Waits for the process to exit; `None` when it is still running after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_child_exit(&mut self.child, limit).await
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name (`TERM`, `KILL`) to a child process.
fn signal_child(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill -{name} failed");
}

/// Waits for a child to exit; `None` when it is still running after `limit`.
async fn wait_child_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which transport a test client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ws,
    Sse,
}

/// A WebSocket or SSE client, read the same way.
pub enum Conn {
    Ws(WsClient),
    Sse(SseClient),
}

impl Conn {
    /// Opens a connection for `user` (resuming after `since` when given).
    pub async fn try_open(
        kind: Kind,
        app: &TestApp,
        user: &str,
        since: Option<&str>,
    ) -> Result<Conn, Refused> {
        let token = app.token(user);
        match kind {
            Kind::Ws => {
                let query = since.map(|id| format!("since={id}")).unwrap_or_default();
                WsClient::connect(app, &token, &query).await.map(Conn::Ws)
            }
            Kind::Sse => {
                let path = format!("/sse?token={token}");
                let headers: Vec<(&str, &str)> = since
                    .map(|id| vec![("Last-Event-ID", id)])
                    .unwrap_or_default();
                SseClient::connect_with(app, &path, &headers)
                    .await
                    .map(Conn::Sse)
            }
        }
    }

    /// Opens a connection and reads its greeting; `Err` when the handshake is refused.
    pub async fn open_or_refused(
        kind: Kind,
        app: &TestApp,
        user: &str,
        since: Option<&str>,
    ) -> Result<(Conn, Value), Refused> {
        let mut conn = Self::try_open(kind, app, user, since).await?;
        let hello = conn
            .next()
            .await
            .unwrap_or_else(|| panic!("{kind:?} for {user} closed before its greeting"));
        assert_eq!(hello["type"], "hub.connected", "first envelope: {hello}");
        assert_eq!(hello["data"]["user"], user, "greeting names the user");
        Ok((conn, hello["data"].clone()))
    }

    /// Opens a connection that must be admitted; returns it with its `hub.connected` data.
    pub async fn open(kind: Kind, app: &TestApp, user: &str, since: Option<&str>) -> (Conn, Value) {
        Self::open_or_refused(kind, app, user, since)
            .await
            .unwrap_or_else(|r| panic!("{kind:?} for {user} refused: {} {}", r.status, r.body))
    }

    /// The next envelope, or `None` when the server closed or the connection broke.
    pub async fn next(&mut self) -> Option<Value> {
        match self {
            Conn::Ws(c) => match c.next().await {
                Event::Envelope(v) => Some(v),
                Event::Closed(_) => None,
            },
            Conn::Sse(c) => {
                let e = c.next_event().await?;
                let control = e.data["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("hub."));
                if control {
                    assert_eq!(e.id, None, "control events carry no id: line: {:?}", e.data);
                } else {
                    assert_eq!(
                        e.id.as_deref(),
                        e.data["id"].as_str(),
                        "the id: line is the envelope's id"
                    );
                }
                Some(e.data)
            }
        }
    }

    /// The next envelope; panics when the connection closed.
    pub async fn envelope(&mut self) -> Value {
        self.next()
            .await
            .expect("connection closed while an envelope was expected")
    }
}
