//! Verifying API keys on the hot path: hash the presented key, look the hash up, and keep
//! the answer (positive or negative) in a bounded in-process cache for a short time so
//! the database is off the hot path.
//!
//! Known keys and unknown ones live in two separate bounded caches (`quick_cache`:
//! sharded, S3-FIFO eviction, no global lock): a flood of made-up keys churns only the
//! cache of unknown keys and can never evict a customer's key.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use usage_core::caller::CallLimits;
use usage_core::counter::Counter;
use usage_core::repo::{ApiKeyRepository, Subscription, UserRepository};
use usage_core::terms::LiveCatalog;
use usage_core::{ApiKeyAuthenticator, ApiKeyId, Caller, Clock, RepoError, UserId};

use crate::keys::looks_like_api_key;

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct KeyCacheConfig {
    /// How long an answer is reused (`API_KEY_CACHE_TTL_MS`). Without
    /// [`KeyVerifier::watch_access_changes`] running, revocations and plan changes made by
    /// another process reach this one within this time; with it, within its interval,
    /// and a known key in use is not read again while the polls go on: each successful
    /// poll vouches for it, and its answer lasts this long past the last such poll.
    pub ttl: Duration,
    /// Most known keys remembered (`API_KEY_CACHE_CAPACITY`).
    pub capacity: usize,
    /// Most unknown keys remembered (negative answers), in a cache of their own.
    pub negative_capacity: usize,
    /// While the database does not answer, an answer this much older than its TTL is
    /// still used (`API_KEY_CACHE_STALE_IF_ERROR_MS`), so that known keys keep working
    /// through an outage; zero turns this off.
    pub stale_if_error: Duration,
}

impl Default for KeyCacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            capacity: 100_000,
            negative_capacity: 10_000,
            stale_if_error: Duration::from_secs(300),
        }
    }
}

/// How often the watcher drops answers past all use.
const PURGE_EVERY: time::Duration = time::Duration::minutes(1);

/// While the database is down, a stale answer is looked up again at most this often.
const STALE_RETRY: time::Duration = time::Duration::SECOND;

/// The watcher asks for changes this far back past its last poll: change times come from
/// other processes' clocks, and a change committed a little after its stamp must still
/// be seen. Each change is reported by every poll for this long.
const POLL_OVERLAP: time::Duration = time::Duration::seconds(30);

/// A lookup slower than this is never vouched for by the polls: a change it missed could
/// have been reported (and forgotten) before its answer was cached, and the polls report
/// a change only for [`POLL_OVERLAP`]. Such an answer lasts its TTL, as without a watcher.
const VOUCHED_LOOKUP_MAX: Duration = Duration::from_secs(10);

/// Where the watcher's next poll for deleted keys starts: each deletion, like each other
/// change, is reported by every poll for [`POLL_OVERLAP`], so that a lookup that began
/// before the deletion and was cached after a poll reported it is dropped by a later one.
#[derive(Debug, Default)]
struct DeletionCursor {
    /// Deletions numbered after this one are asked for.
    after: i64,
    /// (when a poll ran, the last deletion it saw), oldest first.
    seen: std::collections::VecDeque<(OffsetDateTime, i64)>,
}

impl DeletionCursor {
    /// The number to ask from at `now`: the last deletion seen by a poll that ran at least
    /// [`POLL_OVERLAP`] ago.
    fn after(&mut self, now: OffsetDateTime) -> i64 {
        while let Some(&(at, through)) = self.seen.front() {
            if at > now - POLL_OVERLAP {
                break;
            }
            self.after = through;
            self.seen.pop_front();
        }
        self.after
    }

    fn saw(&mut self, at: OffsetDateTime, through: i64) {
        self.seen.push_back((at, through));
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// `None`: no active key with this hash (unknown, revoked, or its user is gone).
    caller: Option<Caller>,
    /// What the caller's user holds of the catalog, their limits' source.
    subscription: Option<Subscription>,
    /// The catalog generation the caller's limits were resolved from, and until when they
    /// hold: past either, they are resolved again from the catalog in memory.
    limits_generation: u64,
    limits_until: OffsetDateTime,
    key_expires_at: Option<OffsetDateTime>,
    cached_until: OffsetDateTime,
    /// Past `cached_until`, still used while the database fails, until this time.
    stale_until: OffsetDateTime,
    /// When the lookup behind this answer began; `None` when the watcher's polls may not
    /// vouch for it (an unknown key, whose creation no poll reports, or a slow lookup).
    vouchable_from: Option<OffsetDateTime>,
}

/// The verifier the metering middleware uses ([`ApiKeyAuthenticator`]).
pub struct KeyVerifier {
    keys: Arc<dyn ApiKeyRepository>,
    users: Arc<dyn UserRepository>,
    catalog: Arc<LiveCatalog>,
    clock: Arc<dyn Clock>,
    config: KeyCacheConfig,
    /// Answers naming a caller.
    known: Cache,
    /// Answers naming no caller (unknown, revoked, user gone).
    unknown: Cache,
    lookups: CacheLookups,
    /// What the watcher's polls vouch for: see [`Vouched`].
    vouched: Vouched,
}

/// What the access polls vouch for. A poll reports every retirement and plan change since
/// the previous one (with an overlap); once it is applied, every known answer looked up
/// since the watcher started is still right as of the poll. Such an answer is renewed,
/// without the database, until `ttl` past the last poll: while the polls go on, a key in
/// use is never read again; once they stop, the TTL ends every answer as before.
#[derive(Debug)]
struct Vouched {
    /// Answers looked up before this instant (unix ns) are not vouched for: no poll
    /// covered the time since; `i64::MAX` until a watcher starts.
    since: AtomicI64,
    /// Every vouchable answer is right as of this instant (unix ns), the last poll's.
    through: AtomicI64,
}

impl Default for Vouched {
    fn default() -> Self {
        Self {
            since: AtomicI64::new(i64::MAX),
            through: AtomicI64::new(i64::MIN),
        }
    }
}

/// `at` in unix nanoseconds, saturated to `i64` (years 1678 to 2262).
fn unix_ns(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos()).unwrap_or(if at.year() < 1970 {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// How keys were answered, for `/metrics`.
#[derive(Debug, Default)]
pub struct CacheLookups {
    /// From the cache.
    pub hits: Counter,
    /// From the database (not cached, or cached too long ago).
    pub misses: Counter,
}

type Cache = quick_cache::sync::Cache<[u8; 32], Arc<Entry>>;

impl std::fmt::Debug for KeyVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVerifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KeyVerifier {
    /// A verifier over these repositories; callers' limits come from `catalog`.
    pub fn new(
        keys: Arc<dyn ApiKeyRepository>,
        users: Arc<dyn UserRepository>,
        catalog: Arc<LiveCatalog>,
        clock: Arc<dyn Clock>,
        config: KeyCacheConfig,
    ) -> Self {
        Self {
            keys,
            users,
            catalog,
            clock,
            config,
            known: Cache::new(config.capacity.max(1)),
            unknown: Cache::new(config.negative_capacity.max(1)),
            lookups: CacheLookups::default(),
            vouched: Vouched::default(),
        }
    }

    /// Forgets the cached answer for a key, so that its revocation takes effect at once.
    pub fn forget_key(&self, key_id: &ApiKeyId) {
        self.forget_keys(std::slice::from_ref(key_id));
    }

    /// Forgets the cached answers for these keys (one pass over the cache).
    pub fn forget_keys(&self, key_ids: &[ApiKeyId]) {
        if key_ids.is_empty() {
            return;
        }
        let gone: HashSet<&ApiKeyId> = key_ids.iter().collect();
        self.known.retain(|_, e| {
            e.caller
                .as_ref()
                .is_none_or(|c| !gone.contains(&c.api_key_id))
        });
    }

    /// Drops from the cache, every `every` until the returned task is aborted, every key
    /// revoked or deleted and every user whose plan changed since the last poll, by any
    /// process: revocations, deletions (of a key or its user, by hand in the database too)
    /// and plan changes made elsewhere (the CLI, another instance) take effect here within
    /// about `every` instead of the cache TTL.
    ///
    /// Polling, not PostgreSQL's LISTEN/NOTIFY: it works the same on SQLite, and a poll
    /// after a lost connection still sees what happened meanwhile (a notification sent
    /// while the listener was disconnected is gone).
    pub fn watch_access_changes(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let verifier = Arc::clone(self);
        let mut since = verifier.clock.now() - POLL_OVERLAP;
        // From now on the polls cover every change since `since`: answers looked up
        // earlier (by another watcher, now gone, or none) are not vouched for.
        verifier
            .vouched
            .since
            .store(unix_ns(since), Ordering::Release);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next_purge = verifier.clock.now() + PURGE_EVERY;
            // From the oldest deletion still kept: one before the start may concern an
            // answer cached before it.
            let mut deletions = DeletionCursor::default();
            loop {
                ticker.tick().await;
                let polled_at = verifier.clock.now();
                if polled_at >= next_purge {
                    verifier.purge_expired(polled_at);
                    next_purge = polled_at + PURGE_EVERY;
                }
                let changes = async {
                    let keys = verifier
                        .keys
                        .api_keys_retired_since(since, polled_at)
                        .await?;
                    let users = verifier.users.plans_changed_since(since).await?;
                    // A deleted row reports no change time: deletions come by number.
                    let deleted = verifier
                        .keys
                        .api_keys_deleted_after(deletions.after(polled_at))
                        .await?;
                    Ok::<_, RepoError>((keys, users, deleted))
                };
                match changes.await {
                    Ok((keys, users, deleted)) => {
                        verifier.forget_keys(&keys);
                        verifier.forget_keys(&deleted.keys);
                        deletions.saw(polled_at, deleted.through);
                        verifier.forget_users(&users);
                        // Only once the changes are applied.
                        verifier
                            .vouched
                            .through
                            .fetch_max(unix_ns(polled_at), Ordering::AcqRel);
                        since = polled_at - POLL_OVERLAP;
                    }
                    Err(e) => tracing::debug!(error = %e, "polling for access changes failed"),
                }
            }
        })
    }

    /// Forgets every cached key of a user, so that a plan change takes effect at once.
    pub fn forget_user(&self, user_id: &UserId) {
        self.forget_users(std::slice::from_ref(user_id));
    }

    /// Forgets every cached key of these users (one pass over the cache).
    pub fn forget_users(&self, user_ids: &[UserId]) {
        if user_ids.is_empty() {
            return;
        }
        let gone: HashSet<&UserId> = user_ids.iter().collect();
        self.known
            .retain(|_, e| e.caller.as_ref().is_none_or(|c| !gone.contains(&c.user_id)));
    }

    /// Drops every answer too old to be used even while the database is down, so that
    /// memory follows the keys in use rather than staying at the caches' capacity.
    pub fn purge_expired(&self, now: OffsetDateTime) {
        self.known.retain(|_, e| now < e.stale_until);
        self.unknown.retain(|_, e| now < e.stale_until);
    }

    /// How keys were answered so far (keys that cannot be API keys are not counted).
    pub fn lookups(&self) -> &CacheLookups {
        &self.lookups
    }

    /// Keys currently cached (known and unknown).
    pub fn cached(&self) -> usize {
        self.known.len() + self.unknown.len()
    }

    /// The cached answer for `digest`, if any.
    fn cached_entry(&self, digest: &[u8; 32]) -> Option<Arc<Entry>> {
        self.known.get(digest).or_else(|| self.unknown.get(digest))
    }

    /// Keeps `entry` in the cache its answer belongs to (and out of the other).
    fn remember(&self, digest: [u8; 32], entry: Arc<Entry>) {
        if entry.caller.is_some() {
            self.unknown.remove(&digest);
            self.known.insert(digest, entry);
        } else {
            self.known.remove(&digest);
            self.unknown.insert(digest, entry);
        }
    }

    /// The database failed: the last answer when it is recent enough (and again for the
    /// next `STALE_RETRY` without asking the database), else the error.
    fn stale_answer(
        &self,
        digest: [u8; 32],
        stale: Option<Arc<Entry>>,
        now: OffsetDateTime,
        error: RepoError,
    ) -> Result<Option<Caller>, RepoError> {
        let Some(stale) = stale.filter(|e| now < e.stale_until) else {
            return Err(error);
        };
        tracing::debug!(error = %error, "key lookup failed; using the last answer");
        let entry = Arc::new(Entry {
            cached_until: (now + STALE_RETRY).min(stale.stale_until),
            ..Entry::clone(&stale)
        });
        self.remember(digest, Arc::clone(&entry));
        Ok(entry.usable_caller(now))
    }

    fn ttl(&self) -> time::Duration {
        time::Duration::try_from(self.config.ttl).unwrap_or(time::Duration::ZERO)
    }

    fn grace(&self) -> time::Duration {
        time::Duration::try_from(self.config.stale_if_error).unwrap_or(time::Duration::ZERO)
    }

    async fn look_up(&self, digest: &[u8; 32], now: OffsetDateTime) -> Result<Entry, RepoError> {
        // Tokio's clock: the tests pause it.
        let started = tokio::time::Instant::now();
        let found = self
            .keys
            .api_key_and_plan_by_hash(&hex::encode(digest))
            .await?;
        let mut entry = Entry {
            caller: None,
            subscription: None,
            limits_generation: 0,
            limits_until: now,
            key_expires_at: None,
            cached_until: now + self.ttl(),
            stale_until: now + self.ttl() + self.grace(),
            vouchable_from: None,
        };
        if let Some((key, subscription)) = found.filter(|(k, _)| k.is_active(now)) {
            let resolved = self.catalog.effective(&subscription, now).await?;
            entry.caller = Some(Caller {
                user_id: key.user_id,
                api_key_id: key.id,
                plan: subscription.plan.clone(),
                limits: CallLimits::with_units(&resolved.terms, self.catalog.current().meters()),
            });
            entry.subscription = Some(subscription);
            entry.limits_generation = resolved.generation;
            entry.limits_until = resolved.until;
            entry.key_expires_at = key.expires_at;
            entry.vouchable_from = (started.elapsed() < VOUCHED_LOOKUP_MAX).then_some(now);
        }
        Ok(entry)
    }

    /// `entry` with its caller's limits resolved again when the catalog changed or the
    /// period in which they hold ended (no database read, unless the catalog lacks the
    /// plan); as it is otherwise. One atomic load per call.
    async fn with_current_limits(
        &self,
        digest: [u8; 32],
        entry: Arc<Entry>,
        now: OffsetDateTime,
    ) -> Result<Arc<Entry>, RepoError> {
        let Some(subscription) = &entry.subscription else {
            return Ok(entry);
        };
        if entry.limits_generation == self.catalog.generation() && now < entry.limits_until {
            return Ok(entry);
        }
        let resolved = self.catalog.effective(subscription, now).await?;
        let mut fresh = Entry::clone(&entry);
        if let Some(caller) = fresh.caller.as_mut() {
            caller.limits =
                CallLimits::with_units(&resolved.terms, self.catalog.current().meters());
        }
        fresh.limits_generation = resolved.generation;
        fresh.limits_until = resolved.until;
        let fresh = Arc::new(fresh);
        self.remember(digest, Arc::clone(&fresh));
        Ok(fresh)
    }

    /// `entry`, past its `cached_until`, renewed until `ttl` past the last poll when the
    /// polls vouch for it (see [`Vouched`]); `None` otherwise.
    fn renewed(&self, digest: [u8; 32], entry: &Entry, now: OffsetDateTime) -> Option<Arc<Entry>> {
        let looked_up = unix_ns(entry.vouchable_from?);
        if looked_up < self.vouched.since.load(Ordering::Acquire) {
            return None;
        }
        let through = self.vouched.through.load(Ordering::Acquire);
        let through = OffsetDateTime::from_unix_timestamp_nanos(i128::from(through)).ok()?;
        let cached_until = through + self.ttl();
        if now >= cached_until {
            return None;
        }
        let renewed = Arc::new(Entry {
            cached_until,
            stale_until: cached_until + self.grace(),
            ..entry.clone()
        });
        self.remember(digest, Arc::clone(&renewed));
        Some(renewed)
    }
}

#[async_trait]
impl ApiKeyAuthenticator for KeyVerifier {
    async fn authenticate(&self, presented_key: &str) -> Result<Option<Caller>, RepoError> {
        // Junk never reaches the database, nor fills the cache.
        if !looks_like_api_key(presented_key) {
            return Ok(None);
        }
        let digest: [u8; 32] = Sha256::digest(presented_key.as_bytes()).into();
        let now = self.clock.now();
        let mut cached = self.cached_entry(&digest);
        if let Some(past) = cached.as_ref().filter(|e| now >= e.cached_until)
            && let Some(renewed) = self.renewed(digest, past, now)
        {
            cached = Some(renewed);
        }
        let entry = match cached {
            Some(entry) if now < entry.cached_until => {
                self.lookups.hits.add(1);
                entry
            }
            stale => {
                self.lookups.misses.add(1);
                if let Some(stale) = stale.as_ref().filter(|e| now < e.stale_until) {
                    // This call looks the key up again; the calls that come meanwhile use
                    // the answer in hand rather than all waiting on the database.
                    self.remember(
                        digest,
                        Arc::new(Entry {
                            cached_until: (now + STALE_RETRY).min(stale.stale_until),
                            ..Entry::clone(stale)
                        }),
                    );
                }
                let entry = match self.look_up(&digest, now).await {
                    Ok(entry) => Arc::new(entry),
                    Err(e) => return self.stale_answer(digest, stale, now, e),
                };
                self.remember(digest, Arc::clone(&entry));
                entry
            }
        };
        let entry = self.with_current_limits(digest, entry, now).await?;
        Ok(entry.usable_caller(now))
    }
}

impl Entry {
    /// The caller, unless the key has expired since it was cached.
    fn usable_caller(&self, now: OffsetDateTime) -> Option<Caller> {
        self.caller
            .clone()
            .filter(|_| self.key_expires_at.is_none_or(|at| now < at))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use super::*;
    use crate::keys::KeyIssuer;
    use time::macros::datetime;
    use usage_core::repo::{ApiKeyRecord, User};
    use usage_core::{ManualClock, Plan};
    use usage_testkit::memory::MemoryStore;

    /// Counts lookups by hash, to see what the cache saves.
    struct CountingKeys {
        inner: Arc<MemoryStore>,
        lookups: AtomicUsize,
        /// Polls of the watcher (each asks for revocations once, after its purge).
        polls: AtomicUsize,
        /// Each lookup takes this long (milliseconds).
        slow_ms: AtomicU64,
        /// Lookups fail (the database is down) while set.
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl ApiKeyRepository for CountingKeys {
        async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), RepoError> {
            self.inner.create_api_key(key).await
        }
        async fn issue_api_key(
            &self,
            key: &ApiKeyRecord,
            max_active: usize,
            retire: Option<&usage_core::repo::KeyRetirement>,
        ) -> Result<usage_core::repo::KeyIssue, RepoError> {
            self.inner.issue_api_key(key, max_active, retire).await
        }
        async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, RepoError> {
            self.inner.api_key_by_hash(hash).await
        }
        async fn api_key_and_plan_by_hash(
            &self,
            hash: &str,
        ) -> Result<Option<(ApiKeyRecord, usage_core::repo::Subscription)>, RepoError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let slow = self.slow_ms.load(Ordering::SeqCst);
            if slow > 0 {
                tokio::time::sleep(Duration::from_millis(slow)).await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(RepoError::Unavailable("connection refused".into()));
            }
            self.inner.api_key_and_plan_by_hash(hash).await
        }
        async fn api_keys_for_user(&self, user: &UserId) -> Result<Vec<ApiKeyRecord>, RepoError> {
            self.inner.api_keys_for_user(user).await
        }
        async fn revoke_api_key(
            &self,
            user: &UserId,
            key: &ApiKeyId,
            at: OffsetDateTime,
        ) -> Result<Option<ApiKeyRecord>, RepoError> {
            self.inner.revoke_api_key(user, key, at).await
        }
        async fn touch_api_keys(
            &self,
            used: &[(ApiKeyId, OffsetDateTime)],
        ) -> Result<(), RepoError> {
            self.inner.touch_api_keys(used).await
        }
        async fn api_keys_retired_since(
            &self,
            since: OffsetDateTime,
            now: OffsetDateTime,
        ) -> Result<Vec<ApiKeyId>, RepoError> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.inner.api_keys_retired_since(since, now).await
        }
        async fn delete_api_key(&self, user: &UserId, key: &ApiKeyId) -> Result<bool, RepoError> {
            self.inner.delete_api_key(user, key).await
        }
        async fn api_keys_deleted_after(
            &self,
            after: i64,
        ) -> Result<usage_core::repo::DeletedKeys, RepoError> {
            self.inner.api_keys_deleted_after(after).await
        }
    }

    struct Fixture {
        store: Arc<MemoryStore>,
        keys: Arc<CountingKeys>,
        clock: Arc<ManualClock>,
        catalog: Arc<LiveCatalog>,
        verifier: Arc<KeyVerifier>,
        user: User,
    }

    async fn fixture(capacity: usize) -> Fixture {
        fixture_with_ttl(capacity, 10).await
    }

    async fn fixture_with_ttl(capacity: usize, ttl_secs: u64) -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let keys = Arc::new(CountingKeys {
            inner: store.clone(),
            lookups: AtomicUsize::new(0),
            polls: AtomicUsize::new(0),
            slow_ms: AtomicU64::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
        });
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
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
        let catalog =
            usage_testkit::seeded_catalog(store.clone(), &usage_core::PlanCatalog::default()).await;
        let config = KeyCacheConfig {
            ttl: Duration::from_secs(ttl_secs),
            capacity,
            negative_capacity: capacity,
            stale_if_error: Duration::from_secs(60),
        };
        let verifier = Arc::new(KeyVerifier::new(
            keys.clone(),
            store.clone(),
            catalog.clone(),
            clock.clone(),
            config,
        ));
        Fixture {
            store,
            keys,
            clock,
            catalog,
            verifier,
            user,
        }
    }

    impl Fixture {
        async fn issue(&self) -> crate::keys::IssuedKey {
            KeyIssuer::new(self.store.clone(), self.clock.clone())
                .issue(&self.user.id, "k")
                .await
                .unwrap()
        }
        /// Another key of `key`'s user that expires in `secs`.
        async fn expiring_key(
            &self,
            key: &crate::keys::IssuedKey,
            secs: i64,
        ) -> crate::keys::GeneratedKey {
            let generated = crate::keys::generate_api_key();
            let record = ApiKeyRecord {
                id: ApiKeyId::generate(),
                key_hash: generated.hash.clone(),
                expires_at: Some(self.clock.now() + time::Duration::seconds(secs)),
                ..key.record.clone()
            };
            self.store.create_api_key(&record).await.unwrap();
            generated
        }
        fn lookups(&self) -> usize {
            self.keys.lookups.load(Ordering::SeqCst)
        }
        fn polls(&self) -> usize {
            self.keys.polls.load(Ordering::SeqCst)
        }
        /// Waits until the watcher has polled twice more: at least once entirely at the
        /// clock's current time.
        async fn two_more_polls(&self) {
            let seen = self.polls();
            until("two more polls", || self.polls() >= seen + 2).await;
        }
    }

    #[tokio::test]
    async fn valid_keys_are_cached_and_junk_never_looked_up() {
        let f = fixture(100).await;
        let key = f.issue().await;
        let caller = f
            .verifier
            .authenticate(&key.plaintext)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (caller.user_id, caller.plan),
            (f.user.id.clone(), Plan::free())
        );
        f.verifier
            .authenticate(&key.plaintext)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.lookups(), 1, "the second call is served from the cache");

        for junk in ["", "Bearer", "eco_live_short", "eyJhbGciOiJIUzI1NiJ9.e30.x"] {
            assert_eq!(f.verifier.authenticate(junk).await.unwrap(), None);
        }
        assert_eq!(f.lookups(), 1);

        // Unknown keys are cached as unknown (negative entries).
        let unknown = crate::keys::generate_api_key().plaintext;
        assert_eq!(f.verifier.authenticate(&unknown).await.unwrap(), None);
        assert_eq!(f.verifier.authenticate(&unknown).await.unwrap(), None);
        assert_eq!(f.lookups(), 2);
        // Counted as the database saw them; junk is neither.
        let counted = f.verifier.lookups();
        assert_eq!(counted.misses.get(), 2);
        assert_eq!(counted.hits.get(), 2);
        // Past the TTL, the next answer comes from the database again.
        f.clock.advance(time::Duration::seconds(10));
        f.verifier.authenticate(&key.plaintext).await.unwrap();
        assert_eq!(counted.misses.get(), 3);
        assert_eq!(f.lookups(), 3);
    }

    #[tokio::test]
    async fn revocation_is_seen_at_once_when_forgotten_and_within_the_ttl_otherwise() {
        let f = fixture(100).await;
        let key = f.issue().await;
        assert!(
            f.verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .is_some()
        );

        f.store
            .revoke_api_key(&f.user.id, &key.record.id, f.clock.now())
            .await
            .unwrap();
        // Revoked behind the verifier's back: still cached until the TTL runs out.
        assert!(
            f.verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        f.clock.advance(time::Duration::seconds(11));
        assert_eq!(f.verifier.authenticate(&key.plaintext).await.unwrap(), None);

        // Revoked through the service, which tells the verifier: at once.
        let other = f.issue().await;
        assert!(
            f.verifier
                .authenticate(&other.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        f.store
            .revoke_api_key(&f.user.id, &other.record.id, f.clock.now())
            .await
            .unwrap();
        f.verifier.forget_key(&other.record.id);
        assert_eq!(
            f.verifier.authenticate(&other.plaintext).await.unwrap(),
            None
        );
    }

    /// Whether `check` holds within about 2 s (the watcher polls in the background).
    async fn within_2s(check: impl AsyncFn() -> bool) -> bool {
        for _ in 0..200 {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Whether `key` is refused within about 2 s.
    async fn refused_within_2s(verifier: &KeyVerifier, key: &str) -> bool {
        within_2s(async || verifier.authenticate(key).await.unwrap().is_none()).await
    }

    #[tokio::test]
    async fn deletions_by_another_process_are_picked_up_by_the_watcher() {
        let f = fixture(100).await;
        let verifier = Arc::clone(&f.verifier);
        let issuer = KeyIssuer::new(f.store.clone(), f.clock.clone());
        let key = issuer.issue(&f.user.id, "k").await.unwrap();
        let kept = issuer.issue(&f.user.id, "kept").await.unwrap();
        let mut bob = f.user.clone();
        bob.id = UserId::generate();
        bob.email = "bob@example.com".to_owned();
        f.store.create_user(&bob).await.unwrap();
        let bobs = issuer.issue(&bob.id, "b").await.unwrap();
        for k in [&key, &kept, &bobs] {
            assert!(verifier.authenticate(&k.plaintext).await.unwrap().is_some());
        }
        let watcher = verifier.watch_access_changes(Duration::from_millis(10));
        f.two_more_polls().await;
        let lookups = f.lookups();
        // Rows deleted behind the verifier's back (a DELETE by hand); the clock does not
        // move, so only the watcher can end the cached answers, which its polls renew.
        assert!(
            f.store
                .delete_api_key(&f.user.id, &key.record.id)
                .await
                .unwrap()
        );
        assert!(
            refused_within_2s(&verifier, &key.plaintext).await,
            "the watcher dropped the deleted key"
        );
        assert!(f.store.delete_user(&bob.id).await.unwrap());
        assert!(
            refused_within_2s(&verifier, &bobs.plaintext).await,
            "the watcher dropped the key of the deleted user"
        );
        // The other key is still answered from the cache.
        f.two_more_polls().await;
        assert!(
            verifier
                .authenticate(&kept.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            f.lookups(),
            lookups + 2,
            "only the two deleted keys were read again"
        );
        watcher.abort();
    }

    #[test]
    fn each_deletion_is_asked_for_again_for_the_overlap() {
        let t0 = datetime!(2026-11-22 10:00 UTC);
        let mut cursor = DeletionCursor::default();
        assert_eq!(cursor.after(t0), 0);
        cursor.saw(t0, 5);
        cursor.saw(t0 + time::Duration::seconds(1), 7);
        assert_eq!(cursor.after(t0 + time::Duration::seconds(29)), 0);
        assert_eq!(cursor.after(t0 + POLL_OVERLAP), 5);
        assert_eq!(cursor.after(t0 + time::Duration::minutes(5)), 7);
        assert_eq!(cursor.after(t0 + time::Duration::minutes(6)), 7);
    }

    #[tokio::test]
    async fn revocations_and_plan_changes_by_another_process_are_picked_up_by_the_watcher() {
        let f = fixture(100).await;
        let verifier = Arc::clone(&f.verifier);
        let key = KeyIssuer::new(f.store.clone(), f.clock.clone())
            .issue(&f.user.id, "k")
            .await
            .unwrap();
        assert!(
            verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        let watcher = verifier.watch_access_changes(Duration::from_millis(10));
        // Revoked behind the verifier's back (as the CLI does); the clock does not move, so
        // only the watcher can make the cached answer go.
        f.store
            .revoke_api_key(&f.user.id, &key.record.id, f.clock.now())
            .await
            .unwrap();
        assert!(
            refused_within_2s(&verifier, &key.plaintext).await,
            "the watcher dropped the revoked key from the cache"
        );

        // A plan changed behind the verifier's back is seen the same way.
        let other = KeyIssuer::new(f.store.clone(), f.clock.clone())
            .issue(&f.user.id, "k2")
            .await
            .unwrap();
        let plan = || async {
            verifier
                .authenticate(&other.plaintext)
                .await
                .unwrap()
                .unwrap()
                .plan
        };
        assert_eq!(plan().await, Plan::free());
        f.store
            .set_plan(&f.user.id, Plan::pro(), f.clock.now())
            .await
            .unwrap();
        let upgraded = within_2s(async || plan().await == Plan::pro()).await;
        watcher.abort();
        assert!(upgraded, "the watcher dropped the user's cached plan");
    }

    #[tokio::test]
    async fn a_rotation_elsewhere_ends_the_old_key_at_its_grace_not_at_the_ttl() {
        let f = fixture(100).await;
        let old = f.issue().await;
        let verifier = Arc::clone(&f.verifier);
        assert!(
            verifier
                .authenticate(&old.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        let watcher = verifier.watch_access_changes(Duration::from_millis(10));
        // Another process rotates with 5 s of grace: the cached answer here knows no
        // expiry, and stays within its TTL (10 s) after the grace ends.
        KeyIssuer::new(f.store.clone(), f.clock.clone())
            .rotate(&f.user.id, &old.record.id, 5)
            .await
            .unwrap();
        f.clock.advance(time::Duration::seconds(4));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            verifier
                .authenticate(&old.plaintext)
                .await
                .unwrap()
                .is_some(),
            "still in its grace"
        );
        f.clock.advance(time::Duration::seconds(2));
        let refused = refused_within_2s(&verifier, &old.plaintext).await;
        watcher.abort();
        assert!(refused, "the watcher dropped the key once its grace ended");
    }

    #[tokio::test]
    async fn catalog_edits_reach_cached_callers_without_a_key_lookup() {
        use usage_core::catalog::{Overrides, PlanMove};
        use usage_core::rate::RateLimit;
        use usage_core::repo::PlanRepository;
        let f = fixture(10).await;
        let key = f.issue().await;
        let limits = async || {
            f.verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .unwrap()
                .limits
        };
        assert_eq!(limits().await.included, Some(1_000));
        let lookups = f.lookups();
        // Version 2 of free, moving its users at once: more calls and a burst limit.
        let mut free = f.catalog.current().newest("free").unwrap().plan.clone();
        free.limits[0].included = Some(5_000);
        free.burst = Some(RateLimit {
            per_second: 5,
            burst: 10,
        });
        f.store
            .revise_plan(&free, PlanMove::Now, f.clock.now())
            .await
            .unwrap();
        assert_eq!(
            limits().await.included,
            Some(1_000),
            "until this instance reads the catalog again"
        );
        f.catalog.refresh().await.unwrap();
        let now = limits().await;
        assert_eq!((now.included, now.burst), (Some(5_000), free.burst));
        // Version 3 moves its users at their next period: not before.
        let mut third = free.clone();
        third.limits[0].included = Some(9_000);
        f.store
            .revise_plan(&third, PlanMove::NextPeriod, f.clock.now())
            .await
            .unwrap();
        f.catalog.refresh().await.unwrap();
        assert_eq!(limits().await.included, Some(5_000));
        assert_eq!(f.lookups(), lookups, "the key was not read again");
        f.clock.set(datetime!(2026-12-01 00:00 UTC));
        assert_eq!(limits().await.included, Some(9_000), "the next period");
        // The user's own terms come with the key's next lookup.
        let overrides = Overrides {
            price_cents: None,
            limits: vec![usage_core::catalog::MeterLimit {
                included: Some(42),
                over_limit: usage_core::OverLimit::Block,
                overage: None,
                ..free.limits[0].clone()
            }],
        };
        f.store
            .set_user_overrides(&f.user.id, Some(&overrides), f.clock.now())
            .await
            .unwrap();
        f.verifier.forget_user(&f.user.id);
        let own = limits().await;
        assert_eq!(
            (own.included, own.over_limit),
            (Some(42), usage_core::OverLimit::Block)
        );
    }

    #[tokio::test]
    async fn expired_keys_and_plan_changes() {
        let f = fixture(100).await;
        let key = f.issue().await;
        let plaintext = f.expiring_key(&key, 5).await;
        assert!(
            f.verifier
                .authenticate(&plaintext.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        f.clock.advance(time::Duration::seconds(6)); // expired, though still cached
        assert_eq!(
            f.verifier.authenticate(&plaintext.plaintext).await.unwrap(),
            None
        );

        assert_eq!(
            f.verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .unwrap()
                .plan,
            Plan::free()
        );
        f.store
            .set_plan(&f.user.id, Plan::pro(), f.clock.now())
            .await
            .unwrap();
        f.verifier.forget_user(&f.user.id);
        assert_eq!(
            f.verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .unwrap()
                .plan,
            Plan::pro()
        );
    }

    #[tokio::test]
    async fn known_keys_keep_working_through_an_outage_for_a_while() {
        let f = fixture(100).await;
        let key = f.issue().await;
        let ok = async || f.verifier.authenticate(&key.plaintext).await;
        assert!(ok().await.unwrap().is_some());
        f.keys.down.store(true, Ordering::SeqCst);
        f.clock.advance(time::Duration::seconds(11)); // past the TTL
        assert!(ok().await.unwrap().is_some(), "the last answer, stale");
        assert_eq!(f.lookups(), 2);
        assert!(ok().await.unwrap().is_some());
        assert_eq!(
            f.lookups(),
            2,
            "the dead database is asked at most once a second"
        );
        f.clock.advance(time::Duration::seconds(2));
        assert!(ok().await.unwrap().is_some());
        assert_eq!(f.lookups(), 3);
        // Never longer than the TTL and the grace (10 + 60 s) after the last real answer.
        f.clock.advance(time::Duration::seconds(60));
        assert_eq!(
            ok().await,
            Err(RepoError::Unavailable("connection refused".into()))
        );
        // A key never seen cannot be vouched for.
        let unknown = crate::keys::generate_api_key().plaintext;
        assert!(f.verifier.authenticate(&unknown).await.is_err());
        // Back up: fresh answers again.
        f.keys.down.store(false, Ordering::SeqCst);
        assert!(ok().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_flood_of_unknown_keys_never_evicts_known_ones() {
        let f = fixture(1_000).await;
        let mut known = Vec::new();
        for _ in 0..20 {
            known.push(f.issue().await.plaintext);
        }
        for key in &known {
            assert!(f.verifier.authenticate(key).await.unwrap().is_some());
        }
        assert_eq!(f.lookups(), 20);
        // 100,000 well-formed keys nobody holds: each is looked up once.
        for _ in 0..100_000 {
            let unknown = crate::keys::generate_api_key().plaintext;
            assert_eq!(f.verifier.authenticate(&unknown).await.unwrap(), None);
        }
        assert_eq!(f.lookups(), 20 + 100_000);
        for key in &known {
            assert!(f.verifier.authenticate(key).await.unwrap().is_some());
        }
        assert_eq!(
            f.lookups(),
            20 + 100_000,
            "every known key still answered from the cache"
        );
        assert!(f.verifier.cached() <= 20 + 1_100, "{}", f.verifier.cached());
    }

    #[tokio::test]
    async fn answers_past_all_use_are_purged() {
        let f = fixture(100).await;
        let key = f.issue().await;
        assert!(
            f.verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        let unknown = crate::keys::generate_api_key().plaintext;
        assert!(f.verifier.authenticate(&unknown).await.unwrap().is_none());
        assert_eq!(f.verifier.cached(), 2);
        // Past the TTL, still usable through an outage: kept.
        f.clock.advance(time::Duration::seconds(30));
        f.verifier.purge_expired(f.clock.now());
        assert_eq!(f.verifier.cached(), 2);
        // Past TTL and grace (10 + 60 s): gone.
        f.clock.advance(time::Duration::seconds(41));
        f.verifier.purge_expired(f.clock.now());
        assert_eq!(f.verifier.cached(), 0);
    }

    /// Waits (bounded) until `check` holds.
    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..400 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    #[tokio::test]
    async fn the_watcher_looks_back_past_its_start_and_purges_once_a_minute() {
        let f = fixture(100).await;
        let verifier = Arc::clone(&f.verifier);
        let issuer = KeyIssuer::new(f.store.clone(), f.clock.clone());
        let t0 = f.clock.now();
        let at = |secs: i64| t0 + time::Duration::seconds(secs);
        let (a, b) = (
            issuer.issue(&f.user.id, "a").await.unwrap(),
            issuer.issue(&f.user.id, "b").await.unwrap(),
        );
        for key in [&a, &b] {
            verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .unwrap();
        }
        // Both are past all use at 100 s (10 s TTL, 60 s grace) but not purged yet.
        f.clock.set(at(100));
        let c = issuer.issue(&f.user.id, "c").await.unwrap();
        verifier.authenticate(&c.plaintext).await.unwrap().unwrap();
        assert_eq!(verifier.cached(), 3);
        // Revoked by another process 20 s before this one starts watching.
        f.store
            .revoke_api_key(&f.user.id, &a.record.id, at(80))
            .await
            .unwrap();

        // One poll: it looks back 30 s (A goes) and purges nothing before a minute.
        let once = verifier.watch_access_changes(Duration::from_secs(3600));
        until("A forgotten, B and C kept", || verifier.cached() == 2).await;
        once.abort();

        // Polling on: the purge at 160 s takes B (stale since 70 s), not C (until 170 s).
        let polls = || f.keys.polls.load(Ordering::SeqCst);
        let before = polls();
        let watcher = verifier.watch_access_changes(Duration::from_millis(5));
        until("the watcher started at 100 s", || polls() > before).await;
        f.clock.set(at(160));
        until("B purged", || verifier.cached() == 1).await;
        // C is past all use at 171 s, but the next purge is a minute after the last.
        f.clock.set(at(171));
        let seen = polls();
        until("two more polls", || polls() >= seen + 2).await;
        assert_eq!(verifier.cached(), 1, "no purge before 220 s");
        f.clock.set(at(220));
        until("C purged", || verifier.cached() == 0).await;
        watcher.abort();
    }

    #[tokio::test]
    async fn each_answer_ends_at_its_instant_to_the_second() {
        let f = fixture(100).await;
        let key = f.issue().await;
        let generated = f.expiring_key(&key, 5).await;
        let answer = async |plaintext: &str| f.verifier.authenticate(plaintext).await;
        assert!(answer(&generated.plaintext).await.unwrap().is_some());
        assert!(answer(&key.plaintext).await.unwrap().is_some());
        // A key expiring at 5 s is refused at 5 s, though its answer is cached.
        f.clock.advance(time::Duration::seconds(5));
        assert_eq!(answer(&generated.plaintext).await.unwrap(), None);
        // The database goes away: the last answer serves until 70 s (10 s TTL and 60 s
        // grace), not at 70 s.
        f.keys.down.store(true, Ordering::SeqCst);
        f.clock.set(f.clock.now() + time::Duration::seconds(64));
        assert!(answer(&key.plaintext).await.unwrap().is_some(), "at 69 s");
        f.clock.advance(time::Duration::seconds(1));
        assert!(answer(&key.plaintext).await.is_err(), "at 70 s");
        // And the purge takes what is past all use at that same instant.
        let fresh = f.issue().await;
        f.keys.down.store(false, Ordering::SeqCst);
        assert!(answer(&fresh.plaintext).await.unwrap().is_some());
        let unknown = crate::keys::generate_api_key().plaintext;
        assert!(answer(&unknown).await.unwrap().is_none());
        let both_until = f.clock.now() + time::Duration::seconds(70);
        f.verifier
            .purge_expired(both_until - time::Duration::seconds(1));
        assert_eq!(
            f.verifier.cached(),
            2,
            "a second before: both kept (older ones gone)"
        );
        f.verifier.purge_expired(both_until);
        assert_eq!(
            f.verifier.cached(),
            0,
            "at the instant: known and unknown gone"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_during_a_refresh_use_the_answer_in_hand() {
        let f = fixture(100).await;
        let key = f.issue().await;
        let verifier = Arc::clone(&f.verifier);
        verifier
            .authenticate(&key.plaintext)
            .await
            .unwrap()
            .unwrap();
        // Past the TTL; the database answers slowly.
        f.clock.advance(time::Duration::seconds(15));
        f.keys.slow_ms.store(300, Ordering::SeqCst);
        let refreshing = {
            let (verifier, key) = (Arc::clone(&verifier), key.plaintext.clone());
            tokio::spawn(async move { verifier.authenticate(&key).await })
        };
        until("the refresh asked the database", || {
            f.keys.lookups.load(Ordering::SeqCst) == 2
        })
        .await;
        // Meanwhile another call is answered at once, from the answer in hand.
        assert!(
            verifier
                .authenticate(&key.plaintext)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(f.keys.lookups.load(Ordering::SeqCst), 2, "not asked again");
        assert!(refreshing.await.unwrap().unwrap().is_some());
    }

    #[tokio::test]
    async fn while_the_polls_go_on_a_key_in_use_is_not_read_again_and_after_them_its_ttl_ends_it() {
        let f = fixture(100).await;
        let key = f.issue().await;
        let verifier = Arc::clone(&f.verifier);
        let known = async || verifier.authenticate(&key.plaintext).await.unwrap();
        let watcher = verifier.watch_access_changes(Duration::from_millis(5));
        assert!(known().await.is_some());
        // Ten TTLs (10 s each) go by, the watcher polling throughout: one lookup in all.
        for _ in 0..10 {
            f.clock.advance(time::Duration::seconds(11));
            f.two_more_polls().await;
            assert!(known().await.is_some());
        }
        assert_eq!(f.lookups(), 1, "vouched for by the polls");
        // A plan change still arrives through the poll, and the answer is read anew.
        f.store
            .set_plan(&f.user.id, Plan::pro(), f.clock.now())
            .await
            .unwrap();
        let upgraded = within_2s(async || known().await.unwrap().plan == Plan::pro()).await;
        assert!(upgraded, "the watcher dropped the user's cached plan");
        // (Each poll reports the change for 30 s: past that, the answer is kept again.)
        f.clock.advance(time::Duration::seconds(31));
        f.two_more_polls().await;
        assert!(known().await.is_some());

        // The polls stop: the answer lasts the TTL past the last one, no longer.
        f.clock.advance(time::Duration::seconds(11));
        f.two_more_polls().await;
        watcher.abort();
        let last_poll = f.clock.now();
        let lookups = f.lookups();
        assert!(
            known().await.is_some(),
            "renewed until 10 s past the last poll"
        );
        f.clock.set(last_poll + time::Duration::seconds(9));
        assert!(known().await.is_some());
        assert_eq!(f.lookups(), lookups);
        f.clock.set(last_poll + time::Duration::seconds(10));
        assert!(known().await.is_some());
        assert_eq!(
            f.lookups(),
            lookups + 1,
            "read again at the TTL past the last poll"
        );
    }

    #[tokio::test]
    async fn the_polls_vouch_neither_for_unknown_keys_nor_for_answers_older_than_the_watcher() {
        // A TTL longer than the watcher's look-back (30 s).
        let f = fixture_with_ttl(100, 60).await;
        let (before, after) = (f.issue().await, f.issue().await);
        let verifier = Arc::clone(&f.verifier);
        let t0 = f.clock.now();
        let unknown = crate::keys::generate_api_key().plaintext;
        let answer = async |key: &str| verifier.authenticate(key).await.unwrap();
        assert!(answer(&before.plaintext).await.is_some());
        assert!(answer(&unknown).await.is_none());
        // The watcher starts at 40 s, looking back to 10 s: the answer from 0 s predates it.
        f.clock.set(t0 + time::Duration::seconds(40));
        let watcher = verifier.watch_access_changes(Duration::from_millis(5));
        assert!(answer(&after.plaintext).await.is_some());
        assert_eq!(f.lookups(), 3);
        f.clock.set(t0 + time::Duration::seconds(101));
        f.two_more_polls().await;
        assert!(answer(&after.plaintext).await.is_some());
        assert_eq!(f.lookups(), 3, "looked up at 40 s, vouched for at 101 s");
        assert!(answer(&before.plaintext).await.is_some());
        assert!(answer(&unknown).await.is_none());
        watcher.abort();
        assert_eq!(
            f.lookups(),
            5,
            "the older answer and the unknown key: read again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_lookup_is_not_vouched_for() {
        let f = fixture(100).await;
        let (slow, quick) = (f.issue().await, f.issue().await);
        let verifier = Arc::clone(&f.verifier);
        let known = async |key: &str| verifier.authenticate(key).await.unwrap().is_some();
        let watcher = verifier.watch_access_changes(Duration::from_millis(5));
        // Slower than a change could stay reported: the polls cannot vouch for it.
        f.keys.slow_ms.store(11_000, Ordering::SeqCst);
        assert!(known(&slow.plaintext).await);
        f.keys.slow_ms.store(9_000, Ordering::SeqCst);
        assert!(known(&quick.plaintext).await);
        f.keys.slow_ms.store(0, Ordering::SeqCst);
        f.clock.advance(time::Duration::seconds(11));
        // (Paused time moves on by itself while every task waits.)
        f.two_more_polls().await;
        assert!(known(&slow.plaintext).await && known(&quick.plaintext).await);
        watcher.abort();
        assert_eq!(f.lookups(), 3, "only the slow lookup is done again");
    }

    #[test]
    fn the_verifier_debugs_as_its_cache_settings() {
        let store = Arc::new(MemoryStore::new());
        let verifier = KeyVerifier::new(
            store.clone(),
            store.clone(),
            Arc::new(LiveCatalog::new(store)),
            Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC))),
            KeyCacheConfig {
                ttl: Duration::from_secs(7),
                capacity: 3,
                negative_capacity: 5,
                stale_if_error: Duration::from_secs(11),
            },
        );
        let text = format!("{verifier:?}");
        assert!(text.starts_with("KeyVerifier {"), "{text}");
        assert!(
            text.contains("ttl: 7s") && text.contains("capacity: 3"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_capacity() {
        let f = fixture(8).await;
        for _ in 0..50 {
            let unknown = crate::keys::generate_api_key().plaintext;
            f.verifier.authenticate(&unknown).await.unwrap();
            assert!(f.verifier.cached() <= 8);
        }
    }
}
