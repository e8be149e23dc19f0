//! The moderation service: `POST /reports` writes the report and a `ModerationTask` (keyed by
//! report id) in one transaction; workers — every moderation process, one consumer group —
//! share `moderation.tasks`, each task decided by one of them with the word-list rule, and
//! emit `moderation.results`, which the hub delivers to the reporter (and to the target's owner
//! when it was removed).
//!
//! The owner of a target comes from the service's own records, never from the request: an ad's
//! owner from the catalogue of ads (`POST /ads` by the owner, `GET /ads`; the demo's ads seeded
//! with `DEMO_ADS`), a user's owner is that user. Reports are rate limited per reporter.

use async_trait::async_trait;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::moderation::v1::{Decision, ModerationResult, ModerationTask, TargetType};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::auth::{User, Verifier};
use crate::consumer::{HandleError, Handler, Record};
use crate::http::{ApiError, body};
use crate::limit::PerUser;
use crate::openapi::ErrorBody;
use crate::service::Builder;
use crate::topics;
use crate::trace::TraceContext;

/// Adds the report API and a worker to `builder`.
pub async fn build(builder: Builder) -> anyhow::Result<Builder> {
    let ctx = builder.resources().clone();
    if ctx.settings.demo_ads {
        seed_demo_ads(&ctx.pool).await?;
    }
    let limit = PerUser::new(
        "reports",
        ctx.settings.reports_per_minute,
        ctx.settings.reports_burst,
        &ctx.metrics,
    );
    let state = ApiState {
        pool: ctx.pool.clone(),
        verifier: Verifier::hs256(
            ctx.settings.jwt_secret.as_deref().unwrap_or_default(),
            &ctx.settings.jwt_audience(ctx.service),
        ),
        topic: ctx.settings.topic(topics::MODERATION_TASKS),
        limit: limit.clone(),
    };
    let worker = Worker {
        rule: Rule::new(&ctx.settings.blocked_words),
        topic: ctx.settings.topic(topics::MODERATION_RESULTS),
        name: ctx
            .settings
            .worker_id
            .clone()
            .unwrap_or_else(|| format!("{}-{:04x}", std::process::id(), rand::random::<u16>())),
    };
    let doc = openapi_json(&ctx.settings.jwt_audience(ctx.service));
    builder
        .api(router(state))
        .api(crate::openapi::route(doc))
        .task("report rate limit", limit.clean_until(ctx.stop.clone()))
        .consume(&[topics::MODERATION_TASKS], worker)
}

/// The demo's ads (`DEMO_ADS=true`): id, owner, title. The owners are the demo page's users.
pub const DEMO_ADS: [(&str, &str, &str); 5] = [
    ("ad-1", "alice", "Noise-cancelling headphones, barely used"),
    ("ad-2", "bob", "Mountain bike, 21 gears"),
    ("ad-3", "alice", "Vintage film camera"),
    ("ad-4", "bob", "Two concert tickets for Saturday"),
    ("ad-5", "broke", "Sofa, free to collect"),
];

/// Adds the demo's ads that are missing (an ad already there keeps its owner).
async fn seed_demo_ads(pool: &PgPool) -> Result<(), sqlx::Error> {
    for (id, owner, title) in DEMO_ADS {
        sqlx::query(
            "INSERT INTO ads (id, owner_id, title) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(owner)
        .bind(title)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// State of the REST handlers.
#[derive(Clone)]
pub struct ApiState {
    pool: PgPool,
    verifier: Verifier,
    topic: String,
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
        .route("/ads", post(create_ad).get(list_ads))
        .route("/reports", post(create))
        .route("/reports/{id}", get(fetch))
        .with_state(state)
}

/// A report. The target's owner is never named here (a body with `target_owner_id` is
/// refused): the service looks it up in its own records.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewReport {
    #[schema(value_type = TargetKind)]
    target_type: String,
    /// An ad id of the catalogue, or a user id (1 to 256 bytes, no braces or control
    /// characters).
    #[schema(min_length = 1, max_length = 256, example = "ad-1")]
    target_id: String,
    /// 1 to 1000 bytes; a blocked word (whole word, any case) gets the target removed.
    #[schema(min_length = 1, max_length = 1000, example = "looks like a scam")]
    reason: String,
}

/// What a report is about.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Documentation only: the body's field is read as text.
enum TargetKind {
    Ad,
    User,
}

/// A report's decision (`PENDING` until a worker made it).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(dead_code)] // Documentation only: decisions are stored and sent as text.
enum DecisionName {
    Pending,
    Dismissed,
    Removed,
}

/// `202` to `POST /reports`.
#[derive(Serialize, utoipa::ToSchema)]
struct ReportAccepted {
    #[schema(example = "01934b7e-8f3a-7c1e-9d2a-5b6c7d8e9f01")]
    report_id: String,
}

/// A report as its reporter sees it.
#[derive(Serialize, utoipa::ToSchema)]
struct ReportView {
    report_id: String,
    #[schema(value_type = TargetKind)]
    target_type: String,
    target_id: String,
    #[schema(value_type = DecisionName)]
    decision: String,
}

/// An ad to publish; whoever publishes it owns it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewAd {
    /// 1 to 200 bytes (trimmed).
    #[schema(min_length = 1, max_length = 200, example = "Mountain bike, 21 gears")]
    title: String,
}

/// An ad of the catalogue.
#[derive(Serialize, utoipa::ToSchema)]
struct Ad {
    #[schema(example = "ad-0123456789ab")]
    ad_id: String,
    owner_id: String,
    title: String,
}

/// `GET /ads`: the newest 100 ads.
#[derive(Serialize, utoipa::ToSchema)]
struct AdList {
    ads: Vec<Ad>,
}

/// The OpenAPI 3.1 description of the moderation API, generated from the handlers and types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "moderation service HTTP API",
        description = "Reports on ads and users, and the catalogue of ads. Decisions reach the reporter (and the owner of a removed target) through the hub as `moderation.result` notifications (docs/asyncapi.yaml)."
    ),
    paths(create, fetch, create_ad, list_ads),
    components(schemas(
        NewReport,
        TargetKind,
        DecisionName,
        ReportAccepted,
        ReportView,
        NewAd,
        Ad,
        AdList,
        ErrorBody
    ))
)]
struct ApiDoc;

/// The document served at `GET /api/openapi.json`; `audience` is the `aud` tokens must carry.
pub fn openapi_json(audience: &str) -> String {
    use utoipa::OpenApi as _;
    crate::openapi::finish(ApiDoc::openapi(), audience)
}

/// A user id as tokens carry it (the rule of `proto::user_id`).
fn user_id(field: &str, value: &str) -> Result<String, ApiError> {
    proto::user_id::check(value).map_err(|e| ApiError::BadRequest(format!("{field}: {e}")))?;
    Ok(value.to_owned())
}

fn required(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let v = value.trim();
    if v.is_empty() || v.len() > max {
        return Err(ApiError::BadRequest(format!(
            "{field}: required, at most {max} bytes"
        )));
    }
    Ok(v.to_owned())
}

/// Reports an ad or a user; a worker decides it later.
#[utoipa::path(
    post,
    path = "/reports",
    tag = "reports",
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context; the report's task and result on Kafka continue this trace (a new one starts without it)"),
    ),
    request_body(content = NewReport, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted; the decision comes later", body = ReportAccepted),
        (status = 400, description = "Bad JSON, an unknown field (e.g. `target_owner_id`), a field out of its limits", body = ErrorBody),
        (status = 401, description = "No, bad or expired token, or a token for another audience", body = ErrorBody),
        (status = 404, description = "No such ad in the catalogue", body = ErrorBody),
        (status = 408, description = "The body did not arrive, or the request was not completed, in time", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 429, description = "Too many reports of this reporter", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until one more report is allowed"))),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn create(
    State(state): State<ApiState>,
    User(reporter): User,
    headers: HeaderMap,
    report: Result<Json<NewReport>, JsonRejection>,
) -> Result<(StatusCode, Json<ReportAccepted>), ApiError> {
    let trace = TraceContext::continue_or_start(
        headers
            .get(crate::trace::HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    tracing::Span::current().record("trace_id", trace.trace_id().as_str());
    let report = body(report)?;
    state.limit.check(&reporter)?;
    let target_type = match report.target_type.as_str() {
        "ad" => TargetType::Ad,
        "user" => TargetType::User,
        _ => {
            return Err(ApiError::BadRequest(
                "target_type: must be \"ad\" or \"user\"".into(),
            ));
        }
    };
    let reason = required("reason", &report.reason, 1000)?;
    let (target_id, owner) = match target_type {
        TargetType::User => {
            let user = user_id("target_id", report.target_id.trim())?;
            (user.clone(), user)
        }
        _ => {
            let ad = required("target_id", &report.target_id, 128)?;
            let owner: String = sqlx::query_scalar("SELECT owner_id FROM ads WHERE id = $1")
                .bind(&ad)
                .fetch_optional(&state.pool)
                .await?
                .ok_or(ApiError::NotFound("no such ad"))?;
            (ad, owner)
        }
    };
    let id = Uuid::now_v7();
    let mut tx = state.pool.begin().await?;
    sqlx::query(
        "INSERT INTO reports (id, reporter_id, target_type, target_id, target_owner_id, reason) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(&reporter)
    .bind(&report.target_type)
    .bind(&target_id)
    .bind(&owner)
    .bind(&reason)
    .execute(&mut *tx)
    .await?;
    let task = ModerationTask {
        event_id: crate::event_id(),
        report_id: id.to_string(),
        reporter_id: reporter,
        target_type: target_type.into(),
        target_id,
        target_owner_id: owner,
        reason,
        occurred_at: Some(crate::now()),
    };
    crate::outbox::enqueue(
        &mut tx,
        &state.topic,
        &task.report_id,
        &task.event_id,
        proto::encode_protobuf(&task),
        &trace,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(report_id = task.report_id, trace_id = %trace.trace_id(), "report filed");
    Ok((
        StatusCode::ACCEPTED,
        Json(ReportAccepted {
            report_id: task.report_id,
        }),
    ))
}

/// `POST /ads`: the signed-in user publishes an ad and owns it.
#[utoipa::path(
    post,
    path = "/ads",
    tag = "ads",
    request_body(content = NewAd, content_type = "application/json"),
    responses(
        (status = 201, description = "Published; the token's user owns it", body = Ad),
        (status = 400, description = "Bad JSON, an unknown field, a title out of its limits", body = ErrorBody),
        (status = 401, description = "No, bad or expired token, or a token for another audience", body = ErrorBody),
        (status = 408, description = "The body did not arrive, or the request was not completed, in time", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn create_ad(
    State(state): State<ApiState>,
    User(owner): User,
    ad: Result<Json<NewAd>, JsonRejection>,
) -> Result<(StatusCode, Json<Ad>), ApiError> {
    let ad = body(ad)?;
    let title = required("title", &ad.title, 200)?;
    let id = format!("ad-{}", &Uuid::new_v4().simple().to_string()[..12]);
    sqlx::query("INSERT INTO ads (id, owner_id, title) VALUES ($1, $2, $3)")
        .bind(&id)
        .bind(&owner)
        .bind(&title)
        .execute(&state.pool)
        .await?;
    tracing::info!(ad_id = id, "ad published");
    Ok((
        StatusCode::CREATED,
        Json(Ad {
            ad_id: id,
            owner_id: owner,
            title,
        }),
    ))
}

/// `GET /ads`: the catalogue, newest first (at most 100). Ads are public, owners included.
#[utoipa::path(
    get,
    path = "/ads",
    tag = "ads",
    responses(
        (status = 200, description = "The newest 100 ads with their owners (no token needed)", body = AdList),
        (status = 408, description = "The request was not completed in time", body = ErrorBody),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    )
)]
async fn list_ads(State(state): State<ApiState>) -> Result<Json<AdList>, ApiError> {
    let rows = sqlx::query(
        "SELECT id, owner_id, title FROM ads ORDER BY created_at DESC, id DESC LIMIT 100",
    )
    .fetch_all(&state.pool)
    .await?;
    let ads = rows
        .iter()
        .map(|r| {
            Ok(Ad {
                ad_id: r.try_get("id")?,
                owner_id: r.try_get("owner_id")?,
                title: r.try_get("title")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(AdList { ads }))
}

/// One report of the token's user, with its decision.
#[utoipa::path(
    get,
    path = "/reports/{id}",
    tag = "reports",
    params(("id" = String, Path, description = "The report id (`report_id` of the 202)")),
    responses(
        (status = 200, description = "The report", body = ReportView),
        (status = 401, description = "No, bad or expired token, or a token for another audience", body = ErrorBody),
        (status = 404, description = "No such report of this user", body = ErrorBody),
        (status = 408, description = "The request was not completed in time", body = ErrorBody),
        (status = 503, description = "The database did not answer", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn fetch(
    State(state): State<ApiState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<ReportView>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("no such report"))?;
    let row = sqlx::query(
        "SELECT r.id, r.target_type, r.target_id, d.decision FROM reports r \
         LEFT JOIN decisions d ON d.report_id = r.id::text WHERE r.id = $1 AND r.reporter_id = $2",
    )
    .bind(id)
    .bind(&user)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound("no such report"))?;
    Ok(Json(ReportView {
        report_id: row.try_get::<Uuid, _>("id")?.to_string(),
        target_type: row.try_get("target_type")?,
        target_id: row.try_get("target_id")?,
        decision: row
            .try_get::<Option<String>, _>("decision")?
            .unwrap_or_else(|| "PENDING".to_owned()),
    }))
}

/// The decision rule: a reason containing a blocked word (whole word, any case) removes the
/// target; anything else is dismissed.
pub struct Rule {
    words: Vec<String>,
}

impl Rule {
    /// A rule over `words`.
    pub fn new(words: &[String]) -> Self {
        Rule {
            words: words.iter().map(|w| w.to_lowercase()).collect(),
        }
    }

    /// The decision and the rule that made it.
    pub fn decide(&self, reason: &str) -> (Decision, String) {
        let lower = reason.to_lowercase();
        let hit = lower
            .split(|c: char| !c.is_alphanumeric())
            .find(|w| self.words.iter().any(|b| b == w));
        match hit {
            Some(word) => (Decision::Removed, format!("blocked word: {word}")),
            None => (Decision::Dismissed, "no rule matched".to_owned()),
        }
    }
}

struct Worker {
    rule: Rule,
    topic: String,
    name: String,
}

#[async_trait]
impl Handler for Worker {
    type Event = ModerationTask;
    const CONSUMER: &'static str = "moderation-worker";

    fn decode(&self, record: &Record<'_>) -> Result<ModerationTask, String> {
        let task: ModerationTask = record.decode()?;
        if task.event_id.is_empty() || task.report_id.is_empty() || task.reporter_id.is_empty() {
            return Err("event_id, report_id and reporter_id are required".into());
        }
        Ok(task)
    }

    fn event_id(task: &ModerationTask) -> &str {
        &task.event_id
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        task: &ModerationTask,
        trace: &TraceContext,
    ) -> Result<(), HandleError> {
        let (decision, rule) = self.rule.decide(&task.reason);
        let first = sqlx::query(
            "INSERT INTO decisions (report_id, decision, rule, worker) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (report_id) DO NOTHING",
        )
        .bind(&task.report_id)
        .bind(decision.short_name())
        .bind(&rule)
        .bind(&self.name)
        .execute(&mut *tx)
        .await?;
        if first.rows_affected() == 0 {
            tracing::warn!(
                report_id = task.report_id,
                "report already decided; ignored"
            );
            return Ok(());
        }
        let result = ModerationResult {
            event_id: crate::event_id(),
            report_id: task.report_id.clone(),
            reporter_id: task.reporter_id.clone(),
            target_type: task.target_type,
            target_id: task.target_id.clone(),
            target_owner_id: task.target_owner_id.clone(),
            decision: decision.into(),
            reason: rule,
            occurred_at: Some(crate::now()),
        };
        crate::outbox::enqueue(
            tx,
            &self.topic,
            &result.report_id,
            &result.event_id,
            proto::encode_protobuf(&result),
            trace,
        )
        .await?;
        tracing::info!(
            report_id = result.report_id,
            decision = decision.short_name(),
            worker = self.name,
            trace_id = %trace.trace_id(),
            "moderation decision"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_names_every_route_and_schema() {
        let doc: serde_json::Value =
            serde_json::from_str(&openapi_json("moderation")).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, method) in [
            ("/reports", "post"),
            ("/reports/{id}", "get"),
            ("/ads", "post"),
            ("/ads", "get"),
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/metrics", "get"),
        ] {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} missing"
            );
        }
        let post = &doc["paths"]["/reports"]["post"];
        assert_eq!(post["security"][0]["bearer"], serde_json::json!([]));
        for status in ["202", "400", "401", "404", "408", "413", "429", "503"] {
            assert!(
                post["responses"][status].is_object(),
                "POST /reports {status}"
            );
        }
        assert!(post["responses"]["429"]["headers"]["Retry-After"].is_object());
        // The catalogue is public.
        assert!(doc["paths"]["/ads"]["get"]["security"].is_null());
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["NewReport"]["required"],
            serde_json::json!(["target_type", "target_id", "reason"])
        );
        assert_eq!(schemas["NewReport"]["additionalProperties"], false);
        assert_eq!(
            schemas["TargetKind"]["enum"],
            serde_json::json!(["ad", "user"])
        );
        for name in [
            "ReportAccepted",
            "ReportView",
            "NewAd",
            "Ad",
            "AdList",
            "DecisionName",
            "ErrorBody",
        ] {
            assert!(schemas[name].is_object(), "schema {name} missing");
        }
        let bearer = &doc["components"]["securitySchemes"]["bearer"];
        assert!(
            bearer["description"]
                .as_str()
                .is_some_and(|d| d.contains("`moderation`")),
            "{bearer}"
        );
    }

    #[test]
    fn the_word_list_decides_on_whole_words_in_any_case() {
        let rule = Rule::new(&["scam".to_owned(), "Spam".to_owned()]);
        assert_eq!(rule.decide("This ad is a SCAM!").0, Decision::Removed);
        assert_eq!(rule.decide("spam, spam").1, "blocked word: spam");
        assert_eq!(rule.decide("scampi is tasty").0, Decision::Dismissed);
        assert_eq!(rule.decide("rude seller").1, "no rule matched");
    }
}
