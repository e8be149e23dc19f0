//! The delivery service: consumes `payment.completed`; for a successful payment creates a
//! delivery, then advances it IN_TRANSIT → OUT_FOR_DELIVERY → DELIVERED, one step every
//! `DELIVERY_STEP_INTERVAL`, each step emitted as `delivery.status.updated` through the
//! outbox. A failed payment creates nothing (the saga's compensation: no delivery).

use std::time::Duration;

use async_trait::async_trait;
use proto::delivery::v1::{DeliveryStatus, DeliveryStatusUpdated};
use proto::payments::v1::{PaymentCompleted, PaymentStatus};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::consumer::{HandleError, Handler, Record};
use crate::outbox::sleep_or_stop;
use crate::service::Builder;
use crate::topics;
use crate::trace::TraceContext;

/// Internal status of a delivery created but not yet on its way.
const PENDING: &str = "PENDING";

/// Adds the payment consumer and the stepper to `builder`.
pub async fn build(builder: Builder) -> anyhow::Result<Builder> {
    let ctx = builder.resources().clone();
    let step = ctx.settings.step_interval;
    let stepper = Stepper {
        pool: ctx.pool.clone(),
        topic: ctx.settings.topic(topics::DELIVERY_STATUS_UPDATED),
        step,
    };
    builder
        .task("delivery stepper", stepper.run(ctx.stop.clone()))
        .consume(&[topics::PAYMENT_COMPLETED], Deliveries { step })
}

struct Deliveries {
    step: Duration,
}

#[async_trait]
impl Handler for Deliveries {
    type Event = PaymentCompleted;
    const CONSUMER: &'static str = "delivery-service";

    fn decode(&self, record: &Record<'_>) -> Result<PaymentCompleted, String> {
        let payment: PaymentCompleted = record.decode()?;
        if payment.event_id.is_empty() || payment.order_id.is_empty() {
            return Err("event_id and order_id are required".into());
        }
        Ok(payment)
    }

    fn event_id(payment: &PaymentCompleted) -> &str {
        &payment.event_id
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        payment: &PaymentCompleted,
        trace: &TraceContext,
    ) -> Result<(), HandleError> {
        if payment.status() != PaymentStatus::Success {
            tracing::info!(
                order_id = payment.order_id,
                status = payment.status().short_name(),
                trace_id = %trace.trace_id(),
                "no delivery: payment failed"
            );
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO deliveries (id, order_id, user_id, status, next_at, traceparent) \
             VALUES ($1, $2, $3, $4, now() + $5, $6) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(&payment.order_id)
        .bind(&payment.user_id)
        .bind(PENDING)
        .bind(interval(self.step))
        .bind(trace.to_string())
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            order_id = payment.order_id,
            trace_id = %trace.trace_id(),
            "delivery created"
        );
        Ok(())
    }
}

fn interval(d: Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

/// The next status of a delivery, and whether another step follows it.
fn next(status: &str) -> Option<(DeliveryStatus, bool)> {
    match status {
        PENDING => Some((DeliveryStatus::InTransit, true)),
        "IN_TRANSIT" => Some((DeliveryStatus::OutForDelivery, true)),
        "OUT_FOR_DELIVERY" => Some((DeliveryStatus::Delivered, false)),
        _ => None,
    }
}

/// Advances due deliveries.
struct Stepper {
    pool: PgPool,
    topic: String,
    step: Duration,
}

impl Stepper {
    async fn run(self, stop: CancellationToken) {
        // A fifth of a step, within [20 ms, 500 ms]: steps land close to their due time.
        let tick = (self.step / 5).clamp(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            match self.advance_due().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "delivery stepper: database error; retrying"),
            }
            if sleep_or_stop(tick, &stop).await {
                return;
            }
        }
    }

    /// Advances every due delivery by one step, in one transaction; returns how many.
    async fn advance_due(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let due = sqlx::query(
            "SELECT id, order_id, user_id, status, traceparent FROM deliveries \
             WHERE next_at IS NOT NULL AND next_at <= now() ORDER BY next_at LIMIT 100 \
             FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in &due {
            let id: Uuid = row.try_get("id")?;
            let order_id: String = row.try_get("order_id")?;
            let status: String = row.try_get("status")?;
            // Each step is a span of the trace of the payment that created the delivery.
            let traceparent: Option<String> = row.try_get("traceparent")?;
            let trace = TraceContext::continue_or_start(traceparent.as_deref());
            let Some((to, more)) = next(&status) else {
                sqlx::query("UPDATE deliveries SET next_at = NULL WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                continue;
            };
            sqlx::query(
                "UPDATE deliveries SET status = $2, updated_at = now(), \
                 next_at = CASE WHEN $3 THEN now() + $4 ELSE NULL END WHERE id = $1",
            )
            .bind(id)
            .bind(to.short_name())
            .bind(more)
            .bind(interval(self.step))
            .execute(&mut *tx)
            .await?;
            let event = DeliveryStatusUpdated {
                event_id: crate::event_id(),
                delivery_id: id.to_string(),
                order_id: order_id.clone(),
                user_id: row.try_get("user_id")?,
                status: to.into(),
                occurred_at: Some(crate::now()),
            };
            crate::outbox::enqueue(
                &mut tx,
                &self.topic,
                &order_id,
                &event.event_id,
                proto::encode_protobuf(&event),
                &trace,
            )
            .await?;
            tracing::info!(
                order_id,
                status = to.short_name(),
                trace_id = %trace.trace_id(),
                "delivery step"
            );
        }
        tx.commit().await?;
        Ok(due.len())
    }
}
