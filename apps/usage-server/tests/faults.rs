//! Faults while calls flow: PostgreSQL killed and restarted (`pg_ctl restart -m
//! immediate`) in the middle of the tracker's batches. Every admitted call must be stored
//! exactly once. Alone in its own test binary: it restarts this process's test server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Db, StopRestarted, pg_ctl};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_mid_batch_loses_and_doubles_nothing() {
    let db = Db::new(Backend::Postgres);
    common::commit_synchronously(&db);
    let (user, key) = db.user_with_key("ada@example.com", "enterprise");
    let server = Arc::new(db.start(&[
        ("USAGE_BATCH_SIZE", "20"),
        ("USAGE_FLUSH_INTERVAL_MS", "50"),
        ("USAGE_RETRY_MAX_MS", "200"),
    ]));
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(6);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (server, key) = (Arc::clone(&server), key.clone());
        let (admitted, refused) = (Arc::clone(&admitted), Arc::clone(&refused));
        clients.push(tokio::spawn(async move {
            while Instant::now() < until {
                match server.ping(&key).await.status().as_u16() {
                    200 => admitted.fetch_add(1, Ordering::Relaxed),
                    _ => refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = admitted.load(Ordering::Relaxed);
    let _stop_at_end = StopRestarted;
    pg_ctl(&["restart", "-m", "immediate", "-w", "-t", "30"]);
    for c in clients {
        c.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    assert!(
        admitted > before,
        "calls went on during and after the restart"
    );
    let server = Arc::into_inner(server).expect("clients done");
    let (status, log) = server.stop();
    assert!(status.success(), "{log:?}");
    let (stored, counted, _) = db.stored(&user).await;
    report!(
        "PostgreSQL restart -m immediate mid-batch: admitted {admitted} (refused {}), stored \
         {stored}, counted {counted}",
        refused.load(Ordering::Relaxed)
    );
    assert_eq!(stored, admitted, "every admitted call stored once");
    assert_eq!(counted, admitted, "and counted once");
}
