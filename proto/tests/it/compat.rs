//! Compatibility between schema versions: a newer writer (the `next` module, from
//! `testdata/`) and today's reader, and the other way round. These are the rules of
//! proto/README.md, checked.

use prost::encoding::{self, WireType};
use proto::orders::v1::{OrderStatus, OrderStatusChanged};
use proto::{Error, decode_json, decode_protobuf, encode_json, encode_protobuf};

use crate::{fixtures, next};

/// `fixtures::order_status_changed()` as the newer schema would write it, with every new field set.
fn newer_order_status_changed(status: next::OrderStatus) -> next::OrderStatusChanged {
    let current = fixtures::order_status_changed();
    next::OrderStatusChanged {
        event_id: current.event_id,
        order_id: current.order_id,
        user_id: current.user_id,
        status: status.into(),
        previous_status: next::OrderStatus::Created.into(),
        occurred_at: current.occurred_at,
        carrier: Some(next::Carrier {
            name: "ups".into(),
            tracking_code: "1Z999".into(),
        }),
        tags: vec!["express".into(), "fragile".into()],
        attempt: 3,
        checksum: 0xdead_beef,
    }
}

#[test]
fn old_reader_skips_new_protobuf_fields() {
    let bytes = encode_protobuf(&newer_order_status_changed(next::OrderStatus::Paid));
    assert!(bytes.len() > encode_protobuf(&fixtures::order_status_changed()).len());

    let decoded: OrderStatusChanged = decode_protobuf(&bytes).expect("old reader decodes");
    assert_eq!(decoded, fixtures::order_status_changed());
}

#[test]
fn old_reader_keeps_an_unknown_enum_number() {
    let bytes = encode_protobuf(&newer_order_status_changed(next::OrderStatus::Returned));

    let decoded: OrderStatusChanged = decode_protobuf(&bytes).expect("old reader decodes");
    // The raw number survives; the typed view says "not one I know".
    assert_eq!(decoded.status, 8);
    assert!(OrderStatus::try_from(decoded.status).is_err());
    assert_eq!(decoded.status(), OrderStatus::Unspecified);
    assert_eq!(decoded.previous_status(), OrderStatus::Created);
}

#[test]
fn new_reader_defaults_fields_an_old_writer_never_sent() {
    let bytes = encode_protobuf(&fixtures::order_status_changed());

    let decoded: next::OrderStatusChanged = decode_protobuf(&bytes).expect("new reader decodes");
    assert_eq!(decoded.order_id, "ord-1");
    assert_eq!(decoded.status(), next::OrderStatus::Paid);
    assert_eq!(decoded.carrier, None);
    assert!(decoded.tags.is_empty());
    assert_eq!((decoded.attempt, decoded.checksum), (0, 0));
}

/// Unknown fields of every wire type, appended by hand after a real message.
#[test]
fn unknown_fields_of_every_wire_type_are_skipped() {
    let original = fixtures::moderation_result();
    let mut bytes = encode_protobuf(&original);
    encoding::uint64::encode(100, &u64::MAX, &mut bytes); // varint
    encoding::fixed64::encode(101, &7, &mut bytes); // 64-bit
    encoding::string::encode(102, &"from the future".to_owned(), &mut bytes); // length-delimited
    encoding::fixed32::encode(103, &9, &mut bytes); // 32-bit
    encoding::encode_key(104, WireType::StartGroup, &mut bytes); // group (deprecated, still skipped)
    encoding::encode_key(104, WireType::EndGroup, &mut bytes);

    let decoded: proto::moderation::v1::ModerationResult =
        decode_protobuf(&bytes).expect("unknown fields skipped");
    assert_eq!(decoded, original);
}

#[test]
fn truncated_or_corrupt_protobuf_is_an_error() {
    let bytes = encode_protobuf(&fixtures::order_status_changed());
    for broken in [
        &bytes[..bytes.len() - 3],
        &[0xff, 0xff, 0xff][..],
        &[0x0a, 0x10, b'x'][..],
    ] {
        let err = decode_protobuf::<OrderStatusChanged>(broken).expect_err("broken bytes");
        assert!(matches!(err, Error::Protobuf { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("invalid protobuf for notifications.orders.v1.OrderStatusChanged: "),
            "{err}"
        );
        assert_eq!(err.kind(), "invalid_protobuf");
    }
}

#[test]
fn old_reader_ignores_new_json_fields() {
    let json = encode_json(&newer_order_status_changed(next::OrderStatus::Paid)).expect("encodes");
    let text = std::str::from_utf8(&json).expect("UTF-8");
    assert!(
        text.contains("\"carrier\"") && text.contains("\"trackingCode\""),
        "{text}"
    );

    let decoded: OrderStatusChanged = decode_json(&json).expect("old reader decodes");
    assert_eq!(decoded, fixtures::order_status_changed());
}

/// The one asymmetry: JSON carries enum values by name, and a name the reader does not know
/// is an error (the record goes to the DLQ), where protobuf would keep the number. Readers must
/// be deployed before writers start sending a new enum value as JSON.
#[test]
fn old_reader_rejects_a_new_enum_name_in_json() {
    let json =
        encode_json(&newer_order_status_changed(next::OrderStatus::Returned)).expect("encodes");
    let err = decode_json::<OrderStatusChanged>(&json).expect_err("unknown enum name");
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("ORDER_STATUS_RETURNED"), "{err}");
}
