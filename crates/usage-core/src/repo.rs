//! The repository traits every service works through, and the records they exchange.
//!
//! Implementations: the PostgreSQL and SQLite stores of `usage-store`, and the in-memory
//! store of `usage-testkit`. All of them pass the same conformance suite
//! (`usage_testkit::conformance`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::{Date, OffsetDateTime};

use crate::{ApiKeyId, Plan, UsageEvent, UserId};

/// What can go wrong in a repository, in terms the services can act on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RepoError {
    /// The record (or one it refers to) does not exist.
    #[error("{entity} not found")]
    NotFound {
        /// What was missing: "user", "API key", "overage charge".
        entity: &'static str,
    },
    /// A unique constraint refused the write.
    #[error("{entity} with this {field} already exists")]
    Conflict {
        /// What was being written.
        entity: &'static str,
        /// The field that must be unique.
        field: &'static str,
    },
    /// The database could not be reached or gave up (pool timeout, connection lost).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database failure. The text is for logs, never for clients.
    #[error("database error: {0}")]
    Backend(String),
}

impl RepoError {
    /// Whether trying the same write again can never succeed: a record it refers to does
    /// not exist. Anything else (the database down, a timeout, a conflict between
    /// writers) may pass on a later attempt.
    pub fn is_permanent(&self) -> bool {
        matches!(self, RepoError::NotFound { .. })
    }
}

/// A user of the metered API (`eco_users`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// `eco_usr_...`
    pub id: UserId,
    /// Normalised email, unique.
    pub email: String,
    /// Current plan.
    pub plan: Plan,
    /// Stripe customer to bill overage to.
    pub stripe_customer_id: Option<String>,
    /// When the user was created.
    pub created_at: OffsetDateTime,
    /// The Stripe subscription whose event set the plan: only its end takes the plan back.
    pub plan_subscription_id: Option<String>,
    /// Since when the user is blocked (keys revoked, tokens and sign-ins refused).
    pub blocked_at: Option<OffsetDateTime>,
    /// The version of the plan the user subscribed to: the store sets it to the plan's
    /// newest whenever the plan is set to another (the value given is not read); `None`
    /// before the plan has one.
    pub plan_version: Option<u32>,
    /// The user's own terms over the plan version (`set_user_overrides`).
    pub overrides: Option<crate::catalog::Overrides>,
}

/// What a user holds of the catalog: the plan, the version they subscribed to and their
/// own terms; with the catalog, it gives their effective terms
/// ([`crate::terms::Catalog::effective`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The plan.
    pub plan: Plan,
    /// The version subscribed to; `None` before the plan has one.
    pub plan_version: Option<u32>,
    /// The user's own terms over it.
    pub overrides: Option<crate::catalog::Overrides>,
}

impl User {
    /// What the user holds of the catalog.
    pub fn subscription(&self) -> Subscription {
        Subscription {
            plan: self.plan.clone(),
            plan_version: self.plan_version,
            overrides: self.overrides.clone(),
        }
    }
}

/// A stored API key (`eco_api_keys`): never the key itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// `eco_key_...`
    pub id: ApiKeyId,
    /// Owner.
    pub user_id: UserId,
    /// A name chosen by the owner.
    pub name: String,
    /// The first characters of the key, for display.
    pub prefix: String,
    /// Lower-case hex SHA-256 of the key, unique.
    pub key_hash: String,
    /// When the key was created.
    pub created_at: OffsetDateTime,
    /// Last time a call came with this key (updated lazily).
    pub last_used_at: Option<OffsetDateTime>,
    /// When the key was revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// When the key stops working by itself.
    pub expires_at: Option<OffsetDateTime>,
}

impl ApiKeyRecord {
    /// Whether a call at `now` may use this key.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }

    /// Retires the key as of `now`: revoked at `at` when that is not later than `now`
    /// (an earlier revocation kept), else expiring at `at` (an earlier expiry kept).
    pub fn retire(&mut self, at: OffsetDateTime, now: OffsetDateTime) {
        if at <= now {
            self.revoked_at.get_or_insert(at);
        } else {
            self.expires_at = Some(self.expires_at.map_or(at, |e| e.min(at)));
        }
    }
}

/// One user's counters for one billing period (`eco_usage_records`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Whose.
    pub user_id: UserId,
    /// First instant of the period.
    pub period_start: OffsetDateTime,
    /// First instant after the period.
    pub period_end: OffsetDateTime,
    /// Admitted calls stored so far.
    pub api_calls: u64,
    /// Calls past the plan's limit among them.
    pub overage_calls: u64,
    /// Overage calls already billed.
    pub overage_invoiced_calls: u64,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

/// What [`UsageRepository::record_usage`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordOutcome {
    /// Events newly stored (and counted).
    pub inserted: u64,
    /// Events already stored before (same event id), neither stored nor counted again.
    pub duplicates: u64,
}

/// Calls each user's plan includes per period, for computing `overage_calls` when a batch
/// is counted. A user absent from the map is unlimited.
pub type IncludedCalls = HashMap<UserId, u64>;

/// Calls of one user to one route pattern and method over a time range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointStats {
    /// Route pattern.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Calls.
    pub calls: u64,
    /// Calls answered with status >= 400.
    pub error_calls: u64,
    /// Sum of response times.
    pub total_response_time_ms: u64,
}

/// One route pattern and method among a day's most called (`top_endpoints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCount {
    /// Route pattern.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Calls that day.
    pub calls: u64,
}

/// One user's usage on one UTC day (`eco_usage_daily`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DailyUsage {
    /// Whose.
    pub user_id: UserId,
    /// The UTC day.
    pub date: Date,
    /// Calls that day.
    pub api_calls: u64,
    /// Calls answered with status >= 400.
    pub error_calls: u64,
    /// Sum of response times.
    pub total_response_time_ms: u64,
    /// Mean response time.
    pub avg_response_time_ms: f64,
    /// The five most called endpoints, most calls first (ties by endpoint, method).
    pub top_endpoints: Vec<EndpointCount>,
}

/// How many endpoints `top_endpoints` keeps.
pub const TOP_ENDPOINTS: usize = 5;

/// State of an overage charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChargeStatus {
    /// Recorded, not yet confirmed by Stripe.
    Pending,
    /// Stripe created the invoice item; the calls are invoiced.
    Succeeded,
    /// Stripe refused it or it could not be sent; `last_error` says why.
    Failed,
}

impl ChargeStatus {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Pending => "pending",
            ChargeStatus::Succeeded => "succeeded",
            ChargeStatus::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn from_stored(s: &str) -> Option<Self> {
        [Self::Pending, Self::Succeeded, Self::Failed]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// A charge to record before it is sent to Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOverageCharge {
    /// Who is charged.
    pub user_id: UserId,
    /// Which period's overage.
    pub period_start: OffsetDateTime,
    /// The meter billed (`api_calls`, or another).
    pub meter: String,
    /// First overage call billed (exclusive lower bound: the invoiced count before). For
    /// another meter, the quantity of the period invoiced before.
    pub calls_from: u64,
    /// Overage count up to which this charge bills (inclusive). For another meter, the
    /// period's quantity this charge bills up to.
    pub calls_to: u64,
    /// Amount billed.
    pub amount_cents: i64,
    /// Deterministic key sent to Stripe, unique.
    pub idempotency_key: String,
    /// When the charge was recorded.
    pub created_at: OffsetDateTime,
}

/// A recorded overage charge (`eco_overage_charges`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverageCharge {
    /// Row id.
    pub id: i64,
    /// Who is charged.
    pub user_id: UserId,
    /// Which period's overage.
    pub period_start: OffsetDateTime,
    /// The meter billed (`api_calls`, or another).
    pub meter: String,
    /// Exclusive lower bound of the billed overage calls (another meter: of its quantity).
    pub calls_from: u64,
    /// Inclusive upper bound of the billed overage calls (another meter: of its quantity).
    pub calls_to: u64,
    /// Amount billed.
    pub amount_cents: i64,
    /// Key sent to Stripe.
    pub idempotency_key: String,
    /// State.
    pub status: ChargeStatus,
    /// Stripe's id for the created item.
    pub stripe_invoice_item_id: Option<String>,
    /// Times the charge was sent.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When recorded.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

/// A user's period whose overage is not all invoiced yet: its calls, or its quantity of
/// another meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UninvoicedOverage {
    /// Whose.
    pub user_id: UserId,
    /// The meter (`api_calls`: `overage_calls` are calls past the limit; another meter:
    /// they are the period's quantity, `overage_invoiced_calls` the quantity invoiced).
    pub meter: String,
    /// Their plan now.
    pub plan: Plan,
    /// Their Stripe customer, if any.
    pub stripe_customer_id: Option<String>,
    /// The period.
    pub period_start: OffsetDateTime,
    /// Its end (exclusive).
    pub period_end: OffsetDateTime,
    /// Calls past the limit in the period.
    pub overage_calls: u64,
    /// Of those, already invoiced.
    pub overage_invoiced_calls: u64,
}

/// One user, period and meter: the counters beside what the charge ledger says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OverageLedgerEntry {
    /// Whose.
    pub user_id: UserId,
    /// The period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    /// `api_calls`, or the meter whose quantity the other figures count.
    pub meter: String,
    /// Calls past the limit; for another meter, the period's whole quantity (priced
    /// whole, its `included` inside).
    pub overage_calls: u64,
    /// What the counters say is invoiced (`eco_usage_records`, or the meter's
    /// `eco_meter_usage.invoiced_quantity`).
    pub overage_invoiced_calls: u64,
    /// Calls (units) covered by succeeded charges.
    pub charged_calls: u64,
    /// Cents of succeeded charges.
    pub charged_cents: i64,
    /// Charges still pending.
    pub pending_charges: u64,
    /// Charges that failed.
    pub failed_charges: u64,
}

/// One admin request, for the audit log (`eco_admin_audit_log`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminAuditEntry {
    /// Row id (0 before it is stored).
    pub id: i64,
    /// Who (the token's `sub`; not necessarily an admin: refused requests are logged too).
    pub admin_id: UserId,
    /// HTTP method.
    pub method: String,
    /// Path requested.
    pub route: String,
    /// Query string, as sent.
    pub params: String,
    /// Status answered.
    pub status: u16,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// What the admin users list can be sorted by: an allow-list, never SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSort {
    /// Calls this period.
    ApiCalls,
    /// Sign-up time.
    CreatedAt,
    /// Email.
    Email,
}

/// One page of the admin users list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPageQuery {
    /// The period whose calls and overage are shown.
    pub period_start: OffsetDateTime,
    /// Only users on this plan.
    pub plan: Option<Plan>,
    /// Only users whose email or id contains this text (matched literally).
    pub search: Option<String>,
    /// Sort key.
    pub sort: UserSort,
    /// Largest first.
    pub descending: bool,
    /// Rows to skip.
    pub offset: u64,
    /// Rows to return.
    pub limit: u32,
}

/// A user with this period's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserUsageRow {
    /// The user.
    pub user: User,
    /// Calls this period.
    pub api_calls: u64,
    /// Overage calls this period, as counted when they were stored.
    pub overage_calls: u64,
}

/// This period's usage as the admin overview prices it: the store only counts; every
/// amount is priced by the caller under each user's effective terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodUsage {
    /// Calls counted this period (flushed).
    pub api_calls: u64,
    /// Calls stored between the day bounds given.
    pub api_calls_today: u64,
    /// Cents of the period's succeeded overage charges of calls.
    pub invoiced_cents: i64,
    /// Cents of the period's succeeded charges of every other meter.
    pub meters_invoiced_cents: i64,
    /// Each user with at least the calls asked for this period: what they hold and their
    /// calls (the only users whose terms can bill overage, now or at their pace).
    pub heavy_users: Vec<(Subscription, u64)>,
}

/// Calls of one ended day over all users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayTotal {
    /// The UTC day.
    pub date: Date,
    /// Calls that day.
    pub api_calls: u64,
    /// Calls answered with status >= 400.
    pub error_calls: u64,
}

/// Admin figures and the audit log.
#[async_trait]
pub trait AdminRepository: Send + Sync {
    /// Calls per aggregated day from `from` to `to` (both included), over all users,
    /// oldest first; days not aggregated yet are missing.
    async fn daily_totals(&self, from: Date, to: Date) -> Result<Vec<DayTotal>, RepoError>;
    /// Appends one entry to the audit log (its `id` is ignored).
    async fn record_admin_action(&self, entry: &AdminAuditEntry) -> Result<(), RepoError>;
    /// The audit log, newest first: `(total entries, this page)`.
    async fn admin_actions(
        &self,
        offset: u64,
        limit: u32,
    ) -> Result<(u64, Vec<AdminAuditEntry>), RepoError>;
    /// Removes audit entries written before `before`, at most `batch` per statement so
    /// that no statement holds locks for long; returns how many went.
    async fn prune_admin_actions(
        &self,
        before: OffsetDateTime,
        batch: u32,
    ) -> Result<u64, RepoError>;
    /// One page of users with this period's figures: `(users matching, this page)`. Ties
    /// are broken by user id in the same direction, so pages do not overlap.
    async fn users_page(
        &self,
        query: &UserPageQuery,
    ) -> Result<(u64, Vec<UserUsageRow>), RepoError>;
    /// The users the filters keep (`plan`, and `search` as in [`UserPageQuery`]) who have
    /// their own terms or at least `min_calls` calls this period (0: every user), with
    /// what they hold and their calls this period: the users whose revenue the caller
    /// prices one by one.
    async fn users_terms(
        &self,
        period_start: OffsetDateTime,
        plan: Option<&Plan>,
        search: Option<&str>,
        min_calls: u64,
    ) -> Result<Vec<(UserId, Subscription, u64)>, RepoError>;
    /// The rest of the users list by revenue: of the users the filters keep, those without
    /// their own terms and with fewer than `min_calls` calls this period, ordered by the
    /// monthly price `prices` gives the (plan, version) they hold (0 where it gives none; a
    /// user holding no version holds version 0), then by id, in the direction asked; the
    /// first `limit` as (id, price). Also how many users the filters keep, all of them.
    #[allow(clippy::too_many_arguments)]
    async fn users_by_price(
        &self,
        period_start: OffsetDateTime,
        plan: Option<&Plan>,
        search: Option<&str>,
        prices: &[(Plan, u32, i64)],
        min_calls: u64,
        descending: bool,
        limit: u64,
    ) -> Result<(u64, Vec<(UserId, i64)>), RepoError>;
    /// These users with this period's figures, in the order given; ids of no user are
    /// left out.
    async fn users_rows(
        &self,
        period_start: OffsetDateTime,
        ids: &[UserId],
    ) -> Result<Vec<UserUsageRow>, RepoError>;
    /// This period's usage. `today` bounds the calls counted as today's; the users with
    /// at least `min_calls` calls this period are listed with what they hold.
    async fn period_usage(
        &self,
        period_start: OffsetDateTime,
        today: (OffsetDateTime, OffsetDateTime),
        min_calls: u64,
    ) -> Result<PeriodUsage, RepoError>;
}

/// Users (`eco_users`).
#[async_trait]
pub trait UserRepository: Send + Sync {
    /// Stores a new user. `Conflict` on a taken id or email.
    async fn create_user(&self, user: &User) -> Result<(), RepoError>;
    /// The user with this id.
    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, RepoError>;
    /// The user with this (normalised) email.
    async fn user_by_email(&self, email: &str) -> Result<Option<User>, RepoError>;
    /// Changes a user's plan at `at` and returns the updated user. `NotFound` for an
    /// unknown id.
    async fn set_plan(
        &self,
        id: &UserId,
        plan: Plan,
        at: OffsetDateTime,
    ) -> Result<User, RepoError>;
    /// Links a user to a Stripe customer (or unlinks with `None`) and returns the updated
    /// user. `NotFound` for an unknown id; `Conflict` when another user has this customer.
    async fn set_stripe_customer(
        &self,
        id: &UserId,
        customer: Option<&str>,
    ) -> Result<User, RepoError>;
    /// Applies a plan change from a Stripe event, in one transaction: the user whose
    /// customer it names gets the plan (as [`Self::set_plan`] at `at`) unless this event id
    /// was seen before or a later event of that customer was applied already (see
    /// [`plan_subscription_change`]). Nothing is written for an unknown customer, so that
    /// the event can be sent again once the customer is linked.
    async fn apply_subscription_change(
        &self,
        change: &SubscriptionChange,
        at: OffsetDateTime,
    ) -> Result<SubscriptionOutcome, RepoError>;
    /// Users whose plan changed at or after `since`, so that every running instance can
    /// drop their cached plan.
    async fn plans_changed_since(&self, since: OffsetDateTime) -> Result<Vec<UserId>, RepoError>;
    /// How many users each plan has (plans without users are left out).
    async fn count_users_by_plan(&self) -> Result<Vec<(Plan, u64)>, RepoError>;
    /// How many users hold each distinct subscription (plan, version, overrides), for
    /// figures that need each user's effective terms (MRR) without reading every user.
    async fn count_users_by_terms(&self) -> Result<Vec<(Subscription, u64)>, RepoError>;
    /// Sets the user's own terms over their plan (`None`: drops them) at `at` and returns
    /// the user as they now are (reported by `plans_changed_since`, as a plan change is);
    /// `NotFound` for an unknown id.
    async fn set_user_overrides(
        &self,
        id: &UserId,
        overrides: Option<&crate::catalog::Overrides>,
        at: OffsetDateTime,
    ) -> Result<User, RepoError>;
    /// Blocks the user since `at` (`None`: unblocks) and returns the user as they now are;
    /// `NotFound` for an unknown id. Keys are not touched: revoke them first.
    async fn set_user_blocked(
        &self,
        id: &UserId,
        at: Option<OffsetDateTime>,
    ) -> Result<User, RepoError>;
    /// Deletes the user with everything that refers to them (keys, counters, charges,
    /// sessions); `false` when there was no such user. Their keys are reported by
    /// [`ApiKeyRepository::api_keys_deleted_after`].
    async fn delete_user(&self, id: &UserId) -> Result<bool, RepoError>;
}

/// A plan change asked by a Stripe event (`customer.subscription.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionChange {
    /// Stripe's event id (`evt_...`): each takes effect once.
    pub event_id: String,
    /// Stripe's event type, kept with the event.
    pub event_type: String,
    /// The Stripe customer (`data.object.customer`).
    pub customer: String,
    /// The plan the subscription gives.
    pub plan: Plan,
    /// When Stripe created the event: events arrive in any order, the latest wins.
    pub created: OffsetDateTime,
    /// The subscription (`data.object.id`), when the event names one.
    pub subscription: Option<String>,
    /// The subscription ended (deleted, or a status that ends it): the plan goes back only
    /// if this subscription is the one that set it.
    pub ends: bool,
}

/// What [`UserRepository::apply_subscription_change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionOutcome {
    /// The user's plan is now the event's; the user as they now are.
    Applied(User),
    /// This event id was applied (or found stale) before: nothing changed.
    Duplicate,
    /// An event of this customer created later was applied already: nothing changed.
    Stale,
    /// The end of a subscription other than the one that set the plan: nothing changed.
    OtherSubscription,
    /// No user has this Stripe customer id: nothing was written.
    UnknownCustomer,
}

/// What a store writes for a subscription change, shared by every store: given the
/// event's user (read and locked inside the store's transaction), whether the event id is
/// new, and the creation time of the latest event applied to that customer.
/// `Applied` and `Stale` are recorded with the event id; the other two write nothing.
pub fn plan_subscription_change(
    user: Option<&User>,
    event_is_new: bool,
    latest_applied: Option<OffsetDateTime>,
    change: &SubscriptionChange,
) -> SubscriptionOutcome {
    let Some(user) = user else {
        return SubscriptionOutcome::UnknownCustomer;
    };
    if !event_is_new {
        return SubscriptionOutcome::Duplicate;
    }
    // Stripe's `created` has one-second resolution: an event of the same second as the
    // latest applied one is applied too (in arrival order).
    if latest_applied.is_some_and(|latest| latest > change.created) {
        return SubscriptionOutcome::Stale;
    }
    // A customer may hold several subscriptions (an upgrade made as a new one, then the
    // old one cancelled): the end of one that did not set the plan changes nothing. A plan
    // no subscription is known to have set (set by hand, or before subscriptions were
    // recorded) goes back at any end, as before.
    if change.ends
        && user
            .plan_subscription_id
            .as_deref()
            .is_some_and(|set_by| change.subscription.as_deref() != Some(set_by))
    {
        return SubscriptionOutcome::OtherSubscription;
    }
    let mut user = user.clone();
    user.plan = change.plan.clone();
    user.plan_subscription_id = if change.ends {
        None
    } else {
        change.subscription.clone()
    };
    SubscriptionOutcome::Applied(user)
}

impl SubscriptionOutcome {
    /// Stored outcome of a recorded event (`Applied`, `Stale`).
    pub fn stored_name(&self) -> Option<&'static str> {
        match self {
            SubscriptionOutcome::Applied(_) => Some("applied"),
            SubscriptionOutcome::Stale => Some("stale"),
            SubscriptionOutcome::OtherSubscription => Some("other_subscription"),
            SubscriptionOutcome::Duplicate | SubscriptionOutcome::UnknownCustomer => None,
        }
    }
}

/// A key to retire while issuing its replacement ([`ApiKeyRepository::issue_api_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRetirement {
    /// The key replaced; it must belong to the new key's user.
    pub key_id: ApiKeyId,
    /// When it stops working: at or before the new key's creation, it is revoked then;
    /// later, it expires then (a grace period during which both keys work).
    pub at: OffsetDateTime,
}

/// What [`ApiKeyRepository::issue_api_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyIssue {
    /// The key is stored; the retired key as it now is, when one was given.
    Issued {
        /// The retired key.
        retired: Option<ApiKeyRecord>,
    },
    /// The user already holds the maximum of active keys: nothing was written.
    LimitReached,
    /// The key to retire is not one of the user's: nothing was written.
    RetiredKeyNotFound,
}

/// The decision of [`ApiKeyRepository::issue_api_key`], shared by every store: given the
/// user's keys as they are (read inside the store's transaction), either `Issued` with the
/// retired key as it must be written (the store then writes both), or the refusal.
pub fn plan_key_issue(
    users_keys: &[ApiKeyRecord],
    key: &ApiKeyRecord,
    max_active: usize,
    retire: Option<&KeyRetirement>,
) -> KeyIssue {
    let now = key.created_at;
    let mut retired = None;
    if let Some(r) = retire {
        let Some(old) = users_keys
            .iter()
            .find(|k| k.id == r.key_id && k.user_id == key.user_id)
        else {
            return KeyIssue::RetiredKeyNotFound;
        };
        let mut old = old.clone();
        old.retire(r.at, now);
        retired = Some(old);
    }
    let active = users_keys
        .iter()
        .filter(|k| k.user_id == key.user_id && k.is_active(now))
        .filter(|k| retire.is_none_or(|r| r.key_id != k.id))
        .count();
    if active >= max_active {
        return KeyIssue::LimitReached;
    }
    KeyIssue::Issued { retired }
}

/// API keys (`eco_api_keys`).
#[async_trait]
pub trait ApiKeyRepository: Send + Sync {
    /// Stores a new key. `Conflict` on a taken id or hash; `NotFound` for an unknown user.
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), RepoError>;
    /// Stores `key` unless its user already holds `max_active` keys active at
    /// `key.created_at` (the key being retired not counted), and retires `retire` in the
    /// same transaction: concurrent issues never pass the limit, and a failure leaves
    /// both keys as they were. `NotFound` for an unknown user.
    async fn issue_api_key(
        &self,
        key: &ApiKeyRecord,
        max_active: usize,
        retire: Option<&KeyRetirement>,
    ) -> Result<KeyIssue, RepoError>;
    /// The key with this SHA-256 (hex), whatever its state.
    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, RepoError>;
    /// The key with this SHA-256 (hex) and what its user holds of the catalog, in one
    /// lookup (the hot path's cache misses); `None` when no key has it or its user is gone.
    async fn api_key_and_plan_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<(ApiKeyRecord, Subscription)>, RepoError>;
    /// A user's keys, newest first.
    async fn api_keys_for_user(&self, user_id: &UserId) -> Result<Vec<ApiKeyRecord>, RepoError>;
    /// Revokes one of `user_id`'s keys at `at` (kept if already revoked) and returns it;
    /// `None` when the user has no key with this id.
    async fn revoke_api_key(
        &self,
        user_id: &UserId,
        key_id: &ApiKeyId,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, RepoError>;
    /// Moves `last_used_at` forward (never back) for each key.
    async fn touch_api_keys(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), RepoError>;
    /// Keys that stopped working lately, so that every running instance can drop them
    /// from its verification cache: revoked at or after `since`, or whose expiry (a
    /// rotation's grace period ending, an expiring key) fell between `since` and `now`.
    async fn api_keys_retired_since(
        &self,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<ApiKeyId>, RepoError>;
    /// Deletes one of `user_id`'s keys; `false` when the user has no key with this id.
    async fn delete_api_key(&self, user_id: &UserId, key_id: &ApiKeyId) -> Result<bool, RepoError>;
    /// Keys whose rows were deleted after the deletion numbered `after` (0: every one
    /// still kept, which is a day's), however they were deleted: by
    /// [`Self::delete_api_key`], with their user, or by hand in the database. Deletions
    /// are numbered in the order they were made; `through` is the last one returned.
    async fn api_keys_deleted_after(&self, after: i64) -> Result<DeletedKeys, RepoError>;
}

/// What [`ApiKeyRepository::api_keys_deleted_after`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletedKeys {
    /// The keys deleted, oldest deletion first.
    pub keys: Vec<ApiKeyId>,
    /// The number of the last deletion returned; `after` when there was none.
    pub through: i64,
}

/// What a quota lease may take: see [`lease_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTerms {
    /// The most units the counter may reach (the plan's limit); `None`: no cap.
    pub cap: Option<u64>,
    /// The largest lease.
    pub max: u64,
    /// A lease takes at most this fraction (1/share) of what is left under the cap, so
    /// that other instances find some left and what a crashed instance strands is small.
    pub share: u64,
    /// The fewest units worth taking: what the call being admitted needs (1 for a call,
    /// a route's cost for a meter). Less left under the cap, nothing is taken.
    pub need: u64,
}

/// How many units a lease takes from a counter standing at `count`: a `1/share` part of
/// what is left under the cap, at least `need` and at most `max` (or `need`, if larger);
/// none when less than `need` is left.
///
/// ```
/// use usage_core::repo::{LeaseTerms, lease_size};
/// let terms = LeaseTerms { cap: Some(1_000), max: 100, share: 16, need: 1 };
/// assert_eq!(lease_size(0, terms), 62);
/// assert_eq!(lease_size(990, terms), 1);
/// assert_eq!(lease_size(1_000, terms), 0);
/// assert_eq!(lease_size(0, LeaseTerms { cap: None, ..terms }), 100);
/// let ten = LeaseTerms { need: 10, ..terms };
/// assert_eq!(lease_size(985, ten), 10);
/// assert_eq!(lease_size(991, ten), 0);
/// assert_eq!(lease_size(0, LeaseTerms { max: 5, ..ten }), 10);
/// ```
pub fn lease_size(count: u64, terms: LeaseTerms) -> u64 {
    let need = terms.need.max(1);
    match terms.cap {
        None => terms.max.max(need),
        Some(cap) => {
            let left = cap.saturating_sub(count);
            if left < need {
                return 0;
            }
            (left / terms.share.max(1))
                .max(need)
                .min(terms.max.max(need))
                .min(left)
        }
    }
}

/// What [`QuotaCounterRepository::take_quota`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaTake {
    /// Calls leased now (0: the cap is reached).
    pub taken: u64,
    /// The counter afterwards.
    pub count: u64,
}

/// A change to one (user, period, meter) admission counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaDelta {
    /// Whose counter.
    pub user_id: UserId,
    /// Which meter's (`api_calls` for calls).
    pub meter: Arc<str>,
    /// Start of its period.
    pub period_start: OffsetDateTime,
    /// Calls to add (admitted without a lease) or, negative, to give back (unspent leases).
    pub delta: i64,
}

/// The admission counters every instance shares (`eco_quota_counters`): per user, period
/// and meter, the units admitted or leased to an instance for admission (calls, for
/// `api_calls`). A counter is created on first use from the period's stored usage
/// (`eco_usage_records` for calls, `eco_meter_usage` for other meters); events stored
/// later add to it as they are stored.
///
/// These count admissions, for quota decisions; billing counts stored usage.
#[async_trait]
pub trait QuotaCounterRepository: Send + Sync {
    /// The counter of `user_id` on `meter` for the period starting at `period_start`,
    /// created if missing.
    async fn quota_count(
        &self,
        user_id: &UserId,
        meter: &str,
        period_start: OffsetDateTime,
    ) -> Result<u64, RepoError>;
    /// The counters of `users` on `meter` for the period, as they stand (those that exist,
    /// in any order): what an instance's view of units reported elsewhere is refreshed from.
    async fn quota_counts(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        users: &[UserId],
    ) -> Result<Vec<(UserId, u64)>, RepoError>;
    /// Adds `add` (units admitted without a lease), then leases [`lease_size`] more, in
    /// one atomic step: concurrent takes by any number of instances never lease past the
    /// cap. Creates the counter if missing.
    async fn take_quota(
        &self,
        user_id: &UserId,
        meter: &str,
        period_start: OffsetDateTime,
        add: u64,
        lease: LeaseTerms,
    ) -> Result<QuotaTake, RepoError>;
    /// Applies many deltas at once (never below zero) and returns each counter after it,
    /// in the order given. Counters that do not exist are created first.
    async fn apply_quota_deltas(&self, deltas: &[QuotaDelta]) -> Result<Vec<u64>, RepoError>;
    /// The users whose counter of `meter` for the period stands below the usage stored
    /// for them, with that stored usage: counts lost with a killed instance, or counts not
    /// yet pushed (see [`crate::quota::QuotaBook::heal`]).
    async fn counters_below_stored(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
    ) -> Result<Vec<(UserId, u64)>, RepoError>;
    /// Raises each user's counter of `meter` for the period to at least its floor,
    /// atomically (a counter already higher is left as it is); returns how many were
    /// raised. Counters that do not exist are left alone: they start from the stored
    /// usage when created.
    async fn raise_quota_counters(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        floors: &[(UserId, u64)],
    ) -> Result<u64, RepoError>;
}

/// Raw usage events (`eco_api_usage`) and the period counters (`eco_usage_records`).
#[async_trait]
pub trait UsageRepository: Send + Sync {
    /// Stores a batch of events and adds to each (user, period) counter the number of
    /// events actually inserted, in one transaction. Events whose id is already stored
    /// are skipped and not counted, so a retried batch counts once.
    async fn record_usage(
        &self,
        events: &[UsageEvent],
        included: &IncludedCalls,
    ) -> Result<RecordOutcome, RepoError>;
    /// A user's counters for the period starting at `period_start`.
    async fn usage_record(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<Option<UsageRecord>, RepoError>;
    /// A user's calls with `from <= created_at < to` per route pattern and method, most
    /// calls first (ties by endpoint, then method).
    async fn endpoint_stats(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<EndpointStats>, RepoError>;
    /// Stored events of a user with `from <= created_at < to`.
    async fn count_usage_events(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<u64, RepoError>;
    /// Keeps calls that can never be stored as they are (`record_usage` refused them for
    /// good: their user or key does not exist) for an operator to look at and replay. A
    /// letter whose event id is already kept is skipped.
    async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), RepoError>;
    /// Kept letters with an event id after `after` (all, with `None`), in event id order,
    /// at most `limit`.
    async fn dead_letters(
        &self,
        after: Option<uuid::Uuid>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError>;
    /// Forgets these letters (once replayed); returns how many went.
    async fn remove_dead_letters(&self, event_ids: &[uuid::Uuid]) -> Result<u64, RepoError>;
    /// Readies the storage of calls for the month of `now` and the `months_ahead` after it
    /// (on PostgreSQL, their monthly partitions); returns what it created.
    async fn prepare_usage_storage(
        &self,
        now: OffsetDateTime,
        months_ahead: u32,
    ) -> Result<Vec<String>, RepoError>;
    /// Removes stored events with `created_at < before` (with `dry_run`, only counts
    /// them), a bounded batch at a time, and records the bound it used
    /// ([`DailyUsageRepository::usage_pruned_before`]). A store may use an earlier bound
    /// to remove whole storage units: PostgreSQL drops the monthly partitions wholly
    /// before `before` and keeps the month `before` falls in.
    async fn prune_usage(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<UsagePrune, RepoError>;
    /// A user's events with `from <= created_at < to`, newest first (by `created_at`, then
    /// `event_id`, both descending), after `after` in that order when given (the last
    /// event of the previous page); at most `limit`.
    async fn usage_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<(OffsetDateTime, uuid::Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError>;
}

/// One event another service sent (`POST /api/events`), its subject resolved to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    /// The sender's name for itself (CloudEvents `source`).
    pub source: String,
    /// The sender's id of the event (CloudEvents `id`): `(source, event_id)` is stored
    /// once, ever.
    pub event_id: String,
    /// Whose usage it is.
    pub user_id: UserId,
    /// The meter (CloudEvents `type`).
    pub meter: String,
    /// The quantity reported (count meters count the event whatever it is; unique_count
    /// meters count `value`).
    pub quantity: u64,
    /// The value a unique_count meter counts once per period.
    pub value: Option<String>,
    /// When it happened (CloudEvents `time`): its day and period.
    pub created_at: OffsetDateTime,
}

/// Where a page of [`MeterUsageRepository::meter_events_page`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsAfter {
    /// The events at or before this instant.
    Through(OffsetDateTime),
    /// The events after this one (`created_at`, `source`, `event_id`) in the page order.
    Event(OffsetDateTime, String, String),
}

/// What [`MeterUsageRepository::record_meter_events`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventOutcome {
    /// Events stored now.
    pub accepted: u64,
    /// Events whose `(source, id)` was stored before (or earlier in the same batch).
    pub duplicates: u64,
}

/// Usage of the meters besides `api_calls`: what calls' units and other services' events
/// add up to per user, period and day (`eco_meter_usage`, `eco_meter_daily`), and the
/// events themselves (`eco_meter_events`). Each meter adds up as its aggregation says:
/// `count` counts reports, `sum` adds quantities, `max` keeps the largest, `unique_count`
/// counts distinct values. Calls' units are stored by [`UsageRepository::record_usage`],
/// with the calls.
#[async_trait]
pub trait MeterUsageRepository: Send + Sync {
    /// Stores the events whose `(source, event_id)` was never stored, and adds them to
    /// their user's period and day, in one transaction. `NotFound` (user or meter) when
    /// one names a user or meter that does not exist: nothing is stored then.
    async fn record_meter_events(
        &self,
        events: &[MeterEvent],
        now: OffsetDateTime,
    ) -> Result<EventOutcome, RepoError>;
    /// Which of `users` exist, and the owner of each of `keys` that exists (revoked or
    /// not): the subjects events may name.
    async fn event_subjects(
        &self,
        users: &[UserId],
        keys: &[ApiKeyId],
    ) -> Result<(Vec<UserId>, Vec<(ApiKeyId, UserId)>), RepoError>;
    /// A user's events with `from <= created_at < to`, newest first (by `created_at`,
    /// then `source`, then `event_id`, all descending), from `after` on when given; at
    /// most `limit`.
    async fn meter_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<EventsAfter>,
        limit: u32,
    ) -> Result<Vec<MeterEvent>, RepoError>;
    /// A user's quantity of each meter used in the period starting at `period_start`,
    /// by meter (`api_calls` is not among them: see [`UsageRepository::usage_record`]).
    async fn meter_usage(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<Vec<(String, u64)>, RepoError>;
    /// A user's quantity of `meter` per UTC day with `from <= date <= to`, oldest first
    /// (days without usage have no entry). For a `max` meter, the day's largest; for a
    /// `unique_count` meter, the values first seen that day in their period.
    async fn meter_history(
        &self,
        user_id: &UserId,
        meter: &str,
        from: Date,
        to: Date,
    ) -> Result<Vec<(Date, u64)>, RepoError>;
    /// The `limit` users with the most of `meter` (other than `api_calls`) in the period
    /// starting at `period_start`, most first (ties by user id); users without any are
    /// left out.
    async fn top_meter_users(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<MeterUser>, RepoError>;
}

/// A user and their quantity of a meter in a period ([`MeterUsageRepository::top_meter_users`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterUser {
    /// Who.
    pub user_id: UserId,
    /// Their email.
    pub email: String,
    /// Their plan.
    pub plan: Plan,
    /// Their quantity of the meter.
    pub quantity: u64,
}

/// What [`UsageRepository::prune_usage`] removed, or would remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsagePrune {
    /// Every event before this was removed (or would be): the bound asked for, or an
    /// earlier one where the store removes whole units.
    #[serde(with = "time::serde::rfc3339")]
    pub before: OffsetDateTime,
    /// Events removed (or that would be).
    pub rows: u64,
    /// Whole storage units dropped (PostgreSQL partitions), by name.
    pub partitions: Vec<String>,
    /// Events other services sent, with a time before `before`, removed (or that would
    /// be); what they added up to stays.
    pub meter_events: u64,
}

/// A call the store refused for good, kept in `eco_usage_dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The call as it was to be stored.
    pub event: UsageEvent,
    /// Its plan's included calls, as the tracker had them (for the counters on replay).
    pub included_calls: Option<u64>,
    /// Why it was refused.
    pub reason: String,
    /// When it was refused.
    pub failed_at: OffsetDateTime,
}

/// Daily aggregates (`eco_usage_daily`).
#[async_trait]
pub trait DailyUsageRepository: Send + Sync {
    /// Rebuilds every user's row for the UTC day `date` from the raw events, replacing
    /// what was there; returns the number of users with calls that day. Idempotent.
    ///
    /// A day before [`Self::usage_pruned_before`] lost its raw events to retention: its
    /// rows are kept, and the events stored since (late writes) are added to them and
    /// removed, in one transaction.
    async fn aggregate_usage_day(&self, date: Date, now: OffsetDateTime) -> Result<u64, RepoError>;
    /// The bound below which retention has removed raw events
    /// ([`UsageRepository::prune_usage`]), if it ever ran.
    async fn usage_pruned_before(&self) -> Result<Option<OffsetDateTime>, RepoError>;
    /// A user's daily rows with `from <= date <= to`, oldest first (days without calls
    /// have no row).
    async fn daily_usage(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError>;
    /// The days of `from..=to` whose rows are complete and current: aggregated after the
    /// day ended (by the store's clock), and no call of that day stored since. Any other
    /// day must be read from the raw events ([`Self::daily_usage_from_events`]).
    async fn aggregated_days(&self, from: Date, to: Date) -> Result<Vec<Date>, RepoError>;
    /// A user's figures per UTC day with `from <= date <= to`, counted from the raw
    /// events (no `top_endpoints`), oldest first; days without calls have no row.
    async fn daily_usage_from_events(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError>;
    /// The UTC day of the oldest stored call, if any.
    async fn first_usage_day(&self) -> Result<Option<Date>, RepoError>;
}

/// A stored call of a day that ends within this long counts as a late write for that
/// day: stores mark the day so that its aggregate, if any, is no longer current. The
/// margin covers clock skew between instances and transactions still open at midnight.
pub const LATE_WRITE_MARGIN: time::Duration = time::Duration::minutes(5);

/// From this instant on, calls stored for earlier days are late writes
/// ([`LATE_WRITE_MARGIN`]): the start of the UTC day that `now` plus the margin falls in.
pub fn late_write_cutoff(now: OffsetDateTime) -> OffsetDateTime {
    (now + LATE_WRITE_MARGIN).date().midnight().assume_utc()
}

/// The overage charge ledger (`eco_overage_charges`).
#[async_trait]
pub trait OverageChargeRepository: Send + Sync {
    /// Records a pending charge. `Conflict` when the idempotency key is taken, or when a
    /// pending or succeeded charge of the same user and period starts at the same
    /// `calls_from` (field `calls_from`): two runs can never both bill one range.
    /// `NotFound` for an unknown user.
    async fn create_overage_charge(
        &self,
        charge: &NewOverageCharge,
    ) -> Result<OverageCharge, RepoError>;
    /// The charge with this idempotency key.
    async fn overage_charge_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<OverageCharge>, RepoError>;
    /// Marks a charge succeeded and, in the same transaction, raises the period's
    /// `overage_invoiced_calls` to the charge's `calls_to` (never lowers it).
    /// `stripe_invoice_item_id` is `None` for a charge of zero cents, which is recorded
    /// without being sent. Idempotent. `NotFound` for an unknown charge id.
    async fn complete_overage_charge(
        &self,
        id: i64,
        stripe_invoice_item_id: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError>;
    /// Takes a pending charge over to send it again: moves its `updated_at` to `at` only
    /// if it is still pending and its `updated_at` is still `seen_updated_at`, so that of
    /// several runs resuming the same charge exactly one gets it (`Some`).
    async fn claim_overage_charge(
        &self,
        id: i64,
        seen_updated_at: OffsetDateTime,
        at: OffsetDateTime,
    ) -> Result<Option<OverageCharge>, RepoError>;
    /// Counts an attempt whose outcome is unknown (timeout, Stripe unavailable) and records
    /// why; the charge stays pending, to be sent again with the same key.
    /// `NotFound` for an unknown charge id.
    async fn note_overage_charge_attempt(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError>;
    /// Counts a definitive failure (Stripe refused the charge) and records why.
    /// `NotFound` for an unknown charge id.
    async fn fail_overage_charge(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError>;
    /// A user's charges, oldest first.
    async fn overage_charges_for_user(
        &self,
        user_id: &UserId,
    ) -> Result<Vec<OverageCharge>, RepoError>;
    /// Every user and period with `overage_calls > overage_invoiced_calls`, and every
    /// user's period of another meter with a quantity not all invoiced, by user, period,
    /// then meter.
    async fn uninvoiced_overage(&self) -> Result<Vec<UninvoicedOverage>, RepoError>;
    /// A user's period of a meter other than `api_calls`: (its quantity, the quantity
    /// invoiced); `None` when nothing was reported.
    async fn meter_invoicing(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
        meter: &str,
    ) -> Result<Option<(u64, u64)>, RepoError>;
    /// Every user and period with overage or charges, by user then period.
    async fn overage_ledger(&self) -> Result<Vec<OverageLedgerEntry>, RepoError>;
}

/// Dashboard sign-in: sessions and one-time sign-in links, kept by the SHA-256 (hex) of
/// their token, never the token.
#[async_trait]
pub trait SessionRepository: Send + Sync {
    /// Stores a sign-in link for `user_id`, usable once until `expires_at`. `NotFound` for
    /// an unknown user.
    async fn create_login_link(
        &self,
        token_hash: &str,
        user_id: &UserId,
        created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), RepoError>;
    /// Uses a link: its user when it exists, was never used and has not expired at `now`;
    /// marked used in the same statement, so that of two uses at once one wins.
    async fn consume_login_link(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError>;
    /// Stores a session for `user_id` until `expires_at`. `NotFound` for an unknown user.
    async fn create_session(
        &self,
        token_hash: &str,
        user_id: &UserId,
        created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), RepoError>;
    /// The user of a session that has not expired at `now`.
    async fn session_user(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError>;
    /// Ends a session; whether there was one.
    async fn delete_session(&self, token_hash: &str) -> Result<bool, RepoError>;
    /// Removes sessions and links expired at `now`, and used links; how many went.
    async fn prune_sessions(&self, now: OffsetDateTime) -> Result<u64, RepoError>;
}

/// One stored version of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanVersion {
    /// The terms; `key`, `version` and `archived` as stored (archiving is the plan's,
    /// every version shows it).
    pub plan: crate::catalog::PlanDefinition,
    /// How users of earlier versions move to this one.
    pub existing: crate::catalog::PlanMove,
    /// When this version was made.
    pub created_at: OffsetDateTime,
}

/// The catalog: plans (`eco_plans`, `eco_plan_versions`), meters (`eco_meters`) and route
/// costs (`eco_route_costs`). Small and read whole: services keep it in memory and read it
/// again when it changes.
#[async_trait]
pub trait PlanRepository: Send + Sync {
    /// Stores version 1 of each plan of `plans` whose key has no version yet, puts the
    /// users of that key who hold no version on it, and returns the keys stored. A key that
    /// has versions is left as it is: once the catalog exists, it is the truth.
    async fn seed_plans(
        &self,
        plans: &[crate::catalog::PlanDefinition],
        at: OffsetDateTime,
    ) -> Result<Vec<String>, RepoError>;
    /// Stores a new plan as version 1 (its `version` is ignored). `Conflict` (field `key`)
    /// when the key is taken.
    async fn create_plan(
        &self,
        plan: &crate::catalog::PlanDefinition,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError>;
    /// Stores `plan`'s terms as the next version of its key (its `version` and `archived`
    /// are ignored). `NotFound` for an unknown key.
    async fn revise_plan(
        &self,
        plan: &crate::catalog::PlanDefinition,
        existing: crate::catalog::PlanMove,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError>;
    /// Archives the plan (or takes it back); returns its newest version. `NotFound` for
    /// an unknown key.
    async fn set_plan_archived(
        &self,
        key: &str,
        archived: bool,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError>;
    /// Every version of every plan, by key, then version.
    async fn plan_versions(&self) -> Result<Vec<PlanVersion>, RepoError>;
    /// Every meter (`api_calls` included), by key.
    async fn meters(&self) -> Result<Vec<crate::meter::Meter>, RepoError>;
    /// Stores a new meter. `Conflict` (field `key`) when the key is taken.
    async fn create_meter(
        &self,
        meter: &crate::meter::Meter,
        at: OffsetDateTime,
    ) -> Result<(), RepoError>;
    /// Replaces a meter's name, unit and aggregation. `NotFound` for an unknown key;
    /// `Conflict` (field `aggregation`) when the aggregation would change and usage of the
    /// meter is stored.
    async fn update_meter(
        &self,
        meter: &crate::meter::Meter,
        at: OffsetDateTime,
    ) -> Result<(), RepoError>;
    /// Every route cost, by route then meter.
    async fn route_costs(&self) -> Result<Vec<crate::meter::RouteCost>, RepoError>;
    /// Replaces every route cost with `costs` in one transaction. `NotFound` (entity
    /// `meter`) when one names a meter that does not exist.
    async fn replace_route_costs(&self, costs: &[crate::meter::RouteCost])
    -> Result<(), RepoError>;
}

/// Everything a backend provides: all repositories plus a health check.
///
/// Services take the narrower traits (`Arc<dyn UserRepository>`); an `Arc<dyn Store>`
/// coerces to any of them.
#[async_trait]
pub trait Store:
    UserRepository
    + ApiKeyRepository
    + UsageRepository
    + DailyUsageRepository
    + OverageChargeRepository
    + AdminRepository
    + QuotaCounterRepository
    + SessionRepository
    + PlanRepository
    + MeterUsageRepository
    + Send
    + Sync
{
    /// Succeeds when the database answers a trivial query.
    async fn ping(&self) -> Result<(), RepoError>;
    /// Which backend this is ("memory", "sqlite", "postgres"), for logs.
    fn backend_name(&self) -> &'static str;
    /// The connection pool's use now; `None` without a pool (memory).
    fn pool_state(&self) -> Option<PoolState> {
        None
    }
}

/// A connection pool's use, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// Most connections the pool opens.
    pub max: u32,
    /// Connections open now (idle or in use).
    pub open: u32,
    /// Open connections not in use.
    pub idle: u32,
}
