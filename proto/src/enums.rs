//! Enum names without their protobuf prefix (`ORDER_STATUS_PAID` → `PAID`), the form
//! notifications carry in `data`.

use crate::{delivery, moderation, orders, payments};

macro_rules! short_names {
    ($($ty:ty => $prefix:literal),* $(,)?) => {$(
        impl $ty {
            /// The value's protobuf name without the enum's prefix, e.g. `PAID`.
            #[must_use]
            pub fn short_name(&self) -> &'static str {
                let full = self.as_str_name();
                full.strip_prefix($prefix).unwrap_or(full)
            }
        }
    )*};
}

short_names! {
    orders::v1::OrderStatus => "ORDER_STATUS_",
    moderation::v1::TargetType => "TARGET_TYPE_",
    moderation::v1::Decision => "DECISION_",
    payments::v1::PaymentStatus => "PAYMENT_STATUS_",
    delivery::v1::DeliveryStatus => "DELIVERY_STATUS_",
}
