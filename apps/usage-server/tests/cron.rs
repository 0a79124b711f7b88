//! The daily aggregation through the cron endpoint and the CLI, on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db};
use serde_json::Value;
use time::OffsetDateTime;
use usage_core::UserId;

async fn aggregates_through_the_cron_endpoint_and_the_cli(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    let secret = "cron-secret-cron-secret-cron-secret";
    let server = db.start(&[("CRON_SECRET", secret), ("USAGE_FLUSH_INTERVAL_MS", "100")]);
    let client = reqwest::Client::new();
    for _ in 0..4 {
        let res = server.ping(&key).await;
        assert_eq!(res.status(), 200);
    }
    server.wait_flushed(4).await;

    let today = OffsetDateTime::now_utc().date();
    let url = |q: &str| server.url(&format!("/api/cron/aggregate-daily{q}"));
    let call = |q: String, auth: Option<&'static str>| {
        let mut req = client.post(url(&q));
        if let Some(auth) = auth {
            req = req.bearer_auth(auth);
        }
        req.send()
    };
    let res = call(String::new(), None).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    // The refusal names what is missing: the cron secret, not a user token.
    let body: Value = res.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("CRON_SECRET"), "{body}");
    assert!(!message.contains("user token"), "{body}");
    assert_eq!(
        call(String::new(), Some("wrong-secret-wrong-secre"))
            .await
            .unwrap()
            .status(),
        401
    );
    for (query, expected) in [
        ("?date=yesterday", "date must be a day as YYYY-MM-DD"),
        ("?date=2026-02-30", "date must be a day as YYYY-MM-DD"),
        ("?date=2999-01-01", "date must not be after today"),
        ("?date=-0001-12-31", "from 0000-01-01 to 9999-12-31"),
        ("?date=+10000-01-01", "date must be a day as YYYY-MM-DD"),
        ("?date=9999-12-31", "date must not be after today"),
    ] {
        let res = call(
            query.to_owned(),
            Some("cron-secret-cron-secret-cron-secret"),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 400, "{query}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_parameter");
        assert!(
            body["message"].as_str().unwrap().contains(expected),
            "{query}: {body}"
        );
    }
    for _ in 0..2 {
        let res = call(
            format!("?date={today}"),
            Some("cron-secret-cron-secret-cron-secret"),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({"date": today.to_string(), "users": 1})
        );
    }
    let store = db.store().await;
    let rows = store
        .daily_usage(&UserId::parse(&user).unwrap(), today, today)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "running twice gives the same single row");
    assert_eq!((rows[0].api_calls, rows[0].error_calls), (4, 0));
    assert_eq!(rows[0].top_endpoints[0].endpoint, "/api/v1/ping");
    assert!(server.stop().0.success());

    // The CLI does the same and prints the same summary.
    let out = db.cli(&[], &["aggregate", "--date", &today.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed,
        serde_json::json!({"date": today.to_string(), "users": 1})
    );
    let bad = db.cli(&[], &["aggregate", "--date", "21/11/2026"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("date must be a day as YYYY-MM-DD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cron_secret_the_endpoint_does_not_exist() {
    let db = Db::new(Backend::Sqlite);
    let server = db.start(&[]);
    let client = reqwest::Client::new();
    // The credential is checked before the parameters: bad parameters are a 404 too.
    for (method, path) in [
        ("POST", "/api/cron/aggregate-daily"),
        ("POST", "/api/cron/aggregate-daily?date=yesterday"),
        ("POST", "/api/cron/aggregate-daily?date=%zz"),
        ("POST", "/api/cron/process-overage?dry_run=maybe"),
        ("GET", "/api/cron/overage-reconciliation?x=1"),
    ] {
        let res = client
            .request(method.parse().unwrap(), server.url(path))
            .bearer_auth("anything")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{method} {path}");
    }
    assert!(server.stop().0.success());
}

#[test]
fn the_server_refuses_to_start_with_a_short_shared_secret() {
    let db = Db::new(Backend::Sqlite);
    for var in ["CRON_SECRET", "STRIPE_WEBHOOK_SECRET"] {
        let short = "s".repeat(31);
        let mut child = db
            .command(&[(var, short.as_str()), ("BIND_ADDR", "127.0.0.1:0")])
            .arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!("{var} must be at least 32 bytes long")),
            "{var}: {stderr}"
        );
    }
    // 32 bytes is enough.
    let ok = db.cli(&[("CRON_SECRET", &"s".repeat(32))], &["migrate"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

on_both_backends!(aggregates_through_the_cron_endpoint_and_the_cli,);
