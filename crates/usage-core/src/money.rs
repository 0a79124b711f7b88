//! Money in integers: cents for amounts, micro-dollars for unit prices.

use serde::{Deserialize, Serialize};

/// An amount in US cents.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(value_type = i64, example = 500))]
#[serde(transparent)]
pub struct Cents(pub i64);

/// An amount in millionths of a US dollar, for unit prices below a cent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroUsd(pub i64);

const MICRO_PER_CENT: i128 = 10_000;

impl MicroUsd {
    /// `calls` units at this price, rounded half-up to the cent once, at the total.
    /// Saturates instead of overflowing.
    ///
    /// ```
    /// use usage_core::{Cents, MicroUsd};
    /// let price = MicroUsd(1_000); // $0.001
    /// assert_eq!(price.total_in_cents(1), Cents(0));
    /// assert_eq!(price.total_in_cents(5), Cents(1));
    /// assert_eq!(price.total_in_cents(5_001), Cents(500));
    /// ```
    pub fn total_in_cents(self, calls: u64) -> Cents {
        round_to_cents(i128::from(self.0) * i128::from(calls))
    }

    /// This amount rounded half-up to the cent.
    ///
    /// ```
    /// use usage_core::{Cents, MicroUsd};
    /// assert_eq!(MicroUsd(4_999).in_cents(), Cents(0));
    /// assert_eq!(MicroUsd(5_000).in_cents(), Cents(1));
    /// ```
    pub fn in_cents(self) -> Cents {
        round_to_cents(i128::from(self.0))
    }
}

/// `micro` micro-dollars rounded half-up (away from zero) to the cent, saturating.
fn round_to_cents(micro: i128) -> Cents {
    // Half-up, away from zero for the (unused) negative case too.
    let half = MICRO_PER_CENT / 2;
    let cents = if micro >= 0 {
        (micro + half) / MICRO_PER_CENT
    } else {
        (micro - half) / MICRO_PER_CENT
    };
    Cents(i64::try_from(cents).unwrap_or(if cents > 0 { i64::MAX } else { i64::MIN }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_up_once_at_the_total() {
        let price = MicroUsd(1_000);
        assert_eq!(price.total_in_cents(0), Cents(0));
        assert_eq!(price.total_in_cents(4), Cents(0));
        assert_eq!(price.total_in_cents(5), Cents(1));
        assert_eq!(price.total_in_cents(15), Cents(2));
        assert_eq!(price.total_in_cents(5_000), Cents(500));
        assert_eq!(MicroUsd(i64::MAX).total_in_cents(u64::MAX), Cents(i64::MAX));
    }

    #[test]
    fn a_negative_price_rounds_half_away_from_zero_and_saturates() {
        let credit = MicroUsd(-1_000);
        assert_eq!(credit.total_in_cents(4), Cents(0));
        assert_eq!(credit.total_in_cents(5), Cents(-1));
        assert_eq!(credit.total_in_cents(15), Cents(-2));
        assert_eq!(credit.total_in_cents(5_000), Cents(-500));
        assert_eq!(MicroUsd(i64::MIN).total_in_cents(u64::MAX), Cents(i64::MIN));
    }
}
