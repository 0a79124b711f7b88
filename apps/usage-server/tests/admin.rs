//! The admin endpoints against the real server on both backends: exact figures, the
//! users list's sorts, filters and pages, hostile parameters, who gets in, the admin rate
//! limit and the audit log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{Backend, Db, SECRET};
use serde_json::Value;
use time::OffsetDateTime;
use usage_auth::jwt::{JwtConfig, JwtKeys};
use usage_core::event::new_event_id;
use usage_core::repo::{ApiKeyRecord, IncludedCalls, User};
use usage_core::{ApiKeyId, Plan, Store, UsageEvent, UserId};

fn token(user: &UserId) -> String {
    JwtKeys::new(&JwtConfig {
        secret: SECRET.as_bytes().to_vec(),
        audience: "authenticated".to_owned(),
        issuer: None,
    })
    .unwrap()
    .mint(user, 600, OffsetDateTime::now_utc())
    .unwrap()
}

/// 100 free, 45 pro and 5 enterprise users (the first enterprise user is the admin);
/// pro includes 10 calls: p0 makes 25 (15 over), p1 12 (2 over), f0 7.
struct Business {
    db: Db,
    store: Arc<dyn Store>,
    admin: UserId,
    ids: HashMap<String, UserId>,
}

async fn business(backend: Backend) -> Business {
    let db = Db::new(backend);
    assert!(db.cli(&[], &["migrate"]).status.success());
    let store = db.store().await;
    let mut ids = HashMap::new();
    let base = OffsetDateTime::now_utc() - time::Duration::days(40);
    let mut n = 0;
    for (plan, prefix, count) in [
        (Plan::free(), "f", 100),
        (Plan::pro(), "p", 45),
        (Plan::enterprise(), "e", 5),
    ] {
        for i in 0..count {
            let user = User {
                id: UserId::generate(),
                email: format!("{prefix}{i}@example.com"),
                plan: plan.clone(),
                stripe_customer_id: None,
                created_at: base + time::Duration::minutes(n),
                plan_subscription_id: None,
                blocked_at: None,
                plan_version: None,
                overrides: None,
            };
            n += 1;
            store.create_user(&user).await.unwrap();
            ids.insert(format!("{prefix}{i}"), user.id);
        }
    }
    let now = OffsetDateTime::now_utc();
    let mut events = Vec::new();
    let mut included = IncludedCalls::new();
    for (who, calls) in [("p0", 25), ("p1", 12), ("f0", 7)] {
        let user = ids[who].clone();
        let key = ApiKeyRecord {
            id: ApiKeyId::generate(),
            user_id: user.clone(),
            name: "k".to_owned(),
            prefix: "eco_live_abcd".to_owned(),
            key_hash: format!("{:064x}", rand::random::<u128>()),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        store.create_api_key(&key).await.unwrap();
        if who.starts_with('p') {
            included.insert(user.clone(), 10);
        }
        for _ in 0..calls {
            events.push(UsageEvent {
                event_id: new_event_id(now),
                user_id: user.clone(),
                api_key_id: key.id.clone(),
                endpoint: "/api/v1/ping".to_owned(),
                method: "GET".to_owned(),
                status_code: 200,
                response_time_ms: 2,
                created_at: now,
                units: Default::default(),
            });
        }
    }
    store.record_usage(&events, &included).await.unwrap();
    let admin = ids["e0"].clone();
    Business {
        db,
        store,
        admin,
        ids,
    }
}

async fn get(server: &common::Server, path: &str, bearer: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn emails(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["email"].as_str().unwrap().to_owned())
        .collect()
}

async fn figures_sorts_filters_and_hostile_parameters(backend: Backend) {
    let b = business(backend).await;
    let server = b.db.start(&[
        (
            "ADMIN_ECO_IDS",
            &format!(" {} ,eco_usr_someoneelse", b.admin),
        ),
        ("PRO_MONTHLY_CALLS", "10"),
        ("ADMIN_RATE_LIMIT_PER_SEC", "1000"),
        ("ADMIN_RATE_LIMIT_BURST", "1000"),
    ]);
    let admin = token(&b.admin);

    let (status, overview) = get(&server, "/api/admin/analytics/overview", &admin).await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(
        overview["users"],
        serde_json::json!({"free": 100, "pro": 45, "enterprise": 5, "total": 150})
    );
    assert_eq!(overview["mrr_cents"], 470_500);
    assert_eq!(overview["api_calls_today"], 44);
    assert_eq!(overview["api_calls_this_month"], 44);
    assert_eq!(overview["overage_revenue_cents"], 0, "nothing invoiced");
    // p0: 15 calls = 1.5 cents -> 2; p1: 2 calls = 0.2 cents -> 0.
    assert_eq!(overview["overage_uninvoiced_cents"], 2);
    assert!(overview["overage_forecast_cents"].as_i64().unwrap() >= 2);
    let top: Vec<(&str, u64)> = overview["top_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["email"].as_str().unwrap(),
                u["api_calls"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        top,
        vec![
            ("p0@example.com", 25),
            ("p1@example.com", 12),
            ("f0@example.com", 7)
        ]
    );

    let users = "/api/admin/analytics/users";
    let (status, page) = get(
        &server,
        &format!("{users}?plan=pro&limit=20&page=3"),
        &admin,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        (
            page["page"].as_u64(),
            page["limit"].as_u64(),
            page["total"].as_u64()
        ),
        (Some(3), Some(20), Some(45))
    );
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    let (_, page) = get(
        &server,
        &format!("{users}?sort=api_calls&order=desc&limit=2"),
        &admin,
    )
    .await;
    assert_eq!(page["total"], 150);
    let first = &page["items"][0];
    assert_eq!(first["email"], "p0@example.com");
    assert_eq!(first["user_id"], b.ids["p0"].as_str());
    assert_eq!(first["plan"], "pro");
    assert_eq!(first["api_calls"], 25);
    assert_eq!(first["limit"], 10);
    assert_eq!(first["overage_calls"], 15);
    assert_eq!(first["revenue_cents"], 4_902);
    assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
    let (_, page) = get(
        &server,
        &format!("{users}?sort=revenue&order=desc&limit=6"),
        &admin,
    )
    .await;
    let emails6 = emails(&page);
    assert!(
        emails6[..5].iter().all(|e| e.starts_with('e')),
        "{emails6:?}"
    );
    assert_eq!(emails6[5], "p0@example.com");
    assert!(
        page["items"][0]["limit"].is_null(),
        "enterprise is unlimited"
    );
    let (_, page) = get(
        &server,
        &format!("{users}?sort=email&order=asc&limit=3"),
        &admin,
    )
    .await;
    assert_eq!(
        emails(&page),
        ["e0@example.com", "e1@example.com", "e2@example.com"]
    );
    let (_, page) = get(
        &server,
        &format!("{users}?sort=created_at&order=asc&limit=2"),
        &admin,
    )
    .await;
    assert_eq!(emails(&page), ["f0@example.com", "f1@example.com"]);
    let (_, page) = get(
        &server,
        &format!("{users}?sort=created_at&order=desc&limit=1&plan=free"),
        &admin,
    )
    .await;
    assert_eq!(emails(&page), ["f99@example.com"]);
    let (_, page) = get(&server, &format!("{users}?q=P1%40EXAMPLE"), &admin).await;
    assert_eq!(
        (page["total"].as_u64(), emails(&page)),
        (Some(1), vec!["p1@example.com".to_owned()])
    );
    let id_part = &b.ids["f42"].as_str()[8..];
    let (_, page) = get(&server, &format!("{users}?q={id_part}"), &admin).await;
    assert_eq!(emails(&page), ["f42@example.com"]);
    let (status, page) = get(&server, &format!("{users}?page=1000000&limit=100"), &admin).await;
    assert_eq!(
        (
            status,
            page["total"].as_u64(),
            page["items"].as_array().map(Vec::len)
        ),
        (200, Some(150), Some(0))
    );

    // Hostile values: a 400 naming the parameter, or a correct empty result.
    for (query, name) in [
        ("sort=api_calls%3BDROP%20TABLE%20eco_users", "sort"),
        ("sort=email%20--", "sort"),
        ("order=desc%3B--", "order"),
        ("order=DESC", "order"),
        ("plan=%27%20OR%201%3D1--", "plan"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=abc", "limit"),
        ("page=-1", "page"),
        ("page=0", "page"),
        ("sort_by=email", "unknown parameter"),
    ] {
        let (status, body) = get(&server, &format!("{users}?{query}"), &admin).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_parameter", "{query}");
        assert!(
            body["message"].as_str().unwrap().starts_with(name),
            "{query}: {body}"
        );
    }
    for q in [
        "%27%20OR%201%3D1--",
        "%25",
        "f1_",
        "%27%3B%20DROP%20TABLE%20eco_users%3B--",
    ] {
        let (status, body) = get(&server, &format!("{users}?q={q}"), &admin).await;
        assert_eq!(
            (status, body["total"].as_u64()),
            (200, Some(0)),
            "q={q}: {body}"
        );
    }
    assert_eq!(
        b.store
            .count_users_by_plan()
            .await
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>(),
        150,
        "nothing dropped"
    );

    // Every one of those requests is in the audit log, newest first.
    let (status, audit) = get(&server, "/api/admin/audit?limit=100", &admin).await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["items"].as_array().unwrap();
    assert_eq!(audit["total"].as_u64().unwrap(), entries.len() as u64);
    // 1 overview, 9 good lists, 11 refused, 4 searches; this listing is logged after it answers.
    assert_eq!(entries.len(), 25, "{audit}");
    let drop = entries
        .iter()
        .find(|e| {
            e["params"]
                .as_str()
                .unwrap()
                .starts_with("sort=api_calls%3BDROP")
                && e["route"] == users
        })
        .unwrap();
    assert_eq!(
        (drop["status"].as_u64(), drop["method"].as_str()),
        (Some(400), Some("GET"))
    );
    assert_eq!(drop["admin_id"], b.admin.as_str());
    assert_eq!(
        entries.last().unwrap()["route"],
        "/api/admin/analytics/overview"
    );
    let (_, audit_page) = get(&server, "/api/admin/audit?limit=5&page=2", &admin).await;
    assert_eq!(audit_page["items"].as_array().unwrap().len(), 5);
    let (status, _) = get(&server, "/api/admin/audit?limit=500", &admin).await;
    assert_eq!(status, 400);
    assert!(server.stop().0.success());
}

async fn only_admins_get_in(backend: Backend) {
    let b = business(backend).await;
    let key = b.db.create(&["keys", "create", "--user", b.admin.as_str()]);
    let server = b.db.start(&[("ADMIN_ECO_IDS", b.admin.as_str())]);
    let client = reqwest::Client::new();
    let admin = token(&b.admin);
    let someone = token(&b.ids["p0"]);
    for path in [
        "/api/admin/analytics/overview",
        "/api/admin/analytics/users?sort=nonsense",
        "/api/admin/audit",
        "/api/admin/nope",
    ] {
        let (status, body) = get(&server, path, &someone).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
        for method in [reqwest::Method::POST, reqwest::Method::DELETE] {
            let res = client
                .request(method.clone(), server.url(path))
                .bearer_auth(&someone)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 403, "{method} {path}");
        }
        // No credentials, or an API key (as Bearer or X-API-Key): 401.
        let res = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
        let res = client
            .get(server.url(path))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{path}");
        let res = client
            .get(server.url(path))
            .header("X-API-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    let res = client
        .post(server.url("/api/admin/analytics/overview"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    let (status, _) = get(&server, "/api/admin/nope", &admin).await;
    assert_eq!(status, 404);
    let (_, audit) = get(&server, "/api/admin/audit?limit=100", &admin).await;
    let refused = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["admin_id"] == b.ids["p0"].as_str() && e["status"] == 403)
        .count();
    assert_eq!(
        refused, 12,
        "every refused request of the non-admin is logged"
    );
    assert!(server.stop().0.success());
}

async fn admins_have_a_rate_limit(backend: Backend) {
    let b = business(backend).await;
    let server = b.db.start(&[
        ("ADMIN_ECO_IDS", b.admin.as_str()),
        ("ADMIN_RATE_LIMIT_PER_SEC", "1"),
        ("ADMIN_RATE_LIMIT_BURST", "2"),
    ]);
    let admin = token(&b.admin);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            get(&server, "/api/admin/analytics/overview", &admin)
                .await
                .0,
        );
    }
    assert_eq!(statuses, [200, 200, 429]);
    let res = reqwest::Client::new()
        .get(server.url("/api/admin/analytics/overview"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // A user who is not an admin has a limit of their own, and gets 403 within it.
    let (status, _) = get(
        &server,
        "/api/admin/analytics/overview",
        &token(&b.ids["p1"]),
    )
    .await;
    assert_eq!(status, 403);
    let (actions, _) = b.store.admin_actions(0, 100).await.unwrap();
    assert_eq!(actions, 5, "refused and limited requests are logged too");
    assert!(server.stop().0.success());
}

async fn patch(server: &common::Server, path: &str, bearer: &str, body: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .patch(server.url(path))
        .bearer_auth(bearer)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// `GET` and `PATCH /api/admin/users/{id}`: the figures match the users list, changes
/// are refused with a reason or applied (the plan on the metered path too), and every
/// request is in the audit log with what it asked.
async fn admins_read_and_change_users(backend: Backend) {
    let b = business(backend).await;
    let server = b.db.start(&[
        ("ADMIN_ECO_IDS", b.admin.as_str()),
        ("PRO_MONTHLY_CALLS", "10"),
        ("FREE_MONTHLY_CALLS", "5"),
        ("ADMIN_RATE_LIMIT_PER_SEC", "1000"),
        ("ADMIN_RATE_LIMIT_BURST", "1000"),
    ]);
    let admin = token(&b.admin);
    let p0 = b.ids["p0"].as_str();
    let path = format!("/api/admin/users/{p0}");

    let (status, user) = get(&server, &path, &admin).await;
    assert_eq!(status, 200, "{user}");
    let (_, list) = get(
        &server,
        "/api/admin/analytics/users?q=p0@example.com",
        &admin,
    )
    .await;
    let row = &list["items"][0];
    for field in [
        "user_id",
        "email",
        "plan",
        "created_at",
        "api_calls",
        "limit",
        "overage_calls",
        "revenue_cents",
    ] {
        assert_eq!(user[field], row[field], "{field}: {user} vs {row}");
    }
    assert_eq!(
        (
            user["api_calls"].as_u64(),
            user["overage_calls"].as_u64(),
            user["revenue_cents"].as_i64()
        ),
        (Some(25), Some(15), Some(4_900 + 2))
    );
    assert!(user["stripe_customer_id"].is_null(), "{user}");

    let unknown = format!("/api/admin/users/{}", UserId::generate());
    for missing in [unknown.as_str(), "/api/admin/users/not-an-id"] {
        let (status, body) = get(&server, missing, &admin).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("not_found")),
            "{missing}"
        );
        let (status, _) = patch(&server, missing, &admin, r#"{"plan": "pro"}"#).await;
        assert_eq!(status, 404, "{missing}");
    }
    let (status, _) = get(&server, &format!("{path}?x=1"), &admin).await;
    assert_eq!(status, 400);

    // Refused changes name the field; nothing changes.
    for (body, names) in [
        (r#"{"plan": "gold"}"#, "plan"),
        (r#"{"plan": "pro", "email": "x@example.com"}"#, "email"),
        (r#"{"stripe_customer_id": "acct_1"}"#, "cus_"),
        (r#"{}"#, "plan, stripe_customer_id and/or overrides"),
        (
            r#"{"overrides": {"price_cents": -1}}"#,
            "overrides.price_cents",
        ),
        ("nonsense", "JSON object"),
    ] {
        let (status, answer) = patch(&server, &path, &admin, body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_parameter")),
            "{body}: {answer}"
        );
        assert!(
            answer["message"].as_str().unwrap().contains(names),
            "{body}: {answer}"
        );
    }
    // Schemathesis: NUL reached PostgreSQL (a 503 for the search, a lost audit entry for
    // a body); the search refuses it by name, the audit log keeps the entry.
    let (status, answer) = get(&server, "/api/admin/analytics/users?q=ada%00", &admin).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_parameter")),
        "{answer}"
    );
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .starts_with("q must not contain"),
        "{answer}"
    );
    let (status, _) = patch(&server, &path, &admin, "{\"plan\": \"pro\u{0}\"}").await;
    assert_eq!(status, 400);
    let huge = format!(r#"{{"plan": "{}"}}"#, "x".repeat(20_000));
    let (status, _) = patch(&server, &path, &admin, &huge).await;
    assert_eq!(status, 413);

    // Link a customer, then move to free: 25 calls of 5 on the metered path at once.
    let key = b.db.create(&["keys", "create", "--user", p0]);
    assert_eq!(server.ping(&key).await.status(), 200);
    let (status, user) = patch(
        &server,
        &path,
        &admin,
        r#"{"stripe_customer_id": "cus_p0"}"#,
    )
    .await;
    assert_eq!(
        (status, user["stripe_customer_id"].as_str()),
        (200, Some("cus_p0")),
        "{user}"
    );
    let (status, user) = patch(&server, &path, &admin, r#"{"plan": "free"}"#).await;
    assert_eq!(status, 200, "{user}");
    // The period is priced under the terms held now: free bills no overage, so the 15
    // calls past pro's 10 are owed no more (as overage billing bills them: nothing).
    assert_eq!(
        (
            user["plan"].as_str(),
            user["limit"].as_u64(),
            user["overage_calls"].as_u64(),
            user["revenue_cents"].as_i64()
        ),
        (Some("free"), Some(5), Some(0), Some(0))
    );
    let res = server.ping(&key).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["X-RateLimit-Limit"], "5");
    assert_eq!(
        b.store
            .user_by_id(&b.ids["p0"])
            .await
            .unwrap()
            .unwrap()
            .plan,
        Plan::free()
    );
    // A customer belongs to one user; null unlinks.
    let p1 = format!("/api/admin/users/{}", b.ids["p1"]);
    let (status, answer) = patch(
        &server,
        &p1,
        &admin,
        r#"{"stripe_customer_id": "cus_p0", "plan": "enterprise"}"#,
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("conflict")),
        "{answer}"
    );
    assert_eq!(
        b.store
            .user_by_id(&b.ids["p1"])
            .await
            .unwrap()
            .unwrap()
            .plan,
        Plan::pro(),
        "a refused change changes nothing"
    );
    let (status, user) = patch(&server, &path, &admin, r#"{"stripe_customer_id": null}"#).await;
    assert_eq!(
        (status, user["stripe_customer_id"].is_null()),
        (200, true),
        "{user}"
    );

    // Not an admin: 403, and the body is never applied.
    let (status, _) = patch(
        &server,
        &path,
        &token(&b.ids["p1"]),
        r#"{"plan": "enterprise"}"#,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = patch(&server, &path, "not-a-token", r#"{"plan": "enterprise"}"#).await;
    assert_eq!(status, 401);
    assert_eq!(
        b.store
            .user_by_id(&b.ids["p0"])
            .await
            .unwrap()
            .unwrap()
            .plan,
        Plan::free()
    );

    let (_, audit) = get(&server, "/api/admin/audit?limit=100", &admin).await;
    let patches: Vec<(String, u64)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "PATCH")
        .map(|e| {
            (
                e["params"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        patches.contains(&(r#"{"plan": "free"}"#.to_owned(), 200)),
        "{patches:?}"
    );
    assert!(
        patches.contains(&(r#"{"plan": "gold"}"#.to_owned(), 400)),
        "{patches:?}"
    );
    assert!(
        patches.contains(&(String::new(), 403)),
        "a non-admin's body is not read: {patches:?}"
    );
    assert!(
        patches.contains(&("{\"plan\": \"pro\u{FFFD}\"}".to_owned(), 400)),
        "a body with NUL is audited: {patches:?}"
    );
    assert!(server.stop().0.success());
}

on_both_backends!(
    admins_read_and_change_users,
    figures_sorts_filters_and_hostile_parameters,
    only_admins_get_in,
    admins_have_a_rate_limit,
);
