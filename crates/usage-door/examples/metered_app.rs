//! A metered actix-web app in a few lines: the usage middleware in front of a scope.
//!
//! ```sh
//! cargo run -p usage-core --features actix --example metered_app
//! curl -i -H 'X-API-Key: eco_live_exampleexampleexampleexample01' http://127.0.0.1:8090/api/v1/items/42
//! ```
//!
//! Everything here is in memory: the store is `MemoryStore` and the keys are a fixed map.
//! A real service uses `usage_store::open(DATABASE_URL)` for the store and
//! `usage_auth::verify::KeyVerifier` as the authenticator (as `usage-server` does).

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};
use async_trait::async_trait;
use usage_core::caller::CallLimits;
use usage_core::quota::{QuotaBook, QuotaSettings};
use usage_core::repo::{ApiKeyRecord, ApiKeyRepository, User, UserRepository};
use usage_core::tracker::{TrackerConfig, UsageTracker};
use usage_core::{
    ApiKeyAuthenticator, ApiKeyId, Caller, Clock, OverLimit, Plan, RepoError, SystemClock, UserId,
};
use usage_door::middleware::{Metering, MeteringDeps};
use usage_testkit::memory::MemoryStore;

/// Keys known up front (a real service hashes and looks them up: `usage-auth`).
struct FixedKeys(HashMap<String, Caller>);

#[async_trait]
impl ApiKeyAuthenticator for FixedKeys {
    async fn authenticate(&self, key: &str) -> Result<Option<Caller>, RepoError> {
        Ok(self.0.get(key).cloned())
    }
}

async fn item(path: web::Path<u32>, caller: web::ReqData<Caller>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"item": *path, "user_id": caller.user_id}))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let store = Arc::new(MemoryStore::new());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    // One free user with one key (1,000 calls a month by default).
    let user = User {
        id: UserId::generate(),
        email: "demo@example.com".into(),
        plan: Plan::free(),
        stripe_customer_id: None,
        created_at: clock.now(),
        plan_subscription_id: None,
        blocked_at: None,
        plan_version: None,
        overrides: None,
    };
    store
        .create_user(&user)
        .await
        .map_err(std::io::Error::other)?;
    let key_id = ApiKeyId::generate();
    store
        .create_api_key(&ApiKeyRecord {
            id: key_id.clone(),
            user_id: user.id.clone(),
            name: "demo".into(),
            prefix: "eco_live_exam".into(),
            key_hash: "not-used-by-this-example".into(),
            created_at: clock.now(),
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        })
        .await
        .map_err(std::io::Error::other)?;
    let keys = FixedKeys(HashMap::from([(
        "eco_live_exampleexampleexampleexample01".to_owned(),
        Caller {
            user_id: user.id,
            api_key_id: key_id,
            plan: Plan::free(),
            // What the key cache resolves from the plan catalog in a real service.
            limits: CallLimits {
                included: Some(1_000),
                over_limit: OverLimit::Block,
                burst: None,
                units: None,
            },
        },
    )]));

    // The three parts the middleware needs, built once.
    let (tracker, worker) =
        UsageTracker::start(store.clone(), store.clone(), TrackerConfig::default());
    // Shares quota counters with other instances (pushes counts, gives idle leases back).
    let quota = Arc::new(QuotaBook::new(
        store.clone(),
        clock.clone(),
        QuotaSettings::default(),
    ));
    let quota_sync = quota.start_sync();
    let metering = Metering::new(MeteringDeps {
        authenticator: Arc::new(keys),
        quota: quota.clone(),
        rate: None,
        tracker,
        clock,
        // No catalog here: a 429 suggests no plan.
        catalog: None,
    });

    println!("listening on http://127.0.0.1:8090 (Ctrl-C to stop)");
    HttpServer::new(move || {
        App::new().service(
            web::scope("/api/v1")
                .wrap(metering.clone())
                .route("/items/{id}", web::get().to(item)),
        )
    })
    .bind(("127.0.0.1", 8090))?
    .run()
    .await?;

    quota_sync.abort();
    if let Err(e) = quota.sync(true).await {
        eprintln!("giving quota leases back failed: {e}");
    }
    let report = worker.shutdown().await;
    println!("recorded {} call(s)", report.flushed_total);
    Ok(())
}
