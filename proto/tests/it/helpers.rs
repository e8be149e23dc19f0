//! The small helpers around the generated types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::moderation::v1::{Decision, ModerationResult, TargetType};
use proto::orders::v1::{OrderStatus, OrderStatusChanged};
use proto::{ContentType, Error, Timestamp, decode, encode_json, encode_protobuf};

use crate::fixtures;

#[test]
fn content_type_defaults_to_protobuf() {
    assert_eq!(
        ContentType::from_header(None).expect("absent"),
        ContentType::Protobuf
    );
    assert_eq!(
        ContentType::from_header(Some(b"")).expect("empty"),
        ContentType::Protobuf
    );
    for value in [
        "application/x-protobuf",
        "application/protobuf",
        "Application/X-Protobuf",
    ] {
        assert_eq!(
            ContentType::from_header(Some(value.as_bytes())).expect(value),
            ContentType::Protobuf
        );
    }
}

#[test]
fn content_type_json_ignores_case_and_parameters() {
    for value in [
        "application/json",
        "APPLICATION/JSON",
        "application/json; charset=utf-8",
        " application/json ",
    ] {
        assert_eq!(
            ContentType::from_header(Some(value.as_bytes())).expect(value),
            ContentType::Json
        );
    }
}

#[test]
fn content_type_unknown_is_an_error() {
    for value in ["text/plain", "application/avro", "application/jsonx"] {
        let err = ContentType::from_header(Some(value.as_bytes())).expect_err(value);
        assert!(matches!(err, Error::UnsupportedContentType(_)), "{err:?}");
        assert!(err.to_string().contains(value), "{err}");
        assert_eq!(err.kind(), "unsupported_content_type");
    }
}

#[test]
fn content_type_header_values_parse_back() {
    for content_type in [ContentType::Protobuf, ContentType::Json] {
        let value = content_type.header_value().as_bytes();
        assert_eq!(
            ContentType::from_header(Some(value)).expect("parses"),
            content_type
        );
    }
}

#[test]
fn decode_picks_the_codec_from_the_content_type() {
    let message = fixtures::moderation_result();
    let binary = encode_protobuf(&message);
    let json = encode_json(&message).expect("encodes");

    assert_eq!(
        decode::<ModerationResult>(ContentType::Protobuf, &binary).expect("protobuf"),
        message
    );
    assert_eq!(
        decode::<ModerationResult>(ContentType::Json, &json).expect("json"),
        message
    );
    // The wrong codec fails instead of producing garbage.
    assert!(decode::<ModerationResult>(ContentType::Json, &binary).is_err());
}

#[test]
fn enum_short_names_drop_the_prefix() {
    assert_eq!(OrderStatus::Paid.short_name(), "PAID");
    assert_eq!(OrderStatus::PaymentFailed.short_name(), "PAYMENT_FAILED");
    assert_eq!(OrderStatus::OutForDelivery.short_name(), "OUT_FOR_DELIVERY");
    assert_eq!(TargetType::Ad.short_name(), "AD");
    assert_eq!(Decision::Removed.short_name(), "REMOVED");
    assert_eq!(
        proto::payments::v1::PaymentStatus::InsufficientFunds.short_name(),
        "INSUFFICIENT_FUNDS"
    );
    assert_eq!(
        proto::delivery::v1::DeliveryStatus::InTransit.short_name(),
        "IN_TRANSIT"
    );

    let event = OrderStatusChanged {
        status: OrderStatus::Delivered.into(),
        ..Default::default()
    };
    assert_eq!(event.status().short_name(), "DELIVERED");
}

#[test]
fn timestamp_from_system_time() {
    let after = UNIX_EPOCH + Duration::new(1_767_225_600, 123_000_000);
    assert_eq!(proto::timestamp(after), fixtures::occurred_at());

    assert_eq!(
        proto::timestamp(UNIX_EPOCH),
        Timestamp {
            seconds: 0,
            nanos: 0
        }
    );

    // 1.5 s before the epoch is -2 s + 0.5 s: nanos never go negative.
    let before = UNIX_EPOCH - Duration::from_millis(1_500);
    assert_eq!(
        proto::timestamp(before),
        Timestamp {
            seconds: -2,
            nanos: 500_000_000
        }
    );

    let now = proto::timestamp(SystemTime::now());
    assert!(now.seconds > 1_700_000_000 && (0..1_000_000_000).contains(&now.nanos));
}
