//! Two server instances on one database, as behind a load balancer: the free limit holds
//! exactly across both, and a revocation or plan change made through one instance (or
//! the CLI) is enforced by the other within one second.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, Db, Server, token};
use serde_json::Value;

const FREE_LIMIT: u64 = 600;

fn start_two(db: &Db) -> (Arc<Server>, Arc<Server>) {
    let env = [
        ("FREE_MONTHLY_CALLS", "600"),
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
        // Long enough that only the change poll can explain a refusal within a second.
        ("API_KEY_CACHE_TTL_MS", "60000"),
    ];
    (Arc::new(db.start(&env)), Arc::new(db.start(&env)))
}

async fn ping(http: &reqwest::Client, server: &Server, key: &str) -> reqwest::Response {
    http.get(server.url("/api/v1/ping"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

fn header(res: &reqwest::Response, name: &str) -> Option<u64> {
    res.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// The load tests of this binary run one at a time: on two cores, two of them at once
/// starve each other's servers.
static LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn exact_free_limit_across_two_instances(backend: Backend) {
    let _alone = LOAD.lock().await;
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "free");
    let (a, b) = start_two(&db);
    let admitted = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let refused = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    // Every client goes on until refusals have been coming for a second (idle leases go
    // back within two sync intervals, 1 s), or a minute has passed.
    let started = Instant::now();
    let first_refusal = Arc::new(std::sync::OnceLock::<Instant>::new());
    // One client for all (building one costs tens of milliseconds in a debug build).
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for i in 0..64 {
        let server = Arc::clone(if i % 2 == 0 { &a } else { &b });
        let admitted = Arc::clone(&admitted[i % 2]);
        let (refused, other, key) = (Arc::clone(&refused), Arc::clone(&other), key.clone());
        let (first_refusal, client) = (Arc::clone(&first_refusal), http.clone());
        clients.push(tokio::spawn(async move {
            let settled = || {
                first_refusal
                    .get()
                    .is_some_and(|at| at.elapsed() > Duration::from_secs(2))
            };
            while !settled() && started.elapsed() < Duration::from_secs(60) {
                let res = client
                    .get(server.url("/api/v1/ping"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                match res.status().as_u16() {
                    200 => {
                        let remaining = header(&res, "x-ratelimit-remaining").unwrap();
                        assert!(remaining < FREE_LIMIT);
                        admitted.fetch_add(1, Ordering::Relaxed);
                        // Read to the end, so that the connection is reused.
                        res.bytes().await.unwrap();
                    }
                    429 => {
                        let body: Value = res.json().await.unwrap();
                        assert_eq!(body["error"], "quota_exceeded");
                        first_refusal.get_or_init(Instant::now);
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let (on_a, on_b) = (
        admitted[0].load(Ordering::Relaxed),
        admitted[1].load(Ordering::Relaxed),
    );
    let refused = refused.load(Ordering::Relaxed);
    for server in [a, b] {
        let (status, log) = Arc::into_inner(server).unwrap().stop();
        assert!(status.success(), "{log:?}");
    }
    let (stored, counted, _) = db.stored(&user).await;
    report!(
        "{backend:?}: free limit {FREE_LIMIT}, 64 clients on two instances, first refusal after \
         {:?}, ran {:?}: admitted {} (A {on_a}, B {on_b}), refused {refused}, stored {stored}, \
         counted {counted}",
        first_refusal.get().map(|at| at.duration_since(started)),
        started.elapsed(),
        on_a + on_b
    );
    assert_eq!(other.load(Ordering::Relaxed), 0, "only 200 and 429");
    assert_eq!(
        on_a + on_b,
        FREE_LIMIT,
        "exactly the limit across both instances"
    );
    assert!(on_a > 0 && on_b > 0, "both instances admitted calls");
    assert!(refused > 0);
    assert_eq!((stored, counted), (FREE_LIMIT, FREE_LIMIT));
}

/// Polls `check` every 10 ms; returns how long it took to hold (panics after 5 s).
async fn time_until(mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s");
}

async fn revocation_and_plan_change_reach_the_other_instance(backend: Backend) {
    let db = Db::new(backend);
    let (user, _) = db.user_with_key("ada@example.com", "free");
    let (a, b) = start_two(&db);
    let jwt = token(&user);
    let http = reqwest::Client::new();
    let created: Value = http
        .post(a.url("/api/keys"))
        .bearer_auth(&jwt)
        .json(&serde_json::json!({"name": "to revoke"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    );
    // B knows the key (and caches it for a minute).
    assert_eq!(ping(&http, &b, &key).await.status(), 200);

    let revoked = http
        .delete(a.url(&format!("/api/keys/{id}")))
        .bearer_auth(&jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let took = time_until(async || ping(&http, &b, &key).await.status() == 401).await;
    report!("{backend:?}: key revoked on A, refused by B after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "revocation reached B in {took:?}"
    );
    assert_eq!(ping(&http, &a, &key).await.status(), 401);

    // A plan change by another process (the CLI) shows in B's headers.
    let (_, other_key) = db.user_with_key("bob@example.com", "free");
    let limit =
        async |server: &Server| header(&ping(&http, server, &other_key).await, "x-ratelimit-limit");
    assert_eq!(limit(&b).await, Some(FREE_LIMIT));
    let bob_id = {
        let store = db.store().await;
        store
            .user_by_email("bob@example.com")
            .await
            .unwrap()
            .unwrap()
            .id
    };
    let out = db.cli(
        &[],
        &[
            "users",
            "set-plan",
            "--user",
            bob_id.as_str(),
            "--plan",
            "pro",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let took = time_until(async || limit(&b).await == Some(100_000)).await;
    report!("{backend:?}: plan changed by the CLI, seen by B after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "plan change reached B in {took:?}"
    );
    assert_eq!(limit(&a).await, Some(100_000));
}

on_both_backends!(
    exact_free_limit_across_two_instances,
    revocation_and_plan_change_reach_the_other_instance,
);
