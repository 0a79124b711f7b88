//! The daily aggregation: one row per user and UTC day in `eco_usage_daily`, rebuilt from
//! the raw events by the store in one set-based statement.

use std::sync::Arc;

use serde::Serialize;
use time::{Date, Duration, OffsetDateTime};
use usage_core::repo::DailyUsageRepository;
use usage_core::{Clock, RepoError};

use crate::AnalyticsError;

/// What one aggregation run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AggregationReport {
    /// The UTC day aggregated.
    #[serde(with = "date_format")]
    pub date: Date,
    /// Users with calls that day.
    pub users: u64,
}

time::serde::format_description!(pub(crate) date_format, Date, "[year]-[month]-[day]");

/// Parses `YYYY-MM-DD`, naming the parameter in the error.
pub fn parse_day(raw: &str) -> Result<Date, AnalyticsError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(raw, &format).map_err(|_| AnalyticsError::InvalidParameter {
        name: "date",
        message: format!("date must be a day as YYYY-MM-DD (got {raw:?})"),
    })
}

/// Runs the daily aggregation.
#[derive(Clone)]
pub struct DailyAggregation {
    daily: Arc<dyn DailyUsageRepository>,
    clock: Arc<dyn Clock>,
}

impl DailyAggregation {
    /// An aggregation over `daily`.
    pub fn new(daily: Arc<dyn DailyUsageRepository>, clock: Arc<dyn Clock>) -> Self {
        Self { daily, clock }
    }

    /// The day before today, UTC: the default day to aggregate.
    pub fn yesterday(&self) -> Date {
        (self.clock.now() - Duration::days(1)).date()
    }

    /// Rebuilds `date`'s rows (default: yesterday). Idempotent. Refuses days after today.
    pub async fn run(&self, date: Option<Date>) -> Result<AggregationReport, AnalyticsError> {
        let now = self.clock.now();
        let date = date.unwrap_or_else(|| self.yesterday());
        if date > now.date() {
            return Err(AnalyticsError::InvalidParameter {
                name: "date",
                message: format!("date must not be after today ({})", now.date()),
            });
        }
        let users = self
            .daily
            .aggregate_usage_day(date, now)
            .await
            .map_err(|e: RepoError| AnalyticsError::Repo(e))?;
        Ok(AggregationReport { date, users })
    }

    /// The next time the built-in schedule runs: `after_midnight` past the next UTC midnight.
    pub fn next_run(now: OffsetDateTime, after_midnight: Duration) -> OffsetDateTime {
        let today = now.date().midnight().assume_utc() + after_midnight;
        if now < today {
            today
        } else {
            today + Duration::days(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};
    use usage_core::ManualClock;
    use usage_core::memory::MemoryStore;

    #[tokio::test]
    async fn defaults_to_yesterday_and_refuses_the_future() {
        let clock = Arc::new(ManualClock::new(datetime!(2026-12-01 00:05 UTC)));
        let job = DailyAggregation::new(Arc::new(MemoryStore::new()), clock);
        let report = job.run(None).await.unwrap();
        assert_eq!(
            report,
            AggregationReport {
                date: date!(2026 - 11 - 30),
                users: 0
            }
        );
        assert_eq!(
            serde_json::to_value(report).unwrap(),
            serde_json::json!({"date": "2026-11-30", "users": 0})
        );
        assert!(
            job.run(Some(date!(2026 - 12 - 01))).await.is_ok(),
            "today may be rebuilt"
        );
        let err = job.run(Some(date!(2026 - 12 - 02))).await.unwrap_err();
        assert_eq!(err.to_string(), "date must not be after today (2026-12-01)");
    }

    #[test]
    fn days_are_parsed_strictly_and_the_schedule_is_after_midnight() {
        assert_eq!(parse_day("2026-11-21").unwrap(), date!(2026 - 11 - 21));
        for bad in [
            "",
            "2026-11-31",
            "21/11/2026",
            "2026-11-21T00:00",
            "yesterday",
        ] {
            let err = parse_day(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("date must be a day as YYYY-MM-DD"),
                "{bad}: {err}"
            );
        }
        let five = Duration::minutes(5);
        assert_eq!(
            DailyAggregation::next_run(datetime!(2026-11-22 00:01 UTC), five),
            datetime!(2026-11-22 00:05 UTC)
        );
        assert_eq!(
            DailyAggregation::next_run(datetime!(2026-11-22 00:05 UTC), five),
            datetime!(2026-11-23 00:05 UTC)
        );
        assert_eq!(
            DailyAggregation::next_run(datetime!(2026-11-30 13:00 UTC), five),
            datetime!(2026-12-01 00:05 UTC)
        );
    }
}
