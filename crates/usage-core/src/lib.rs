//! Domain of nexus-usage: plans and billing periods, usage events, money, the
//! repository traits every other crate works through, quota, rate limits, and the
//! tracker and spool that store admitted calls. The doors that meter HTTP calls are
//! `usage-door`; the in-memory store for tests is `usage-testkit`.
//!
//! This crate knows no database and no web framework: stores implement
//! [`repo::Store`], services take `Arc<dyn ...Repository>`.
//!
//! ```
//! use usage_core::{BillingPeriod, Plan, PlanCatalog};
//! use time::macros::datetime;
//!
//! let period = BillingPeriod::containing(datetime!(2026-11-30 23:59:59.999 UTC));
//! assert_eq!(period.end(), datetime!(2026-12-01 00:00 UTC));
//! assert_eq!(PlanCatalog::default().terms(&Plan::free()).unwrap().monthly_calls, Some(1_000));
//! ```
#![warn(missing_docs)]

pub mod accounts;
pub mod caller;
pub mod catalog;
pub mod clock;
pub mod counter;
pub mod dead_letter;
pub mod discard;
mod error;
pub mod event;
pub mod ids;
pub mod ingest;
pub mod meter;
pub mod money;
pub mod period;
pub mod plan;
pub mod plans;
pub mod pricing;
pub mod quota;
pub mod rate;
pub mod repo;
pub mod spool;
pub mod terms;
pub mod tracker;

pub use caller::{ApiKeyAuthenticator, Caller};
pub use clock::{Clock, ManualClock, ShiftedClock, SystemClock};
pub use error::DomainError;
pub use event::UsageEvent;
pub use ids::{ApiKeyId, UserId};
pub use money::{Cents, MicroUsd};
pub use period::BillingPeriod;
pub use plan::{OverLimit, Plan, PlanCatalog, PlanTerms};
pub use repo::{RepoError, Store};
