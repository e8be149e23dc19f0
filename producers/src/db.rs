//! The service's own PostgreSQL database: pool, migrations, and the processed-events claim that
//! makes every consumer idempotent.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};

use crate::config::{Service, Settings};

/// Tables every service has (`outbox`, `processed_events`); versions 0001–0999.
static COMMON: Migrator = sqlx::migrate!("migrations/common");
static ORDER: Migrator = sqlx::migrate!("migrations/order");
static PAYMENT: Migrator = sqlx::migrate!("migrations/payment");
static DELIVERY: Migrator = sqlx::migrate!("migrations/delivery");
static MODERATION: Migrator = sqlx::migrate!("migrations/moderation");

/// Connects (waiting up to 10 s for the database to accept connections) and applies the
/// service's migrations.
pub async fn connect(service: Service, settings: &Settings) -> anyhow::Result<PgPool> {
    use anyhow::Context as _;
    let pool = PgPoolOptions::new()
        .max_connections(settings.database_pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect(settings.database_url())
        .await
        .with_context(|| {
            format!(
                "database: cannot connect ({}DATABASE_URL)",
                service.prefix()
            )
        })?;
    migrate(service, &pool)
        .await
        .context("database: migrations")?;
    Ok(pool)
}

/// Applies the common and the service's own migrations (idempotent; safe from several
/// processes at once: sqlx takes an advisory lock).
pub async fn migrate(service: Service, pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let own = match service {
        Service::Order => &ORDER,
        Service::Payment => &PAYMENT,
        Service::Delivery => &DELIVERY,
        Service::Moderation => &MODERATION,
    };
    run_ignoring_others(&COMMON, pool).await?;
    run_ignoring_others(own, pool).await
}

/// Two migrators share one history table; each ignores the versions of the other.
async fn run_ignoring_others(
    migrator: &Migrator,
    pool: &PgPool,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = Migrator {
        migrations: migrator.migrations.clone(),
        ..Migrator::DEFAULT
    };
    migrator.set_ignore_missing(true);
    migrator.run(pool).await
}

/// Records that `consumer` handled `event_id`, in the caller's transaction. False when it had
/// already: the caller must then change nothing.
pub async fn claim(
    conn: &mut PgConnection,
    consumer: &str,
    event_id: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
