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
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::moderation::v1::{Decision, ModerationResult, ModerationTask, TargetType};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::auth::{User, Verifier};
use crate::consumer::{HandleError, Handler, Record};
use crate::http::{ApiError, body};
use crate::limit::PerUser;
use crate::service::Builder;
use crate::topics;

/// Adds the report API and a worker to `builder`.
pub async fn build(builder: Builder) -> anyhow::Result<Builder> {
    let ctx = builder.context().clone();
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
    builder
        .api(router(state))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewReport {
    target_type: String,
    target_id: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAd {
    title: String,
}

/// A user id as tokens carry it: 1–128 bytes, no whitespace or control characters.
fn user_id(field: &str, value: &str) -> Result<String, ApiError> {
    if value.is_empty()
        || value.len() > 128
        || value.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::BadRequest(format!(
            "{field}: a user id (1 to 128 bytes, no spaces)"
        )));
    }
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

async fn create(
    State(state): State<ApiState>,
    User(reporter): User,
    report: Result<Json<NewReport>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"report_id": task.report_id})),
    ))
}

/// `POST /ads`: the signed-in user publishes an ad and owns it.
async fn create_ad(
    State(state): State<ApiState>,
    User(owner): User,
    ad: Result<Json<NewAd>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
        Json(json!({"ad_id": id, "owner_id": owner, "title": title})),
    ))
}

/// `GET /ads`: the catalogue, newest first (at most 100). Ads are public, owners included.
async fn list_ads(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let rows = sqlx::query(
        "SELECT id, owner_id, title FROM ads ORDER BY created_at DESC, id DESC LIMIT 100",
    )
    .fetch_all(&state.pool)
    .await?;
    let ads = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "ad_id": r.try_get::<String, _>("id")?,
                "owner_id": r.try_get::<String, _>("owner_id")?,
                "title": r.try_get::<String, _>("title")?,
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(json!({"ads": ads})))
}

async fn fetch(
    State(state): State<ApiState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({
        "report_id": row.try_get::<Uuid, _>("id")?.to_string(),
        "target_type": row.try_get::<String, _>("target_type")?,
        "target_id": row.try_get::<String, _>("target_id")?,
        "decision": row.try_get::<Option<String>, _>("decision")?.unwrap_or_else(|| "PENDING".to_owned()),
    })))
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

    async fn apply(&self, tx: &mut PgConnection, task: &ModerationTask) -> Result<(), HandleError> {
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
        )
        .await?;
        tracing::info!(
            report_id = result.report_id,
            decision = decision.short_name(),
            worker = self.name,
            "moderation decision"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_list_decides_on_whole_words_in_any_case() {
        let rule = Rule::new(&["scam".to_owned(), "Spam".to_owned()]);
        assert_eq!(rule.decide("This ad is a SCAM!").0, Decision::Removed);
        assert_eq!(rule.decide("spam, spam").1, "blocked word: spam");
        assert_eq!(rule.decide("scampi is tasty").0, Decision::Dismissed);
        assert_eq!(rule.decide("rude seller").1, "no rule matched");
    }
}
