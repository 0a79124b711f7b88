//! A batch naming more distinct users than one SQLite statement may bind (32,766): the
//! server writes up to `USAGE_MAX_BATCH` (at most 100,000) calls at once, and each may
//! come from a different customer.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use diesel::Connection as _;
use diesel::connection::SimpleConnection as _;
use time::macros::datetime;
use usage_core::event::new_event_id;
use usage_core::repo::IncludedCalls;
use usage_core::{ApiKeyId, UsageEvent, UserId};
use usage_store::PoolOptions;

const USERS: usize = 40_000;

#[tokio::test]
async fn a_batch_from_more_users_than_a_statement_binds_is_stored_and_counted() {
    let dir = std::env::temp_dir().join(format!("usage-sqlite-{}", uuid::Uuid::now_v7()));
    let path = dir.join("usage.db");
    let url = format!("sqlite://{}", path.display());
    usage_store::migrate(&url).await.expect("migrate");
    // Seeding 40,000 users through the repositories would take most of the test's time:
    // one statement makes them, and the one key every call carries.
    let mut conn = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    conn.batch_execute(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {USERS})
         INSERT INTO eco_users (id, email, plan, created_at)
         SELECT printf('eco_usr_%08d', i), printf('u%d@example.com', i), 'pro',
                '2026-12-01T00:00:00.000000Z' FROM n;
         INSERT INTO eco_api_keys (id, user_id, name, prefix, key_hash, created_at)
         VALUES ('eco_key_shared', 'eco_usr_00000001', 'k', 'eco_live_abcd', 'h',
                 '2026-12-01T00:00:00.000000Z');"
    ))
    .unwrap();
    drop(conn);

    let store = usage_store::open(&url, &PoolOptions::default())
        .await
        .expect("open");
    let at = datetime!(2026-12-02 10:00 UTC);
    let key = ApiKeyId::from_stored("eco_key_shared".to_owned());
    let events: Vec<UsageEvent> = (1..=USERS)
        .map(|i| UsageEvent {
            event_id: new_event_id(at),
            user_id: UserId::from_stored(format!("eco_usr_{i:08}")),
            api_key_id: key.clone(),
            endpoint: "/api/v1/ping".to_owned(),
            method: "GET".to_owned(),
            status_code: 200,
            response_time_ms: 1,
            created_at: at,
            units: Default::default(),
        })
        .collect();

    let outcome = store
        .record_usage(&events, &IncludedCalls::new())
        .await
        .expect("a batch of 40,000 customers is written");
    assert_eq!(outcome.inserted, USERS as u64);
    assert_eq!(outcome.duplicates, 0);
    for i in [1, USERS / 2, USERS] {
        let user = UserId::from_stored(format!("eco_usr_{i:08}"));
        let record = store
            .usage_record(&user, datetime!(2026-12-01 00:00 UTC))
            .await
            .unwrap()
            .expect("a counter for each customer");
        assert_eq!(record.api_calls, 1, "{user}");
    }

    // A user missing from the batch's many is still found.
    let mut stranger = events[0].clone();
    stranger.event_id = new_event_id(at);
    stranger.user_id = UserId::from_stored("eco_usr_unknown".to_owned());
    let mut with_stranger = events[1..].to_vec();
    for e in &mut with_stranger {
        e.event_id = new_event_id(at);
    }
    with_stranger.push(stranger);
    let refused = store
        .record_usage(&with_stranger, &IncludedCalls::new())
        .await;
    assert!(
        matches!(
            refused,
            Err(usage_core::RepoError::NotFound { entity: "user" })
        ),
        "{refused:?}"
    );

    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
