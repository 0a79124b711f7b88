//! What the tests of every nexus-usage crate share, taken as a dev-dependency:
//!
//! - [`memory::MemoryStore`]: every repository in one process-local map, following the
//!   same contract as the database stores;
//! - [`conformance`]: that contract, one set of cases every [`Store`](usage_core::Store)
//!   must pass, expanded per store by [`repository_conformance_tests!`];
//! - [`seeded_catalog`]: a store's plan catalog with the built-in plans, as a server
//!   starts it.
#![warn(missing_docs)]

pub mod conformance;
pub mod memory;

#[doc(hidden)]
pub use usage_core::ManualClock;

use std::sync::Arc;

use usage_core::catalog::PlanDefinition;
use usage_core::rate::PlanRateLimits;
use usage_core::repo::PlanRepository;
use usage_core::terms::LiveCatalog;
use usage_core::{Plan, PlanCatalog};

/// The built-in plans as `variables` make them (no Stripe prices, no burst limits).
pub fn builtin_plans(variables: &PlanCatalog) -> Vec<PlanDefinition> {
    Plan::builtin()
        .iter()
        .filter_map(|p| PlanDefinition::builtin(p, variables, &PlanRateLimits::default(), None))
        .collect()
}

/// The catalog of `store` with the built-in plans of `variables` seeded (where the store
/// has no version of them yet), loaded, as a server starts it.
pub async fn seeded_catalog(
    store: Arc<dyn PlanRepository>,
    variables: &PlanCatalog,
) -> Arc<LiveCatalog> {
    store
        .seed_plans(&builtin_plans(variables), time::OffsetDateTime::UNIX_EPOCH)
        .await
        .expect("seeding the built-in plans");
    LiveCatalog::load(store).await.expect("loading the catalog")
}
