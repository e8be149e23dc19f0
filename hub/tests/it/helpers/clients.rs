//! The hub's view of the shared WebSocket and SSE clients: both transports opened and read
//! the same way, and refusals checked on both.

use serde_json::Value;
use test_support::clients::{Event, Refused, SseClient, WsClient};

use crate::helpers::app::TestApp;

/// Asserts that a refusal body is JSON with a non-empty `error` string.
pub fn assert_json_error(body: &str, what: &str) {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body:?}"));
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: no \"error\" string in {body}"
    );
}

/// Asserts that both transports refuse `token` with `status` and a JSON error, and that the
/// refusals were counted under the rejection `reason` (`expected_count` in total).
pub async fn refused_on_both(
    app: &TestApp,
    token: &str,
    status: u16,
    reason: &str,
    expected_count: f64,
    what: &str,
) {
    let Err(r) = WsClient::connect(app, token, "").await else {
        panic!("{what}: a WebSocket was accepted");
    };
    assert_eq!(r.status, status, "{what}, WS: {}", r.body);
    assert_json_error(&r.body, &format!("{what}, WS"));
    let Err(r) = SseClient::connect(app, token, "").await else {
        panic!("{what}: an SSE stream was accepted");
    };
    assert_eq!(r.status, status, "{what}, SSE: {}", r.body);
    assert_json_error(&r.body, &format!("{what}, SSE"));
    let series = format!("hub_handshake_rejections_total{{reason=\"{reason}\"}}");
    assert_eq!(
        app.metric(&series).await,
        expected_count,
        "{what}: {series}"
    );
}

/// Which transport a test client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ws,
    Sse,
}

/// A WebSocket or SSE client, read the same way.
pub enum Conn {
    Ws(WsClient),
    Sse(SseClient),
}

impl Conn {
    /// Opens a connection for `user` (resuming after `since` when given).
    pub async fn try_open(
        kind: Kind,
        app: &TestApp,
        user: &str,
        since: Option<&str>,
    ) -> Result<Conn, Refused> {
        let token = app.token(user);
        match kind {
            Kind::Ws => {
                let query = since.map(|id| format!("since={id}")).unwrap_or_default();
                WsClient::connect(app, &token, &query).await.map(Conn::Ws)
            }
            Kind::Sse => {
                let path = format!("/sse?token={token}");
                let headers: Vec<(&str, &str)> = since
                    .map(|id| vec![("Last-Event-ID", id)])
                    .unwrap_or_default();
                SseClient::connect_with(app, &path, &headers)
                    .await
                    .map(Conn::Sse)
            }
        }
    }

    /// Opens a connection and reads its greeting; `Err` when the handshake is refused.
    pub async fn open_or_refused(
        kind: Kind,
        app: &TestApp,
        user: &str,
        since: Option<&str>,
    ) -> Result<(Conn, Value), Refused> {
        let mut conn = Self::try_open(kind, app, user, since).await?;
        let hello = conn
            .next()
            .await
            .unwrap_or_else(|| panic!("{kind:?} for {user} closed before its greeting"));
        assert_eq!(hello["type"], "hub.connected", "first envelope: {hello}");
        assert_eq!(hello["data"]["user"], user, "greeting names the user");
        Ok((conn, hello["data"].clone()))
    }

    /// Opens a connection that must be admitted; returns it with its `hub.connected` data.
    pub async fn open(kind: Kind, app: &TestApp, user: &str, since: Option<&str>) -> (Conn, Value) {
        Self::open_or_refused(kind, app, user, since)
            .await
            .unwrap_or_else(|r| panic!("{kind:?} for {user} refused: {} {}", r.status, r.body))
    }

    /// The next envelope, or `None` when the server closed or the connection broke.
    pub async fn next(&mut self) -> Option<Value> {
        match self {
            Conn::Ws(c) => match c.next().await {
                Event::Envelope(v) => Some(v),
                Event::Closed(_) => None,
            },
            Conn::Sse(c) => {
                let e = c.next_event().await?;
                let control = e.data["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("hub."));
                if control {
                    assert_eq!(e.id, None, "control events carry no id: line: {:?}", e.data);
                } else {
                    assert_eq!(
                        e.id.as_deref(),
                        e.data["id"].as_str(),
                        "the id: line is the envelope's id"
                    );
                }
                Some(e.data)
            }
        }
    }

    /// The next envelope; panics when the connection closed.
    pub async fn envelope(&mut self) -> Value {
        self.next()
            .await
            .expect("connection closed while an envelope was expected")
    }
}
