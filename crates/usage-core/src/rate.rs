//! An optional short-window rate limit per user: requests per second with a burst,
//! by GCRA (the generic cell rate algorithm), on the injectable [`Clock`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Clock, Plan, UserId};

/// A rate: `per_second` requests sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RateLimit {
    /// Sustained requests per second (at least 1).
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub per_second: u32,
    /// Requests allowed at once after a quiet period (at least 1).
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub burst: u32,
}

/// The short-window limit of each plan; `None` is no limit (the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanRateLimits {
    /// Free plan.
    pub free: Option<RateLimit>,
    /// Pro plan.
    pub pro: Option<RateLimit>,
    /// Enterprise plan.
    pub enterprise: Option<RateLimit>,
}

impl PlanRateLimits {
    /// The limit of `plan` when it is a built-in plan.
    pub fn of(&self, plan: &Plan) -> Option<RateLimit> {
        match plan.as_str() {
            "free" => self.free,
            "pro" => self.pro,
            "enterprise" => self.enterprise,
            _ => None,
        }
    }

    /// Whether any plan has a limit.
    pub fn any(&self) -> bool {
        self.free.is_some() || self.pro.is_some() || self.enterprise.is_some()
    }
}

/// The short-window decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// The plan has no short-window limit.
    Unlimited,
    /// Within the limit.
    Allowed {
        /// The limit that applies.
        rate: RateLimit,
        /// Requests that could still go at once.
        remaining: u32,
        /// Until the whole burst is back, if no other request comes.
        full_in: Duration,
    },
    /// Over the limit; not counted.
    Limited {
        /// The limit that was hit.
        rate: RateLimit,
        /// When the next request would be allowed.
        retry_after: Duration,
    },
}

/// Entries kept before stale ones (already back to a full burst) are swept.
const SWEEP_AT: usize = 100_000;

/// GCRA state per user: the theoretical arrival time, in microseconds since the epoch.
/// Each check says the rate that applies (the user's plan's burst limit).
pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    tat: Mutex<HashMap<UserId, i128>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            tat: Mutex::new(HashMap::new()),
        }
    }

    /// Checks (and, when allowed, counts) one request of `user_id` under `rate`.
    pub fn check(&self, user_id: &UserId, rate: Option<RateLimit>) -> RateDecision {
        let Some(rate) = rate else {
            return RateDecision::Unlimited;
        };
        let interval = 1_000_000 / i128::from(rate.per_second.max(1));
        let burst = i128::from(rate.burst.max(1));
        let tolerance = interval * burst;
        let now = self.clock.now().unix_timestamp_nanos() / 1_000;

        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        if tat.len() >= SWEEP_AT {
            tat.retain(|_, t| *t > now);
        }
        let current = tat.get(user_id).copied().unwrap_or(now).max(now);
        let next = current + interval;
        if next - now > tolerance {
            let wait = next - now - tolerance;
            return RateDecision::Limited {
                rate,
                retry_after: Duration::from_micros(u64::try_from(wait).unwrap_or(u64::MAX)),
            };
        }
        match tat.get_mut(user_id) {
            Some(t) => *t = next,
            None => {
                tat.insert(user_id.clone(), next);
            }
        }
        let remaining = (tolerance - (next - now)) / interval;
        RateDecision::Allowed {
            rate,
            remaining: u32::try_from(remaining).unwrap_or(0),
            full_in: Duration::from_micros(u64::try_from(next - now).unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use time::macros::datetime;

    const FREE: Option<RateLimit> = Some(RateLimit {
        per_second: 2,
        burst: 3,
    });

    fn limiter(clock: Arc<ManualClock>) -> RateLimiter {
        RateLimiter::new(clock)
    }

    #[test]
    fn burst_then_sustained_rate() {
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let limiter = limiter(clock.clone());
        let user = UserId::generate();
        let remaining: Vec<_> = (0..3)
            .map(|_| match limiter.check(&user, FREE) {
                RateDecision::Allowed { remaining, .. } => remaining,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        let RateDecision::Limited { retry_after, .. } = limiter.check(&user, FREE) else {
            panic!("the fourth request at once must be limited");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        // Half a second later exactly one more fits (2 per second).
        clock.advance(time::Duration::milliseconds(500));
        assert!(matches!(
            limiter.check(&user, FREE),
            RateDecision::Allowed { remaining: 0, .. }
        ));
        assert!(matches!(
            limiter.check(&user, FREE),
            RateDecision::Limited { .. }
        ));
        // After a quiet period the full burst is back.
        clock.advance(time::Duration::seconds(10));
        assert!(matches!(
            limiter.check(&user, FREE),
            RateDecision::Allowed { remaining: 2, .. }
        ));
    }

    #[test]
    fn users_and_plans_are_separate() {
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let limiter = limiter(clock);
        let (a, b) = (UserId::generate(), UserId::generate());
        for _ in 0..3 {
            limiter.check(&a, FREE);
        }
        assert!(matches!(
            limiter.check(&a, FREE),
            RateDecision::Limited { .. }
        ));
        assert!(matches!(
            limiter.check(&b, FREE),
            RateDecision::Allowed { .. }
        ));
        assert_eq!(limiter.check(&a, None), RateDecision::Unlimited);
    }
}
