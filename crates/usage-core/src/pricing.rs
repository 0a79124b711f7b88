//! Overage pricing: what the units past a limit's included amount cost, in integer
//! micro-dollars, line by line. [`OverageModel::price`] is the one pricing rule; rounding
//! to the cent happens once per invoice item, on its total ([`crate::MicroUsd::in_cents`]).
//!
//! The models are Stripe's and Lago's: a price per unit, whole packages, graduated tiers
//! (each unit at the price of the tier it falls in) and volume tiers (every unit at the
//! price of the tier their count reaches). Tiers count overage units; `up_to` is
//! inclusive, strictly increases, and the last tier is open (`null`).

use serde::{Deserialize, Serialize};

use crate::error::CatalogError;

/// The largest unit count a catalog holds: counters are signed 64-bit in the databases
/// (and in TOML).
pub const MAX_UNITS: u64 = i64::MAX as u64;

/// How the units past a limit's included amount are priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OverageModel {
    /// Every unit at one price.
    PerUnit {
        /// Price of one unit.
        #[cfg_attr(feature = "openapi", schema(minimum = 0))]
        unit_price_micros: i64,
    },
    /// Whole packages of `package_size` units, the last one rounded up.
    Package {
        /// Units in a package (at least 1).
        #[cfg_attr(
            feature = "openapi",
            schema(minimum = 1, maximum = 9007199254740991_i64)
        )]
        package_size: u64,
        /// Price of one package.
        #[cfg_attr(feature = "openapi", schema(minimum = 0))]
        package_price_micros: i64,
    },
    /// Each unit at the price of the tier it falls in.
    Graduated {
        /// The tiers, `up_to` strictly increasing, the last open.
        tiers: Vec<PriceTier>,
    },
    /// Every unit at the price of the tier their count reaches.
    Volume {
        /// The tiers, `up_to` strictly increasing, the last open.
        tiers: Vec<PriceTier>,
    },
}

/// One tier of a graduated or volume price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PriceTier {
    /// The last overage unit of this tier (inclusive); `None` for the open last tier.
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 9007199254740991_i64)
    )]
    pub up_to: Option<u64>,
    /// Price of one unit in this tier.
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub unit_price_micros: i64,
}

/// What a number of overage units costs, with one line per tier (or one line for the
/// per-unit and package models) that has units.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct OveragePrice {
    /// The total, in micro-dollars (saturating at `i64::MAX`).
    pub amount_micros: i64,
    /// How the total is made.
    pub lines: Vec<PriceLine>,
}

/// One line of an [`OveragePrice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PriceLine {
    /// The tier's `up_to` (`None` for the open tier, and for the per-unit and package models).
    pub up_to: Option<u64>,
    /// Units priced on this line.
    pub units: u64,
    /// Their price a unit (a package's price for the package model).
    pub unit_price_micros: i64,
    /// Packages billed (the package model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packages: Option<u64>,
    /// What this line costs.
    pub amount_micros: i64,
}

/// `a × b` in micro-dollars, saturating instead of overflowing.
fn times(units: u64, price_micros: i64) -> i64 {
    let product = i128::from(units) * i128::from(price_micros);
    i64::try_from(product).unwrap_or(if product > 0 { i64::MAX } else { i64::MIN })
}

impl OverageModel {
    /// What `units` overage units cost under this model.
    ///
    /// ```
    /// use usage_core::pricing::{OverageModel, PriceTier};
    /// let graduated = OverageModel::Graduated { tiers: vec![
    ///     PriceTier { up_to: Some(750_000), unit_price_micros: 800 },
    ///     PriceTier { up_to: None, unit_price_micros: 500 },
    /// ]};
    /// // 750,000 × $0.0008 + 250,000 × $0.0005 = $600 + $125
    /// assert_eq!(graduated.price(1_000_000).amount_micros, 725_000_000);
    /// ```
    pub fn price(&self, units: u64) -> OveragePrice {
        let lines = match self {
            OverageModel::PerUnit { unit_price_micros } => vec![PriceLine {
                up_to: None,
                units,
                unit_price_micros: *unit_price_micros,
                packages: None,
                amount_micros: times(units, *unit_price_micros),
            }],
            OverageModel::Package {
                package_size,
                package_price_micros,
            } => {
                let packages = units.div_ceil((*package_size).max(1));
                vec![PriceLine {
                    up_to: None,
                    units,
                    unit_price_micros: *package_price_micros,
                    packages: Some(packages),
                    amount_micros: times(packages, *package_price_micros),
                }]
            }
            OverageModel::Graduated { tiers } => {
                let mut lines = Vec::new();
                let mut below = 0u64;
                for tier in tiers {
                    let top = tier.up_to.unwrap_or(u64::MAX).min(units);
                    if top > below {
                        let in_tier = top - below;
                        lines.push(PriceLine {
                            up_to: tier.up_to,
                            units: in_tier,
                            unit_price_micros: tier.unit_price_micros,
                            packages: None,
                            amount_micros: times(in_tier, tier.unit_price_micros),
                        });
                    }
                    match tier.up_to {
                        Some(up_to) if up_to < units => below = up_to,
                        _ => break,
                    }
                }
                lines
            }
            OverageModel::Volume { tiers } => tiers
                .iter()
                .find(|t| t.up_to.is_none_or(|up_to| units <= up_to))
                .filter(|_| units > 0)
                .map(|tier| PriceLine {
                    up_to: tier.up_to,
                    units,
                    unit_price_micros: tier.unit_price_micros,
                    packages: None,
                    amount_micros: times(units, tier.unit_price_micros),
                })
                .into_iter()
                .collect(),
        };
        let amount_micros = lines
            .iter()
            .fold(0i64, |sum, l| sum.saturating_add(l.amount_micros));
        OveragePrice {
            amount_micros,
            lines,
        }
    }

    /// Checks the model's numbers; `field` is where it sits (`limits[0].overage`).
    pub fn validate(&self, field: &str) -> Result<(), CatalogError> {
        let price = |name: &str, micros: i64| {
            if micros < 0 {
                Err(CatalogError::new(
                    format!("{field}.{name}"),
                    format!("must be 0 or more micro-dollars (got {micros})"),
                ))
            } else {
                Ok(())
            }
        };
        match self {
            OverageModel::PerUnit { unit_price_micros } => {
                price("unit_price_micros", *unit_price_micros)
            }
            OverageModel::Package {
                package_size,
                package_price_micros,
            } => {
                if *package_size == 0 || *package_size > MAX_UNITS {
                    return Err(CatalogError::new(
                        format!("{field}.package_size"),
                        format!("must be from 1 to {MAX_UNITS} units (got {package_size})"),
                    ));
                }
                price("package_price_micros", *package_price_micros)
            }
            OverageModel::Graduated { tiers } | OverageModel::Volume { tiers } => {
                if tiers.is_empty() {
                    return Err(CatalogError::new(
                        format!("{field}.tiers"),
                        "must hold at least one tier, the last with \"up_to\": null",
                    ));
                }
                let mut below: Option<u64> = None;
                for (i, tier) in tiers.iter().enumerate() {
                    let at = format!("{field}.tiers[{i}]");
                    price(
                        &format!("tiers[{i}].unit_price_micros"),
                        tier.unit_price_micros,
                    )?;
                    let last = i + 1 == tiers.len();
                    match (tier.up_to, last) {
                        (None, true) => {}
                        (None, false) => {
                            return Err(CatalogError::new(
                                format!("{at}.up_to"),
                                "may be null only in the last tier (one open tier)",
                            ));
                        }
                        (Some(up_to), true) => {
                            return Err(CatalogError::new(
                                format!("{at}.up_to"),
                                format!("must be null in the last tier (got {up_to})"),
                            ));
                        }
                        (Some(up_to), false) => {
                            if up_to > MAX_UNITS {
                                return Err(CatalogError::new(
                                    format!("{at}.up_to"),
                                    format!("must be at most {MAX_UNITS} (got {up_to})"),
                                ));
                            }
                            if up_to == 0 || below.is_some_and(|b| up_to <= b) {
                                return Err(CatalogError::new(
                                    format!("{at}.up_to"),
                                    format!(
                                        "must be greater than {} (tiers strictly increase; got {up_to})",
                                        below.unwrap_or(0)
                                    ),
                                ));
                            }
                            below = Some(up_to);
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers(spec: &[(Option<u64>, i64)]) -> Vec<PriceTier> {
        spec.iter()
            .map(|&(up_to, unit_price_micros)| PriceTier {
                up_to,
                unit_price_micros,
            })
            .collect()
    }

    /// The two-tier graduated price of the contract's `growth` plan: the first 750,000
    /// overage units at $0.0008 (800 µ$), the rest at $0.0005.
    fn growth() -> OverageModel {
        OverageModel::Graduated {
            tiers: tiers(&[(Some(750_000), 800), (None, 500)]),
        }
    }

    /// Three tiers: up to 100 at 1,000 µ$, up to 1,000 at 500, the rest at 100.
    fn three(graduated: bool) -> OverageModel {
        let tiers = tiers(&[(Some(100), 1_000), (Some(1_000), 500), (None, 100)]);
        if graduated {
            OverageModel::Graduated { tiers }
        } else {
            OverageModel::Volume { tiers }
        }
    }

    #[test]
    fn every_model_prices_the_boundaries_as_worked_by_hand() {
        let per_unit = OverageModel::PerUnit {
            unit_price_micros: 800,
        };
        let package = OverageModel::Package {
            package_size: 1_000,
            package_price_micros: 500_000,
        };
        // (model, overage units, amount in µ$, units on each line)
        let cases: Vec<(&str, OverageModel, u64, i64, Vec<u64>)> = vec![
            // per unit: units × 800
            ("per unit, none", per_unit.clone(), 0, 0, vec![0]),
            ("per unit, one", per_unit.clone(), 1, 800, vec![1]),
            // 750,000 × 800 = 600,000,000
            (
                "per unit, many",
                per_unit.clone(),
                750_000,
                600_000_000,
                vec![750_000],
            ),
            // package: ceil(units / 1,000) × 500,000
            ("package, none", package.clone(), 0, 0, vec![0]),
            (
                "package, one unit is a whole package",
                package.clone(),
                1,
                500_000,
                vec![1],
            ),
            (
                "package, exactly one",
                package.clone(),
                1_000,
                500_000,
                vec![1_000],
            ),
            // 1,001 units: 2 packages = 1,000,000
            (
                "package, one past",
                package.clone(),
                1_001,
                1_000_000,
                vec![1_001],
            ),
            // graduated, growth: tier 1 up to 750,000 at 800, then 500
            ("graduated, none", growth(), 0, 0, vec![]),
            ("graduated, one", growth(), 1, 800, vec![1]),
            // 750,000 × 800 = 600,000,000, all in tier 1 (up_to is inclusive)
            (
                "graduated, at the edge",
                growth(),
                750_000,
                600_000_000,
                vec![750_000],
            ),
            // 600,000,000 + 1 × 500
            (
                "graduated, one past",
                growth(),
                750_001,
                600_000_500,
                vec![750_000, 1],
            ),
            // 600,000,000 + 250,000 × 500 = 600,000,000 + 125,000,000
            (
                "graduated, open tier",
                growth(),
                1_000_000,
                725_000_000,
                vec![750_000, 250_000],
            ),
            // three tiers: 100 × 1,000 = 100,000
            (
                "graduated 3, first edge",
                three(true),
                100,
                100_000,
                vec![100],
            ),
            // 100,000 + 1 × 500
            (
                "graduated 3, past first",
                three(true),
                101,
                100_500,
                vec![100, 1],
            ),
            // 100,000 + 900 × 500 = 100,000 + 450,000
            (
                "graduated 3, second edge",
                three(true),
                1_000,
                550_000,
                vec![100, 900],
            ),
            // 550,000 + 4,000 × 100 = 550,000 + 400,000
            (
                "graduated 3, open",
                three(true),
                5_000,
                950_000,
                vec![100, 900, 4_000],
            ),
            // volume: every unit at the tier the count reaches
            ("volume, none", three(false), 0, 0, vec![]),
            // 100 × 1,000
            ("volume, first edge", three(false), 100, 100_000, vec![100]),
            // 101 × 500 = 50,500: less than at 100 units, as volume pricing does
            ("volume, past first", three(false), 101, 50_500, vec![101]),
            // 1,000 × 500
            (
                "volume, second edge",
                three(false),
                1_000,
                500_000,
                vec![1_000],
            ),
            // 1,001 × 100
            ("volume, open", three(false), 1_001, 100_100, vec![1_001]),
        ];
        for (name, model, units, micros, line_units) in cases {
            let price = model.price(units);
            assert_eq!(price.amount_micros, micros, "{name}");
            let got: Vec<u64> = price.lines.iter().map(|l| l.units).collect();
            assert_eq!(got, line_units, "{name}: units a line");
            let sum: i64 = price.lines.iter().map(|l| l.amount_micros).sum();
            assert_eq!(sum, micros, "{name}: lines add up to the total");
        }
    }

    #[test]
    fn lines_name_their_tier_and_packages() {
        let lines = growth().price(1_000_000).lines;
        assert_eq!(lines[0].up_to, Some(750_000));
        assert_eq!(lines[0].unit_price_micros, 800);
        assert_eq!(lines[1].up_to, None);
        assert_eq!(lines[1].amount_micros, 125_000_000);
        let package = OverageModel::Package {
            package_size: 1_000,
            package_price_micros: 500_000,
        };
        assert_eq!(package.price(2_500).lines[0].packages, Some(3));
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        let per_unit = OverageModel::PerUnit {
            unit_price_micros: i64::MAX,
        };
        assert_eq!(per_unit.price(u64::MAX).amount_micros, i64::MAX);
        let expensive = OverageModel::Graduated {
            tiers: tiers(&[(Some(1), i64::MAX), (None, i64::MAX)]),
        };
        assert_eq!(expensive.price(u64::MAX).amount_micros, i64::MAX);
        assert_eq!(three(false).price(u64::MAX).amount_micros, i64::MAX);
    }

    #[test]
    fn bad_models_are_refused_naming_the_field() {
        let cases: Vec<(OverageModel, &str)> = vec![
            (
                OverageModel::PerUnit {
                    unit_price_micros: -1,
                },
                "overage.unit_price_micros",
            ),
            (
                OverageModel::Package {
                    package_size: 0,
                    package_price_micros: 1,
                },
                "overage.package_size",
            ),
            (
                OverageModel::Package {
                    package_size: 10,
                    package_price_micros: -5,
                },
                "overage.package_price_micros",
            ),
            (
                OverageModel::Package {
                    package_size: MAX_UNITS + 1,
                    package_price_micros: 1,
                },
                "overage.package_size",
            ),
            (
                OverageModel::Graduated {
                    tiers: tiers(&[(Some(MAX_UNITS + 1), 1), (None, 1)]),
                },
                "overage.tiers[0].up_to",
            ),
            (OverageModel::Volume { tiers: vec![] }, "overage.tiers"),
            (
                OverageModel::Graduated {
                    tiers: tiers(&[(Some(10), 1), (Some(10), 1), (None, 1)]),
                },
                "overage.tiers[1].up_to",
            ),
            (
                OverageModel::Graduated {
                    tiers: tiers(&[(Some(10), 1), (Some(5), 1), (None, 1)]),
                },
                "overage.tiers[1].up_to",
            ),
            (
                OverageModel::Graduated {
                    tiers: tiers(&[(Some(0), 1), (None, 1)]),
                },
                "overage.tiers[0].up_to",
            ),
            (
                OverageModel::Volume {
                    tiers: tiers(&[(None, 1), (None, 1)]),
                },
                "overage.tiers[0].up_to",
            ),
            (
                OverageModel::Volume {
                    tiers: tiers(&[(Some(10), 1), (Some(20), 1)]),
                },
                "overage.tiers[1].up_to",
            ),
            (
                OverageModel::Volume {
                    tiers: tiers(&[(Some(10), 1), (None, -1)]),
                },
                "overage.tiers[1].unit_price_micros",
            ),
        ];
        for (model, field) in cases {
            let err = model.validate("overage").unwrap_err();
            assert_eq!(err.field, field, "{model:?}: {err}");
        }
        assert_eq!(growth().validate("overage"), Ok(()));
        assert_eq!(three(false).validate("overage"), Ok(()));
    }

    #[test]
    fn models_read_and_write_the_contracts_json() {
        let json = r#"{"model": "graduated",
            "tiers": [{"up_to": 750000, "unit_price_micros": 800},
                      {"up_to": null, "unit_price_micros": 500}]}"#;
        let model: OverageModel = serde_json::from_str(json).unwrap();
        assert_eq!(model, growth());
        let back = serde_json::to_value(&model).unwrap();
        assert_eq!(back["model"], "graduated");
        assert_eq!(back["tiers"][1]["up_to"], serde_json::Value::Null);
        let package: OverageModel = serde_json::from_str(
            r#"{"model": "package", "package_size": 100, "package_price_micros": 20000}"#,
        )
        .unwrap();
        assert_eq!(package.price(101).amount_micros, 40_000);
        assert!(
            serde_json::from_str::<OverageModel>(r#"{"model": "per_unit", "unit_price": 1}"#)
                .is_err(),
            "a misspelt field is refused, not ignored"
        );
    }
}
