//! Child processes of a test: a free port to give them, signals sent through the `kill(2)`
//! system call (not by running `kill`), and waiting for a listener or an exit.

use std::net::SocketAddr;
use std::process::{Child, ExitStatus};
use std::time::Duration;

pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::net::TcpStream;

use crate::STEP;
use crate::wait::Deadline;

/// Ports [`free_port`] picks from: below Linux's ephemeral range (32768 and up), so the
/// kernel never hands one out as the source port of a connection between the check and the
/// server's bind, and apart from the range of the services' private Kafka brokers (20000 up).
const PORTS: std::ops::Range<u16> = 10_000..20_000;

/// A port nothing listens on right now, never given twice to one test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = rand::random_range(PORTS);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: Signal) {
    let pid = i32::try_from(child.id()).expect("pid fits in pid_t");
    kill(Pid::from_raw(pid), signal).unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

/// Waits for `child` to exit; `None` when it is still running after `limit`.
pub async fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Deadline::after(limit);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if deadline.passed() {
            return None;
        }
        tokio::time::sleep(crate::wait::POLL).await;
    }
}

/// Waits until something accepts TCP connections on `addr`; panics naming `what` after
/// [`STEP`].
pub async fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Deadline::after(STEP);
    while TcpStream::connect(addr).await.is_err() {
        deadline
            .retry(|| format!("{what} did not start listening"))
            .await;
    }
}
