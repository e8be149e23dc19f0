//! A WebSocket and an SSE client of the hub, each reading one envelope at a time with a
//! deadline (or, for a collecting task, without one).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::STEP;
use crate::app::InProcessHub;

/// Anything with a hub listener the clients can connect to.
pub trait Endpoint {
    /// The hub's listener.
    fn addr(&self) -> SocketAddr;
}

impl Endpoint for SocketAddr {
    fn addr(&self) -> SocketAddr {
        *self
    }
}

impl Endpoint for InProcessHub {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// What a client saw next.
#[derive(Debug)]
pub enum Event {
    /// One envelope.
    Envelope(Value),
    /// The server closed (WS close code, if any) or ended the stream.
    Closed(Option<u16>),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client.
pub struct WsClient {
    ws: Ws,
}

/// A refused handshake: status and JSON body.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub body: String,
}

impl WsClient {
    /// Connects to `url` with extra headers.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Self, Refused> {
        let mut req = url.into_client_request().expect("valid URL");
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                http::HeaderValue::from_str(v).expect("header value"),
            );
        }
        match timeout(STEP, tokio_tungstenite::connect_async(req)).await {
            Ok(Ok((ws, _))) => Ok(WsClient { ws }),
            Ok(Err(WsError::Http(resp))) => Err(Refused {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Ok(Err(e)) => panic!("ws connect failed: {e}"),
            Err(_) => panic!("ws connect timed out"),
        }
    }

    /// Connects to `/ws` with a token in the query plus `extra_query`.
    pub async fn connect(
        app: &impl Endpoint,
        token: &str,
        extra_query: &str,
    ) -> Result<Self, Refused> {
        let mut q = format!("token={token}");
        if !extra_query.is_empty() {
            q.push('&');
            q.push_str(extra_query);
        }
        Self::connect_with(&format!("ws://{}/ws?{q}", app.addr()), &[]).await
    }

    /// The next envelope or close; pings are answered by the library.
    pub async fn next(&mut self) -> Event {
        self.read(Some(STEP)).await
    }

    /// The next envelope or close, however long it takes (for a task that collects).
    pub async fn recv(&mut self) -> Event {
        self.read(None).await
    }

    /// The next envelope or close, each frame within `per_frame` when given.
    async fn read(&mut self, per_frame: Option<Duration>) -> Event {
        loop {
            let msg = match per_frame {
                Some(limit) => timeout(limit, self.ws.next())
                    .await
                    .expect("no WebSocket event within the deadline"),
                None => self.ws.next().await,
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Event::Envelope(
                        serde_json::from_str(t.as_str()).expect("JSON envelope"),
                    );
                }
                Some(Ok(Message::Close(frame))) => {
                    // Send the queued close reply now, as a browser would.
                    let _ = self.ws.flush().await;
                    return Event::Closed(frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    /// The next envelope; panics on close.
    pub async fn envelope(&mut self) -> Value {
        match self.next().await {
            Event::Envelope(v) => v,
            Event::Closed(c) => panic!("closed ({c:?}) while an envelope was expected"),
        }
    }

    /// Waits for the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            if let Event::Closed(c) = self.next().await {
                return c;
            }
        }
    }

    /// Expects `hub.closing` with `reason` as the last message, then the close; returns the
    /// close code.
    pub async fn closing(&mut self, reason: &str) -> Option<u16> {
        loop {
            match self.next().await {
                Event::Envelope(v) if v["type"] == "hub.closing" => {
                    assert_eq!(v["data"]["reason"], reason, "hub.closing reason");
                    assert!(v.get("id").is_none(), "control messages carry no id");
                    break;
                }
                Event::Envelope(v) => {
                    assert!(
                        !v["type"].as_str().unwrap_or_default().starts_with("hub."),
                        "unexpected control message before hub.closing: {v}"
                    );
                }
                Event::Closed(c) => panic!("closed ({c:?}) without hub.closing"),
            }
        }
        match self.next().await {
            Event::Closed(c) => c,
            Event::Envelope(v) => panic!("{v} after hub.closing"),
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// One SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `id:` line.
    pub id: Option<String>,
    /// `data:` parsed as JSON.
    pub data: Value,
}

/// A minimal SSE client over a raw socket (chunked transfer decoding included).
pub struct SseClient {
    stream: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    chunked: bool,
    ended: bool,
    /// Response headers (lower-case names).
    pub headers: Vec<(String, String)>,
}

impl SseClient {
    /// Connects to `path_and_query` with extra headers.
    pub async fn connect_with(
        app: &impl Endpoint,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, Refused> {
        let addr = app.addr();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let (status, head_len, hdrs) = loop {
            let mut buf = [0u8; 4096];
            let n = timeout(STEP, stream.read(&mut buf))
                .await
                .expect("SSE response within the deadline")
                .expect("read");
            assert!(n > 0, "closed before a response head");
            raw.extend_from_slice(&buf[..n]);
            let mut h = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut h);
            if let httparse::Status::Complete(len) = resp.parse(&raw).expect("HTTP response") {
                let hdrs: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (resp.code.unwrap_or(0), len, hdrs);
            }
        };
        raw.drain(..head_len);
        if status != 200 {
            // Read the rest of a small refusal body.
            let _ = timeout(Duration::from_secs(2), stream.read_to_end(&mut raw)).await;
            return Err(Refused {
                status,
                body: String::from_utf8_lossy(&raw).into_owned(),
            });
        }
        let chunked = hdrs
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        Ok(SseClient {
            stream,
            raw,
            body: Vec::new(),
            chunked,
            ended: false,
            headers: hdrs,
        })
    }

    /// Connects to `/sse` with a token in the query plus `extra_query`.
    pub async fn connect(
        app: &impl Endpoint,
        token: &str,
        extra_query: &str,
    ) -> Result<Self, Refused> {
        let mut q = format!("/sse?token={token}");
        if !extra_query.is_empty() {
            q.push('&');
            q.push_str(extra_query);
        }
        Self::connect_with(app, &q, &[]).await
    }

    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        loop {
            let Some(pos) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = String::from_utf8_lossy(&self.raw[..pos]).into_owned();
            let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < pos + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[pos + 2..pos + 2 + size]);
            self.raw.drain(..pos + 2 + size + 2);
        }
    }

    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            let pos = self.body.windows(2).position(|w| w == b"\n\n")?;
            let block = String::from_utf8_lossy(&self.body[..pos]).into_owned();
            self.body.drain(..pos + 2);
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).expect("JSON data"));
                }
            }
            // Comments (heartbeats) and `retry:` blocks carry no data.
            if let Some(data) = data {
                return Some(SseEvent { id, data });
            }
        }
    }

    /// The next event with data, or `None` when the stream ended.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        self.read_event(Some(STEP)).await
    }

    /// The next event with data however long it takes (for a task that collects), or `None`
    /// when the stream ended.
    pub async fn recv_event(&mut self) -> Option<SseEvent> {
        self.read_event(None).await
    }

    /// The next event with data, each read within `per_read` when given.
    async fn read_event(&mut self, per_read: Option<Duration>) -> Option<SseEvent> {
        loop {
            self.decode();
            if let Some(e) = self.take_event() {
                return Some(e);
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 8192];
            let read = self.stream.read(&mut buf);
            let n = match per_read {
                Some(limit) => timeout(limit, read)
                    .await
                    .expect("no SSE event within the deadline"),
                None => read.await,
            }
            .unwrap_or(0);
            if n == 0 {
                self.ended = true;
                self.decode();
                return self.take_event();
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// Expects `hub.closing` with `reason` (no `id:` line), then the end of the stream.
    pub async fn closing(&mut self, reason: &str) {
        let e = self
            .next_event()
            .await
            .expect("stream ended without hub.closing");
        assert_eq!(
            e.data["type"], "hub.closing",
            "expected hub.closing, got {}",
            e.data
        );
        assert_eq!(e.data["data"]["reason"], reason, "hub.closing reason");
        assert!(e.id.is_none(), "control events carry no id: line");
        assert!(
            self.next_event().await.is_none(),
            "the stream carried an event after hub.closing"
        );
    }

    /// The next event; panics when the stream ended.
    pub async fn event(&mut self) -> SseEvent {
        self.next_event()
            .await
            .expect("stream ended while an event was expected")
    }
}
