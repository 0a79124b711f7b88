//! Time as a dependency, so tests can move it.

use std::fmt::Debug;
use std::sync::Mutex;

use time::{Duration, OffsetDateTime};

/// A source of the current time. Production uses [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync + Debug {
    /// The current time in UTC, truncated to microseconds (what the databases keep).
    fn now(&self) -> OffsetDateTime;
}

/// Truncates to whole microseconds, the precision of PostgreSQL's `timestamptz`, so that
/// a timestamp read back from any store equals the one written.
pub fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let nanos = t.nanosecond();
    t.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(t)
}

/// The first and last years a time given by a caller may fall in, once converted to UTC
/// (`../shared/API.md`, "Hardening rules"): every store and format we use holds them.
pub const CALLER_YEARS: std::ops::RangeInclusive<i32> = 0..=9999;

/// `t` in UTC when its UTC year is within [`CALLER_YEARS`]; `None` otherwise, including
/// when the conversion itself would leave the representable range (`9999-12-31T23:59:59-00:01`).
///
/// ```
/// use time::macros::datetime;
/// use usage_core::clock::caller_instant;
/// assert_eq!(caller_instant(datetime!(2026-12-01 01:00 +01:00)), Some(datetime!(2026-12-01 00:00 UTC)));
/// assert_eq!(caller_instant(datetime!(9999-12-31 23:59:59 -00:01)), None);
/// assert_eq!(caller_instant(datetime!(0000-01-01 00:00 +00:01)), None);
/// ```
pub fn caller_instant(t: OffsetDateTime) -> Option<OffsetDateTime> {
    t.checked_to_offset(time::UtcOffset::UTC)
        .filter(|utc| CALLER_YEARS.contains(&utc.year()))
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        truncate_to_micros(OffsetDateTime::now_utc())
    }
}

/// The system clock shifted by a fixed offset: it reads `start` at the moment it is made
/// and runs at the normal pace from there. For tests and demos that must run a real
/// server on another day (a month boundary, say); never for production.
///
/// ```
/// use usage_core::{Clock, ShiftedClock};
/// use time::macros::datetime;
///
/// let clock = ShiftedClock::starting_at(datetime!(2026-11-30 23:59:59 UTC));
/// assert!(clock.now() >= datetime!(2026-11-30 23:59:59 UTC));
/// assert!(clock.now() < datetime!(2026-12-01 00:59:59 UTC));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ShiftedClock {
    offset: Duration,
}

impl ShiftedClock {
    /// A clock that reads `start` now.
    pub fn starting_at(start: OffsetDateTime) -> Self {
        Self {
            offset: start - OffsetDateTime::now_utc(),
        }
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> OffsetDateTime {
        truncate_to_micros(OffsetDateTime::now_utc() + self.offset)
    }
}

/// A clock that only moves when told to.
///
/// ```
/// use usage_core::{Clock, ManualClock};
/// use time::{Duration, macros::datetime};
///
/// let clock = ManualClock::new(datetime!(2026-11-30 23:59 UTC));
/// clock.advance(Duration::minutes(1));
/// assert_eq!(clock.now(), datetime!(2026-12-01 00:00 UTC));
/// ```
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self {
            now: Mutex::new(truncate_to_micros(now)),
        }
    }

    /// Moves the clock to `now`.
    pub fn set(&self, now: OffsetDateTime) {
        *self.lock() = truncate_to_micros(now);
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.lock();
        *now = truncate_to_micros(*now + by);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OffsetDateTime> {
        // A poisoned clock still holds a valid time.
        self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.lock()
    }
}
