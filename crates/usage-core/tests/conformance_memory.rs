//! The repository conformance suite against the in-memory store.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;

use usage_core::Clock;
use usage_testkit::conformance::TestStore;
use usage_testkit::memory::MemoryStore;

async fn fresh_store(clock: Arc<dyn Clock>) -> TestStore {
    TestStore::new(Arc::new(MemoryStore::with_clock(clock)), ())
}

usage_testkit::repository_conformance_tests!(fresh_store);
