//! Redis for the backplane tests: the suite's shared server with a key prefix per test, or a
//! private `redis-server` a test may kill, flush or restart.

use std::process::{Child, Command, Stdio};

use test_support::files::{TempDir, temp_dir};
use test_support::process::free_port;
use test_support::wait::Deadline;
use test_support::{STEP, hex};

/// The shared Redis the suite runs against (`make test` starts it and sets the variable).
/// Tests isolate themselves with a random key prefix; a Redis that is not there fails them.
pub fn redis_url() -> String {
    std::env::var("HUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses.
pub fn redis_prefix() -> String {
    format!("test-{}", hex(6))
}

/// A private redis-server on a free port, for tests that kill, flush or restart it.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: TempDir,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> RedisServer {
        let port = free_port();
        let mut s = RedisServer {
            child: None,
            port,
            dir: temp_dir(&format!("hub-test-redis-{port}")),
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server; make test installs it)");
        self.child = Some(child);
        let deadline = Deadline::after(STEP);
        loop {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection())
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            deadline.retry(|| "redis-server did not start").await;
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
        // Before the directory goes (the field's own drop).
        self.kill();
    }
}
