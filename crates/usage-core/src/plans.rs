//! Managing the plan catalog: the checks and answers around [`PlanRepository`], for the
//! admin API, the command line and the catalog file alike.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;

use crate::catalog::{API_CALLS, CatalogError, CatalogFile, PlanDefinition, PlanMove, Quote};
use crate::meter::{Aggregation, Meter, MeterRevision, Meters, RouteCosts};
use crate::repo::{PlanRepository, PlanVersion, UserRepository};
use crate::{Clock, RepoError};

/// Why a catalog operation was refused.
#[derive(Debug, Error)]
pub enum PlanError {
    /// A field is malformed; the message names it.
    #[error(transparent)]
    Invalid(#[from] CatalogError),
    /// No plan has this key.
    #[error("no plan with key {0:?}")]
    UnknownPlan(String),
    /// A plan with this key exists.
    #[error("a plan with key {0:?} already exists")]
    KeyTaken(String),
    /// No meter has this key.
    #[error("no meter with key {0:?}")]
    UnknownMeter(String),
    /// A meter with this key exists.
    #[error("a meter with key {0:?} already exists")]
    MeterTaken(String),
    /// The meter's aggregation cannot change: usage of it is stored.
    #[error("meter {0:?} has usage stored: its aggregation is fixed")]
    AggregationFixed(String),
    /// The plan is the one new users and cancelled subscriptions get (`DEFAULT_PLAN`).
    #[error("plan {0:?} is the default plan (DEFAULT_PLAN): it cannot be archived")]
    DefaultPlan(String),
    /// The store failed.
    #[error(transparent)]
    Repo(RepoError),
}

/// A plan's newest version, with how many users hold the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanSummary {
    /// The newest version's terms.
    #[serde(flatten)]
    pub plan: PlanDefinition,
    /// Users on any version of the plan.
    pub subscribers: u64,
}

/// A plan with every version, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanDetail {
    /// The newest version, with its subscribers.
    #[serde(flatten)]
    pub summary: PlanSummary,
    /// Every version.
    pub versions: Vec<VersionEntry>,
}

/// One version in a [`PlanDetail`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionEntry {
    /// The version's terms.
    #[serde(flatten)]
    pub plan: PlanDefinition,
    /// How users of earlier versions moved to it.
    pub existing: PlanMove,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

/// What applying a catalog did (or, dry, would do) to one plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Change {
    /// A new plan.
    Created,
    /// A new version of the plan.
    Revised,
    /// Archived.
    Archived,
    /// Taken back from the archive.
    Restored,
    /// Replaced (a meter's name, unit or aggregation; the route costs).
    Updated,
    /// As the file says already.
    Unchanged,
}

/// The catalog over a [`PlanRepository`].
#[derive(Clone)]
pub struct Plans {
    plans: Arc<dyn PlanRepository>,
    users: Arc<dyn UserRepository>,
    clock: Arc<dyn Clock>,
    default_plan: String,
    live: Option<Arc<crate::terms::LiveCatalog>>,
}

impl Plans {
    /// The catalog in `plans`, with subscribers counted in `users`; `default_plan` is the
    /// plan of new users (`DEFAULT_PLAN`), which cannot be archived.
    pub fn new(
        plans: Arc<dyn PlanRepository>,
        users: Arc<dyn UserRepository>,
        clock: Arc<dyn Clock>,
        default_plan: impl Into<String>,
    ) -> Self {
        Self {
            plans,
            users,
            clock,
            default_plan: default_plan.into(),
            live: None,
        }
    }

    /// Reads `live` again after each change made here, so that this instance applies it
    /// at once (the others at their next poll).
    pub fn refreshing(mut self, live: Arc<crate::terms::LiveCatalog>) -> Self {
        self.live = Some(live);
        self
    }

    /// After a change: this instance's catalog follows at once. A failed read is only
    /// logged: the change is stored, and the next poll reads it.
    async fn changed(&self) {
        if let Some(live) = &self.live
            && let Err(e) = live.refresh().await
        {
            tracing::warn!(error = %e, "reading the plan catalog after a change failed");
        }
    }

    /// The meters a limit may name, as stored now.
    pub async fn meters(&self) -> Result<Meters, PlanError> {
        Ok(Meters::new(
            self.plans.meters().await.map_err(PlanError::Repo)?,
        ))
    }

    /// Stores a new meter after checking every field.
    pub async fn create_meter(&self, meter: &Meter) -> Result<Meter, PlanError> {
        meter.validate()?;
        match self.plans.create_meter(meter, self.clock.now()).await {
            Err(RepoError::Conflict { .. }) => Err(PlanError::MeterTaken(meter.key.clone())),
            other => other.map_err(PlanError::Repo),
        }?;
        self.changed().await;
        Ok(meter.clone())
    }

    /// Gives meter `key` a new name and unit (and aggregation, while none of its usage is
    /// stored).
    pub async fn update_meter(
        &self,
        key: &str,
        revision: &MeterRevision,
    ) -> Result<Meter, PlanError> {
        if let Some(given) = revision.key.as_deref().filter(|given| *given != key) {
            return Err(CatalogError::new(
                "key",
                format!("never changes: leave it out, or give {key:?} (got {given:?})"),
            )
            .into());
        }
        let stored = self.meters().await?;
        let current = stored
            .get(key)
            .ok_or_else(|| PlanError::UnknownMeter(key.to_owned()))?;
        let meter = Meter {
            key: key.to_owned(),
            name: revision.name.clone(),
            unit: revision.unit.clone(),
            aggregation: revision.aggregation.unwrap_or(current.aggregation),
        };
        meter.validate()?;
        if key == API_CALLS && meter.aggregation != Aggregation::Count {
            return Err(CatalogError::new(
                "aggregation",
                "must be count: api_calls counts admitted calls",
            )
            .into());
        }
        if meter.aggregation != current.aggregation {
            self.check_unnamed("aggregation", key).await?;
        }
        self.store_meter(&meter).await?;
        self.changed().await;
        Ok(meter)
    }

    /// Refuses a change of `key`'s aggregation while a plan's limit or a route cost names
    /// it: each was checked against the aggregation it has (a `block` limit or a cost only
    /// on `count` and `sum` meters, a cost of 1 on `count` ones).
    async fn check_unnamed(&self, field: &str, key: &str) -> Result<(), PlanError> {
        let in_plans = self
            .versions()
            .await?
            .values()
            .flatten()
            .any(|v| v.plan.limit(key).is_some());
        let in_costs = self.costs().await?.items.iter().any(|c| c.meter == key);
        if in_plans || in_costs {
            return Err(CatalogError::new(
                field,
                format!(
                    "is fixed while {} name {key:?}: take the meter out of them first",
                    match (in_plans, in_costs) {
                        (true, true) => "plan limits and route costs",
                        (true, false) => "plan limits",
                        _ => "route costs",
                    }
                ),
            )
            .into());
        }
        Ok(())
    }

    async fn store_meter(&self, meter: &Meter) -> Result<(), PlanError> {
        match self.plans.update_meter(meter, self.clock.now()).await {
            Err(RepoError::NotFound { .. }) => Err(PlanError::UnknownMeter(meter.key.clone())),
            Err(RepoError::Conflict { .. }) => Err(PlanError::AggregationFixed(meter.key.clone())),
            other => other.map_err(PlanError::Repo),
        }
    }

    /// Every route cost, by route then meter.
    pub async fn costs(&self) -> Result<RouteCosts, PlanError> {
        Ok(RouteCosts {
            items: self.plans.route_costs().await.map_err(PlanError::Repo)?,
        })
    }

    /// Replaces every route cost after checking each.
    pub async fn replace_costs(&self, costs: RouteCosts) -> Result<RouteCosts, PlanError> {
        costs.validate(&self.meters().await?)?;
        let costs = costs.sorted();
        self.store_costs(&costs).await?;
        self.changed().await;
        Ok(costs)
    }

    async fn store_costs(&self, costs: &RouteCosts) -> Result<(), PlanError> {
        match self.plans.replace_route_costs(&costs.items).await {
            // A meter named was checked a moment ago; none is ever deleted.
            Err(RepoError::NotFound { .. }) => {
                Err(CatalogError::new("items", "name a meter that does not exist").into())
            }
            other => other.map_err(PlanError::Repo),
        }
    }

    /// Stores the built-in plans whose terms are not stored yet (the first start after
    /// the catalog's migration); returns their keys.
    pub async fn seed(&self, builtin: &[PlanDefinition]) -> Result<Vec<String>, PlanError> {
        self.plans
            .seed_plans(builtin, self.clock.now())
            .await
            .map_err(PlanError::Repo)
    }

    /// Every version of every plan, by key then version.
    async fn versions(&self) -> Result<BTreeMap<String, Vec<PlanVersion>>, PlanError> {
        let mut by_key: BTreeMap<String, Vec<PlanVersion>> = BTreeMap::new();
        for version in self.plans.plan_versions().await.map_err(PlanError::Repo)? {
            by_key
                .entry(version.plan.key.clone())
                .or_default()
                .push(version);
        }
        Ok(by_key)
    }

    async fn subscribers(&self) -> Result<HashMap<String, u64>, PlanError> {
        Ok(self
            .users
            .count_users_by_plan()
            .await
            .map_err(PlanError::Repo)?
            .into_iter()
            .map(|(plan, n)| (plan.as_str().to_owned(), n))
            .collect())
    }

    /// Every plan's newest version with its subscribers, by key.
    pub async fn list(&self) -> Result<Vec<PlanSummary>, PlanError> {
        let subscribers = self.subscribers().await?;
        Ok(self
            .versions()
            .await?
            .into_values()
            .filter_map(|mut versions| versions.pop())
            .map(|newest| PlanSummary {
                subscribers: subscribers.get(&newest.plan.key).copied().unwrap_or(0),
                plan: newest.plan,
            })
            .collect())
    }

    /// One plan with every version.
    pub async fn get(&self, key: &str) -> Result<PlanDetail, PlanError> {
        let versions = self
            .versions()
            .await?
            .remove(key)
            .ok_or_else(|| PlanError::UnknownPlan(key.to_owned()))?;
        let subscribers = self.subscribers().await?.get(key).copied().unwrap_or(0);
        let newest = versions
            .last()
            .cloned()
            .ok_or_else(|| PlanError::UnknownPlan(key.to_owned()))?;
        Ok(PlanDetail {
            summary: PlanSummary {
                plan: newest.plan,
                subscribers,
            },
            versions: versions
                .into_iter()
                .map(|v| VersionEntry {
                    plan: v.plan,
                    existing: v.existing,
                    created_at: v.created_at,
                })
                .collect(),
        })
    }

    /// Stores a new plan (version 1) after checking every field.
    pub async fn create(&self, plan: &PlanDefinition) -> Result<PlanVersion, PlanError> {
        plan.validate(&self.meters().await?)?;
        if plan.archived && plan.key == self.default_plan {
            return Err(PlanError::DefaultPlan(plan.key.clone()));
        }
        let created = match self.plans.create_plan(plan, self.clock.now()).await {
            Err(RepoError::Conflict { .. }) => Err(PlanError::KeyTaken(plan.key.clone())),
            other => other.map_err(PlanError::Repo),
        }?;
        self.changed().await;
        Ok(created)
    }

    /// Stores `plan`'s terms as the next version of its key; users of earlier versions
    /// move as `existing` says.
    pub async fn revise(
        &self,
        plan: &PlanDefinition,
        existing: PlanMove,
    ) -> Result<PlanVersion, PlanError> {
        plan.validate(&self.meters().await?)?;
        let revised = match self
            .plans
            .revise_plan(plan, existing, self.clock.now())
            .await
        {
            Err(RepoError::NotFound { .. }) => Err(PlanError::UnknownPlan(plan.key.clone())),
            other => other.map_err(PlanError::Repo),
        }?;
        self.changed().await;
        Ok(revised)
    }

    /// Archives a plan (no new subscribers; its users keep it), or takes it back.
    pub async fn set_archived(&self, key: &str, archived: bool) -> Result<PlanVersion, PlanError> {
        if archived && key == self.default_plan {
            return Err(PlanError::DefaultPlan(key.to_owned()));
        }
        let stored = match self
            .plans
            .set_plan_archived(key, archived, self.clock.now())
            .await
        {
            Err(RepoError::NotFound { .. }) => Err(PlanError::UnknownPlan(key.to_owned())),
            other => other.map_err(PlanError::Repo),
        }?;
        self.changed().await;
        Ok(stored)
    }

    /// What a period with `usage` (units by meter) costs under the plan's newest version.
    pub async fn quote(
        &self,
        key: &str,
        usage: &BTreeMap<String, u64>,
    ) -> Result<Quote, PlanError> {
        let meters = self.meters().await?;
        for meter in usage.keys() {
            meters.require(&format!("usage.{meter}"), meter)?;
        }
        let detail = self.get(key).await?;
        Ok(detail.summary.plan.quote(usage))
    }

    /// Makes the catalog what `file` says: its meters first (new keys created, changed
    /// ones updated), then its plans (new keys created, changed terms make a new version
    /// whose users move at their next period, `archived` followed), then its route costs
    /// (replaced whole, when the file has a `costs` list). Meters and plans the file
    /// leaves out are left as they are. With `dry_run` nothing is written. Everything is
    /// checked before anything is written. Changes are named `meter <key>`, `<plan key>`
    /// and `costs`.
    pub async fn apply(
        &self,
        file: &CatalogFile,
        dry_run: bool,
    ) -> Result<Vec<(String, Change)>, PlanError> {
        let at = |field: String, e: CatalogError| {
            PlanError::Invalid(CatalogError::new(format!("{field}.{}", e.field), e.message))
        };
        let stored_meters = self.meters().await?;
        for (i, meter) in file.meters.iter().enumerate() {
            meter
                .validate()
                .map_err(|e| at(format!("meters[{i}]"), e))?;
            if file.meters[..i].iter().any(|m| m.key == meter.key) {
                return Err(CatalogError::new(
                    format!("meters[{i}].key"),
                    format!("{:?} is in the file twice", meter.key),
                )
                .into());
            }
            if meter.key == API_CALLS && meter.aggregation != Aggregation::Count {
                return Err(CatalogError::new(
                    format!("meters[{i}].aggregation"),
                    "must be count: api_calls counts admitted calls",
                )
                .into());
            }
        }
        let meters = Meters::new(stored_meters.iter().cloned().chain(file.meters.clone()));
        for (i, plan) in file.plans.iter().enumerate() {
            plan.validate(&meters)
                .map_err(|e| at(format!("plans[{i}]"), e))?;
            if file.plans[..i].iter().any(|p| p.key == plan.key) {
                return Err(CatalogError::new(
                    format!("plans[{i}].key"),
                    format!("{:?} is in the file twice", plan.key),
                )
                .into());
            }
            if plan.archived && plan.key == self.default_plan {
                return Err(PlanError::DefaultPlan(plan.key.clone()));
            }
        }
        let costs = file
            .costs
            .clone()
            .map(|items| RouteCosts { items }.sorted());
        if let Some(costs) = &costs {
            costs.validate(&meters).map_err(|e| {
                PlanError::Invalid(CatalogError::new(
                    format!("costs{}", e.field.trim_start_matches("items")),
                    e.message,
                ))
            })?;
        }

        let mut changes = Vec::new();
        for meter in &file.meters {
            let change = match stored_meters.get(&meter.key) {
                None => Change::Created,
                Some(stored) if stored == meter => Change::Unchanged,
                _ => Change::Updated,
            };
            if !dry_run {
                match change {
                    Change::Created => {
                        self.plans
                            .create_meter(meter, self.clock.now())
                            .await
                            .map_err(PlanError::Repo)?;
                    }
                    Change::Updated => {
                        if stored_meters
                            .get(&meter.key)
                            .is_some_and(|m| m.aggregation != meter.aggregation)
                        {
                            self.check_unnamed(
                                &format!("meters.{}.aggregation", meter.key),
                                &meter.key,
                            )
                            .await?;
                        }
                        self.store_meter(meter).await?;
                    }
                    _ => {}
                }
            }
            changes.push((format!("meter {}", meter.key), change));
        }
        if !dry_run && !file.meters.is_empty() {
            self.changed().await;
        }
        let stored = self.versions().await?;
        for plan in &file.plans {
            let newest = stored.get(&plan.key).and_then(|v| v.last());
            let change = match newest {
                None => Change::Created,
                Some(newest) if !same_terms(&newest.plan, plan) => Change::Revised,
                Some(newest) if newest.plan.archived && !plan.archived => Change::Restored,
                Some(newest) if !newest.plan.archived && plan.archived => Change::Archived,
                Some(_) => Change::Unchanged,
            };
            if !dry_run {
                match change {
                    Change::Created => {
                        self.create(plan).await?;
                    }
                    Change::Revised => {
                        self.revise(plan, PlanMove::NextPeriod).await?;
                        if newest.is_some_and(|n| n.plan.archived != plan.archived) {
                            self.set_archived(&plan.key, plan.archived).await?;
                        }
                    }
                    Change::Archived | Change::Restored => {
                        self.set_archived(&plan.key, plan.archived).await?;
                    }
                    Change::Unchanged | Change::Updated => {}
                }
            }
            changes.push((plan.key.clone(), change));
        }
        if let Some(costs) = costs {
            let change = if self.costs().await?.sorted() == costs {
                Change::Unchanged
            } else {
                Change::Updated
            };
            if !dry_run && change == Change::Updated {
                self.store_costs(&costs).await?;
                self.changed().await;
            }
            changes.push(("costs".to_owned(), change));
        }
        Ok(changes)
    }
}

/// Whether two plans have the same terms, whatever their versions and archiving.
pub fn same_terms(a: &PlanDefinition, b: &PlanDefinition) -> bool {
    let bare = |p: &PlanDefinition| PlanDefinition {
        version: 0,
        archived: false,
        ..p.clone()
    };
    bare(a) == bare(b)
}

/// The schemas of the answers that put a plan's fields beside others (`subscribers`,
/// `versions`): the plan's own schema refuses unknown fields (a misspelt field in a request
/// is an error), which an `allOf` of it would carry over to these answers.
#[cfg(feature = "openapi")]
mod schemas {
    use utoipa::openapi::schema::{ArrayBuilder, Schema};
    use utoipa::openapi::{Ref, RefOr};
    use utoipa::{PartialSchema, ToSchema};

    use super::{PlanDefinition, PlanDetail, PlanSummary, VersionEntry};
    use crate::catalog::PlanMove;

    /// The plan's schema open to more properties, with `extra` added and required.
    fn plan_with(extra: Vec<(&str, RefOr<Schema>)>) -> RefOr<Schema> {
        let mut schema = <PlanDefinition as PartialSchema>::schema();
        if let RefOr::T(Schema::Object(object)) = &mut schema {
            object.additional_properties = None;
            for (name, property) in extra {
                object.properties.insert(name.to_owned(), property);
                object.required.push(name.to_owned());
            }
        }
        schema
    }

    /// An RFC 3339 time.
    fn date_time() -> RefOr<Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .into()
    }

    fn named<T: ToSchema>() -> RefOr<Schema> {
        RefOr::Ref(Ref::from_schema_name(T::name()))
    }

    fn push<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((T::name().into_owned(), T::schema()));
        T::schemas(schemas);
    }

    impl PartialSchema for PlanSummary {
        fn schema() -> RefOr<Schema> {
            plan_with(vec![("subscribers", u64::schema())])
        }
    }

    impl ToSchema for PlanSummary {
        fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            PlanDefinition::schemas(schemas);
        }
    }

    impl PartialSchema for VersionEntry {
        fn schema() -> RefOr<Schema> {
            plan_with(vec![
                ("existing", named::<PlanMove>()),
                ("created_at", date_time()),
            ])
        }
    }

    impl ToSchema for VersionEntry {
        fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            PlanDefinition::schemas(schemas);
            push::<PlanMove>(schemas);
        }
    }

    impl PartialSchema for PlanDetail {
        fn schema() -> RefOr<Schema> {
            let versions = ArrayBuilder::new().items(named::<VersionEntry>()).build();
            plan_with(vec![
                ("subscribers", u64::schema()),
                ("versions", RefOr::T(Schema::Array(versions))),
            ])
        }
    }

    impl ToSchema for PlanDetail {
        fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            push::<VersionEntry>(schemas);
        }
    }
}
