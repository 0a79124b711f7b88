//! Usage events: one per admitted call.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::{ApiKeyId, UserId};

/// One admitted call, as written to `eco_api_usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    /// Unique id (UUID v7, time-ordered); a replayed event keeps its id and is stored once.
    pub event_id: Uuid,
    /// The caller.
    pub user_id: UserId,
    /// The key the call came with.
    pub api_key_id: ApiKeyId,
    /// The matched route pattern, e.g. `/api/v1/items/{id}`.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// HTTP status of the response.
    pub status_code: u16,
    /// Time to produce the response.
    pub response_time_ms: u32,
    /// When the call arrived (UTC, microseconds).
    pub created_at: OffsetDateTime,
}

/// A new UUID v7 for an event at `at`, so event ids sort by time even under a fake clock.
pub fn new_event_id(at: OffsetDateTime) -> Uuid {
    let nanos = at.unix_timestamp_nanos().max(0);
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(0);
    let subsec = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, subsec))
}
