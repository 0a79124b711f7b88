//! Managing the plan catalog: the checks and answers around [`PlanRepository`], for the
//! admin API, the command line and the catalog file alike.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;

use crate::catalog::{API_CALLS, CatalogError, PlanDefinition, PlanMove, Quote};
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

    /// The meters a limit may name.
    pub fn meters(&self) -> Vec<&'static str> {
        vec![API_CALLS]
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
        plan.validate(&self.meters())?;
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
        plan.validate(&self.meters())?;
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
        let meters = self.meters();
        if let Some(unknown) = usage.keys().find(|m| !meters.contains(&m.as_str())) {
            return Err(CatalogError::new(
                format!("usage.{unknown}"),
                format!("must name a defined meter, one of {}", meters.join(", ")),
            )
            .into());
        }
        let detail = self.get(key).await?;
        Ok(detail.summary.plan.quote(usage))
    }

    /// Makes the catalog what `file` says, plan by plan: new keys are created, changed
    /// terms make a new version (users move at their next period), `archived` is
    /// followed; plans the file leaves out are left as they are. With `dry_run` nothing is
    /// written. Every plan is checked before anything is written.
    pub async fn apply(
        &self,
        file: &[PlanDefinition],
        dry_run: bool,
    ) -> Result<Vec<(String, Change)>, PlanError> {
        for (i, plan) in file.iter().enumerate() {
            plan.validate(&self.meters()).map_err(|e| {
                PlanError::Invalid(CatalogError::new(
                    format!("plans[{i}].{}", e.field),
                    e.message,
                ))
            })?;
            if file[..i].iter().any(|p| p.key == plan.key) {
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
        let stored = self.versions().await?;
        let mut changes = Vec::new();
        for plan in file {
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
                    Change::Unchanged => {}
                }
            }
            changes.push((plan.key.clone(), change));
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
