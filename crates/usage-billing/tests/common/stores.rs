//! Stores for the billing tests: memory, SQLite in a temporary file, and a private
//! PostgreSQL database; plus helpers that give users overage.
#![allow(dead_code)]

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use usage_core::event::new_event_id;
use usage_core::repo::{ApiKeyRecord, IncludedCalls, User};
use usage_core::{ApiKeyId, Plan, Store, UsageEvent, UserId};
use usage_store::PoolOptions;
use usage_testkit::memory::MemoryStore;

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    Sqlite,
    Postgres,
}

/// A store and whatever keeps its database alive.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub url: Option<String>,
    _guard: Box<dyn Any + Send>,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn fresh(backend: Backend) -> TestStore {
    match backend {
        Backend::Memory => TestStore {
            store: Arc::new(MemoryStore::new()),
            url: None,
            _guard: Box::new(()),
        },
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(format!("usage-billing-{}", uuid::Uuid::now_v7()));
            let url = format!("sqlite://{}/usage.db", dir.display());
            usage_store::migrate(&url).await.unwrap();
            let store = usage_store::open(&url, &PoolOptions::default())
                .await
                .unwrap();
            TestStore {
                store,
                url: Some(url),
                _guard: Box::new(TempDir(dir)),
            }
        }
        Backend::Postgres => {
            let db = usage_testdb::fresh_database();
            usage_store::migrate(db.url()).await.unwrap();
            let store = usage_store::open(db.url(), &PoolOptions::default())
                .await
                .unwrap();
            TestStore {
                store,
                url: Some(db.url().to_owned()),
                _guard: Box::new(db),
            }
        }
    }
}

/// Creates a pro user (with `customer` as Stripe customer) and one key.
pub async fn pro_user(
    store: &Arc<dyn Store>,
    email: &str,
    customer: Option<&str>,
) -> (UserId, ApiKeyId) {
    user_on(store, email, Plan::pro(), customer).await
}

pub async fn user_on(
    store: &Arc<dyn Store>,
    email: &str,
    plan: Plan,
    customer: Option<&str>,
) -> (UserId, ApiKeyId) {
    let created_at = time::macros::datetime!(2026-01-01 00:00 UTC);
    let user = User {
        id: UserId::generate(),
        email: email.to_owned(),
        plan,
        stripe_customer_id: customer.map(str::to_owned),
        created_at,
        plan_subscription_id: None,
        blocked_at: None,
        plan_version: None,
        overrides: None,
    };
    store.create_user(&user).await.unwrap();
    let key = ApiKeyRecord {
        id: ApiKeyId::generate(),
        user_id: user.id.clone(),
        name: "default".to_owned(),
        prefix: "eco_live_abcd".to_owned(),
        key_hash: format!("{:064x}", rand_u128()),
        created_at,
        last_used_at: None,
        revoked_at: None,
        expires_at: None,
    };
    store.create_api_key(&key).await.unwrap();
    (user.id, key.id)
}

fn rand_u128() -> u128 {
    rand::random()
}

/// Records `calls` calls of `user` at `at` (one millisecond apart), with `included`
/// calls in the plan (overage past it).
pub async fn calls(
    store: &Arc<dyn Store>,
    (user, key): &(UserId, ApiKeyId),
    calls: usize,
    at: OffsetDateTime,
    included: u64,
) {
    let events: Vec<UsageEvent> = (0..calls)
        .map(|i| {
            let t = at + Duration::milliseconds(i as i64);
            UsageEvent {
                event_id: new_event_id(t),
                user_id: user.clone(),
                api_key_id: key.clone(),
                endpoint: "/api/v1/ping".to_owned(),
                method: "GET".to_owned(),
                status_code: 200,
                response_time_ms: 2,
                created_at: t,
                units: Default::default(),
            }
        })
        .collect();
    let included: IncludedCalls = HashMap::from([(user.clone(), included)]);
    for batch in events.chunks(2000) {
        store.record_usage(batch, &included).await.unwrap();
    }
}
