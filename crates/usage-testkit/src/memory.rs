//! In-memory repositories, for tests and for trying the library crates alone.
//! They follow the same contract as the database stores (see the conformance suite).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use usage_core::catalog::{API_CALLS, PlanDefinition, PlanMove};
use usage_core::meter::{Aggregation, Meter, RouteCost};
use usage_core::repo::{
    AdminAuditEntry, AdminRepository, ApiKeyRecord, ApiKeyRepository, ChargeStatus, DailyUsage,
    DailyUsageRepository, DayTotal, DeadLetter, DeletedKeys, EndpointCount, EndpointStats,
    EventOutcome, EventsAfter, IncludedCalls, KeyIssue, KeyRetirement, LeaseTerms, MeterEvent,
    MeterUsageRepository, MeterUser, NewOverageCharge, OverageCharge, OverageChargeRepository,
    OverageLedgerEntry, PeriodUsage, PlanRepository, PlanVersion, QuotaCounterRepository,
    QuotaDelta, QuotaTake, RecordOutcome, SessionRepository, Subscription, SubscriptionChange,
    SubscriptionOutcome, TOP_ENDPOINTS, UninvoicedOverage, UsagePrune, UsageRecord,
    UsageRepository, User, UserPageQuery, UserRepository, UserSort, UserUsageRow,
    late_write_cutoff, lease_size, plan_key_issue, plan_subscription_change,
};
use usage_core::{
    ApiKeyId, BillingPeriod, Clock, Plan, RepoError, Store, SystemClock, UsageEvent, UserId,
};

#[derive(Debug, Default)]
struct State {
    users: BTreeMap<UserId, User>,
    /// Emails are unique and never change: an index, so that seeding 100,000 users is
    /// not quadratic.
    user_by_email: HashMap<String, UserId>,
    keys: BTreeMap<ApiKeyId, ApiKeyRecord>,
    /// Key hashes are unique and never change: the lookup on every uncached call.
    key_by_hash: HashMap<String, ApiKeyId>,
    event_ids: HashSet<Uuid>,
    events: Vec<UsageEvent>,
    records: BTreeMap<(UserId, OffsetDateTime), UsageRecord>,
    daily: BTreeMap<(UserId, Date), DailyUsage>,
    /// Per day: (late writes, late writes seen by the last aggregation after the day).
    days: BTreeMap<Date, (u64, Option<u64>)>,
    dead_letters: BTreeMap<Uuid, DeadLetter>,
    charges: Vec<OverageCharge>,
    audit: Vec<AdminAuditEntry>,
    /// Admission counters by (user, period start, meter).
    quota: BTreeMap<(UserId, OffsetDateTime, String), u64>,
    plan_changed: BTreeMap<UserId, OffsetDateTime>,
    /// Retention's bound: events before it were removed.
    pruned_before: Option<OffsetDateTime>,
    /// Stripe events recorded: event id to (customer, created, applied).
    stripe_events: HashMap<String, (String, OffsetDateTime, bool)>,
    /// Dashboard sessions: token hash to (user, expires at).
    sessions: HashMap<String, (UserId, OffsetDateTime)>,
    /// Sign-in links: token hash to (user, expires at, used).
    login_links: HashMap<String, (UserId, OffsetDateTime, bool)>,
    /// Deleted keys, numbered from 1 in the order of their deletion.
    deleted_keys: Vec<(i64, ApiKeyId)>,
    /// The plan catalog: by key, when the plan was archived and its versions in order.
    plans: BTreeMap<String, (Option<OffsetDateTime>, Vec<PlanVersion>)>,
    /// The meters by key (`api_calls` from the start, as the migration stores it).
    meters: BTreeMap<String, Meter>,
    /// The route costs by (route, meter).
    route_costs: BTreeMap<(String, String), u64>,
    /// Each user's quantity of each meter by period start.
    meter_usage: BTreeMap<(UserId, OffsetDateTime, String), u64>,
    /// Of each, the quantity invoiced.
    meter_invoiced: BTreeMap<(UserId, OffsetDateTime, String), u64>,
    /// The same by UTC day.
    meter_daily: BTreeMap<(UserId, String, Date), u64>,
    /// unique_count values seen, by user, period start and meter.
    meter_values: BTreeSet<(UserId, OffsetDateTime, String, String)>,
    /// Every (source, id) of an event ever stored.
    meter_event_ids: HashSet<(String, String)>,
    /// The events stored.
    meter_events: Vec<MeterEvent>,
}

impl State {
    /// Adds one report to its user's period and day of `meter`, as the meter adds up:
    /// `distinct` reports are unique_count values seen for the first time (one each).
    /// `counted_here` (events): an existing admission counter of a `count` or `sum` meter
    /// takes it too.
    fn add_meter_report(
        &mut self,
        user_id: &UserId,
        meter: &str,
        at: OffsetDateTime,
        quantity: u64,
        distinct: bool,
        counted_here: bool,
    ) {
        let Some(kind) = self.meters.get(meter).map(|m| m.aggregation) else {
            return;
        };
        if (kind == Aggregation::UniqueCount) != distinct {
            return;
        }
        let merge = |stored: &mut u64| match kind {
            Aggregation::Max => *stored = (*stored).max(quantity.min(i64::MAX as u64)),
            Aggregation::Sum => {
                *stored = stored.saturating_add(quantity).min(i64::MAX as u64);
            }
            Aggregation::Count | Aggregation::UniqueCount => *stored += 1,
        };
        let at = at.checked_to_offset(time::UtcOffset::UTC).unwrap_or(at);
        let period = BillingPeriod::containing(at).start();
        merge(
            self.meter_usage
                .entry((user_id.clone(), period, meter.to_owned()))
                .or_default(),
        );
        if counted_here
            && matches!(kind, Aggregation::Count | Aggregation::Sum)
            && let Some(counter) = self
                .quota
                .get_mut(&(user_id.clone(), period, meter.to_owned()))
        {
            let added = if kind == Aggregation::Sum {
                quantity
            } else {
                1
            };
            *counter = counter.saturating_add(added).min(i64::MAX as u64);
        }
        merge(
            self.meter_daily
                .entry((user_id.clone(), meter.to_owned(), at.date()))
                .or_default(),
        );
    }
}

impl State {
    /// Removes a key and numbers its deletion.
    fn delete_key(&mut self, id: &ApiKeyId) {
        if let Some(key) = self.keys.remove(id) {
            self.key_by_hash.remove(&key.key_hash);
            let seq = self.deleted_keys.last().map_or(1, |(seq, _)| seq + 1);
            self.deleted_keys.push((seq, key.id));
        }
    }
}

impl State {
    /// The newest version of plan `key`, if it has one.
    fn newest_version(&self, key: &str) -> Option<u32> {
        self.plans
            .get(key)
            .and_then(|(_, versions)| versions.last())
            .map(|v| v.plan.version)
    }

    /// Stores a new key, and indexes its hash.
    fn insert_key(&mut self, key: &ApiKeyRecord) {
        self.key_by_hash
            .insert(key.key_hash.clone(), key.id.clone());
        self.keys.insert(key.id.clone(), key.clone());
    }
}

/// All repositories in one process-local map. Cheap to create; one per test.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// What the store's rules of time read (which calls are late for their day).
    clock: Arc<dyn Clock>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store reading `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        // As the migrations leave a database: the built-in plans' keys, their terms to be
        // seeded from the plan variables.
        let plans = Plan::builtin()
            .into_iter()
            .map(|p| (p.as_str().to_owned(), (None, Vec::new())))
            .collect();
        Self {
            state: Mutex::new(State {
                plans,
                meters: BTreeMap::from([(API_CALLS.to_owned(), Meter::api_calls())]),
                ..State::default()
            }),
            clock,
        }
    }

    /// Counts an attempt on a charge, recording why it did not succeed.
    fn charge_attempt(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
        status: Option<ChargeStatus>,
    ) -> Result<OverageCharge, RepoError> {
        let mut state = self.state();
        let charge = state
            .charges
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or(RepoError::NotFound {
                entity: "overage charge",
            })?;
        if let Some(status) = status {
            charge.status = status;
        }
        charge.attempts += 1;
        charge.last_error = Some(error.to_owned());
        charge.updated_at = at;
        Ok(charge.clone())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No operation leaves the state half-written before a panic could poison it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `Conflict` when a user other than `id` has `customer`.
fn check_customer_free(
    state: &State,
    id: &UserId,
    customer: Option<&str>,
) -> Result<(), RepoError> {
    let taken = customer.is_some_and(|c| {
        state
            .users
            .values()
            .any(|u| u.id != *id && u.stripe_customer_id.as_deref() == Some(c))
    });
    if taken {
        return Err(RepoError::Conflict {
            entity: "user",
            field: "stripe_customer_id",
        });
    }
    Ok(())
}

#[async_trait]
impl UserRepository for MemoryStore {
    async fn create_user(&self, user: &User) -> Result<(), RepoError> {
        let mut state = self.state();
        if state.users.contains_key(&user.id) {
            return Err(RepoError::Conflict {
                entity: "user",
                field: "id",
            });
        }
        if state.user_by_email.contains_key(&user.email) {
            return Err(RepoError::Conflict {
                entity: "user",
                field: "email",
            });
        }
        check_customer_free(&state, &user.id, user.stripe_customer_id.as_deref())?;
        let user = User {
            plan_version: state.newest_version(user.plan.as_str()),
            ..user.clone()
        };
        state
            .user_by_email
            .insert(user.email.clone(), user.id.clone());
        state.users.insert(user.id.clone(), user);
        Ok(())
    }

    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, RepoError> {
        Ok(self.state().users.get(id).cloned())
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, RepoError> {
        let state = self.state();
        Ok(state
            .user_by_email
            .get(email)
            .and_then(|id| state.users.get(id))
            .cloned())
    }

    async fn set_plan(
        &self,
        id: &UserId,
        plan: Plan,
        at: OffsetDateTime,
    ) -> Result<User, RepoError> {
        let mut state = self.state();
        let newest = state.newest_version(plan.as_str());
        let user = state
            .users
            .get_mut(id)
            .ok_or(RepoError::NotFound { entity: "user" })?;
        if user.plan != plan {
            user.plan_version = newest;
        }
        user.plan = plan;
        let user = user.clone();
        state.plan_changed.insert(id.clone(), at);
        Ok(user)
    }

    async fn set_user_overrides(
        &self,
        id: &UserId,
        overrides: Option<&usage_core::catalog::Overrides>,
        at: OffsetDateTime,
    ) -> Result<User, RepoError> {
        let mut state = self.state();
        let user = state
            .users
            .get_mut(id)
            .ok_or(RepoError::NotFound { entity: "user" })?;
        user.overrides = overrides.cloned();
        let user = user.clone();
        state.plan_changed.insert(id.clone(), at);
        Ok(user)
    }

    async fn set_stripe_customer(
        &self,
        id: &UserId,
        customer: Option<&str>,
    ) -> Result<User, RepoError> {
        let mut state = self.state();
        if !state.users.contains_key(id) {
            return Err(RepoError::NotFound { entity: "user" });
        }
        check_customer_free(&state, id, customer)?;
        let user = state
            .users
            .get_mut(id)
            .ok_or(RepoError::NotFound { entity: "user" })?;
        user.stripe_customer_id = customer.map(str::to_owned);
        Ok(user.clone())
    }

    async fn apply_subscription_change(
        &self,
        change: &SubscriptionChange,
        at: OffsetDateTime,
    ) -> Result<SubscriptionOutcome, RepoError> {
        let mut state = self.state();
        let user = state
            .users
            .values()
            .find(|u| u.stripe_customer_id.as_deref() == Some(change.customer.as_str()));
        let latest_applied = state
            .stripe_events
            .values()
            .filter(|(customer, _, applied)| *applied && *customer == change.customer)
            .map(|(_, created, _)| *created)
            .max();
        let is_new = !state.stripe_events.contains_key(&change.event_id);
        let held = user.map(|u| u.plan.clone());
        let mut outcome = plan_subscription_change(user, is_new, latest_applied, change);
        if let SubscriptionOutcome::Applied(user) = &mut outcome {
            if held.as_ref() != Some(&user.plan) {
                user.plan_version = state.newest_version(user.plan.as_str());
            }
            state.users.insert(user.id.clone(), user.clone());
            state.plan_changed.insert(user.id.clone(), at);
        }
        if let Some(stored) = outcome.stored_name() {
            state.stripe_events.insert(
                change.event_id.clone(),
                (change.customer.clone(), change.created, stored == "applied"),
            );
        }
        Ok(outcome)
    }

    async fn plans_changed_since(&self, since: OffsetDateTime) -> Result<Vec<UserId>, RepoError> {
        Ok(self
            .state()
            .plan_changed
            .iter()
            .filter(|(_, at)| **at >= since)
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn set_user_blocked(
        &self,
        id: &UserId,
        at: Option<OffsetDateTime>,
    ) -> Result<User, RepoError> {
        let mut state = self.state();
        let user = state
            .users
            .get_mut(id)
            .ok_or(RepoError::NotFound { entity: "user" })?;
        user.blocked_at = at;
        Ok(user.clone())
    }

    async fn delete_user(&self, id: &UserId) -> Result<bool, RepoError> {
        let mut state = self.state();
        let Some(user) = state.users.remove(id) else {
            return Ok(false);
        };
        // As the databases' ON DELETE CASCADE.
        state.user_by_email.remove(&user.email);
        let keys: Vec<ApiKeyId> = state
            .keys
            .values()
            .filter(|k| &k.user_id == id)
            .map(|k| k.id.clone())
            .collect();
        for key in &keys {
            state.delete_key(key);
        }
        state.records.retain(|(user, _), _| user != id);
        state.daily.retain(|(user, _), _| user != id);
        state.charges.retain(|c| &c.user_id != id);
        state.quota.retain(|(user, _, _), _| user != id);
        state.plan_changed.remove(id);
        state.sessions.retain(|_, (user, _)| user != id);
        state.login_links.retain(|_, (user, _, _)| user != id);
        Ok(true)
    }

    async fn count_users_by_plan(&self) -> Result<Vec<(Plan, u64)>, RepoError> {
        let mut counts: BTreeMap<Plan, u64> = BTreeMap::new();
        for user in self.state().users.values() {
            *counts.entry(user.plan.clone()).or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }

    async fn count_users_by_terms(
        &self,
    ) -> Result<Vec<(usage_core::repo::Subscription, u64)>, RepoError> {
        let mut counts: Vec<(usage_core::repo::Subscription, u64)> = Vec::new();
        for user in self.state().users.values() {
            let subscription = user.subscription();
            match counts.iter_mut().find(|(s, _)| *s == subscription) {
                Some((_, n)) => *n += 1,
                None => counts.push((subscription, 1)),
            }
        }
        Ok(counts)
    }
}

#[async_trait]
impl ApiKeyRepository for MemoryStore {
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), RepoError> {
        let mut state = self.state();
        if !state.users.contains_key(&key.user_id) {
            return Err(RepoError::NotFound { entity: "user" });
        }
        if state.keys.contains_key(&key.id) {
            return Err(RepoError::Conflict {
                entity: "API key",
                field: "id",
            });
        }
        if state.key_by_hash.contains_key(&key.key_hash) {
            return Err(RepoError::Conflict {
                entity: "API key",
                field: "key_hash",
            });
        }
        state.insert_key(key);
        Ok(())
    }

    async fn issue_api_key(
        &self,
        key: &ApiKeyRecord,
        max_active: usize,
        retire: Option<&KeyRetirement>,
    ) -> Result<KeyIssue, RepoError> {
        let mut state = self.state();
        if !state.users.contains_key(&key.user_id) {
            return Err(RepoError::NotFound { entity: "user" });
        }
        let users_keys: Vec<ApiKeyRecord> = state
            .keys
            .values()
            .filter(|k| k.user_id == key.user_id)
            .cloned()
            .collect();
        let plan = plan_key_issue(&users_keys, key, max_active, retire);
        let KeyIssue::Issued { retired } = &plan else {
            return Ok(plan);
        };
        if state.keys.contains_key(&key.id) || state.key_by_hash.contains_key(&key.key_hash) {
            return Err(RepoError::Conflict {
                entity: "API key",
                field: "id",
            });
        }
        state.insert_key(key);
        if let Some(old) = retired {
            state.keys.insert(old.id.clone(), old.clone());
        }
        Ok(plan)
    }

    async fn api_key_and_plan_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<(ApiKeyRecord, usage_core::repo::Subscription)>, RepoError> {
        let state = self.state();
        Ok(state
            .key_by_hash
            .get(key_hash)
            .and_then(|id| state.keys.get(id))
            .and_then(|k| Some((k.clone(), state.users.get(&k.user_id)?.subscription()))))
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, RepoError> {
        let state = self.state();
        Ok(state
            .key_by_hash
            .get(key_hash)
            .and_then(|id| state.keys.get(id))
            .cloned())
    }

    async fn api_keys_for_user(&self, user_id: &UserId) -> Result<Vec<ApiKeyRecord>, RepoError> {
        let mut keys: Vec<_> = self
            .state()
            .keys
            .values()
            .filter(|k| &k.user_id == user_id)
            .cloned()
            .collect();
        keys.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(keys)
    }

    async fn revoke_api_key(
        &self,
        user_id: &UserId,
        key_id: &ApiKeyId,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, RepoError> {
        let mut state = self.state();
        Ok(state
            .keys
            .get_mut(key_id)
            .filter(|k| &k.user_id == user_id)
            .map(|k| {
                k.revoked_at.get_or_insert(at);
                k.clone()
            }))
    }

    async fn touch_api_keys(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), RepoError> {
        let mut state = self.state();
        for (id, at) in used {
            if let Some(key) = state.keys.get_mut(id) {
                key.last_used_at = Some(key.last_used_at.map_or(*at, |old| old.max(*at)));
            }
        }
        Ok(())
    }

    async fn api_keys_retired_since(
        &self,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<ApiKeyId>, RepoError> {
        Ok(self
            .state()
            .keys
            .values()
            .filter(|k| {
                k.revoked_at.is_some_and(|at| at >= since)
                    || k.expires_at.is_some_and(|at| since <= at && at <= now)
            })
            .map(|k| k.id.clone())
            .collect())
    }

    async fn delete_api_key(&self, user_id: &UserId, key_id: &ApiKeyId) -> Result<bool, RepoError> {
        let mut state = self.state();
        if state.keys.get(key_id).is_none_or(|k| &k.user_id != user_id) {
            return Ok(false);
        }
        state.delete_key(key_id);
        Ok(true)
    }

    async fn api_keys_deleted_after(&self, after: i64) -> Result<DeletedKeys, RepoError> {
        let state = self.state();
        let newer: Vec<&(i64, ApiKeyId)> = state
            .deleted_keys
            .iter()
            .filter(|(seq, _)| *seq > after)
            .collect();
        Ok(DeletedKeys {
            through: newer.last().map_or(after, |(seq, _)| *seq),
            keys: newer.into_iter().map(|(_, id)| id.clone()).collect(),
        })
    }
}

#[async_trait]
impl UsageRepository for MemoryStore {
    async fn record_usage(
        &self,
        events: &[UsageEvent],
        included: &IncludedCalls,
    ) -> Result<RecordOutcome, RepoError> {
        let mut state = self.state();
        // Check every reference first so a failing batch changes nothing, as a rolled-back
        // transaction would.
        for e in events {
            if !state.users.contains_key(&e.user_id) {
                return Err(RepoError::NotFound { entity: "user" });
            }
            if !state.keys.contains_key(&e.api_key_id) {
                return Err(RepoError::NotFound { entity: "API key" });
            }
        }
        let mut outcome = RecordOutcome::default();
        let mut added: HashMap<(UserId, BillingPeriod), u64> = HashMap::new();
        let cutoff = late_write_cutoff(self.clock.now());
        let mut late_days = BTreeSet::new();
        for e in events {
            if !state.event_ids.insert(e.event_id) {
                outcome.duplicates += 1;
                continue;
            }
            outcome.inserted += 1;
            if e.created_at < cutoff {
                late_days.insert(e.created_at.date());
            }
            state.events.push(e.clone());
            for (meter, quantity) in e.units.iter() {
                state.add_meter_report(&e.user_id, meter, e.created_at, quantity, false, false);
            }
            let period = BillingPeriod::containing(e.created_at);
            *added.entry((e.user_id.clone(), period)).or_default() += 1;
        }
        for day in late_days {
            state.days.entry(day).or_insert((0, None)).0 += 1;
        }
        let now = events.iter().map(|e| e.created_at).max();
        for ((user_id, period), calls) in added {
            let record = state
                .records
                .entry((user_id.clone(), period.start()))
                .or_insert_with(|| UsageRecord {
                    user_id: user_id.clone(),
                    period_start: period.start(),
                    period_end: period.end(),
                    api_calls: 0,
                    overage_calls: 0,
                    overage_invoiced_calls: 0,
                    updated_at: period.start(),
                });
            record.api_calls += calls;
            record.overage_calls = included
                .get(&user_id)
                .map_or(0, |limit| record.api_calls.saturating_sub(*limit));
            record.updated_at = now.unwrap_or(record.updated_at);
        }
        Ok(outcome)
    }

    async fn usage_record(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<Option<UsageRecord>, RepoError> {
        Ok(self
            .state()
            .records
            .get(&(user_id.clone(), period_start))
            .cloned())
    }

    async fn endpoint_stats(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<EndpointStats>, RepoError> {
        let state = self.state();
        let mut per: BTreeMap<(&str, &str), EndpointStats> = BTreeMap::new();
        for e in state
            .events
            .iter()
            .filter(|e| &e.user_id == user_id && from <= e.created_at && e.created_at < to)
        {
            let stats = per
                .entry((&e.endpoint, &e.method))
                .or_insert_with(|| EndpointStats {
                    endpoint: e.endpoint.clone(),
                    method: e.method.clone(),
                    calls: 0,
                    error_calls: 0,
                    total_response_time_ms: 0,
                });
            stats.calls += 1;
            stats.error_calls += u64::from(e.status_code >= 400);
            stats.total_response_time_ms += u64::from(e.response_time_ms);
        }
        let mut stats: Vec<EndpointStats> = per.into_values().collect();
        // Stable: (endpoint, method) order among ties.
        stats.sort_by_key(|s| std::cmp::Reverse(s.calls));
        Ok(stats)
    }

    async fn count_usage_events(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        let state = self.state();
        let n = state
            .events
            .iter()
            .filter(|e| &e.user_id == user_id && from <= e.created_at && e.created_at < to)
            .count();
        Ok(n as u64)
    }

    async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), RepoError> {
        let mut state = self.state();
        for letter in letters {
            state
                .dead_letters
                .entry(letter.event.event_id)
                .or_insert_with(|| letter.clone());
        }
        Ok(())
    }

    async fn dead_letters(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError> {
        let state = self.state();
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(id),
            None => std::ops::Bound::Unbounded,
        };
        Ok(state
            .dead_letters
            .range((from, std::ops::Bound::Unbounded))
            .take(limit as usize)
            .map(|(_, l)| l.clone())
            .collect())
    }

    async fn remove_dead_letters(&self, event_ids: &[Uuid]) -> Result<u64, RepoError> {
        let mut state = self.state();
        Ok(event_ids
            .iter()
            .filter(|id| state.dead_letters.remove(id).is_some())
            .count() as u64)
    }

    async fn prepare_usage_storage(
        &self,
        _now: OffsetDateTime,
        _months_ahead: u32,
    ) -> Result<Vec<String>, RepoError> {
        Ok(Vec::new())
    }

    async fn prune_usage(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<UsagePrune, RepoError> {
        let mut state = self.state();
        let expired: Vec<Uuid> = state
            .events
            .iter()
            .filter(|e| e.created_at < before)
            .map(|e| e.event_id)
            .collect();
        let meter_events = state
            .meter_events
            .iter()
            .filter(|e| e.created_at < before)
            .count() as u64;
        if !dry_run {
            state.events.retain(|e| e.created_at >= before);
            for id in &expired {
                state.event_ids.remove(id);
            }
            // Their (source, id) stays: an event is stored once, ever.
            state.meter_events.retain(|e| e.created_at >= before);
            state.pruned_before = state.pruned_before.max(Some(before));
        }
        Ok(UsagePrune {
            meter_events,
            before,
            rows: expired.len() as u64,
            partitions: Vec::new(),
        })
    }

    async fn usage_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError> {
        let state = self.state();
        let mut page: Vec<UsageEvent> = state
            .events
            .iter()
            .filter(|e| e.user_id == *user_id && e.created_at >= from && e.created_at < to)
            .filter(|e| after.is_none_or(|a| (e.created_at, e.event_id) < a))
            .cloned()
            .collect();
        page.sort_by_key(|e| std::cmp::Reverse((e.created_at, e.event_id)));
        page.truncate(limit as usize);
        Ok(page)
    }
}

/// Builds one user's daily row from that day's events (used by the memory store; the
/// database stores do the same in SQL).
fn daily_row(user_id: &UserId, date: Date, events: &[&UsageEvent]) -> DailyUsage {
    let mut per_endpoint: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut error_calls = 0;
    let mut total_ms = 0u64;
    for e in events {
        *per_endpoint.entry((&e.endpoint, &e.method)).or_default() += 1;
        error_calls += u64::from(e.status_code >= 400);
        total_ms += u64::from(e.response_time_ms);
    }
    let mut top: Vec<EndpointCount> = per_endpoint
        .into_iter()
        .map(|((endpoint, method), calls)| EndpointCount {
            endpoint: endpoint.to_owned(),
            method: method.to_owned(),
            calls,
        })
        .collect();
    // Stable sort keeps (endpoint, method) order among ties.
    top.sort_by_key(|e| std::cmp::Reverse(e.calls));
    top.truncate(TOP_ENDPOINTS);
    let api_calls = events.len() as u64;
    DailyUsage {
        user_id: user_id.clone(),
        date,
        api_calls,
        error_calls,
        total_response_time_ms: total_ms,
        avg_response_time_ms: total_ms as f64 / api_calls.max(1) as f64,
        top_endpoints: top,
    }
}

#[async_trait]
impl DailyUsageRepository for MemoryStore {
    async fn aggregate_usage_day(
        &self,
        date: Date,
        _now: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        let mut state = self.state();
        let fold = state.pruned_before.is_some_and(|bound| date < bound.date());
        let period = BillingPeriod::containing(date.midnight().assume_utc()).start();
        // Folding leaves the calls of a period with overage still to invoice raw.
        let foldable = |state: &State, user: &UserId| {
            state
                .records
                .get(&(user.clone(), period))
                .is_none_or(|r| r.overage_calls <= r.overage_invoiced_calls)
        };
        let mut by_user: BTreeMap<&UserId, Vec<&UsageEvent>> = BTreeMap::new();
        for e in state.events.iter().filter(|e| e.created_at.date() == date) {
            if !fold || foldable(&state, &e.user_id) {
                by_user.entry(&e.user_id).or_default().push(e);
            }
        }
        let rows: Vec<DailyUsage> = by_user
            .into_iter()
            .map(|(user_id, events)| daily_row(user_id, date, &events))
            .collect();
        let users = rows.len() as u64;
        if fold {
            // Retention removed the day's events: add the late ones, then remove them.
            for row in rows {
                let kept = state
                    .daily
                    .entry((row.user_id.clone(), date))
                    .or_insert(DailyUsage {
                        api_calls: 0,
                        error_calls: 0,
                        total_response_time_ms: 0,
                        ..row.clone()
                    });
                kept.api_calls += row.api_calls;
                kept.error_calls += row.error_calls;
                kept.total_response_time_ms += row.total_response_time_ms;
                kept.avg_response_time_ms =
                    kept.total_response_time_ms as f64 / kept.api_calls.max(1) as f64;
            }
            let folded: HashSet<Uuid> = state
                .events
                .iter()
                .filter(|e| e.created_at.date() == date && foldable(&state, &e.user_id))
                .map(|e| e.event_id)
                .collect();
            state.events.retain(|e| !folded.contains(&e.event_id));
            for id in &folded {
                state.event_ids.remove(id);
            }
        } else {
            state.daily.retain(|(_, d), _| *d != date);
            for row in rows {
                state.daily.insert((row.user_id.clone(), date), row);
            }
        }
        if date < OffsetDateTime::now_utc().date() {
            let day = state.days.entry(date).or_insert((0, None));
            day.1 = Some(day.0);
        }
        Ok(users)
    }

    async fn aggregated_days(&self, from: Date, to: Date) -> Result<Vec<Date>, RepoError> {
        Ok(self
            .state()
            .days
            .range(from..=to)
            .filter(|(_, (late, seen))| Some(*late) == *seen)
            .map(|(day, _)| *day)
            .collect())
    }

    async fn daily_usage_from_events(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError> {
        let state = self.state();
        let mut by_day: BTreeMap<Date, Vec<&UsageEvent>> = BTreeMap::new();
        for e in state.events.iter().filter(|e| &e.user_id == user_id) {
            let day = e.created_at.date();
            if (from..=to).contains(&day) {
                by_day.entry(day).or_default().push(e);
            }
        }
        Ok(by_day
            .into_iter()
            .map(|(day, events)| DailyUsage {
                top_endpoints: Vec::new(),
                ..daily_row(user_id, day, &events)
            })
            .collect())
    }

    async fn usage_pruned_before(&self) -> Result<Option<OffsetDateTime>, RepoError> {
        Ok(self.state().pruned_before)
    }

    async fn first_usage_day(&self) -> Result<Option<Date>, RepoError> {
        Ok(self
            .state()
            .events
            .iter()
            .map(|e| e.created_at.date())
            .min())
    }

    async fn daily_usage(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError> {
        Ok(self
            .state()
            .daily
            .range((user_id.clone(), from)..=(user_id.clone(), to))
            .map(|(_, row)| row.clone())
            .collect())
    }
}

#[async_trait]
impl OverageChargeRepository for MemoryStore {
    async fn create_overage_charge(
        &self,
        charge: &NewOverageCharge,
    ) -> Result<OverageCharge, RepoError> {
        let mut state = self.state();
        if !state.users.contains_key(&charge.user_id) {
            return Err(RepoError::NotFound { entity: "user" });
        }
        if state
            .charges
            .iter()
            .any(|c| c.idempotency_key == charge.idempotency_key)
        {
            return Err(RepoError::Conflict {
                entity: "overage charge",
                field: "idempotency_key",
            });
        }
        if state.charges.iter().any(|c| {
            c.user_id == charge.user_id
                && c.period_start == charge.period_start
                && c.meter == charge.meter
                && c.calls_from == charge.calls_from
                && c.status != ChargeStatus::Failed
        }) {
            return Err(RepoError::Conflict {
                entity: "overage charge",
                field: "calls_from",
            });
        }
        let stored = OverageCharge {
            id: state.charges.len() as i64 + 1,
            user_id: charge.user_id.clone(),
            period_start: charge.period_start,
            meter: charge.meter.clone(),
            calls_from: charge.calls_from,
            calls_to: charge.calls_to,
            amount_cents: charge.amount_cents,
            idempotency_key: charge.idempotency_key.clone(),
            status: ChargeStatus::Pending,
            stripe_invoice_item_id: None,
            attempts: 0,
            last_error: None,
            created_at: charge.created_at,
            updated_at: charge.created_at,
        };
        state.charges.push(stored.clone());
        Ok(stored)
    }

    async fn overage_charge_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<OverageCharge>, RepoError> {
        Ok(self
            .state()
            .charges
            .iter()
            .find(|c| c.idempotency_key == idempotency_key)
            .cloned())
    }

    async fn complete_overage_charge(
        &self,
        id: i64,
        stripe_invoice_item_id: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        let mut state = self.state();
        let charge = state
            .charges
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or(RepoError::NotFound {
                entity: "overage charge",
            })?;
        charge.status = ChargeStatus::Succeeded;
        charge.stripe_invoice_item_id = stripe_invoice_item_id.map(str::to_owned);
        charge.attempts += 1;
        charge.last_error = None;
        charge.updated_at = at;
        let charge = charge.clone();
        if charge.meter != API_CALLS {
            let key = (
                charge.user_id.clone(),
                charge.period_start,
                charge.meter.clone(),
            );
            if state.meter_usage.contains_key(&key) {
                let invoiced = state.meter_invoiced.entry(key).or_default();
                *invoiced = (*invoiced).max(charge.calls_to);
            }
        } else if let Some(record) = state
            .records
            .get_mut(&(charge.user_id.clone(), charge.period_start))
        {
            record.overage_invoiced_calls = record.overage_invoiced_calls.max(charge.calls_to);
            record.updated_at = at;
        }
        Ok(charge)
    }

    async fn claim_overage_charge(
        &self,
        id: i64,
        seen_updated_at: OffsetDateTime,
        at: OffsetDateTime,
    ) -> Result<Option<OverageCharge>, RepoError> {
        let mut state = self.state();
        Ok(state
            .charges
            .iter_mut()
            .find(|c| {
                c.id == id && c.status == ChargeStatus::Pending && c.updated_at == seen_updated_at
            })
            .map(|c| {
                c.updated_at = at;
                c.clone()
            }))
    }

    async fn note_overage_charge_attempt(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        self.charge_attempt(id, error, at, None)
    }

    async fn fail_overage_charge(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        self.charge_attempt(id, error, at, Some(ChargeStatus::Failed))
    }

    async fn overage_charges_for_user(
        &self,
        user_id: &UserId,
    ) -> Result<Vec<OverageCharge>, RepoError> {
        Ok(self
            .state()
            .charges
            .iter()
            .filter(|c| &c.user_id == user_id)
            .cloned()
            .collect())
    }

    async fn uninvoiced_overage(&self) -> Result<Vec<UninvoicedOverage>, RepoError> {
        let state = self.state();
        Ok(state
            .records
            .values()
            .filter(|r| r.overage_calls > r.overage_invoiced_calls)
            .filter_map(|r| {
                let user = state.users.get(&r.user_id)?;
                Some(UninvoicedOverage {
                    user_id: r.user_id.clone(),
                    meter: API_CALLS.to_owned(),
                    plan: user.plan.clone(),
                    stripe_customer_id: user.stripe_customer_id.clone(),
                    period_start: r.period_start,
                    period_end: r.period_end,
                    overage_calls: r.overage_calls,
                    overage_invoiced_calls: r.overage_invoiced_calls,
                })
            })
            .chain(state.meter_usage.iter().filter_map(
                |(key @ (user_id, period_start, meter), quantity)| {
                    let invoiced = state.meter_invoiced.get(key).copied().unwrap_or(0);
                    let user = state.users.get(user_id)?;
                    (*quantity > invoiced).then(|| UninvoicedOverage {
                        user_id: user_id.clone(),
                        meter: meter.clone(),
                        plan: user.plan.clone(),
                        stripe_customer_id: user.stripe_customer_id.clone(),
                        period_start: *period_start,
                        period_end: BillingPeriod::containing(*period_start).end(),
                        overage_calls: *quantity,
                        overage_invoiced_calls: invoiced,
                    })
                },
            ))
            .collect::<Vec<_>>())
        .map(|mut rows| {
            rows.sort_by(|a, b| {
                (&a.user_id, a.period_start, &a.meter).cmp(&(&b.user_id, b.period_start, &b.meter))
            });
            rows
        })
    }

    async fn meter_invoicing(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
        meter: &str,
    ) -> Result<Option<(u64, u64)>, RepoError> {
        let state = self.state();
        let key = (user_id.clone(), period_start, meter.to_owned());
        Ok(state.meter_usage.get(&key).map(|quantity| {
            (
                *quantity,
                state.meter_invoiced.get(&key).copied().unwrap_or(0),
            )
        }))
    }

    async fn overage_ledger(&self) -> Result<Vec<OverageLedgerEntry>, RepoError> {
        let state = self.state();
        let mut entries: BTreeMap<(UserId, OffsetDateTime, String), OverageLedgerEntry> =
            BTreeMap::new();
        // The counters of a user, period and meter: (overage or quantity, invoiced).
        let counters = |user_id: &UserId, period_start: OffsetDateTime, meter: &str| {
            if meter == API_CALLS {
                state
                    .records
                    .get(&(user_id.clone(), period_start))
                    .map_or((0, 0), |r| (r.overage_calls, r.overage_invoiced_calls))
            } else {
                let key = (user_id.clone(), period_start, meter.to_owned());
                (
                    state.meter_usage.get(&key).copied().unwrap_or(0),
                    state.meter_invoiced.get(&key).copied().unwrap_or(0),
                )
            }
        };
        let empty = |user_id: &UserId, period_start, meter: &str| {
            let (overage, invoiced) = counters(user_id, period_start, meter);
            OverageLedgerEntry {
                user_id: user_id.clone(),
                period_start,
                meter: meter.to_owned(),
                overage_calls: overage,
                overage_invoiced_calls: invoiced,
                charged_calls: 0,
                charged_cents: 0,
                pending_charges: 0,
                failed_charges: 0,
            }
        };
        let calls = state
            .records
            .values()
            .filter(|r| r.overage_calls > 0)
            .map(|r| (r.user_id.clone(), r.period_start, API_CALLS.to_owned()));
        let meters = state
            .meter_usage
            .iter()
            .filter(|(_, quantity)| **quantity > 0)
            .map(|(key, _)| key.clone());
        for (user_id, period_start, meter) in calls.chain(meters) {
            let entry = empty(&user_id, period_start, &meter);
            entries.insert((user_id, period_start, meter), entry);
        }
        for c in &state.charges {
            let entry = entries
                .entry((c.user_id.clone(), c.period_start, c.meter.clone()))
                .or_insert_with(|| empty(&c.user_id, c.period_start, &c.meter));
            match c.status {
                ChargeStatus::Succeeded => {
                    entry.charged_calls += c.calls_to - c.calls_from;
                    entry.charged_cents += c.amount_cents;
                }
                ChargeStatus::Pending => entry.pending_charges += 1,
                ChargeStatus::Failed => entry.failed_charges += 1,
            }
        }
        Ok(entries.into_values().collect())
    }
}

#[async_trait]
impl AdminRepository for MemoryStore {
    async fn daily_totals(&self, from: Date, to: Date) -> Result<Vec<DayTotal>, RepoError> {
        let state = self.state();
        Ok(state
            .days
            .range(from..=to)
            .filter(|(_, (_, seen))| seen.is_some())
            .map(|(date, _)| {
                let rows = state.daily.iter().filter(|((_, d), _)| d == date);
                let (api_calls, error_calls) = rows.fold((0, 0), |(c, e), (_, r)| {
                    (c + r.api_calls, e + r.error_calls)
                });
                DayTotal {
                    date: *date,
                    api_calls,
                    error_calls,
                }
            })
            .collect())
    }

    async fn record_admin_action(&self, entry: &AdminAuditEntry) -> Result<(), RepoError> {
        let mut state = self.state();
        let id = state.audit.last().map_or(1, |e| e.id + 1);
        state.audit.push(AdminAuditEntry {
            id,
            ..entry.clone()
        });
        Ok(())
    }

    async fn prune_admin_actions(
        &self,
        before: OffsetDateTime,
        _batch: u32,
    ) -> Result<u64, RepoError> {
        let mut state = self.state();
        let was = state.audit.len();
        state.audit.retain(|e| e.created_at >= before);
        Ok((was - state.audit.len()) as u64)
    }

    async fn admin_actions(
        &self,
        offset: u64,
        limit: u32,
    ) -> Result<(u64, Vec<AdminAuditEntry>), RepoError> {
        let state = self.state();
        let page = state
            .audit
            .iter()
            .rev()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(limit as usize)
            .cloned()
            .collect();
        Ok((state.audit.len() as u64, page))
    }

    async fn users_page(
        &self,
        query: &UserPageQuery,
    ) -> Result<(u64, Vec<UserUsageRow>), RepoError> {
        let state = self.state();
        let mut rows: Vec<UserUsageRow> = state
            .users_matching(query.plan.as_ref(), query.search.as_deref())
            .map(|u| state.usage_row(u, query.period_start))
            .collect();
        rows.sort_by(|a, b| {
            let key = match query.sort {
                UserSort::ApiCalls => a.api_calls.cmp(&b.api_calls),
                UserSort::CreatedAt => a.user.created_at.cmp(&b.user.created_at),
                UserSort::Email => a.user.email.cmp(&b.user.email),
            }
            .then_with(|| a.user.id.cmp(&b.user.id));
            if query.descending { key.reverse() } else { key }
        });
        let total = rows.len() as u64;
        let page = rows
            .into_iter()
            .skip(usize::try_from(query.offset).unwrap_or(usize::MAX))
            .take(query.limit as usize)
            .collect();
        Ok((total, page))
    }

    async fn users_terms(
        &self,
        period_start: OffsetDateTime,
        plan: Option<&Plan>,
        search: Option<&str>,
        min_calls: u64,
    ) -> Result<Vec<(UserId, Subscription, u64)>, RepoError> {
        let state = self.state();
        Ok(state
            .users_matching(plan, search)
            .map(|u| (u, state.usage_row(u, period_start).api_calls))
            .filter(|(u, calls)| u.overrides.is_some() || *calls >= min_calls)
            .map(|(u, calls)| (u.id.clone(), u.subscription(), calls))
            .collect())
    }

    async fn users_by_price(
        &self,
        period_start: OffsetDateTime,
        plan: Option<&Plan>,
        search: Option<&str>,
        prices: &[(Plan, u32, i64)],
        min_calls: u64,
        descending: bool,
        limit: u64,
    ) -> Result<(u64, Vec<(UserId, i64)>), RepoError> {
        let state = self.state();
        let total = state.users_matching(plan, search).count() as u64;
        let mut rows: Vec<(i64, UserId)> = state
            .users_matching(plan, search)
            .filter(|u| u.overrides.is_none())
            .filter(|u| state.usage_row(u, period_start).api_calls < min_calls)
            .map(|u| {
                let held = u.plan_version.unwrap_or(0);
                let price = prices
                    .iter()
                    .find(|(p, v, _)| *p == u.plan && *v == held)
                    .map_or(0, |(_, _, price)| *price);
                (price, u.id.clone())
            })
            .collect();
        rows.sort();
        if descending {
            rows.reverse();
        }
        Ok((
            total,
            rows.into_iter()
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .map(|(price, id)| (id, price))
                .collect(),
        ))
    }

    async fn users_rows(
        &self,
        period_start: OffsetDateTime,
        ids: &[UserId],
    ) -> Result<Vec<UserUsageRow>, RepoError> {
        let state = self.state();
        Ok(ids
            .iter()
            .filter_map(|id| state.users.get(id))
            .map(|u| state.usage_row(u, period_start))
            .collect())
    }

    async fn period_usage(
        &self,
        period_start: OffsetDateTime,
        today: (OffsetDateTime, OffsetDateTime),
        min_calls: u64,
    ) -> Result<PeriodUsage, RepoError> {
        let state = self.state();
        let records = || {
            state
                .records
                .values()
                .filter(|r| r.period_start == period_start)
        };
        let succeeded = || {
            state
                .charges
                .iter()
                .filter(|c| c.period_start == period_start && c.status == ChargeStatus::Succeeded)
        };
        Ok(PeriodUsage {
            api_calls: records().map(|r| r.api_calls).sum(),
            api_calls_today: state
                .events
                .iter()
                .filter(|e| e.created_at >= today.0 && e.created_at < today.1)
                .count() as u64,
            invoiced_cents: succeeded()
                .filter(|c| c.meter == API_CALLS)
                .map(|c| c.amount_cents)
                .sum(),
            meters_invoiced_cents: succeeded()
                .filter(|c| c.meter != API_CALLS)
                .map(|c| c.amount_cents)
                .sum(),
            heavy_users: records()
                .filter(|r| r.api_calls >= min_calls)
                .filter_map(|r| {
                    let user = state.users.get(&r.user_id)?;
                    Some((user.subscription(), r.api_calls))
                })
                .collect(),
        })
    }
}

impl State {
    /// The users on `plan` (any, without one) whose email or id contains `search`,
    /// case-insensitively.
    fn users_matching<'a>(
        &'a self,
        plan: Option<&'a Plan>,
        search: Option<&str>,
    ) -> impl Iterator<Item = &'a User> + 'a {
        let search = search.map(str::to_lowercase);
        self.users
            .values()
            .filter(move |u| plan.is_none_or(|p| u.plan == *p))
            .filter(move |u| {
                search.as_deref().is_none_or(|q| {
                    u.email.to_lowercase().contains(q) || u.id.as_str().to_lowercase().contains(q)
                })
            })
    }

    /// `user` with this period's figures.
    fn usage_row(&self, user: &User, period_start: OffsetDateTime) -> UserUsageRow {
        let (api_calls, overage_calls) = self
            .records
            .get(&(user.id.clone(), period_start))
            .map_or((0, 0), |r| (r.api_calls, r.overage_calls));
        UserUsageRow {
            user: user.clone(),
            api_calls,
            overage_calls,
        }
    }

    /// The counter of (user, period), created from the period's stored calls if missing.
    fn quota_counter(
        &mut self,
        user_id: &UserId,
        meter: &str,
        period_start: OffsetDateTime,
    ) -> &mut u64 {
        let stored = self.stored_usage(user_id, meter, period_start);
        self.quota
            .entry((user_id.clone(), period_start, meter.to_owned()))
            .or_insert(stored)
    }

    /// The usage stored for a user's period of `meter`: calls for `api_calls`.
    fn stored_usage(&self, user_id: &UserId, meter: &str, period_start: OffsetDateTime) -> u64 {
        if meter == API_CALLS {
            self.records
                .get(&(user_id.clone(), period_start))
                .map_or(0, |r| r.api_calls)
        } else {
            self.meter_usage
                .get(&(user_id.clone(), period_start, meter.to_owned()))
                .copied()
                .unwrap_or(0)
        }
    }
}

#[async_trait]
impl QuotaCounterRepository for MemoryStore {
    async fn quota_count(
        &self,
        user_id: &UserId,
        meter: &str,
        period_start: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        Ok(*self.state().quota_counter(user_id, meter, period_start))
    }

    async fn quota_counts(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        users: &[UserId],
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        let state = self.state();
        Ok(users
            .iter()
            .filter_map(|user| {
                let key = (user.clone(), period_start, meter.to_owned());
                state.quota.get(&key).map(|n| (user.clone(), *n))
            })
            .collect())
    }

    async fn take_quota(
        &self,
        user_id: &UserId,
        meter: &str,
        period_start: OffsetDateTime,
        add: u64,
        lease: LeaseTerms,
    ) -> Result<QuotaTake, RepoError> {
        let mut state = self.state();
        let count = state.quota_counter(user_id, meter, period_start);
        *count += add;
        let taken = lease_size(*count, lease);
        *count += taken;
        Ok(QuotaTake {
            taken,
            count: *count,
        })
    }

    async fn apply_quota_deltas(&self, deltas: &[QuotaDelta]) -> Result<Vec<u64>, RepoError> {
        let mut state = self.state();
        Ok(deltas
            .iter()
            .map(|d| {
                let count = state.quota_counter(&d.user_id, &d.meter, d.period_start);
                *count = count.saturating_add_signed(d.delta);
                *count
            })
            .collect())
    }

    async fn counters_below_stored(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        let state = self.state();
        Ok(state
            .quota
            .iter()
            .filter(|((_, start, m), _)| *start == period_start && m == meter)
            .filter_map(|((user, _, _), counted)| {
                let stored = state.stored_usage(user, meter, period_start);
                (*counted < stored).then(|| (user.clone(), stored))
            })
            .collect())
    }

    async fn raise_quota_counters(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        floors: &[(UserId, u64)],
    ) -> Result<u64, RepoError> {
        let mut state = self.state();
        let mut raised = 0;
        for (user, floor) in floors {
            if let Some(count) =
                state
                    .quota
                    .get_mut(&(user.clone(), period_start, meter.to_owned()))
                && *count < *floor
            {
                *count = *floor;
                raised += 1;
            }
        }
        Ok(raised)
    }
}

/// Stores a sign-in link or session of `user_id` (checked to exist) under its token hash;
/// a token already there is a conflict.
fn insert_token<V>(
    users: &BTreeMap<UserId, User>,
    tokens: &mut HashMap<String, V>,
    entity: &'static str,
    token_hash: &str,
    user_id: &UserId,
    value: V,
) -> Result<(), RepoError> {
    if !users.contains_key(user_id) {
        return Err(RepoError::NotFound { entity: "user" });
    }
    if tokens.contains_key(token_hash) {
        return Err(RepoError::Conflict {
            entity,
            field: "token",
        });
    }
    tokens.insert(token_hash.to_owned(), value);
    Ok(())
}

#[async_trait]
impl SessionRepository for MemoryStore {
    async fn create_login_link(
        &self,
        token_hash: &str,
        user_id: &UserId,
        _created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), RepoError> {
        let state = &mut *self.state();
        let value = (user_id.clone(), expires_at, false);
        insert_token(
            &state.users,
            &mut state.login_links,
            "sign-in link",
            token_hash,
            user_id,
            value,
        )
    }

    async fn consume_login_link(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError> {
        let mut state = self.state();
        Ok(match state.login_links.get_mut(token_hash) {
            Some((user, expires_at, used)) if !*used && *expires_at > now => {
                *used = true;
                Some(user.clone())
            }
            _ => None,
        })
    }

    async fn create_session(
        &self,
        token_hash: &str,
        user_id: &UserId,
        _created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), RepoError> {
        let state = &mut *self.state();
        let value = (user_id.clone(), expires_at);
        insert_token(
            &state.users,
            &mut state.sessions,
            "session",
            token_hash,
            user_id,
            value,
        )
    }

    async fn session_user(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError> {
        let state = self.state();
        Ok(state
            .sessions
            .get(token_hash)
            .filter(|(_, expires_at)| *expires_at > now)
            .map(|(user, _)| user.clone()))
    }

    async fn delete_session(&self, token_hash: &str) -> Result<bool, RepoError> {
        Ok(self.state().sessions.remove(token_hash).is_some())
    }

    async fn prune_sessions(&self, now: OffsetDateTime) -> Result<u64, RepoError> {
        let mut state = self.state();
        let before = state.sessions.len() + state.login_links.len();
        state
            .sessions
            .retain(|_, (_, expires_at)| *expires_at > now);
        state
            .login_links
            .retain(|_, (_, expires_at, used)| *expires_at > now && !*used);
        Ok((before - state.sessions.len() - state.login_links.len()) as u64)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn ping(&self) -> Result<(), RepoError> {
        Ok(())
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }
}

/// A new version of `plan` as the store keeps it.
fn plan_version(
    plan: &PlanDefinition,
    version: u32,
    existing: PlanMove,
    at: OffsetDateTime,
) -> PlanVersion {
    PlanVersion {
        plan: PlanDefinition {
            version,
            archived: false,
            ..plan.clone()
        },
        existing,
        created_at: at,
    }
}

/// `version` with the plan's archiving.
fn with_archived(mut version: PlanVersion, archived_at: Option<OffsetDateTime>) -> PlanVersion {
    version.plan.archived = archived_at.is_some();
    version
}

const PLAN_NOT_FOUND: RepoError = RepoError::NotFound { entity: "plan" };

#[async_trait]
impl MeterUsageRepository for MemoryStore {
    async fn record_meter_events(
        &self,
        events: &[MeterEvent],
        _now: OffsetDateTime,
    ) -> Result<EventOutcome, RepoError> {
        let mut state = self.state();
        for e in events {
            if !state.users.contains_key(&e.user_id) {
                return Err(RepoError::NotFound { entity: "user" });
            }
            if !state.meters.contains_key(&e.meter) {
                return Err(RepoError::NotFound { entity: "meter" });
            }
        }
        let mut outcome = EventOutcome::default();
        for e in events {
            if !state
                .meter_event_ids
                .insert((e.source.clone(), e.event_id.clone()))
            {
                outcome.duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            state.meter_events.push(e.clone());
            state.add_meter_report(&e.user_id, &e.meter, e.created_at, e.quantity, false, true);
            if let Some(value) = &e.value {
                let unique = state
                    .meters
                    .get(&e.meter)
                    .is_some_and(|m| m.aggregation == Aggregation::UniqueCount);
                let key = (
                    e.user_id.clone(),
                    BillingPeriod::containing(e.created_at).start(),
                    e.meter.clone(),
                    value.clone(),
                );
                if unique && state.meter_values.insert(key) {
                    state.add_meter_report(&e.user_id, &e.meter, e.created_at, 1, true, true);
                }
            }
        }
        Ok(outcome)
    }

    async fn event_subjects(
        &self,
        users: &[UserId],
        keys: &[ApiKeyId],
    ) -> Result<(Vec<UserId>, Vec<(ApiKeyId, UserId)>), RepoError> {
        let state = self.state();
        Ok((
            users
                .iter()
                .filter(|u| state.users.contains_key(*u))
                .cloned()
                .collect(),
            keys.iter()
                .filter_map(|k| state.keys.get(k).map(|r| (k.clone(), r.user_id.clone())))
                .collect(),
        ))
    }

    async fn meter_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<EventsAfter>,
        limit: u32,
    ) -> Result<Vec<MeterEvent>, RepoError> {
        let state = self.state();
        let mut events: Vec<MeterEvent> = state
            .meter_events
            .iter()
            .filter(|e| e.user_id == *user_id && e.created_at >= from && e.created_at < to)
            .filter(|e| match &after {
                None => true,
                Some(EventsAfter::Through(at)) => e.created_at <= *at,
                Some(EventsAfter::Event(at, source, id)) => {
                    (e.created_at, &e.source, &e.event_id) < (*at, source, id)
                }
            })
            .cloned()
            .collect();
        events.sort_by(|a, b| {
            (b.created_at, &b.source, &b.event_id).cmp(&(a.created_at, &a.source, &a.event_id))
        });
        events.truncate(limit as usize);
        Ok(events)
    }

    async fn meter_usage(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<Vec<(String, u64)>, RepoError> {
        Ok(self
            .state()
            .meter_usage
            .iter()
            .filter(|((u, p, _), _)| u == user_id && *p == period_start)
            .map(|((_, _, meter), q)| (meter.clone(), *q))
            .collect())
    }

    async fn meter_history(
        &self,
        user_id: &UserId,
        meter: &str,
        from: Date,
        to: Date,
    ) -> Result<Vec<(Date, u64)>, RepoError> {
        Ok(self
            .state()
            .meter_daily
            .iter()
            .filter(|((u, m, d), _)| u == user_id && m == meter && (from..=to).contains(d))
            .map(|((_, _, d), q)| (*d, *q))
            .collect())
    }

    async fn top_meter_users(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<MeterUser>, RepoError> {
        let state = self.state();
        let mut users: Vec<MeterUser> = state
            .meter_usage
            .iter()
            .filter(|((_, start, m), q)| *start == period_start && m == meter && **q > 0)
            .filter_map(|((user_id, _, _), quantity)| {
                let user = state.users.get(user_id)?;
                Some(MeterUser {
                    user_id: user_id.clone(),
                    email: user.email.clone(),
                    plan: user.plan.clone(),
                    quantity: *quantity,
                })
            })
            .collect();
        users.sort_by(|a, b| b.quantity.cmp(&a.quantity).then(a.user_id.cmp(&b.user_id)));
        users.truncate(limit as usize);
        Ok(users)
    }
}

#[async_trait]
impl PlanRepository for MemoryStore {
    async fn seed_plans(
        &self,
        plans: &[PlanDefinition],
        at: OffsetDateTime,
    ) -> Result<Vec<String>, RepoError> {
        let mut state = self.state();
        let mut seeded = Vec::new();
        for plan in plans {
            let (_, versions) = state.plans.entry(plan.key.clone()).or_default();
            if versions.is_empty() {
                versions.push(plan_version(plan, 1, PlanMove::NextPeriod, at));
                seeded.push(plan.key.clone());
                for user in state.users.values_mut() {
                    if user.plan.as_str() == plan.key && user.plan_version.is_none() {
                        user.plan_version = Some(1);
                    }
                }
            }
        }
        Ok(seeded)
    }

    async fn create_plan(
        &self,
        plan: &PlanDefinition,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError> {
        let mut state = self.state();
        if state.plans.contains_key(&plan.key) {
            return Err(RepoError::Conflict {
                entity: "plan",
                field: "key",
            });
        }
        let archived_at = plan.archived.then_some(at);
        let version = plan_version(plan, 1, PlanMove::NextPeriod, at);
        state
            .plans
            .insert(plan.key.clone(), (archived_at, vec![version.clone()]));
        Ok(with_archived(version, archived_at))
    }

    async fn revise_plan(
        &self,
        plan: &PlanDefinition,
        existing: PlanMove,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError> {
        let mut state = self.state();
        let (archived_at, versions) = state.plans.get_mut(&plan.key).ok_or(PLAN_NOT_FOUND)?;
        let next = versions
            .last()
            .map_or(0, |v| v.plan.version)
            .saturating_add(1);
        let version = plan_version(plan, next, existing, at);
        versions.push(version.clone());
        Ok(with_archived(version, *archived_at))
    }

    async fn set_plan_archived(
        &self,
        key: &str,
        archived: bool,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError> {
        let mut state = self.state();
        let (archived_at, versions) = state.plans.get_mut(key).ok_or(PLAN_NOT_FOUND)?;
        *archived_at = if archived {
            archived_at.or(Some(at))
        } else {
            None
        };
        let newest = versions.last().cloned().ok_or(PLAN_NOT_FOUND)?;
        Ok(with_archived(newest, *archived_at))
    }

    async fn plan_versions(&self) -> Result<Vec<PlanVersion>, RepoError> {
        let state = self.state();
        Ok(state
            .plans
            .values()
            .flat_map(|(archived_at, versions)| {
                versions
                    .iter()
                    .map(|v| with_archived(v.clone(), *archived_at))
            })
            .collect())
    }

    async fn meters(&self) -> Result<Vec<Meter>, RepoError> {
        Ok(self.state().meters.values().cloned().collect())
    }

    async fn create_meter(&self, meter: &Meter, _at: OffsetDateTime) -> Result<(), RepoError> {
        let mut state = self.state();
        if state.meters.contains_key(&meter.key) {
            return Err(RepoError::Conflict {
                entity: "meter",
                field: "key",
            });
        }
        state.meters.insert(meter.key.clone(), meter.clone());
        Ok(())
    }

    async fn update_meter(&self, meter: &Meter, _at: OffsetDateTime) -> Result<(), RepoError> {
        let mut state = self.state();
        let used = state.meter_usage.keys().any(|(_, _, m)| *m == meter.key);
        if used
            && state
                .meters
                .get(&meter.key)
                .is_some_and(|m| m.aggregation != meter.aggregation)
        {
            return Err(RepoError::Conflict {
                entity: "meter",
                field: "aggregation",
            });
        }
        let stored = state
            .meters
            .get_mut(&meter.key)
            .ok_or(RepoError::NotFound { entity: "meter" })?;
        *stored = meter.clone();
        Ok(())
    }

    async fn route_costs(&self) -> Result<Vec<RouteCost>, RepoError> {
        Ok(self
            .state()
            .route_costs
            .iter()
            .map(|((route, meter), &quantity)| RouteCost {
                route: route.clone(),
                meter: meter.clone(),
                quantity,
            })
            .collect())
    }

    async fn replace_route_costs(&self, costs: &[RouteCost]) -> Result<(), RepoError> {
        let mut state = self.state();
        if costs.iter().any(|c| !state.meters.contains_key(&c.meter)) {
            return Err(RepoError::NotFound { entity: "meter" });
        }
        state.route_costs = costs
            .iter()
            .map(|c| ((c.route.clone(), c.meter.clone()), c.quantity))
            .collect();
        Ok(())
    }
}
