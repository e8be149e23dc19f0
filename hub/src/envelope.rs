//! The wire envelope and notification ids, with no I/O.
//!
//! A [`Notification`] is rendered once, when the hub accepts it, into every byte form a
//! transport writes (WebSocket text, SSE event, SSE event framed as an HTTP/1.1 chunk). Every
//! connection that receives it shares those bytes; nothing is re-encoded per connection.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Position of a notification in one user's history: `(epoch, seq)`.
///
/// The epoch names one incarnation of the history; when a history is lost or recreated its
/// epoch changes, which is how a resume against it is recognised as a gap. Within an epoch,
/// `seq` increases by one per notification. On the wire the id is the opaque text
/// `<epoch hex>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    /// History incarnation.
    pub epoch: u64,
    /// Position within the incarnation, starting at 1.
    pub seq: u64,
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}", self.epoch, self.seq)
    }
}

/// A resume id that is not one the hub could have issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed notification id")]
pub struct BadId;

impl Id {
    /// "Before the first notification": the position of a stream the connection joined when
    /// the stream had no history. Resuming from it replays everything retained, and is a gap
    /// only when entries were already trimmed from the start.
    pub const START: Id = Id { epoch: 0, seq: 0 };

    /// What an unreadable resume id stands for: a position no history has (a gap).
    pub const UNKNOWN: Id = Id {
        epoch: 0,
        seq: u64::MAX,
    };
}

impl FromStr for Id {
    type Err = BadId;

    fn from_str(s: &str) -> Result<Self, BadId> {
        if s.len() > 64 {
            return Err(BadId);
        }
        let (epoch, seq) = s.split_once('-').ok_or(BadId)?;
        let epoch = u64::from_str_radix(epoch, 16).map_err(|_| BadId)?;
        let seq = seq.parse::<u64>().map_err(|_| BadId)?;
        Ok(Id { epoch, seq })
    }
}

pub use proto::user_id::{MAX_LEN as MAX_USER_ID, check as check_user_id};

/// Longest channel name, in bytes.
pub const MAX_CHANNEL: usize = 128;

/// What starts a channel's stream name. Every stream (a user's personal one, or a channel)
/// is named by one string: the user id itself, or this mark and the channel's name. No user
/// id holds a `{`, so the two never meet; in Redis keys the stream name sits inside the hash
/// tag (`P:m:{{announcements}`), whose tag is then `{announcements`, a tag no user has.
pub const CHANNEL_MARK: char = '{';

/// Checks a channel name: 1–128 characters of `[A-Za-z0-9_.:@/-]`.
pub fn check_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("channel name must not be empty");
    }
    if name.len() > MAX_CHANNEL {
        return Err("channel name longer than 128 characters");
    }
    if !name.chars().all(is_channel_char) {
        return Err("channel name may hold only A-Z, a-z, 0-9 and _ . : @ / -");
    }
    Ok(())
}

/// Whether `c` may be in a channel name.
pub fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:@/-".contains(c)
}

/// The stream name of a channel.
pub fn channel_stream(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 1);
    s.push(CHANNEL_MARK);
    s.push_str(name);
    s
}

/// The channel a stream name stands for; `None` for a user's personal stream.
pub fn channel_of(stream: &str) -> Option<&str> {
    stream.strip_prefix(CHANNEL_MARK)
}

/// Microseconds since the Unix epoch, the hub's acceptance clock.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One accepted notification, pre-rendered for every transport.
#[derive(Debug)]
pub struct Notification {
    /// Its position in its stream's history.
    pub id: Id,
    /// The channel it was published to; `None` for a user's personal notification.
    pub channel: Option<Arc<str>>,
    /// When the hub accepted it (µs since the Unix epoch).
    pub accepted_us: u64,
    /// The envelope JSON, ready to be a WebSocket text frame.
    pub json: Utf8Bytes,
    /// The id written on the wire when it is not `id` itself: a connection's cursor (see
    /// [`crate::cursor`]), for the copy rendered for one connection with channels.
    cursor: Option<Box<str>>,
    /// `id: ..\ndata: ..\n\n`, made on first use (only nodes with SSE clients of the user
    /// pay for it), then shared.
    sse_event: std::sync::OnceLock<Bytes>,
    /// The same event as one HTTP/1.1 chunk, for the raw SSE path; made on first use.
    sse_chunk: std::sync::OnceLock<Bytes>,
    /// A `hub.gap` marker rather than a notification: the backplane lost the user's history
    /// while connections were open; the bytes are the control message (no SSE `id:` line).
    pub gap: bool,
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'a str,
    data: &'a RawValue,
    ts: u64,
}

impl Notification {
    /// Renders a notification of `stream` (a user id or a channel's stream name) once;
    /// `data` is the caller's JSON, embedded unchanged.
    pub fn render(stream: &str, id: Id, kind: &str, data: &RawValue, accepted_us: u64) -> Self {
        let json = envelope_json(Some(id), channel_of(stream), kind, data, accepted_us / 1000);
        Self::from_json(stream, id, json, accepted_us)
    }

    /// Wraps an envelope of `stream` rendered elsewhere (by the backplane's store) with its id.
    pub fn from_json(stream: &str, id: Id, json: String, accepted_us: u64) -> Self {
        Notification {
            id,
            channel: channel_of(stream).map(Arc::from),
            accepted_us,
            json: Utf8Bytes::from(json),
            cursor: None,
            sse_event: std::sync::OnceLock::new(),
            sse_chunk: std::sync::OnceLock::new(),
            gap: false,
        }
    }

    /// This notification as one connection sees it: the same envelope with `cursor` as its
    /// `id` (a connection with channels resumes all its streams from any envelope's id).
    /// A gap marker has no id and is shared as it is.
    pub fn with_cursor(self: &Arc<Self>, cursor: String) -> Arc<Self> {
        if self.gap {
            return self.clone();
        }
        let json = self.json.as_str();
        // The stored envelope starts with `{"id":"<id>",`; an id holds no quote.
        let tail = json
            .strip_prefix("{\"id\":\"")
            .and_then(|rest| rest.split_once("\","))
            .map_or("", |(_, tail)| tail);
        let mut out = String::with_capacity(cursor.len() + tail.len() + 9);
        out.push_str("{\"id\":\"");
        out.push_str(&cursor);
        out.push_str("\",");
        out.push_str(tail);
        Arc::new(Notification {
            id: self.id,
            channel: self.channel.clone(),
            accepted_us: self.accepted_us,
            json: Utf8Bytes::from(out),
            cursor: Some(cursor.into_boxed_str()),
            sse_event: std::sync::OnceLock::new(),
            sse_chunk: std::sync::OnceLock::new(),
            gap: false,
        })
    }

    /// The SSE event: `id:` and `data:` lines (a gap marker has no `id:` line).
    pub fn sse_event(&self) -> &Bytes {
        self.sse_event.get_or_init(|| {
            if self.gap {
                return sse_event(None, self.json.as_str());
            }
            match &self.cursor {
                Some(cursor) => sse_event(Some(cursor), self.json.as_str()),
                None => sse_event(Some(&self.id.to_string()), self.json.as_str()),
            }
        })
    }

    /// The SSE event framed as one HTTP/1.1 chunk.
    pub fn sse_chunk(&self) -> &Bytes {
        self.sse_chunk.get_or_init(|| chunk(self.sse_event()))
    }

    /// The envelope minus its opening `{"id":"..",`: what the store prefixes with the id it
    /// assigns, so the id and the stored bytes come from one atomic step.
    pub fn envelope_tail(stream: &str, kind: &str, data: &RawValue, accepted_us: u64) -> String {
        let mut tail = envelope_json(None, channel_of(stream), kind, data, accepted_us / 1000);
        // Without an id the envelope starts `{"channel"` or `{"type"`: the tail is all but
        // the brace (removed in place).
        if tail.starts_with('{') {
            tail.remove(0);
        }
        tail
    }

    /// A `hub.gap` marker for the user's connections, positioned at `id`: just before the
    /// first retained notification, so a connection that already has everything up to there
    /// drops it (seam filter) and any other is told and then takes what follows.
    pub fn gap_marker(stream: &str, id: Id, reason: &str) -> Self {
        let control = Control::gap(reason, channel_of(stream));
        Notification {
            id,
            channel: channel_of(stream).map(Arc::from),
            accepted_us: now_micros(),
            json: Utf8Bytes::from(control.json),
            cursor: None,
            sse_event: std::sync::OnceLock::new(),
            sse_chunk: std::sync::OnceLock::new(),
            gap: true,
        }
    }
}

/// `data` without raw line breaks. In valid JSON a raw CR or LF can only be whitespace
/// between tokens (inside strings they are escaped), so replacing each with a space keeps
/// the value and lets the envelope travel as one SSE `data:` line.
fn one_line(data: &RawValue) -> std::borrow::Cow<'_, RawValue> {
    let text = data.get();
    if !text.bytes().any(|b| b == b'\n' || b == b'\r') {
        return std::borrow::Cow::Borrowed(data);
    }
    let flat = text.replace(['\n', '\r'], " ");
    match RawValue::from_string(flat) {
        Ok(raw) => std::borrow::Cow::Owned(raw),
        // Cannot happen for valid JSON; keep the original rather than lose the message.
        Err(_) => std::borrow::Cow::Borrowed(data),
    }
}

fn envelope_json(
    id: Option<Id>,
    channel: Option<&str>,
    kind: &str,
    data: &RawValue,
    ts_ms: u64,
) -> String {
    let data = one_line(data);
    let envelope = Envelope {
        id: id.map(|id| id.to_string()),
        channel,
        kind,
        data: &data,
        ts: ts_ms,
    };
    // Serialising a struct of strings, a raw JSON value and an integer cannot fail.
    serde_json::to_string(&envelope).unwrap_or_default()
}

/// One SSE event: an `id:` line when there is an id, one `data:` line (the JSON has no
/// newline), and the blank line that ends the event.
pub fn sse_event(id: Option<&str>, json: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 40);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_slice(b"\n");
    }
    out.put_slice(b"data: ");
    out.put_slice(json.as_bytes());
    out.put_slice(b"\n\n");
    out.freeze()
}

/// Frames bytes as one HTTP/1.1 chunk (`<hex len>\r\n<bytes>\r\n`).
pub fn chunk(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 12);
    out.put_slice(format!("{:x}\r\n", payload.len()).as_bytes());
    out.put_slice(payload);
    out.put_slice(b"\r\n");
    out.freeze()
}

/// A control message (`hub.*`): rendered per connection, never stored, carries no id.
#[derive(Debug, Clone)]
pub struct Control {
    /// The envelope JSON.
    pub json: String,
}

impl Control {
    fn new(kind: &str, data: serde_json::Value) -> Self {
        #[derive(Serialize)]
        struct ControlEnvelope<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            data: serde_json::Value,
            ts: u64,
        }
        let envelope = ControlEnvelope {
            kind,
            data,
            ts: now_micros() / 1000,
        };
        Control {
            json: serde_json::to_string(&envelope).unwrap_or_default(),
        }
    }

    /// `hub.connected`: the first message on every connection. A connection with a cursor
    /// (it follows channels) also gets its channels and its cursor, which resumes every
    /// stream from here before any notification has arrived.
    pub fn connected(user: &str, resumed: bool, streams: Option<(&[&str], &str)>) -> Self {
        match streams {
            None => Self::new(
                "hub.connected",
                serde_json::json!({ "user": user, "resumed": resumed }),
            ),
            Some((channels, cursor)) => Self::new(
                "hub.connected",
                serde_json::json!({
                    "user": user,
                    "resumed": resumed,
                    "channels": channels,
                    "cursor": cursor,
                }),
            ),
        }
    }

    /// The reason of a `hub.gap` for a resume point the history no longer holds.
    pub const RESUME_LOST: &str = "resume point not in history";

    /// `hub.gap`: the resume point is not in the retained history; refetch state. A
    /// channel's gap names the channel (a personal stream's has no `channel`).
    pub fn gap(reason: &str, channel: Option<&str>) -> Self {
        match channel {
            Some(channel) => Self::new(
                "hub.gap",
                serde_json::json!({ "reason": reason, "channel": channel }),
            ),
            None => Self::new("hub.gap", serde_json::json!({ "reason": reason })),
        }
    }

    /// `hub.subscribed`: a WebSocket `subscribe` was accepted; `cursor` resumes every stream
    /// of the connection, the new channel included, from here.
    pub fn subscribed(channel: &str, cursor: &str) -> Self {
        Self::new(
            "hub.subscribed",
            serde_json::json!({ "channel": channel, "cursor": cursor }),
        )
    }

    /// `hub.unsubscribed`: a WebSocket `unsubscribe` took effect.
    pub fn unsubscribed(channel: &str) -> Self {
        Self::new(
            "hub.unsubscribed",
            serde_json::json!({ "channel": channel }),
        )
    }

    /// `hub.closing`: the server is about to end the stream or close the socket on purpose.
    pub fn closing(reason: &str) -> Self {
        Self::new("hub.closing", serde_json::json!({ "reason": reason }))
    }

    /// `hub.refreshed`: a WebSocket `refresh` was accepted; `exp` is the new expiry.
    pub fn refreshed(exp: u64) -> Self {
        Self::new("hub.refreshed", serde_json::json!({ "exp": exp }))
    }

    /// `hub.error`: a client message was refused.
    pub fn error(reason: &str) -> Self {
        Self::new("hub.error", serde_json::json!({ "reason": reason }))
    }

    /// The SSE event form (no `id:` line, so it does not move the browser's Last-Event-ID).
    pub fn sse_event(&self) -> Bytes {
        sse_event(None, &self.json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_and_orders_within_an_epoch() {
        let a = Id {
            epoch: 0xabc,
            seq: 9,
        };
        let b = Id {
            epoch: 0xabc,
            seq: 10,
        };
        assert_eq!(a.to_string(), "abc-9");
        assert_eq!("abc-10".parse::<Id>(), Ok(b));
        assert!(a < b);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in ["", "abc", "zz-1", "1-x", "1-", "-1", "1-2-3"] {
            assert_eq!(bad.parse::<Id>(), Err(BadId), "{bad}");
        }
    }

    #[test]
    fn rendering_embeds_data_unchanged_and_frames_sse() {
        let data = RawValue::from_string(r#"{"a":[1,2],"s":"x\ny"}"#.to_owned()).unwrap();
        let n = Notification::render(
            "u",
            Id { epoch: 1, seq: 2 },
            "promo",
            &data,
            1_700_000_000_123_456,
        );
        assert_eq!(
            n.json.as_str(),
            r#"{"id":"1-2","type":"promo","data":{"a":[1,2],"s":"x\ny"},"ts":1700000000123}"#
        );
        let event = std::str::from_utf8(n.sse_event()).unwrap();
        assert_eq!(event, format!("id: 1-2\ndata: {}\n\n", n.json.as_str()));
        let chunk = std::str::from_utf8(n.sse_chunk()).unwrap();
        assert_eq!(chunk, format!("{:x}\r\n{event}\r\n", event.len()));
    }

    #[test]
    fn the_tail_plus_an_id_is_the_envelope() {
        let data = RawValue::from_string(r#"{"k":1}"#.to_owned()).unwrap();
        let id = Id {
            epoch: 0xab,
            seq: 7,
        };
        let tail = Notification::envelope_tail("u", "t", &data, 5_000);
        let joined = format!("{{\"id\":\"{id}\",{tail}");
        assert_eq!(
            joined,
            Notification::render("u", id, "t", &data, 5_000)
                .json
                .as_str()
        );
    }

    #[test]
    fn line_breaks_in_data_become_spaces_and_the_value_is_kept() {
        let raw = "{\r\n  \"a\": [1,\n2],\n  \"s\": \"x\\ny\"\n}";
        let data = RawValue::from_string(raw.to_owned()).unwrap();
        let n = Notification::render("u", Id { epoch: 1, seq: 1 }, "t", &data, 0);
        assert!(!n.json.as_str().contains(['\n', '\r']));
        let event = std::str::from_utf8(n.sse_event()).unwrap();
        assert_eq!(
            event.matches('\n').count(),
            3,
            "id line, one data line, blank line"
        );
        let v: serde_json::Value = serde_json::from_str(n.json.as_str()).unwrap();
        let original: serde_json::Value = serde_json::from_str(raw).unwrap();
        assert_eq!(v["data"], original);
        let tail = Notification::envelope_tail("u", "t", &data, 0);
        assert!(!tail.contains('\n'));
    }

    #[test]
    fn user_ids_with_braces_or_control_characters_are_refused() {
        assert!(check_user_id("alice").is_ok());
        assert!(check_user_id("user@example.com/ü 1").is_ok());
        for bad in ["", "a}b", "{a", "a\nb", "a\u{0}"] {
            assert!(check_user_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_user_id(&"x".repeat(256)).is_ok());
        assert!(check_user_id(&"x".repeat(257)).is_err());
    }

    #[test]
    fn a_channel_notification_names_its_channel_and_takes_a_cursor_as_its_id() {
        let data = RawValue::from_string(r#"{"k":"v"}"#.to_owned()).unwrap();
        let stream = channel_stream("room:1");
        let id = Id { epoch: 0xa, seq: 3 };
        let n = Arc::new(Notification::render(&stream, id, "chat", &data, 7_000));
        assert_eq!(n.channel.as_deref(), Some("room:1"));
        assert_eq!(
            n.json.as_str(),
            r#"{"id":"a-3","channel":"room:1","type":"chat","data":{"k":"v"},"ts":7}"#
        );
        // The store's form (tail + id) is the same envelope.
        let tail = Notification::envelope_tail(&stream, "chat", &data, 7_000);
        assert_eq!(format!("{{\"id\":\"{id}\",{tail}"), n.json.as_str());
        let mine = n.with_cursor("a-3.0000abcd~b-9".to_owned());
        assert_eq!(
            mine.json.as_str(),
            r#"{"id":"a-3.0000abcd~b-9","channel":"room:1","type":"chat","data":{"k":"v"},"ts":7}"#
        );
        assert_eq!(
            std::str::from_utf8(mine.sse_event()).unwrap(),
            format!("id: a-3.0000abcd~b-9\ndata: {}\n\n", mine.json.as_str())
        );
        assert_eq!((mine.id, mine.accepted_us), (n.id, n.accepted_us));
        // A personal notification of the same connection keeps its own fields.
        let personal = Arc::new(Notification::render("u", id, "t", &data, 0));
        assert!(personal.channel.is_none());
        assert!(!personal.json.as_str().contains("channel"));
        // A gap marker has no id to replace.
        let gap = Arc::new(Notification::gap_marker(&stream, id, "lost"));
        assert!(Arc::ptr_eq(&gap.with_cursor("x".to_owned()), &gap));
        assert!(gap.json.as_str().contains(r#""channel":"room:1""#));
    }

    #[test]
    fn channel_names_follow_the_rule() {
        for ok in ["a", "announcements", "order:o-123", "room/42", "u@x.y_z-1"] {
            assert!(check_channel(ok).is_ok(), "{ok}");
            assert_eq!(channel_of(&channel_stream(ok)), Some(ok));
        }
        for bad in ["", "a b", "a{b", "é", "a\n"] {
            assert!(check_channel(bad).is_err(), "{bad:?}");
        }
        assert!(check_channel(&"x".repeat(128)).is_ok());
        assert!(check_channel(&"x".repeat(129)).is_err());
        // No user id is a channel's stream name.
        assert_eq!(channel_of("alice"), None);
        assert!(check_user_id(&channel_stream("a")).is_err());
    }

    #[test]
    fn control_messages_have_no_id() {
        let c = Control::connected("alice", false, None);
        let v: serde_json::Value = serde_json::from_str(&c.json).unwrap();
        assert_eq!(v["type"], "hub.connected");
        assert_eq!(v["data"]["user"], "alice");
        assert!(v.get("id").is_none());
        assert!(!String::from_utf8_lossy(&c.sse_event()).contains("id:"));
    }

    mod fuzz {
        //! Resume ids (`since`, `Last-Event-ID`) and user ids from outside never panic.

        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_resume_id_parses_or_is_refused(text in "\\PC{0,80}") {
                if let Ok(id) = text.parse::<Id>() {
                    prop_assert_eq!(id.to_string().parse::<Id>(), Ok(id));
                }
            }

            #[test]
            fn issued_ids_round_trip(epoch in any::<u64>(), seq in any::<u64>()) {
                let id = Id { epoch, seq };
                prop_assert_eq!(id.to_string().parse::<Id>(), Ok(id));
            }

            #[test]
            fn user_id_rules_hold_for_any_text(text in "\\PC{0,300}") {
                if check_user_id(&text).is_ok() {
                    prop_assert!(!text.is_empty() && text.len() <= MAX_USER_ID);
                    let braces = text.contains(['{', '}']);
                    prop_assert!(!braces, "braces accepted");
                }
            }

            #[test]
            fn rendering_any_json_data_gives_one_line_envelopes(
                value in proptest::collection::vec("[ \\r\\n\\t]{0,3}", 1..6),
                text in "\\PC{0,20}",
            ) {
                let pretty = format!(
                    "{{{}\"k\"{}:{}{}{}}}",
                    value[0],
                    value.get(1).cloned().unwrap_or_default(),
                    value.get(2).cloned().unwrap_or_default(),
                    serde_json::to_string(&text).unwrap_or_default(),
                    value.get(3).cloned().unwrap_or_default(),
                );
                let data = RawValue::from_string(pretty).expect("valid JSON");
                let n = Notification::render("u", Id { epoch: 1, seq: 1 }, "t", &data, 0);
                prop_assert!(!n.json.as_str().contains(['\n', '\r']));
                let v: serde_json::Value = serde_json::from_str(n.json.as_str()).expect("JSON");
                prop_assert_eq!(&v["data"]["k"], &serde_json::Value::String(text));
            }
        }
    }
}
