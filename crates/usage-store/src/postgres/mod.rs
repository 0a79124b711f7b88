//! PostgreSQL through diesel-async and a bb8 pool.

mod partitions;

use diesel::ConnectionError;
use diesel::sql_types::Array;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::pool::SqlStore;
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
pub type PgStore = SqlStore<AsyncDieselConnectionManager<AsyncPgConnection>>;

impl PgStore {
    /// Opens a pool of up to `max_connections`, each with `statement_timeout` set, and
    /// checks that the database answers.
    pub async fn open(url: &str, options: &PoolOptions) -> Result<Self, StoreError> {
        let timeout_ms = options.statement_timeout.as_millis();
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        // Connections are opened on the runtime that opens the store, whichever runtime
        // asks for one (bb8 opens them from the caller's): a connection's driver task runs
        // where it was opened, and an actix worker's runtime ends with the server, before
        // the last batch of usage is written on the main one.
        let store_runtime = tokio::runtime::Handle::current();
        config.custom_setup = Box::new(move |url| {
            let url = url.to_owned();
            let opening = store_runtime.spawn(async move {
                let mut conn = AsyncPgConnection::establish(&url).await?;
                conn.batch_execute(&format!("SET statement_timeout = {timeout_ms}"))
                    .await
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                Ok(conn)
            });
            Box::pin(async move {
                opening
                    .await
                    .map_err(|e| ConnectionError::BadConnection(e.to_string()))?
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
            clock: options.clock.clone(),
        };
        // The driver's message alone ("error connecting to server") does not say what to check.
        store.ping().await.map_err(|e| StoreError::Connect {
            url: redact(url),
            reason: format!("{e} (is PostgreSQL running there and accepting connections?)"),
        })?;
        Ok(store)
    }
}

// What the repositories of `repositories.rs` need to know of PostgreSQL.

type This = PgStore;
type Conn = AsyncPgConnection;

const BACKEND_NAME: &str = "postgres";

/// Row locks taken in one order before a set-based update (see `apply_counter_deltas`).
const LOCK_ROWS: &str = "FOR UPDATE OF l";

/// The top endpoints of a day as one JSON array, an aggregate over `ranked`.
const TOP_ENDPOINTS_JSON: &str = "jsonb_agg(jsonb_build_object('endpoint', endpoint, \
    'method', method, 'calls', calls) ORDER BY rank)";

/// An empty JSON array of top endpoints.
const EMPTY_JSON: &str = "'[]'::jsonb";

/// The UTC day of a call.
const DAY_OF_CREATED_AT: &str = "(created_at AT TIME ZONE 'UTC')::date";

/// The statement as written: the repositories write PostgreSQL's parameters.
fn translate(sql: &str) -> String {
    sql.to_owned()
}

/// A transaction: row locks serialise what must be.
macro_rules! write_transaction {
    ($conn:expr, $body:expr) => {{
        let conn: &mut Conn = $conn;
        conn.transaction($body)
    }};
}

/// The query, its rows locked until the transaction ends.
macro_rules! for_update {
    ($query:expr) => {
        $query.for_update()
    };
}

/// The rows of JSON parameter `param` as a table `d` with `columns` (name, PostgreSQL type).
fn json_rows(param: &str, columns: &[(&str, &str)]) -> String {
    let columns: Vec<String> = columns.iter().map(|(n, t)| format!("{n} {t}")).collect();
    format!(
        "jsonb_to_recordset({param}::jsonb) AS d({})",
        columns.join(", ")
    )
}

/// Inserts a batch as one array per column, nine bind parameters whatever its size;
/// returns the ids of the rows actually inserted. Rows go in event id
/// order: one lock order for every writer, so overlapping retries cannot deadlock.
async fn insert_usage_rows(
    conn: &mut Conn,
    events: &[UsageEvent],
) -> diesel::QueryResult<Vec<InsertedEvent>> {
    let mut events: Vec<&UsageEvent> = events.iter().collect();
    events.sort_by_key(|e| e.event_id);
    let column = |f: fn(&UsageEvent) -> String| events.iter().map(|e| f(e)).collect::<Vec<_>>();
    diesel::sql_query(
        "INSERT INTO eco_api_usage (event_id, user_id, api_key_id, endpoint, method,
                                    status_code, response_time_ms, created_at, units)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::int4[], $7::int4[], $8::timestamptz[], $9::text[])
         ON CONFLICT (event_id, created_at) DO NOTHING
         RETURNING event_id",
    )
    .bind::<Array<EventId>, _>(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(column(|e| e.user_id.to_string()))
    .bind::<Array<Text>, _>(column(|e| e.api_key_id.to_string()))
    .bind::<Array<Text>, _>(column(|e| e.endpoint.clone()))
    .bind::<Array<Text>, _>(column(|e| e.method.clone()))
    .bind::<Array<Integer>, _>(
        events
            .iter()
            .map(|e| i32::from(e.status_code))
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Integer>, _>(
        events
            .iter()
            .map(|e| i32::try_from(e.response_time_ms).unwrap_or(i32::MAX))
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Stamp>, _>(events.iter().map(|e| e.created_at).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(
        events
            .iter()
            .map(|e| e.units.to_stored())
            .collect::<Vec<_>>(),
    )
    .load(conn)
    .await
}

/// Counts a batch's users and keys that exist, from one array each.
async fn count_references(
    conn: &mut Conn,
    users: &[String],
    keys: &[String],
) -> diesel::QueryResult<References> {
    diesel::sql_query(
        "SELECT (SELECT count(*) FROM eco_users WHERE id = ANY($1)) AS users,
                (SELECT count(*) FROM eco_api_keys WHERE id = ANY($2)) AS keys",
    )
    .bind::<Array<Text>, _>(users)
    .bind::<Array<Text>, _>(keys)
    .get_result(conn)
    .await
}

/// [`upsert_counters_sql`] over one array per column: five bind parameters whatever the
/// number of counters.
async fn upsert_counters(
    conn: &mut Conn,
    deltas: &[crate::common::CounterDelta],
    now: OffsetDateTime,
) -> diesel::QueryResult<usize> {
    let rows = "unnest($2::text[], $3::timestamptz[], $4::timestamptz[], $5::int8[], $6::int8[])
                AS d(user_id, period_start, period_end, calls, included)";
    diesel::sql_query(upsert_counters_sql(rows))
        .bind::<Stamp, _>(now)
        .bind::<Array<Text>, _>(
            deltas
                .iter()
                .map(|d| d.user_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Stamp>, _>(deltas.iter().map(|d| d.period.start()).collect::<Vec<_>>())
        .bind::<Array<Stamp>, _>(deltas.iter().map(|d| d.period.end()).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(deltas.iter().map(|d| d.calls).collect::<Vec<_>>())
        .bind::<Array<Nullable<BigInt>>, _>(deltas.iter().map(|d| d.included).collect::<Vec<_>>())
        .execute(conn)
        .await
}

/// Runs the statement `sql` makes of a rows source: `d(user_id, meter, <key>, quantity)`
/// over one array per column ($2 to $5, whatever the number of rows); `$1` is `now`.
async fn merge_meter_rows<K: crate::common::MeterKey>(
    conn: &mut Conn,
    sql: &(dyn Fn(&str) -> String + Sync),
    now: OffsetDateTime,
    rows: &crate::common::MeterRows<'_, K>,
) -> diesel::QueryResult<usize> {
    use crate::common::MeterKeys;
    let source = |key_type: &str| {
        sql(&format!(
            "unnest($2::text[], $3::text[], $4::{key_type}[], $5::int8[])
             AS d(user_id, meter, {}, quantity)",
            K::COLUMN
        ))
    };
    macro_rules! run {
        ($key_type:literal, $sql_type:ty, $keys:expr) => {
            diesel::sql_query(source($key_type))
                .bind::<Stamp, _>(now)
                .bind::<Array<Text>, _>(&rows.users)
                .bind::<Array<Text>, _>(&rows.meters)
                .bind::<Array<$sql_type>, _>($keys)
                .bind::<Array<BigInt>, _>(&rows.quantities)
                .execute(conn)
                .await
        };
    }
    match K::keys(&rows.keys) {
        MeterKeys::Periods(keys) => run!("timestamptz", Stamp, keys),
        MeterKeys::Days(keys) => run!("date", SqlDate, keys),
    }
}

/// Nothing to do: PostgreSQL's page cache is the server's.
async fn widen_usage_cache(_conn: &mut Conn) {}

/// Nothing to do (see `widen_usage_cache`).
async fn narrow_usage_cache(_conn: &mut Conn) {}

/// Folds a pruned day's late calls into its aggregate and removes them in one statement,
/// so that a call stored meanwhile is neither lost nor counted twice.
async fn fold_late_calls(
    conn: &mut Conn,
    date: Date,
    (start, end): (OffsetDateTime, OffsetDateTime),
    now: OffsetDateTime,
    period: OffsetDateTime,
) -> diesel::QueryResult<usize> {
    let sql = format!(
        "WITH gone AS (
            DELETE FROM eco_api_usage
            WHERE created_at >= $2 AND created_at < $3 AND {}
            RETURNING user_id, status_code, response_time_ms
        )
        {}",
        foldable("$5"),
        fold_insert("gone")
    );
    query(&sql)
        .bind::<SqlDate, _>(date)
        .bind::<Stamp, _>(start)
        .bind::<Stamp, _>(end)
        .bind::<Stamp, _>(now)
        .bind::<Stamp, _>(period)
        .execute(conn)
        .await
}

/// Creates the monthly partitions ahead.
async fn prepare_usage_storage(
    conn: &mut Conn,
    now: OffsetDateTime,
    months_ahead: u32,
) -> diesel::QueryResult<Vec<String>> {
    partitions::ensure(conn, now, months_ahead).await
}

impl PgStore {
    /// Drops whole months and deletes the rest in batches (see `partitions::prune`).
    async fn prune_usage_rows(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<UsagePrune, RepoError> {
        let mut conn = self.conn().await?;
        partitions::prune(&mut conn, before, dry_run)
            .await
            .map_err(db("usage partition"))
    }
}

include!("../repositories.rs");
