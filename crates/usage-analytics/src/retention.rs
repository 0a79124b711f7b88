//! Retention of raw calls (`USAGE_RETENTION_DAYS`): calls older than the retention are
//! removed, but never a call whose day is not aggregated yet (the history of past days
//! comes from the daily aggregate once the raw calls are gone) or whose period's overage
//! is not all invoiced (billing disputes need the calls). Such a day or period holds the
//! cutoff back, and the report says which.

use std::sync::Arc;

use serde::Serialize;
use time::{Duration, OffsetDateTime};
use usage_core::repo::UsagePrune;
use usage_core::{Clock, Store};

use crate::{AnalyticsError, DailyAggregation};

/// Longest retention accepted, in days (100 years).
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// What a retention run removed (or, dry, would remove).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Nothing was removed.
    pub dry_run: bool,
    /// The retention in force.
    pub retention_days: u32,
    /// Calls before this would go by the retention alone.
    #[serde(with = "time::serde::rfc3339")]
    pub requested_before: OffsetDateTime,
    /// Calls before this were removed (or would be): `requested_before`, or earlier when
    /// something holds it back (or, on PostgreSQL, at the start of the month it falls in:
    /// a month's partition goes whole).
    #[serde(with = "time::serde::rfc3339")]
    pub before: OffsetDateTime,
    /// Why `before` is earlier than `requested_before`.
    pub held_back: Vec<String>,
    /// Calls removed (or that would be).
    pub rows: u64,
    /// PostgreSQL partitions dropped whole (or that would be).
    pub partitions: Vec<String>,
    /// Events other services sent before `before`, removed (or that would be).
    pub meter_events: u64,
}

/// Removes raw calls past the retention, over a [`Store`].
#[derive(Clone)]
pub struct UsageRetention {
    store: Arc<dyn Store>,
    aggregation: DailyAggregation,
    clock: Arc<dyn Clock>,
    days: u32,
}

impl std::fmt::Debug for UsageRetention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageRetention")
            .field("days", &self.days)
            .finish_non_exhaustive()
    }
}

impl UsageRetention {
    /// Keeps `days` days of raw calls in `store` (1 to [`MAX_RETENTION_DAYS`]).
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, days: u32) -> Self {
        Self {
            aggregation: DailyAggregation::new(store.clone(), clock.clone()),
            store,
            clock,
            days,
        }
    }

    /// Aggregates the days not aggregated yet (not in a dry run), then removes the calls
    /// before the cutoff: midnight UTC `days` days ago, held back to the first day not
    /// aggregated and to the start of the first period with overage not all invoiced.
    pub async fn run(&self, dry_run: bool) -> Result<RetentionReport, AnalyticsError> {
        let now = self.clock.now();
        let requested_before = (now.date() - Duration::days(i64::from(self.days)))
            .midnight()
            .assume_utc();
        let mut before = requested_before;
        let mut held_back = Vec::new();
        if let Some(first) = self.store.first_usage_day().await?
            && first < requested_before.date()
        {
            if !dry_run {
                let lookback = (now.date() - first).whole_days();
                self.aggregation
                    .catch_up(u32::try_from(lookback).unwrap_or(u32::MAX))
                    .await?;
            }
            let last = requested_before.date() - Duration::days(1);
            let current: std::collections::HashSet<_> = self
                .store
                .aggregated_days(first, last)
                .await?
                .into_iter()
                .collect();
            let mut day = first;
            while day <= last {
                if !current.contains(&day) {
                    held_back.push(format!("{day} is not aggregated yet"));
                    before = before.min(day.midnight().assume_utc());
                    break;
                }
                day += Duration::days(1);
            }
        }
        if let Some(open) = self
            .store
            .uninvoiced_overage()
            .await?
            .into_iter()
            .filter(|o| o.period_start < before)
            .min_by_key(|o| o.period_start)
        {
            held_back.push(format!(
                "user {} has overage of the period starting {} not invoiced yet",
                open.user_id,
                open.period_start.date()
            ));
            before = open.period_start;
        }
        let UsagePrune {
            before,
            rows,
            partitions,
            meter_events,
        } = self.store.prune_usage(before, dry_run).await?;
        Ok(RetentionReport {
            dry_run,
            retention_days: self.days,
            requested_before,
            before,
            held_back,
            rows,
            partitions,
            meter_events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use usage_core::event::new_event_id;
    use usage_core::repo::{
        ApiKeyRecord, ApiKeyRepository, DailyUsageRepository, IncludedCalls, UsageRepository, User,
        UserRepository,
    };
    use usage_core::{ApiKeyId, ManualClock, Plan, UsageEvent, UserId};
    use usage_testkit::memory::MemoryStore;

    async fn user_with_calls(
        store: &MemoryStore,
        plan: Plan,
        days: &[OffsetDateTime],
        included: u64,
    ) -> UserId {
        let id = UserId::generate();
        let user = User {
            email: format!("{}@example.com", id.as_str()),
            id,
            plan,
            stripe_customer_id: None,
            created_at: datetime!(2026-01-01 00:00 UTC),
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
            key_hash: format!("{:0>64}", user.id.as_str()),
            created_at: datetime!(2026-01-01 00:00 UTC),
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        let events: Vec<UsageEvent> = days
            .iter()
            .map(|at| UsageEvent {
                event_id: new_event_id(*at),
                user_id: user.id.clone(),
                api_key_id: key.id.clone(),
                endpoint: "/api/v1/ping".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 1,
                created_at: *at,
                units: Default::default(),
            })
            .collect();
        let mut limits = IncludedCalls::new();
        limits.insert(user.id.clone(), included);
        store.record_usage(&events, &limits).await.unwrap();
        user.id
    }

    #[tokio::test]
    async fn aggregates_first_and_holds_back_for_uninvoiced_overage() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-12-10 12:00 UTC)));
        let old = [
            datetime!(2026-09-03 10:00 UTC),
            datetime!(2026-10-05 10:00 UTC),
            datetime!(2026-12-09 10:00 UTC),
        ];
        let ada = user_with_calls(&store, Plan::pro(), &old, 100).await;
        let retention = UsageRetention::new(store.clone(), clock.clone(), 60);

        // Dry: the days are not aggregated yet, so nothing would go.
        let dry = retention.run(true).await.unwrap();
        assert_eq!(dry.requested_before, datetime!(2026-10-11 00:00 UTC));
        assert_eq!(dry.before, datetime!(2026-09-03 00:00 UTC));
        assert_eq!(dry.rows, 0);
        assert!(
            dry.held_back[0].contains("2026-09-03 is not aggregated"),
            "{dry:?}"
        );

        // A run aggregates the days first, then removes September's and October's calls.
        let run = retention.run(false).await.unwrap();
        assert_eq!((run.before, run.rows), (run.requested_before, 2), "{run:?}");
        assert!(run.held_back.is_empty());
        let daily = store
            .daily_usage(
                &ada,
                datetime!(2026-09-01 00:00 UTC).date(),
                datetime!(2026-10-31 00:00 UTC).date(),
            )
            .await
            .unwrap();
        assert_eq!(
            daily.iter().map(|d| d.api_calls).sum::<u64>(),
            2,
            "the history keeps them"
        );

        // Overage of September not invoiced: the cutoff stops at September.
        let bob_days = [
            datetime!(2026-09-20 10:00 UTC),
            datetime!(2026-09-21 10:00 UTC),
        ];
        let bob = user_with_calls(&store, Plan::pro(), &bob_days, 1).await;
        let run = retention.run(false).await.unwrap();
        assert_eq!(run.before, datetime!(2026-09-01 00:00 UTC));
        assert_eq!(run.rows, 0);
        assert!(
            run.held_back.iter().any(|h| h.contains(bob.as_str())),
            "{run:?}"
        );
        let bob_september = UsageRepository::count_usage_events(
            store.as_ref(),
            &bob,
            datetime!(2026-09-01 00:00 UTC),
            datetime!(2026-10-01 00:00 UTC),
        )
        .await
        .unwrap();
        assert_eq!(bob_september, 2, "uninvoiced calls stay raw");
    }
}
