//! The figures a customer sees about their own usage.

use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;
use time::OffsetDateTime;
use usage_core::quota::QuotaBook;
use usage_core::repo::{
    ChargeStatus, OverageChargeRepository, UsageRepository, User, UserRepository,
};
use usage_core::{BillingPeriod, Cents, Clock, RepoError, Store, UserId};

/// `$12.34` from cents.
fn dollars(amount: Cents) -> String {
    format!("${}.{:02}", amount.0 / 100, amount.0 % 100)
}

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
    usage: Arc<dyn UsageRepository>,
    charges: Arc<dyn OverageChargeRepository>,
    quota: Arc<QuotaBook>,
    clock: Arc<dyn Clock>,
}

/// A user's overage this period, as `GET /api/usage/overage` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverageReport {
    /// First instant of the period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_start: OffsetDateTime,
    /// First instant after the period.
    #[serde(with = "time::serde::rfc3339")]
    pub period_end: OffsetDateTime,
    /// Billable calls past the plan's limit so far (calls not yet written included).
    pub overage_calls: u64,
    /// Their price, rounded half-up once at the total.
    pub overage_cost_cents: Cents,
    /// Overage calls already invoiced.
    pub invoiced_calls: u64,
    /// What the invoiced charges of this period amounted to.
    pub invoiced_cents: Cents,
    /// A sentence for a person.
    pub message: String,
}

impl UsageReports {
    /// Reports over these parts.
    pub fn new(store: Arc<dyn Store>, quota: Arc<QuotaBook>, clock: Arc<dyn Clock>) -> Self {
        Self {
            users: store.clone(),
            usage: store.clone(),
            charges: store,
            quota,
            clock,
        }
    }

    async fn user(&self, user_id: &UserId) -> Result<User, AnalyticsError> {
        self.users
            .user_by_id(user_id)
            .await?
            .ok_or_else(|| AnalyticsError::UnknownUser(user_id.clone()))
    }

    /// `GET /api/usage/overage` for `user_id`.
    pub async fn overage(&self, user_id: &UserId) -> Result<OverageReport, AnalyticsError> {
        let user = self.user(user_id).await?;
        let period = BillingPeriod::containing(self.clock.now());
        let catalog = self.quota.catalog();
        let used = self.quota.used(user_id).await?;
        let overage_calls = catalog.overage_calls(user.plan, used);
        let invoiced_calls = self
            .usage
            .usage_record(user_id, period.start())
            .await?
            .map_or(0, |r| r.overage_invoiced_calls);
        let invoiced_cents = self
            .charges
            .overage_charges_for_user(user_id)
            .await?
            .iter()
            .filter(|c| c.period_start == period.start() && c.status == ChargeStatus::Succeeded)
            .map(|c| c.amount_cents)
            .sum();
        let cost = catalog.overage_price.total_in_cents(overage_calls);
        let message = match (catalog.included_calls_if_billed(user.plan), overage_calls) {
            (None, _) => format!("The {} plan has no overage.", user.plan),
            (Some(limit), 0) => {
                format!("No overage this period: {used} of {limit} included calls used.")
            }
            (Some(limit), n) => format!(
                "{n} calls over the {limit} included this period, {} so far; {invoiced_calls} of them invoiced.",
                dollars(cost)
            ),
        };
        Ok(OverageReport {
            period_start: period.start(),
            period_end: period.end(),
            overage_calls,
            overage_cost_cents: cost,
            invoiced_calls,
            invoiced_cents: Cents(invoiced_cents),
            message,
        })
    }

    /// `GET /api/usage/current` for `user_id`.
    pub async fn current(&self, user_id: &UserId) -> Result<CurrentUsage, AnalyticsError> {
        let user = self.user(user_id).await?;
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
    use usage_core::{ManualClock, Plan, PlanCatalog};

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
        let overage = reports.overage(&user.id).await.unwrap();
        assert_eq!(
            (
                overage.overage_calls,
                overage.invoiced_calls,
                overage.invoiced_cents
            ),
            (2, 0, Cents(0))
        );
        assert_eq!(
            overage.message,
            "2 calls over the 3 included this period, $0.00 so far; 0 of them invoiced."
        );
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
