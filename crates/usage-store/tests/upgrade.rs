//! Upgrading a database that already holds data: the migration that introduced
//! `eco_usage_days` takes the days aggregated before it as current, so the first start
//! after the upgrade does not aggregate every past day again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use time::macros::date;
use usage_store::PoolOptions;

/// The last migration before `eco_usage_days`.
const BEFORE_DAYS: &str = "2026-11-22-000007";

#[tokio::test]
async fn days_aggregated_before_the_upgrade_stay_current() {
    let dir = std::env::temp_dir().join(format!("usage-upgrade-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("usage.db");
    {
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        let migrations = FileBasedMigrations::from_path(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/sqlite"),
        )
        .unwrap();
        loop {
            // Before the first migration there is no table of applied ones yet.
            let applied = conn.applied_migrations().unwrap_or_default();
            if applied.iter().any(|v| {
                v.to_string()
                    .replace('-', "")
                    .starts_with(&BEFORE_DAYS.replace('-', ""))
            }) {
                break;
            }
            conn.run_next_migration(migrations.clone()).unwrap();
        }
        conn.batch_execute(
            "INSERT INTO eco_users (id, email, plan, created_at)
                 VALUES ('eco_usr_a', 'a@example.com', 'pro', '2026-11-01T00:00:00.000000Z');
             INSERT INTO eco_usage_daily (user_id, date, api_calls, error_calls,
                 total_response_time_ms, avg_response_time_ms, top_endpoints, updated_at)
                 VALUES ('eco_usr_a', '2026-11-20', 3, 0, 6, 2.0, '[]',
                         '2026-11-21T00:05:00.000000Z');",
        )
        .unwrap();
    }
    let url = format!("sqlite://{}", path.display());
    usage_store::migrate(&url).await.unwrap();
    let store = usage_store::open(&url, &PoolOptions::default())
        .await
        .unwrap();
    assert_eq!(
        store
            .aggregated_days(date!(2026 - 11 - 19), date!(2026 - 11 - 21))
            .await
            .unwrap(),
        vec![date!(2026 - 11 - 20)],
        "the day aggregated before the upgrade is current; the others are not"
    );
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}
