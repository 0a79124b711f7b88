//! The repository conformance suite against a real PostgreSQL (a private server started
//! by the tests, one database per test).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use usage_core::conformance::TestStore;
use usage_store::PoolOptions;

async fn fresh_store() -> TestStore {
    let db = usage_testdb::fresh_database();
    let applied = usage_store::migrate(db.url()).await.expect("migrate");
    assert!(applied > 0);
    // Migrating again finds nothing to do.
    assert_eq!(usage_store::migrate(db.url()).await.expect("re-migrate"), 0);
    let options = PoolOptions {
        max_connections: 8,
        ..PoolOptions::default()
    };
    let store = usage_store::open(db.url(), &options).await.expect("open");
    assert_eq!(store.backend_name(), "postgres");
    TestStore::new(store, db)
}

usage_core::repository_conformance_tests!(fresh_store);
