//! Signals to the server under load. SIGTERM: every call answered 200 is stored once.
//! SIGKILL: without the spool, the calls still in the tracker's queue are lost (the test
//! measures how many); in durable mode (`USAGE_SPOOL_DIR`), none: the next start stores
//! what the killed process had not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Db, Server};

/// 8 clients call the sample route for `secs`; returns the calls answered 200.
async fn load(server: &Arc<Server>, key: &str, secs: u64) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (server, key, http) = (Arc::clone(server), key.to_owned(), http.clone());
        let admitted = Arc::clone(&admitted);
        clients.push(tokio::spawn(async move {
            while Instant::now() < until {
                let res = http
                    .get(server.url("/api/v1/ping"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                let _ = res.bytes().await;
                admitted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    admitted.load(Ordering::Relaxed)
}

async fn sigkill_under_load(backend: Backend) {
    let db = Db::new(backend);
    let spool_dir = db.dir.0.join("spool");
    let spool = spool_dir.to_str().unwrap();

    // Without the spool (the default): what the queue held is gone.
    let (plain_user, plain_key) = db.user_with_key("plain@example.com", "enterprise");
    let server = Arc::new(db.start(&[]));
    let admitted = load(&server, &plain_key, 3).await;
    Arc::into_inner(server).unwrap().kill();
    let (stored, counted, _) = db.stored(&plain_user).await;
    report!(
        "{backend:?}, SIGKILL without spool: admitted {admitted}, stored {stored}, counted {counted}, \
         lost {}",
        admitted - stored
    );
    assert!(
        stored <= admitted && counted == stored,
        "nothing counted twice"
    );

    // Durable mode: the next start stores everything the killed process had not.
    let (user, key) = db.user_with_key("durable@example.com", "enterprise");
    let server = Arc::new(db.start(&[("USAGE_SPOOL_DIR", spool)]));
    let admitted = load(&server, &key, 3).await;
    Arc::into_inner(server).unwrap().kill();
    let (stored_at_kill, _, _) = db.stored(&user).await;
    // Counters healed quickly, for the test (60 s by default).
    let server = db.start(&[
        ("USAGE_SPOOL_DIR", spool),
        ("QUOTA_HEAL_MS", "200"),
        ("QUOTA_PUSH_WITHIN_MS", "100"),
        ("QUOTA_SYNC_MS", "100"),
    ]);
    common::eventually("the spool replayed", Duration::from_secs(30), async || {
        db.stored(&user).await.0 >= admitted
    })
    .await;
    // The counts the killed process had not pushed are lost from the counter; the
    // current figure converges to the calls stored all the same.
    let token = db.create(&["token", "--user", &user]);
    let current = async || -> u64 {
        server.get_json("/api/usage/current", &token).await["api_calls"]
            .as_u64()
            .unwrap()
    };
    let at_restart = current().await;
    common::eventually(
        "the current figure converges to the stored calls",
        Duration::from_secs(30),
        async || current().await == admitted,
    )
    .await;
    report!(
        "{backend:?}, SIGKILL in durable mode: current {at_restart} at the restart, {admitted} once healed"
    );
    let (status, log) = server.stop();
    assert!(status.success(), "{log:?}");
    let (stored, counted, _) = db.stored(&user).await;
    report!(
        "{backend:?}, SIGKILL in durable mode: admitted {admitted}, stored at the kill \
         {stored_at_kill}, after the restart {stored}, counted {counted}"
    );
    assert_eq!(
        (stored, counted),
        (admitted, admitted),
        "every admitted call, once"
    );
    let left = std::fs::read_dir(&spool_dir).unwrap().count();
    assert_eq!(left, 0, "spool files deleted once stored");
}

async fn sigterm_under_load(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "enterprise");
    // Production defaults: batches of 100, written every 5 s or when full.
    let server = db.start(&[]);
    let url = server.url("/api/v1/ping");
    let admitted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (url, key, http) = (url.clone(), key.clone(), http.clone());
        let (admitted, failed) = (Arc::clone(&admitted), Arc::clone(&failed));
        clients.push(tokio::spawn(async move {
            // Until the server is gone: calls sent after the signal are refused at the
            // socket or answered before the server exits.
            let mut errors_in_a_row = 0;
            while errors_in_a_row < 20 {
                let answer = match http.get(&url).bearer_auth(&key).send().await {
                    Ok(res) => {
                        let status = res.status();
                        res.bytes().await.map(|_| status)
                    }
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(status) if status == 200 => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        errors_in_a_row = 0;
                    }
                    Ok(status) => panic!("unexpected {status}"),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors_in_a_row += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_signal = admitted.load(Ordering::Relaxed);
    let (status, log) = tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();
    assert!(status.success(), "{log:?}");
    for c in clients {
        c.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    let (stored, counted, _) = db.stored(&user).await;
    report!(
        "{backend:?}, SIGTERM under load (32 clients): admitted {admitted} ({at_signal} before \
         the signal), stored {stored}, counted {counted}; {} calls refused at the socket",
        failed.load(Ordering::Relaxed)
    );
    assert!(at_signal > 0);
    assert_eq!(
        (stored, counted),
        (admitted, admitted),
        "every admitted call, once"
    );
}

on_both_backends!(sigkill_under_load, sigterm_under_load);
