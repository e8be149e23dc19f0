//! The `hub` binary's command line: `token`, `serve --dev`, and one-line configuration errors.

use std::process::{Command, Stdio};

use serde_json::json;

use crate::helpers::*;

fn hub() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hub"));
    c.env_clear();
    c
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
    ] {
        let mut cmd = hub();
        cmd.arg("serve").env("HUB_ADDR", "127.0.0.1:0");
        if setting == "HUB_ENV" {
            cmd.arg("--dev");
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.stdout(Stdio::null()).output().expect("hub runs");
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
