//! The service binaries as real processes (so they can be killed): started with only the
//! settings a test gives, waited for until they print their listening line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use test_support::process::{self, Signal};

use crate::helpers::STEP;
use crate::helpers::http::fetch_metric;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Order,
    Payment,
    Delivery,
    Moderation,
}

impl Kind {
    /// The service's binary, without the settings of the developer's shell (only what the
    /// test gives).
    pub fn command(self) -> Command {
        let mut cmd = Command::new(self.binary());
        for (k, _) in std::env::vars() {
            if k.starts_with(self.prefix()) {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    fn binary(self) -> &'static str {
        match self {
            Kind::Order => env!("CARGO_BIN_EXE_order-service"),
            Kind::Payment => env!("CARGO_BIN_EXE_payment-service"),
            Kind::Delivery => env!("CARGO_BIN_EXE_delivery-service"),
            Kind::Moderation => env!("CARGO_BIN_EXE_moderation-service"),
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Order => "ORDER_",
            Kind::Payment => "PAYMENT_",
            Kind::Delivery => "DELIVERY_",
            Kind::Moderation => "MODERATION_",
        }
    }

    /// The `aud` the service's API wants (its default `JWT_AUDIENCE`).
    pub fn audience(self) -> &'static str {
        match self {
            Kind::Order => "orders",
            Kind::Moderation => "moderation",
            Kind::Payment => "payment",
            Kind::Delivery => "delivery",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Order => "order",
            Kind::Payment => "payment",
            Kind::Delivery => "delivery",
            Kind::Moderation => "moderation",
        }
    }
}

/// A running service binary.
pub struct ServiceProcess {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
}

impl ServiceProcess {
    /// Starts `kind` with `env` (names without the prefix) and waits for its listening line.
    pub fn start(kind: Kind, env: &[(String, String)], log: &Path) -> ServiceProcess {
        let mut cmd = kind.command();
        for (k, v) in env {
            cmd.env(format!("{}{k}", kind.prefix()), v);
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn service");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(STEP).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "{} did not start within {STEP:?}; log: {}",
                kind.name(),
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        let addr = line
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        ServiceProcess { kind, addr, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The exit status, once the process has exited by itself.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit.
    pub async fn terminate(mut self) -> ExitStatus {
        process::signal(&self.child, Signal::SIGTERM);
        process::wait_exit(&mut self.child, STEP)
            .await
            .unwrap_or_else(|| panic!("{} did not exit after SIGTERM", self.kind.name()))
    }

    /// The value of a metric (summed over label sets containing every `labels` pair).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        fetch_metric(&self.url("/metrics"), name, labels).await
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
