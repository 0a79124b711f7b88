//! PostgreSQL's monthly partitions of `eco_api_usage`: a table with data is upgraded in
//! place (it becomes the legacy partition, events still dedupe across it), months are
//! created ahead, and retention drops whole partitions, deleting row by row only in the
//! legacy and default ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use usage_core::repo::IncludedCalls;
use usage_core::{ApiKeyId, BillingPeriod, UsageEvent, UserId};
use usage_store::PoolOptions;

/// The last migration before the partitions.
const BEFORE_PARTITIONS: &str = "2026120100001";

fn migrate_until_partitions(url: &str) {
    let mut conn =
        <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(url).unwrap();
    let migrations = FileBasedMigrations::from_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/postgres"),
    )
    .unwrap();
    loop {
        let applied = conn.applied_migrations().unwrap_or_default();
        if applied.iter().any(|v| {
            v.to_string()
                .replace('-', "")
                .starts_with(BEFORE_PARTITIONS)
        }) {
            break;
        }
        conn.run_next_migration(migrations.clone()).unwrap();
    }
}

fn event(at: OffsetDateTime) -> UsageEvent {
    UsageEvent {
        event_id: usage_core::event::new_event_id(at),
        user_id: UserId::from_stored("eco_usr_a".to_owned()),
        api_key_id: ApiKeyId::from_stored("eco_key_a".to_owned()),
        endpoint: "/api/v1/ping".to_owned(),
        method: "GET".to_owned(),
        status_code: 200,
        response_time_ms: 2,
        created_at: at,
        units: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_data_is_partitioned_and_pruned_by_partition() {
    let db = usage_testdb::fresh_database();
    let url = db.url().to_owned();
    tokio::task::spawn_blocking(move || migrate_until_partitions(&url))
        .await
        .unwrap();
    // Before the upgrade: 5 calls two months ago, 3 this month, one of them known by id.
    let now = OffsetDateTime::now_utc();
    let this_month = BillingPeriod::containing(now).start();
    let old = this_month - Duration::days(45);
    let kept = event(this_month + Duration::hours(1));
    db.psql(&format!(
        "INSERT INTO eco_users (id, email, plan, created_at)
             VALUES ('eco_usr_a', 'a@example.com', 'pro', now());
         INSERT INTO eco_api_keys (id, user_id, name, prefix, key_hash, created_at)
             VALUES ('eco_key_a', 'eco_usr_a', 'k', 'eco_live_abcd', 'h', now());
         INSERT INTO eco_api_usage (event_id, user_id, api_key_id, endpoint, method,
                                    status_code, response_time_ms, created_at)
         SELECT gen_random_uuid(), 'eco_usr_a', 'eco_key_a', '/api/v1/ping', 'GET', 200, 2,
                '{old}'::timestamptz + i * interval '1 minute'
         FROM generate_series(1, 5) i
         UNION ALL
         SELECT gen_random_uuid(), 'eco_usr_a', 'eco_key_a', '/api/v1/ping', 'GET', 200, 2,
                '{this_month}'::timestamptz + i * interval '1 minute'
         FROM generate_series(1, 2) i
         UNION ALL
         SELECT '{}', 'eco_usr_a', 'eco_key_a', '/api/v1/ping', 'GET', 200, 2, '{}'",
        kept.event_id, kept.created_at
    ))
    .unwrap();

    usage_store::migrate(db.url()).await.unwrap();
    let partitions = db
        .psql(
            "SELECT string_agg(c.relname || ' ' || pg_get_expr(c.relpartbound, c.oid), '; '
                                ORDER BY c.relname)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'eco_api_usage'::regclass",
        )
        .unwrap();
    assert!(
        partitions.contains("eco_api_usage_default DEFAULT")
            && partitions.contains("eco_api_usage_legacy FOR VALUES FROM (MINVALUE) TO"),
        "{partitions}"
    );
    let store = usage_store::open(db.url(), &PoolOptions::default())
        .await
        .unwrap();
    let year = (old - Duration::days(365), now + Duration::days(365));
    let user = UserId::from_stored("eco_usr_a".to_owned());
    assert_eq!(
        store
            .count_usage_events(&user, year.0, year.1)
            .await
            .unwrap(),
        8
    );
    // A replay of a call stored before the upgrade is still recognised.
    let replay = store
        .record_usage(std::slice::from_ref(&kept), &IncludedCalls::new())
        .await
        .unwrap();
    assert_eq!((replay.inserted, replay.duplicates), (0, 1));

    // The legacy partition covers this month: the next two get partitions of their own.
    let created = store.prepare_usage_storage(now, 2).await.unwrap();
    let next = BillingPeriod::containing(BillingPeriod::containing(now).end());
    assert_eq!(created.len(), 2, "{created:?}");
    assert_eq!(
        created[0],
        format!(
            "eco_api_usage_p{:04}_{:02}",
            next.start().year(),
            u8::from(next.start().month())
        )
    );

    // Retention inside the legacy partition's range: its old rows go, in batches.
    let dry = store.prune_usage(this_month, true).await.unwrap();
    assert_eq!((dry.rows, dry.partitions.len()), (5, 0));
    let pruned = store.prune_usage(this_month, false).await.unwrap();
    assert_eq!((pruned.rows, pruned.partitions.len()), (5, 0));
    assert_eq!(
        store
            .count_usage_events(&user, year.0, year.1)
            .await
            .unwrap(),
        3
    );

    // Calls of next month land in its partition; once the whole month has expired the
    // partition is dropped, and the legacy one too.
    let mut batch: Vec<UsageEvent> = (0..4)
        .map(|i| event(next.start() + Duration::hours(i)))
        .collect();
    batch.push(event(datetime!(2030-01-01 00:00 UTC)));
    store
        .record_usage(&batch, &IncludedCalls::new())
        .await
        .unwrap();
    let in_month = db
        .psql(&format!(
            "SELECT count(*) FROM eco_api_usage_p{:04}_{:02}",
            next.start().year(),
            u8::from(next.start().month())
        ))
        .unwrap();
    assert_eq!(in_month.trim(), "4");
    let default = db
        .psql("SELECT count(*) FROM eco_api_usage_default")
        .unwrap();
    assert_eq!(default.trim(), "1", "a call no partition covers is kept");

    // Mid-way through next month: that month is kept whole.
    let mid_next = next.start() + Duration::days(10);
    let pruned = store.prune_usage(mid_next, false).await.unwrap();
    assert_eq!(pruned.partitions, vec!["eco_api_usage_legacy".to_owned()]);
    assert_eq!(pruned.rows, 3);
    let pruned = store.prune_usage(next.end(), false).await.unwrap();
    assert_eq!(pruned.rows, 4);
    assert_eq!(pruned.partitions.len(), 1);
    assert_eq!(
        store
            .count_usage_events(&user, year.0, year.1)
            .await
            .unwrap(),
        0
    );
    // The future call in the default partition goes once its time has passed.
    let pruned = store
        .prune_usage(datetime!(2031-01-01 00:00 UTC), false)
        .await
        .unwrap();
    assert!(pruned.rows >= 1, "{pruned:?}");
}
