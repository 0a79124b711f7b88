//! PostgreSQL through diesel-async and a bb8 pool.

mod partitions;
mod schema;

use async_trait::async_trait;
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Date as SqlDate, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel::{ConnectionError, OptionalExtension};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use time::{Date, OffsetDateTime};
use usage_core::repo::{
    AdminAuditEntry, AdminRepository, ApiKeyRecord, ApiKeyRepository, ChargeStatus, DailyUsage,
    DailyUsageRepository, DayTotal, DeadLetter, DeletedKeys, EndpointStats, IncludedCalls,
    KeyIssue, KeyRetirement, LeaseTerms, NewOverageCharge, OverageCharge, OverageChargeRepository,
    OverageLedgerEntry, PeriodFigures, PoolState, QuotaCounterRepository, QuotaDelta, QuotaTake,
    RecordOutcome, SubscriptionChange, SubscriptionOutcome, TOP_ENDPOINTS, UninvoicedOverage,
    UsagePrune, UsageRecord, UsageRepository, User, UserPageQuery, UserRepository, UserSort,
    UserUsageRow, plan_key_issue, plan_subscription_change,
};
use usage_core::{
    ApiKeyId, BillingPeriod, Plan, PlanCatalog, RepoError, Store, UsageEvent, UserId,
};
use uuid::Uuid;

use self::schema::{
    eco_api_keys, eco_api_usage, eco_deleted_keys, eco_overage_charges, eco_stripe_events,
    eco_usage_daily, eco_usage_records, eco_usage_retention, eco_users,
};
use crate::common::{
    BatchError, CountRow, EndpointStatsRow, EventTuple, FOLD_INTO_DAILY, PeriodSumsRow,
    QuotaTakeRow, TRANSACTION_ATTEMPTS, admin_sql, billed_limit, counter_deltas, dead_letters_json,
    deleted_keys, distinct_references, event_from_columns, foldable, lease_binds, parse_plan,
    plan_counts, projection_threshold, raw_day, session_sql, to_i64, to_u64,
};
use crate::common::{
    COUNTERS_BELOW_STORED, DAILY_TOTALS, DAY_TOTALS, StoredCallsRow, floor_columns,
};
use crate::error::{is_retryable, repo_error};
use crate::{PoolOptions, StoreError, redact};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

/// Serialises migrations of instances starting at once (any constant works; this one
/// spells "usage" in ASCII).
const MIGRATION_LOCK_ID: i64 = 0x0075_7361_6765;

/// Applies pending migrations, holding an advisory lock so that concurrent starts of
/// several instances migrate once.
pub(crate) async fn migrate(url: &str) -> Result<usize, StoreError> {
    let owned_url = url.to_owned();
    let failed = |reason: String| StoreError::Migration {
        url: redact(url),
        reason,
    };
    // The sync migration harness blocks on its own runtime, so it runs on a blocking thread.
    tokio::task::spawn_blocking(move || -> Result<usize, StoreError> {
        let mut conn =
            <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(
                &owned_url,
            )
            .map_err(|e| StoreError::Connect {
                url: redact(&owned_url),
                reason: format!("{e} (is PostgreSQL running there and accepting connections?)"),
            })?;
        let lock = format!("SELECT pg_advisory_lock({MIGRATION_LOCK_ID})");
        diesel::RunQueryDsl::execute(diesel::sql_query(lock), &mut conn).map_err(|e| {
            StoreError::Migration {
                url: redact(&owned_url),
                reason: e.to_string(),
            }
        })?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|v| v.len())
            .map_err(|e| StoreError::Migration {
                url: redact(&owned_url),
                reason: e.to_string(),
            });
        // The lock also goes with the connection; unlock explicitly all the same.
        let unlock = format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})");
        let _ = diesel::RunQueryDsl::execute(diesel::sql_query(unlock), &mut conn);
        applied
    })
    .await
    .map_err(|e| failed(e.to_string()))?
}

/// All repositories on one PostgreSQL database.
pub struct PgStore {
    pool: Pool<AsyncPgConnection>,
    /// The pool's size (bb8 does not tell it back).
    max_connections: u32,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.state())
            .finish()
    }
}

impl PgStore {
    /// Opens a pool of up to `max_connections`, each with `statement_timeout` set, and
    /// checks that the database answers.
    pub async fn open(url: &str, options: &PoolOptions) -> Result<Self, StoreError> {
        let timeout_ms = options.statement_timeout.as_millis();
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        config.custom_setup = Box::new(move |url| {
            let url = url.to_owned();
            Box::pin(async move {
                let mut conn = AsyncPgConnection::establish(&url).await?;
                conn.batch_execute(&format!("SET statement_timeout = {timeout_ms}"))
                    .await
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                Ok(conn)
            })
        });
        let manager = AsyncDieselConnectionManager::new_with_config(url, config);
        let pool = Pool::builder()
            .max_size(options.max_connections)
            .connection_timeout(options.connect_timeout)
            .idle_timeout(Some(std::time::Duration::from_secs(300)))
            .build(manager)
            .await
            .map_err(|e| StoreError::Connect {
                url: redact(url),
                reason: e.to_string(),
            })?;
        let store = Self {
            pool,
            max_connections: options.max_connections,
        };
        // The driver's message alone ("error connecting to server") does not say what to check.
        store.ping().await.map_err(|e| StoreError::Connect {
            url: redact(url),
            reason: format!("{e} (is PostgreSQL running there and accepting connections?)"),
        })?;
        Ok(store)
    }

    async fn conn(&self) -> Result<PooledConnection<'_, AsyncPgConnection>, RepoError> {
        self.pool
            .get()
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = eco_users, check_for_backend(diesel::pg::Pg))]
struct UserRow {
    id: String,
    email: String,
    plan: String,
    stripe_customer_id: Option<String>,
    created_at: OffsetDateTime,
    plan_subscription_id: Option<String>,
    blocked_at: Option<OffsetDateTime>,
}

impl UserRow {
    fn from_domain(u: &User) -> Self {
        Self {
            id: u.id.to_string(),
            email: u.email.clone(),
            plan: u.plan.as_str().to_owned(),
            stripe_customer_id: u.stripe_customer_id.clone(),
            created_at: u.created_at,
            plan_subscription_id: u.plan_subscription_id.clone(),
            blocked_at: u.blocked_at,
        }
    }

    fn into_domain(self) -> Result<User, RepoError> {
        Ok(User {
            id: UserId::from_stored(self.id),
            email: self.email,
            plan: parse_plan(&self.plan)?,
            stripe_customer_id: self.stripe_customer_id,
            created_at: self.created_at,
            plan_subscription_id: self.plan_subscription_id,
            blocked_at: self.blocked_at,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = eco_api_keys, check_for_backend(diesel::pg::Pg))]
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

impl ApiKeyRow {
    fn from_domain(k: &ApiKeyRecord) -> Self {
        Self {
            id: k.id.to_string(),
            user_id: k.user_id.to_string(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            key_hash: k.key_hash.clone(),
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
            expires_at: k.expires_at,
        }
    }

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

/// A batch of events as one array per column, for `INSERT ... SELECT FROM unnest(...)`:
/// eight bind parameters whatever the batch size.
struct EventColumns {
    event_id: Vec<Uuid>,
    user_id: Vec<String>,
    api_key_id: Vec<String>,
    endpoint: Vec<String>,
    method: Vec<String>,
    status_code: Vec<i32>,
    response_time_ms: Vec<i32>,
    created_at: Vec<OffsetDateTime>,
}

impl EventColumns {
    fn from_events(events: &[&UsageEvent]) -> Self {
        Self {
            event_id: events.iter().map(|e| e.event_id).collect(),
            user_id: events.iter().map(|e| e.user_id.to_string()).collect(),
            api_key_id: events.iter().map(|e| e.api_key_id.to_string()).collect(),
            endpoint: events.iter().map(|e| e.endpoint.clone()).collect(),
            method: events.iter().map(|e| e.method.clone()).collect(),
            status_code: events.iter().map(|e| i32::from(e.status_code)).collect(),
            response_time_ms: events
                .iter()
                .map(|e| i32::try_from(e.response_time_ms).unwrap_or(i32::MAX))
                .collect(),
            created_at: events.iter().map(|e| e.created_at).collect(),
        }
    }
}

/// Inserts a batch and returns who and when of the rows actually inserted. Rows of a day
/// that has ended, or ends within five minutes (the database's clock; see
/// `usage_core::repo::LATE_WRITE_MARGIN`), mark their day in `eco_usage_days` so that its
/// aggregate is no longer taken as current. Outside those minutes the filter keeps the
/// second insert empty: no row is locked.
const INSERT_EVENTS: &str = "\
WITH inserted AS (
    INSERT INTO eco_api_usage
        (event_id, user_id, api_key_id, endpoint, method, status_code, response_time_ms, created_at)
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::int4[], $7::int4[], $8::timestamptz[])
    ON CONFLICT (event_id, created_at) DO NOTHING
    RETURNING user_id, created_at
), late AS (
    INSERT INTO eco_usage_days (date, late_writes)
    SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date, 1 FROM inserted
    WHERE created_at < date_trunc('day', (now() + interval '5 minutes') AT TIME ZONE 'UTC')
                       AT TIME ZONE 'UTC'
    ORDER BY 1
    ON CONFLICT (date) DO UPDATE SET late_writes = eco_usage_days.late_writes + 1
)
SELECT user_id, created_at FROM inserted";

#[derive(QueryableByName)]
struct InsertedEvent {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: OffsetDateTime,
}

#[derive(QueryableByName)]
struct ReferenceCount {
    #[diesel(sql_type = BigInt)]
    users: i64,
    #[diesel(sql_type = BigInt)]
    keys: i64,
}

/// Checks, once per batch, that every user and key it names exists (the events table
/// has no foreign keys, to spare two lookups per row).
async fn check_references(
    conn: &mut AsyncPgConnection,
    users: &[String],
    keys: &[String],
) -> Result<(), BatchError> {
    let found: ReferenceCount = diesel::sql_query(
        "SELECT (SELECT count(*) FROM eco_users WHERE id = ANY($1)) AS users, \
                (SELECT count(*) FROM eco_api_keys WHERE id = ANY($2)) AS keys",
    )
    .bind::<Array<Text>, _>(users)
    .bind::<Array<Text>, _>(keys)
    .get_result(conn)
    .await?;
    if found.users != users.len() as i64 {
        return Err(BatchError::Missing("user"));
    }
    if found.keys != keys.len() as i64 {
        return Err(BatchError::Missing("API key"));
    }
    Ok(())
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_usage_records, check_for_backend(diesel::pg::Pg))]
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

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_usage_daily, check_for_backend(diesel::pg::Pg))]
struct DailyRow {
    user_id: String,
    date: Date,
    api_calls: i64,
    error_calls: i64,
    total_response_time_ms: i64,
    avg_response_time_ms: f64,
    top_endpoints: serde_json::Value,
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
            top_endpoints: serde_json::from_value(self.top_endpoints)
                .map_err(|e| RepoError::Backend(format!("top_endpoints: {e}")))?,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = eco_overage_charges, check_for_backend(diesel::pg::Pg))]
struct NewChargeRow<'a> {
    user_id: &'a str,
    period_start: OffsetDateTime,
    calls_from: i64,
    calls_to: i64,
    amount_cents: i64,
    idempotency_key: &'a str,
    status: &'static str,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_overage_charges, check_for_backend(diesel::pg::Pg))]
struct ChargeRow {
    id: i64,
    user_id: String,
    period_start: OffsetDateTime,
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
impl UserRepository for PgStore {
    async fn create_user(&self, user: &User) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        diesel::insert_into(eco_users::table)
            .values(UserRow::from_domain(user))
            .execute(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
        Ok(())
    }

    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, RepoError> {
        let mut conn = self.conn().await?;
        eco_users::table
            .find(id.as_str())
            .select(UserRow::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "user"))?
            .map(UserRow::into_domain)
            .transpose()
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, RepoError> {
        let mut conn = self.conn().await?;
        eco_users::table
            .filter(eco_users::email.eq(email))
            .select(UserRow::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "user"))?
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
        diesel::update(eco_users::table.find(id.as_str()))
            .set((
                eco_users::plan.eq(plan.as_str()),
                eco_users::plan_changed_at.eq(at),
            ))
            .returning(UserRow::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?
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
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?
            .into_domain()
    }

    async fn apply_subscription_change(
        &self,
        change: &SubscriptionChange,
        at: OffsetDateTime,
    ) -> Result<SubscriptionOutcome, RepoError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| -> Result<SubscriptionOutcome, BatchError> {
            // The user's row lock serialises the events of one customer, and two
            // deliveries of one event.
            let user = eco_users::table
                .filter(eco_users::stripe_customer_id.eq(&change.customer))
                .select(UserRow::as_select())
                .for_update()
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
                    eco_stripe_events::event_created.eq(change.created),
                    eco_stripe_events::outcome.eq(stored),
                    eco_stripe_events::received_at.eq(at),
                ))
                .execute(conn)
                .await?;
            if let SubscriptionOutcome::Applied(user) = &outcome {
                diesel::update(eco_users::table.find(user.id.as_str()))
                    .set((
                        eco_users::plan.eq(user.plan.as_str()),
                        eco_users::plan_subscription_id.eq(&user.plan_subscription_id),
                        eco_users::plan_changed_at.eq(at),
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
            .filter(eco_users::plan_changed_at.ge(since))
            .select(eco_users::id)
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
        Ok(ids.into_iter().map(UserId::from_stored).collect())
    }

    async fn count_users_by_plan(&self) -> Result<Vec<(Plan, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, i64)> = eco_users::table
            .group_by(eco_users::plan)
            .select((eco_users::plan, diesel::dsl::count_star()))
            .order(eco_users::plan)
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
        plan_counts(rows)
    }

    async fn set_user_blocked(
        &self,
        id: &UserId,
        at: Option<OffsetDateTime>,
    ) -> Result<User, RepoError> {
        let mut conn = self.conn().await?;
        diesel::update(eco_users::table.find(id.as_str()))
            .set(eco_users::blocked_at.eq(at))
            .returning(UserRow::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?
            .into_domain()
    }

    async fn delete_user(&self, id: &UserId) -> Result<bool, RepoError> {
        let mut conn = self.conn().await?;
        let deleted = diesel::delete(eco_users::table.find(id.as_str()))
            .execute(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
        Ok(deleted > 0)
    }
}

/// `COALESCE(revoked_at, at)`: a second revocation keeps the first time.
fn keep_or(
    at: OffsetDateTime,
) -> diesel::expression::SqlLiteral<
    Nullable<Timestamptz>,
    impl diesel::query_builder::QueryFragment<diesel::pg::Pg>,
> {
    diesel::dsl::sql::<Nullable<Timestamptz>>("COALESCE(revoked_at, ")
        .bind::<Timestamptz, _>(at)
        .sql(")")
}

#[async_trait]
impl ApiKeyRepository for PgStore {
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        diesel::insert_into(eco_api_keys::table)
            .values(ApiKeyRow::from_domain(key))
            .execute(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
        Ok(())
    }

    async fn issue_api_key(
        &self,
        key: &ApiKeyRecord,
        max_active: usize,
        retire: Option<&KeyRetirement>,
    ) -> Result<KeyIssue, RepoError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| -> Result<KeyIssue, diesel::result::Error> {
            // The user's row lock serialises issues for one user: the count below cannot
            // be raced past the limit.
            let user: Option<String> = eco_users::table
                .filter(eco_users::id.eq(key.user_id.as_str()))
                .select(eco_users::id)
                .for_update()
                .first(conn)
                .await
                .optional()?;
            if user.is_none() {
                return Err(diesel::result::Error::NotFound);
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
                .values(ApiKeyRow::from_domain(key))
                .execute(conn)
                .await?;
            if let Some(old) = retired {
                diesel::update(eco_api_keys::table.filter(eco_api_keys::id.eq(old.id.as_str())))
                    .set((
                        eco_api_keys::revoked_at.eq(old.revoked_at),
                        eco_api_keys::expires_at.eq(old.expires_at),
                    ))
                    .execute(conn)
                    .await?;
            }
            Ok(plan)
        })
        .await
        .map_err(|e| repo_error(e, "user"))
    }

    async fn api_key_and_plan_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<(ApiKeyRecord, Plan)>, RepoError> {
        let mut conn = self.conn().await?;
        let found: Option<(ApiKeyRow, String)> = eco_api_keys::table
            .inner_join(eco_users::table)
            .filter(eco_api_keys::key_hash.eq(key_hash))
            .select((ApiKeyRow::as_select(), eco_users::plan))
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "API key"))?;
        found
            .map(|(key, plan)| Ok((key.into_domain(), parse_plan(&plan)?)))
            .transpose()
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, RepoError> {
        let mut conn = self.conn().await?;
        Ok(eco_api_keys::table
            .filter(eco_api_keys::key_hash.eq(key_hash))
            .select(ApiKeyRow::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "API key"))?
            .map(ApiKeyRow::into_domain))
    }

    async fn api_keys_for_user(&self, user_id: &UserId) -> Result<Vec<ApiKeyRecord>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<ApiKeyRow> = eco_api_keys::table
            .filter(eco_api_keys::user_id.eq(user_id.as_str()))
            .order((eco_api_keys::created_at.desc(), eco_api_keys::id.desc()))
            .select(ApiKeyRow::as_select())
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "API key"))?;
        Ok(rows.into_iter().map(ApiKeyRow::into_domain).collect())
    }

    async fn revoke_api_key(
        &self,
        user_id: &UserId,
        key_id: &ApiKeyId,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, RepoError> {
        let mut conn = self.conn().await?;
        Ok(diesel::update(
            eco_api_keys::table
                .filter(eco_api_keys::id.eq(key_id.as_str()))
                .filter(eco_api_keys::user_id.eq(user_id.as_str())),
        )
        .set(eco_api_keys::revoked_at.eq(keep_or(at)))
        .returning(ApiKeyRow::as_returning())
        .get_result(&mut conn)
        .await
        .optional()
        .map_err(|e| repo_error(e, "API key"))?
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
        let ids: Vec<&str> = used.iter().map(|(id, _)| *id).collect();
        let ats: Vec<OffsetDateTime> = used.iter().map(|(_, at)| *at).collect();
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "UPDATE eco_api_keys AS k SET last_used_at = d.at
             FROM unnest($1::text[], $2::timestamptz[]) AS d(id, at)
             WHERE k.id = d.id AND (k.last_used_at IS NULL OR k.last_used_at < d.at)",
        )
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<Timestamptz>, _>(&ats)
        .execute(&mut conn)
        .await
        .map_err(|e| repo_error(e, "API key"))?;
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
                    .ge(since)
                    .or(eco_api_keys::expires_at.between(since, now)),
            )
            .select(eco_api_keys::id)
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "API key"))?;
        Ok(ids.into_iter().map(ApiKeyId::from_stored).collect())
    }

    async fn delete_api_key(&self, user_id: &UserId, key_id: &ApiKeyId) -> Result<bool, RepoError> {
        let mut conn = self.conn().await?;
        let deleted = diesel::delete(
            eco_api_keys::table
                .filter(eco_api_keys::id.eq(key_id.as_str()))
                .filter(eco_api_keys::user_id.eq(user_id.as_str())),
        )
        .execute(&mut conn)
        .await
        .map_err(|e| repo_error(e, "API key"))?;
        Ok(deleted > 0)
    }

    async fn api_keys_deleted_after(&self, after: i64) -> Result<DeletedKeys, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(i64, String)> = eco_deleted_keys::table
            .filter(eco_deleted_keys::seq.gt(after))
            .order(eco_deleted_keys::seq)
            .select((eco_deleted_keys::seq, eco_deleted_keys::key_id))
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "API key"))?;
        Ok(deleted_keys(rows, after))
    }
}

/// Adds a batch's inserted events to every (user, period) counter it touches, in one
/// statement whatever the number of users: one array per column, rows in (user, period)
/// order so that concurrent writers lock counters in the same order. `$5` holds each
/// plan's included calls, NULL for unlimited; the update reads it back from EXCLUDED.
const UPSERT_COUNTERS: &str = "\
INSERT INTO eco_usage_records
    (user_id, period_start, period_end, api_calls, overage_calls, included_calls, updated_at)
SELECT d.user_id, d.period_start, d.period_end, d.calls,
       CASE WHEN d.included IS NULL THEN 0 ELSE GREATEST(0, d.calls - d.included) END,
       d.included, now()
FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int8[], $5::int8[])
     AS d(user_id, period_start, period_end, calls, included)
ORDER BY d.user_id, d.period_start
ON CONFLICT (user_id, period_start) DO UPDATE SET
    api_calls = eco_usage_records.api_calls + EXCLUDED.api_calls,
    overage_calls = CASE WHEN EXCLUDED.included_calls IS NULL THEN 0
        ELSE GREATEST(0, eco_usage_records.api_calls + EXCLUDED.api_calls
                         - EXCLUDED.included_calls) END,
    included_calls = EXCLUDED.included_calls,
    updated_at = EXCLUDED.updated_at";

/// A batch's counter increments as one array per column.
struct CounterColumns {
    user_id: Vec<String>,
    period_start: Vec<OffsetDateTime>,
    period_end: Vec<OffsetDateTime>,
    calls: Vec<i64>,
    included: Vec<Option<i64>>,
}

impl CounterColumns {
    fn from_deltas(deltas: &[crate::common::CounterDelta]) -> Self {
        Self {
            user_id: deltas.iter().map(|d| d.user_id.to_string()).collect(),
            period_start: deltas.iter().map(|d| d.period.start()).collect(),
            period_end: deltas.iter().map(|d| d.period.end()).collect(),
            calls: deltas.iter().map(|d| d.calls).collect(),
            included: deltas.iter().map(|d| d.included).collect(),
        }
    }
}

#[async_trait]
impl UsageRepository for PgStore {
    async fn record_usage(
        &self,
        events: &[UsageEvent],
        included: &IncludedCalls,
    ) -> Result<RecordOutcome, RepoError> {
        if events.is_empty() {
            return Ok(RecordOutcome::default());
        }
        // One lock order for every writer: no deadlock between overlapping retries.
        let mut sorted: Vec<&UsageEvent> = events.iter().collect();
        sorted.sort_by_key(|e| e.event_id);
        let columns = EventColumns::from_events(&sorted);
        let (users, keys) = distinct_references(events);
        let (columns, users, keys) = (&columns, &users, &keys);
        let mut attempt = 1;
        loop {
            let mut conn = self.conn().await?;
            let result = conn
                .transaction(async |conn| -> Result<u64, BatchError> {
                    check_references(conn, users, keys).await?;
                    let inserted: Vec<InsertedEvent> = diesel::sql_query(INSERT_EVENTS)
                        .bind::<Array<SqlUuid>, _>(&columns.event_id)
                        .bind::<Array<Text>, _>(&columns.user_id)
                        .bind::<Array<Text>, _>(&columns.api_key_id)
                        .bind::<Array<Text>, _>(&columns.endpoint)
                        .bind::<Array<Text>, _>(&columns.method)
                        .bind::<Array<Integer>, _>(&columns.status_code)
                        .bind::<Array<Integer>, _>(&columns.response_time_ms)
                        .bind::<Array<Timestamptz>, _>(&columns.created_at)
                        .load(conn)
                        .await?;
                    let count = inserted.len() as u64;
                    let inserted = inserted
                        .into_iter()
                        .map(|row| (UserId::from_stored(row.user_id), row.created_at));
                    let deltas = counter_deltas(inserted, included);
                    if !deltas.is_empty() {
                        let c = CounterColumns::from_deltas(&deltas);
                        diesel::sql_query(UPSERT_COUNTERS)
                            .bind::<Array<Text>, _>(&c.user_id)
                            .bind::<Array<Timestamptz>, _>(&c.period_start)
                            .bind::<Array<Timestamptz>, _>(&c.period_end)
                            .bind::<Array<BigInt>, _>(&c.calls)
                            .bind::<Array<Nullable<BigInt>>, _>(&c.included)
                            .execute(conn)
                            .await?;
                    }
                    Ok(count)
                })
                .await;
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
            .filter(eco_usage_records::period_start.eq(period_start))
            .select(UsageRecordRow::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "usage record"))?
            .map(UsageRecordRow::into_domain))
    }

    async fn endpoint_stats(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<EndpointStats>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<EndpointStatsRow> = diesel::sql_query(
            "SELECT endpoint, method, count(*) AS calls,
                    count(*) FILTER (WHERE status_code >= 400) AS error_calls,
                    sum(response_time_ms)::bigint AS total_ms
             FROM eco_api_usage
             WHERE user_id = $1 AND created_at >= $2 AND created_at < $3
             GROUP BY endpoint, method
             ORDER BY calls DESC, endpoint COLLATE \"C\", method COLLATE \"C\"",
        )
        .bind::<Text, _>(user_id.as_str())
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .load(&mut conn)
        .await
        .map_err(|e| repo_error(e, "usage event"))?;
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
            .filter(eco_api_usage::created_at.ge(from))
            .filter(eco_api_usage::created_at.lt(to))
            .count()
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "usage event"))?;
        Ok(to_u64(n))
    }

    async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), RepoError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        diesel::sql_query(
            "INSERT INTO eco_usage_dead_letters (event_id, user_id, api_key_id, endpoint, method,
                 status_code, response_time_ms, created_at, included_calls, reason, failed_at)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(event_id uuid, user_id text,
                 api_key_id text, endpoint text, method text, status_code int,
                 response_time_ms int, created_at timestamptz, included_calls bigint,
                 reason text, failed_at timestamptz)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind::<Text, _>(dead_letters_json(letters))
        .execute(&mut conn)
        .await
        .map_err(|e| repo_error(e, "dead letter"))?;
        Ok(())
    }

    async fn dead_letters(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<DeadLetterRow> = diesel::sql_query(
            "SELECT event_id, user_id, api_key_id, endpoint, method, status_code,
                    response_time_ms, created_at, included_calls, reason, failed_at
             FROM eco_usage_dead_letters
             WHERE $1::uuid IS NULL OR event_id > $1 ORDER BY event_id LIMIT $2",
        )
        .bind::<Nullable<SqlUuid>, _>(after)
        .bind::<BigInt, _>(i64::from(limit))
        .load(&mut conn)
        .await
        .map_err(|e| repo_error(e, "dead letter"))?;
        Ok(rows.into_iter().map(DeadLetterRow::into_domain).collect())
    }

    async fn remove_dead_letters(&self, event_ids: &[Uuid]) -> Result<u64, RepoError> {
        let mut conn = self.conn().await?;
        let n = diesel::sql_query("DELETE FROM eco_usage_dead_letters WHERE event_id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(event_ids)
            .execute(&mut conn)
            .await
            .map_err(|e| repo_error(e, "dead letter"))?;
        Ok(n as u64)
    }

    async fn prepare_usage_storage(
        &self,
        now: OffsetDateTime,
        months_ahead: u32,
    ) -> Result<Vec<String>, RepoError> {
        let mut conn = self.conn().await?;
        partitions::ensure(&mut conn, now, months_ahead)
            .await
            .map_err(|e| repo_error(e, "usage partition"))
    }

    async fn prune_usage(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<UsagePrune, RepoError> {
        let mut conn = self.conn().await?;
        partitions::prune(&mut conn, before, dry_run)
            .await
            .map_err(|e| repo_error(e, "usage partition"))
    }

    async fn usage_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError> {
        use self::schema::eco_api_usage::dsl as u;
        let mut conn = self.conn().await?;
        let mut query = u::eco_api_usage
            .filter(u::user_id.eq(user_id.as_str()))
            .filter(u::created_at.ge(from))
            .filter(u::created_at.lt(to))
            .into_boxed();
        if let Some((at, id)) = after {
            // `<= at` bounds the index scan; the rest orders ties by event id.
            query = query
                .filter(u::created_at.le(at))
                .filter(u::created_at.lt(at).or(u::event_id.lt(id)));
        }
        let rows: Vec<EventTuple<Uuid, OffsetDateTime>> = query
            .select((
                u::event_id,
                u::user_id,
                u::api_key_id,
                u::endpoint,
                u::method,
                u::status_code,
                u::response_time_ms,
                u::created_at,
            ))
            .order((u::created_at.desc(), u::event_id.desc()))
            .limit(i64::from(limit))
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "usage event"))?;
        Ok(rows
            .into_iter()
            .map(|(id, user, key, endpoint, method, status, ms, at)| {
                event_from_columns(id, (user, key, endpoint, method), (status, ms), at)
            })
            .collect())
    }
}

#[derive(QueryableByName)]
struct DeadLetterRow {
    #[diesel(sql_type = SqlUuid)]
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
    #[diesel(sql_type = Timestamptz)]
    created_at: OffsetDateTime,
    #[diesel(sql_type = Nullable<BigInt>)]
    included_calls: Option<i64>,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = Timestamptz)]
    failed_at: OffsetDateTime,
}

impl DeadLetterRow {
    fn into_domain(self) -> DeadLetter {
        DeadLetter {
            event: UsageEvent {
                event_id: self.event_id,
                user_id: UserId::from_stored(self.user_id),
                api_key_id: ApiKeyId::from_stored(self.api_key_id),
                endpoint: self.endpoint,
                method: self.method,
                status_code: u16::try_from(self.status_code).unwrap_or(0),
                response_time_ms: u32::try_from(self.response_time_ms).unwrap_or(0),
                created_at: self.created_at,
            },
            included_calls: self.included_calls.map(to_u64),
            reason: self.reason,
            failed_at: self.failed_at,
        }
    }
}

/// Creates missing counters from the periods' stored calls ($1 users, $2 periods, in one
/// order for every writer).
const SEED_QUOTA_COUNTERS: &str = "\
INSERT INTO eco_quota_counters (user_id, period_start, admitted)
SELECT d.user_id, d.period_start, COALESCE(r.api_calls, 0)
FROM unnest($1::text[], $2::timestamptz[]) AS d(user_id, period_start)
LEFT JOIN eco_usage_records r ON r.user_id = d.user_id AND r.period_start = d.period_start
ORDER BY d.user_id, d.period_start
ON CONFLICT (user_id, period_start) DO NOTHING";

/// Adds $3, then leases `lease_size` (max $4, cap $5, share $6) in one statement: the
/// right-hand sides all read the row as it was, so `last_taken` and `admitted` get the
/// same lease, and the row lock makes concurrent leases queue.
const TAKE_QUOTA: &str = "\
UPDATE eco_quota_counters SET
    last_taken = LEAST($4, GREATEST(1, ($5 - (admitted + $3)) / $6), GREATEST(0, $5 - (admitted + $3))),
    admitted = admitted + $3
        + LEAST($4, GREATEST(1, ($5 - (admitted + $3)) / $6), GREATEST(0, $5 - (admitted + $3)))
WHERE user_id = $1 AND period_start = $2
RETURNING last_taken AS taken, admitted AS n";

/// Locks the counters of a batch of deltas in one order for every writer, so that two
/// instances applying overlapping batches cannot deadlock.
/// Adds each delta to its counter, in one statement: the counters are first locked in one
/// order for every writer (an InitPlan, run before the update), so that syncs of several
/// instances never deadlock; returns the counts after. Counters that do not exist yet
/// are not returned (the caller seeds them and applies their deltas again).
const APPLY_QUOTA_DELTAS: &str = "\
UPDATE eco_quota_counters c SET admitted = GREATEST(0, c.admitted + d.delta)
FROM unnest($1::text[], $2::timestamptz[], $3::bigint[]) AS d(user_id, period_start, delta)
WHERE c.user_id = d.user_id AND c.period_start = d.period_start
  AND (SELECT count(*) FROM (
        SELECT 1 FROM eco_quota_counters l
        JOIN unnest($1::text[], $2::timestamptz[]) AS k(user_id, period_start)
            ON l.user_id = k.user_id AND l.period_start = k.period_start
        ORDER BY l.user_id, l.period_start
        FOR UPDATE OF l) locked) >= 0
RETURNING c.user_id, c.period_start, c.admitted AS n";

#[derive(QueryableByName)]
struct QuotaCountRow {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Timestamptz)]
    period_start: OffsetDateTime,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

impl PgStore {
    async fn seed_quota_counters(
        &self,
        conn: &mut AsyncPgConnection,
        users: &[&str],
        periods: &[OffsetDateTime],
    ) -> Result<(), RepoError> {
        diesel::sql_query(SEED_QUOTA_COUNTERS)
            .bind::<Array<Text>, _>(users)
            .bind::<Array<Timestamptz>, _>(periods)
            .execute(conn)
            .await
            .map_err(|e| repo_error(e, "quota counter"))?;
        Ok(())
    }
}

#[async_trait]
impl QuotaCounterRepository for PgStore {
    async fn quota_count(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        let mut conn = self.conn().await?;
        self.seed_quota_counters(&mut conn, &[user_id.as_str()], &[period_start])
            .await?;
        let row: CountRow = diesel::sql_query(
            "SELECT admitted AS n FROM eco_quota_counters WHERE user_id = $1 AND period_start = $2",
        )
        .bind::<Text, _>(user_id.as_str())
        .bind::<Timestamptz, _>(period_start)
        .get_result(&mut conn)
        .await
        .map_err(|e| repo_error(e, "quota counter"))?;
        Ok(to_u64(row.n))
    }

    async fn take_quota(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
        add: u64,
        lease: LeaseTerms,
    ) -> Result<QuotaTake, RepoError> {
        let mut conn = self.conn().await?;
        let (max, cap, share) = lease_binds(lease);
        for attempt in 0..2 {
            let row: Option<QuotaTakeRow> = diesel::sql_query(TAKE_QUOTA)
                .bind::<Text, _>(user_id.as_str())
                .bind::<Timestamptz, _>(period_start)
                .bind::<BigInt, _>(to_i64(add))
                .bind::<BigInt, _>(max)
                .bind::<BigInt, _>(cap)
                .bind::<BigInt, _>(share)
                .get_result(&mut conn)
                .await
                .optional()
                .map_err(|e| repo_error(e, "quota counter"))?;
            match row {
                Some(row) => return Ok(row.into_domain()),
                None if attempt == 0 => {
                    self.seed_quota_counters(&mut conn, &[user_id.as_str()], &[period_start])
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
        period_start: OffsetDateTime,
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<StoredCallsRow> = diesel::sql_query(COUNTERS_BELOW_STORED)
            .bind::<Timestamptz, _>(period_start)
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "quota counter"))?;
        Ok(rows.into_iter().map(StoredCallsRow::into_pair).collect())
    }

    async fn raise_quota_counters(
        &self,
        period_start: OffsetDateTime,
        floors: &[(UserId, u64)],
    ) -> Result<u64, RepoError> {
        if floors.is_empty() {
            return Ok(0);
        }
        let (users, floors) = floor_columns(floors);
        let mut conn = self.conn().await?;
        let raised = diesel::sql_query(
            "UPDATE eco_quota_counters c SET admitted = d.floor
             FROM unnest($2::text[], $3::int8[]) AS d(user_id, floor)
             WHERE c.user_id = d.user_id AND c.period_start = $1 AND c.admitted < d.floor
               AND (SELECT count(*) FROM (
                     SELECT 1 FROM eco_quota_counters l
                     WHERE l.user_id = ANY($2) AND l.period_start = $1
                     ORDER BY l.user_id
                     FOR UPDATE OF l) locked) >= 0",
        )
        .bind::<Timestamptz, _>(period_start)
        .bind::<Array<Text>, _>(&users)
        .bind::<Array<BigInt>, _>(&floors)
        .execute(&mut conn)
        .await
        .map_err(|e| repo_error(e, "quota counter"))?;
        Ok(raised as u64)
    }

    async fn apply_quota_deltas(&self, deltas: &[QuotaDelta]) -> Result<Vec<u64>, RepoError> {
        if deltas.is_empty() {
            return Ok(Vec::new());
        }
        let users: Vec<&str> = deltas.iter().map(|d| d.user_id.as_str()).collect();
        let periods: Vec<OffsetDateTime> = deltas.iter().map(|d| d.period_start).collect();
        let amounts: Vec<i64> = deltas.iter().map(|d| d.delta).collect();
        let mut conn = self.conn().await?;
        let apply = async |conn: &mut AsyncPgConnection,
                           users: &[&str],
                           periods: &[OffsetDateTime],
                           amounts: &[i64]| {
            diesel::sql_query(APPLY_QUOTA_DELTAS)
                .bind::<Array<Text>, _>(users)
                .bind::<Array<Timestamptz>, _>(periods)
                .bind::<Array<BigInt>, _>(amounts)
                .load::<QuotaCountRow>(conn)
                .await
                .map_err(|e| repo_error(e, "quota counter"))
        };
        // Counters exist once a user's first call read them: one statement, as a rule.
        let mut rows = apply(&mut conn, &users, &periods, &amounts).await?;
        if rows.len() < deltas.len() {
            let done: std::collections::HashSet<(&str, OffsetDateTime)> = rows
                .iter()
                .map(|r| (r.user_id.as_str(), r.period_start))
                .collect();
            let missing: Vec<usize> = (0..deltas.len())
                .filter(|&i| !done.contains(&(users[i], periods[i])))
                .collect();
            let users: Vec<&str> = missing.iter().map(|&i| users[i]).collect();
            let periods: Vec<OffsetDateTime> = missing.iter().map(|&i| periods[i]).collect();
            let amounts: Vec<i64> = missing.iter().map(|&i| amounts[i]).collect();
            self.seed_quota_counters(&mut conn, &users, &periods)
                .await?;
            rows.extend(apply(&mut conn, &users, &periods, &amounts).await?);
        }
        let after: std::collections::HashMap<(String, OffsetDateTime), i64> = rows
            .into_iter()
            .map(|r| ((r.user_id, r.period_start), r.n))
            .collect();
        deltas
            .iter()
            .map(|d| {
                after
                    .get(&(d.user_id.to_string(), d.period_start))
                    .map(|n| to_u64(*n))
                    .ok_or(RepoError::NotFound {
                        entity: "quota counter",
                    })
            })
            .collect()
    }
}

#[async_trait]
impl DailyUsageRepository for PgStore {
    async fn aggregate_usage_day(&self, date: Date, now: OffsetDateTime) -> Result<u64, RepoError> {
        // Set-based: one statement over the day's index range, whatever the row count.
        let rebuild = format!(
            "WITH per_endpoint AS (
                SELECT user_id, endpoint, method, count(*) AS calls,
                       count(*) FILTER (WHERE status_code >= 400) AS errors,
                       sum(response_time_ms)::bigint AS total_ms
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
            SELECT user_id, $1, sum(calls)::bigint, sum(errors)::bigint, sum(total_ms)::bigint,
                   sum(total_ms)::float8 / sum(calls),
                   jsonb_agg(jsonb_build_object('endpoint', endpoint, 'method', method,
                                                'calls', calls) ORDER BY rank)
                       FILTER (WHERE rank <= {TOP_ENDPOINTS}),
                   $4
            FROM ranked
            GROUP BY user_id"
        );
        let start = date.midnight().assume_utc();
        let end = start + time::Duration::days(1);
        let fold = self
            .usage_pruned_before()
            .await?
            .is_some_and(|bound| date < bound.date());
        // The day's events are removed as they are counted (one statement), so that a call
        // stored meanwhile is neither lost nor counted twice.
        let fold_sql = format!(
            "WITH gone AS (
                DELETE FROM eco_api_usage
                WHERE created_at >= $2 AND created_at < $3 AND {}
                RETURNING user_id, status_code, response_time_ms
            )
            INSERT INTO eco_usage_daily (user_id, date, api_calls, error_calls,
                total_response_time_ms, avg_response_time_ms, top_endpoints, updated_at)
            SELECT user_id, $1, count(*), count(*) FILTER (WHERE status_code >= 400),
                   sum(response_time_ms)::bigint, sum(response_time_ms)::float8 / count(*),
                   '[]'::jsonb, $4
            FROM gone GROUP BY user_id
            {FOLD_INTO_DAILY}",
            foldable("$5")
        );
        let mut conn = self.conn().await?;
        // A day that has ended (the database's clock) gets its row first, committed on its
        // own, so that every writer of a late call from now on marks it.
        diesel::sql_query(
            "INSERT INTO eco_usage_days (date) SELECT $1
             WHERE $1 < (now() AT TIME ZONE 'UTC')::date ON CONFLICT (date) DO NOTHING",
        )
        .bind::<SqlDate, _>(date)
        .execute(&mut conn)
        .await
        .map_err(|e| repo_error(e, "usage day"))?;
        let users = conn
            .transaction(async |conn| -> Result<usize, diesel::result::Error> {
                // Late writes before this read are in the rebuild below (read committed:
                // it sees every commit up to its start); later ones leave the day stale.
                let seen: Option<LateWrites> = diesel::sql_query(
                    "SELECT late_writes FROM eco_usage_days
                     WHERE date = $1 AND $1 < (now() AT TIME ZONE 'UTC')::date",
                )
                .bind::<SqlDate, _>(date)
                .get_result(conn)
                .await
                .optional()?;
                if !fold {
                    diesel::delete(eco_usage_daily::table.filter(eco_usage_daily::date.eq(date)))
                        .execute(conn)
                        .await?;
                }
                let users = if fold {
                    diesel::sql_query(&fold_sql)
                        .bind::<SqlDate, _>(date)
                        .bind::<Timestamptz, _>(start)
                        .bind::<Timestamptz, _>(end)
                        .bind::<Timestamptz, _>(now)
                        .bind::<Timestamptz, _>(BillingPeriod::containing(start).start())
                        .execute(conn)
                        .await?
                } else {
                    diesel::sql_query(&rebuild)
                        .bind::<SqlDate, _>(date)
                        .bind::<Timestamptz, _>(start)
                        .bind::<Timestamptz, _>(end)
                        .bind::<Timestamptz, _>(now)
                        .execute(conn)
                        .await?
                };
                if let Some(seen) = seen {
                    diesel::sql_query(
                        "UPDATE eco_usage_days SET aggregated_writes = $2, aggregated_at = $3
                         WHERE date = $1",
                    )
                    .bind::<SqlDate, _>(date)
                    .bind::<BigInt, _>(seen.late_writes)
                    .bind::<Timestamptz, _>(now)
                    .execute(conn)
                    .await?;
                    diesel::sql_query(DAY_TOTALS)
                        .bind::<SqlDate, _>(date)
                        .execute(conn)
                        .await?;
                }
                Ok(users)
            })
            .await
            .map_err(|e| repo_error(e, "usage event"))?;
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
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "daily usage"))?;
        rows.into_iter().map(DailyRow::into_domain).collect()
    }

    async fn aggregated_days(&self, from: Date, to: Date) -> Result<Vec<Date>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<DayRow> = diesel::sql_query(
            "SELECT date FROM eco_usage_days
             WHERE date BETWEEN $1 AND $2 AND aggregated_writes = late_writes ORDER BY date",
        )
        .bind::<SqlDate, _>(from)
        .bind::<SqlDate, _>(to)
        .load(&mut conn)
        .await
        .map_err(|e| repo_error(e, "usage day"))?;
        Ok(rows.into_iter().map(|r| r.date).collect())
    }

    async fn daily_usage_from_events(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<RawDayRow> = diesel::sql_query(
            "SELECT (created_at AT TIME ZONE 'UTC')::date AS date, count(*) AS calls,
                    count(*) FILTER (WHERE status_code >= 400) AS errors,
                    coalesce(sum(response_time_ms), 0)::bigint AS total_ms
             FROM eco_api_usage
             WHERE user_id = $1 AND created_at >= $2 AND created_at < $3
             GROUP BY 1 ORDER BY 1",
        )
        .bind::<Text, _>(user_id.as_str())
        .bind::<Timestamptz, _>(from.midnight().assume_utc())
        .bind::<Timestamptz, _>(to.midnight().assume_utc() + time::Duration::days(1))
        .load(&mut conn)
        .await
        .map_err(|e| repo_error(e, "usage event"))?;
        Ok(rows
            .into_iter()
            .map(|r| raw_day(user_id, r.date, r.calls, r.errors, r.total_ms))
            .collect())
    }

    async fn usage_pruned_before(&self) -> Result<Option<OffsetDateTime>, RepoError> {
        let mut conn = self.conn().await?;
        eco_usage_retention::table
            .select(eco_usage_retention::pruned_before)
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "usage retention"))
    }

    async fn first_usage_day(&self) -> Result<Option<Date>, RepoError> {
        let mut conn = self.conn().await?;
        let first: Option<OffsetDateTime> = eco_api_usage::table
            .select(diesel::dsl::min(eco_api_usage::created_at))
            .first(&mut conn)
            .await
            .map_err(|e| repo_error(e, "usage event"))?;
        Ok(first.map(|t| {
            t.checked_to_offset(time::UtcOffset::UTC)
                .unwrap_or(t)
                .date()
        }))
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
impl OverageChargeRepository for PgStore {
    async fn create_overage_charge(
        &self,
        charge: &NewOverageCharge,
    ) -> Result<OverageCharge, RepoError> {
        let mut conn = self.conn().await?;
        diesel::insert_into(eco_overage_charges::table)
            .values(NewChargeRow {
                user_id: charge.user_id.as_str(),
                period_start: charge.period_start,
                calls_from: to_i64(charge.calls_from),
                calls_to: to_i64(charge.calls_to),
                amount_cents: charge.amount_cents,
                idempotency_key: &charge.idempotency_key,
                status: ChargeStatus::Pending.as_str(),
                created_at: charge.created_at,
                updated_at: charge.created_at,
            })
            .returning(ChargeRow::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?
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
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "overage charge"))?
            .map(ChargeRow::into_domain)
            .transpose()
    }

    async fn complete_overage_charge(
        &self,
        id: i64,
        stripe_invoice_item_id: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| -> Result<ChargeRow, diesel::result::Error> {
            let charge: ChargeRow = diesel::update(c::eco_overage_charges.find(id))
                .set((
                    c::status.eq(ChargeStatus::Succeeded.as_str()),
                    c::stripe_invoice_item_id.eq(stripe_invoice_item_id),
                    c::attempts.eq(c::attempts + 1),
                    c::last_error.eq(None::<String>),
                    c::updated_at.eq(at),
                ))
                .returning(ChargeRow::as_returning())
                .get_result(conn)
                .await?;
            diesel::sql_query(
                "UPDATE eco_usage_records
                 SET overage_invoiced_calls = GREATEST(overage_invoiced_calls, $3), updated_at = $4
                 WHERE user_id = $1 AND period_start = $2",
            )
            .bind::<Text, _>(&charge.user_id)
            .bind::<Timestamptz, _>(charge.period_start)
            .bind::<BigInt, _>(charge.calls_to)
            .bind::<Timestamptz, _>(at)
            .execute(conn)
            .await?;
            Ok(charge)
        })
        .await
        .map_err(|e| repo_error(e, "overage charge"))?
        .into_domain()
    }

    async fn claim_overage_charge(
        &self,
        id: i64,
        seen_updated_at: OffsetDateTime,
        at: OffsetDateTime,
    ) -> Result<Option<OverageCharge>, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let mut conn = self.conn().await?;
        diesel::update(
            c::eco_overage_charges
                .find(id)
                .filter(c::status.eq(ChargeStatus::Pending.as_str()))
                .filter(c::updated_at.eq(seen_updated_at)),
        )
        .set(c::updated_at.eq(at))
        .returning(ChargeRow::as_returning())
        .get_result(&mut conn)
        .await
        .optional()
        .map_err(|e| repo_error(e, "overage charge"))?
        .map(ChargeRow::into_domain)
        .transpose()
    }

    async fn note_overage_charge_attempt(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let mut conn = self.conn().await?;
        diesel::update(c::eco_overage_charges.find(id))
            .set((
                c::attempts.eq(c::attempts + 1),
                c::last_error.eq(error),
                c::updated_at.eq(at),
            ))
            .returning(ChargeRow::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "overage charge"))?
            .into_domain()
    }

    async fn fail_overage_charge(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let mut conn = self.conn().await?;
        diesel::update(c::eco_overage_charges.find(id))
            .set((
                c::status.eq(ChargeStatus::Failed.as_str()),
                c::attempts.eq(c::attempts + 1),
                c::last_error.eq(error),
                c::updated_at.eq(at),
            ))
            .returning(ChargeRow::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "overage charge"))?
            .into_domain()
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
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "overage charge"))?;
        rows.into_iter().map(ChargeRow::into_domain).collect()
    }

    async fn uninvoiced_overage(&self) -> Result<Vec<UninvoicedOverage>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<UninvoicedRow> = diesel::sql_query(
            "SELECT r.user_id, u.plan, u.stripe_customer_id, r.period_start, r.period_end,
                    r.overage_calls, r.overage_invoiced_calls
             FROM eco_usage_records r JOIN eco_users u ON u.id = r.user_id
             WHERE r.overage_calls > r.overage_invoiced_calls
             ORDER BY r.user_id, r.period_start",
        )
        .load(&mut conn)
        .await
        .map_err(|e| repo_error(e, "usage record"))?;
        rows.into_iter().map(UninvoicedRow::into_domain).collect()
    }

    async fn overage_ledger(&self) -> Result<Vec<OverageLedgerEntry>, RepoError> {
        let mut conn = self.conn().await?;
        let rows: Vec<LedgerRow> = diesel::sql_query(LEDGER_SQL)
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "overage charge"))?;
        Ok(rows.into_iter().map(LedgerRow::into_domain).collect())
    }
}

/// Counters beside the charges of every period with overage or charges (same text on
/// both backends).
const LEDGER_SQL: &str = crate::common::LEDGER_SQL;

#[derive(QueryableByName)]
struct UninvoicedRow {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Text)]
    plan: String,
    #[diesel(sql_type = Nullable<Text>)]
    stripe_customer_id: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    period_start: OffsetDateTime,
    #[diesel(sql_type = Timestamptz)]
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
            plan: parse_plan(&self.plan)?,
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
    #[diesel(sql_type = Timestamptz)]
    period_start: OffsetDateTime,
    #[diesel(embed)]
    counts: crate::common::LedgerCounts,
}

impl LedgerRow {
    fn into_domain(self) -> OverageLedgerEntry {
        self.counts
            .into_entry(UserId::from_stored(self.user_id), self.period_start)
    }
}

#[async_trait]
impl AdminRepository for PgStore {
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
        let rows: Vec<Row> = diesel::sql_query(DAILY_TOTALS)
            .bind::<SqlDate, _>(from)
            .bind::<SqlDate, _>(to)
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "usage day"))?;
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
        diesel::sql_query(admin_sql::INSERT_AUDIT)
            .bind::<Text, _>(entry.admin_id.as_str())
            .bind::<Text, _>(&entry.method)
            .bind::<Text, _>(&entry.route)
            .bind::<Text, _>(&entry.params)
            .bind::<Integer, _>(i32::from(entry.status))
            .bind::<Timestamptz, _>(entry.created_at)
            .execute(&mut conn)
            .await
            .map_err(|e| repo_error(e, "audit entry"))?;
        Ok(())
    }

    async fn prune_admin_actions(
        &self,
        before: OffsetDateTime,
        batch: u32,
    ) -> Result<u64, RepoError> {
        let mut conn = self.conn().await?;
        let mut removed = 0;
        loop {
            let n = diesel::sql_query(admin_sql::PRUNE_AUDIT)
                .bind::<Timestamptz, _>(before)
                .bind::<BigInt, _>(i64::from(batch.max(1)))
                .execute(&mut conn)
                .await
                .map_err(|e| repo_error(e, "audit entry"))?;
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
        let total: CountRow = diesel::sql_query(admin_sql::COUNT_AUDIT)
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "audit entry"))?;
        let rows: Vec<AuditRow> = diesel::sql_query(admin_sql::AUDIT_PAGE)
            .bind::<BigInt, _>(i64::from(limit))
            .bind::<BigInt, _>(to_i64(offset))
            .load(&mut conn)
            .await
            .map_err(|e| repo_error(e, "audit entry"))?;
        Ok((
            to_u64(total.n),
            rows.into_iter().map(AuditRow::into_domain).collect(),
        ))
    }

    async fn users_page(
        &self,
        query: &UserPageQuery,
        catalog: &PlanCatalog,
    ) -> Result<(u64, Vec<UserUsageRow>), RepoError> {
        let mut conn = self.conn().await?;
        let plan = query.plan.map_or("", Plan::as_str);
        let pattern = admin_sql::contains_pattern(query.search.as_deref());
        let total: CountRow = diesel::sql_query(admin_sql::COUNT_USERS)
            .bind::<Text, _>(plan)
            .bind::<Text, _>(&pattern)
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
        let total = to_u64(total.n);
        // A page past the end costs nothing.
        if query.offset >= total {
            return Ok((total, Vec::new()));
        }
        if query.sort != UserSort::ApiCalls {
            let sql = admin_sql::users_page(query.sort, query.descending);
            let rows = self
                .user_rows(&mut conn, &sql, query, catalog, query.offset, query.limit)
                .await?;
            return Ok((total, rows));
        }
        // By calls: users with a record this period, then those without (descending).
        let with = admin_sql::calls_page_with_records(query.descending);
        let without = admin_sql::calls_page_without_records(query.descending);
        let (first, second) = if query.descending {
            (&with, &without)
        } else {
            (&without, &with)
        };
        let mut rows = self
            .user_rows(&mut conn, first, query, catalog, query.offset, query.limit)
            .await?;
        let first_total = if rows.is_empty() {
            let counted: CountRow = diesel::sql_query(admin_sql::count_with_records())
                .bind::<Timestamptz, _>(query.period_start)
                .bind::<Text, _>(plan)
                .bind::<Text, _>(&pattern)
                .get_result(&mut conn)
                .await
                .map_err(|e| repo_error(e, "user"))?;
            let with_records = to_u64(counted.n);
            Some(if query.descending {
                with_records
            } else {
                total - with_records.min(total)
            })
        } else {
            None
        };
        if let Some((offset, limit)) =
            admin_sql::second_group(query.offset, query.limit, rows.len(), first_total)
        {
            rows.extend(
                self.user_rows(&mut conn, second, query, catalog, offset, limit)
                    .await?,
            );
        }
        Ok((total, rows))
    }

    async fn period_figures(
        &self,
        period_start: OffsetDateTime,
        today: (OffsetDateTime, OffsetDateTime),
        (elapsed, length): (i64, i64),
        catalog: &PlanCatalog,
    ) -> Result<PeriodFigures, RepoError> {
        let mut conn = self.conn().await?;
        let today_calls: CountRow = diesel::sql_query(admin_sql::CALLS_BETWEEN)
            .bind::<Timestamptz, _>(today.0)
            .bind::<Timestamptz, _>(today.1)
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "usage event"))?;
        let sums: PeriodSumsRow = diesel::sql_query(admin_sql::PERIOD_SUMS)
            .bind::<Timestamptz, _>(period_start)
            .bind::<BigInt, _>(catalog.overage_price.0)
            .get_result(&mut conn)
            .await
            .map_err(|e| repo_error(e, "usage record"))?;
        let extra = match projection_threshold(catalog, (elapsed, length)) {
            None => 0,
            Some(threshold) => {
                let row: CountRow = diesel::sql_query(admin_sql::PROJECTION_EXTRA)
                    .bind::<Timestamptz, _>(period_start)
                    .bind::<BigInt, _>(catalog.overage_price.0)
                    .bind::<BigInt, _>(billed_limit(catalog, Plan::Free))
                    .bind::<BigInt, _>(billed_limit(catalog, Plan::Pro))
                    .bind::<BigInt, _>(billed_limit(catalog, Plan::Enterprise))
                    .bind::<BigInt, _>(length)
                    .bind::<BigInt, _>(elapsed.max(1))
                    .bind::<BigInt, _>(threshold)
                    .get_result(&mut conn)
                    .await
                    .map_err(|e| repo_error(e, "usage record"))?;
                row.n
            }
        };
        Ok(sums.into_figures(today_calls.n, extra))
    }
}

impl PgStore {
    /// One page of users rows from `sql` (parameters as `admin_sql::users_page`).
    async fn user_rows(
        &self,
        conn: &mut PooledConnection<'_, AsyncPgConnection>,
        sql: &str,
        query: &UserPageQuery,
        catalog: &PlanCatalog,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<UserUsageRow>, RepoError> {
        let rows: Vec<UserPageRow> = diesel::sql_query(sql)
            .bind::<Timestamptz, _>(query.period_start)
            .bind::<BigInt, _>(catalog.free.price.0)
            .bind::<BigInt, _>(catalog.pro.price.0)
            .bind::<BigInt, _>(catalog.enterprise.price.0)
            .bind::<BigInt, _>(catalog.overage_price.0)
            .bind::<Text, _>(query.plan.map_or("", Plan::as_str))
            .bind::<Text, _>(admin_sql::contains_pattern(query.search.as_deref()))
            .bind::<BigInt, _>(i64::from(limit))
            .bind::<BigInt, _>(to_i64(offset))
            .load(&mut **conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
        rows.into_iter().map(UserPageRow::into_domain).collect()
    }
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
    #[diesel(sql_type = Timestamptz)]
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
    #[diesel(sql_type = Timestamptz)]
    created_at: OffsetDateTime,
    #[diesel(sql_type = Nullable<Text>)]
    plan_subscription_id: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    blocked_at: Option<OffsetDateTime>,
    #[diesel(sql_type = BigInt)]
    api_calls: i64,
    #[diesel(sql_type = BigInt)]
    overage_calls: i64,
    #[diesel(sql_type = BigInt)]
    revenue_cents: i64,
}

impl UserPageRow {
    fn into_domain(self) -> Result<UserUsageRow, RepoError> {
        Ok(UserUsageRow {
            user: User {
                id: UserId::from_stored(self.id),
                email: self.email,
                plan: parse_plan(&self.plan)?,
                stripe_customer_id: self.stripe_customer_id,
                created_at: self.created_at,
                plan_subscription_id: self.plan_subscription_id,
                blocked_at: self.blocked_at,
            },
            api_calls: to_u64(self.api_calls),
            overage_calls: to_u64(self.overage_calls),
            revenue_cents: self.revenue_cents,
        })
    }
}

crate::common::session_repository!(PgStore);

impl PgStore {
    /// Ends a session; whether it existed.
    async fn delete_session_row(&self, token_hash: &str) -> Result<bool, RepoError> {
        let mut conn = self.conn().await?;
        let n = diesel::sql_query(session_sql::DELETE_SESSION)
            .bind::<Text, _>(token_hash)
            .execute(&mut conn)
            .await
            .map_err(|e| repo_error(e, "session"))?;
        Ok(n > 0)
    }

    /// Removes expired sessions and used or expired links; how many.
    async fn prune_session_rows(&self, now: OffsetDateTime) -> Result<u64, RepoError> {
        let mut conn = self.conn().await?;
        let mut removed = 0;
        for sql in [session_sql::PRUNE_SESSIONS, session_sql::PRUNE_LINKS] {
            removed += diesel::sql_query(sql)
                .bind::<Timestamptz, _>(now)
                .execute(&mut conn)
                .await
                .map_err(|e| repo_error(e, "session"))? as u64;
        }
        Ok(removed)
    }

    /// A session or link row: `sql` is `INSERT_LINK` or `INSERT_SESSION`.
    async fn insert_token(
        &self,
        sql: &'static str,
        token_hash: &str,
        user_id: &UserId,
        created_at: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(sql)
            .bind::<Text, _>(token_hash)
            .bind::<Text, _>(user_id.as_str())
            .bind::<Timestamptz, _>(created_at)
            .bind::<Timestamptz, _>(expires_at)
            .execute(&mut conn)
            .await
            .map_err(|e| repo_error(e, "user"))?;
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
        let row: Option<session_sql::UserIdRow> = diesel::sql_query(sql)
            .bind::<Text, _>(token_hash)
            .bind::<Timestamptz, _>(now)
            .get_result(&mut conn)
            .await
            .optional()
            .map_err(|e| repo_error(e, "session"))?;
        Ok(row.map(|r| UserId::from_stored(r.user_id)))
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), RepoError> {
        let mut conn = self.conn().await?;
        conn.batch_execute("SELECT 1")
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))
    }

    fn backend_name(&self) -> &'static str {
        "postgres"
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
