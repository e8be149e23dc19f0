//! A hub node running inside the test's runtime, listening on a random port.

use std::net::SocketAddr;
use std::time::Duration;

use hub::app::{Application, Options};
use hub::config::Settings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The hub's built-in order route (`OrderStatusChanged` → `order.status` to `user_id`) under
/// `name`, on `topic`, as a routes file entry.
pub fn order_status_route(name: &str, topic: &str) -> String {
    format!(
        r#"
[[route]]
name = "{name}"
topic = "{topic}"
message = "notifications.orders.v1.OrderStatusChanged"
type = "order.status"
recipients = ["user_id"]
data = {{ order_id = "order_id", status = "status", previous_status = "previous_status" }}
"#
    )
}

/// As [`order_status_route`], also publishing to each order's channel `order:<order_id>` as
/// the built-in route does.
pub fn order_status_route_with_channel(name: &str, topic: &str) -> String {
    order_status_route(name, topic).replace(
        "recipients = [\"user_id\"]\n",
        "recipients = [\"user_id\"]\nchannels = [\"order:{order_id}\"]\n",
    )
}

/// A running node; dropping it stops the node without waiting for it.
pub struct InProcessHub {
    /// Listener address.
    pub addr: SocketAddr,
    /// gRPC listener, when `HUB_GRPC_ADDR` was set.
    pub grpc: Option<SocketAddr>,
    stop: oneshot::Sender<()>,
    done: JoinHandle<()>,
}

impl InProcessHub {
    /// Builds a node from `HUB_*` settings and runs it until [`InProcessHub::stop`] or drop.
    pub async fn start(pairs: &[(&str, &str)], options: Options) -> InProcessHub {
        let settings =
            Settings::load_from_pairs(pairs.iter().copied()).expect("test settings are valid");
        let app = Application::build(settings, options)
            .await
            .expect("hub builds");
        let addr: SocketAddr = ([127, 0, 0, 1], app.port()).into();
        let grpc = app
            .grpc_port()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = app
                .run_until_stopped(async {
                    let _ = stopped.await;
                })
                .await;
        });
        InProcessHub {
            addr,
            grpc,
            stop,
            done,
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the node (it drains first) and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = timeout(Duration::from_secs(30), self.done).await;
    }
}
