//! Billing periods: UTC calendar months.

use serde::Serialize;
use time::{Date, Month, OffsetDateTime, UtcOffset};

/// A UTC calendar month, `[first day 00:00:00Z, first day of next month 00:00:00Z)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BillingPeriod {
    start: OffsetDateTime,
    end: OffsetDateTime,
}

fn month_start(year: i32, month: Month) -> OffsetDateTime {
    // Day 1 exists in every month of every year `time` can represent around ours.
    Date::from_calendar_date(year, month, 1)
        .map(|d| d.midnight().assume_utc())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl BillingPeriod {
    /// The period that contains the instant `at`.
    pub fn containing(at: OffsetDateTime) -> Self {
        // Callers give times already in range (`clock::caller_instant`); never panic all the same.
        let at = at.checked_to_offset(UtcOffset::UTC).unwrap_or(at);
        let start = month_start(at.year(), at.month());
        let (next_year, next_month) = match at.month() {
            Month::December => (at.year() + 1, Month::January),
            m => (at.year(), m.next()),
        };
        Self {
            start,
            end: month_start(next_year, next_month),
        }
    }

    /// First instant of the period.
    pub fn start(&self) -> OffsetDateTime {
        self.start
    }

    /// First instant after the period (exclusive end).
    pub fn end(&self) -> OffsetDateTime {
        self.end
    }

    /// Whether `at` falls in this period.
    pub fn contains(&self, at: OffsetDateTime) -> bool {
        self.start <= at && at < self.end
    }

    /// The period right after this one.
    pub fn next(&self) -> Self {
        Self::containing(self.end)
    }

    /// The period right before this one.
    pub fn previous(&self) -> Self {
        Self::containing(self.start - time::Duration::microseconds(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn last_instant_of_a_month_and_first_of_the_next_are_in_different_periods() {
        let nov = BillingPeriod::containing(datetime!(2026-11-30 23:59:59.999 UTC));
        let dec = BillingPeriod::containing(datetime!(2026-12-01 00:00 UTC));
        assert_eq!(nov.start(), datetime!(2026-11-01 00:00 UTC));
        assert_eq!(nov.end(), dec.start());
        assert_eq!(nov.next(), dec);
        assert_eq!(dec.previous(), nov);
        assert!(!nov.contains(dec.start()));
        // The start is in, the end is out, and nothing before the start.
        let micro = time::Duration::microseconds(1);
        assert!(nov.contains(nov.start()));
        assert!(nov.contains(nov.end() - micro));
        assert!(!nov.contains(nov.start() - micro));
        assert!(dec.contains(nov.end()));
    }

    #[test]
    fn december_rolls_into_january_and_offsets_are_normalised() {
        let dec = BillingPeriod::containing(datetime!(2026-12-31 23:00 -02:00));
        assert_eq!(dec.start(), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(dec.end(), datetime!(2027-02-01 00:00 UTC));
        let feb_leap = BillingPeriod::containing(datetime!(2028-02-29 12:00 UTC));
        assert_eq!(feb_leap.end(), datetime!(2028-03-01 00:00 UTC));
    }
}
