//! Decoding and encoding of event values: protobuf (the default on Kafka) or proto3 JSON (records
//! with `content-type: application/json`).

use prost::{Message, Name};
use serde::{Serialize, de::DeserializeOwned};

/// Why a value could not be decoded or encoded. The message names the protobuf type and the
/// cause, so it can go as is into a DLQ header or a log line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a valid protobuf encoding of the expected message.
    #[error("invalid protobuf for {message}: {cause}")]
    Protobuf {
        /// Full protobuf name of the expected message, e.g. `notifications.orders.v1.OrderStatusChanged`.
        message: String,
        /// What prost reported.
        cause: prost::DecodeError,
    },
    /// The bytes are not a proto3 JSON document of the expected message (syntax error, wrong
    /// type, unknown enum name, bad timestamp...).
    #[error("invalid proto3 JSON for {message}: {cause}")]
    Json {
        /// Full protobuf name of the expected message.
        message: String,
        /// What serde_json reported, with line and column.
        cause: serde_json::Error,
    },
    /// The message cannot be written as proto3 JSON (e.g. a timestamp out of range).
    #[error("cannot encode {message} as proto3 JSON: {cause}")]
    EncodeJson {
        /// Full protobuf name of the message.
        message: String,
        /// What serde_json reported.
        cause: serde_json::Error,
    },
    /// The record's `content-type` header names neither JSON nor protobuf.
    #[error(
        "unsupported content-type {0:?}: expected application/json, or protobuf \
         (no header, application/x-protobuf, application/protobuf)"
    )]
    UnsupportedContentType(String),
}

impl Error {
    /// A short, fixed name for the kind of error (for metric labels and DLQ headers).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Protobuf { .. } => "invalid_protobuf",
            Self::Json { .. } => "invalid_json",
            Self::EncodeJson { .. } => "encode_json",
            Self::UnsupportedContentType(_) => "unsupported_content_type",
        }
    }
}

/// How a record's value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// Binary protobuf: the default when a record has no `content-type` header.
    Protobuf,
    /// Proto3 JSON (`content-type: application/json`).
    Json,
}

impl ContentType {
    /// Reads a record's `content-type` header value (`None` when the header is absent).
    ///
    /// Absent or empty means protobuf. Media type parameters (`; charset=utf-8`) and ASCII case
    /// are ignored.
    pub fn from_header(value: Option<&[u8]>) -> Result<Self, Error> {
        let Some(value) = value else {
            return Ok(Self::Protobuf);
        };
        let text = String::from_utf8_lossy(value);
        let essence = text.split(';').next().unwrap_or_default().trim();
        if essence.is_empty() {
            Ok(Self::Protobuf)
        } else if essence.eq_ignore_ascii_case("application/json") {
            Ok(Self::Json)
        } else if ["application/x-protobuf", "application/protobuf"]
            .iter()
            .any(|known| essence.eq_ignore_ascii_case(known))
        {
            Ok(Self::Protobuf)
        } else {
            Err(Error::UnsupportedContentType(text.into_owned()))
        }
    }

    /// The header value a producer sets for this encoding.
    #[must_use]
    pub fn header_value(self) -> &'static str {
        match self {
            Self::Protobuf => "application/x-protobuf",
            Self::Json => "application/json",
        }
    }
}

/// Decodes binary protobuf. Unknown fields are skipped; unknown enum numbers are kept as
/// their `i32` (the typed getter then returns the `UNSPECIFIED` value).
pub fn decode_protobuf<T: Message + Name + Default>(bytes: &[u8]) -> Result<T, Error> {
    T::decode(bytes).map_err(|cause| Error::Protobuf {
        message: T::full_name(),
        cause,
    })
}

/// Decodes proto3 JSON: field names in lowerCamelCase or as in the `.proto`, enums by name (or
/// number), `int64` as string or number, timestamps as RFC 3339 strings. Unknown fields are
/// ignored; an unknown enum name is an error.
pub fn decode_json<T: DeserializeOwned + Name>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|cause| Error::Json {
        message: T::full_name(),
        cause,
    })
}

/// Decodes a record's value according to its content type (see [`ContentType::from_header`]).
pub fn decode<T>(content_type: ContentType, bytes: &[u8]) -> Result<T, Error>
where
    T: Message + Name + Default + DeserializeOwned,
{
    match content_type {
        ContentType::Protobuf => decode_protobuf(bytes),
        ContentType::Json => decode_json(bytes),
    }
}

/// Encodes binary protobuf (what producers put on Kafka by default).
#[must_use]
pub fn encode_protobuf<T: Message>(message: &T) -> Vec<u8> {
    message.encode_to_vec()
}

/// Encodes canonical proto3 JSON: lowerCamelCase names, enums by name, fields holding their
/// default value left out.
pub fn encode_json<T: Serialize + Name>(message: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(message).map_err(|cause| Error::EncodeJson {
        message: T::full_name(),
        cause,
    })
}
