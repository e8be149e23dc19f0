//! Binary protobuf: every message survives a round trip, and the contract messages encode to
//! exactly the bytes their field numbers and types dictate.

use std::fmt::Debug;

use prost::encoding::{self, WireType};
use prost::{Message, Name};
use proto::{decode_protobuf, encode_protobuf};

use crate::fixtures;

fn round_trip<T: Message + Name + Default + PartialEq + Debug>(message: T) {
    let bytes = encode_protobuf(&message);
    assert!(!bytes.is_empty(), "{} encoded to nothing", T::full_name());
    let decoded: T = decode_protobuf(&bytes).expect("decodes");
    assert_eq!(
        decoded,
        message,
        "{} changed in a round trip",
        T::full_name()
    );
}

#[test]
fn order_status_changed_round_trips() {
    round_trip(fixtures::order_status_changed());
}

#[test]
fn moderation_result_round_trips() {
    round_trip(fixtures::moderation_result());
}

#[test]
fn order_created_round_trips() {
    round_trip(fixtures::order_created());
}

#[test]
fn payment_completed_round_trips() {
    round_trip(fixtures::payment_completed());
}

#[test]
fn delivery_status_updated_round_trips() {
    round_trip(fixtures::delivery_status_updated());
}

#[test]
fn moderation_task_round_trips() {
    round_trip(fixtures::moderation_task());
}

#[test]
fn empty_message_round_trips_to_defaults() {
    let decoded: proto::orders::v1::OrderStatusChanged = decode_protobuf(&[]).expect("decodes");
    assert_eq!(decoded, Default::default());
    assert_eq!(
        decoded.status(),
        proto::orders::v1::OrderStatus::Unspecified
    );
}

/// Encodes the fixture timestamp by hand as field `tag` (Timestamp: seconds = 1, nanos = 2).
fn timestamp_field(tag: u32, buf: &mut Vec<u8>) {
    let ts = fixtures::occurred_at();
    let mut inner = Vec::new();
    encoding::int64::encode(1, &ts.seconds, &mut inner);
    encoding::int32::encode(2, &ts.nanos, &mut inner);
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(inner.len() as u64, buf);
    buf.extend_from_slice(&inner);
}

/// The field numbers and types of CONTRACT.md §7, written out by hand: renumbering or retyping
/// a field in the .proto breaks this test.
#[test]
fn order_status_changed_field_numbers_are_pinned() {
    let m = fixtures::order_status_changed();
    let mut expected = Vec::new();
    encoding::string::encode(1, &m.event_id, &mut expected);
    encoding::string::encode(2, &m.order_id, &mut expected);
    encoding::string::encode(3, &m.user_id, &mut expected);
    encoding::int32::encode(4, &2, &mut expected); // ORDER_STATUS_PAID
    encoding::int32::encode(5, &1, &mut expected); // ORDER_STATUS_CREATED
    timestamp_field(6, &mut expected);
    assert_eq!(encode_protobuf(&m), expected);
}

#[test]
fn moderation_result_field_numbers_are_pinned() {
    let m = fixtures::moderation_result();
    let mut expected = Vec::new();
    encoding::string::encode(1, &m.event_id, &mut expected);
    encoding::string::encode(2, &m.report_id, &mut expected);
    encoding::string::encode(3, &m.reporter_id, &mut expected);
    encoding::int32::encode(4, &1, &mut expected); // TARGET_TYPE_AD
    encoding::string::encode(5, &m.target_id, &mut expected);
    encoding::string::encode(6, &m.target_owner_id, &mut expected);
    encoding::int32::encode(7, &2, &mut expected); // DECISION_REMOVED
    encoding::string::encode(8, &m.reason, &mut expected);
    timestamp_field(9, &mut expected);
    assert_eq!(encode_protobuf(&m), expected);
}

/// Enum numbers are part of the wire format too (CONTRACT.md §7 order).
#[test]
fn enum_numbers_are_pinned() {
    use proto::moderation::v1::{Decision, TargetType};
    use proto::orders::v1::OrderStatus;

    let order: Vec<(OrderStatus, i32)> = vec![
        (OrderStatus::Unspecified, 0),
        (OrderStatus::Created, 1),
        (OrderStatus::Paid, 2),
        (OrderStatus::PaymentFailed, 3),
        (OrderStatus::InTransit, 4),
        (OrderStatus::OutForDelivery, 5),
        (OrderStatus::Delivered, 6),
        (OrderStatus::Cancelled, 7),
    ];
    for (value, number) in order {
        assert_eq!(value as i32, number, "{value:?}");
    }
    assert_eq!(
        [TargetType::Unspecified, TargetType::Ad, TargetType::User].map(|v| v as i32),
        [0, 1, 2]
    );
    assert_eq!(
        [
            Decision::Unspecified,
            Decision::Dismissed,
            Decision::Removed
        ]
        .map(|v| v as i32),
        [0, 1, 2]
    );
}
