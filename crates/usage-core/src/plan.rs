//! Plans and their configurable terms.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Cents, DomainError, MicroUsd};

/// A subscription plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// Blocked at its monthly limit.
    Free,
    /// Goes on past its monthly limit; each extra call is billed as overage.
    Pro,
    /// Never limited.
    Enterprise,
}

impl Plan {
    /// Every plan, in price order.
    pub const ALL: [Plan; 3] = [Plan::Free, Plan::Pro, Plan::Enterprise];

    /// The plan's name as stored and shown (`free`, `pro`, `enterprise`).
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Plan {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Plan::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| DomainError::UnknownPlan(s.to_owned()))
    }
}

/// What happens to calls past a plan's monthly limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OverLimit {
    /// Rejected with 429; not counted.
    Block,
    /// Admitted and counted as overage.
    Overage,
}

/// The terms of one plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanTerms {
    /// Calls included per billing period; `None` is unlimited.
    pub monthly_calls: Option<u64>,
    /// Monthly subscription price.
    pub price: Cents,
    /// What happens past `monthly_calls`.
    pub over_limit: OverLimit,
}

/// The terms of every plan and the overage price, read once from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanCatalog {
    /// Terms of the free plan.
    pub free: PlanTerms,
    /// Terms of the pro plan.
    pub pro: PlanTerms,
    /// Terms of the enterprise plan.
    pub enterprise: PlanTerms,
    /// Price of one overage call.
    pub overage_price: MicroUsd,
}

impl Default for PlanCatalog {
    /// The contract's defaults: free 1,000 calls blocked, pro 100,000 calls at $49 with
    /// overage, enterprise unlimited at $500, overage $0.001 a call.
    fn default() -> Self {
        Self {
            free: PlanTerms {
                monthly_calls: Some(1_000),
                price: Cents(0),
                over_limit: OverLimit::Block,
            },
            pro: PlanTerms {
                monthly_calls: Some(100_000),
                price: Cents(4_900),
                over_limit: OverLimit::Overage,
            },
            enterprise: PlanTerms {
                monthly_calls: None,
                price: Cents(50_000),
                over_limit: OverLimit::Overage,
            },
            overage_price: MicroUsd(1_000),
        }
    }
}

impl PlanCatalog {
    /// The terms of `plan`.
    pub fn terms(&self, plan: Plan) -> &PlanTerms {
        match plan {
            Plan::Free => &self.free,
            Plan::Pro => &self.pro,
            Plan::Enterprise => &self.enterprise,
        }
    }

    /// Billable calls past the plan's limit among `api_calls`: 0 for an unlimited plan,
    /// and for a blocking plan (calls past its limit are refused, never billed).
    pub fn overage_calls(&self, plan: Plan, api_calls: u64) -> u64 {
        self.included_calls_if_billed(plan)
            .map_or(0, |limit| api_calls.saturating_sub(limit))
    }

    /// The limit past which calls are billed as overage, for plans that have one.
    pub fn included_calls_if_billed(&self, plan: Plan) -> Option<u64> {
        let terms = self.terms(plan);
        match terms.over_limit {
            OverLimit::Overage => terms.monthly_calls,
            OverLimit::Block => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_names_round_trip_and_unknown_names_are_rejected() {
        for plan in Plan::ALL {
            assert_eq!(plan.as_str().parse::<Plan>(), Ok(plan));
            assert_eq!(plan.to_string(), plan.as_str());
        }
        assert_eq!(format!("{}", Plan::Enterprise), "enterprise");
        let err = "gold".parse::<Plan>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "plan must be one of free, pro, enterprise (got \"gold\")"
        );
        assert!("Pro".parse::<Plan>().is_err());
    }

    #[test]
    fn overage_counts_only_calls_past_the_limit() {
        let catalog = PlanCatalog::default();
        assert_eq!(catalog.overage_calls(Plan::Pro, 99_999), 0);
        assert_eq!(catalog.overage_calls(Plan::Pro, 105_000), 5_000);
        assert_eq!(catalog.overage_calls(Plan::Enterprise, u64::MAX), 0);
        assert_eq!(
            catalog.overage_calls(Plan::Free, 1_200),
            0,
            "free is blocked, never billed"
        );
    }
}
