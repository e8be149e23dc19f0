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

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
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
