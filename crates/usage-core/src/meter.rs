//! Meters as data: what is counted (tokens, credits, bytes, API calls), how a period's
//! reports add up, and what each route costs. Read from JSON or a catalog file with the
//! path of what does not fit; checked here, stored by [`crate::repo::PlanRepository`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::CatalogError;
use crate::plan::is_valid_key;

/// The meter of metered API calls, which every installation has.
pub const API_CALLS: &str = "api_calls";

/// Largest quantity one report may carry: 2^53, the largest integer every JSON reader
/// holds exactly.
pub const MAX_QUANTITY: u64 = 1 << 53;

/// Most route costs the catalog holds: they are matched on the hot path.
pub const MAX_ROUTE_COSTS: usize = 1_000;

/// How a period's reports to a meter add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Aggregation {
    /// The number of reports (each call or event counts one).
    Count,
    /// The sum of the reported quantities.
    Sum,
    /// The largest quantity reported in the period.
    Max,
    /// The number of distinct `data.value` strings reported in the period.
    UniqueCount,
}

impl Aggregation {
    /// Every kind, as the API names them.
    pub const ALL: [Aggregation; 4] = [
        Aggregation::Count,
        Aggregation::Sum,
        Aggregation::Max,
        Aggregation::UniqueCount,
    ];

    /// The name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Count => "count",
            Aggregation::Sum => "sum",
            Aggregation::Max => "max",
            Aggregation::UniqueCount => "unique_count",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Result<Self, CatalogError> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == name)
            .ok_or_else(|| {
                CatalogError::new(
                    "aggregation",
                    format!("must be one of count, sum, max, unique_count (got {name:?})"),
                )
            })
    }

    /// Whether a limit on a meter of this kind may block calls: a period's count or sum
    /// only grows with each report, so the door can tell what one more would do; a max or
    /// a distinct count cannot be checked that way.
    pub fn may_block(self) -> bool {
        matches!(self, Aggregation::Count | Aggregation::Sum)
    }
}

/// A meter: what is counted, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Meter {
    /// `[a-z0-9_-]{1,40}`, never changes; what plan limits, route costs and events'
    /// `type` name.
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
    /// One unit's name, singular (`token`, `credit`, `byte`).
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 40,
            pattern = "^[^\\u0000-\\u001F\\u007F]+$"
        )
    )]
    pub unit: String,
    /// How a period's reports add up; fixed once usage of the meter is stored.
    pub aggregation: Aggregation,
}

impl Meter {
    /// The built-in meter of admitted metered calls.
    pub fn api_calls() -> Self {
        Self {
            key: API_CALLS.to_owned(),
            name: "API calls".to_owned(),
            unit: "call".to_owned(),
            aggregation: Aggregation::Count,
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), CatalogError> {
        if !is_valid_key(&self.key) {
            return Err(CatalogError::new(
                "key",
                format!("must be 1 to 40 of a-z, 0-9, _ and - (got {:?})", self.key),
            ));
        }
        check_text("name", &self.name, 100)?;
        check_text("unit", &self.unit, 40)
    }
}

/// `value` is 1 to `max` characters, none of them control characters.
pub(crate) fn check_text(field: &str, value: &str, max: usize) -> Result<(), CatalogError> {
    let len = value.chars().count();
    if !(1..=max).contains(&len) || value.chars().any(char::is_control) {
        return Err(CatalogError::new(
            field,
            format!("must be 1 to {max} characters, none of them control characters"),
        ));
    }
    Ok(())
}

/// The body of `PUT /api/admin/meters/{key}`: a meter's new name and unit. `aggregation`
/// may be given; it changes only while no usage of the meter is stored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeterRevision {
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
    /// One unit's name.
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 40,
            pattern = "^[^\\u0000-\\u001F\\u007F]+$"
        )
    )]
    pub unit: String,
    /// A new aggregation (refused once usage is stored); left out: unchanged.
    #[serde(default)]
    pub aggregation: Option<Aggregation>,
    /// The meter's key, if given: it must be the one in the path.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_-]{1,40}$"))]
    pub key: Option<String>,
}

/// The meters of an installation by key: the built-in `api_calls` and the operator's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meters {
    by_key: BTreeMap<String, Meter>,
}

impl Default for Meters {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Meters {
    /// Only the built-in `api_calls`.
    pub fn builtin() -> Self {
        Self::new([])
    }

    /// `api_calls` and `meters` (a stored `api_calls` replaces the built-in one's name and
    /// unit; its aggregation stays `count`).
    pub fn new(meters: impl IntoIterator<Item = Meter>) -> Self {
        let mut by_key = BTreeMap::from([(API_CALLS.to_owned(), Meter::api_calls())]);
        for mut meter in meters {
            if meter.key == API_CALLS {
                meter.aggregation = Aggregation::Count;
            }
            by_key.insert(meter.key.clone(), meter);
        }
        Self { by_key }
    }

    /// The meter with this key.
    pub fn get(&self, key: &str) -> Option<&Meter> {
        self.by_key.get(key)
    }

    /// Every meter, by key.
    pub fn iter(&self) -> impl Iterator<Item = &Meter> {
        self.by_key.values()
    }

    /// Every key, comma separated, for messages.
    pub fn key_list(&self) -> String {
        self.by_key.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The meter `key` at `field`, or an error naming the field and the meters there are.
    pub fn require(&self, field: &str, key: &str) -> Result<&Meter, CatalogError> {
        self.get(key).ok_or_else(|| {
            CatalogError::new(
                field,
                format!(
                    "must be a defined meter, one of {} (got {key:?})",
                    self.key_list()
                ),
            )
        })
    }
}

/// What one call to a route costs on one meter, taken at admission.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RouteCost {
    /// The method, a space, and the endpoint as it is recorded: `POST /v1/generate`,
    /// `GET /api/v1/items/{id}`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Z]{1,16} /[^\\s]{0,500}$"))]
    pub route: String,
    /// The meter charged: a `count` or `sum` meter other than `api_calls`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_-]{1,40}$"))]
    pub meter: String,
    /// Units each call takes (1 on a `count` meter).
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 9007199254740992_i64)
    )]
    pub quantity: u64,
}

impl RouteCost {
    /// The route's method and endpoint.
    pub fn method_and_endpoint(&self) -> Option<(&str, &str)> {
        self.route.split_once(' ')
    }
}

/// The body of `GET` and `PUT /api/admin/costs`: every route cost.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RouteCosts {
    /// The costs, by route then meter.
    pub items: Vec<RouteCost>,
}

impl RouteCosts {
    /// Checks every entry against `meters`; the error's field is `items[i].<field>`.
    pub fn validate(&self, meters: &Meters) -> Result<(), CatalogError> {
        if self.items.len() > MAX_ROUTE_COSTS {
            return Err(CatalogError::new(
                "items",
                format!(
                    "must hold at most {MAX_ROUTE_COSTS} costs (got {})",
                    self.items.len()
                ),
            ));
        }
        for (i, cost) in self.items.iter().enumerate() {
            let at = |field: &str| format!("items[{i}].{field}");
            let well_formed = cost
                .method_and_endpoint()
                .is_some_and(|(method, endpoint)| {
                    (1..=16).contains(&method.len())
                        && method.bytes().all(|b| b.is_ascii_uppercase())
                        && endpoint.starts_with('/')
                        && endpoint.len() <= 500
                        && !endpoint
                            .chars()
                            .any(|c| c.is_whitespace() || c.is_control())
                });
            if !well_formed {
                return Err(CatalogError::new(
                    at("route"),
                    format!(
                        "must be a method, a space and the endpoint as recorded, like \
                         \"POST /v1/generate\" (got {:?})",
                        cost.route
                    ),
                ));
            }
            let meter = meters.require(&at("meter"), &cost.meter)?;
            if meter.key == API_CALLS {
                return Err(CatalogError::new(
                    at("meter"),
                    "must not be api_calls: every admitted call counts one already",
                ));
            }
            if !meter.aggregation.may_block() {
                return Err(CatalogError::new(
                    at("meter"),
                    format!(
                        "must be a count or sum meter ({:?} is {})",
                        meter.key,
                        meter.aggregation.as_str()
                    ),
                ));
            }
            let most = match meter.aggregation {
                Aggregation::Count => 1,
                _ => MAX_QUANTITY,
            };
            if !(1..=most).contains(&cost.quantity) {
                return Err(CatalogError::new(
                    at("quantity"),
                    if most == 1 {
                        format!(
                            "must be 1: {:?} counts calls (got {})",
                            meter.key, cost.quantity
                        )
                    } else {
                        format!("must be 1 to 2^53 (got {})", cost.quantity)
                    },
                ));
            }
            if self.items[..i]
                .iter()
                .any(|c| c.route == cost.route && c.meter == cost.meter)
            {
                return Err(CatalogError::new(
                    at("meter"),
                    format!(
                        "{:?} already has a cost on {:?}: one entry a route and meter",
                        cost.route, cost.meter
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The costs in the order they are stored and shown: by route, then meter.
    pub fn sorted(mut self) -> Self {
        self.items
            .sort_by(|a, b| (&a.route, &a.meter).cmp(&(&b.route, &b.meter)));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters() -> Meters {
        let meter = |key: &str, aggregation| Meter {
            key: key.into(),
            name: key.into(),
            unit: "unit".into(),
            aggregation,
        };
        Meters::new([
            meter("tokens", Aggregation::Sum),
            meter("credits", Aggregation::Sum),
            meter("images", Aggregation::Count),
            meter("peak_gb", Aggregation::Max),
            meter("seats", Aggregation::UniqueCount),
        ])
    }

    fn cost(route: &str, meter: &str, quantity: u64) -> RouteCost {
        RouteCost {
            route: route.into(),
            meter: meter.into(),
            quantity,
        }
    }

    #[test]
    fn api_calls_is_always_there_and_always_counts() {
        assert_eq!(Meters::builtin().get(API_CALLS), Some(&Meter::api_calls()));
        let renamed = Meters::new([Meter {
            name: "Requests".into(),
            aggregation: Aggregation::Sum,
            ..Meter::api_calls()
        }]);
        let api_calls = renamed.get(API_CALLS).unwrap();
        assert_eq!(api_calls.name, "Requests");
        assert_eq!(api_calls.aggregation, Aggregation::Count);
    }

    #[test]
    fn a_meter_is_checked_field_by_field() {
        let good = Meter {
            key: "tokens".into(),
            name: "Tokens".into(),
            unit: "token".into(),
            aggregation: Aggregation::Sum,
        };
        assert_eq!(good.validate(), Ok(()));
        type Spoil = fn(&mut Meter);
        let cases: [(&str, Spoil); 5] = [
            ("key", |m| m.key = "Tokens".into()),
            ("key", |m| m.key = String::new()),
            ("name", |m| m.name = String::new()),
            ("name", |m| m.name = "a\nb".into()),
            ("unit", |m| m.unit = "u".repeat(41)),
        ];
        for (field, spoil) in cases {
            let mut meter = good.clone();
            spoil(&mut meter);
            assert_eq!(meter.validate().unwrap_err().field, field, "{meter:?}");
        }
    }

    #[test]
    fn aggregation_names_round_trip_and_unknown_names_are_refused() {
        for kind in Aggregation::ALL {
            assert_eq!(Aggregation::parse(kind.as_str()), Ok(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        assert!(Aggregation::parse("avg").is_err());
        assert!(Aggregation::Sum.may_block() && Aggregation::Count.may_block());
        assert!(!Aggregation::Max.may_block() && !Aggregation::UniqueCount.may_block());
    }

    #[test]
    fn route_costs_name_a_route_and_a_count_or_sum_meter() {
        let good = RouteCosts {
            items: vec![
                cost("POST /v1/generate", "credits", 10),
                cost("GET /api/v1/items/{id}", "images", 1),
                cost("POST /v1/generate", "tokens", 1 << 53),
            ],
        };
        assert_eq!(good.validate(&meters()), Ok(()));
        let refused = [
            (cost("/v1/generate", "credits", 1), "items[0].route"),
            (cost("post /v1/generate", "credits", 1), "items[0].route"),
            (cost("POST v1", "credits", 1), "items[0].route"),
            (cost("POST /v1/a b", "credits", 1), "items[0].route"),
            (cost("POST /v1", "nope", 1), "items[0].meter"),
            (cost("POST /v1", API_CALLS, 1), "items[0].meter"),
            (cost("POST /v1", "peak_gb", 1), "items[0].meter"),
            (cost("POST /v1", "seats", 1), "items[0].meter"),
            (cost("POST /v1", "credits", 0), "items[0].quantity"),
            (
                cost("POST /v1", "credits", (1 << 53) + 1),
                "items[0].quantity",
            ),
            (cost("POST /v1", "images", 2), "items[0].quantity"),
        ];
        for (entry, field) in refused {
            let costs = RouteCosts {
                items: vec![entry.clone()],
            };
            let err = costs.validate(&meters()).unwrap_err();
            assert_eq!(err.field, field, "{entry:?}: {err}");
        }
        let twice = RouteCosts {
            items: vec![
                cost("POST /v1", "credits", 1),
                cost("POST /v1", "credits", 2),
            ],
        };
        assert_eq!(
            twice.validate(&meters()).unwrap_err().field,
            "items[1].meter"
        );
        let unknown = RouteCosts {
            items: vec![cost("POST /v1", "nope", 1)],
        };
        let message = unknown.validate(&meters()).unwrap_err().message;
        assert!(message.contains("api_calls, credits, images"), "{message}");
    }

    #[test]
    fn costs_are_shown_by_route_then_meter() {
        let costs = RouteCosts {
            items: vec![
                cost("POST /v2", "credits", 1),
                cost("POST /v1", "tokens", 1),
                cost("POST /v1", "credits", 1),
            ],
        }
        .sorted();
        let order: Vec<(&str, &str)> = costs
            .items
            .iter()
            .map(|c| (c.route.as_str(), c.meter.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("POST /v1", "credits"),
                ("POST /v1", "tokens"),
                ("POST /v2", "credits")
            ]
        );
    }
}
