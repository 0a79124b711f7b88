//! Quotas on meters other than calls, at the door of the real server on both backends: a
//! route's cost taken at admission and refused whole before the handler runs, units sent
//! through `POST /api/events` refusing the next call once a blocking limit is reached,
//! the `RateLimit-Policy`/`RateLimit` item of each limited meter, and what is stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, Db, eventually, token};
use serde_json::{Value, json};

const INGEST: &str = "ingest-secret-ingest-secret-0123456789";

const CATALOG: &str = r#"
[[meters]]
key = "tokens"
name = "Tokens"
unit = "token"
aggregation = "sum"

[[meters]]
key = "credits"
name = "Credits"
unit = "credit"
aggregation = "sum"

[[plans]]
key = "starter"
name = "Starter"
price_cents = 0
currency = "usd"
public = true

[[plans.limits]]
meter = "credits"
included = 25
over_limit = "block"

[[plans]]
key = "builder"
name = "Builder"
price_cents = 1900
currency = "usd"
public = true

[[plans.limits]]
meter = "tokens"
included = 1000
over_limit = "block"

[[plans.limits]]
meter = "credits"
included = 100
over_limit = "overage"

[plans.limits.overage]
model = "per_unit"
unit_price_micros = 10000

[[costs]]
route = "GET /api/v1/ping"
meter = "credits"
quantity = 10
"#;

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn meters_limit_calls_at_the_door(backend: Backend) {
    let db = Db::new(backend);
    let catalog = db.dir.0.join("catalog.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    db.create(&["plans", "apply", catalog.to_str().unwrap()]);
    let (ada, ada_key) = db.user_with_key("ada@example.com", "starter");
    let (bob, bob_key) = db.user_with_key("bob@example.com", "builder");
    let (admin, _) = db.user_with_key("admin@example.com", "free");
    let server = db.start(&[
        ("INGEST_SECRET", INGEST),
        ("QUOTA_SYNC_MS", "100"),
        ("ADMIN_ECO_IDS", admin.as_str()),
    ]);

    // Ada's plan allows 25 credits; each ping costs 10: two are admitted, the third would
    // take 30 and is refused before the handler, naming the meter.
    let res = server.ping(&ada_key).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "ratelimit-policy"),
        r#""credits";q=25;w=2592000"#.replace("2592000", &window(&res)),
    );
    assert!(
        header(&res, "ratelimit").starts_with(r#""credits";r=15;t="#),
        "{}",
        header(&res, "ratelimit")
    );
    assert_eq!(header(&res, "x-ratelimit-limit"), "", "no calls limit");
    assert_eq!(server.ping(&ada_key).await.status(), 200);
    let res = server.ping(&ada_key).await;
    assert_eq!(res.status(), 429);
    assert!(header(&res, "ratelimit").starts_with(r#""credits";r=5;t="#));
    assert!(!header(&res, "retry-after").is_empty());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["meter"], "credits");
    assert_eq!(body["limit"], 25);
    assert_eq!(body["used"], 20);
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("5 left") && message.contains("Upgrade to "),
        "what is left, and a plan allowing more: {body}"
    );

    // Bob's plan blocks at 1,000 tokens, which his other service reports through events:
    // once they are counted, his next call is refused naming tokens (within a sync or two).
    let res = server.ping(&bob_key).await;
    assert_eq!(res.status(), 200);
    let policy = header(&res, "ratelimit-policy");
    assert!(policy.contains(r#""tokens";q=1000"#), "{policy}");
    assert!(policy.contains(r#""credits";q=100"#), "{policy}");
    let events: Vec<Value> = (0..2)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("gen-{i}"), "source": "inference",
                   "type": "tokens", "subject": bob, "data": {"quantity": 600}})
        })
        .collect();
    let res = reqwest::Client::new()
        .post(server.url("/api/events"))
        .bearer_auth(INGEST)
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["accepted"], 2, "{answer}");
    let mut refused = Value::Null;
    eventually(
        "bob refused for tokens",
        Duration::from_secs(10),
        async || {
            let res = server.ping(&bob_key).await;
            if res.status() == 429 {
                refused = res.json().await.unwrap();
                return true;
            }
            false
        },
    )
    .await;
    assert_eq!(refused["meter"], "tokens", "{refused}");
    assert_eq!(refused["used"], 1200, "{refused}");

    // Only admitted calls are stored, each with its route's cost.
    let mut page = Value::Null;
    eventually("ada's calls stored", Duration::from_secs(10), async || {
        page = server
            .get_json("/api/usage/events?limit=100", &token(&ada))
            .await;
        page["items"].as_array().is_some_and(|i| i.len() >= 2)
    })
    .await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{page}");
    for item in items {
        assert_eq!(item["units"], json!({"credits": 10}), "{item}");
    }
    let current = server.get_json("/api/usage/current", &token(&ada)).await;
    let credits = current["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "credits")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(credits["used"], 20, "{current}");

    // The admins' view: who used the most of each meter this period.
    let top = server
        .get_json("/api/admin/meters/tokens/top", &token(&admin))
        .await;
    assert_eq!(top["meter"], "tokens", "{top}");
    assert_eq!(top["items"][0]["user_id"], bob.as_str(), "{top}");
    assert_eq!(top["items"][0]["quantity"], 1200, "{top}");
    assert_eq!(top["items"].as_array().unwrap().len(), 1, "{top}");
    let top = server
        .get_json("/api/admin/meters/credits/top?limit=1", &token(&admin))
        .await;
    // Ada's 20 credits are the most (Bob has 10 or 20, as his calls before the refusal).
    assert_eq!(top["items"][0]["quantity"], 20, "{top}");
    assert_eq!(top["items"].as_array().unwrap().len(), 1, "{top}");
    // The same on the admin dashboard's meters page.
    let cookie = common::sign_in(&db, &server, &admin).await;
    let page = server.page("/dashboard/admin/meters", &cookie).await;
    let tokens_top = page
        .split("data-meter=\"tokens\"")
        .nth(1)
        .and_then(|rest| rest.split("</section>").next())
        .unwrap_or_default();
    assert!(tokens_top.contains("bob@example.com"), "{page}");
    assert!(tokens_top.contains("data-value=\"1200\""), "{page}");
    let client = reqwest::Client::new();
    for (path, status) in [
        ("/api/admin/meters/nope/top", 404),
        ("/api/admin/meters/tokens/top?limit=0", 400),
        ("/api/admin/meters/tokens/top?limit=101", 400),
        ("/api/admin/meters/tokens/top?page=2", 400),
    ] {
        let res = client
            .get(server.url(path))
            .bearer_auth(token(&admin))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status, "{path}");
    }

    let (status, _) = server.stop();
    assert!(status.success());
}

/// The `w` of a response's first policy: the period's length in seconds.
fn window(res: &reqwest::Response) -> String {
    let policy = header(res, "ratelimit-policy");
    policy
        .split(";w=")
        .nth(1)
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or_default()
        .to_owned()
}

on_both_backends!(meters_limit_calls_at_the_door);
