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
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use async_trait::async_trait;
use proto::delivery::v1::{DeliveryStatus, DeliveryStatusUpdated};
use proto::orders::v1::{OrderCreated, OrderItem, OrderStatus, OrderStatusChanged};
use proto::payments::v1::{PaymentCompleted, PaymentStatus};

use crate::auth::{ChannelTokens, User, Verifier};
use crate::consumer::{HandleError, Handler, Record};
use crate::http::{ApiError, body};
use crate::limit::PerUser;
use crate::openapi::ErrorBody;
use crate::service::Builder;
use crate::topics;
use crate::trace::TraceContext;

/// Adds the order service's API and consumer to `builder`.
pub async fn build(builder: Builder) -> anyhow::Result<Builder> {
    let ctx = builder.resources().clone();
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
        channel_tokens: ChannelTokens::hs256(
            &secret,
            ctx.settings.hub_audience.clone(),
            CHANNEL_TOKEN_TTL,
        ),
        prefix: ctx.settings.topic_prefix.clone(),
        limit: limit.clone(),
    };
    let handler = Events {
        prefix: ctx.settings.topic_prefix.clone(),
    };
    let doc = openapi_json(&ctx.settings.jwt_audience(ctx.service));
    builder
        .api(router(state))
        .api(crate::openapi::route(doc))
        .task("order rate limit", limit.clean_until(ctx.stop.clone()))
        .consume(
            &[topics::PAYMENT_COMPLETED, topics::DELIVERY_STATUS_UPDATED],
            handler,
        )
}

/// How long a hub token for an order's channel lives: it is used once, to subscribe (a
/// client asks for a fresh one whenever it subscribes again).
const CHANNEL_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// State of the REST handlers.
#[derive(Clone)]
pub struct ApiState {
    pool: PgPool,
    verifier: Verifier,
    channel_tokens: ChannelTokens,
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
        .route("/orders/{id}/subscription", post(subscription))
        .with_state(state)
}

/// Limits on an order, so a typo cannot create an absurd one.
const MAX_ITEMS: usize = 100;
const MAX_QUANTITY: u32 = 1_000;
const MAX_PRICE_CENTS: i64 = 100_000_000;
const MAX_TEXT: usize = 500;

/// An order to place. The user is the token's `sub`, never a body field.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    /// 1 to 100 items.
    #[schema(min_items = 1, max_items = 100)]
    items: Vec<NewItem>,
    /// 1 to 500 bytes (trimmed).
    #[schema(min_length = 1, max_length = 500, example = "1 Main St")]
    delivery_address: String,
}

/// One line of an order.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewItem {
    /// 1 to 64 bytes (trimmed).
    #[schema(min_length = 1, max_length = 64, example = "p1")]
    product_id: String,
    #[schema(minimum = 1, maximum = 1000, example = 2)]
    quantity: u32,
    /// Unit price.
    #[schema(minimum = 0, maximum = 100000000, example = 14999)]
    price_cents: i64,
}

/// An order's status (the notification `order.status` carries the same names).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(dead_code)] // Documentation only: statuses are stored and sent as text.
enum Status {
    Created,
    Paid,
    InTransit,
    OutForDelivery,
    Delivered,
    PaymentFailed,
}

/// `201` to `POST /orders`.
#[derive(Serialize, utoipa::ToSchema)]
struct Placed {
    #[schema(example = "01934b7e-8f3a-7c1e-9d2a-5b6c7d8e9f01")]
    order_id: String,
    /// Always `CREATED` (also for a replayed idempotency key).
    #[schema(value_type = Status)]
    status: &'static str,
}

/// An order as its owner sees it.
#[derive(Serialize, utoipa::ToSchema)]
struct OrderView {
    order_id: String,
    user_id: String,
    #[schema(value_type = Status)]
    status: String,
    #[schema(value_type = Vec<NewItem>)]
    items: Value,
    total_cents: i64,
    delivery_address: String,
    #[schema(value_type = String, format = DateTime)]
    created_at: chrono::DateTime<chrono::Utc>,
    #[schema(value_type = String, format = DateTime)]
    updated_at: chrono::DateTime<chrono::Utc>,
    /// Every status the order reached, oldest first.
    history: Vec<HistoryEntry>,
}

/// A status the order reached, and when.
#[derive(Serialize, utoipa::ToSchema)]
struct HistoryEntry {
    #[schema(value_type = Status)]
    status: String,
    #[schema(value_type = String, format = DateTime)]
    at: chrono::DateTime<chrono::Utc>,
}

/// `GET /orders`: the user's last 50 orders, newest first.
#[derive(Serialize, utoipa::ToSchema)]
struct OrderList {
    orders: Vec<OrderView>,
}

/// The OpenAPI 3.1 description of the order API, generated from the handlers and types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "order service HTTP API",
        description = "Places and shows orders. The order's statuses then reach its user through the hub as `order.status` notifications (docs/asyncapi.yaml)."
    ),
    paths(create, fetch, list, subscription),
    components(schemas(
        Subscription,
        NewOrder,
        NewItem,
        Status,
        Placed,
        OrderView,
        HistoryEntry,
        OrderList,
        ErrorBody
    ))
)]
struct ApiDoc;

/// The document served at `GET /api/openapi.json`; `audience` is the `aud` tokens must carry.
pub fn openapi_json(audience: &str) -> String {
    use utoipa::OpenApi as _;
    crate::openapi::finish(ApiDoc::openapi(), audience)
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

/// Places an order for the token's user.
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 characters, per user: a repeated key answers 201 with the order the first request created (and `Idempotent-Replayed: true`) instead of creating and charging a second one"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context; the order's events on Kafka continue this trace (a new one starts without it)"),
    ),
    request_body(content = NewOrder, content_type = "application/json"),
    responses(
        (status = 201, description = "Created (or replayed for a repeated Idempotency-Key)", body = Placed,
            headers(("Idempotent-Replayed" = String, description = "`true` when the key was seen before and no order was created"))),
        (status = 400, description = "Bad JSON, an unknown field (e.g. `user_id`), a field out of its limits, a bad Idempotency-Key", body = ErrorBody),
        (status = 401, description = "No, bad or expired token, or a token for another audience", body = ErrorBody),
        (status = 408, description = "The body did not arrive, or the request was not completed, in time", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 429, description = "Too many orders of this user", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until one more order is allowed"))),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn create(
    State(state): State<ApiState>,
    User(user): User,
    headers: HeaderMap,
    order: Result<Json<NewOrder>, JsonRejection>,
) -> Result<(StatusCode, HeaderMap, Json<Placed>), ApiError> {
    // This request's span of the caller's trace, or the start of a new one: every event of
    // the order carries its trace id, and so does every log line of this request.
    let trace = TraceContext::continue_or_start(
        headers
            .get(crate::trace::HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    tracing::Span::current().record("trace_id", trace.trace_id().as_str());
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
        return replay(&state, &user, key.as_deref()).await;
    }
    let created = order_created(&order_id, &user, &order, total, address);
    let topic = format!("{}{}", state.prefix, topics::ORDER_CREATED);
    crate::outbox::enqueue(
        &mut tx,
        &topic,
        &order_id,
        &created.event_id,
        proto::encode_protobuf(&created),
        &trace,
    )
    .await?;
    record_transition(
        &mut tx,
        &state.prefix,
        id,
        &user,
        OrderStatus::Unspecified,
        OrderStatus::Created,
        &trace,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(order_id, total_cents = total, trace_id = %trace.trace_id(), "order created");
    Ok((
        StatusCode::CREATED,
        HeaderMap::new(),
        Json(Placed {
            order_id,
            status: "CREATED",
        }),
    ))
}

/// The answer to a repeated `Idempotency-Key`: the order the first request created.
async fn replay(
    state: &ApiState,
    user: &str,
    key: Option<&str>,
) -> Result<(StatusCode, HeaderMap, Json<Placed>), ApiError> {
    let first: Uuid =
        sqlx::query_scalar("SELECT id FROM orders WHERE user_id = $1 AND idempotency_key = $2")
            .bind(user)
            .bind(key)
            .fetch_one(&state.pool)
            .await?;
    let mut replayed = HeaderMap::new();
    replayed.insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok((
        StatusCode::CREATED,
        replayed,
        Json(Placed {
            order_id: first.to_string(),
            status: "CREATED",
        }),
    ))
}

/// The `order.created` event of a new order.
fn order_created(
    order_id: &str,
    user: &str,
    order: &NewOrder,
    total: i64,
    address: String,
) -> OrderCreated {
    OrderCreated {
        event_id: crate::event_id(),
        order_id: order_id.to_owned(),
        user_id: user.to_owned(),
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
    }
}

/// The token's user's last 50 orders, newest first.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "orders",
    responses(
        (status = 200, description = "The user's orders (possibly none)", body = OrderList),
        (status = 401, description = "No, bad or expired token, or a token for another audience", body = ErrorBody),
        (status = 408, description = "The request was not completed in time", body = ErrorBody),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<ApiState>,
    User(user): User,
) -> Result<Json<OrderList>, ApiError> {
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
    Ok(Json(OrderList { orders }))
}

/// One order of the token's user, with its status history.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    params(("id" = String, Path, description = "The order id (`order_id` of the 201)")),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 401, description = "No, bad or expired token, or a token for another audience", body = ErrorBody),
        (status = 404, description = "No such order of this user (another user's order is answered the same way)", body = ErrorBody),
        (status = 408, description = "The request was not completed in time", body = ErrorBody),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn fetch(
    State(state): State<ApiState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    // Another user's order is answered exactly like a missing one.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("no such order"))?;
    load(&state.pool, id, &user)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("no such order"))
}

/// A hub token that lets the order's owner follow the order's channel.
#[derive(Serialize, utoipa::ToSchema)]
struct Subscription {
    /// The order's channel on the hub, `order:<order id>`.
    #[schema(example = "order:0193a0c2-7d4e-7b7a-9c1e-2f4b8a6d5e10")]
    channel: String,
    /// A hub token of the user with the `channel` claim (for a WebSocket `subscribe`) and the
    /// `channels` claim (to open an SSE stream of the order and the personal stream).
    token: String,
    /// When the token expires, unix seconds.
    expires_at: u64,
}

/// The hub channel of order `id`.
pub fn order_channel(id: &str) -> String {
    format!("order:{id}")
}

/// `POST /orders/{id}/subscription`: a hub token for the order's channel, for its owner only.
#[utoipa::path(
    post,
    path = "/orders/{id}/subscription",
    tag = "orders",
    params(("id" = String, Path, description = "The order id")),
    responses(
        (status = 200, description = "A hub token for the order's channel", body = Subscription),
        (status = 401, description = "No, bad or expired token, or a token for another audience", body = ErrorBody),
        (status = 404, description = "No such order of this user (another user's order is answered the same way)", body = ErrorBody),
        (status = 408, description = "The request was not completed in time", body = ErrorBody),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn subscription(
    State(state): State<ApiState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Subscription>, ApiError> {
    // The channel exists for everyone who may see the order: its owner, and nobody else
    // (another user's order is answered exactly like a missing one).
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("no such order"))?;
    let owned = sqlx::query("SELECT 1 FROM orders WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(&user)
        .fetch_optional(&state.pool)
        .await?
        .is_some();
    if !owned {
        return Err(ApiError::NotFound("no such order"));
    }
    let channel = order_channel(&id.to_string());
    let (token, expires_at) = state.channel_tokens.issue(&user, &channel).map_err(|e| {
        tracing::error!(error = %e, "signing a channel token");
        ApiError::Unavailable("could not sign the token".to_owned())
    })?;
    Ok(Json(Subscription {
        channel,
        token,
        expires_at,
    }))
}

/// The order `id` if `user` owns it, with its status history.
async fn load(pool: &PgPool, id: Uuid, user: &str) -> Result<Option<OrderView>, sqlx::Error> {
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
            Ok(HistoryEntry {
                status: h.try_get("status")?,
                at: h.try_get("changed_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let items: sqlx::types::Json<Value> = row.try_get("items")?;
    Ok(Some(OrderView {
        order_id: row.try_get::<Uuid, _>("id")?.to_string(),
        user_id: row.try_get("user_id")?,
        status: row.try_get("status")?,
        items: items.0,
        total_cents: row.try_get("total_cents")?,
        delivery_address: row.try_get("delivery_address")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        history,
    }))
}

/// Writes a transition: the order row (unless it is the creation), its history, and an
/// `OrderStatusChanged` in the outbox (with `trace`, the span of the work that moved it).
async fn record_transition(
    conn: &mut PgConnection,
    prefix: &str,
    id: Uuid,
    user: &str,
    from: OrderStatus,
    to: OrderStatus,
    trace: &TraceContext,
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
        trace,
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
            .topic()
            .strip_prefix(self.prefix.as_str())
            .unwrap_or(record.topic());
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

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &StatusEvent,
        trace: &TraceContext,
    ) -> Result<(), HandleError> {
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
                trace_id = %trace.trace_id(),
                "event does not apply to the order's status; ignored"
            );
        }
        let mut from = current;
        for to in steps {
            record_transition(tx, &self.prefix, id, &user, from, to, trace).await?;
            tracing::info!(
                order_id,
                from = from.short_name(),
                to = to.short_name(),
                trace_id = %trace.trace_id(),
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
    use serde_json::json;

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
    fn the_openapi_document_names_every_route_and_schema() {
        let doc: Value = serde_json::from_str(&openapi_json("orders")).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, method) in [
            ("/orders", "post"),
            ("/orders", "get"),
            ("/orders/{id}", "get"),
            ("/orders/{id}/subscription", "post"),
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/metrics", "get"),
        ] {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} missing"
            );
        }
        let post = &doc["paths"]["/orders"]["post"];
        assert_eq!(post["security"][0]["bearer"], json!([]));
        let headers: Vec<&str> = post["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter(|p| p["in"] == "header")
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(headers, ["Idempotency-Key", "traceparent"]);
        for status in ["201", "400", "401", "408", "413", "429", "503"] {
            assert!(
                post["responses"][status].is_object(),
                "POST /orders {status}"
            );
        }
        assert!(post["responses"]["429"]["headers"]["Retry-After"].is_object());
        assert_eq!(
            doc["paths"]["/orders/{id}"]["get"]["responses"]["404"]["content"]["application/json"]
                ["schema"]["$ref"],
            "#/components/schemas/ErrorBody"
        );
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["NewOrder"]["required"],
            json!(["items", "delivery_address"])
        );
        assert_eq!(schemas["NewOrder"]["additionalProperties"], false);
        for name in [
            "NewItem",
            "Placed",
            "OrderView",
            "OrderList",
            "HistoryEntry",
            "Status",
            "ErrorBody",
            "Subscription",
        ] {
            assert!(schemas[name].is_object(), "schema {name} missing");
        }
        let bearer = &doc["components"]["securitySchemes"]["bearer"];
        assert_eq!(bearer["scheme"], "bearer");
        assert!(
            bearer["description"]
                .as_str()
                .is_some_and(|d| d.contains("`orders`")),
            "{bearer}"
        );
        // Probes and metrics are public.
        assert!(doc["paths"]["/readyz"]["get"]["security"].is_null());
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
