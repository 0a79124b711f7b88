//! SQLite through diesel: bundled library, WAL, busy timeout, foreign keys, a bb8 pool of
//! diesel-async's `SyncConnectionWrapper`, so that the repositories are the PostgreSQL
//! store's (`repositories.rs`), each call on a blocking thread.

mod blocking;

use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::sqlite::Sqlite;
use diesel::{Connection, SqliteConnection};
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use self::blocking::BlockingPool;
use crate::pool::SqlStore;
use crate::{PoolOptions, StoreError};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");

/// Readers run in parallel under WAL; more connections than this only wait on the
/// single writer.
const MAX_SQLITE_CONNECTIONS: u32 = 8;

/// Rows deleted per statement by retention (each statement a short write transaction).
const SQLITE_DELETE_BATCH: i64 = 5_000;

/// Bind parameters per INSERT statement, under SQLite's 32,766: eight a row (nine with
/// units), 4,000 rows of calls without units. Fewer, larger statements: at 500 rows a
/// statement, ingest of a 1,000-customer batch was 20% slower (docs/BENCHMARKS.md).
const SQLITE_INSERT_PARAMS: usize = 32_000;

/// The bind parameters of one call's row.
fn row_params(e: &UsageEvent) -> usize {
    if e.units.is_empty() { 8 } else { 9 }
}

/// Page cache of every connection (KiB).
const CACHE_KIB: u32 = 32 * 1024;

/// Page cache of a connection while it writes a batch of usage (KiB): a large batch from
/// thousands of customers dirties more index pages than `CACHE_KIB` holds, and SQLite
/// would spill them to the WAL before the commit and read them back as the batch goes
/// on (+25% stored calls/s with 10,000 customers, docs/BENCHMARKS.md). Set back to
/// `CACHE_KIB` after the batch, which frees the pages above it.
const USAGE_WRITE_CACHE_KIB: u32 = 128 * 1024;

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
pub type SqliteStore = SqlStore<AsyncDieselConnectionManager<Conn>>;

impl SqliteStore {
    /// Opens a pool on the file at `path` and checks that it answers.
    pub async fn open(path: &Path, options: &PoolOptions) -> Result<Self, StoreError> {
        let url = format!("sqlite://{}", path.display());
        let failed = |reason: String| StoreError::Connect {
            url: url.clone(),
            reason,
        };
        let busy_timeout = options.statement_timeout;
        let mut config = ManagerConfig::<Conn>::default();
        // A file does not go away under an open connection: no test query per checkout.
        config.recycling_method = RecyclingMethod::Fast;
        // Every connection runs its calls on the blocking pool of the runtime that opens
        // the store, not of the one that happens to ask for a new connection (bb8 opens
        // them from the caller's runtime): an actix worker's runtime ends with the
        // server, before the last batch of usage is written on the main one.
        let store_runtime = tokio::runtime::Handle::current();
        config.custom_setup = Box::new(move |path| {
            let path = path.to_owned();
            let runtime = store_runtime.clone();
            Box::pin(async move {
                let opened = runtime
                    .spawn_blocking(move || {
                        let mut conn = SqliteConnection::establish(&path)?;
                        conn.batch_execute(&pragmas(busy_timeout))
                            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    })
                    .await
                    .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                opened.map(|conn| {
                    SyncConnectionWrapper::with_runtime(conn, BlockingPool::new(runtime))
                })
            })
        });
        let manager = AsyncDieselConnectionManager::new_with_config(path_str(path)?, config);
        let max_connections = options.max_connections.clamp(1, MAX_SQLITE_CONNECTIONS);
        // The most recently used connection first: its page cache is the warm one (bb8's
        // default hands connections out in turn, each with a cache of its own).
        let pool = Pool::builder()
            .max_size(max_connections)
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .min_idle(Some(1))
            .connection_timeout(options.connect_timeout)
            .build(manager)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let store = Self {
            pool,
            max_connections,
            clock: options.clock.clone(),
        };
        store.ping().await.map_err(|e| failed(e.to_string()))?;
        Ok(store)
    }

    /// Deletes the calls before `before` in batches, each its own short write
    /// transaction, so that writers get the lock between them.
    async fn prune_usage_rows(
        &self,
        before: OffsetDateTime,
        dry_run: bool,
    ) -> Result<UsagePrune, RepoError> {
        let mut outcome = UsagePrune {
            meter_events: 0,
            before,
            rows: 0,
            partitions: Vec::new(),
        };
        if dry_run {
            let mut conn = self.conn().await?;
            let n: i64 = eco_api_usage::table
                .filter(eco_api_usage::created_at.lt(At(before)))
                .count()
                .get_result(&mut *conn)
                .await
                .map_err(db("usage event"))?;
            outcome.rows = to_u64(n);
            return Ok(outcome);
        }
        loop {
            let mut conn = self.conn().await?;
            let deleted = query(
                "DELETE FROM eco_api_usage WHERE rowid IN (
                     SELECT rowid FROM eco_api_usage WHERE created_at < $1 LIMIT $2)",
            )
            .bind::<Stamp, _>(before)
            .bind::<BigInt, _>(SQLITE_DELETE_BATCH)
            .execute(&mut *conn)
            .await
            .map_err(db("usage event"))?;
            outcome.rows += deleted as u64;
            if (deleted as i64) < SQLITE_DELETE_BATCH {
                return Ok(outcome);
            }
        }
    }
}

// What the repositories of `repositories.rs` need to know of SQLite.

type This = SqliteStore;
type Conn = SyncConnectionWrapper<SqliteConnection, BlockingPool>;

const BACKEND_NAME: &str = "sqlite";

/// SQLite has one writer: nothing to lock row by row.
const LOCK_ROWS: &str = "";

/// The top endpoints of a day as one JSON array, an aggregate over `ranked`.
const TOP_ENDPOINTS_JSON: &str = "json_group_array(json_object('endpoint', endpoint, \
    'method', method, 'calls', calls) ORDER BY rank)";

/// An empty JSON array of top endpoints.
const EMPTY_JSON: &str = "'[]'";

/// The UTC day of a call (times are stored as fixed-width UTC text).
const DAY_OF_CREATED_AT: &str = "substr(created_at, 1, 10)";

/// A statement written for PostgreSQL in SQLite's words: `$n` parameters as `?n`,
/// `GREATEST`/`LEAST` as the multi-argument `MAX`/`MIN`, and no `COLLATE "C"` (SQLite's
/// default collation already compares bytes).
fn translate(sql: &str) -> String {
    sql.replace('$', "?")
        .replace("GREATEST(", "MAX(")
        .replace("LEAST(", "MIN(")
        .replace(" COLLATE \"C\"", "")
}

/// A write transaction: `BEGIN IMMEDIATE` takes the write lock up front, so no read in it
/// can go stale and no lock upgrade can fail midway.
macro_rules! write_transaction {
    ($conn:expr, $body:expr) => {
        async {
            use diesel_async::TransactionManager as _;
            type Manager = diesel_async::sync_connection_wrapper::SyncTransactionManagerWrapper<
                diesel::connection::AnsiTransactionManager,
            >;
            let conn: &mut Conn = $conn;
            let body = transaction_body($body);
            conn.spawn_blocking(|c| {
                diesel::connection::AnsiTransactionManager::begin_transaction_sql(
                    c,
                    "BEGIN IMMEDIATE",
                )
            })
            .await?;
            let result = body(&mut *conn).await;
            match &result {
                Ok(_) => Manager::commit_transaction(conn).await?,
                Err(_) => Manager::rollback_transaction(conn).await?,
            }
            result
        }
    };
}

/// `body` as it is, its argument typed as a connection borrowed for the call (so that the
/// body can lend it on to each statement).
fn transaction_body<F, R, E>(body: F) -> F
where
    for<'r> F: AsyncFnOnce(&'r mut Conn) -> Result<R, E>,
{
    body
}

/// The query as is: the write transaction holds SQLite's one write lock.
macro_rules! for_update {
    ($query:expr) => {
        $query
    };
}

/// The rows of JSON parameter `param` as a table `d` with `columns` (their types are
/// PostgreSQL's; JSON's own serve here).
fn json_rows(param: &str, columns: &[(&str, &str)]) -> String {
    let columns: Vec<String> = columns
        .iter()
        .map(|(name, _)| format!("value ->> '{name}' AS {name}"))
        .collect();
    format!(
        "(SELECT {} FROM json_each({param})) AS d",
        columns.join(", ")
    )
}

/// Inserts a batch in multi-row statements, in the order the calls came (one writer: no
/// lock order to keep); returns the ids of the rows actually inserted (diesel's batch
/// insert with RETURNING runs row by row on SQLite).
///
/// All the statements run in one call on the connection's blocking thread, on the
/// connection itself: through the async wrapper each statement would be a call of its
/// own, its binds copied and its rows copied back.
async fn insert_usage_rows(
    conn: &mut Conn,
    events: &[UsageEvent],
) -> diesel::QueryResult<Vec<InsertedEvent>> {
    let events = events.to_vec();
    conn.spawn_blocking(move |conn| {
        let mut inserted = Vec::with_capacity(events.len());
        let mut rest = &events[..];
        while !rest.is_empty() {
            let mut params = 0;
            let rows = rest
                .iter()
                .take_while(|e| {
                    params += row_params(e);
                    params <= SQLITE_INSERT_PARAMS
                })
                .count()
                .max(1);
            let (chunk, after) = rest.split_at(rows);
            let stored: Vec<InsertedEvent> =
                diesel::RunQueryDsl::load(insert_usage_chunk(chunk), conn)?;
            inserted.extend(stored);
            rest = after;
        }
        Ok(inserted)
    })
    .await
}

/// One multi-row INSERT of `chunk`, returning the id of each row inserted.
fn insert_usage_chunk(
    chunk: &[UsageEvent],
) -> diesel::query_builder::BoxedSqlQuery<'_, Sqlite, diesel::query_builder::SqlQuery> {
    // OR IGNORE rather than ON CONFLICT DO NOTHING: the same for the one constraint a row
    // can break here (a replayed event_id; every column is given), and a statement that
    // cannot abort half-way needs no statement journal (a copy of every page it changes).
    // A CHECK added to eco_api_usage would make OR IGNORE skip rows that break it, and
    // the batch would count them as replays: check such values here instead.
    let mut sql = String::from(
        "INSERT OR IGNORE INTO eco_api_usage (event_id, user_id, api_key_id, endpoint, \
         method, status_code, response_time_ms, created_at, units) VALUES ",
    );
    for (i, e) in chunk.iter().enumerate() {
        sql.push_str(if i == 0 { "" } else { ", " });
        // Most calls have no units: a literal NULL spares their row a parameter.
        sql.push_str(if e.units.is_empty() {
            "(?, ?, ?, ?, ?, ?, ?, ?, NULL)"
        } else {
            "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
        });
    }
    sql.push_str(" RETURNING event_id");
    let mut statement = diesel::sql_query(sql).into_boxed::<Sqlite>();
    for e in chunk {
        statement = statement
            .bind::<EventId, _>(e.event_id)
            .bind::<Text, _>(e.user_id.as_str())
            .bind::<Text, _>(e.api_key_id.as_str())
            .bind::<Text, _>(e.endpoint.as_str())
            .bind::<Text, _>(e.method.as_str())
            .bind::<Integer, _>(i32::from(e.status_code))
            .bind::<Integer, _>(i32::try_from(e.response_time_ms).unwrap_or(i32::MAX))
            .bind::<Stamp, _>(e.created_at);
        if let Some(units) = e.units.to_stored() {
            statement = statement.bind::<Text, _>(units);
        }
    }
    statement
}

/// Counts a batch's users and keys that exist. The ids go in as JSON arrays: a batch may
/// name more of them than SQLite allows bound parameters in one statement.
async fn count_references(
    conn: &mut Conn,
    users: &[String],
    keys: &[String],
) -> diesel::QueryResult<References> {
    let ids = |ids: &[String]| serde_json::Value::from(ids.to_vec()).to_string();
    diesel::sql_query(
        "SELECT (SELECT count(*) FROM eco_users
                 WHERE id IN (SELECT value FROM json_each(?1))) AS users,
                (SELECT count(*) FROM eco_api_keys
                 WHERE id IN (SELECT value FROM json_each(?2))) AS keys",
    )
    .bind::<Text, _>(ids(users))
    .bind::<Text, _>(ids(keys))
    .get_result(conn)
    .await
}

/// [`upsert_counters_sql`] over one JSON array of `[user, start, end, calls, included]`.
async fn upsert_counters(
    conn: &mut Conn,
    deltas: &[crate::common::CounterDelta],
    now: OffsetDateTime,
) -> diesel::QueryResult<usize> {
    let rows = "(SELECT value ->> 0 AS user_id, value ->> 1 AS period_start,
                        value ->> 2 AS period_end, value ->> 3 AS calls, value ->> 4 AS included
                 FROM json_each($2)) AS d";
    let deltas = json_array(deltas.iter().map(|d| {
        serde_json::json!([
            d.user_id.as_str(),
            utc_text(d.period.start()),
            utc_text(d.period.end()),
            d.calls,
            d.included
        ])
    }));
    query(&upsert_counters_sql(rows))
        .bind::<Stamp, _>(now)
        .bind::<Text, _>(deltas)
        .execute(conn)
        .await
}

/// Runs the statement `sql` makes of a rows source: `d(user_id, meter, <key>, quantity)`
/// over one JSON array of arrays ($2); `$1` is `now`.
async fn merge_meter_rows<K: crate::common::MeterKey>(
    conn: &mut Conn,
    sql: &(dyn Fn(&str) -> String + Sync),
    now: OffsetDateTime,
    rows: &crate::common::MeterRows<'_, K>,
) -> diesel::QueryResult<usize> {
    let source = format!(
        "(SELECT value ->> 0 AS user_id, value ->> 1 AS meter, value ->> 2 AS {},
                 value ->> 3 AS quantity
          FROM json_each($2)) AS d",
        K::COLUMN
    );
    let entries: Vec<(&str, &str, String, i64)> = (0..rows.users.len())
        .map(|i| {
            (
                rows.users[i],
                rows.meters[i],
                rows.keys[i].text(),
                rows.quantities[i],
            )
        })
        .collect();
    let json = serde_json::to_string(&entries)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    query(&sql(&source))
        .bind::<Stamp, _>(now)
        .bind::<Text, _>(json)
        .execute(conn)
        .await
}

/// Gives the connection a page cache large enough for a batch of usage: a large batch
/// from thousands of customers dirties more index pages than `CACHE_KIB` holds, and SQLite
/// would spill them to the WAL before the commit and read them back as the batch goes on
/// (+25% stored calls/s with 10,000 customers, docs/BENCHMARKS.md).
async fn widen_usage_cache(conn: &mut Conn) {
    let sql = format!("PRAGMA cache_size = -{USAGE_WRITE_CACHE_KIB}");
    if let Err(e) = conn.batch_execute(&sql).await {
        tracing::warn!(error = %e, "could not widen the page cache for a usage batch");
    }
}

/// Sets the cache back to `CACHE_KIB`, which frees the pages above it. The batch is
/// committed (or not) whatever this gives: a connection left with the larger cache only
/// holds more pages.
async fn narrow_usage_cache(conn: &mut Conn) {
    let sql = format!("PRAGMA cache_size = -{CACHE_KIB}");
    if let Err(e) = conn.batch_execute(&sql).await {
        tracing::warn!(error = %e, "could not shrink the page cache after a usage batch");
    }
}

/// Folds a pruned day's late calls into its aggregate, then removes them: the write
/// transaction keeps any other writer out in between.
async fn fold_late_calls(
    conn: &mut Conn,
    date: Date,
    (start, end): (OffsetDateTime, OffsetDateTime),
    now: OffsetDateTime,
    period: OffsetDateTime,
) -> diesel::QueryResult<usize> {
    let late = format!(
        "eco_api_usage WHERE created_at >= $2 AND created_at < $3 AND {}",
        foldable("$5")
    );
    let users = query(&fold_insert(&late))
        .bind::<SqlDate, _>(date)
        .bind::<Stamp, _>(start)
        .bind::<Stamp, _>(end)
        .bind::<Stamp, _>(now)
        .bind::<Stamp, _>(period)
        .execute(&mut *conn)
        .await?;
    query(&format!(
        "DELETE FROM eco_api_usage WHERE created_at >= $1 AND created_at < $2 AND {}",
        foldable("$3")
    ))
    .bind::<Stamp, _>(start)
    .bind::<Stamp, _>(end)
    .bind::<Stamp, _>(period)
    .execute(conn)
    .await?;
    Ok(users)
}

/// One table: nothing to prepare.
async fn prepare_usage_storage(
    _conn: &mut Conn,
    _now: OffsetDateTime,
    _months_ahead: u32,
) -> diesel::QueryResult<Vec<String>> {
    Ok(Vec::new())
}

include!("../repositories.rs");

#[cfg(test)]
mod tests {
    use diesel_async::SimpleAsyncConnection;

    use super::*;

    /// An actix worker's runtime asks for new connections, then ends with the server; the
    /// last batch of usage is written on the main runtime, on those same connections.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_opened_from_a_runtime_that_ended_still_work() {
        let dir = std::env::temp_dir().join(format!("usage-sqlite-rt-{}", uuid::Uuid::now_v7()));
        let path = dir.join("usage.db");
        let url = format!("sqlite://{}", path.display());
        crate::migrate(&url).await.unwrap();
        let store = SqliteStore::open(&path, &PoolOptions::default())
            .await
            .unwrap();
        let pool = store.pool.clone();
        std::thread::spawn(move || {
            let worker = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            worker.block_on(async {
                // Three held at once: the pool opens two more, from this runtime.
                let held = [
                    pool.get_owned().await.unwrap(),
                    pool.get_owned().await.unwrap(),
                    pool.get_owned().await.unwrap(),
                ];
                drop(held);
            });
        })
        .join()
        .unwrap();
        assert!(store.pool.state().connections >= 3);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(store.pool.get_owned().await.unwrap());
        }
        for conn in &mut held {
            conn.batch_execute("SELECT 1").await.unwrap();
        }
        drop(held);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
