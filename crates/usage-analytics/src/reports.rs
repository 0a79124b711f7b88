//! The figures a customer sees about their own usage.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;
use time::{Date, Duration, OffsetDateTime};
use usage_core::catalog::{API_CALLS, PlanDefinition};
use usage_core::quota::QuotaBook;
use usage_core::repo::{
    ChargeStatus, DailyUsage, DailyUsageRepository, MeterUsageRepository, OverageChargeRepository,
    UsageRepository, User, UserRepository,
};
use usage_core::terms::LiveCatalog;
use usage_core::{BillingPeriod, Cents, Clock, RepoError, Store, UserId};

/// Longest history window, in days.
pub const MAX_HISTORY_DAYS: u32 = 365;
/// Longest endpoint-statistics window, in days.
pub const MAX_ENDPOINT_DAYS: u32 = 90;

/// Parses a `days` parameter in `1..=max`, naming it and its range in the error.
pub fn parse_days(raw: Option<&str>, default: u32, max: u32) -> Result<u32, AnalyticsError> {
    let Some(raw) = raw else { return Ok(default) };
    raw.parse::<u32>()
        .ok()
        .filter(|d| (1..=max).contains(d))
        .ok_or_else(|| AnalyticsError::InvalidParameter {
            name: "days",
            message: format!("days must be a whole number from 1 to {max} (got {raw:?})"),
        })
}

fn history_day(d: &usage_core::repo::DailyUsage) -> HistoryDay {
    HistoryDay {
        date: d.date,
        api_calls: d.api_calls,
        error_calls: d.error_calls,
        avg_response_time_ms: mean(d.total_response_time_ms, d.api_calls),
        quantity: 0,
    }
}

/// One day of `GET /api/usage/history`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryDay {
    /// The UTC day.
    #[serde(with = "crate::daily::date_format")]
    pub date: Date,
    /// Calls that day.
    pub api_calls: u64,
    /// Calls answered with status >= 400.
    pub error_calls: u64,
    /// Mean response time (0 without calls).
    pub avg_response_time_ms: f64,
    /// The meter asked for that day: `api_calls` by default; for a `max` meter the
    /// day's largest quantity, for a `unique_count` meter the values first seen that day.
    pub quantity: u64,
}

/// One route of `GET /api/usage/endpoints`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointUsage {
    /// Route pattern.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Calls.
    pub calls: u64,
    /// Calls answered with status >= 400.
    pub error_calls: u64,
    /// Mean response time.
    pub avg_response_time_ms: f64,
}

fn mean(total_ms: u64, calls: u64) -> f64 {
    if calls == 0 {
        0.0
    } else {
        (total_ms as f64 / calls as f64 * 100.0).round() / 100.0
    }
}

/// `$12.34` from cents.
fn dollars(amount: Cents) -> String {
    format!("${}.{:02}", amount.0 / 100, amount.0 % 100)
}

use crate::CurrentUsage;

/// Why a report could not be made.
#[derive(Debug, Error)]
pub enum AnalyticsError {
    /// No user has this id (the caller's own token names a user that is gone).
    #[error("no user with id {0}")]
    UnknownUser(UserId),
    /// No user has the id an admin asked for.
    #[error("no user with id {0}")]
    NoSuchUser(UserId),
    /// The change would break a uniqueness rule (a Stripe customer linked twice).
    #[error("{0}")]
    Conflict(String),
    /// The plan asked for takes no new subscribers.
    #[error("{0}")]
    PlanArchived(String),
    /// A parameter outside its form or range; the message names it.
    #[error("{message}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Usage reports for one instance: live counts come from its [`QuotaBook`], so calls
/// admitted but not yet written are included.
#[derive(Clone)]
pub struct UsageReports {
    users: Arc<dyn UserRepository>,
    usage: Arc<dyn UsageRepository>,
    daily: Arc<dyn DailyUsageRepository>,
    meters: Arc<dyn MeterUsageRepository>,
    charges: Arc<dyn OverageChargeRepository>,
    quota: Arc<QuotaBook>,
    catalog: Arc<LiveCatalog>,
    clock: Arc<dyn Clock>,
}

/// One overage charge of `GET /api/usage/charges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChargeItem {
    /// The charge's id.
    pub id: i64,
    /// The period whose overage it bills.
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    /// The meter it bills: `api_calls`, or another.
    pub meter: String,
    /// Overage calls it bills (0 for another meter).
    pub overage_calls: u64,
    /// Of the meter's usage in the period, how much it covers: its overage calls, or the
    /// range of another meter's quantity (included units inside, for the first).
    pub units: u64,
    /// What it costs.
    pub amount_cents: i64,
    /// `pending` (being sent), `invoiced` (Stripe has the item) or `failed`.
    pub status: &'static str,
    /// Stripe's invoice item, once invoiced.
    pub stripe_invoice_item_id: Option<String>,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The contract's name of a charge state.
pub fn charge_status_name(status: ChargeStatus) -> &'static str {
    match status {
        ChargeStatus::Pending => "pending",
        ChargeStatus::Succeeded => "invoiced",
        ChargeStatus::Failed => "failed",
    }
}

/// A user's overage this period, as `GET /api/usage/overage` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OverageReport {
    /// First instant of the period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    /// First instant after the period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    /// Billable calls past the plan's limit so far (calls not yet written included).
    pub overage_calls: u64,
    /// Their price, rounded half-up once at the total.
    pub overage_cost_cents: Cents,
    /// Overage calls already invoiced.
    pub invoiced_calls: u64,
    /// What the invoiced charges of this period amounted to.
    pub invoiced_cents: Cents,
    /// A sentence for a person.
    pub message: String,
}

impl UsageReports {
    /// Reports over these parts; users' terms come from `catalog`.
    pub fn new(
        store: Arc<dyn Store>,
        quota: Arc<QuotaBook>,
        catalog: Arc<LiveCatalog>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            users: store.clone(),
            usage: store.clone(),
            daily: store.clone(),
            meters: store.clone(),
            charges: store,
            quota,
            catalog,
            clock,
        }
    }

    /// The user's effective terms now.
    async fn terms(&self, user: &User) -> Result<PlanDefinition, AnalyticsError> {
        Ok(self
            .catalog
            .effective(&user.subscription(), self.clock.now())
            .await?
            .terms)
    }

    async fn user(&self, user_id: &UserId) -> Result<User, AnalyticsError> {
        self.users
            .user_by_id(user_id)
            .await?
            .ok_or_else(|| AnalyticsError::UnknownUser(user_id.clone()))
    }

    /// `GET /api/usage/charges` for `user_id`: every overage charge, newest first.
    pub async fn charges(&self, user_id: &UserId) -> Result<Vec<ChargeItem>, AnalyticsError> {
        self.user(user_id).await?;
        let mut charges = self.charges.overage_charges_for_user(user_id).await?;
        charges.sort_by_key(|c| std::cmp::Reverse((c.created_at, c.id)));
        Ok(charges
            .into_iter()
            .map(|c| ChargeItem {
                id: c.id,
                period_start: c.period_start,
                overage_calls: if c.meter == API_CALLS {
                    c.calls_to.saturating_sub(c.calls_from)
                } else {
                    0
                },
                units: c.calls_to.saturating_sub(c.calls_from),
                meter: c.meter,
                amount_cents: c.amount_cents,
                status: charge_status_name(c.status),
                stripe_invoice_item_id: c.stripe_invoice_item_id,
                created_at: c.created_at,
            })
            .collect())
    }

    /// `GET /api/usage/overage` for `user_id`.
    pub async fn overage(&self, user_id: &UserId) -> Result<OverageReport, AnalyticsError> {
        let user = self.user(user_id).await?;
        let period = BillingPeriod::containing(self.clock.now());
        let terms = self.terms(&user).await?;
        let used = self.quota.used(user_id).await?;
        let line = terms.calls_line(used);
        let overage_calls = line.overage_units;
        let invoiced_calls = self
            .usage
            .usage_record(user_id, period.start())
            .await?
            .map_or(0, |r| r.overage_invoiced_calls);
        let invoiced_cents = self
            .charges
            .overage_charges_for_user(user_id)
            .await?
            .iter()
            .filter(|c| c.period_start == period.start() && c.status == ChargeStatus::Succeeded)
            .filter(|c| c.meter == API_CALLS)
            .map(|c| c.amount_cents)
            .sum();
        let cost = Cents(line.amount_cents);
        let billed_from = usage_core::caller::CallLimits::of(&terms).billed_from();
        let message = match (billed_from, overage_calls) {
            (None, _) => format!("The {} plan has no overage.", user.plan),
            (Some(limit), 0) => {
                format!("No overage this period: {used} of {limit} included calls used.")
            }
            (Some(limit), n) => format!(
                "{n} calls over the {limit} included this period, {} so far; {invoiced_calls} of them invoiced.",
                dollars(cost)
            ),
        };
        Ok(OverageReport {
            period_start: period.start(),
            period_end: period.end(),
            overage_calls,
            overage_cost_cents: cost,
            invoiced_calls,
            invoiced_cents: Cents(invoiced_cents),
            message,
        })
    }

    /// `GET /api/usage/history`: one row per UTC day of the last `days` (today included),
    /// oldest first, zero-filled. Past days whose aggregate is current come from the daily
    /// aggregate; every other day (today, a day never aggregated, a day with calls stored
    /// after its aggregation) is counted from the raw events, so a past day always counts
    /// every call stored for it.
    ///
    /// `meter` (`api_calls` when `None`) gives each day's `quantity`; one the catalog does
    /// not have is an error naming `meter`.
    pub async fn history(
        &self,
        user_id: &UserId,
        days: u32,
        meter: Option<&str>,
    ) -> Result<Vec<HistoryDay>, AnalyticsError> {
        let meter = meter.unwrap_or(API_CALLS);
        if self.catalog.current().meters().get(meter).is_none() {
            // Made a moment ago on another instance?
            self.catalog.refresh().await?;
        }
        let catalog = self.catalog.current();
        let meters = catalog.meters();
        if meters.get(meter).is_none() {
            return Err(AnalyticsError::InvalidParameter {
                name: "meter",
                message: format!("meter must be one of {} (got {meter:?})", meters.key_list()),
            });
        }
        let count = days;
        let mut days = self.call_history(user_id, count).await?;
        if meter == API_CALLS {
            for day in &mut days {
                day.quantity = day.api_calls;
            }
        } else {
            let quantities = self.meter_days(user_id, meter, count).await?;
            for (day, (_, quantity)) in days.iter_mut().zip(quantities) {
                day.quantity = quantity;
            }
        }
        Ok(days)
    }

    /// A meter other than `api_calls`: its quantity per UTC day of the last `days` (today
    /// included), oldest first, zero-filled.
    pub async fn meter_days(
        &self,
        user_id: &UserId,
        meter: &str,
        days: u32,
    ) -> Result<Vec<(Date, u64)>, AnalyticsError> {
        let today = self.clock.now().date();
        let first = today - Duration::days(i64::from(days) - 1);
        let stored: HashMap<Date, u64> = self
            .meters
            .meter_history(user_id, meter, first, today)
            .await?
            .into_iter()
            .collect();
        Ok((0..i64::from(days))
            .map(|i| first + Duration::days(i))
            .map(|d| (d, stored.get(&d).copied().unwrap_or(0)))
            .collect())
    }

    /// The calls of [`Self::history`]'s days.
    async fn call_history(
        &self,
        user_id: &UserId,
        days: u32,
    ) -> Result<Vec<HistoryDay>, AnalyticsError> {
        let now = self.clock.now();
        let today = now.date();
        let first = today - Duration::days(i64::from(days) - 1);
        let yesterday = today - Duration::days(1);
        let current: HashSet<Date> = if first <= yesterday {
            self.daily
                .aggregated_days(first, yesterday)
                .await?
                .into_iter()
                .collect()
        } else {
            HashSet::new()
        };
        // Days before retention's bound live in the aggregate; their calls stored since
        // (not folded in yet) are added from the raw events below.
        let pruned_before = self
            .daily
            .usage_pruned_before()
            .await?
            .map(|bound| bound.date());
        let in_aggregate = |d: Date| current.contains(&d) || pruned_before.is_some_and(|b| d < b);
        let mut stored: HashMap<Date, DailyUsage> = HashMap::new();
        if first <= yesterday && (!current.is_empty() || pruned_before.is_some_and(|b| first < b)) {
            let aggregated = self.daily.daily_usage(user_id, first, yesterday).await?;
            stored.extend(
                aggregated
                    .into_iter()
                    .filter(|d| in_aggregate(d.date))
                    .map(|d| (d.date, d)),
            );
        }
        // Raw calls of a day before retention's bound are the ones not folded into its
        // aggregate yet: always added to it.
        let raw_counts = |d: Date| !current.contains(&d) || pruned_before.is_some_and(|b| d < b);
        // The raw events from the first day that needs them, today included.
        let first_raw = (0..i64::from(days))
            .map(|i| first + Duration::days(i))
            .find(|d| raw_counts(*d))
            .unwrap_or(today);
        let raw = self
            .daily
            .daily_usage_from_events(user_id, first_raw, today)
            .await?;
        for day in raw.into_iter().filter(|d| raw_counts(d.date)) {
            match stored.get_mut(&day.date) {
                Some(kept) => {
                    kept.api_calls += day.api_calls;
                    kept.error_calls += day.error_calls;
                    kept.total_response_time_ms += day.total_response_time_ms;
                }
                None => {
                    stored.insert(day.date, day);
                }
            }
        }
        Ok((0..i64::from(days))
            .map(|i| first + Duration::days(i))
            .map(|date| {
                stored.remove(&date).map_or(
                    HistoryDay {
                        date,
                        api_calls: 0,
                        error_calls: 0,
                        avg_response_time_ms: 0.0,
                        quantity: 0,
                    },
                    |d| history_day(&d),
                )
            })
            .collect())
    }

    /// `GET /api/usage/endpoints`: calls per route pattern and method over the last `days`
    /// UTC days (today included), most calls first.
    pub async fn endpoints(
        &self,
        user_id: &UserId,
        days: u32,
    ) -> Result<Vec<EndpointUsage>, AnalyticsError> {
        let now = self.clock.now();
        let from = (now.date() - Duration::days(i64::from(days) - 1))
            .midnight()
            .assume_utc();
        Ok(self
            .usage
            .endpoint_stats(user_id, from, now + Duration::seconds(1))
            .await?
            .into_iter()
            .map(|s| EndpointUsage {
                avg_response_time_ms: mean(s.total_response_time_ms, s.calls),
                endpoint: s.endpoint,
                method: s.method,
                calls: s.calls,
                error_calls: s.error_calls,
            })
            .collect())
    }

    /// `GET /api/usage/current` for `user_id`.
    pub async fn current(&self, user_id: &UserId) -> Result<CurrentUsage, AnalyticsError> {
        let user = self.user(user_id).await?;
        let terms = self.terms(&user).await?;
        let used = self.quota.used(user_id).await?;
        let period = BillingPeriod::containing(self.clock.now());
        let meters_used = self.meters.meter_usage(user_id, period.start()).await?;
        Ok(
            CurrentUsage::compute(user.id, &terms, period, used).with_meters(
                &terms,
                &meters_used,
                self.catalog.current().meters(),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use usage_core::quota::QuotaDecision;
    use usage_core::repo::User;
    use usage_core::{ManualClock, Plan, PlanCatalog};
    use usage_testkit::memory::MemoryStore;

    #[tokio::test]
    async fn current_counts_admitted_calls_not_yet_written() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let user = User {
            id: UserId::generate(),
            email: "ada@example.com".into(),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: clock.now(),
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await.unwrap();
        let catalog = PlanCatalog {
            pro: usage_core::PlanTerms {
                monthly_calls: Some(3),
                ..PlanCatalog::default().pro
            },
            ..PlanCatalog::default()
        };
        let live = usage_testkit::seeded_catalog(store.clone(), &catalog).await;
        let quota = Arc::new(QuotaBook::new(
            store.clone(),
            clock.clone(),
            usage_core::quota::QuotaSettings::default(),
        ));
        let limits =
            usage_core::caller::CallLimits::of(&live.current().newest("pro").unwrap().plan);
        for _ in 0..5 {
            assert!(matches!(
                quota.admit(&user.id, &limits).await.unwrap(),
                QuotaDecision::Admitted(_)
            ));
        }
        let reports = UsageReports::new(store, quota, live, clock);
        let overage = reports.overage(&user.id).await.unwrap();
        assert_eq!(
            (
                overage.overage_calls,
                overage.invoiced_calls,
                overage.invoiced_cents
            ),
            (2, 0, Cents(0))
        );
        assert_eq!(
            overage.message,
            "2 calls over the 3 included this period, $0.00 so far; 0 of them invoiced."
        );
        let now = reports.current(&user.id).await.unwrap();
        assert_eq!(
            (now.api_calls, now.limit, now.remaining, now.overage_calls),
            (5, Some(3), Some(0), 2)
        );
        assert_eq!(now.usage_percentage, 166.67);
        assert_eq!(
            now.overage_cost_cents,
            Cents(0),
            "2 calls at $0.001 round to 0 cents"
        );
        assert!(matches!(
            reports.current(&UserId::generate()).await,
            Err(AnalyticsError::UnknownUser(_))
        ));
    }

    #[tokio::test]
    async fn history_is_zero_filled_across_a_month_end_and_endpoints_are_ranked() {
        use usage_core::repo::{
            ApiKeyRecord, ApiKeyRepository, DailyUsageRepository, IncludedCalls, UsageRepository,
        };
        use usage_core::{ApiKeyId, UsageEvent};
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-12-02 15:00 UTC)));
        let user = User {
            id: UserId::generate(),
            email: "ada@example.com".into(),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: datetime!(2026-11-01 00:00 UTC),
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
            key_hash: "0".repeat(64),
            created_at: user.created_at,
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        let event = |at, endpoint: &str, status, ms| UsageEvent {
            event_id: usage_core::event::new_event_id(at),
            user_id: user.id.clone(),
            api_key_id: key.id.clone(),
            endpoint: endpoint.into(),
            method: "GET".into(),
            status_code: status,
            response_time_ms: ms,
            created_at: at,
            units: Default::default(),
        };
        let events = vec![
            event(datetime!(2026-11-30 23:59:59.999 UTC), "/a", 200, 10),
            event(datetime!(2026-11-30 12:00 UTC), "/a", 500, 20),
            event(datetime!(2026-12-02 09:00 UTC), "/b", 200, 4),
            event(datetime!(2026-12-02 10:00 UTC), "/b", 200, 6),
            event(datetime!(2026-12-02 11:00 UTC), "/a", 404, 2),
        ];
        store
            .record_usage(&events, &IncludedCalls::new())
            .await
            .unwrap();
        store
            .aggregate_usage_day(datetime!(2026-11-30 00:00 UTC).date(), clock.now())
            .await
            .unwrap();
        let live = usage_testkit::seeded_catalog(store.clone(), &PlanCatalog::default()).await;
        let quota = Arc::new(QuotaBook::new(
            store.clone(),
            clock.clone(),
            usage_core::quota::QuotaSettings::default(),
        ));
        let reports = UsageReports::new(store, quota, live, clock);

        let history = reports.history(&user.id, 4, None).await.unwrap();
        let rows: Vec<(String, u64, u64, f64)> = history
            .iter()
            .map(|d| {
                (
                    d.date.to_string(),
                    d.api_calls,
                    d.error_calls,
                    d.avg_response_time_ms,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("2026-11-29".into(), 0, 0, 0.0),
                ("2026-11-30".into(), 2, 1, 15.0),
                ("2026-12-01".into(), 0, 0, 0.0),
                ("2026-12-02".into(), 3, 1, 4.0),
            ]
        );
        let endpoints = reports.endpoints(&user.id, 1).await.unwrap();
        let ranked: Vec<(&str, u64, u64, f64)> = endpoints
            .iter()
            .map(|e| {
                (
                    e.endpoint.as_str(),
                    e.calls,
                    e.error_calls,
                    e.avg_response_time_ms,
                )
            })
            .collect();
        assert_eq!(ranked, vec![("/b", 2, 0, 5.0), ("/a", 1, 1, 2.0)]);
        assert_eq!(
            reports.endpoints(&user.id, 3).await.unwrap()[0].calls,
            3,
            "/a over 3 days"
        );

        assert_eq!(parse_days(None, 30, MAX_HISTORY_DAYS).unwrap(), 30);
        assert_eq!(parse_days(Some("365"), 30, MAX_HISTORY_DAYS).unwrap(), 365);
        for bad in ["0", "366", "-1", "abc", "1.5", ""] {
            let err = parse_days(Some(bad), 30, MAX_HISTORY_DAYS)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("days must be a whole number from 1 to 365"),
                "{bad}: {err}"
            );
        }
    }
}
