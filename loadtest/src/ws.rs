//! WebSocket client: tokio-tungstenite over a TCP stream this crate connects itself,
//! so that it can bind a source address.

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::conn::{Failure, query_escape, tcp_connect};
use crate::target::HubAddr;

/// Largest envelope accepted; the hub's are well under a kilobyte.
const MAX_MESSAGE: usize = 1 << 20;

/// Buffer sizes sized for many mostly idle connections rather than throughput: the
/// 128 KiB defaults are allocated eagerly and would cost gigabytes at 18k connections.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// An established WebSocket connection.
pub struct WsConn {
    stream: WebSocketStream<TcpStream>,
}

impl WsConn {
    /// Connects and performs the upgrade handshake for `GET /ws?token=…[&since=…]`.
    pub async fn connect(
        hub: &HubAddr,
        token: &str,
        since: Option<&str>,
        source: Option<std::net::SocketAddr>,
    ) -> Result<Self, Failure> {
        let tcp = tcp_connect(hub.addr, source).await?;
        let mut url = format!("ws://{}{}?token={token}", hub.authority, hub.path("/ws"));
        if let Some(id) = since {
            url.push_str("&since=");
            url.push_str(&query_escape(id));
        }
        match tokio_tungstenite::client_async_with_config(url, tcp, Some(config())).await {
            Ok((stream, _response)) => Ok(Self { stream }),
            Err(WsError::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                    .unwrap_or_default();
                Err(Failure::new(
                    format!("http {}", response.status().as_u16()),
                    body,
                ))
            }
            Err(e) => Err(Failure::new("ws handshake", e.to_string())),
        }
    }

    /// Sends one text message (a `subscribe`, say).
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.stream
            .send(Message::text(text))
            .await
            .context("writing websocket")
    }

    /// Waits for the next text (or binary) message; pings are answered by tungstenite
    /// while reading, and any close or error ends the connection with an error.
    pub async fn next_payload(&mut self) -> Result<Bytes> {
        loop {
            let message = self
                .stream
                .next()
                .await
                .context("connection closed by server")?
                .context("reading websocket")?;
            match message {
                Message::Text(text) => return Ok(Bytes::from(text)),
                Message::Binary(data) => return Ok(data),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                Message::Close(Some(frame)) => {
                    return Err(anyhow!("server closed: {} {}", frame.code, frame.reason));
                }
                Message::Close(None) => bail!("server closed without a status"),
            }
        }
    }
}
