//! `POST /api/events` against the real server on both backends: the secret, the batch's
//! limits, each event's own error without losing the batch's good events, `(source, id)`
//! stored once (a replayed batch changes nothing), subjects by user or key id, late events
//! in their own period, and what the events add up to in the store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db, token};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use usage_core::{BillingPeriod, UserId};

const INGEST: &str = "ingest-secret-ingest-secret-0123456789";

const METERS: &str = r#"
[[meters]]
key = "tokens"
name = "Tokens"
unit = "token"
aggregation = "sum"

[[meters]]
key = "seats"
name = "Seats"
unit = "seat"
aggregation = "unique_count"
"#;

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap()
}

async fn post(server: &common::Server, secret: &str, body: &Value) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(server.url("/api/events"))
        .bearer_auth(secret)
        .header("Content-Type", "application/cloudevents-batch+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn events_are_checked_one_by_one_and_stored_once(backend: Backend) {
    let db = Db::new(backend);
    let catalog = db.dir.0.join("meters.toml");
    std::fs::write(&catalog, METERS).unwrap();
    db.create(&["plans", "apply", catalog.to_str().unwrap()]);
    let (ada, _) = db.user_with_key("ada@example.com", "pro");

    // No secret: the endpoint does not exist.
    let server = db.start(&[]);
    assert_eq!(post(&server, INGEST, &json!([])).await.0, 404);
    server.stop();
    // A short secret: the server does not start, and says why.
    let out = db.cli(&[("INGEST_SECRET", "short")], &["serve"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("INGEST_SECRET"));

    let server = db.start(&[("INGEST_SECRET", INGEST)]);
    // The key's id, for a subject named by key.
    let keys = server.get_json("/api/keys", &token(&ada)).await;
    let key_id = keys["items"][0]["id"].as_str().unwrap().to_owned();

    assert_eq!(post(&server, "wrong", &json!([])).await.0, 401);
    let res = reqwest::Client::new()
        .post(server.url("/api/events"))
        .bearer_auth(INGEST)
        .header("Content-Type", "text/plain")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);
    let (status, body) = post(&server, INGEST, &json!({"id": "x"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_parameter"))
    );
    let (status, body) = post(&server, INGEST, &Value::Array(vec![json!({}); 1_001])).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("too_many_events"))
    );

    let now = OffsetDateTime::now_utc();
    let event = |id: &str, data: Value| {
        json!({"specversion": "1.0", "id": id, "source": "inference-api", "type": "tokens",
               "subject": ada, "time": rfc3339(now), "data": data})
    };
    let mut by_key = event("k1", json!({"quantity": 100}));
    by_key["subject"] = json!(key_id);
    let mut late = event("late", json!({"quantity": 7}));
    let last_period = BillingPeriod::containing(now).start() - time::Duration::seconds(1);
    late["time"] = json!(rfc3339(last_period));
    let mut too_old = event("old", json!({"quantity": 1}));
    too_old["time"] = json!(rfc3339(now - time::Duration::days(36)));
    let mut ahead = event("ahead", json!({"quantity": 1}));
    ahead["time"] = json!(rfc3339(now + time::Duration::minutes(10)));
    let mut no_time = event("untimed", json!({"quantity": 3}));
    no_time.as_object_mut().unwrap().remove("time");
    let mut unknown_meter = event("m", json!({"quantity": 1}));
    unknown_meter["type"] = json!("bytes");
    let mut calls = event("c", json!({"quantity": 1}));
    calls["type"] = json!("api_calls");
    let mut stranger = event("s", json!({"quantity": 1}));
    stranger["subject"] = json!("eco_usr_nobody0000000000");
    let mut nonsense_subject = event("n", json!({"quantity": 1}));
    nonsense_subject["subject"] = json!("ada");
    let mut no_subject = event("ns", json!({"quantity": 1}));
    no_subject.as_object_mut().unwrap().remove("subject");
    let mut bad_time = event("bt", json!({"quantity": 1}));
    bad_time["time"] = json!("yesterday");
    let mut old_spec = event("sv", json!({"quantity": 1}));
    old_spec["specversion"] = json!("0.3");
    let seat = |id: &str, value: &str| {
        let mut e = event(id, json!({"value": value}));
        e["type"] = json!("seats");
        e
    };
    let batch = json!([
        event("e1", json!({"quantity": 1234})),  // 0 accepted
        event("e1", json!({"quantity": 1})),     // 1 duplicate in the batch
        event("neg", json!({"quantity": -1})),   // 2 invalid_quantity
        event("frac", json!({"quantity": 1.5})), // 3 invalid_quantity
        event("big", json!({"quantity": 9007199254740993_u64})), // 4 invalid_quantity
        event("str", json!({"quantity": "12"})), // 5 invalid_event
        event("none", json!({})),                // 6 invalid_event
        too_old,                                 // 7 time_out_of_range
        ahead,                                   // 8 time_out_of_range
        unknown_meter,                           // 9 unknown_meter
        calls,                                   // 10 unknown_meter
        stranger,                                // 11 unknown_subject
        nonsense_subject,                        // 12 unknown_subject
        no_subject,                              // 13 invalid_event
        bad_time,                                // 14 invalid_event
        old_spec,                                // 15 invalid_event
        "not an object",                         // 16 invalid_event
        by_key,                                  // 17 accepted
        late,                                    // 18 accepted
        no_time,                                 // 19 accepted
        event("exp", json!({"quantity": 1e3})),  // 20 accepted: 1,000
        seat("s1", "alice"),                     // 21 accepted
        seat("s2", "bob"),                       // 22 accepted
        seat("s3", "alice"),                     // 23 accepted, counts nothing more
        seat("s4", ""),                          // 24 invalid_event
        event("nul\u{0}id", json!({"quantity": 1})), // 25 invalid_event: a NUL cannot be stored
    ]);
    let (status, answer) = post(&server, INGEST, &batch).await;
    assert_eq!(status, 200, "{answer}");
    let rejected: Vec<(u64, &str)> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["error"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (2, "invalid_quantity"),
            (3, "invalid_quantity"),
            (4, "invalid_quantity"),
            (5, "invalid_event"),
            (6, "invalid_event"),
            (7, "time_out_of_range"),
            (8, "time_out_of_range"),
            (9, "unknown_meter"),
            (10, "unknown_meter"),
            (11, "unknown_subject"),
            (12, "unknown_subject"),
            (13, "invalid_event"),
            (14, "invalid_event"),
            (15, "invalid_event"),
            (16, "invalid_event"),
            (24, "invalid_event"),
            (25, "invalid_event"),
        ],
        "{answer}"
    );
    for r in answer["rejected"].as_array().unwrap() {
        assert!(!r["message"].as_str().unwrap().is_empty(), "{r}");
    }
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64()),
        (Some(8), Some(1))
    );

    // The same batch again changes nothing.
    let (_, again) = post(&server, INGEST, &batch).await;
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(9))
    );

    let store = db.store().await;
    let user = UserId::parse(&ada).unwrap();
    let period = BillingPeriod::containing(now).start();
    assert_eq!(
        store.meter_usage(&user, period).await.unwrap(),
        vec![
            ("seats".to_owned(), 2),
            ("tokens".to_owned(), 1234 + 100 + 3 + 1_000)
        ]
    );
    assert_eq!(
        store
            .meter_usage(&user, BillingPeriod::containing(last_period).start())
            .await
            .unwrap(),
        vec![("tokens".to_owned(), 7)],
        "a late event counts in its own period"
    );
    assert_eq!(
        server
            .metric("usage_ingested_events_total{outcome=\"accepted\"}")
            .await,
        8.0
    );

    // What the customer sees: the meters this period, a day's quantity, the events.
    let me = token(&ada);
    let current = server.get_json("/api/usage/current", &me).await;
    let meter = |key: &str| {
        current["meters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["meter"] == key)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(meter("tokens")["used"], 2_337, "{current}");
    assert_eq!(meter("tokens")["unit"], "token");
    assert_eq!(meter("seats")["used"], 2);
    assert_eq!(meter("api_calls")["used"], 0);
    let history = server
        .get_json("/api/usage/history?meter=tokens&days=40", &me)
        .await;
    assert_eq!(history["meter"], "tokens");
    let days = history["items"].as_array().unwrap();
    assert_eq!(days.last().unwrap()["quantity"], 2_337, "{history}");
    let total: u64 = days.iter().map(|d| d["quantity"].as_u64().unwrap()).sum();
    assert_eq!(total, 2_337 + 7, "the late event on its own day");
    let res = reqwest::Client::new()
        .get(server.url("/api/usage/history?meter=bytes"))
        .bearer_auth(&me)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("meter must be one of"),
        "{body}"
    );

    // Every event of the period, newest first, two a page.
    let mut seen = Vec::new();
    let mut path = "/api/usage/events?limit=2".to_owned();
    loop {
        let page = server.get_json(&path, &me).await;
        for item in page["items"].as_array().unwrap() {
            assert_eq!(item["kind"], "event", "{item}");
            seen.push(item["event_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/usage/events?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec!["e1", "exp", "k1", "s1", "s2", "s3", "untimed"],
        "each event of this period once (the late one is in the last)"
    );
    let all = server.get_json("/api/usage/events?limit=10", &me).await;
    let e1 = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["event_id"] == "e1")
        .unwrap()
        .clone();
    assert_eq!(
        (
            e1["source"].as_str(),
            e1["meter"].as_str(),
            e1["quantity"].as_u64()
        ),
        (Some("inference-api"), Some("tokens"), Some(1234))
    );

    // The dashboard has a panel a meter.
    let cookie = common::sign_in(&db, &server, &ada).await;
    let page = server.page("/dashboard", &cookie).await;
    assert!(page.contains("data-meter=\"tokens\""), "{page}");
    assert!(
        page.contains("class=\"used\" data-value=\"2337\""),
        "{page}"
    );
    assert!(page.contains("data-meter=\"seats\""), "{page}");

    // The export has them too, with their columns.
    let out = db.cli(&[], &["export", "--user", &ada, "--format", "csv"]);
    assert!(out.status.success());
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "event_id,key_id,endpoint,method,status_code,response_time_ms,created_at,kind,units,source,meter,quantity"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("e1,,,,,,") && l.ends_with(",event,,inference-api,tokens,1234")),
        "{csv}"
    );
    let (status, _) = server.stop();
    assert!(status.success());
}

on_both_backends!(events_are_checked_one_by_one_and_stored_once);
