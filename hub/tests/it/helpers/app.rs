//! A hub node on a random port, in-process, as the tests see it: its credentials, its HTTP
//! API and metrics, and waiting on what it reports.

use std::net::SocketAddr;
use std::time::Duration;

use hub::app::Options;
use serde_json::{Value, json};
use test_support::app::InProcessHub;
use test_support::clients::Endpoint;
use test_support::wait::Deadline;
use test_support::{STEP, hex};

use crate::helpers::tokens::{hs256, now_s};

/// A hub node running inside the test's runtime (or a view of one running as a process).
pub struct TestApp {
    /// Listener address.
    pub addr: SocketAddr,
    /// HS256 secret (empty when another key source is configured).
    pub secret: String,
    /// Publish API key.
    pub api_key: String,
    /// gRPC listener, when `HUB_GRPC_ADDR` was set.
    pub grpc: Option<SocketAddr>,
    node: Option<InProcessHub>,
    http: reqwest::Client,
}

/// Starts a node with test defaults overridden by `pairs` (`HUB_*` names).
pub async fn spawn_app_with(pairs: &[(&str, &str)]) -> TestApp {
    let secret = hex(24);
    let api_key = hex(16);
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
    let node = InProcessHub::start(&all, Options::default()).await;
    TestApp {
        addr: node.addr,
        secret: if other_key_source {
            String::new()
        } else {
            secret
        },
        api_key,
        grpc: node.grpc,
        node: Some(node),
        http: reqwest::Client::new(),
    }
}

/// Starts a node with test defaults.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

impl Endpoint for TestApp {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl TestApp {
    /// A view of a node started elsewhere (a process), sharing its address and credentials.
    pub fn view(addr: SocketAddr, secret: &str, api_key: &str) -> TestApp {
        TestApp {
            addr,
            secret: secret.to_owned(),
            api_key: api_key.to_owned(),
            grpc: None,
            node: None,
            http: reqwest::Client::new(),
        }
    }

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
        self.post_api("/api/publish", body).await
    }

    /// POSTs a JSON body to an API path with the API key; returns status and JSON body.
    pub async fn post_api(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base()))
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await
            .expect("publish request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET an API path with the API key; returns status and JSON body.
    pub async fn get_api(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .expect("GET");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
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
        let deadline = Deadline::after(STEP);
        loop {
            let v = self.metric(series).await;
            if v >= at_least {
                return;
            }
            deadline
                .retry(|| format!("{series} stayed at {v}, wanted ≥ {at_least}"))
                .await;
        }
    }

    /// Stops the node (drains first) and waits for it.
    pub async fn stop(mut self) {
        if let Some(node) = self.node.take() {
            node.stop().await;
        }
    }
}

/// Waits until a series reads exactly `want` (for gauges going down, which `wait_metric`
/// cannot express).
pub async fn wait_metric_eq(app: &TestApp, series: &str, want: f64) {
    let deadline = Deadline::after(STEP);
    loop {
        let v = app.metric(series).await;
        if v == want {
            return;
        }
        deadline
            .retry(|| format!("{series} stayed at {v}, wanted {want}"))
            .await;
    }
}

/// Waits until `GET path` answers `status`; panics with the last answer after `limit`.
pub async fn wait_status(app: &TestApp, path: &str, status: u16, limit: Duration) {
    let deadline = Deadline::after(limit);
    loop {
        let (got, body) = app.get(path).await;
        if got == status {
            return;
        }
        deadline
            .retry(|| format!("{path} stayed at {got} ({body}), wanted {status} within {limit:?}"))
            .await;
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
            secret: hex(24),
            api_key: hex(16),
        }
    }
}
