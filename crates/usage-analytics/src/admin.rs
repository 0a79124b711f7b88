//! The business figures of the admin endpoints: overview, users list, audit log.
//!
//! Every parameter is parsed here against an allow-list or a range; what reaches the
//! repository is typed (an enum for the sort key, numbers, a literal search text).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use time::{Duration, OffsetDateTime};
use usage_core::accounts::{AccountError, Accounts, validate_stripe_customer_id};
use usage_core::catalog::{API_CALLS, PlanDefinition};
use usage_core::repo::{AdminAuditEntry, User, UserPageQuery, UserSort, UserUsageRow};
use usage_core::terms::LiveCatalog;
use usage_core::{BillingPeriod, Clock, Plan, Store, UserId};

use crate::AnalyticsError;

/// Largest page size of the admin lists.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Largest page number accepted (deeper pages are empty anyway).
pub const MAX_PAGE: u64 = 1_000_000;
/// Longest search text.
pub const MAX_SEARCH_CHARS: usize = 100;

/// Users per plan: one count per plan key of the catalog (zero included), beside `total`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsersPerPlan {
    /// Users of each plan, by key.
    #[serde(flatten)]
    pub plans: BTreeMap<String, u64>,
    /// All users.
    pub total: u64,
}

/// One of the heaviest users this period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopUser {
    /// Who.
    pub user_id: UserId,
    /// Their email.
    pub email: String,
    /// Their plan.
    pub plan: Plan,
    /// Calls this period.
    pub api_calls: u64,
}

/// One of the users with the most of a meter this period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopMeterUser {
    /// Who.
    pub user_id: UserId,
    /// Their email.
    pub email: String,
    /// Their plan.
    pub plan: Plan,
    /// Their quantity of the meter this period.
    pub quantity: u64,
}

/// `GET /api/admin/meters/{key}/top`: the users with the most of a meter this period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopMeterUsers {
    /// The meter's key.
    pub meter: String,
    /// The period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    /// Its end.
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    /// Most first (ties by user id); users without any are left out.
    pub items: Vec<TopMeterUser>,
}

/// `GET /api/admin/analytics/overview`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminOverview {
    /// Users per plan and in all.
    pub users: UsersPerPlan,
    /// Monthly recurring revenue: every user's effective monthly price (their plan
    /// version's, or their own).
    pub mrr_cents: i64,
    /// Overage calls of this period already invoiced.
    pub overage_revenue_cents: i64,
    /// Other meters' usage of this period already invoiced.
    pub meter_revenue_cents: i64,
    /// Overage of this period accrued and not invoiced yet.
    pub overage_uninvoiced_cents: i64,
    /// Overage of this period at its end if each user keeps their pace so far: a user's
    /// calls are scaled by (period length / time elapsed), the plan's included calls
    /// taken off, and each user's amount rounded half-up once (never below what they
    /// already owe).
    pub overage_forecast_cents: i64,
    /// Calls stored today (UTC).
    pub api_calls_today: u64,
    /// Calls counted this period.
    pub api_calls_this_month: u64,
    /// The five users with the most calls this period.
    pub top_users: Vec<TopUser>,
    /// The period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    /// Its end.
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
}

/// One row of `GET /api/admin/analytics/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminUserRow {
    /// Who.
    pub user_id: UserId,
    /// Email.
    pub email: String,
    /// Plan.
    pub plan: Plan,
    /// Sign-up time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Calls this period.
    pub api_calls: u64,
    /// Included calls per period; null for unlimited.
    pub limit: Option<u64>,
    /// This period's calls past the included calls of the user's terms now.
    pub overage_calls: u64,
    /// The user's effective monthly price plus what those calls cost under their terms.
    pub revenue_cents: i64,
}

/// `GET /api/admin/users/{id}` (and the answer of `PATCH`): a user and this period's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminUserDetail {
    /// Who.
    pub user_id: UserId,
    /// Email.
    pub email: String,
    /// Plan.
    pub plan: Plan,
    /// Sign-up time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Stripe customer overage is invoiced to, and whose subscriptions set the plan.
    pub stripe_customer_id: Option<String>,
    /// The version of the plan whose terms apply now.
    pub plan_version: u32,
    /// The user's own terms over the plan version; null for none.
    pub overrides: Option<usage_core::catalog::Overrides>,
    /// The terms that apply: the plan version's with the overrides applied.
    pub effective_terms: PlanDefinition,
    /// Calls this period (stored).
    pub api_calls: u64,
    /// Included calls per period; null for unlimited.
    pub limit: Option<u64>,
    /// This period's calls past the included calls of the user's terms now.
    pub overage_calls: u64,
    /// The user's effective monthly price plus what those calls cost under their terms.
    pub revenue_cents: i64,
}

/// The changes of `PATCH /api/admin/users/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserPatch {
    /// A new plan.
    pub plan: Option<Plan>,
    /// A new Stripe customer: `Some(None)` unlinks (`null`).
    pub stripe_customer_id: Option<Option<String>>,
    /// The user's own terms: `Some(None)` drops them (`null`).
    pub overrides: Option<Option<usage_core::catalog::Overrides>>,
}

/// Parses the body of `PATCH /api/admin/users/{id}`: a JSON object with any of `plan` (a
/// plan key), `stripe_customer_id` (`cus_...`, or null to unlink) and `overrides` (the
/// user's own terms, or null to drop them; read field by field, checked against the meters
/// by [`AdminReports::update_user`]); any other field, or
/// none, is an error naming it.
pub fn parse_user_patch(body: &[u8]) -> Result<UserPatch, AnalyticsError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| invalid("body", format!("the body must be a JSON object ({e})")))?;
    let Value::Object(fields) = body else {
        return Err(invalid("body", "the body must be a JSON object".to_owned()));
    };
    let mut patch = UserPatch::default();
    for (name, value) in &fields {
        match (name.as_str(), value) {
            ("plan", Value::String(plan)) => {
                patch.plan = Some(
                    plan.parse()
                        .map_err(|e: usage_core::DomainError| invalid("plan", e.to_string()))?,
                );
            }
            ("plan", other) => {
                return Err(invalid(
                    "plan",
                    format!("plan must be a plan key as a string (got {other})"),
                ));
            }
            ("stripe_customer_id", Value::Null) => patch.stripe_customer_id = Some(None),
            ("stripe_customer_id", Value::String(id)) => {
                validate_stripe_customer_id(id)
                    .map_err(|e| invalid("stripe_customer_id", e.to_string()))?;
                patch.stripe_customer_id = Some(Some(id.clone()));
            }
            ("stripe_customer_id", other) => {
                return Err(invalid(
                    "stripe_customer_id",
                    format!("stripe_customer_id must be a string cus_... or null (got {other})"),
                ));
            }
            ("overrides", Value::Null) => patch.overrides = Some(None),
            ("overrides", value) => {
                let text = value.to_string();
                let overrides: usage_core::catalog::Overrides =
                    usage_core::catalog::from_json(text.as_bytes()).map_err(|e| {
                        let at = match e.field.as_str() {
                            "body" => "overrides".to_owned(),
                            field => format!("overrides.{field}"),
                        };
                        invalid("overrides", format!("{at} {}", e.message))
                    })?;
                patch.overrides = Some(Some(overrides));
            }
            (unknown, _) => {
                return Err(invalid(
                    "body",
                    format!(
                        "unknown field {unknown:?}; allowed: plan, stripe_customer_id, overrides"
                    ),
                ));
            }
        }
    }
    if patch == UserPatch::default() {
        return Err(invalid(
            "body",
            "the body must set plan, stripe_customer_id and/or overrides".to_owned(),
        ));
    }
    Ok(patch)
}

/// A page of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Page<T> {
    /// 1-based page number.
    pub page: u64,
    /// Page size.
    pub limit: u32,
    /// Matching items in all pages.
    pub total: u64,
    /// This page.
    pub items: Vec<T>,
}

/// The parsed parameters of the users list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserListParams {
    /// 1-based page.
    pub page: u64,
    /// Page size.
    pub limit: u32,
    /// Plan filter.
    pub plan: Option<Plan>,
    /// Search text.
    pub q: Option<String>,
    /// Sort key.
    pub sort: ListSort,
    /// Largest first.
    pub descending: bool,
}

/// What the admin users list can be sorted by: an allow-list, never SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListSort {
    /// An order the store keeps (calls, sign-up time, email).
    Stored(UserSort),
    /// The effective monthly price plus this period's overage: priced under each user's
    /// terms, so ordered here rather than by the store.
    Revenue,
}

fn invalid(name: &'static str, message: String) -> AnalyticsError {
    AnalyticsError::InvalidParameter { name, message }
}

/// Parses `page` (1 to [`MAX_PAGE`], default 1) and `limit` (1 to [`MAX_PAGE_SIZE`],
/// default 20).
pub fn parse_page(params: &HashMap<String, String>) -> Result<(u64, u32), AnalyticsError> {
    let page = match params.get("page") {
        None => 1,
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|p| (1..=MAX_PAGE).contains(p))
            .ok_or_else(|| {
                invalid(
                    "page",
                    format!("page must be a whole number from 1 to {MAX_PAGE} (got {raw:?})"),
                )
            })?,
    };
    let limit = match params.get("limit") {
        None => 20,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_PAGE_SIZE).contains(l))
            .ok_or_else(|| {
                invalid(
                    "limit",
                    format!("limit must be a whole number from 1 to {MAX_PAGE_SIZE} (got {raw:?})"),
                )
            })?,
    };
    Ok((page, limit))
}

/// Parses the users list's query parameters. Unknown parameters are refused too, so
/// that a typo (`sort_by=`) is not silently ignored.
///
/// ```
/// use std::collections::HashMap;
/// use usage_analytics::admin::parse_user_list;
/// let params = HashMap::from([("sort".to_owned(), "api_calls;DROP TABLE eco_users".to_owned())]);
/// let err = parse_user_list(&params).unwrap_err();
/// assert!(err.to_string().starts_with("sort must be one of"));
/// ```
pub fn parse_user_list(params: &HashMap<String, String>) -> Result<UserListParams, AnalyticsError> {
    const KNOWN: [&str; 6] = ["page", "limit", "plan", "q", "sort", "order"];
    if let Some(unknown) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(invalid(
            "query",
            format!("unknown parameter {unknown:?}; allowed: page, limit, plan, q, sort, order"),
        ));
    }
    let (page, limit) = parse_page(params)?;
    let plan = match params.get("plan") {
        None => None,
        Some(raw) => Some(
            raw.parse::<Plan>()
                .map_err(|e| invalid("plan", e.to_string()))?,
        ),
    };
    let sort = match params.get("sort").map(String::as_str) {
        None | Some("api_calls") => ListSort::Stored(UserSort::ApiCalls),
        Some("created_at") => ListSort::Stored(UserSort::CreatedAt),
        Some("email") => ListSort::Stored(UserSort::Email),
        Some("revenue") => ListSort::Revenue,
        Some(raw) => {
            return Err(invalid(
                "sort",
                format!("sort must be one of api_calls, created_at, email, revenue (got {raw:?})"),
            ));
        }
    };
    let descending = match params.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(raw) => {
            return Err(invalid(
                "order",
                format!("order must be asc or desc (got {raw:?})"),
            ));
        }
    };
    let q = match params.get("q") {
        Some(q) if q.chars().count() > MAX_SEARCH_CHARS => {
            return Err(invalid(
                "q",
                format!("q must be at most {MAX_SEARCH_CHARS} characters"),
            ));
        }
        // No email or id holds one, and PostgreSQL text cannot hold NUL.
        Some(q) if q.chars().any(char::is_control) => {
            return Err(invalid(
                "q",
                "q must not contain control characters".to_owned(),
            ));
        }
        Some(q) if !q.trim().is_empty() => Some(q.trim().to_owned()),
        _ => None,
    };
    Ok(UserListParams {
        page,
        limit,
        plan,
        q,
        sort,
        descending,
    })
}

/// The admin figures over a [`Store`].
#[derive(Clone)]
pub struct AdminReports {
    store: Arc<dyn Store>,
    catalog: Arc<LiveCatalog>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AdminReports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminReports").finish_non_exhaustive()
    }
}

impl AdminReports {
    /// Removes audit entries older than `retention_days` days (in batches of 10,000);
    /// returns how many went.
    pub async fn prune_audit(&self, retention_days: u32) -> Result<u64, AnalyticsError> {
        let before = self.clock.now() - time::Duration::days(i64::from(retention_days));
        Ok(self.store.prune_admin_actions(before, 10_000).await?)
    }

    /// Reports over `store`, every amount priced under each user's terms from `catalog`.
    pub fn new(store: Arc<dyn Store>, catalog: Arc<LiveCatalog>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            catalog,
            clock,
        }
    }

    /// What `api_calls` this period come to under `terms`: the overage calls, and the
    /// monthly price plus their cost (rounded once, as their invoice item is).
    fn figures(terms: &PlanDefinition, api_calls: u64) -> (u64, i64) {
        let line = terms.calls_line(api_calls);
        (
            line.overage_units,
            terms.price_cents.saturating_add(line.amount_cents),
        )
    }

    /// The terms `subscription` gives at `now`, from `catalog` (a snapshot), read again
    /// when it lacks the plan.
    async fn terms_of(
        &self,
        catalog: &usage_core::terms::Catalog,
        subscription: &usage_core::repo::Subscription,
        now: OffsetDateTime,
    ) -> Result<PlanDefinition, AnalyticsError> {
        match catalog.effective(subscription, now) {
            Some(terms) => Ok(terms),
            None => Ok(self.catalog.effective(subscription, now).await?.terms),
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

    /// `GET /api/admin/analytics/overview`.
    pub async fn overview(&self) -> Result<AdminOverview, AnalyticsError> {
        let now = self.clock.now();
        let period = BillingPeriod::containing(now);
        let mut users = UsersPerPlan::default();
        let catalog = self.catalog.current();
        for plan in catalog.newest_versions() {
            users.plans.insert(plan.plan.key.clone(), 0);
        }
        let mut mrr_cents = 0i64;
        // The fewest included calls among terms that bill overage: only users with more
        // (scaled to the time elapsed) can owe overage, now or at their pace.
        let mut fewest_billed: Option<u64> = None;
        for (subscription, n) in self.store.count_users_by_terms().await? {
            *users
                .plans
                .entry(subscription.plan.as_str().to_owned())
                .or_default() += n;
            users.total += n;
            let terms = self.terms_of(&catalog, &subscription, now).await?;
            mrr_cents = mrr_cents.saturating_add(
                terms
                    .price_cents
                    .saturating_mul(i64::try_from(n).unwrap_or(i64::MAX)),
            );
            if let Some(included) = usage_core::caller::CallLimits::of(&terms).billed_from() {
                fewest_billed = Some(fewest_billed.map_or(included, |f| f.min(included)));
            }
        }
        let day = now.date().midnight().assume_utc();
        let elapsed = (now - period.start()).whole_seconds().max(1);
        let length = (period.end() - period.start()).whole_seconds();
        let scale = |calls: u64| -> u64 {
            let scaled = u128::from(calls) * u128::from(length.unsigned_abs())
                / u128::from(elapsed.unsigned_abs());
            u64::try_from(scaled).unwrap_or(u64::MAX)
        };
        let min_calls = fewest_billed.map_or(u64::MAX, |included| {
            let share = u128::from(included) * u128::from(elapsed.unsigned_abs())
                / u128::from(length.unsigned_abs().max(1));
            u64::try_from(share).unwrap_or(u64::MAX)
        });
        let usage = self
            .store
            .period_usage(period.start(), (day, day + Duration::days(1)), min_calls)
            .await?;
        // Each user's amounts under their own terms, rounded once, as their items are.
        let (mut accrued_cents, mut forecast_cents) = (0i64, 0i64);
        for (subscription, calls) in &usage.heavy_users {
            let terms = self.terms_of(&catalog, subscription, now).await?;
            let now_cents = terms.calls_line(*calls).amount_cents;
            let at_pace_cents = terms.calls_line(scale(*calls)).amount_cents;
            accrued_cents = accrued_cents.saturating_add(now_cents);
            forecast_cents = forecast_cents.saturating_add(at_pace_cents.max(now_cents));
        }
        let top = self.top_by_meter(API_CALLS, 5).await?.items;
        Ok(AdminOverview {
            users,
            mrr_cents,
            overage_revenue_cents: usage.invoiced_cents,
            meter_revenue_cents: usage.meters_invoiced_cents,
            overage_uninvoiced_cents: accrued_cents.saturating_sub(usage.invoiced_cents).max(0),
            overage_forecast_cents: forecast_cents,
            api_calls_today: usage.api_calls_today,
            api_calls_this_month: usage.api_calls,
            top_users: top
                .into_iter()
                .map(|u| TopUser {
                    user_id: u.user_id,
                    email: u.email,
                    plan: u.plan,
                    api_calls: u.quantity,
                })
                .collect(),
            period_start: period.start(),
            period_end: period.end(),
        })
    }

    /// The `limit` users with the most of `meter` this period (`api_calls`: calls counted).
    /// The meter is the caller's to check against the catalog.
    pub async fn top_by_meter(
        &self,
        meter: &str,
        limit: u32,
    ) -> Result<TopMeterUsers, AnalyticsError> {
        let period = BillingPeriod::containing(self.clock.now());
        let items = if meter == API_CALLS {
            let (_, rows) = self
                .store
                .users_page(&UserPageQuery {
                    period_start: period.start(),
                    plan: None,
                    search: None,
                    sort: UserSort::ApiCalls,
                    descending: true,
                    offset: 0,
                    limit,
                })
                .await?;
            rows.into_iter()
                // A user without calls is not among the heaviest.
                .filter(|r| r.api_calls > 0)
                .map(|r| TopMeterUser {
                    user_id: r.user.id,
                    email: r.user.email,
                    plan: r.user.plan,
                    quantity: r.api_calls,
                })
                .collect()
        } else {
            self.store
                .top_meter_users(meter, period.start(), limit)
                .await?
                .into_iter()
                .map(|u| TopMeterUser {
                    user_id: u.user_id,
                    email: u.email,
                    plan: u.plan,
                    quantity: u.quantity,
                })
                .collect()
        };
        Ok(TopMeterUsers {
            meter: meter.to_owned(),
            period_start: period.start(),
            period_end: period.end(),
            items,
        })
    }

    /// `GET /api/admin/analytics/users`.
    pub async fn users(
        &self,
        params: &UserListParams,
    ) -> Result<Page<AdminUserRow>, AnalyticsError> {
        let now = self.clock.now();
        let period = BillingPeriod::containing(now);
        let offset = (params.page - 1).saturating_mul(u64::from(params.limit));
        let (total, rows) = match params.sort {
            ListSort::Stored(sort) => {
                self.store
                    .users_page(&UserPageQuery {
                        period_start: period.start(),
                        plan: params.plan.clone(),
                        search: params.q.clone(),
                        sort,
                        descending: params.descending,
                        offset,
                        limit: params.limit,
                    })
                    .await?
            }
            ListSort::Revenue => self.users_by_revenue(params, period, offset, now).await?,
        };
        let mut items = Vec::with_capacity(rows.len());
        for r in rows {
            let terms = self.terms(&r.user).await?;
            let (overage_calls, revenue_cents) = Self::figures(&terms, r.api_calls);
            items.push(AdminUserRow {
                limit: terms.calls_line(r.api_calls).included,
                revenue_cents,
                user_id: r.user.id,
                email: r.user.email,
                plan: r.user.plan,
                created_at: r.user.created_at,
                api_calls: r.api_calls,
                overage_calls,
            });
        }
        Ok(Page {
            page: params.page,
            limit: params.limit,
            total,
            items,
        })
    }

    /// A page of the users list by revenue. Most users owe their monthly price only, the
    /// same for everyone holding a plan version without their own terms: those the store
    /// orders by the price of what they hold. The others (their own terms, or calls enough
    /// to owe overage under some terms) are priced here one by one and merged in.
    async fn users_by_revenue(
        &self,
        params: &UserListParams,
        period: BillingPeriod,
        offset: u64,
        now: OffsetDateTime,
    ) -> Result<(u64, Vec<UserUsageRow>), AnalyticsError> {
        // What each version costs a user holding it without their own terms (version 0:
        // none held, read as the first), from the catalog alone.
        let catalog = self.catalog.current();
        let mut prices = Vec::new();
        let mut fewest_billed: Option<u64> = None;
        let held = catalog
            .versions()
            .map(|v| (v.plan.key.as_str(), Some(v.plan.version)))
            .chain(
                catalog
                    .newest_versions()
                    .map(|v| (v.plan.key.as_str(), None)),
            );
        for (key, plan_version) in held {
            let subscription = usage_core::repo::Subscription {
                plan: Plan::from_stored(key),
                plan_version,
                overrides: None,
            };
            let Some(terms) = catalog.effective(&subscription, now) else {
                continue;
            };
            if let Some(included) = usage_core::caller::CallLimits::of(&terms).billed_from() {
                fewest_billed = Some(fewest_billed.map_or(included, |f| f.min(included)));
            }
            prices.push((
                subscription.plan,
                plan_version.unwrap_or(0),
                terms.price_cents,
            ));
        }
        // Fewer calls than that owe no overage under any terms.
        let min_calls = fewest_billed.map_or(u64::MAX, |included| included.saturating_add(1));
        let (plan, search) = (params.plan.as_ref(), params.q.as_deref());
        // The first `wanted` of the merged order hold at most `wanted` of the store's.
        let wanted = offset.saturating_add(u64::from(params.limit));
        let (total, by_price) = self
            .store
            .users_by_price(
                period.start(),
                plan,
                search,
                &prices,
                min_calls,
                params.descending,
                wanted,
            )
            .await?;
        let mut keyed: Vec<(i64, UserId)> = by_price
            .into_iter()
            .map(|(id, price)| (price, id))
            .collect();
        for (id, subscription, calls) in self
            .store
            .users_terms(period.start(), plan, search, min_calls)
            .await?
        {
            let terms = self.terms_of(&catalog, &subscription, now).await?;
            keyed.push((Self::figures(&terms, calls).1, id));
        }
        keyed.sort();
        if params.descending {
            keyed.reverse();
        }
        let ids: Vec<UserId> = keyed
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(params.limit as usize)
            .map(|(_, id)| id)
            .collect();
        let rows = self.store.users_rows(period.start(), &ids).await?;
        Ok((total, rows))
    }

    /// `GET /api/admin/users/{id}`.
    pub async fn user(&self, id: &UserId) -> Result<AdminUserDetail, AnalyticsError> {
        let user = self
            .store
            .user_by_id(id)
            .await?
            .ok_or_else(|| AnalyticsError::NoSuchUser(id.clone()))?;
        self.detail(user).await
    }

    /// `PATCH /api/admin/users/{id}`: the Stripe customer first (it may be refused as
    /// taken), then the plan, through the same path as the CLI (every instance follows a
    /// plan change at its next poll).
    pub async fn update_user(
        &self,
        id: &UserId,
        patch: &UserPatch,
    ) -> Result<AdminUserDetail, AnalyticsError> {
        if let Some(Some(overrides)) = &patch.overrides {
            // Read now: a meter made a moment ago on another instance counts.
            self.catalog.refresh().await?;
            overrides
                .validate(self.catalog.current().meters())
                .map_err(|e| invalid("overrides", e.to_string()))?;
        }
        let accounts = Accounts::new(self.store.clone(), self.clock.clone())
            .choosing_from(self.catalog.clone());
        let account_error = |e: AccountError| match e {
            AccountError::UnknownUser(id) => AnalyticsError::NoSuchUser(id),
            AccountError::StripeCustomerTaken(_) | AccountError::EmailTaken(_) => {
                AnalyticsError::Conflict(e.to_string())
            }
            AccountError::Invalid(e @ usage_core::DomainError::PlanArchived(_)) => {
                AnalyticsError::PlanArchived(e.to_string())
            }
            AccountError::Invalid(e @ usage_core::DomainError::UnknownPlan { .. }) => {
                invalid("plan", e.to_string())
            }
            AccountError::Invalid(e) => invalid("body", e.to_string()),
            AccountError::Repo(e) => AnalyticsError::Repo(e),
        };
        let mut user = accounts.user(id).await.map_err(account_error)?;
        if let Some(customer) = &patch.stripe_customer_id {
            user = accounts
                .set_stripe_customer(id, customer.as_deref())
                .await
                .map_err(account_error)?;
        }
        if let Some(plan) = &patch.plan {
            user = accounts
                .set_plan(id, plan.clone())
                .await
                .map_err(account_error)?;
        }
        if let Some(overrides) = &patch.overrides {
            user = accounts
                .set_overrides(id, overrides.as_ref())
                .await
                .map_err(account_error)?;
        }
        self.detail(user).await
    }

    async fn detail(&self, user: User) -> Result<AdminUserDetail, AnalyticsError> {
        let period = BillingPeriod::containing(self.clock.now());
        // The same figures as the users list: this period's stored calls under the terms.
        let api_calls = self
            .store
            .usage_record(&user.id, period.start())
            .await?
            .map_or(0, |r| r.api_calls);
        let terms = self.terms(&user).await?;
        let (overage_calls, revenue_cents) = Self::figures(&terms, api_calls);
        Ok(AdminUserDetail {
            limit: terms.calls_line(api_calls).included,
            revenue_cents,
            plan_version: terms.version,
            overrides: user.overrides.clone(),
            effective_terms: terms,
            user_id: user.id,
            email: user.email,
            plan: user.plan,
            created_at: user.created_at,
            stripe_customer_id: user.stripe_customer_id,
            api_calls,
            overage_calls,
        })
    }

    /// `GET /api/admin/audit`: newest first.
    pub async fn audit(
        &self,
        page: u64,
        limit: u32,
    ) -> Result<Page<AdminAuditEntry>, AnalyticsError> {
        let (total, items) = self
            .store
            .admin_actions((page - 1).saturating_mul(u64::from(limit)), limit)
            .await?;
        Ok(Page {
            page,
            limit,
            total,
            items,
        })
    }

    /// Calls per aggregated day over all users, `from` to `to` (both included).
    pub async fn daily_totals(
        &self,
        from: time::Date,
        to: time::Date,
    ) -> Result<Vec<usage_core::repo::DayTotal>, AnalyticsError> {
        Ok(self.store.daily_totals(from, to).await?)
    }

    /// Appends to the audit log.
    pub async fn record(&self, entry: &AdminAuditEntry) -> Result<(), AnalyticsError> {
        Ok(self.store.record_admin_action(entry).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use usage_core::ManualClock;
    use usage_core::repo::UserRepository;
    use usage_testkit::memory::MemoryStore;

    #[test]
    fn user_patches_name_what_is_wrong() {
        let ok = |body: &str| parse_user_patch(body.as_bytes()).unwrap();
        let err = |body: &str| parse_user_patch(body.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            ok(r#"{"plan": "pro"}"#),
            UserPatch {
                plan: Some(Plan::pro()),
                ..UserPatch::default()
            }
        );
        assert_eq!(
            ok(r#"{"stripe_customer_id": "cus_X1", "plan": "free"}"#),
            UserPatch {
                plan: Some(Plan::free()),
                stripe_customer_id: Some(Some("cus_X1".to_owned())),
                ..UserPatch::default()
            }
        );
        assert_eq!(
            ok(r#"{"stripe_customer_id": null}"#).stripe_customer_id,
            Some(None)
        );
        assert!(err(r#"{"plan": "Gold"}"#).starts_with("plan must be a plan key"));
        assert!(err(r#"{"plan": 3}"#).starts_with("plan must be a plan key"));
        assert_eq!(ok(r#"{"overrides": null}"#).overrides, Some(None));
        let own = ok(r#"{"overrides": {"price_cents": 30000}}"#).overrides;
        assert_eq!(own.unwrap().unwrap().price_cents, Some(30_000));
        assert!(err(r#"{"overrides": {"prices": 1}}"#).contains("prices"));
        assert!(err(r#"{"overrides": 7}"#).starts_with("overrides "));
        assert!(err(r#"{"stripe_customer_id": "acct_1"}"#).contains("cus_"));
        assert!(err(r#"{"stripe_customer_id": 5}"#).starts_with("stripe_customer_id must be"));
        assert!(err(r#"{"plan": "pro", "email": "x@y.z"}"#).contains("unknown field \"email\""));
        assert!(err("{}").contains("plan, stripe_customer_id and/or overrides"));
        assert!(err("[]").contains("JSON object"));
        assert!(err("not json").contains("JSON object"));
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_parameter_is_checked_against_its_allow_list_or_range() {
        let ok = parse_user_list(&params(&[])).unwrap();
        assert_eq!(
            (ok.page, ok.limit, ok.sort, ok.descending, ok.plan, ok.q),
            (
                1,
                20,
                ListSort::Stored(UserSort::ApiCalls),
                true,
                None,
                None
            )
        );
        let bad = [
            (
                ("sort", "api_calls;DROP TABLE eco_users"),
                "sort must be one of",
            ),
            (("sort", "API_CALLS"), "sort must be one of"),
            (("order", "desc; --"), "order must be asc or desc"),
            (("plan", "' OR 1=1--"), "plan must be a plan key"),
            (("limit", "0"), "limit must be a whole number from 1 to 100"),
            (
                ("limit", "101"),
                "limit must be a whole number from 1 to 100",
            ),
            (("limit", "-1"), "limit must be a whole number"),
            (("page", "0"), "page must be a whole number from 1"),
            (("page", "1e3"), "page must be a whole number"),
            (
                ("page", "99999999999999999999999"),
                "page must be a whole number",
            ),
            (("sort_by", "email"), "unknown parameter"),
        ];
        for ((name, value), expected) in bad {
            let err = parse_user_list(&params(&[(name, value)])).unwrap_err();
            assert!(
                err.to_string().starts_with(expected),
                "{name}={value}: {err}"
            );
        }
        let long = "x".repeat(MAX_SEARCH_CHARS + 1);
        assert!(parse_user_list(&params(&[("q", &long)])).is_err());
        let all = parse_user_list(&params(&[
            ("page", "3"),
            ("limit", "100"),
            ("plan", "pro"),
            ("q", " ada "),
            ("sort", "revenue"),
            ("order", "asc"),
        ]))
        .unwrap();
        assert_eq!(
            (
                all.page,
                all.limit,
                all.plan,
                all.q.as_deref(),
                all.sort,
                all.descending
            ),
            (
                3,
                100,
                Some(Plan::pro()),
                Some("ada"),
                ListSort::Revenue,
                false
            )
        );
        let nul = parse_user_list(&params(&[("q", "ada\u{0}")])).unwrap_err();
        assert_eq!(nul.to_string(), "q must not contain control characters");
    }

    /// Own terms are checked against the catalog's meters before anything is written.
    #[tokio::test]
    async fn own_terms_name_meters_that_exist() {
        use usage_core::repo::PlanRepository;
        let store = Arc::new(MemoryStore::new());
        let catalog =
            usage_testkit::seeded_catalog(store.clone(), &usage_core::PlanCatalog::default()).await;
        let id = UserId::generate();
        store
            .create_user(&User {
                id: id.clone(),
                email: "own@example.com".into(),
                plan: Plan::free(),
                stripe_customer_id: None,
                created_at: datetime!(2026-11-01 00:00 UTC),
                plan_subscription_id: None,
                blocked_at: None,
                plan_version: None,
                overrides: None,
            })
            .await
            .unwrap();
        let reports = AdminReports::new(
            store.clone(),
            catalog,
            Arc::new(ManualClock::new(datetime!(2026-11-22 12:00 UTC))),
        );
        let patch = |body: &str| parse_user_patch(body.as_bytes()).unwrap();
        let refused = |body: &'static str| {
            let reports = &reports;
            let id = &id;
            async move {
                reports
                    .update_user(id, &patch(body))
                    .await
                    .unwrap_err()
                    .to_string()
            }
        };
        assert_eq!(
            refused(r#"{"plan": "pro", "overrides": {"price_cents": -1}}"#).await,
            "overrides.price_cents must be 0 or more (got -1)"
        );
        let tokens = r#"{"overrides": {"limits": [{"meter": "tokens", "included": 1,
                                                   "over_limit": "block"}]}}"#;
        assert!(
            refused(tokens)
                .await
                .starts_with("overrides.limits[0].meter ")
        );
        assert_eq!(
            reports.user(&id).await.unwrap().plan,
            Plan::free(),
            "a refused patch writes nothing"
        );
        // A meter made on another instance a moment ago is read before the check.
        store
            .create_meter(
                &usage_core::meter::Meter {
                    key: "tokens".into(),
                    name: "Tokens".into(),
                    unit: "token".into(),
                    aggregation: usage_core::meter::Aggregation::Sum,
                },
                datetime!(2026-11-22 12:00 UTC),
            )
            .await
            .unwrap();
        let detail = reports.update_user(&id, &patch(tokens)).await.unwrap();
        assert_eq!(
            detail.effective_terms.limit("tokens").unwrap().included,
            Some(1)
        );
    }

    #[tokio::test]
    async fn overview_gives_every_users_effective_price_in_mrr() {
        use usage_core::repo::PlanRepository;
        let store = Arc::new(MemoryStore::new());
        let catalog =
            usage_testkit::seeded_catalog(store.clone(), &usage_core::PlanCatalog::default()).await;
        let mut growth = catalog.current().newest("pro").unwrap().plan.clone();
        growth.key = "growth".into();
        growth.price_cents = 9_900;
        store
            .create_plan(&growth, datetime!(2026-11-01 00:00 UTC))
            .await
            .unwrap();
        catalog.refresh().await.unwrap();
        let mut last_pro = None;
        for (plan, n) in [
            (Plan::free(), 100),
            (Plan::pro(), 45),
            (Plan::enterprise(), 5),
            (Plan::parse("growth").unwrap(), 1),
        ] {
            for i in 0..n {
                let id = UserId::generate();
                if plan == Plan::pro() {
                    last_pro = Some(id.clone());
                }
                store
                    .create_user(&User {
                        id,
                        email: format!("{plan}{i}@example.com"),
                        plan: plan.clone(),
                        stripe_customer_id: None,
                        created_at: datetime!(2026-11-01 00:00 UTC),
                        plan_subscription_id: None,
                        blocked_at: None,
                        plan_version: None,
                        overrides: None,
                    })
                    .await
                    .unwrap();
            }
        }
        // One pro customer signed for $300 a month.
        let own = usage_core::catalog::Overrides {
            price_cents: Some(30_000),
            limits: vec![],
        };
        store
            .set_user_overrides(
                &last_pro.unwrap(),
                Some(&own),
                datetime!(2026-11-02 00:00 UTC),
            )
            .await
            .unwrap();
        let reports = AdminReports::new(
            store,
            catalog,
            Arc::new(ManualClock::new(datetime!(2026-11-22 12:00 UTC))),
        );
        let overview = reports.overview().await.unwrap();
        let per_plan = |pairs: &[(&str, u64)]| {
            pairs
                .iter()
                .map(|(k, n)| ((*k).to_owned(), *n))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            overview.users,
            UsersPerPlan {
                plans: per_plan(&[("enterprise", 5), ("free", 100), ("growth", 1), ("pro", 45)]),
                total: 151
            }
        );
        // 44 × $49 + 1 × $300 (own terms) + 5 × $500 + 1 × $99 = $5,055.00.
        assert_eq!(overview.mrr_cents, 505_500);
        let json = serde_json::to_value(&overview.users).unwrap();
        assert_eq!(json["growth"], 1);
        assert_eq!(json["total"], 151);
        assert!(overview.top_users.is_empty());
        let page = reports
            .users(
                &parse_user_list(&params(&[("plan", "pro"), ("limit", "20"), ("page", "3")]))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!((page.total, page.items.len()), (45, 5));
    }

    /// The list by revenue orders users by what they owe under their own terms: a cheap
    /// plan whose overage is dear passes a dearer plan without calls.
    #[tokio::test]
    async fn the_list_by_revenue_prices_each_user_under_their_terms() {
        use usage_core::repo::{ApiKeyRepository, PlanRepository, UsageRepository};
        let store = Arc::new(MemoryStore::new());
        let catalog =
            usage_testkit::seeded_catalog(store.clone(), &usage_core::PlanCatalog::default()).await;
        let metered: PlanDefinition = usage_core::catalog::from_json(
            br#"{"key": "metered", "name": "Metered", "price_cents": 100, "currency": "usd",
                 "limits": [{"meter": "api_calls", "included": 10, "over_limit": "overage",
                             "overage": {"model": "per_unit", "unit_price_micros": 1000000}}]}"#,
        )
        .unwrap();
        store
            .create_plan(&metered, datetime!(2026-11-01 00:00 UTC))
            .await
            .unwrap();
        catalog.refresh().await.unwrap();
        let now = datetime!(2026-11-22 12:00 UTC);
        let mut ids = BTreeMap::new();
        for (email, plan) in [
            ("pro@example.com", Plan::pro()),
            ("metered@example.com", Plan::parse("metered").unwrap()),
            ("quiet@example.com", Plan::parse("metered").unwrap()),
            ("free@example.com", Plan::free()),
        ] {
            let user = User {
                id: UserId::generate(),
                email: email.to_owned(),
                plan,
                stripe_customer_id: None,
                created_at: now,
                plan_subscription_id: None,
                blocked_at: None,
                plan_version: None,
                overrides: None,
            };
            store.create_user(&user).await.unwrap();
            ids.insert(email, user.id);
        }
        // 60 calls on metered: 50 past its 10, at $1 each.
        let key = usage_core::repo::ApiKeyRecord {
            id: usage_core::ApiKeyId::generate(),
            user_id: ids["metered@example.com"].clone(),
            name: "k".into(),
            prefix: "eco_live_test".into(),
            key_hash: "0".repeat(64),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        let events: Vec<_> = (0..60)
            .map(|i| usage_core::UsageEvent {
                event_id: usage_core::event::new_event_id(now),
                user_id: ids["metered@example.com"].clone(),
                api_key_id: key.id.clone(),
                endpoint: "/v1/x".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 1,
                created_at: now - Duration::seconds(i),
                units: Default::default(),
            })
            .collect();
        store
            .record_usage(
                &events,
                &HashMap::from([(ids["metered@example.com"].clone(), 10)]),
            )
            .await
            .unwrap();
        let reports = AdminReports::new(store, catalog, Arc::new(ManualClock::new(now)));
        let page = reports
            .users(&parse_user_list(&params(&[("sort", "revenue")])).unwrap())
            .await
            .unwrap();
        let listed: Vec<(&str, u64, i64)> = page
            .items
            .iter()
            .map(|u| (u.email.as_str(), u.overage_calls, u.revenue_cents))
            .collect();
        assert_eq!(
            listed,
            [
                ("metered@example.com", 50, 100 + 5_000),
                ("pro@example.com", 0, 4_900),
                ("quiet@example.com", 0, 100),
                ("free@example.com", 0, 0),
            ]
        );
        assert_eq!(page.total, 4);
        let second = reports
            .users(
                &parse_user_list(&params(&[
                    ("sort", "revenue"),
                    ("order", "asc"),
                    ("limit", "2"),
                    ("page", "2"),
                    ("plan", "metered"),
                ]))
                .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(second.total, 2);
        assert!(second.items.is_empty(), "past the last page");
    }
}
