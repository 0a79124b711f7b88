//! The quota book: admission under concurrency, leases, sync, healing, on the memory store.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use time::macros::datetime;
use usage_core::caller::CallLimits;
use usage_core::catalog::API_CALLS;
use usage_core::quota::*;
use usage_core::repo::{
    ApiKeyRecord, ApiKeyRepository, IncludedCalls, LeaseTerms, QuotaCounterRepository, QuotaDelta,
    UsageRepository as _, User, UserRepository,
};
use usage_core::{
    ApiKeyId, BillingPeriod, Clock, ManualClock, OverLimit, Plan, PlanCatalog, PlanTerms,
    RepoError, UsageEvent, UserId,
};
use usage_testkit::memory::MemoryStore;

fn catalog(free: u64, pro: u64) -> PlanCatalog {
    let d = PlanCatalog::default();
    PlanCatalog {
        free: PlanTerms {
            monthly_calls: Some(free),
            ..d.free
        },
        pro: PlanTerms {
            monthly_calls: Some(pro),
            ..d.pro
        },
        ..d
    }
}

/// A quota book admitting each call under the limits `plans` give its plan, as the key
/// cache resolves them for the door.
struct Book {
    inner: QuotaBook,
    plans: PlanCatalog,
}

impl Book {
    fn new(
        counters: Arc<dyn QuotaCounterRepository>,
        plans: PlanCatalog,
        clock: Arc<dyn Clock>,
        settings: QuotaSettings,
    ) -> Self {
        Self {
            inner: QuotaBook::new(counters, clock, settings),
            plans,
        }
    }

    fn limits(&self, plan: &Plan) -> CallLimits {
        let terms = self.plans.terms(plan).expect("a built-in plan");
        CallLimits {
            included: terms.monthly_calls,
            over_limit: terms.over_limit,
            burst: None,
            units: None,
        }
    }

    async fn admit(&self, user: &UserId, plan: Plan) -> Result<QuotaDecision, RepoError> {
        self.inner.admit(user, &self.limits(&plan)).await
    }

    async fn admit_at(
        &self,
        user: &UserId,
        plan: Plan,
        at: OffsetDateTime,
    ) -> Result<QuotaDecision, RepoError> {
        self.inner.admit_at(user, &self.limits(&plan), at).await
    }
}

impl std::ops::Deref for Book {
    type Target = QuotaBook;

    fn deref(&self) -> &QuotaBook {
        &self.inner
    }
}

async fn user_with_stored_calls(store: &MemoryStore, at: OffsetDateTime, calls: usize) -> UserId {
    let user = User {
        id: UserId::generate(),
        email: format!("{}@example.com", usage_core::ids::random_base62(8)).to_lowercase(),
        plan: Plan::free(),
        stripe_customer_id: None,
        created_at: at,
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
        prefix: "eco_live_x".into(),
        key_hash: usage_core::ids::random_base62(64),
        created_at: at,
        last_used_at: None,
        revoked_at: None,
        expires_at: None,
    };
    store.create_api_key(&key).await.unwrap();
    let events: Vec<UsageEvent> = (0..calls)
        .map(|i| UsageEvent {
            event_id: usage_core::event::new_event_id(at),
            user_id: user.id.clone(),
            api_key_id: key.id.clone(),
            endpoint: "/api/v1/ping".into(),
            method: "GET".into(),
            status_code: 200,
            response_time_ms: 1,
            created_at: at + time::Duration::milliseconds(i as i64),
            units: Default::default(),
        })
        .collect();
    store
        .record_usage(&events, &IncludedCalls::new())
        .await
        .unwrap();
    user.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn free_gets_exactly_the_limit_under_concurrency() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let book = Arc::new(Book::new(
        store,
        catalog(100, 1_000),
        clock,
        QuotaSettings::default(),
    ));

    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (book, user) = (Arc::clone(&book), user.clone());
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0;
            for _ in 0..10 {
                if matches!(
                    book.admit(&user, Plan::free()).await.unwrap(),
                    QuotaDecision::Admitted(_)
                ) {
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, 100, "exactly the limit, not one more");
    assert_eq!(
        book.used(&user).await.unwrap(),
        100,
        "rejected calls are not counted"
    );
    let QuotaDecision::Rejected(status) = book.admit(&user, Plan::free()).await.unwrap() else {
        panic!("over the limit");
    };
    assert_eq!((status.limit, status.remaining()), (Some(100), Some(0)));
    assert_eq!(status.reset_at, datetime!(2026-12-01 00:00 UTC));
}

#[tokio::test]
async fn counts_start_from_the_stored_counter_and_roll_over_at_month_end() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-30 23:59:59 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 8).await;
    let book = Book::new(
        store,
        catalog(10, 1_000),
        clock.clone(),
        QuotaSettings::default(),
    );

    // 8 stored before this instance started: 2 left.
    assert!(
        matches!(book.admit(&user, Plan::free()).await.unwrap(), QuotaDecision::Admitted(s) if s.used == 9)
    );
    assert!(
        matches!(book.admit(&user, Plan::free()).await.unwrap(), QuotaDecision::Admitted(s) if s.remaining() == Some(0))
    );
    assert!(matches!(
        book.admit(&user, Plan::free()).await.unwrap(),
        QuotaDecision::Rejected(_)
    ));

    clock.set(datetime!(2026-12-01 00:00 UTC));
    let QuotaDecision::Admitted(status) = book.admit(&user, Plan::free()).await.unwrap() else {
        panic!("a new month starts from zero");
    };
    assert_eq!(
        (status.used, status.reset_at),
        (1, datetime!(2027-01-01 00:00 UTC))
    );
}

#[tokio::test]
async fn a_call_counts_in_the_month_it_arrived_in() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-12-01 00:00:00.001 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let book = Book::new(store, catalog(10, 1_000), clock, QuotaSettings::default());
    let arrived = datetime!(2026-11-30 23:59:59.999 UTC);
    let QuotaDecision::Admitted(status) =
        book.admit_at(&user, Plan::free(), arrived).await.unwrap()
    else {
        panic!("admitted");
    };
    assert_eq!(
        status.reset_at,
        datetime!(2026-12-01 00:00 UTC),
        "counted in November"
    );
    assert_eq!(
        book.used(&user).await.unwrap(),
        0,
        "December has nothing yet"
    );
    // Calls of both months interleave around midnight; neither count is lost.
    book.admit(&user, Plan::free()).await.unwrap();
    book.admit_at(&user, Plan::free(), arrived).await.unwrap();
    book.admit(&user, Plan::free()).await.unwrap();
    let QuotaDecision::Admitted(nov) = book.admit_at(&user, Plan::free(), arrived).await.unwrap()
    else {
        panic!("admitted");
    };
    assert_eq!(nov.used, 3);
    assert_eq!(book.used(&user).await.unwrap(), 2);
}

#[tokio::test]
async fn pro_goes_on_past_its_limit_and_enterprise_has_none() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let book = Book::new(store, catalog(1, 2), clock, QuotaSettings::default());
    let mut last = None;
    for _ in 0..5 {
        let QuotaDecision::Admitted(status) = book.admit(&user, Plan::pro()).await.unwrap() else {
            panic!("pro is never blocked");
        };
        last = Some(status);
    }
    let last = last.unwrap();
    assert_eq!((last.used, last.remaining()), (5, Some(0)));
    assert_eq!(book.plans.overage_calls(&Plan::pro(), last.used), 3);

    let other = UserId::generate();
    let QuotaDecision::Admitted(status) = book.admit(&other, Plan::enterprise()).await.unwrap()
    else {
        panic!("enterprise is never blocked");
    };
    assert_eq!((status.limit, status.remaining()), (None, None));
}

#[tokio::test]
async fn lost_counts_are_healed_and_late_pushes_are_not_counted_twice() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let period = BillingPeriod::containing(clock.now()).start();
    let book = Book::new(
        store.clone(),
        catalog(1_000_000, 1_000),
        clock.clone(),
        QuotaSettings::default(),
    );
    assert_eq!(book.used(&user).await.unwrap(), 0);
    // 30 calls are stored (a killed instance's spool replayed) whose counts never
    // reached the counter; 10 of them are in fact still pending in a live instance.
    let key = store.api_keys_for_user(&user).await.unwrap().remove(0).id;
    let events: Vec<UsageEvent> = (0..30)
        .map(|_| UsageEvent {
            event_id: usage_core::event::new_event_id(clock.now()),
            user_id: user.clone(),
            api_key_id: key.clone(),
            endpoint: "/api/v1/ping".into(),
            method: "GET".into(),
            status_code: 200,
            response_time_ms: 1,
            created_at: clock.now(),
            units: Default::default(),
        })
        .collect();
    store
        .record_usage(&events, &IncludedCalls::new())
        .await
        .unwrap();

    // The first look raises nothing: the shortfall may be counts not yet pushed.
    let (raised, snapshot) = book.heal(None).await.unwrap();
    assert_eq!(raised, 0);
    assert!(snapshot.is_some());
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        0
    );
    // Too soon to tell: kept, nothing raised.
    clock.advance(time::Duration::seconds(5));
    let (raised, snapshot) = book.heal(snapshot).await.unwrap();
    assert_eq!(raised, 0);
    // The live instance pushes its 10.
    store
        .apply_quota_deltas(&[QuotaDelta {
            user_id: user.clone(),
            meter: Arc::from(API_CALLS),
            period_start: period,
            delta: 10,
        }])
        .await
        .unwrap();
    // Once every pending count has had its time: the 20 lost are added, not 30 more.
    clock.advance(time::Duration::seconds(6));
    let (raised, snapshot) = book.heal(snapshot).await.unwrap();
    assert_eq!(raised, 1);
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        30
    );
    assert_eq!(book.used(&user).await.unwrap(), 30);
    assert_eq!(snapshot, None, "nothing left below its stored calls");
    // A snapshot of another period is dropped, not applied.
    let stale = HealSnapshot {
        at: clock.now(),
        period: BillingPeriod::containing(clock.now()).next(),
        floors: vec![(user.clone(), 1_000)],
    };
    clock.advance(time::Duration::minutes(5));
    assert_eq!(book.heal(Some(stale)).await.unwrap(), (0, None));
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        30
    );
}

fn two_instances(
    store: &Arc<MemoryStore>,
    clock: &Arc<ManualClock>,
    free: u64,
    settings: QuotaSettings,
) -> (Arc<Book>, Arc<Book>) {
    let book = || {
        Arc::new(Book::new(
            store.clone(),
            catalog(free, 1_000),
            clock.clone(),
            settings,
        ))
    };
    (book(), book())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_store_admit_exactly_the_limit() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 5).await;
    let (a, b) = two_instances(&store, &clock, 1_000, QuotaSettings::default());
    let mut tasks = Vec::new();
    for i in 0..64 {
        let book = if i % 2 == 0 { a.clone() } else { b.clone() };
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..40 {
                if let QuotaDecision::Admitted(s) = book.admit(&user, Plan::free()).await.unwrap() {
                    assert!(s.used <= 1_000);
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(
        admitted, 995,
        "5 stored before, 995 admitted across both, not one more"
    );
    assert_eq!(
        store
            .quota_count(
                &user,
                API_CALLS,
                BillingPeriod::containing(clock.now()).start(),
            )
            .await
            .unwrap(),
        1_000
    );
    assert!(
        matches!(a.admit(&user, Plan::free()).await.unwrap(), QuotaDecision::Rejected(s) if s.remaining() == Some(0))
    );
    assert!(matches!(
        b.admit(&user, Plan::free()).await.unwrap(),
        QuotaDecision::Rejected(_)
    ));
}

#[tokio::test]
async fn an_idle_lease_goes_back_to_the_other_instance() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let settings = QuotaSettings {
        lease_share: 2,
        ..QuotaSettings::default()
    };
    let (a, b) = two_instances(&store, &clock, 100, settings);
    // A leases half of the 100 and admits one.
    assert!(
        matches!(a.admit(&user, Plan::free()).await.unwrap(), QuotaDecision::Admitted(s) if s.used == 1)
    );
    // B gets the rest, then is refused while A sits on 49 unspent calls.
    let mut on_b = 0;
    while let QuotaDecision::Admitted(_) = b.admit(&user, Plan::free()).await.unwrap() {
        on_b += 1;
    }
    assert_eq!(on_b, 50);
    // Not idle yet: A keeps its lease.
    assert_eq!(a.sync(false).await.unwrap(), SyncReport::default());
    // Idle for two sync intervals: A gives it back, and B admits it once its short
    // refusal has run out.
    clock.advance(time::Duration::seconds(2));
    assert_eq!(
        a.sync(false).await.unwrap(),
        SyncReport {
            pushed: 0,
            released: 49
        }
    );
    let mut more = 0;
    while let QuotaDecision::Admitted(_) = b.admit(&user, Plan::free()).await.unwrap() {
        more += 1;
    }
    assert_eq!(
        more, 49,
        "every one of the 100 calls is admitted in the end"
    );
    assert_eq!(b.used(&user).await.unwrap(), 100);
    assert_eq!(a.used(&user).await.unwrap(), 100);
}

#[tokio::test]
async fn a_quiet_users_calls_wait_for_more_or_for_push_within() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (a, b) = two_instances(&store, &clock, 10, QuotaSettings::default());
    let calls = async |n: u64| {
        for _ in 0..n {
            a.admit(&user, Plan::pro()).await.unwrap();
        }
    };
    let pushed = async |release_all| a.sync(release_all).await.unwrap().pushed;
    calls(3).await;
    assert_eq!(pushed(false).await, 3, "a user's first count goes at once");
    calls(PUSH_AT_CALLS - 1).await;
    assert_eq!(
        pushed(false).await,
        0,
        "fifteen calls, pushed moments ago: they wait"
    );
    clock.advance(time::Duration::seconds(9));
    assert_eq!(pushed(false).await, 0);
    assert_eq!(b.used(&user).await.unwrap(), 3);
    clock.advance(time::Duration::seconds(1));
    assert_eq!(pushed(false).await, 15, "ten seconds after the last push");
    assert_eq!(b.used(&user).await.unwrap(), 18);
    calls(PUSH_AT_CALLS).await;
    assert_eq!(pushed(false).await, 16, "sixteen go at the next sync");
    calls(1).await;
    assert_eq!(pushed(true).await, 1, "and everything at shutdown");
    assert_eq!(b.used(&user).await.unwrap(), 35);
}

#[tokio::test]
async fn counts_of_plans_that_never_block_reach_the_other_instance() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (a, b) = two_instances(&store, &clock, 10, QuotaSettings::default());
    for _ in 0..7 {
        a.admit(&user, Plan::pro()).await.unwrap();
    }
    assert_eq!(b.used(&user).await.unwrap(), 0, "not pushed yet");
    assert_eq!(
        a.sync(false).await.unwrap(),
        SyncReport {
            pushed: 7,
            released: 0
        }
    );
    assert_eq!(b.used(&user).await.unwrap(), 7);
    let QuotaDecision::Admitted(status) = b.admit(&user, Plan::pro()).await.unwrap() else {
        panic!("pro is never blocked");
    };
    assert_eq!(status.used, 8);

    // Moved to free with 8 used (one not pushed yet, on B): 2 left, across both.
    let mut admitted = 0;
    for book in [&a, &b, &a, &b, &a] {
        if let QuotaDecision::Admitted(_) = book.admit(&user, Plan::free()).await.unwrap() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2);
}

#[tokio::test]
async fn idle_users_are_forgotten_and_their_counts_carry_on() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let settings = QuotaSettings::default();
    let book = Book::new(
        store.clone(),
        catalog(1_000, 1_000),
        clock.clone(),
        settings,
    );
    let mut users = Vec::new();
    for _ in 0..50 {
        users.push(user_with_stored_calls(&store, clock.now(), 0).await);
    }
    let free = user_with_stored_calls(&store, clock.now(), 0).await;
    for user in &users {
        book.admit(user, Plan::pro()).await.unwrap();
    }
    book.admit(&free, Plan::free()).await.unwrap();
    assert_eq!(book.users_in_memory(), 51);
    // Pushed, but not idle long enough: kept.
    book.sync(false).await.unwrap();
    assert_eq!(book.users_in_memory(), 51);
    // One of them keeps calling; the others go quiet past the idle time.
    clock.advance(time::Duration::seconds(200));
    book.admit(&users[0], Plan::pro()).await.unwrap();
    clock.advance(time::Duration::seconds(101));
    let report = book.sync(false).await.unwrap();
    assert_eq!(report.pushed, 1);
    assert!(
        report.released > 0,
        "the free user's idle lease went back first"
    );
    assert_eq!(
        book.users_in_memory(),
        1,
        "only the user still calling is kept"
    );
    // A forgotten user's next call starts from the shared counter.
    let QuotaDecision::Admitted(status) = book.admit(&users[7], Plan::pro()).await.unwrap() else {
        panic!("pro is never blocked");
    };
    assert_eq!(status.used, 2);
    let QuotaDecision::Admitted(status) = book.admit(&free, Plan::free()).await.unwrap() else {
        panic!("free has calls left");
    };
    assert_eq!(status.used, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_being_served_is_never_forgotten() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (counters, book) = flaky_book(&store, &clock, 10, QuotaSettings::default());
    // A call waits inside its lease (looked up, not yet counted) while the syncs run.
    counters.lease_gated.store(true, Ordering::SeqCst);
    let call = {
        let (book, user) = (Arc::clone(&book), user.clone());
        tokio::spawn(async move { book.admit(&user, Plan::free()).await })
    };
    tokio::time::timeout(Duration::from_secs(10), counters.inside.notified())
        .await
        .expect("the call leases");
    clock.advance(time::Duration::minutes(10));
    let sync = tokio::time::timeout(Duration::from_secs(10), book.sync(false));
    sync.await
        .expect("a sync does not wait for a call")
        .unwrap();
    assert_eq!(
        book.users_in_memory(),
        1,
        "idle by the clock, but being served"
    );
    counters.lease_gated.store(false, Ordering::SeqCst);
    counters.go.notify_one();
    assert!(matches!(
        call.await.unwrap().unwrap(),
        QuotaDecision::Admitted(_)
    ));
    book.sync(false).await.unwrap();
    clock.advance(time::Duration::minutes(10));
    book.sync(false).await.unwrap();
    assert_eq!(book.users_in_memory(), 0);
    assert_eq!(book.used(&user).await.unwrap(), 1);
}

#[tokio::test]
async fn shutdown_gives_every_unspent_lease_back() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (a, b) = two_instances(&store, &clock, 1_000, QuotaSettings::default());
    a.admit(&user, Plan::free()).await.unwrap();
    let period = BillingPeriod::containing(clock.now()).start();
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        62,
        "a lease of 62"
    );
    assert_eq!(
        a.sync(true).await.unwrap(),
        SyncReport {
            pushed: 0,
            released: 61
        }
    );
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        1
    );
    assert_eq!(b.used(&user).await.unwrap(), 1);
}

/// Counters that fail while `down` is set, counting the calls that reach them; while
/// `gated` is set, a batch of deltas waits inside (`inside` is told) for `go`.
struct FlakyCounters {
    inner: Arc<MemoryStore>,
    down: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
    gated: std::sync::atomic::AtomicBool,
    /// While set, a lease waits inside the same way.
    lease_gated: std::sync::atomic::AtomicBool,
    inside: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

impl FlakyCounters {
    fn new(inner: Arc<MemoryStore>) -> Self {
        Self {
            inner,
            down: false.into(),
            calls: AtomicU64::new(0),
            gated: false.into(),
            lease_gated: false.into(),
            inside: tokio::sync::Notify::new(),
            go: tokio::sync::Notify::new(),
        }
    }

    fn check(&self) -> Result<(), RepoError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(RepoError::Unavailable("connection refused".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl QuotaCounterRepository for FlakyCounters {
    async fn quota_count(&self, u: &UserId, m: &str, p: OffsetDateTime) -> Result<u64, RepoError> {
        self.check()?;
        self.inner.quota_count(u, m, p).await
    }
    async fn quota_counts(
        &self,
        m: &str,
        p: OffsetDateTime,
        users: &[UserId],
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        self.check()?;
        self.inner.quota_counts(m, p, users).await
    }
    async fn take_quota(
        &self,
        u: &UserId,
        m: &str,
        p: OffsetDateTime,
        add: u64,
        lease: LeaseTerms,
    ) -> Result<usage_core::repo::QuotaTake, RepoError> {
        self.check()?;
        if self.lease_gated.load(Ordering::SeqCst) {
            self.inside.notify_one();
            self.go.notified().await;
        }
        self.inner.take_quota(u, m, p, add, lease).await
    }
    async fn apply_quota_deltas(&self, d: &[QuotaDelta]) -> Result<Vec<u64>, RepoError> {
        self.check()?;
        if self.gated.load(Ordering::SeqCst) {
            self.inside.notify_one();
            self.go.notified().await;
        }
        self.inner.apply_quota_deltas(d).await
    }
    async fn counters_below_stored(
        &self,
        m: &str,
        p: OffsetDateTime,
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        self.check()?;
        self.inner.counters_below_stored(m, p).await
    }
    async fn raise_quota_counters(
        &self,
        m: &str,
        p: OffsetDateTime,
        floors: &[(UserId, u64)],
    ) -> Result<u64, RepoError> {
        self.check()?;
        self.inner.raise_quota_counters(m, p, floors).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_during_a_sync_counts_each_call_once() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let counters = Arc::new(FlakyCounters::new(store.clone()));
    counters.gated.store(true, Ordering::SeqCst);
    let book = Arc::new(Book::new(
        counters.clone(),
        catalog(1_000, 10_000),
        clock.clone(),
        QuotaSettings::default(),
    ));
    for _ in 0..50 {
        book.admit(&user, Plan::pro()).await.unwrap();
    }
    // A sync is pushing the 50 pro calls when the user, now on free, needs a lease:
    // the lease must not push the same 50 again.
    let sync = tokio::spawn({
        let book = Arc::clone(&book);
        async move { book.sync(false).await }
    });
    counters.inside.notified().await;
    let free_call = tokio::spawn({
        let (book, user) = (Arc::clone(&book), user.clone());
        async move { book.admit(&user, Plan::free()).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    counters.go.notify_one();
    assert_eq!(sync.await.unwrap().unwrap().pushed, 50);
    assert!(matches!(
        free_call.await.unwrap().unwrap(),
        QuotaDecision::Admitted(QuotaStatus { used: 51, .. })
    ));
    let last_sync = tokio::spawn({
        let book = Arc::clone(&book);
        async move { book.sync(true).await }
    });
    counters.go.notify_one();
    last_sync.await.unwrap().unwrap();
    let period = BillingPeriod::containing(clock.now()).start();
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        51
    );
    assert_eq!(book.used(&user).await.unwrap(), 51);
}

#[tokio::test]
async fn through_a_database_outage_leases_and_counts_carry_on_and_nothing_is_lost() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let free = user_with_stored_calls(&store, clock.now(), 0).await;
    let pro = user_with_stored_calls(&store, clock.now(), 0).await;
    let counters = Arc::new(FlakyCounters::new(store.clone()));
    let book = Book::new(
        counters.clone(),
        catalog(1_000, 10),
        clock.clone(),
        QuotaSettings::default(),
    );
    let admitted =
        |d: Result<QuotaDecision, RepoError>| matches!(d, Ok(QuotaDecision::Admitted(_)));
    assert!(admitted(book.admit(&free, Plan::free()).await)); // leases 62
    assert!(admitted(book.admit(&pro, Plan::pro()).await));
    counters.down.store(true, Ordering::SeqCst);
    let calls = counters.calls.load(Ordering::SeqCst);
    // The lease in hand and the plans that never block carry on without the database.
    for _ in 0..61 {
        assert!(admitted(book.admit(&free, Plan::free()).await));
    }
    for _ in 0..20 {
        assert!(admitted(book.admit(&pro, Plan::pro()).await));
    }
    assert_eq!(counters.calls.load(Ordering::SeqCst), calls);
    // Lease spent: one try, then failing at once for a second.
    assert!(book.admit(&free, Plan::free()).await.is_err());
    assert!(book.admit(&free, Plan::free()).await.is_err());
    assert_eq!(counters.calls.load(Ordering::SeqCst), calls + 1);
    assert!(book.sync(false).await.is_err());
    clock.advance(time::Duration::seconds(2));
    assert!(book.admit(&free, Plan::free()).await.is_err());
    assert_eq!(counters.calls.load(Ordering::SeqCst), calls + 3);

    counters.down.store(false, Ordering::SeqCst);
    clock.advance(time::Duration::seconds(2));
    assert!(admitted(book.admit(&free, Plan::free()).await));
    assert_eq!(
        book.sync(true).await.unwrap(),
        SyncReport {
            pushed: 21,
            released: 57
        }
    );
    let period = BillingPeriod::containing(clock.now()).start();
    assert_eq!(
        store.quota_count(&pro, API_CALLS, period).await.unwrap(),
        21,
        "no count lost"
    );
    assert_eq!(
        store.quota_count(&free, API_CALLS, period).await.unwrap(),
        63
    );
}

fn flaky_book(
    store: &Arc<MemoryStore>,
    clock: &Arc<ManualClock>,
    free: u64,
    settings: QuotaSettings,
) -> (Arc<FlakyCounters>, Arc<Book>) {
    let counters = Arc::new(FlakyCounters::new(store.clone()));
    let book = Arc::new(Book::new(
        counters.clone(),
        catalog(free, 1_000),
        clock.clone(),
        settings,
    ));
    (counters, book)
}

#[tokio::test]
async fn after_a_failure_the_database_is_asked_again_one_second_later_to_the_millisecond() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (counters, book) = flaky_book(&store, &clock, 1_000, QuotaSettings::default());
    counters.down.store(true, Ordering::SeqCst);
    assert!(book.admit(&user, Plan::free()).await.is_err());
    let calls = counters.calls.load(Ordering::SeqCst);
    counters.down.store(false, Ordering::SeqCst);
    clock.advance(time::Duration::milliseconds(FAILURE_HOLD_MS - 1));
    assert!(
        book.admit(&user, Plan::free()).await.is_err(),
        "still held: fails at once"
    );
    assert_eq!(counters.calls.load(Ordering::SeqCst), calls, "not asked");
    clock.advance(time::Duration::milliseconds(1));
    assert!(matches!(
        book.admit(&user, Plan::free()).await.unwrap(),
        QuotaDecision::Admitted(QuotaStatus { used: 1, .. })
    ));
    // The counter read that failed, then the lease.
    assert_eq!(counters.calls.load(Ordering::SeqCst), calls + 2);
}

#[tokio::test]
async fn a_user_at_the_limit_is_refused_from_memory_until_one_sync_interval_has_passed() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 10).await;
    let (counters, book) = flaky_book(&store, &clock, 10, QuotaSettings::default());
    assert!(matches!(
        book.admit(&user, Plan::free()).await.unwrap(),
        QuotaDecision::Rejected(_)
    ));
    let calls = counters.calls.load(Ordering::SeqCst);
    clock.advance(time::Duration::milliseconds(499));
    assert!(matches!(
        book.admit(&user, Plan::free()).await.unwrap(),
        QuotaDecision::Rejected(QuotaStatus { used: 10, .. })
    ));
    assert_eq!(counters.calls.load(Ordering::SeqCst), calls, "not asked");
    // At 500 ms exactly the counter is read again (and still full).
    clock.advance(time::Duration::milliseconds(1));
    assert!(matches!(
        book.admit(&user, Plan::free()).await.unwrap(),
        QuotaDecision::Rejected(_)
    ));
    assert_eq!(counters.calls.load(Ordering::SeqCst), calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_waited_for_another_calls_lease_spends_it_instead_of_leasing_again() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (counters, book) = flaky_book(&store, &clock, 1_000, QuotaSettings::default());
    counters.lease_gated.store(true, Ordering::SeqCst);
    let call = |book: &Arc<Book>| {
        let (book, user) = (Arc::clone(book), user.clone());
        tokio::spawn(async move { book.admit(&user, Plan::free()).await })
    };
    let first = call(&book);
    counters.inside.notified().await;
    // The second call finds no lease and waits for the first one's.
    let second = call(&book);
    tokio::time::sleep(Duration::from_millis(50)).await;
    counters.lease_gated.store(false, Ordering::SeqCst);
    counters.go.notify_one();
    for call in [first, second] {
        assert!(matches!(
            call.await.unwrap().unwrap(),
            QuotaDecision::Admitted(_)
        ));
    }
    let period = BillingPeriod::containing(clock.now()).start();
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        62,
        "one lease of 62 (1,000 / 16), not two"
    );
}

#[tokio::test]
async fn idle_users_are_looked_for_every_quarter_of_the_idle_time_and_forgotten_after_it() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let settings = QuotaSettings {
        forget_idle_after: Duration::from_millis(4_000),
        ..QuotaSettings::default()
    };
    let book = Book::new(store.clone(), catalog(10, 1_000), clock.clone(), settings);
    let start = clock.now();
    let sync_at = |ms: i64| {
        clock.set(start + time::Duration::milliseconds(ms));
        book.sync(false)
    };
    book.admit(&user, Plan::pro()).await.unwrap();
    // Passes at 0, 1,000, 2,000, 3,000 and 4,000 ms (a quarter of 4 s): at 4,000 the
    // user has been idle for exactly the idle time, which is not yet past it.
    for ms in [0, 1_000, 2_000, 3_000, 4_000] {
        assert_eq!(sync_at(ms).await.unwrap().pushed, u64::from(ms == 0));
        assert_eq!(book.users_in_memory(), 1, "kept at {ms} ms");
    }
    // No pass before the next quarter, although the user is idle by then.
    sync_at(4_999).await.unwrap();
    assert_eq!(book.users_in_memory(), 1, "no pass at 4,999 ms");
    sync_at(5_000).await.unwrap();
    assert_eq!(
        book.users_in_memory(),
        0,
        "forgotten at the pass of 5,000 ms"
    );
}

#[tokio::test]
async fn an_unused_lease_goes_back_once_idle_for_more_than_two_sync_intervals() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let book = Book::new(
        store.clone(),
        catalog(1_000, 1_000),
        clock.clone(),
        QuotaSettings::default(),
    );
    book.admit(&user, Plan::free()).await.unwrap(); // leases 62, spends 1
    let start = clock.now();
    for ms in [500, 1_000] {
        clock.set(start + time::Duration::milliseconds(ms));
        assert_eq!(
            book.sync(false).await.unwrap(),
            SyncReport::default(),
            "kept at {ms} ms"
        );
    }
    clock.set(start + time::Duration::milliseconds(1_001));
    assert_eq!(
        book.sync(false).await.unwrap(),
        SyncReport {
            pushed: 0,
            released: 61
        }
    );
}

#[test]
fn the_book_debugs_as_its_settings() {
    let book = QuotaBook::new(
        Arc::new(MemoryStore::new()),
        Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC))),
        QuotaSettings::default(),
    );
    let text = format!("{book:?}");
    assert!(text.starts_with("QuotaBook {"), "{text}");
    assert!(text.contains("sync_every: 500ms"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_routes_cost_is_taken_whole_and_never_past_the_limit_across_two_instances() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (a, b) = two_instances(&store, &clock, 1_000, QuotaSettings::default());
    let credits: Arc<str> = Arc::from("credits");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let book = if i % 2 == 0 {
            a.meter(&credits)
        } else {
            b.meter(&credits)
        };
        let (user, clock) = (user.clone(), clock.clone());
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..10 {
                let decision = book
                    .take_at(&user, Some(1_000), OverLimit::Block, clock.now(), 10)
                    .await
                    .unwrap();
                if let QuotaDecision::Admitted(s) = decision {
                    assert!(s.used <= 1_000, "{s:?}");
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    // Each instance may hold fewer than 10 it cannot use; none is admitted past 1,000.
    assert!((99..=100).contains(&admitted), "{admitted} calls of 10");
    let period = BillingPeriod::containing(clock.now()).start();
    assert!(store.quota_count(&user, "credits", period).await.unwrap() <= 1_000);
    assert_eq!(
        store.quota_count(&user, API_CALLS, period).await.unwrap(),
        0,
        "the calls' counter is another"
    );
    // A cost given back (another limit refused the call) is taken again, not leased.
    let other = user_with_stored_calls(&store, clock.now(), 0).await;
    let book = a.meter(&credits);
    let take = async || {
        book.take_at(&other, Some(1_000), OverLimit::Block, clock.now(), 10)
            .await
            .unwrap()
    };
    assert!(matches!(take().await, QuotaDecision::Admitted(s) if s.used == 10));
    let counted = store.quota_count(&other, "credits", period).await.unwrap();
    book.give_back(&other, Some(1_000), OverLimit::Block, clock.now(), 10);
    assert!(matches!(take().await, QuotaDecision::Admitted(s) if s.used == 10));
    assert_eq!(
        store.quota_count(&other, "credits", period).await.unwrap(),
        counted,
        "taken from what was given back"
    );
}

#[tokio::test]
async fn units_reported_after_admission_refuse_the_next_call_on_every_instance() {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
    let user = user_with_stored_calls(&store, clock.now(), 0).await;
    let (a, b) = two_instances(&store, &clock, 1_000, QuotaSettings::default());
    let tokens: Arc<str> = Arc::from("tokens");
    let (ta, tb) = (a.meter(&tokens), b.meter(&tokens));
    let check = async |book: &QuotaBook| {
        book.take_at(&user, Some(1_000), OverLimit::Block, clock.now(), 0)
            .await
            .unwrap()
    };
    assert!(matches!(check(&ta).await, QuotaDecision::Admitted(s) if s.used == 0));
    assert!(matches!(check(&tb).await, QuotaDecision::Admitted(_)));
    // A's handler reports 1,200 tokens: stored and counted past the limit.
    ta.add(&user, clock.now(), 1_200);
    assert!(
        matches!(check(&ta).await, QuotaDecision::Rejected(s) if s.used == 1_200 && s.remaining() == Some(0))
    );
    // B learns of them once A pushed them and B read its counter again: a sync each.
    assert!(matches!(check(&tb).await, QuotaDecision::Admitted(_)));
    a.sync(false).await.unwrap();
    b.sync(false).await.unwrap();
    assert!(matches!(check(&tb).await, QuotaDecision::Rejected(s) if s.used == 1_200));
    let period = BillingPeriod::containing(clock.now()).start();
    assert_eq!(
        store.quota_count(&user, "tokens", period).await.unwrap(),
        1_200
    );
    // A plan that does not block counts them, and admits.
    let over = tb
        .take_at(&user, Some(1_000), OverLimit::Overage, clock.now(), 0)
        .await
        .unwrap();
    assert!(matches!(over, QuotaDecision::Admitted(s) if s.used == 1_200));
}
