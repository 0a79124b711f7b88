//! Upgrading a database that already holds data: the migration that introduced
//! `eco_usage_days` takes the days aggregated before it as current, so the first start
//! after the upgrade does not aggregate every past day again; the one that made plans data
//! rebuilds `eco_users` and keeps every user's keys, sessions and counters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use time::macros::date;
use usage_store::PoolOptions;

/// The last migration before `eco_usage_days`.
const BEFORE_DAYS: &str = "2026-11-22-000007";

/// The last migration before the plan catalog.
const BEFORE_CATALOG: &str = "2026-12-07-000014";

/// Applies the migrations up to and including `last`.
fn migrate_before(conn: &mut SqliteConnection, last: &str) {
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
                .starts_with(&last.replace('-', ""))
        }) {
            break;
        }
        conn.run_next_migration(migrations.clone()).unwrap();
    }
}

#[tokio::test]
async fn the_catalog_migration_keeps_every_users_rows() {
    let dir = std::env::temp_dir().join(format!("usage-upgrade-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("usage.db");
    {
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        conn.batch_execute("PRAGMA foreign_keys = ON").unwrap();
        migrate_before(&mut conn, BEFORE_CATALOG);
        conn.batch_execute(
            "INSERT INTO eco_users (id, email, plan, stripe_customer_id, created_at, blocked_at)
                 VALUES ('eco_usr_a', 'a@example.com', 'pro', 'cus_a',
                         '2026-11-01T00:00:00.000000Z', NULL),
                        ('eco_usr_b', 'b@example.com', 'free', NULL,
                         '2026-11-02T00:00:00.000000Z', '2026-11-03T00:00:00.000000Z');
             INSERT INTO eco_api_keys (id, user_id, name, prefix, key_hash, created_at)
                 VALUES ('eco_key_a', 'eco_usr_a', 'main', 'eco_live_a', 'hash_a',
                         '2026-11-01T00:00:00.000000Z');
             INSERT INTO eco_dashboard_sessions (token_hash, user_id, created_at, expires_at)
                 VALUES ('session_a', 'eco_usr_a', '2026-11-01T00:00:00.000000Z',
                         '2099-01-01T00:00:00.000000Z');
             INSERT INTO eco_usage_records (user_id, period_start, period_end, api_calls,
                                            overage_calls, updated_at)
                 VALUES ('eco_usr_a', '2026-11-01T00:00:00.000000Z',
                         '2026-12-01T00:00:00.000000Z', 7, 0, '2026-11-02T00:00:00.000000Z');",
        )
        .unwrap();
    }
    let url = format!("sqlite://{}", path.display());
    usage_store::migrate(&url).await.unwrap();
    let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    conn.batch_execute("PRAGMA foreign_keys = ON").unwrap();
    let count = |conn: &mut SqliteConnection, sql: &str| -> i64 {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::RunQueryDsl::get_result::<N>(diesel::sql_query(sql), conn)
            .unwrap()
            .n
    };
    for (what, sql, n) in [
        (
            "users, plans kept",
            "SELECT count(*) AS n FROM eco_users WHERE (id, plan) IN (VALUES ('eco_usr_a', 'pro'), ('eco_usr_b', 'free'))",
            2,
        ),
        (
            "customer and blocking kept",
            "SELECT count(*) AS n FROM eco_users WHERE stripe_customer_id = 'cus_a' OR blocked_at IS NOT NULL",
            2,
        ),
        ("keys kept", "SELECT count(*) AS n FROM eco_api_keys", 1),
        (
            "sessions kept",
            "SELECT count(*) AS n FROM eco_dashboard_sessions",
            1,
        ),
        (
            "counters kept",
            "SELECT count(*) AS n FROM eco_usage_records WHERE api_calls = 7",
            1,
        ),
        (
            "no key reported deleted",
            "SELECT count(*) AS n FROM eco_deleted_keys",
            0,
        ),
        (
            "no dangling reference",
            "SELECT count(*) AS n FROM pragma_foreign_key_check",
            0,
        ),
        (
            "the built-in plans",
            "SELECT count(*) AS n FROM eco_plans",
            3,
        ),
    ] {
        assert_eq!(count(&mut conn, sql), n, "{what}");
    }
    // The plan is a reference now, not a CHECK: an unknown plan is refused, a new one is not.
    assert!(
        conn.batch_execute(
            "INSERT INTO eco_users (id, email, plan, created_at)
             VALUES ('eco_usr_c', 'c@example.com', 'growth', '2026-11-01T00:00:00.000000Z')"
        )
        .is_err()
    );
    conn.batch_execute(
        "INSERT INTO eco_plans (key, created_at) VALUES ('growth', '2026-12-07T00:00:00.000000Z');
         INSERT INTO eco_users (id, email, plan, created_at)
         VALUES ('eco_usr_c', 'c@example.com', 'growth', '2026-11-01T00:00:00.000000Z');",
    )
    .unwrap();
    // The rebuilt table's trigger still reports the keys of a user deleted by hand with
    // foreign keys off (the sqlite3 shell's default), where no cascade removes them.
    conn.batch_execute("PRAGMA foreign_keys = OFF; DELETE FROM eco_users WHERE id = 'eco_usr_a'")
        .unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM eco_deleted_keys"),
        1
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM eco_api_keys"),
        1
    );
    drop(conn);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn days_aggregated_before_the_upgrade_stay_current() {
    let dir = std::env::temp_dir().join(format!("usage-upgrade-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("usage.db");
    {
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        migrate_before(&mut conn, BEFORE_DAYS);
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
