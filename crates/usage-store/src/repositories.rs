// Every repository method, written once for both SQL backends.
//
// This file is compiled twice: `postgres/mod.rs` and `sqlite/mod.rs` each `include!` it,
// after naming what differs (the seam):
//
// | name | PostgreSQL | SQLite |
// |---|---|---|
// | `This`, `Conn` | `PgStore`, `AsyncPgConnection` | `SqliteStore`, `SyncConnectionWrapper<SqliteConnection>` |
// | `write_transaction!` | `BEGIN` (row locks serialise) | `BEGIN IMMEDIATE` (one writer) |
// | `for_update!`, `LOCK_ROWS` | `FOR UPDATE` | nothing (the write lock is held) |
// | `translate` | the text as is | `$n` to `?n`, `GREATEST`/`LEAST` to `MAX`/`MIN` |
// | `json_rows` | `jsonb_to_recordset` | `json_each` |
// | `count_references`, `upsert_counters` | arrays (`ANY`, `unnest`) | JSON arrays |
// | `insert_usage_rows` | `unnest` of one array per column | 4,000-row `INSERT OR IGNORE` |
// | `TOP_ENDPOINTS_JSON`, `EMPTY_JSON`, `DAY_OF_CREATED_AT` | `jsonb_agg`, `AT TIME ZONE` | `json_group_array`, `substr` |
// | `fold_late_calls` | one `DELETE ... RETURNING` | insert, then delete |
// | usage storage | monthly partitions | one table, pruned in batches |
//
// So a query is read and fixed in one place, and the compiler checks it against each
// backend's types. Times come from the caller or the store's injected clock, never from
// the database's.

use async_trait::async_trait;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Date as SqlDate, Integer, Nullable, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use time::{Date, OffsetDateTime};
use usage_core::catalog::{API_CALLS, Overrides, PlanDefinition, PlanMove};
use usage_core::meter::{Aggregation, Meter, RouteCost};
use usage_core::repo::{
    AdminAuditEntry, AdminRepository, ApiKeyRecord, ApiKeyRepository, ChargeStatus, DailyUsage,
    DailyUsageRepository, DayTotal, DeadLetter, DeletedKeys, EndpointStats, EventOutcome,
    EventsAfter, IncludedCalls, KeyIssue, KeyRetirement, LeaseTerms, MeterEvent,
    MeterUsageRepository, MeterUser, NewOverageCharge, OverageCharge, OverageChargeRepository,
    OverageLedgerEntry, PeriodUsage, PlanRepository, PlanVersion, PoolState,
    QuotaCounterRepository, QuotaDelta, QuotaTake, RecordOutcome, SessionRepository, Subscription,
    SubscriptionChange, SubscriptionOutcome, TOP_ENDPOINTS, UninvoicedOverage, UsagePrune,
    UsageRecord, UsageRepository, User, UserPageQuery, UserRepository, UserSort, UserUsageRow,
    late_write_cutoff, plan_key_issue, plan_subscription_change,
};
use usage_core::{ApiKeyId, BillingPeriod, Plan, RepoError, Store, UsageEvent, UserId};
use uuid::Uuid;

use crate::common::{
    BatchError, COUNTERS_BELOW_STORED, CountRow, DAILY_TOTALS, DAY_TOTALS, EndpointStatsRow,
    FOLD_INTO_DAILY, LEDGER_SQL, LedgerCounts, MeterReport, MeterRows, QuotaTakeRow,
    StoredCallsRow, TRANSACTION_ATTEMPTS, Tally, admin_sql, counter_deltas, dead_letters_json,
    deleted_keys, distinct_references, floor_columns, foldable, lease_binds, parse_top_endpoints,
    plan_counts, raw_day, session_sql, tally_reports, to_i64, to_u64,
};
use crate::error::{is_retryable, repo_error};
use crate::schema::{
    eco_api_keys, eco_api_usage, eco_deleted_keys, eco_meter_daily, eco_meter_usage, eco_meters,
    eco_overage_charges, eco_plan_versions, eco_plans, eco_route_costs, eco_stripe_events,
    eco_usage_daily, eco_usage_records, eco_usage_retention, eco_users,
};
use crate::types::{At, EventId, Id, Json, JsonText, Stamp, utc_text};

/// diesel errors to repository errors; `missing` names what a foreign key refers to.
fn db(missing: &'static str) -> impl Fn(diesel::result::Error) -> RepoError {
    move |e| repo_error(e, missing)
}

/// A raw statement written with `$n` parameters, in this backend's dialect.
fn query(sql: &str) -> diesel::query_builder::SqlQuery {
    diesel::sql_query(translate(sql))
}

/// Rows given as one JSON array of objects, for set-based statements whatever their
/// number (one bind parameter; SQLite allows at most 32,766).
fn json_array(rows: impl Iterator<Item = serde_json::Value>) -> String {
    serde_json::Value::Array(rows.collect()).to_string()
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_users, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct UserRow {
    id: String,
    email: String,
    plan: String,
    stripe_customer_id: Option<String>,
    created_at: OffsetDateTime,
    plan_subscription_id: Option<String>,
    blocked_at: Option<OffsetDateTime>,
    plan_version: Option<i32>,
    overrides: Option<String>,
}

impl UserRow {
    fn into_domain(self) -> Result<User, RepoError> {
        Ok(User {
            plan: Plan::from_stored(self.plan),
            plan_version: self.plan_version.and_then(|v| u32::try_from(v).ok()),
            overrides: parse_overrides(&self.id, self.overrides.as_deref())?,
            id: UserId::from_stored(self.id),
            email: self.email,
            stripe_customer_id: self.stripe_customer_id,
            created_at: self.created_at,
            plan_subscription_id: self.plan_subscription_id,
            blocked_at: self.blocked_at,
        })
    }
}

/// Overrides as stored (JSON).
fn overrides_json(overrides: Option<&Overrides>) -> Result<Option<String>, RepoError> {
    overrides
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| RepoError::Backend(format!("overrides: {e}")))
}

/// A plan version as its column holds it: none before the plan has one.
fn version_column(version: u32) -> Option<i32> {
    (version > 0).then(|| i32::try_from(version).unwrap_or(i32::MAX))
}

/// A user's `plan_version` after their plan is set to `plan`: the newest version when the
/// plan changes, what they hold when it stays the same (setting a plan again is no move).
fn version_on_move(
    plan: &Plan,
    newest: u32,
) -> impl diesel::expression::AppearsOnTable<eco_users::table, SqlType = Nullable<Integer>>
+ diesel::query_builder::QueryFragment<diesel::pg::Pg>
+ diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite>
+ diesel::expression::ValidGrouping<(), IsAggregate = diesel::expression::is_aggregate::No>
+ Send {
    use diesel::IntoSql;
    diesel::dsl::case_when(
        eco_users::plan.ne(plan.as_str().to_owned()),
        version_column(newest).into_sql::<Nullable<Integer>>(),
    )
    .otherwise(eco_users::plan_version)
}

/// A user's stored overrides, read back.
fn parse_overrides(user: &str, stored: Option<&str>) -> Result<Option<Overrides>, RepoError> {
    stored
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| RepoError::Backend(format!("user {user}: overrides: {e}")))
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_api_keys, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct ApiKeyRow {
    id: String,
    user_id: String,
    name: String,
    prefix: String,
    key_hash: String,
    created_at: OffsetDateTime,
    last_used_at: Option<OffsetDateTime>,
    revoked_at: Option<OffsetDateTime>,
    expires_at: Option<OffsetDateTime>,
}

/// An API key's columns, to insert.
macro_rules! key_values {
    ($k:expr) => {
        (
            eco_api_keys::id.eq($k.id.as_str()),
            eco_api_keys::user_id.eq($k.user_id.as_str()),
            eco_api_keys::name.eq(&$k.name),
            eco_api_keys::prefix.eq(&$k.prefix),
            eco_api_keys::key_hash.eq(&$k.key_hash),
            eco_api_keys::created_at.eq(At($k.created_at)),
            eco_api_keys::last_used_at.eq($k.last_used_at.map(At)),
            eco_api_keys::revoked_at.eq($k.revoked_at.map(At)),
            eco_api_keys::expires_at.eq($k.expires_at.map(At)),
        )
    };
}

impl ApiKeyRow {
    fn into_domain(self) -> ApiKeyRecord {
        ApiKeyRecord {
            id: ApiKeyId::from_stored(self.id),
            user_id: UserId::from_stored(self.user_id),
            name: self.name,
            prefix: self.prefix,
            key_hash: self.key_hash,
            created_at: self.created_at,
            last_used_at: self.last_used_at,
            revoked_at: self.revoked_at,
            expires_at: self.expires_at,
        }
    }
}

#[async_trait]
impl UserRepository for This {
    async fn create_user(&self, user: &User) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        // The version a new subscriber gets: the plan's newest.
        let newest = newest_plan_version(&mut conn, user.plan.as_str())
            .await
            .map_err(|e| e.into_repo("user"))?;
        let overrides = overrides_json(user.overrides.as_ref())?;
        diesel::insert_into(eco_users::table)
            .values((
                eco_users::id.eq(user.id.as_str()),
                eco_users::email.eq(&user.email),
                eco_users::plan.eq(user.plan.as_str()),
                eco_users::stripe_customer_id.eq(&user.stripe_customer_id),
                eco_users::created_at.eq(At(user.created_at)),
                eco_users::plan_subscription_id.eq(&user.plan_subscription_id),
                eco_users::blocked_at.eq(user.blocked_at.map(At)),
                eco_users::plan_version.eq(version_column(newest)),
                eco_users::overrides.eq(overrides.as_deref().map(Json)),
            ))
            .execute(&mut *conn)
            .await
            .map_err(db("user"))?;
        Ok(())
    }

    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, RepoError> {
        let mut conn = self.conn().await?;
        eco_users::table
            .find(id.as_str())
            .select(UserRow::as_select())
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("user"))?
            .map(UserRow::into_domain)
            .transpose()
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, RepoError> {
        let mut conn = self.conn().await?;
        eco_users::table
            .filter(eco_users::email.eq(email))
            .select(UserRow::as_select())
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("user"))?
            .map(UserRow::into_domain)
            .transpose()
    }

    async fn set_plan(
        &self,
        id: &UserId,
        plan: Plan,
        at: OffsetDateTime,
    ) -> Result<User, RepoError> {
        let mut conn = self.conn().await?;
        let newest = newest_plan_version(&mut conn, plan.as_str())
            .await
            .map_err(|e| e.into_repo("user"))?;
        diesel::update(eco_users::table.find(id.as_str()))
            .set((
                eco_users::plan_version.eq(version_on_move(&plan, newest)),
                eco_users::plan.eq(plan.as_str()),
                eco_users::plan_changed_at.eq(At(at)),
            ))
            .returning(UserRow::as_returning())
            .get_result(&mut *conn)
            .await
            .map_err(db("user"))?
            .into_domain()
    }

    async fn set_user_overrides(
        &self,
        id: &UserId,
        overrides: Option<&Overrides>,
        at: OffsetDateTime,
    ) -> Result<User, RepoError> {
        let mut conn = self.conn().await?;
        let overrides = overrides_json(overrides)?;
        diesel::update(eco_users::table.find(id.as_str()))
            .set((
                eco_users::overrides.eq(overrides.as_deref().map(Json)),
                // The key caches of every instance drop the user's limits.
                eco_users::plan_changed_at.eq(At(at)),
            ))
            .returning(UserRow::as_returning())
            .get_result(&mut *conn)
            .await
            .map_err(db("user"))?
            .into_domain()
    }

    async fn set_stripe_customer(
        &self,
        id: &UserId,
        customer: Option<&str>,
    ) -> Result<User, RepoError> {
        let mut conn = self.conn().await?;
        diesel::update(eco_users::table.find(id.as_str()))
            .set(eco_users::stripe_customer_id.eq(customer))
            .returning(UserRow::as_returning())
            .get_result(&mut *conn)
            .await
            .map_err(db("user"))?
            .into_domain()
    }

    async fn apply_subscription_change(
        &self,
        change: &SubscriptionChange,
        at: OffsetDateTime,
    ) -> Result<SubscriptionOutcome, RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<
            SubscriptionOutcome,
            BatchError,
        > {
            // The user's row lock (or SQLite's one writer) serialises the events of one
            // customer, and two deliveries of one event.
            let user = for_update!(
                eco_users::table
                    .filter(eco_users::stripe_customer_id.eq(&change.customer))
                    .select(UserRow::as_select())
            )
            .first(conn)
            .await
            .optional()?
            .map(UserRow::into_domain)
            .transpose()
            .map_err(BatchError::Repo)?;
            let seen: Option<String> = eco_stripe_events::table
                .find(&change.event_id)
                .select(eco_stripe_events::event_id)
                .first(conn)
                .await
                .optional()?;
            let latest: Option<OffsetDateTime> = eco_stripe_events::table
                .filter(eco_stripe_events::customer.eq(&change.customer))
                .filter(eco_stripe_events::outcome.eq("applied"))
                .select(diesel::dsl::max(eco_stripe_events::event_created))
                .first(conn)
                .await?;
            let outcome = plan_subscription_change(user.as_ref(), seen.is_none(), latest, change);
            let (Some(stored), Some(user)) = (outcome.stored_name(), user) else {
                return Ok(outcome);
            };
            diesel::insert_into(eco_stripe_events::table)
                .values((
                    eco_stripe_events::event_id.eq(&change.event_id),
                    eco_stripe_events::event_type.eq(&change.event_type),
                    eco_stripe_events::customer.eq(&change.customer),
                    eco_stripe_events::user_id.eq(user.id.as_str()),
                    eco_stripe_events::plan.eq(change.plan.as_str()),
                    eco_stripe_events::event_created.eq(At(change.created)),
                    eco_stripe_events::outcome.eq(stored),
                    eco_stripe_events::received_at.eq(At(at)),
                ))
                .execute(conn)
                .await?;
            if let SubscriptionOutcome::Applied(user) = &outcome {
                let newest = newest_plan_version(conn, user.plan.as_str()).await?;
                diesel::update(eco_users::table.find(user.id.as_str()))
                    .set((
                        eco_users::plan_version.eq(version_on_move(&user.plan, newest)),
                        eco_users::plan.eq(user.plan.as_str()),
                        eco_users::plan_subscription_id.eq(&user.plan_subscription_id),
                        eco_users::plan_changed_at.eq(At(at)),
                    ))
                    .execute(conn)
                    .await?;
            }
            Ok(outcome)
        })
        .await
        .map_err(|e| e.into_repo("user"))
    }

    async fn plans_changed_since(&self, since: OffsetDateTime) -> Result<Vec<UserId>, RepoError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = eco_users::table
            .filter(eco_users::plan_changed_at.ge(At(since)))
            .select(eco_users::id)
            .load(&mut *conn)
            .await
            .map_err(db("user"))?;
        Ok(ids.into_iter().map(UserId::from_stored).collect())
    }

    async fn count_users_by_plan(&self) -> Result<Vec<(Plan, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, i64)> = eco_users::table
            .group_by(eco_users::plan)
            .select((eco_users::plan, diesel::dsl::count_star()))
            .order(eco_users::plan)
            .load(&mut *conn)
            .await
            .map_err(db("user"))?;
        plan_counts(rows)
    }

    async fn count_users_by_terms(&self) -> Result<Vec<(Subscription, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, Option<i32>, Option<String>, i64)> = eco_users::table
            .group_by((
                eco_users::plan,
                eco_users::plan_version,
                eco_users::overrides,
            ))
            .select((
                eco_users::plan,
                eco_users::plan_version,
                eco_users::overrides,
                diesel::dsl::count_star(),
            ))
            .load(&mut *conn)
            .await
            .map_err(db("user"))?;
        rows.into_iter()
            .map(|(plan, version, overrides, n)| {
                let subscription = Subscription {
                    overrides: parse_overrides(&plan, overrides.as_deref())?,
                    plan: Plan::from_stored(plan),
                    plan_version: version.and_then(|v| u32::try_from(v).ok()),
                };
                Ok((subscription, to_u64(n)))
            })
            .collect()
    }

    async fn set_user_blocked(
        &self,
        id: &UserId,
        at: Option<OffsetDateTime>,
    ) -> Result<User, RepoError> {
        let mut conn = self.conn().await?;
        diesel::update(eco_users::table.find(id.as_str()))
            .set(eco_users::blocked_at.eq(at.map(At)))
            .returning(UserRow::as_returning())
            .get_result(&mut *conn)
            .await
            .map_err(db("user"))?
            .into_domain()
    }

    async fn delete_user(&self, id: &UserId) -> Result<bool, RepoError> {
        let mut conn = self.conn().await?;
        let deleted = diesel::delete(eco_users::table.find(id.as_str()))
            .execute(&mut *conn)
            .await
            .map_err(db("user"))?;
        Ok(deleted > 0)
    }
}

#[async_trait]
impl ApiKeyRepository for This {
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        diesel::insert_into(eco_api_keys::table)
            .values(key_values!(key))
            .execute(&mut *conn)
            .await
            .map_err(db("user"))?;
        Ok(())
    }

    async fn issue_api_key(
        &self,
        key: &ApiKeyRecord,
        max_active: usize,
        retire: Option<&KeyRetirement>,
    ) -> Result<KeyIssue, RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<KeyIssue, BatchError> {
            // The user's row lock (or SQLite's one writer) serialises issues for one user:
            // the count below cannot be raced past the limit.
            let user: Option<String> = for_update!(
                eco_users::table
                    .filter(eco_users::id.eq(key.user_id.as_str()))
                    .select(eco_users::id)
            )
            .first(conn)
            .await
            .optional()?;
            if user.is_none() {
                return Err(BatchError::Missing("user"));
            }
            let users_keys: Vec<ApiKeyRecord> = eco_api_keys::table
                .filter(eco_api_keys::user_id.eq(key.user_id.as_str()))
                .select(ApiKeyRow::as_select())
                .load(conn)
                .await?
                .into_iter()
                .map(ApiKeyRow::into_domain)
                .collect();
            let plan = plan_key_issue(&users_keys, key, max_active, retire);
            let KeyIssue::Issued { retired } = &plan else {
                return Ok(plan);
            };
            diesel::insert_into(eco_api_keys::table)
                .values(key_values!(key))
                .execute(conn)
                .await?;
            if let Some(old) = retired {
                diesel::update(eco_api_keys::table.find(old.id.as_str()))
                    .set((
                        eco_api_keys::revoked_at.eq(old.revoked_at.map(At)),
                        eco_api_keys::expires_at.eq(old.expires_at.map(At)),
                    ))
                    .execute(conn)
                    .await?;
            }
            Ok(plan)
        })
        .await
        .map_err(|e| e.into_repo("user"))
    }

    async fn api_key_and_plan_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<(ApiKeyRecord, Subscription)>, RepoError> {
        let mut conn = self.conn().await?;
        let found: Option<(ApiKeyRow, String, Option<i32>, Option<String>)> = eco_api_keys::table
            .inner_join(eco_users::table)
            .filter(eco_api_keys::key_hash.eq(key_hash))
            .select((
                ApiKeyRow::as_select(),
                eco_users::plan,
                eco_users::plan_version,
                eco_users::overrides,
            ))
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("API key"))?;
        found
            .map(|(key, plan, version, overrides)| {
                let overrides = parse_overrides(&key.user_id, overrides.as_deref())?;
                let subscription = Subscription {
                    plan: Plan::from_stored(plan),
                    plan_version: version.and_then(|v| u32::try_from(v).ok()),
                    overrides,
                };
                Ok((key.into_domain(), subscription))
            })
            .transpose()
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, RepoError> {
        let mut conn = self.conn().await?;
        Ok(eco_api_keys::table
            .filter(eco_api_keys::key_hash.eq(key_hash))
            .select(ApiKeyRow::as_select())
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("API key"))?
            .map(ApiKeyRow::into_domain))
    }

    async fn api_keys_for_user(&self, user_id: &UserId) -> Result<Vec<ApiKeyRecord>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<ApiKeyRow> = eco_api_keys::table
            .filter(eco_api_keys::user_id.eq(user_id.as_str()))
            .order((eco_api_keys::created_at.desc(), eco_api_keys::id.desc()))
            .select(ApiKeyRow::as_select())
            .load(&mut *conn)
            .await
            .map_err(db("API key"))?;
        Ok(rows.into_iter().map(ApiKeyRow::into_domain).collect())
    }

    async fn revoke_api_key(
        &self,
        user_id: &UserId,
        key_id: &ApiKeyId,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, RepoError> {
        let mut conn = self.conn().await?;
        // A second revocation keeps the first time.
        let keep_first = diesel::dsl::sql::<Nullable<Stamp>>("COALESCE(revoked_at, ")
            .bind::<Stamp, _>(At(at))
            .sql(")");
        Ok(diesel::update(
            eco_api_keys::table
                .filter(eco_api_keys::id.eq(key_id.as_str()))
                .filter(eco_api_keys::user_id.eq(user_id.as_str())),
        )
        .set(eco_api_keys::revoked_at.eq(keep_first))
        .returning(ApiKeyRow::as_returning())
        .get_result(&mut *conn)
        .await
        .optional()
        .map_err(db("API key"))?
        .map(ApiKeyRow::into_domain))
    }

    async fn touch_api_keys(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), RepoError> {
        if used.is_empty() {
            return Ok(());
        }
        // One statement whatever the number of keys, in id order.
        let mut used: Vec<(&str, OffsetDateTime)> =
            used.iter().map(|(id, at)| (id.as_str(), *at)).collect();
        used.sort_unstable();
        let rows = json_array(
            used.iter()
                .map(|(id, at)| serde_json::json!({"id": id, "at": utc_text(*at)})),
        );
        let sql = format!(
            "UPDATE eco_api_keys AS k SET last_used_at = d.at
             FROM (SELECT id, max(at) AS at FROM {} GROUP BY id) AS d
             WHERE k.id = d.id AND (k.last_used_at IS NULL OR k.last_used_at < d.at)",
            json_rows("$1", &[("id", "text"), ("at", "timestamptz")])
        );
        let mut conn = self.conn().await?;
        query(&sql)
            .bind::<Text, _>(rows)
            .execute(&mut *conn)
            .await
            .map_err(db("API key"))?;
        Ok(())
    }

    async fn api_keys_retired_since(
        &self,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<ApiKeyId>, RepoError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = eco_api_keys::table
            .filter(
                eco_api_keys::revoked_at
                    .ge(At(since))
                    .or(eco_api_keys::expires_at.between(At(since), At(now))),
            )
            .select(eco_api_keys::id)
            .load(&mut *conn)
            .await
            .map_err(db("API key"))?;
        Ok(ids.into_iter().map(ApiKeyId::from_stored).collect())
    }

    async fn delete_api_key(&self, user_id: &UserId, key_id: &ApiKeyId) -> Result<bool, RepoError> {
        let mut conn = self.conn().await?;
        let deleted = diesel::delete(
            eco_api_keys::table
                .filter(eco_api_keys::id.eq(key_id.as_str()))
                .filter(eco_api_keys::user_id.eq(user_id.as_str())),
        )
        .execute(&mut *conn)
        .await
        .map_err(db("API key"))?;
        Ok(deleted > 0)
    }

    async fn api_keys_deleted_after(&self, after: i64) -> Result<DeletedKeys, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(i64, String)> = eco_deleted_keys::table
            .filter(eco_deleted_keys::seq.gt(after))
            .order(eco_deleted_keys::seq)
            .select((eco_deleted_keys::seq, eco_deleted_keys::key_id))
            .load(&mut *conn)
            .await
            .map_err(db("API key"))?;
        Ok(deleted_keys(rows, after))
    }
}

/// Checks, once per batch, that every user and key it names exists (the events table
/// has no foreign keys, to spare two lookups per row).
async fn check_references(
    conn: &mut Conn,
    users: &[String],
    keys: &[String],
) -> Result<(), BatchError> {
    let found = count_references(conn, users, keys).await?;
    if found.users != users.len() as i64 {
        return Err(BatchError::Missing("user"));
    }
    if found.keys != keys.len() as i64 {
        return Err(BatchError::Missing("API key"));
    }
    Ok(())
}

/// How many of a batch's users and keys exist.
#[derive(QueryableByName)]
struct References {
    #[diesel(sql_type = BigInt)]
    users: i64,
    #[diesel(sql_type = BigInt)]
    keys: i64,
}

/// Adds a batch's inserted events to every (user, period) counter it touches, in one
/// statement whatever the number of users, rows in (user, period) order so that
/// concurrent writers lock counters in the same order. `$1` is the time; `rows`, the
/// backend's table `d` of (user_id, period_start, period_end, calls, included), included
/// being each plan's included calls, null for unlimited (the update reads it back from
/// EXCLUDED).
fn upsert_counters_sql(rows: &str) -> String {
    format!(
        "INSERT INTO eco_usage_records (user_id, period_start, period_end, api_calls,
                                        overage_calls, included_calls, updated_at)
         SELECT d.user_id, d.period_start, d.period_end, d.calls,
                CASE WHEN d.included IS NULL THEN 0 ELSE GREATEST(0, d.calls - d.included) END,
                d.included, $1
         FROM {rows} WHERE true
         ORDER BY d.user_id, d.period_start
         ON CONFLICT (user_id, period_start) DO UPDATE SET
             api_calls = eco_usage_records.api_calls + excluded.api_calls,
             overage_calls = CASE WHEN excluded.included_calls IS NULL THEN 0
                 ELSE GREATEST(0, eco_usage_records.api_calls + excluded.api_calls
                                  - excluded.included_calls) END,
             included_calls = excluded.included_calls,
             updated_at = excluded.updated_at"
    )
}

/// A stored call's id, as `insert_usage_rows` returns it: who, when and what units are
/// read from the batch in memory rather than sent back by the database.
#[derive(QueryableByName)]
struct InsertedEvent {
    #[diesel(sql_type = EventId)]
    event_id: Uuid,
}

/// The calls of `events` that were stored, each once (a batch may hold an id twice; the
/// second was not stored).
fn stored_events<'a>(events: &'a [UsageEvent], inserted: &[InsertedEvent]) -> Vec<&'a UsageEvent> {
    let mut ids: std::collections::HashSet<Uuid> = inserted.iter().map(|e| e.event_id).collect();
    events.iter().filter(|e| ids.remove(&e.event_id)).collect()
}

/// The meter reports of the stored calls of a batch: one per unit a call took.
fn unit_reports<'a>(stored: &[&'a UsageEvent]) -> Vec<MeterReport<'a>> {
    stored
        .iter()
        .flat_map(|call| {
            call.units.iter().map(|(meter, quantity)| MeterReport {
                user_id: call.user_id.as_str(),
                meter,
                at: call.created_at,
                quantity,
            })
        })
        .collect()
}

/// Who brings the admission counters (`eco_quota_counters`) up to reported units.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// The instances that admitted the calls, which push them as they push calls.
    ByInstances,
    /// The statement storing them: events, which no instance counted.
    Here,
}

/// Adds meter reports to their user's period (`eco_meter_usage`) and day
/// (`eco_meter_daily`), as each meter's aggregation adds them up: count, sum (saturating
/// at the largest BIGINT), max. `distinct` reports are unique_count meters' values seen
/// for the first time in their period (each counts one); the others go to every other
/// kind of meter. Reports of meters that do not exist are dropped (none is ever deleted).
/// `Counted::Here`: the existing admission counters of `count` and `sum` meters take them too.
async fn add_meter_reports(
    conn: &mut Conn,
    reports: &[MeterReport<'_>],
    distinct: bool,
    counted: Counted,
    now: OffsetDateTime,
) -> diesel::QueryResult<()> {
    if reports.is_empty() {
        return Ok(());
    }
    // The meters' aggregations, read here once (a handful of rows) so that each row's
    // quantity and merge are decided before the statements, not per row in them.
    let aggregations: Vec<(String, String)> = eco_meters::table
        .select((eco_meters::key, eco_meters::aggregation))
        .load(&mut *conn)
        .await?;
    // What a tally adds to its meter, and whether it merges by GREATEST (max) rather
    // than by adding; None for a meter that does not exist or is not of this kind.
    let added = |meter: &str, t: &Tally| -> Option<(i64, bool)> {
        let (_, aggregation) = aggregations.iter().find(|(key, _)| key == meter)?;
        match (aggregation.as_str(), distinct) {
            ("unique_count", true) | ("count", false) => Some((t.reports, false)),
            ("sum", false) => Some((t.total, false)),
            ("max", false) => Some((t.most, true)),
            _ => None,
        }
    };
    let (periods, days) = tally_reports(reports);
    // [added, greatest] rows of each table, and the admission counters' (count and sum).
    let mut period_rows = [MeterRows::new(), MeterRows::new()];
    let mut counter_rows = MeterRows::new();
    for ((user, meter, start), tally) in &periods {
        let Some((quantity, greatest)) = added(meter, tally) else {
            continue;
        };
        period_rows[usize::from(greatest)].push(user, meter, *start, quantity);
        if counted == Counted::Here && !distinct && !greatest {
            counter_rows.push(user, meter, *start, quantity);
        }
    }
    let mut day_rows = [MeterRows::new(), MeterRows::new()];
    for ((user, meter, date), tally) in &days {
        if let Some((quantity, greatest)) = added(meter, tally) {
            day_rows[usize::from(greatest)].push(user, meter, *date, quantity);
        }
    }
    let merged = |table: &str, greatest: bool| {
        if greatest {
            format!("GREATEST({table}.quantity, excluded.quantity)")
        } else {
            format!(
                "CASE WHEN {table}.quantity > {MAX} - excluded.quantity THEN {MAX}
                      ELSE {table}.quantity + excluded.quantity END",
                MAX = i64::MAX
            )
        }
    };
    for (greatest, rows) in [false, true].into_iter().zip(&period_rows) {
        if rows.is_empty() {
            continue;
        }
        let sql = |rows: &str| {
            format!(
                "INSERT INTO eco_meter_usage (user_id, period_start, meter, quantity, updated_at)
                 SELECT d.user_id, d.period_start, d.meter, d.quantity, $1
                 FROM {rows} WHERE true
                 ORDER BY d.user_id, d.period_start, d.meter
                 ON CONFLICT (user_id, period_start, meter) DO UPDATE SET
                     quantity = {},
                     updated_at = excluded.updated_at",
                merged("eco_meter_usage", greatest)
            )
        };
        merge_meter_rows(conn, &sql, now, rows).await?;
    }
    if !counter_rows.is_empty() {
        // The admission counters that exist take the same units (those made later start
        // from eco_meter_usage, which has them now), locked in the order syncs lock them.
        let sql = |rows: &str| {
            format!(
                "UPDATE eco_quota_counters AS c SET admitted =
                     CASE WHEN c.admitted > {MAX} - d.quantity THEN {MAX}
                          ELSE c.admitted + d.quantity END
                 FROM {rows}
                 WHERE c.user_id = d.user_id AND c.period_start = d.period_start
                   AND c.meter = d.meter
                   AND (SELECT count(*) FROM (
                         SELECT 1 FROM eco_quota_counters l
                         JOIN {rows} ON l.user_id = d.user_id
                                     AND l.period_start = d.period_start AND l.meter = d.meter
                         ORDER BY l.user_id, l.period_start, l.meter {LOCK_ROWS}) locked) >= 0",
                MAX = i64::MAX
            )
        };
        merge_meter_rows(conn, &sql, now, &counter_rows).await?;
    }
    for (greatest, rows) in [false, true].into_iter().zip(&day_rows) {
        if rows.is_empty() {
            continue;
        }
        let sql = |rows: &str| {
            format!(
                "INSERT INTO eco_meter_daily (user_id, meter, date, quantity)
                 SELECT d.user_id, d.meter, d.date, d.quantity
                 FROM {rows} WHERE true
                 ORDER BY d.user_id, d.meter, d.date
                 ON CONFLICT (user_id, meter, date) DO UPDATE SET quantity = {}",
                merged("eco_meter_daily", greatest)
            )
        };
        merge_meter_rows(conn, &sql, now, rows).await?;
    }
    Ok(())
}

/// Marks the days of calls stored late (a day that has ended, or ends within
/// `LATE_WRITE_MARGIN` of `now`): their aggregates, if any, are no longer current.
async fn mark_late_days(
    conn: &mut Conn,
    inserted: &[&UsageEvent],
    now: OffsetDateTime,
) -> diesel::QueryResult<()> {
    let cutoff = late_write_cutoff(now);
    let days: std::collections::BTreeSet<Date> = inserted
        .iter()
        .filter(|e| e.created_at < cutoff)
        .map(|e| e.created_at.date())
        .collect();
    for day in days {
        query(
            "INSERT INTO eco_usage_days (date, late_writes) VALUES ($1, 1)
             ON CONFLICT (date) DO UPDATE SET late_writes = eco_usage_days.late_writes + 1",
        )
        .bind::<SqlDate, _>(day)
        .execute(conn)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl UsageRepository for This {
    async fn record_usage(
        &self,
        events: &[UsageEvent],
        included: &IncludedCalls,
    ) -> Result<RecordOutcome, RepoError> {
        if events.is_empty() {
            return Ok(RecordOutcome::default());
        }
        let (users, keys) = distinct_references(events);
        let (users, keys) = (&users, &keys);
        let mut attempt = 1;
        loop {
            let now = self.clock.now();
            let mut conn = self.conn().await?;
            widen_usage_cache(&mut conn).await;
            let result = write_transaction!(&mut conn, async |conn| -> Result<u64, BatchError> {
                check_references(conn, users, keys).await?;
                // RETURNING names the rows actually inserted: replayed events are neither
                // stored nor counted again.
                let inserted = stored_events(events, &insert_usage_rows(conn, events).await?);
                mark_late_days(conn, &inserted, now).await?;
                let count = inserted.len() as u64;
                add_meter_reports(
                    conn,
                    &unit_reports(&inserted),
                    false,
                    Counted::ByInstances,
                    now,
                )
                .await?;
                let deltas = counter_deltas(
                    inserted.iter().map(|e| (e.user_id.clone(), e.created_at)),
                    included,
                );
                if !deltas.is_empty() {
                    upsert_counters(conn, &deltas, now).await?;
                }
                Ok(count)
            })
            .await;
            narrow_usage_cache(&mut conn).await;
            match result {
                Ok(inserted) => {
                    return Ok(RecordOutcome {
                        inserted,
                        duplicates: events.len() as u64 - inserted,
                    });
                }
                Err(BatchError::Db(e)) if is_retryable(&e) && attempt < TRANSACTION_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "retrying usage batch");
                    attempt += 1;
                }
                Err(e) => return Err(e.into_repo("user")),
            }
        }
    }

    async fn usage_record(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<Option<UsageRecord>, RepoError> {
        let mut conn = self.conn().await?;
        Ok(eco_usage_records::table
            .filter(eco_usage_records::user_id.eq(user_id.as_str()))
            .filter(eco_usage_records::period_start.eq(At(period_start)))
            .select(UsageRecordRow::as_select())
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("usage record"))?
            .map(UsageRecordRow::into_domain))
    }

    async fn endpoint_stats(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<EndpointStats>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<EndpointStatsRow> = query(
            "SELECT endpoint, method, count(*) AS calls,
                    count(*) FILTER (WHERE status_code >= 400) AS error_calls,
                    CAST(sum(response_time_ms) AS BIGINT) AS total_ms
             FROM eco_api_usage
             WHERE user_id = $1 AND created_at >= $2 AND created_at < $3
             GROUP BY endpoint, method
             ORDER BY calls DESC, endpoint COLLATE \"C\", method COLLATE \"C\"",
        )
        .bind::<Text, _>(user_id.as_str())
        .bind::<Stamp, _>(from)
        .bind::<Stamp, _>(to)
        .load(&mut *conn)
        .await
        .map_err(db("usage event"))?;
        Ok(rows
            .into_iter()
            .map(EndpointStatsRow::into_domain)
            .collect())
    }

    async fn count_usage_events(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        let mut conn = self.conn().await?;
        let n: i64 = eco_api_usage::table
            .filter(eco_api_usage::user_id.eq(user_id.as_str()))
            .filter(eco_api_usage::created_at.ge(At(from)))
            .filter(eco_api_usage::created_at.lt(At(to)))
            .count()
            .get_result(&mut *conn)
            .await
            .map_err(db("usage event"))?;
        Ok(to_u64(n))
    }

    async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), RepoError> {
        if letters.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO eco_usage_dead_letters (event_id, user_id, api_key_id, endpoint, method,
                 status_code, response_time_ms, created_at, included_calls, reason, failed_at,
                 units)
             SELECT event_id, user_id, api_key_id, endpoint, method, status_code,
                    response_time_ms, created_at, included_calls, reason, failed_at, units
             FROM {} WHERE true
             ON CONFLICT (event_id) DO NOTHING",
            json_rows(
                "$1",
                &[
                    ("event_id", "uuid"),
                    ("user_id", "text"),
                    ("api_key_id", "text"),
                    ("endpoint", "text"),
                    ("method", "text"),
                    ("status_code", "int4"),
                    ("response_time_ms", "int4"),
                    ("created_at", "timestamptz"),
                    ("included_calls", "int8"),
                    ("reason", "text"),
                    ("failed_at", "timestamptz"),
                    ("units", "text"),
                ]
            )
        );
        let mut conn = self.conn().await?;
        query(&sql)
            .bind::<Text, _>(dead_letters_json(letters))
            .execute(&mut *conn)
            .await
            .map_err(db("dead letter"))?;
        Ok(())
    }

    async fn dead_letters(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<DeadLetterRow> = query(
            "SELECT event_id, user_id, api_key_id, endpoint, method, status_code,
                    response_time_ms, created_at, included_calls, reason, failed_at, units
             FROM eco_usage_dead_letters
             WHERE $1 IS NULL OR event_id > $1 ORDER BY event_id LIMIT $2",
        )
        .bind::<Nullable<EventId>, _>(after)
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut *conn)
        .await
        .map_err(db("dead letter"))?;
        Ok(rows.into_iter().map(DeadLetterRow::into_domain).collect())
    }

    async fn remove_dead_letters(&self, event_ids: &[Uuid]) -> Result<u64, RepoError> {
        if event_ids.is_empty() {
            return Ok(0);
        }
        let ids = json_array(event_ids.iter().map(|id| serde_json::json!({"id": id})));
        let sql = format!(
            "DELETE FROM eco_usage_dead_letters WHERE event_id IN (SELECT id FROM {})",
            json_rows("$1", &[("id", "uuid")])
        );
        let mut conn = self.conn().await?;
        let n = query(&sql)
            .bind::<Text, _>(ids)
            .execute(&mut *conn)
            .await
            .map_err(db("dead letter"))?;
        Ok(n as u64)
    }

    async fn prepare_usage_storage(
        &self,
        now: OffsetDateTime,
        months_ahead: u32,
    ) -> Result<Vec<String>, RepoError> {
        let mut conn = self.conn().await?;
        prepare_usage_storage(&mut conn, now, months_ahead)
            .await
            .map_err(db("usage partition"))
    }

    async fn prune_usage(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<UsagePrune, RepoError> {
        let mut pruned = self.prune_usage_rows(before, dry_run).await?;
        let mut conn = self.conn().await?;
        let old_events = "FROM eco_meter_events WHERE created_at < $1";
        if dry_run {
            let row: CountRow = query(&format!("SELECT count(*) AS n {old_events}"))
                .bind::<Stamp, _>(pruned.before)
                .get_result(&mut *conn)
                .await
                .map_err(db("meter event"))?;
            pruned.meter_events = to_u64(row.n);
        } else {
            // In batches: each a short write (SQLite's one writer waits for none long).
            loop {
                let removed = query(&format!(
                    "DELETE FROM eco_meter_events WHERE (source, event_id) IN
                         (SELECT source, event_id {old_events} LIMIT 5000)"
                ))
                .bind::<Stamp, _>(pruned.before)
                .execute(&mut *conn)
                .await
                .map_err(db("meter event"))?;
                pruned.meter_events += removed as u64;
                if removed < 5000 {
                    break;
                }
            }
        }
        drop(conn);
        if !dry_run {
            // Recorded once everything before it is gone: readers then know that days
            // before it are counted only in their aggregates.
            let mut conn = self.conn().await?;
            query(
                "INSERT INTO eco_usage_retention (id, pruned_before) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE
                 SET pruned_before = GREATEST(eco_usage_retention.pruned_before,
                                              excluded.pruned_before)",
            )
            .bind::<Stamp, _>(pruned.before)
            .execute(&mut *conn)
            .await
            .map_err(db("usage retention"))?;
        }
        Ok(pruned)
    }

    async fn usage_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError> {
        use crate::schema::eco_api_usage::dsl as u;
        let mut conn = self.conn().await?;
        let mut events = u::eco_api_usage
            .filter(u::user_id.eq(user_id.as_str()))
            .filter(u::created_at.ge(At(from)))
            .filter(u::created_at.lt(At(to)))
            .into_boxed();
        if let Some((at, id)) = after {
            // `<= at` bounds the index scan; the rest orders ties by event id.
            events = events
                .filter(u::created_at.le(At(at)))
                .filter(u::created_at.lt(At(at)).or(u::event_id.lt(Id(id))));
        }
        let rows: Vec<crate::common::EventTuple<Uuid, OffsetDateTime>> = events
            .select((
                u::event_id,
                u::user_id,
                u::api_key_id,
                u::endpoint,
                u::method,
                u::status_code,
                u::response_time_ms,
                u::created_at,
                u::units,
            ))
            .order((u::created_at.desc(), u::event_id.desc()))
            .limit(i64::from(limit))
            .load(&mut *conn)
            .await
            .map_err(db("usage event"))?;
        Ok(rows
            .into_iter()
            .map(|(id, user, key, endpoint, method, status, ms, at, units)| {
                crate::common::event_from_columns(
                    id,
                    (user, key, endpoint, method),
                    (status, ms),
                    at,
                    units.as_deref(),
                )
            })
            .collect())
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_usage_records, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct UsageRecordRow {
    user_id: String,
    period_start: OffsetDateTime,
    period_end: OffsetDateTime,
    api_calls: i64,
    overage_calls: i64,
    overage_invoiced_calls: i64,
    updated_at: OffsetDateTime,
}

impl UsageRecordRow {
    fn into_domain(self) -> UsageRecord {
        UsageRecord {
            user_id: UserId::from_stored(self.user_id),
            period_start: self.period_start,
            period_end: self.period_end,
            api_calls: to_u64(self.api_calls),
            overage_calls: to_u64(self.overage_calls),
            overage_invoiced_calls: to_u64(self.overage_invoiced_calls),
            updated_at: self.updated_at,
        }
    }
}

#[derive(QueryableByName)]
struct DeadLetterRow {
    #[diesel(sql_type = EventId)]
    event_id: Uuid,
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Text)]
    api_key_id: String,
    #[diesel(sql_type = Text)]
    endpoint: String,
    #[diesel(sql_type = Text)]
    method: String,
    #[diesel(sql_type = Integer)]
    status_code: i32,
    #[diesel(sql_type = Integer)]
    response_time_ms: i32,
    #[diesel(sql_type = Stamp)]
    created_at: OffsetDateTime,
    #[diesel(sql_type = Nullable<BigInt>)]
    included_calls: Option<i64>,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = Stamp)]
    failed_at: OffsetDateTime,
    #[diesel(sql_type = Nullable<Text>)]
    units: Option<String>,
}

impl DeadLetterRow {
    fn into_domain(self) -> DeadLetter {
        DeadLetter {
            event: crate::common::event_from_columns(
                self.event_id,
                (self.user_id, self.api_key_id, self.endpoint, self.method),
                (self.status_code, self.response_time_ms),
                self.created_at,
                self.units.as_deref(),
            ),
            included_calls: self.included_calls.map(to_u64),
            reason: self.reason,
            failed_at: self.failed_at,
        }
    }
}

/// A (user, period, meter) counter as the quota statements return it.
#[derive(QueryableByName)]
struct QuotaCountRow {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Stamp)]
    period_start: OffsetDateTime,
    #[diesel(sql_type = Text)]
    meter: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// One counter a quota statement names: user, period start, meter.
type CounterKey<'a> = (&'a str, OffsetDateTime, &'a str);

/// The counters of quota statements, as JSON rows.
fn counter_keys(keys: &[CounterKey<'_>], deltas: Option<&[i64]>) -> String {
    json_array(keys.iter().enumerate().map(|(i, (user, period, meter))| {
        serde_json::json!({
            "uid": user,
            "at": utc_text(*period),
            "mtr": meter,
            "delta": deltas.and_then(|d| d.get(i)),
        })
    }))
}

/// The columns of [`counter_keys`]: user, period start, meter, delta (named apart from
/// the counters' own columns, which `RETURNING` names unqualified).
const COUNTER_KEY_COLUMNS: &[(&str, &str)] = &[
    ("uid", "text"),
    ("at", "timestamptz"),
    ("mtr", "text"),
    ("delta", "int8"),
];

/// Creates missing counters from the periods' stored usage (calls for `api_calls`, the
/// meter's quantity for the others), in one order for every writer.
async fn seed_quota_counters(conn: &mut Conn, keys: &[CounterKey<'_>]) -> Result<(), RepoError> {
    let sql = format!(
        "INSERT INTO eco_quota_counters (user_id, period_start, meter, admitted)
         SELECT d.uid, d.at, d.mtr, COALESCE(r.api_calls, m.quantity, 0)
         FROM {}
         LEFT JOIN eco_usage_records r
                ON d.mtr = '{API_CALLS}' AND r.user_id = d.uid AND r.period_start = d.at
         LEFT JOIN eco_meter_usage m
                ON m.user_id = d.uid AND m.period_start = d.at AND m.meter = d.mtr
         WHERE true
         ORDER BY d.uid, d.at, d.mtr
         ON CONFLICT (user_id, period_start, meter) DO NOTHING",
        json_rows("$1", COUNTER_KEY_COLUMNS)
    );
    query(&sql)
        .bind::<Text, _>(counter_keys(keys, None))
        .execute(conn)
        .await
        .map_err(db("quota counter"))?;
    Ok(())
}

/// Adds each delta to its counter, in one statement: on PostgreSQL the counters are first
/// locked in one order for every writer (an InitPlan, run before the update), so that
/// syncs of several instances never deadlock; returns the counts after. Counters that do
/// not exist yet are not returned.
async fn apply_counter_deltas(
    conn: &mut Conn,
    keys: &[CounterKey<'_>],
    deltas: &[i64],
) -> Result<Vec<QuotaCountRow>, RepoError> {
    let rows = json_rows("$1", COUNTER_KEY_COLUMNS);
    let sql = format!(
        "UPDATE eco_quota_counters AS c SET admitted = GREATEST(0, c.admitted + d.delta)
         FROM {rows}
         WHERE c.user_id = d.uid AND c.period_start = d.at AND c.meter = d.mtr
           AND (SELECT count(*) FROM (
                 SELECT 1 FROM eco_quota_counters l
                 JOIN {rows} ON l.user_id = d.uid AND l.period_start = d.at AND l.meter = d.mtr
                 ORDER BY l.user_id, l.period_start, l.meter {LOCK_ROWS}) locked) >= 0
         RETURNING user_id, period_start, meter, admitted AS n"
    );
    query(&sql)
        .bind::<Text, _>(counter_keys(keys, Some(deltas)))
        .load(conn)
        .await
        .map_err(db("quota counter"))
}

#[async_trait]
impl QuotaCounterRepository for This {
    async fn quota_count(
        &self,
        user_id: &UserId,
        meter: &str,
        period_start: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        let mut conn = self.conn().await?;
        seed_quota_counters(&mut conn, &[(user_id.as_str(), period_start, meter)]).await?;
        let row: CountRow = query(
            "SELECT admitted AS n FROM eco_quota_counters
             WHERE user_id = $1 AND period_start = $2 AND meter = $3",
        )
        .bind::<Text, _>(user_id.as_str())
        .bind::<Stamp, _>(period_start)
        .bind::<Text, _>(meter)
        .get_result(&mut *conn)
        .await
        .map_err(db("quota counter"))?;
        Ok(to_u64(row.n))
    }

    async fn quota_counts(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        users: &[UserId],
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<CounterKey<'_>> = users
            .iter()
            .map(|u| (u.as_str(), period_start, meter))
            .collect();
        let sql = format!(
            "SELECT c.user_id, c.admitted AS n FROM eco_quota_counters c
             JOIN {} ON c.user_id = d.uid AND c.period_start = d.at AND c.meter = d.mtr",
            json_rows("$1", COUNTER_KEY_COLUMNS)
        );
        let mut conn = self.conn().await?;
        let rows: Vec<StoredCallsRow> = query(&sql)
            .bind::<Text, _>(counter_keys(&keys, None))
            .load(&mut *conn)
            .await
            .map_err(db("quota counter"))?;
        Ok(rows.into_iter().map(StoredCallsRow::into_pair).collect())
    }

    async fn take_quota(
        &self,
        user_id: &UserId,
        meter: &str,
        period_start: OffsetDateTime,
        add: u64,
        lease: LeaseTerms,
    ) -> Result<QuotaTake, RepoError> {
        // Adds $4, then leases `lease_size` (max $5, cap $6, share $7, need $8) in one
        // statement: the right-hand sides all read the row as it was, so `last_taken` and
        // `admitted` get the same lease, and the row lock makes concurrent leases queue.
        const LEASE: &str = "CASE WHEN $6 - (admitted + $4) < $8 THEN 0
                 ELSE LEAST(GREATEST($5, $8), GREATEST($8, ($6 - (admitted + $4)) / $7),
                            $6 - (admitted + $4)) END";
        let take = format!(
            "UPDATE eco_quota_counters SET
                last_taken = {LEASE},
                admitted = admitted + $4 + {LEASE}
            WHERE user_id = $1 AND period_start = $2 AND meter = $3
            RETURNING last_taken AS taken, admitted AS n"
        );
        let mut conn = self.conn().await?;
        let (max, cap, share, need) = lease_binds(lease);
        for attempt in 0..2 {
            let row: Option<QuotaTakeRow> = query(&take)
                .bind::<Text, _>(user_id.as_str())
                .bind::<Stamp, _>(period_start)
                .bind::<Text, _>(meter)
                .bind::<BigInt, _>(to_i64(add))
                .bind::<BigInt, _>(max)
                .bind::<BigInt, _>(cap)
                .bind::<BigInt, _>(share)
                .bind::<BigInt, _>(need)
                .get_result(&mut *conn)
                .await
                .optional()
                .map_err(db("quota counter"))?;
            match row {
                Some(row) => return Ok(row.into_domain()),
                None if attempt == 0 => {
                    seed_quota_counters(&mut conn, &[(user_id.as_str(), period_start, meter)])
                        .await?;
                }
                None => {}
            }
        }
        Err(RepoError::NotFound {
            entity: "quota counter",
        })
    }

    async fn counters_below_stored(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<StoredCallsRow> = query(COUNTERS_BELOW_STORED)
            .bind::<Stamp, _>(period_start)
            .bind::<Text, _>(meter)
            .load(&mut *conn)
            .await
            .map_err(db("quota counter"))?;
        Ok(rows.into_iter().map(StoredCallsRow::into_pair).collect())
    }

    async fn raise_quota_counters(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        floors: &[(UserId, u64)],
    ) -> Result<u64, RepoError> {
        if floors.is_empty() {
            return Ok(0);
        }
        let (users, floors) = floor_columns(floors);
        let rows = json_rows("$3", &[("user_id", "text"), ("floor", "int8")]);
        let sql = format!(
            "UPDATE eco_quota_counters AS c SET admitted = d.floor
             FROM {rows}
             WHERE c.user_id = d.user_id AND c.period_start = $1 AND c.meter = $2
               AND c.admitted < d.floor
               AND (SELECT count(*) FROM (
                     SELECT 1 FROM eco_quota_counters l JOIN {rows} ON l.user_id = d.user_id
                     WHERE l.period_start = $1 AND l.meter = $2
                     ORDER BY l.user_id {LOCK_ROWS}) locked) >= 0"
        );
        let rows = json_array(
            users
                .iter()
                .zip(&floors)
                .map(|(user, floor)| serde_json::json!({"user_id": user, "floor": floor})),
        );
        let mut conn = self.conn().await?;
        let raised = query(&sql)
            .bind::<Stamp, _>(period_start)
            .bind::<Text, _>(meter)
            .bind::<Text, _>(rows)
            .execute(&mut *conn)
            .await
            .map_err(db("quota counter"))?;
        Ok(raised as u64)
    }

    async fn apply_quota_deltas(&self, deltas: &[QuotaDelta]) -> Result<Vec<u64>, RepoError> {
        if deltas.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<CounterKey<'_>> = deltas
            .iter()
            .map(|d| (d.user_id.as_str(), d.period_start, d.meter.as_ref()))
            .collect();
        let amounts: Vec<i64> = deltas.iter().map(|d| d.delta).collect();
        let mut conn = self.conn().await?;
        // Counters exist once a user's first call read them: one statement, as a rule.
        let mut rows = apply_counter_deltas(&mut conn, &keys, &amounts).await?;
        if rows.len() < deltas.len() {
            let done: std::collections::HashSet<CounterKey<'_>> = rows
                .iter()
                .map(|r| (r.user_id.as_str(), r.period_start, r.meter.as_str()))
                .collect();
            let missing: Vec<usize> = (0..keys.len())
                .filter(|&i| !done.contains(&keys[i]))
                .collect();
            let keys: Vec<CounterKey<'_>> = missing.iter().map(|&i| keys[i]).collect();
            let amounts: Vec<i64> = missing.iter().map(|&i| amounts[i]).collect();
            seed_quota_counters(&mut conn, &keys).await?;
            let more = apply_counter_deltas(&mut conn, &keys, &amounts).await?;
            rows.extend(more);
        }
        let after: std::collections::HashMap<(String, OffsetDateTime, String), i64> = rows
            .into_iter()
            .map(|r| ((r.user_id, r.period_start, r.meter), r.n))
            .collect();
        deltas
            .iter()
            .map(|d| {
                after
                    .get(&(d.user_id.to_string(), d.period_start, d.meter.to_string()))
                    .map(|n| to_u64(*n))
                    .ok_or(RepoError::NotFound {
                        entity: "quota counter",
                    })
            })
            .collect()
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_usage_daily, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct DailyRow {
    user_id: String,
    date: Date,
    api_calls: i64,
    error_calls: i64,
    total_response_time_ms: i64,
    avg_response_time_ms: f64,
    top_endpoints: String,
}

impl DailyRow {
    fn into_domain(self) -> Result<DailyUsage, RepoError> {
        Ok(DailyUsage {
            user_id: UserId::from_stored(self.user_id),
            date: self.date,
            api_calls: to_u64(self.api_calls),
            error_calls: to_u64(self.error_calls),
            total_response_time_ms: to_u64(self.total_response_time_ms),
            avg_response_time_ms: self.avg_response_time_ms,
            top_endpoints: parse_top_endpoints(&self.top_endpoints)?,
        })
    }
}

#[derive(QueryableByName)]
struct LateWrites {
    #[diesel(sql_type = BigInt)]
    late_writes: i64,
}

#[derive(QueryableByName)]
struct DayRow {
    #[diesel(sql_type = SqlDate)]
    date: Date,
}

#[derive(QueryableByName)]
struct RawDayRow {
    #[diesel(sql_type = SqlDate)]
    date: Date,
    #[diesel(sql_type = BigInt)]
    calls: i64,
    #[diesel(sql_type = BigInt)]
    errors: i64,
    #[diesel(sql_type = BigInt)]
    total_ms: i64,
}

#[async_trait]
impl DailyUsageRepository for This {
    async fn aggregate_usage_day(&self, date: Date, now: OffsetDateTime) -> Result<u64, RepoError> {
        // Set-based: one statement over the day's index range, whatever the row count.
        let rebuild = format!(
            "WITH per_endpoint AS (
                SELECT user_id, endpoint, method, count(*) AS calls,
                       count(*) FILTER (WHERE status_code >= 400) AS errors,
                       CAST(sum(response_time_ms) AS BIGINT) AS total_ms
                FROM eco_api_usage
                WHERE created_at >= $2 AND created_at < $3
                GROUP BY user_id, endpoint, method
            ), ranked AS (
                SELECT *, row_number() OVER (
                    PARTITION BY user_id
                    ORDER BY calls DESC, endpoint COLLATE \"C\", method COLLATE \"C\") AS rank
                FROM per_endpoint
            )
            INSERT INTO eco_usage_daily (user_id, date, api_calls, error_calls,
                total_response_time_ms, avg_response_time_ms, top_endpoints, updated_at)
            SELECT user_id, $1, CAST(sum(calls) AS BIGINT), CAST(sum(errors) AS BIGINT),
                   CAST(sum(total_ms) AS BIGINT),
                   CAST(sum(total_ms) AS DOUBLE PRECISION) / sum(calls),
                   {} FILTER (WHERE rank <= {TOP_ENDPOINTS}),
                   $4
            FROM ranked WHERE true
            GROUP BY user_id",
            TOP_ENDPOINTS_JSON
        );
        let start = date.midnight().assume_utc();
        let end = start + time::Duration::days(1);
        let ended = date < now.date();
        let fold = self
            .usage_pruned_before()
            .await?
            .is_some_and(|bound| date < bound.date());
        let mut conn = self.conn().await?;
        // A day that has ended gets its row first, committed on its own, so that every
        // writer of a late call from now on marks it.
        if ended {
            query("INSERT INTO eco_usage_days (date) VALUES ($1) ON CONFLICT (date) DO NOTHING")
                .bind::<SqlDate, _>(date)
                .execute(&mut *conn)
                .await
                .map_err(db("usage day"))?;
        }
        let period = BillingPeriod::containing(start).start();
        let users = write_transaction!(&mut conn, async |conn| -> Result<usize, BatchError> {
            // Late writes before this read are in the rebuild below (PostgreSQL's read
            // committed sees every commit up to its start; SQLite has the write lock);
            // later ones leave the day stale.
            let seen: Option<LateWrites> =
                query("SELECT late_writes FROM eco_usage_days WHERE date = $1")
                    .bind::<SqlDate, _>(date)
                    .get_result(conn)
                    .await
                    .optional()?;
            let users = if fold {
                fold_late_calls(conn, date, (start, end), now, period).await?
            } else {
                diesel::delete(eco_usage_daily::table.filter(eco_usage_daily::date.eq(date)))
                    .execute(conn)
                    .await?;
                query(&rebuild)
                    .bind::<SqlDate, _>(date)
                    .bind::<Stamp, _>(start)
                    .bind::<Stamp, _>(end)
                    .bind::<Stamp, _>(now)
                    .execute(conn)
                    .await?
            };
            if let (true, Some(seen)) = (ended, seen) {
                query(
                    "UPDATE eco_usage_days SET aggregated_writes = $2, aggregated_at = $3
                     WHERE date = $1",
                )
                .bind::<SqlDate, _>(date)
                .bind::<BigInt, _>(seen.late_writes)
                .bind::<Stamp, _>(now)
                .execute(conn)
                .await?;
                query(DAY_TOTALS)
                    .bind::<SqlDate, _>(date)
                    .execute(conn)
                    .await?;
            }
            Ok(users)
        })
        .await
        .map_err(|e| e.into_repo("usage event"))?;
        Ok(users as u64)
    }

    async fn daily_usage(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<DailyRow> = eco_usage_daily::table
            .filter(eco_usage_daily::user_id.eq(user_id.as_str()))
            .filter(eco_usage_daily::date.between(from, to))
            .order(eco_usage_daily::date.asc())
            .select(DailyRow::as_select())
            .load(&mut *conn)
            .await
            .map_err(db("daily usage"))?;
        rows.into_iter().map(DailyRow::into_domain).collect()
    }

    async fn aggregated_days(&self, from: Date, to: Date) -> Result<Vec<Date>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<DayRow> = query(
            "SELECT date FROM eco_usage_days
             WHERE date BETWEEN $1 AND $2 AND aggregated_writes = late_writes ORDER BY date",
        )
        .bind::<SqlDate, _>(from)
        .bind::<SqlDate, _>(to)
        .load(&mut *conn)
        .await
        .map_err(db("usage day"))?;
        Ok(rows.into_iter().map(|r| r.date).collect())
    }

    async fn daily_usage_from_events(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError> {
        let mut conn = self.conn().await?;
        let sql = format!(
            "SELECT {DAY_OF_CREATED_AT} AS date, count(*) AS calls,
                    count(*) FILTER (WHERE status_code >= 400) AS errors,
                    CAST(coalesce(sum(response_time_ms), 0) AS BIGINT) AS total_ms
             FROM eco_api_usage
             WHERE user_id = $1 AND created_at >= $2 AND created_at < $3
             GROUP BY 1 ORDER BY 1"
        );
        let rows: Vec<RawDayRow> = query(&sql)
            .bind::<Text, _>(user_id.as_str())
            .bind::<Stamp, _>(from.midnight().assume_utc())
            .bind::<Stamp, _>(to.midnight().assume_utc() + time::Duration::days(1))
            .load(&mut *conn)
            .await
            .map_err(db("usage event"))?;
        Ok(rows
            .into_iter()
            .map(|r| raw_day(user_id, r.date, r.calls, r.errors, r.total_ms))
            .collect())
    }

    async fn usage_pruned_before(&self) -> Result<Option<OffsetDateTime>, RepoError> {
        let mut conn = self.conn().await?;
        eco_usage_retention::table
            .select(eco_usage_retention::pruned_before)
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("usage retention"))
    }

    async fn first_usage_day(&self) -> Result<Option<Date>, RepoError> {
        let mut conn = self.conn().await?;
        let first: Option<OffsetDateTime> = eco_api_usage::table
            .select(diesel::dsl::min(eco_api_usage::created_at))
            .first(&mut *conn)
            .await
            .map_err(db("usage event"))?;
        Ok(first.map(|t| {
            t.checked_to_offset(time::UtcOffset::UTC)
                .unwrap_or(t)
                .date()
        }))
    }
}

/// The SQL that folds a pruned day's late calls into its aggregate (`$1` date, `$2..$3`
/// the day, `$4` now, `$5` the period's start): only calls of periods with nothing left
/// to invoice ([`foldable`]); the others stay raw until invoiced.
fn fold_insert(source: &str) -> String {
    format!(
        "INSERT INTO eco_usage_daily (user_id, date, api_calls, error_calls,
            total_response_time_ms, avg_response_time_ms, top_endpoints, updated_at)
         SELECT user_id, $1, count(*), count(*) FILTER (WHERE status_code >= 400),
                CAST(sum(response_time_ms) AS BIGINT),
                CAST(sum(response_time_ms) AS DOUBLE PRECISION) / count(*), {EMPTY_JSON}, $4
         FROM {source} GROUP BY user_id
         {FOLD_INTO_DAILY}"
    )
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_overage_charges, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct ChargeRow {
    id: i64,
    user_id: String,
    period_start: OffsetDateTime,
    meter: String,
    calls_from: i64,
    calls_to: i64,
    amount_cents: i64,
    idempotency_key: String,
    status: String,
    stripe_invoice_item_id: Option<String>,
    attempts: i32,
    last_error: Option<String>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl ChargeRow {
    fn into_domain(self) -> Result<OverageCharge, RepoError> {
        Ok(OverageCharge {
            id: self.id,
            user_id: UserId::from_stored(self.user_id),
            period_start: self.period_start,
            meter: self.meter,
            calls_from: to_u64(self.calls_from),
            calls_to: to_u64(self.calls_to),
            amount_cents: self.amount_cents,
            idempotency_key: self.idempotency_key,
            status: ChargeStatus::from_stored(&self.status).ok_or_else(|| {
                RepoError::Backend(format!("unknown charge status {:?}", self.status))
            })?,
            stripe_invoice_item_id: self.stripe_invoice_item_id,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            last_error: self.last_error,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[async_trait]
impl OverageChargeRepository for This {
    async fn create_overage_charge(
        &self,
        charge: &NewOverageCharge,
    ) -> Result<OverageCharge, RepoError> {
        let mut conn = self.conn().await?;
        diesel::insert_into(eco_overage_charges::table)
            .values((
                eco_overage_charges::user_id.eq(charge.user_id.as_str()),
                eco_overage_charges::period_start.eq(At(charge.period_start)),
                eco_overage_charges::meter.eq(&charge.meter),
                eco_overage_charges::calls_from.eq(to_i64(charge.calls_from)),
                eco_overage_charges::calls_to.eq(to_i64(charge.calls_to)),
                eco_overage_charges::amount_cents.eq(charge.amount_cents),
                eco_overage_charges::idempotency_key.eq(&charge.idempotency_key),
                eco_overage_charges::status.eq(ChargeStatus::Pending.as_str()),
                eco_overage_charges::created_at.eq(At(charge.created_at)),
                eco_overage_charges::updated_at.eq(At(charge.created_at)),
            ))
            .returning(ChargeRow::as_returning())
            .get_result(&mut *conn)
            .await
            .map_err(db("user"))?
            .into_domain()
    }

    async fn overage_charge_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<OverageCharge>, RepoError> {
        let mut conn = self.conn().await?;
        eco_overage_charges::table
            .filter(eco_overage_charges::idempotency_key.eq(idempotency_key))
            .select(ChargeRow::as_select())
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("overage charge"))?
            .map(ChargeRow::into_domain)
            .transpose()
    }

    async fn complete_overage_charge(
        &self,
        id: i64,
        stripe_invoice_item_id: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use crate::schema::eco_overage_charges::dsl as c;
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<ChargeRow, BatchError> {
            let charge: ChargeRow = diesel::update(c::eco_overage_charges.find(id))
                .set((
                    c::status.eq(ChargeStatus::Succeeded.as_str()),
                    c::stripe_invoice_item_id.eq(stripe_invoice_item_id),
                    c::attempts.eq(c::attempts + 1),
                    c::last_error.eq(None::<String>),
                    c::updated_at.eq(At(at)),
                ))
                .returning(ChargeRow::as_returning())
                .get_result(conn)
                .await?;
            // The calls' period counts invoiced overage calls; another meter's, invoiced
            // quantity.
            let invoiced = if charge.meter == API_CALLS {
                "UPDATE eco_usage_records
                 SET overage_invoiced_calls = GREATEST(overage_invoiced_calls, $3), updated_at = $4
                 WHERE user_id = $1 AND period_start = $2 AND $5 = 'api_calls'"
            } else {
                "UPDATE eco_meter_usage
                 SET invoiced_quantity = GREATEST(invoiced_quantity, $3), updated_at = $4
                 WHERE user_id = $1 AND period_start = $2 AND meter = $5"
            };
            query(invoiced)
                .bind::<Text, _>(&charge.user_id)
                .bind::<Stamp, _>(charge.period_start)
                .bind::<BigInt, _>(charge.calls_to)
                .bind::<Stamp, _>(at)
                .bind::<Text, _>(&charge.meter)
                .execute(conn)
                .await?;
            Ok(charge)
        })
        .await
        .map_err(|e| e.into_repo("overage charge"))?
        .into_domain()
    }

    async fn claim_overage_charge(
        &self,
        id: i64,
        seen_updated_at: OffsetDateTime,
        at: OffsetDateTime,
    ) -> Result<Option<OverageCharge>, RepoError> {
        use crate::schema::eco_overage_charges::dsl as c;
        let mut conn = self.conn().await?;
        diesel::update(
            c::eco_overage_charges
                .find(id)
                .filter(c::status.eq(ChargeStatus::Pending.as_str()))
                .filter(c::updated_at.eq(At(seen_updated_at))),
        )
        .set(c::updated_at.eq(At(at)))
        .returning(ChargeRow::as_returning())
        .get_result(&mut *conn)
        .await
        .optional()
        .map_err(db("overage charge"))?
        .map(ChargeRow::into_domain)
        .transpose()
    }

    async fn note_overage_charge_attempt(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        self.update_charge(id, None, error, at).await
    }

    async fn fail_overage_charge(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        self.update_charge(id, Some(ChargeStatus::Failed), error, at)
            .await
    }

    async fn overage_charges_for_user(
        &self,
        user_id: &UserId,
    ) -> Result<Vec<OverageCharge>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<ChargeRow> = eco_overage_charges::table
            .filter(eco_overage_charges::user_id.eq(user_id.as_str()))
            .order(eco_overage_charges::id.asc())
            .select(ChargeRow::as_select())
            .load(&mut *conn)
            .await
            .map_err(db("overage charge"))?;
        rows.into_iter().map(ChargeRow::into_domain).collect()
    }

    async fn uninvoiced_overage(&self) -> Result<Vec<UninvoicedOverage>, RepoError> {
        let mut conn = self.conn().await?;
        let mut rows: Vec<UninvoicedRow> = query(
            "SELECT r.user_id, 'api_calls' AS meter, u.plan, u.stripe_customer_id,
                    r.period_start, r.period_end, r.overage_calls, r.overage_invoiced_calls
             FROM eco_usage_records r JOIN eco_users u ON u.id = r.user_id
             WHERE r.overage_calls > r.overage_invoiced_calls",
        )
        .load(&mut *conn)
        .await
        .map_err(db("usage record"))?;
        // Other meters: the whole quantity is priced (its limit's `included` inside), so
        // a period is listed while its quantity is not all invoiced. Its end is the
        // calendar month's.
        let meters: Vec<UninvoicedRow> = query(
            "SELECT m.user_id, m.meter, u.plan, u.stripe_customer_id,
                    m.period_start, m.period_start AS period_end,
                    m.quantity AS overage_calls, m.invoiced_quantity AS overage_invoiced_calls
             FROM eco_meter_usage m JOIN eco_users u ON u.id = m.user_id
             JOIN eco_meters k ON k.key = m.meter
             WHERE m.quantity > m.invoiced_quantity",
        )
        .load(&mut *conn)
        .await
        .map_err(db("meter usage"))?;
        rows.extend(meters.into_iter().map(|mut row| {
            row.period_end = BillingPeriod::containing(row.period_start).end();
            row
        }));
        rows.sort_by(|a, b| {
            (&a.user_id, a.period_start, &a.meter).cmp(&(&b.user_id, b.period_start, &b.meter))
        });
        rows.into_iter().map(UninvoicedRow::into_domain).collect()
    }

    async fn meter_invoicing(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
        meter: &str,
    ) -> Result<Option<(u64, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let row: Option<(i64, i64)> = eco_meter_usage::table
            .filter(eco_meter_usage::user_id.eq(user_id.as_str()))
            .filter(eco_meter_usage::period_start.eq(At(period_start)))
            .filter(eco_meter_usage::meter.eq(meter))
            .select((
                eco_meter_usage::quantity,
                eco_meter_usage::invoiced_quantity,
            ))
            .first(&mut *conn)
            .await
            .optional()
            .map_err(db("meter usage"))?;
        Ok(row.map(|(quantity, invoiced)| (to_u64(quantity), to_u64(invoiced))))
    }

    async fn overage_ledger(&self) -> Result<Vec<OverageLedgerEntry>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<LedgerRow> = query(LEDGER_SQL)
            .load(&mut *conn)
            .await
            .map_err(db("overage charge"))?;
        Ok(rows.into_iter().map(LedgerRow::into_domain).collect())
    }
}

impl This {
    /// Counts a failed attempt at a charge; `status` set when it is given up.
    async fn update_charge(
        &self,
        id: i64,
        status: Option<ChargeStatus>,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use crate::schema::eco_overage_charges::dsl as c;
        let mut conn = self.conn().await?;
        let status = status.map(ChargeStatus::as_str);
        diesel::update(c::eco_overage_charges.find(id))
            .set((
                c::status.eq(diesel::dsl::sql::<Text>("COALESCE(")
                    .bind::<Nullable<Text>, _>(status)
                    .sql(", status)")),
                c::attempts.eq(c::attempts + 1),
                c::last_error.eq(error),
                c::updated_at.eq(At(at)),
            ))
            .returning(ChargeRow::as_returning())
            .get_result(&mut *conn)
            .await
            .map_err(db("overage charge"))?
            .into_domain()
    }
}

#[derive(QueryableByName)]
struct UninvoicedRow {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Text)]
    meter: String,
    #[diesel(sql_type = Text)]
    plan: String,
    #[diesel(sql_type = Nullable<Text>)]
    stripe_customer_id: Option<String>,
    #[diesel(sql_type = Stamp)]
    period_start: OffsetDateTime,
    #[diesel(sql_type = Stamp)]
    period_end: OffsetDateTime,
    #[diesel(sql_type = BigInt)]
    overage_calls: i64,
    #[diesel(sql_type = BigInt)]
    overage_invoiced_calls: i64,
}

impl UninvoicedRow {
    fn into_domain(self) -> Result<UninvoicedOverage, RepoError> {
        Ok(UninvoicedOverage {
            user_id: UserId::from_stored(self.user_id),
            meter: self.meter,
            plan: Plan::from_stored(self.plan),
            stripe_customer_id: self.stripe_customer_id,
            period_start: self.period_start,
            period_end: self.period_end,
            overage_calls: to_u64(self.overage_calls),
            overage_invoiced_calls: to_u64(self.overage_invoiced_calls),
        })
    }
}

#[derive(QueryableByName)]
struct LedgerRow {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Stamp)]
    period_start: OffsetDateTime,
    #[diesel(sql_type = Text)]
    meter: String,
    #[diesel(embed)]
    counts: LedgerCounts,
}

impl LedgerRow {
    fn into_domain(self) -> OverageLedgerEntry {
        self.counts.into_entry(
            UserId::from_stored(self.user_id),
            self.period_start,
            self.meter,
        )
    }
}

#[async_trait]
impl AdminRepository for This {
    async fn daily_totals(&self, from: Date, to: Date) -> Result<Vec<DayTotal>, RepoError> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = SqlDate)]
            date: Date,
            #[diesel(sql_type = BigInt)]
            api_calls: i64,
            #[diesel(sql_type = BigInt)]
            error_calls: i64,
        }
        let mut conn = self.conn().await?;
        let rows: Vec<Row> = query(DAILY_TOTALS)
            .bind::<SqlDate, _>(from)
            .bind::<SqlDate, _>(to)
            .load(&mut *conn)
            .await
            .map_err(db("usage day"))?;
        Ok(rows
            .into_iter()
            .map(|r| DayTotal {
                date: r.date,
                api_calls: to_u64(r.api_calls),
                error_calls: to_u64(r.error_calls),
            })
            .collect())
    }

    async fn record_admin_action(&self, entry: &AdminAuditEntry) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        query(admin_sql::INSERT_AUDIT)
            .bind::<Text, _>(entry.admin_id.as_str())
            .bind::<Text, _>(&entry.method)
            .bind::<Text, _>(&entry.route)
            .bind::<Text, _>(&entry.params)
            .bind::<Integer, _>(i32::from(entry.status))
            .bind::<Stamp, _>(entry.created_at)
            .execute(&mut *conn)
            .await
            .map_err(db("audit entry"))?;
        Ok(())
    }

    async fn prune_admin_actions(
        &self,
        before: OffsetDateTime,
        batch: u32,
    ) -> Result<u64, RepoError> {
        let mut removed = 0;
        loop {
            // A connection per batch: other writers get in between.
            let mut conn = self.conn().await?;
            let n = query(admin_sql::PRUNE_AUDIT)
                .bind::<Stamp, _>(before)
                .bind::<BigInt, _>(i64::from(batch.max(1)))
                .execute(&mut *conn)
                .await
                .map_err(db("audit entry"))?;
            removed += n as u64;
            if n < batch.max(1) as usize {
                return Ok(removed);
            }
        }
    }

    async fn admin_actions(
        &self,
        offset: u64,
        limit: u32,
    ) -> Result<(u64, Vec<AdminAuditEntry>), RepoError> {
        let mut conn = self.conn().await?;
        let total: CountRow = query(admin_sql::COUNT_AUDIT)
            .get_result(&mut *conn)
            .await
            .map_err(db("audit entry"))?;
        let rows: Vec<AuditRow> = query(admin_sql::AUDIT_PAGE)
            .bind::<BigInt, _>(i64::from(limit))
            .bind::<BigInt, _>(to_i64(offset))
            .load(&mut *conn)
            .await
            .map_err(db("audit entry"))?;
        Ok((
            to_u64(total.n),
            rows.into_iter().map(AuditRow::into_domain).collect(),
        ))
    }

    async fn users_page(
        &self,
        page: &UserPageQuery,
    ) -> Result<(u64, Vec<UserUsageRow>), RepoError> {
        let mut conn = self.conn().await?;
        let plan = page.plan.as_ref().map_or("", Plan::as_str);
        let pattern = admin_sql::contains_pattern(page.search.as_deref());
        let total = count_users(&mut conn, plan, &pattern).await?;
        // A page past the end costs nothing.
        if page.offset >= total {
            return Ok((total, Vec::new()));
        }
        if page.sort != UserSort::ApiCalls {
            let sql = admin_sql::users_page(page.sort, page.descending);
            let rows = user_rows(&mut conn, &sql, page, page.offset, page.limit).await?;
            return Ok((total, rows));
        }
        // By calls: users with a record this period, then those without (descending).
        let with = admin_sql::calls_page_with_records(page.descending);
        let without = admin_sql::calls_page_without_records(page.descending);
        let (first, second) = if page.descending {
            (&with, &without)
        } else {
            (&without, &with)
        };
        let mut rows = user_rows(&mut conn, first, page, page.offset, page.limit).await?;
        let first_total = if rows.is_empty() {
            let counted: CountRow = query(&admin_sql::count_with_records())
                .bind::<Stamp, _>(page.period_start)
                .bind::<Text, _>(plan)
                .bind::<Text, _>(&pattern)
                .get_result(&mut *conn)
                .await
                .map_err(db("user"))?;
            let with_records = to_u64(counted.n);
            Some(if page.descending {
                with_records
            } else {
                total - with_records.min(total)
            })
        } else {
            None
        };
        if let Some((offset, limit)) =
            admin_sql::second_group(page.offset, page.limit, rows.len(), first_total)
        {
            rows.extend(user_rows(&mut conn, second, page, offset, limit).await?);
        }
        Ok((total, rows))
    }

    async fn users_terms(
        &self,
        period_start: OffsetDateTime,
        plan: Option<&Plan>,
        search: Option<&str>,
        min_calls: u64,
    ) -> Result<Vec<(UserId, Subscription, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<HeavyUserRow> = query(&admin_sql::users_terms())
            .bind::<Stamp, _>(period_start)
            .bind::<Text, _>(plan.map_or("", Plan::as_str))
            .bind::<Text, _>(admin_sql::contains_pattern(search))
            .bind::<BigInt, _>(to_i64(min_calls))
            .load(&mut *conn)
            .await
            .map_err(db("user"))?;
        rows.into_iter()
            .map(|row| {
                let id = UserId::from_stored(row.id.clone());
                row.into_domain().map(|(terms, calls)| (id, terms, calls))
            })
            .collect()
    }

    async fn users_by_price(
        &self,
        period_start: OffsetDateTime,
        plan: Option<&Plan>,
        search: Option<&str>,
        prices: &[(Plan, u32, i64)],
        min_calls: u64,
        descending: bool,
        limit: u64,
    ) -> Result<(u64, Vec<(UserId, i64)>), RepoError> {
        let mut conn = self.conn().await?;
        let plan = plan.map_or("", Plan::as_str);
        let pattern = admin_sql::contains_pattern(search);
        let total = count_users(&mut conn, plan, &pattern).await?;
        let rows = json_rows(
            "$4",
            &[("plan", "text"), ("version", "int8"), ("price", "int8")],
        );
        let prices = json_array(prices.iter().map(|(plan, version, price)| {
            serde_json::json!({"plan": plan.as_str(), "version": version, "price": price})
        }));
        let page: Vec<IdCountRow> = query(&admin_sql::users_by_price(&rows, descending))
            .bind::<Stamp, _>(period_start)
            .bind::<Text, _>(plan)
            .bind::<Text, _>(&pattern)
            .bind::<Text, _>(prices)
            .bind::<BigInt, _>(to_i64(min_calls))
            .bind::<BigInt, _>(to_i64(limit))
            .load(&mut *conn)
            .await
            .map_err(db("user"))?;
        Ok((
            total,
            page.into_iter()
                .map(|r| (UserId::from_stored(r.id), r.n))
                .collect(),
        ))
    }

    async fn users_rows(
        &self,
        period_start: OffsetDateTime,
        ids: &[UserId],
    ) -> Result<Vec<UserUsageRow>, RepoError> {
        let mut conn = self.conn().await?;
        let keys: Vec<&str> = ids.iter().map(UserId::as_str).collect();
        let users: Vec<UserRow> = eco_users::table
            .filter(eco_users::id.eq_any(&keys))
            .select(UserRow::as_select())
            .load(&mut *conn)
            .await
            .map_err(db("user"))?;
        let counts: std::collections::HashMap<String, (i64, i64)> = eco_usage_records::table
            .filter(eco_usage_records::period_start.eq(At(period_start)))
            .filter(eco_usage_records::user_id.eq_any(&keys))
            .select((
                eco_usage_records::user_id,
                eco_usage_records::api_calls,
                eco_usage_records::overage_calls,
            ))
            .load::<(String, i64, i64)>(&mut *conn)
            .await
            .map_err(db("usage record"))?
            .into_iter()
            .map(|(user, calls, overage)| (user, (calls, overage)))
            .collect();
        let mut by_id: std::collections::HashMap<String, User> = std::collections::HashMap::new();
        for row in users {
            let user = row.into_domain()?;
            by_id.insert(user.id.as_str().to_owned(), user);
        }
        Ok(ids
            .iter()
            .filter_map(|id| {
                let user = by_id.remove(id.as_str())?;
                let (calls, overage) = counts.get(id.as_str()).copied().unwrap_or((0, 0));
                Some(UserUsageRow {
                    user,
                    api_calls: to_u64(calls),
                    overage_calls: to_u64(overage),
                })
            })
            .collect())
    }

    async fn period_usage(
        &self,
        period_start: OffsetDateTime,
        today: (OffsetDateTime, OffsetDateTime),
        min_calls: u64,
    ) -> Result<PeriodUsage, RepoError> {
        let mut conn = self.conn().await?;
        let today_calls: CountRow = query(admin_sql::CALLS_BETWEEN)
            .bind::<Stamp, _>(today.0)
            .bind::<Stamp, _>(today.1)
            .get_result(&mut *conn)
            .await
            .map_err(db("usage event"))?;
        let period_calls: CountRow = query(admin_sql::PERIOD_CALLS)
            .bind::<Stamp, _>(period_start)
            .get_result(&mut *conn)
            .await
            .map_err(db("usage record"))?;
        #[derive(QueryableByName)]
        struct InvoicedRow {
            #[diesel(sql_type = BigInt)]
            calls: i64,
            #[diesel(sql_type = BigInt)]
            meters: i64,
        }
        let invoiced: InvoicedRow = query(admin_sql::PERIOD_INVOICED_CENTS)
            .bind::<Stamp, _>(period_start)
            .get_result(&mut *conn)
            .await
            .map_err(db("overage charge"))?;
        let heavy: Vec<HeavyUserRow> = query(admin_sql::HEAVY_USERS)
            .bind::<Stamp, _>(period_start)
            .bind::<BigInt, _>(to_i64(min_calls))
            .load(&mut *conn)
            .await
            .map_err(db("usage record"))?;
        Ok(PeriodUsage {
            api_calls: to_u64(period_calls.n),
            api_calls_today: to_u64(today_calls.n),
            invoiced_cents: invoiced.calls,
            meters_invoiced_cents: invoiced.meters,
            heavy_users: heavy
                .into_iter()
                .map(HeavyUserRow::into_domain)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// An id and a number.
#[derive(QueryableByName)]
struct IdCountRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A row of [`admin_sql::HEAVY_USERS`].
#[derive(QueryableByName)]
struct HeavyUserRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    plan: String,
    #[diesel(sql_type = Nullable<Integer>)]
    plan_version: Option<i32>,
    #[diesel(sql_type = Nullable<JsonText>)]
    overrides: Option<String>,
    #[diesel(sql_type = BigInt)]
    api_calls: i64,
}

impl HeavyUserRow {
    fn into_domain(self) -> Result<(Subscription, u64), RepoError> {
        let subscription = Subscription {
            overrides: parse_overrides(&self.id, self.overrides.as_deref())?,
            plan: Plan::from_stored(self.plan),
            plan_version: self.plan_version.and_then(|v| u32::try_from(v).ok()),
        };
        Ok((subscription, to_u64(self.api_calls)))
    }
}

/// How many users the users list's filters keep (`plan` or '', a LIKE `pattern` or '').
async fn count_users(conn: &mut Conn, plan: &str, pattern: &str) -> Result<u64, RepoError> {
    let counted: CountRow = query(admin_sql::COUNT_USERS)
        .bind::<Text, _>(plan)
        .bind::<Text, _>(pattern)
        .get_result(conn)
        .await
        .map_err(db("user"))?;
    Ok(to_u64(counted.n))
}

/// One page of users rows from `sql` (parameters as `admin_sql::users_page`).
async fn user_rows(
    conn: &mut Conn,
    sql: &str,
    page: &UserPageQuery,
    offset: u64,
    limit: u32,
) -> Result<Vec<UserUsageRow>, RepoError> {
    let rows: Vec<UserPageRow> = query(sql)
        .bind::<Stamp, _>(page.period_start)
        .bind::<Text, _>(page.plan.as_ref().map_or("", Plan::as_str))
        .bind::<Text, _>(admin_sql::contains_pattern(page.search.as_deref()))
        .bind::<BigInt, _>(i64::from(limit))
        .bind::<BigInt, _>(to_i64(offset))
        .load(conn)
        .await
        .map_err(db("user"))?;
    rows.into_iter().map(UserPageRow::into_domain).collect()
}

#[derive(QueryableByName)]
struct AuditRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    admin_id: String,
    #[diesel(sql_type = Text)]
    method: String,
    #[diesel(sql_type = Text)]
    route: String,
    #[diesel(sql_type = Text)]
    params: String,
    #[diesel(sql_type = Integer)]
    status: i32,
    #[diesel(sql_type = Stamp)]
    created_at: OffsetDateTime,
}

impl AuditRow {
    fn into_domain(self) -> AdminAuditEntry {
        AdminAuditEntry {
            id: self.id,
            admin_id: UserId::from_stored(self.admin_id),
            method: self.method,
            route: self.route,
            params: self.params,
            status: u16::try_from(self.status).unwrap_or(0),
            created_at: self.created_at,
        }
    }
}

#[derive(QueryableByName)]
struct UserPageRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    plan: String,
    #[diesel(sql_type = Nullable<Text>)]
    stripe_customer_id: Option<String>,
    #[diesel(sql_type = Stamp)]
    created_at: OffsetDateTime,
    #[diesel(sql_type = Nullable<Text>)]
    plan_subscription_id: Option<String>,
    #[diesel(sql_type = Nullable<Stamp>)]
    blocked_at: Option<OffsetDateTime>,
    #[diesel(sql_type = Nullable<Integer>)]
    plan_version: Option<i32>,
    #[diesel(sql_type = Nullable<JsonText>)]
    overrides: Option<String>,
    #[diesel(sql_type = BigInt)]
    api_calls: i64,
    #[diesel(sql_type = BigInt)]
    overage_calls: i64,
}

impl UserPageRow {
    fn into_domain(self) -> Result<UserUsageRow, RepoError> {
        Ok(UserUsageRow {
            user: User {
                plan: Plan::from_stored(self.plan),
                plan_version: self.plan_version.and_then(|v| u32::try_from(v).ok()),
                overrides: parse_overrides(&self.id, self.overrides.as_deref())?,
                id: UserId::from_stored(self.id),
                email: self.email,
                stripe_customer_id: self.stripe_customer_id,
                created_at: self.created_at,
                plan_subscription_id: self.plan_subscription_id,
                blocked_at: self.blocked_at,
            },
            api_calls: to_u64(self.api_calls),
            overage_calls: to_u64(self.overage_calls),
        })
    }
}

#[async_trait]
impl SessionRepository for This {
    async fn create_login_link(
        &self,
        token_hash: &str,
        user_id: &UserId,
        created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), RepoError> {
        self.insert_token(
            session_sql::INSERT_LINK,
            token_hash,
            user_id,
            (created_at, expires_at),
        )
        .await
    }

    async fn consume_login_link(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError> {
        self.token_user(session_sql::CONSUME_LINK, token_hash, now)
            .await
    }

    async fn create_session(
        &self,
        token_hash: &str,
        user_id: &UserId,
        created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), RepoError> {
        self.insert_token(
            session_sql::INSERT_SESSION,
            token_hash,
            user_id,
            (created_at, expires_at),
        )
        .await
    }

    async fn session_user(
        &self,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError> {
        self.token_user(session_sql::SESSION_USER, token_hash, now)
            .await
    }

    async fn delete_session(&self, token_hash: &str) -> Result<bool, RepoError> {
        let mut conn = self.conn().await?;
        let n = query(session_sql::DELETE_SESSION)
            .bind::<Text, _>(token_hash)
            .execute(&mut *conn)
            .await
            .map_err(db("session"))?;
        Ok(n > 0)
    }

    async fn prune_sessions(&self, now: OffsetDateTime) -> Result<u64, RepoError> {
        let mut conn = self.conn().await?;
        let mut removed = 0;
        for sql in [session_sql::PRUNE_SESSIONS, session_sql::PRUNE_LINKS] {
            removed += query(sql)
                .bind::<Stamp, _>(now)
                .execute(&mut *conn)
                .await
                .map_err(db("session"))? as u64;
        }
        Ok(removed)
    }
}

impl This {
    /// A session or link row: `sql` is `INSERT_LINK` or `INSERT_SESSION`.
    async fn insert_token(
        &self,
        sql: &'static str,
        token_hash: &str,
        user_id: &UserId,
        (created_at, expires_at): (OffsetDateTime, OffsetDateTime),
    ) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        query(sql)
            .bind::<Text, _>(token_hash)
            .bind::<Text, _>(user_id.as_str())
            .bind::<Stamp, _>(created_at)
            .bind::<Stamp, _>(expires_at)
            .execute(&mut *conn)
            .await
            .map_err(db("user"))?;
        Ok(())
    }

    /// The user `sql` (`CONSUME_LINK` or `SESSION_USER`) finds for a token at `now`.
    async fn token_user(
        &self,
        sql: &'static str,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError> {
        let mut conn = self.conn().await?;
        let row: Option<session_sql::UserIdRow> = query(sql)
            .bind::<Text, _>(token_hash)
            .bind::<Stamp, _>(now)
            .get_result(&mut *conn)
            .await
            .optional()
            .map_err(db("session"))?;
        Ok(row.map(|r| UserId::from_stored(r.user_id)))
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_plan_versions, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct PlanVersionRow {
    plan_key: String,
    version: i32,
    terms: String,
    existing: String,
    created_at: OffsetDateTime,
}

impl PlanVersionRow {
    fn into_domain(self, archived_at: Option<OffsetDateTime>) -> Result<PlanVersion, RepoError> {
        let unreadable = |what: String| {
            RepoError::Backend(format!(
                "plan {} version {}: {what}",
                self.plan_key, self.version
            ))
        };
        let mut plan: PlanDefinition =
            serde_json::from_str(&self.terms).map_err(|e| unreadable(e.to_string()))?;
        plan.key = self.plan_key.clone();
        plan.version = u32::try_from(self.version).map_err(|e| unreadable(e.to_string()))?;
        plan.archived = archived_at.is_some();
        Ok(PlanVersion {
            existing: PlanMove::parse(&self.existing).map_err(|e| unreadable(e.to_string()))?,
            plan,
            created_at: self.created_at,
        })
    }
}

/// Stores `plan`'s terms as `version` of its key.
async fn insert_plan_version(
    conn: &mut Conn,
    plan: &PlanDefinition,
    version: u32,
    existing: PlanMove,
    at: OffsetDateTime,
) -> Result<PlanVersion, BatchError> {
    let stored = PlanDefinition {
        version,
        archived: false,
        ..plan.clone()
    };
    let terms = serde_json::to_string(&stored)
        .map_err(|e| BatchError::Repo(RepoError::Backend(e.to_string())))?;
    diesel::insert_into(eco_plan_versions::table)
        .values((
            eco_plan_versions::plan_key.eq(&plan.key),
            eco_plan_versions::version.eq(i32::try_from(version).unwrap_or(i32::MAX)),
            eco_plan_versions::terms.eq(Json(&terms)),
            eco_plan_versions::stripe_price_id.eq(&plan.stripe_price_id),
            eco_plan_versions::existing.eq(existing.as_str()),
            eco_plan_versions::created_at.eq(At(at)),
        ))
        .execute(conn)
        .await?;
    Ok(PlanVersion {
        plan: stored,
        existing,
        created_at: at,
    })
}

/// The plan's row, locked for the transaction (SQLite: its one writer), and whether it is
/// archived; `Missing` for an unknown key.
async fn lock_plan(conn: &mut Conn, key: &str) -> Result<Option<OffsetDateTime>, BatchError> {
    for_update!(eco_plans::table.find(key).select(eco_plans::archived_at))
        .first(conn)
        .await
        .optional()?
        .ok_or(BatchError::Missing("plan"))
}

/// The newest version number of `key` (0 when it has none).
async fn newest_plan_version(conn: &mut Conn, key: &str) -> Result<u32, BatchError> {
    let newest: Option<i32> = eco_plan_versions::table
        .filter(eco_plan_versions::plan_key.eq(key))
        .select(diesel::dsl::max(eco_plan_versions::version))
        .first(conn)
        .await?;
    Ok(newest.map_or(0, |v| u32::try_from(v).unwrap_or(0)))
}

#[async_trait]
impl PlanRepository for This {
    async fn seed_plans(
        &self,
        plans: &[PlanDefinition],
        at: OffsetDateTime,
    ) -> Result<Vec<String>, RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<Vec<String>, BatchError> {
            let mut seeded = Vec::new();
            for plan in plans {
                diesel::insert_into(eco_plans::table)
                    .values((
                        eco_plans::key.eq(&plan.key),
                        eco_plans::created_at.eq(At(at)),
                    ))
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?;
                // Two instances starting at once: the second waits here, then sees the first's.
                lock_plan(conn, &plan.key).await?;
                if newest_plan_version(conn, &plan.key).await? > 0 {
                    continue;
                }
                insert_plan_version(conn, plan, 1, PlanMove::NextPeriod, at).await?;
                diesel::update(
                    eco_users::table
                        .filter(eco_users::plan.eq(&plan.key))
                        .filter(eco_users::plan_version.is_null()),
                )
                .set(eco_users::plan_version.eq(1))
                .execute(conn)
                .await?;
                seeded.push(plan.key.clone());
            }
            Ok(seeded)
        })
        .await
        .map_err(|e| e.into_repo("plan"))
    }

    async fn create_plan(
        &self,
        plan: &PlanDefinition,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<PlanVersion, BatchError> {
            diesel::insert_into(eco_plans::table)
                .values((
                    eco_plans::key.eq(&plan.key),
                    eco_plans::created_at.eq(At(at)),
                    eco_plans::archived_at.eq(plan.archived.then_some(At(at))),
                ))
                .execute(conn)
                .await?;
            let mut stored = insert_plan_version(conn, plan, 1, PlanMove::NextPeriod, at).await?;
            stored.plan.archived = plan.archived;
            Ok(stored)
        })
        .await
        .map_err(|e| e.into_repo("plan"))
    }

    async fn revise_plan(
        &self,
        plan: &PlanDefinition,
        existing: PlanMove,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<PlanVersion, BatchError> {
            let archived_at = lock_plan(conn, &plan.key).await?;
            let next = newest_plan_version(conn, &plan.key)
                .await?
                .saturating_add(1);
            let mut stored = insert_plan_version(conn, plan, next, existing, at).await?;
            stored.plan.archived = archived_at.is_some();
            Ok(stored)
        })
        .await
        .map_err(|e| e.into_repo("plan"))
    }

    async fn set_plan_archived(
        &self,
        key: &str,
        archived: bool,
        at: OffsetDateTime,
    ) -> Result<PlanVersion, RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<PlanVersion, BatchError> {
            let archived_at = lock_plan(conn, key).await?;
            // Archiving again keeps the first time.
            let archived_at = if archived {
                archived_at.or(Some(at))
            } else {
                None
            };
            diesel::update(eco_plans::table.find(key))
                .set(eco_plans::archived_at.eq(archived_at.map(At)))
                .execute(conn)
                .await?;
            let newest = newest_plan_version(conn, key).await?;
            eco_plan_versions::table
                .filter(eco_plan_versions::plan_key.eq(key))
                .filter(eco_plan_versions::version.eq(i32::try_from(newest).unwrap_or(0)))
                .select(PlanVersionRow::as_select())
                .first(conn)
                .await?
                .into_domain(archived_at)
                .map_err(BatchError::Repo)
        })
        .await
        .map_err(|e| e.into_repo("plan"))
    }

    async fn plan_versions(&self) -> Result<Vec<PlanVersion>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(PlanVersionRow, Option<OffsetDateTime>)> = eco_plan_versions::table
            .inner_join(eco_plans::table)
            .select((PlanVersionRow::as_select(), eco_plans::archived_at))
            .order((eco_plan_versions::plan_key, eco_plan_versions::version))
            .load(&mut *conn)
            .await
            .map_err(db("plan"))?;
        rows.into_iter()
            .map(|(row, archived_at)| row.into_domain(archived_at))
            .collect()
    }

    async fn meters(&self) -> Result<Vec<Meter>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, String, String, String)> = eco_meters::table
            .select((
                eco_meters::key,
                eco_meters::name,
                eco_meters::unit,
                eco_meters::aggregation,
            ))
            .order(eco_meters::key)
            .load(&mut *conn)
            .await
            .map_err(db("meter"))?;
        rows.into_iter()
            .map(|(key, name, unit, aggregation)| {
                let aggregation = Aggregation::parse(&aggregation)
                    .map_err(|e| RepoError::Backend(format!("meter {key}: {e}")))?;
                Ok(Meter {
                    key,
                    name,
                    unit,
                    aggregation,
                })
            })
            .collect()
    }

    async fn create_meter(&self, meter: &Meter, at: OffsetDateTime) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        diesel::insert_into(eco_meters::table)
            .values((
                eco_meters::key.eq(&meter.key),
                eco_meters::name.eq(&meter.name),
                eco_meters::unit.eq(&meter.unit),
                eco_meters::aggregation.eq(meter.aggregation.as_str()),
                eco_meters::created_at.eq(At(at)),
                eco_meters::updated_at.eq(At(at)),
            ))
            .execute(&mut *conn)
            .await
            .map_err(db("meter"))?;
        Ok(())
    }

    async fn update_meter(&self, meter: &Meter, at: OffsetDateTime) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<(), BatchError> {
            let stored: String = for_update!(
                eco_meters::table
                    .find(&meter.key)
                    .select(eco_meters::aggregation)
            )
            .first(conn)
            .await
            .optional()?
            .ok_or(BatchError::Missing("meter"))?;
            if stored != meter.aggregation.as_str() {
                // Usage stored under one aggregation would not add up under another.
                let used: i64 = eco_meter_usage::table
                    .filter(eco_meter_usage::meter.eq(&meter.key))
                    .count()
                    .get_result(conn)
                    .await?;
                if used > 0 {
                    return Err(BatchError::Repo(RepoError::Conflict {
                        entity: "meter",
                        field: "aggregation",
                    }));
                }
            }
            diesel::update(eco_meters::table.find(&meter.key))
                .set((
                    eco_meters::name.eq(&meter.name),
                    eco_meters::unit.eq(&meter.unit),
                    eco_meters::aggregation.eq(meter.aggregation.as_str()),
                    eco_meters::updated_at.eq(At(at)),
                ))
                .execute(conn)
                .await?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_repo("meter"))
    }

    async fn route_costs(&self) -> Result<Vec<RouteCost>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, String, i64)> = eco_route_costs::table
            .select((
                eco_route_costs::route,
                eco_route_costs::meter,
                eco_route_costs::quantity,
            ))
            .order((eco_route_costs::route, eco_route_costs::meter))
            .load(&mut *conn)
            .await
            .map_err(db("meter"))?;
        Ok(rows
            .into_iter()
            .map(|(route, meter, quantity)| RouteCost {
                route,
                meter,
                quantity: to_u64(quantity),
            })
            .collect())
    }

    async fn replace_route_costs(&self, costs: &[RouteCost]) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        write_transaction!(&mut conn, async |conn| -> Result<(), BatchError> {
            diesel::delete(eco_route_costs::table).execute(conn).await?;
            for cost in costs {
                diesel::insert_into(eco_route_costs::table)
                    .values((
                        eco_route_costs::route.eq(&cost.route),
                        eco_route_costs::meter.eq(&cost.meter),
                        eco_route_costs::quantity.eq(to_i64(cost.quantity)),
                    ))
                    .execute(conn)
                    .await?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.into_repo("meter"))
    }
}

/// The (source, id) pairs of a batch of events that were never stored, as the insert
/// into `eco_event_ids` returns them.
#[derive(QueryableByName)]
struct FreshEventId {
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    event_id: String,
}

/// A unique_count value seen for the first time in its period.
#[derive(QueryableByName)]
struct FirstSeenValue {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Text)]
    meter: String,
    #[diesel(sql_type = Stamp)]
    first_seen: OffsetDateTime,
}

/// How many of `keys` exist as `column` of `table`.
async fn count_existing(
    conn: &mut Conn,
    table: &str,
    column: &str,
    keys: &[&str],
) -> diesel::QueryResult<u64> {
    let row: CountRow = query(&format!(
        "SELECT count(*) AS n FROM {table} WHERE {column} IN (SELECT k FROM {})",
        json_rows("$1", &[("k", "text")])
    ))
    .bind::<Text, _>(json_array(keys.iter().map(|k| serde_json::json!({"k": k}))))
    .get_result(conn)
    .await?;
    Ok(to_u64(row.n))
}

#[async_trait]
impl MeterUsageRepository for This {
    async fn record_meter_events(
        &self,
        events: &[MeterEvent],
        now: OffsetDateTime,
    ) -> Result<EventOutcome, RepoError> {
        if events.is_empty() {
            return Ok(EventOutcome::default());
        }
        let users: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.user_id.as_str()).collect();
        let meters: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.meter.as_str()).collect();
        let users: Vec<&str> = users.into_iter().collect();
        let meters: Vec<&str> = meters.into_iter().collect();
        let (users, meters) = (&users, &meters);
        let mut attempt = 1;
        loop {
            let mut conn = self.conn().await?;
            let result = write_transaction!(&mut conn, async |conn| -> Result<u64, BatchError> {
                if count_existing(conn, "eco_users", "id", users).await? != users.len() as u64 {
                    return Err(BatchError::Missing("user"));
                }
                if count_existing(conn, "eco_meters", "key", meters).await? != meters.len() as u64 {
                    return Err(BatchError::Missing("meter"));
                }
                // Sorted: one lock order for every writer.
                let mut ids: Vec<(&str, &str)> = events
                    .iter()
                    .map(|e| (e.source.as_str(), e.event_id.as_str()))
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                let fresh: Vec<FreshEventId> = query(&format!(
                    "INSERT INTO eco_event_ids (source, event_id)
                     SELECT d.source, d.event_id FROM {} WHERE true
                     ON CONFLICT (source, event_id) DO NOTHING
                     RETURNING source, event_id",
                    json_rows("$1", &[("source", "text"), ("event_id", "text")])
                ))
                .bind::<Text, _>(json_array(ids.iter().map(
                    |(source, id)| serde_json::json!({"source": source, "event_id": id}),
                )))
                .load(conn)
                .await?;
                let mut fresh: std::collections::HashSet<(String, String)> =
                    fresh.into_iter().map(|f| (f.source, f.event_id)).collect();
                // The first of a batch's events with one (source, id) is the one kept.
                let stored: Vec<&MeterEvent> = events
                    .iter()
                    .filter(|e| fresh.remove(&(e.source.clone(), e.event_id.clone())))
                    .collect();
                if stored.is_empty() {
                    return Ok(0);
                }
                let rows = json_array(stored.iter().map(|e| {
                    serde_json::json!({
                        "source": e.source, "event_id": e.event_id,
                        "user_id": e.user_id.as_str(), "meter": e.meter,
                        "quantity": to_i64(e.quantity), "value": e.value,
                        "created_at": utc_text(e.created_at),
                        "period_start": utc_text(BillingPeriod::containing(e.created_at).start()),
                    })
                }));
                query(&format!(
                    "INSERT INTO eco_meter_events (source, event_id, user_id, meter, quantity,
                                                   value, created_at, received_at)
                     SELECT d.source, d.event_id, d.user_id, d.meter, d.quantity, d.value,
                            d.created_at, $2
                     FROM {} WHERE true",
                    json_rows(
                        "$1",
                        &[
                            ("source", "text"),
                            ("event_id", "text"),
                            ("user_id", "text"),
                            ("meter", "text"),
                            ("quantity", "int8"),
                            ("value", "text"),
                            ("created_at", "timestamptz"),
                        ]
                    )
                ))
                .bind::<Text, _>(&rows)
                .bind::<Stamp, _>(now)
                .execute(conn)
                .await?;
                // Earliest first: a value seen twice in the batch is first seen at the first.
                let first_seen: Vec<FirstSeenValue> = query(&format!(
                    "INSERT INTO eco_meter_values (user_id, period_start, meter, value, first_seen)
                     SELECT d.user_id, d.period_start, d.meter, d.value, d.created_at
                     FROM {} JOIN eco_meters m ON m.key = d.meter
                     WHERE m.aggregation = 'unique_count' AND d.value IS NOT NULL
                     ORDER BY d.created_at
                     ON CONFLICT (user_id, period_start, meter, value) DO NOTHING
                     RETURNING user_id, meter, first_seen",
                    json_rows(
                        "$1",
                        &[
                            ("user_id", "text"),
                            ("period_start", "timestamptz"),
                            ("meter", "text"),
                            ("value", "text"),
                            ("created_at", "timestamptz"),
                        ]
                    )
                ))
                .bind::<Text, _>(&rows)
                .load(conn)
                .await?;
                let reports: Vec<MeterReport> = stored
                    .iter()
                    .map(|e| MeterReport {
                        user_id: e.user_id.as_str(),
                        meter: &e.meter,
                        at: e.created_at,
                        quantity: e.quantity,
                    })
                    .collect();
                add_meter_reports(conn, &reports, false, Counted::Here, now).await?;
                let values: Vec<MeterReport> = first_seen
                    .iter()
                    .map(|v| MeterReport {
                        user_id: &v.user_id,
                        meter: &v.meter,
                        at: v.first_seen,
                        quantity: 1,
                    })
                    .collect();
                add_meter_reports(conn, &values, true, Counted::Here, now).await?;
                Ok(stored.len() as u64)
            })
            .await;
            match result {
                Ok(accepted) => {
                    return Ok(EventOutcome {
                        accepted,
                        duplicates: events.len() as u64 - accepted,
                    });
                }
                Err(BatchError::Db(e)) if is_retryable(&e) && attempt < TRANSACTION_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "retrying a batch of meter events");
                    attempt += 1;
                }
                Err(e) => return Err(e.into_repo("user")),
            }
        }
    }

    async fn event_subjects(
        &self,
        users: &[UserId],
        keys: &[ApiKeyId],
    ) -> Result<(Vec<UserId>, Vec<(ApiKeyId, UserId)>), RepoError> {
        let mut conn = self.conn().await?;
        let found_users: Vec<String> = if users.is_empty() {
            Vec::new()
        } else {
            eco_users::table
                .filter(eco_users::id.eq_any(users.iter().map(UserId::as_str)))
                .select(eco_users::id)
                .load(&mut *conn)
                .await
                .map_err(db("user"))?
        };
        let found_keys: Vec<(String, String)> = if keys.is_empty() {
            Vec::new()
        } else {
            eco_api_keys::table
                .filter(eco_api_keys::id.eq_any(keys.iter().map(ApiKeyId::as_str)))
                .select((eco_api_keys::id, eco_api_keys::user_id))
                .load(&mut *conn)
                .await
                .map_err(db("API key"))?
        };
        Ok((
            found_users.into_iter().map(UserId::from_stored).collect(),
            found_keys
                .into_iter()
                .map(|(k, u)| (ApiKeyId::from_stored(k), UserId::from_stored(u)))
                .collect(),
        ))
    }

    async fn meter_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<EventsAfter>,
        limit: u32,
    ) -> Result<Vec<MeterEvent>, RepoError> {
        use crate::schema::eco_meter_events::dsl as e;
        let mut conn = self.conn().await?;
        let mut events = e::eco_meter_events
            .filter(e::user_id.eq(user_id.as_str()))
            .filter(e::created_at.ge(At(from)))
            .filter(e::created_at.lt(At(to)))
            .into_boxed();
        match after {
            None => {}
            Some(EventsAfter::Through(at)) => events = events.filter(e::created_at.le(At(at))),
            Some(EventsAfter::Event(at, source, id)) => {
                // `<= at` bounds the index scan; the rest orders ties by source, then id.
                events = events.filter(e::created_at.le(At(at))).filter(
                    e::created_at
                        .lt(At(at))
                        .or(e::source.lt(source.clone()))
                        .or(e::source.eq(source).and(e::event_id.lt(id))),
                );
            }
        }
        let rows: Vec<(
            String,
            String,
            String,
            String,
            i64,
            Option<String>,
            OffsetDateTime,
        )> = events
            .select((
                e::source,
                e::event_id,
                e::user_id,
                e::meter,
                e::quantity,
                e::value,
                e::created_at,
            ))
            .order((e::created_at.desc(), e::source.desc(), e::event_id.desc()))
            .limit(i64::from(limit))
            .load(&mut *conn)
            .await
            .map_err(db("meter event"))?;
        Ok(rows
            .into_iter()
            .map(
                |(source, event_id, user_id, meter, quantity, value, created_at)| MeterEvent {
                    source,
                    event_id,
                    user_id: UserId::from_stored(user_id),
                    meter,
                    quantity: to_u64(quantity),
                    value,
                    created_at,
                },
            )
            .collect())
    }

    async fn meter_usage(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<Vec<(String, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, i64)> = eco_meter_usage::table
            .filter(eco_meter_usage::user_id.eq(user_id.as_str()))
            .filter(eco_meter_usage::period_start.eq(At(period_start)))
            .select((eco_meter_usage::meter, eco_meter_usage::quantity))
            .order(eco_meter_usage::meter)
            .load(&mut *conn)
            .await
            .map_err(db("meter usage"))?;
        Ok(rows.into_iter().map(|(m, q)| (m, to_u64(q))).collect())
    }

    async fn meter_history(
        &self,
        user_id: &UserId,
        meter: &str,
        from: Date,
        to: Date,
    ) -> Result<Vec<(Date, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(Date, i64)> = eco_meter_daily::table
            .filter(eco_meter_daily::user_id.eq(user_id.as_str()))
            .filter(eco_meter_daily::meter.eq(meter))
            .filter(eco_meter_daily::date.ge(from))
            .filter(eco_meter_daily::date.le(to))
            .select((eco_meter_daily::date, eco_meter_daily::quantity))
            .order(eco_meter_daily::date)
            .load(&mut *conn)
            .await
            .map_err(db("meter usage"))?;
        Ok(rows.into_iter().map(|(d, q)| (d, to_u64(q))).collect())
    }

    async fn top_meter_users(
        &self,
        meter: &str,
        period_start: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<MeterUser>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, String, String, i64)> = eco_meter_usage::table
            .inner_join(eco_users::table.on(eco_users::id.eq(eco_meter_usage::user_id)))
            .filter(eco_meter_usage::meter.eq(meter))
            .filter(eco_meter_usage::period_start.eq(At(period_start)))
            .filter(eco_meter_usage::quantity.gt(0))
            .select((
                eco_users::id,
                eco_users::email,
                eco_users::plan,
                eco_meter_usage::quantity,
            ))
            .order((eco_meter_usage::quantity.desc(), eco_users::id.asc()))
            .limit(i64::from(limit))
            .load(&mut *conn)
            .await
            .map_err(db("meter usage"))?;
        Ok(rows
            .into_iter()
            .map(|(id, email, plan, quantity)| MeterUser {
                user_id: UserId::from_stored(id),
                email,
                plan: Plan::from_stored(plan),
                quantity: to_u64(quantity),
            })
            .collect())
    }
}

#[async_trait]
impl Store for This {
    async fn ping(&self) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        conn.batch_execute("SELECT 1")
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))
    }

    fn backend_name(&self) -> &'static str {
        BACKEND_NAME
    }

    fn pool_state(&self) -> Option<PoolState> {
        let state = self.pool.state();
        Some(PoolState {
            max: self.max_connections,
            open: state.connections,
            idle: state.idle_connections,
        })
    }
}
