//! A usage repository that stores nothing, for measuring the metering apart from the
//! database (`usage-server --bench-discard-usage`, `bench_meter`).

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::repo::{
    DeadLetter, EndpointStats, IncludedCalls, RecordOutcome, UsagePrune, UsageRecord,
    UsageRepository,
};
use crate::{RepoError, UsageEvent, UserId};

/// A usage sink that takes every batch and stores nothing: benchmarks use it to measure
/// the metering apart from the database writes (`usage-server --bench-discard-usage`).
/// Every read finds nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiscardUsage;

#[async_trait]
impl UsageRepository for DiscardUsage {
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
        _after: Option<Uuid>,
        _limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError> {
        Ok(Vec::new())
    }
    async fn remove_dead_letters(&self, _event_ids: &[Uuid]) -> Result<u64, RepoError> {
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
            meter_events: 0,
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
        _after: Option<(OffsetDateTime, Uuid)>,
        _limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError> {
        Ok(Vec::new())
    }
}
