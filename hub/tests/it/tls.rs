//! `rediss://` with `HUB_REDIS_CA_FILE`: nodes share a Redis that speaks only TLS, with a
//! certificate signed by a private CA.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::json;
use test_support::STEP;
use test_support::clients::WsClient;
use test_support::files::{TempDir, temp_dir};
use test_support::process::{free_port, wait_listening};

use crate::helpers::app::{Credentials, wait_status};
use crate::helpers::processes::HubProcess;
use crate::helpers::redis::redis_prefix;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made with the openssl CLI.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=hub-test-ca",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

struct TlsRedis {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tls_redis() -> TlsRedis {
    let port = free_port();
    let dir = temp_dir(&format!("hub-test-tls-{port}"));
    certificates(dir.path());
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let redis = TlsRedis { child, port, dir };
    wait_listening(([127, 0, 0, 1], port).into(), "TLS redis-server").await;
    redis
}

#[tokio::test]
async fn nodes_share_a_tls_redis_verified_with_a_private_ca() {
    let redis = tls_redis().await;
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = redis.dir.path().join("ca.pem").display().to_string();
    let prefix = redis_prefix();
    let creds = Credentials::random();
    let env = [
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_REDIS_CA_FILE", ca.as_str()),
        ("HUB_REDIS_PREFIX", prefix.as_str()),
    ];
    let a = HubProcess::start_with_credentials(&creds, &env).await;
    let b = HubProcess::start_with_credentials(&creds, &env).await;
    let (a, b) = (a.as_app(), b.as_app());
    wait_status(&b, "/readyz", 200, STEP).await;
    let mut ws = WsClient::connect(&b, &b.token("tls-user"), "")
        .await
        .expect("ws on B");
    ws.envelope().await;
    let id = a.publish("tls-user", "over.tls", json!({"n": 1})).await;
    let e = ws.envelope().await;
    assert_eq!(
        (e["type"].clone(), e["id"].clone()),
        (json!("over.tls"), json!(id))
    );

    // Without the CA the server's certificate is not trusted: the node refuses to start,
    // naming the setting.
    let out = Command::new(env!("CARGO_BIN_EXE_hub"))
        .arg("serve")
        .env_clear()
        .env("HUB_ADDR", "127.0.0.1:0")
        .env("HUB_JWT_SECRET", &creds.secret)
        .env("HUB_REDIS_URL", &url)
        .env("HUB_REDIS_TIMEOUT", "1s")
        .stdout(Stdio::null())
        .output()
        .expect("hub runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HUB_REDIS_URL"), "{err}");
}
