//! Clients of the hub that collect every envelope they receive, over WebSocket or SSE (the
//! shared clients of `test-support`, read by a task of their own).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use test_support::clients::{Event, SseClient, WsClient};
use test_support::wait::Deadline;

use crate::helpers::STEP;
use crate::helpers::hub::Hub;
use crate::helpers::tokens::token;

/// Which transport an [`Inbox`] uses.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Ws,
    Sse,
}

/// A client connection that collects every envelope it receives.
pub struct Inbox {
    pub transport: Transport,
    events: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Inbox {
    /// Connects `user` and waits for `hub.connected`.
    pub async fn connect(hub: &Hub, secret: &str, user: &str, transport: Transport) -> Inbox {
        let token = token(secret, user);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = match transport {
            Transport::Ws => {
                let mut ws = WsClient::connect(hub, &token, "")
                    .await
                    .unwrap_or_else(|r| panic!("WS refused: {} {}", r.status, r.body));
                tokio::spawn(async move {
                    while let Event::Envelope(v) = ws.recv().await {
                        sink.lock().push(v);
                    }
                })
            }
            Transport::Sse => {
                let mut sse = SseClient::connect(hub, &token, "")
                    .await
                    .unwrap_or_else(|r| panic!("SSE refused: {} {}", r.status, r.body));
                tokio::spawn(async move {
                    while let Some(e) = sse.recv_event().await {
                        sink.lock().push(e.data);
                    }
                })
            }
        };
        let inbox = Inbox {
            transport,
            events,
            task,
        };
        inbox
            .wait("hub.connected", |e| {
                e.iter().any(|v| v["type"] == "hub.connected")
            })
            .await;
        inbox
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().clone()
    }

    /// Envelopes of `kind`.
    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|v| v["type"] == kind)
            .collect()
    }

    /// The statuses of `order_id`, in arrival order.
    pub fn statuses(&self, order_id: &str) -> Vec<String> {
        self.of_type("order.status")
            .iter()
            .filter(|v| v["data"]["order_id"] == order_id)
            .map(|v| v["data"]["status"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until `done(events)` holds.
    pub async fn wait(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        self.wait_within(what, STEP, done).await;
    }

    /// Waits until `done(events)` holds, for at most `limit`.
    pub async fn wait_within(&self, what: &str, limit: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Deadline::after(limit);
        loop {
            if done(&self.events.lock()) {
                return;
            }
            deadline
                .retry(|| {
                    format!(
                        "{what} ({:?}): not within {limit:?}; received: {:?}",
                        self.transport,
                        self.events()
                    )
                })
                .await;
        }
    }

    /// Waits until `order_id` reached `status`.
    pub async fn wait_status(&self, order_id: &str, status: &str) {
        self.wait_status_within(order_id, status, STEP).await;
    }

    /// Waits until `order_id` reached `status`, for at most `limit`.
    pub async fn wait_status_within(&self, order_id: &str, status: &str, limit: Duration) {
        self.wait_within(&format!("order {order_id} {status}"), limit, |events| {
            events.iter().any(|v| {
                v["type"] == "order.status"
                    && v["data"]["order_id"] == order_id
                    && v["data"]["status"] == status
            })
        })
        .await;
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}
