//! The customer's endpoints (user JWT) against the real server on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db, SECRET};
use serde_json::Value;
use time::OffsetDateTime;
use usage_auth::jwt::{JwtConfig, JwtKeys};
use usage_core::UserId;

fn keys(secret: &str, audience: &str) -> JwtKeys {
    JwtKeys::new(&JwtConfig {
        secret: secret.as_bytes().to_vec(),
        audience: audience.to_owned(),
        issuer: None,
    })
    .unwrap()
}

async fn current_usage_counts_calls_not_yet_written(backend: Backend) {
    let db = Db::new(backend);
    let (pro, pro_key) = db.user_with_key("pro@example.com", "pro");
    let (ent, _) = db.user_with_key("ent@example.com", "enterprise");
    // Nothing is written before shutdown: the figures must come from memory.
    let server = db.start(&[
        ("PRO_MONTHLY_CALLS", "3"),
        ("USAGE_FLUSH_INTERVAL_MS", "3600000"),
    ]);
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let res = server.ping(&pro_key).await;
        assert_eq!(res.status(), 200);
    }
    // A token minted by the CLI, as a user would get one.
    let token = db.create(&["token", "--user", &pro]);
    let res = client
        .get(server.url("/api/usage/current"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let period = usage_core::BillingPeriod::containing(OffsetDateTime::now_utc());
    let rfc3339 = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    assert_eq!(body["user_id"], pro.as_str());
    assert_eq!(body["plan"], "pro");
    assert_eq!(body["period_start"], rfc3339(period.start()));
    assert_eq!(body["period_end"], rfc3339(period.end()));
    assert_eq!(body["api_calls"], 5);
    assert_eq!(body["limit"], 3);
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["overage_calls"], 2);
    assert_eq!(body["usage_percentage"], 166.67);
    assert_eq!(body["overage_cost_cents"], 0);
    assert_eq!(db.stored(&pro).await.0, 0, "none of it was written yet");

    // Another user sees only their own figures.
    let ent_token = keys(SECRET, "authenticated")
        .mint(&UserId::parse(&ent).unwrap(), 60, OffsetDateTime::now_utc())
        .unwrap();
    let res = client
        .get(server.url("/api/usage/current"))
        .bearer_auth(&ent_token)
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["user_id"].as_str(), body["api_calls"].as_u64()),
        (Some(ent.as_str()), Some(0))
    );
    assert!(body["limit"].is_null() && body["remaining"].is_null());
    assert!(server.stop().0.success());
}

async fn every_bad_token_gets_401(backend: Backend) {
    let db = Db::new(backend);
    let (user, key) = db.user_with_key("ada@example.com", "free");
    let user_id = UserId::parse(&user).unwrap();
    let server = db.start(&[]);
    let client = reqwest::Client::new();
    let now = OffsetDateTime::now_utc();
    let b64 = |json: &str| {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = json.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(
            r#"{{"sub":"{user}","exp":{},"aud":"authenticated"}}"#,
            now.unix_timestamp() + 600
        ))
    );
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("malformed", Some("not-a-jwt".to_owned())),
        (
            "wrong secret",
            Some(
                keys("another-secret-of-at-least-32-bytes!!", "authenticated")
                    .mint(&user_id, 60, now)
                    .unwrap(),
            ),
        ),
        (
            "wrong audience",
            Some(keys(SECRET, "service").mint(&user_id, 60, now).unwrap()),
        ),
        (
            "expired",
            Some(
                keys(SECRET, "authenticated")
                    .mint(&user_id, 60, now - time::Duration::hours(1))
                    .unwrap(),
            ),
        ),
        ("alg none", Some(alg_none)),
        ("an API key instead", Some(key)),
        (
            "unknown user",
            Some(
                keys(SECRET, "authenticated")
                    .mint(&UserId::generate(), 60, now)
                    .unwrap(),
            ),
        ),
    ];
    for (what, token) in cases {
        let mut req = client.get(server.url("/api/usage/current"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{what}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer", "{what}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{what}");
        assert!(
            !body["message"].as_str().unwrap().contains("Invalid"),
            "no reason leaked: {body}"
        );
    }
    let wrong_method = client
        .post(server.url("/api/usage/current"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert!(server.stop().0.success());
}

async fn the_caller_manages_their_own_keys(backend: Backend) {
    let db = Db::new(backend);
    let (ada, ada_cli_key) = db.user_with_key("ada@example.com", "pro");
    let (bob, bob_cli_key) = db.user_with_key("bob@example.com", "pro");
    // Long cache and slow poll: only the API's own eviction can make revocations immediate.
    let server = db.start(&[
        ("API_KEY_CACHE_TTL_MS", "600000"),
        ("KEY_REVOCATION_POLL_MS", "60000"),
    ]);
    let client = reqwest::Client::new();
    let ada_token = db.create(&["token", "--user", &ada]);
    let bob_token = db.create(&["token", "--user", &bob]);
    let ping = |key: String| {
        let (client, url) = (client.clone(), server.url("/api/v1/ping"));
        async move {
            client
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    // Create: 201, the key shown once, and it works at once.
    let res = client
        .post(server.url("/api/keys"))
        .bearer_auth(&ada_token)
        .json(&serde_json::json!({"name": "ci"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(created["name"], "ci");
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(ping(key.clone()).await, 200);

    // List: the caller's keys only, never the key or its hash.
    let listed: Value = client
        .get(server.url("/api/keys"))
        .bearer_auth(&ada_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "the CLI's key and the new one");
    assert_eq!(items[0]["id"], key_id.as_str(), "newest first");
    for item in items {
        let fields: Vec<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(fields.len(), 7, "{fields:?}");
        for field in [
            "id",
            "name",
            "prefix",
            "created_at",
            "last_used_at",
            "revoked_at",
            "expires_at",
        ] {
            assert!(fields.contains(&field), "{field} missing");
        }
    }
    let text = serde_json::to_string(&listed).unwrap();
    assert!(!text.contains(&key) && !text.contains(&usage_auth::keys::hash_api_key(&key)));

    // Bob cannot revoke or rotate Ada's key.
    let url = server.url(&format!("/api/keys/{key_id}"));
    assert_eq!(
        client
            .delete(&url)
            .bearer_auth(&bob_token)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let rotate_url = server.url(&format!("/api/keys/{key_id}/rotate"));
    assert_eq!(
        client
            .post(&rotate_url)
            .bearer_auth(&bob_token)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(ping(key.clone()).await, 200);
    assert_eq!(
        client
            .delete(server.url("/api/keys/not-an-id"))
            .bearer_auth(&ada_token)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Rotate: a new key works, the old one stops at once.
    let res = client
        .post(&rotate_url)
        .bearer_auth(&ada_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let rotated: Value = res.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(rotated["name"], "ci");
    assert_eq!(ping(new_key.clone()).await, 200);
    assert_eq!(ping(key).await, 401);

    // Delete: 204, and the key stops working at once.
    let new_id = rotated["id"].as_str().unwrap();
    let res = client
        .delete(server.url(&format!("/api/keys/{new_id}")))
        .bearer_auth(&ada_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(ping(new_key).await, 401);
    assert_eq!(ping(ada_cli_key).await, 200, "other keys go on");
    assert_eq!(ping(bob_cli_key).await, 200);

    // Without a token, nothing.
    assert_eq!(
        client
            .get(server.url("/api/keys"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(server.stop().0.success());
}

async fn key_requests_are_validated(backend: Backend) {
    let db = Db::new(backend);
    let (ada, _) = db.user_with_key("ada@example.com", "free");
    let server = db.start(&[]);
    let client = reqwest::Client::new();
    let token = db.create(&["token", "--user", &ada]);
    let post = |body: reqwest::Body, content_type: &'static str| {
        client
            .post(server.url("/api/keys"))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let cases: Vec<(&str, reqwest::Body, &'static str, u16, &str)> = vec![
        (
            "unknown field",
            r#"{"name":"ci","admin":true}"#.into(),
            "application/json",
            400,
            "unknown field",
        ),
        (
            "not JSON",
            "name=ci".into(),
            "application/json",
            400,
            "invalid_body",
        ),
        (
            "wrong type",
            r#"{"name":42}"#.into(),
            "application/json",
            400,
            "invalid type",
        ),
        (
            "an array, which serde would read as the fields in order",
            "[null]".into(),
            "application/json",
            400,
            "invalid type",
        ),
        (
            "wrong content type",
            r#"{"name":"ci"}"#.into(),
            "text/plain",
            400,
            "application/json",
        ),
        (
            "too large",
            format!(r#"{{"name":"{}"}}"#, "x".repeat(10_000)).into(),
            "application/json",
            413,
            "body_too_large",
        ),
        (
            "name too long",
            format!(r#"{{"name":"{}"}}"#, "x".repeat(65)).into(),
            "application/json",
            400,
            "name must be 1 to 64",
        ),
        (
            "empty name",
            r#"{"name":"  "}"#.into(),
            "application/json",
            400,
            "name must be 1 to 64",
        ),
    ];
    for (what, body, content_type, status, expected) in cases {
        let res = post(body, content_type).await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{what}");
        let text = res.text().await.unwrap();
        assert!(text.contains(expected), "{what}: {text}");
        let json: Value = serde_json::from_str(&text).unwrap();
        assert!(
            json["error"].is_string() && json["message"].is_string(),
            "{what}: {text}"
        );
    }
    // The limit of 20 active keys (one was made by the CLI).
    for i in 1..20 {
        let res = post(format!(r#"{{"name":"k{i}"}}"#).into(), "application/json")
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "key {i}");
    }
    let res = post(r#"{}"#.into(), "application/json").await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "key_limit_reached");
    assert!(server.stop().0.success());
}

async fn overage_shows_accrued_and_invoiced(backend: Backend) {
    let db = Db::new(backend);
    let (pro, key) = db.user_with_key("pro@example.com", "pro");
    let server = db.start(&[
        ("PRO_MONTHLY_CALLS", "3"),
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
    ]);
    let client = reqwest::Client::new();
    for _ in 0..8 {
        let res = server.ping(&key).await;
        assert_eq!(res.status(), 200);
    }
    server.wait_flushed(8).await;
    // Bill the first 4 overage calls, as the billing run will.
    let store = db.store().await;
    let user_id = UserId::parse(&pro).unwrap();
    let period = usage_core::BillingPeriod::containing(OffsetDateTime::now_utc());
    let charge = store
        .create_overage_charge(&usage_core::repo::NewOverageCharge {
            user_id: user_id.clone(),
            period_start: period.start(),
            meter: "api_calls".to_owned(),
            calls_from: 0,
            calls_to: 4,
            amount_cents: 0,
            idempotency_key: format!("test:{pro}:0-4"),
            created_at: OffsetDateTime::now_utc(),
        })
        .await
        .unwrap();
    store
        .complete_overage_charge(charge.id, Some("ii_test"), OffsetDateTime::now_utc())
        .await
        .unwrap();

    let token = db.create(&["token", "--user", &pro]);
    let res = client
        .get(server.url("/api/usage/overage"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["overage_calls"], 5);
    assert_eq!(
        body["overage_cost_cents"], 1,
        "5 x $0.001 = 0.5 cent, rounded half-up"
    );
    assert_eq!(body["invoiced_calls"], 4);
    assert_eq!(body["invoiced_cents"], 0);
    assert!(
        body["period_start"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("5 calls over the 3 included"),
        "{body}"
    );
    assert!(server.stop().0.success());
}

async fn history_and_endpoints(backend: Backend) {
    let db = Db::new(backend);
    let (ada, key) = db.user_with_key("ada@example.com", "pro");
    // Bob's call must not show in Ada's figures.
    let (_bob, bob_key) = db.user_with_key("bob@example.com", "pro");
    let server = db.start(&[("USAGE_FLUSH_INTERVAL_MS", "100")]);
    let client = reqwest::Client::new();
    for _ in 0..3 {
        client
            .get(server.url("/api/v1/ping"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
    }
    client
        .get(server.url("/api/v1/nope"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    client
        .get(server.url("/api/v1/ping"))
        .bearer_auth(&bob_key)
        .send()
        .await
        .unwrap();
    server.wait_flushed(5).await;
    let token = db.create(&["token", "--user", &ada]);
    let get = |path: &str| client.get(server.url(path)).bearer_auth(&token).send();

    let history: Value = get("/api/usage/history?days=3")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["days"], 3);
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "one item per day, zero-filled");
    let today = OffsetDateTime::now_utc().date();
    assert_eq!(
        items[2]["date"],
        today.to_string(),
        "oldest first, today last"
    );
    assert_eq!(
        (
            items[2]["api_calls"].as_u64(),
            items[2]["error_calls"].as_u64()
        ),
        (Some(4), Some(1))
    );
    assert_eq!(
        (
            items[0]["api_calls"].as_u64(),
            items[1]["api_calls"].as_u64()
        ),
        (Some(0), Some(0))
    );
    let default: Value = get("/api/usage/history")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(default["items"].as_array().unwrap().len(), 30);

    let endpoints: Value = get("/api/usage/endpoints")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(endpoints["days"], 7);
    let items = endpoints["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "only ada's routes: {endpoints}");
    assert_eq!(
        (items[0]["endpoint"].as_str(), items[0]["method"].as_str()),
        (Some("/api/v1/ping"), Some("GET"))
    );
    assert_eq!(
        (items[0]["calls"].as_u64(), items[0]["error_calls"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(
        (
            items[1]["endpoint"].as_str(),
            items[1]["error_calls"].as_u64()
        ),
        (Some("<unmatched>"), Some(1))
    );
    assert!(items[0]["avg_response_time_ms"].is_number());

    for (path, expected) in [
        (
            "/api/usage/history?days=0",
            "days must be a whole number from 1 to 365",
        ),
        (
            "/api/usage/history?days=366",
            "days must be a whole number from 1 to 365",
        ),
        (
            "/api/usage/history?days=abc",
            "days must be a whole number from 1 to 365",
        ),
        (
            "/api/usage/history?days=-5",
            "days must be a whole number from 1 to 365",
        ),
        (
            "/api/usage/endpoints?days=91",
            "days must be a whole number from 1 to 90",
        ),
        (
            "/api/usage/endpoints?days=99999999999999999999",
            "days must be a whole number from 1 to 90",
        ),
    ] {
        let res = get(path).await.unwrap();
        assert_eq!(res.status(), 400, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_parameter");
        assert!(
            body["message"].as_str().unwrap().starts_with(expected),
            "{path}: {body}"
        );
    }
    assert!(server.stop().0.success());
}

/// Three days of a real server on a shifted clock: two in January, one in February.
async fn history_across_a_month_boundary(backend: Backend) {
    let db = Db::new(backend);
    let (ada, key) = db.user_with_key("ada@example.com", "pro");
    let client = reqwest::Client::new();
    let env = |start: &'static str| {
        [
            ("USAGE_CLOCK_START", start),
            ("PRO_MONTHLY_CALLS", "4"),
            ("DAILY_AGGREGATION", "false"),
        ]
    };
    // 30 January: two calls.
    let server = db.start(&env("2030-01-30T12:00:00Z"));
    for _ in 0..2 {
        assert_eq!(server.ping(&key).await.status(), 200);
    }
    assert!(server.stop().0.success());
    // 31 January: three calls, one of them to an unknown route (an error).
    let server = db.start(&env("2030-01-31T12:00:00Z"));
    for _ in 0..2 {
        assert_eq!(server.ping(&key).await.status(), 200);
    }
    let res = client
        .get(server.url("/api/v1/nope"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert!(server.stop().0.success());
    for date in ["2030-01-30", "2030-01-31"] {
        // The CLI's own idea of today must be past the day, as it would be in February.
        let out = db.cli(&env("2030-02-01T00:00:01Z"), &["aggregate", "--date", date]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!(r#"{{"date":"{date}","users":1}}"#)
        );
    }
    // 1 February: a new period; January's five calls (one over the limit of 4) stay there.
    let server = db.start(&env("2030-02-01T00:00:05Z"));
    let res = server.ping(&key).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "3");
    server.wait_flushed(1).await;
    let token = db.create(&["token", "--user", &ada]);
    let get = |path: &str| client.get(server.url(path)).bearer_auth(&token).send();
    let history: Value = get("/api/usage/history?days=4")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let days: Vec<(String, u64, u64)> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["date"].as_str().unwrap().to_owned(),
                d["api_calls"].as_u64().unwrap(),
                d["error_calls"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        days,
        [
            ("2030-01-29".to_owned(), 0, 0),
            ("2030-01-30".to_owned(), 2, 0),
            ("2030-01-31".to_owned(), 3, 1),
            ("2030-02-01".to_owned(), 1, 0),
        ]
    );
    let current: Value = get("/api/usage/current")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current["period_start"], "2030-02-01T00:00:00Z");
    assert_eq!(current["period_end"], "2030-03-01T00:00:00Z");
    assert_eq!(
        (
            current["api_calls"].as_u64(),
            current["overage_calls"].as_u64()
        ),
        (Some(1), Some(0))
    );
    assert!(server.stop().0.success());
    let january = db
        .store()
        .await
        .usage_record(
            &UserId::parse(&ada).unwrap(),
            time::macros::datetime!(2030-01-01 00:00 UTC),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((january.api_calls, january.overage_calls), (5, 1));
}

async fn rotation_with_a_grace_period(backend: Backend) {
    let db = Db::new(backend);
    let (ada, key) = db.user_with_key("ada@example.com", "pro");
    let server = db.start(&[]);
    let client = reqwest::Client::new();
    let token = db.create(&["token", "--user", &ada]);
    let listed: Value = client
        .get(server.url("/api/keys"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = listed["items"][0]["id"].as_str().unwrap().to_owned();
    let rotate = |body: &'static str| {
        client
            .post(server.url(&format!("/api/keys/{key_id}/rotate")))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Bad grace periods name the parameter and its range; nothing changes.
    for (body, expected) in [
        (
            r#"{"grace_secs": 86401}"#,
            "grace_secs must be between 0 and 86400",
        ),
        (
            r#"{"grace_secs": -1}"#,
            "grace_secs must be between 0 and 86400",
        ),
        (
            r#"{"grace_secs": "soon"}"#,
            "grace_secs must be between 0 and 86400",
        ),
        (r#"{"grace": 10}"#, "unknown field"),
        ("[3600]", "invalid type"),
        ("not json", "invalid_body"),
    ] {
        let res = rotate(body).await.unwrap();
        assert_eq!(res.status(), 400, "{body}");
        let text = res.text().await.unwrap();
        assert!(text.contains(expected), "{body}: {text}");
    }
    assert_eq!(server.ping(&key).await.status(), 200);
    let keys_now: Value = client
        .get(server.url("/api/keys"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        keys_now["items"].as_array().unwrap().len(),
        1,
        "no key issued"
    );

    // With a grace period both keys work; the old one expires at its end.
    let res = rotate(r#"{"grace_secs": 3600}"#).await.unwrap();
    assert_eq!(res.status(), 201);
    let rotated: Value = res.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(server.ping(&new_key).await.status(), 200);
    assert_eq!(
        server.ping(&key).await.status(),
        200,
        "the old key, in its grace"
    );
    let listed: Value = client
        .get(server.url("/api/keys"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let old = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id.as_str())
        .unwrap();
    assert!(old["revoked_at"].is_null());
    let expires = time::OffsetDateTime::parse(
        old["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::minutes(55) && left <= time::Duration::hours(1),
        "{left}"
    );
    assert!(server.stop().0.success());
}

on_both_backends!(
    rotation_with_a_grace_period,
    current_usage_counts_calls_not_yet_written,
    history_across_a_month_boundary,
    every_bad_token_gets_401,
    history_and_endpoints,
    key_requests_are_validated,
    overage_shows_accrued_and_invoiced,
    the_caller_manages_their_own_keys,
);
