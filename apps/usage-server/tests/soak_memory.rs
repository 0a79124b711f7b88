//! Soak: 100,000 distinct users through one server, then 100,000 others, then the first
//! 100,000 again, with the server's resident memory and its per-user state printed
//! before, at the peak of each wave and after the idle state is forgotten. Ignored by default (it takes minutes):
//! `just soak-memory` runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Db, Server};
use time::OffsetDateTime;
use usage_core::repo::{ApiKeyRecord, User};
use usage_core::{ApiKeyId, Plan, UserId};

const USERS_PER_WAVE: usize = 100_000;
const CLIENTS: usize = 64;

/// Creates `n` pro users with one key each, straight in the database; returns the keys.
async fn seed(db: &Db, n: usize, wave: usize) -> Vec<String> {
    let store = db.store().await;
    let now = OffsetDateTime::now_utc();
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let user = User {
            id: UserId::generate(),
            email: format!("soak-{wave}-{i}@example.com"),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: now,
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await.unwrap();
        let key = usage_auth::keys::generate_api_key();
        store
            .create_api_key(&ApiKeyRecord {
                id: ApiKeyId::generate(),
                user_id: user.id,
                name: "soak".into(),
                prefix: key.prefix.clone(),
                key_hash: key.hash.clone(),
                created_at: now,
                last_used_at: None,
                revoked_at: None,
                expires_at: None,
            })
            .await
            .unwrap();
        keys.push(key.plaintext);
    }
    keys
}

/// One call per key, `CLIENTS` at a time; every call must be admitted.
async fn drive(server: &Server, keys: Vec<String>) -> f64 {
    let started = Instant::now();
    let keys = Arc::new(keys);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (keys, next, client) = (keys.clone(), next.clone(), client.clone());
        let url = server.url("/api/v1/ping");
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(key) = keys.get(i) else { return };
                let res = client.get(&url).bearer_auth(key).send().await.unwrap();
                assert_eq!(res.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    keys.len() as f64 / started.elapsed().as_secs_f64()
}

async fn state(server: &Server) -> String {
    format!(
        "rss {:>7} KiB, quota users {:>6}, cached keys {:>6}, keys remembered {:>6}",
        server.resident_kib(),
        server.metric("usage_quota_users_in_memory").await,
        server.metric("usage_api_key_cache_entries").await,
        server.metric("usage_tracker_keys_remembered").await,
    )
}

/// Keeps one user calling (so the tracker goes on writing) until the idle state is gone.
async fn idle_out(server: &Server, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        server.ping(key).await;
        if server.metric("usage_quota_users_in_memory").await <= 1.0
            && server.metric("usage_api_key_cache_entries").await <= 1.0
            && server.metric("usage_tracker_keys_remembered").await <= 1.0
        {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("idle state not forgotten: {}", state(server).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a soak of a few minutes: just soak-memory"]
async fn memory_follows_active_users_not_every_user_ever_seen() {
    let db = Db::new(Backend::Sqlite);
    assert!(db.cli(&[], &["migrate"]).status.success());
    let seeding = Instant::now();
    let first = seed(&db, USERS_PER_WAVE, 1).await;
    let second = seed(&db, USERS_PER_WAVE, 2).await;
    report!(
        "soak: seeded {} users in {:.0} s",
        2 * USERS_PER_WAVE,
        seeding.elapsed().as_secs_f64()
    );
    let server = db.start(&[
        ("QUOTA_FORGET_IDLE_MS", "5000"),
        ("API_KEY_CACHE_TTL_MS", "1000"),
        ("API_KEY_CACHE_STALE_IF_ERROR_MS", "1000"),
        ("USAGE_FLUSH_INTERVAL_MS", "200"),
    ]);
    let keeper = first[0].clone();
    let again = first.clone();
    let waves = (first.clone(), second.clone());
    report!("soak: before            {}", state(&server).await);
    let rate = drive(&server, first).await;
    report!(
        "soak: after wave 1      {} ({rate:.0} req/s)",
        state(&server).await
    );
    let waited = Instant::now();
    idle_out(&server, &keeper).await;
    report!(
        "soak: after forgetting  {} ({:.0} s idle)",
        state(&server).await,
        waited.elapsed().as_secs_f64()
    );
    let rate = drive(&server, second).await;
    report!(
        "soak: after wave 2      {} ({rate:.0} req/s)",
        state(&server).await
    );
    idle_out(&server, &keeper).await;
    report!("soak: after forgetting  {}", state(&server).await);
    // The first wave's users again, all forgotten: their state is built anew; then, with
    // SOAK_EXTRA_WAVES=N, N more waves alternating between the two sets (does resident
    // memory level off?).
    let extra: usize = std::env::var("SOAK_EXTRA_WAVES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut next = Some(again);
    for wave in 3..=3 + extra {
        let keys = next.take().unwrap_or_else(|| {
            if wave % 2 == 1 {
                waves.0.clone()
            } else {
                waves.1.clone()
            }
        });
        let rate = drive(&server, keys).await;
        report!(
            "soak: after wave {wave}      {} ({rate:.0} req/s)",
            state(&server).await
        );
        idle_out(&server, &keeper).await;
        report!("soak: after forgetting  {}", state(&server).await);
    }
    assert!(server.stop().0.success());
}
