//! CPU per call of the metering itself, without HTTP or a database: what
//! `usage-server`'s middleware adds to a request, measured apart from actix, the kernel
//! and the load generator.
//!
//! One thread (a current-thread runtime, so the tracker's writer, the quota sync and the
//! access watcher run on it too and their work is in the figures) admits calls from `KEYS`
//! distinct users in turn, builds their rate-limit headers and records them into a sink
//! that drops them (`DiscardUsage`, as `--bench-discard-usage`). Keys, users and quota
//! counters live in the in-memory store, warmed before the clock starts.
//!
//! ```text
//! cargo run --release -p usage-embed --example bench_meter -- [KEYS] [CALLS] [PLAN]
//! ```
//!
//! Prints nanoseconds per call for each step, the SHA-256 of a key alone (work no cache
//! can skip), and the total.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use usage_auth::keys::{generate_api_key, hash_api_key};
use usage_core::discard::DiscardUsage;
use usage_core::repo::{ApiKeyRecord, ApiKeyRepository, User, UserRepository};
use usage_core::tracker::TrackerConfig;
use usage_core::{ApiKeyId, Plan, UserId};
use usage_door::meter::Admission;
use usage_embed::{UsageMeter, UsageOptions};
use usage_testkit::memory::MemoryStore;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let keys: usize = args.next().map_or(Ok(1_000), |a| a.parse())?;
    let calls: usize = args.next().map_or(Ok(2_000_000), |a| a.parse())?;
    let plan = match args.next().as_deref() {
        None | Some("enterprise") => Plan::enterprise(),
        Some("pro") => Plan::pro(),
        Some(other) => return Err(format!("PLAN is enterprise or pro, not {other}").into()),
    };
    if keys == 0 || calls == 0 {
        return Err("KEYS and CALLS are at least 1".into());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(keys, calls, plan))
}

async fn run(keys: usize, calls: usize, plan: Plan) -> Result<(), Box<dyn std::error::Error>> {
    let store = Arc::new(MemoryStore::new());
    let mut plaintexts = Vec::with_capacity(keys);
    for i in 0..keys {
        let user = User {
            id: UserId::generate(),
            email: format!("bench{i}@example.com"),
            plan: plan.clone(),
            stripe_customer_id: None,
            created_at: OffsetDateTime::now_utc(),
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await?;
        // Stored directly: issuing checks the user's other keys, a scan of every key in
        // the in-memory store (quadratic at 100,000 keys).
        let key = generate_api_key();
        store
            .create_api_key(&ApiKeyRecord {
                id: ApiKeyId::generate(),
                user_id: user.id,
                name: "bench".into(),
                prefix: key.prefix,
                key_hash: key.hash,
                created_at: OffsetDateTime::now_utc(),
                last_used_at: None,
                revoked_at: None,
                expires_at: None,
            })
            .await?;
        plaintexts.push(key.plaintext);
    }
    let usage = UsageMeter::with_store(
        store,
        UsageOptions {
            record_to: Some(Arc::new(DiscardUsage)),
            // The server's default largest batch (`USAGE_MAX_BATCH`): the library's
            // 2,000 per 10 ms tick would cap the writer below this loop's pace.
            tracker: TrackerConfig {
                max_batch: 20_000,
                ..TrackerConfig::default()
            },
            ..UsageOptions::default()
        },
    )
    .await?;
    let meter = usage.meter();
    // Warm: every key cached, every user's quota state loaded.
    for key in &plaintexts {
        let Admission::Admitted(_) = meter.admit(None, Some(key.as_bytes())).await else {
            return Err("a seeded key was refused".into());
        };
    }

    println!("bench_meter: {keys} keys ({plan:?}), {calls} calls per step, one thread");
    let key = |i: usize| plaintexts[i % keys].as_bytes();
    let admitted = async |i: usize| match meter.admit(None, Some(key(i))).await {
        Admission::Admitted(call) => Ok(call),
        Admission::Refused(_) => Err("a call was refused"),
    };
    let sha = measure(calls, async |i| {
        black_box(hash_api_key(&plaintexts[i % keys]));
        Ok(())
    })
    .await?;
    let admit = measure(calls, async |i| {
        admitted(i).await.map(|call| drop(black_box(call)))
    })
    .await?;
    let headers = measure(calls, async |i| {
        admitted(i)
            .await
            .map(|call| drop(black_box(call.headers())))
    })
    .await?;
    let full = measure(calls, async |i| {
        let call = admitted(i).await?;
        black_box(call.headers());
        meter
            .record(call, "GET", "/api/v1/ping".to_owned(), 200)
            .await;
        Ok(())
    })
    .await?;

    println!("  step                             CPU ns/call   wall ns/call");
    println!(
        "  sha-256 of a key alone          {:>12.0} {:>14.0}",
        sha.0, sha.1
    );
    println!(
        "  admit (key, quota)              {:>12.0} {:>14.0}",
        admit.0, admit.1
    );
    println!(
        "  + rate-limit headers            {:>12.0} {:>14.0}",
        headers.0, headers.1
    );
    println!(
        "  + record (event, queue, writer) {:>12.0} {:>14.0}",
        full.0, full.1
    );
    let report = usage.shutdown().await;
    println!("  recorded {} calls", report.usage.flushed_total);
    Ok(())
}

/// Runs `step` for calls `0..calls` and returns (CPU ns, wall ns) per call. CPU time,
/// not wall time: the loop lets the writer and the timers run every `YIELD_EVERY` calls
/// (a server's workers wait for their sockets all the time), and their work counts.
async fn measure(
    calls: usize,
    step: impl AsyncFn(usize) -> Result<(), &'static str>,
) -> Result<(f64, f64), &'static str> {
    let (started, cpu) = (Instant::now(), process_cpu_ns());
    for i in 0..calls {
        if i % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
        step(i).await?;
    }
    let cpu_ns = process_cpu_ns().saturating_sub(cpu) as f64;
    Ok((
        cpu_ns / calls as f64,
        started.elapsed().as_nanos() as f64 / calls as f64,
    ))
}

/// Calls between two yields to the runtime.
const YIELD_EVERY: usize = 256;

/// CPU time of the whole process so far (user and system, every thread), from
/// `/proc/self/stat` (clock ticks of 10 ms: run enough calls).
fn process_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and
    // 13th of them.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) * 10_000_000
}
