//! The repository conformance suite against a real PostgreSQL (a private server started
//! by the tests, one database per test).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;

use usage_core::Clock;
use usage_store::PoolOptions;
use usage_testkit::conformance::TestStore;

async fn fresh_store(clock: Arc<dyn Clock>) -> TestStore {
    let db = usage_testdb::fresh_database();
    let applied = usage_store::migrate(db.url()).await.expect("migrate");
    assert!(applied > 0);
    // Migrating again finds nothing to do.
    assert_eq!(usage_store::migrate(db.url()).await.expect("re-migrate"), 0);
    let options = PoolOptions {
        max_connections: 8,
        clock,
        ..PoolOptions::default()
    };
    let store = usage_store::open(db.url(), &options).await.expect("open");
    assert_eq!(store.backend_name(), "postgres");
    TestStore::new(store, db)
}

usage_testkit::repository_conformance_tests!(fresh_store);

/// Per-user analytics read only indexed columns: PostgreSQL must be able to answer the
/// endpoint statistics from the covering index, without visiting the table.
#[tokio::test]
async fn endpoint_statistics_can_be_answered_from_the_index_alone() {
    let db = usage_testdb::fresh_database();
    usage_store::migrate(db.url()).await.expect("migrate");
    let indexes = db
        .psql("SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE tablename = 'eco_api_usage'")
        .unwrap();
    assert_eq!(
        indexes.trim(),
        "eco_api_usage_event_key,eco_api_usage_time_idx,eco_api_usage_user_time_cover_idx"
    );
    // The month's partition, as the server creates it at start.
    let store = usage_store::open(db.url(), &usage_store::PoolOptions::default())
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let created = store.prepare_usage_storage(now, 1).await.unwrap();
    assert_eq!(created.len(), 2, "{created:?}");
    assert!(
        store
            .prepare_usage_storage(now, 1)
            .await
            .unwrap()
            .is_empty()
    );
    let plan = db
        .psql(
            "SET enable_seqscan = off; SET enable_bitmapscan = off;
             EXPLAIN SELECT endpoint, method, count(*), count(*) FILTER (WHERE status_code >= 400),
                            sum(response_time_ms)
             FROM eco_api_usage
             WHERE user_id = 'eco_usr_x' AND created_at >= now() - interval '7 days'
               AND created_at < now()
             GROUP BY endpoint, method",
        )
        .unwrap();
    // Each partition's copy of the covering index, never the rows themselves.
    assert!(
        plan.contains("Index Only Scan using eco_api_usage_p")
            && !plan.contains("Seq Scan")
            && !plan.contains("Index Scan using"),
        "{plan}"
    );
}
