//! Overage billing of nexus-usage: the billing run ([`OverageService`]) over the
//! repository traits, priced by the plan catalog, Stripe invoice items
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
