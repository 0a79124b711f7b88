//! The metering middleware in an actix app with in-memory repositories: what it answers,
//! which headers it sets, and what it records (the route pattern, not the raw path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{App, HttpResponse, test, web};
use async_trait::async_trait;
use time::macros::datetime;
use usage_core::quota::QuotaBook;
use usage_core::rate::{RateLimit, RateLimiter};
use usage_core::repo::{
    ApiKeyRecord, ApiKeyRepository, DailyUsageRepository, UsageRepository, User, UserRepository,
};
use usage_core::tracker::{TrackerConfig, TrackerWorker, UsageTracker};
use usage_core::{
    ApiKeyAuthenticator, ApiKeyId, BillingPeriod, Caller, Clock, ManualClock, Plan, PlanCatalog,
    PlanTerms, RepoError, UserId,
};
use usage_door::middleware::{Metering, MeteringDeps, UNMATCHED_ROUTE};
use usage_testkit::memory::MemoryStore;

const KEY: &str = "eco_live_testtesttesttesttesttesttesttest";

struct OneKey(Caller);

#[async_trait]
impl ApiKeyAuthenticator for OneKey {
    async fn authenticate(&self, key: &str) -> Result<Option<Caller>, RepoError> {
        Ok((key == KEY).then(|| self.0.clone()))
    }
}

struct Fixture {
    store: Arc<MemoryStore>,
    user: UserId,
    metering: Metering,
    worker: TrackerWorker,
    catalog: Arc<usage_core::terms::LiveCatalog>,
}

async fn fixture(plan: Plan, rate: Option<RateLimit>) -> Fixture {
    fixture_with(plan, rate, None).await
}

/// The fixture, with limits on meters other than calls.
async fn fixture_with(
    plan: Plan,
    rate: Option<RateLimit>,
    units: Option<Arc<[usage_core::caller::UnitLimit]>>,
) -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = User {
        id: UserId::generate(),
        email: "ada@example.com".into(),
        plan: plan.clone(),
        stripe_customer_id: None,
        created_at: clock.now(),
        plan_subscription_id: None,
        blocked_at: None,
        plan_version: None,
        overrides: None,
    };
    store.create_user(&user).await.unwrap();
    let key = ApiKeyRecord {
        id: ApiKeyId::generate(),
        user_id: user.id.clone(),
        name: "k".into(),
        prefix: "eco_live_test".into(),
        key_hash: "0".repeat(64),
        created_at: clock.now(),
        last_used_at: None,
        revoked_at: None,
        expires_at: None,
    };
    store.create_api_key(&key).await.unwrap();
    let defaults = PlanCatalog::default();
    let catalog = PlanCatalog {
        free: PlanTerms {
            monthly_calls: Some(3),
            ..defaults.free
        },
        pro: PlanTerms {
            monthly_calls: Some(2),
            ..defaults.pro
        },
        ..defaults
    };
    let (tracker, worker) =
        UsageTracker::start(store.clone(), store.clone(), TrackerConfig::default());
    let terms = *catalog.terms(&plan).expect("a built-in plan");
    let limits = usage_core::caller::CallLimits {
        included: terms.monthly_calls,
        over_limit: terms.over_limit,
        burst: rate,
        units,
    };
    let rate = Some(Arc::new(RateLimiter::new(clock.clone())));
    // The built-in plans as these variables make them: a refused free user is offered pro.
    let live = usage_testkit::seeded_catalog(store.clone(), &catalog).await;
    let metering = Metering::new(MeteringDeps {
        authenticator: Arc::new(OneKey(Caller {
            user_id: user.id.clone(),
            api_key_id: key.id,
            plan,
            limits,
        })),
        quota: Arc::new(QuotaBook::new(
            store.clone(),
            clock.clone(),
            usage_core::quota::QuotaSettings::default(),
        )),
        rate,
        tracker,
        clock,
        catalog: Some(live.clone()),
    });
    Fixture {
        store,
        user: user.id,
        metering,
        worker,
        catalog: live,
    }
}

async fn item(path: web::Path<u32>, caller: web::ReqData<Caller>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"item": *path, "user": caller.user_id}))
}

async fn broken() -> HttpResponse {
    HttpResponse::InternalServerError().finish()
}

/// Reports 1,234 tokens, then 6 more, and units of meters that take none.
async fn generate() -> HttpResponse {
    use usage_door::report::ReportUnits;
    HttpResponse::Ok()
        .finish()
        .report("tokens", 1_234)
        .report("tokens", 6)
        .report("seats", 1)
        .report("nope", 5)
        .report("api_calls", 9)
}

macro_rules! app {
    ($metering:expr) => {
        test::init_service(
            App::new().service(
                web::scope("/api/v1")
                    .wrap($metering.clone())
                    .route("/items/{id}", web::get().to(item))
                    .route("/broken", web::post().to(broken))
                    .route("/generate", web::post().to(generate)),
            ),
        )
        .await
    };
}

fn get(path: &str) -> test::TestRequest {
    test::TestRequest::get()
        .uri(path)
        .insert_header(("X-API-Key", KEY))
}

/// Calls counted for the fixture's user this period, after the tracker's final flush.
async fn stored_calls(f: Fixture) -> u64 {
    f.worker.shutdown().await;
    let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
    let record = f.store.usage_record(&f.user, period.start()).await.unwrap();
    record.map_or(0, |r| r.api_calls)
}

#[actix_web::test]
async fn records_the_route_pattern_status_and_caller() {
    let f = fixture(Plan::enterprise(), None).await;
    let app = app!(f.metering);
    for id in [1, 2, 3] {
        let res = test::call_service(&app, get(&format!("/api/v1/items/{id}")).to_request()).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers().get("x-ratelimit-limit").is_none(),
            "enterprise: no quota headers"
        );
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["user"], f.user.as_str());
    }
    let broken = test::TestRequest::post()
        .uri("/api/v1/broken")
        .insert_header(("Authorization", format!("Bearer {KEY}")));
    assert_eq!(
        test::call_service(&app, broken.to_request()).await.status(),
        500
    );
    let missing = test::call_service(&app, get("/api/v1/nowhere").to_request()).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    f.worker.shutdown().await;
    let day = datetime!(2026-11-22 00:00 UTC).date();
    f.store
        .aggregate_usage_day(day, datetime!(2026-11-23 00:00 UTC))
        .await
        .unwrap();
    let row = f
        .store
        .daily_usage(&f.user, day, day)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (row.api_calls, row.error_calls),
        (5, 2),
        "every admitted call, errors included"
    );
    let endpoints: Vec<(String, String, u64)> = row
        .top_endpoints
        .into_iter()
        .map(|e| (e.endpoint, e.method, e.calls))
        .collect();
    assert_eq!(
        endpoints,
        vec![
            ("/api/v1/items/{id}".to_owned(), "GET".to_owned(), 3),
            ("/api/v1/broken".to_owned(), "POST".to_owned(), 1),
            (UNMATCHED_ROUTE.to_owned(), "GET".to_owned(), 1),
        ],
        "the route pattern, never the raw path"
    );
}

#[actix_web::test]
async fn free_is_blocked_at_its_limit_with_the_contract_answer() {
    let f = fixture(Plan::free(), None).await;
    let app = app!(f.metering);
    for remaining in ["2", "1", "0"] {
        let res = test::call_service(&app, get("/api/v1/items/1").to_request()).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers().get("x-ratelimit-limit").unwrap(), "3");
        assert_eq!(
            res.headers().get("x-ratelimit-remaining").unwrap(),
            remaining
        );
        assert_eq!(
            res.headers()
                .get("x-ratelimit-reset")
                .unwrap()
                .to_str()
                .unwrap(),
            datetime!(2026-12-01 00:00 UTC).unix_timestamp().to_string()
        );
    }
    let res = test::call_service(&app, get("/api/v1/items/1").to_request()).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // From 2026-11-22 10:00 to 2026-12-01 00:00.
    assert_eq!(
        res.headers().get("retry-after").unwrap(),
        &(8 * 86_400 + 14 * 3_600).to_string()
    );
    let body: serde_json::Value = test::read_body_json(res).await;
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["limit"], 3);
    assert_eq!(body["reset_at"], "2026-12-01T00:00:00Z");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("Upgrade to Pro for more calls.")
    );

    let stats = f.metering.stats();
    assert_eq!(stats.quota_rejected.get(), 1);
    let stored = stored_calls(f).await;
    assert_eq!(stored, 3, "the rejected call is not counted");
}

#[actix_web::test]
async fn missing_and_wrong_keys_get_401() {
    let f = fixture(Plan::pro(), None).await;
    let app = app!(f.metering);
    for req in [
        test::TestRequest::get().uri("/api/v1/items/1"),
        test::TestRequest::get()
            .uri("/api/v1/items/1")
            .insert_header(("X-API-Key", "eco_live_wrong")),
        test::TestRequest::get()
            .uri("/api/v1/items/1")
            .insert_header(("Authorization", format!("Basic {KEY}"))),
        test::TestRequest::get()
            .uri("/api/v1/items/1")
            .insert_header(("Authorization", "Bearer")),
    ] {
        let res = test::call_service(&app, req.to_request()).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(res.headers().get("www-authenticate").unwrap(), "Bearer");
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["error"], "unauthorized");
    }
    let stored = stored_calls(f).await;
    assert_eq!(stored, 0);
}

#[actix_web::test]
async fn the_short_window_limit_answers_429_rate_limited_when_on() {
    let f = fixture(
        Plan::pro(),
        Some(RateLimit {
            per_second: 1,
            burst: 2,
        }),
    )
    .await;
    let app = app!(f.metering);
    for remaining in ["1", "0"] {
        let res = test::call_service(&app, get("/api/v1/items/1").to_request()).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers().get("x-ratelimit-burst-limit").unwrap(), "2");
        assert_eq!(
            res.headers().get("x-ratelimit-burst-remaining").unwrap(),
            remaining
        );
    }
    let res = test::call_service(&app, get("/api/v1/items/1").to_request()).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers().get("retry-after").unwrap(), "1");
    let body: serde_json::Value = test::read_body_json(res).await;
    assert_eq!(body["error"], "rate_limited");
    let stored = stored_calls(f).await;
    assert_eq!(
        stored, 2,
        "rate-limited calls are neither counted nor recorded"
    );
}

#[actix_web::test]
async fn units_a_handler_reports_are_stored_with_its_call() {
    use usage_core::meter::{Aggregation, Meter};
    use usage_core::repo::{MeterUsageRepository, PlanRepository};
    let f = fixture(Plan::enterprise(), None).await;
    for (key, aggregation) in [
        ("tokens", Aggregation::Sum),
        ("seats", Aggregation::UniqueCount),
    ] {
        let meter = Meter {
            key: key.into(),
            name: key.into(),
            unit: "unit".into(),
            aggregation,
        };
        f.store
            .create_meter(&meter, datetime!(2026-11-22 10:00 UTC))
            .await
            .unwrap();
    }
    f.catalog.refresh().await.unwrap();
    let app = app!(f.metering);
    for _ in 0..2 {
        let call = test::TestRequest::post()
            .uri("/api/v1/generate")
            .insert_header(("X-API-Key", KEY));
        let res = test::call_service(&app, call.to_request()).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    f.worker.shutdown().await;
    let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
    assert_eq!(
        f.store.meter_usage(&f.user, period.start()).await.unwrap(),
        vec![("tokens".to_owned(), 2 * 1_240)],
        "units of meters that take none are left out"
    );
    let calls = f
        .store
        .usage_events_page(&f.user, period.start(), period.end(), None, 10)
        .await
        .unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].units.to_stored().as_deref(), Some("tokens=1240"));
}

#[actix_web::test]
async fn a_routes_cost_is_taken_before_the_handler_and_reported_units_refuse_the_next_call() {
    use usage_core::caller::UnitLimit;
    use usage_core::meter::{Aggregation, Meter, RouteCost};
    use usage_core::repo::{MeterUsageRepository, PlanRepository};
    let limit = |meter: &str, included| UnitLimit {
        meter: Arc::from(meter),
        included,
        over_limit: usage_core::OverLimit::Block,
    };
    let units: Arc<[UnitLimit]> = Arc::from(vec![limit("credits", 35), limit("tokens", 2_000)]);
    let f = fixture_with(Plan::enterprise(), None, Some(units)).await;
    for key in ["tokens", "credits"] {
        let meter = Meter {
            key: key.into(),
            name: key.into(),
            unit: "unit".into(),
            aggregation: Aggregation::Sum,
        };
        f.store
            .create_meter(&meter, datetime!(2026-11-22 10:00 UTC))
            .await
            .unwrap();
    }
    f.store
        .replace_route_costs(&[RouteCost {
            route: "POST /api/v1/generate".into(),
            meter: "credits".into(),
            quantity: 10,
        }])
        .await
        .unwrap();
    f.catalog.refresh().await.unwrap();
    let app = app!(f.metering);
    let generate = || {
        test::TestRequest::post()
            .uri("/api/v1/generate")
            .insert_header(("X-API-Key", KEY))
            .to_request()
    };
    let header = |res: &actix_web::dev::ServiceResponse, name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    // Each call takes 10 credits at admission; its handler reports 1,240 tokens after.
    let res = test::call_service(&app, generate()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let state = header(&res, "ratelimit");
    assert!(
        state.starts_with(r#""credits";r=25;t="#) && state.contains(r#""tokens";r=2000;t="#),
        "{state}"
    );
    let res = test::call_service(&app, generate()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(header(&res, "ratelimit").contains(r#""tokens";r=760;t="#));
    // 2,480 tokens counted: past the limit, so the next call is refused naming tokens, and
    // the 10 credits it took go back.
    let res = test::call_service(&app, generate()).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let state = header(&res, "ratelimit");
    assert!(state.contains(r#""tokens";r=0;t="#), "{state}");
    let body: serde_json::Value = test::read_body_json(res).await;
    assert_eq!(body["meter"], "tokens", "{body}");
    assert_eq!(body["used"], 2_480, "{body}");
    let res = test::call_service(&app, get("/api/v1/items/1").to_request()).await;
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a route without a cost too"
    );
    f.worker.shutdown().await;
    let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
    assert_eq!(
        f.store.meter_usage(&f.user, period.start()).await.unwrap(),
        vec![("credits".to_owned(), 20), ("tokens".to_owned(), 2_480)],
        "only the admitted calls' cost and units are stored"
    );
}
