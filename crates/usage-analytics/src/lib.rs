//! Usage analytics of nexus-usage: a user's live figures ([`CurrentUsage`]), history,
//! endpoint statistics and overage ([`UsageReports`]), the daily aggregation
//! ([`DailyAggregation`]) and the admin figures ([`admin::AdminReports`]).
#![warn(missing_docs)]

pub mod admin;
pub mod daily;
pub mod events;
pub mod reports;
pub mod retention;

pub use daily::{AggregationReport, DailyAggregation};
pub use reports::{AnalyticsError, UsageReports};

use serde::Serialize;
use time::OffsetDateTime;
use usage_core::{BillingPeriod, Cents, Plan, PlanCatalog, UserId};

/// A user's figures for the current period, as `GET /api/usage/current` answers them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CurrentUsage {
    /// Whose.
    pub user_id: UserId,
    /// Current plan.
    pub plan: Plan,
    /// First instant of the period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    /// First instant after the period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    /// Admitted calls this period.
    pub api_calls: u64,
    /// Calls included per period; `None` (null) for unlimited.
    pub limit: Option<u64>,
    /// Included calls left, never negative; `None` (null) for unlimited.
    pub remaining: Option<u64>,
    /// Calls past the limit.
    pub overage_calls: u64,
    /// `api_calls` as a percentage of `limit` (0 for unlimited).
    pub usage_percentage: f64,
    /// Price of the overage, in cents.
    pub overage_cost_cents: Cents,
}

impl CurrentUsage {
    /// The figures for `api_calls` admitted calls of a `plan` user in `period`.
    ///
    /// ```
    /// # use time::macros::datetime;
    /// use usage_core::{BillingPeriod, Plan, PlanCatalog, UserId, Cents};
    /// let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
    /// let now = usage_analytics::CurrentUsage::compute(
    ///     UserId::generate(), Plan::Pro, period, 105_000, &PlanCatalog::default());
    /// assert_eq!((now.remaining, now.overage_calls), (Some(0), 5_000));
    /// assert_eq!(now.usage_percentage, 105.0);
    /// assert_eq!(now.overage_cost_cents, Cents(500));
    /// ```
    pub fn compute(
        user_id: UserId,
        plan: Plan,
        period: BillingPeriod,
        api_calls: u64,
        catalog: &PlanCatalog,
    ) -> Self {
        let limit = catalog.terms(plan).monthly_calls;
        let overage_calls = catalog.overage_calls(plan, api_calls);
        Self {
            user_id,
            plan,
            period_start: period.start(),
            period_end: period.end(),
            api_calls,
            limit,
            remaining: limit.map(|l| l.saturating_sub(api_calls)),
            overage_calls,
            // Rounded to two decimals for display; exact figures are the counts.
            usage_percentage: limit.filter(|l| *l > 0).map_or(0.0, |l| {
                (api_calls as f64 * 10_000.0 / l as f64).round() / 100.0
            }),
            overage_cost_cents: catalog.overage_price.total_in_cents(overage_calls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn enterprise_has_no_limit_and_free_never_goes_negative() {
        let catalog = PlanCatalog::default();
        let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
        let ent = CurrentUsage::compute(UserId::generate(), Plan::Enterprise, period, 5, &catalog);
        assert_eq!(
            (ent.limit, ent.remaining, ent.usage_percentage),
            (None, None, 0.0)
        );
        let json = serde_json::to_value(&ent).unwrap();
        assert_eq!(json["period_start"], "2026-11-01T00:00:00Z");
        assert_eq!(json["period_end"], "2026-12-01T00:00:00Z");
        assert!(json["limit"].is_null() && json["remaining"].is_null());
        assert_eq!(json["overage_cost_cents"], 0);
        assert_eq!(json["plan"], "enterprise");

        let free = CurrentUsage::compute(UserId::generate(), Plan::Free, period, 1_200, &catalog);
        assert_eq!((free.remaining, free.overage_calls), (Some(0), 0));
        assert_eq!(free.usage_percentage, 120.0);
        let third = CurrentUsage::compute(
            UserId::generate(),
            Plan::Free,
            period,
            1,
            &PlanCatalog {
                free: usage_core::PlanTerms {
                    monthly_calls: Some(3),
                    ..catalog.free
                },
                ..catalog.clone()
            },
        );
        assert_eq!(third.usage_percentage, 33.33);
    }
}
