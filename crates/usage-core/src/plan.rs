//! Plans and their configurable terms.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Cents, DomainError, MicroUsd};

/// The key of a plan in the catalog (`free`, `pro`, `growth`): `[a-z0-9_-]{1,40}`. The
/// catalog holds its terms; `free`, `pro` and `enterprise` are built in (made from the plan
/// variables on first start) but otherwise plans like any other.
// Shared text: a clone (one per admitted call, on the hot path) copies a pointer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Plan(Arc<str>);

// Written out rather than derived: the derive cannot give a newtype's text its pattern, and
// without it a client (or a fuzzer) cannot tell a key from any string.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Plan {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("A plan key in the catalog."))
            .pattern(Some(Plan::KEY_PATTERN))
            .examples(["pro"])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Plan {}

impl Plan {
    /// What a key matches, as a regular expression (the OpenAPI document's pattern).
    pub const KEY_PATTERN: &'static str = "^[a-z0-9_-]{1,40}$";

    /// The keys of the built-in plans, in price order.
    pub const BUILTIN: [&'static str; 3] = ["free", "pro", "enterprise"];

    /// The built-in free plan.
    pub fn free() -> Self {
        Self("free".into())
    }

    /// The built-in pro plan.
    pub fn pro() -> Self {
        Self("pro".into())
    }

    /// The built-in enterprise plan.
    pub fn enterprise() -> Self {
        Self("enterprise".into())
    }

    /// The built-in plans, in price order.
    pub fn builtin() -> [Plan; 3] {
        [Plan::free(), Plan::pro(), Plan::enterprise()]
    }

    /// Checks the form of a key given by a person or a client (not that a plan has it).
    pub fn parse(key: &str) -> Result<Self, DomainError> {
        if is_valid_key(key) {
            Ok(Self(key.into()))
        } else {
            Err(DomainError::InvalidPlanKey(key.to_owned()))
        }
    }

    /// Wraps a key read back from a store, which only ever holds valid keys.
    pub fn from_stored(key: impl Into<Arc<str>>) -> Self {
        Self(key.into())
    }

    /// The key as stored and shown.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Plan {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Plan::parse(s)
    }
}

impl TryFrom<String> for Plan {
    type Error = DomainError;

    fn try_from(key: String) -> Result<Self, Self::Error> {
        Plan::parse(&key)
    }
}

impl From<Plan> for String {
    fn from(plan: Plan) -> Self {
        plan.0.to_string()
    }
}

impl PartialEq<str> for Plan {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Plan {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// Whether `key` is a well-formed plan or meter key: `[a-z0-9_-]{1,40}`.
pub fn is_valid_key(key: &str) -> bool {
    (1..=40).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
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
    /// The terms of `plan` when it is a built-in plan.
    pub fn terms(&self, plan: &Plan) -> Option<&PlanTerms> {
        match plan.as_str() {
            "free" => Some(&self.free),
            "pro" => Some(&self.pro),
            "enterprise" => Some(&self.enterprise),
            _ => None,
        }
    }

    /// Billable calls past the plan's limit among `api_calls`: 0 for an unlimited plan,
    /// and for a blocking plan (calls past its limit are refused, never billed).
    pub fn overage_calls(&self, plan: &Plan, api_calls: u64) -> u64 {
        self.included_calls_if_billed(plan)
            .map_or(0, |limit| api_calls.saturating_sub(limit))
    }

    /// The limit past which calls are billed as overage, for plans that have one.
    pub fn included_calls_if_billed(&self, plan: &Plan) -> Option<u64> {
        let terms = self.terms(plan)?;
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
    fn plan_keys_round_trip_and_malformed_keys_are_rejected() {
        for plan in Plan::builtin() {
            assert_eq!(plan.as_str().parse::<Plan>(), Ok(plan.clone()));
            assert_eq!(plan.to_string(), plan.as_str());
        }
        assert_eq!(format!("{}", Plan::enterprise()), "enterprise");
        assert_eq!("growth".parse::<Plan>().unwrap(), "growth");
        let err = "Gold".parse::<Plan>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "plan must be a plan key: 1 to 40 of a-z, 0-9, _ and - (got \"Gold\")"
        );
        assert!("".parse::<Plan>().is_err());
        assert!(serde_json::from_str::<Plan>("\"a b\"").is_err());
        assert_eq!(serde_json::to_string(&Plan::pro()).unwrap(), "\"pro\"");
    }

    #[test]
    fn overage_counts_only_calls_past_the_limit() {
        let catalog = PlanCatalog::default();
        assert_eq!(catalog.overage_calls(&Plan::pro(), 99_999), 0);
        assert_eq!(catalog.overage_calls(&Plan::pro(), 105_000), 5_000);
        assert_eq!(catalog.overage_calls(&Plan::enterprise(), u64::MAX), 0);
        assert_eq!(
            catalog.overage_calls(&Plan::free(), 1_200),
            0,
            "free is blocked, never billed"
        );
    }
}
