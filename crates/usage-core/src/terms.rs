//! Whose terms apply: the plan catalog held in memory, the version of a plan a user holds
//! at a given time (versions move users at their next period, at once, or never), a
//! user's effective terms (their own terms over that version:
//! [`crate::catalog::Overrides`]), the plan a Stripe price sells, and the plan to suggest
//! when a limit is reached. [`Catalog`] is pure; [`LiveCatalog`] keeps it current from the
//! store on every instance.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use time::OffsetDateTime;

use crate::catalog::{PlanDefinition, PlanMove};
use crate::event::Units;
use crate::meter::{Meters, RouteCosts};
use crate::repo::{PlanRepository, PlanVersion, Subscription};
use crate::{BillingPeriod, RepoError};

/// Every version of every plan, the meters and the route costs, as read from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    plans: BTreeMap<String, Vec<PlanVersion>>,
    meters: Meters,
    costs: RouteCosts,
    /// The costs by endpoint, then method: looked up on every call of a catalog with any.
    by_route: BTreeMap<String, Vec<(String, Units)>>,
}

impl Catalog {
    /// The catalog of `versions` (in any order).
    pub fn new(versions: impl IntoIterator<Item = PlanVersion>) -> Self {
        let mut plans: BTreeMap<String, Vec<PlanVersion>> = BTreeMap::new();
        for version in versions {
            plans
                .entry(version.plan.key.clone())
                .or_default()
                .push(version);
        }
        for versions in plans.values_mut() {
            versions.sort_by_key(|v| v.plan.version);
        }
        Self {
            plans,
            meters: Meters::builtin(),
            costs: RouteCosts::default(),
            by_route: BTreeMap::new(),
        }
    }

    /// This catalog with `meters` and route `costs`.
    pub fn with_meters(mut self, meters: Meters, costs: RouteCosts) -> Self {
        self.meters = meters;
        self.costs = costs.sorted();
        self.by_route = BTreeMap::new();
        for cost in &self.costs.items {
            if let Some((method, endpoint)) = cost.method_and_endpoint() {
                let methods = self.by_route.entry(endpoint.to_owned()).or_default();
                let at = match methods.iter().position(|(m, _)| m == method) {
                    Some(at) => at,
                    None => {
                        methods.push((method.to_owned(), Units::new()));
                        methods.len() - 1
                    }
                };
                methods[at].1.add(cost.meter.as_str(), cost.quantity);
            }
        }
        self
    }

    /// What one call of `method` on `endpoint` (as recorded) costs, by meter; `None` for
    /// a route without costs.
    pub fn route_cost(&self, method: &str, endpoint: &str) -> Option<&Units> {
        self.by_route
            .get(endpoint)?
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, units)| units)
    }

    /// Whether any route has a cost.
    pub fn has_route_costs(&self) -> bool {
        !self.by_route.is_empty()
    }

    /// The meters, `api_calls` included.
    pub fn meters(&self) -> &Meters {
        &self.meters
    }

    /// The route costs, by route then meter.
    pub fn costs(&self) -> &RouteCosts {
        &self.costs
    }

    /// The newest version of `key`: what new subscribers get.
    pub fn newest(&self, key: &str) -> Option<&PlanVersion> {
        self.plans.get(key).and_then(|v| v.last())
    }

    /// Every plan's newest version, by key.
    pub fn newest_versions(&self) -> impl Iterator<Item = &PlanVersion> {
        self.plans.values().filter_map(|v| v.last())
    }

    /// Every version of every plan, by key, then version.
    pub fn versions(&self) -> impl Iterator<Item = &PlanVersion> {
        self.plans.values().flatten()
    }

    /// The version of `key` that a user who subscribed to version `held` holds at `at`.
    /// Each later version moves them as its `existing` says: `now` from its creation,
    /// `next_period` from the start of the billing period after its creation, `keep`
    /// never; later versions are looked at in order, from the one the user holds. A
    /// `held` version the catalog does not have is read as the plan's first.
    pub fn held_version(&self, key: &str, held: u32, at: OffsetDateTime) -> Option<&PlanVersion> {
        let versions = self.plans.get(key)?;
        let start = versions
            .iter()
            .position(|v| v.plan.version == held)
            .unwrap_or(0);
        let mut current = versions.get(start)?;
        for later in &versions[start + 1..] {
            let moves = match later.existing {
                PlanMove::Now => at >= later.created_at,
                PlanMove::NextPeriod => at >= BillingPeriod::containing(later.created_at).end(),
                PlanMove::Keep => false,
            };
            if moves {
                current = later;
            }
        }
        Some(current)
    }

    /// The terms `subscription` gives at `at`: the version it holds then, with the user's
    /// own terms over it; `None` when the catalog has no version of its plan.
    pub fn effective(
        &self,
        subscription: &Subscription,
        at: OffsetDateTime,
    ) -> Option<PlanDefinition> {
        let held = self.held_version(
            subscription.plan.as_str(),
            subscription.plan_version.unwrap_or(0),
            at,
        )?;
        Some(held.plan.with_overrides(subscription.overrides.as_ref()))
    }

    /// The plan a Stripe price sells: among plans whose newest version names it, the one
    /// with the highest monthly price (archived plans included: their subscribers keep
    /// them), ties to the first key.
    pub fn plan_for_price(&self, stripe_price_id: &str) -> Option<&PlanVersion> {
        self.newest_versions()
            .filter(|v| v.plan.stripe_price_id.as_deref() == Some(stripe_price_id))
            .fold(None, |best: Option<&PlanVersion>, v| match best {
                Some(b) if b.plan.price_cents >= v.plan.price_cents => Some(b),
                _ => Some(v),
            })
    }

    /// The plan to suggest to a user of plan `current` whose limit of `reached` units on
    /// `meter` blocked them (their plan's, or their own terms'): the cheapest public,
    /// unarchived other plan that allows more of it (unlimited, overage, or more included
    /// units), ties to the first key; `None` when there is none.
    pub fn upgrade_for(&self, current: &str, reached: u64, meter: &str) -> Option<&PlanDefinition> {
        let allows_more = |p: &PlanDefinition| match p.limit(meter) {
            None => true,
            Some(l) if l.over_limit == crate::OverLimit::Overage => true,
            Some(l) => l.included.is_none_or(|included| included > reached),
        };
        self.newest_versions()
            .map(|v| &v.plan)
            .filter(|p| p.public && !p.archived && p.key != current)
            .filter(|p| allows_more(p))
            .fold(None, |best: Option<&PlanDefinition>, p| match best {
                Some(b) if b.price_cents <= p.price_cents => Some(b),
                _ => Some(p),
            })
    }
}

/// The catalog as an instance's services read it: loaded from the store, and read again by
/// [`LiveCatalog::watch`] and after this instance's own changes, so that a plan edit made
/// on any instance reaches every other within the poll interval. Each reload that finds a
/// change bumps [`LiveCatalog::generation`]: caches of resolved terms (the key cache)
/// compare it with theirs, one atomic load a call, and the hot path never reads the
/// catalog from the database.
pub struct LiveCatalog {
    plans: Arc<dyn PlanRepository>,
    current: RwLock<Arc<Catalog>>,
    generation: AtomicU64,
    /// Whether the current catalog has route costs: the door asks on every call, and a
    /// catalog without (most) costs it one atomic load.
    has_route_costs: AtomicBool,
    loading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for LiveCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCatalog")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// A user's effective terms as [`LiveCatalog::effective`] resolved them, and how long they
/// hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTerms {
    /// The version held, with the user's own terms over it.
    pub terms: PlanDefinition,
    /// The catalog's generation they were resolved from: a later one may change them.
    pub generation: u64,
    /// They may change from this instant on (the billing period's end, when versions
    /// made `next_period` move their users) even in the same generation.
    pub until: OffsetDateTime,
}

impl LiveCatalog {
    /// An empty catalog over `plans`, read on first [`LiveCatalog::refresh`] (or first use).
    pub fn new(plans: Arc<dyn PlanRepository>) -> Self {
        Self {
            plans,
            current: RwLock::new(Arc::new(Catalog::default())),
            generation: AtomicU64::new(0),
            has_route_costs: AtomicBool::new(false),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// The catalog over `plans`, read once.
    pub async fn load(plans: Arc<dyn PlanRepository>) -> Result<Arc<Self>, RepoError> {
        let live = Arc::new(Self::new(plans));
        live.refresh().await?;
        Ok(live)
    }

    /// The catalog now.
    pub fn current(&self) -> Arc<Catalog> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// What one call of `method` on `endpoint` costs now, by meter (`None`: nothing).
    pub fn route_cost(&self, method: &str, endpoint: &str) -> Option<Units> {
        if !self.has_route_costs.load(Ordering::Acquire) {
            return None;
        }
        self.current().route_cost(method, endpoint).cloned()
    }

    /// Whether any route has a cost now.
    pub fn has_route_costs(&self) -> bool {
        self.has_route_costs.load(Ordering::Acquire)
    }

    /// Bumped by every reload that changed something.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the catalog from the store again.
    pub async fn refresh(&self) -> Result<(), RepoError> {
        // One reload at a time: a slow one must not overwrite a newer one.
        let _one = self.loading.lock().await;
        let fresh = Catalog::new(self.plans.plan_versions().await?).with_meters(
            Meters::new(self.plans.meters().await?),
            RouteCosts {
                items: self.plans.route_costs().await?,
            },
        );
        if *self.current() != fresh {
            self.has_route_costs
                .store(fresh.has_route_costs(), Ordering::Release);
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Reads the catalog again every `every` until the returned task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let live = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(e) = live.refresh().await {
                    tracing::debug!(error = %e, "reading the plan catalog failed");
                }
            }
        })
    }

    /// The terms `subscription` gives at `at`. A plan this instance has no version of yet
    /// (made a moment ago on another) has the catalog read again first.
    pub async fn effective(
        &self,
        subscription: &Subscription,
        at: OffsetDateTime,
    ) -> Result<ResolvedTerms, RepoError> {
        let until = BillingPeriod::containing(at).end();
        for attempt in 0..2 {
            // The generation before the catalog: a reload in between makes these terms
            // look older than they are (resolved again), never newer.
            let generation = self.generation();
            if let Some(terms) = self.current().effective(subscription, at) {
                return Ok(ResolvedTerms {
                    terms,
                    generation,
                    until,
                });
            }
            if attempt == 0 {
                self.refresh().await?;
            }
        }
        Err(RepoError::Backend(format!(
            "plan {:?} has no version in the plan catalog",
            subscription.plan.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::catalog::{API_CALLS, Overrides};
    use crate::plan::{OverLimit, Plan, PlanCatalog};
    use crate::rate::PlanRateLimits;

    fn version(key: &str, n: u32, existing: PlanMove, at: OffsetDateTime) -> PlanVersion {
        let mut plan = PlanDefinition::builtin(
            &Plan::pro(),
            &PlanCatalog::default(),
            &PlanRateLimits::default(),
            None,
        )
        .unwrap();
        plan.key = key.to_owned();
        plan.version = n;
        plan.price_cents = i64::from(n) * 1_000;
        PlanVersion {
            plan,
            existing,
            created_at: at,
        }
    }

    #[test]
    fn users_move_to_a_new_version_as_it_says() {
        let v1 = version(
            "pro",
            1,
            PlanMove::NextPeriod,
            datetime!(2026-10-01 00:00 UTC),
        );
        // Made on December 10th: users move on January 1st.
        let v2 = version(
            "pro",
            2,
            PlanMove::NextPeriod,
            datetime!(2026-12-10 12:00 UTC),
        );
        let catalog = Catalog::new([v2.clone(), v1.clone()]);
        let held = |at| catalog.held_version("pro", 1, at).unwrap().plan.version;
        assert_eq!(held(datetime!(2026-12-10 12:00 UTC)), 1);
        assert_eq!(
            held(datetime!(2026-12-31 23:59:59.999999 UTC)),
            1,
            "the period's last instant"
        );
        assert_eq!(
            held(datetime!(2027-01-01 00:00 UTC)),
            2,
            "the next period's first"
        );
        // A subscriber of version 2 holds it at once.
        assert_eq!(
            catalog
                .held_version("pro", 2, datetime!(2026-12-10 12:00 UTC))
                .unwrap()
                .plan
                .version,
            2
        );
        assert_eq!(catalog.newest("pro").unwrap().plan.version, 2);
    }

    #[test]
    fn now_moves_at_once_keep_never_and_later_versions_are_read_in_order() {
        let at = |d: u8| datetime!(2026-12-01 00:00 UTC) + time::Duration::days(i64::from(d) - 1);
        let catalog = Catalog::new([
            version("pro", 1, PlanMove::NextPeriod, at(1)),
            version("pro", 2, PlanMove::Keep, at(5)),
            version("pro", 3, PlanMove::Now, at(10)),
            version("pro", 4, PlanMove::Keep, at(12)),
            version("pro", 5, PlanMove::NextPeriod, at(20)),
        ]);
        let held = |from: u32, when| {
            catalog
                .held_version("pro", from, when)
                .unwrap()
                .plan
                .version
        };
        assert_eq!(held(1, at(9)), 1, "keep: version 2 moved nobody");
        assert_eq!(held(1, at(10)), 3, "now: from its creation");
        assert_eq!(held(2, at(11)), 3, "subscribers of a kept version move too");
        assert_eq!(held(1, at(25)), 3, "version 5 waits for the next period");
        assert_eq!(held(4, at(25)), 4, "version 3 is older than what they hold");
        assert_eq!(held(1, datetime!(2027-01-01 00:00 UTC)), 5);
        assert_eq!(held(4, datetime!(2027-01-01 00:00 UTC)), 5);
        assert_eq!(held(99, at(2)), 1, "an unknown version reads as the first");
        assert!(catalog.held_version("growth", 1, at(2)).is_none());
    }

    #[test]
    fn a_price_sells_the_dearest_plan_naming_it() {
        let mut a = version("a", 1, PlanMove::Now, datetime!(2026-12-01 00:00 UTC));
        let mut b = version("b", 1, PlanMove::Now, datetime!(2026-12-01 00:00 UTC));
        a.plan.stripe_price_id = Some("price_x".into());
        b.plan.stripe_price_id = Some("price_x".into());
        b.plan.price_cents = 5_000;
        b.plan.archived = true;
        let catalog = Catalog::new([a, b]);
        assert_eq!(catalog.plan_for_price("price_x").unwrap().plan.key, "b");
        assert!(catalog.plan_for_price("price_y").is_none());
    }

    #[test]
    fn the_upgrade_is_the_cheapest_public_plan_that_allows_more() {
        let plans = PlanCatalog::default();
        let rates = PlanRateLimits::default();
        let mk = |p: Plan| PlanVersion {
            plan: PlanDefinition::builtin(&p, &plans, &rates, None).unwrap(),
            existing: PlanMove::Now,
            created_at: datetime!(2026-12-01 00:00 UTC),
        };
        let (free, pro, enterprise) = (mk(Plan::free()), mk(Plan::pro()), mk(Plan::enterprise()));
        let mut starter = mk(Plan::free());
        starter.plan.key = "starter".into();
        starter.plan.price_cents = 900;
        starter.plan.limits[0].included = Some(10_000);
        let mut hidden = starter.clone();
        hidden.plan.key = "hidden".into();
        hidden.plan.price_cents = 100;
        hidden.plan.public = false;
        let mut small = starter.clone();
        small.plan.key = "small".into();
        small.plan.price_cents = 50;
        small.plan.limits[0].included = Some(1_000);
        let catalog = Catalog::new([
            free.clone(),
            pro.clone(),
            enterprise,
            starter,
            hidden,
            small,
        ]);
        assert_eq!(
            catalog.upgrade_for("free", 1_000, API_CALLS).unwrap().key,
            "starter",
            "cheaper than pro; the hidden one is not offered, the small one allows no more"
        );
        assert_eq!(
            catalog
                .upgrade_for("starter", 10_000, API_CALLS)
                .unwrap()
                .key,
            "pro",
            "past the starter's 10,000: pro's overage allows more, and costs less than enterprise"
        );
        assert_eq!(
            catalog.upgrade_for("pro", 50, API_CALLS).unwrap().key,
            "free",
            "own terms that block a pro user at 50: any plan allowing more, the cheapest first"
        );
        let only_builtin = Catalog::new([free.clone(), pro]);
        assert!(
            only_builtin.upgrade_for("pro", 1_000, API_CALLS).is_none(),
            "free allows no more than 1,000"
        );
        assert_eq!(
            only_builtin
                .upgrade_for("free", 1_000, API_CALLS)
                .unwrap()
                .name,
            "Pro"
        );
    }

    #[test]
    fn overrides_replace_the_price_and_the_limits_of_their_meters() {
        let pro = version("pro", 1, PlanMove::Now, datetime!(2026-12-01 00:00 UTC)).plan;
        assert_eq!(pro.with_overrides(None), pro);
        let overrides: Overrides = serde_json::from_value(serde_json::json!({
            "price_cents": 30000,
            "limits": [{"meter": "api_calls", "included": 2000000, "over_limit": "overage",
                        "overage": {"model": "per_unit", "unit_price_micros": 400}}]
        }))
        .unwrap();
        assert_eq!(overrides.validate(&crate::meter::Meters::builtin()), Ok(()));
        let terms = pro.with_overrides(Some(&overrides));
        assert_eq!(terms.price_cents, 30_000);
        assert_eq!(terms.limits.len(), 1);
        assert_eq!(terms.limits[0].included, Some(2_000_000));
        assert_eq!(terms.limits[0].over_limit, OverLimit::Overage);
        // 2,000,100 calls: 100 past the overridden limit at 400 µ$ = 40,000 µ$ = 4 ¢.
        let usage = BTreeMap::from([(API_CALLS.to_owned(), 2_000_100)]);
        assert_eq!(terms.quote(&usage).overage_cents, 4);
        let price_only = Overrides {
            price_cents: Some(0),
            limits: vec![],
        };
        assert_eq!(pro.with_overrides(Some(&price_only)).limits, pro.limits);
    }

    #[test]
    fn bad_overrides_are_refused_naming_the_field() {
        let negative = Overrides {
            price_cents: Some(-1),
            limits: vec![],
        };
        assert_eq!(
            negative
                .validate(&crate::meter::Meters::builtin())
                .unwrap_err()
                .field,
            "overrides.price_cents"
        );
        let unknown: Overrides = serde_json::from_value(serde_json::json!({
            "limits": [{"meter": "tokens", "included": 5, "over_limit": "block"}]
        }))
        .unwrap();
        assert_eq!(
            unknown
                .validate(&crate::meter::Meters::builtin())
                .unwrap_err()
                .field,
            "overrides.limits[0].meter"
        );
        assert!(
            serde_json::from_value::<Overrides>(serde_json::json!({"price": 1})).is_err(),
            "a misspelt field is refused"
        );
    }
}
