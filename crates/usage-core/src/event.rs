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

/// One finished call to record: the event, and what its plan includes (the tracker's and
/// the spool's unit).
#[derive(Debug, Clone)]
pub struct TrackedCall {
    /// The event to store.
    pub event: UsageEvent,
    /// Calls the caller's plan includes before overage; `None` when overage does not
    /// apply (unlimited or blocking plans).
    pub included_calls: Option<u64>,
}

/// A new UUID v7 for an event at `at`, so event ids sort by time even under a fake clock.
///
/// The 74 random bits come from the thread's CSPRNG rather than a `getrandom` system
/// call per id, which would cost more than the rest of the id's making on the hot path.
pub fn new_event_id(at: OffsetDateTime) -> Uuid {
    let millis = u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn event_ids_are_v7_unique_and_ordered_by_time() {
        let a = new_event_id(datetime!(2026-11-22 10:00:00.001 UTC));
        let b = new_event_id(datetime!(2026-11-22 10:00:00.002 UTC));
        assert_eq!(a.get_version_num(), 7);
        assert!(a < b, "a later millisecond sorts later");
        let same_ms: std::collections::HashSet<Uuid> = (0..1_000)
            .map(|_| new_event_id(datetime!(2026-11-22 10:00 UTC)))
            .collect();
        assert_eq!(same_ms.len(), 1_000);
        let (secs, _) = a.get_timestamp().unwrap().to_unix();
        assert_eq!(
            secs,
            datetime!(2026-11-22 10:00 UTC).unix_timestamp() as u64
        );
    }
}
