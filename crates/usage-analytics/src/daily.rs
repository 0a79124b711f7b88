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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    Date::parse(raw, &format)
        .ok()
        .filter(|d| usage_core::clock::CALLER_YEARS.contains(&d.year()))
        .ok_or_else(|| AnalyticsError::InvalidParameter {
            name: "date",
            message: format!(
                "date must be a day as YYYY-MM-DD, from 0000-01-01 to 9999-12-31 (got {raw:?})"
            ),
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

    /// Aggregates every past day that has no current aggregate: days the schedule missed
    /// (the server was down at midnight, or started later) and days with calls stored
    /// after their aggregation (a spool replay, an outage). Looks back to the oldest
    /// stored call, at most `lookback_days`. Returns what it aggregated, oldest first;
    /// stops at the first failure (the next run goes on from there).
    pub async fn catch_up(
        &self,
        lookback_days: u32,
    ) -> Result<Vec<AggregationReport>, AnalyticsError> {
        let now = self.clock.now();
        let yesterday = now.date() - Duration::days(1);
        let Some(oldest) = self.daily.first_usage_day().await? else {
            return Ok(Vec::new());
        };
        let from = oldest.max(now.date() - Duration::days(i64::from(lookback_days)));
        if from > yesterday {
            return Ok(Vec::new());
        }
        let current: std::collections::HashSet<Date> = self
            .daily
            .aggregated_days(from, yesterday)
            .await?
            .into_iter()
            .collect();
        let mut done = Vec::new();
        let mut day = from;
        while day <= yesterday {
            if !current.contains(&day) {
                done.push(self.run(Some(day)).await?);
            }
            day += Duration::days(1);
        }
        Ok(done)
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
    use usage_testkit::memory::MemoryStore;

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

    #[tokio::test]
    async fn catch_up_aggregates_missed_and_late_days_only() {
        use usage_core::repo::{
            ApiKeyRecord, ApiKeyRepository, UsageRepository, User, UserRepository,
        };
        use usage_core::{ApiKeyId, Plan, UserId};
        // Days before the real today, so that the store takes them as ended.
        let today = OffsetDateTime::now_utc().date();
        let clock = Arc::new(ManualClock::new(
            today.midnight().assume_utc() + Duration::hours(1),
        ));
        let store = Arc::new(MemoryStore::new());
        let user = User {
            id: UserId::generate(),
            email: "ada@example.com".into(),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: clock.now(),
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await.unwrap();
        let key = ApiKeyRecord {
            id: ApiKeyId::generate(),
            user_id: user.id.clone(),
            name: "k".into(),
            prefix: "eco_live_abcd".into(),
            key_hash: "0".repeat(64),
            created_at: clock.now(),
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        let call_on = |days_ago: i64| {
            let at =
                (today - Duration::days(days_ago)).midnight().assume_utc() + Duration::hours(12);
            usage_core::UsageEvent {
                event_id: usage_core::event::new_event_id(at),
                user_id: user.id.clone(),
                api_key_id: key.id.clone(),
                endpoint: "/api/v1/ping".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 1,
                created_at: at,
                units: Default::default(),
            }
        };
        let included = Default::default();
        store
            .record_usage(&[call_on(5), call_on(3), call_on(0)], &included)
            .await
            .unwrap();
        let job = DailyAggregation::new(store.clone(), clock);
        let days = |r: Vec<AggregationReport>| r.into_iter().map(|r| r.date).collect::<Vec<_>>();
        // Every day from the oldest call to yesterday, empty ones included; never today.
        let first = days(job.catch_up(400).await.unwrap());
        assert_eq!(
            first,
            (1..=5)
                .rev()
                .map(|n| today - Duration::days(n))
                .collect::<Vec<_>>()
        );
        assert!(job.catch_up(400).await.unwrap().is_empty(), "nothing left");
        // A call stored late for 3 days ago: only that day again.
        store.record_usage(&[call_on(3)], &included).await.unwrap();
        assert_eq!(
            days(job.catch_up(400).await.unwrap()),
            vec![today - Duration::days(3)]
        );
        // The lookback bounds how far back it goes.
        store.record_usage(&[call_on(5)], &included).await.unwrap();
        assert!(job.catch_up(4).await.unwrap().is_empty());
        assert_eq!(
            days(job.catch_up(5).await.unwrap()),
            vec![today - Duration::days(5)]
        );
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
