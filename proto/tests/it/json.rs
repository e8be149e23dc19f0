//! Proto3 JSON (records with `content-type: application/json`).

use std::fmt::Debug;

use prost::Name;
use proto::orders::v1::{OrderCreated, OrderStatus, OrderStatusChanged};
use proto::{Error, decode_json, encode_json};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::fixtures;

fn round_trip<T: Serialize + DeserializeOwned + Name + PartialEq + Debug>(message: T) {
    let bytes = encode_json(&message).expect("encodes");
    let decoded: T = decode_json(&bytes).expect("decodes");
    assert_eq!(
        decoded,
        message,
        "{} changed in a JSON round trip",
        T::full_name()
    );
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("serializes")
}

#[test]
fn every_message_round_trips() {
    round_trip(fixtures::order_status_changed());
    round_trip(fixtures::moderation_result());
    round_trip(fixtures::order_created());
    round_trip(fixtures::payment_completed());
    round_trip(fixtures::delivery_status_updated());
    round_trip(fixtures::moderation_task());
}

/// Canonical output: lowerCamelCase names, enums by their full name, int64 as strings,
/// timestamps as RFC 3339 in UTC.
#[test]
fn encodes_canonical_proto3_json() {
    let order: Value =
        serde_json::from_slice(&encode_json(&fixtures::order_status_changed()).expect("encodes"))
            .expect("is JSON");
    assert_eq!(
        order,
        json!({
            "eventId": "evt-1",
            "orderId": "ord-1",
            "userId": "alice",
            "status": "ORDER_STATUS_PAID",
            "previousStatus": "ORDER_STATUS_CREATED",
            "occurredAt": "2026-01-01T00:00:00.123+00:00",
        })
    );

    let created: Value =
        serde_json::from_slice(&encode_json(&fixtures::order_created()).expect("encodes"))
            .expect("is JSON");
    assert_eq!(created["totalCents"], json!("30498"));
    assert_eq!(
        created["items"][0],
        json!({"productId": "p1", "quantity": 2, "priceCents": "14999"})
    );
    assert_eq!(created["deliveryAddress"], json!("1 Main St"));
}

#[test]
fn default_values_are_left_out() {
    let bytes = encode_json(&OrderStatusChanged {
        order_id: "ord-1".into(),
        ..Default::default()
    })
    .expect("encodes");
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes).expect("is JSON"),
        json!({"orderId": "ord-1"})
    );
}

#[test]
fn accepts_camel_case_and_proto_field_names() {
    let camel = json!({
        "eventId": "evt-1", "orderId": "ord-1", "userId": "alice",
        "status": "ORDER_STATUS_PAID", "previousStatus": "ORDER_STATUS_CREATED",
        "occurredAt": "2026-01-01T00:00:00.123Z",
    });
    let snake = json!({
        "event_id": "evt-1", "order_id": "ord-1", "user_id": "alice",
        "status": "ORDER_STATUS_PAID", "previous_status": "ORDER_STATUS_CREATED",
        "occurred_at": "2026-01-01T00:00:00.123Z",
    });
    let from_camel: OrderStatusChanged = decode_json(&to_bytes(&camel)).expect("camelCase");
    let from_snake: OrderStatusChanged = decode_json(&to_bytes(&snake)).expect("snake_case");
    assert_eq!(from_camel, fixtures::order_status_changed());
    assert_eq!(from_snake, fixtures::order_status_changed());
}

#[test]
fn enum_given_by_name_or_number_decodes() {
    let by_name: OrderStatusChanged =
        decode_json(br#"{"status": "ORDER_STATUS_OUT_FOR_DELIVERY"}"#).expect("by name");
    assert_eq!(by_name.status(), OrderStatus::OutForDelivery);

    let by_number: OrderStatusChanged = decode_json(br#"{"status": 5}"#).expect("by number");
    assert_eq!(by_number.status(), OrderStatus::OutForDelivery);
}

#[test]
fn unknown_enum_name_is_an_error() {
    for document in [
        br#"{"orderId": "ord-1", "status": "ORDER_STATUS_TELEPORTED"}"#.as_slice(),
        // The short form is for notifications, not for events.
        br#"{"orderId": "ord-1", "status": "PAID"}"#.as_slice(),
    ] {
        let err = decode_json::<OrderStatusChanged>(document).expect_err("unknown enum name");
        assert!(matches!(err, Error::Json { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "invalid proto3 JSON for notifications.orders.v1.OrderStatusChanged: "
            ),
            "{text}"
        );
        assert_eq!(err.kind(), "invalid_json");
    }
}

#[test]
fn unknown_enum_number_is_an_error() {
    let err = decode_json::<OrderStatusChanged>(br#"{"status": 99}"#).expect_err("unknown number");
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
}

#[test]
fn unknown_fields_are_ignored() {
    let mut document =
        serde_json::from_slice::<Value>(&encode_json(&fixtures::order_created()).expect("encodes"))
            .expect("is JSON");
    document["couponCode"] = json!("WINTER");
    document["shipping"] = json!({"carrier": "ups", "legs": [1, 2, {"deep": null}]});
    document["items"][0]["giftWrap"] = json!(true);
    document["schema_version"] = json!(2);

    let decoded: OrderCreated = decode_json(&to_bytes(&document)).expect("unknown fields ignored");
    assert_eq!(decoded, fixtures::order_created());
}

#[test]
fn int64_accepted_as_string_or_number() {
    let as_string: OrderCreated = decode_json(br#"{"totalCents": "30498"}"#).expect("string");
    let as_number: OrderCreated = decode_json(br#"{"totalCents": 30498}"#).expect("number");
    assert_eq!(as_string.total_cents, 30_498);
    assert_eq!(as_number.total_cents, 30_498);
}

#[test]
fn timestamps_are_rfc3339_with_any_offset() {
    let utc: OrderStatusChanged =
        decode_json(br#"{"occurredAt": "2026-01-01T00:00:00.123Z"}"#).expect("Z");
    let offset: OrderStatusChanged =
        decode_json(br#"{"occurredAt": "2026-01-01T02:00:00.123+02:00"}"#).expect("offset");
    assert_eq!(utc.occurred_at, Some(fixtures::occurred_at()));
    assert_eq!(offset.occurred_at, Some(fixtures::occurred_at()));

    let null: OrderStatusChanged = decode_json(br#"{"occurredAt": null}"#).expect("null");
    assert_eq!(null.occurred_at, None);

    let err = decode_json::<OrderStatusChanged>(br#"{"occurredAt": 1767225600}"#)
        .expect_err("seconds are not a timestamp");
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    let err = decode_json::<OrderStatusChanged>(br#"{"occurredAt": "yesterday"}"#)
        .expect_err("not RFC 3339");
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
}

#[test]
fn malformed_documents_are_errors() {
    for document in [
        b"".as_slice(),
        b"not json".as_slice(),
        b"[1, 2]".as_slice(),
        br#"{"orderId": 7}"#.as_slice(),
        br#"{"orderId": "a", "orderId": "b"}"#.as_slice(),
    ] {
        let err = decode_json::<OrderStatusChanged>(document).expect_err("malformed");
        assert!(matches!(err, Error::Json { .. }), "{err:?}");
    }
}

/// Known gap of pbjson: the canonical mapping reads `null` as the default value for every field,
/// pbjson only for message fields (see README). If an upgrade closes the gap, this test says so.
#[test]
fn null_is_accepted_for_messages_only() {
    let decoded: OrderStatusChanged =
        decode_json(br#"{"orderId": "ord-1", "occurredAt": null}"#).expect("null message");
    assert_eq!(decoded.occurred_at, None);
    for document in [
        br#"{"orderId": null}"#.as_slice(),
        br#"{"status": null}"#.as_slice(),
    ] {
        assert!(decode_json::<OrderStatusChanged>(document).is_err());
    }
}
