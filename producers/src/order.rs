//! The order service: `POST /orders`, `GET /orders`, `GET /orders/{id}`; consumes
//! `payment.completed` and `delivery.status.updated`; emits `order.created` and, on every
//! transition, `order.status.changed` (which the hub delivers to the order's user).
//!
//! Statuses move along CREATED → PAID → IN_TRANSIT → OUT_FOR_DELIVERY → DELIVERED, or
//! CREATED → PAYMENT_FAILED. Payment and delivery events come from different topics, so a
//! delivery step may arrive before the payment it follows from: the order then walks through
//! every status in between, each emitted once, and the late event changes nothing.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use async_trait::async_trait;
use proto::delivery::v1::{DeliveryStatus, DeliveryStatusUpdated};
use proto::orders::v1::{OrderCreated, OrderItem, OrderStatus, OrderStatusChanged};
use proto::payments::v1::{PaymentCompleted, PaymentStatus};

use crate::auth::{User, Verifier};
use crate::consumer::{HandleError, Handler, Record};
use crate::http::{ApiError, body};
use crate::limit::PerUser;
use crate::service::Builder;
use crate::topics;

/// Adds the order service's API and consumer to `builder`.
pub async fn build(builder: Builder) -> anyhow::Result<Builder> {
    let ctx = builder.context().clone();
    let secret = ctx.settings.jwt_secret.clone().unwrap_or_default();
    let limit = PerUser::new(
        "orders",
        ctx.settings.orders_per_minute,
        ctx.settings.orders_burst,
        &ctx.metrics,
    );
    let state = ApiState {
        pool: ctx.pool.clone(),
        verifier: Verifier::hs256(&secret, &ctx.settings.jwt_audience(ctx.service)),
        prefix: ctx.settings.topic_prefix.clone(),
        limit: limit.clone(),
    };
    let handler = Events {
        prefix: ctx.settings.topic_prefix.clone(),
    };
    builder
        .api(router(state))
        .task("order rate limit", limit.clean_until(ctx.stop.clone()))
        .consume(
            &[topics::PAYMENT_COMPLETED, topics::DELIVERY_STATUS_UPDATED],
            handler,
        )
}

/// State of the REST handlers.
#[derive(Clone)]
pub struct ApiState {
    pool: PgPool,
    verifier: Verifier,
    prefix: String,
    limit: PerUser,
}

impl FromRef<ApiState> for Verifier {
    fn from_ref(state: &ApiState) -> Verifier {
        state.verifier.clone()
    }
}

/// The REST routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/orders", post(create).get(list))
        .route("/orders/{id}", get(fetch))
        .with_state(state)
}

/// Limits on an order, so a typo cannot create an absurd one.
const MAX_ITEMS: usize = 100;
const MAX_QUANTITY: u32 = 1_000;
const MAX_PRICE_CENTS: i64 = 100_000_000;
const MAX_TEXT: usize = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    items: Vec<NewItem>,
    delivery_address: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NewItem {
    product_id: String,
    quantity: u32,
    price_cents: i64,
}

impl NewOrder {
    /// The order's total, or what is wrong with it.
    fn validate(&self) -> Result<i64, ApiError> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        if self.items.is_empty() {
            return bad("items: at least one item is required".into());
        }
        if self.items.len() > MAX_ITEMS {
            return bad(format!("items: at most {MAX_ITEMS} items"));
        }
        let address = self.delivery_address.trim();
        if address.is_empty() || address.len() > MAX_TEXT {
            return bad(format!(
                "delivery_address: required, at most {MAX_TEXT} bytes"
            ));
        }
        let mut total: i64 = 0;
        for (i, item) in self.items.iter().enumerate() {
            let id = item.product_id.trim();
            if id.is_empty() || id.len() > 64 {
                return bad(format!("items[{i}].product_id: required, at most 64 bytes"));
            }
            if item.quantity == 0 || item.quantity > MAX_QUANTITY {
                return bad(format!("items[{i}].quantity: must be 1..={MAX_QUANTITY}"));
            }
            if !(0..=MAX_PRICE_CENTS).contains(&item.price_cents) {
                return bad(format!(
                    "items[{i}].price_cents: must be 0..={MAX_PRICE_CENTS}"
                ));
            }
            // Bounded above by the limits, so this cannot overflow.
            total += item.price_cents * i64::from(item.quantity);
        }
        Ok(total)
    }
}

/// The optional `Idempotency-Key` of a request: a client retrying a `POST /orders` with the same
/// key gets the order the first request created instead of a second order.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str().map(str::trim) {
        Ok(key) if !key.is_empty() && key.len() <= 128 => Ok(Some(key.to_owned())),
        _ => Err(ApiError::BadRequest(
            "Idempotency-Key: 1 to 128 visible ASCII characters".into(),
        )),
    }
}

async fn create(
    State(state): State<ApiState>,
    User(user): User,
    headers: HeaderMap,
    order: Result<Json<NewOrder>, JsonRejection>,
) -> Result<(StatusCode, HeaderMap, Json<Value>), ApiError> {
    state.limit.check(&user)?;
    let key = idempotency_key(&headers)?;
    let order = body(order)?;
    let total = order.validate()?;
    let id = Uuid::now_v7();
    let order_id = id.to_string();
    let address = order.delivery_address.trim().to_owned();
    let mut tx = state.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (id, user_id, status, items, total_cents, delivery_address, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
    )
    .bind(id)
    .bind(&user)
    .bind(OrderStatus::Created.short_name())
    .bind(sqlx::types::Json(&order.items))
    .bind(total)
    .bind(&address)
    .bind(&key)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        // A retry: answer with the order the first request created (it holds the key).
        tx.rollback().await?;
        let first: Uuid =
            sqlx::query_scalar("SELECT id FROM orders WHERE user_id = $1 AND idempotency_key = $2")
                .bind(&user)
                .bind(&key)
                .fetch_one(&state.pool)
                .await?;
        let mut replayed = HeaderMap::new();
        replayed.insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok((
            StatusCode::CREATED,
            replayed,
            Json(json!({"order_id": first.to_string(), "status": "CREATED"})),
        ));
    }
    let created = OrderCreated {
        event_id: crate::event_id(),
        order_id: order_id.clone(),
        user_id: user.clone(),
        items: order
            .items
            .iter()
            .map(|i| OrderItem {
                product_id: i.product_id.trim().to_owned(),
                quantity: i.quantity,
                price_cents: i.price_cents,
            })
            .collect(),
        total_cents: total,
        delivery_address: address,
        occurred_at: Some(crate::now()),
    };
    let topic = format!("{}{}", state.prefix, topics::ORDER_CREATED);
    crate::outbox::enqueue(
        &mut tx,
        &topic,
        &order_id,
        &created.event_id,
        proto::encode_protobuf(&created),
    )
    .await?;
    record_transition(
        &mut tx,
        &state.prefix,
        id,
        &user,
        OrderStatus::Unspecified,
        OrderStatus::Created,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(order_id, total_cents = total, "order created");
    Ok((
        StatusCode::CREATED,
        HeaderMap::new(),
        Json(json!({"order_id": order_id, "status": "CREATED"})),
    ))
}

async fn list(State(state): State<ApiState>, User(user): User) -> Result<Json<Value>, ApiError> {
    let rows =
        sqlx::query("SELECT id FROM orders WHERE user_id = $1 ORDER BY created_at DESC LIMIT 50")
            .bind(&user)
            .fetch_all(&state.pool)
            .await?;
    let mut orders = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Uuid = row.try_get("id")?;
        if let Some(order) = load(&state.pool, id, &user).await? {
            orders.push(order);
        }
    }
    Ok(Json(json!({"orders": orders})))
}

async fn fetch(
    State(state): State<ApiState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // Another user's order is answered exactly like a missing one.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("no such order"))?;
    load(&state.pool, id, &user)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("no such order"))
}

/// The order `id` if `user` owns it, with its status history.
async fn load(pool: &PgPool, id: Uuid, user: &str) -> Result<Option<Value>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT id, user_id, status, items, total_cents, delivery_address, created_at, updated_at \
         FROM orders WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(user)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let history = sqlx::query(
        "SELECT status, changed_at FROM order_status_history WHERE order_id = $1 ORDER BY changed_at, status",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let history = history
        .iter()
        .map(|h| {
            Ok(json!({
                "status": h.try_get::<String, _>("status")?,
                "at": h.try_get::<chrono::DateTime<chrono::Utc>, _>("changed_at")?,
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let items: sqlx::types::Json<Value> = row.try_get("items")?;
    Ok(Some(json!({
        "order_id": row.try_get::<Uuid, _>("id")?.to_string(),
        "user_id": row.try_get::<String, _>("user_id")?,
        "status": row.try_get::<String, _>("status")?,
        "items": items.0,
        "total_cents": row.try_get::<i64, _>("total_cents")?,
        "delivery_address": row.try_get::<String, _>("delivery_address")?,
        "created_at": row.try_get::<chrono::DateTime<chrono::Utc>, _>("created_at")?,
        "updated_at": row.try_get::<chrono::DateTime<chrono::Utc>, _>("updated_at")?,
        "history": history,
    })))
}

/// Writes a transition: the order row (unless it is the creation), its history, and an
/// `OrderStatusChanged` in the outbox.
async fn record_transition(
    conn: &mut PgConnection,
    prefix: &str,
    id: Uuid,
    user: &str,
    from: OrderStatus,
    to: OrderStatus,
) -> Result<(), sqlx::Error> {
    if from != OrderStatus::Unspecified {
        sqlx::query("UPDATE orders SET status = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(to.short_name())
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("INSERT INTO order_status_history (order_id, status) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(id)
        .bind(to.short_name())
        .execute(&mut *conn)
        .await?;
    let event = OrderStatusChanged {
        event_id: crate::event_id(),
        order_id: id.to_string(),
        user_id: user.to_owned(),
        status: to.into(),
        previous_status: from.into(),
        occurred_at: Some(crate::now()),
    };
    let topic = format!("{prefix}{}", topics::ORDER_STATUS_CHANGED);
    crate::outbox::enqueue(
        conn,
        &topic,
        &event.order_id,
        &event.event_id,
        proto::encode_protobuf(&event),
    )
    .await
}

/// The happy path, in order.
const PATH: [OrderStatus; 5] = [
    OrderStatus::Created,
    OrderStatus::Paid,
    OrderStatus::InTransit,
    OrderStatus::OutForDelivery,
    OrderStatus::Delivered,
];

/// The statuses to pass through to go from `from` to `to`: empty when `to` is not ahead of
/// `from` on the happy path (already there, or a late event); PAYMENT_FAILED only from CREATED.
pub fn steps(from: OrderStatus, to: OrderStatus) -> Vec<OrderStatus> {
    if to == OrderStatus::PaymentFailed {
        return if from == OrderStatus::Created {
            vec![to]
        } else {
            Vec::new()
        };
    }
    let (Some(a), Some(b)) = (
        PATH.iter().position(|s| *s == from),
        PATH.iter().position(|s| *s == to),
    ) else {
        return Vec::new();
    };
    if b > a {
        PATH[a + 1..=b].to_vec()
    } else {
        Vec::new()
    }
}

/// Consumer of payment and delivery events.
struct Events {
    prefix: String,
}

/// A payment or delivery event, as the order it moves and the status it moves it to.
struct StatusEvent {
    event_id: String,
    order_id: String,
    id: Uuid,
    target: OrderStatus,
}

#[async_trait]
impl Handler for Events {
    type Event = StatusEvent;
    const CONSUMER: &'static str = "order-service";

    fn decode(&self, record: &Record<'_>) -> Result<StatusEvent, String> {
        let topic = record
            .topic
            .strip_prefix(self.prefix.as_str())
            .unwrap_or(record.topic);
        let (event_id, order_id, target) = match topic {
            topics::PAYMENT_COMPLETED => {
                let e: PaymentCompleted = record.decode()?;
                let target = match e.status() {
                    PaymentStatus::Success => OrderStatus::Paid,
                    PaymentStatus::InsufficientFunds => OrderStatus::PaymentFailed,
                    PaymentStatus::Unspecified => return Err("payment status unspecified".into()),
                };
                (e.event_id, e.order_id, target)
            }
            topics::DELIVERY_STATUS_UPDATED => {
                let e: DeliveryStatusUpdated = record.decode()?;
                let target = match e.status() {
                    DeliveryStatus::InTransit => OrderStatus::InTransit,
                    DeliveryStatus::OutForDelivery => OrderStatus::OutForDelivery,
                    DeliveryStatus::Delivered => OrderStatus::Delivered,
                    DeliveryStatus::Unspecified => {
                        return Err("delivery status unspecified".into());
                    }
                };
                (e.event_id, e.order_id, target)
            }
            other => return Err(format!("unexpected topic {other}")),
        };
        let id = Uuid::parse_str(&order_id)
            .map_err(|_| format!("order_id {order_id:?} is not an order id"))?;
        Ok(StatusEvent {
            event_id,
            order_id,
            id,
            target,
        })
    }

    fn event_id(event: &StatusEvent) -> &str {
        &event.event_id
    }

    async fn apply(&self, tx: &mut PgConnection, event: &StatusEvent) -> Result<(), HandleError> {
        let StatusEvent {
            order_id,
            id,
            target,
            ..
        } = event;
        let (id, target) = (*id, *target);
        let Some(row) = sqlx::query("SELECT user_id, status FROM orders WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Err(HandleError::Poison(format!("unknown order {order_id}")));
        };
        let user: String = row.try_get("user_id")?;
        let status: String = row.try_get("status")?;
        let current = OrderStatus::from_str_name(&format!("ORDER_STATUS_{status}"))
            .ok_or_else(|| HandleError::Poison(format!("order {order_id} has status {status}")))?;
        let steps = steps(current, target);
        if steps.is_empty() && current != target {
            tracing::warn!(
                order_id,
                from = status,
                to = target.short_name(),
                "event does not apply to the order's status; ignored"
            );
        }
        let mut from = current;
        for to in steps {
            record_transition(tx, &self.prefix, id, &user, from, to).await?;
            tracing::info!(
                order_id,
                from = from.short_name(),
                to = to.short_name(),
                "order status changed"
            );
            from = to;
        }
        // The claim is kept even when nothing changed, so the event is not examined again.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    #[test]
    fn steps_walk_forward_only() {
        assert_eq!(steps(Created, Paid), vec![Paid]);
        assert_eq!(steps(Created, InTransit), vec![Paid, InTransit]);
        assert_eq!(
            steps(Paid, Delivered),
            vec![InTransit, OutForDelivery, Delivered]
        );
        assert!(steps(InTransit, Paid).is_empty());
        assert!(steps(Paid, Paid).is_empty());
        assert_eq!(steps(Created, PaymentFailed), vec![PaymentFailed]);
        assert!(steps(Paid, PaymentFailed).is_empty());
        assert!(steps(PaymentFailed, InTransit).is_empty());
    }

    #[test]
    fn an_order_is_validated_with_reasons() {
        let item = |q, p| NewItem {
            product_id: "p1".into(),
            quantity: q,
            price_cents: p,
        };
        let order = |items, address: &str| NewOrder {
            items,
            delivery_address: address.into(),
        };
        assert_eq!(
            order(vec![item(2, 14_999), item(1, 1)], "1 Main St")
                .validate()
                .expect("valid"),
            29_999
        );
        for (o, want) in [
            (order(vec![], "x"), "items: at least one item is required"),
            (
                order(vec![item(0, 1)], "x"),
                "items[0].quantity: must be 1..=1000",
            ),
            (
                order(vec![item(1, -1)], "x"),
                "items[0].price_cents: must be 0..=100000000",
            ),
            (
                order(vec![item(1, 1)], "  "),
                "delivery_address: required, at most 500 bytes",
            ),
        ] {
            match o.validate() {
                Err(ApiError::BadRequest(m)) => assert_eq!(m, want),
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}
