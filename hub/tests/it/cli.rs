//! The `hub` binary's command line: `token`, `serve --dev`, and one-line configuration errors.

use std::process::{Command, Output, Stdio};

use serde_json::json;
use test_support::STEP;
use test_support::clients::WsClient;

use crate::helpers::processes::HubProcess;

fn hub() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hub"));
    c.env_clear();
    c
}

/// Runs `cmd` (stdout discarded, stderr kept) and returns its output once it exits; a process
/// still running after `within` (a setting that was meant to be refused was accepted) is
/// killed and fails the test.
fn exits_within(cmd: &mut Command, within: std::time::Duration, what: &str) -> Output {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hub runs");
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().expect("hub status").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: hub still runs after {within:?}; the setting was not refused");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("hub output")
}

#[tokio::test]
async fn hub_token_prints_a_token_the_node_accepts() {
    let process = HubProcess::start(&[]).await;
    let out = hub()
        .args(["token", "--sub", "cli-user", "--ttl", "10m"])
        .env("HUB_JWT_SECRET", &process.secret)
        .output()
        .expect("hub token runs");
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).expect("utf-8");
    let app = process.as_app();
    let mut ws = WsClient::connect(&app, token.trim(), "")
        .await
        .expect("accepted");
    assert_eq!(ws.envelope().await["data"]["user"], "cli-user");
}

#[test]
fn bad_settings_stop_the_node_with_one_line_naming_the_setting() {
    for (env, setting) in [
        (vec![("HUB_JWT_SECRET", "too-short")], "HUB_JWT_SECRET"),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_HISTORY_SIZE", "lots"),
            ],
            "HUB_HISTORY_SIZE",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_PING_INTERVALL", "5s"),
            ],
            "HUB_PING_INTERVALL",
        ),
        (vec![], "HUB_JWT_SECRET"),
        (vec![("HUB_ENV", "production")], "HUB_ENV"),
        (
            vec![("HUB_JWT_JWKS_URL", "http://issuer.example/jwks.json")],
            "HUB_JWT_JWKS_URL",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_KAFKA_SASL_MECHANISM", "PLAIN"),
            ],
            "HUB_KAFKA_SASL_MECHANISM",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
                ("HUB_KAFKA_SASL_USERNAME", "hub"),
            ],
            "HUB_KAFKA_SASL_PASSWORD",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_REDIS_URL", "redis://127.0.0.1:6379"),
                ("HUB_REDIS_CA_FILE", "/etc/hostname"),
            ],
            "HUB_REDIS_CA_FILE",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_KAFKA_BROKERS", "127.0.0.1:9"),
                ("HUB_KAFKA_SECURITY_PROTOCOL", "tls"),
            ],
            "HUB_KAFKA_SECURITY_PROTOCOL",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_REDIS_SENTINEL_URLS", "redis://127.0.0.1:26379"),
            ],
            "HUB_REDIS_SENTINEL_MASTER",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_JWT_MAX_LIFETIME", "400d"),
            ],
            "HUB_JWT_MAX_LIFETIME",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_REDIS_URL", "redis://127.0.0.1:6379"),
                ("HUB_REDIS_CLUSTER_URLS", "redis://127.0.0.1:7001"),
            ],
            "HUB_REDIS_CLUSTER_URLS",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                (
                    "HUB_REDIS_CLUSTER_URLS",
                    "redis://127.0.0.1:7001,127.0.0.1:7002",
                ),
            ],
            "HUB_REDIS_CLUSTER_URLS",
        ),
        (
            vec![
                ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("HUB_REDIS_SYNC_REPLICAS", "17"),
            ],
            "HUB_REDIS_SYNC_REPLICAS",
        ),
    ] {
        let mut cmd = hub();
        cmd.arg("serve").env("HUB_ADDR", "127.0.0.1:0");
        if setting == "HUB_ENV" {
            cmd.arg("--dev");
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = exits_within(&mut cmd, STEP, setting);
        assert_eq!(out.status.code(), Some(2), "{setting}: exit code");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{setting}: one line, got {err:?}");
        assert!(lines[0].contains(setting), "{setting}: {err:?}");
    }
}

#[tokio::test]
async fn dev_mode_has_a_login_and_production_mode_does_not() {
    let dev = HubProcess::start_with_args(&["--dev"], &[]).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{}/api/dev/token", dev.addr))
        .json(&json!({"user_id": "alice"}))
        .send()
        .await
        .expect("dev login");
    assert_eq!(r.status(), 200);
    let token = r.json::<serde_json::Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut ws = WsClient::connect(&dev.as_app(), &token, "")
        .await
        .expect("dev token accepted");
    assert_eq!(ws.envelope().await["data"]["user"], "alice");

    let plain = HubProcess::start(&[]).await;
    let r = http
        .post(format!("http://{}/api/dev/token", plain.addr))
        .json(&json!({"user_id": "alice"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404, "no dev login without --dev");
}

/// Runs `hub serve ARGS` with `env`, reads its standard output until a line containing
/// `until` (or the deadline), then kills it; returns what it printed.
fn serve_output(args: &[&str], env: &[(&str, &str)], until: &str) -> String {
    use std::io::BufRead;
    let mut cmd = hub();
    cmd.arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("hub runs");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    let deadline = std::time::Instant::now() + STEP;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
                if line.contains(until) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    out
}

#[test]
fn dev_mode_prints_secrets_only_on_a_loopback_listener() {
    let local = serve_output(&["--dev"], &[("HUB_ADDR", "127.0.0.1:0")], "sample token");
    assert!(local.contains("HUB_JWT_SECRET="), "{local}");
    let open = serve_output(&["--dev"], &[("HUB_ADDR", "0.0.0.0:0")], "beyond loopback");
    assert!(open.contains("beyond loopback"), "{open}");
    assert!(
        !open.contains("HUB_JWT_SECRET="),
        "secret printed on 0.0.0.0: {open}"
    );
    assert!(
        !open.contains("HUB_API_KEY="),
        "API key printed on 0.0.0.0: {open}"
    );
}

#[test]
fn start_up_warns_about_what_will_surprise_the_operator() {
    let out = serve_output(
        &[],
        &[
            ("HUB_ADDR", "127.0.0.1:0"),
            ("HUB_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("HUB_LOG", "info"),
        ],
        "HUB_ALLOWED_ORIGINS",
    );
    assert!(
        out.contains("hub listening") && out.contains("127.0.0.1:"),
        "address in the start line: {out}"
    );
    assert!(out.contains("HUB_API_KEY is not set"), "{out}");
    assert!(out.contains("HUB_ALLOWED_ORIGINS is empty"), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "colour codes in a piped log: {out:?}"
    );
}

#[tokio::test]
async fn dev_tokens_carry_the_hubs_audience_or_the_one_asked_for() {
    let dev = HubProcess::start_with_args(&["--dev"], &[("HUB_JWT_AUDIENCE", "hub")]).await;
    let http = reqwest::Client::new();
    let login = |body: serde_json::Value| {
        http.post(format!("http://{}/api/dev/token", dev.addr))
            .json(&body)
            .send()
    };
    let claims = |token: &str| -> serde_json::Value {
        use base64::Engine;
        let part = token.split('.').nth(1).expect("claims part");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("claims JSON")
    };
    let token = |r: serde_json::Value| r["token"].as_str().expect("token").to_owned();
    let hub_token = token(
        login(json!({"user_id": "al"}))
            .await
            .expect("login")
            .json()
            .await
            .expect("json"),
    );
    assert_eq!(claims(&hub_token)["aud"], "hub");
    let mut ws = WsClient::connect(&dev.as_app(), &hub_token, "")
        .await
        .expect("accepted");
    assert_eq!(ws.envelope().await["data"]["user"], "al");
    let orders = token(
        login(json!({"user_id": "al", "audience": "orders"}))
            .await
            .expect("login")
            .json()
            .await
            .expect("json"),
    );
    assert_eq!(claims(&orders)["aud"], "orders");
    let Err(r) = WsClient::connect(&dev.as_app(), &orders, "").await else {
        panic!("a token for the order service was accepted by the hub");
    };
    assert_eq!(r.status, 401);
    let r = login(json!({"user_id": "x}y"})).await.expect("login");
    assert_eq!(r.status(), 400);

    let out = hub()
        .args(["token", "--sub", "cli", "--aud", "moderation"])
        .env("HUB_JWT_SECRET", &dev.secret)
        .output()
        .expect("hub token runs");
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(claims(printed.trim())["aud"], "moderation");
}
