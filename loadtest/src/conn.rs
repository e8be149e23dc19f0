//! What the two transports share: which hub, user, transport and source address each
//! connection gets, the TCP connect, and decoding of the hub's JSON envelopes.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};

use crate::sse::SseConn;
use crate::target::HubAddr;
use crate::ws::WsConn;

/// Transport choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// WebSocket only.
    Ws,
    /// Server-Sent Events only.
    Sse,
    /// Alternate WebSocket and SSE per connection.
    Mixed,
}

impl fmt::Display for TransportMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ws => "ws",
            Self::Sse => "sse",
            Self::Mixed => "mixed",
        })
    }
}

/// Transport of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket at `/ws`.
    Ws,
    /// Server-Sent Events at `/sse`.
    Sse,
}

/// How connections are spread over users, hubs, transports and source addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Total connections over all workers.
    pub connections: usize,
    /// Number of distinct users; connection j belongs to user j % users.
    pub users: usize,
    /// Number of hub nodes.
    pub hubs: usize,
    /// Spread connections over hubs by index instead of by user.
    pub publish_any: bool,
    /// Transport choice.
    pub mode: TransportMode,
    /// Number of `--source-ip` addresses (0 = let the kernel choose).
    pub sources: usize,
}

/// Where and how one connection is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnPlan {
    /// Index of the user the connection authenticates as.
    pub user: usize,
    /// Index of the hub it connects to.
    pub hub: usize,
    /// Its transport.
    pub transport: Transport,
    /// Index into the source addresses, if any were given.
    pub source: Option<usize>,
}

impl Layout {
    /// Plans connection `j` (0-based over all workers).
    pub fn plan(&self, j: usize) -> ConnPlan {
        let hubs = self.hubs.max(1);
        let user = j % self.users.max(1);
        // Without a shared backplane a user's connections and publishes must meet on the
        // same node, so the hub follows the user; with --publish-any it follows j.
        let hub = if self.publish_any {
            j % hubs
        } else {
            user % hubs
        };
        // Alternate transports and source addresses by the connection's rank among its
        // hub's connections rather than by j, so that neither lines up with the hub
        // round-robin (with 2 hubs, j % 2 would give each hub a single transport).
        let rank = j / hubs;
        let transport = match self.mode {
            TransportMode::Ws => Transport::Ws,
            TransportMode::Sse => Transport::Sse,
            TransportMode::Mixed if rank.is_multiple_of(2) => Transport::Ws,
            TransportMode::Mixed => Transport::Sse,
        };
        let source = (self.sources > 0).then(|| rank % self.sources);
        ConnPlan {
            user,
            hub,
            transport,
            source,
        }
    }
}

/// A failed connection attempt: a short kind for counting and a detail for samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Short, low-cardinality reason such as `"http 503"` or `"tcp connect"`.
    pub kind: String,
    /// Full message, e.g. the error body.
    pub detail: String,
}

impl Failure {
    /// Creates a failure of `kind` with `detail`.
    pub fn new(kind: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Failure {}

/// Connects to `addr`, first binding to `source` (port chosen by the kernel) if given.
pub async fn tcp_connect(
    addr: SocketAddr,
    source: Option<SocketAddr>,
) -> Result<TcpStream, Failure> {
    let io = |kind: &str| {
        let kind = kind.to_owned();
        move |e: std::io::Error| Failure::new(kind, e.to_string())
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io("socket"))?;
    if let Some(local) = source {
        if local.port() != 0 {
            // An explicit port may still have TIME_WAIT entries from an earlier run.
            socket.set_reuseaddr(true).map_err(io("socket"))?;
        }
        socket.bind(local).map_err(io("bind source address"))?;
    }
    let stream = socket.connect(addr).await.map_err(io("tcp connect"))?;
    stream.set_nodelay(true).map_err(io("socket"))?;
    Ok(stream)
}

/// An established connection of either transport.
pub enum Conn {
    /// WebSocket connection.
    Ws(Box<WsConn>),
    /// SSE connection.
    Sse(Box<SseConn>),
}

impl Conn {
    /// Opens a connection with `token` using `transport`, resuming after the envelope id
    /// `resume` if given (WS `since=`, SSE `Last-Event-ID`).
    pub async fn open(
        transport: Transport,
        hub: &HubAddr,
        token: &str,
        resume: Option<&str>,
        source: Option<std::net::SocketAddr>,
    ) -> Result<Self, Failure> {
        Ok(match transport {
            Transport::Ws => Self::Ws(Box::new(WsConn::connect(hub, token, resume, source).await?)),
            Transport::Sse => Self::Sse(Box::new(
                SseConn::connect(hub, token, resume, source).await?,
            )),
        })
    }

    /// Sends a text message over a WebSocket; SSE cannot send.
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        match self {
            Self::Ws(ws) => ws.send_text(text).await,
            Self::Sse(_) => anyhow::bail!("an SSE connection cannot send"),
        }
    }

    /// Waits for the next envelope payload; the connection ending is an error.
    pub async fn next_payload(&mut self) -> Result<Bytes> {
        match self {
            Self::Ws(ws) => ws.next_payload().await,
            Self::Sse(sse) => sse.next_payload().await,
        }
    }
}

/// `text` percent-encoded for a query string: everything but RFC 3986's unreserved
/// characters is escaped, so an opaque id travels unchanged whatever it holds.
pub fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a received envelope turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// The hub's greeting after authentication.
    Connected {
        /// Whether the hub resumed from the id the connection gave.
        resumed: bool,
        /// The connection's position in every stream (connections with channels): the
        /// resume id until a notification brings a newer one.
        cursor: Option<Cow<'a, str>>,
    },
    /// A notification published by this tool.
    Load {
        /// Publisher's wall clock at send time, µs since the Unix epoch.
        sent_us: u64,
        /// Per-stream sequence number.
        seq: u64,
        /// The channel it was published to; none for the personal stream.
        channel: Option<Cow<'a, str>>,
        /// The envelope's id: the cursor to resume from.
        id: Option<Cow<'a, str>>,
    },
    /// `hub.subscribed`: a WebSocket `subscribe` took effect.
    Subscribed {
        /// The channel joined.
        channel: Option<Cow<'a, str>>,
        /// The connection's position in every stream, the new channel included.
        cursor: Option<Cow<'a, str>>,
    },
    /// `hub.error`: a message the client sent was refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// `hub.gap`: a stream's resume point was lost.
    Gap {
        /// The channel whose position was lost; none for the personal stream.
        channel: Option<Cow<'a, str>>,
    },
    /// Any other envelope type.
    Other,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct LoadData {
    sent_us: u64,
    seq: u64,
}

#[derive(Deserialize)]
struct ConnectedData<'a> {
    #[serde(default)]
    resumed: bool,
    #[serde(borrow, default)]
    cursor: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SubscribedData<'a> {
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    cursor: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ErrorData {
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct GapData<'a> {
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
}

/// Classifies one envelope, `{"id":…,"type":…,"data":{…},"ts":…[,"channel":…]}`.
pub fn parse_envelope(payload: &[u8]) -> Result<Envelope<'_>> {
    let envelope: RawEnvelope<'_> =
        serde_json::from_slice(payload).context("payload is not a JSON envelope")?;
    let data = |what: &str| {
        envelope
            .data
            .with_context(|| format!("{what} envelope without data"))
    };
    Ok(match envelope.kind.as_ref() {
        "hub.connected" => {
            // Older hubs sent no data here; a greeting is a greeting.
            match envelope.data {
                Some(raw) => {
                    let data: ConnectedData<'_> = serde_json::from_str(raw.get())
                        .context("hub.connected data is not an object")?;
                    Envelope::Connected {
                        resumed: data.resumed,
                        cursor: data.cursor,
                    }
                }
                None => Envelope::Connected {
                    resumed: false,
                    cursor: None,
                },
            }
        }
        "hub.subscribed" => {
            let data: SubscribedData<'_> = serde_json::from_str(data("hub.subscribed")?.get())
                .context("hub.subscribed data is not an object")?;
            Envelope::Subscribed {
                channel: data.channel,
                cursor: data.cursor,
            }
        }
        "hub.error" => {
            let data: ErrorData = serde_json::from_str(data("hub.error")?.get())
                .context("hub.error data is not an object")?;
            Envelope::Refused {
                reason: data.reason,
            }
        }
        "hub.gap" => {
            let gap: GapData<'_> = serde_json::from_str(data("hub.gap")?.get())
                .context("hub.gap data is not an object")?;
            Envelope::Gap {
                channel: gap.channel,
            }
        }
        "load" => {
            let load: LoadData =
                serde_json::from_str(data("load")?.get()).context("load data lacks sent_us/seq")?;
            Envelope::Load {
                sent_us: load.sent_us,
                seq: load.seq,
                channel: envelope.channel,
                id: envelope.id,
            }
        }
        _ => Envelope::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(connections: usize, users: usize, hubs: usize, publish_any: bool) -> Layout {
        Layout {
            connections,
            users,
            hubs,
            publish_any,
            mode: TransportMode::Mixed,
            sources: 2,
        }
    }

    #[test]
    fn hub_follows_user_unless_publish_any() {
        let by_user = layout(12, 4, 3, false);
        for j in 0..12 {
            let plan = by_user.plan(j);
            assert_eq!(plan.user, j % 4);
            assert_eq!(plan.hub, (j % 4) % 3, "j={j}");
        }
        let any = layout(12, 4, 3, true);
        for j in 0..12 {
            assert_eq!(any.plan(j).hub, j % 3);
        }
    }

    #[test]
    fn each_hub_gets_both_transports_and_all_sources() {
        let l = layout(8, 8, 2, true);
        for hub in 0..2 {
            let plans: Vec<_> = (0..8).map(|j| l.plan(j)).filter(|p| p.hub == hub).collect();
            assert!(plans.iter().any(|p| p.transport == Transport::Ws));
            assert!(plans.iter().any(|p| p.transport == Transport::Sse));
            assert!(plans.iter().any(|p| p.source == Some(0)));
            assert!(plans.iter().any(|p| p.source == Some(1)));
        }
        let plain = Layout {
            mode: TransportMode::Sse,
            sources: 0,
            ..l
        };
        assert_eq!(plain.plan(3).transport, Transport::Sse);
        assert_eq!(plain.plan(3).source, None);
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_escape("01J-a.b_c~"), "01J-a.b_c~");
        assert_eq!(query_escape("a+b/c=d&e f"), "a%2Bb%2Fc%3Dd%26e%20f");
        assert_eq!(query_escape("\u{e9}"), "%C3%A9");
    }

    #[test]
    fn parses_envelopes() -> Result<()> {
        let connected =
            br#"{"type":"hub.connected","data":{"user":"lt-1","resumed":false},"ts":1}"#;
        assert_eq!(
            parse_envelope(connected)?,
            Envelope::Connected {
                resumed: false,
                cursor: None
            }
        );
        let resumed = br#"{"type":"hub.connected","data":{"user":"lt-1","resumed":true,"channels":["c"],"cursor":"5-1.0a0b0c0d~0-0"}}"#;
        assert_eq!(
            parse_envelope(resumed)?,
            Envelope::Connected {
                resumed: true,
                cursor: Some("5-1.0a0b0c0d~0-0".into())
            }
        );

        let load =
            br#"{"id":"01J","type":"load","data":{"sent_us":1700000000000000,"seq":42},"ts":5}"#;
        assert_eq!(
            parse_envelope(load)?,
            Envelope::Load {
                sent_us: 1_700_000_000_000_000,
                seq: 42,
                channel: None,
                id: Some("01J".into()),
            }
        );

        let on_channel = br#"{"id":"c.1-2","type":"load","channel":"load:all","data":{"sent_us":2,"seq":1},"ts":5}"#;
        assert_eq!(
            parse_envelope(on_channel)?,
            Envelope::Load {
                sent_us: 2,
                seq: 1,
                channel: Some("load:all".into()),
                id: Some("c.1-2".into()),
            }
        );

        let escaped = br#"{"id":"x","type":"lo\u0061d","data":{"seq":1,"sent_us":2,"extra":[1]}}"#;
        assert!(matches!(
            parse_envelope(escaped)?,
            Envelope::Load {
                sent_us: 2,
                seq: 1,
                ..
            }
        ));

        let gap = br#"{"type":"hub.gap","data":{"channel":"load:g1"},"ts":1}"#;
        assert_eq!(
            parse_envelope(gap)?,
            Envelope::Gap {
                channel: Some("load:g1".into())
            }
        );
        assert_eq!(
            parse_envelope(
                br#"{"type":"hub.subscribed","data":{"channel":"load:g1","cursor":"c"}}"#
            )?,
            Envelope::Subscribed {
                channel: Some("load:g1".into()),
                cursor: Some("c".into())
            }
        );
        assert_eq!(
            parse_envelope(br#"{"type":"hub.error","data":{"reason":"no"}}"#)?,
            Envelope::Refused {
                reason: "no".into()
            }
        );
        let personal_gap = br#"{"type":"hub.gap","data":{},"ts":1}"#;
        assert_eq!(
            parse_envelope(personal_gap)?,
            Envelope::Gap { channel: None }
        );

        assert_eq!(
            parse_envelope(br#"{"type":"news","data":[1,2]}"#)?,
            Envelope::Other
        );
        assert!(parse_envelope(b"not json").is_err());
        assert!(parse_envelope(br#"{"type":"load"}"#).is_err());
        assert!(parse_envelope(br#"{"type":"load","data":{"seq":-1,"sent_us":2}}"#).is_err());
        assert!(parse_envelope(br#"{"type":"hub.gap","data":"x"}"#).is_err());
        Ok(())
    }
}
