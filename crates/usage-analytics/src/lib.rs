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
use usage_core::catalog::{API_CALLS, PlanDefinition};
use usage_core::{BillingPeriod, Cents, OverLimit, Plan, UserId};

/// A user's figures for the current period, as `GET /api/usage/current` answers them: the
/// top-level fields describe API calls; `meters` has one entry per metered unit.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CurrentUsage {
    /// Whose.
    pub user_id: UserId,
    /// Current plan.
    pub plan: Plan,
    /// The version of the plan whose terms apply now.
    pub plan_version: u32,
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
    /// Every meter the user's terms limit or the user used this period.
    pub meters: Vec<MeterUsage>,
}

/// One meter in [`CurrentUsage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeterUsage {
    /// The meter's key.
    pub meter: String,
    /// Its name for people.
    pub name: String,
    /// What one unit is.
    pub unit: String,
    /// Units this period.
    pub used: u64,
    /// Units included per period; null for unlimited.
    pub included: Option<u64>,
    /// Included units left, never negative; null for unlimited.
    pub remaining: Option<u64>,
    /// What happens past `included`.
    pub over_limit: OverLimit,
    /// Billed units past `included`.
    pub overage_units: u64,
    /// Their price so far, in cents.
    pub overage_cost_cents: i64,
}

impl CurrentUsage {
    /// The figures for `api_calls` admitted calls of a user whose effective `terms` (the
    /// plan version held, with the user's own terms over it) apply in `period`.
    ///
    /// ```
    /// # use time::macros::datetime;
    /// use usage_core::catalog::PlanDefinition;
    /// use usage_core::rate::PlanRateLimits;
    /// use usage_core::{BillingPeriod, Cents, Plan, PlanCatalog, UserId};
    /// let pro = PlanDefinition::builtin(
    ///     &Plan::pro(), &PlanCatalog::default(), &PlanRateLimits::default(), None).unwrap();
    /// let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
    /// let now = usage_analytics::CurrentUsage::compute(UserId::generate(), &pro, period, 105_000);
    /// assert_eq!((now.remaining, now.overage_calls), (Some(0), 5_000));
    /// assert_eq!(now.usage_percentage, 105.0);
    /// assert_eq!(now.overage_cost_cents, Cents(500));
    /// ```
    pub fn compute(
        user_id: UserId,
        terms: &PlanDefinition,
        period: BillingPeriod,
        api_calls: u64,
    ) -> Self {
        let line = terms.calls_line(api_calls);
        let limit = line.included;
        let over_limit = terms
            .limit(API_CALLS)
            .map_or(OverLimit::Overage, |l| l.over_limit);
        Self {
            user_id,
            plan: Plan::from_stored(terms.key.as_str()),
            plan_version: terms.version,
            period_start: period.start(),
            period_end: period.end(),
            api_calls,
            limit,
            remaining: limit.map(|l| l.saturating_sub(api_calls)),
            overage_calls: line.overage_units,
            // Rounded to two decimals for display; exact figures are the counts.
            usage_percentage: limit.filter(|l| *l > 0).map_or(0.0, |l| {
                (api_calls as f64 * 10_000.0 / l as f64).round() / 100.0
            }),
            overage_cost_cents: Cents(line.amount_cents),
            meters: vec![MeterUsage {
                meter: API_CALLS.to_owned(),
                name: "API calls".to_owned(),
                unit: "call".to_owned(),
                used: api_calls,
                included: limit,
                remaining: limit.map(|l| l.saturating_sub(api_calls)),
                over_limit,
                overage_units: line.overage_units,
                overage_cost_cents: line.amount_cents,
            }],
        }
    }
}

impl CurrentUsage {
    /// These figures with a line for each other meter the terms limit or the user used
    /// this period (`used`: the period's quantities by meter), by meter key after
    /// `api_calls`; names and units from `meters`.
    pub fn with_meters(
        mut self,
        terms: &PlanDefinition,
        used: &[(String, u64)],
        meters: &usage_core::meter::Meters,
    ) -> Self {
        if let Some(api_calls) = meters.get(API_CALLS) {
            self.meters[0].name = api_calls.name.clone();
            self.meters[0].unit = api_calls.unit.clone();
        }
        let mut keys: std::collections::BTreeSet<&str> = used
            .iter()
            .map(|(m, _)| m.as_str())
            .chain(terms.limits.iter().map(|l| l.meter.as_str()))
            .collect();
        keys.remove(API_CALLS);
        for key in keys {
            let quantity = used.iter().find(|(m, _)| m == key).map_or(0, |(_, q)| *q);
            let limit = terms.limit(key);
            let line = limit.map_or_else(
                || usage_core::catalog::QuoteLine::unlimited(key, quantity),
                |l| l.quote(quantity),
            );
            let meter = meters.get(key);
            self.meters.push(MeterUsage {
                meter: key.to_owned(),
                name: meter.map_or_else(|| key.to_owned(), |m| m.name.clone()),
                unit: meter.map_or_else(String::new, |m| m.unit.clone()),
                used: quantity,
                included: line.included,
                remaining: line.included.map(|i| i.saturating_sub(quantity)),
                over_limit: limit.map_or(OverLimit::Overage, |l| l.over_limit),
                overage_units: line.overage_units,
                overage_cost_cents: line.amount_cents,
            });
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use usage_core::PlanCatalog;
    use usage_core::rate::PlanRateLimits;

    fn builtin(plan: Plan, catalog: &PlanCatalog) -> PlanDefinition {
        PlanDefinition::builtin(&plan, catalog, &PlanRateLimits::default(), None).unwrap()
    }

    #[test]
    fn enterprise_has_no_limit_and_free_never_goes_negative() {
        let catalog = PlanCatalog::default();
        let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
        let ent = CurrentUsage::compute(
            UserId::generate(),
            &builtin(Plan::enterprise(), &catalog),
            period,
            5,
        );
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
        assert_eq!(json["plan_version"], 1);
        assert_eq!(json["meters"][0]["meter"], "api_calls");
        assert_eq!(json["meters"][0]["used"], 5);
        assert!(json["meters"][0]["included"].is_null());

        let free = builtin(Plan::free(), &catalog);
        let free_now = CurrentUsage::compute(UserId::generate(), &free, period, 1_200);
        assert_eq!((free_now.remaining, free_now.overage_calls), (Some(0), 0));
        assert_eq!(free_now.usage_percentage, 120.0);
        assert_eq!(free_now.meters[0].over_limit, OverLimit::Block);
        let mut three = free.clone();
        three.limits[0].included = Some(3);
        let third = CurrentUsage::compute(UserId::generate(), &three, period, 1);
        assert_eq!(third.usage_percentage, 33.33);
    }

    #[test]
    fn a_graduated_plan_prices_its_overage_by_tier() {
        // Growth: 250,000 included; overage 800 µ$ up to 750,000 units, 500 µ$ after.
        let growth: PlanDefinition = serde_json::from_value(serde_json::json!({
            "key": "growth", "name": "Growth", "price_cents": 9900,
            "limits": [{"meter": "api_calls", "included": 250000, "over_limit": "overage",
                "overage": {"model": "graduated", "tiers": [
                    {"up_to": 750000, "unit_price_micros": 800},
                    {"up_to": null, "unit_price_micros": 500}]}}]
        }))
        .unwrap();
        let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
        // 1,100,000 calls: 850,000 overage = 750,000 × 800 µ$ + 100,000 × 500 µ$
        // = 600,000,000 + 50,000,000 µ$ = $650.00.
        let now = CurrentUsage::compute(UserId::generate(), &growth, period, 1_100_000);
        assert_eq!(now.overage_calls, 850_000);
        assert_eq!(now.overage_cost_cents, Cents(65_000));
        assert_eq!(now.plan, "growth");
        assert_eq!(now.meters[0].overage_cost_cents, 65_000);
    }

    #[test]
    fn other_meters_get_a_line_each_limited_or_used() {
        use usage_core::meter::{Aggregation, Meter, Meters};
        let terms: PlanDefinition = serde_json::from_value(serde_json::json!({
            "key": "ai", "name": "AI", "price_cents": 0,
            "limits": [{"meter": "api_calls", "included": 1000, "over_limit": "block"},
                       {"meter": "tokens", "included": 5000, "over_limit": "block"},
                       {"meter": "credits", "included": 100, "over_limit": "overage",
                        "overage": {"model": "per_unit", "unit_price_micros": 10000}}]
        }))
        .unwrap();
        let meter = |key: &str, unit: &str| Meter {
            key: key.into(),
            name: key.to_uppercase(),
            unit: unit.into(),
            aggregation: Aggregation::Sum,
        };
        let meters = Meters::new([
            meter("tokens", "token"),
            meter("credits", "credit"),
            meter("bytes", "byte"),
        ]);
        let period = BillingPeriod::containing(datetime!(2026-11-22 10:00 UTC));
        let used = vec![
            ("bytes".to_owned(), 7),
            ("credits".to_owned(), 250),
            ("tokens".to_owned(), 6_000),
        ];
        let now = CurrentUsage::compute(UserId::generate(), &terms, period, 10)
            .with_meters(&terms, &used, &meters);
        type Line<'a> = (&'a str, u64, Option<u64>, Option<u64>, u64, i64);
        let lines: Vec<Line> = now
            .meters
            .iter()
            .map(|m| {
                (
                    m.meter.as_str(),
                    m.used,
                    m.included,
                    m.remaining,
                    m.overage_units,
                    m.overage_cost_cents,
                )
            })
            .collect();
        // credits: 150 past 100 at 10,000 µ$ = 1,500,000 µ$ = 150 ¢; tokens block: none billed.
        assert_eq!(
            lines,
            vec![
                ("api_calls", 10, Some(1000), Some(990), 0, 0),
                ("bytes", 7, None, None, 0, 0),
                ("credits", 250, Some(100), Some(0), 150, 150),
                ("tokens", 6_000, Some(5_000), Some(0), 0, 0),
            ]
        );
        assert_eq!(
            (now.meters[3].name.as_str(), now.meters[3].unit.as_str()),
            ("TOKENS", "token")
        );
        assert_eq!(now.meters[3].over_limit, OverLimit::Block);
    }
}
