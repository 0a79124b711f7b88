//! Monthly quotas: per user and period, the count of admitted calls is kept in memory,
//! loaded from the period counter on first use, and checked-and-incremented atomically
//! per call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use time::OffsetDateTime;
use tokio::sync::OnceCell;

use crate::repo::UsageRepository;
use crate::{BillingPeriod, Clock, OverLimit, Plan, PlanCatalog, RepoError, UserId};

/// The answer to "may this call go ahead?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Admitted and counted.
    Admitted(QuotaStatus),
    /// Refused: the plan blocks at its limit, which is reached. Not counted.
    Rejected(QuotaStatus),
}

/// Where a user stands in the current period, for the `X-RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaStatus {
    /// Calls included per period; `None` for unlimited plans (no headers).
    pub limit: Option<u64>,
    /// Admitted calls this period, this one included when admitted.
    pub used: u64,
    /// End of the period: when the count starts again.
    pub reset_at: OffsetDateTime,
}

impl QuotaStatus {
    /// Included calls left, never negative; `None` for unlimited plans.
    pub fn remaining(&self) -> Option<u64> {
        self.limit.map(|limit| limit.saturating_sub(self.used))
    }
}

/// One user's count for one period. The count is loaded once, on first use; a user has
/// slots for at most two periods (this month and the last).
#[derive(Debug)]
struct Slot {
    period: BillingPeriod,
    count: OnceCell<AtomicU64>,
}

/// Quota decisions for every user of this instance.
///
/// Exact on one instance: the check and the increment are one atomic operation, so a
/// free user gets exactly `limit` admitted calls under any concurrency. The counts start
/// from the stored period counters, so a restart (after the tracker's final flush) keeps
/// them.
pub struct QuotaBook {
    slots: RwLock<HashMap<UserId, Vec<Arc<Slot>>>>,
    usage: Arc<dyn UsageRepository>,
    catalog: PlanCatalog,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for QuotaBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaBook")
            .field("catalog", &self.catalog)
            .finish_non_exhaustive()
    }
}

impl QuotaBook {
    /// A book reading stored counters from `usage`.
    pub fn new(
        usage: Arc<dyn UsageRepository>,
        catalog: PlanCatalog,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            slots: RwLock::new(HashMap::new()),
            usage,
            catalog,
            clock,
        }
    }

    /// The plans and prices this book applies.
    pub fn catalog(&self) -> &PlanCatalog {
        &self.catalog
    }

    /// Checks and counts one call of `user_id` on `plan` at the current time.
    pub async fn admit(&self, user_id: &UserId, plan: Plan) -> Result<QuotaDecision, RepoError> {
        self.admit_at(user_id, plan, self.clock.now()).await
    }

    /// Checks and counts one call that arrived at `at`, in the period containing `at`:
    /// the same instant the call is recorded with, so that a call at 23:59:59.999 on the
    /// last day counts in the month its event is stored in.
    pub async fn admit_at(
        &self,
        user_id: &UserId,
        plan: Plan,
        at: OffsetDateTime,
    ) -> Result<QuotaDecision, RepoError> {
        let period = BillingPeriod::containing(at);
        let terms = *self.catalog.terms(plan);
        let status = |used| QuotaStatus {
            limit: terms.monthly_calls,
            used,
            reset_at: period.end(),
        };
        self.with_count(user_id, period, |count| {
            match (terms.monthly_calls, terms.over_limit) {
                (Some(limit), OverLimit::Block) => {
                    // Check and increment in one step: no call slips past the limit.
                    match count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                        (used < limit).then_some(used + 1)
                    }) {
                        Ok(before) => QuotaDecision::Admitted(status(before + 1)),
                        Err(used) => QuotaDecision::Rejected(status(used)),
                    }
                }
                _ => QuotaDecision::Admitted(status(count.fetch_add(1, Ordering::AcqRel) + 1)),
            }
        })
        .await
    }

    /// Admitted calls of `user_id` in the current period, flushed to the store or not.
    pub async fn used(&self, user_id: &UserId) -> Result<u64, RepoError> {
        let period = BillingPeriod::containing(self.clock.now());
        self.with_count(user_id, period, |count| count.load(Ordering::Acquire))
            .await
    }

    /// Runs `f` on the in-memory counter of `user_id` for `period`, loading it from the
    /// stored period counter on first use (once, however many calls arrive together).
    async fn with_count<R>(
        &self,
        user_id: &UserId,
        period: BillingPeriod,
        f: impl FnOnce(&AtomicU64) -> R,
    ) -> Result<R, RepoError> {
        let slot = self.slot(user_id, period);
        let count = slot
            .count
            .get_or_try_init(|| async {
                let stored = self.usage.usage_record(user_id, period.start()).await?;
                Ok::<_, RepoError>(AtomicU64::new(stored.map_or(0, |r| r.api_calls)))
            })
            .await?;
        Ok(f(count))
    }

    fn slot(&self, user_id: &UserId, period: BillingPeriod) -> Arc<Slot> {
        let find = |slots: &[Arc<Slot>]| slots.iter().find(|s| s.period == period).cloned();
        if let Some(slot) = self.read_slots().get(user_id).and_then(|s| find(s)) {
            return slot;
        }
        let mut all = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slots = all.entry(user_id.clone()).or_default();
        if let Some(slot) = find(slots) {
            return slot; // added while we waited for the lock
        }
        // A new month. Calls that arrived just before midnight may still be admitted
        // after it, so the previous month's count is kept beside the new one; older
        // months go.
        let slot = Arc::new(Slot {
            period,
            count: OnceCell::new(),
        });
        slots.push(Arc::clone(&slot));
        slots.sort_by_key(|s| std::cmp::Reverse(s.period));
        slots.truncate(2);
        slot
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, HashMap<UserId, Vec<Arc<Slot>>>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::repo::{ApiKeyRecord, ApiKeyRepository, IncludedCalls, User, UserRepository};
    use crate::{ApiKeyId, ManualClock, PlanTerms, UsageEvent};
    use time::macros::datetime;

    fn catalog(free: u64, pro: u64) -> PlanCatalog {
        let d = PlanCatalog::default();
        PlanCatalog {
            free: PlanTerms {
                monthly_calls: Some(free),
                ..d.free
            },
            pro: PlanTerms {
                monthly_calls: Some(pro),
                ..d.pro
            },
            ..d
        }
    }

    async fn user_with_stored_calls(
        store: &MemoryStore,
        at: OffsetDateTime,
        calls: usize,
    ) -> UserId {
        let user = User {
            id: UserId::generate(),
            email: format!("{}@example.com", crate::ids::random_base62(8)).to_lowercase(),
            plan: Plan::Free,
            stripe_customer_id: None,
            created_at: at,
        };
        store.create_user(&user).await.unwrap();
        let key = ApiKeyRecord {
            id: ApiKeyId::generate(),
            user_id: user.id.clone(),
            name: "k".into(),
            prefix: "eco_live_x".into(),
            key_hash: crate::ids::random_base62(64),
            created_at: at,
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        let events: Vec<UsageEvent> = (0..calls)
            .map(|i| UsageEvent {
                event_id: crate::event::new_event_id(at),
                user_id: user.id.clone(),
                api_key_id: key.id.clone(),
                endpoint: "/api/v1/ping".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 1,
                created_at: at + time::Duration::milliseconds(i as i64),
            })
            .collect();
        store
            .record_usage(&events, &IncludedCalls::new())
            .await
            .unwrap();
        user.id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn free_gets_exactly_the_limit_under_concurrency() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let user = user_with_stored_calls(&store, clock.now(), 0).await;
        let book = Arc::new(QuotaBook::new(store, catalog(100, 1_000), clock));

        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (book, user) = (Arc::clone(&book), user.clone());
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..10 {
                    if matches!(
                        book.admit(&user, Plan::Free).await.unwrap(),
                        QuotaDecision::Admitted(_)
                    ) {
                        admitted += 1;
                    }
                }
                admitted
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        assert_eq!(admitted, 100, "exactly the limit, not one more");
        assert_eq!(
            book.used(&user).await.unwrap(),
            100,
            "rejected calls are not counted"
        );
        let QuotaDecision::Rejected(status) = book.admit(&user, Plan::Free).await.unwrap() else {
            panic!("over the limit");
        };
        assert_eq!((status.limit, status.remaining()), (Some(100), Some(0)));
        assert_eq!(status.reset_at, datetime!(2026-12-01 00:00 UTC));
    }

    #[tokio::test]
    async fn counts_start_from_the_stored_counter_and_roll_over_at_month_end() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-30 23:59:59 UTC)));
        let user = user_with_stored_calls(&store, clock.now(), 8).await;
        let book = QuotaBook::new(store, catalog(10, 1_000), clock.clone());

        // 8 stored before this instance started: 2 left.
        assert!(
            matches!(book.admit(&user, Plan::Free).await.unwrap(), QuotaDecision::Admitted(s) if s.used == 9)
        );
        assert!(
            matches!(book.admit(&user, Plan::Free).await.unwrap(), QuotaDecision::Admitted(s) if s.remaining() == Some(0))
        );
        assert!(matches!(
            book.admit(&user, Plan::Free).await.unwrap(),
            QuotaDecision::Rejected(_)
        ));

        clock.set(datetime!(2026-12-01 00:00 UTC));
        let QuotaDecision::Admitted(status) = book.admit(&user, Plan::Free).await.unwrap() else {
            panic!("a new month starts from zero");
        };
        assert_eq!(
            (status.used, status.reset_at),
            (1, datetime!(2027-01-01 00:00 UTC))
        );
    }

    #[tokio::test]
    async fn a_call_counts_in_the_month_it_arrived_in() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-12-01 00:00:00.001 UTC)));
        let user = user_with_stored_calls(&store, clock.now(), 0).await;
        let book = QuotaBook::new(store, catalog(10, 1_000), clock);
        let arrived = datetime!(2026-11-30 23:59:59.999 UTC);
        let QuotaDecision::Admitted(status) =
            book.admit_at(&user, Plan::Free, arrived).await.unwrap()
        else {
            panic!("admitted");
        };
        assert_eq!(
            status.reset_at,
            datetime!(2026-12-01 00:00 UTC),
            "counted in November"
        );
        assert_eq!(
            book.used(&user).await.unwrap(),
            0,
            "December has nothing yet"
        );
        // Calls of both months interleave around midnight; neither count is lost.
        book.admit(&user, Plan::Free).await.unwrap();
        book.admit_at(&user, Plan::Free, arrived).await.unwrap();
        book.admit(&user, Plan::Free).await.unwrap();
        let QuotaDecision::Admitted(nov) = book.admit_at(&user, Plan::Free, arrived).await.unwrap()
        else {
            panic!("admitted");
        };
        assert_eq!(nov.used, 3);
        assert_eq!(book.used(&user).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn pro_goes_on_past_its_limit_and_enterprise_has_none() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let user = user_with_stored_calls(&store, clock.now(), 0).await;
        let book = QuotaBook::new(store, catalog(1, 2), clock);
        let mut last = None;
        for _ in 0..5 {
            let QuotaDecision::Admitted(status) = book.admit(&user, Plan::Pro).await.unwrap()
            else {
                panic!("pro is never blocked");
            };
            last = Some(status);
        }
        let last = last.unwrap();
        assert_eq!((last.used, last.remaining()), (5, Some(0)));
        assert_eq!(book.catalog().overage_calls(Plan::Pro, last.used), 3);

        let other = UserId::generate();
        let QuotaDecision::Admitted(status) = book.admit(&other, Plan::Enterprise).await.unwrap()
        else {
            panic!("enterprise is never blocked");
        };
        assert_eq!((status.limit, status.remaining()), (None, None));
    }
}
