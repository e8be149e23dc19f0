//! A consumed record as a handler sees it, and the one content-type decision.

use rdkafka::Message as _;
use rdkafka::message::{Headers as _, OwnedMessage};

pub use proto::ContentType;

/// How a record's value is encoded, from its `content-type` header (case and parameters
/// ignored; absent means protobuf). An unknown type is a reason to send the record to the DLQ:
/// guessing would turn a producer's mistake into garbage or a misleading decode error.
pub fn content_type(header: Option<&[u8]>) -> Result<ContentType, String> {
    ContentType::from_header(header).map_err(|e| format!("bad content-type: {e}"))
}

/// The value of a message's first header named `name` (ASCII case ignored).
pub fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|header| header.key.eq_ignore_ascii_case(name))
            .map(|header| header.value.unwrap_or_default())
    })
}

/// The trace id of a W3C `traceparent` value (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id(traceparent: Option<&[u8]>) -> Option<&str> {
    let text = std::str::from_utf8(traceparent?).ok()?;
    let id = text.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// One consumed record whose content type is known.
pub struct Record<'a> {
    message: &'a OwnedMessage,
    content_type: ContentType,
}

impl<'a> Record<'a> {
    /// The record, or why it goes to the DLQ without reaching a handler.
    pub fn new(message: &'a OwnedMessage) -> Result<Self, String> {
        let content_type = content_type(header(message, "content-type"))?;
        Ok(Record {
            message,
            content_type,
        })
    }

    /// The consumed message itself.
    pub fn message(&self) -> &'a OwnedMessage {
        self.message
    }

    /// Topic.
    pub fn topic(&self) -> &'a str {
        self.message.topic()
    }

    /// Partition.
    pub fn partition(&self) -> i32 {
        self.message.partition()
    }

    /// Offset.
    pub fn offset(&self) -> i64 {
        self.message.offset()
    }

    /// Key.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.message.key()
    }

    /// Value (empty when there is none).
    pub fn payload(&self) -> &'a [u8] {
        self.message.payload().unwrap_or_default()
    }

    /// How the value is encoded.
    pub fn content_type(&self) -> ContentType {
        self.content_type
    }

    /// The Kafka timestamp, in milliseconds since the epoch.
    pub fn timestamp_millis(&self) -> Option<i64> {
        self.message.timestamp().to_millis()
    }

    /// The first header named `name` (ASCII case ignored).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        header(self.message, name)
    }

    /// The W3C `traceparent` header, as text.
    pub fn traceparent(&self) -> Option<&'a str> {
        self.header("traceparent")
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The trace id of the record's `traceparent` (empty without one).
    pub fn trace_id(&self) -> &'a str {
        trace_id(self.header("traceparent")).unwrap_or_default()
    }

    /// Decodes the value as `T`; the error is the reason the record goes to the DLQ.
    pub fn decode<T>(&self) -> Result<T, String>
    where
        T: prost::Message + prost::Name + Default + serde::de::DeserializeOwned,
    {
        proto::decode(self.content_type, self.payload()).map_err(|e| format!("undecodable: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_content_types_decode_and_unknown_ones_are_refused() {
        assert_eq!(content_type(None), Ok(ContentType::Protobuf));
        assert_eq!(content_type(Some(b"")), Ok(ContentType::Protobuf));
        assert_eq!(
            content_type(Some(b"Application/JSON; charset=utf-8")),
            Ok(ContentType::Json)
        );
        assert_eq!(
            content_type(Some(b"application/x-protobuf")),
            Ok(ContentType::Protobuf)
        );
        let refused = content_type(Some(b"text/plain")).expect_err("unknown");
        assert!(
            refused.starts_with("bad content-type: unsupported content-type \"text/plain\""),
            "{refused}"
        );
    }

    #[test]
    fn trace_ids_come_from_well_formed_traceparents_only() {
        let good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(Some(good)),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(Some(b"00-xyz-00f067aa0ba902b7-01")), None);
        assert_eq!(trace_id(None), None);
    }
}
