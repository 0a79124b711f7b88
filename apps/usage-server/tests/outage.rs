//! PostgreSQL stopped for 30 s under load, then started again. Alone in its own test
//! binary: it stops this process's test server.
//!
//! What the server does meanwhile (docs/OPERATIONS.md): known keys keep working from the
//! cache; plans that never block (enterprise here) are served from memory; a free user is
//! served from the quota lease in hand, then gets 503 `database_unavailable` with
//! `Retry-After`; `/readyz` answers 503; the tracker keeps every admitted call and writes
//! them once the database is back. Nothing admitted is lost, nothing counted twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Db, StopRestarted, pg_ctl};

const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

/// Answers seen by the clients of one key, per phase.
#[derive(Default)]
struct Tally {
    admitted: [AtomicU64; 3],
    unavailable: [AtomicU64; 3],
    other: AtomicU64,
}

impl Tally {
    fn admitted(&self) -> u64 {
        self.admitted
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }
    fn line(&self) -> String {
        let v = |a: &[AtomicU64; 3]| a.each_ref().map(|n| n.load(Ordering::Relaxed));
        format!(
            "admitted before/during/after {:?}, 503 {:?}, other {}",
            v(&self.admitted),
            v(&self.unavailable),
            self.other.load(Ordering::Relaxed)
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_for_30_s_under_load_loses_and_doubles_nothing() {
    let db = Db::new(Backend::Postgres);
    common::commit_synchronously(&db);
    let (ent_user, ent_key) = db.user_with_key("ent@example.com", "enterprise");
    let (free_user, free_key) = db.user_with_key("free@example.com", "free");
    let server = Arc::new(db.start(&[
        ("FREE_MONTHLY_CALLS", "1000000"),
        ("QUOTA_LEASE_MAX", "500"),
        ("USAGE_BATCH_SIZE", "50"),
        ("USAGE_FLUSH_INTERVAL_MS", "50"),
        ("USAGE_RETRY_MAX_MS", "1000"),
        // Cached answers run out during the outage: the stale ones carry on.
        ("API_KEY_CACHE_TTL_MS", "2000"),
        ("DATABASE_CONNECT_TIMEOUT_SECS", "1"),
    ]));
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let tallies = [Arc::new(Tally::default()), Arc::new(Tally::default())];
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for i in 0..8 {
        let key = if i % 2 == 0 { &ent_key } else { &free_key }.clone();
        let tally = Arc::clone(&tallies[i % 2]);
        let (server, phase, stop, http) = (
            Arc::clone(&server),
            Arc::clone(&phase),
            Arc::clone(&stop),
            http.clone(),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // The phase when the call was sent: a call sent before the stop may be
                // answered during it.
                let p = usize::from(phase.load(Ordering::Relaxed));
                let res = http
                    .get(server.url("/api/v1/ping"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                let status = res.status().as_u16();
                let retry_after = res.headers().contains_key("retry-after");
                let _ = res.bytes().await;
                match status {
                    200 => tally.admitted[p].fetch_add(1, Ordering::Relaxed),
                    503 if retry_after => tally.unavailable[p].fetch_add(1, Ordering::Relaxed),
                    _ => tally.other.fetch_add(1, Ordering::Relaxed),
                };
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let readyz = async || {
        http.get(server.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(readyz().await, 200);
    let _stop_at_end = StopRestarted;
    pg_ctl(&["stop", "-m", "fast", "-w"]);
    phase.store(DURING, Ordering::Relaxed);
    let stopped = Instant::now();
    let mut ready_during = Vec::new();
    while stopped.elapsed() < Duration::from_secs(30) {
        ready_during.push(readyz().await);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let queued_during = server.metric("usage_tracker_queue_depth").await;
    pg_ctl(&["start", "-w", "-t", "60"]);
    phase.store(AFTER, Ordering::Relaxed);
    common::eventually("ready again", Duration::from_secs(30), async || {
        readyz().await == 200
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let server = Arc::into_inner(server).expect("clients done");
    let (status, log) = server.stop();
    assert!(status.success(), "{log:?}");

    let (ent, free) = (&tallies[0], &tallies[1]);
    let (ent_stored, ent_counted, _) = db.stored(&ent_user).await;
    let (free_stored, free_counted, _) = db.stored(&free_user).await;
    report!("PostgreSQL stopped 30 s under load (8 clients):");
    report!(
        "  /readyz during the outage: {ready_during:?}; tracker queue at the end of it: {queued_during}"
    );
    report!(
        "  enterprise: {}; stored {ent_stored}, counted {ent_counted}",
        ent.line()
    );
    report!(
        "  free:       {}; stored {free_stored}, counted {free_counted}",
        free.line()
    );
    assert!(ready_during.iter().all(|s| *s == 503), "{ready_during:?}");
    assert!(queued_during > 0.0, "calls were waiting for the database");
    for tally in [ent, free] {
        assert_eq!(
            tally.other.load(Ordering::Relaxed),
            0,
            "only 200 or 503 + Retry-After"
        );
        assert!(
            tally.admitted[AFTER as usize].load(Ordering::Relaxed) > 0,
            "served again after"
        );
    }
    // Known keys and memory carry an unlimited plan through the whole outage.
    assert!(ent.admitted[DURING as usize].load(Ordering::Relaxed) > 0);
    // A free user is served while the lease lasts, then refused with 503.
    assert!(free.unavailable[DURING as usize].load(Ordering::Relaxed) > 0);
    assert_eq!(
        (ent_stored, ent_counted),
        (ent.admitted(), ent.admitted()),
        "nothing lost, nothing doubled"
    );
    assert_eq!(
        (free_stored, free_counted),
        (free.admitted(), free.admitted())
    );
}
