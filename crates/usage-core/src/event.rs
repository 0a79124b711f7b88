//! Usage events: one per admitted call.

use std::sync::Arc;

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
    /// What the call took of meters other than `api_calls`: its route's costs and the
    /// units its handler reported. Empty for most calls.
    pub units: Units,
}

/// Units by meter that one call took or reported (`tokens=1234;credits=10` as stored).
/// The same meter given twice adds up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Units(Vec<(Arc<str>, u64)>);

impl Units {
    /// No units.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `quantity` of `meter` (saturating: a quantity never wraps).
    pub fn add(&mut self, meter: impl Into<Arc<str>>, quantity: u64) {
        let meter = meter.into();
        match self.0.iter_mut().find(|(m, _)| *m == meter) {
            Some((_, q)) => *q = q.saturating_add(quantity),
            None => self.0.push((meter, quantity)),
        }
    }

    /// Keeps the entries `keep` says to, each quantity as `keep` leaves it.
    pub fn retain(&mut self, mut keep: impl FnMut(&Arc<str>, &mut u64) -> bool) {
        self.0.retain_mut(|(meter, quantity)| keep(meter, quantity));
    }

    /// Adds every entry of `other`.
    pub fn extend(&mut self, other: &Units) {
        for (meter, quantity) in other.iter() {
            self.add(Arc::clone(meter), quantity);
        }
    }

    /// The entries, in the order first given.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, u64)> {
        self.0.iter().map(|(m, q)| (m, *q))
    }

    /// The quantity of `meter` (0 when absent).
    pub fn get(&self, meter: &str) -> u64 {
        self.0
            .iter()
            .find(|(m, _)| &**m == meter)
            .map_or(0, |(_, q)| *q)
    }

    /// The stored form, `None` when empty: `meter=quantity` pairs joined by `;` (meter
    /// keys are `[a-z0-9_-]`, so neither sign can occur in one).
    pub fn to_stored(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        use std::fmt::Write as _;
        // One allocation: each pair is its key, '=' and at most 20 digits.
        let length: usize = self.0.iter().map(|(meter, _)| meter.len() + 22).sum();
        let mut text = String::with_capacity(length);
        for (i, (meter, quantity)) in self.0.iter().enumerate() {
            if i > 0 {
                text.push(';');
            }
            text.push_str(meter);
            let _ = write!(text, "={quantity}"); // writing to a String cannot fail
        }
        Some(text)
    }

    /// Reads the stored form back; `None` for text it did not write.
    pub fn from_stored(text: Option<&str>) -> Option<Self> {
        let mut units = Units::new();
        for (meter, quantity) in Self::stored_pairs(text.unwrap_or_default())? {
            units.add(meter, quantity);
        }
        Some(units)
    }

    /// The (meter, quantity) pairs of stored units, borrowing the text (`None` if it is
    /// not what [`Units::to_stored`] writes): for the store, which adds up thousands of
    /// calls' units a batch without making them owned units first.
    pub fn stored_pairs(text: &str) -> Option<Vec<(&str, u64)>> {
        if text.is_empty() {
            return Some(Vec::new());
        }
        text.split(';')
            .map(|pair| {
                let (meter, quantity) = pair.split_once('=')?;
                crate::plan::is_valid_key(meter).then_some(())?;
                Some((meter, quantity.parse().ok()?))
            })
            .collect()
    }
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
    fn units_add_up_by_meter_and_read_back_as_stored() {
        let mut units = Units::new();
        assert_eq!(units.to_stored(), None);
        units.add("tokens", 1_234);
        units.add("credits", 10);
        units.add("tokens", 6);
        assert_eq!(units.get("tokens"), 1_240);
        assert_eq!(units.get("bytes"), 0);
        let stored = units.to_stored().unwrap();
        assert_eq!(stored, "tokens=1240;credits=10");
        assert_eq!(Units::from_stored(Some(&stored)), Some(units.clone()));
        assert_eq!(Units::from_stored(None), Some(Units::new()));
        for bad in ["tokens", "tokens=x", "Tokens=1", "tokens=-1", "a=1;;b=2"] {
            assert_eq!(Units::from_stored(Some(bad)), None, "{bad}");
        }
        let mut max = Units::new();
        max.add("tokens", u64::MAX);
        max.extend(&units);
        assert_eq!(max.get("tokens"), u64::MAX, "saturates");
        assert_eq!(
            max.to_stored().unwrap(),
            format!("tokens={};credits=10", u64::MAX)
        );
        max.retain(|meter, quantity| {
            *quantity = (*quantity).min(7);
            &**meter != "credits"
        });
        assert_eq!(max.to_stored().unwrap(), "tokens=7");
    }

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
