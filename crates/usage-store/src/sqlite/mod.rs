//! SQLite through diesel: bundled library, WAL, busy timeout, foreign keys, an r2d2 pool,
//! and every call on a blocking thread behind the async traits.

mod schema;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{Date, OffsetDateTime, PrimitiveDateTime, UtcOffset};
use usage_core::repo::{
    AdminAuditEntry, AdminRepository, ApiKeyRecord, ApiKeyRepository, ChargeStatus, DailyUsage,
    DailyUsageRepository, DayTotal, DeadLetter, DeletedKeys, EndpointStats, IncludedCalls,
    KeyIssue, KeyRetirement, LeaseTerms, NewOverageCharge, OverageCharge, OverageChargeRepository,
    OverageLedgerEntry, PeriodFigures, PoolState, QuotaCounterRepository, QuotaDelta, QuotaTake,
    RecordOutcome, SubscriptionChange, SubscriptionOutcome, TOP_ENDPOINTS, UninvoicedOverage,
    UsagePrune, UsageRecord, UsageRepository, User, UserPageQuery, UserRepository, UserSort,
    UserUsageRow, late_write_cutoff, plan_key_issue, plan_subscription_change,
};
use usage_core::{
    ApiKeyId, BillingPeriod, Plan, PlanCatalog, RepoError, Store, UsageEvent, UserId,
};

use self::schema::{
    eco_api_keys, eco_api_usage, eco_deleted_keys, eco_overage_charges, eco_stripe_events,
    eco_usage_daily, eco_usage_records, eco_usage_retention, eco_users,
};
use crate::common::{
    BatchError, CountRow, EndpointStatsRow, EventTuple, FOLD_INTO_DAILY, LEDGER_SQL, LedgerCounts,
    PeriodSumsRow, QuotaTakeRow, admin_sql, billed_limit, counter_deltas, dead_letters_json,
    deleted_keys, distinct_references, event_from_columns, foldable, lease_binds, parse_plan,
    parse_top_endpoints, plan_counts, projection_threshold, raw_day, session_sql, to_i64, to_u64,
};
use crate::common::{
    COUNTERS_BELOW_STORED, DAILY_TOTALS, DAY_TOTALS, StoredCallsRow, floor_columns,
};
use crate::error::repo_error;
use crate::{PoolOptions, StoreError};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");

/// Readers run in parallel under WAL; more connections than this only wait on the
/// single writer.
const MAX_SQLITE_CONNECTIONS: u32 = 8;

/// Rows deleted per statement by retention (each statement a short write transaction).
const SQLITE_DELETE_BATCH: i64 = 5_000;

/// Rows per INSERT statement (eight bind parameters a row, far below SQLite's limit).
const SQLITE_INSERT_CHUNK: usize = 500;

/// Page cache of every connection (KiB).
const CACHE_KIB: u32 = 32 * 1024;

/// Page cache of a connection while it writes a batch of usage (KiB): a large batch from
/// thousands of customers dirties more index pages than `CACHE_KIB` holds, and SQLite
/// would spill them to the WAL before the commit and read them back as the batch goes
/// on (+25% stored calls/s with 10,000 customers, docs/BENCHMARKS.md). Set back to
/// `CACHE_KIB` after the batch, which frees the pages above it.
const USAGE_WRITE_CACHE_KIB: u32 = 128 * 1024;

const TIMESTAMP: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
const DATE: &[BorrowedFormatItem<'_>] = format_description!("[year]-[month]-[day]");

/// A timestamp as stored: fixed width and UTC, so text order is time order.
fn ts(t: OffsetDateTime) -> String {
    t.checked_to_offset(UtcOffset::UTC)
        .unwrap_or(t)
        .format(TIMESTAMP)
        .unwrap_or_else(|_| String::from("0000-00-00T00:00:00.000000Z"))
}

fn parse_ts(s: &str) -> Result<OffsetDateTime, RepoError> {
    PrimitiveDateTime::parse(s, TIMESTAMP)
        .map(PrimitiveDateTime::assume_utc)
        .map_err(|e| RepoError::Backend(format!("bad stored timestamp {s:?}: {e}")))
}

fn parse_ts_opt(s: Option<String>) -> Result<Option<OffsetDateTime>, RepoError> {
    s.as_deref().map(parse_ts).transpose()
}

fn date_text(d: Date) -> String {
    d.format(DATE).unwrap_or_default()
}

fn parse_date(s: &str) -> Result<Date, RepoError> {
    Date::parse(s, DATE).map_err(|e| RepoError::Backend(format!("bad stored date {s:?}: {e}")))
}

/// Sets the pragmas on every new connection.
#[derive(Debug)]
struct ConnectionSetup {
    busy_timeout: Duration,
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for ConnectionSetup {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&pragmas(self.busy_timeout))
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// `busy_timeout` comes first: the others take locks, and another process may hold one
/// (the last connection of a CLI run checkpoints the WAL as it closes).
fn pragmas(busy_timeout: Duration) -> String {
    format!(
        "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; \
         PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
         PRAGMA cache_size = -{CACHE_KIB}; PRAGMA temp_store = MEMORY;",
        busy_timeout.as_millis()
    )
}

fn path_str(path: &Path) -> Result<&str, StoreError> {
    path.to_str().ok_or_else(|| StoreError::Connect {
        url: path.display().to_string(),
        reason: "the path is not valid UTF-8".to_owned(),
    })
}

/// Applies pending migrations, creating the file and its directory when missing.
pub(crate) async fn migrate(path: &Path) -> Result<usize, StoreError> {
    let path = path.to_owned();
    let shown = format!("sqlite://{}", path.display());
    let failed = |reason: String| StoreError::Migration {
        url: shown.clone(),
        reason,
    };
    tokio::task::spawn_blocking(move || -> Result<usize, StoreError> {
        let url = format!("sqlite://{}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Connect {
                url: url.clone(),
                reason: format!("cannot create directory {}: {e}", dir.display()),
            })?;
        }
        let mut conn =
            SqliteConnection::establish(path_str(&path)?).map_err(|e| StoreError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        conn.batch_execute(&pragmas(Duration::from_secs(30)))
            .map_err(|e| StoreError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        conn.run_pending_migrations(MIGRATIONS)
            .map(|v| v.len())
            .map_err(|e| StoreError::Migration {
                url,
                reason: e.to_string(),
            })
    })
    .await
    .map_err(|e| failed(e.to_string()))?
}

/// All repositories on one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: Pool<ConnectionManager<SqliteConnection>>,
}

type Conn = PooledConnection<ConnectionManager<SqliteConnection>>;

impl SqliteStore {
    /// Opens a pool on the file at `path` and checks that it answers.
    pub async fn open(path: &Path, options: &PoolOptions) -> Result<Self, StoreError> {
        let url = format!("sqlite://{}", path.display());
        let manager = ConnectionManager::<SqliteConnection>::new(path_str(path)?);
        let builder = Pool::builder()
            .max_size(options.max_connections.clamp(1, MAX_SQLITE_CONNECTIONS))
            .min_idle(Some(1))
            .connection_timeout(options.connect_timeout)
            .connection_customizer(Box::new(ConnectionSetup {
                busy_timeout: options.statement_timeout,
            }));
        // Building opens the first connection, which blocks.
        let pool = tokio::task::spawn_blocking(move || builder.build(manager))
            .await
            .map_err(|e| StoreError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?
            .map_err(|e| StoreError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let store = Self { pool };
        store.ping().await.map_err(|e| StoreError::Connect {
            url,
            reason: e.to_string(),
        })?;
        Ok(store)
    }

    /// Runs `work` on a pooled connection on a blocking thread. `missing` names what a
    /// foreign-key failure means (SQLite does not say which key failed).
    async fn run<T, F>(&self, missing: &'static str, work: F) -> Result<T, RepoError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, RepoError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool
                .get()
                .map_err(|e| RepoError::Unavailable(e.to_string()))?;
            work(&mut conn)
        })
        .await
        .map_err(|e| RepoError::Backend(format!("{missing} query task failed: {e}")))?
    }
}

/// diesel errors of SQLite to repository errors.
fn db(missing: &'static str) -> impl Fn(diesel::result::Error) -> RepoError {
    move |e| repo_error(e, missing)
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = eco_users, check_for_backend(diesel::sqlite::Sqlite))]
struct UserRow {
    id: String,
    email: String,
    plan: String,
    stripe_customer_id: Option<String>,
    created_at: String,
    plan_subscription_id: Option<String>,
    blocked_at: Option<String>,
}

impl UserRow {
    fn into_domain(self) -> Result<User, RepoError> {
        Ok(User {
            id: UserId::from_stored(self.id),
            email: self.email,
            plan: parse_plan(&self.plan)?,
            stripe_customer_id: self.stripe_customer_id,
            created_at: parse_ts(&self.created_at)?,
            plan_subscription_id: self.plan_subscription_id,
            blocked_at: parse_ts_opt(self.blocked_at)?,
        })
    }
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = eco_api_keys, check_for_backend(diesel::sqlite::Sqlite))]
struct ApiKeyRow {
    id: String,
    user_id: String,
    name: String,
    prefix: String,
    key_hash: String,
    created_at: String,
    last_used_at: Option<String>,
    revoked_at: Option<String>,
    expires_at: Option<String>,
}

impl ApiKeyRow {
    fn from_domain(k: &ApiKeyRecord) -> Self {
        Self {
            id: k.id.to_string(),
            user_id: k.user_id.to_string(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            key_hash: k.key_hash.clone(),
            created_at: ts(k.created_at),
            last_used_at: k.last_used_at.map(ts),
            revoked_at: k.revoked_at.map(ts),
            expires_at: k.expires_at.map(ts),
        }
    }

    fn into_domain(self) -> Result<ApiKeyRecord, RepoError> {
        Ok(ApiKeyRecord {
            id: ApiKeyId::from_stored(self.id),
            user_id: UserId::from_stored(self.user_id),
            name: self.name,
            prefix: self.prefix,
            key_hash: self.key_hash,
            created_at: parse_ts(&self.created_at)?,
            last_used_at: parse_ts_opt(self.last_used_at)?,
            revoked_at: parse_ts_opt(self.revoked_at)?,
            expires_at: parse_ts_opt(self.expires_at)?,
        })
    }
}

/// An event as bound into `insert_events`.
struct NewUsageRow {
    event_id: String,
    user_id: String,
    api_key_id: String,
    endpoint: String,
    method: String,
    status_code: i32,
    response_time_ms: i32,
    created_at: String,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_usage_records, check_for_backend(diesel::sqlite::Sqlite))]
struct UsageRecordRow {
    user_id: String,
    period_start: String,
    period_end: String,
    api_calls: i64,
    overage_calls: i64,
    overage_invoiced_calls: i64,
    updated_at: String,
}

impl UsageRecordRow {
    fn into_domain(self) -> Result<UsageRecord, RepoError> {
        Ok(UsageRecord {
            user_id: UserId::from_stored(self.user_id),
            period_start: parse_ts(&self.period_start)?,
            period_end: parse_ts(&self.period_end)?,
            api_calls: to_u64(self.api_calls),
            overage_calls: to_u64(self.overage_calls),
            overage_invoiced_calls: to_u64(self.overage_invoiced_calls),
            updated_at: parse_ts(&self.updated_at)?,
        })
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_usage_daily, check_for_backend(diesel::sqlite::Sqlite))]
struct DailyRow {
    user_id: String,
    date: String,
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
            date: parse_date(&self.date)?,
            api_calls: to_u64(self.api_calls),
            error_calls: to_u64(self.error_calls),
            total_response_time_ms: to_u64(self.total_response_time_ms),
            avg_response_time_ms: self.avg_response_time_ms,
            top_endpoints: parse_top_endpoints(&self.top_endpoints)?,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = eco_overage_charges, check_for_backend(diesel::sqlite::Sqlite))]
struct NewChargeRow {
    user_id: String,
    period_start: String,
    calls_from: i64,
    calls_to: i64,
    amount_cents: i64,
    idempotency_key: String,
    status: &'static str,
    created_at: String,
    updated_at: String,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = eco_overage_charges, check_for_backend(diesel::sqlite::Sqlite))]
struct ChargeRow {
    id: i64,
    user_id: String,
    period_start: String,
    calls_from: i64,
    calls_to: i64,
    amount_cents: i64,
    idempotency_key: String,
    status: String,
    stripe_invoice_item_id: Option<String>,
    attempts: i32,
    last_error: Option<String>,
    created_at: String,
    updated_at: String,
}

impl ChargeRow {
    fn into_domain(self) -> Result<OverageCharge, RepoError> {
        Ok(OverageCharge {
            id: self.id,
            user_id: UserId::from_stored(self.user_id),
            period_start: parse_ts(&self.period_start)?,
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
            created_at: parse_ts(&self.created_at)?,
            updated_at: parse_ts(&self.updated_at)?,
        })
    }
}

#[async_trait]
impl UserRepository for SqliteStore {
    async fn create_user(&self, user: &User) -> Result<(), RepoError> {
        let row = UserRow {
            id: user.id.to_string(),
            email: user.email.clone(),
            plan: user.plan.as_str().to_owned(),
            stripe_customer_id: user.stripe_customer_id.clone(),
            created_at: ts(user.created_at),
            plan_subscription_id: user.plan_subscription_id.clone(),
            blocked_at: user.blocked_at.map(ts),
        };
        self.run("user", move |conn| {
            diesel::insert_into(eco_users::table)
                .values(row)
                .execute(conn)
                .map_err(db("user"))?;
            Ok(())
        })
        .await
    }

    async fn user_by_id(&self, id: &UserId) -> Result<Option<User>, RepoError> {
        let id = id.to_string();
        self.run("user", move |conn| {
            eco_users::table
                .find(id)
                .select(UserRow::as_select())
                .first(conn)
                .optional()
                .map_err(db("user"))?
                .map(UserRow::into_domain)
                .transpose()
        })
        .await
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, RepoError> {
        let email = email.to_owned();
        self.run("user", move |conn| {
            eco_users::table
                .filter(eco_users::email.eq(email))
                .select(UserRow::as_select())
                .first(conn)
                .optional()
                .map_err(db("user"))?
                .map(UserRow::into_domain)
                .transpose()
        })
        .await
    }

    async fn set_plan(
        &self,
        id: &UserId,
        plan: Plan,
        at: OffsetDateTime,
    ) -> Result<User, RepoError> {
        let (id, at) = (id.to_string(), ts(at));
        self.run("user", move |conn| {
            diesel::update(eco_users::table.find(id))
                .set((
                    eco_users::plan.eq(plan.as_str()),
                    eco_users::plan_changed_at.eq(at),
                ))
                .returning(UserRow::as_returning())
                .get_result(conn)
                .map_err(db("user"))?
                .into_domain()
        })
        .await
    }

    async fn set_stripe_customer(
        &self,
        id: &UserId,
        customer: Option<&str>,
    ) -> Result<User, RepoError> {
        let (id, customer) = (id.to_string(), customer.map(str::to_owned));
        self.run("user", move |conn| {
            diesel::update(eco_users::table.find(id))
                .set(eco_users::stripe_customer_id.eq(customer))
                .returning(UserRow::as_returning())
                .get_result(conn)
                .map_err(db("user"))?
                .into_domain()
        })
        .await
    }

    async fn apply_subscription_change(
        &self,
        change: &SubscriptionChange,
        at: OffsetDateTime,
    ) -> Result<SubscriptionOutcome, RepoError> {
        let (change, at) = (change.clone(), ts(at));
        self.run("user", move |conn| {
            // BEGIN IMMEDIATE: one writer at a time, so two deliveries cannot both apply.
            conn.immediate_transaction(|conn| -> Result<SubscriptionOutcome, BatchError> {
                let user = eco_users::table
                    .filter(eco_users::stripe_customer_id.eq(&change.customer))
                    .select(UserRow::as_select())
                    .first(conn)
                    .optional()?
                    .map(UserRow::into_domain)
                    .transpose()
                    .map_err(BatchError::Repo)?;
                let seen: Option<String> = eco_stripe_events::table
                    .find(&change.event_id)
                    .select(eco_stripe_events::event_id)
                    .first(conn)
                    .optional()?;
                let latest: Option<String> = eco_stripe_events::table
                    .filter(eco_stripe_events::customer.eq(&change.customer))
                    .filter(eco_stripe_events::outcome.eq("applied"))
                    .select(diesel::dsl::max(eco_stripe_events::event_created))
                    .first(conn)?;
                let latest = parse_ts_opt(latest).map_err(BatchError::Repo)?;
                let outcome =
                    plan_subscription_change(user.as_ref(), seen.is_none(), latest, &change);
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
                        eco_stripe_events::event_created.eq(ts(change.created)),
                        eco_stripe_events::outcome.eq(stored),
                        eco_stripe_events::received_at.eq(&at),
                    ))
                    .execute(conn)?;
                if let SubscriptionOutcome::Applied(user) = &outcome {
                    diesel::update(eco_users::table.find(user.id.as_str()))
                        .set((
                            eco_users::plan.eq(user.plan.as_str()),
                            eco_users::plan_subscription_id.eq(&user.plan_subscription_id),
                            eco_users::plan_changed_at.eq(&at),
                        ))
                        .execute(conn)?;
                }
                Ok(outcome)
            })
            .map_err(|e| e.into_repo("user"))
        })
        .await
    }

    async fn plans_changed_since(&self, since: OffsetDateTime) -> Result<Vec<UserId>, RepoError> {
        let since = ts(since);
        self.run("user", move |conn| {
            let ids: Vec<String> = eco_users::table
                .filter(eco_users::plan_changed_at.ge(since))
                .select(eco_users::id)
                .load(conn)
                .map_err(db("user"))?;
            Ok(ids.into_iter().map(UserId::from_stored).collect())
        })
        .await
    }

    async fn count_users_by_plan(&self) -> Result<Vec<(Plan, u64)>, RepoError> {
        self.run("user", |conn| {
            let rows: Vec<(String, i64)> = eco_users::table
                .group_by(eco_users::plan)
                .select((eco_users::plan, diesel::dsl::count_star()))
                .order(eco_users::plan)
                .load(conn)
                .map_err(db("user"))?;
            plan_counts(rows)
        })
        .await
    }

    async fn set_user_blocked(
        &self,
        id: &UserId,
        at: Option<OffsetDateTime>,
    ) -> Result<User, RepoError> {
        let (id, at) = (id.to_string(), at.map(ts));
        self.run("user", move |conn| {
            diesel::update(eco_users::table.find(id))
                .set(eco_users::blocked_at.eq(at))
                .returning(UserRow::as_returning())
                .get_result(conn)
                .map_err(db("user"))?
                .into_domain()
        })
        .await
    }

    async fn delete_user(&self, id: &UserId) -> Result<bool, RepoError> {
        let id = id.to_string();
        self.run("user", move |conn| {
            let deleted = diesel::delete(eco_users::table.find(id))
                .execute(conn)
                .map_err(db("user"))?;
            Ok(deleted > 0)
        })
        .await
    }
}

#[async_trait]
impl ApiKeyRepository for SqliteStore {
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), RepoError> {
        let row = ApiKeyRow::from_domain(key);
        self.run("user", move |conn| {
            diesel::insert_into(eco_api_keys::table)
                .values(row)
                .execute(conn)
                .map_err(db("user"))?;
            Ok(())
        })
        .await
    }

    async fn issue_api_key(
        &self,
        key: &ApiKeyRecord,
        max_active: usize,
        retire: Option<&KeyRetirement>,
    ) -> Result<KeyIssue, RepoError> {
        let (key, retire) = (key.clone(), retire.cloned());
        self.run("user", move |conn| {
            // BEGIN IMMEDIATE: one writer at a time, so the count cannot be raced.
            conn.immediate_transaction(|conn| -> Result<KeyIssue, BatchError> {
                let user: Option<String> = eco_users::table
                    .filter(eco_users::id.eq(key.user_id.as_str()))
                    .select(eco_users::id)
                    .first(conn)
                    .optional()?;
                if user.is_none() {
                    return Err(BatchError::Missing("user"));
                }
                let users_keys = eco_api_keys::table
                    .filter(eco_api_keys::user_id.eq(key.user_id.as_str()))
                    .select(ApiKeyRow::as_select())
                    .load(conn)?
                    .into_iter()
                    .map(ApiKeyRow::into_domain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(BatchError::Repo)?;
                let plan = plan_key_issue(&users_keys, &key, max_active, retire.as_ref());
                let KeyIssue::Issued { retired } = &plan else {
                    return Ok(plan);
                };
                diesel::insert_into(eco_api_keys::table)
                    .values(ApiKeyRow::from_domain(&key))
                    .execute(conn)?;
                if let Some(old) = retired {
                    diesel::update(
                        eco_api_keys::table.filter(eco_api_keys::id.eq(old.id.as_str())),
                    )
                    .set((
                        eco_api_keys::revoked_at.eq(old.revoked_at.map(ts)),
                        eco_api_keys::expires_at.eq(old.expires_at.map(ts)),
                    ))
                    .execute(conn)?;
                }
                Ok(plan)
            })
            .map_err(|e| e.into_repo("user"))
        })
        .await
    }

    async fn api_key_and_plan_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<(ApiKeyRecord, Plan)>, RepoError> {
        let key_hash = key_hash.to_owned();
        self.run("API key", move |conn| {
            let found: Option<(ApiKeyRow, String)> = eco_api_keys::table
                .inner_join(eco_users::table)
                .filter(eco_api_keys::key_hash.eq(key_hash))
                .select((ApiKeyRow::as_select(), eco_users::plan))
                .first(conn)
                .optional()
                .map_err(db("API key"))?;
            found
                .map(|(key, plan)| Ok((key.into_domain()?, parse_plan(&plan)?)))
                .transpose()
        })
        .await
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, RepoError> {
        let key_hash = key_hash.to_owned();
        self.run("API key", move |conn| {
            eco_api_keys::table
                .filter(eco_api_keys::key_hash.eq(key_hash))
                .select(ApiKeyRow::as_select())
                .first(conn)
                .optional()
                .map_err(db("API key"))?
                .map(ApiKeyRow::into_domain)
                .transpose()
        })
        .await
    }

    async fn api_keys_for_user(&self, user_id: &UserId) -> Result<Vec<ApiKeyRecord>, RepoError> {
        let user_id = user_id.to_string();
        self.run("API key", move |conn| {
            eco_api_keys::table
                .filter(eco_api_keys::user_id.eq(user_id))
                .order((eco_api_keys::created_at.desc(), eco_api_keys::id.desc()))
                .select(ApiKeyRow::as_select())
                .load(conn)
                .map_err(db("API key"))?
                .into_iter()
                .map(ApiKeyRow::into_domain)
                .collect()
        })
        .await
    }

    async fn revoke_api_key(
        &self,
        user_id: &UserId,
        key_id: &ApiKeyId,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, RepoError> {
        let (user_id, key_id, at) = (user_id.to_string(), key_id.to_string(), ts(at));
        self.run("API key", move |conn| {
            let keep_first = diesel::dsl::sql::<Nullable<Text>>("COALESCE(revoked_at, ")
                .bind::<Text, _>(at)
                .sql(")");
            diesel::update(
                eco_api_keys::table
                    .filter(eco_api_keys::id.eq(key_id))
                    .filter(eco_api_keys::user_id.eq(user_id)),
            )
            .set(eco_api_keys::revoked_at.eq(keep_first))
            .returning(ApiKeyRow::as_returning())
            .get_result(conn)
            .optional()
            .map_err(db("API key"))?
            .map(ApiKeyRow::into_domain)
            .transpose()
        })
        .await
    }

    async fn touch_api_keys(&self, used: &[(ApiKeyId, OffsetDateTime)]) -> Result<(), RepoError> {
        if used.is_empty() {
            return Ok(());
        }
        // One statement whatever the number of keys: `[[id, time], ...]` as JSON.
        let used = serde_json::Value::Array(
            used.iter()
                .map(|(id, at)| serde_json::json!([id.as_str(), ts(*at)]))
                .collect(),
        )
        .to_string();
        self.run("API key", move |conn| {
            diesel::sql_query(
                "UPDATE eco_api_keys AS k SET last_used_at = d.at
                 FROM (SELECT value ->> 0 AS id, max(value ->> 1) AS at FROM json_each(?1)
                       GROUP BY 1) AS d
                 WHERE k.id = d.id AND (k.last_used_at IS NULL OR k.last_used_at < d.at)",
            )
            .bind::<Text, _>(used)
            .execute(conn)
            .map(|_| ())
            .map_err(db("API key"))
        })
        .await
    }

    async fn api_keys_retired_since(
        &self,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<ApiKeyId>, RepoError> {
        let (since, now) = (ts(since), ts(now));
        self.run("API key", move |conn| {
            let ids: Vec<String> = eco_api_keys::table
                .filter(
                    eco_api_keys::revoked_at
                        .ge(since.clone())
                        .or(eco_api_keys::expires_at.between(since, now)),
                )
                .select(eco_api_keys::id)
                .load(conn)
                .map_err(db("API key"))?;
            Ok(ids.into_iter().map(ApiKeyId::from_stored).collect())
        })
        .await
    }

    async fn delete_api_key(&self, user_id: &UserId, key_id: &ApiKeyId) -> Result<bool, RepoError> {
        let (user_id, key_id) = (user_id.to_string(), key_id.to_string());
        self.run("API key", move |conn| {
            let deleted = diesel::delete(
                eco_api_keys::table
                    .filter(eco_api_keys::id.eq(key_id))
                    .filter(eco_api_keys::user_id.eq(user_id)),
            )
            .execute(conn)
            .map_err(db("API key"))?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn api_keys_deleted_after(&self, after: i64) -> Result<DeletedKeys, RepoError> {
        self.run("API key", move |conn| {
            let rows: Vec<(i64, String)> = eco_deleted_keys::table
                .filter(eco_deleted_keys::seq.gt(after))
                .order(eco_deleted_keys::seq)
                .select((eco_deleted_keys::seq, eco_deleted_keys::key_id))
                .load(conn)
                .map_err(db("API key"))?;
            Ok(deleted_keys(rows, after))
        })
        .await
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many of `ids` exist in `table` (a constant table name, never input). The ids go
/// in as one JSON array: a batch may name more users or keys than SQLite allows bound
/// parameters in one statement (32,766).
fn count_existing(
    conn: &mut SqliteConnection,
    table: &'static str,
    ids: &[String],
) -> diesel::QueryResult<i64> {
    let sql =
        format!("SELECT count(*) AS n FROM {table} WHERE id IN (SELECT value FROM json_each(?1))");
    let ids = serde_json::to_string(ids)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    Ok(diesel::sql_query(sql)
        .bind::<Text, _>(ids)
        .get_result::<Count>(conn)?
        .n)
}

#[derive(QueryableByName)]
struct InsertedEvent {
    #[diesel(sql_type = Text)]
    event_id: String,
}

/// One multi-row INSERT for `rows`, returning the ids of the rows actually inserted
/// (diesel's batch insert with RETURNING runs row by row on SQLite).
fn insert_events(
    rows: &[NewUsageRow],
) -> diesel::query_builder::BoxedSqlQuery<'_, diesel::sqlite::Sqlite, diesel::query_builder::SqlQuery>
{
    // OR IGNORE rather than ON CONFLICT DO NOTHING: the same for the one constraint a row
    // can break here (a replayed event_id; every column is given), and a statement that
    // cannot abort half-way needs no statement journal (a copy of every page it changes).
    // A CHECK added to eco_api_usage would make OR IGNORE skip rows that break it, and
    // the batch would count them as replays: check such values here instead.
    let mut sql = String::from(
        "INSERT OR IGNORE INTO eco_api_usage (event_id, user_id, api_key_id, endpoint, \
         method, status_code, response_time_ms, created_at) VALUES ",
    );
    for i in 0..rows.len() {
        sql.push_str(if i == 0 {
            "(?, ?, ?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?, ?, ?)"
        });
    }
    sql.push_str(" RETURNING event_id");
    let mut query = diesel::sql_query(sql).into_boxed::<diesel::sqlite::Sqlite>();
    for r in rows {
        query = query
            .bind::<Text, _>(&r.event_id)
            .bind::<Text, _>(&r.user_id)
            .bind::<Text, _>(&r.api_key_id)
            .bind::<Text, _>(&r.endpoint)
            .bind::<Text, _>(&r.method)
            .bind::<diesel::sql_types::Integer, _>(r.status_code)
            .bind::<diesel::sql_types::Integer, _>(r.response_time_ms)
            .bind::<Text, _>(&r.created_at);
    }
    query
}

/// Adds a batch's inserted events to every (user, period) counter it touches, in one
/// statement whatever the number of users: `?1` is a JSON array of
/// `[user, period start, period end, calls, included or null]`.
const UPSERT_COUNTERS: &str = "\
INSERT INTO eco_usage_records
    (user_id, period_start, period_end, api_calls, overage_calls, included_calls, updated_at)
SELECT d.value ->> 0, d.value ->> 1, d.value ->> 2, d.value ->> 3,
       CASE WHEN d.value ->> 4 IS NULL THEN 0 ELSE MAX(0, (d.value ->> 3) - (d.value ->> 4)) END,
       d.value ->> 4, ?2
FROM json_each(?1) AS d WHERE true
ON CONFLICT (user_id, period_start) DO UPDATE SET
    api_calls = api_calls + excluded.api_calls,
    overage_calls = CASE WHEN excluded.included_calls IS NULL THEN 0
        ELSE MAX(0, api_calls + excluded.api_calls - excluded.included_calls) END,
    included_calls = excluded.included_calls,
    updated_at = excluded.updated_at";

#[async_trait]
impl UsageRepository for SqliteStore {
    async fn record_usage(
        &self,
        events: &[UsageEvent],
        included: &IncludedCalls,
    ) -> Result<RecordOutcome, RepoError> {
        if events.is_empty() {
            return Ok(RecordOutcome::default());
        }
        let rows: Vec<NewUsageRow> = events
            .iter()
            .map(|e| NewUsageRow {
                event_id: e.event_id.hyphenated().to_string(),
                user_id: e.user_id.to_string(),
                api_key_id: e.api_key_id.to_string(),
                endpoint: e.endpoint.clone(),
                method: e.method.clone(),
                status_code: i32::from(e.status_code),
                response_time_ms: i32::try_from(e.response_time_ms).unwrap_or(i32::MAX),
                created_at: ts(e.created_at),
            })
            .collect();
        // Who and when of each event, to count the rows that were actually inserted.
        let origin: HashMap<String, (UserId, OffsetDateTime)> = rows
            .iter()
            .zip(events)
            .map(|(row, e)| (row.event_id.clone(), (e.user_id.clone(), e.created_at)))
            .collect();
        let included = included.clone();
        let total = events.len() as u64;
        let (users, keys) = distinct_references(events);
        let inserted = self
            .run("user or API key", move |conn| {
                conn.batch_execute(&format!("PRAGMA cache_size = -{USAGE_WRITE_CACHE_KIB}"))
                    .map_err(db("usage event"))?;
                // IMMEDIATE takes the write lock up front: no lock upgrade to fail midway.
                let written = conn.immediate_transaction(|conn| {
                    // The events table has no foreign keys (two lookups a row); check the
                    // batch's users and keys once instead.
                    if count_existing(conn, "eco_users", &users)? != users.len() as i64 {
                        return Err(BatchError::Missing("user"));
                    }
                    if count_existing(conn, "eco_api_keys", &keys)? != keys.len() as i64 {
                        return Err(BatchError::Missing("API key"));
                    }
                    // Multi-row inserts; RETURNING names the rows actually inserted, so
                    // replayed events are neither stored nor counted again.
                    let mut inserted = Vec::with_capacity(rows.len());
                    for chunk in rows.chunks(SQLITE_INSERT_CHUNK) {
                        let ids: Vec<InsertedEvent> = insert_events(chunk).load(conn)?;
                        inserted
                            .extend(ids.iter().filter_map(|r| origin.get(&r.event_id).cloned()));
                    }
                    let count = inserted.len() as u64;
                    let now = OffsetDateTime::now_utc();
                    // Calls of a day that has ended (or ends within the margin) mark it:
                    // its aggregate, if any, is no longer current.
                    let cutoff = late_write_cutoff(now);
                    let late_days: std::collections::BTreeSet<Date> = inserted
                        .iter()
                        .filter(|(_, at)| *at < cutoff)
                        .map(|(_, at)| at.date())
                        .collect();
                    for day in late_days {
                        diesel::sql_query(
                            "INSERT INTO eco_usage_days (date, late_writes) VALUES (?1, 1)
                             ON CONFLICT (date) DO UPDATE SET late_writes = late_writes + 1",
                        )
                        .bind::<Text, _>(date_text(day))
                        .execute(conn)?;
                    }
                    let deltas = counter_deltas(inserted, &included);
                    if !deltas.is_empty() {
                        let rows: Vec<serde_json::Value> = deltas
                            .iter()
                            .map(|d| {
                                serde_json::json!([
                                    d.user_id.as_str(),
                                    ts(d.period.start()),
                                    ts(d.period.end()),
                                    d.calls,
                                    d.included
                                ])
                            })
                            .collect();
                        diesel::sql_query(UPSERT_COUNTERS)
                            .bind::<Text, _>(serde_json::Value::Array(rows).to_string())
                            .bind::<Text, _>(ts(now))
                            .execute(conn)?;
                    }
                    Ok(count)
                });
                // The batch is committed (or not) whatever this gives: a connection left
                // with the larger cache only holds more pages.
                if let Err(e) = conn.batch_execute(&format!("PRAGMA cache_size = -{CACHE_KIB}")) {
                    tracing::warn!(error = %e, "could not shrink the page cache after a usage batch");
                }
                written.map_err(|e| e.into_repo("user or API key"))
            })
            .await?;
        Ok(RecordOutcome {
            inserted,
            duplicates: total - inserted,
        })
    }

    async fn usage_record(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<Option<UsageRecord>, RepoError> {
        let (user_id, start) = (user_id.to_string(), ts(period_start));
        self.run("usage record", move |conn| {
            eco_usage_records::table
                .filter(eco_usage_records::user_id.eq(user_id))
                .filter(eco_usage_records::period_start.eq(start))
                .select(UsageRecordRow::as_select())
                .first(conn)
                .optional()
                .map_err(db("usage record"))?
                .map(UsageRecordRow::into_domain)
                .transpose()
        })
        .await
    }

    async fn endpoint_stats(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<EndpointStats>, RepoError> {
        let (user_id, from, to) = (user_id.to_string(), ts(from), ts(to));
        self.run("usage event", move |conn| {
            let rows: Vec<EndpointStatsRow> = diesel::sql_query(
                "SELECT endpoint, method, count(*) AS calls,
                        sum(status_code >= 400) AS error_calls,
                        sum(response_time_ms) AS total_ms
                 FROM eco_api_usage
                 WHERE user_id = ?1 AND created_at >= ?2 AND created_at < ?3
                 GROUP BY endpoint, method
                 ORDER BY calls DESC, endpoint, method",
            )
            .bind::<Text, _>(user_id)
            .bind::<Text, _>(from)
            .bind::<Text, _>(to)
            .load(conn)
            .map_err(db("usage event"))?;
            Ok(rows
                .into_iter()
                .map(EndpointStatsRow::into_domain)
                .collect())
        })
        .await
    }

    async fn count_usage_events(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        let (user_id, from, to) = (user_id.to_string(), ts(from), ts(to));
        self.run("usage event", move |conn| {
            let n: i64 = eco_api_usage::table
                .filter(eco_api_usage::user_id.eq(user_id))
                .filter(eco_api_usage::created_at.ge(from))
                .filter(eco_api_usage::created_at.lt(to))
                .count()
                .get_result(conn)
                .map_err(db("usage event"))?;
            Ok(to_u64(n))
        })
        .await
    }

    async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), RepoError> {
        if letters.is_empty() {
            return Ok(());
        }
        let letters = dead_letters_json(letters);
        self.run("dead letter", move |conn| {
            diesel::sql_query(
                "INSERT INTO eco_usage_dead_letters (event_id, user_id, api_key_id, endpoint,
                     method, status_code, response_time_ms, created_at, included_calls, reason,
                     failed_at)
                 SELECT value ->> 'event_id', value ->> 'user_id', value ->> 'api_key_id',
                        value ->> 'endpoint', value ->> 'method', value ->> 'status_code',
                        value ->> 'response_time_ms', value ->> 'created_at',
                        value ->> 'included_calls', value ->> 'reason', value ->> 'failed_at'
                 FROM json_each(?1) WHERE true
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind::<Text, _>(letters)
            .execute(conn)
            .map(|_| ())
            .map_err(db("dead letter"))
        })
        .await
    }

    async fn dead_letters(
        &self,
        after: Option<uuid::Uuid>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, RepoError> {
        let after = after.map(|id| id.to_string()).unwrap_or_default();
        self.run("dead letter", move |conn| {
            let rows: Vec<DeadLetterRow> = diesel::sql_query(
                "SELECT event_id, user_id, api_key_id, endpoint, method, status_code,
                        response_time_ms, created_at, included_calls, reason, failed_at
                 FROM eco_usage_dead_letters WHERE event_id > ?1 ORDER BY event_id LIMIT ?2",
            )
            .bind::<Text, _>(after)
            .bind::<BigInt, _>(i64::from(limit))
            .load(conn)
            .map_err(db("dead letter"))?;
            rows.into_iter().map(DeadLetterRow::into_domain).collect()
        })
        .await
    }

    async fn remove_dead_letters(&self, event_ids: &[uuid::Uuid]) -> Result<u64, RepoError> {
        let ids: Vec<String> = event_ids.iter().map(ToString::to_string).collect();
        self.run("dead letter", move |conn| {
            let mut removed = 0;
            for id in &ids {
                removed +=
                    diesel::sql_query("DELETE FROM eco_usage_dead_letters WHERE event_id = ?1")
                        .bind::<Text, _>(id)
                        .execute(conn)
                        .map_err(db("dead letter"))?;
            }
            Ok(removed as u64)
        })
        .await
    }

    async fn prepare_usage_storage(
        &self,
        _now: OffsetDateTime,
        _months_ahead: u32,
    ) -> Result<Vec<String>, RepoError> {
        // One table: nothing to prepare.
        Ok(Vec::new())
    }

    async fn prune_usage(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<UsagePrune, RepoError> {
        let bound = before;
        let before = ts(before);
        let mut outcome = UsagePrune {
            before: bound,
            rows: 0,
            partitions: Vec::new(),
        };
        if dry_run {
            outcome.rows = self
                .run("usage event", move |conn| {
                    let n: i64 = eco_api_usage::table
                        .filter(eco_api_usage::created_at.lt(before))
                        .count()
                        .get_result(conn)
                        .map_err(db("usage event"))?;
                    Ok(to_u64(n))
                })
                .await?;
            return Ok(outcome);
        }
        // One short write transaction per batch: writers get the lock between batches.
        loop {
            let before = before.clone();
            let deleted = self
                .run("usage event", move |conn| {
                    diesel::sql_query(
                        "DELETE FROM eco_api_usage WHERE rowid IN (
                             SELECT rowid FROM eco_api_usage WHERE created_at < ?1 LIMIT ?2)",
                    )
                    .bind::<Text, _>(before)
                    .bind::<BigInt, _>(SQLITE_DELETE_BATCH)
                    .execute(conn)
                    .map_err(db("usage event"))
                })
                .await?;
            outcome.rows += deleted as u64;
            if (deleted as i64) < SQLITE_DELETE_BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Recorded once everything before it is gone (see the PostgreSQL store).
        self.run("usage retention", move |conn| {
            diesel::sql_query(
                "INSERT INTO eco_usage_retention (id, pruned_before) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE
                 SET pruned_before = max(pruned_before, excluded.pruned_before)",
            )
            .bind::<Text, _>(before)
            .execute(conn)
            .map_err(db("usage retention"))
        })
        .await?;
        Ok(outcome)
    }

    async fn usage_events_page(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        after: Option<(OffsetDateTime, uuid::Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, RepoError> {
        use self::schema::eco_api_usage::dsl as u;
        let (user_id, from, to) = (user_id.to_string(), ts(from), ts(to));
        let after = after.map(|(at, id)| (ts(at), id.to_string()));
        self.run("usage event", move |conn| {
            let mut query = u::eco_api_usage
                .filter(u::user_id.eq(user_id))
                .filter(u::created_at.ge(from))
                .filter(u::created_at.lt(to))
                .into_boxed();
            if let Some((at, id)) = after {
                // `<= at` bounds the index scan; the rest orders ties by event id.
                query = query
                    .filter(u::created_at.le(at.clone()))
                    .filter(u::created_at.lt(at).or(u::event_id.lt(id)));
            }
            let rows: Vec<EventTuple<String, String>> = query
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
                .load(conn)
                .map_err(db("usage event"))?;
            rows.into_iter()
                .map(|(id, user, key, endpoint, method, status, ms, at)| {
                    let id = uuid::Uuid::parse_str(&id).map_err(|e| {
                        RepoError::Backend(format!("bad stored event id {id:?}: {e}"))
                    })?;
                    Ok(event_from_columns(
                        id,
                        (user, key, endpoint, method),
                        (status, ms),
                        parse_ts(&at)?,
                    ))
                })
                .collect()
        })
        .await
    }
}

#[derive(QueryableByName)]
struct DeadLetterRow {
    #[diesel(sql_type = Text)]
    event_id: String,
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
    #[diesel(sql_type = Text)]
    created_at: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    included_calls: Option<i64>,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = Text)]
    failed_at: String,
}

impl DeadLetterRow {
    fn into_domain(self) -> Result<DeadLetter, RepoError> {
        Ok(DeadLetter {
            event: UsageEvent {
                event_id: uuid::Uuid::parse_str(&self.event_id)
                    .map_err(|e| RepoError::Backend(format!("bad stored event id: {e}")))?,
                user_id: UserId::from_stored(self.user_id),
                api_key_id: ApiKeyId::from_stored(self.api_key_id),
                endpoint: self.endpoint,
                method: self.method,
                status_code: u16::try_from(self.status_code).unwrap_or(0),
                response_time_ms: u32::try_from(self.response_time_ms).unwrap_or(0),
                created_at: parse_ts(&self.created_at)?,
            },
            included_calls: self.included_calls.map(to_u64),
            reason: self.reason,
            failed_at: parse_ts(&self.failed_at)?,
        })
    }
}

/// Creates a missing counter from the period's stored calls; see the PostgreSQL twin.
const SEED_QUOTA_COUNTER: &str = "\
INSERT INTO eco_quota_counters (user_id, period_start, admitted)
SELECT ?1, ?2, COALESCE(
    (SELECT api_calls FROM eco_usage_records WHERE user_id = ?1 AND period_start = ?2), 0)
ON CONFLICT (user_id, period_start) DO NOTHING";

/// Adds ?3, then leases (max ?4, cap ?5, share ?6); see the PostgreSQL twin.
const TAKE_QUOTA: &str = "\
UPDATE eco_quota_counters SET
    last_taken = MIN(?4, MAX(1, (?5 - (admitted + ?3)) / ?6), MAX(0, ?5 - (admitted + ?3))),
    admitted = admitted + ?3
        + MIN(?4, MAX(1, (?5 - (admitted + ?3)) / ?6), MAX(0, ?5 - (admitted + ?3)))
WHERE user_id = ?1 AND period_start = ?2
RETURNING last_taken AS taken, admitted AS n";

const APPLY_QUOTA_DELTA: &str = "\
UPDATE eco_quota_counters SET admitted = MAX(0, admitted + ?3)
WHERE user_id = ?1 AND period_start = ?2
RETURNING admitted AS n";

fn seed_quota_counter(
    conn: &mut SqliteConnection,
    user_id: &str,
    period: &str,
) -> QueryResult<usize> {
    diesel::sql_query(SEED_QUOTA_COUNTER)
        .bind::<Text, _>(user_id)
        .bind::<Text, _>(period)
        .execute(conn)
}

#[async_trait]
impl QuotaCounterRepository for SqliteStore {
    async fn quota_count(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
    ) -> Result<u64, RepoError> {
        let (user_id, period) = (user_id.to_string(), ts(period_start));
        self.run("quota counter", move |conn| {
            seed_quota_counter(conn, &user_id, &period).map_err(db("quota counter"))?;
            let row: CountRow = diesel::sql_query(
                "SELECT admitted AS n FROM eco_quota_counters WHERE user_id = ?1 AND period_start = ?2",
            )
            .bind::<Text, _>(&user_id)
            .bind::<Text, _>(&period)
            .get_result(conn)
            .map_err(db("quota counter"))?;
            Ok(to_u64(row.n))
        })
        .await
    }

    async fn take_quota(
        &self,
        user_id: &UserId,
        period_start: OffsetDateTime,
        add: u64,
        lease: LeaseTerms,
    ) -> Result<QuotaTake, RepoError> {
        let (user_id, period) = (user_id.to_string(), ts(period_start));
        let (max, cap, share) = lease_binds(lease);
        self.run("quota counter", move |conn| {
            conn.immediate_transaction(|conn| {
                seed_quota_counter(conn, &user_id, &period)?;
                let row: QuotaTakeRow = diesel::sql_query(TAKE_QUOTA)
                    .bind::<Text, _>(&user_id)
                    .bind::<Text, _>(&period)
                    .bind::<BigInt, _>(to_i64(add))
                    .bind::<BigInt, _>(max)
                    .bind::<BigInt, _>(cap)
                    .bind::<BigInt, _>(share)
                    .get_result(conn)?;
                Ok(row.into_domain())
            })
            .map_err(db("quota counter"))
        })
        .await
    }

    async fn counters_below_stored(
        &self,
        period_start: OffsetDateTime,
    ) -> Result<Vec<(UserId, u64)>, RepoError> {
        let period = ts(period_start);
        self.run("quota counter", move |conn| {
            let rows: Vec<StoredCallsRow> = diesel::sql_query(COUNTERS_BELOW_STORED)
                .bind::<Text, _>(period)
                .load(conn)
                .map_err(db("quota counter"))?;
            Ok(rows.into_iter().map(StoredCallsRow::into_pair).collect())
        })
        .await
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
        let floors = serde_json::Value::Array(
            users
                .iter()
                .zip(&floors)
                .map(|(user, floor)| serde_json::json!([user, floor]))
                .collect(),
        )
        .to_string();
        let period = ts(period_start);
        self.run("quota counter", move |conn| {
            let raised = diesel::sql_query(
                "UPDATE eco_quota_counters SET admitted = d.floor
                 FROM (SELECT value ->> 0 AS user_id, value ->> 1 AS floor FROM json_each(?2)) AS d
                 WHERE eco_quota_counters.user_id = d.user_id
                   AND eco_quota_counters.period_start = ?1
                   AND eco_quota_counters.admitted < d.floor",
            )
            .bind::<Text, _>(period)
            .bind::<Text, _>(floors)
            .execute(conn)
            .map_err(db("quota counter"))?;
            Ok(raised as u64)
        })
        .await
    }

    async fn apply_quota_deltas(&self, deltas: &[QuotaDelta]) -> Result<Vec<u64>, RepoError> {
        if deltas.is_empty() {
            return Ok(Vec::new());
        }
        let deltas: Vec<(String, String, i64)> = deltas
            .iter()
            .map(|d| (d.user_id.to_string(), ts(d.period_start), d.delta))
            .collect();
        self.run("quota counter", move |conn| {
            conn.immediate_transaction(|conn| {
                let mut counts = Vec::with_capacity(deltas.len());
                for (user_id, period, delta) in &deltas {
                    seed_quota_counter(conn, user_id, period)?;
                    let row: CountRow = diesel::sql_query(APPLY_QUOTA_DELTA)
                        .bind::<Text, _>(user_id)
                        .bind::<Text, _>(period)
                        .bind::<BigInt, _>(*delta)
                        .get_result(conn)?;
                    counts.push(to_u64(row.n));
                }
                Ok(counts)
            })
            .map_err(db("quota counter"))
        })
        .await
    }
}

#[async_trait]
impl DailyUsageRepository for SqliteStore {
    async fn aggregate_usage_day(&self, date: Date, now: OffsetDateTime) -> Result<u64, RepoError> {
        let rebuild = format!(
            "WITH per_endpoint AS (
                SELECT user_id, endpoint, method, count(*) AS calls,
                       sum(status_code >= 400) AS errors,
                       sum(response_time_ms) AS total_ms
                FROM eco_api_usage
                WHERE created_at >= ?2 AND created_at < ?3
                GROUP BY user_id, endpoint, method
            ), ranked AS (
                SELECT *, row_number() OVER (
                    PARTITION BY user_id ORDER BY calls DESC, endpoint, method) AS rank
                FROM per_endpoint
            )
            INSERT INTO eco_usage_daily (user_id, date, api_calls, error_calls,
                total_response_time_ms, avg_response_time_ms, top_endpoints, updated_at)
            SELECT user_id, ?1, sum(calls), sum(errors), sum(total_ms),
                   CAST(sum(total_ms) AS REAL) / sum(calls),
                   json_group_array(json_object('endpoint', endpoint, 'method', method,
                                                'calls', calls) ORDER BY rank)
                       FILTER (WHERE rank <= {TOP_ENDPOINTS}),
                   ?4
            FROM ranked
            GROUP BY user_id"
        );
        let start = date.midnight().assume_utc();
        let (day, from, to, now) = (
            date_text(date),
            ts(start),
            ts(start + time::Duration::days(1)),
            ts(now),
        );
        // A day that has ended is recorded as aggregated and current; one write
        // transaction, so no late write can fall between the rebuild and the mark.
        let ended = date < OffsetDateTime::now_utc().date();
        let fold = self
            .usage_pruned_before()
            .await?
            .is_some_and(|bound| date < bound.date());
        let fold_filter = foldable("?5");
        let fold_sql = format!(
            "INSERT INTO eco_usage_daily (user_id, date, api_calls, error_calls,
                total_response_time_ms, avg_response_time_ms, top_endpoints, updated_at)
             SELECT user_id, ?1, count(*), sum(status_code >= 400), sum(response_time_ms),
                    CAST(sum(response_time_ms) AS REAL) / count(*), '[]', ?4
             FROM eco_api_usage WHERE created_at >= ?2 AND created_at < ?3 AND {fold_filter}
             GROUP BY user_id
             {FOLD_INTO_DAILY}"
        );
        let period = ts(BillingPeriod::containing(start).start());
        self.run("usage event", move |conn| {
            conn.immediate_transaction(|conn| {
                if !fold {
                    diesel::delete(eco_usage_daily::table.filter(eco_usage_daily::date.eq(&day)))
                        .execute(conn)?;
                }
                let users = if fold {
                    let users = diesel::sql_query(&fold_sql)
                        .bind::<Text, _>(&day)
                        .bind::<Text, _>(&from)
                        .bind::<Text, _>(&to)
                        .bind::<Text, _>(&now)
                        .bind::<Text, _>(&period)
                        .execute(conn)?;
                    // Retention removed the day's events: the late ones, now counted, go too.
                    diesel::sql_query(format!(
                        "DELETE FROM eco_api_usage
                         WHERE created_at >= ?1 AND created_at < ?2 AND {}",
                        foldable("?3")
                    ))
                    .bind::<Text, _>(&from)
                    .bind::<Text, _>(&to)
                    .bind::<Text, _>(&period)
                    .execute(conn)?;
                    users
                } else {
                    diesel::sql_query(&rebuild)
                        .bind::<Text, _>(&day)
                        .bind::<Text, _>(&from)
                        .bind::<Text, _>(&to)
                        .bind::<Text, _>(&now)
                        .execute(conn)?
                };
                if ended {
                    diesel::sql_query(
                        "INSERT INTO eco_usage_days (date, late_writes, aggregated_writes,
                                                     aggregated_at) VALUES (?1, 0, 0, ?2)
                         ON CONFLICT (date) DO UPDATE SET aggregated_writes = late_writes,
                                                          aggregated_at = ?2",
                    )
                    .bind::<Text, _>(&day)
                    .bind::<Text, _>(&now)
                    .execute(conn)?;
                    diesel::sql_query(admin_sql::sqlite_params(DAY_TOTALS))
                        .bind::<Text, _>(&day)
                        .execute(conn)?;
                }
                Ok(users)
            })
            .map(|users| users as u64)
            .map_err(db("usage event"))
        })
        .await
    }

    async fn daily_usage(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError> {
        let (user_id, from, to) = (user_id.to_string(), date_text(from), date_text(to));
        self.run("daily usage", move |conn| {
            eco_usage_daily::table
                .filter(eco_usage_daily::user_id.eq(user_id))
                .filter(eco_usage_daily::date.between(from, to))
                .order(eco_usage_daily::date.asc())
                .select(DailyRow::as_select())
                .load(conn)
                .map_err(db("daily usage"))?
                .into_iter()
                .map(DailyRow::into_domain)
                .collect()
        })
        .await
    }

    async fn aggregated_days(&self, from: Date, to: Date) -> Result<Vec<Date>, RepoError> {
        let (from, to) = (date_text(from), date_text(to));
        self.run("usage day", move |conn| {
            let days: Vec<DayText> = diesel::sql_query(
                "SELECT date FROM eco_usage_days
                 WHERE date BETWEEN ?1 AND ?2 AND aggregated_writes = late_writes ORDER BY date",
            )
            .bind::<Text, _>(from)
            .bind::<Text, _>(to)
            .load(conn)
            .map_err(db("usage day"))?;
            days.iter().map(|d| parse_date(&d.date)).collect()
        })
        .await
    }

    async fn daily_usage_from_events(
        &self,
        user_id: &UserId,
        from: Date,
        to: Date,
    ) -> Result<Vec<DailyUsage>, RepoError> {
        let user = user_id.clone();
        let (from, to) = (
            ts(from.midnight().assume_utc()),
            ts(to.midnight().assume_utc() + time::Duration::days(1)),
        );
        self.run("usage event", move |conn| {
            let rows: Vec<RawDayRow> = diesel::sql_query(
                "SELECT substr(created_at, 1, 10) AS date, count(*) AS calls,
                        sum(status_code >= 400) AS errors,
                        coalesce(sum(response_time_ms), 0) AS total_ms
                 FROM eco_api_usage
                 WHERE user_id = ?1 AND created_at >= ?2 AND created_at < ?3
                 GROUP BY 1 ORDER BY 1",
            )
            .bind::<Text, _>(user.as_str())
            .bind::<Text, _>(from)
            .bind::<Text, _>(to)
            .load(conn)
            .map_err(db("usage event"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(raw_day(
                        &user,
                        parse_date(&r.date)?,
                        r.calls,
                        r.errors,
                        r.total_ms,
                    ))
                })
                .collect()
        })
        .await
    }

    async fn usage_pruned_before(&self) -> Result<Option<OffsetDateTime>, RepoError> {
        let bound: Option<String> = self
            .run("usage retention", |conn| {
                eco_usage_retention::table
                    .select(eco_usage_retention::pruned_before)
                    .first(conn)
                    .optional()
                    .map_err(db("usage retention"))
            })
            .await?;
        parse_ts_opt(bound)
    }

    async fn first_usage_day(&self) -> Result<Option<Date>, RepoError> {
        self.run("usage event", move |conn| {
            let first: Option<String> = eco_api_usage::table
                .select(diesel::dsl::min(eco_api_usage::created_at))
                .first(conn)
                .map_err(db("usage event"))?;
            first
                .as_deref()
                .map(|t| parse_ts(t).map(|t| t.date()))
                .transpose()
        })
        .await
    }
}

#[derive(QueryableByName)]
struct DayText {
    #[diesel(sql_type = Text)]
    date: String,
}

#[derive(QueryableByName)]
struct RawDayRow {
    #[diesel(sql_type = Text)]
    date: String,
    #[diesel(sql_type = BigInt)]
    calls: i64,
    #[diesel(sql_type = BigInt)]
    errors: i64,
    #[diesel(sql_type = BigInt)]
    total_ms: i64,
}

#[async_trait]
impl OverageChargeRepository for SqliteStore {
    async fn create_overage_charge(
        &self,
        charge: &NewOverageCharge,
    ) -> Result<OverageCharge, RepoError> {
        let row = NewChargeRow {
            user_id: charge.user_id.to_string(),
            period_start: ts(charge.period_start),
            calls_from: to_i64(charge.calls_from),
            calls_to: to_i64(charge.calls_to),
            amount_cents: charge.amount_cents,
            idempotency_key: charge.idempotency_key.clone(),
            status: ChargeStatus::Pending.as_str(),
            created_at: ts(charge.created_at),
            updated_at: ts(charge.created_at),
        };
        self.run("user", move |conn| {
            diesel::insert_into(eco_overage_charges::table)
                .values(row)
                .returning(ChargeRow::as_returning())
                .get_result(conn)
                .map_err(db("user"))?
                .into_domain()
        })
        .await
    }

    async fn overage_charge_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<OverageCharge>, RepoError> {
        let key = idempotency_key.to_owned();
        self.run("overage charge", move |conn| {
            eco_overage_charges::table
                .filter(eco_overage_charges::idempotency_key.eq(key))
                .select(ChargeRow::as_select())
                .first(conn)
                .optional()
                .map_err(db("overage charge"))?
                .map(ChargeRow::into_domain)
                .transpose()
        })
        .await
    }

    async fn complete_overage_charge(
        &self,
        id: i64,
        stripe_invoice_item_id: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let (item, at) = (stripe_invoice_item_id.map(str::to_owned), ts(at));
        self.run("overage charge", move |conn| {
            conn.immediate_transaction(|conn| {
                let charge: ChargeRow = diesel::update(c::eco_overage_charges.find(id))
                    .set((
                        c::status.eq(ChargeStatus::Succeeded.as_str()),
                        c::stripe_invoice_item_id.eq(&item),
                        c::attempts.eq(c::attempts + 1),
                        c::last_error.eq(None::<String>),
                        c::updated_at.eq(&at),
                    ))
                    .returning(ChargeRow::as_returning())
                    .get_result(conn)?;
                diesel::sql_query(
                    "UPDATE eco_usage_records
                     SET overage_invoiced_calls = MAX(overage_invoiced_calls, ?3), updated_at = ?4
                     WHERE user_id = ?1 AND period_start = ?2",
                )
                .bind::<Text, _>(&charge.user_id)
                .bind::<Text, _>(&charge.period_start)
                .bind::<BigInt, _>(charge.calls_to)
                .bind::<Text, _>(&at)
                .execute(conn)?;
                Ok(charge)
            })
            .map_err(db("overage charge"))?
            .into_domain()
        })
        .await
    }

    async fn claim_overage_charge(
        &self,
        id: i64,
        seen_updated_at: OffsetDateTime,
        at: OffsetDateTime,
    ) -> Result<Option<OverageCharge>, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let (seen, at) = (ts(seen_updated_at), ts(at));
        self.run("overage charge", move |conn| {
            diesel::update(
                c::eco_overage_charges
                    .find(id)
                    .filter(c::status.eq(ChargeStatus::Pending.as_str()))
                    .filter(c::updated_at.eq(seen)),
            )
            .set(c::updated_at.eq(at))
            .returning(ChargeRow::as_returning())
            .get_result(conn)
            .optional()
            .map_err(db("overage charge"))?
            .map(ChargeRow::into_domain)
            .transpose()
        })
        .await
    }

    async fn note_overage_charge_attempt(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let (error, at) = (error.to_owned(), ts(at));
        self.run("overage charge", move |conn| {
            diesel::update(c::eco_overage_charges.find(id))
                .set((
                    c::attempts.eq(c::attempts + 1),
                    c::last_error.eq(error),
                    c::updated_at.eq(at),
                ))
                .returning(ChargeRow::as_returning())
                .get_result(conn)
                .map_err(db("overage charge"))?
                .into_domain()
        })
        .await
    }

    async fn fail_overage_charge(
        &self,
        id: i64,
        error: &str,
        at: OffsetDateTime,
    ) -> Result<OverageCharge, RepoError> {
        use self::eco_overage_charges::dsl as c;
        let (error, at) = (error.to_owned(), ts(at));
        self.run("overage charge", move |conn| {
            diesel::update(c::eco_overage_charges.find(id))
                .set((
                    c::status.eq(ChargeStatus::Failed.as_str()),
                    c::attempts.eq(c::attempts + 1),
                    c::last_error.eq(error),
                    c::updated_at.eq(at),
                ))
                .returning(ChargeRow::as_returning())
                .get_result(conn)
                .map_err(db("overage charge"))?
                .into_domain()
        })
        .await
    }

    async fn overage_charges_for_user(
        &self,
        user_id: &UserId,
    ) -> Result<Vec<OverageCharge>, RepoError> {
        let user_id = user_id.to_string();
        self.run("overage charge", move |conn| {
            eco_overage_charges::table
                .filter(eco_overage_charges::user_id.eq(user_id))
                .order(eco_overage_charges::id.asc())
                .select(ChargeRow::as_select())
                .load(conn)
                .map_err(db("overage charge"))?
                .into_iter()
                .map(ChargeRow::into_domain)
                .collect()
        })
        .await
    }

    async fn uninvoiced_overage(&self) -> Result<Vec<UninvoicedOverage>, RepoError> {
        self.run("usage record", |conn| {
            let rows: Vec<UninvoicedRow> = diesel::sql_query(
                "SELECT r.user_id, u.plan, u.stripe_customer_id, r.period_start, r.period_end,
                        r.overage_calls, r.overage_invoiced_calls
                 FROM eco_usage_records r JOIN eco_users u ON u.id = r.user_id
                 WHERE r.overage_calls > r.overage_invoiced_calls
                 ORDER BY r.user_id, r.period_start",
            )
            .load(conn)
            .map_err(db("usage record"))?;
            rows.into_iter().map(UninvoicedRow::into_domain).collect()
        })
        .await
    }

    async fn overage_ledger(&self) -> Result<Vec<OverageLedgerEntry>, RepoError> {
        self.run("overage charge", |conn| {
            let rows: Vec<LedgerRow> = diesel::sql_query(LEDGER_SQL)
                .load(conn)
                .map_err(db("overage charge"))?;
            rows.into_iter()
                .map(|row| {
                    let period_start = parse_ts(&row.period_start)?;
                    Ok(row
                        .counts
                        .into_entry(UserId::from_stored(row.user_id), period_start))
                })
                .collect()
        })
        .await
    }
}

#[derive(QueryableByName)]
struct UninvoicedRow {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Text)]
    plan: String,
    #[diesel(sql_type = Nullable<Text>)]
    stripe_customer_id: Option<String>,
    #[diesel(sql_type = Text)]
    period_start: String,
    #[diesel(sql_type = Text)]
    period_end: String,
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
            period_start: parse_ts(&self.period_start)?,
            period_end: parse_ts(&self.period_end)?,
            overage_calls: to_u64(self.overage_calls),
            overage_invoiced_calls: to_u64(self.overage_invoiced_calls),
        })
    }
}

#[derive(QueryableByName)]
struct LedgerRow {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Text)]
    period_start: String,
    #[diesel(embed)]
    counts: LedgerCounts,
}

#[async_trait]
impl AdminRepository for SqliteStore {
    async fn daily_totals(&self, from: Date, to: Date) -> Result<Vec<DayTotal>, RepoError> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = Text)]
            date: String,
            #[diesel(sql_type = BigInt)]
            api_calls: i64,
            #[diesel(sql_type = BigInt)]
            error_calls: i64,
        }
        let (from, to) = (date_text(from), date_text(to));
        self.run("usage day", move |conn| {
            let rows: Vec<Row> = diesel::sql_query(admin_sql::sqlite_params(DAILY_TOTALS))
                .bind::<Text, _>(&from)
                .bind::<Text, _>(&to)
                .load(conn)
                .map_err(db("usage day"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(DayTotal {
                        date: parse_date(&r.date)?,
                        api_calls: to_u64(r.api_calls),
                        error_calls: to_u64(r.error_calls),
                    })
                })
                .collect()
        })
        .await
    }

    async fn record_admin_action(&self, entry: &AdminAuditEntry) -> Result<(), RepoError> {
        let entry = entry.clone();
        self.run("audit entry", move |conn| {
            diesel::sql_query(admin_sql::sqlite_params(admin_sql::INSERT_AUDIT))
                .bind::<Text, _>(entry.admin_id.as_str())
                .bind::<Text, _>(&entry.method)
                .bind::<Text, _>(&entry.route)
                .bind::<Text, _>(&entry.params)
                .bind::<Integer, _>(i32::from(entry.status))
                .bind::<Text, _>(ts(entry.created_at))
                .execute(conn)
                .map_err(db("audit entry"))?;
            Ok(())
        })
        .await
    }

    async fn prune_admin_actions(
        &self,
        before: OffsetDateTime,
        batch: u32,
    ) -> Result<u64, RepoError> {
        let mut removed = 0;
        // One short write transaction per batch: other writers get the lock in between.
        loop {
            let n = self
                .run("audit entry", move |conn| {
                    diesel::sql_query(admin_sql::sqlite_params(admin_sql::PRUNE_AUDIT))
                        .bind::<Text, _>(ts(before))
                        .bind::<BigInt, _>(i64::from(batch.max(1)))
                        .execute(conn)
                        .map_err(db("audit entry"))
                })
                .await?;
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
        self.run("audit entry", move |conn| {
            let total: CountRow = diesel::sql_query(admin_sql::COUNT_AUDIT)
                .get_result(conn)
                .map_err(db("audit entry"))?;
            let rows: Vec<AuditRow> =
                diesel::sql_query(admin_sql::sqlite_params(admin_sql::AUDIT_PAGE))
                    .bind::<BigInt, _>(i64::from(limit))
                    .bind::<BigInt, _>(to_i64(offset))
                    .load(conn)
                    .map_err(db("audit entry"))?;
            let rows = rows
                .into_iter()
                .map(AuditRow::into_domain)
                .collect::<Result<_, _>>()?;
            Ok((to_u64(total.n), rows))
        })
        .await
    }

    async fn users_page(
        &self,
        query: &UserPageQuery,
        catalog: &PlanCatalog,
    ) -> Result<(u64, Vec<UserUsageRow>), RepoError> {
        let (query, catalog) = (query.clone(), catalog.clone());
        self.run("user", move |conn| {
            let plan = query.plan.map_or("", Plan::as_str);
            let pattern = admin_sql::contains_pattern(query.search.as_deref());
            let total: CountRow =
                diesel::sql_query(admin_sql::sqlite_params(admin_sql::COUNT_USERS))
                    .bind::<Text, _>(plan)
                    .bind::<Text, _>(&pattern)
                    .get_result(conn)
                    .map_err(db("user"))?;
            let total = to_u64(total.n);
            // A page past the end costs nothing.
            if query.offset >= total {
                return Ok((total, Vec::new()));
            }
            if query.sort != UserSort::ApiCalls {
                let sql = admin_sql::users_page(query.sort, query.descending);
                let rows = user_rows(conn, &sql, &query, &catalog, query.offset, query.limit)?;
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
            let mut rows = user_rows(conn, first, &query, &catalog, query.offset, query.limit)?;
            let first_total = if rows.is_empty() {
                let counted: CountRow =
                    diesel::sql_query(admin_sql::sqlite_params(&admin_sql::count_with_records()))
                        .bind::<Text, _>(ts(query.period_start))
                        .bind::<Text, _>(plan)
                        .bind::<Text, _>(&pattern)
                        .get_result(conn)
                        .map_err(db("user"))?;
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
                rows.extend(user_rows(conn, second, &query, &catalog, offset, limit)?);
            }
            Ok((total, rows))
        })
        .await
    }

    async fn period_figures(
        &self,
        period_start: OffsetDateTime,
        today: (OffsetDateTime, OffsetDateTime),
        (elapsed, length): (i64, i64),
        catalog: &PlanCatalog,
    ) -> Result<PeriodFigures, RepoError> {
        let catalog = catalog.clone();
        self.run("usage record", move |conn| {
            let today_calls: CountRow =
                diesel::sql_query(admin_sql::sqlite_params(admin_sql::CALLS_BETWEEN))
                    .bind::<Text, _>(ts(today.0))
                    .bind::<Text, _>(ts(today.1))
                    .get_result(conn)
                    .map_err(db("usage event"))?;
            let sums: PeriodSumsRow =
                diesel::sql_query(admin_sql::sqlite_params(admin_sql::PERIOD_SUMS))
                    .bind::<Text, _>(ts(period_start))
                    .bind::<BigInt, _>(catalog.overage_price.0)
                    .get_result(conn)
                    .map_err(db("usage record"))?;
            let extra = match projection_threshold(&catalog, (elapsed, length)) {
                None => 0,
                Some(threshold) => {
                    let row: CountRow =
                        diesel::sql_query(admin_sql::sqlite_params(admin_sql::PROJECTION_EXTRA))
                            .bind::<Text, _>(ts(period_start))
                            .bind::<BigInt, _>(catalog.overage_price.0)
                            .bind::<BigInt, _>(billed_limit(&catalog, Plan::Free))
                            .bind::<BigInt, _>(billed_limit(&catalog, Plan::Pro))
                            .bind::<BigInt, _>(billed_limit(&catalog, Plan::Enterprise))
                            .bind::<BigInt, _>(length)
                            .bind::<BigInt, _>(elapsed.max(1))
                            .bind::<BigInt, _>(threshold)
                            .get_result(conn)
                            .map_err(db("usage record"))?;
                    row.n
                }
            };
            Ok(sums.into_figures(today_calls.n, extra))
        })
        .await
    }
}

/// One page of users rows from `sql` (parameters as `admin_sql::users_page`).
fn user_rows(
    conn: &mut SqliteConnection,
    sql: &str,
    query: &UserPageQuery,
    catalog: &PlanCatalog,
    offset: u64,
    limit: u32,
) -> Result<Vec<UserUsageRow>, RepoError> {
    let rows: Vec<UserPageRow> = diesel::sql_query(admin_sql::sqlite_params(sql))
        .bind::<Text, _>(ts(query.period_start))
        .bind::<BigInt, _>(catalog.free.price.0)
        .bind::<BigInt, _>(catalog.pro.price.0)
        .bind::<BigInt, _>(catalog.enterprise.price.0)
        .bind::<BigInt, _>(catalog.overage_price.0)
        .bind::<Text, _>(query.plan.map_or("", Plan::as_str))
        .bind::<Text, _>(admin_sql::contains_pattern(query.search.as_deref()))
        .bind::<BigInt, _>(i64::from(limit))
        .bind::<BigInt, _>(to_i64(offset))
        .load(conn)
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
    #[diesel(sql_type = Text)]
    created_at: String,
}

impl AuditRow {
    fn into_domain(self) -> Result<AdminAuditEntry, RepoError> {
        Ok(AdminAuditEntry {
            id: self.id,
            admin_id: UserId::from_stored(self.admin_id),
            method: self.method,
            route: self.route,
            params: self.params,
            status: u16::try_from(self.status).unwrap_or(0),
            created_at: parse_ts(&self.created_at)?,
        })
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
    #[diesel(sql_type = Text)]
    created_at: String,
    #[diesel(sql_type = Nullable<Text>)]
    plan_subscription_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    blocked_at: Option<String>,
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
                created_at: parse_ts(&self.created_at)?,
                plan_subscription_id: self.plan_subscription_id,
                blocked_at: parse_ts_opt(self.blocked_at)?,
            },
            api_calls: to_u64(self.api_calls),
            overage_calls: to_u64(self.overage_calls),
            revenue_cents: self.revenue_cents,
        })
    }
}

crate::common::session_repository!(SqliteStore);

impl SqliteStore {
    /// Ends a session; whether it existed.
    async fn delete_session_row(&self, token_hash: &str) -> Result<bool, RepoError> {
        let token_hash = token_hash.to_owned();
        self.run("session", move |conn| {
            let n = diesel::sql_query(admin_sql::sqlite_params(session_sql::DELETE_SESSION))
                .bind::<Text, _>(&token_hash)
                .execute(conn)
                .map_err(db("session"))?;
            Ok(n > 0)
        })
        .await
    }

    /// Removes expired sessions and used or expired links; how many.
    async fn prune_session_rows(&self, now: OffsetDateTime) -> Result<u64, RepoError> {
        self.run("session", move |conn| {
            let mut removed = 0;
            for sql in [session_sql::PRUNE_SESSIONS, session_sql::PRUNE_LINKS] {
                removed += diesel::sql_query(admin_sql::sqlite_params(sql))
                    .bind::<Text, _>(ts(now))
                    .execute(conn)
                    .map_err(db("session"))? as u64;
            }
            Ok(removed)
        })
        .await
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
        let (token_hash, user_id) = (token_hash.to_owned(), user_id.clone());
        self.run("user", move |conn| {
            diesel::sql_query(admin_sql::sqlite_params(sql))
                .bind::<Text, _>(&token_hash)
                .bind::<Text, _>(user_id.as_str())
                .bind::<Text, _>(ts(created_at))
                .bind::<Text, _>(ts(expires_at))
                .execute(conn)
                .map_err(db("user"))?;
            Ok(())
        })
        .await
    }

    /// The user `sql` (`CONSUME_LINK` or `SESSION_USER`) finds for a token at `now`.
    async fn token_user(
        &self,
        sql: &'static str,
        token_hash: &str,
        now: OffsetDateTime,
    ) -> Result<Option<UserId>, RepoError> {
        let token_hash = token_hash.to_owned();
        self.run("session", move |conn| {
            let row: Option<session_sql::UserIdRow> =
                diesel::sql_query(admin_sql::sqlite_params(sql))
                    .bind::<Text, _>(&token_hash)
                    .bind::<Text, _>(ts(now))
                    .get_result(conn)
                    .optional()
                    .map_err(db("session"))?;
            Ok(row.map(|r| UserId::from_stored(r.user_id)))
        })
        .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), RepoError> {
        self.run("database", |conn| {
            conn.batch_execute("SELECT 1")
                .map_err(|e| RepoError::Unavailable(e.to_string()))
        })
        .await
    }

    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    fn pool_state(&self) -> Option<PoolState> {
        let state = self.pool.state();
        Some(PoolState {
            max: self.pool.max_size(),
            open: state.connections,
            idle: state.idle_connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn stored_timestamps_are_fixed_width_and_sort_as_time() {
        let a = datetime!(2026-11-30 23:59:59.999 UTC);
        let b = datetime!(2026-12-01 00:00 +01:00); // earlier than a
        assert_eq!(ts(a), "2026-11-30T23:59:59.999000Z");
        assert_eq!(ts(b), "2026-11-30T23:00:00.000000Z");
        assert!(ts(b) < ts(a));
        assert_eq!(parse_ts(&ts(a)).unwrap(), a);
    }
}
