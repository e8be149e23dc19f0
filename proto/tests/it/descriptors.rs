//! `FILE_DESCRIPTOR_SET`: what reflection-based readers (the hub's configured routes) see must
//! match the generated types.

use prost::{Message, Name};
use prost_types::{FileDescriptorSet, field_descriptor_proto::Type};

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).expect("a valid FileDescriptorSet")
}

fn message_names(set: &FileDescriptorSet) -> Vec<String> {
    set.file
        .iter()
        .flat_map(|file| {
            file.message_type
                .iter()
                .map(move |message| format!("{}.{}", file.package(), message.name()))
        })
        .collect()
}

#[test]
fn holds_every_generated_message_and_nothing_test_only() {
    let set = descriptor_set();
    let names = message_names(&set);
    for expected in [
        proto::orders::v1::OrderStatusChanged::full_name(),
        proto::orders::v1::OrderCreated::full_name(),
        proto::orders::v1::OrderItem::full_name(),
        proto::moderation::v1::ModerationResult::full_name(),
        proto::moderation::v1::ModerationTask::full_name(),
        proto::payments::v1::PaymentCompleted::full_name(),
        proto::delivery::v1::DeliveryStatusUpdated::full_name(),
        proto::hub::v1::PublishRequest::full_name(),
        proto::hub::v1::PublishResponse::full_name(),
        proto::hub::v1::PublishBatchRequest::full_name(),
        proto::hub::v1::PublishBatchResponse::full_name(),
        "google.protobuf.Timestamp".to_owned(),
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(
        set.file
            .iter()
            .all(|file| !file.package().contains("testing")),
        "test-only schemas leaked into FILE_DESCRIPTOR_SET"
    );
}

#[test]
fn contract_packages_end_in_a_version() {
    let set = descriptor_set();
    let mut packages: Vec<&str> = set
        .file
        .iter()
        .map(|file| file.package())
        .filter(|package| *package != "google.protobuf")
        .collect();
    packages.sort_unstable();
    assert_eq!(
        packages,
        [
            "notifications.delivery.v1",
            "notifications.hub.v1",
            "notifications.moderation.v1",
            "notifications.orders.v1",
            "notifications.payments.v1",
        ]
    );
}

/// CONTRACT.md §7 once more, through the descriptors this time: field names, numbers, types.
#[test]
fn order_status_changed_matches_the_contract() {
    let set = descriptor_set();
    let message = set
        .file
        .iter()
        .filter(|file| file.package() == "notifications.orders.v1")
        .flat_map(|file| &file.message_type)
        .find(|message| message.name() == "OrderStatusChanged")
        .expect("OrderStatusChanged");
    let fields: Vec<(&str, i32, Type, &str)> = message
        .field
        .iter()
        .map(|f| (f.name(), f.number(), f.r#type(), f.type_name()))
        .collect();
    assert_eq!(
        fields,
        [
            ("event_id", 1, Type::String, ""),
            ("order_id", 2, Type::String, ""),
            ("user_id", 3, Type::String, ""),
            (
                "status",
                4,
                Type::Enum,
                ".notifications.orders.v1.OrderStatus"
            ),
            (
                "previous_status",
                5,
                Type::Enum,
                ".notifications.orders.v1.OrderStatus"
            ),
            (
                "occurred_at",
                6,
                Type::Message,
                ".google.protobuf.Timestamp"
            ),
        ]
    );
}
