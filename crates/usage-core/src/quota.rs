//! Monthly quotas, exact across any number of instances sharing one database.
//!
//! Blocking plans (free) admit calls from **leases**: an instance takes a block of calls
//! from the shared counter (`eco_quota_counters`) in one atomic statement that never
//! goes past the limit, then admits from that block in memory. Blocks shrink as the
//! limit nears (a `1/share` part of what is left), down to one call: the last calls of
//! the month are each an atomic check-and-increment in the database. Unspent blocks go
//! back when an instance stops, or after a short idle time.
//!
//! Other plans (pro, enterprise) are never refused: they count in memory and push their
//! counts to the shared counter in batches every `sync_every`, so that every instance's
//! `X-RateLimit-*` headers include the others' calls.
//!
//! Other meters (`tokens`, `credits`) with a limit in the user's plan have a book of their
//! own, held by the calls' book ([`QuotaBook::meter`]) and synced with it: a route's cost
//! is taken from leases as a call is, and units reported after admission (by a handler,
//! or events) are counted as unleased calls are. A blocking meter refuses the next call
//! once what it counted reaches the limit.
//!
//! The design, its worst cases and its costs are in `docs/SCALING.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Mutex, OnceCell, OwnedMutexGuard};

use crate::caller::CallLimits;
use crate::catalog::API_CALLS;
use crate::repo::{LeaseTerms, QuotaCounterRepository, QuotaDelta};
use crate::{BillingPeriod, Clock, OverLimit, RepoError, UserId};

/// The answer to "may this call go ahead?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Admitted and counted.
    Admitted(QuotaStatus),
    /// Refused: the plan blocks at its limit, which is reached. Not counted.
    Rejected(QuotaStatus),
}

/// Where a user stands in the current period, for the `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaStatus {
    /// Calls included per period; `None` for unlimited plans (no headers).
    pub limit: Option<u64>,
    /// Admitted calls this period, this one included when admitted.
    pub used: u64,
    /// Start of the period.
    pub period_start: OffsetDateTime,
    /// End of the period: when the count starts again.
    pub reset_at: OffsetDateTime,
}

impl QuotaStatus {
    /// Included calls left, never negative; `None` for unlimited plans.
    pub fn remaining(&self) -> Option<u64> {
        self.limit.map(|limit| limit.saturating_sub(self.used))
    }
}

/// How instances share the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSettings {
    /// How often counts are pushed and idle leases given back (`QUOTA_SYNC_MS`); also
    /// how long a user found at the limit is refused before the counter is read again.
    pub sync_every: Duration,
    /// Largest lease (`QUOTA_LEASE_MAX`).
    pub lease_max: u64,
    /// A lease takes at most `1/lease_share` of what is left (`QUOTA_LEASE_SHARE`).
    pub lease_share: u64,
    /// A user without a call for this long, and with nothing to push or give back, is
    /// forgotten (`QUOTA_FORGET_IDLE_MS`): memory stays proportional to the users active
    /// lately, not to every user ever seen. Their next call reads the counter again.
    pub forget_idle_after: Duration,
    /// Longest a user's calls on a plan that never blocks wait in memory before a sync
    /// pushes them (`QUOTA_PUSH_WITHIN_MS`); sooner once [`PUSH_AT_CALLS`] wait. With
    /// thousands of customers each calling a few times a second, pushing every user at
    /// every sync wrote a counter row per customer per sync.
    pub push_within: Duration,
    /// How often counters are brought up to the calls stored (`QUOTA_HEAL_MS`): see
    /// [`QuotaBook::heal`].
    pub heal_every: Duration,
}

/// A sync pushes a user's count on a plan that never blocks once this many calls wait,
/// whatever [`QuotaSettings::push_within`]: busy users are pushed at every sync, and
/// another instance's view of a quiet one lags by fewer calls than this.
pub const PUSH_AT_CALLS: u64 = 16;

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            sync_every: Duration::from_millis(500),
            lease_max: 1_000,
            lease_share: 16,
            forget_idle_after: Duration::from_secs(300),
            push_within: Duration::from_secs(10),
            heal_every: Duration::from_secs(60),
        }
    }
}

/// Counters found below the calls stored for their user, at one instant: raised to those
/// stored calls once every count pending then has surely been pushed
/// ([`QuotaBook::heal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealSnapshot {
    /// When the counters were found low.
    pub at: OffsetDateTime,
    /// The period they count.
    pub period: BillingPeriod,
    /// Each user's stored calls, the floor their counter is raised to.
    pub floors: Vec<(UserId, u64)>,
}

/// One user's state for one period on this instance.
#[derive(Debug)]
struct Slot {
    period: BillingPeriod,
    /// Read once from the shared counter, on first use.
    opened: OnceCell<()>,
    /// The shared counter as last seen (it includes this instance's unspent leases).
    counted: AtomicU64,
    /// Leased calls not yet admitted.
    unspent: AtomicU64,
    /// Calls admitted without a lease, not yet pushed to the shared counter.
    pending: AtomicU64,
    /// Until when (unix ms) the counter is known to be at the limit.
    exhausted_until: AtomicI64,
    /// Last admission (unix ms), to give idle leases back.
    last_used: AtomicI64,
    /// Last time (unix ms) a sync pushed `pending`.
    pushed_at: AtomicI64,
    /// Until when (unix ms) the database is taken to be down after a failure: calls that
    /// need it fail at once instead of each waiting for the pool to give up.
    unavailable_until: AtomicI64,
    /// One lease at a time per user on this instance, and never during a sync of this
    /// slot: both move `pending` to the shared counter.
    leasing: Arc<Mutex<()>>,
}

impl Slot {
    fn new(period: BillingPeriod) -> Self {
        Self {
            period,
            opened: OnceCell::new(),
            counted: AtomicU64::new(0),
            unspent: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            exhausted_until: AtomicI64::new(i64::MIN),
            last_used: AtomicI64::new(i64::MIN),
            pushed_at: AtomicI64::new(i64::MIN),
            unavailable_until: AtomicI64::new(i64::MIN),
            leasing: Arc::new(Mutex::new(())),
        }
    }

    /// Admitted calls as this instance sees them.
    fn used(&self) -> u64 {
        (self.counted.load(Ordering::Acquire) + self.pending.load(Ordering::Acquire))
            .saturating_sub(self.unspent.load(Ordering::Acquire))
    }

    /// Fails while the database is taken to be down.
    fn check_available(&self, now: i64) -> Result<(), RepoError> {
        if now < self.unavailable_until.load(Ordering::Acquire) {
            return Err(RepoError::Unavailable(
                "the database failed moments ago".to_owned(),
            ));
        }
        Ok(())
    }

    /// Remembers a failure of the database for a second.
    fn failed(&self, now: i64) {
        self.unavailable_until
            .store(now.saturating_add(FAILURE_HOLD_MS), Ordering::Release);
    }

    /// Admits `units` from the lease, if as many are left.
    fn spend(&self, units: u64) -> bool {
        self.unspent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_sub(units)
            })
            .is_ok()
    }
}

/// What one sync does to a slot.
struct SyncWindow {
    /// Everything goes (shutdown).
    release_all: bool,
    /// Leases unused since this instant (unix ms) go back.
    idle_since: i64,
    /// A few pending calls go if the last push was at or before this instant (unix ms).
    push_due: i64,
}

impl SyncWindow {
    /// The pending calls to push now: all of them once [`PUSH_AT_CALLS`] wait or the
    /// last push is old enough; none while a few wait after a recent push.
    fn pending_due(&self, slot: &Slot) -> u64 {
        let pending = slot.pending.load(Ordering::Acquire);
        if self.release_all
            || pending >= PUSH_AT_CALLS
            || slot.pushed_at.load(Ordering::Acquire) <= self.push_due
        {
            pending
        } else {
            0
        }
    }

    /// Whether the slot's unspent lease goes back.
    fn lease_idle(&self, slot: &Slot) -> bool {
        self.release_all || slot.last_used.load(Ordering::Acquire) < self.idle_since
    }

    /// Whether the sync has anything to push or give back for the slot. At shutdown
    /// every slot: one whose lease is being taken has nothing yet, but will.
    fn has_work(&self, slot: &Slot) -> bool {
        self.release_all
            || self.pending_due(slot) > 0
            || (slot.unspent.load(Ordering::Acquire) > 0 && self.lease_idle(slot))
    }
}

/// After a failed lease or counter read, calls of that user that need the database fail
/// at once for this long.
pub const FAILURE_HOLD_MS: i64 = 1_000;

/// What one sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Calls admitted without a lease, pushed to the shared counters.
    pub pushed: u64,
    /// Unspent leased calls given back.
    pub released: u64,
}

/// Each user's slots (this month's, and last month's around midnight).
type UserSlots = foldhash::HashMap<UserId, Vec<Arc<Slot>>>;

/// The users' slots in shards, each behind its own lock. Looked up on every call: with
/// one lock, every call of either request worker wrote its lock word (a read lock is an
/// atomic add), which then moved between the cores; a call now writes one of many.
/// A fast hasher: user ids are ours, not a client's.
struct SlotMap {
    shards: Box<[Shard]>,
    hasher: foldhash::fast::FixedState,
}

/// One shard, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Shard(RwLock<UserSlots>);

impl SlotMap {
    const SHARDS: usize = 64;

    fn new() -> Self {
        Self {
            shards: (0..Self::SHARDS).map(|_| Shard::default()).collect(),
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    fn shard(&self, user_id: &UserId) -> &RwLock<UserSlots> {
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(user_id);
        // The hash's high bits: the shard's map uses the low ones.
        &self.shards[(hash >> 58) as usize % Self::SHARDS].0
    }

    fn read(shard: &RwLock<UserSlots>) -> std::sync::RwLockReadGuard<'_, UserSlots> {
        shard.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(shard: &RwLock<UserSlots>) -> std::sync::RwLockWriteGuard<'_, UserSlots> {
        shard.write().unwrap_or_else(|e| e.into_inner())
    }

    fn all(&self) -> impl Iterator<Item = &RwLock<UserSlots>> {
        self.shards.iter().map(|s| &s.0)
    }
}

/// Quota decisions for every user of this instance, on one meter (`api_calls`, or one
/// reached through [`QuotaBook::meter`]).
pub struct QuotaBook {
    /// The meter counted.
    meter: Arc<str>,
    slots: SlotMap,
    /// The books of other meters (the calls' book only).
    meters: RwLock<HashMap<Arc<str>, Arc<QuotaBook>>>,
    counters: Arc<dyn QuotaCounterRepository>,
    clock: Arc<dyn Clock>,
    settings: QuotaSettings,
    /// When (unix ms) idle slots are next looked for: a pass reads every slot under the
    /// map's lock, so it runs a few times per idle period, not at every sync.
    next_forget: AtomicI64,
}

impl std::fmt::Debug for QuotaBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaBook")
            .field("meter", &self.meter)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl QuotaBook {
    /// A book of calls (`api_calls`) over the shared counters of `counters`.
    pub fn new(
        counters: Arc<dyn QuotaCounterRepository>,
        clock: Arc<dyn Clock>,
        settings: QuotaSettings,
    ) -> Self {
        Self::of_meter(Arc::from(API_CALLS), counters, clock, settings)
    }

    fn of_meter(
        meter: Arc<str>,
        counters: Arc<dyn QuotaCounterRepository>,
        clock: Arc<dyn Clock>,
        settings: QuotaSettings,
    ) -> Self {
        Self {
            meter,
            slots: SlotMap::new(),
            meters: RwLock::new(HashMap::new()),
            next_forget: AtomicI64::new(i64::MIN),
            counters,
            clock,
            settings,
        }
    }

    /// Checks and counts one call of `user_id`, under `limits`, at the current time.
    pub async fn admit(
        &self,
        user_id: &UserId,
        limits: &CallLimits,
    ) -> Result<QuotaDecision, RepoError> {
        self.admit_at(user_id, limits, self.clock.now()).await
    }

    /// Checks and counts one call that arrived at `at`, in the period containing `at`:
    /// the same instant the call is recorded with, so that a call at 23:59:59.999 on the
    /// last day counts in the month its event is stored in.
    pub async fn admit_at(
        &self,
        user_id: &UserId,
        limits: &CallLimits,
        at: OffsetDateTime,
    ) -> Result<QuotaDecision, RepoError> {
        self.take_at(user_id, limits.included, limits.over_limit, at, 1)
            .await
    }

    /// Checks and counts `units` of this book's meter for a call that arrived at `at`,
    /// under a limit of `included` per period: a blocking limit admits them only if the
    /// period's count stays within it (taken from leases, as calls are); `units` 0 only
    /// checks that the count has not reached the limit (units reported after admission
    /// take it there). Other limits count them, never refuse.
    pub async fn take_at(
        &self,
        user_id: &UserId,
        included: Option<u64>,
        over_limit: OverLimit,
        at: OffsetDateTime,
        units: u64,
    ) -> Result<QuotaDecision, RepoError> {
        let period = BillingPeriod::containing(at);
        let status = |used| QuotaStatus {
            limit: included,
            used,
            period_start: period.start(),
            reset_at: period.end(),
        };
        let slot = self.open(user_id, period).await?;
        // Now, not `at`: a call may arrive before midnight and be admitted after it, and
        // `open` may have waited for the database.
        let now = unix_ms(self.clock.now());
        slot.last_used.fetch_max(now, Ordering::Relaxed);
        let limit = match (included, over_limit) {
            (Some(limit), OverLimit::Block) => limit,
            _ => {
                slot.pending.fetch_add(units, Ordering::AcqRel);
                return Ok(QuotaDecision::Admitted(status(slot.used())));
            }
        };
        if units == 0 {
            let used = slot.used();
            return Ok(if used < limit {
                QuotaDecision::Admitted(status(used))
            } else {
                QuotaDecision::Rejected(status(used))
            });
        }
        loop {
            if slot.spend(units) {
                return Ok(QuotaDecision::Admitted(status(slot.used())));
            }
            if now < slot.exhausted_until.load(Ordering::Acquire) {
                return Ok(QuotaDecision::Rejected(status(slot.used().max(limit))));
            }
            slot.check_available(now)?;
            let _leasing = slot.leasing.lock().await;
            if slot.unspent.load(Ordering::Acquire) >= units {
                continue; // another call leased while this one waited
            }
            if now < slot.exhausted_until.load(Ordering::Acquire) {
                continue;
            }
            slot.check_available(now)?;
            // Units admitted while the user was on a plan that does not block go in first,
            // so that the lease sees them; a lease left too small for these units is held
            // out, and goes with the new one.
            let held = slot.unspent.swap(0, Ordering::AcqRel);
            if held >= units {
                // Given back since the check above (a call refused by another meter).
                slot.unspent.fetch_add(held - units, Ordering::AcqRel);
                return Ok(QuotaDecision::Admitted(status(slot.used())));
            }
            let add = slot.pending.swap(0, Ordering::AcqRel);
            let lease = LeaseTerms {
                cap: Some(limit),
                max: self.settings.lease_max.max(1),
                share: self.settings.lease_share.max(1),
                need: units - held,
            };
            let take = match self
                .counters
                .take_quota(user_id, &self.meter, period.start(), add, lease)
                .await
            {
                Ok(take) => take,
                Err(e) => {
                    slot.pending.fetch_add(add, Ordering::AcqRel);
                    slot.unspent.fetch_add(held, Ordering::AcqRel);
                    // From now, not from the call's start: the failure may have taken the
                    // pool's whole connect timeout.
                    slot.failed(unix_ms(self.clock.now()));
                    return Err(e);
                }
            };
            slot.counted.store(take.count, Ordering::Release);
            if take.taken == 0 {
                slot.unspent.fetch_add(held, Ordering::AcqRel);
                // Nothing left for anyone: refused without asking again for a while. Some
                // left, too little for these units: a smaller take may still fit.
                if take.count >= limit {
                    let until = now.saturating_add(millis(self.settings.sync_every));
                    slot.exhausted_until.store(until, Ordering::Release);
                    return Ok(QuotaDecision::Rejected(status(slot.used().max(limit))));
                }
                return Ok(QuotaDecision::Rejected(status(slot.used())));
            }
            // These units take the first leased ones.
            slot.unspent
                .fetch_add(held + take.taken - units, Ordering::AcqRel);
            return Ok(QuotaDecision::Admitted(status(slot.used())));
        }
    }

    /// Gives back `units` a [`QuotaBook::take_at`] admitted at `at` under the same limit,
    /// for a call refused after all (by another meter's limit): a blocking limit's units
    /// go back to the lease; others come off the counts not yet pushed (once pushed, the
    /// shared counter keeps them: the user looks that much busier until the period ends,
    /// and nobody is admitted past the limit).
    pub fn give_back(
        &self,
        user_id: &UserId,
        included: Option<u64>,
        over_limit: OverLimit,
        at: OffsetDateTime,
        units: u64,
    ) {
        let Some(slot) = self.opened_slot(user_id, BillingPeriod::containing(at)) else {
            return;
        };
        if included.is_some() && over_limit == OverLimit::Block {
            slot.unspent.fetch_add(units, Ordering::AcqRel);
        } else {
            let _ = slot
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some(p.saturating_sub(units))
                });
        }
    }

    /// Counts `units` reported after admission (by the call's handler) for the call of
    /// `user_id` at `at`, never refusing: the next call sees them. Only a user whose
    /// counter this instance has open is counted here (admission opened it, for every
    /// meter the user's plan limits); the others' units reach the counter through
    /// [`QuotaBook::heal`] or when it is created from the stored usage.
    pub fn add(&self, user_id: &UserId, at: OffsetDateTime, units: u64) {
        if let Some(slot) = self.opened_slot(user_id, BillingPeriod::containing(at)) {
            slot.pending.fetch_add(units, Ordering::AcqRel);
            slot.last_used
                .fetch_max(unix_ms(self.clock.now()), Ordering::Relaxed);
        }
    }

    /// The book of `meter` (a meter other than `api_calls`, counted beside the calls and
    /// synced with them), made on first use.
    pub fn meter(&self, meter: &Arc<str>) -> Arc<QuotaBook> {
        if let Some(book) = self
            .meters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(meter)
        {
            return Arc::clone(book);
        }
        let mut books = self.meters.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(books.entry(Arc::clone(meter)).or_insert_with(|| {
            Arc::new(QuotaBook::of_meter(
                Arc::clone(meter),
                Arc::clone(&self.counters),
                Arc::clone(&self.clock),
                self.settings,
            ))
        }))
    }

    /// The books of other meters, made so far.
    fn meter_books(&self) -> Vec<Arc<QuotaBook>> {
        self.meters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Admitted calls of `user_id` in the current period, on every instance: the shared
    /// counter read now, less this instance's unspent lease, plus its counts not yet
    /// pushed. Other instances' unspent leases count as used (never more than a lease
    /// each).
    pub async fn used(&self, user_id: &UserId) -> Result<u64, RepoError> {
        let period = BillingPeriod::containing(self.clock.now());
        let slot = self.open(user_id, period).await?;
        let counted = self
            .counters
            .quota_count(user_id, &self.meter, period.start())
            .await?;
        slot.counted.store(counted, Ordering::Release);
        Ok(slot.used())
    }

    /// Pushes counts not yet pushed (a user's few calls on a plan that never blocks wait
    /// up to [`QuotaSettings::push_within`]; everything with `release_all`), and gives
    /// back leases unused for two sync intervals (or all of them, with `release_all`, at
    /// shutdown). On failure nothing is lost: the counts stay to be pushed next time.
    /// The books of other meters are synced with it; for those, the counters of users
    /// active lately are read again too, so that units reported on other instances or
    /// through events reach this instance's decisions within a sync or two.
    pub async fn sync(&self, release_all: bool) -> Result<SyncReport, RepoError> {
        let mut report = self.sync_one(release_all).await;
        for book in self.meter_books() {
            let theirs = book.sync_one(release_all).await;
            report = match (report, theirs) {
                (Ok(a), Ok(b)) => Ok(SyncReport {
                    pushed: a.pushed + b.pushed,
                    released: a.released + b.released,
                }),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        report
    }

    async fn sync_one(&self, release_all: bool) -> Result<SyncReport, RepoError> {
        let started = unix_ms(self.clock.now());
        let report = self.push_and_release(release_all).await;
        if !release_all && self.meter.as_ref() != API_CALLS {
            self.refresh_active(started).await?;
        }
        self.forget_idle(unix_ms(self.clock.now()));
        report
    }

    /// Reads again the counters of the users this book admitted or counted for since two
    /// syncs ago and did not push to in this sync, which started at `started` (a push
    /// returns the counter).
    async fn refresh_active(&self, started: i64) -> Result<(), RepoError> {
        let now = unix_ms(self.clock.now());
        let since = now.saturating_sub(2 * millis(self.settings.sync_every));
        let mut by_period: HashMap<BillingPeriod, Vec<(UserId, Arc<Slot>)>> = HashMap::new();
        for shard in self.slots.all() {
            let shard = SlotMap::read(shard);
            for (user, slots) in shard.iter() {
                for slot in slots {
                    let active = slot.opened.get().is_some()
                        && slot.last_used.load(Ordering::Acquire) >= since
                        && slot.pushed_at.load(Ordering::Acquire) < started;
                    if active {
                        by_period
                            .entry(slot.period)
                            .or_default()
                            .push((user.clone(), Arc::clone(slot)));
                    }
                }
            }
        }
        for (period, slots) in by_period {
            let users: Vec<UserId> = slots.iter().map(|(user, _)| user.clone()).collect();
            let counts: HashMap<UserId, u64> = self
                .counters
                .quota_counts(&self.meter, period.start(), &users)
                .await?
                .into_iter()
                .collect();
            for (user, slot) in slots {
                if let Some(count) = counts.get(&user) {
                    slot.counted.store(*count, Ordering::Release);
                }
            }
        }
        Ok(())
    }

    /// Users this instance holds state for.
    pub fn users_in_memory(&self) -> usize {
        self.slots.all().map(|s| SlotMap::read(s).len()).sum()
    }

    /// Forgets the slots idle for `forget_idle_after` with nothing to push or give back.
    /// A slot some call holds (it was looked up and is being used) is kept: its count
    /// could otherwise land in a slot nobody syncs.
    fn forget_idle(&self, now: i64) {
        if now < self.next_forget.load(Ordering::Acquire) {
            return;
        }
        let every =
            (millis(self.settings.forget_idle_after) / 4).max(millis(self.settings.sync_every));
        self.next_forget
            .store(now.saturating_add(every), Ordering::Release);
        let idle_since = now.saturating_sub(millis(self.settings.forget_idle_after));
        let forgettable = |slot: &Arc<Slot>| {
            slot.last_used.load(Ordering::Acquire) < idle_since
                && slot.pending.load(Ordering::Acquire) == 0
                && slot.unspent.load(Ordering::Acquire) == 0
                && Arc::strong_count(slot) == 1
        };
        for shard in self.slots.all() {
            // A read pass first: most syncs find nothing to forget and take no write lock.
            if !SlotMap::read(shard).values().flatten().any(forgettable) {
                continue;
            }
            SlotMap::write(shard).retain(|_, slots| {
                slots.retain(|slot| !forgettable(slot));
                !slots.is_empty()
            });
        }
    }

    async fn push_and_release(&self, release_all: bool) -> Result<SyncReport, RepoError> {
        let now = unix_ms(self.clock.now());
        let idle_since = now.saturating_sub(2 * millis(self.settings.sync_every));
        let push_due = now.saturating_sub(millis(self.settings.push_within));
        let window = SyncWindow {
            release_all,
            idle_since,
            push_due,
        };
        // Only the slots with something to do are taken out: with 100,000 users, taking
        // every one out twice a second cost 3.6 µs per call.
        let mut slots: Vec<(UserId, Arc<Slot>)> = Vec::new();
        for shard in self.slots.all() {
            let shard = SlotMap::read(shard);
            slots.extend(shard.iter().flat_map(|(user, slots)| {
                slots
                    .iter()
                    .filter(|s| s.opened.get().is_some() && window.has_work(s))
                    .map(|s| (user.clone(), Arc::clone(s)))
            }));
        }
        let mut work: Vec<(Arc<Slot>, u64, u64, OwnedMutexGuard<()>)> = Vec::new();
        let mut deltas = Vec::new();
        for (user_id, slot) in slots {
            // A lease being taken pushes the pending counts itself: this slot waits for
            // the next sync (or, at shutdown, for the lease).
            let leasing = Arc::clone(&slot.leasing);
            let guard = if release_all {
                leasing.lock_owned().await
            } else {
                match leasing.try_lock_owned() {
                    Ok(guard) => guard,
                    Err(_) => continue,
                }
            };
            let pending = window.pending_due(&slot);
            let released = if window.lease_idle(&slot) {
                slot.unspent.swap(0, Ordering::AcqRel)
            } else {
                0
            };
            if pending == 0 && released == 0 {
                continue;
            }
            let delta = i64::try_from(pending).unwrap_or(i64::MAX)
                - i64::try_from(released).unwrap_or(i64::MAX);
            deltas.push(QuotaDelta {
                user_id,
                meter: Arc::clone(&self.meter),
                period_start: slot.period.start(),
                delta,
            });
            work.push((slot, pending, released, guard));
        }
        if deltas.is_empty() {
            return Ok(SyncReport::default());
        }
        match self.counters.apply_quota_deltas(&deltas).await {
            Ok(counts) => {
                let mut report = SyncReport::default();
                for ((slot, pending, released, _guard), count) in work.into_iter().zip(counts) {
                    // The new count first: for an instant the user looks one batch busier,
                    // never less busy than they are.
                    slot.counted.store(count, Ordering::Release);
                    slot.pending.fetch_sub(pending, Ordering::AcqRel);
                    if pending > 0 {
                        slot.pushed_at.store(now, Ordering::Release);
                    }
                    report.pushed += pending;
                    report.released += released;
                }
                Ok(report)
            }
            Err(e) => {
                for (slot, _, released, _guard) in work {
                    slot.unspent.fetch_add(released, Ordering::AcqRel);
                }
                Err(e)
            }
        }
    }

    /// Brings counters that lost counts up to the calls stored for their user, so that
    /// the counter (the quota's and `GET /api/usage/current`'s figure) converges to what
    /// is stored. Counts are lost when an instance dies before pushing them (SIGKILL): its
    /// calls are stored all the same (spool replay, or written before the kill), so the
    /// counter stays below them for the rest of the period.
    ///
    /// A counter below its stored calls at one instant may only be waiting for counts
    /// still pending in a live instance: raising it then, and the push after, would count
    /// those calls twice. So the floors found at one call are applied at a later call,
    /// once every count pending at the first has been pushed (`push_within` and two
    /// syncs later): any shortfall left then is lost counts, and raising a counter to
    /// calls stored before can never count a call twice. Pass back what the last call
    /// returned; the first call only looks.
    pub async fn heal(
        &self,
        earlier: Option<HealSnapshot>,
    ) -> Result<(u64, Option<HealSnapshot>), RepoError> {
        let now = self.clock.now();
        let period = BillingPeriod::containing(now);
        let settled =
            time::Duration::try_from(self.settings.push_within + self.settings.sync_every * 2)
                .unwrap_or(time::Duration::MAX);
        let mut raised = 0;
        match earlier {
            // Too young: keep it until its counts have had time to be pushed.
            Some(snapshot) if snapshot.period == period && now - snapshot.at < settled => {
                return Ok((0, Some(snapshot)));
            }
            Some(snapshot) if snapshot.period == period => {
                raised = self
                    .counters
                    .raise_quota_counters(&self.meter, period.start(), &snapshot.floors)
                    .await?;
                if raised > 0 {
                    tracing::warn!(
                        raised,
                        meter = %self.meter,
                        "quota counters raised to the calls stored (counts lost, e.g. with a killed instance)"
                    );
                }
            }
            _ => {}
        }
        let floors = self
            .counters
            .counters_below_stored(&self.meter, period.start())
            .await?;
        let next = (!floors.is_empty()).then_some(HealSnapshot {
            at: now,
            period,
            floors,
        });
        Ok((raised, next))
    }

    /// Runs [`QuotaBook::sync`] every `sync_every`, and [`QuotaBook::heal`] of this book
    /// and every meter's every `heal_every`, until the returned task is aborted.
    pub fn start_sync(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let book = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(book.settings.sync_every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut heal_at = tokio::time::Instant::now();
            let mut healing: HashMap<Arc<str>, HealSnapshot> = HashMap::new();
            loop {
                ticker.tick().await;
                if let Err(e) = book.sync(false).await {
                    tracing::debug!(error = %e, "quota sync failed; will retry");
                }
                if tokio::time::Instant::now() >= heal_at {
                    heal_at = tokio::time::Instant::now() + book.settings.heal_every;
                    let books = std::iter::once(Arc::clone(&book)).chain(book.meter_books());
                    for one in books {
                        let earlier = healing.remove(&one.meter);
                        match one.heal(earlier).await {
                            Ok((_, Some(next))) => {
                                healing.insert(Arc::clone(&one.meter), next);
                            }
                            Ok((_, None)) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "quota heal failed; will retry")
                            }
                        }
                    }
                }
            }
        })
    }

    /// The slot of `user_id` for `period`, with its counter read from the shared counter
    /// on first use (once, however many calls arrive together).
    async fn open(&self, user_id: &UserId, period: BillingPeriod) -> Result<Arc<Slot>, RepoError> {
        let slot = self.slot(user_id, period);
        if slot.opened.get().is_some() {
            return Ok(slot);
        }
        let now = unix_ms(self.clock.now());
        slot.check_available(now)?;
        let opened = slot
            .opened
            .get_or_try_init(|| async {
                // Callers queued behind a failed attempt fail at once.
                slot.check_available(now)?;
                let count = self
                    .counters
                    .quota_count(user_id, &self.meter, period.start())
                    .await?;
                slot.counted.store(count, Ordering::Release);
                Ok::<_, RepoError>(())
            })
            .await;
        if let Err(e) = opened {
            slot.failed(unix_ms(self.clock.now()));
            return Err(e);
        }
        Ok(slot)
    }

    /// The slot of `user_id` for `period`, if this instance has it open.
    fn opened_slot(&self, user_id: &UserId, period: BillingPeriod) -> Option<Arc<Slot>> {
        SlotMap::read(self.slots.shard(user_id))
            .get(user_id)?
            .iter()
            .find(|s| s.period == period && s.opened.get().is_some())
            .cloned()
    }

    fn slot(&self, user_id: &UserId, period: BillingPeriod) -> Arc<Slot> {
        let find = |slots: &[Arc<Slot>]| slots.iter().find(|s| s.period == period).cloned();
        let shard = self.slots.shard(user_id);
        if let Some(slot) = SlotMap::read(shard).get(user_id).and_then(|s| find(s)) {
            return slot;
        }
        let mut all = SlotMap::write(shard);
        let slots = all.entry(user_id.clone()).or_default();
        if let Some(slot) = find(slots) {
            return slot; // added while we waited for the lock
        }
        // A new month. Calls that arrived just before midnight may still be admitted
        // after it, so the previous month's slot is kept beside the new one (its leases
        // and counts are synced like any other); older months go.
        let slot = Arc::new(Slot::new(period));
        slots.push(Arc::clone(&slot));
        slots.sort_by_key(|s| std::cmp::Reverse(s.period));
        slots.truncate(2);
        slot
    }
}
