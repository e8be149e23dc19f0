//! A hub node in the test's runtime (memory backplane) ingesting the test's topics (and not
//! the shared unprefixed ones, which may hold anything, e.g. what `make demo` produced).

use std::net::SocketAddr;

use hub::app::Options;
use test_support::app::{InProcessHub, order_status_route_with_channel};
use test_support::clients::Endpoint;
use test_support::files::{TempDir, temp_dir, write};
use test_support::hex;

use crate::helpers::http::fetch_metric;
use crate::helpers::kafka::Topics;

/// The node and the routes file it reads.
pub struct Hub {
    node: InProcessHub,
    /// The key of its publish API.
    pub api_key: String,
    _routes: TempDir,
}

/// The hub's built-in routes, on the test's prefixed topics.
fn routes(prefix: &str) -> String {
    let orders = order_status_route_with_channel(
        "it-order-status",
        &format!("{prefix}order.status.changed"),
    );
    let moderation = format!(
        r#"
[[route]]
name = "it-moderation-reporter"
topic = "{prefix}moderation.results"
message = "notifications.moderation.v1.ModerationResult"
type = "moderation.result"
recipients = ["reporter_id"]
data = {{ report_id = "report_id", target_type = "target_type", target_id = "target_id", decision = "decision" }}
constants = {{ role = "reporter" }}

[[route]]
name = "it-moderation-owner"
topic = "{prefix}moderation.results"
message = "notifications.moderation.v1.ModerationResult"
type = "moderation.result"
recipients = ["target_owner_id"]
filter = [{{ field = "decision", in = ["REMOVED"] }}]
data = {{ report_id = "report_id", target_type = "target_type", target_id = "target_id", decision = "decision" }}
constants = {{ role = "owner" }}
"#
    );
    orders + &moderation
}

impl Hub {
    /// Starts a node (`--dev` when `dev`) that accepts tokens signed with `secret`.
    pub async fn start(secret: &str, topics: &Topics, dev: bool) -> Hub {
        let dir = temp_dir("producers-it");
        let routes_path = write(dir.path(), "routes.toml", &routes(&topics.prefix));
        let group = format!("{}hub", topics.prefix);
        let api_key = hex(16);
        let node = InProcessHub::start(
            &[
                ("HUB_ADDR", "127.0.0.1:0"),
                ("HUB_JWT_SECRET", secret),
                ("HUB_API_KEY", api_key.as_str()),
                ("HUB_KAFKA_BROKERS", topics.brokers.as_str()),
                ("HUB_KAFKA_GROUP", group.as_str()),
                ("HUB_INGEST_ROUTES", routes_path.as_str()),
                // The same routes as the built-in ones, on the test's topics only.
                ("HUB_INGEST_BUILTIN_ROUTES", "false"),
                ("HUB_HISTORY_SIZE", "1000"),
                ("HUB_DRAIN_WINDOW", "100ms"),
                ("HUB_PING_INTERVAL", "2s"),
            ],
            Options { dev },
        )
        .await;
        Hub {
            node,
            api_key,
            _routes: dir,
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn base(&self) -> String {
        self.node.base()
    }

    /// The value of a metric (summed over label sets containing every `labels` pair).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        fetch_metric(&format!("{}/metrics", self.base()), name, labels).await
    }

    /// Stops the node and waits for it.
    pub async fn stop(self) {
        self.node.stop().await;
    }
}

impl Endpoint for Hub {
    fn addr(&self) -> SocketAddr {
        self.node.addr
    }
}
