//! The repository conformance suite against SQLite files in temporary directories.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;

use usage_core::Clock;
use usage_store::PoolOptions;
use usage_testkit::conformance::TestStore;

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn fresh_store(clock: Arc<dyn Clock>) -> TestStore {
    let dir = std::env::temp_dir().join(format!("usage-sqlite-{}", uuid::Uuid::now_v7()));
    let url = format!("sqlite://{}/usage.db", dir.display());
    let applied = usage_store::migrate(&url).await.expect("migrate");
    assert!(applied > 0);
    let options = PoolOptions {
        clock,
        ..PoolOptions::default()
    };
    let store = usage_store::open(&url, &options).await.expect("open");
    assert_eq!(store.backend_name(), "sqlite");
    TestStore::new(store, TempDir(dir))
}

usage_testkit::repository_conformance_tests!(fresh_store);
