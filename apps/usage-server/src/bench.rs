//! Benchmark baselines only (hidden options): a usage sink that drops every call, so
//! that a benchmark can measure the middleware's own cost apart from the database writes.

use async_trait::async_trait;
use time::OffsetDateTime;
use usage_core::repo::{
    DeadLetter, EndpointStats, IncludedCalls, RecordOutcome, UsagePrune, UsageRecord,
    UsageRepository,
};
use usage_core::{RepoError, UsageEvent, UserId};

/// Takes every batch and stores nothing (`--bench-discard-usage`).
pub(crate) struct DiscardedUsage;

#[async_trait]
impl UsageRepository for DiscardedUsage {
    async fn record_usage(
        &self,
        events: &[UsageEvent],
        _included: &IncludedCalls,
    ) -> Result<RecordOutcome, RepoError> {
        Ok(RecordOutcome {
            inserted: events.len() as u64,
            duplicates: 0,
        })
    }
    async fn usage_record(
        &self,
        _user_id: &UserId,
        _period_start: OffsetDateTime,
    ) -> Result<Option<UsageRecord>, RepoError> {
        Ok(None)
    }
    async fn endpoint_stats(
        &self,
        _user_id: &UserId,
        _from: OffsetDateTime,
        _to: OffsetDateTime,
    ) -> Result<Vec<EndpointStats>, RepoError> {
        Ok(Vec::new())
    }
    async fn count_usage_events(
        &self,
        _user_id: &UserId,
        _from: OffsetDateTime,
        _to: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        Ok(0)
    }
    async fn record_dead_letters(&self, _letters: &[DeadLetter]) -> Result<(), RepoError> {
        Ok(())
    }
    async fn dead_letters(
        &self,
        _after: Option<uuid::Uuid>,
        _limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError> {
        Ok(Vec::new())
    }
    async fn remove_dead_letters(&self, _event_ids: &[uuid::Uuid]) -> Result<u64, RepoError> {
        Ok(0)
    }
    async fn prepare_usage_storage(
        &self,
        _now: OffsetDateTime,
        _months_ahead: u32,
    ) -> Result<Vec<String>, RepoError> {
        Ok(Vec::new())
    }
    async fn prune_usage(
        &self,
        before: OffsetDateTime,
        _dry_run: bool,
    ) -> Result<UsagePrune, RepoError> {
        Ok(UsagePrune {
            before,
            rows: 0,
            partitions: Vec::new(),
        })
    }
    async fn usage_events_page(
        &self,
        _user_id: &UserId,
        _from: OffsetDateTime,
        _to: OffsetDateTime,
        _after: Option<(OffsetDateTime, uuid::Uuid)>,
        _limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError> {
        Ok(Vec::new())
    }
}
