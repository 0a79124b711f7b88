//! The usage tracker with in-memory repositories: batches by size and by time, retries
//! a failing store without losing or doubling events, waits when its queue is full, and
//! writes everything at shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use time::macros::datetime;
use usage_core::event::new_event_id;
use usage_core::repo::{
    ApiKeyRecord, ApiKeyRepository, DeadLetter, IncludedCalls, RecordOutcome, UsageRecord,
    UsageRepository, User, UserRepository,
};
use usage_core::tracker::{TrackedCall, TrackerConfig, UsageTracker};
use usage_core::{ApiKeyId, BillingPeriod, Plan, RepoError, UsageEvent, UserId};
use usage_testkit::memory::MemoryStore;

/// The memory store, failing the next `fail_next` writes as a database outage would.
struct FlakyStore {
    inner: MemoryStore,
    fail_next: AtomicU32,
    /// Each write takes this long (milliseconds), so that writes overlap.
    write_ms: AtomicU32,
    writing: AtomicU32,
    most_writing: AtomicU32,
    /// The customers of each write, in the order they started.
    batches: std::sync::Mutex<Vec<std::collections::BTreeSet<UserId>>>,
}

#[async_trait]
impl UsageRepository for FlakyStore {
    async fn record_usage(
        &self,
        events: &[UsageEvent],
        included: &IncludedCalls,
    ) -> Result<RecordOutcome, RepoError> {
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(RepoError::Unavailable("database is down".into()));
        }
        self.batches
            .lock()
            .unwrap()
            .push(events.iter().map(|e| e.user_id.clone()).collect());
        let now = self.writing.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_writing.fetch_max(now, Ordering::SeqCst);
        let ms = self.write_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
        let result = self.inner.record_usage(events, included).await;
        self.writing.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn usage_record(
        &self,
        user_id: &UserId,
        start: OffsetDateTime,
    ) -> Result<Option<UsageRecord>, RepoError> {
        self.inner.usage_record(user_id, start).await
    }

    async fn endpoint_stats(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<usage_core::repo::EndpointStats>, RepoError> {
        self.inner.endpoint_stats(user_id, from, to).await
    }

    async fn count_usage_events(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        self.inner.count_usage_events(user_id, from, to).await
    }

    async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), RepoError> {
        self.inner.record_dead_letters(letters).await
    }

    async fn dead_letters(
        &self,
        after: Option<uuid::Uuid>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError> {
        self.inner.dead_letters(after, limit).await
    }

    async fn remove_dead_letters(&self, event_ids: &[uuid::Uuid]) -> Result<u64, RepoError> {
        self.inner.remove_dead_letters(event_ids).await
    }

    async fn prepare_usage_storage(
        &self,
        now: OffsetDateTime,
        months_ahead: u32,
    ) -> Result<Vec<String>, RepoError> {
        self.inner.prepare_usage_storage(now, months_ahead).await
    }

    async fn prune_usage(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<usage_core::repo::UsagePrune, RepoError> {
        self.inner.prune_usage(before, dry_run).await
    }

    async fn usage_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<(OffsetDateTime, uuid::Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError> {
        self.inner
            .usage_events_page(user_id, from, to, after, limit)
            .await
    }
}

struct Fixture {
    store: Arc<FlakyStore>,
    user: UserId,
    key: ApiKeyId,
}

const T0: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

async fn fixture() -> Fixture {
    let store = Arc::new(FlakyStore {
        inner: MemoryStore::new(),
        fail_next: AtomicU32::new(0),
        write_ms: AtomicU32::new(0),
        writing: AtomicU32::new(0),
        most_writing: AtomicU32::new(0),
        batches: Default::default(),
    });
    let user = User {
        id: UserId::generate(),
        email: "ada@example.com".into(),
        plan: Plan::pro(),
        stripe_customer_id: None,
        created_at: T0,
        plan_subscription_id: None,
        blocked_at: None,
        plan_version: None,
        overrides: None,
    };
    store.inner.create_user(&user).await.unwrap();
    let key = add_key(&store, &user.id, "f".repeat(64)).await;
    Fixture {
        store,
        user: user.id,
        key,
    }
}

/// A new key of `user`, stored.
async fn add_key(store: &FlakyStore, user: &UserId, key_hash: String) -> ApiKeyId {
    let key = ApiKeyRecord {
        id: ApiKeyId::generate(),
        user_id: user.clone(),
        name: "k".into(),
        prefix: "eco_live_abcd".into(),
        key_hash,
        created_at: T0,
        last_used_at: None,
        revoked_at: None,
        expires_at: None,
    };
    store.inner.create_api_key(&key).await.unwrap();
    key.id
}

impl Fixture {
    fn start(&self, config: TrackerConfig) -> (UsageTracker, usage_core::tracker::TrackerWorker) {
        UsageTracker::start(
            self.store.clone(),
            Arc::new(KeysOf(self.store.clone())),
            config,
        )
    }

    fn call(&self, at: OffsetDateTime) -> TrackedCall {
        TrackedCall {
            event: UsageEvent {
                event_id: new_event_id(at),
                user_id: self.user.clone(),
                api_key_id: self.key.clone(),
                endpoint: "/api/v1/ping".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 2,
                created_at: at,
                units: Default::default(),
            },
            included_calls: Some(10),
        }
    }

    async fn stored(&self, at: OffsetDateTime) -> u64 {
        let period = BillingPeriod::containing(at);
        self.store
            .inner
            .count_usage_events(&self.user, period.start(), period.end())
            .await
            .unwrap()
    }

    async fn counter(&self, at: OffsetDateTime) -> Option<UsageRecord> {
        self.store
            .inner
            .usage_record(&self.user, BillingPeriod::containing(at).start())
            .await
            .unwrap()
    }
}

/// Key repository view of the flaky store (touching keys goes to the memory store).
struct KeysOf(Arc<FlakyStore>);

#[async_trait]
impl ApiKeyRepository for KeysOf {
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), RepoError> {
        self.0.inner.create_api_key(key).await
    }
    async fn issue_api_key(
        &self,
        key: &ApiKeyRecord,
        max_active: usize,
        retire: Option<&usage_core::repo::KeyRetirement>,
    ) -> Result<usage_core::repo::KeyIssue, RepoError> {
        self.0.inner.issue_api_key(key, max_active, retire).await
    }
    async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, RepoError> {
        self.0.inner.api_key_by_hash(hash).await
    }
    async fn api_key_and_plan_by_hash(
        &self,
        hash: &str,
    ) -> Result<Option<(ApiKeyRecord, usage_core::repo::Subscription)>, RepoError> {
        self.0.inner.api_key_and_plan_by_hash(hash).await
    }
    async fn api_keys_for_user(&self, user: &UserId) -> Result<Vec<ApiKeyRecord>, RepoError> {
        self.0.inner.api_keys_for_user(user).await
    }
    async fn revoke_api_key(
        &self,
        user: &UserId,
        key: &ApiKeyId,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, RepoError> {
        self.0.inner.revoke_api_key(user, key, at).await
    }
    async fn touch_api_keys(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), RepoError> {
        self.0.inner.touch_api_keys(used).await
    }
    async fn api_keys_retired_since(
        &self,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<ApiKeyId>, RepoError> {
        self.0.inner.api_keys_retired_since(since, now).await
    }
    async fn delete_api_key(&self, user: &UserId, key: &ApiKeyId) -> Result<bool, RepoError> {
        self.0.inner.delete_api_key(user, key).await
    }
    async fn api_keys_deleted_after(
        &self,
        after: i64,
    ) -> Result<usage_core::repo::DeletedKeys, RepoError> {
        self.0.inner.api_keys_deleted_after(after).await
    }
}

/// Waits (real time, bounded) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn config(batch_size: usize, flush_interval: Duration) -> TrackerConfig {
    TrackerConfig {
        batch_size,
        flush_interval,
        retry_initial: Duration::from_millis(5),
        retry_max: Duration::from_millis(20),
        ..TrackerConfig::default()
    }
}

#[tokio::test]
async fn writes_full_batches_and_the_rest_at_shutdown() {
    let f = fixture().await;
    let (tracker, worker) = f.start(config(10, Duration::from_secs(3600)));
    // A batch size or more waiting: all that waits is written.
    for i in 0..20 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    eventually("the waiting calls stored", async || {
        f.stored(T0).await == 20
    })
    .await;
    assert!(tracker.stats().flushes.load(Ordering::Relaxed) <= 2);
    // Fewer than a batch wait for a full batch or the interval; neither comes before shutdown.
    for i in 20..25 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.stored(T0).await, 20);
    assert_eq!(tracker.queue_depth(), 5);

    let report = worker.shutdown().await;
    assert_eq!(
        (
            report.flushed_at_shutdown,
            report.flushed_total,
            report.unwritten
        ),
        (5, 25, 0)
    );
    assert_eq!(f.stored(T0).await, 25);
    let counter = f.counter(T0).await.unwrap();
    assert_eq!((counter.api_calls, counter.overage_calls), (25, 15));
    assert!(
        tracker.track(f.call(T0)).await.is_err(),
        "no calls taken after shutdown"
    );
    let key = f
        .store
        .inner
        .api_keys_for_user(&f.user)
        .await
        .unwrap()
        .remove(0);
    // Written with the first batch; a later batch within a minute does not rewrite it.
    assert_eq!(
        key.last_used_at,
        Some(T0 + time::Duration::milliseconds(19))
    );
}

/// After a quiet spell, a call is written one interval after it arrives, not later:
/// the deadline must not run ahead while the queue is empty.
#[tokio::test(start_paused = true)]
async fn a_call_after_a_quiet_spell_is_written_within_one_interval() {
    let f = fixture().await;
    let (tracker, worker) = f.start(config(100, Duration::from_millis(1_000)));
    tokio::time::sleep(Duration::from_secs(60)).await;
    tracker.track(f.call(T0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(f.stored(T0).await, 0, "not before the interval");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.stored(T0).await, 1, "written once the interval passed");
    // And again after the write.
    tokio::time::sleep(Duration::from_secs(30)).await;
    tracker.track(f.call(T0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(f.stored(T0).await, 2);
    assert_eq!(worker.shutdown().await.flushed_at_shutdown, 0);
}

#[tokio::test(start_paused = true)]
async fn writes_by_time_when_the_batch_does_not_fill() {
    let f = fixture().await;
    let (tracker, worker) = f.start(config(100, Duration::from_millis(5_000)));
    for i in 0..3 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    assert_eq!(f.stored(T0).await, 0, "not before the interval");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.stored(T0).await, 3, "written once the interval passed");
    assert_eq!(tracker.stats().flushes.load(Ordering::Relaxed), 1);
    assert_eq!(worker.shutdown().await.flushed_at_shutdown, 0);
}

#[tokio::test]
async fn a_failing_store_is_retried_until_every_event_is_stored_once() {
    let f = fixture().await;
    f.store.fail_next.store(3, Ordering::SeqCst);
    let (tracker, worker) = f.start(config(10, Duration::from_secs(3600)));
    for i in 0..10 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    eventually("the batch stored after three failures", async || {
        f.stored(T0).await == 10
    })
    .await;
    assert_eq!(tracker.stats().flush_failures.load(Ordering::Relaxed), 3);
    assert_eq!(f.counter(T0).await.unwrap().api_calls, 10);
    let report = worker.shutdown().await;
    assert_eq!((report.flushed_total, report.unwritten), (10, 0));
}

#[tokio::test]
async fn a_full_queue_holds_the_caller_back_and_loses_nothing() {
    let f = fixture().await;
    f.store.fail_next.store(u32::MAX, Ordering::SeqCst); // down until further notice
    let (tracker, worker) = f.start(TrackerConfig {
        queue_capacity: 2,
        ..config(1, Duration::from_secs(3600))
    });
    // One call is taken into the (failing) batch, then two fill the queue.
    tracker.track(f.call(T0)).await.unwrap();
    eventually("the writer is retrying", async || {
        tracker.stats().flush_failures.load(Ordering::Relaxed) > 0
    })
    .await;
    for i in 1..3 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    assert_eq!(tracker.stats().queue_full_waits.load(Ordering::Relaxed), 0);
    assert_eq!(tracker.queue_depth(), 3);
    let blocked = {
        let (tracker, call) = (tracker.clone(), f.call(T0 + time::Duration::seconds(1)));
        tokio::spawn(async move { tracker.track(call).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!blocked.is_finished(), "the fourth call waits for room");
    assert_eq!(tracker.stats().queue_full_waits.load(Ordering::Relaxed), 1);

    f.store.fail_next.store(0, Ordering::SeqCst); // the database is back
    blocked.await.unwrap().unwrap();
    eventually("all four stored", async || f.stored(T0).await == 4).await;
    assert_eq!(worker.shutdown().await.unwritten, 0);
    assert_eq!(f.counter(T0).await.unwrap().api_calls, 4);
}

#[tokio::test]
async fn calls_across_month_end_count_in_their_own_periods() {
    let f = fixture().await;
    let (tracker, worker) = f.start(config(100, Duration::from_secs(3600)));
    let last = datetime!(2026-11-30 23:59:59.999 UTC);
    let first = datetime!(2026-12-01 00:00 UTC);
    for at in [last, last, first] {
        tracker.track(f.call(at)).await.unwrap();
    }
    worker.shutdown().await;
    assert_eq!(f.counter(last).await.unwrap().api_calls, 2);
    assert_eq!(f.counter(first).await.unwrap().api_calls, 1);
}

#[tokio::test]
async fn shutdown_gives_up_on_a_dead_store_and_says_how_many_were_not_written() {
    let f = fixture().await;
    f.store.fail_next.store(u32::MAX, Ordering::SeqCst);
    let (tracker, worker) = f.start(TrackerConfig {
        shutdown_retry_for: Duration::from_millis(100),
        ..config(2, Duration::from_secs(3600))
    });
    for i in 0..5 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    let report = worker.shutdown().await;
    assert_eq!((report.flushed_total, report.unwritten), (0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_store_every_event_once() {
    let f = fixture().await;
    f.store.fail_next.store(3, Ordering::SeqCst);
    f.store.write_ms.store(30, Ordering::SeqCst);
    let (tracker, worker) = f.start(TrackerConfig {
        concurrency: 4,
        ..config(50, Duration::from_millis(20))
    });
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (tracker, calls): (UsageTracker, Vec<TrackedCall>) = (
            tracker.clone(),
            (0..250)
                .map(|i| f.call(T0 + time::Duration::milliseconds(t * 1_000 + i)))
                .collect(),
        );
        tasks.push(tokio::spawn(async move {
            for (i, call) in calls.into_iter().enumerate() {
                tracker.track(call).await.unwrap();
                if i % 25 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = worker.shutdown().await;
    assert_eq!((report.flushed_total, report.unwritten), (2_000, 0));
    assert_eq!(f.stored(T0).await, 2_000);
    assert_eq!(f.counter(T0).await.unwrap().api_calls, 2_000);
    assert_eq!(tracker.stats().duplicates.load(Ordering::Relaxed), 0);
    let most = f.store.most_writing.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "{most} writes at once");
}

/// With several writers, each customer's calls wait in one lane: batches written at the
/// same time hold different customers (each counter is updated by one of them, and no
/// writer waits on another's rows), and every lane is written at once.
#[tokio::test(start_paused = true)]
async fn each_customers_calls_go_to_one_writer_and_the_writers_run_at_once() {
    let f = fixture().await;
    f.store.write_ms.store(1_000, Ordering::SeqCst);
    let mut callers = Vec::new();
    for i in 0..30 {
        let user = User {
            id: UserId::generate(),
            email: format!("c{i}@example.com"),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: T0,
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        f.store.inner.create_user(&user).await.unwrap();
        let key = add_key(&f.store, &user.id, format!("{i:064}")).await;
        callers.push((user.id, key));
    }
    let (tracker, worker) = f.start(TrackerConfig {
        concurrency: 4,
        max_batch: 10_000,
        ..config(10, Duration::from_secs(3600))
    });
    // Ten calls from each customer, interleaved, all queued before any writer looks.
    for round in 0..10 {
        for (user, key) in &callers {
            let mut call = f.call(T0 + time::Duration::milliseconds(round));
            call.event.user_id = user.clone();
            call.event.api_key_id = key.clone();
            tracker.track(call).await.unwrap();
        }
    }
    let report = worker.shutdown().await;
    assert_eq!((report.flushed_total, report.unwritten), (300, 0));
    let batches = f.store.batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 4, "one batch per lane");
    let mut seen = std::collections::BTreeSet::new();
    for batch in &batches {
        for user in batch {
            assert!(seen.insert(user.clone()), "{user} written by two writers");
        }
    }
    assert_eq!(seen.len(), 30);
    assert_eq!(f.store.most_writing.load(Ordering::SeqCst), 4);
    for (user, _) in &callers {
        let counter = f
            .store
            .inner
            .usage_record(user, BillingPeriod::containing(T0).start())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(counter.api_calls, 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_mode_stores_after_a_crash_what_the_dead_store_never_got() {
    let f = fixture().await;
    let dir = std::env::temp_dir().join(format!(
        "usage-tracker-spool-{}",
        usage_core::ids::random_base62(10)
    ));
    let spool = usage_core::spool::SpoolConfig {
        dir: dir.clone(),
        calls_per_file: 4,
    };
    let start = |config| {
        UsageTracker::start_durable(
            f.store.clone(),
            Arc::new(KeysOf(f.store.clone())),
            config,
            &spool,
        )
        .unwrap()
    };
    // Three calls stored, then the database dies and seven more wait in memory.
    let (tracker, worker) = start(config(3, Duration::from_millis(20)));
    for i in 0..3 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    eventually("3 stored", async || f.stored(T0).await == 3).await;
    f.store.fail_next.store(u32::MAX, Ordering::SeqCst);
    for i in 3..10 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    // The process dies: no shutdown, the writer task is gone with what it held.
    worker.abort();
    drop(tracker);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.stored(T0).await, 3);

    // The next start replays the spool; the three already stored are not counted again
    // (their file had one unstored call, so it was replayed whole).
    f.store.fail_next.store(0, Ordering::SeqCst);
    let (tracker, worker) = start(config(3, Duration::from_millis(20)));
    tracker
        .track(f.call(T0 + time::Duration::milliseconds(10)))
        .await
        .unwrap();
    eventually("all 11 stored", async || f.stored(T0).await == 11).await;
    let report = worker.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(
        f.counter(T0).await.unwrap().api_calls,
        11,
        "none counted twice"
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "every spool file deleted once stored: {left:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn calls_the_store_refuses_for_good_become_dead_letters_and_the_rest_is_written() {
    let f = fixture().await;
    let (tracker, worker) = f.start(config(50, Duration::from_millis(20)));
    // Three calls of a user and a key that do not exist (a spool replayed against another
    // database, a row deleted by hand), spread through batches of good calls.
    let stranger = UserId::generate();
    let mut bad_ids = Vec::new();
    for i in 0..200 {
        let mut call = f.call(T0 + time::Duration::milliseconds(i));
        if i % 70 == 3 {
            call.event.user_id = stranger.clone();
            call.event.api_key_id = ApiKeyId::generate();
            bad_ids.push(call.event.event_id);
        }
        tracker.track(call).await.unwrap();
    }
    eventually("the good calls stored", async || f.stored(T0).await == 197).await;
    eventually("the bad calls kept", async || {
        tracker.stats().dead_letters.load(Ordering::Relaxed) == 3
    })
    .await;
    let letters = f.store.dead_letters(None, 100).await.unwrap();
    let mut kept: Vec<uuid::Uuid> = letters.iter().map(|l| l.event.event_id).collect();
    bad_ids.sort();
    kept.sort();
    assert_eq!(kept, bad_ids);
    assert!(letters.iter().all(|l| l.reason == "user not found"));
    assert!(letters.iter().all(|l| l.included_calls == Some(10)));
    assert_eq!(f.counter(T0).await.unwrap().api_calls, 197);
    // Writing goes on afterwards.
    tracker
        .track(f.call(T0 + time::Duration::seconds(1)))
        .await
        .unwrap();
    eventually("a later call stored", async || f.stored(T0).await == 198).await;
    let report = worker.shutdown().await;
    assert_eq!(report.unwritten, 0);
    assert_eq!(tracker.queue_depth(), 0);
}

#[tokio::test]
async fn keys_are_remembered_only_while_recently_used() {
    let f = fixture().await;
    let (tracker, worker) = f.start(config(1_000, Duration::from_millis(20)));
    let mut keys = Vec::new();
    for i in 0..300 {
        keys.push(add_key(&f.store, &f.user, format!("{i:064x}")).await);
    }
    for (i, key) in keys.iter().enumerate() {
        let mut call = f.call(T0 + time::Duration::milliseconds(i as i64));
        call.event.api_key_id = key.clone();
        tracker.track(call).await.unwrap();
    }
    eventually("300 calls stored", async || f.stored(T0).await == 300).await;
    let remembered = || tracker.stats().keys_remembered.load(Ordering::Relaxed);
    assert_eq!(remembered(), 300);
    // Two minutes on, one key in use: the others are forgotten.
    for i in 0..3 {
        tracker
            .track(f.call(T0 + time::Duration::minutes(2 + i)))
            .await
            .unwrap();
        eventually("the call stored", async || {
            f.stored(T0).await == 301 + i as u64
        })
        .await;
    }
    assert_eq!(remembered(), 1);
    // last_used_at was still written for every key.
    let stored = f.store.inner.api_keys_for_user(&f.user).await.unwrap();
    assert!(stored.iter().all(|k| k.last_used_at.is_some()));
    worker.shutdown().await;
}

/// Remembers what the tracker told it.
#[derive(Debug, Default)]
struct Batches(std::sync::Mutex<Vec<usize>>);

impl usage_core::tracker::BatchObserver for Batches {
    fn batch_stored(&self, events: usize, _took: Duration) {
        self.0.lock().unwrap().push(events);
    }
}

#[tokio::test]
async fn the_oldest_waiting_call_ages_while_the_store_is_down_and_every_stored_batch_is_told() {
    let f = fixture().await;
    let batches = Arc::new(Batches::default());
    let (tracker, worker) = f.start(TrackerConfig {
        observer: Some(batches.clone()),
        ..config(5, Duration::from_secs(3600))
    });
    assert_eq!(tracker.oldest_waiting(), None, "nothing waits");
    f.store.fail_next.store(u32::MAX, Ordering::SeqCst);
    for i in 0..5 {
        tracker
            .track(f.call(T0 + time::Duration::milliseconds(i)))
            .await
            .unwrap();
    }
    eventually("the batch is being retried", async || {
        tracker.stats().flush_failures.load(Ordering::Relaxed) > 1
    })
    .await;
    let first = tracker.oldest_waiting().expect("a call waits");
    tokio::time::sleep(Duration::from_millis(60)).await;
    let later = tracker.oldest_waiting().expect("still waiting");
    assert!(
        later >= first + Duration::from_millis(50),
        "the same call, older: {first:?} then {later:?}"
    );
    assert!(batches.0.lock().unwrap().is_empty(), "nothing stored yet");

    f.store.fail_next.store(0, Ordering::SeqCst);
    eventually("stored and nothing waits", async || {
        f.stored(T0).await == 5 && tracker.oldest_waiting().is_none()
    })
    .await;
    assert_eq!(*batches.0.lock().unwrap(), vec![5]);
    worker.shutdown().await;
}
