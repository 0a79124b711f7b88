//! The overage billing run on every store (memory, SQLite, PostgreSQL) against a local
//! fake of Stripe, through the real HTTP client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use common::stores::{Backend, calls, fresh, pro_user, user_on};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use usage_billing::service::idempotency_key;
use usage_billing::{
    BillingError, BillingOptions, HttpStripeClient, OverageService, Resolution, RunMode,
    StripeConfig,
};
use usage_core::catalog::{Overrides, PlanDefinition, PlanMove};
use usage_core::repo::{ChargeStatus, NewOverageCharge};
use usage_core::terms::LiveCatalog;
use usage_core::{BillingPeriod, ManualClock, Plan, PlanCatalog, Store, UserId};
use usage_fake_stripe::{FakeStripe, SECRET, Scripted};

/// Pro includes 10 calls here, so `n + 10` calls are `n` overage calls.
const INCLUDED: u64 = 10;
const NOV: OffsetDateTime = datetime!(2026-11-10 12:00 UTC);
const NOW: OffsetDateTime = datetime!(2026-11-20 12:00 UTC);

fn variables() -> PlanCatalog {
    let mut variables = PlanCatalog::default();
    variables.pro.monthly_calls = Some(INCLUDED);
    variables
}

/// The catalog of `store`, its built-in plans made from [`variables`].
async fn catalog(store: &Arc<dyn Store>) -> Arc<LiveCatalog> {
    usage_testkit::seeded_catalog(store.clone(), &variables()).await
}

struct Billing {
    stripe: FakeStripe,
    clock: Arc<ManualClock>,
}

impl Billing {
    async fn start() -> Self {
        Self {
            stripe: FakeStripe::start().await,
            clock: Arc::new(ManualClock::new(NOW)),
        }
    }

    async fn service_with(
        &self,
        store: &Arc<dyn Store>,
        attempts: u32,
        timeout_ms: u64,
    ) -> OverageService {
        let client = HttpStripeClient::new(StripeConfig {
            api_base: self.stripe.uri(),
            secret_key: SECRET.to_owned(),
            timeout: StdDuration::from_millis(timeout_ms),
            max_attempts: attempts,
            initial_backoff: StdDuration::from_millis(5),
            max_backoff: StdDuration::from_millis(50),
        })
        .unwrap();
        OverageService::new(
            store.clone(),
            Some(Arc::new(client)),
            catalog(store).await,
            self.clock.clone(),
            BillingOptions {
                concurrency: 4,
                ..BillingOptions::default()
            },
        )
    }

    async fn service(&self, store: &Arc<dyn Store>) -> OverageService {
        self.service_with(store, 3, 5_000).await
    }
}

async fn invoiced(store: &Arc<dyn Store>, user: &UserId, at: OffsetDateTime) -> (u64, u64) {
    let r = store
        .usage_record(user, BillingPeriod::containing(at).start())
        .await
        .unwrap()
        .unwrap();
    (r.overage_calls, r.overage_invoiced_calls)
}

async fn one_run_bills_each_user_once_with_exact_amounts(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    billing.stripe.refuse("cus_declined");
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    let b = pro_user(store, "b@example.com", Some("cus_b")).await;
    let c = pro_user(store, "c@example.com", Some("cus_c")).await;
    let d = pro_user(store, "d@example.com", None).await;
    let e = pro_user(store, "e@example.com", Some("cus_declined")).await;
    let f = pro_user(store, "f@example.com", Some("cus_f")).await;
    let g = user_on(store, "g@example.com", Plan::free(), None).await;
    calls(store, &a, 5 + 10, NOV, INCLUDED).await; // 5 calls: $0.005 -> 1 cent
    calls(store, &b, 5_001 + 10, NOV, INCLUDED).await; // $5.001 -> 500 cents
    calls(store, &c, 1 + 10, NOV, INCLUDED).await; // $0.001 -> 0 cents: wait for more
    calls(store, &d, 3 + 10, NOV, INCLUDED).await;
    calls(store, &e, 20 + 10, NOV, INCLUDED).await;
    calls(store, &f, 5, NOV, INCLUDED).await;
    calls(store, &g, 5, NOV, 1_000).await;

    let service = billing.service(store).await;
    let summary = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(
        (
            summary.processed,
            summary.charged,
            summary.skipped,
            summary.failed,
            summary.amount_cents
        ),
        (6, 2, 2, 2, 501),
        "{summary:?}"
    );
    let reasons: BTreeMap<UserId, String> = summary
        .errors
        .iter()
        .map(|e| (e.user_id.clone(), e.reason.clone()))
        .collect();
    assert!(
        reasons[&d.0].contains("no Stripe customer id"),
        "{reasons:?}"
    );
    assert!(reasons[&e.0].contains("card_declined"), "{reasons:?}");

    let created = billing.stripe.created();
    let amounts: BTreeMap<&str, i64> = created
        .iter()
        .map(|c| (c.customer.as_str(), c.amount))
        .collect();
    assert_eq!(amounts, BTreeMap::from([("cus_a", 1), ("cus_b", 500)]));
    let nov = BillingPeriod::containing(NOV).start();
    let a_charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(a_charges.len(), 1);
    assert_eq!(a_charges[0].status, ChargeStatus::Succeeded);
    assert_eq!(
        a_charges[0].idempotency_key,
        idempotency_key(&a.0, nov, "api_calls", (0, 5), 0)
    );
    let a_item = created.iter().find(|c| c.customer == "cus_a").unwrap();
    assert_eq!(a_item.idempotency_key, a_charges[0].idempotency_key);
    assert_eq!(
        a_charges[0].stripe_invoice_item_id.as_deref(),
        Some(&*a_item.id)
    );
    assert_eq!(a_item.form["metadata[user_id]"], a.0.as_str());
    assert_eq!(a_item.form["metadata[overage_calls]"], "5");
    // The calls billed: from the period's start to the charge (the period still runs).
    assert_eq!(
        a_item.form["period[start]"],
        nov.unix_timestamp().to_string()
    );
    assert_eq!(
        a_item.form["period[end]"],
        a_charges[0].created_at.unix_timestamp().to_string()
    );
    assert_eq!(a_charges[0].created_at, NOW);
    assert_eq!(invoiced(store, &a.0, NOV).await, (5, 5));
    assert_eq!(invoiced(store, &b.0, NOV).await, (5_001, 5_001));
    assert_eq!(invoiced(store, &c.0, NOV).await, (1, 0));
    let e_charges = store.overage_charges_for_user(&e.0).await.unwrap();
    assert_eq!(e_charges.len(), 1);
    assert_eq!(e_charges[0].status, ChargeStatus::Failed);
    assert!(
        e_charges[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("card_declined")
    );
    assert_eq!(invoiced(store, &e.0, NOV).await, (20, 0));

    // Again: nothing new is billed; the refused user is tried again under a new key.
    let again = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(
        (again.charged, again.failed, again.amount_cents),
        (0, 2, 0),
        "{again:?}"
    );
    assert_eq!(billing.stripe.created().len(), 2);
    let e_charges = store.overage_charges_for_user(&e.0).await.unwrap();
    assert_eq!(
        e_charges[1].idempotency_key,
        idempotency_key(&e.0, nov, "api_calls", (0, 20), 1)
    );

    let reconciliation = service.reconcile().await.unwrap();
    let status: BTreeMap<UserId, &str> = reconciliation
        .iter()
        .map(|r| (r.entry.user_id.clone(), r.status))
        .collect();
    assert_eq!(status[&a.0], "ok");
    assert_eq!(status[&b.0], "ok");
    assert_eq!(status[&c.0], "uninvoiced");
    assert_eq!(status[&e.0], "uninvoiced");
    assert!(reconciliation.iter().all(|r| r.problems.is_empty()));
    let b_report = service.user_overage(&b.0).await.unwrap();
    assert_eq!(
        (
            b_report[0].entry.charged_calls,
            b_report[0].entry.charged_cents,
            b_report[0].expected_cents
        ),
        (5_001, 500, 500)
    );
}

async fn server_errors_then_success_make_one_charge_with_one_key(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    billing.stripe.script([
        Scripted::Fail {
            status: 500,
            headers: vec![],
        },
        Scripted::Fail {
            status: 500,
            headers: vec![],
        },
    ]);
    let summary = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!(
        (summary.charged, summary.amount_cents),
        (1, 500),
        "{summary:?}"
    );
    let keys: HashSet<String> = billing.stripe.idempotency_keys().into_iter().collect();
    assert_eq!(billing.stripe.received().len(), 3);
    assert_eq!(keys.len(), 1, "the same key on every try");
    assert_eq!(billing.stripe.created().len(), 1);
    let charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].status, ChargeStatus::Succeeded);
}

async fn a_timeout_after_stripe_applied_is_finished_by_the_next_run(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    // Stripe creates the item but answers after the client gave up (one attempt only).
    billing
        .stripe
        .script([Scripted::ApplyThenStall(StdDuration::from_secs(2))]);
    let service = billing.service_with(store, 1, 300).await;
    let first = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(
        (first.charged, first.failed, first.amount_cents),
        (0, 1, 0),
        "{first:?}"
    );
    assert!(
        first.errors[0].reason.contains("stays pending"),
        "{first:?}"
    );
    let charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(
        (charges.len(), charges[0].status, charges[0].attempts),
        (1, ChargeStatus::Pending, 1)
    );
    assert_eq!(invoiced(store, &a.0, NOV).await, (5_001, 0));
    assert_eq!(billing.stripe.created().len(), 1, "Stripe did apply it");

    billing.clock.advance(Duration::hours(1));
    let second = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(
        (second.charged, second.failed, second.amount_cents),
        (1, 0, 500),
        "{second:?}"
    );
    let received = billing.stripe.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].idempotency_key, received[1].idempotency_key);
    assert_eq!(billing.stripe.created().len(), 1, "still one item");
    let charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(charges.len(), 1, "one charge recorded");
    assert_eq!(
        (
            charges[0].status,
            charges[0].stripe_invoice_item_id.as_deref()
        ),
        (ChargeStatus::Succeeded, Some("ii_fake1"))
    );
    assert_eq!(invoiced(store, &a.0, NOV).await, (5_001, 5_001));
}

async fn concurrent_runs_never_bill_twice(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    // The second run has its own connections, as another process would.
    let other: Arc<dyn Store> = match &t.url {
        Some(url) => usage_store::open(url, &usage_store::PoolOptions::default())
            .await
            .unwrap(),
        None => store.clone(),
    };
    let billing = Billing::start().await;
    let mut users = Vec::new();
    let mut expected = 0;
    for i in 0..40u64 {
        let u = pro_user(
            store,
            &format!("u{i}@example.com"),
            Some(&format!("cus_{i}")),
        )
        .await;
        let overage = 5 + i * 37;
        calls(store, &u, (overage + INCLUDED) as usize, NOV, INCLUDED).await;
        expected += variables().overage_price.total_in_cents(overage).0;
        users.push((u, overage));
    }
    let (first, second) = (billing.service(store).await, billing.service(&other).await);
    let (one, two) = tokio::join!(
        first.process_all(RunMode::Live),
        second.process_all(RunMode::Live)
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_eq!(one.failed + two.failed, 0, "{one:?} {two:?}");
    assert_eq!(one.amount_cents + two.amount_cents, expected);
    let created = billing.stripe.created();
    assert_eq!(created.len(), 40, "one item per user");
    assert_eq!(created.iter().map(|c| c.amount).sum::<i64>(), expected);
    for ((user, _), overage) in &users {
        assert_eq!(invoiced(store, user, NOV).await, (*overage, *overage));
    }
    let third = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!((third.charged, third.amount_cents), (0, 0));
    assert!(
        billing
            .service(store)
            .await
            .reconcile()
            .await
            .unwrap()
            .iter()
            .all(|r| r.status == "ok")
    );
}

async fn runs_a_day_apart_bill_the_difference_exactly(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5 + 10, NOV, INCLUDED).await;
    let service = billing.service(store).await;
    assert_eq!(
        service
            .process_all(RunMode::Live)
            .await
            .unwrap()
            .amount_cents,
        1
    );
    calls(store, &a, 1_000, NOV + Duration::days(1), INCLUDED).await;
    billing.clock.advance(Duration::days(1));
    assert_eq!(
        service
            .process_all(RunMode::Live)
            .await
            .unwrap()
            .amount_cents,
        100
    );
    let created = billing.stripe.created();
    assert_eq!(
        created
            .iter()
            .map(|c| (
                c.form["metadata[calls_from]"].as_str(),
                c.form["metadata[calls_to]"].as_str(),
                c.amount
            ))
            .collect::<Vec<_>>(),
        vec![("0", "5", 1), ("5", "1005", 100)]
    );
    // 1,005 calls cost $1.005, rounded once: 101 cents, and the items add up to it.
    assert_eq!(variables().overage_price.total_in_cents(1_005).0, 101);
    assert_eq!(invoiced(store, &a.0, NOV).await, (1_005, 1_005));
}

async fn ended_periods_are_billed_after_they_close(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    billing.clock.set(datetime!(2026-12-01 00:10 UTC));
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    let b = pro_user(store, "b@example.com", Some("cus_b")).await;
    calls(store, &a, 7 + 10, datetime!(2026-11-30 23:59 UTC), INCLUDED).await;
    calls(store, &a, 3 + 10, datetime!(2026-12-01 00:01 UTC), INCLUDED).await;
    calls(store, &b, 1 + 10, NOV, INCLUDED).await;
    let summary = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!(
        (summary.failed, summary.amount_cents),
        (0, 1),
        "{summary:?}"
    );
    let created = billing.stripe.created();
    assert_eq!(
        created.len(),
        1,
        "November's 7 calls; December's 3 wait (0 cents yet)"
    );
    assert_eq!(
        created[0].form["metadata[period_start]"],
        "2026-11-01T00:00:00Z"
    );
    // An ended period: the item covers the whole month.
    assert_eq!(
        (
            created[0].form["period[start]"].as_str(),
            created[0].form["period[end]"].as_str()
        ),
        ("1793491200", "1796083200")
    );
    assert_eq!(invoiced(store, &a.0, NOV).await, (7, 7));
    assert_eq!(
        invoiced(store, &a.0, datetime!(2026-12-01 00:01 UTC)).await,
        (3, 0)
    );
    // B's single call in a closed month is worth 0 cents: settled without an item.
    assert_eq!(invoiced(store, &b.0, NOV).await, (1, 1));
    let b_charges = store.overage_charges_for_user(&b.0).await.unwrap();
    assert_eq!(
        (
            b_charges[0].amount_cents,
            b_charges[0].status,
            b_charges[0].stripe_invoice_item_id.clone()
        ),
        (0, ChargeStatus::Succeeded, None)
    );
}

async fn a_dry_run_sends_and_records_nothing(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    let d = pro_user(store, "d@example.com", None).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    calls(store, &d, 3 + 10, NOV, INCLUDED).await;
    let summary = billing
        .service(store)
        .await
        .process_all(RunMode::DryRun)
        .await
        .unwrap();
    assert!(summary.dry_run);
    assert_eq!(
        (
            summary.processed,
            summary.charged,
            summary.failed,
            summary.amount_cents
        ),
        (2, 1, 1, 500)
    );
    assert!(billing.stripe.received().is_empty());
    assert!(
        store
            .overage_charges_for_user(&a.0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(invoiced(store, &a.0, NOV).await, (5_001, 0));

    let without_stripe = OverageService::new(
        store.clone(),
        None,
        catalog(store).await,
        billing.clock.clone(),
        BillingOptions::default(),
    );
    assert!(matches!(
        without_stripe.process_all(RunMode::Live).await,
        Err(BillingError::StripeNotConfigured)
    ));
    assert_eq!(
        without_stripe.process_all(RunMode::DryRun).await.unwrap(),
        summary
    );
}

async fn a_pending_charge_older_than_stripes_key_window_is_reported_not_resent(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    let nov = BillingPeriod::containing(NOV).start();
    store
        .create_overage_charge(&NewOverageCharge {
            user_id: a.0.clone(),
            period_start: nov,
            meter: "api_calls".to_owned(),
            calls_from: 0,
            calls_to: 5_001,
            amount_cents: 500,
            idempotency_key: idempotency_key(&a.0, nov, "api_calls", (0, 5_001), 0),
            created_at: NOW - Duration::days(2),
        })
        .await
        .unwrap();
    let summary = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!((summary.failed, summary.amount_cents), (1, 0));
    assert!(
        summary.errors[0].reason.contains("pending since"),
        "{summary:?}"
    );
    assert!(billing.stripe.received().is_empty());
    assert_eq!(store.overage_charges_for_user(&a.0).await.unwrap().len(), 1);
    let reconciliation = billing.service(store).await.reconcile().await.unwrap();
    assert_eq!(reconciliation[0].status, "pending");
}

async fn reconciliation_flags_drift(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    let nov = BillingPeriod::containing(NOV).start();
    // A charge recorded for the wrong amount (400 cents for calls worth 500).
    let wrong = store
        .create_overage_charge(&NewOverageCharge {
            user_id: a.0.clone(),
            period_start: nov,
            meter: "api_calls".to_owned(),
            calls_from: 0,
            calls_to: 5_001,
            amount_cents: 400,
            idempotency_key: "hand-made".to_owned(),
            created_at: NOW,
        })
        .await
        .unwrap();
    store
        .complete_overage_charge(wrong.id, Some("ii_hand"), NOW)
        .await
        .unwrap();
    let reconciliation = billing.service(store).await.reconcile().await.unwrap();
    assert_eq!(reconciliation.len(), 1);
    assert_eq!(reconciliation[0].status, "drift");
    assert_eq!(
        reconciliation[0].problems,
        vec!["charged 400 cent(s) where the invoiced calls cost 500".to_owned()]
    );
}

async fn a_stale_pending_charge_is_resolved_by_hand(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    let b = pro_user(store, "b@example.com", Some("cus_b")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    calls(store, &b, 5 + 10, NOV, INCLUDED).await;
    let nov = BillingPeriod::containing(NOV).start();
    let stale = |user: &UserId, to: u64, cents: i64| NewOverageCharge {
        user_id: user.clone(),
        period_start: nov,
        meter: "api_calls".to_owned(),
        calls_from: 0,
        calls_to: to,
        amount_cents: cents,
        idempotency_key: idempotency_key(user, nov, "api_calls", (0, to), 0),
        created_at: NOW - Duration::days(2),
    };
    store
        .create_overage_charge(&stale(&a.0, 5_001, 500))
        .await
        .unwrap();
    store
        .create_overage_charge(&stale(&b.0, 5, 1))
        .await
        .unwrap();
    let service = billing.service(store).await;
    // Found in Stripe: the charge succeeded, the calls are invoiced.
    let a_key = idempotency_key(&a.0, nov, "api_calls", (0, 5_001), 0);
    let done = service
        .resolve_charge(
            &a_key,
            Resolution::Created {
                stripe_invoice_item_id: "ii_found".to_owned(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (done.status, done.stripe_invoice_item_id.as_deref()),
        (ChargeStatus::Succeeded, Some("ii_found"))
    );
    assert_eq!(invoiced(store, &a.0, NOV).await, (5_001, 5_001));
    assert!(matches!(
        service
            .resolve_charge(&a_key, Resolution::NotCreated { reason: "x".into() })
            .await,
        Err(BillingError::NotPending { .. })
    ));
    assert!(matches!(
        service
            .resolve_charge("nope", Resolution::NotCreated { reason: "x".into() })
            .await,
        Err(BillingError::UnknownCharge(_))
    ));
    // Not in Stripe: the charge failed, and the next run bills the range under a new key.
    let b_key = idempotency_key(&b.0, nov, "api_calls", (0, 5), 0);
    let failed = service
        .resolve_charge(
            &b_key,
            Resolution::NotCreated {
                reason: "not in Stripe".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(failed.status, ChargeStatus::Failed);
    let summary = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(
        (summary.charged, summary.failed, summary.amount_cents),
        (1, 0, 1),
        "{summary:?}"
    );
    let created = billing.stripe.created();
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].idempotency_key,
        idempotency_key(&b.0, nov, "api_calls", (0, 5), 1)
    );
    assert!(
        service
            .reconcile()
            .await
            .unwrap()
            .iter()
            .all(|r| r.status == "ok")
    );
}

async fn a_wrong_stripe_key_leaves_charges_pending_for_when_it_is_fixed(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    let wrong_key = OverageService::new(
        store.clone(),
        Some(Arc::new(
            HttpStripeClient::new(StripeConfig {
                api_base: billing.stripe.uri(),
                ..StripeConfig::new("sk_test_not_the_key")
            })
            .unwrap(),
        )),
        catalog(store).await,
        billing.clock.clone(),
        BillingOptions::default(),
    );
    let summary = wrong_key.process_all(RunMode::Live).await.unwrap();
    assert_eq!((summary.failed, summary.amount_cents), (1, 0));
    assert!(summary.errors[0].reason.contains("HTTP 401"), "{summary:?}");
    let charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(
        charges[0].status,
        ChargeStatus::Pending,
        "not refused: our key was"
    );
    // Fixed key, later run: the same charge goes through, once.
    billing.clock.advance(Duration::hours(1));
    let summary = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!(
        (summary.charged, summary.amount_cents),
        (1, 500),
        "{summary:?}"
    );
    assert_eq!(billing.stripe.created().len(), 1);
    assert_eq!(store.overage_charges_for_user(&a.0).await.unwrap().len(), 1);
}

/// A database failure reaches the run's summary as a stable code and a safe sentence;
/// the database's own text (table names, SQL) stays in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_failures_are_reported_without_database_text() {
    let t = fresh(Backend::Postgres).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 100 + 10, NOV, INCLUDED).await;
    let url = t.url.clone().unwrap();
    let database = url.rsplit('/').next().unwrap();
    usage_testdb::server()
        .psql_on(
            database,
            "ALTER TABLE eco_overage_charges RENAME TO eco_overage_charges_moved",
        )
        .unwrap();
    let summary = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!(summary.failed, 1, "{summary:?}");
    let failure = &summary.errors[0];
    assert_eq!(
        failure.code,
        usage_billing::service::FailureCode::DatabaseError
    );
    assert_eq!(
        serde_json::to_value(failure).unwrap()["code"],
        "database_error"
    );
    for leaked in [
        "eco_overage_charges",
        "relation",
        "does not exist",
        "database error:",
    ] {
        assert!(
            !failure.reason.contains(leaked),
            "{leaked} in {:?}",
            failure.reason
        );
    }
    assert!(
        failure.reason.contains("reading the charge ledger failed"),
        "{failure:?}"
    );
    assert!(billing.stripe.created().is_empty());
}

/// A run's summary as (processed, charged, skipped, failed, amount_cents).
/// Another meter's units are billed as calls are: one item per user, period and meter
/// (`metadata[meter]`, `metadata[quantity]` the units past the limit it covers), priced by
/// the meter's model on the period's whole quantity less what was invoiced; a replayed
/// event changes nothing; a charge left pending by a crash is sent again with its key;
/// a late event of an ended period is billed by the next run, in that period. A blocking
/// meter is never billed.
async fn metered_usage_is_billed_per_meter_once_with_late_events_in_their_period(backend: Backend) {
    use usage_core::meter::{Aggregation, Meter};
    use usage_core::repo::MeterEvent;
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    catalog(store).await;
    for key in ["credits", "tokens"] {
        let meter = Meter {
            key: key.into(),
            name: key.into(),
            unit: "unit".into(),
            aggregation: Aggregation::Sum,
        };
        store
            .create_meter(&meter, NOV - Duration::days(60))
            .await
            .unwrap();
    }
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    // 100 credits included, then 50 at 1 ¢ and the rest at 0.5 ¢; tokens blocked at 1,000.
    let own: Overrides = usage_core::catalog::from_json(
        br#"{"limits": [
              {"meter": "credits", "included": 100, "over_limit": "overage",
               "overage": {"model": "graduated", "tiers": [
                   {"up_to": 50, "unit_price_micros": 10000},
                   {"unit_price_micros": 5000}]}},
              {"meter": "tokens", "included": 1000, "over_limit": "block"}]}"#,
    )
    .unwrap();
    store
        .set_user_overrides(&a.0, Some(&own), NOV - Duration::days(60))
        .await
        .unwrap();
    let event = |id: &str, meter: &str, quantity: u64, at: OffsetDateTime| MeterEvent {
        source: "svc".into(),
        event_id: id.into(),
        user_id: a.0.clone(),
        meter: meter.into(),
        quantity,
        value: None,
        created_at: at,
    };
    let batch = vec![
        event("c1", "credits", 120, NOV),
        event("c2", "credits", 60, NOV + Duration::minutes(1)),
        event("t1", "tokens", 1_500, NOV),
    ];
    store.record_meter_events(&batch, NOV).await.unwrap();

    let service = billing.service(store).await;
    let run = service.process_all(RunMode::Live).await.unwrap();
    // 180 credits: 80 past the 100, 50 × 1 ¢ + 30 × 0.5 ¢ = 65 ¢. Tokens block: no item.
    assert_eq!(
        (run.charged, run.failed, run.amount_cents),
        (1, 0, 65),
        "{run:?}"
    );
    let nov = BillingPeriod::containing(NOV).start();
    let first = &billing.stripe.received()[0];
    assert_eq!(
        first.idempotency_key.as_deref(),
        Some(idempotency_key(&a.0, nov, "credits", (0, 180), 0).as_str())
    );
    assert_eq!(first.form["metadata[meter]"], "credits");
    assert_eq!(first.form["metadata[quantity]"], "80");
    assert_eq!(first.form["amount"], "65");
    assert!(
        first.form["description"].starts_with("credits overage 2026-11: 80 unit(s)"),
        "{:?}",
        first.form
    );
    assert_eq!(
        store.meter_invoicing(&a.0, nov, "credits").await.unwrap(),
        Some((180, 180))
    );

    // The same events again change nothing, and nothing more is billed.
    let replay = store.record_meter_events(&batch, NOV).await.unwrap();
    assert_eq!((replay.accepted, replay.duplicates), (0, 3));
    billing.clock.advance(Duration::hours(1));
    let again = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(again.amount_cents, 0, "{again:?}");
    assert_eq!(billing.stripe.received().len(), 1);

    // 20 credits more, and a run stopped after recording their charge (a crash): the
    // next run sends it once, with its key, and bills nothing else.
    store
        .record_meter_events(&[event("c3", "credits", 20, NOV + Duration::hours(2))], NOV)
        .await
        .unwrap();
    let key = idempotency_key(&a.0, nov, "credits", (180, 200), 0);
    store
        .create_overage_charge(&NewOverageCharge {
            user_id: a.0.clone(),
            period_start: nov,
            meter: "credits".to_owned(),
            calls_from: 180,
            calls_to: 200,
            amount_cents: 10,
            idempotency_key: key.clone(),
            created_at: NOW + Duration::minutes(50),
        })
        .await
        .unwrap();
    let resumed = service.process_all(RunMode::Live).await.unwrap();
    // 100 past the included: 50 ¢ + 25 ¢ = 75 ¢, of which 65 were billed.
    assert_eq!(
        (resumed.charged, resumed.amount_cents),
        (1, 10),
        "{resumed:?}"
    );
    let received = billing.stripe.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].idempotency_key.as_deref(), Some(key.as_str()));
    assert_eq!(received[1].form["metadata[quantity]"], "20");

    // A late event of October (ended): billed by the next run, in October, once.
    let oct_at = datetime!(2026-10-15 09:00 UTC);
    store
        .record_meter_events(&[event("late", "credits", 150, oct_at)], NOV)
        .await
        .unwrap();
    billing.clock.advance(Duration::hours(1));
    let late = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!((late.charged, late.amount_cents), (1, 50), "{late:?}");
    let oct = BillingPeriod::containing(oct_at).start();
    let received = billing.stripe.received();
    assert_eq!(received.len(), 3);
    assert_eq!(
        received[2].idempotency_key.as_deref(),
        Some(idempotency_key(&a.0, oct, "credits", (0, 150), 0).as_str())
    );
    let charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(charges.len(), 3);
    assert!(
        charges
            .iter()
            .all(|c| c.status == ChargeStatus::Succeeded && c.meter == "credits")
    );
    assert_eq!(billing.stripe.created().len(), 3);
    billing.clock.advance(Duration::hours(1));
    let last = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(last.amount_cents, 0, "{last:?}");
    assert_eq!(billing.stripe.received().len(), 3, "nothing billed twice");

    // The reconciliation covers the meter: each period of credits adds up; tokens, which
    // the terms block and do not price, are no money and are left out.
    let rows = |reconciliation: &[usage_billing::Reconciliation]| {
        reconciliation
            .iter()
            .map(|r| {
                (
                    r.entry.meter.clone(),
                    r.entry.period_start,
                    r.entry.overage_calls,
                    r.entry.charged_calls,
                    r.entry.charged_cents,
                    r.expected_cents,
                    r.status,
                )
            })
            .collect::<Vec<_>>()
    };
    let reconciliation = service.reconcile().await.unwrap();
    assert_eq!(
        rows(&reconciliation),
        [
            ("credits".to_owned(), oct, 150, 150, 50, 50, "ok"),
            ("credits".to_owned(), nov, 200, 200, 75, 75, "ok"),
        ],
        "{reconciliation:?}"
    );
    // A charge recorded by hand beyond the quantity, at the wrong price: drift, said twice.
    let stray = store
        .create_overage_charge(&NewOverageCharge {
            user_id: a.0.clone(),
            period_start: nov,
            meter: "credits".to_owned(),
            calls_from: 200,
            calls_to: 210,
            amount_cents: 9,
            idempotency_key: "stray".to_owned(),
            created_at: NOW + Duration::hours(5),
        })
        .await
        .unwrap();
    store
        .complete_overage_charge(stray.id, Some("ii_stray"), NOW + Duration::hours(5))
        .await
        .unwrap();
    let reconciliation = service.reconcile().await.unwrap();
    let drift = reconciliation
        .iter()
        .find(|r| r.entry.period_start == nov)
        .unwrap();
    assert_eq!(drift.status, "drift", "{drift:?}");
    // 210 credits: 50 ¢ + 60 × 0.5 ¢ = 80 ¢ expected; 84 charged.
    assert_eq!(
        drift.problems,
        [
            "charged 84 cent(s) where the invoiced units cost 80",
            "210 unit(s) invoiced but only 200 used"
        ]
    );
}

fn tally(run: &usage_billing::BillingSummary) -> (u64, u64, u64, u64, i64) {
    (
        run.processed,
        run.charged,
        run.skipped,
        run.failed,
        run.amount_cents,
    )
}

/// A pending charge as a run leaves it when it stops after recording the charge and before
/// Stripe answered (a crash, a deploy): created `ago` before `NOW`, never touched since.
async fn left_pending(store: &Arc<dyn Store>, user: &UserId, calls_to: u64, ago: Duration) {
    left_pending_in(store, user, NOV, calls_to, ago).await;
}

/// As [`left_pending`], in the period containing `at`; returns the charge.
async fn left_pending_in(
    store: &Arc<dyn Store>,
    user: &UserId,
    at: OffsetDateTime,
    calls_to: u64,
    ago: Duration,
) -> usage_core::repo::OverageCharge {
    let period = BillingPeriod::containing(at).start();
    store
        .create_overage_charge(&NewOverageCharge {
            user_id: user.clone(),
            period_start: period,
            meter: "api_calls".to_owned(),
            calls_from: 0,
            calls_to,
            amount_cents: 500,
            idempotency_key: idempotency_key(user, period, "api_calls", (0, calls_to), 0),
            created_at: NOW - ago,
        })
        .await
        .unwrap()
}

/// A run stopped between recording a charge and sending it: the next run sends it once,
/// with the same key, and in the same run bills the calls that came after it (the resumed
/// success frees its period; the invoiced count is read again).
async fn a_charge_recorded_before_a_crash_is_sent_once_then_the_rest_billed(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    left_pending(store, &a.0, 5_001, Duration::minutes(10)).await;
    // 20 more overage calls after the crashed run recorded its charge.
    calls(store, &a, 20, NOV + Duration::hours(1), INCLUDED).await;
    assert_eq!(invoiced(store, &a.0, NOV).await, (5_021, 0));

    let service = billing.service(store).await;
    let run = service.process_all(RunMode::Live).await.unwrap();
    // 500 cents for 0..5,001 (resumed), then 502 - 500 = 2 cents for 5,001..5,021.
    assert_eq!(tally(&run), (1, 1, 0, 0, 502), "{run:?}");
    let nov = BillingPeriod::containing(NOV).start();
    let keys = billing.stripe.idempotency_keys();
    assert_eq!(
        keys,
        vec![
            idempotency_key(&a.0, nov, "api_calls", (0, 5_001), 0),
            idempotency_key(&a.0, nov, "api_calls", (5_001, 5_021), 0)
        ]
    );
    // The second item bills the 20 calls of its range, not the range's ends.
    let second = &billing.stripe.received()[1];
    assert_eq!(second.form["metadata[overage_calls]"], "20");
    assert!(
        second.form["description"].ends_with(": 20 call(s) past the plan's monthly limit"),
        "{:?}",
        second.form
    );
    assert_eq!(invoiced(store, &a.0, NOV).await, (5_021, 5_021));
    let charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(charges.len(), 2);
    assert!(charges.iter().all(|c| c.status == ChargeStatus::Succeeded));

    // Nothing is left: the next run sends nothing.
    billing.clock.advance(Duration::hours(1));
    let again = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(
        (
            again.processed,
            again.charged,
            again.skipped,
            again.amount_cents
        ),
        (1, 0, 1, 0),
        "{again:?}"
    );
    assert_eq!(billing.stripe.received().len(), 2);
}

/// A pending charge touched less than the in-flight grace ago may be being sent by the run
/// that made it: left alone, and its period gets no new charge; at the grace exactly, it
/// is resumed.
async fn a_pending_charge_in_flight_is_left_to_its_run_until_the_grace_ends(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10 + 20, NOV, INCLUDED).await;
    let grace = BillingOptions::default().in_flight_grace;
    left_pending(store, &a.0, 5_001, grace - Duration::seconds(1)).await;

    let service = billing.service(store).await;
    let run = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(tally(&run), (1, 0, 1, 0, 0), "{run:?}");
    assert!(billing.stripe.received().is_empty());
    assert_eq!(store.overage_charges_for_user(&a.0).await.unwrap().len(), 1);

    billing.clock.advance(Duration::seconds(1));
    let run = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!((run.charged, run.amount_cents), (1, 502), "{run:?}");
    assert_eq!(billing.stripe.received().len(), 2);
}

/// The idempotency window's edge: a charge pending exactly as long as Stripe keeps keys
/// (less the margin) is still sent again with its key; a second longer, it is reported.
async fn the_idempotency_window_is_inclusive(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let window = BillingOptions::default().idempotency_window;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    let b = pro_user(store, "b@example.com", Some("cus_b")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    calls(store, &b, 5_001 + 10, NOV, INCLUDED).await;
    left_pending(store, &a.0, 5_001, window).await;
    left_pending(store, &b.0, 5_001, window + Duration::seconds(1)).await;

    let run = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!(
        (run.processed, run.charged, run.failed, run.amount_cents),
        (2, 1, 1, 500),
        "{run:?}"
    );
    assert_eq!(run.errors[0].user_id, b.0);
    let nov = BillingPeriod::containing(NOV).start();
    let sent = billing.stripe.idempotency_keys();
    assert_eq!(
        sent,
        vec![idempotency_key(&a.0, nov, "api_calls", (0, 5_001), 0)]
    );
}

/// A dry run while a charge is pending says what resuming it would bill, sends nothing,
/// and leaves it exactly as it was; the period gets no new charge in the plan either.
async fn a_dry_run_counts_pending_charges_and_touches_nothing(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10 + 20, NOV, INCLUDED).await;
    left_pending(store, &a.0, 5_001, Duration::hours(1)).await;
    let before = store.overage_charges_for_user(&a.0).await.unwrap();

    let run = billing
        .service(store)
        .await
        .process_all(RunMode::DryRun)
        .await
        .unwrap();
    assert!(run.dry_run);
    assert_eq!(tally(&run), (1, 1, 0, 0, 500), "{run:?}");
    assert!(billing.stripe.received().is_empty());
    assert_eq!(store.overage_charges_for_user(&a.0).await.unwrap(), before);
    assert_eq!(invoiced(store, &a.0, NOV).await, (5_021, 0));
}

/// A user moved to a plan without overage (enterprise here) holds its terms: the period is
/// priced under them, so nothing more is billed for it, and what was billed before the
/// move stays billed. Counted in `processed` while overage is left; once the period ends,
/// its last range is settled at zero (no Stripe item) and nothing is left uninvoiced.
async fn a_move_to_a_plan_without_overage_bills_nothing_more_for_the_period(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    let b = pro_user(store, "b@example.com", Some("cus_b")).await;
    let _quiet = pro_user(store, "quiet@example.com", Some("cus_q")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    calls(store, &b, 2_000 + 10, NOV, INCLUDED).await;
    let first = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    // 5,001 calls at $0.001: 500 cents; 2,000: 200 cents.
    assert_eq!(tally(&first), (3, 2, 1, 0, 700), "{first:?}");
    calls(store, &b, 1_000, NOV + Duration::hours(1), INCLUDED).await;
    store
        .set_plan(&b.0, Plan::enterprise(), NOV + Duration::hours(2))
        .await
        .unwrap();

    let after_move = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    // Two users whose terms bill overage (a, quiet) and one whose overage was left by
    // the terms before (b): nothing to bill under enterprise's.
    assert_eq!(tally(&after_move), (3, 0, 3, 0, 0), "{after_move:?}");
    assert_eq!(invoiced(store, &b.0, NOV).await, (3_000, 2_000));

    billing.clock.set(datetime!(2026-12-02 00:00 UTC));
    let after_the_period = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!(after_the_period.amount_cents, 0, "{after_the_period:?}");
    assert_eq!(invoiced(store, &b.0, NOV).await, (3_000, 3_000));
    assert_eq!(
        billing.stripe.created().len(),
        2,
        "no item for the settled range"
    );
    let b_charges = store.overage_charges_for_user(&b.0).await.unwrap();
    assert_eq!(
        b_charges
            .iter()
            .map(|c| (c.calls_from, c.calls_to, c.amount_cents, c.status))
            .collect::<Vec<_>>(),
        vec![
            (0, 2_000, 200, ChargeStatus::Succeeded),
            (2_000, 3_000, 0, ChargeStatus::Succeeded)
        ]
    );
    // The charges were made under the terms before the move: not compared with today's.
    let b_report = billing
        .service(store)
        .await
        .user_overage(&b.0)
        .await
        .unwrap();
    assert_eq!(
        (
            b_report[0].status,
            b_report[0].terms_changed,
            b_report[0].expected_cents
        ),
        ("ok", true, 0),
        "{b_report:?}"
    );
}

/// A plan of the catalog with graduated tiers: each item bills the period's cost under
/// them, rounded once, less what was invoiced.
async fn graduated_tiers_bill_the_period_cost_less_what_was_invoiced(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let growth: PlanDefinition = usage_core::catalog::from_json(
        br#"{"key": "growth", "name": "Growth", "price_cents": 9900, "currency": "usd",
             "limits": [{"meter": "api_calls", "included": 10, "over_limit": "overage",
                         "overage": {"model": "graduated", "tiers": [
                             {"up_to": 100, "unit_price_micros": 800},
                             {"up_to": null, "unit_price_micros": 500}]}}]}"#,
    )
    .unwrap();
    catalog(store).await;
    store
        .create_plan(&growth, NOV - Duration::days(30))
        .await
        .unwrap();
    let g = user_on(
        store,
        "g@example.com",
        Plan::parse("growth").unwrap(),
        Some("cus_g"),
    )
    .await;
    calls(store, &g, 10 + 150, NOV, 10).await;
    let service = billing.service(store).await;
    let first = service.process_all(RunMode::Live).await.unwrap();
    // 100 × 800 µ$ + 50 × 500 µ$ = 105,000 µ$ = 10.5 ¢, rounded half-up: 11 ¢.
    assert_eq!(tally(&first), (1, 1, 0, 0, 11), "{first:?}");
    calls(store, &g, 1_000, NOV + Duration::hours(1), 10).await;
    let second = service.process_all(RunMode::Live).await.unwrap();
    // 1,150 overage calls: 100 × 800 + 1,050 × 500 = 605,000 µ$ = 60.5 ¢ → 61 ¢, of
    // which 11 were invoiced: 50 ¢.
    assert_eq!(tally(&second), (1, 1, 0, 0, 50), "{second:?}");
    let items: Vec<(i64, String)> = billing
        .stripe
        .created()
        .iter()
        .map(|c| (c.amount, c.form["metadata[overage_calls]"].clone()))
        .collect();
    assert_eq!(items, vec![(11, "150".to_owned()), (50, "1000".to_owned())]);
    let report = service.user_overage(&g.0).await.unwrap();
    assert_eq!(
        (
            report[0].status,
            report[0].entry.charged_cents,
            report[0].expected_cents,
            report[0].terms_changed
        ),
        ("ok", 61, 61, false),
        "{report:?}"
    );
}

/// A user's own terms price their overage; a version taken up at once during the period
/// prices the whole period anew, never taking back what was billed.
async fn own_terms_and_a_version_taken_up_now_price_the_period(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    catalog(store).await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    let own: Overrides = usage_core::catalog::from_json(
        br#"{"limits": [{"meter": "api_calls", "included": 20, "over_limit": "overage",
                          "overage": {"model": "per_unit", "unit_price_micros": 2000}}]}"#,
    )
    .unwrap();
    store
        .set_user_overrides(&a.0, Some(&own), NOV - Duration::days(30))
        .await
        .unwrap();
    let b = pro_user(store, "b@example.com", Some("cus_b")).await;
    calls(store, &a, 20 + 30, NOV, 20).await;
    calls(store, &b, 10 + 5_001, NOV, INCLUDED).await;
    let run = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    // a: 30 × 2,000 µ$ = 6 ¢ (their terms); b: 5,001 × 1,000 µ$ = 500 ¢ (pro's).
    assert_eq!(tally(&run), (2, 2, 0, 0, 506), "{run:?}");

    // Pro's overage halves, for its users at once.
    let mut cheaper = catalog(store)
        .await
        .current()
        .newest("pro")
        .unwrap()
        .plan
        .clone();
    let limit = cheaper
        .limits
        .iter_mut()
        .find(|l| l.meter == "api_calls")
        .unwrap();
    limit.overage = Some(usage_core::pricing::OverageModel::PerUnit {
        unit_price_micros: 500,
    });
    store
        .revise_plan(&cheaper, PlanMove::Now, NOV + Duration::hours(1))
        .await
        .unwrap();
    calls(store, &b, 1_000, NOV + Duration::hours(2), INCLUDED).await;
    let cheaper_run = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    // 6,001 × 500 µ$ = 300 ¢, less than the 500 invoiced: nothing.
    assert_eq!(cheaper_run.amount_cents, 0, "{cheaper_run:?}");
    calls(store, &b, 5_000, NOV + Duration::hours(3), INCLUDED).await;
    let later = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    // 11,001 × 500 µ$ = 5,500,500 µ$ = 550.05 ¢ → 550, less 500: 50 ¢.
    assert_eq!(later.amount_cents, 50, "{later:?}");
    assert_eq!(invoiced(store, &b.0, NOV).await, (11_001, 11_001));
    let reconciliation = billing.service(store).await.reconcile().await.unwrap();
    let by_user: BTreeMap<UserId, (&str, bool)> = reconciliation
        .iter()
        .map(|r| (r.entry.user_id.clone(), (r.status, r.terms_changed)))
        .collect();
    assert_eq!(by_user[&a.0], ("ok", false));
    assert_eq!(by_user[&b.0], ("ok", true));
}

/// Without a Stripe customer, the failure counts the calls still to bill: the overage
/// less what was already invoiced.
async fn a_missing_customer_counts_only_the_calls_not_invoiced(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    let service = billing.service(store).await;
    assert_eq!(service.process_all(RunMode::Live).await.unwrap().charged, 1);
    store.set_stripe_customer(&a.0, None).await.unwrap();
    calls(store, &a, 20, NOV + Duration::hours(1), INCLUDED).await;
    billing.clock.advance(Duration::hours(1));
    let run = service.process_all(RunMode::Live).await.unwrap();
    assert_eq!(run.failed, 1, "{run:?}");
    assert!(
        run.errors[0]
            .reason
            .starts_with("20 overage call(s) to bill but the user has no Stripe customer id"),
        "{run:?}"
    );
}

/// A pending charge resumed and refused by Stripe leaves its period alone for the rest of
/// the run: no second charge of the same range right after the refusal.
async fn a_resumed_charge_refused_gets_no_new_attempt_in_the_same_run(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    billing.stripe.refuse("cus_declined");
    let a = pro_user(store, "a@example.com", Some("cus_declined")).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    left_pending(store, &a.0, 5_001, Duration::hours(1)).await;
    let run = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!((run.failed, run.amount_cents), (1, 0), "{run:?}");
    assert_eq!(billing.stripe.received().len(), 1, "one attempt, not two");
    let charges = store.overage_charges_for_user(&a.0).await.unwrap();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].status, ChargeStatus::Failed);
}

/// Two periods with charges left pending: the one resumed successfully is freed for its
/// later calls even while the other period's charge is still in flight.
async fn a_charge_in_flight_in_one_period_does_not_hold_back_another(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let oct_at = datetime!(2026-10-10 12:00 UTC);
    let oct = BillingPeriod::containing(oct_at).start();
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10 + 20, oct_at, INCLUDED).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    // October's was left by a crash an hour ago; November's is being sent right now.
    left_pending_in(store, &a.0, oct_at, 5_001, Duration::hours(1)).await;
    left_pending_in(store, &a.0, NOV, 5_001, Duration::seconds(10)).await;
    let run = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    // October: the resumed 500 cents, then its 20 later calls (502 - 500 = 2 cents).
    assert_eq!(
        (run.charged, run.failed, run.amount_cents),
        (1, 0, 502),
        "{run:?}"
    );
    let sent = billing.stripe.idempotency_keys();
    assert_eq!(
        sent,
        vec![
            idempotency_key(&a.0, oct, "api_calls", (0, 5_001), 0),
            idempotency_key(&a.0, oct, "api_calls", (5_001, 5_021), 0)
        ]
    );
}

/// A refusal counts only for a new attempt of the same range (same period, same start):
/// another period's refused charge does not change this period's key.
async fn a_refusal_changes_the_key_of_its_own_range_only(backend: Backend) {
    let t = fresh(backend).await;
    let store = &t.store;
    let billing = Billing::start().await;
    let oct_at = datetime!(2026-10-10 12:00 UTC);
    let oct = BillingPeriod::containing(oct_at).start();
    let nov = BillingPeriod::containing(NOV).start();
    let a = pro_user(store, "a@example.com", Some("cus_a")).await;
    calls(store, &a, 5_001 + 10, oct_at, INCLUDED).await;
    calls(store, &a, 5_001 + 10, NOV, INCLUDED).await;
    // October's first attempt was refused (the card has been fixed since).
    let refused = left_pending_in(store, &a.0, oct_at, 5_001, Duration::days(3)).await;
    store
        .fail_overage_charge(refused.id, "card_declined", NOW - Duration::days(3))
        .await
        .unwrap();
    let run = billing
        .service(store)
        .await
        .process_all(RunMode::Live)
        .await
        .unwrap();
    assert_eq!((run.charged, run.amount_cents), (1, 1_000), "{run:?}");
    let mut sent = billing.stripe.idempotency_keys();
    sent.sort();
    let mut expected = vec![
        idempotency_key(&a.0, oct, "api_calls", (0, 5_001), 1),
        idempotency_key(&a.0, nov, "api_calls", (0, 5_001), 0),
    ];
    expected.sort();
    assert_eq!(sent, expected);
}

macro_rules! on_every_store {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Memory).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_every_store!(
    one_run_bills_each_user_once_with_exact_amounts,
    server_errors_then_success_make_one_charge_with_one_key,
    a_timeout_after_stripe_applied_is_finished_by_the_next_run,
    concurrent_runs_never_bill_twice,
    runs_a_day_apart_bill_the_difference_exactly,
    ended_periods_are_billed_after_they_close,
    a_dry_run_sends_and_records_nothing,
    a_pending_charge_older_than_stripes_key_window_is_reported_not_resent,
    reconciliation_flags_drift,
    a_stale_pending_charge_is_resolved_by_hand,
    a_wrong_stripe_key_leaves_charges_pending_for_when_it_is_fixed,
    a_charge_recorded_before_a_crash_is_sent_once_then_the_rest_billed,
    a_pending_charge_in_flight_is_left_to_its_run_until_the_grace_ends,
    the_idempotency_window_is_inclusive,
    a_dry_run_counts_pending_charges_and_touches_nothing,
    a_move_to_a_plan_without_overage_bills_nothing_more_for_the_period,
    graduated_tiers_bill_the_period_cost_less_what_was_invoiced,
    own_terms_and_a_version_taken_up_now_price_the_period,
    a_missing_customer_counts_only_the_calls_not_invoiced,
    a_resumed_charge_refused_gets_no_new_attempt_in_the_same_run,
    a_charge_in_flight_in_one_period_does_not_hold_back_another,
    a_refusal_changes_the_key_of_its_own_range_only,
    metered_usage_is_billed_per_meter_once_with_late_events_in_their_period,
);
