//! PostgreSQL: a database of its own for each service of each test, created through the admin
//! URL `PRODUCERS_TEST_DATABASE_URL` (default `postgres://notify:notify@127.0.0.1:5432/postgres`;
//! `make test` starts the server) and dropped when the test passes.

use sqlx::{Connection, PgConnection, PgPool};
use test_support::hex;

fn admin_database_url() -> String {
    std::env::var("PRODUCERS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://notify:notify@127.0.0.1:5432/postgres".to_owned())
}

/// A database of its own for one service of one test.
#[derive(Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create(service: &str) -> TestDb {
        let admin = admin_database_url();
        let name = format!("it_{service}_{}", hex(5));
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} (run `make infra-up`): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        let url = format!("{base}/{name}");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy(&url)
            .expect("pool");
        TestDb { name, url, pool }
    }

    /// `SELECT count(*) ...`.
    pub async fn count(&self, sql: &str, bind: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(bind)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Drops the database (at the end of a passing test).
    pub async fn drop_db(self) {
        self.pool.close().await;
        if let Ok(mut conn) = PgConnection::connect(&admin_database_url()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}
