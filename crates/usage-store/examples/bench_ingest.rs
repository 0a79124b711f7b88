//! Ingest benchmark: how many events a second the usage tracker stores for 1, 1,000,
//! 10,000 and 100,000 distinct users, next to the raw ceiling measured in the same run:
//! the same number of rows inserted into the same table and indexes with multi-row
//! INSERTs, as many rows a transaction as the tracker's largest batch (PostgreSQL: one
//! `unnest` statement per transaction, on as many connections as the tracker writes
//! with; SQLite: 500-row VALUES statements), no application code, no counters.
//!
//! The tracker is fed as fast as it takes calls (its queue full means the producer
//! waits), so its figure is the rate the database keeps up with, steady state: every
//! event counted is stored, and the clock stops when the last one is.
//!
//! ```sh
//! just bench-ingest postgres          # scripts/bench-ingest.sh: PostgreSQL with fsync on
//! DATABASE_URL=sqlite:///tmp/i.db cargo run --release -p usage-store --example bench_ingest
//! ```
//! env: DATABASE_URL (required), EVENTS (200000 per phase), USERS ("1 1000 10000 100000"),
//! ROUNDS (3: raw then tracker, alternating; medians shown), MAX_BATCH (the server's
//! default: 20000 on PostgreSQL, 50000 on SQLite), CONCURRENCY (the server's default:
//! 4 writers on PostgreSQL, 1 on SQLite), QUEUE (the server's default: 100000, shared
//! by the writers)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use diesel::sql_types::{Array, Integer, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use time::OffsetDateTime;
use usage_core::event::new_event_id;
use usage_core::repo::{ApiKeyRecord, User};
use usage_core::tracker::{TrackedCall, TrackerConfig, UsageTracker};
use usage_core::{ApiKeyId, Plan, Store, UsageEvent, UserId};
use usage_store::PoolOptions;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Batches written at once, as the server does by default (`USAGE_FLUSH_CONCURRENCY`).
fn concurrency(url: &str) -> usize {
    let default = if url.starts_with("sqlite") { "1" } else { "4" };
    env_or("CONCURRENCY", default).parse().unwrap()
}

/// Largest batch, as the server writes them by default (`USAGE_MAX_BATCH`); the raw
/// ceiling inserts the same number of rows per transaction.
fn max_batch(url: &str) -> usize {
    let default = if url.starts_with("sqlite") {
        "50000"
    } else {
        "20000"
    };
    env_or("MAX_BATCH", default).parse().unwrap()
}

async fn seed(store: &Arc<dyn Store>, users: usize, run: &str) -> Vec<(UserId, ApiKeyId)> {
    let now = OffsetDateTime::now_utc();
    let mut ids = Vec::with_capacity(users);
    for i in 0..users {
        let user = User {
            id: UserId::generate(),
            email: format!("ingest-{run}-{i}@example.com"),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: now,
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await.unwrap();
        let key = ApiKeyRecord {
            id: ApiKeyId::generate(),
            user_id: user.id.clone(),
            name: "ingest".into(),
            prefix: "eco_live_abcd".into(),
            key_hash: format!("{run}{i:052}"),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        ids.push((user.id, key.id));
    }
    ids
}

fn events(callers: &[(UserId, ApiKeyId)], n: usize) -> Vec<UsageEvent> {
    let start = OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            let (user, key) = &callers[i % callers.len()];
            let at = start + time::Duration::microseconds(i as i64);
            UsageEvent {
                event_id: new_event_id(at),
                user_id: user.clone(),
                api_key_id: key.clone(),
                endpoint: "/api/v1/ping".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: 1,
                created_at: at,
                units: Default::default(),
            }
        })
        .collect()
}

/// Events a second the tracker stores, feeding it as fast as it takes them.
async fn tracker_rate(store: &Arc<dyn Store>, url: &str, batch: Vec<UsageEvent>) -> f64 {
    let config = TrackerConfig {
        concurrency: concurrency(url),
        max_batch: max_batch(url),
        queue_capacity: env_or("QUEUE", "100000").parse().unwrap(),
        ..TrackerConfig::default()
    };
    let (tracker, worker) = UsageTracker::start(store.clone(), store.clone(), config);
    let n = batch.len() as u64;
    let started = Instant::now();
    for event in batch {
        tracker
            .track(TrackedCall {
                event,
                included_calls: Some(100_000),
            })
            .await
            .unwrap();
    }
    let flushed = |t: &UsageTracker| {
        std::sync::atomic::AtomicU64::load(&t.stats().flushed, std::sync::atomic::Ordering::Relaxed)
    };
    while flushed(&tracker) < n {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    worker.shutdown().await;
    rate
}

/// Events a second inserted with plain multi-row INSERTs, on the same table.
async fn raw_rate(url: &str, batch: Vec<UsageEvent>) -> f64 {
    let started = Instant::now();
    let n = batch.len();
    let max_batch = max_batch(url);
    if url.starts_with("sqlite") {
        let path = url.trim_start_matches("sqlite://").to_owned();
        tokio::task::spawn_blocking(move || {
            use diesel::Connection;
            use diesel::connection::SimpleConnection;
            let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
            // The store's own pragmas while it writes a batch (WAL, NORMAL sync, 128 MiB
            // page cache).
            conn.batch_execute(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                 PRAGMA cache_size = -131072; PRAGMA temp_store = MEMORY;",
            )
                .unwrap();
            for tx in batch.chunks(max_batch) {
                let mut sql = String::from("BEGIN IMMEDIATE;");
                for rows in tx.chunks(500) {
                    sql.push_str(
                        "INSERT OR IGNORE INTO eco_api_usage (event_id, user_id, api_key_id, \
                         endpoint, method, status_code, response_time_ms, created_at) VALUES ",
                    );
                    let values: Vec<String> = rows
                        .iter()
                        .map(|e| {
                            format!(
                                "('{}','{}','{}','{}','{}',{},{},'{}')",
                                e.event_id,
                                e.user_id,
                                e.api_key_id,
                                e.endpoint,
                                e.method,
                                e.status_code,
                                e.response_time_ms,
                                e.created_at
                                    .format(time::macros::format_description!(
                                        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
                                    ))
                                    .unwrap()
                            )
                        })
                        .collect();
                    sql.push_str(&values.join(","));
                    sql.push(';');
                }
                sql.push_str("COMMIT;");
                conn.batch_execute(&sql).unwrap();
            }
        })
        .await
        .unwrap();
    } else {
        let batch = Arc::new(batch);
        let writers = concurrency(url);
        let chunks: Vec<usize> = (0..batch.len()).step_by(max_batch).collect();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let (batch, chunks, next, url) =
                (batch.clone(), chunks.clone(), next.clone(), url.to_owned());
            tasks.push(tokio::spawn(async move {
                let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&from) = chunks.get(i) else { return };
                    let rows = &batch[from..(from + max_batch).min(batch.len())];
                    diesel::sql_query(
                        "INSERT INTO eco_api_usage (event_id, user_id, api_key_id, endpoint,
                             method, status_code, response_time_ms, created_at)
                         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                             $5::text[], $6::int4[], $7::int4[], $8::timestamptz[])",
                    )
                    .bind::<Array<SqlUuid>, _>(rows.iter().map(|e| e.event_id).collect::<Vec<_>>())
                    .bind::<Array<Text>, _>(
                        rows.iter()
                            .map(|e| e.user_id.to_string())
                            .collect::<Vec<_>>(),
                    )
                    .bind::<Array<Text>, _>(
                        rows.iter()
                            .map(|e| e.api_key_id.to_string())
                            .collect::<Vec<_>>(),
                    )
                    .bind::<Array<Text>, _>(
                        rows.iter().map(|e| e.endpoint.clone()).collect::<Vec<_>>(),
                    )
                    .bind::<Array<Text>, _>(
                        rows.iter().map(|e| e.method.clone()).collect::<Vec<_>>(),
                    )
                    .bind::<Array<Integer>, _>(
                        rows.iter()
                            .map(|e| i32::from(e.status_code))
                            .collect::<Vec<_>>(),
                    )
                    .bind::<Array<Integer>, _>(
                        rows.iter()
                            .map(|e| e.response_time_ms as i32)
                            .collect::<Vec<_>>(),
                    )
                    .bind::<Array<Timestamptz>, _>(
                        rows.iter().map(|e| e.created_at).collect::<Vec<_>>(),
                    )
                    .execute(&mut conn)
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let per_case: usize = env_or("EVENTS", "200000").parse().unwrap();
    let user_counts: Vec<usize> = env_or("USERS", "1 1000 10000 100000")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let rounds: usize = env_or("ROUNDS", "3").parse().unwrap();
    assert!(rounds > 0, "ROUNDS must be at least 1");
    usage_store::migrate(&url).await.unwrap();
    let store = usage_store::open(&url, &PoolOptions::default())
        .await
        .unwrap();
    // This month's partition, as the server creates it at start (a plain table has none).
    if let Err(e) = store
        .prepare_usage_storage(OffsetDateTime::now_utc(), 1)
        .await
    {
        eprintln!("no usage partitions prepared: {e}");
    }
    println!(
        "== ingest, {} cores, {per_case} events per phase, {rounds} rounds of raw then tracker per case (medians), {} writer(s), batches as the server writes them",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        concurrency(&url)
    );
    println!(
        "{:>8} {:>16} {:>16} {:>9}   each round",
        "users", "tracker ev/s", "raw ev/s", "tracker/raw"
    );
    // Seeded names are unique per invocation, so a database can be benchmarked again.
    let tag = OffsetDateTime::now_utc().unix_timestamp();
    for (run, users) in user_counts.into_iter().enumerate() {
        let callers = seed(&store, users, &format!("{tag}r{run}")).await;
        // Raw and tracker alternate, each on fresh rows of the same shape and from the
        // same quiet database: this machine's ceiling drifts by tens of percent between
        // runs a minute apart, so each ratio pairs neighbours and the median is shown.
        let (mut raws, mut trackeds, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            quiesce(&url).await;
            let raw = raw_rate(&url, events(&callers, per_case)).await;
            quiesce(&url).await;
            let tracked = tracker_rate(&store, &url, events(&callers, per_case)).await;
            raws.push(raw);
            trackeds.push(tracked);
            ratios.push(100.0 * tracked / raw);
        }
        let all: Vec<String> = ratios.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "{users:>8} {:>16.0} {:>16.0} {:>8.1}%   {}",
            median(&mut trackeds),
            median(&mut raws),
            median(&mut ratios),
            all.join(" ")
        );
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Starts each measurement from the same state: PostgreSQL vacuumed, analysed and
/// checkpointed (the previous phase's dirty pages written, not left to slow this one);
/// SQLite's write-ahead log folded into the database.
async fn quiesce(url: &str) {
    if url.starts_with("sqlite") {
        let path = url.trim_start_matches("sqlite://").to_owned();
        tokio::task::spawn_blocking(move || {
            use diesel::Connection;
            use diesel::connection::SimpleConnection;
            let mut conn = diesel::SqliteConnection::establish(&path).unwrap();
            conn.batch_execute("PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
        })
        .await
        .unwrap();
    } else {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = AsyncPgConnection::establish(url).await.unwrap();
        conn.batch_execute("VACUUM (ANALYZE)").await.unwrap();
        conn.batch_execute("CHECKPOINT").await.unwrap();
    }
}
