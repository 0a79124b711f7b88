//! The plan catalog service: creating, revising, archiving, quoting and applying a
//! catalog file, over the memory store.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::collections::BTreeMap;
use std::sync::Arc;

use time::macros::datetime;
use usage_core::catalog::{CatalogFile, PlanDefinition, PlanMove};
use usage_core::meter::{Aggregation, Meter, MeterRevision, RouteCost, RouteCosts};
use usage_core::plans::{Change, PlanError, Plans};
use usage_core::repo::{User, UserRepository};
use usage_core::{ManualClock, Plan, PlanCatalog, UserId};
use usage_testkit::memory::MemoryStore;

fn builtin() -> Vec<PlanDefinition> {
    usage_testkit::builtin_plans(&PlanCatalog::default())
}

fn growth() -> PlanDefinition {
    serde_json::from_value(serde_json::json!({
        "key": "growth", "name": "Growth", "price_cents": 9900,
        "limits": [{"meter": "api_calls", "included": 250000, "over_limit": "overage",
                    "overage": {"model": "graduated",
                                "tiers": [{"up_to": 750000, "unit_price_micros": 800},
                                          {"up_to": null, "unit_price_micros": 500}]}}]
    }))
    .unwrap()
}

async fn seeded() -> (Plans, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let plans = Plans::new(
        store.clone(),
        store.clone(),
        Arc::new(ManualClock::new(datetime!(2026-12-07 10:00 UTC))),
        "free",
    );
    assert_eq!(plans.seed(&builtin()).await.unwrap().len(), 3);
    (plans, store)
}

#[tokio::test]
async fn plans_are_listed_with_their_subscribers_and_versions() {
    let (plans, store) = seeded().await;
    for (i, plan) in [Plan::pro(), Plan::pro(), Plan::free()]
        .into_iter()
        .enumerate()
    {
        store
            .create_user(&User {
                id: UserId::generate(),
                email: format!("u{i}@example.com"),
                plan,
                stripe_customer_id: None,
                created_at: datetime!(2026-12-01 00:00 UTC),
                plan_subscription_id: None,
                blocked_at: None,
                plan_version: None,
                overrides: None,
            })
            .await
            .unwrap();
    }
    plans.create(&growth()).await.unwrap();
    let mut dearer = growth();
    dearer.price_cents = 12_900;
    plans.revise(&dearer, PlanMove::Now).await.unwrap();
    let list: Vec<(String, u32, u64)> = plans
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.plan.key, s.plan.version, s.subscribers))
        .collect();
    assert_eq!(
        list,
        vec![
            ("enterprise".into(), 1, 0),
            ("free".into(), 1, 1),
            ("growth".into(), 2, 0),
            ("pro".into(), 1, 2)
        ]
    );
    let detail = plans.get("growth").await.unwrap();
    assert_eq!(detail.summary.plan.price_cents, 12_900);
    let versions: Vec<(u32, PlanMove)> = detail
        .versions
        .iter()
        .map(|v| (v.plan.version, v.existing))
        .collect();
    assert_eq!(
        versions,
        vec![(1, PlanMove::NextPeriod), (2, PlanMove::Now)]
    );
    let json = serde_json::to_value(&detail).unwrap();
    assert_eq!(json["key"], "growth");
    assert_eq!(json["version"], 2);
    assert_eq!(json["subscribers"], 0);
    assert_eq!(json["versions"][0]["price_cents"], 9900);
    assert_eq!(json["versions"][1]["existing"], "now");
    assert!(matches!(plans.get("scale").await, Err(PlanError::UnknownPlan(k)) if k == "scale"));
}

#[tokio::test]
async fn bad_plans_and_forbidden_changes_are_refused() {
    let (plans, _) = seeded().await;
    let mut bad = growth();
    bad.limits[0].meter = "tokens".into();
    let err = plans.create(&bad).await.unwrap_err();
    assert!(
        matches!(&err, PlanError::Invalid(e) if e.field == "limits[0].meter"),
        "{err}"
    );
    assert!(matches!(
        plans.create(&builtin()[1]).await,
        Err(PlanError::KeyTaken(k)) if k == "pro"
    ));
    let mut unknown = growth();
    unknown.key = "scale".into();
    assert!(matches!(
        plans.revise(&unknown, PlanMove::NextPeriod).await,
        Err(PlanError::UnknownPlan(_))
    ));
    assert!(matches!(
        plans.set_archived("free", true).await,
        Err(PlanError::DefaultPlan(k)) if k == "free"
    ));
    let pro = plans.set_archived("pro", true).await.unwrap();
    assert!(pro.plan.archived);
    assert!(
        !plans
            .set_archived("pro", false)
            .await
            .unwrap()
            .plan
            .archived
    );
}

#[tokio::test]
async fn quotes_price_the_newest_version_and_name_unknown_meters() {
    let (plans, _) = seeded().await;
    plans.create(&growth()).await.unwrap();
    let usage = BTreeMap::from([("api_calls".to_owned(), 1_000_010)]);
    let quote = plans.quote("growth", &usage).await.unwrap();
    // 750,010 overage: 750,000 × 800 + 10 × 500 = 600,005,000 µ$ = 60,000.5 ¢ → 60,001
    assert_eq!(quote.overage_cents, 60_001);
    assert_eq!(quote.total_cents, 9_900 + 60_001);
    let usage = BTreeMap::from([("tokens".to_owned(), 1)]);
    assert!(matches!(
        plans.quote("growth", &usage).await,
        Err(PlanError::Invalid(e)) if e.field == "usage.tokens"
    ));
    assert!(matches!(
        plans.quote("scale", &BTreeMap::new()).await,
        Err(PlanError::UnknownPlan(_))
    ));
}

#[tokio::test]
async fn applying_a_catalog_file_is_idempotent_and_dry_runs_write_nothing() {
    let (plans, _) = seeded().await;
    let mut file = builtin();
    file[1].price_cents = 5_900;
    file[2].archived = true;
    file.push(growth());
    let expected = vec![
        ("free".to_owned(), Change::Unchanged),
        ("pro".to_owned(), Change::Revised),
        ("enterprise".to_owned(), Change::Archived),
        ("growth".to_owned(), Change::Created),
    ];
    assert_eq!(plans.apply(&file_of(&file), true).await.unwrap(), expected);
    assert_eq!(
        plans.list().await.unwrap().len(),
        3,
        "a dry run writes nothing"
    );
    assert_eq!(plans.apply(&file_of(&file), false).await.unwrap(), expected);
    let again = plans.apply(&file_of(&file), false).await.unwrap();
    assert!(
        again.iter().all(|(_, c)| *c == Change::Unchanged),
        "{again:?}"
    );
    let pro = plans.get("pro").await.unwrap();
    assert_eq!(
        (pro.summary.plan.version, pro.summary.plan.price_cents),
        (2, 5_900)
    );
    assert_eq!(pro.versions[1].existing, PlanMove::NextPeriod);
    assert!(plans.get("enterprise").await.unwrap().summary.plan.archived);
    file[2].archived = false;
    assert_eq!(
        plans.apply(&file_of(&file), false).await.unwrap()[2],
        ("enterprise".to_owned(), Change::Restored)
    );

    // Nothing is written when one plan of the file is bad.
    let mut bad = file.clone();
    bad[0].price_cents = 1;
    bad[3].limits[0].included = Some(1);
    bad[3].name = String::new();
    assert!(matches!(
        plans.apply(&file_of(&bad), false).await,
        Err(PlanError::Invalid(e)) if e.field == "plans[3].name"
    ));
    assert_eq!(plans.get("free").await.unwrap().summary.plan.version, 1);
    let mut twice = file.clone();
    twice.push(growth());
    assert!(matches!(
        plans.apply(&file_of(&twice), false).await,
        Err(PlanError::Invalid(e)) if e.field == "plans[4].key"
    ));
    let mut default_archived = file.clone();
    default_archived[0].archived = true;
    assert!(matches!(
        plans.apply(&file_of(&default_archived), false).await,
        Err(PlanError::DefaultPlan(_))
    ));
}

/// A catalog file of `plans` alone.
fn file_of(plans: &[PlanDefinition]) -> CatalogFile {
    CatalogFile {
        plans: plans.to_vec(),
        ..Default::default()
    }
}

fn meter(key: &str, aggregation: Aggregation) -> Meter {
    Meter {
        key: key.into(),
        name: key.to_uppercase(),
        unit: "unit".into(),
        aggregation,
    }
}

#[tokio::test]
async fn meters_are_created_renamed_and_limited_by_plans() {
    let (plans, _) = seeded().await;
    let mut with_tokens = growth();
    with_tokens.limits.push(
        serde_json::from_value(serde_json::json!(
        {"meter": "tokens", "included": 5000000, "over_limit": "block"}))
        .unwrap(),
    );
    assert!(
        matches!(plans.create(&with_tokens).await,
                 Err(PlanError::Invalid(e)) if e.field == "limits[1].meter"),
        "a limit names a defined meter"
    );
    plans
        .create_meter(&meter("tokens", Aggregation::Sum))
        .await
        .unwrap();
    plans
        .create_meter(&meter("peak_gb", Aggregation::Max))
        .await
        .unwrap();
    assert!(matches!(
        plans.create_meter(&meter("tokens", Aggregation::Count)).await,
        Err(PlanError::MeterTaken(k)) if k == "tokens"
    ));
    assert!(matches!(
        plans
            .create_meter(&meter("api_calls", Aggregation::Count))
            .await,
        Err(PlanError::MeterTaken(_))
    ));
    assert!(matches!(
        plans.create_meter(&meter("Bad Key", Aggregation::Sum)).await,
        Err(PlanError::Invalid(e)) if e.field == "key"
    ));
    plans.create(&with_tokens).await.unwrap();
    let mut blocks_on_max = growth();
    blocks_on_max.key = "peaky".into();
    blocks_on_max.limits.push(
        serde_json::from_value(serde_json::json!(
        {"meter": "peak_gb", "included": 10, "over_limit": "block"}))
        .unwrap(),
    );
    assert!(matches!(
        plans.create(&blocks_on_max).await,
        Err(PlanError::Invalid(e)) if e.field == "limits[1].over_limit"
    ));

    let renamed = plans
        .update_meter(
            "tokens",
            &MeterRevision {
                name: "Model tokens".into(),
                unit: "token".into(),
                aggregation: None,
                key: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.aggregation),
        ("Model tokens", Aggregation::Sum),
        "aggregation left out stays"
    );
    let meters = plans.meters().await.unwrap();
    assert_eq!(meters.get("tokens"), Some(&renamed));
    let revision = |aggregation, key: Option<&str>| MeterRevision {
        name: "x".into(),
        unit: "x".into(),
        aggregation,
        key: key.map(str::to_owned),
    };
    assert!(matches!(
        plans.update_meter("api_calls", &revision(Some(Aggregation::Sum), None)).await,
        Err(PlanError::Invalid(e)) if e.field == "aggregation"
    ));
    assert!(matches!(
        plans.update_meter("tokens", &revision(None, Some("credits"))).await,
        Err(PlanError::Invalid(e)) if e.field == "key"
    ));
    assert!(matches!(
        plans.update_meter("credits", &revision(None, None)).await,
        Err(PlanError::UnknownMeter(k)) if k == "credits"
    ));
    // A plan limits tokens: its aggregation stays what the limit was checked against.
    assert!(matches!(
        plans
            .update_meter("tokens", &revision(Some(Aggregation::Max), None))
            .await,
        Err(PlanError::Invalid(e)) if e.field == "aggregation" && e.message.contains("plan limits")
    ));
    let usage = BTreeMap::from([("tokens".to_owned(), 6_000_000)]);
    let quote = plans.quote("growth", &usage).await.unwrap();
    assert_eq!(quote.lines[1].meter, "tokens");
    assert_eq!(
        quote.lines[1].overage_units, 0,
        "a block limit bills nothing"
    );
}

#[tokio::test]
async fn route_costs_are_replaced_whole_and_checked() {
    let (plans, _) = seeded().await;
    plans
        .create_meter(&meter("credits", Aggregation::Sum))
        .await
        .unwrap();
    let cost = |route: &str, quantity| RouteCost {
        route: route.into(),
        meter: "credits".into(),
        quantity,
    };
    let stored = plans
        .replace_costs(RouteCosts {
            items: vec![cost("POST /v2/generate", 20), cost("POST /v1/generate", 10)],
        })
        .await
        .unwrap();
    assert_eq!(stored.items[0].route, "POST /v1/generate", "kept in order");
    assert_eq!(plans.costs().await.unwrap(), stored);
    assert!(matches!(
        plans.replace_costs(RouteCosts { items: vec![cost("generate", 1)] }).await,
        Err(PlanError::Invalid(e)) if e.field == "items[0].route"
    ));
    assert_eq!(
        plans.costs().await.unwrap(),
        stored,
        "a refused list changes nothing"
    );
    plans
        .replace_costs(RouteCosts { items: vec![] })
        .await
        .unwrap();
    assert!(plans.costs().await.unwrap().items.is_empty());
}

#[tokio::test]
async fn a_catalog_file_brings_its_meters_before_its_plans_and_costs_after() {
    let (plans, _) = seeded().await;
    let mut with_tokens = growth();
    with_tokens.limits.push(
        serde_json::from_value(serde_json::json!(
        {"meter": "tokens", "included": 5000000, "over_limit": "block"}))
        .unwrap(),
    );
    let file = CatalogFile {
        meters: vec![
            meter("tokens", Aggregation::Sum),
            meter("credits", Aggregation::Sum),
        ],
        plans: vec![with_tokens],
        costs: Some(vec![RouteCost {
            route: "POST /v1/generate".into(),
            meter: "credits".into(),
            quantity: 10,
        }]),
    };
    let expected = vec![
        ("meter tokens".to_owned(), Change::Created),
        ("meter credits".to_owned(), Change::Created),
        ("growth".to_owned(), Change::Created),
        ("costs".to_owned(), Change::Updated),
    ];
    assert_eq!(plans.apply(&file, true).await.unwrap(), expected);
    assert!(plans.meters().await.unwrap().get("tokens").is_none(), "dry");
    assert_eq!(plans.apply(&file, false).await.unwrap(), expected);
    assert_eq!(plans.costs().await.unwrap().items.len(), 1);
    let again = plans.apply(&file, false).await.unwrap();
    assert!(
        again.iter().all(|(_, c)| *c == Change::Unchanged),
        "{again:?}"
    );

    let mut renamed = file.clone();
    renamed.meters[0].name = "Tokens".into();
    renamed.costs = None;
    assert_eq!(
        plans.apply(&renamed, false).await.unwrap(),
        vec![
            ("meter tokens".to_owned(), Change::Updated),
            ("meter credits".to_owned(), Change::Unchanged),
            ("growth".to_owned(), Change::Unchanged),
        ],
        "no costs in the file: the stored ones stay"
    );
    assert_eq!(plans.costs().await.unwrap().items.len(), 1);

    let mut bad = file.clone();
    bad.meters.push(meter("peak_gb", Aggregation::Max));
    bad.costs = Some(vec![RouteCost {
        route: "POST /v1/generate".into(),
        meter: "peak_gb".into(),
        quantity: 1,
    }]);
    assert!(matches!(
        plans.apply(&bad, false).await,
        Err(PlanError::Invalid(e)) if e.field == "costs[0].meter"
    ));
    assert!(
        plans.meters().await.unwrap().get("peak_gb").is_none(),
        "nothing written"
    );
}
