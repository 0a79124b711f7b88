//! The tower layer on an axum 0.8 router, with in-memory repositories: the same answers
//! as the actix middleware (tests/middleware.rs), the caller in the request's extensions,
//! and the endpoint from axum's matched path, an `Endpoint` extension, or the id rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path};
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use serde_json::Value;
use time::macros::datetime;
use tower::ServiceExt;
use usage_core::quota::{QuotaBook, QuotaSettings};
use usage_core::rate::{RateLimit, RateLimiter};
use usage_core::repo::{ApiKeyRecord, ApiKeyRepository, UsageRepository, User, UserRepository};
use usage_core::tracker::{TrackerConfig, TrackerWorker, UsageTracker};
use usage_core::{
    ApiKeyAuthenticator, ApiKeyId, BillingPeriod, Caller, Clock, ManualClock, Plan, PlanCatalog,
    PlanTerms, RepoError, UserId,
};
use usage_door::layer::{Endpoint, MeteringLayer};
use usage_door::meter::{Meter, MeterDeps};
use usage_testkit::memory::MemoryStore;

const KEY: &str = "eco_live_testtesttesttesttesttesttesttest";
const NOW: time::OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

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
    meter: Arc<Meter>,
    worker: TrackerWorker,
}

async fn fixture(rate: Option<RateLimit>) -> Fixture {
    fixture_with(rate, None).await
}

/// The fixture with limits on meters other than calls, and the plan catalog (meters and
/// route costs) read from the store.
async fn fixture_with(
    rate: Option<RateLimit>,
    units: Option<Arc<[usage_core::caller::UnitLimit]>>,
) -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(NOW));
    let user = User {
        id: UserId::generate(),
        email: "ada@example.com".into(),
        plan: Plan::free(),
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
    let catalog = PlanCatalog {
        free: PlanTerms {
            monthly_calls: Some(3),
            ..PlanCatalog::default().free
        },
        ..PlanCatalog::default()
    };
    let (tracker, worker) =
        UsageTracker::start(store.clone(), store.clone(), TrackerConfig::default());
    let terms = *catalog.terms(&Plan::free()).expect("a built-in plan");
    let limits = usage_core::caller::CallLimits {
        included: terms.monthly_calls,
        over_limit: terms.over_limit,
        burst: rate,
        units,
    };
    let rate = Some(Arc::new(RateLimiter::new(clock.clone())));
    let meter = Arc::new(Meter::new(MeterDeps {
        authenticator: Arc::new(OneKey(Caller {
            user_id: user.id.clone(),
            api_key_id: key.id,
            plan: Plan::free(),
            limits,
        })),
        quota: Arc::new(QuotaBook::new(
            store.clone(),
            clock.clone(),
            QuotaSettings::default(),
        )),
        rate,
        tracker,
        clock,
        catalog: Some(catalog_of(&store, &catalog).await),
    }));
    Fixture {
        store,
        user: user.id,
        meter,
        worker,
    }
}

/// The store's catalog: the built-in plans, meters `tokens` and `credits`, and a cost of
/// 10 credits on `POST /v1/generate`.
async fn catalog_of(
    store: &Arc<MemoryStore>,
    plans: &PlanCatalog,
) -> Arc<usage_core::terms::LiveCatalog> {
    use usage_core::meter::{Aggregation, Meter as MeterDef, RouteCost};
    use usage_core::repo::PlanRepository;
    let live = usage_testkit::seeded_catalog(store.clone(), plans).await;
    for key in ["tokens", "credits"] {
        let meter = MeterDef {
            key: key.into(),
            name: key.into(),
            unit: "unit".into(),
            aggregation: Aggregation::Sum,
        };
        store.create_meter(&meter, NOW).await.unwrap();
    }
    store
        .replace_route_costs(&[RouteCost {
            route: "POST /v1/generate".into(),
            meter: "credits".into(),
            quantity: 10,
        }])
        .await
        .unwrap();
    live.refresh().await.unwrap();
    live
}

/// Reports 1,240 tokens with its response.
async fn generate() -> Response {
    use usage_door::report::ReportUnits;
    Response::new(Body::from("generated")).report("tokens", 1_240)
}

async fn item(Path(id): Path<u32>, Extension(caller): Extension<Caller>) -> String {
    format!("item {id} for {}", caller.user_id)
}

fn router(meter: &Arc<Meter>) -> Router {
    Router::new()
        .route("/v1/items/{id}", get(item))
        .route("/v1/generate", axum::routing::post(generate))
        .layer(MeteringLayer::new(Arc::clone(meter)))
}

fn request(path: &str, key: Option<&str>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(key) = key {
        request = request.header("Authorization", format!("Bearer {key}"));
    }
    request.body(Body::empty()).unwrap()
}

fn header<'a>(res: &'a Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

async fn json(res: Response) -> Value {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Endpoints recorded for the fixture's user, after the tracker's final flush (in no
/// particular order: the manual clock gives every call the same time).
async fn recorded(f: Fixture) -> Vec<String> {
    f.worker.shutdown().await;
    let period = BillingPeriod::containing(NOW);
    let events = f
        .store
        .usage_events_page(&f.user, period.start(), period.end(), None, 100)
        .await
        .unwrap();
    events.into_iter().map(|e| e.endpoint).collect()
}

#[tokio::test]
async fn admits_with_headers_then_refuses_over_quota_and_records_the_pattern() {
    let f = fixture(None).await;
    let app = router(&f.meter);
    for remaining in [2, 1, 0] {
        let res = app
            .clone()
            .oneshot(request("/v1/items/7", Some(KEY)))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "x-ratelimit-limit"), Some("3"));
        assert_eq!(
            header(&res, "x-ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
        assert_eq!(
            header(&res, "ratelimit-policy"),
            Some("\"monthly\";q=3;w=2592000")
        );
        // 8 days and 14 hours to the end of November.
        let state = format!("\"monthly\";r={remaining};t={}", 8 * 86_400 + 14 * 3_600);
        assert_eq!(header(&res, "ratelimit"), Some(state.as_str()));
        let bytes = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert_eq!(bytes, format!("item 7 for {}", f.user).as_bytes());
    }
    let res = app
        .clone()
        .oneshot(request("/v1/items/7", Some(KEY)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "content-type"), Some("application/json"));
    assert!(header(&res, "retry-after").is_some());
    let body = json(res).await;
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["limit"], 3);
    assert_eq!(body["reset_at"], "2026-12-01T00:00:00Z");
    assert_eq!(recorded(f).await, vec!["/v1/items/{id}"; 3]);
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_and_nothing_is_recorded() {
    let f = fixture(None).await;
    let app = router(&f.meter);
    for key in [None, Some("eco_live_unknownunknownunknownunknown0000")] {
        let res = app
            .clone()
            .oneshot(request("/v1/items/7", key))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&res, "www-authenticate"), Some("Bearer"));
        assert_eq!(json(res).await["error"], "unauthorized");
    }
    // X-API-Key works too.
    let res = app
        .clone()
        .oneshot(
            Request::get("/v1/items/7")
                .header("X-API-Key", KEY)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(recorded(f).await.len(), 1);
}

#[tokio::test]
async fn unmatched_paths_record_ids_as_placeholders_and_an_endpoint_extension_wins() {
    let f = fixture(None).await;
    let app = router(&f.meter);
    let res = app
        .clone()
        .oneshot(request("/v1/orders/123456", Some(KEY)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // An outer layer names the endpoint itself.
    let named = tower::ServiceBuilder::new()
        .map_request(|mut req: Request<Body>| {
            req.extensions_mut().insert(Endpoint("/custom".into()));
            req
        })
        .service(app.clone());
    let res = named
        .oneshot(request("/v1/items/9", Some(KEY)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut endpoints = recorded(f).await;
    endpoints.sort();
    assert_eq!(endpoints, vec!["/custom", "/v1/orders/{id}"]);
}

#[tokio::test]
async fn the_short_window_adds_a_burst_policy_and_refuses_past_it() {
    let f = fixture(Some(RateLimit {
        per_second: 1,
        burst: 2,
    }))
    .await;
    let app = router(&f.meter);
    let res = app
        .clone()
        .oneshot(request("/v1/items/1", Some(KEY)))
        .await
        .unwrap();
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some("\"monthly\";q=3;w=2592000, \"burst\";q=2;w=2")
    );
    assert!(
        header(&res, "ratelimit")
            .unwrap()
            .ends_with(", \"burst\";r=1;t=1"),
        "{:?}",
        header(&res, "ratelimit")
    );
    assert_eq!(header(&res, "x-ratelimit-burst-remaining"), Some("1"));
    // What a client's structured-field parser reads from them.
    assert_eq!(
        sf_items(header(&res, "ratelimit-policy").unwrap()),
        vec![
            (
                "monthly".to_owned(),
                vec![("q".to_owned(), 3), ("w".to_owned(), 2_592_000)]
            ),
            (
                "burst".to_owned(),
                vec![("q".to_owned(), 2), ("w".to_owned(), 2)]
            ),
        ]
    );
    assert_eq!(
        sf_items(header(&res, "ratelimit").unwrap())[1],
        (
            "burst".to_owned(),
            vec![("r".to_owned(), 1), ("t".to_owned(), 1)]
        )
    );
    app.clone()
        .oneshot(request("/v1/items/1", Some(KEY)))
        .await
        .unwrap();
    let res = app
        .clone()
        .oneshot(request("/v1/items/1", Some(KEY)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "ratelimit-policy"), Some("\"burst\";q=2;w=2"));
    assert_eq!(header(&res, "ratelimit"), Some("\"burst\";r=0;t=1"));
    assert_eq!(json(res).await["error"], "rate_limited");
    assert_eq!(recorded(f).await.len(), 2);
}

/// The items of an RFC 9651 list as (string, integer parameters), parsed by `sfv`.
fn sf_items(field: &str) -> Vec<(String, Vec<(String, i64)>)> {
    use sfv::{BareItem, List, ListEntry, Parser};
    let list: List = Parser::new(field).parse().unwrap();
    list.into_iter()
        .map(|entry| {
            let ListEntry::Item(item) = entry else {
                panic!("an inner list in {field:?}")
            };
            let BareItem::String(name) = item.bare_item else {
                panic!("an item that is not a string in {field:?}")
            };
            let params = item
                .params
                .into_iter()
                .map(|(key, value)| match value {
                    BareItem::Integer(n) => (key.as_str().to_owned(), i64::from(n)),
                    other => panic!("parameter {key:?} is {other:?} in {field:?}"),
                })
                .collect();
            (name.as_str().to_owned(), params)
        })
        .collect()
}

#[tokio::test]
async fn units_a_handler_reports_are_stored_with_its_call() {
    use axum::response::IntoResponse;
    use axum::routing::post;
    use usage_core::repo::MeterUsageRepository;
    use usage_door::report::{ReportUnits, Reported};
    // The fixture's catalog has the meter `tokens` (and a cost on the route).
    let f = fixture(None).await;
    // As a response part, and on the response itself: the two add up.
    async fn generate() -> impl IntoResponse {
        (Extension(Reported::units("tokens", 1_000)), "text")
            .into_response()
            .report("tokens", 234)
    }
    let app = Router::new()
        .route("/v1/generate", post(generate))
        .layer(MeteringLayer::new(Arc::clone(&f.meter)));
    let call = Request::post("/v1/generate")
        .header("Authorization", format!("Bearer {KEY}"))
        .body(Body::empty())
        .unwrap();
    let res = app.oneshot(call).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.extensions().get::<Reported>().is_none(),
        "taken by the door"
    );
    f.worker.shutdown().await;
    let period = BillingPeriod::containing(NOW);
    assert_eq!(
        f.store.meter_usage(&f.user, period.start()).await.unwrap(),
        vec![("credits".to_owned(), 10), ("tokens".to_owned(), 1_234)],
        "the route's cost beside the handler's units"
    );
}

#[tokio::test]
async fn a_routes_cost_is_taken_before_the_handler_and_reported_units_refuse_the_next_call() {
    use usage_core::caller::UnitLimit;
    use usage_core::repo::MeterUsageRepository;
    let limit = |meter: &str, included| UnitLimit {
        meter: Arc::from(meter),
        included,
        over_limit: usage_core::OverLimit::Block,
    };
    let units: Arc<[UnitLimit]> = Arc::from(vec![limit("tokens", 2_000), limit("credits", 25)]);
    let f = fixture_with(None, Some(units)).await;
    let app = router(&f.meter);
    let generate = || {
        Request::post("/v1/generate")
            .header("Authorization", format!("Bearer {KEY}"))
            .body(Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(generate()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let state = header(&res, "ratelimit").unwrap_or_default().to_owned();
    assert!(
        state.contains(r#""tokens";r=2000;t="#) && state.contains(r#""credits";r=15;t="#),
        "{state}"
    );
    let res = app.clone().oneshot(generate()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // 2,480 tokens reported: the next call is refused for tokens, whatever its route.
    let res = app
        .clone()
        .oneshot(request("/v1/items/7", Some(KEY)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = json(res).await;
    assert_eq!(body["meter"], "tokens", "{body}");
    let f_user = f.user.clone();
    let store = f.store.clone();
    let endpoints = recorded(f).await;
    assert_eq!(endpoints, vec!["/v1/generate"; 2]);
    let period = BillingPeriod::containing(NOW);
    assert_eq!(
        store.meter_usage(&f_user, period.start()).await.unwrap(),
        vec![("credits".to_owned(), 20), ("tokens".to_owned(), 2_480)]
    );
}
