//! The figures a customer sees about their own usage.

use std::sync::Arc;

use thiserror::Error;
use usage_core::quota::QuotaBook;
use usage_core::repo::UserRepository;
use usage_core::{BillingPeriod, Clock, RepoError, UserId};

use crate::CurrentUsage;

/// Why a report could not be made.
#[derive(Debug, Error)]
pub enum AnalyticsError {
    /// No user has this id.
    #[error("no user with id {0}")]
    UnknownUser(UserId),
    /// A parameter outside its form or range; the message names it.
    #[error("{message}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Usage reports for one instance: live counts come from its [`QuotaBook`], so calls
/// admitted but not yet written are included.
#[derive(Clone)]
pub struct UsageReports {
    users: Arc<dyn UserRepository>,
    quota: Arc<QuotaBook>,
    clock: Arc<dyn Clock>,
}

impl UsageReports {
    /// Reports over these parts.
    pub fn new(
        users: Arc<dyn UserRepository>,
        quota: Arc<QuotaBook>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            users,
            quota,
            clock,
        }
    }

    /// `GET /api/usage/current` for `user_id`.
    pub async fn current(&self, user_id: &UserId) -> Result<CurrentUsage, AnalyticsError> {
        let user = self
            .users
            .user_by_id(user_id)
            .await?
            .ok_or_else(|| AnalyticsError::UnknownUser(user_id.clone()))?;
        let used = self.quota.used(user_id).await?;
        let period = BillingPeriod::containing(self.clock.now());
        Ok(CurrentUsage::compute(
            user.id,
            user.plan,
            period,
            used,
            self.quota.catalog(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use usage_core::memory::MemoryStore;
    use usage_core::quota::QuotaDecision;
    use usage_core::repo::User;
    use usage_core::{Cents, ManualClock, Plan, PlanCatalog};

    #[tokio::test]
    async fn current_counts_admitted_calls_not_yet_written() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC)));
        let user = User {
            id: UserId::generate(),
            email: "ada@example.com".into(),
            plan: Plan::Pro,
            stripe_customer_id: None,
            created_at: clock.now(),
        };
        store.create_user(&user).await.unwrap();
        let catalog = PlanCatalog {
            pro: usage_core::PlanTerms {
                monthly_calls: Some(3),
                ..PlanCatalog::default().pro
            },
            ..PlanCatalog::default()
        };
        let quota = Arc::new(QuotaBook::new(store.clone(), catalog, clock.clone()));
        for _ in 0..5 {
            assert!(matches!(
                quota.admit(&user.id, Plan::Pro).await.unwrap(),
                QuotaDecision::Admitted(_)
            ));
        }
        let reports = UsageReports::new(store, quota, clock);
        let now = reports.current(&user.id).await.unwrap();
        assert_eq!(
            (now.api_calls, now.limit, now.remaining, now.overage_calls),
            (5, Some(3), Some(0), 2)
        );
        assert_eq!(now.usage_percentage, 166.67);
        assert_eq!(
            now.overage_cost_cents,
            Cents(0),
            "2 calls at $0.001 round to 0 cents"
        );
        assert!(matches!(
            reports.current(&UserId::generate()).await,
            Err(AnalyticsError::UnknownUser(_))
        ));
    }
}
