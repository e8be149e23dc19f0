//! The payment service: consumes `order.created`, debits the user's balance when it covers the
//! total, and emits `payment.completed` (SUCCESS or INSUFFICIENT_FUNDS) through its outbox.
//! A user's account opens on their first order with the configured balance (none for the
//! users listed as unfunded, e.g. the demo's `broke`).

use async_trait::async_trait;
use proto::orders::v1::OrderCreated;
use proto::payments::v1::{PaymentCompleted, PaymentStatus};
use sqlx::{PgConnection, Row};

use crate::consumer::{HandleError, Handler, Record};
use crate::service::Builder;
use crate::topics;
use crate::trace::TraceContext;

/// Adds the payment consumer to `builder`.
pub async fn build(builder: Builder) -> anyhow::Result<Builder> {
    let settings = &builder.resources().settings;
    let handler = Payments {
        topic: settings.topic(topics::PAYMENT_COMPLETED),
        opening_balance: settings.opening_balance_cents,
        unfunded: settings.unfunded_users.clone(),
    };
    builder.consume(&[topics::ORDER_CREATED], handler)
}

struct Payments {
    topic: String,
    opening_balance: i64,
    unfunded: Vec<String>,
}

#[async_trait]
impl Handler for Payments {
    type Event = OrderCreated;
    const CONSUMER: &'static str = "payment-service";

    fn decode(&self, record: &Record<'_>) -> Result<OrderCreated, String> {
        let order: OrderCreated = record.decode()?;
        if order.event_id.is_empty() || order.order_id.is_empty() || order.user_id.is_empty() {
            return Err("event_id, order_id and user_id are required".into());
        }
        if order.total_cents < 0 {
            return Err(format!("negative total {}", order.total_cents));
        }
        Ok(order)
    }

    fn event_id(order: &OrderCreated) -> &str {
        &order.event_id
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        order: &OrderCreated,
        trace: &TraceContext,
    ) -> Result<(), HandleError> {
        // One payment per order, even if the order were announced twice under two event ids.
        let first = sqlx::query(
            "INSERT INTO payments (order_id, user_id, amount_cents, status) VALUES ($1, $2, $3, 'PENDING') \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&order.order_id)
        .bind(&order.user_id)
        .bind(order.total_cents)
        .execute(&mut *tx)
        .await?;
        if first.rows_affected() == 0 {
            tracing::warn!(order_id = order.order_id, "order already paid for; ignored");
            return Ok(());
        }
        let opening = if self.unfunded.contains(&order.user_id) {
            0
        } else {
            self.opening_balance
        };
        sqlx::query(
            "INSERT INTO accounts (user_id, balance_cents) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&order.user_id)
        .bind(opening)
        .execute(&mut *tx)
        .await?;
        let debited = sqlx::query(
            "UPDATE accounts SET balance_cents = balance_cents - $2 \
             WHERE user_id = $1 AND balance_cents >= $2 RETURNING balance_cents",
        )
        .bind(&order.user_id)
        .bind(order.total_cents)
        .fetch_optional(&mut *tx)
        .await?;
        let status = if debited.is_some() {
            PaymentStatus::Success
        } else {
            PaymentStatus::InsufficientFunds
        };
        sqlx::query("UPDATE payments SET status = $2 WHERE order_id = $1")
            .bind(&order.order_id)
            .bind(status.short_name())
            .execute(&mut *tx)
            .await?;
        let event = PaymentCompleted {
            event_id: crate::event_id(),
            order_id: order.order_id.clone(),
            user_id: order.user_id.clone(),
            status: status.into(),
            amount_cents: order.total_cents,
            occurred_at: Some(crate::now()),
        };
        crate::outbox::enqueue(
            tx,
            &self.topic,
            &event.order_id,
            &event.event_id,
            proto::encode_protobuf(&event),
            trace,
        )
        .await?;
        let balance = debited.map(|r| r.try_get::<i64, _>(0)).transpose()?;
        tracing::info!(
            order_id = order.order_id,
            status = status.short_name(),
            ?balance,
            trace_id = %trace.trace_id(),
            "payment"
        );
        Ok(())
    }
}
