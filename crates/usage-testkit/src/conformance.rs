//! The repository conformance suite: one set of cases that every [`Store`] must pass.
//!
//! A backend's tests expand [`repository_conformance_tests!`](crate::repository_conformance_tests)
//! with an async function that returns a fresh, migrated, empty [`TestStore`] reading the
//! clock it is given (a [`ManualClock`](usage_core::ManualClock) the cases move):
//!
//! ```ignore
//! async fn fresh_store(clock: Arc<dyn Clock>) -> usage_testkit::conformance::TestStore {
//!     TestStore::new(Arc::new(MemoryStore::with_clock(clock)), ())
//! }
//! usage_testkit::repository_conformance_tests!(fresh_store);
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use time::macros::{date, datetime};
use time::{Duration, OffsetDateTime};

use usage_core::catalog::{API_CALLS, PlanDefinition, PlanMove};
use usage_core::event::new_event_id;
use usage_core::meter::{Aggregation, Meter, RouteCost};
use usage_core::repo::{
    AdminAuditEntry, ApiKeyRecord, ChargeStatus, DayTotal, DeadLetter, DeletedKeys, EndpointCount,
    IncludedCalls, KeyIssue, KeyRetirement, LeaseTerms, MeterEvent, NewOverageCharge, QuotaDelta,
    QuotaTake, RecordOutcome, SubscriptionChange, SubscriptionOutcome, UninvoicedOverage, User,
    UserPageQuery, UserSort,
};
use usage_core::{
    ApiKeyId, BillingPeriod, Clock as _, Plan, PlanCatalog, RepoError, Store, UsageEvent, UserId,
};

/// A store under test and whatever must live as long as it (a temporary database).
pub struct TestStore {
    pub store: Arc<dyn Store>,
    _guard: Box<dyn Any + Send>,
}

impl TestStore {
    pub fn new(store: Arc<dyn Store>, guard: impl Any + Send) -> Self {
        Self {
            store,
            _guard: Box::new(guard),
        }
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh store made by
/// `$make` (an async fn taking the store's clock and returning [`TestStore`]). The clock
/// stands at the time the test starts; the cases of the second list get it to move.
#[macro_export]
macro_rules! repository_conformance_tests {
    ($make:path) => {
        $crate::repository_conformance_tests!(@cases $make;
            users_crud,
            users_unique_id_and_email,
            users_stripe_customers_are_unique,
            subscription_changes_apply_once_and_in_order,
            subscription_change_deliveries_at_once_apply_once,
            a_subscription_end_takes_back_only_the_plan_it_set,
            deleted_keys_are_reported_in_order_however_deleted,
            users_are_blocked_and_unblocked,
            api_keys_crud,
            api_keys_unique_hash_and_known_user,
            api_keys_concurrent_issues_stop_at_the_limit,
            api_keys_are_found_with_their_plan,
            api_keys_rotation_is_one_write,
            usage_batch_counts_inserted_rows,
            usage_replayed_batch_counts_once,
            usage_batch_of_many_users_counts_each,
            usage_concurrent_batches_sum_exactly,
            usage_period_boundaries,
            usage_batch_with_unknown_user_changes_nothing,
            usage_events_are_paged_newest_first,
            usage_is_pruned_before_a_time,
            dead_letters_are_kept_listed_and_replayed,
            daily_aggregation_is_idempotent,
            daily_aggregates_are_current_until_a_late_write,
            overage_charge_ledger,
            overage_billing_queries,
            admin_figures_and_audit,
            admin_audit_is_pruned_in_batches,
            quota_counters_lease_under_the_cap,
            counters_below_their_stored_calls_are_found_and_raised,
            quota_concurrent_takes_stop_at_the_cap,
            sign_in_links_work_once_and_expire,
            daily_totals_follow_the_aggregation,
            sessions_expire_end_and_are_pruned,
            plans_are_seeded_once_from_the_built_in_terms,
            plans_are_created_revised_and_archived,
            plan_terms_read_back_as_written,
            concurrent_plan_revisions_get_distinct_versions,
            users_hold_the_plan_version_they_subscribed_to,
            meters_and_route_costs_are_kept,
            calls_units_add_up_by_each_meters_aggregation,
            meter_events_are_stored_once_ever,
            meter_counters_start_from_stored_usage_and_take_events,
            users_overrides_are_kept_and_dropped;
            late_writes_are_marked_by_the_store_clock,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?; $($clock_case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let clock = std::sync::Arc::new($crate::ManualClock::new(
                    time::OffsetDateTime::now_utc(),
                ));
                let test_store = $make(clock).await;
                $crate::conformance::$case(test_store.store.clone()).await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $clock_case() {
                let clock = std::sync::Arc::new($crate::ManualClock::new(
                    time::OffsetDateTime::now_utc(),
                ));
                let test_store = $make(clock.clone()).await;
                $crate::conformance::$clock_case(test_store.store.clone(), clock).await;
            }
        )*
    };
}

const T0: OffsetDateTime = datetime!(2026-11-10 12:00 UTC);

fn user(email: &str, plan: Plan) -> User {
    User {
        id: UserId::generate(),
        email: email.to_owned(),
        plan,
        stripe_customer_id: None,
        created_at: T0,
        plan_subscription_id: None,
        blocked_at: None,
        plan_version: None,
        overrides: None,
    }
}

fn key_for(user_id: &UserId, hash: &str, created_at: OffsetDateTime) -> ApiKeyRecord {
    ApiKeyRecord {
        id: ApiKeyId::generate(),
        user_id: user_id.clone(),
        name: "default".to_owned(),
        prefix: "eco_live_abcd".to_owned(),
        key_hash: hash.to_owned(),
        created_at,
        last_used_at: None,
        revoked_at: None,
        expires_at: None,
    }
}

/// A user with one key, ready to record events.
async fn caller(store: &Arc<dyn Store>, email: &str, plan: Plan) -> (UserId, ApiKeyId) {
    let u = user(email, plan);
    store.create_user(&u).await.unwrap();
    let k = key_for(&u.id, &format!("{:064x}", rand::random::<u128>()), T0);
    store.create_api_key(&k).await.unwrap();
    (u.id, k.id)
}

fn event(user_id: &UserId, key_id: &ApiKeyId, at: OffsetDateTime) -> UsageEvent {
    UsageEvent {
        event_id: new_event_id(at),
        user_id: user_id.clone(),
        api_key_id: key_id.clone(),
        endpoint: "/api/v1/ping".to_owned(),
        method: "GET".to_owned(),
        status_code: 200,
        response_time_ms: 3,
        created_at: at,
        units: Default::default(),
    }
}

fn events(user_id: &UserId, key_id: &ApiKeyId, n: usize, start: OffsetDateTime) -> Vec<UsageEvent> {
    (0..n)
        .map(|i| event(user_id, key_id, start + Duration::milliseconds(i as i64)))
        .collect()
}

pub async fn users_crud(store: Arc<dyn Store>) {
    let mut u = user("ada@example.com", Plan::free());
    u.stripe_customer_id = Some("cus_123".to_owned());
    store.create_user(&u).await.unwrap();

    assert_eq!(store.user_by_id(&u.id).await.unwrap(), Some(u.clone()));
    assert_eq!(
        store.user_by_email("ada@example.com").await.unwrap(),
        Some(u.clone())
    );
    assert_eq!(store.user_by_email("bob@example.com").await.unwrap(), None);
    assert_eq!(store.user_by_id(&UserId::generate()).await.unwrap(), None);

    let upgraded = store
        .set_plan(&u.id, Plan::pro(), T0 + Duration::minutes(5))
        .await
        .unwrap();
    assert_eq!(upgraded.plan, Plan::pro());
    assert_eq!(
        store.user_by_id(&u.id).await.unwrap().unwrap().plan,
        Plan::pro()
    );

    let missing = store.set_plan(&UserId::generate(), Plan::pro(), T0).await;
    assert_eq!(missing, Err(RepoError::NotFound { entity: "user" }));

    // Plan changes are found by time, for the other instances' caches.
    let bob = user("bob@example.com", Plan::free());
    store.create_user(&bob).await.unwrap();
    store
        .set_plan(&bob.id, Plan::enterprise(), T0 + Duration::minutes(9))
        .await
        .unwrap();
    let mut changed = store
        .plans_changed_since(T0 + Duration::minutes(5))
        .await
        .unwrap();
    changed.sort();
    let mut expected = vec![u.id.clone(), bob.id.clone()];
    expected.sort();
    assert_eq!(changed, expected, "the bound is inclusive");
    assert_eq!(
        store
            .plans_changed_since(T0 + Duration::minutes(6))
            .await
            .unwrap(),
        vec![bob.id.clone()]
    );
    assert!(
        store
            .plans_changed_since(T0 + Duration::minutes(10))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Counters below the calls stored for their user are listed with those calls, and raised
/// to a floor without ever being lowered; users without a counter are left alone.
pub async fn counters_below_their_stored_calls_are_found_and_raised(store: Arc<dyn Store>) {
    let period = BillingPeriod::containing(T0).start();
    let (ada, ada_key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::pro()).await;
    let (carl, carl_key) = caller(&store, "carl@example.com", Plan::pro()).await;
    // Ada's counter exists before her 5 calls are stored (their counts were lost); Bob's
    // starts from his 3; Carl has calls and no counter.
    assert_eq!(store.quota_count(&ada, API_CALLS, period).await.unwrap(), 0);
    let store_calls = async |user: &UserId, key: &ApiKeyId, n: usize| {
        store
            .record_usage(&events(user, key, n, T0), &IncludedCalls::new())
            .await
            .unwrap();
    };
    store_calls(&ada, &ada_key, 5).await;
    store_calls(&bob, &bob_key, 3).await;
    store_calls(&carl, &carl_key, 2).await;
    assert_eq!(store.quota_count(&bob, API_CALLS, period).await.unwrap(), 3);
    assert_eq!(
        store
            .counters_below_stored(API_CALLS, period)
            .await
            .unwrap(),
        vec![(ada.clone(), 5)]
    );
    let next = BillingPeriod::containing(T0).next().start();
    assert!(
        store
            .counters_below_stored(API_CALLS, next)
            .await
            .unwrap()
            .is_empty()
    );

    assert_eq!(
        store
            .raise_quota_counters(API_CALLS, period, &[(ada.clone(), 4)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.quota_count(&ada, API_CALLS, period).await.unwrap(), 4);
    let floors = [(carl.clone(), 9), (bob.clone(), 1), (ada.clone(), 5)];
    assert_eq!(
        store
            .raise_quota_counters(API_CALLS, period, &floors)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.quota_count(&ada, API_CALLS, period).await.unwrap(), 5);
    assert_eq!(
        store.quota_count(&bob, API_CALLS, period).await.unwrap(),
        3,
        "never lowered"
    );
    assert_eq!(
        store
            .raise_quota_counters(API_CALLS, next, &floors)
            .await
            .unwrap(),
        0
    );
    assert!(
        store
            .counters_below_stored(API_CALLS, period)
            .await
            .unwrap()
            .is_empty()
    );
    // Carl's counter, created now, starts from his stored calls.
    assert_eq!(
        store.quota_count(&carl, API_CALLS, period).await.unwrap(),
        2
    );
}

/// Quota counters start from the period's stored calls; takes lease under the cap, adds
/// come first, deltas never go below zero.
pub async fn quota_counters_lease_under_the_cap(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::free()).await;
    let period = BillingPeriod::containing(T0).start();
    store
        .record_usage(&events(&ada, &key, 7, T0), &IncludedCalls::new())
        .await
        .unwrap();
    assert_eq!(
        store.quota_count(&ada, API_CALLS, period).await.unwrap(),
        7,
        "seeded from stored calls"
    );
    // Stored calls counted after the counter exists do not move it: admissions do.
    store
        .record_usage(&events(&ada, &key, 2, T0), &IncludedCalls::new())
        .await
        .unwrap();
    assert_eq!(store.quota_count(&ada, API_CALLS, period).await.unwrap(), 7);

    let terms = LeaseTerms {
        cap: Some(100),
        max: 50,
        share: 4,
        need: 1,
    };
    let take = store
        .take_quota(&ada, API_CALLS, period, 3, terms)
        .await
        .unwrap();
    // 7 + 3 = 10; a quarter of the 90 left.
    assert_eq!(
        take,
        QuotaTake {
            taken: 22,
            count: 32
        }
    );
    let take = store
        .take_quota(&ada, API_CALLS, period, 0, LeaseTerms { max: 5, ..terms })
        .await
        .unwrap();
    assert_eq!(
        take,
        QuotaTake {
            taken: 5,
            count: 37
        }
    );
    let counts = store
        .apply_quota_deltas(&[QuotaDelta {
            user_id: ada.clone(),
            meter: Arc::from(API_CALLS),
            period_start: period,
            delta: 60,
        }])
        .await
        .unwrap();
    assert_eq!(counts, vec![97]);
    for expected in [98, 99, 100] {
        let take = store
            .take_quota(&ada, API_CALLS, period, 0, terms)
            .await
            .unwrap();
        assert_eq!(
            take,
            QuotaTake {
                taken: 1,
                count: expected
            }
        );
    }
    let take = store
        .take_quota(&ada, API_CALLS, period, 0, terms)
        .await
        .unwrap();
    assert_eq!(
        take,
        QuotaTake {
            taken: 0,
            count: 100
        },
        "nothing past the cap"
    );
    // An add is kept even when nothing is left to lease (calls already admitted).
    let take = store
        .take_quota(&ada, API_CALLS, period, 2, terms)
        .await
        .unwrap();
    assert_eq!(
        take,
        QuotaTake {
            taken: 0,
            count: 102
        }
    );
    // Unlimited: the largest lease.
    let take = store
        .take_quota(
            &ada,
            API_CALLS,
            period,
            0,
            LeaseTerms { cap: None, ..terms },
        )
        .await
        .unwrap();
    assert_eq!(
        take,
        QuotaTake {
            taken: 50,
            count: 152
        }
    );

    // Deltas for several counters, created when missing, never below zero; another period
    // and another user are separate counters.
    let (bob, _) = caller(&store, "bob@example.com", Plan::pro()).await;
    let next = BillingPeriod::containing(T0).end();
    let counts = store
        .apply_quota_deltas(&[
            QuotaDelta {
                user_id: ada.clone(),
                meter: Arc::from(API_CALLS),
                period_start: period,
                delta: -52,
            },
            QuotaDelta {
                user_id: bob.clone(),
                meter: Arc::from(API_CALLS),
                period_start: period,
                delta: 4,
            },
            QuotaDelta {
                user_id: ada.clone(),
                meter: Arc::from(API_CALLS),
                period_start: next,
                delta: -3,
            },
        ])
        .await
        .unwrap();
    assert_eq!(counts, vec![100, 4, 0]);
    assert!(store.apply_quota_deltas(&[]).await.unwrap().is_empty());
    assert_eq!(store.quota_count(&ada, API_CALLS, next).await.unwrap(), 0);
    assert_eq!(store.quota_count(&bob, API_CALLS, period).await.unwrap(), 4);
}

/// Many concurrent takers (as many instances would be) never lease past the cap, and
/// together lease all of it.
pub async fn quota_concurrent_takes_stop_at_the_cap(store: Arc<dyn Store>) {
    const CAP: u64 = 500;
    let (ada, _) = caller(&store, "ada@example.com", Plan::free()).await;
    let period = BillingPeriod::containing(T0).start();
    let terms = LeaseTerms {
        cap: Some(CAP),
        max: 40,
        share: 8,
        need: 1,
    };
    let mut handles = Vec::new();
    for _ in 0..16 {
        let (store, ada) = (Arc::clone(&store), ada.clone());
        handles.push(tokio::spawn(async move {
            let mut leased = 0;
            loop {
                let take = store
                    .take_quota(&ada, API_CALLS, period, 0, terms)
                    .await
                    .unwrap();
                assert!(take.count <= CAP);
                if take.taken == 0 {
                    return leased;
                }
                leased += take.taken;
            }
        }));
    }
    let mut leased = 0;
    for h in handles {
        leased += h.await.unwrap();
    }
    assert_eq!(leased, CAP);
    assert_eq!(
        store.quota_count(&ada, API_CALLS, period).await.unwrap(),
        CAP
    );
}

pub async fn api_keys_concurrent_issues_stop_at_the_limit(store: Arc<dyn Store>) {
    const LIMIT: usize = 5;
    let ada = user("ada@example.com", Plan::pro());
    store.create_user(&ada).await.unwrap();
    // One revoked and one expired key do not count.
    let mut revoked = key_for(&ada.id, &format!("{:064x}", 1), T0);
    revoked.revoked_at = Some(T0);
    let mut expired = key_for(&ada.id, &format!("{:064x}", 2), T0);
    expired.expires_at = Some(T0 + Duration::seconds(1));
    store.create_api_key(&revoked).await.unwrap();
    store.create_api_key(&expired).await.unwrap();
    let at = T0 + Duration::minutes(1);
    let mut handles = Vec::new();
    for i in 0..40u32 {
        let (store, user_id) = (Arc::clone(&store), ada.id.clone());
        handles.push(tokio::spawn(async move {
            let key = key_for(&user_id, &format!("{:064x}", 100 + i), at);
            store.issue_api_key(&key, LIMIT, None).await.unwrap()
        }));
    }
    let mut issued = 0;
    for h in handles {
        match h.await.unwrap() {
            KeyIssue::Issued { retired: None } => issued += 1,
            KeyIssue::LimitReached => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(issued, LIMIT);
    let active = store
        .api_keys_for_user(&ada.id)
        .await
        .unwrap()
        .iter()
        .filter(|k| k.is_active(at))
        .count();
    assert_eq!(active, LIMIT);
    // Unknown user: NotFound, nothing stored.
    let stranger = key_for(&UserId::generate(), &format!("{:064x}", 999), at);
    assert_eq!(
        store.issue_api_key(&stranger, LIMIT, None).await,
        Err(RepoError::NotFound { entity: "user" })
    );
}

pub async fn api_keys_are_found_with_their_plan(store: Arc<dyn Store>) {
    let ada = user("ada@example.com", Plan::pro());
    store.create_user(&ada).await.unwrap();
    let mut key = key_for(&ada.id, &format!("{:064x}", 7), T0);
    key.revoked_at = Some(T0 + Duration::hours(1));
    store.create_api_key(&key).await.unwrap();
    let found = store.api_key_and_plan_by_hash(&key.key_hash).await.unwrap();
    let stored = store.user_by_id(&ada.id).await.unwrap().unwrap();
    assert_eq!(
        found,
        Some((key.clone(), stored.subscription())),
        "whatever its state"
    );
    store
        .set_plan(&ada.id, Plan::enterprise(), T0 + Duration::hours(2))
        .await
        .unwrap();
    let (_, plan) = store
        .api_key_and_plan_by_hash(&key.key_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plan.plan, Plan::enterprise());
    assert_eq!(
        store
            .api_key_and_plan_by_hash(&format!("{:064x}", 8))
            .await
            .unwrap(),
        None
    );
}

pub async fn api_keys_rotation_is_one_write(store: Arc<dyn Store>) {
    let ada = user("ada@example.com", Plan::pro());
    let bob = user("bob@example.com", Plan::pro());
    store.create_user(&ada).await.unwrap();
    store.create_user(&bob).await.unwrap();
    let old = key_for(&ada.id, &format!("{:064x}", 1), T0);
    let bobs = key_for(&bob.id, &format!("{:064x}", 2), T0);
    store.create_api_key(&old).await.unwrap();
    store.create_api_key(&bobs).await.unwrap();
    let at = T0 + Duration::minutes(1);

    // At the limit, a rotation still goes through: the retired key does not count.
    let grace = KeyRetirement {
        key_id: old.id.clone(),
        at: at + Duration::hours(1),
    };
    let new = key_for(&ada.id, &format!("{:064x}", 3), at);
    let KeyIssue::Issued {
        retired: Some(retired),
    } = store.issue_api_key(&new, 1, Some(&grace)).await.unwrap()
    else {
        panic!("rotation refused");
    };
    assert_eq!(retired.revoked_at, None);
    assert_eq!(retired.expires_at, Some(at + Duration::hours(1)));
    let stored = |id: ApiKeyId| {
        let (store, ada) = (Arc::clone(&store), ada.id.clone());
        async move {
            store
                .api_keys_for_user(&ada)
                .await
                .unwrap()
                .into_iter()
                .find(|k| k.id == id)
                .unwrap()
        }
    };
    assert_eq!(stored(old.id.clone()).await, retired);
    assert!(retired.is_active(at + Duration::minutes(59)));
    assert!(!retired.is_active(at + Duration::hours(1)));

    // Rotating without grace revokes at once; an earlier expiry is kept.
    let now = KeyRetirement {
        key_id: new.id.clone(),
        at,
    };
    let newer = key_for(&ada.id, &format!("{:064x}", 4), at);
    let KeyIssue::Issued { retired: Some(r) } =
        store.issue_api_key(&newer, 2, Some(&now)).await.unwrap()
    else {
        panic!("rotation refused");
    };
    assert_eq!(r.revoked_at, Some(at));
    assert_eq!(stored(new.id.clone()).await.revoked_at, Some(at));

    // Another user's key, or an unknown one: nothing written, the new key not stored.
    for key_id in [bobs.id.clone(), ApiKeyId::generate()] {
        let attempt = key_for(&ada.id, &format!("{:064x}", 5), at);
        let retire = KeyRetirement { key_id, at };
        assert_eq!(
            store.issue_api_key(&attempt, 10, Some(&retire)).await,
            Ok(KeyIssue::RetiredKeyNotFound)
        );
        assert_eq!(store.api_key_by_hash(&attempt.key_hash).await, Ok(None));
    }
    assert!(
        store
            .api_key_by_hash(&bobs.key_hash)
            .await
            .unwrap()
            .unwrap()
            .is_active(at)
    );
    // Over the limit: refused, the old key untouched.
    let refused = key_for(&ada.id, &format!("{:064x}", 6), at);
    let retire = KeyRetirement {
        key_id: newer.id.clone(),
        at,
    };
    assert_eq!(
        store.issue_api_key(&refused, 1, Some(&retire)).await,
        Ok(KeyIssue::LimitReached),
        "the grace key and the newer one: one active besides the retired one"
    );
    assert!(stored(newer.id.clone()).await.is_active(at));
}

pub async fn users_unique_id_and_email(store: Arc<dyn Store>) {
    let u = user("ada@example.com", Plan::free());
    store.create_user(&u).await.unwrap();

    let same_email = user("ada@example.com", Plan::pro());
    assert_eq!(
        store.create_user(&same_email).await,
        Err(RepoError::Conflict {
            entity: "user",
            field: "email"
        })
    );
    let mut same_id = user("other@example.com", Plan::pro());
    same_id.id = u.id.clone();
    assert_eq!(
        store.create_user(&same_id).await,
        Err(RepoError::Conflict {
            entity: "user",
            field: "id"
        })
    );
    // Nothing of the refused writes was kept.
    assert_eq!(
        store.user_by_email("other@example.com").await.unwrap(),
        None
    );
    assert_eq!(
        store.user_by_id(&u.id).await.unwrap().unwrap().email,
        "ada@example.com"
    );
}

/// A Stripe customer belongs to one user: linking, unlinking, and the refusals.
pub async fn users_stripe_customers_are_unique(store: Arc<dyn Store>) {
    let mut ada = user("ada@example.com", Plan::pro());
    ada.stripe_customer_id = Some("cus_ada".to_owned());
    store.create_user(&ada).await.unwrap();
    let bob = user("bob@example.com", Plan::free());
    store.create_user(&bob).await.unwrap();
    let taken = RepoError::Conflict {
        entity: "user",
        field: "stripe_customer_id",
    };

    let mut carol = user("carol@example.com", Plan::free());
    carol.stripe_customer_id = Some("cus_ada".to_owned());
    assert_eq!(store.create_user(&carol).await, Err(taken.clone()));
    assert_eq!(store.user_by_id(&carol.id).await.unwrap(), None);
    assert_eq!(
        store.set_stripe_customer(&bob.id, Some("cus_ada")).await,
        Err(taken)
    );
    assert_eq!(
        store
            .user_by_id(&bob.id)
            .await
            .unwrap()
            .unwrap()
            .stripe_customer_id,
        None
    );

    let linked = store
        .set_stripe_customer(&bob.id, Some("cus_bob"))
        .await
        .unwrap();
    assert_eq!(linked.stripe_customer_id.as_deref(), Some("cus_bob"));
    assert_eq!(linked.plan, Plan::free());
    // Setting a user's own customer again is no conflict; unlinking frees it.
    store
        .set_stripe_customer(&ada.id, Some("cus_ada"))
        .await
        .unwrap();
    let unlinked = store.set_stripe_customer(&ada.id, None).await.unwrap();
    assert_eq!(unlinked.stripe_customer_id, None);
    store
        .set_stripe_customer(&bob.id, Some("cus_ada"))
        .await
        .unwrap();
    assert_eq!(
        store
            .set_stripe_customer(&UserId::generate(), Some("cus_new"))
            .await,
        Err(RepoError::NotFound { entity: "user" })
    );
}

fn subscription(
    event_id: &str,
    customer: &str,
    plan: Plan,
    created: OffsetDateTime,
) -> SubscriptionChange {
    SubscriptionChange {
        event_id: event_id.to_owned(),
        event_type: "customer.subscription.updated".to_owned(),
        customer: customer.to_owned(),
        plan,
        created,
        subscription: None,
        ends: false,
    }
}

/// The event of a subscription (`data.object.id`) starting (`ends: false`) or ending.
fn subscription_of(
    event_id: &str,
    subscription: &str,
    plan: Plan,
    ends: bool,
    created: OffsetDateTime,
) -> SubscriptionChange {
    SubscriptionChange {
        subscription: Some(subscription.to_owned()),
        ends,
        ..self::subscription(event_id, "cus_ada", plan, created)
    }
}

/// A customer with two subscriptions: the end of the one that did not set the plan changes
/// nothing (a paying customer is never downgraded by an old subscription's deletion); the
/// end of the one that did takes the plan back to free.
pub async fn a_subscription_end_takes_back_only_the_plan_it_set(store: Arc<dyn Store>) {
    let mut ada = user("ada@example.com", Plan::free());
    ada.stripe_customer_id = Some("cus_ada".to_owned());
    store.create_user(&ada).await.unwrap();
    let at = T0 + Duration::minutes(30);
    let apply = async |change: &SubscriptionChange| {
        store.apply_subscription_change(change, at).await.unwrap()
    };
    let stored = async || store.user_by_id(&ada.id).await.unwrap().unwrap();

    let old = subscription_of("evt_1", "sub_OLD", Plan::pro(), false, T0);
    assert!(matches!(apply(&old).await, SubscriptionOutcome::Applied(_)));
    let new_start = T0 + Duration::seconds(10);
    let new = subscription_of("evt_2", "sub_NEW", Plan::enterprise(), false, new_start);
    assert!(matches!(apply(&new).await, SubscriptionOutcome::Applied(_)));
    let now = stored().await;
    assert_eq!(now.plan, Plan::enterprise());
    assert_eq!(now.plan_subscription_id.as_deref(), Some("sub_NEW"));

    // The old subscription is deleted after: nothing changes, and a replay is a duplicate.
    let old_end = subscription_of(
        "evt_3",
        "sub_OLD",
        Plan::free(),
        true,
        T0 + Duration::seconds(20),
    );
    assert_eq!(
        apply(&old_end).await,
        SubscriptionOutcome::OtherSubscription
    );
    assert_eq!(apply(&old_end).await, SubscriptionOutcome::Duplicate);
    assert_eq!(stored().await, now);
    // An event without a subscription id ends nothing either.
    let anonymous_end = SubscriptionChange {
        subscription: None,
        ..subscription_of("evt_4", "", Plan::free(), true, T0 + Duration::seconds(21))
    };
    assert_eq!(
        apply(&anonymous_end).await,
        SubscriptionOutcome::OtherSubscription
    );
    assert_eq!(stored().await.plan, Plan::enterprise());

    // The subscription that set the plan ends: free, and no subscription holds it.
    let new_end = subscription_of(
        "evt_5",
        "sub_NEW",
        Plan::free(),
        true,
        T0 + Duration::seconds(30),
    );
    assert!(matches!(
        apply(&new_end).await,
        SubscriptionOutcome::Applied(_)
    ));
    let after = stored().await;
    assert_eq!(
        (after.plan, after.plan_subscription_id),
        (Plan::free(), None)
    );

    // A plan no subscription is known to have set goes back at any end, as before.
    store
        .set_plan(&ada.id, Plan::pro(), at + Duration::minutes(1))
        .await
        .unwrap();
    let any_end = subscription_of(
        "evt_6",
        "sub_X",
        Plan::free(),
        true,
        T0 + Duration::seconds(40),
    );
    assert!(
        matches!(apply(&any_end).await, SubscriptionOutcome::Applied(u) if u.plan == Plan::free())
    );
}

/// Deleted keys are reported by number, whether deleted one by one or with their user; a
/// poll from the last number sees only later ones.
pub async fn deleted_keys_are_reported_in_order_however_deleted(store: Arc<dyn Store>) {
    let start = store.api_keys_deleted_after(0).await.unwrap();
    assert!(start.keys.is_empty(), "a fresh store has deleted nothing");
    let (ada, ada_key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::pro()).await;
    let bob_second = key_for(&bob, &format!("{:064x}", rand::random::<u128>()), T0);
    store.create_api_key(&bob_second).await.unwrap();

    // Only the owner's key is deleted.
    assert!(!store.delete_api_key(&bob, &ada_key).await.unwrap());
    assert!(store.delete_api_key(&ada, &ada_key).await.unwrap());
    assert!(!store.delete_api_key(&ada, &ada_key).await.unwrap());
    let first = store.api_keys_deleted_after(start.through).await.unwrap();
    assert_eq!(first.keys, vec![ada_key.clone()]);
    assert!(first.through > start.through);
    assert!(store.api_keys_for_user(&ada).await.unwrap().is_empty());

    // A user's deletion takes their keys with it, and reports them.
    assert!(store.delete_user(&bob).await.unwrap());
    assert!(!store.delete_user(&bob).await.unwrap());
    assert_eq!(store.user_by_id(&bob).await.unwrap(), None);
    let second = store.api_keys_deleted_after(first.through).await.unwrap();
    let mut gone = second.keys.clone();
    gone.sort();
    let mut expected = vec![bob_key, bob_second.id];
    expected.sort();
    assert_eq!(gone, expected);
    let none = store.api_keys_deleted_after(second.through).await.unwrap();
    assert_eq!(
        none,
        DeletedKeys {
            keys: vec![],
            through: second.through
        }
    );
    // From the start again: every deletion, in order.
    let all = store.api_keys_deleted_after(start.through).await.unwrap();
    assert_eq!(all.keys.len(), 3);
    assert_eq!(all.keys[0], ada_key);
}

/// Blocking is stored and read back, by the users list too (each sort is its own query);
/// unblocking clears it.
pub async fn users_are_blocked_and_unblocked(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    // One user with calls this period, one without: the list reads both kinds of rows.
    caller(&store, "bob@example.com", Plan::pro()).await;
    store
        .record_usage(&events(&ada, &key, 2, T0), &IncludedCalls::new())
        .await
        .unwrap();
    let blocked = store.set_user_blocked(&ada, Some(T0)).await.unwrap();
    assert_eq!(blocked.blocked_at, Some(T0));
    assert_eq!(store.user_by_id(&ada).await.unwrap().unwrap(), blocked);
    for sort in [UserSort::ApiCalls, UserSort::CreatedAt, UserSort::Email] {
        let query = UserPageQuery {
            period_start: BillingPeriod::containing(T0).start(),
            plan: None,
            search: None,
            sort,
            descending: true,
            offset: 0,
            limit: 10,
        };
        let (_, rows) = store.users_page(&query).await.unwrap();
        let listed: Vec<(&str, Option<OffsetDateTime>)> = rows
            .iter()
            .map(|r| (r.user.email.as_str(), r.user.blocked_at))
            .collect();
        assert!(
            listed.contains(&("ada@example.com", Some(T0))),
            "{sort:?}: {listed:?}"
        );
        assert!(
            listed.contains(&("bob@example.com", None)),
            "{sort:?}: {listed:?}"
        );
    }
    let unblocked = store.set_user_blocked(&ada, None).await.unwrap();
    assert_eq!(unblocked.blocked_at, None);
    assert_eq!(
        store.set_user_blocked(&UserId::generate(), Some(T0)).await,
        Err(RepoError::NotFound { entity: "user" })
    );
}

/// Stripe events: applied once, stale ones ignored, unknown customers leave no trace.
pub async fn subscription_changes_apply_once_and_in_order(store: Arc<dyn Store>) {
    let mut ada = user("ada@example.com", Plan::free());
    ada.stripe_customer_id = Some("cus_ada".to_owned());
    store.create_user(&ada).await.unwrap();
    let at = T0 + Duration::minutes(30);

    let pro = subscription("evt_1", "cus_ada", Plan::pro(), T0);
    let SubscriptionOutcome::Applied(after) =
        store.apply_subscription_change(&pro, at).await.unwrap()
    else {
        panic!("the first event applies");
    };
    assert_eq!(
        (after.id.clone(), after.plan.clone()),
        (ada.id.clone(), Plan::pro())
    );
    assert_eq!(store.user_by_id(&ada.id).await.unwrap().unwrap(), after);
    // The change is seen by the other instances' pollers, as `set_plan`'s.
    assert_eq!(
        store.plans_changed_since(at).await.unwrap(),
        vec![ada.id.clone()]
    );

    // The same event again: nothing, even though the plan was changed by hand since.
    store
        .set_plan(&ada.id, Plan::enterprise(), at + Duration::minutes(1))
        .await
        .unwrap();
    assert_eq!(
        store.apply_subscription_change(&pro, at).await.unwrap(),
        SubscriptionOutcome::Duplicate
    );
    assert_eq!(
        store.user_by_id(&ada.id).await.unwrap().unwrap().plan,
        Plan::enterprise()
    );

    // An event created before the latest applied one arrives late: ignored, remembered.
    let older = subscription("evt_0", "cus_ada", Plan::free(), T0 - Duration::seconds(1));
    assert_eq!(
        store.apply_subscription_change(&older, at).await.unwrap(),
        SubscriptionOutcome::Stale
    );
    assert_eq!(
        store.apply_subscription_change(&older, at).await.unwrap(),
        SubscriptionOutcome::Duplicate
    );
    assert_eq!(
        store.user_by_id(&ada.id).await.unwrap().unwrap().plan,
        Plan::enterprise()
    );
    // The same second as the latest applied: applied (Stripe's times are in seconds).
    let same_second = subscription("evt_2", "cus_ada", Plan::free(), T0);
    assert!(matches!(
        store.apply_subscription_change(&same_second, at).await.unwrap(),
        SubscriptionOutcome::Applied(u) if u.plan == Plan::free()
    ));

    // Unknown customer: nothing recorded, so the event applies once the customer is linked.
    let bob = user("bob@example.com", Plan::free());
    store.create_user(&bob).await.unwrap();
    let early = subscription("evt_3", "cus_bob", Plan::pro(), T0 + Duration::minutes(1));
    assert_eq!(
        store.apply_subscription_change(&early, at).await.unwrap(),
        SubscriptionOutcome::UnknownCustomer
    );
    store
        .set_stripe_customer(&bob.id, Some("cus_bob"))
        .await
        .unwrap();
    assert!(matches!(
        store.apply_subscription_change(&early, at).await.unwrap(),
        SubscriptionOutcome::Applied(u) if u.id == bob.id && u.plan == Plan::pro()
    ));
    // Ada's events do not order Bob's.
    let bob_older = subscription(
        "evt_4",
        "cus_bob",
        Plan::enterprise(),
        T0 + Duration::seconds(30),
    );
    assert_eq!(
        store
            .apply_subscription_change(&bob_older, at)
            .await
            .unwrap(),
        SubscriptionOutcome::Stale
    );
    let ada_later = subscription("evt_5", "cus_ada", Plan::pro(), T0 + Duration::seconds(30));
    assert!(matches!(
        store
            .apply_subscription_change(&ada_later, at)
            .await
            .unwrap(),
        SubscriptionOutcome::Applied(_)
    ));
}

/// The same event delivered many times at once takes effect exactly once.
pub async fn subscription_change_deliveries_at_once_apply_once(store: Arc<dyn Store>) {
    let mut ada = user("ada@example.com", Plan::free());
    ada.stripe_customer_id = Some("cus_ada".to_owned());
    store.create_user(&ada).await.unwrap();
    let change = subscription("evt_once", "cus_ada", Plan::pro(), T0);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, change) = (store.clone(), change.clone());
            tokio::spawn(async move { store.apply_subscription_change(&change, T0).await })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            SubscriptionOutcome::Applied(_) => applied += 1,
            SubscriptionOutcome::Duplicate => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(
        store.user_by_id(&ada.id).await.unwrap().unwrap().plan,
        Plan::pro()
    );
}

/// Keyset pages, newest first, visit every event of the range once (ties on the time are
/// ordered by event id), and only the user's.
pub async fn usage_events_are_paged_newest_first(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::pro()).await;
    let mut mine = Vec::new();
    for i in 0..23 {
        // Groups of three calls in the same microsecond.
        let at = T0 + Duration::milliseconds(i / 3);
        let mut e = event(&ada, &key, at);
        e.event_id = uuid::Uuid::from_u128(rand::random::<u128>());
        mine.push(e);
    }
    let mut theirs = events(&bob, &bob_key, 5, T0);
    theirs.extend(mine.iter().cloned());
    store
        .record_usage(&theirs, &IncludedCalls::new())
        .await
        .unwrap();
    mine.sort_by_key(|e| std::cmp::Reverse((e.created_at, e.event_id)));

    let (from, to) = (T0, T0 + Duration::seconds(1));
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .usage_events_page(&ada, from, to, after, 4)
            .await
            .unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.event_id));
        seen.extend(page);
    }
    assert_eq!(seen, mine, "every event once, newest first");
    // The range bounds: from inclusive, to exclusive.
    let first_ms = store
        .usage_events_page(&ada, T0, T0 + Duration::milliseconds(1), None, 100)
        .await
        .unwrap();
    assert_eq!(first_ms.len(), 3);
    assert!(
        store
            .usage_events_page(&ada, T0 - Duration::days(1), T0, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Retention removes the events before a time (a dry run only counts them); what is left
/// is untouched, and period counters are not events.
pub async fn usage_is_pruned_before_a_time(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    // Far from now: in the default partition on PostgreSQL, pruned row by row there.
    let old = datetime!(2025-01-15 12:00 UTC);
    let newer = datetime!(2025-03-10 12:00 UTC);
    let mut batch = events(&ada, &key, 7, old);
    batch.extend(events(&ada, &key, 4, newer));
    store
        .record_usage(&batch, &IncludedCalls::new())
        .await
        .unwrap();
    let cutoff = datetime!(2025-02-01 00:00 UTC);
    store
        .aggregate_usage_day(old.date(), datetime!(2025-06-01 00:00 UTC))
        .await
        .unwrap();
    assert_eq!(store.usage_pruned_before().await.unwrap(), None);
    let dry = store.prune_usage(cutoff, true).await.unwrap();
    assert_eq!((dry.rows, dry.before), (7, cutoff));
    assert_eq!(
        store.usage_pruned_before().await.unwrap(),
        None,
        "a dry run records nothing"
    );
    let year = (
        datetime!(2025-01-01 00:00 UTC),
        datetime!(2026-01-01 00:00 UTC),
    );
    assert_eq!(
        store
            .count_usage_events(&ada, year.0, year.1)
            .await
            .unwrap(),
        11
    );
    let pruned = store.prune_usage(cutoff, false).await.unwrap();
    assert_eq!(pruned.rows, 7);
    assert_eq!(
        store
            .count_usage_events(&ada, year.0, year.1)
            .await
            .unwrap(),
        4
    );
    assert_eq!(store.prune_usage(cutoff, false).await.unwrap().rows, 0);
    let jan = BillingPeriod::containing(old).start();
    assert_eq!(
        store
            .usage_record(&ada, jan)
            .await
            .unwrap()
            .unwrap()
            .api_calls,
        7,
        "the period's counter stays"
    );
    let left = store
        .usage_events_page(&ada, year.0, year.1, None, 100)
        .await
        .unwrap();
    assert!(left.iter().all(|e| e.created_at >= cutoff) && left.len() == 4);
    assert_eq!(store.usage_pruned_before().await.unwrap(), Some(cutoff));

    // Two calls of the pruned day arrive late (a replay): aggregating the day again adds
    // them to its row and removes them, instead of rebuilding it from what is left. Bob's
    // late calls are overage not invoiced yet: they stay raw.
    store
        .record_usage(
            &events(&ada, &key, 2, old + Duration::hours(1)),
            &IncludedCalls::new(),
        )
        .await
        .unwrap();
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::pro()).await;
    let mut no_calls_included = IncludedCalls::new();
    no_calls_included.insert(bob.clone(), 0);
    store
        .record_usage(
            &events(&bob, &bob_key, 3, old + Duration::hours(2)),
            &no_calls_included,
        )
        .await
        .unwrap();
    store
        .aggregate_usage_day(old.date(), datetime!(2025-06-02 00:00 UTC))
        .await
        .unwrap();
    let day = store
        .daily_usage(&ada, old.date(), old.date())
        .await
        .unwrap();
    assert_eq!((day.len(), day[0].api_calls), (1, 9), "{day:?}");
    assert_eq!(day[0].total_response_time_ms, 27);
    assert!(!day[0].top_endpoints.is_empty(), "the top endpoints stay");
    let day_range = (
        old.date().midnight().assume_utc(),
        old.date().midnight().assume_utc() + Duration::days(1),
    );
    assert_eq!(
        store
            .count_usage_events(&bob, day_range.0, day_range.1)
            .await
            .unwrap(),
        3
    );
    assert!(
        store
            .daily_usage(&bob, old.date(), old.date())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .count_usage_events(&ada, day_range.0, day_range.1)
            .await
            .unwrap(),
        0
    );
    assert!(
        store
            .aggregated_days(old.date(), old.date())
            .await
            .unwrap()
            .contains(&old.date()),
        "the day is current again"
    );
    // Again: nothing more to add.
    store
        .aggregate_usage_day(old.date(), datetime!(2025-06-03 00:00 UTC))
        .await
        .unwrap();
    assert_eq!(
        store
            .daily_usage(&ada, old.date(), old.date())
            .await
            .unwrap()[0]
            .api_calls,
        9
    );
}

pub async fn api_keys_crud(store: Arc<dyn Store>) {
    let ada = user("ada@example.com", Plan::pro());
    let bob = user("bob@example.com", Plan::free());
    store.create_user(&ada).await.unwrap();
    store.create_user(&bob).await.unwrap();

    let older = key_for(&ada.id, &"a".repeat(64), T0);
    let mut newer = key_for(&ada.id, &"b".repeat(64), T0 + Duration::hours(1));
    newer.expires_at = Some(T0 + Duration::days(30));
    let bobs = key_for(&bob.id, &"c".repeat(64), T0);
    for k in [&older, &newer, &bobs] {
        store.create_api_key(k).await.unwrap();
    }

    assert_eq!(
        store.api_key_by_hash(&"b".repeat(64)).await.unwrap(),
        Some(newer.clone())
    );
    assert_eq!(store.api_key_by_hash(&"d".repeat(64)).await.unwrap(), None);
    let listed = store.api_keys_for_user(&ada.id).await.unwrap();
    assert_eq!(
        listed,
        vec![newer.clone(), older.clone()],
        "newest first, only ada's"
    );

    // Bob cannot revoke Ada's key; Ada can, once (a second revoke keeps the first time).
    let at = T0 + Duration::hours(2);
    assert_eq!(
        store.revoke_api_key(&bob.id, &older.id, at).await.unwrap(),
        None
    );
    let revoked = store
        .revoke_api_key(&ada.id, &older.id, at)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(at));
    assert!(!revoked.is_active(at));
    let again = store
        .revoke_api_key(&ada.id, &older.id, at + Duration::hours(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.revoked_at, Some(at));
    assert_eq!(
        store
            .revoke_api_key(&ada.id, &ApiKeyId::generate(), at)
            .await
            .unwrap(),
        None
    );
    // Revocations can be found by time, for the instances' caches, and so can expiries
    // once they have passed (not before: the key still works).
    assert_eq!(
        store.api_keys_retired_since(at, at).await.unwrap(),
        vec![older.id.clone()]
    );
    let later = at + Duration::microseconds(1);
    assert_eq!(
        store.api_keys_retired_since(later, later).await.unwrap(),
        vec![]
    );
    let expiry = T0 + Duration::days(30);
    let mut retired = store.api_keys_retired_since(at, expiry).await.unwrap();
    retired.sort();
    let mut expected = vec![older.id.clone(), newer.id.clone()];
    expected.sort();
    assert_eq!(retired, expected, "revoked since, and expired by now");
    assert_eq!(
        store
            .api_keys_retired_since(later, expiry - Duration::microseconds(1))
            .await
            .unwrap(),
        vec![],
        "not expired yet"
    );
    let after = expiry + Duration::microseconds(1);
    assert_eq!(
        store
            .api_keys_retired_since(after, after + Duration::days(1))
            .await
            .unwrap(),
        vec![],
        "expired before the window"
    );

    // last_used_at only moves forward.
    let later = T0 + Duration::hours(3);
    store
        .touch_api_keys(&[(newer.id.clone(), later)])
        .await
        .unwrap();
    store
        .touch_api_keys(&[(newer.id.clone(), T0)])
        .await
        .unwrap();
    let touched = store
        .api_key_by_hash(&"b".repeat(64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(touched.last_used_at, Some(later));
    assert!(touched.is_active(later));
    assert!(!touched.is_active(T0 + Duration::days(30)));
}

pub async fn api_keys_unique_hash_and_known_user(store: Arc<dyn Store>) {
    let ada = user("ada@example.com", Plan::pro());
    store.create_user(&ada).await.unwrap();
    let k = key_for(&ada.id, &"a".repeat(64), T0);
    store.create_api_key(&k).await.unwrap();

    let same_hash = key_for(&ada.id, &"a".repeat(64), T0);
    assert_eq!(
        store.create_api_key(&same_hash).await,
        Err(RepoError::Conflict {
            entity: "API key",
            field: "key_hash"
        })
    );
    let orphan = key_for(&UserId::generate(), &"e".repeat(64), T0);
    assert_eq!(
        store.create_api_key(&orphan).await,
        Err(RepoError::NotFound { entity: "user" })
    );
    assert_eq!(store.api_keys_for_user(&ada.id).await.unwrap().len(), 1);
}

pub async fn usage_batch_counts_inserted_rows(store: Arc<dyn Store>) {
    let (ada, ada_key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::enterprise()).await;
    let mut batch = events(&ada, &ada_key, 7, T0);
    batch.extend(events(&bob, &bob_key, 3, T0));
    let included: IncludedCalls = HashMap::from([(ada.clone(), 5)]);

    let outcome = store.record_usage(&batch, &included).await.unwrap();
    assert_eq!(
        outcome,
        RecordOutcome {
            inserted: 10,
            duplicates: 0
        }
    );

    let period = BillingPeriod::containing(T0);
    let ada_rec = store
        .usage_record(&ada, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ada_rec.api_calls, ada_rec.overage_calls), (7, 2));
    assert_eq!(ada_rec.overage_invoiced_calls, 0);
    assert_eq!(ada_rec.period_end, period.end());
    let bob_rec = store
        .usage_record(&bob, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((bob_rec.api_calls, bob_rec.overage_calls), (3, 0));
    assert_eq!(
        store
            .count_usage_events(&ada, period.start(), period.end())
            .await
            .unwrap(),
        7
    );

    // A second batch adds to the same counter and recomputes overage.
    store
        .record_usage(
            &events(&ada, &ada_key, 4, T0 + Duration::minutes(1)),
            &included,
        )
        .await
        .unwrap();
    let ada_rec = store
        .usage_record(&ada, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ada_rec.api_calls, ada_rec.overage_calls), (11, 6));

    // An empty batch is a no-op.
    let empty = store.record_usage(&[], &included).await.unwrap();
    assert_eq!(empty, RecordOutcome::default());
}

pub async fn usage_batch_of_many_users_counts_each(store: Arc<dyn Store>) {
    // 120 users in one batch, i calls each (1..=120), included calls varying (some
    // unlimited), a few across the month end: every counter exact.
    let mut users = Vec::new();
    for i in 0..120usize {
        users.push(caller(&store, &format!("u{i}@example.com"), Plan::pro()).await);
    }
    let month_end = BillingPeriod::containing(T0).end();
    let mut batch = Vec::new();
    let mut included = IncludedCalls::new();
    for (i, (user, key)) in users.iter().enumerate() {
        let at = if i % 40 == 0 {
            month_end - Duration::milliseconds(1)
        } else {
            T0
        };
        batch.extend(events(user, key, i + 1, at));
        if i % 3 != 0 {
            included.insert(user.clone(), (i as u64) / 2);
        }
    }
    // Shuffled: the store sorts what it must.
    batch.reverse();
    let outcome = store.record_usage(&batch, &included).await.unwrap();
    assert_eq!(outcome.inserted, (1..=120).sum::<u64>());
    let period = BillingPeriod::containing(T0);
    let next = BillingPeriod::containing(month_end);
    for (i, (user, _)) in users.iter().enumerate() {
        let calls = i as u64 + 1;
        // Calls 1 ms before the month end are still in this period; events(...) spreads a
        // user's calls a millisecond apart, so the others fall in the next.
        let (this, later) = if i % 40 == 0 {
            (1, calls - 1)
        } else {
            (calls, 0)
        };
        let rec = store
            .usage_record(user, period.start())
            .await
            .unwrap()
            .unwrap();
        let expected_overage = included
            .get(user)
            .map_or(0, |inc| this.saturating_sub(*inc));
        assert_eq!(
            (rec.api_calls, rec.overage_calls),
            (this, expected_overage),
            "user {i}"
        );
        if later > 0 {
            let rec = store
                .usage_record(user, next.start())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(rec.api_calls, later, "user {i}, next month");
        }
    }
    // The next batch recomputes overage with the included calls it carries: a plan change.
    let (user, key) = &users[3];
    let changed: IncludedCalls = HashMap::from([(user.clone(), 1)]);
    store
        .record_usage(&events(user, key, 2, T0 + Duration::minutes(1)), &changed)
        .await
        .unwrap();
    let rec = store
        .usage_record(user, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.api_calls, rec.overage_calls), (6, 5));
    // And without included calls (unlimited now): no overage.
    store
        .record_usage(
            &events(user, key, 1, T0 + Duration::minutes(2)),
            &IncludedCalls::new(),
        )
        .await
        .unwrap();
    let rec = store
        .usage_record(user, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.api_calls, rec.overage_calls), (7, 0));

    // Many keys' last use in one call, never moved back.
    let used: Vec<(ApiKeyId, OffsetDateTime)> = users
        .iter()
        .enumerate()
        .map(|(i, (_, key))| (key.clone(), T0 + Duration::seconds(i as i64)))
        .collect();
    store.touch_api_keys(&used).await.unwrap();
    let earlier: Vec<(ApiKeyId, OffsetDateTime)> = used
        .iter()
        .map(|(k, _)| (k.clone(), T0 - Duration::hours(1)))
        .collect();
    store.touch_api_keys(&earlier).await.unwrap();
    for (i, (user, key)) in users.iter().enumerate().step_by(17) {
        let keys = store.api_keys_for_user(user).await.unwrap();
        let k = keys.iter().find(|k| &k.id == key).unwrap();
        assert_eq!(k.last_used_at, Some(T0 + Duration::seconds(i as i64)));
    }
}

pub async fn usage_replayed_batch_counts_once(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let included = IncludedCalls::new();
    let batch = events(&ada, &key, 20, T0);

    store.record_usage(&batch, &included).await.unwrap();
    let replay = store.record_usage(&batch, &included).await.unwrap();
    assert_eq!(
        replay,
        RecordOutcome {
            inserted: 0,
            duplicates: 20
        }
    );

    // A retry that overlaps half the first batch counts only the new half.
    let mut overlapping = batch[10..].to_vec();
    overlapping.extend(events(&ada, &key, 10, T0 + Duration::seconds(5)));
    let partial = store.record_usage(&overlapping, &included).await.unwrap();
    assert_eq!(
        partial,
        RecordOutcome {
            inserted: 10,
            duplicates: 10
        }
    );

    let period = BillingPeriod::containing(T0);
    let rec = store
        .usage_record(&ada, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.api_calls, 30);
    assert_eq!(
        store
            .count_usage_events(&ada, period.start(), period.end())
            .await
            .unwrap(),
        30
    );
}

pub async fn usage_concurrent_batches_sum_exactly(store: Arc<dyn Store>) {
    const TASKS: usize = 16;
    const BATCHES: usize = 5;
    const PER_BATCH: usize = 20;
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;

    let mut handles = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        let (ada, key) = (ada.clone(), key.clone());
        handles.push(tokio::spawn(async move {
            let mut stored = 0;
            for b in 0..BATCHES {
                let start = T0 + Duration::seconds((t * BATCHES + b) as i64);
                let batch = events(&ada, &key, PER_BATCH, start);
                // Every batch is also replayed by the same task: it must count once.
                stored += store
                    .record_usage(&batch, &IncludedCalls::new())
                    .await
                    .unwrap()
                    .inserted;
                stored += store
                    .record_usage(&batch, &IncludedCalls::new())
                    .await
                    .unwrap()
                    .inserted;
            }
            stored
        }));
    }
    let mut inserted = 0;
    for h in handles {
        inserted += h.await.unwrap();
    }
    let expected = (TASKS * BATCHES * PER_BATCH) as u64;
    assert_eq!(inserted, expected);
    let period = BillingPeriod::containing(T0);
    let rec = store
        .usage_record(&ada, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.api_calls, expected);
    assert_eq!(
        store
            .count_usage_events(&ada, period.start(), period.end())
            .await
            .unwrap(),
        expected
    );
}

pub async fn usage_period_boundaries(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::free()).await;
    let last = datetime!(2026-11-30 23:59:59.999 UTC);
    let first = datetime!(2026-12-01 00:00 UTC);
    let batch = vec![event(&ada, &key, last), event(&ada, &key, first)];
    store
        .record_usage(&batch, &IncludedCalls::new())
        .await
        .unwrap();

    let nov = BillingPeriod::containing(last);
    let dec = BillingPeriod::containing(first);
    let nov_rec = store
        .usage_record(&ada, nov.start())
        .await
        .unwrap()
        .unwrap();
    let dec_rec = store
        .usage_record(&ada, dec.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((nov_rec.api_calls, dec_rec.api_calls), (1, 1));
    assert_eq!(nov_rec.period_end, dec.start());
    assert_eq!(
        store
            .count_usage_events(&ada, nov.start(), nov.end())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .count_usage_events(&ada, dec.start(), dec.end())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.count_usage_events(&ada, last, first).await.unwrap(),
        1
    );
}

pub async fn usage_batch_with_unknown_user_changes_nothing(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let mut batch = events(&ada, &key, 3, T0);
    batch.push(event(&UserId::generate(), &key, T0));
    let result = store.record_usage(&batch, &IncludedCalls::new()).await;
    assert!(
        matches!(result, Err(RepoError::NotFound { .. })),
        "{result:?}"
    );
    let mut unknown_key = events(&ada, &key, 2, T0);
    unknown_key.push(event(&ada, &ApiKeyId::generate(), T0));
    let result = store
        .record_usage(&unknown_key, &IncludedCalls::new())
        .await;
    assert_eq!(result, Err(RepoError::NotFound { entity: "API key" }));

    let period = BillingPeriod::containing(T0);
    assert_eq!(
        store.usage_record(&ada, period.start()).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .count_usage_events(&ada, period.start(), period.end())
            .await
            .unwrap(),
        0
    );
    // The valid part can be retried on its own and counts once.
    let outcome = store
        .record_usage(&batch[..3], &IncludedCalls::new())
        .await
        .unwrap();
    assert_eq!(outcome.inserted, 3);
}

pub async fn daily_aggregation_is_idempotent(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::pro()).await;
    let day = date!(2026 - 11 - 20);
    let at = day.midnight().assume_utc();
    let mut batch = Vec::new();
    for (i, (endpoint, method, status, ms)) in [
        ("/api/v1/ping", "GET", 200, 10),
        ("/api/v1/ping", "GET", 200, 20),
        ("/api/v1/ping", "GET", 500, 30),
        ("/api/v1/items/{id}", "GET", 404, 5),
        ("/api/v1/items", "POST", 201, 15),
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = event(&ada, &key, at + Duration::hours(i as i64));
        e.endpoint = endpoint.to_owned();
        e.method = method.to_owned();
        e.status_code = status;
        e.response_time_ms = ms;
        batch.push(e);
    }
    // Calls on the days around must not count: the last microsecond before, the first after.
    batch.push(event(&ada, &key, at - Duration::microseconds(1)));
    batch.push(event(&ada, &key, at + Duration::days(1)));
    batch.push(event(&bob, &bob_key, at + Duration::hours(23)));
    store
        .record_usage(&batch, &IncludedCalls::new())
        .await
        .unwrap();

    let now = at + Duration::days(1) + Duration::minutes(5);
    assert_eq!(store.aggregate_usage_day(day, now).await.unwrap(), 2);
    let first = store.daily_usage(&ada, day, day).await.unwrap();
    assert_eq!(store.aggregate_usage_day(day, now).await.unwrap(), 2);
    let second = store.daily_usage(&ada, day, day).await.unwrap();
    assert_eq!(first, second);

    assert_eq!(first.len(), 1);
    let row = &first[0];
    assert_eq!((row.api_calls, row.error_calls), (5, 2));
    assert_eq!(row.total_response_time_ms, 80);
    assert!((row.avg_response_time_ms - 16.0).abs() < 1e-9);
    let top: Vec<(&str, &str, u64)> = row
        .top_endpoints
        .iter()
        .map(
            |EndpointCount {
                 endpoint,
                 method,
                 calls,
             }| (endpoint.as_str(), method.as_str(), *calls),
        )
        .collect();
    assert_eq!(
        top,
        vec![
            ("/api/v1/ping", "GET", 3),
            ("/api/v1/items", "POST", 1),
            ("/api/v1/items/{id}", "GET", 1),
        ]
    );
    // Days around were not aggregated; a range read returns only rows that exist.
    let around = store
        .daily_usage(&ada, date!(2026 - 11 - 01), date!(2026 - 11 - 30))
        .await
        .unwrap();
    assert_eq!(around, first);
    assert_eq!(
        store.daily_usage(&bob, day, day).await.unwrap()[0].api_calls,
        1
    );
    // The same day straight from the raw events, per endpoint.
    let stats = store
        .endpoint_stats(&ada, at, at + Duration::days(1))
        .await
        .unwrap();
    let stats: Vec<(&str, &str, u64, u64, u64)> = stats
        .iter()
        .map(|s| {
            (
                s.endpoint.as_str(),
                s.method.as_str(),
                s.calls,
                s.error_calls,
                s.total_response_time_ms,
            )
        })
        .collect();
    assert_eq!(
        stats,
        vec![
            ("/api/v1/ping", "GET", 3, 1, 60),
            ("/api/v1/items", "POST", 1, 0, 15),
            ("/api/v1/items/{id}", "GET", 1, 1, 5),
        ]
    );
}

pub async fn dead_letters_are_kept_listed_and_replayed(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::free()).await;
    let letter = |user: &UserId, key: &ApiKeyId, at: OffsetDateTime| DeadLetter {
        event: event(user, key, at),
        included_calls: Some(1),
        reason: "user not found".to_owned(),
        failed_at: T0 + Duration::hours(1),
    };
    // Ada's call (refused once, fine now), a stranger's (refused for good), Ada's again
    // (a second call, past her included one).
    let mut good = letter(&ada, &key, T0);
    good.event.units.add("tokens", 1_234);
    let stranger = letter(
        &UserId::generate(),
        &ApiKeyId::generate(),
        T0 + Duration::seconds(1),
    );
    let second = letter(&ada, &key, T0 + Duration::seconds(2));
    store
        .record_dead_letters(&[good.clone(), stranger.clone()])
        .await
        .unwrap();
    store
        .record_dead_letters(&[good.clone(), second.clone()])
        .await
        .unwrap();
    let all = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(
        all,
        vec![good.clone(), stranger.clone(), second.clone()],
        "once each, by id"
    );
    let page = store
        .dead_letters(Some(good.event.event_id), 1)
        .await
        .unwrap();
    assert_eq!(page, vec![stranger.clone()]);
    let (count, shown) = usage_core::dead_letter::list(store.as_ref(), 2)
        .await
        .unwrap();
    assert_eq!((count, shown.len()), (3, 2));

    let report = usage_core::dead_letter::replay(store.as_ref())
        .await
        .unwrap();
    assert_eq!(
        (report.stored, report.already_stored, report.still_refused),
        (2, 0, 1)
    );
    assert_eq!(
        store.dead_letters(None, 10).await.unwrap(),
        vec![stranger.clone()]
    );
    let record = store
        .usage_record(&ada, BillingPeriod::containing(T0).start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((record.api_calls, record.overage_calls), (2, 1));
    // Again: nothing more stored; a letter replayed elsewhere meanwhile counts once.
    store
        .record_dead_letters(std::slice::from_ref(&good))
        .await
        .unwrap();
    let again = usage_core::dead_letter::replay(store.as_ref())
        .await
        .unwrap();
    assert_eq!(
        (again.stored, again.already_stored, again.still_refused),
        (0, 1, 1)
    );
    assert_eq!(
        store
            .remove_dead_letters(&[stranger.event.event_id, good.event.event_id])
            .await
            .unwrap(),
        1
    );
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
}

/// The late-write margin (`LATE_WRITE_MARGIN`, 5 minutes) is read on the store's clock:
/// a call stored while the clock is within the margin of its day's end marks the day, as
/// after the end; one stored before the margin does not.
pub async fn late_writes_are_marked_by_the_store_clock(
    store: Arc<dyn Store>,
    clock: Arc<usage_core::ManualClock>,
) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let included = IncludedCalls::new();
    let day = T0.date();
    let midnight = (day + Duration::days(1)).midnight().assume_utc();
    let aggregate = async || {
        clock.set(midnight + Duration::minutes(10));
        store.aggregate_usage_day(day, clock.now()).await.unwrap();
        assert_eq!(store.aggregated_days(day, day).await.unwrap(), vec![day]);
    };
    aggregate().await;
    // 4 min 59 s before midnight: within the margin, so the day is marked.
    clock.set(midnight - Duration::seconds(299));
    let within = events(&ada, &key, 1, clock.now());
    store.record_usage(&within, &included).await.unwrap();
    assert!(store.aggregated_days(day, day).await.unwrap().is_empty());
    aggregate().await;
    // 5 min 1 s before: outside the margin, the day's aggregate is taken as current.
    clock.set(midnight - Duration::seconds(301));
    let before = events(&ada, &key, 1, clock.now());
    store.record_usage(&before, &included).await.unwrap();
    assert_eq!(store.aggregated_days(day, day).await.unwrap(), vec![day]);
    // After the day's end, any call of the day marks it.
    clock.set(midnight + Duration::days(40));
    let late = events(&ada, &key, 1, T0);
    store.record_usage(&late, &included).await.unwrap();
    assert!(store.aggregated_days(day, day).await.unwrap().is_empty());
}

pub async fn daily_aggregates_are_current_until_a_late_write(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let day = T0.date();
    let included = IncludedCalls::new();
    assert_eq!(store.first_usage_day().await.unwrap(), None);
    let mut first = events(&ada, &key, 3, T0);
    first[0].status_code = 500;
    store.record_usage(&first, &included).await.unwrap();
    assert_eq!(store.first_usage_day().await.unwrap(), Some(day));
    assert!(
        store.aggregated_days(day, day).await.unwrap().is_empty(),
        "never aggregated"
    );
    let raw = store.daily_usage_from_events(&ada, day, day).await.unwrap();
    assert_eq!(raw.len(), 1);
    assert_eq!(
        (
            raw[0].date,
            raw[0].api_calls,
            raw[0].error_calls,
            raw[0].total_response_time_ms
        ),
        (day, 3, 1, 9)
    );

    store
        .aggregate_usage_day(day, T0 + Duration::days(1))
        .await
        .unwrap();
    assert_eq!(store.aggregated_days(day, day).await.unwrap(), vec![day]);
    // A call of that day stored after its aggregation: no longer current.
    let late = events(&ada, &key, 1, T0 + Duration::hours(3));
    store.record_usage(&late, &included).await.unwrap();
    assert!(store.aggregated_days(day, day).await.unwrap().is_empty());
    // A replay of the same call stores nothing and changes nothing more.
    store
        .aggregate_usage_day(day, T0 + Duration::days(2))
        .await
        .unwrap();
    store.record_usage(&late, &included).await.unwrap();
    assert_eq!(store.aggregated_days(day, day).await.unwrap(), vec![day]);
    let rows = store.daily_usage(&ada, day, day).await.unwrap();
    assert_eq!(rows[0].api_calls, 4);
    assert_eq!(
        store.daily_usage_from_events(&ada, day, day).await.unwrap()[0].api_calls,
        4
    );
    // Other days and other users are not in the way.
    let next = day + Duration::days(1);
    assert!(store.aggregated_days(next, next).await.unwrap().is_empty());
    assert!(
        store
            .daily_usage_from_events(&UserId::generate(), day, next)
            .await
            .unwrap()
            .is_empty()
    );
    // A day not yet over (by the store's clock) is rebuilt but never taken as current.
    let today = OffsetDateTime::now_utc().date();
    store
        .aggregate_usage_day(today, OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert!(
        store
            .aggregated_days(today, today)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn overage_charge_ledger(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let included: IncludedCalls = HashMap::from([(ada.clone(), 10)]);
    store
        .record_usage(&events(&ada, &key, 25, T0), &included)
        .await
        .unwrap();
    let period = BillingPeriod::containing(T0);

    let new = NewOverageCharge {
        user_id: ada.clone(),
        period_start: period.start(),
        meter: API_CALLS.to_owned(),
        calls_from: 0,
        calls_to: 15,
        amount_cents: 2,
        idempotency_key: format!("overage:{ada}:2026-11:0-15"),
        created_at: T0,
    };
    let charge = store.create_overage_charge(&new).await.unwrap();
    assert_eq!(charge.status, ChargeStatus::Pending);
    assert_eq!(
        (charge.calls_from, charge.calls_to, charge.attempts),
        (0, 15, 0)
    );
    // The same key for another range (the same range would also be an open-range
    // conflict, and backends differ in which of the two they report).
    assert_eq!(
        store
            .create_overage_charge(&NewOverageCharge {
                calls_from: 7,
                ..new.clone()
            })
            .await,
        Err(RepoError::Conflict {
            entity: "overage charge",
            field: "idempotency_key"
        })
    );
    assert!(matches!(
        store.create_overage_charge(&new).await,
        Err(RepoError::Conflict { .. })
    ));
    let orphan = NewOverageCharge {
        user_id: UserId::generate(),
        idempotency_key: "orphan".to_owned(),
        ..new.clone()
    };
    assert_eq!(
        store.create_overage_charge(&orphan).await,
        Err(RepoError::NotFound { entity: "user" })
    );

    let failed = store
        .fail_overage_charge(charge.id, "card_declined", T0 + Duration::minutes(1))
        .await
        .unwrap();
    assert_eq!(failed.status, ChargeStatus::Failed);
    assert_eq!(
        (failed.attempts, failed.last_error.as_deref()),
        (1, Some("card_declined"))
    );

    let done_at = T0 + Duration::minutes(2);
    let done = store
        .complete_overage_charge(charge.id, Some("ii_123"), done_at)
        .await
        .unwrap();
    assert_eq!(done.status, ChargeStatus::Succeeded);
    assert_eq!(done.stripe_invoice_item_id.as_deref(), Some("ii_123"));
    assert_eq!(done.attempts, 2);
    assert_eq!(done.updated_at, done_at);
    let rec = store
        .usage_record(&ada, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.overage_calls, rec.overage_invoiced_calls), (15, 15));

    // Completing again is harmless; an older charge never lowers the invoiced count.
    let earlier = NewOverageCharge {
        calls_from: 1,
        calls_to: 5,
        idempotency_key: "earlier".to_owned(),
        ..new.clone()
    };
    let earlier = store.create_overage_charge(&earlier).await.unwrap();
    store
        .complete_overage_charge(earlier.id, Some("ii_100"), done_at)
        .await
        .unwrap();
    store
        .complete_overage_charge(charge.id, Some("ii_123"), done_at)
        .await
        .unwrap();
    let rec = store
        .usage_record(&ada, period.start())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.overage_invoiced_calls, 15);

    assert_eq!(
        store
            .overage_charge_by_key(&new.idempotency_key)
            .await
            .unwrap()
            .map(|c| c.id),
        Some(charge.id)
    );
    let all = store.overage_charges_for_user(&ada).await.unwrap();
    assert_eq!(
        all.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![charge.id, earlier.id]
    );
    assert_eq!(
        store
            .complete_overage_charge(i64::MAX, Some("ii_x"), done_at)
            .await,
        Err(RepoError::NotFound {
            entity: "overage charge"
        })
    );
}

pub async fn overage_billing_queries(store: Arc<dyn Store>) {
    let (ada, ada_key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::pro()).await;
    let (_cy, _) = caller(&store, "cy@example.com", Plan::free()).await;
    assert_eq!(
        store.count_users_by_plan().await.unwrap(),
        vec![(Plan::free(), 1), (Plan::pro(), 2)]
    );
    let included: IncludedCalls = HashMap::from([(ada.clone(), 10), (bob.clone(), 10)]);
    let october = datetime!(2026-10-31 23:00 UTC);
    let mut batch = events(&ada, &ada_key, 12, october);
    batch.extend(events(&ada, &ada_key, 15, T0));
    batch.extend(events(&bob, &bob_key, 4, T0));
    store.record_usage(&batch, &included).await.unwrap();
    let nov = BillingPeriod::containing(T0);
    let oct = BillingPeriod::containing(october);

    let uninvoiced = store.uninvoiced_overage().await.unwrap();
    assert_eq!(
        uninvoiced,
        vec![
            UninvoicedOverage {
                user_id: ada.clone(),
                meter: API_CALLS.to_owned(),
                plan: Plan::pro(),
                stripe_customer_id: None,
                period_start: oct.start(),
                period_end: oct.end(),
                overage_calls: 2,
                overage_invoiced_calls: 0,
            },
            UninvoicedOverage {
                user_id: ada.clone(),
                meter: API_CALLS.to_owned(),
                plan: Plan::pro(),
                stripe_customer_id: None,
                period_start: nov.start(),
                period_end: nov.end(),
                overage_calls: 5,
                overage_invoiced_calls: 0,
            },
        ]
    );

    // Two runs can never both hold a charge starting at the same point.
    let charge = |from: u64, to: u64, key: &str| NewOverageCharge {
        user_id: ada.clone(),
        period_start: nov.start(),
        meter: API_CALLS.to_owned(),
        calls_from: from,
        calls_to: to,
        amount_cents: 1,
        idempotency_key: key.to_owned(),
        created_at: T0,
    };
    let first = store
        .create_overage_charge(&charge(0, 3, "k-0-3"))
        .await
        .unwrap();
    let open_range = Err(RepoError::Conflict {
        entity: "overage charge",
        field: "calls_from",
    });
    assert_eq!(
        store.create_overage_charge(&charge(0, 5, "k-0-5")).await,
        open_range
    );
    // An attempt with an unknown outcome keeps the charge pending.
    let noted = store
        .note_overage_charge_attempt(first.id, "timed out", T0)
        .await
        .unwrap();
    assert_eq!(
        (noted.status, noted.attempts, noted.last_error.as_deref()),
        (ChargeStatus::Pending, 1, Some("timed out"))
    );
    // Of two runs resuming it, one gets it.
    let later = T0 + Duration::minutes(10);
    let claimed = store
        .claim_overage_charge(first.id, noted.updated_at, later)
        .await
        .unwrap()
        .expect("the first claim wins");
    assert_eq!(claimed.updated_at, later);
    assert_eq!(
        store
            .claim_overage_charge(first.id, noted.updated_at, later)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.create_overage_charge(&charge(0, 5, "k-0-5")).await,
        open_range
    );
    // A refused charge frees its starting point.
    store
        .fail_overage_charge(first.id, "card_declined", T0)
        .await
        .unwrap();
    let retry = store
        .create_overage_charge(&charge(0, 5, "k-0-5"))
        .await
        .unwrap();
    store
        .complete_overage_charge(retry.id, Some("ii_1"), T0)
        .await
        .unwrap();
    assert_eq!(
        store.create_overage_charge(&charge(0, 5, "k-0-5b")).await,
        open_range,
        "nor does a succeeded one"
    );
    // A zero-cent charge is completed without a Stripe item.
    let zero = store
        .create_overage_charge(&NewOverageCharge {
            period_start: oct.start(),
            calls_to: 2,
            amount_cents: 0,
            ..charge(0, 2, "k-oct")
        })
        .await
        .unwrap();
    let zero = store
        .complete_overage_charge(zero.id, None, T0)
        .await
        .unwrap();
    assert_eq!(
        (zero.status, zero.stripe_invoice_item_id),
        (ChargeStatus::Succeeded, None)
    );
    assert_eq!(store.uninvoiced_overage().await.unwrap(), vec![]);

    // The ledger: every period with overage or charges, counters beside charges.
    store
        .create_overage_charge(&NewOverageCharge {
            user_id: bob.clone(),
            ..charge(0, 1, "k-bob")
        })
        .await
        .unwrap();
    let ledger = store.overage_ledger().await.unwrap();
    let entry = |user: &UserId, period: &BillingPeriod| {
        ledger
            .iter()
            .find(|e| &e.user_id == user && e.period_start == period.start())
            .cloned()
            .unwrap_or_else(|| panic!("no ledger entry for {user} {period:?}: {ledger:?}"))
    };
    assert_eq!(ledger.len(), 3, "{ledger:?}");
    let ada_nov = entry(&ada, &nov);
    assert_eq!(
        (
            ada_nov.overage_calls,
            ada_nov.overage_invoiced_calls,
            ada_nov.charged_calls,
            ada_nov.charged_cents,
            ada_nov.pending_charges,
            ada_nov.failed_charges
        ),
        (5, 5, 5, 1, 0, 1)
    );
    let ada_oct = entry(&ada, &oct);
    assert_eq!(
        (
            ada_oct.overage_calls,
            ada_oct.charged_calls,
            ada_oct.charged_cents
        ),
        (2, 2, 0)
    );
    let bob_nov = entry(&bob, &nov);
    assert_eq!(
        (
            bob_nov.overage_calls,
            bob_nov.overage_invoiced_calls,
            bob_nov.pending_charges
        ),
        (0, 0, 1),
        "a charge without overage still shows"
    );
}

pub async fn admin_audit_is_pruned_in_batches(store: Arc<dyn Store>) {
    let admin = UserId::generate();
    for minutes in 0..25 {
        store
            .record_admin_action(&AdminAuditEntry {
                id: 0,
                admin_id: admin.clone(),
                method: "GET".to_owned(),
                route: "/api/admin/audit".to_owned(),
                params: String::new(),
                status: 200,
                created_at: T0 + Duration::minutes(minutes),
            })
            .await
            .unwrap();
    }
    // Entries before T0 + 12 min go, 5 per statement; the boundary entry stays.
    let cut = T0 + Duration::minutes(12);
    assert_eq!(store.prune_admin_actions(cut, 5).await.unwrap(), 12);
    assert_eq!(store.prune_admin_actions(cut, 5).await.unwrap(), 0);
    let (total, page) = store.admin_actions(0, 100).await.unwrap();
    assert_eq!(total, 13);
    assert!(page.iter().all(|e| e.created_at >= cut));
    assert_eq!(page.last().unwrap().created_at, cut);
    // New entries after a prune get new ids (newest first still holds).
    store
        .record_admin_action(&AdminAuditEntry {
            id: 0,
            admin_id: admin.clone(),
            method: "GET".to_owned(),
            route: "/api/admin/audit".to_owned(),
            params: String::new(),
            status: 200,
            created_at: T0 + Duration::hours(1),
        })
        .await
        .unwrap();
    let (total, page) = store.admin_actions(0, 100).await.unwrap();
    assert_eq!(total, 14);
    assert_eq!(page[0].created_at, T0 + Duration::hours(1));
    let ids: std::collections::HashSet<i64> = page.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 14, "ids stay unique");
}

pub async fn admin_figures_and_audit(store: Arc<dyn Store>) {
    // The audit log, newest first.
    for (i, status) in [200u16, 403, 429].into_iter().enumerate() {
        store
            .record_admin_action(&AdminAuditEntry {
                id: 0,
                admin_id: UserId::parse("eco_usr_admin").unwrap(),
                method: "GET".to_owned(),
                route: "/api/admin/analytics/users".to_owned(),
                params: format!("page={i}&sort=email"),
                status,
                created_at: T0 + Duration::seconds(i as i64),
            })
            .await
            .unwrap();
    }
    let (total, page) = store.admin_actions(0, 2).await.unwrap();
    assert_eq!(total, 3);
    assert_eq!(
        page.iter()
            .map(|e| (e.status, e.params.as_str()))
            .collect::<Vec<_>>(),
        vec![(429, "page=2&sort=email"), (403, "page=1&sort=email")]
    );
    assert_eq!(page[0].created_at, T0 + Duration::seconds(2));
    let (_, rest) = store.admin_actions(2, 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert!(store.admin_actions(3, 2).await.unwrap().1.is_empty());

    // Four users; ada and dan on pro with 10 included calls here.
    let mut ids = Vec::new();
    for (i, (email, plan)) in [
        ("ada@example.com", Plan::pro()),
        ("bob@example.com", Plan::free()),
        ("cy@example.com", Plan::enterprise()),
        ("dan_x@example.com", Plan::pro()),
    ]
    .into_iter()
    .enumerate()
    {
        let u = User {
            created_at: T0 + Duration::hours(i as i64),
            ..user(email, plan)
        };
        store.create_user(&u).await.unwrap();
        let k = key_for(&u.id, &format!("{:064x}", rand::random::<u128>()), T0);
        store.create_api_key(&k).await.unwrap();
        ids.push((u.id, k.id));
    }
    let (ada, bob, cy, dan) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let included: IncludedCalls = HashMap::from([(ada.0.clone(), 10), (dan.0.clone(), 10)]);
    let mut batch = events(&ada.0, &ada.1, 15, T0);
    batch.extend(events(&bob.0, &bob.1, 3, T0));
    batch.extend(events(&dan.0, &dan.1, 30, T0));
    // Last month's calls count in no figure of this period.
    batch.extend(events(&dan.0, &dan.1, 7, datetime!(2026-10-15 12:00 UTC)));
    store.record_usage(&batch, &included).await.unwrap();
    let period = BillingPeriod::containing(T0);

    let page = |sort, descending, plan, search: Option<&str>, offset, limit| UserPageQuery {
        period_start: period.start(),
        plan,
        search: search.map(str::to_owned),
        sort,
        descending,
        offset,
        limit,
    };
    let emails = |rows: &[usage_core::repo::UserUsageRow]| {
        rows.iter()
            .map(|r| r.user.email.clone())
            .collect::<Vec<_>>()
    };
    let run = |q: UserPageQuery| {
        let store = store.clone();
        async move { store.users_page(&q).await.unwrap() }
    };
    let (total, rows) = run(page(UserSort::ApiCalls, true, None, None, 0, 10)).await;
    assert_eq!(total, 4);
    assert_eq!(
        rows.iter()
            .map(|r| (r.user.email.as_str(), r.api_calls, r.overage_calls))
            .collect::<Vec<_>>(),
        vec![
            ("dan_x@example.com", 30, 20),
            ("ada@example.com", 15, 5),
            ("bob@example.com", 3, 0),
            ("cy@example.com", 0, 0),
        ]
    );
    // Sorted by calls, pages run across users with and without calls this period.
    let (_, rows) = run(page(UserSort::ApiCalls, false, None, None, 0, 2)).await;
    assert_eq!(emails(&rows), ["cy@example.com", "bob@example.com"]);
    let (_, rows) = run(page(UserSort::ApiCalls, false, None, None, 1, 2)).await;
    assert_eq!(emails(&rows), ["bob@example.com", "ada@example.com"]);
    let (_, rows) = run(page(UserSort::ApiCalls, false, None, None, 3, 2)).await;
    assert_eq!(emails(&rows), ["dan_x@example.com"]);
    let (_, rows) = run(page(UserSort::ApiCalls, true, None, None, 3, 2)).await;
    assert_eq!(emails(&rows), ["cy@example.com"]);
    let (_, rows) = run(page(UserSort::ApiCalls, true, None, None, 2, 1)).await;
    assert_eq!(emails(&rows), ["bob@example.com"]);
    let (total, rows) = run(page(
        UserSort::ApiCalls,
        true,
        Some(Plan::enterprise()),
        None,
        0,
        5,
    ))
    .await;
    assert_eq!(
        (total, emails(&rows)),
        (1, vec!["cy@example.com".to_owned()])
    );
    // What revenue orders by: every user the filters keep, their terms and calls.
    let mut terms = store
        .users_terms(period.start(), None, None, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, s, calls)| (id, s.plan.as_str().to_owned(), calls))
        .collect::<Vec<_>>();
    terms.sort();
    let mut expected = vec![
        (ada.0.clone(), "pro".to_owned(), 15),
        (bob.0.clone(), "free".to_owned(), 3),
        (cy.0.clone(), "enterprise".to_owned(), 0),
        (dan.0.clone(), "pro".to_owned(), 30),
    ];
    expected.sort();
    assert_eq!(terms, expected);
    let filtered = store
        .users_terms(period.start(), Some(&Plan::pro()), Some("DAN_X"), 0)
        .await
        .unwrap();
    assert_eq!(
        filtered
            .iter()
            .map(|(id, _, calls)| (id, *calls))
            .collect::<Vec<_>>(),
        [(&dan.0, 30)]
    );
    let heavy = store
        .users_terms(period.start(), None, None, 20)
        .await
        .unwrap();
    assert_eq!(
        heavy
            .iter()
            .map(|(id, _, calls)| (id, *calls))
            .collect::<Vec<_>>(),
        [(&dan.0, 30)],
        "only dan has 20 calls or more"
    );
    // The rest by the price of what they hold (plan, version; 0 for none held).
    let held = |id: &UserId| {
        let store = store.clone();
        let id = id.clone();
        async move {
            let user = store.user_by_id(&id).await.unwrap().unwrap();
            (user.plan.clone(), user.plan_version.unwrap_or(0))
        }
    };
    let mut prices = Vec::new();
    for (id, price) in [(&ada.0, 4_900), (&bob.0, 0), (&cy.0, 50_000)] {
        let (plan, version) = held(id).await;
        prices.push((plan, version, price));
    }
    let (total, by_price) = store
        .users_by_price(period.start(), None, None, &prices, 20, true, 10)
        .await
        .unwrap();
    assert_eq!(total, 4, "every user the filters keep");
    assert_eq!(
        by_price,
        [
            (cy.0.clone(), 50_000),
            (ada.0.clone(), 4_900),
            (bob.0.clone(), 0)
        ],
        "dan, with 20 calls or more, is the caller's to price"
    );
    let (_, first) = store
        .users_by_price(period.start(), None, None, &prices, 20, false, 2)
        .await
        .unwrap();
    assert_eq!(first, [(bob.0.clone(), 0), (ada.0.clone(), 4_900)]);
    let (total, none_priced) = store
        .users_by_price(
            period.start(),
            Some(&Plan::pro()),
            None,
            &[],
            u64::MAX,
            true,
            10,
        )
        .await
        .unwrap();
    assert_eq!(total, 2);
    assert!(
        none_priced.iter().all(|(_, price)| *price == 0),
        "{none_priced:?}"
    );
    // A user with their own terms is the caller's to price, whatever their calls.
    let own = usage_core::catalog::Overrides {
        price_cents: Some(100),
        limits: vec![],
    };
    store
        .set_user_overrides(&bob.0, Some(&own), T0)
        .await
        .unwrap();
    let mut special = store
        .users_terms(period.start(), None, None, 20)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, s, calls)| (id, s.overrides.is_some(), calls))
        .collect::<Vec<_>>();
    special.sort();
    let mut expected = vec![(bob.0.clone(), true, 3), (dan.0.clone(), false, 30)];
    expected.sort();
    assert_eq!(special, expected);
    let (_, by_price) = store
        .users_by_price(period.start(), None, None, &prices, 20, true, 10)
        .await
        .unwrap();
    assert_eq!(by_price, [(cy.0.clone(), 50_000), (ada.0.clone(), 4_900)]);
    store.set_user_overrides(&bob.0, None, T0).await.unwrap();
    // And a page's rows by id, in the order asked; an unknown id is left out.
    let rows = store
        .users_rows(
            period.start(),
            &[cy.0.clone(), UserId::generate(), dan.0.clone()],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.user.email.as_str(), r.api_calls, r.overage_calls))
            .collect::<Vec<_>>(),
        [("cy@example.com", 0, 0), ("dan_x@example.com", 30, 20)]
    );
    let (_, rows) = run(page(UserSort::Email, false, None, None, 0, 10)).await;
    assert_eq!(
        emails(&rows),
        [
            "ada@example.com",
            "bob@example.com",
            "cy@example.com",
            "dan_x@example.com"
        ]
    );
    let (_, rows) = run(page(UserSort::CreatedAt, true, None, None, 0, 10)).await;
    assert_eq!(
        emails(&rows),
        [
            "dan_x@example.com",
            "cy@example.com",
            "bob@example.com",
            "ada@example.com"
        ]
    );
    let (_, rows) = run(page(UserSort::Email, false, None, None, 2, 2)).await;
    assert_eq!(emails(&rows), ["cy@example.com", "dan_x@example.com"]);
    let (total, rows) = run(page(UserSort::Email, false, None, None, 4, 2)).await;
    assert_eq!((total, rows.len()), (4, 0), "past the last page");
    let (total, rows) = run(page(UserSort::Email, false, Some(Plan::pro()), None, 0, 10)).await;
    assert_eq!(
        (total, emails(&rows)),
        (
            2,
            vec!["ada@example.com".to_owned(), "dan_x@example.com".to_owned()]
        )
    );
    // Search: case-insensitive, on email or id, and literal (no wildcards). "DAN_X" cannot
    // be part of a random base62 id (plain "DAN" was, now and then).
    let (total, rows) = run(page(UserSort::Email, false, None, Some("DAN_X"), 0, 10)).await;
    assert_eq!(
        (total, emails(&rows)),
        (1, vec!["dan_x@example.com".to_owned()])
    );
    let (total, _) = run(page(UserSort::Email, false, None, Some("b_b"), 0, 10)).await;
    assert_eq!(
        total, 0,
        "`_` matches only itself (as a wildcard it would find bob)"
    );
    let (total, _) = run(page(UserSort::Email, false, None, Some("%"), 0, 10)).await;
    assert_eq!(total, 0, "`%` matches only itself");
    let (total, _) = run(page(
        UserSort::Email,
        false,
        None,
        Some("' OR 1=1--"),
        0,
        10,
    ))
    .await;
    assert_eq!(total, 0);
    let id_part = &cy.0.as_str()[8..16];
    let (total, rows) = run(page(UserSort::Email, false, None, Some(id_part), 0, 10)).await;
    assert_eq!(
        (total, emails(&rows)),
        (1, vec!["cy@example.com".to_owned()])
    );

    // Period figures: one invoiced charge for ada's 5 overage calls.
    let charge = store
        .create_overage_charge(&NewOverageCharge {
            user_id: ada.0.clone(),
            period_start: period.start(),
            meter: API_CALLS.to_owned(),
            calls_from: 0,
            calls_to: 5,
            amount_cents: 1,
            idempotency_key: "ada-0-5".to_owned(),
            created_at: T0,
        })
        .await
        .unwrap();
    store
        .complete_overage_charge(charge.id, Some("ii_1"), T0)
        .await
        .unwrap();
    let day = T0.date().midnight().assume_utc();
    let usage = store
        .period_usage(period.start(), (day, day + Duration::days(1)), 15)
        .await
        .unwrap();
    assert_eq!(usage.api_calls, 48, "this period's calls only");
    assert_eq!(usage.api_calls_today, 48);
    assert_eq!(usage.invoiced_cents, 1, "the succeeded charge's cents");
    let mut heavy: Vec<(String, u64)> = usage
        .heavy_users
        .iter()
        .map(|(s, calls)| (s.plan.as_str().to_owned(), *calls))
        .collect();
    heavy.sort();
    assert_eq!(
        heavy,
        [("pro".to_owned(), 15), ("pro".to_owned(), 30)],
        "ada and dan, with at least 15 calls; bob's 3 are not"
    );
    let none = store
        .period_usage(period.start(), (day, day + Duration::days(1)), 31)
        .await
        .unwrap();
    assert!(none.heavy_users.is_empty());
    // A failed charge is not invoiced.
    let failed = store
        .create_overage_charge(&NewOverageCharge {
            user_id: dan.0.clone(),
            period_start: period.start(),
            meter: API_CALLS.to_owned(),
            calls_from: 0,
            calls_to: 20,
            amount_cents: 2,
            idempotency_key: "dan-0-20".to_owned(),
            created_at: T0,
        })
        .await
        .unwrap();
    store
        .fail_overage_charge(failed.id, "declined", T0)
        .await
        .unwrap();
    assert_eq!(none.invoiced_cents, 1);
    assert_eq!(
        store
            .period_usage(period.start(), (day, day + Duration::days(1)), 31)
            .await
            .unwrap()
            .invoiced_cents,
        1
    );
}

pub async fn sign_in_links_work_once_and_expire(store: Arc<dyn Store>) {
    let u = user("link@example.com", Plan::free());
    store.create_user(&u).await.unwrap();
    let expires = T0 + Duration::minutes(15);
    store
        .create_login_link("hash-a", &u.id, T0, expires)
        .await
        .unwrap();
    store
        .create_login_link("hash-b", &u.id, T0, expires)
        .await
        .unwrap();
    // Unknown users and reused hashes are refused.
    assert!(matches!(
        store
            .create_login_link("hash-c", &UserId::generate(), T0, expires)
            .await,
        Err(RepoError::NotFound { .. })
    ));
    assert!(matches!(
        store.create_login_link("hash-a", &u.id, T0, expires).await,
        Err(RepoError::Conflict { .. })
    ));
    // Once: the second use finds nothing.
    assert_eq!(
        store.consume_login_link("hash-a", T0).await.unwrap(),
        Some(u.id.clone())
    );
    assert_eq!(store.consume_login_link("hash-a", T0).await.unwrap(), None);
    assert_eq!(store.consume_login_link("unknown", T0).await.unwrap(), None);
    // Expired at its expiry instant, not a microsecond later.
    assert_eq!(
        store.consume_login_link("hash-b", expires).await.unwrap(),
        None
    );

    // Of many uses at once, exactly one signs in.
    store
        .create_login_link("hash-d", &u.id, T0, expires)
        .await
        .unwrap();
    let uses = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.consume_login_link("hash-d", T0).await.unwrap() })
    });
    let mut signed_in = 0;
    for used in uses {
        signed_in += usize::from(used.await.unwrap().is_some());
    }
    assert_eq!(signed_in, 1);

    // Used and expired links go; nothing else was there.
    assert_eq!(store.prune_sessions(expires).await.unwrap(), 3);
    assert_eq!(store.prune_sessions(expires).await.unwrap(), 0);
}

pub async fn sessions_expire_end_and_are_pruned(store: Arc<dyn Store>) {
    let u = user("session@example.com", Plan::pro());
    let other = user("other@example.com", Plan::free());
    store.create_user(&u).await.unwrap();
    store.create_user(&other).await.unwrap();
    let short = T0 + Duration::hours(1);
    let long = T0 + Duration::hours(12);
    store.create_session("s1", &u.id, T0, short).await.unwrap();
    store
        .create_session("s2", &other.id, T0, long)
        .await
        .unwrap();
    store.create_session("s3", &u.id, T0, long).await.unwrap();
    assert!(matches!(
        store
            .create_session("s4", &UserId::generate(), T0, long)
            .await,
        Err(RepoError::NotFound { .. })
    ));
    assert!(matches!(
        store.create_session("s1", &u.id, T0, long).await,
        Err(RepoError::Conflict { .. })
    ));

    assert_eq!(
        store.session_user("s1", T0).await.unwrap(),
        Some(u.id.clone())
    );
    assert_eq!(
        store.session_user("s2", T0).await.unwrap(),
        Some(other.id.clone())
    );
    assert_eq!(store.session_user("nope", T0).await.unwrap(), None);
    assert_eq!(store.session_user("s1", short).await.unwrap(), None);
    assert_eq!(
        store.session_user("s3", short).await.unwrap(),
        Some(u.id.clone())
    );

    assert!(store.delete_session("s3").await.unwrap());
    assert!(!store.delete_session("s3").await.unwrap());
    assert_eq!(store.session_user("s3", T0).await.unwrap(), None);

    assert_eq!(store.prune_sessions(short).await.unwrap(), 1);
    assert_eq!(
        store.session_user("s2", short).await.unwrap(),
        Some(other.id)
    );
}

pub async fn daily_totals_follow_the_aggregation(store: Arc<dyn Store>) {
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let (bob, bob_key) = caller(&store, "bob@example.com", Plan::free()).await;
    let day = date!(2026 - 11 - 20);
    let next = date!(2026 - 11 - 21);
    let at = day.midnight().assume_utc();
    let mut batch = vec![
        event(&ada, &key, at + Duration::hours(1)),
        event(&ada, &key, at + Duration::hours(2)),
        event(&bob, &bob_key, at + Duration::hours(3)),
        event(&bob, &bob_key, at + Duration::days(1)),
    ];
    batch[1].status_code = 500;
    store
        .record_usage(&batch, &IncludedCalls::new())
        .await
        .unwrap();
    // Nothing before the day is aggregated.
    assert!(store.daily_totals(day, next).await.unwrap().is_empty());
    let now = at + Duration::days(2);
    store.aggregate_usage_day(day, now).await.unwrap();
    assert_eq!(
        store.daily_totals(day, next).await.unwrap(),
        vec![DayTotal {
            date: day,
            api_calls: 3,
            error_calls: 1
        }]
    );
    // A late call and the day's new aggregation: the total follows.
    store
        .record_usage(
            &[event(&bob, &bob_key, at + Duration::hours(4))],
            &IncludedCalls::new(),
        )
        .await
        .unwrap();
    store.aggregate_usage_day(day, now).await.unwrap();
    store.aggregate_usage_day(next, now).await.unwrap();
    let totals = store.daily_totals(day, next).await.unwrap();
    assert_eq!(
        totals
            .iter()
            .map(|t| (t.date, t.api_calls))
            .collect::<Vec<_>>(),
        vec![(day, 4), (next, 1)]
    );
    // The range is inclusive at both ends, and nothing outside it comes back.
    assert_eq!(store.daily_totals(next, next).await.unwrap().len(), 1);
    assert!(
        store
            .daily_totals(date!(2026 - 11 - 22), date!(2026 - 11 - 30))
            .await
            .unwrap()
            .is_empty()
    );
}

/// The built-in plans as the default plan variables make them.
fn builtin_plans() -> Vec<PlanDefinition> {
    let catalog = PlanCatalog::default();
    let rates = usage_core::rate::PlanRateLimits::default();
    Plan::builtin()
        .into_iter()
        .filter_map(|p| PlanDefinition::builtin(&p, &catalog, &rates, None))
        .collect()
}

/// A custom plan with a graduated overage price and a second meter.
fn growth_plan() -> PlanDefinition {
    serde_json::from_value(serde_json::json!({
        "key": "growth", "name": "Growth", "price_cents": 9900,
        "stripe_price_id": "price_growth", "burst": {"per_second": 50, "burst": 100},
        "limits": [
          {"meter": "api_calls", "included": 250000, "over_limit": "overage",
           "overage": {"model": "graduated",
                       "tiers": [{"up_to": 750000, "unit_price_micros": 800},
                                 {"up_to": null, "unit_price_micros": 500}]}},
          {"meter": "tokens", "included": 5000000, "over_limit": "block", "alerts": [50, 90]}]
    }))
    .unwrap()
}

pub async fn plans_are_seeded_once_from_the_built_in_terms(store: Arc<dyn Store>) {
    assert_eq!(
        store.plan_versions().await.unwrap(),
        vec![],
        "no terms before the first start"
    );
    let plans = builtin_plans();
    let mut seeded = store.seed_plans(&plans, T0).await.unwrap();
    seeded.sort();
    assert_eq!(seeded, vec!["enterprise", "free", "pro"]);
    // A second start with other variables changes nothing: the catalog is the truth.
    let mut cheaper = plans.clone();
    cheaper[1].price_cents = 1;
    assert_eq!(
        store
            .seed_plans(&cheaper, T0 + Duration::days(1))
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    let stored = store.plan_versions().await.unwrap();
    let keys: Vec<(&str, u32)> = stored
        .iter()
        .map(|v| (v.plan.key.as_str(), v.plan.version))
        .collect();
    assert_eq!(keys, vec![("enterprise", 1), ("free", 1), ("pro", 1)]);
    let pro = stored.iter().find(|v| v.plan.key == "pro").unwrap();
    assert_eq!(pro.plan, plans[1]);
    assert_eq!(pro.created_at, T0);
    assert_eq!(pro.existing, PlanMove::NextPeriod);
    // Users of the built-in plans still work as before.
    let u = user("seeded@example.com", Plan::pro());
    store.create_user(&u).await.unwrap();
    assert_eq!(
        store.user_by_id(&u.id).await.unwrap().unwrap().plan,
        Plan::pro()
    );
}

pub async fn plans_are_created_revised_and_archived(store: Arc<dyn Store>) {
    store.seed_plans(&builtin_plans(), T0).await.unwrap();
    let growth = growth_plan();
    let created = store.create_plan(&growth, T0).await.unwrap();
    assert_eq!(created.plan, growth);
    assert_eq!(created.plan.version, 1);
    assert_eq!(
        store.create_plan(&growth, T0).await.unwrap_err(),
        RepoError::Conflict {
            entity: "plan",
            field: "key"
        }
    );
    assert_eq!(
        store
            .create_plan(&builtin_plans()[0], T0)
            .await
            .unwrap_err(),
        RepoError::Conflict {
            entity: "plan",
            field: "key"
        },
        "a built-in key is taken too"
    );
    // A revision is the next version, whatever version the caller wrote.
    let mut dearer = growth.clone();
    dearer.price_cents = 12_900;
    dearer.version = 40;
    let t1 = T0 + Duration::days(3);
    let v2 = store.revise_plan(&dearer, PlanMove::Now, t1).await.unwrap();
    assert_eq!(v2.plan.version, 2);
    assert_eq!(v2.plan.price_cents, 12_900);
    assert_eq!(v2.existing, PlanMove::Now);
    assert_eq!(v2.created_at, t1);
    let v3 = store
        .revise_plan(&growth, PlanMove::Keep, t1)
        .await
        .unwrap();
    assert_eq!(v3.plan.version, 3);
    let mut unknown = growth.clone();
    unknown.key = "scale".into();
    assert_eq!(
        store
            .revise_plan(&unknown, PlanMove::Now, t1)
            .await
            .unwrap_err(),
        RepoError::NotFound { entity: "plan" }
    );
    // Archiving is the plan's: every version shows it; taking it back clears it.
    let archived = store.set_plan_archived("growth", true, t1).await.unwrap();
    assert_eq!((archived.plan.version, archived.plan.archived), (3, true));
    let versions: Vec<(u32, bool, i64)> = store
        .plan_versions()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.plan.key == "growth")
        .map(|v| (v.plan.version, v.plan.archived, v.plan.price_cents))
        .collect();
    assert_eq!(
        versions,
        vec![(1, true, 9_900), (2, true, 12_900), (3, true, 9_900)]
    );
    let v4 = store
        .revise_plan(&growth, PlanMove::NextPeriod, t1)
        .await
        .unwrap();
    assert!(
        v4.plan.archived,
        "a revision of an archived plan is archived too"
    );
    let back = store.set_plan_archived("growth", false, t1).await.unwrap();
    assert_eq!((back.plan.version, back.plan.archived), (4, false));
    assert_eq!(
        store
            .set_plan_archived("scale", true, t1)
            .await
            .unwrap_err(),
        RepoError::NotFound { entity: "plan" }
    );
}

pub async fn plan_terms_read_back_as_written(store: Arc<dyn Store>) {
    // Every field, including the largest numbers a plan may hold.
    let mut plan = growth_plan();
    plan.name = "Grüße \"quoted\" ✓".into();
    plan.currency = "eur".into();
    plan.public = false;
    plan.stripe_price_id = None;
    plan.burst = None;
    plan.limits[0].included = Some(usage_core::catalog::MAX_UNITS);
    plan.limits[0].alerts = vec![1, 1_000];
    plan.limits[0].overage = Some(usage_core::pricing::OverageModel::Package {
        package_size: usage_core::catalog::MAX_UNITS,
        package_price_micros: i64::MAX,
    });
    plan.limits[1].included = None;
    store.create_plan(&plan, T0).await.unwrap();
    let stored = store.plan_versions().await.unwrap();
    let read = stored.iter().find(|v| v.plan.key == "growth").unwrap();
    assert_eq!(read.plan, plan);
}

pub async fn concurrent_plan_revisions_get_distinct_versions(store: Arc<dyn Store>) {
    store.create_plan(&growth_plan(), T0).await.unwrap();
    let revisions = (0..8).map(|i| {
        let store = store.clone();
        let mut plan = growth_plan();
        plan.price_cents = i;
        tokio::spawn(async move { store.revise_plan(&plan, PlanMove::Now, T0).await })
    });
    let mut versions: Vec<u32> = Vec::new();
    for revision in revisions {
        versions.push(revision.await.unwrap().unwrap().plan.version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=9).collect::<Vec<u32>>());
}

pub async fn users_hold_the_plan_version_they_subscribed_to(store: Arc<dyn Store>) {
    let early = user("early@example.com", Plan::pro());
    store.create_user(&early).await.unwrap();
    assert_eq!(
        store
            .user_by_id(&early.id)
            .await
            .unwrap()
            .unwrap()
            .plan_version,
        None,
        "no version before the catalog has one"
    );
    store.seed_plans(&builtin_plans(), T0).await.unwrap();
    assert_eq!(
        store
            .user_by_id(&early.id)
            .await
            .unwrap()
            .unwrap()
            .plan_version,
        Some(1),
        "the first start puts users on version 1"
    );
    let mut pro = builtin_plans()[1].clone();
    pro.price_cents = 5_900;
    store
        .revise_plan(&pro, PlanMove::NextPeriod, T0)
        .await
        .unwrap();
    // A new subscriber gets the newest version; the given one is not read.
    let mut late = user("late@example.com", Plan::pro());
    late.plan_version = Some(77);
    store.create_user(&late).await.unwrap();
    assert_eq!(
        store
            .user_by_id(&late.id)
            .await
            .unwrap()
            .unwrap()
            .plan_version,
        Some(2)
    );
    assert_eq!(
        store
            .user_by_id(&early.id)
            .await
            .unwrap()
            .unwrap()
            .plan_version,
        Some(1)
    );
    // Setting the same plan again is no move; another plan is its newest version.
    let same = store.set_plan(&early.id, Plan::pro(), T0).await.unwrap();
    assert_eq!(same.plan_version, Some(1));
    let moved = store.set_plan(&early.id, Plan::free(), T0).await.unwrap();
    assert_eq!((moved.plan, moved.plan_version), (Plan::free(), Some(1)));
    let back = store.set_plan(&early.id, Plan::pro(), T0).await.unwrap();
    assert_eq!(back.plan_version, Some(2));
    // A Stripe subscription that changes the plan moves to the newest version too.
    let mut customer = user("stripe@example.com", Plan::free());
    customer.stripe_customer_id = Some("cus_version".into());
    store.create_user(&customer).await.unwrap();
    let change = SubscriptionChange {
        event_id: "evt_version".into(),
        event_type: "customer.subscription.updated".into(),
        customer: "cus_version".into(),
        plan: Plan::pro(),
        created: T0,
        subscription: Some("sub_version".into()),
        ends: false,
    };
    let outcome = store.apply_subscription_change(&change, T0).await.unwrap();
    assert!(
        matches!(outcome, SubscriptionOutcome::Applied(_)),
        "{outcome:?}"
    );
    let stored = store.user_by_id(&customer.id).await.unwrap().unwrap();
    assert_eq!((stored.plan, stored.plan_version), (Plan::pro(), Some(2)));
    // The users page reads the same columns.
    let page = store
        .users_page(&UserPageQuery {
            period_start: BillingPeriod::containing(T0).start(),
            plan: None,
            search: Some("late@".into()),
            sort: UserSort::Email,
            descending: false,
            offset: 0,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(page.1[0].user.plan_version, Some(2));
    let rows = store
        .users_rows(
            BillingPeriod::containing(T0).start(),
            &[customer.id.clone()],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].user.plan_version, Some(2));
}

pub async fn users_overrides_are_kept_and_dropped(store: Arc<dyn Store>) {
    let u = user("terms@example.com", Plan::pro());
    store.create_user(&u).await.unwrap();
    let overrides: usage_core::catalog::Overrides = serde_json::from_value(serde_json::json!({
        "price_cents": 30000,
        "limits": [{"meter": "api_calls", "included": 2000000, "over_limit": "overage",
                    "overage": {"model": "volume", "tiers": [
                        {"up_to": 1000, "unit_price_micros": 900},
                        {"up_to": null, "unit_price_micros": 400}]}}]
    }))
    .unwrap();
    let changed_at = T0 + Duration::hours(3);
    let set = store
        .set_user_overrides(&u.id, Some(&overrides), changed_at)
        .await
        .unwrap();
    assert_eq!(set.overrides.as_ref(), Some(&overrides));
    // Every instance's key cache drops the user's limits, as for a plan change.
    assert!(
        store
            .plans_changed_since(changed_at)
            .await
            .unwrap()
            .contains(&u.id)
    );
    // The key lookup brings them, and the counts of terms tell them apart.
    let key = key_for(&u.id, &format!("{:064x}", 31), T0);
    store.create_api_key(&key).await.unwrap();
    let (_, held) = store
        .api_key_and_plan_by_hash(&key.key_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.overrides.as_ref(), Some(&overrides));
    let plain = user("plain@example.com", Plan::pro());
    store.create_user(&plain).await.unwrap();
    let mut terms = store.count_users_by_terms().await.unwrap();
    terms.retain(|(s, _)| s.plan == Plan::pro());
    terms.sort_by_key(|(s, _)| s.overrides.is_some());
    assert_eq!(terms.len(), 2, "{terms:?}");
    assert_eq!((terms[0].0.overrides.is_none(), terms[0].1), (true, 1));
    assert_eq!(
        (terms[1].0.overrides.as_ref(), terms[1].1),
        (Some(&overrides), 1)
    );
    assert_eq!(
        store.user_by_id(&u.id).await.unwrap().unwrap().overrides,
        Some(overrides.clone())
    );
    assert_eq!(
        store
            .user_by_email("terms@example.com")
            .await
            .unwrap()
            .unwrap()
            .overrides,
        Some(overrides)
    );
    let dropped = store
        .set_user_overrides(&u.id, None, changed_at)
        .await
        .unwrap();
    assert_eq!(dropped.overrides, None);
    assert_eq!(
        store
            .set_user_overrides(&UserId::generate(), None, changed_at)
            .await
            .unwrap_err(),
        RepoError::NotFound { entity: "user" }
    );
}

/// Meters: `api_calls` from the start, new keys stored once, name, unit and aggregation
/// replaced; route costs replaced whole, in order, and only onto meters that exist.
pub async fn meters_and_route_costs_are_kept(store: Arc<dyn Store>) {
    let at = datetime!(2026-12-07 10:00 UTC);
    assert_eq!(store.meters().await.unwrap(), vec![Meter::api_calls()]);
    let tokens = Meter {
        key: "tokens".into(),
        name: "Tokens".into(),
        unit: "token".into(),
        aggregation: Aggregation::Sum,
    };
    let seats = Meter {
        key: "seats".into(),
        name: "Active seats".into(),
        unit: "seat".into(),
        aggregation: Aggregation::UniqueCount,
    };
    store.create_meter(&tokens, at).await.unwrap();
    store.create_meter(&seats, at).await.unwrap();
    assert_eq!(
        store.create_meter(&tokens, at).await.unwrap_err(),
        RepoError::Conflict {
            entity: "meter",
            field: "key"
        }
    );
    let renamed = Meter {
        name: "Model tokens".into(),
        aggregation: Aggregation::Count,
        ..tokens.clone()
    };
    store.update_meter(&renamed, at).await.unwrap();
    assert_eq!(
        store
            .update_meter(
                &Meter {
                    key: "credits".into(),
                    ..tokens.clone()
                },
                at
            )
            .await
            .unwrap_err(),
        RepoError::NotFound { entity: "meter" }
    );
    assert_eq!(
        store.meters().await.unwrap(),
        vec![Meter::api_calls(), seats, renamed],
        "by key"
    );

    assert!(store.route_costs().await.unwrap().is_empty());
    let cost = |route: &str, meter: &str, quantity| RouteCost {
        route: route.into(),
        meter: meter.into(),
        quantity,
    };
    let costs = vec![
        cost("POST /v2/generate", "tokens", 1),
        cost("POST /v1/generate", "tokens", 1 << 53),
    ];
    store.replace_route_costs(&costs).await.unwrap();
    assert_eq!(
        store.route_costs().await.unwrap(),
        vec![costs[1].clone(), costs[0].clone()],
        "by route, then meter"
    );
    assert_eq!(
        store
            .replace_route_costs(&[cost("POST /v3", "credits", 1)])
            .await
            .unwrap_err(),
        RepoError::NotFound { entity: "meter" }
    );
    assert_eq!(
        store.route_costs().await.unwrap().len(),
        2,
        "a refused list changes nothing"
    );
    store.replace_route_costs(&[]).await.unwrap();
    assert!(store.route_costs().await.unwrap().is_empty());
}

/// Meters of every kind, for the metered usage cases.
async fn define_meters(store: &Arc<dyn Store>) {
    for (key, aggregation) in [
        ("tokens", Aggregation::Sum),
        ("images", Aggregation::Count),
        ("peak_gb", Aggregation::Max),
        ("seats", Aggregation::UniqueCount),
    ] {
        store
            .create_meter(
                &Meter {
                    key: key.into(),
                    name: key.into(),
                    unit: "unit".into(),
                    aggregation,
                },
                T0,
            )
            .await
            .unwrap();
    }
}

/// Calls' units are stored with the calls, read back with them, and add up per user,
/// period and day as each meter's aggregation says (count, sum saturating, max); a
/// replayed batch adds nothing; a meter's aggregation is fixed once it has usage.
pub async fn calls_units_add_up_by_each_meters_aggregation(store: Arc<dyn Store>) {
    define_meters(&store).await;
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let with = |at: OffsetDateTime, units: &[(&str, u64)]| {
        let mut e = event(&ada, &key, at);
        for (meter, quantity) in units {
            e.units.add(*meter, *quantity);
        }
        e
    };
    let december = datetime!(2026-12-01 00:00 UTC);
    let batch = vec![
        with(T0, &[("tokens", 1_000), ("images", 5), ("peak_gb", 7)]),
        with(T0 + Duration::seconds(1), &[]),
        with(T0 + Duration::hours(24), &[("tokens", 234), ("peak_gb", 3)]),
        with(december, &[("tokens", 5), ("images", 1)]),
        // A meter that does not exist adds nothing anywhere (none is ever deleted).
        with(T0 + Duration::seconds(2), &[("gone", 9)]),
    ];
    let outcome = store.record_usage(&batch, &HashMap::new()).await.unwrap();
    assert_eq!(outcome.inserted, 5);
    let november = BillingPeriod::containing(T0).start();
    let usage = |expected: &[(&str, u64)]| {
        expected
            .iter()
            .map(|(m, q)| ((*m).to_owned(), *q))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        store.meter_usage(&ada, november).await.unwrap(),
        usage(&[("images", 1), ("peak_gb", 7), ("tokens", 1_234)]),
        "images count reports, peak_gb keeps the largest, tokens add up"
    );
    assert_eq!(
        store.meter_usage(&ada, december).await.unwrap(),
        usage(&[("images", 1), ("tokens", 5)])
    );
    assert_eq!(
        store
            .meter_history(&ada, "tokens", T0.date(), december.date())
            .await
            .unwrap(),
        vec![
            (T0.date(), 1_000),
            (T0.date().next_day().unwrap(), 234),
            (december.date(), 5)
        ]
    );
    assert_eq!(
        store
            .meter_history(&ada, "peak_gb", T0.date(), T0.date())
            .await
            .unwrap(),
        vec![(T0.date(), 7)]
    );
    let again = store.record_usage(&batch, &HashMap::new()).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 5));
    assert_eq!(
        store.meter_usage(&ada, november).await.unwrap(),
        usage(&[("images", 1), ("peak_gb", 7), ("tokens", 1_234)]),
        "a replayed batch adds nothing"
    );
    let page = store
        .usage_events_page(&ada, T0, december + Duration::days(1), None, 10)
        .await
        .unwrap();
    let first = page
        .iter()
        .find(|e| e.event_id == batch[0].event_id)
        .unwrap();
    assert_eq!(first.units, batch[0].units, "units read back with the call");
    assert!(page.iter().any(|e| e.units.is_empty()));

    // Sums saturate at the largest BIGINT instead of failing the batch.
    let huge = vec![
        with(T0 + Duration::seconds(10), &[("tokens", u64::MAX)]),
        with(T0 + Duration::seconds(11), &[("tokens", u64::MAX)]),
    ];
    store.record_usage(&huge, &HashMap::new()).await.unwrap();
    let tokens = store.meter_usage(&ada, november).await.unwrap();
    assert_eq!(tokens[2], ("tokens".to_owned(), i64::MAX as u64));

    // Usage stored: the aggregation of tokens is fixed; its name is not.
    let mut renamed = Meter {
        key: "tokens".into(),
        name: "Model tokens".into(),
        unit: "token".into(),
        aggregation: Aggregation::Sum,
    };
    store.update_meter(&renamed, T0).await.unwrap();
    renamed.aggregation = Aggregation::Max;
    assert_eq!(
        store.update_meter(&renamed, T0).await.unwrap_err(),
        RepoError::Conflict {
            entity: "meter",
            field: "aggregation"
        }
    );
}

/// Events of other services: `(source, id)` stored once, ever (in one batch too); each
/// adds to its own day and period, late ones included; unique_count meters count
/// distinct values per period; a batch naming an unknown user or meter stores nothing.
pub async fn meter_events_are_stored_once_ever(store: Arc<dyn Store>) {
    define_meters(&store).await;
    let (ada, _) = caller(&store, "ada@example.com", Plan::pro()).await;
    let now = datetime!(2026-12-02 10:00 UTC);
    let sent = |id: &str, meter: &str, quantity: u64, value: Option<&str>, at| MeterEvent {
        source: "inference-api".into(),
        event_id: id.into(),
        user_id: ada.clone(),
        meter: meter.into(),
        quantity,
        value: value.map(str::to_owned),
        created_at: at,
    };
    let late = datetime!(2026-11-30 23:59:59 UTC);
    let batch = vec![
        sent("e1", "tokens", 1_000, None, now),
        sent("e2", "tokens", 234, None, now),
        sent("e1", "tokens", 999, None, now),
        sent("e3", "tokens", 50, None, late),
        sent("e4", "seats", 0, Some("alice"), now),
        sent("e5", "seats", 0, Some("bob"), now),
        sent("e6", "seats", 0, Some("alice"), now + Duration::hours(24)),
        sent("e7", "images", 40, None, now),
    ];
    let outcome = store.record_meter_events(&batch, now).await.unwrap();
    assert_eq!((outcome.accepted, outcome.duplicates), (7, 1));
    let december = BillingPeriod::containing(now).start();
    let november = BillingPeriod::containing(late).start();
    let owned = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|(m, q)| ((*m).to_owned(), *q))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        store.meter_usage(&ada, december).await.unwrap(),
        owned(&[("images", 1), ("seats", 2), ("tokens", 1_234)]),
        "the first of a batch's twins is kept; alice counts once"
    );
    assert_eq!(
        store.meter_usage(&ada, november).await.unwrap(),
        owned(&[("tokens", 50)]),
        "a late event counts in its own period"
    );
    assert_eq!(
        store
            .meter_history(&ada, "seats", now.date(), now.date() + Duration::days(1))
            .await
            .unwrap(),
        vec![(now.date(), 2)],
        "a value counts on the day it is first seen"
    );
    let again = store
        .record_meter_events(&batch[..2], now + Duration::days(3))
        .await
        .unwrap();
    assert_eq!((again.accepted, again.duplicates), (0, 2));
    // Another source may use the same ids.
    let mut other = sent("e1", "tokens", 1, None, now);
    other.source = "batch-jobs".into();
    assert_eq!(
        store
            .record_meter_events(&[other], now)
            .await
            .unwrap()
            .accepted,
        1
    );
    // Unknown user or meter: nothing of the batch is stored.
    let mut stranger = sent("s1", "tokens", 5, None, now);
    stranger.user_id = UserId::generate();
    assert_eq!(
        store
            .record_meter_events(&[sent("s0", "tokens", 5, None, now), stranger], now)
            .await
            .unwrap_err(),
        RepoError::NotFound { entity: "user" }
    );
    assert_eq!(
        store
            .record_meter_events(&[sent("s2", "bytes", 5, None, now)], now)
            .await
            .unwrap_err(),
        RepoError::NotFound { entity: "meter" }
    );
    assert_eq!(
        store
            .record_meter_events(&[sent("s0", "tokens", 5, None, now)], now)
            .await
            .unwrap()
            .accepted,
        1,
        "s0 was not kept by the refused batch"
    );
    assert_eq!(
        store.meter_usage(&ada, december).await.unwrap()[2],
        ("tokens".to_owned(), 1_240)
    );

    // Retention removes old events, not what they added up to, nor their (source, id).
    let cutoff = datetime!(2026-12-01 00:00 UTC);
    assert_eq!(
        store.prune_usage(cutoff, true).await.unwrap().meter_events,
        1
    );
    assert_eq!(
        store.prune_usage(cutoff, false).await.unwrap().meter_events,
        1
    );
    assert_eq!(
        store.prune_usage(cutoff, true).await.unwrap().meter_events,
        0
    );
    assert_eq!(
        store.meter_usage(&ada, november).await.unwrap(),
        owned(&[("tokens", 50)])
    );
    let replayed = store
        .record_meter_events(&[batch[3].clone()], now)
        .await
        .unwrap();
    assert_eq!(
        (replayed.accepted, replayed.duplicates),
        (0, 1),
        "stored once, ever"
    );
}

/// A meter's admission counter is its own (per user, period and meter, apart from the
/// calls'), starts from the meter's stored usage, takes the events stored after it exists
/// (count meters one per event, sum meters their quantity; max and unique_count meters
/// have none), leases no less than a call needs, and is healed from the stored usage.
pub async fn meter_counters_start_from_stored_usage_and_take_events(store: Arc<dyn Store>) {
    define_meters(&store).await;
    let (ada, key) = caller(&store, "ada@example.com", Plan::pro()).await;
    let now = datetime!(2026-12-02 10:00 UTC);
    let period = BillingPeriod::containing(now).start();
    let mut call = event(&ada, &key, now);
    call.units.add("tokens", 700);
    store
        .record_usage(&[call], &IncludedCalls::new())
        .await
        .unwrap();
    assert_eq!(
        store.quota_count(&ada, "tokens", period).await.unwrap(),
        700,
        "seeded from the stored units"
    );
    assert_eq!(store.quota_count(&ada, API_CALLS, period).await.unwrap(), 1);
    assert_eq!(store.quota_count(&ada, "images", period).await.unwrap(), 0);
    let sent = |id: &str, meter: &str, quantity: u64| MeterEvent {
        source: "svc".into(),
        event_id: id.into(),
        user_id: ada.clone(),
        meter: meter.into(),
        quantity,
        value: None,
        created_at: now,
    };
    let outcome = store
        .record_meter_events(
            &[
                sent("a", "tokens", 300),
                sent("b", "images", 40),
                sent("c", "images", 40),
                sent("d", "peak_gb", 9),
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(outcome.accepted, 4);
    assert_eq!(
        store.quota_count(&ada, "tokens", period).await.unwrap(),
        1_000
    );
    assert_eq!(
        store.quota_count(&ada, "images", period).await.unwrap(),
        2,
        "a count meter counts events"
    );
    assert_eq!(store.quota_count(&ada, API_CALLS, period).await.unwrap(), 1);
    // A replay adds nothing.
    store
        .record_meter_events(&[sent("a", "tokens", 300)], now)
        .await
        .unwrap();
    assert_eq!(
        store.quota_count(&ada, "tokens", period).await.unwrap(),
        1_000
    );
    assert_eq!(
        store
            .quota_counts(
                "tokens",
                period,
                &[ada.clone(), UserId::from_stored("eco_usr_none".into())]
            )
            .await
            .unwrap(),
        vec![(ada.clone(), 1_000)]
    );

    // A route costing 10 leases at least 10, and nothing when fewer are left.
    let terms = LeaseTerms {
        cap: Some(1_015),
        max: 4,
        share: 16,
        need: 10,
    };
    let take = store
        .take_quota(&ada, "tokens", period, 0, terms)
        .await
        .unwrap();
    assert_eq!(
        take,
        QuotaTake {
            taken: 10,
            count: 1_010
        }
    );
    let take = store
        .take_quota(&ada, "tokens", period, 0, terms)
        .await
        .unwrap();
    assert_eq!(
        take,
        QuotaTake {
            taken: 0,
            count: 1_010
        }
    );
    let counts = store
        .apply_quota_deltas(&[
            QuotaDelta {
                user_id: ada.clone(),
                meter: Arc::from("tokens"),
                period_start: period,
                delta: -10,
            },
            QuotaDelta {
                user_id: ada.clone(),
                meter: Arc::from(API_CALLS),
                period_start: period,
                delta: 2,
            },
        ])
        .await
        .unwrap();
    assert_eq!(counts, vec![1_000, 3]);

    // A counter that lost counts is found below the stored usage and raised to it.
    store
        .apply_quota_deltas(&[QuotaDelta {
            user_id: ada.clone(),
            meter: Arc::from("tokens"),
            period_start: period,
            delta: -400,
        }])
        .await
        .unwrap();
    assert_eq!(
        store.counters_below_stored("tokens", period).await.unwrap(),
        vec![(ada.clone(), 1_000)]
    );
    assert!(
        store
            .counters_below_stored("images", period)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .raise_quota_counters("tokens", period, &[(ada.clone(), 1_000)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.quota_count(&ada, "tokens", period).await.unwrap(),
        1_000
    );
    assert_eq!(store.quota_count(&ada, API_CALLS, period).await.unwrap(), 3);
}
