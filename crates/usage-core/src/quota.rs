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
//! The design, its worst cases and its costs are in `docs/SCALING.md`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Mutex, OnceCell, OwnedMutexGuard};

use crate::repo::{LeaseTerms, QuotaCounterRepository, QuotaDelta};
use crate::{BillingPeriod, Clock, OverLimit, Plan, PlanCatalog, RepoError, UserId};

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
    at: OffsetDateTime,
    period: BillingPeriod,
    floors: Vec<(UserId, u64)>,
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

    /// Admits one call from the lease, if any is left.
    fn spend(&self) -> bool {
        self.unspent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(1))
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
const FAILURE_HOLD_MS: i64 = 1_000;

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

/// Quota decisions for every user of this instance.
pub struct QuotaBook {
    slots: SlotMap,
    counters: Arc<dyn QuotaCounterRepository>,
    catalog: PlanCatalog,
    clock: Arc<dyn Clock>,
    settings: QuotaSettings,
    /// When (unix ms) idle slots are next looked for: a pass reads every slot under the
    /// map's lock, so it runs a few times per idle period, not at every sync.
    next_forget: AtomicI64,
}

impl std::fmt::Debug for QuotaBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaBook")
            .field("catalog", &self.catalog)
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
    /// A book over the shared counters of `counters`.
    pub fn new(
        counters: Arc<dyn QuotaCounterRepository>,
        catalog: PlanCatalog,
        clock: Arc<dyn Clock>,
        settings: QuotaSettings,
    ) -> Self {
        Self {
            slots: SlotMap::new(),
            next_forget: AtomicI64::new(i64::MIN),
            counters,
            catalog,
            clock,
            settings,
        }
    }

    /// The plans and prices this book applies.
    pub fn catalog(&self) -> &PlanCatalog {
        &self.catalog
    }

    /// Checks and counts one call of `user_id` on `plan` at the current time.
    pub async fn admit(&self, user_id: &UserId, plan: Plan) -> Result<QuotaDecision, RepoError> {
        self.admit_at(user_id, plan, self.clock.now()).await
    }

    /// Checks and counts one call that arrived at `at`, in the period containing `at`:
    /// the same instant the call is recorded with, so that a call at 23:59:59.999 on the
    /// last day counts in the month its event is stored in.
    pub async fn admit_at(
        &self,
        user_id: &UserId,
        plan: Plan,
        at: OffsetDateTime,
    ) -> Result<QuotaDecision, RepoError> {
        let period = BillingPeriod::containing(at);
        let terms = *self.catalog.terms(plan);
        let status = |used| QuotaStatus {
            limit: terms.monthly_calls,
            used,
            period_start: period.start(),
            reset_at: period.end(),
        };
        let slot = self.open(user_id, period).await?;
        // Now, not `at`: a call may arrive before midnight and be admitted after it, and
        // `open` may have waited for the database.
        let now = unix_ms(self.clock.now());
        slot.last_used.fetch_max(now, Ordering::Relaxed);
        let limit = match (terms.monthly_calls, terms.over_limit) {
            (Some(limit), OverLimit::Block) => limit,
            _ => {
                slot.pending.fetch_add(1, Ordering::AcqRel);
                return Ok(QuotaDecision::Admitted(status(slot.used())));
            }
        };
        loop {
            if slot.spend() {
                return Ok(QuotaDecision::Admitted(status(slot.used())));
            }
            if now < slot.exhausted_until.load(Ordering::Acquire) {
                return Ok(QuotaDecision::Rejected(status(slot.used().max(limit))));
            }
            slot.check_available(now)?;
            let _leasing = slot.leasing.lock().await;
            if slot.unspent.load(Ordering::Acquire) > 0 {
                continue; // another call leased while this one waited
            }
            if now < slot.exhausted_until.load(Ordering::Acquire) {
                continue;
            }
            slot.check_available(now)?;
            // Calls admitted while the user was on a plan that does not block go in first,
            // so that the lease sees them.
            let add = slot.pending.swap(0, Ordering::AcqRel);
            let lease = LeaseTerms {
                cap: Some(limit),
                max: self.settings.lease_max.max(1),
                share: self.settings.lease_share.max(1),
            };
            let take = match self
                .counters
                .take_quota(user_id, period.start(), add, lease)
                .await
            {
                Ok(take) => take,
                Err(e) => {
                    slot.pending.fetch_add(add, Ordering::AcqRel);
                    // From now, not from the call's start: the failure may have taken the
                    // pool's whole connect timeout.
                    slot.failed(unix_ms(self.clock.now()));
                    return Err(e);
                }
            };
            slot.counted.store(take.count, Ordering::Release);
            if take.taken == 0 {
                let until = now.saturating_add(millis(self.settings.sync_every));
                slot.exhausted_until.store(until, Ordering::Release);
                return Ok(QuotaDecision::Rejected(status(slot.used().max(limit))));
            }
            // This call takes the first leased call.
            slot.unspent.fetch_add(take.taken - 1, Ordering::AcqRel);
            return Ok(QuotaDecision::Admitted(status(slot.used())));
        }
    }

    /// Admitted calls of `user_id` in the current period, on every instance: the shared
    /// counter read now, less this instance's unspent lease, plus its counts not yet
    /// pushed. Other instances' unspent leases count as used (never more than a lease
    /// each).
    pub async fn used(&self, user_id: &UserId) -> Result<u64, RepoError> {
        let period = BillingPeriod::containing(self.clock.now());
        let slot = self.open(user_id, period).await?;
        let counted = self.counters.quota_count(user_id, period.start()).await?;
        slot.counted.store(counted, Ordering::Release);
        Ok(slot.used())
    }

    /// Pushes counts not yet pushed (a user's few calls on a plan that never blocks wait
    /// up to [`QuotaSettings::push_within`]; everything with `release_all`), and gives
    /// back leases unused for two sync intervals (or all of them, with `release_all`, at
    /// shutdown). On failure nothing is lost: the counts stay to be pushed next time.
    pub async fn sync(&self, release_all: bool) -> Result<SyncReport, RepoError> {
        let report = self.push_and_release(release_all).await;
        self.forget_idle(unix_ms(self.clock.now()));
        report
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
                    .raise_quota_counters(period.start(), &snapshot.floors)
                    .await?;
                if raised > 0 {
                    tracing::warn!(
                        raised,
                        "quota counters raised to the calls stored (counts lost, e.g. with a killed instance)"
                    );
                }
            }
            _ => {}
        }
        let floors = self.counters.counters_below_stored(period.start()).await?;
        let next = (!floors.is_empty()).then_some(HealSnapshot {
            at: now,
            period,
            floors,
        });
        Ok((raised, next))
    }

    /// Runs [`QuotaBook::sync`] every `sync_every`, and [`QuotaBook::heal`] every
    /// `heal_every`, until the returned task is aborted.
    pub fn start_sync(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let book = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(book.settings.sync_every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut heal_at = tokio::time::Instant::now();
            let mut healing: Option<HealSnapshot> = None;
            loop {
                ticker.tick().await;
                if let Err(e) = book.sync(false).await {
                    tracing::debug!(error = %e, "quota sync failed; will retry");
                }
                if tokio::time::Instant::now() >= heal_at {
                    heal_at = tokio::time::Instant::now() + book.settings.heal_every;
                    match book.heal(healing.take()).await {
                        Ok((_, next)) => healing = next,
                        Err(e) => tracing::debug!(error = %e, "quota heal failed; will retry"),
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
                let count = self.counters.quota_count(user_id, period.start()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::repo::{
        ApiKeyRecord, ApiKeyRepository, IncludedCalls, UsageRepository as _, User, UserRepository,
    };
    use crate::{ApiKeyId, ManualClock, PlanTerms, UsageEvent};
    use time::macros::datetime;

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

    async fn user_with_stored_calls(
        store: &MemoryStore,
        at: OffsetDateTime,
        calls: usize,
    ) -> UserId {
        let user = User {
            id: UserId::generate(),
            email: format!("{}@example.com", crate::ids::random_base62(8)).to_lowercase(),
            plan: Plan::Free,
            stripe_customer_id: None,
            created_at: at,
            plan_subscription_id: None,
            blocked_at: None,
        };
        store.create_user(&user).await.unwrap();
        let key = ApiKeyRecord {
            id: ApiKeyId::generate(),
            user_id: user.id.clone(),
            name: "k".into(),
            prefix: "eco_live_x".into(),
            key_hash: crate::ids::random_base62(64),
            created_at: at,
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        let events: Vec<UsageEvent> = (0..calls)
            .map(|i| UsageEvent {
                event_id: crate::event::new_event_id(at),
                user_id: user.id.clone(),
                api_key_id: key.id.clone(),
                endpoint: "/api/v1/ping".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 1,
                created_at: at + time::Duration::milliseconds(i as i64),
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
        let book = Arc::new(QuotaBook::new(
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
                        book.admit(&user, Plan::Free).await.unwrap(),
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
        let QuotaDecision::Rejected(status) = book.admit(&user, Plan::Free).await.unwrap() else {
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
        let book = QuotaBook::new(
            store,
            catalog(10, 1_000),
            clock.clone(),
            QuotaSettings::default(),
        );

        // 8 stored before this instance started: 2 left.
        assert!(
            matches!(book.admit(&user, Plan::Free).await.unwrap(), QuotaDecision::Admitted(s) if s.used == 9)
        );
        assert!(
            matches!(book.admit(&user, Plan::Free).await.unwrap(), QuotaDecision::Admitted(s) if s.remaining() == Some(0))
        );
        assert!(matches!(
            book.admit(&user, Plan::Free).await.unwrap(),
            QuotaDecision::Rejected(_)
        ));

        clock.set(datetime!(2026-12-01 00:00 UTC));
        let QuotaDecision::Admitted(status) = book.admit(&user, Plan::Free).await.unwrap() else {
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
        let book = QuotaBook::new(store, catalog(10, 1_000), clock, QuotaSettings::default());
        let arrived = datetime!(2026-11-30 23:59:59.999 UTC);
        let QuotaDecision::Admitted(status) =
            book.admit_at(&user, Plan::Free, arrived).await.unwrap()
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
        book.admit(&user, Plan::Free).await.unwrap();
        book.admit_at(&user, Plan::Free, arrived).await.unwrap();
        book.admit(&user, Plan::Free).await.unwrap();
        let QuotaDecision::Admitted(nov) = book.admit_at(&user, Plan::Free, arrived).await.unwrap()
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
        let book = QuotaBook::new(store, catalog(1, 2), clock, QuotaSettings::default());
        let mut last = None;
        for _ in 0..5 {
            let QuotaDecision::Admitted(status) = book.admit(&user, Plan::Pro).await.unwrap()
            else {
                panic!("pro is never blocked");
            };
            last = Some(status);
        }
        let last = last.unwrap();
        assert_eq!((last.used, last.remaining()), (5, Some(0)));
        assert_eq!(book.catalog().overage_calls(Plan::Pro, last.used), 3);

        let other = UserId::generate();
        let QuotaDecision::Admitted(status) = book.admit(&other, Plan::Enterprise).await.unwrap()
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
        let book = QuotaBook::new(
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
                event_id: crate::event::new_event_id(clock.now()),
                user_id: user.clone(),
                api_key_id: key.clone(),
                endpoint: "/api/v1/ping".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 1,
                created_at: clock.now(),
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
        assert_eq!(store.quota_count(&user, period).await.unwrap(), 0);
        // Too soon to tell: kept, nothing raised.
        clock.advance(time::Duration::seconds(5));
        let (raised, snapshot) = book.heal(snapshot).await.unwrap();
        assert_eq!(raised, 0);
        // The live instance pushes its 10.
        store
            .apply_quota_deltas(&[QuotaDelta {
                user_id: user.clone(),
                period_start: period,
                delta: 10,
            }])
            .await
            .unwrap();
        // Once every pending count has had its time: the 20 lost are added, not 30 more.
        clock.advance(time::Duration::seconds(6));
        let (raised, snapshot) = book.heal(snapshot).await.unwrap();
        assert_eq!(raised, 1);
        assert_eq!(store.quota_count(&user, period).await.unwrap(), 30);
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
        assert_eq!(store.quota_count(&user, period).await.unwrap(), 30);
    }

    fn two_instances(
        store: &Arc<MemoryStore>,
        clock: &Arc<ManualClock>,
        free: u64,
        settings: QuotaSettings,
    ) -> (Arc<QuotaBook>, Arc<QuotaBook>) {
        let book = || {
            Arc::new(QuotaBook::new(
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
                    if let QuotaDecision::Admitted(s) = book.admit(&user, Plan::Free).await.unwrap()
                    {
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
                .quota_count(&user, BillingPeriod::containing(clock.now()).start())
                .await
                .unwrap(),
            1_000
        );
        assert!(
            matches!(a.admit(&user, Plan::Free).await.unwrap(), QuotaDecision::Rejected(s) if s.remaining() == Some(0))
        );
        assert!(matches!(
            b.admit(&user, Plan::Free).await.unwrap(),
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
            matches!(a.admit(&user, Plan::Free).await.unwrap(), QuotaDecision::Admitted(s) if s.used == 1)
        );
        // B gets the rest, then is refused while A sits on 49 unspent calls.
        let mut on_b = 0;
        while let QuotaDecision::Admitted(_) = b.admit(&user, Plan::Free).await.unwrap() {
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
        while let QuotaDecision::Admitted(_) = b.admit(&user, Plan::Free).await.unwrap() {
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
                a.admit(&user, Plan::Pro).await.unwrap();
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
            a.admit(&user, Plan::Pro).await.unwrap();
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
        let QuotaDecision::Admitted(status) = b.admit(&user, Plan::Pro).await.unwrap() else {
            panic!("pro is never blocked");
        };
        assert_eq!(status.used, 8);

        // Moved to free with 8 used (one not pushed yet, on B): 2 left, across both.
        let mut admitted = 0;
        for book in [&a, &b, &a, &b, &a] {
            if let QuotaDecision::Admitted(_) = book.admit(&user, Plan::Free).await.unwrap() {
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
        let book = QuotaBook::new(
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
            book.admit(user, Plan::Pro).await.unwrap();
        }
        book.admit(&free, Plan::Free).await.unwrap();
        assert_eq!(book.users_in_memory(), 51);
        // Pushed, but not idle long enough: kept.
        book.sync(false).await.unwrap();
        assert_eq!(book.users_in_memory(), 51);
        // One of them keeps calling; the others go quiet past the idle time.
        clock.advance(time::Duration::seconds(200));
        book.admit(&users[0], Plan::Pro).await.unwrap();
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
        let QuotaDecision::Admitted(status) = book.admit(&users[7], Plan::Pro).await.unwrap()
        else {
            panic!("pro is never blocked");
        };
        assert_eq!(status.used, 2);
        let QuotaDecision::Admitted(status) = book.admit(&free, Plan::Free).await.unwrap() else {
            panic!("free has calls left");
        };
        assert_eq!(status.used, 2);
    }

    #[tokio::test]
    async fn a_user_being_served_is_never_forgotten() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let book = QuotaBook::new(
            store.clone(),
            catalog(10, 1_000),
            clock.clone(),
            QuotaSettings::default(),
        );
        let user = user_with_stored_calls(&store, clock.now(), 0).await;
        book.admit(&user, Plan::Pro).await.unwrap();
        book.sync(false).await.unwrap();
        // A call holds the slot (looked up, not yet counted) while the sync runs.
        let held = book.slot(&user, BillingPeriod::containing(clock.now()));
        clock.advance(time::Duration::minutes(10));
        book.sync(false).await.unwrap();
        assert_eq!(book.users_in_memory(), 1);
        held.pending.fetch_add(1, Ordering::AcqRel);
        drop(held);
        assert_eq!(
            book.sync(false).await.unwrap().pushed,
            1,
            "its count is pushed"
        );
        clock.advance(time::Duration::minutes(10));
        book.sync(false).await.unwrap();
        assert_eq!(book.users_in_memory(), 0);
        assert_eq!(book.used(&user).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn shutdown_gives_every_unspent_lease_back() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let user = user_with_stored_calls(&store, clock.now(), 0).await;
        let (a, b) = two_instances(&store, &clock, 1_000, QuotaSettings::default());
        a.admit(&user, Plan::Free).await.unwrap();
        let period = BillingPeriod::containing(clock.now()).start();
        assert_eq!(
            store.quota_count(&user, period).await.unwrap(),
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
        assert_eq!(store.quota_count(&user, period).await.unwrap(), 1);
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
        async fn quota_count(&self, u: &UserId, p: OffsetDateTime) -> Result<u64, RepoError> {
            self.check()?;
            self.inner.quota_count(u, p).await
        }
        async fn take_quota(
            &self,
            u: &UserId,
            p: OffsetDateTime,
            add: u64,
            lease: LeaseTerms,
        ) -> Result<crate::repo::QuotaTake, RepoError> {
            self.check()?;
            if self.lease_gated.load(Ordering::SeqCst) {
                self.inside.notify_one();
                self.go.notified().await;
            }
            self.inner.take_quota(u, p, add, lease).await
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
            p: OffsetDateTime,
        ) -> Result<Vec<(UserId, u64)>, RepoError> {
            self.check()?;
            self.inner.counters_below_stored(p).await
        }
        async fn raise_quota_counters(
            &self,
            p: OffsetDateTime,
            floors: &[(UserId, u64)],
        ) -> Result<u64, RepoError> {
            self.check()?;
            self.inner.raise_quota_counters(p, floors).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_downgrade_during_a_sync_counts_each_call_once() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let user = user_with_stored_calls(&store, clock.now(), 0).await;
        let counters = Arc::new(FlakyCounters::new(store.clone()));
        counters.gated.store(true, Ordering::SeqCst);
        let book = Arc::new(QuotaBook::new(
            counters.clone(),
            catalog(1_000, 10_000),
            clock.clone(),
            QuotaSettings::default(),
        ));
        for _ in 0..50 {
            book.admit(&user, Plan::Pro).await.unwrap();
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
            async move { book.admit(&user, Plan::Free).await }
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
        assert_eq!(store.quota_count(&user, period).await.unwrap(), 51);
        assert_eq!(book.used(&user).await.unwrap(), 51);
    }

    #[tokio::test]
    async fn through_a_database_outage_leases_and_counts_carry_on_and_nothing_is_lost() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let free = user_with_stored_calls(&store, clock.now(), 0).await;
        let pro = user_with_stored_calls(&store, clock.now(), 0).await;
        let counters = Arc::new(FlakyCounters::new(store.clone()));
        let book = QuotaBook::new(
            counters.clone(),
            catalog(1_000, 10),
            clock.clone(),
            QuotaSettings::default(),
        );
        let admitted =
            |d: Result<QuotaDecision, RepoError>| matches!(d, Ok(QuotaDecision::Admitted(_)));
        assert!(admitted(book.admit(&free, Plan::Free).await)); // leases 62
        assert!(admitted(book.admit(&pro, Plan::Pro).await));
        counters.down.store(true, Ordering::SeqCst);
        let calls = counters.calls.load(Ordering::SeqCst);
        // The lease in hand and the plans that never block carry on without the database.
        for _ in 0..61 {
            assert!(admitted(book.admit(&free, Plan::Free).await));
        }
        for _ in 0..20 {
            assert!(admitted(book.admit(&pro, Plan::Pro).await));
        }
        assert_eq!(counters.calls.load(Ordering::SeqCst), calls);
        // Lease spent: one try, then failing at once for a second.
        assert!(book.admit(&free, Plan::Free).await.is_err());
        assert!(book.admit(&free, Plan::Free).await.is_err());
        assert_eq!(counters.calls.load(Ordering::SeqCst), calls + 1);
        assert!(book.sync(false).await.is_err());
        clock.advance(time::Duration::seconds(2));
        assert!(book.admit(&free, Plan::Free).await.is_err());
        assert_eq!(counters.calls.load(Ordering::SeqCst), calls + 3);

        counters.down.store(false, Ordering::SeqCst);
        clock.advance(time::Duration::seconds(2));
        assert!(admitted(book.admit(&free, Plan::Free).await));
        assert_eq!(
            book.sync(true).await.unwrap(),
            SyncReport {
                pushed: 21,
                released: 57
            }
        );
        let period = BillingPeriod::containing(clock.now()).start();
        assert_eq!(
            store.quota_count(&pro, period).await.unwrap(),
            21,
            "no count lost"
        );
        assert_eq!(store.quota_count(&free, period).await.unwrap(), 63);
    }

    fn flaky_book(
        store: &Arc<MemoryStore>,
        clock: &Arc<ManualClock>,
        free: u64,
        settings: QuotaSettings,
    ) -> (Arc<FlakyCounters>, Arc<QuotaBook>) {
        let counters = Arc::new(FlakyCounters::new(store.clone()));
        let book = Arc::new(QuotaBook::new(
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
        assert!(book.admit(&user, Plan::Free).await.is_err());
        let calls = counters.calls.load(Ordering::SeqCst);
        counters.down.store(false, Ordering::SeqCst);
        clock.advance(time::Duration::milliseconds(FAILURE_HOLD_MS - 1));
        assert!(
            book.admit(&user, Plan::Free).await.is_err(),
            "still held: fails at once"
        );
        assert_eq!(counters.calls.load(Ordering::SeqCst), calls, "not asked");
        clock.advance(time::Duration::milliseconds(1));
        assert!(matches!(
            book.admit(&user, Plan::Free).await.unwrap(),
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
            book.admit(&user, Plan::Free).await.unwrap(),
            QuotaDecision::Rejected(_)
        ));
        let calls = counters.calls.load(Ordering::SeqCst);
        clock.advance(time::Duration::milliseconds(499));
        assert!(matches!(
            book.admit(&user, Plan::Free).await.unwrap(),
            QuotaDecision::Rejected(QuotaStatus { used: 10, .. })
        ));
        assert_eq!(counters.calls.load(Ordering::SeqCst), calls, "not asked");
        // At 500 ms exactly the counter is read again (and still full).
        clock.advance(time::Duration::milliseconds(1));
        assert!(matches!(
            book.admit(&user, Plan::Free).await.unwrap(),
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
        let call = |book: &Arc<QuotaBook>| {
            let (book, user) = (Arc::clone(book), user.clone());
            tokio::spawn(async move { book.admit(&user, Plan::Free).await })
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
            store.quota_count(&user, period).await.unwrap(),
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
        let book = QuotaBook::new(store.clone(), catalog(10, 1_000), clock.clone(), settings);
        let start = clock.now();
        let sync_at = |ms: i64| {
            clock.set(start + time::Duration::milliseconds(ms));
            book.sync(false)
        };
        book.admit(&user, Plan::Pro).await.unwrap();
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
        let book = QuotaBook::new(
            store.clone(),
            catalog(1_000, 1_000),
            clock.clone(),
            QuotaSettings::default(),
        );
        book.admit(&user, Plan::Free).await.unwrap(); // leases 62, spends 1
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
    fn the_book_debugs_as_its_plans_and_settings() {
        let book = QuotaBook::new(
            Arc::new(MemoryStore::new()),
            catalog(10, 1_000),
            Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC))),
            QuotaSettings::default(),
        );
        let text = format!("{book:?}");
        assert!(text.starts_with("QuotaBook {"), "{text}");
        assert!(text.contains("monthly_calls: Some(10)"), "{text}");
        assert!(text.contains("sync_every: 500ms"), "{text}");
    }
}
