//! Plans as data: a plan's terms as operators write them (API, catalog file, dashboard),
//! read from JSON with the path of what does not fit, their validation, a customer's own
//! terms over them ([`Overrides`]), the built-in plans made from the plan variables, and
//! the quote of a period's usage under a plan.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::MicroUsd;
pub use crate::error::CatalogError;
use crate::meter::Meters;
pub use crate::plan::is_valid_key;
use crate::plan::{OverLimit, Plan, PlanCatalog};
pub use crate::pricing::MAX_UNITS;
use crate::pricing::{OverageModel, PriceLine};
use crate::rate::{PlanRateLimits, RateLimit};

pub use crate::meter::API_CALLS;

/// A plan key no plan may take: `total` names the sum beside the per-plan counts.
const RESERVED_KEYS: [&str; 1] = ["total"];

/// Usage alerts a limit has when none are given: 80% and 100% of its included units.
pub const DEFAULT_ALERTS: [u32; 2] = [80, 100];

/// One version of a plan: what subscribers pay and what they may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanDefinition {
    /// `[a-z0-9_-]{1,40}`, never changes; what users' `plan` fields hold.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_-]{1,40}$"))]
    pub key: String,
    /// The name shown to customers.
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 100,
            pattern = "^[^\\u0000-\\u001F\\u007F]+$"
        )
    )]
    pub name: String,
    /// 1 for a new plan; each edit makes the next.
    #[serde(default = "first_version")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, read_only))]
    pub version: u32,
    /// The monthly subscription price (billed by Stripe's subscription, not by us).
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub price_cents: i64,
    /// ISO 4217 code, lower case.
    #[serde(default = "usd")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z]{3}$"))]
    pub currency: String,
    /// The Stripe price that sells this plan; subscription events map it back.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_]{1,255}$"))]
    pub stripe_price_id: Option<String>,
    /// Offered to customers (upgrade suggestions name public plans only).
    #[serde(default = "yes")]
    pub public: bool,
    /// Takes no new subscribers; its users keep it.
    #[serde(default)]
    pub archived: bool,
    /// The short-window limit; `None` is none.
    #[serde(default)]
    pub burst: Option<RateLimit>,
    /// One entry per limited meter; a meter without one is recorded, not limited.
    #[serde(default)]
    pub limits: Vec<MeterLimit>,
}

/// A catalog file (`plans apply`, `plans export`): the meters, plans and route costs an
/// operator keeps in git.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    /// The meters, each as the admin API takes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meters: Vec<crate::meter::Meter>,
    /// The plans, each as the admin API takes it.
    #[serde(default)]
    pub plans: Vec<PlanDefinition>,
    /// Every route cost; left out, the stored ones stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub costs: Option<Vec<crate::meter::RouteCost>>,
}

/// A plan's limit on one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeterLimit {
    /// The meter's key (`api_calls`, or one the operator defined).
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_-]{1,40}$"))]
    pub meter: String,
    /// Units included per billing period; `None` is unlimited.
    #[cfg_attr(feature = "openapi", schema(maximum = 9007199254740991_i64))]
    pub included: Option<u64>,
    /// What happens past `included`.
    pub over_limit: OverLimit,
    /// Percentages of `included` at which the customer is alerted.
    #[serde(default = "default_alerts")]
    pub alerts: Vec<u32>,
    /// How units past `included` are priced (`overage` limits only).
    #[serde(default)]
    pub overage: Option<OverageModel>,
}

fn first_version() -> u32 {
    1
}

fn usd() -> String {
    "usd".to_owned()
}

fn yes() -> bool {
    true
}

fn default_alerts() -> Vec<u32> {
    DEFAULT_ALERTS.to_vec()
}

/// How the users on earlier versions of a plan move to a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PlanMove {
    /// At the start of their next billing period (the default).
    #[default]
    NextPeriod,
    /// At once.
    Now,
    /// Never: they keep the terms they have.
    Keep,
}

impl PlanMove {
    /// Every way, as the API names them.
    pub const ALL: [PlanMove; 3] = [PlanMove::NextPeriod, PlanMove::Now, PlanMove::Keep];

    /// The name as stored and shown (`next_period`, `now`, `keep`).
    pub fn as_str(self) -> &'static str {
        match self {
            PlanMove::NextPeriod => "next_period",
            PlanMove::Now => "now",
            PlanMove::Keep => "keep",
        }
    }

    /// The way named `name`.
    pub fn parse(name: &str) -> Result<Self, CatalogError> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == name)
            .ok_or_else(|| {
                CatalogError::new(
                    "existing",
                    format!("must be one of next_period, now, keep (got {name:?})"),
                )
            })
    }
}

/// Reads `T` (a plan, overrides, a quote's usage) from JSON text: a value that does not
/// fit is refused naming its path (`limits[0].included`), text that is not JSON as `body`.
/// The text must be a JSON object: serde would read a struct from an array too, by
/// position (`[null]` would be a plan of defaults).
pub fn from_json<T: serde::de::DeserializeOwned>(text: &[u8]) -> Result<T, CatalogError> {
    if let Some(first) = text.iter().find(|b| !b.is_ascii_whitespace())
        && *first != b'{'
    {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(text) {
                Ok(_) => CatalogError::new("body", "must be a JSON object"),
                Err(e) => CatalogError::new("body", format!("is not valid JSON: {e}")),
            },
        );
    }
    let mut json = serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            CatalogError::new("body", format!("is not valid JSON: {inner}"))
        } else if path == "." || path == "?" {
            CatalogError::new("body", format!("does not fit: {inner}"))
        } else {
            CatalogError::new(path, format!("does not fit: {inner}"))
        }
    })
}

/// A new version's terms for plan `key`, from the JSON object a revision takes: the plan's
/// fields (`key` may be left out, or be `key`; `version` and `archived` are not read) and
/// `existing`, how users of earlier versions move (`None`: not given).
pub fn revision_from_json(
    key: &str,
    text: &[u8],
) -> Result<(PlanDefinition, Option<PlanMove>), CatalogError> {
    use serde_json::Value;
    let mut terms: serde_json::Map<String, Value> = from_json(text)?;
    let existing = match terms.remove("existing") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(PlanMove::parse(&name)?),
        Some(other) => {
            return Err(CatalogError::new(
                "existing",
                format!("must be one of next_period, now, keep (got {other})"),
            ));
        }
    };
    match terms.remove("key") {
        None => {}
        Some(Value::String(given)) if given == key => {}
        Some(other) => {
            return Err(CatalogError::new(
                "key",
                format!("never changes: leave it out, or give {key:?} (got {other})"),
            ));
        }
    }
    terms.remove("version");
    terms.remove("archived");
    terms.insert("key".to_owned(), Value::String(key.to_owned()));
    let text = serde_json::to_vec(&Value::Object(terms))
        .map_err(|e| CatalogError::new("body", e.to_string()))?;
    Ok((from_json(&text)?, existing))
}

impl PlanDefinition {
    /// Checks every field; `meters` are the meters a limit may name.
    pub fn validate(&self, meters: &Meters) -> Result<(), CatalogError> {
        if !is_valid_key(&self.key) || RESERVED_KEYS.contains(&self.key.as_str()) {
            return Err(CatalogError::new(
                "key",
                format!(
                    "must be 1 to 40 of a-z, 0-9, _ and -, and not \"total\" (got {:?})",
                    self.key
                ),
            ));
        }
        crate::meter::check_text("name", &self.name, 100)?;
        if self.price_cents < 0 {
            return Err(CatalogError::new(
                "price_cents",
                format!("must be 0 or more (got {})", self.price_cents),
            ));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(CatalogError::new(
                "currency",
                format!(
                    "must be an ISO 4217 code in lower case, like \"usd\" (got {:?})",
                    self.currency
                ),
            ));
        }
        if let Some(price) = &self.stripe_price_id {
            let well_formed = (1..=255).contains(&price.len())
                && price
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !well_formed {
                return Err(CatalogError::new(
                    "stripe_price_id",
                    format!("must be a Stripe price id like \"price_1AbC\" (got {price:?})"),
                ));
            }
        }
        if let Some(burst) = self.burst
            && (burst.per_second == 0 || burst.burst == 0)
        {
            return Err(CatalogError::new(
                "burst",
                "per_second and burst must be 1 or more (or burst null: no short-window limit)",
            ));
        }
        for (i, limit) in self.limits.iter().enumerate() {
            let at = format!("limits[{i}]");
            let meter = meters.require(&format!("{at}.meter"), &limit.meter)?;
            if limit.over_limit == OverLimit::Block && !meter.aggregation.may_block() {
                return Err(CatalogError::new(
                    format!("{at}.over_limit"),
                    format!(
                        "must be overage: {:?} is a {} meter, which a limit cannot block on",
                        meter.key,
                        meter.aggregation.as_str()
                    ),
                ));
            }
            if self.limits[..i].iter().any(|l| l.meter == limit.meter) {
                return Err(CatalogError::new(
                    format!("{at}.meter"),
                    format!("{:?} has a limit already: one entry a meter", limit.meter),
                ));
            }
            limit.validate(&at)?;
        }
        Ok(())
    }

    /// The limit on `meter`, if the plan has one.
    pub fn limit(&self, meter: &str) -> Option<&MeterLimit> {
        self.limits.iter().find(|l| l.meter == meter)
    }

    /// The fields the plan variables set (`price_cents`, `stripe_price_id`, `burst`, and
    /// `api_calls`' `included` and `overage`) that differ between this plan and `builtin`,
    /// as [`PlanDefinition::builtin`] makes it: what to warn an operator of whose
    /// variables no longer describe the catalog.
    pub fn variable_differences(&self, builtin: &PlanDefinition) -> Vec<&'static str> {
        let calls = |p: &PlanDefinition| {
            p.limit(API_CALLS)
                .map(|l| (l.included, l.over_limit, l.overage.clone()))
        };
        let (mine, theirs) = (calls(self), calls(builtin));
        [
            ("price_cents", self.price_cents != builtin.price_cents),
            (
                "stripe_price_id",
                self.stripe_price_id != builtin.stripe_price_id,
            ),
            ("burst", self.burst != builtin.burst),
            (
                "included",
                mine.as_ref().map(|c| c.0) != theirs.as_ref().map(|c| c.0),
            ),
            (
                "overage",
                mine.map(|c| (c.1, c.2)) != theirs.map(|c| (c.1, c.2)),
            ),
        ]
        .into_iter()
        .filter_map(|(field, differs)| differs.then_some(field))
        .collect()
    }

    /// A built-in plan (`free`, `pro`, `enterprise`) as the plan variables define it: the
    /// catalog a new installation starts with, so that an upgrade changes nothing. `None`
    /// for any other key.
    pub fn builtin(
        plan: &Plan,
        catalog: &PlanCatalog,
        rates: &PlanRateLimits,
        stripe_price_id: Option<String>,
    ) -> Option<Self> {
        let terms = catalog.terms(plan)?;
        let billed = terms.over_limit == OverLimit::Overage && terms.monthly_calls.is_some();
        let name = match plan.as_str() {
            "free" => "Free",
            "pro" => "Pro",
            _ => "Enterprise",
        };
        Some(Self {
            key: plan.as_str().to_owned(),
            name: name.to_owned(),
            version: 1,
            price_cents: terms.price.0,
            currency: usd(),
            stripe_price_id,
            public: true,
            archived: false,
            burst: rates.of(plan),
            limits: vec![MeterLimit {
                meter: API_CALLS.to_owned(),
                included: terms.monthly_calls,
                over_limit: terms.over_limit,
                alerts: default_alerts(),
                overage: billed.then_some(OverageModel::PerUnit {
                    unit_price_micros: catalog.overage_price.0,
                }),
            }],
        })
    }

    /// What a period with `usage` (units by meter) costs under this plan, line by line:
    /// one line a limited meter, and one for each other meter used.
    pub fn quote(&self, usage: &BTreeMap<String, u64>) -> Quote {
        let mut lines: Vec<QuoteLine> = self
            .limits
            .iter()
            .map(|limit| limit.quote(usage.get(&limit.meter).copied().unwrap_or(0)))
            .collect();
        for (meter, &used) in usage {
            if self.limit(meter).is_none() {
                lines.push(QuoteLine::unlimited(meter, used));
            }
        }
        let overage_cents = lines
            .iter()
            .fold(0i64, |sum, l| sum.saturating_add(l.amount_cents));
        Quote {
            plan: self.key.clone(),
            version: self.version,
            subscription_cents: self.price_cents,
            overage_cents,
            total_cents: self.price_cents.saturating_add(overage_cents),
            lines,
        }
    }
}

impl PlanDefinition {
    /// What `used` API calls cost under this plan: the `api_calls` line of a quote (an
    /// unlimited line when the plan does not limit calls).
    pub fn calls_line(&self, used: u64) -> QuoteLine {
        self.limit(API_CALLS)
            .map_or_else(|| QuoteLine::unlimited(API_CALLS, used), |l| l.quote(used))
    }
}

impl MeterLimit {
    fn validate(&self, at: &str) -> Result<(), CatalogError> {
        if let Some(included) = self.included
            && included > MAX_UNITS
        {
            return Err(CatalogError::new(
                format!("{at}.included"),
                format!("must be at most {MAX_UNITS}, or null for unlimited (got {included})"),
            ));
        }
        let mut below = 0;
        for (i, &alert) in self.alerts.iter().enumerate() {
            if alert <= below || alert > 1_000 {
                return Err(CatalogError::new(
                    format!("{at}.alerts[{i}]"),
                    format!(
                        "must be a percentage of the included units from {} to 1000, \
                         each greater than the one before (got {alert})",
                        below + 1
                    ),
                ));
            }
            below = alert;
        }
        match (&self.over_limit, &self.overage) {
            (OverLimit::Block, Some(_)) => Err(CatalogError::new(
                format!("{at}.overage"),
                "must be absent on a \"block\" limit: nothing past it is admitted",
            )),
            (OverLimit::Overage, None) if self.included.is_some() => Err(CatalogError::new(
                format!("{at}.overage"),
                "is required on an \"overage\" limit with included units: how units past them are priced",
            )),
            (_, Some(model)) => model.validate(&format!("{at}.overage")),
            _ => Ok(()),
        }
    }

    /// Units past `included` that are billed: none for a `block` limit (calls past it
    /// are refused) or an unlimited one.
    pub fn overage_units(&self, used: u64) -> u64 {
        match (self.over_limit, self.included) {
            (OverLimit::Overage, Some(included)) => used.saturating_sub(included),
            _ => 0,
        }
    }

    /// What `used` units cost past this limit.
    pub fn quote(&self, used: u64) -> QuoteLine {
        let overage_units = self.overage_units(used);
        let price = self
            .overage
            .as_ref()
            .map(|model| model.price(overage_units))
            .unwrap_or_default();
        QuoteLine {
            meter: self.meter.clone(),
            used,
            included: self.included,
            overage_units,
            amount_micros: price.amount_micros,
            amount_cents: MicroUsd(price.amount_micros).in_cents().0,
            tiers: price.lines,
        }
    }
}

/// What a period's usage costs under a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quote {
    /// The plan's key.
    pub plan: String,
    /// The version quoted.
    pub version: u32,
    /// The monthly price (Stripe's subscription bills it).
    pub subscription_cents: i64,
    /// One line a meter.
    pub lines: Vec<QuoteLine>,
    /// The sum of the lines' cents (each line an invoice item, rounded once).
    pub overage_cents: i64,
    /// `subscription_cents` plus `overage_cents`.
    pub total_cents: i64,
}

/// One meter's line of a [`Quote`]: one invoice item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuoteLine {
    /// The meter's key.
    pub meter: String,
    /// Units used in the period.
    pub used: u64,
    /// Units included; `None` is unlimited.
    pub included: Option<u64>,
    /// Units billed as overage.
    pub overage_units: u64,
    /// The overage's price in micro-dollars.
    pub amount_micros: i64,
    /// The same, rounded half-up to the cent.
    pub amount_cents: i64,
    /// How the price is made, a line a tier.
    pub tiers: Vec<PriceLine>,
}

impl QuoteLine {
    /// The line of a meter without a limit: everything used, nothing billed.
    pub fn unlimited(meter: &str, used: u64) -> Self {
        Self {
            meter: meter.to_owned(),
            used,
            included: None,
            overage_units: 0,
            amount_micros: 0,
            amount_cents: 0,
            tiers: Vec::new(),
        }
    }
}

/// A customer's own terms over their plan version: another price, and limit entries that
/// replace the plan's for their meters (or add one for a meter the plan leaves unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// The monthly price instead of the plan's.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub price_cents: Option<i64>,
    /// Limit entries replacing the plan's for the same meters.
    #[serde(default)]
    pub limits: Vec<MeterLimit>,
}

impl Overrides {
    /// Checks every field as a plan's are checked; `meters` are the meters a limit may name.
    pub fn validate(&self, meters: &Meters) -> Result<(), CatalogError> {
        if let Some(price) = self.price_cents
            && price < 0
        {
            return Err(CatalogError::new(
                "overrides.price_cents",
                format!("must be 0 or more (got {price})"),
            ));
        }
        // The limits are checked as a plan's would be, with the plan's rules and paths.
        let probe = PlanDefinition {
            key: "overrides".to_owned(),
            name: "overrides".to_owned(),
            version: 1,
            price_cents: 0,
            currency: "usd".to_owned(),
            stripe_price_id: None,
            public: false,
            archived: false,
            burst: None,
            limits: self.limits.clone(),
        };
        probe
            .validate(meters)
            .map_err(|e| CatalogError::new(format!("overrides.{}", e.field), e.message))
    }
}

impl PlanDefinition {
    /// This plan's terms with `overrides` applied: what the customer pays and may use.
    pub fn with_overrides(&self, overrides: Option<&Overrides>) -> PlanDefinition {
        let mut terms = self.clone();
        let Some(overrides) = overrides else {
            return terms;
        };
        if let Some(price) = overrides.price_cents {
            terms.price_cents = price;
        }
        for limit in &overrides.limits {
            match terms.limits.iter_mut().find(|l| l.meter == limit.meter) {
                Some(existing) => *existing = limit.clone(),
                None => terms.limits.push(limit.clone()),
            }
        }
        terms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's example plan.
    const GROWTH: &str = r#"{"key": "growth", "name": "Growth", "version": 3, "price_cents": 9900,
        "currency": "usd", "stripe_price_id": "price_123", "public": true, "archived": false,
        "burst": {"per_second": 50, "burst": 100},
        "limits": [
          {"meter": "api_calls", "included": 250000, "over_limit": "overage", "alerts": [80, 100],
           "overage": {"model": "graduated",
                       "tiers": [{"up_to": 750000, "unit_price_micros": 800},
                                 {"up_to": null, "unit_price_micros": 500}]}},
          {"meter": "tokens", "included": 5000000, "over_limit": "block", "alerts": [80, 100]}]}"#;

    fn growth() -> PlanDefinition {
        serde_json::from_str(GROWTH).unwrap()
    }

    fn meters() -> Meters {
        let meter = |key: &str, aggregation| crate::meter::Meter {
            key: key.into(),
            name: key.into(),
            unit: "unit".into(),
            aggregation,
        };
        Meters::new([
            meter("tokens", crate::meter::Aggregation::Sum),
            meter("peak_gb", crate::meter::Aggregation::Max),
        ])
    }

    #[test]
    fn the_contracts_example_is_a_valid_plan() {
        let plan = growth();
        assert_eq!(plan.validate(&meters()), Ok(()));
        assert_eq!(plan.version, 3);
        assert_eq!(
            plan.burst,
            Some(RateLimit {
                per_second: 50,
                burst: 100
            })
        );
        assert_eq!(plan.limit("tokens").unwrap().over_limit, OverLimit::Block);
        let minimal: PlanDefinition =
            serde_json::from_str(r#"{"key": "lite", "name": "Lite", "price_cents": 0}"#).unwrap();
        assert_eq!(minimal.version, 1);
        assert_eq!(minimal.currency, "usd");
        assert!(minimal.public && !minimal.archived);
        assert_eq!(minimal.burst, None);
        assert_eq!(minimal.validate(&meters()), Ok(()));
    }

    #[test]
    fn a_quote_bills_each_meter_as_one_item_rounded_once() {
        let plan = growth();
        // (api calls used, tokens used, overage cents), worked by hand:
        let cases = [
            // within the 250,000 included
            (250_000, 0, 0),
            // 750,000 overage × 800 µ$ = 600,000,000 µ$ = 60,000.00 ¢
            (1_000_000, 0, 60_000),
            // 750,007 overage: 600,000,000 + 7 × 500 = 600,003,500 µ$ = 60,000.35 ¢ → 60,000
            (1_000_007, 0, 60_000),
            // 750,010 overage: 600,000,000 + 10 × 500 = 600,005,000 µ$ = 60,000.5 ¢ → 60,001
            (1_000_010, 0, 60_001),
            // 1,000,001 overage: 600,000,000 + 250,001 × 500 = 725,000,500 µ$ → 72,500 ¢
            (1_250_001, 0, 72_500),
            // tokens past a block limit are never billed
            (0, 9_000_000, 0),
        ];
        for (calls, tokens, cents) in cases {
            let usage = BTreeMap::from([(API_CALLS.to_owned(), calls), ("tokens".into(), tokens)]);
            let quote = plan.quote(&usage);
            assert_eq!(quote.overage_cents, cents, "{calls} calls, {tokens} tokens");
            assert_eq!(quote.total_cents, 9_900 + cents);
            assert_eq!(quote.lines.len(), 2);
            assert_eq!(quote.lines[0].overage_units, calls.saturating_sub(250_000));
            assert_eq!(quote.lines[1].overage_units, 0);
        }
    }

    #[test]
    fn a_quote_has_a_line_for_a_meter_used_without_a_limit() {
        let mut plan = growth();
        plan.limits.truncate(1);
        let usage = BTreeMap::from([("tokens".to_owned(), 42)]);
        let quote = plan.quote(&usage);
        assert_eq!(quote.lines.len(), 2);
        assert_eq!(quote.lines[0].used, 0);
        assert_eq!(quote.lines[1].meter, "tokens");
        assert_eq!(quote.lines[1].used, 42);
        assert_eq!(quote.lines[1].included, None);
        assert_eq!(quote.overage_cents, 0);
    }

    #[test]
    fn the_builtin_plans_are_the_plan_variables() {
        let catalog = PlanCatalog::default();
        let rates = PlanRateLimits {
            pro: Some(RateLimit {
                per_second: 10,
                burst: 20,
            }),
            ..PlanRateLimits::default()
        };
        let free = PlanDefinition::builtin(&Plan::free(), &catalog, &rates, None).unwrap();
        let pro = PlanDefinition::builtin(&Plan::pro(), &catalog, &rates, Some("price_pro".into()))
            .unwrap();
        let enterprise =
            PlanDefinition::builtin(&Plan::enterprise(), &catalog, &rates, None).unwrap();
        for plan in [&free, &pro, &enterprise] {
            assert_eq!(plan.validate(&Meters::builtin()), Ok(()), "{}", plan.key);
            assert_eq!(plan.limits[0].alerts, vec![80, 100]);
        }
        assert_eq!(free.limits[0].included, Some(1_000));
        assert_eq!(free.limits[0].over_limit, OverLimit::Block);
        assert_eq!(free.limits[0].overage, None);
        assert_eq!(pro.price_cents, 4_900);
        assert_eq!(pro.burst, rates.pro);
        assert_eq!(pro.stripe_price_id.as_deref(), Some("price_pro"));
        assert_eq!(enterprise.limits[0].included, None);
        // Pro's overage as before: 5,000 calls past 100,000 at $0.001 = $5.00
        let usage = BTreeMap::from([(API_CALLS.to_owned(), 105_000)]);
        assert_eq!(pro.quote(&usage).overage_cents, 500);
        assert_eq!(
            catalog.overage_calls(&Plan::pro(), 105_000),
            pro.limits[0].overage_units(105_000)
        );
        assert_eq!(enterprise.quote(&usage).overage_cents, 0);
        assert_eq!(free.quote(&usage).overage_cents, 0);
    }

    #[test]
    fn differences_name_the_fields_the_variables_set() {
        let catalog = PlanCatalog::default();
        let rates = PlanRateLimits::default();
        let pro = PlanDefinition::builtin(&Plan::pro(), &catalog, &rates, None).unwrap();
        let mut stored = pro.clone();
        stored.name = "Professional".into();
        stored.version = 4;
        stored.limits[0].alerts = vec![90];
        assert_eq!(stored.variable_differences(&pro), Vec::<&str>::new());
        stored.price_cents += 1;
        stored.limits[0].included = Some(5);
        stored.burst = Some(RateLimit {
            per_second: 1,
            burst: 1,
        });
        assert_eq!(
            stored.variable_differences(&pro),
            vec!["price_cents", "burst", "included"]
        );
        stored.limits.clear();
        stored.stripe_price_id = Some("price_x".into());
        assert_eq!(
            stored.variable_differences(&pro),
            vec![
                "price_cents",
                "stripe_price_id",
                "burst",
                "included",
                "overage"
            ]
        );
    }

    #[test]
    fn bad_plans_are_refused_naming_the_field() {
        type Edit = fn(&mut PlanDefinition);
        let edits: Vec<(&str, Edit)> = vec![
            ("key", |p| p.key = "Growth".into()),
            ("key", |p| p.key = "total".into()),
            ("key", |p| p.key = "x".repeat(41)),
            ("key", |p| p.key = String::new()),
            ("name", |p| p.name = String::new()),
            ("name", |p| p.name = "a\nb".into()),
            ("price_cents", |p| p.price_cents = -1),
            ("currency", |p| p.currency = "US".into()),
            ("stripe_price_id", |p| {
                p.stripe_price_id = Some("price 1".into())
            }),
            ("burst", |p| {
                p.burst = Some(RateLimit {
                    per_second: 0,
                    burst: 1,
                })
            }),
            ("limits[1].meter", |p| p.limits[1].meter = "credits".into()),
            ("limits[1].over_limit", |p| {
                p.limits[1].meter = "peak_gb".into()
            }),
            ("limits[1].meter", |p| p.limits[1].meter = API_CALLS.into()),
            ("limits[0].alerts[1]", |p| p.limits[0].alerts = vec![80, 80]),
            ("limits[0].included", |p| {
                p.limits[0].included = Some(MAX_UNITS + 1)
            }),
            ("limits[0].alerts[0]", |p| p.limits[0].alerts = vec![0]),
            ("limits[0].alerts[0]", |p| p.limits[0].alerts = vec![1_001]),
            ("limits[0].overage", |p| p.limits[0].overage = None),
            ("limits[1].overage", |p| {
                p.limits[1].overage = Some(OverageModel::PerUnit {
                    unit_price_micros: 1,
                })
            }),
            ("limits[0].overage.tiers[0].up_to", |p| {
                p.limits[0].overage = Some(OverageModel::Graduated {
                    tiers: vec![
                        crate::pricing::PriceTier {
                            up_to: None,
                            unit_price_micros: 1,
                        },
                        crate::pricing::PriceTier {
                            up_to: None,
                            unit_price_micros: 1,
                        },
                    ],
                })
            }),
        ];
        for (field, edit) in edits {
            let mut plan = growth();
            edit(&mut plan);
            let err = plan.validate(&meters()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    #[test]
    fn json_is_read_naming_the_path_of_what_does_not_fit() {
        let plan: PlanDefinition = from_json(GROWTH.as_bytes()).unwrap();
        assert_eq!(plan, growth());
        let wrong_type = GROWTH.replace("250000", "\"many\"");
        let err = from_json::<PlanDefinition>(wrong_type.as_bytes()).unwrap_err();
        assert_eq!(err.field, "limits[0].included", "{err}");
        let err = from_json::<PlanDefinition>(b"{").unwrap_err();
        assert_eq!(err.field, "body");
        assert!(err.message.starts_with("is not valid JSON"), "{err}");
        let err = from_json::<PlanDefinition>(br#"{"key": "x"}"#).unwrap_err();
        assert_eq!(err.field, "body", "a missing field: {err}");
        assert!(err.message.contains("name"), "{err}");
        // A struct is not read from an array (by position), nor from any other value.
        for not_object in [
            &b"[null]"[..],
            b" [\"k\", \"n\"]",
            b"null",
            b"3",
            b"\"plan\"",
        ] {
            let err = from_json::<PlanDefinition>(not_object).unwrap_err();
            assert_eq!(
                (err.field.as_str(), err.message.as_str()),
                ("body", "must be a JSON object"),
                "{}",
                String::from_utf8_lossy(not_object)
            );
        }
        let err = from_json::<PlanDefinition>(b"[1,").unwrap_err();
        assert!(err.message.starts_with("is not valid JSON"), "{err}");
    }

    #[test]
    fn a_revision_takes_the_terms_without_key_and_version() {
        let mut terms: serde_json::Value = serde_json::from_str(GROWTH).unwrap();
        terms["version"] = serde_json::json!(9);
        terms["archived"] = serde_json::json!(true);
        terms["existing"] = serde_json::json!("keep");
        let text = terms.to_string();
        let (plan, existing) = revision_from_json("growth", text.as_bytes()).unwrap();
        assert_eq!(existing, Some(PlanMove::Keep));
        assert_eq!((plan.version, plan.archived), (1, false), "not read");
        assert_eq!(plan.price_cents, 9_900);
        terms.as_object_mut().unwrap().remove("key");
        terms.as_object_mut().unwrap().remove("existing");
        let (plan, existing) = revision_from_json("growth", terms.to_string().as_bytes()).unwrap();
        assert_eq!((plan.key.as_str(), existing), ("growth", None));
        for (bad, field) in [
            (serde_json::json!({"key": "pro"}), "key"),
            (serde_json::json!({"key": 5}), "key"),
            (serde_json::json!({"existing": "later"}), "existing"),
            (serde_json::json!({"existing": 1}), "existing"),
        ] {
            let mut body = terms.clone();
            for (k, v) in bad.as_object().unwrap() {
                body[k] = v.clone();
            }
            let err = revision_from_json("growth", body.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn unknown_and_misspelt_fields_are_refused() {
        let typo = GROWTH.replace("\"price_cents\"", "\"price\"");
        assert!(serde_json::from_str::<PlanDefinition>(&typo).is_err());
        let bad_model = GROWTH.replace("graduated", "stepped");
        assert!(serde_json::from_str::<PlanDefinition>(&bad_model).is_err());
        let negative_units = GROWTH.replace("250000", "-5");
        assert!(serde_json::from_str::<PlanDefinition>(&negative_units).is_err());
    }
}
