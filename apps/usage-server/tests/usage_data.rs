//! The life of raw calls on both backends: a customer pages through their calls
//! (`GET /api/usage/events`), an operator exports them (`usage-server export`) and removes
//! those past the retention (`prune-usage`, and the server's daily run) while the history
//! keeps them through the daily aggregate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{Backend, Db, eventually};
use serde_json::Value;
use time::OffsetDateTime;
use usage_core::event::new_event_id;
use usage_core::repo::IncludedCalls;
use usage_core::{ApiKeyId, UsageEvent, UserId};

async fn get(url: &str, token: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn customers_page_through_and_export_their_calls(backend: Backend) {
    let db = Db::new(backend);
    let (ada, key) = db.user_with_key("ada@example.com", "pro");
    let (_bob, bob_key) = db.user_with_key("bob@example.com", "pro");
    let server = db.start(&[("USAGE_FLUSH_INTERVAL_MS", "100")]);
    for _ in 0..23 {
        assert_eq!(server.ping(&key).await.status(), 200);
    }
    for _ in 0..4 {
        assert_eq!(server.ping(&bob_key).await.status(), 200);
    }
    server.wait_flushed(27).await;
    let token = db.create(&["token", "--user", &ada]);

    // Pages of 10, newest first, until next_cursor is null: each call once, only Ada's.
    let mut seen = Vec::new();
    let mut url = server.url("/api/usage/events?limit=10");
    loop {
        let (status, page) = get(&url, &token).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 10);
        for item in items {
            assert_eq!(item["endpoint"], "/api/v1/ping");
            assert_eq!(
                (item["method"].as_str(), item["status_code"].as_u64()),
                (Some("GET"), Some(200))
            );
            assert!(item["key_id"].as_str().unwrap().starts_with("eco_key_"));
            seen.push((
                item["created_at"].as_str().unwrap().to_owned(),
                item["event_id"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                url = server.url(&format!("/api/usage/events?limit=10&cursor={cursor}"))
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 23);
    assert_eq!(seen.iter().map(|s| &s.1).collect::<HashSet<_>>().len(), 23);
    let times: Vec<OffsetDateTime> = seen
        .iter()
        .map(|(t, _)| {
            OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");

    // A range before the calls is empty; bad parameters name themselves.
    let (status, page) = get(
        &server.url("/api/usage/events?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z"),
        &token,
    )
    .await;
    assert_eq!(
        (
            status,
            page["items"].as_array().unwrap().len(),
            page["next_cursor"].is_null()
        ),
        (200, 0, true)
    );
    for (query, name) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("from=yesterday", "from"),
        ("to=2020-01-01T00:00:00Z", "from must be before to"),
        ("cursor=nope", "cursor"),
        ("order=asc", "unknown parameter"),
    ] {
        let (status, body) = get(&server.url(&format!("/api/usage/events?{query}")), &token).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_parameter")),
            "{query}: {body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains(name),
            "{query}: {body}"
        );
    }
    let res = reqwest::get(server.url("/api/usage/events")).await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(server.stop().0.success());

    // The export: the same calls, as NDJSON and as CSV.
    let out = db.cli(&[], &["export", "--user", &ada]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exported: HashSet<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["created_at"].as_str().unwrap().to_owned(),
                l["event_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(exported, seen.iter().cloned().collect::<HashSet<_>>());
    let out = db.cli(&[], &["export", "--user", &ada, "--format", "csv"]);
    assert!(out.status.success(), "{out:?}");
    let csv = String::from_utf8(out.stdout).unwrap();
    let mut rows = csv.lines();
    // A call's columns first, as before events were exported too; then the kind and
    // what calls and events add (empty for calls without units).
    assert_eq!(
        rows.next(),
        Some(
            "event_id,key_id,endpoint,method,status_code,response_time_ms,created_at,\
             kind,units,source,meter,quantity"
        )
    );
    assert_eq!(
        rows.filter(|r| r.contains(",/api/v1/ping,GET,200,") && r.ends_with(",call,,,,"))
            .count(),
        23
    );
    let out = db.cli(
        &[],
        &["export", "--user", &ada, "--from", "2999-01-01T00:00:00Z"],
    );
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let out = db.cli(&[], &["export", "--user", &UserId::generate().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no user with id"),
        "{out:?}"
    );
    let out = db.cli(
        &[],
        &[
            "export",
            "--user",
            &ada,
            "--from",
            "2030-01-01T00:00:00Z",
            "--to",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--from must be before --to"),
        "{out:?}"
    );
    let out = db.cli(&[], &["export", "--user", &ada, "--to", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RFC 3339"),
        "{out:?}"
    );

    // A reader that stops after one line ends the export quietly.
    let mut child = db
        .command(&[])
        .args(["export", "--user", &ada])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with('{'), "{first}");
    assert!(child.wait().unwrap().success());
}

/// `n` calls of `user` at `at`, stored as the tracker would have.
async fn store_calls(db: &Db, user: &str, key: &ApiKeyId, at: OffsetDateTime, n: usize) {
    let user = UserId::parse(user).unwrap();
    let events: Vec<UsageEvent> = (0..n)
        .map(|i| UsageEvent {
            event_id: new_event_id(at),
            user_id: user.clone(),
            api_key_id: key.clone(),
            endpoint: "/api/v1/ping".to_owned(),
            method: "GET".to_owned(),
            status_code: 200,
            response_time_ms: 2,
            created_at: at + time::Duration::milliseconds(i as i64),
            units: Default::default(),
        })
        .collect();
    let mut included = IncludedCalls::new();
    included.insert(user, 1_000_000);
    db.store()
        .await
        .record_usage(&events, &included)
        .await
        .unwrap();
}

async fn old_calls_go_and_the_history_keeps_them(backend: Backend) {
    let db = Db::new(backend);
    let (ada, api_key) = db.user_with_key("ada@example.com", "pro");
    let store = db.store().await;
    let key_id = store
        .api_keys_for_user(&UserId::parse(&ada).unwrap())
        .await
        .unwrap()[0]
        .id
        .clone();
    let day = OffsetDateTime::now_utc().date() - time::Duration::days(100);
    let old = day.midnight().assume_utc() + time::Duration::hours(10);
    store_calls(&db, &ada, &key_id, old, 6).await;

    let out = db.cli(&[], &["prune-usage"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("USAGE_RETENTION_DAYS"),
        "{out:?}"
    );
    let out = db.cli(&[("USAGE_RETENTION_DAYS", "0")], &["prune-usage"]);
    assert_eq!(out.status.code(), Some(2), "0 is out of range");

    // Dry run: the day is not aggregated yet, so nothing would go, and it says why.
    let retention = [("USAGE_RETENTION_DAYS", "30")];
    let out = db.cli(&retention, &["prune-usage", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    let dry: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (dry["rows"].as_u64(), dry["dry_run"].as_bool()),
        (Some(0), Some(true)),
        "{dry}"
    );
    assert!(
        dry["held_back"][0]
            .as_str()
            .unwrap()
            .contains("not aggregated"),
        "{dry}"
    );
    let user = UserId::parse(&ada).unwrap();
    let window = (old - time::Duration::days(1), old + time::Duration::days(1));
    assert_eq!(
        store
            .count_usage_events(&user, window.0, window.1)
            .await
            .unwrap(),
        6
    );

    // A run aggregates the day, then removes its calls; the history still counts them.
    let out = db.cli(&retention, &["prune-usage"]);
    assert!(out.status.success(), "{out:?}");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["rows"].as_u64(), Some(6), "{run}");
    assert!(run["held_back"].as_array().unwrap().is_empty(), "{run}");
    assert_eq!(
        store
            .count_usage_events(&user, window.0, window.1)
            .await
            .unwrap(),
        0
    );

    // The server does the same at start, and readies this month's storage.
    store_calls(&db, &ada, &key_id, old + time::Duration::hours(1), 3).await;
    let server = db.start(&retention);
    eventually(
        "the server's retention run",
        Duration::from_secs(20),
        async || {
            store
                .count_usage_events(&user, window.0, window.1)
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    let token = db.create(&["token", "--user", &ada]);
    let (status, history) = get(&server.url("/api/usage/history?days=120"), &token).await;
    assert_eq!(status, 200, "{history}");
    let that_day = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["date"] == day.to_string())
        .unwrap()
        .clone();
    assert_eq!(that_day["api_calls"], 9, "{that_day}");
    // Recent calls are untouched.
    assert_eq!(server.ping(&api_key).await.status(), 200);
    if let Some(pg) = &db.pg {
        let now = OffsetDateTime::now_utc();
        let partition = format!(
            "eco_api_usage_p{:04}_{:02}",
            now.year(),
            u8::from(now.month())
        );
        let found = pg
            .psql(&format!(
                "SELECT count(*) FROM pg_class WHERE relname = '{partition}'"
            ))
            .unwrap();
        assert_eq!(found.trim(), "1", "{partition}");
    }
    assert!(server.stop().0.success());
}

on_both_backends!(
    customers_page_through_and_export_their_calls,
    old_calls_go_and_the_history_keeps_them,
);
