//! Data over time, on both backends: past days in the history count every call stored
//! for them (aggregated or not, stored late or not), missed days are aggregated at start,
//! and the admin audit log is kept only as long as configured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration as StdDuration;

use common::{Backend, Db, eventually};
use serde_json::Value;
use time::{Duration, OffsetDateTime};
use usage_core::event::new_event_id;
use usage_core::repo::{AdminAuditEntry, DeadLetter, IncludedCalls};
use usage_core::{ApiKeyId, UsageEvent, UserId};

/// `n` calls of `user` with `key` at `at` (a millisecond apart), stored straight into the
/// database as a spool replay or a late batch would.
async fn store_calls(db: &Db, user: &UserId, key: &ApiKeyId, n: usize, at: OffsetDateTime) {
    let events: Vec<UsageEvent> = (0..n)
        .map(|i| {
            let at = at + Duration::milliseconds(i as i64);
            UsageEvent {
                event_id: new_event_id(at),
                user_id: user.clone(),
                api_key_id: key.clone(),
                endpoint: "/api/v1/ping".to_owned(),
                method: "GET".to_owned(),
                status_code: 200,
                response_time_ms: 2,
                created_at: at,
                units: Default::default(),
            }
        })
        .collect();
    let stored = db
        .store()
        .await
        .record_usage(&events, &IncludedCalls::new())
        .await
        .unwrap();
    assert_eq!(stored.inserted, n as u64);
}

async fn history(server: &common::Server, token: &str) -> Vec<(String, u64)> {
    let body: Value = reqwest::Client::new()
        .get(server.url("/api/usage/history?days=3"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["date"].as_str().unwrap().to_owned(),
                d["api_calls"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn past_days_count_every_stored_call(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    let token = db.create(&["token", "--user", &user]);
    let user = UserId::parse(&user).unwrap();
    let key_id = db
        .store()
        .await
        .api_key_by_hash(&usage_auth::keys::hash_api_key(&key))
        .await
        .unwrap()
        .unwrap()
        .id;
    let today = OffsetDateTime::now_utc().date();
    let noon = |days_ago: i64| {
        (today - Duration::days(days_ago)).midnight().assume_utc() + Duration::hours(12)
    };
    let day = |days_ago: i64| (today - Duration::days(days_ago)).to_string();
    // Stored while no server ran: nobody aggregated those days.
    store_calls(&db, &user, &key_id, 17, noon(1)).await;
    store_calls(&db, &user, &key_id, 5, noon(2)).await;

    // Without the built-in schedule the days stay unaggregated: counted from the events.
    let server = db.start(&[("DAILY_AGGREGATION", "false")]);
    assert_eq!(
        history(&server, &token).await,
        vec![(day(2), 5), (day(1), 17), (day(0), 0)]
    );
    assert!(server.stop().0.success());

    // With it, the missed days are aggregated at start.
    let server = db.start(&[]);
    let store = db.store().await;
    eventually(
        "the missed days aggregated",
        StdDuration::from_secs(30),
        async || {
            store
                .aggregated_days(today - Duration::days(2), today - Duration::days(1))
                .await
                .unwrap()
                .len()
                == 2
        },
    )
    .await;
    assert_eq!(
        history(&server, &token).await,
        vec![(day(2), 5), (day(1), 17), (day(0), 0)]
    );
    // Calls stored late for an aggregated day count at once.
    store_calls(&db, &user, &key_id, 3, noon(1) + Duration::hours(1)).await;
    assert_eq!(
        history(&server, &token).await,
        vec![(day(2), 5), (day(1), 20), (day(0), 0)]
    );
    assert!(
        store
            .aggregated_days(today - Duration::days(1), today - Duration::days(1))
            .await
            .unwrap()
            .is_empty(),
        "yesterday is stale until aggregated again"
    );
    assert!(server.stop().0.success());
}

async fn old_audit_entries_are_removed(backend: Backend) {
    let db = Db::new(backend);
    let bad = db.cli(&[("ADMIN_AUDIT_RETENTION_DAYS", "-1")], &["migrate"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("admin-audit-retention-days"));
    assert!(db.cli(&[], &["migrate"]).status.success());
    let store = db.store().await;
    let admin = UserId::generate();
    let now = OffsetDateTime::now_utc();
    for days_ago in [120, 91, 89, 1] {
        store
            .record_admin_action(&AdminAuditEntry {
                id: 0,
                admin_id: admin.clone(),
                method: "GET".to_owned(),
                route: "/api/admin/audit".to_owned(),
                params: String::new(),
                status: 200,
                created_at: now - Duration::days(days_ago),
            })
            .await
            .unwrap();
    }
    let server = db.start(&[("ADMIN_AUDIT_RETENTION_DAYS", "90")]);
    eventually(
        "entries older than 90 days removed",
        StdDuration::from_secs(30),
        async || store.admin_actions(0, 10).await.unwrap().0 == 2,
    )
    .await;
    let (_, left) = store.admin_actions(0, 10).await.unwrap();
    assert!(left.iter().all(|e| now - e.created_at < Duration::days(90)));
    assert!(server.stop().0.success());
}

async fn dead_letters_are_listed_and_replayed_from_the_cli(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "pro");
    let store = db.store().await;
    let user = UserId::parse(&user).unwrap();
    let key_id = store
        .api_key_by_hash(&usage_auth::keys::hash_api_key(&key))
        .await
        .unwrap()
        .unwrap()
        .id;
    let now = OffsetDateTime::now_utc();
    let letter = |user: &UserId, key: &ApiKeyId| DeadLetter {
        event: UsageEvent {
            event_id: new_event_id(now),
            user_id: user.clone(),
            api_key_id: key.clone(),
            endpoint: "/api/v1/ping".to_owned(),
            method: "GET".to_owned(),
            status_code: 200,
            response_time_ms: 1,
            created_at: now,
            units: Default::default(),
        },
        included_calls: None,
        reason: "user not found".to_owned(),
        failed_at: now,
    };
    store
        .record_dead_letters(&[
            letter(&user, &key_id),
            letter(&UserId::generate(), &ApiKeyId::generate()),
        ])
        .await
        .unwrap();
    let json = |args: &[&str]| -> Value { serde_json::from_str(&db.create(args)).unwrap() };
    let listed = json(&["dead-letters"]);
    assert_eq!(listed["count"], 2);
    assert_eq!(listed["items"][0]["reason"], "user not found");
    assert_eq!(
        json(&["dead-letters", "--replay"]),
        serde_json::json!({"stored": 1, "already_stored": 0, "still_refused": 1})
    );
    assert_eq!(json(&["dead-letters"])["count"], 1);
    assert_eq!(
        db.stored(user.as_str()).await.0,
        1,
        "the replayed call is stored"
    );
}

on_both_backends!(
    dead_letters_are_listed_and_replayed_from_the_cli,
    past_days_count_every_stored_call,
    old_audit_entries_are_removed,
);
