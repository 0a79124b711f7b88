//! The metered API against the real server on SQLite and PostgreSQL: exact quotas under
//! concurrency, the contract's headers and bodies, overage, revocation, restarts, and a
//! database that refuses writes for a while. Every admitted call is checked to be stored
//! exactly once, in `eco_api_usage` and in the period counter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, Db, eventually};
use reqwest::StatusCode;
use serde_json::Value;

on_both_backends!(
    free_limit_is_exact_under_concurrency_and_all_is_written_at_shutdown,
    quota_headers_and_the_429_body,
    pro_overage_is_counted_and_enterprise_has_no_quota_headers,
    missing_unknown_and_revoked_keys_get_401,
    a_restart_keeps_the_counts,
    a_database_refusing_writes_loses_nothing,
);

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

async fn free_limit_is_exact_under_concurrency_and_all_is_written_at_shutdown(backend: Backend) {
    const LIMIT: usize = 50;
    const CLIENTS: usize = 64;
    const CALLS_EACH: usize = 4;
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("free@example.com", "free");
    // Nothing is written before shutdown: the final flush must write all of it.
    let server = db.start(&[
        ("FREE_MONTHLY_CALLS", "50"),
        ("USAGE_FLUSH_INTERVAL_MS", "3600000"),
        ("USAGE_BATCH_SIZE", "10000"),
    ]);
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, key) = (client.clone(), server.url("/api/v1/ping"), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..CALLS_EACH {
                let res = client
                    .get(&url)
                    .header("X-API-Key", &key)
                    .send()
                    .await
                    .unwrap();
                statuses.push(res.status());
            }
            statuses
        }));
    }
    let mut ok = 0;
    let mut rejected = 0;
    for task in tasks {
        for status in task.await.unwrap() {
            match status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => rejected += 1,
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert_eq!(ok, LIMIT, "exactly the limit is admitted, not one more");
    assert_eq!(rejected, CLIENTS * CALLS_EACH - LIMIT);
    assert_eq!(
        server.metric("usage_quota_rejections_total").await,
        rejected as f64
    );

    let (status, log) = server.stop();
    assert!(status.success());
    let flushed_line = log
        .iter()
        .find(|l| l.contains("written at shutdown"))
        .expect("shutdown report");
    assert!(
        flushed_line.contains("50 event(s) written at shutdown"),
        "{flushed_line}\n{}",
        log.join("\n")
    );
    assert_eq!(db.stored(&user).await, (LIMIT as u64, LIMIT as u64, 0));
}

async fn quota_headers_and_the_429_body(backend: Backend) {
    let db = Db::new(backend);
    let (_, key) = db.user_with_key("free@example.com", "free");
    let server = db.start(&[("FREE_MONTHLY_CALLS", "2")]);

    let first = server.ping(&key).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(
        header(&first, "x-ratelimit-remaining").as_deref(),
        Some("1")
    );
    let reset: i64 = header(&first, "x-ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    let period = usage_core::BillingPeriod::containing(time::OffsetDateTime::now_utc());
    assert_eq!(reset, period.end().unix_timestamp());
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["ok"], true);
    assert!(body["user_id"].as_str().unwrap().starts_with("eco_usr_"));
    assert!(body["key_id"].as_str().unwrap().starts_with("eco_key_"));

    assert_eq!(
        header(&server.ping(&key).await, "x-ratelimit-remaining").as_deref(),
        Some("0")
    );
    let over = server.ping(&key).await;
    assert_eq!(over.status(), 429);
    assert_eq!(header(&over, "x-ratelimit-remaining").as_deref(), Some("0"));
    let retry_after: i64 = header(&over, "retry-after").unwrap().parse().unwrap();
    let to_reset = reset - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (to_reset - 5..=to_reset + 1).contains(&retry_after),
        "{retry_after} vs {to_reset}"
    );
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["limit"], 2);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("Upgrade to Pro for more calls.")
    );
    let reset_at = time::OffsetDateTime::parse(
        body["reset_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(reset_at, period.end());
    assert!(server.stop().0.success());
}

async fn pro_overage_is_counted_and_enterprise_has_no_quota_headers(backend: Backend) {
    let db = Db::new(backend);
    let (pro, pro_key) = db.user_with_key("pro@example.com", "pro");
    let (ent, ent_key) = db.user_with_key("ent@example.com", "enterprise");
    let server = db.start(&[
        ("PRO_MONTHLY_CALLS", "3"),
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
    ]);
    for expected_remaining in ["2", "1", "0", "0", "0"] {
        let res = server.ping(&pro_key).await;
        assert_eq!(res.status(), 200, "pro is never blocked");
        assert_eq!(
            header(&res, "x-ratelimit-remaining").as_deref(),
            Some(expected_remaining)
        );
    }
    for _ in 0..3 {
        let res = server.ping(&ent_key).await;
        assert_eq!(res.status(), 200);
        for name in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert_eq!(header(&res, name), None, "enterprise has no {name}");
        }
    }
    // Written by the flush interval, before shutdown.
    server.wait_flushed(8).await;
    assert_eq!(db.stored(&pro).await, (5, 5, 2));
    assert_eq!(db.stored(&ent).await, (3, 3, 0));
    assert!(server.stop().0.success());
}

async fn missing_unknown_and_revoked_keys_get_401(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    // A cache entry would outlive the test: only the revocation poll can drop the key.
    let server = db.start(&[
        ("API_KEY_CACHE_TTL_MS", "600000"),
        ("KEY_REVOCATION_POLL_MS", "200"),
    ]);
    let client = reqwest::Client::new();
    assert_eq!(server.ping(&key).await.status(), 200);

    // Routing errors under the metered scope are JSON too.
    let wrong_method = client
        .post(server.url("/api/v1/ping"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(
        wrong_method.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    let missing = client
        .get(server.url("/api/v1/nope"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"], "not_found");

    let unauthorized = |res: reqwest::Response| async move {
        assert_eq!(res.status(), 401);
        assert_eq!(header(&res, "www-authenticate").as_deref(), Some("Bearer"));
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
    };
    unauthorized(client.get(server.url("/api/v1/ping")).send().await.unwrap()).await;
    unauthorized(
        server
            .ping(&usage_auth::keys::generate_api_key().plaintext)
            .await,
    )
    .await;
    unauthorized(server.ping("not-a-key").await).await;
    let basic = client
        .get(server.url("/api/v1/ping"))
        .basic_auth("u", Some(&key))
        .send()
        .await
        .unwrap();
    unauthorized(basic).await;

    let store = db.store().await;
    let user_id = usage_core::UserId::parse(&user).unwrap();
    let key_id = store
        .api_keys_for_user(&user_id)
        .await
        .unwrap()
        .remove(0)
        .id;
    let revoked = db.cli(
        &[],
        &["keys", "revoke", "--user", &user, "--key", key_id.as_str()],
    );
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    // Another process revoked it: this server drops it at its next revocation poll.
    let mut admitted = 3; // the ping, the 405 and the 404 above
    eventually(
        "the revoked key is refused",
        Duration::from_secs(10),
        async || match server.ping(&key).await.status() {
            StatusCode::OK => {
                admitted += 1;
                false
            }
            status => status == StatusCode::UNAUTHORIZED,
        },
    )
    .await;
    assert_eq!(server.ping(&key).await.status(), 401, "and stays refused");
    let (status, _) = server.stop();
    assert!(status.success());
    assert_eq!(
        db.stored(&user).await,
        (admitted, admitted, 0),
        "only admitted calls are recorded"
    );
}

async fn a_restart_keeps_the_counts(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("free@example.com", "free");
    let env = [
        ("FREE_MONTHLY_CALLS", "10"),
        ("USAGE_FLUSH_INTERVAL_MS", "3600000"),
    ];

    let server = db.start(&env);
    for _ in 0..6 {
        assert_eq!(server.ping(&key).await.status(), 200);
    }
    assert!(server.stop().0.success());

    let server = db.start(&env);
    let mut admitted = 0;
    loop {
        match server.ping(&key).await.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => break,
            other => panic!("unexpected {other}"),
        }
        assert!(
            admitted <= 10,
            "the limit was not enforced after the restart"
        );
    }
    assert_eq!(
        admitted, 4,
        "6 before the restart + 4 after = the limit of 10"
    );
    assert!(server.stop().0.success());
    assert_eq!(db.stored(&user).await, (10, 10, 0));
}

/// Makes the database refuse inserts into `eco_api_usage` (or accept them again).
fn refuse_usage_writes(db: &Db, refuse: bool) {
    match &db.pg {
        Some(pg) => {
            let sql = if refuse {
                "CREATE FUNCTION refuse_usage() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'writes refused by the test'; END $$; \
                 CREATE TRIGGER refuse_usage BEFORE INSERT ON eco_api_usage \
                 FOR EACH ROW EXECUTE FUNCTION refuse_usage();"
            } else {
                "DROP TRIGGER refuse_usage ON eco_api_usage;"
            };
            pg.psql(sql).unwrap();
        }
        None => {
            use diesel::connection::SimpleConnection;
            use diesel::{Connection, SqliteConnection};
            let path = db.url.strip_prefix("sqlite://").unwrap();
            let mut conn = SqliteConnection::establish(path).unwrap();
            let sql = if refuse {
                "PRAGMA busy_timeout = 10000; CREATE TRIGGER refuse_usage BEFORE INSERT ON eco_api_usage \
                 BEGIN SELECT RAISE(ABORT, 'writes refused by the test'); END;"
            } else {
                "PRAGMA busy_timeout = 10000; DROP TRIGGER refuse_usage;"
            };
            conn.batch_execute(sql).unwrap();
        }
    }
}

async fn a_database_refusing_writes_loses_nothing(backend: Backend) {
    const CALLS: usize = 30;
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("pro@example.com", "pro");
    let server = db.start(&[
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
        ("USAGE_BATCH_SIZE", "10"),
        ("USAGE_RETRY_MAX_MS", "200"),
    ]);
    refuse_usage_writes(&db, true);
    for _ in 0..CALLS {
        assert_eq!(
            server.ping(&key).await.status(),
            200,
            "calls go on from memory"
        );
    }
    eventually("writes failing", Duration::from_secs(20), async || {
        server.metric("usage_tracker_flush_failures_total").await >= 3.0
    })
    .await;
    assert_eq!(
        db.stored(&user).await.0,
        0,
        "nothing got through while refused"
    );

    refuse_usage_writes(&db, false);
    server.wait_flushed(CALLS as u64).await;
    // Each failed write was logged inside the span of the batch it was writing.
    let retries: Vec<String> = server
        .log()
        .into_iter()
        .filter(|l| l.contains("will retry"))
        .collect();
    assert!(!retries.is_empty());
    assert!(
        retries
            .iter()
            .all(|l| l.contains("usage_batch_write{events=")),
        "{retries:?}"
    );
    assert!(server.stop().0.success());
    assert_eq!(db.stored(&user).await, (CALLS as u64, CALLS as u64, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_window_limit_is_configured_per_plan() {
    let db = Db::new(Backend::Sqlite);
    let (user, key) = db.user_with_key("pro@example.com", "pro");
    let server = db.start(&[
        ("RATE_LIMIT_PRO_PER_SEC", "1"),
        ("RATE_LIMIT_PRO_BURST", "2"),
    ]);
    for remaining in ["1", "0"] {
        let res = server.ping(&key).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            header(&res, "x-ratelimit-burst-limit").as_deref(),
            Some("2")
        );
        assert_eq!(
            header(&res, "x-ratelimit-burst-remaining").as_deref(),
            Some(remaining)
        );
    }
    let limited = server.ping(&key).await;
    assert_eq!(limited.status(), 429);
    assert!(header(&limited, "retry-after").is_some());
    assert_eq!(
        limited.json::<Value>().await.unwrap()["error"],
        "rate_limited"
    );
    assert_eq!(
        server
            .metric("usage_requests_total{outcome=\"rate_limited\"}")
            .await,
        1.0
    );
    assert!(server.stop().0.success());
    assert_eq!(
        db.stored(&user).await,
        (2, 2, 0),
        "the limited call is not recorded"
    );
}
