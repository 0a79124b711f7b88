//! The plan catalog at start: the built-in plans stored from the plan variables the first
//! time, `DEFAULT_PLAN` checked, a warning naming each variable that no longer says what
//! the catalog holds, and the catalog loaded for metering and figures.

use std::sync::Arc;

use usage_core::plans::Plans;
use usage_core::terms::LiveCatalog;
use usage_core::{Clock, Store};

use crate::ServerError;
use crate::config::Config;

/// The catalog service on `store`, its built-in plans seeded, and the catalog as metering
/// reads it (kept current by the service's own changes, and by the meter's poll).
pub(crate) async fn open(
    config: &Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
) -> Result<(Plans, Arc<LiveCatalog>), ServerError> {
    let plans = Plans::new(
        store.clone(),
        store.clone(),
        clock,
        config.default_plan.clone(),
    );
    let builtin = config.builtin_plans();
    let seeded = plans.seed(&builtin).await?;
    if !seeded.is_empty() {
        tracing::info!(plans = ?seeded, "plan catalog: built-in plans stored from the plan variables");
    }
    let stored = plans.list().await?;
    if !stored.iter().any(|s| s.plan.key == config.default_plan) {
        return Err(ServerError::UnknownDefaultPlan(config.default_plan.clone()));
    }
    for plan in &builtin {
        let Some(current) = stored.iter().find(|s| s.plan.key == plan.key) else {
            continue;
        };
        let variables: Vec<&str> = current
            .plan
            .variable_differences(plan)
            .into_iter()
            .flat_map(|field| variables_of(&plan.key, field))
            .copied()
            .collect();
        if !variables.is_empty() {
            tracing::warn!(
                plan = %plan.key,
                version = current.plan.version,
                variables = %variables.join(", "),
                "these plan variables differ from the plan catalog, which was built from them \
                 at its first start and is meant to be the truth: align the two, the catalog \
                 with `usage-server plans apply`"
            );
        }
    }
    let live = LiveCatalog::load(store).await?;
    Ok((plans.refreshing(live.clone()), live))
}

/// The variables that set `field` of built-in plan `key`.
fn variables_of(key: &str, field: &str) -> &'static [&'static str] {
    match (key, field) {
        ("pro", "price_cents") => &["PRO_PRICE_CENTS"],
        ("enterprise", "price_cents") => &["ENTERPRISE_PRICE_CENTS"],
        ("pro", "stripe_price_id") => &["STRIPE_PRICE_PRO"],
        ("enterprise", "stripe_price_id") => &["STRIPE_PRICE_ENTERPRISE"],
        ("free", "burst") => &["RATE_LIMIT_FREE_PER_SEC", "RATE_LIMIT_FREE_BURST"],
        ("pro", "burst") => &["RATE_LIMIT_PRO_PER_SEC", "RATE_LIMIT_PRO_BURST"],
        ("enterprise", "burst") => &[
            "RATE_LIMIT_ENTERPRISE_PER_SEC",
            "RATE_LIMIT_ENTERPRISE_BURST",
        ],
        ("free", "included") => &["FREE_MONTHLY_CALLS"],
        ("pro", "included") => &["PRO_MONTHLY_CALLS"],
        ("pro" | "enterprise", "overage") => &["OVERAGE_PRICE_MICROUSD"],
        _ => &[],
    }
}
