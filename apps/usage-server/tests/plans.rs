//! The plan catalog against the real server on both backends: the admin endpoints
//! (create, versions, archive, quote, every refusal naming its field, the audit log), the
//! catalog file commands, and the catalog built once from the plan variables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db, token};
use serde_json::{Value, json};

/// The contract's `growth` plan: 250,000 calls included, then graduated overage.
fn growth() -> Value {
    json!({
        "key": "growth", "name": "Growth", "price_cents": 9900, "currency": "usd",
        "stripe_price_id": "price_growth", "burst": {"per_second": 50, "burst": 100},
        "limits": [{"meter": "api_calls", "included": 250000, "over_limit": "overage",
                    "alerts": [80, 100],
                    "overage": {"model": "graduated",
                                "tiers": [{"up_to": 750000, "unit_price_micros": 800},
                                          {"up_to": null, "unit_price_micros": 500}]}}]
    })
}

struct Admin {
    server: common::Server,
    token: String,
    other: String,
    client: reqwest::Client,
}

impl Admin {
    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.send_as(&self.token, method, path, body).await
    }

    async fn send_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method.parse().unwrap(), self.server.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

async fn admin_server(db: &Db) -> Admin {
    let admin = db.create(&[
        "users",
        "create",
        "--email",
        "admin@example.com",
        "--plan",
        "pro",
    ]);
    let other = db.create(&[
        "users",
        "create",
        "--email",
        "o@example.com",
        "--plan",
        "free",
    ]);
    let server = db.start(&[
        ("ADMIN_ECO_IDS", admin.as_str()),
        ("ADMIN_RATE_LIMIT_PER_SEC", "1000"),
        ("ADMIN_RATE_LIMIT_BURST", "1000"),
    ]);
    Admin {
        server,
        token: token(&admin),
        other: token(&other),
        client: reqwest::Client::new(),
    }
}

async fn plans_are_created_revised_archived_and_quoted(backend: Backend) {
    let db = Db::new(backend);
    let a = admin_server(&db).await;

    let (status, list) = a.send("GET", "/api/admin/plans", None).await;
    assert_eq!(status, 200, "{list}");
    let keys: Vec<(&str, u64, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["key"].as_str().unwrap(),
                p["version"].as_u64().unwrap(),
                p["subscribers"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![("enterprise", 1, 0), ("free", 1, 1), ("pro", 1, 1)],
        "the built-in plans, with the two users"
    );
    let pro = &list[2];
    assert_eq!(pro["price_cents"], 4900);
    assert_eq!(pro["limits"][0]["included"], 100_000);
    assert_eq!(
        pro["limits"][0]["overage"],
        json!({"model": "per_unit", "unit_price_micros": 1000})
    );

    let (status, created) = a.send("POST", "/api/admin/plans", Some(growth())).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["version"], 1);
    assert_eq!(created["archived"], false);
    assert_eq!(
        created["limits"][0]["overage"]["tiers"][1]["up_to"],
        Value::Null
    );
    let (status, again) = a.send("POST", "/api/admin/plans", Some(growth())).await;
    assert_eq!(
        (status, again["error"].as_str()),
        (409, Some("conflict")),
        "{again}"
    );

    // A new version: the whole plan without key and version, and how users move.
    let mut terms = growth();
    terms.as_object_mut().unwrap().remove("key");
    terms["price_cents"] = json!(12900);
    terms["existing"] = json!("now");
    let (status, v2) = a
        .send("PUT", "/api/admin/plans/growth", Some(terms.clone()))
        .await;
    assert_eq!(status, 200, "{v2}");
    assert_eq!(
        (v2["version"].as_u64(), v2["price_cents"].as_i64()),
        (Some(2), Some(12900))
    );
    terms.as_object_mut().unwrap().remove("existing");
    terms["key"] = json!("growth");
    terms["version"] = json!(7);
    let (status, v3) = a
        .send("PUT", "/api/admin/plans/growth", Some(terms.clone()))
        .await;
    assert_eq!((status, v3["version"].as_u64()), (200, Some(3)), "{v3}");
    let (status, detail) = a.send("GET", "/api/admin/plans/growth", None).await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["version"], 3);
    let moves: Vec<&str> = detail["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["existing"].as_str().unwrap())
        .collect();
    assert_eq!(moves, vec!["next_period", "now", "next_period"]);
    assert_eq!(detail["versions"][0]["price_cents"], 9900);

    // The quote of the contract's example, worked by hand: 1,000,010 calls, 750,010
    // overage: 750,000 × 800 µ$ + 10 × 500 µ$ = 600,005,000 µ$ = 60,000.5 ¢ → 60,001 ¢.
    let (status, quote) = a
        .send(
            "POST",
            "/api/admin/plans/growth/quote",
            Some(json!({"usage": {"api_calls": 1_000_010}})),
        )
        .await;
    assert_eq!(status, 200, "{quote}");
    assert_eq!(quote["plan"], "growth");
    assert_eq!(quote["version"], 3);
    assert_eq!(quote["subscription_cents"], 12900);
    let line = &quote["lines"][0];
    assert_eq!(line["meter"], "api_calls");
    assert_eq!(line["used"], 1_000_010);
    assert_eq!(line["included"], 250_000);
    assert_eq!(line["overage_units"], 750_010);
    assert_eq!(line["amount_micros"], 600_005_000);
    assert_eq!(line["amount_cents"], 60_001);
    assert_eq!(line["tiers"][0]["units"], 750_000);
    assert_eq!(line["tiers"][1]["units"], 10);
    assert_eq!(quote["overage_cents"], 60_001);
    assert_eq!(quote["total_cents"], 12_900 + 60_001);

    let (status, archived) = a
        .send("POST", "/api/admin/plans/growth/archive", None)
        .await;
    assert_eq!(
        (status, archived["archived"].as_bool()),
        (200, Some(true)),
        "{archived}"
    );
    let (status, refused) = a.send("POST", "/api/admin/plans/free/archive", None).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (400, Some("default_plan")),
        "{refused}"
    );
    let (status, _) = a.send("GET", "/api/admin/plans/scale", None).await;
    assert_eq!(status, 404);
    let (status, _) = a.send("POST", "/api/admin/plans/scale/archive", None).await;
    assert_eq!(status, 404);
    let (status, _) = a.send("DELETE", "/api/admin/plans/growth", None).await;
    assert_eq!(status, 405);

    // Only admins, and every change is in the audit log.
    let (status, _) = a.send_as(&a.other, "GET", "/api/admin/plans", None).await;
    assert_eq!(status, 403);
    let (status, _) = a
        .send_as(&a.other, "POST", "/api/admin/plans", Some(growth()))
        .await;
    assert_eq!(status, 403);
    let (status, audit) = a.send("GET", "/api/admin/audit?limit=100", None).await;
    assert_eq!(status, 200, "{audit}");
    let logged: Vec<(String, String, u64)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_owned(),
                e["route"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    for entry in [
        ("POST", "/api/admin/plans", 201),
        ("POST", "/api/admin/plans", 409),
        ("PUT", "/api/admin/plans/growth", 200),
        ("POST", "/api/admin/plans/growth/archive", 200),
        ("POST", "/api/admin/plans/free/archive", 400),
        ("POST", "/api/admin/plans", 403),
    ] {
        assert!(
            logged.contains(&(entry.0.to_owned(), entry.1.to_owned(), entry.2)),
            "{entry:?} not in {logged:?}"
        );
    }
    let put = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "PUT")
        .unwrap();
    assert!(put["params"].as_str().unwrap().contains("12900"), "{put}");
}

async fn bad_catalogs_are_refused_naming_the_field(backend: Backend) {
    let db = Db::new(backend);
    let a = admin_server(&db).await;
    let edit = |f: fn(&mut Value)| {
        let mut plan = growth();
        f(&mut plan);
        plan
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            edit(|p| p["limits"][0]["meter"] = json!("tokens")),
            "limits[0].meter",
        ),
        (
            edit(|p| {
                p["limits"][0]["overage"]["tiers"] = json!([
                    {"up_to": 750000, "unit_price_micros": 800},
                    {"up_to": 500000, "unit_price_micros": 600},
                    {"up_to": null, "unit_price_micros": 500}])
            }),
            "limits[0].overage.tiers[1].up_to",
        ),
        (edit(|p| p["price_cents"] = json!(-1)), "price_cents"),
        (
            edit(|p| p["limits"][0]["overage"]["tiers"][1]["unit_price_micros"] = json!(-5)),
            "limits[0].overage.tiers[1].unit_price_micros",
        ),
        (
            edit(|p| p["limits"][0]["overage"]["tiers"][0]["up_to"] = Value::Null),
            "limits[0].overage.tiers[0].up_to",
        ),
        (edit(|p| p["key"] = json!("Growth!")), "key"),
        (edit(|p| p["key"] = json!("total")), "key"),
        (
            edit(|p| p["limits"][0]["included"] = json!("many")),
            "limits[0].included",
        ),
        (
            edit(|p| p["limits"][0]["included"] = json!(-1)),
            "limits[0].included",
        ),
        (
            edit(|p| p["limits"][0]["overage"]["model"] = json!("stepped")),
            "limits[0].overage",
        ),
        (
            edit(|p| p["burst"] = json!({"per_second": 0, "burst": 1})),
            "burst",
        ),
        (edit(|p| p["price"] = json!(1)), "price"),
    ];
    for (plan, field) in cases {
        let (status, body) = a.send("POST", "/api/admin/plans", Some(plan.clone())).await;
        assert_eq!(status, 400, "{plan}: {body}");
        assert_eq!(body["error"], "invalid_parameter", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(field), "{field} not named in {message:?}");
        assert!(!message.to_lowercase().contains("sql"), "{message}");
    }
    let (status, body) = a
        .send(
            "PUT",
            "/api/admin/plans/pro",
            Some(json!({"key": "free", "name": "x", "price_cents": 0})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("key"),
        "{body}"
    );
    let (status, body) = a
        .send(
            "PUT",
            "/api/admin/plans/pro",
            Some(json!({"name": "x", "price_cents": 0, "existing": "later"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("existing"),
        "{body}"
    );
    let (status, body) = a
        .send(
            "POST",
            "/api/admin/plans/pro/quote",
            Some(json!({"usage": {"tokens": 5}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("usage.tokens"),
        "{body}"
    );
    let (status, body) = a
        .send(
            "POST",
            "/api/admin/plans/pro/quote",
            Some(json!({"usage": {"api_calls": -5}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let res = a
        .client
        .post(a.server.url("/api/admin/plans"))
        .bearer_auth(&a.token)
        .body("x".repeat(70 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 413);
    // Nothing was stored by any of them.
    let (_, list) = a.send("GET", "/api/admin/plans", None).await;
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let (_, pro) = a.send("GET", "/api/admin/plans/pro", None).await;
    assert_eq!(pro["version"], 1);
}

async fn the_catalog_file_is_applied_exported_and_applied_again(backend: Backend) {
    let db = Db::new(backend);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/catalog.toml");
    let run = |args: &[&str]| {
        let out = db.cli(&[], args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let dry = run(&["plans", "apply", example, "--dry-run"]);
    assert_eq!(
        dry.lines().collect::<Vec<_>>(),
        vec![
            "meter tokens\twould create",
            "meter credits\twould create",
            "free\tunchanged",
            "pro\tunchanged",
            "enterprise\tunchanged",
            "growth\twould create",
            "costs\twould update"
        ],
        "the example's built-in plans are the default variables' exactly"
    );
    assert!(
        !run(&["plans", "list"]).contains("growth"),
        "a dry run writes nothing"
    );
    assert!(run(&["plans", "apply", example]).contains("growth\tcreated"));
    let list = run(&["plans", "list"]);
    assert!(
        list.contains("growth\tv1\tGrowth\t99.00 usd/month\t0 subscriber(s)"),
        "{list}"
    );
    let exported = run(&["plans", "export"]);
    let file = db.dir.0.join("exported.toml");
    std::fs::write(
        &file,
        exported.replace("price_cents = 9900", "price_cents = 8900"),
    )
    .unwrap();
    let applied = run(&["plans", "apply", file.to_str().unwrap()]);
    assert!(applied.contains("growth\trevised"), "{applied}");
    assert!(applied.contains("pro\tunchanged"), "{applied}");
    let again = run(&["plans", "apply", file.to_str().unwrap()]);
    assert!(again.lines().all(|l| l.ends_with("unchanged")), "{again}");
    // The same catalog as JSON applies as nothing new.
    let json = db.dir.0.join("exported.json");
    std::fs::write(&json, run(&["plans", "export", "--format", "json"])).unwrap();
    let from_json = run(&["plans", "apply", json.to_str().unwrap()]);
    assert!(
        from_json.lines().count() > 4 && from_json.lines().all(|l| l.ends_with("unchanged")),
        "{from_json}"
    );
    assert!(run(&["plans", "list"]).contains("growth\tv2\tGrowth\t89.00 usd/month"));

    // A bad file changes nothing and says where.
    std::fs::write(
        &file,
        "[[plans]]\nkey = \"x\"\nname = \"X\"\nprice_cents = -1\n",
    )
    .unwrap();
    let out = db.cli(&[], &["plans", "apply", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plans[0].price_cents"));
    std::fs::write(&file, "[[plans]]\nkey = \"x\"\nnam = \"X\"\n").unwrap();
    let out = db.cli(&[], &["plans", "apply", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `nam`"));
}

async fn the_variables_build_the_catalog_once(backend: Backend) {
    let db = Db::new(backend);
    let out = db.cli(&[("PRO_PRICE_CENTS", "5900")], &["plans", "list"]);
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(list.contains("pro\tv1\tPro\t59.00 usd/month"), "{list}");
    // Afterwards the catalog is the truth; a variable that disagrees is named.
    let out = db.cli(&[("PRO_PRICE_CENTS", "6900")], &["plans", "list"]);
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(list.contains("pro\tv1\tPro\t59.00 usd/month"), "{list}");
    let log = String::from_utf8(out.stderr).unwrap();
    assert!(
        log.contains("PRO_PRICE_CENTS") && log.contains("plans apply"),
        "{log}"
    );
    let out = db.cli(&[("DEFAULT_PLAN", "gold")], &["plans", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DEFAULT_PLAN"));
}

async fn meters_and_route_costs_are_managed_through_the_admin_api(backend: Backend) {
    let db = Db::new(backend);
    let a = admin_server(&db).await;
    let (status, meters) = a.send("GET", "/api/admin/meters", None).await;
    assert_eq!(status, 200, "{meters}");
    assert_eq!(
        meters,
        json!([{"key": "api_calls", "name": "API calls", "unit": "call",
                "aggregation": "count"}])
    );
    let tokens = json!({"key": "tokens", "name": "Tokens", "unit": "token",
                        "aggregation": "sum"});
    let (status, created) = a
        .send("POST", "/api/admin/meters", Some(tokens.clone()))
        .await;
    assert_eq!((status, &created), (201, &tokens));
    let (status, body) = a
        .send("POST", "/api/admin/meters", Some(tokens.clone()))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    for (bad, field) in [
        (
            json!({"key": "Tokens", "name": "T", "unit": "t", "aggregation": "sum"}),
            "key",
        ),
        (
            json!({"key": "t2", "name": "", "unit": "t", "aggregation": "sum"}),
            "name",
        ),
        (
            json!({"key": "t2", "name": "T", "unit": "t", "aggregation": "avg"}),
            "aggregation",
        ),
        (json!({"key": "t2", "name": "T", "unit": "t"}), "body"),
        (
            json!({"key": "t2", "name": "T", "unit": "t", "aggregation": "sum", "x": 1}),
            "x",
        ),
        // Not read by position from an array.
        (json!(["t2", "T", "t", "sum"]), "body must be a JSON object"),
    ] {
        let (status, body) = a.send("POST", "/api/admin/meters", Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().starts_with(field),
            "{bad}: {body}"
        );
    }
    let peak = json!({"key": "peak_gb", "name": "Peak storage", "unit": "GB",
                      "aggregation": "max"});
    assert_eq!(a.send("POST", "/api/admin/meters", Some(peak)).await.0, 201);
    let credits = json!({"key": "credits", "name": "Credits", "unit": "credit",
                         "aggregation": "sum"});
    assert_eq!(
        a.send("POST", "/api/admin/meters", Some(credits)).await.0,
        201
    );

    let (status, renamed) = a
        .send(
            "PUT",
            "/api/admin/meters/tokens",
            Some(json!({"name": "Model tokens", "unit": "token"})),
        )
        .await;
    assert_eq!(status, 200, "{renamed}");
    assert_eq!(renamed["aggregation"], "sum");
    let (status, one) = a.send("GET", "/api/admin/meters/tokens", None).await;
    assert_eq!((status, &one), (200, &renamed));
    let (status, _) = a
        .send(
            "PUT",
            "/api/admin/meters/nope",
            Some(json!({"name": "N", "unit": "n"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, body) = a
        .send(
            "PUT",
            "/api/admin/meters/api_calls",
            Some(json!({"name": "Requests", "unit": "request", "aggregation": "sum"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().starts_with("aggregation"));
    assert_eq!(a.send("GET", "/api/admin/meters/nope", None).await.0, 404);
    assert_eq!(
        a.send("DELETE", "/api/admin/meters/tokens", None).await.0,
        405
    );

    // Plans limit the meters; a max meter cannot block.
    let mut plan = growth();
    plan["limits"]
        .as_array_mut()
        .unwrap()
        .push(json!({"meter": "tokens", "included": 5000000, "over_limit": "block"}));
    plan["limits"]
        .as_array_mut()
        .unwrap()
        .push(json!({"meter": "peak_gb", "included": 10, "over_limit": "block"}));
    let (status, body) = a.send("POST", "/api/admin/plans", Some(plan.clone())).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("limits[2].over_limit"),
        "{body}"
    );
    plan["limits"][2]["over_limit"] = json!("overage");
    plan["limits"][2]["overage"] = json!({"model": "per_unit", "unit_price_micros": 100000});
    let (status, body) = a.send("POST", "/api/admin/plans", Some(plan)).await;
    assert_eq!(status, 201, "{body}");
    let (status, quote) = a
        .send(
            "POST",
            "/api/admin/plans/growth/quote",
            Some(json!({"usage": {"tokens": 6000000, "peak_gb": 25}})),
        )
        .await;
    assert_eq!(status, 200, "{quote}");
    // peak_gb: 15 over 10 at $0.10 = 150 ¢; tokens block, bill nothing.
    assert_eq!(quote["overage_cents"], 150, "{quote}");

    // Route costs, replaced whole.
    let (status, costs) = a.send("GET", "/api/admin/costs", None).await;
    assert_eq!((status, costs), (200, json!({"items": []})));
    let items = json!({"items": [
        {"route": "POST /v1/generate", "meter": "credits", "quantity": 10},
        {"route": "GET /api/v1/items/{id}", "meter": "credits", "quantity": 1}]});
    let (status, stored) = a.send("PUT", "/api/admin/costs", Some(items)).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(
        stored["items"][0]["route"], "GET /api/v1/items/{id}",
        "by route"
    );
    let (_, read) = a.send("GET", "/api/admin/costs", None).await;
    assert_eq!(read, stored);
    for (bad, field) in [
        (
            json!({"items": [{"route": "generate", "meter": "credits", "quantity": 1}]}),
            "items[0].route",
        ),
        (
            json!({"items": [{"route": "POST /v1", "meter": "peak_gb", "quantity": 1}]}),
            "items[0].meter",
        ),
        (
            json!({"items": [{"route": "POST /v1", "meter": "credits", "quantity": 0}]}),
            "items[0].quantity",
        ),
        (
            json!({"items": [{"route": "POST /v1", "meter": "credits", "quantity": -1}]}),
            "items[0].quantity",
        ),
        (
            json!({"items": [{"route": "POST /v1", "meter": "credits", "quantity": 1.5}]}),
            "items[0].quantity",
        ),
    ] {
        let (status, body) = a.send("PUT", "/api/admin/costs", Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().starts_with(field),
            "{bad}: {body}"
        );
    }
    assert_eq!(
        a.send("GET", "/api/admin/costs", None).await.1,
        stored,
        "unchanged"
    );

    // Only admins, and audited.
    assert_eq!(
        a.send_as(&a.other, "GET", "/api/admin/meters", None)
            .await
            .0,
        403
    );
    assert_eq!(
        a.send_as(
            &a.other,
            "PUT",
            "/api/admin/costs",
            Some(json!({"items": []}))
        )
        .await
        .0,
        403
    );
    let (_, audit) = a.send("GET", "/api/admin/audit?limit=100", None).await;
    let logged: Vec<(&str, &str, u64)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap(),
                e["route"].as_str().unwrap(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    for entry in [
        ("POST", "/api/admin/meters", 201),
        ("PUT", "/api/admin/meters/tokens", 200),
        ("PUT", "/api/admin/costs", 200),
        ("PUT", "/api/admin/costs", 403),
    ] {
        assert!(logged.contains(&entry), "{entry:?} not in {logged:?}");
    }
}

on_both_backends!(
    meters_and_route_costs_are_managed_through_the_admin_api,
    plans_are_created_revised_archived_and_quoted,
    bad_catalogs_are_refused_naming_the_field,
    the_catalog_file_is_applied_exported_and_applied_again,
    the_variables_build_the_catalog_once,
);
