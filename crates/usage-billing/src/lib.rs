//! Overage billing of nexus-usage: the cost of overage ([`overage_cost`]), the billing
//! run ([`OverageService`]) over the repository traits, and Stripe invoice items
//! ([`stripe::StripeClient`], with [`stripe::HttpStripeClient`] as the real one), and
//! Stripe's webhook, which sets plans from subscriptions ([`webhook::StripeWebhooks`]).
//!
//! Billing is incremental and idempotent: each run bills, per user and period, the
//! overage calls between what was invoiced and the overage now, as one Stripe invoice
//! item recorded first in the charge ledger with a deterministic idempotency key. See
//! [`service`] for how a charge is never billed twice.
#![warn(missing_docs)]

pub mod service;
pub mod stripe;
pub mod webhook;

pub use service::{
    BillingError, BillingFailure, BillingOptions, BillingSummary, OverageService, Reconciliation,
    Resolution, RunMode, UserBilling,
};
pub use stripe::{HttpStripeClient, StripeClient, StripeConfig, StripeError};
pub use webhook::{PlanPrices, StripeWebhooks, WebhookError, WebhookOutcome};

use usage_core::repo::UsageRecord;
use usage_core::{Cents, PlanCatalog};

/// What a period's overage costs, and how much of it is still to invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverageCost {
    /// Calls past the plan's limit this period.
    pub overage_calls: u64,
    /// Their price, rounded half-up once at the total.
    pub cost: Cents,
    /// Overage calls already invoiced.
    pub invoiced_calls: u64,
    /// Calls to bill next: between what was invoiced and the current overage.
    pub uninvoiced_calls: u64,
}

/// The overage cost of a usage record at the catalog's overage price.
///
/// ```
/// # use time::macros::datetime;
/// use usage_core::{PlanCatalog, UserId, Cents, repo::UsageRecord};
/// let record = UsageRecord {
///     user_id: UserId::generate(),
///     period_start: datetime!(2026-11-01 00:00 UTC),
///     period_end: datetime!(2026-12-01 00:00 UTC),
///     api_calls: 105_000, overage_calls: 5_000, overage_invoiced_calls: 1_000,
///     updated_at: datetime!(2026-11-22 00:00 UTC),
/// };
/// let cost = usage_billing::overage_cost(&record, &PlanCatalog::default());
/// assert_eq!(cost.cost, Cents(500));
/// assert_eq!(cost.uninvoiced_calls, 4_000);
/// ```
pub fn overage_cost(record: &UsageRecord, catalog: &PlanCatalog) -> OverageCost {
    OverageCost {
        overage_calls: record.overage_calls,
        cost: catalog.overage_price.total_in_cents(record.overage_calls),
        invoiced_calls: record.overage_invoiced_calls,
        uninvoiced_calls: record
            .overage_calls
            .saturating_sub(record.overage_invoiced_calls),
    }
}
