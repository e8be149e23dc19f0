//! The `hub` binary as real processes (for signals, kill and RSS): `hub serve` on a free port,
//! waited for until it listens, and `hub ingest`; both stopped on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use test_support::hex;
use test_support::process::{self, Signal, free_port, wait_listening};

use crate::helpers::app::{Credentials, TestApp};

/// A hub running as its own process.
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
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let secret = hex(24);
        let api_key = hex(16);
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
        wait_listening(addr, "hub").await;
        p
    }

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

    /// Sends `signal` (`SIGTERM` to drain, `SIGKILL` as a crash would).
    pub fn signal(&self, signal: Signal) {
        process::signal(&self.child, signal);
    }

    /// Waits for the process to exit; `None` when it is still running after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        process::wait_exit(&mut self.child, limit).await
    }

    /// A view usable with the clients (shares address, secret and key).
    pub fn as_app(&self) -> TestApp {
        TestApp::view(self.addr, &self.secret, &self.api_key)
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    /// Sends `signal` (`SIGTERM` to drain, `SIGKILL` as a crash would).
    pub fn signal(&self, signal: Signal) {
        process::signal(&self.child, signal);
    }

    /// Waits for the process to exit; `None` when it is still running after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        process::wait_exit(&mut self.child, limit).await
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
