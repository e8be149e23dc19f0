//! One fully populated sample per message: every field holds a non-default value, so a round
//! trip that dropped or mixed up a field would show.

use proto::Timestamp;
use proto::delivery::v1::{DeliveryStatus, DeliveryStatusUpdated};
use proto::moderation::v1::{Decision, ModerationResult, ModerationTask, TargetType};
use proto::orders::v1::{OrderCreated, OrderItem, OrderStatus, OrderStatusChanged};
use proto::payments::v1::{PaymentCompleted, PaymentStatus};

/// 2026-01-01T00:00:00.123Z
pub fn occurred_at() -> Timestamp {
    Timestamp {
        seconds: 1_767_225_600,
        nanos: 123_000_000,
    }
}

pub fn order_status_changed() -> OrderStatusChanged {
    OrderStatusChanged {
        event_id: "evt-1".into(),
        order_id: "ord-1".into(),
        user_id: "alice".into(),
        status: OrderStatus::Paid.into(),
        previous_status: OrderStatus::Created.into(),
        occurred_at: Some(occurred_at()),
    }
}

pub fn moderation_result() -> ModerationResult {
    ModerationResult {
        event_id: "evt-2".into(),
        report_id: "rep-1".into(),
        reporter_id: "bob".into(),
        target_type: TargetType::Ad.into(),
        target_id: "ad-42".into(),
        target_owner_id: "carol".into(),
        decision: Decision::Removed.into(),
        reason: "spam".into(),
        occurred_at: Some(occurred_at()),
    }
}

pub fn order_created() -> OrderCreated {
    OrderCreated {
        event_id: "evt-3".into(),
        order_id: "ord-1".into(),
        user_id: "alice".into(),
        items: vec![
            OrderItem {
                product_id: "p1".into(),
                quantity: 2,
                price_cents: 14_999,
            },
            OrderItem {
                product_id: "p2".into(),
                quantity: 1,
                price_cents: 500,
            },
        ],
        total_cents: 30_498,
        delivery_address: "1 Main St".into(),
        occurred_at: Some(occurred_at()),
    }
}

pub fn payment_completed() -> PaymentCompleted {
    PaymentCompleted {
        event_id: "evt-4".into(),
        order_id: "ord-1".into(),
        user_id: "alice".into(),
        status: PaymentStatus::InsufficientFunds.into(),
        amount_cents: 30_498,
        occurred_at: Some(occurred_at()),
    }
}

pub fn delivery_status_updated() -> DeliveryStatusUpdated {
    DeliveryStatusUpdated {
        event_id: "evt-5".into(),
        delivery_id: "dlv-1".into(),
        order_id: "ord-1".into(),
        user_id: "alice".into(),
        status: DeliveryStatus::OutForDelivery.into(),
        occurred_at: Some(occurred_at()),
    }
}

pub fn moderation_task() -> ModerationTask {
    ModerationTask {
        event_id: "evt-6".into(),
        report_id: "rep-1".into(),
        reporter_id: "bob".into(),
        target_type: TargetType::User.into(),
        target_id: "dave".into(),
        target_owner_id: "dave".into(),
        reason: "impersonation".into(),
        occurred_at: Some(occurred_at()),
    }
}
