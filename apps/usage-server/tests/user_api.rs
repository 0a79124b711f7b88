//! The customer's endpoints (user JWT) against the real server on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
        let res = client
            .get(server.url("/api/v1/ping"))
            .bearer_auth(&pro_key)
            .send()
            .await
            .unwrap();
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

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn current_usage_counts_calls_not_yet_written() {
        super::current_usage_counts_calls_not_yet_written(super::Backend::Sqlite).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_bad_token_gets_401() {
        super::every_bad_token_gets_401(super::Backend::Sqlite).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn current_usage_counts_calls_not_yet_written() {
        super::current_usage_counts_calls_not_yet_written(super::Backend::Postgres).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_bad_token_gets_401() {
        super::every_bad_token_gets_401(super::Backend::Postgres).await;
    }
}
