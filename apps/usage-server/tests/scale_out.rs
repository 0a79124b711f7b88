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

/// A plan edit made through one instance, with each of `now`, `next_period` and `keep`,
/// as the other instance enforces it: `now` within a second, `next_period` from the first
/// instant of the next period (both instances run on a clock a few seconds before a month
/// ends), `keep` never for its users while new subscribers get the new version.
async fn plan_versions_move_users_as_their_edit_says_on_both_instances(backend: Backend) {
    // Its timing window (the month turns 15 s after the servers start) is not shared with
    // a load test starving the two cores.
    let _alone = LOAD.lock().await;
    let db = Db::new(backend);
    let catalog = db.dir.0.join("catalog.toml");
    let mut file = String::new();
    for key in ["p-now", "p-next", "p-keep"] {
        file.push_str(&format!(
            "[[plans]]\nkey = \"{key}\"\nname = \"{key}\"\nprice_cents = 0\n\
             [[plans.limits]]\nmeter = \"api_calls\"\nincluded = 100\nover_limit = \"block\"\n"
        ));
    }
    std::fs::write(&catalog, file).unwrap();
    let out = db.cli(&[], &["plans", "apply", catalog.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<String> = ["p-now", "p-next", "p-keep"]
        .iter()
        .map(|plan| db.user_with_key(&format!("{plan}@example.com"), plan).1)
        .collect();
    let admin = db.create(&[
        "users",
        "create",
        "--email",
        "admin@example.com",
        "--plan",
        "free",
    ]);
    // Fifteen seconds before February: time to start, edit, look, and see the month turn.
    let start = "2030-01-31T23:59:45Z";
    let env = [
        ("USAGE_CLOCK_START", start),
        ("ADMIN_ECO_IDS", admin.as_str()),
        ("API_KEY_CACHE_TTL_MS", "60000"),
    ];
    // Before either clock starts: each reaches February at least fifteen seconds after this.
    let started = Instant::now();
    let (a, b) = (db.start(&env), db.start(&env));
    let http = reqwest::Client::new();
    let limits = async |server: &Server| -> Vec<Option<u64>> {
        let mut out = Vec::new();
        for key in &keys {
            out.push(header(&ping(&http, server, key).await, "x-ratelimit-limit"));
        }
        out
    };
    assert_eq!(limits(&b).await, [Some(100); 3], "version 1 everywhere");

    // Through A: each plan's version 2 allows 200, with its own rule for existing users.
    // Tokens are checked on the system clock, not the shifted one.
    let admin_token = token(&admin);
    for (plan, existing) in [
        ("p-now", "now"),
        ("p-next", "next_period"),
        ("p-keep", "keep"),
    ] {
        let res = http
            .put(a.url(&format!("/api/admin/plans/{plan}")))
            .bearer_auth(&admin_token)
            .json(&serde_json::json!({
                "name": plan, "price_cents": 0, "currency": "usd", "existing": existing,
                "limits": [{"meter": "api_calls", "included": 200, "over_limit": "block"}]
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{plan}: {}", res.text().await.unwrap());
    }
    let edited = Instant::now();
    common::eventually("B applies `now`", Duration::from_secs(1), async || {
        limits(&b).await[0] == Some(200)
    })
    .await;
    report!(
        "{backend:?}: a version moving users now reached B after {:?}",
        edited.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "the edits and the first look took {:?}: the month turned too early to tell",
        started.elapsed()
    );
    assert_eq!(
        limits(&b).await,
        [Some(200), Some(100), Some(100)],
        "before the month ends: `next_period` and `keep` users hold version 1"
    );
    // A new subscriber of the kept plan gets its newest version.
    let (_, newcomer) = db.user_with_key("new@example.com", "p-keep");
    assert_eq!(
        header(&ping(&http, &b, &newcomer).await, "x-ratelimit-limit"),
        Some(200)
    );

    // February, on each instance's clock (each started its own a moment apart).
    for server in [&a, &b] {
        common::eventually("the month turns", Duration::from_secs(20), async || {
            limits(server).await[1] == Some(200)
        })
        .await;
        assert_eq!(
            limits(server).await,
            [Some(200), Some(200), Some(100)],
            "after the month ends: `next_period` users moved, `keep` users did not"
        );
    }
}

on_both_backends!(
    exact_free_limit_across_two_instances,
    revocation_and_plan_change_reach_the_other_instance,
    plan_versions_move_users_as_their_edit_says_on_both_instances,
);
