//! The plan catalog's admin pages without a browser: the list, a plan with its quote as a
//! preview and its versions, and the forms that create a plan, make a new version and
//! archive, each refusal naming its field, each request in the audit log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db, hidden, no_redirects as client, sign_in};
use reqwest::StatusCode;
use reqwest::header::LOCATION;

const GROWTH: &str = r#"{"key": "growth", "name": "Growth", "price_cents": 9900,
  "limits": [{"meter": "api_calls", "included": 250000, "over_limit": "overage",
              "overage": {"model": "graduated",
                          "tiers": [{"up_to": 750000, "unit_price_micros": 800},
                                    {"up_to": null, "unit_price_micros": 500}]}}]}"#;

async fn plans_are_listed_created_quoted_revised_and_archived(backend: Backend) {
    let db = Db::new(backend);
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
    let server = db.start(&[("ADMIN_ECO_IDS", admin.as_str())]);
    let cookie = sign_in(&db, &server, &admin).await;
    let http = client();
    let post = |path: &str, fields: Vec<(&str, String)>| {
        http.post(server.url(path))
            .header("Cookie", &cookie)
            .header("Origin", &server.base)
            .form(&fields)
            .send()
    };

    let list = server.page("/dashboard/admin/plans", &cookie).await;
    assert!(list.contains("id=\"plan-table\""), "{list}");
    for shown in [
        "/dashboard/admin/plans/free",
        "/dashboard/admin/plans/pro",
        "$49.00",
        "blocked",
    ] {
        assert!(list.contains(shown), "{shown} not in the list");
    }
    let csrf = hidden(&list, "csrf");

    let created = post(
        "/dashboard/admin/plans",
        vec![("csrf", csrf.clone()), ("plan", GROWTH.into())],
    )
    .await
    .unwrap();
    assert_eq!(created.status(), StatusCode::SEE_OTHER);
    assert_eq!(created.headers()[LOCATION], "/dashboard/admin/plans/growth");

    // The quote of the contract's example: 750,010 overage calls, 600,005,000 µ$ = $600.01.
    let page = server
        .page("/dashboard/admin/plans/growth?calls=1000010", &cookie)
        .await;
    assert!(page.contains("id=\"quote-overage\">$600.01<"), "{page}");
    assert!(page.contains("id=\"quote-total\">$699.01<"), "{page}");
    assert!(page.contains("id=\"plan-version\">1<"), "{page}");

    // A new version, from the page's own form (its JSON, one field changed).
    let revised = GROWTH.replace("9900", "12900");
    let res = post(
        "/dashboard/admin/plans/growth",
        vec![
            ("csrf", csrf.clone()),
            ("plan", revised),
            ("existing", "now".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let page = server.page("/dashboard/admin/plans/growth", &cookie).await;
    assert!(page.contains("id=\"plan-version\">2<"), "{page}");
    assert!(page.contains("id=\"plan-price\">$129.00"), "{page}");
    assert!(
        page.contains("at once"),
        "the versions table says how users moved"
    );

    // Refusals name the field and change nothing.
    for (form, named) in [
        (GROWTH.replace("\"growth\"", "\"pro\""), "already exists"),
        // (Inside the tagged model the path stops at the model.)
        (
            GROWTH.replace("750000", "-1"),
            "limits[0].overage does not fit: invalid value: integer `-1`",
        ),
        (
            GROWTH.replace("750000", "250000000000000000000"),
            "limits[0].overage",
        ),
        (
            GROWTH.replace("250000,", r#"250000, "alerts": [90, 80],"#),
            "limits[0].alerts[1]",
        ),
        (GROWTH.replace("9900", "-9900"), "price_cents"),
        ("{".to_owned(), "not valid JSON"),
    ] {
        let res = post(
            "/dashboard/admin/plans",
            vec![("csrf", csrf.clone()), ("plan", form)],
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let text = res.text().await.unwrap();
        assert!(text.contains(named), "{named} not in {text}");
    }
    let res = post(
        "/dashboard/admin/plans/growth",
        vec![
            ("csrf", csrf.clone()),
            ("plan", GROWTH.replace("\"growth\"", "\"free\"")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(res.text().await.unwrap().contains("key never changes"));
    let res = post("/dashboard/admin/plans", vec![("plan", GROWTH.into())])
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "no CSRF token");

    let res = post(
        "/dashboard/admin/plans/free/archive",
        vec![("csrf", csrf.clone())],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST, "the default plan");
    let res = post(
        "/dashboard/admin/plans/growth/archive",
        vec![("csrf", csrf.clone())],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let page = server.page("/dashboard/admin/plans/growth", &cookie).await;
    assert!(page.contains("id=\"plan-status\">archived<"), "{page}");

    // Admins only; and every request is in the audit log.
    let others = sign_in(&db, &server, &other).await;
    let page = server.page("/dashboard/admin/plans", &others).await;
    assert!(page.contains("Not found"), "{page}");
    let audit = server.page("/dashboard/admin/audit", &cookie).await;
    assert!(
        audit.contains("/dashboard/admin/plans/growth/archive"),
        "{audit}"
    );
    assert!(audit.contains("existing=now"), "{audit}");
    let (status, _) = server.stop();
    assert!(status.success());
}

async fn meters_and_route_costs_are_edited_from_their_page(backend: Backend) {
    let db = Db::new(backend);
    let admin = db.create(&[
        "users",
        "create",
        "--email",
        "admin@example.com",
        "--plan",
        "pro",
    ]);
    let server = db.start(&[("ADMIN_ECO_IDS", admin.as_str())]);
    let cookie = sign_in(&db, &server, &admin).await;
    let http = client();
    let post = |path: &str, fields: Vec<(&str, String)>| {
        http.post(server.url(path))
            .header("Cookie", &cookie)
            .header("Origin", &server.base)
            .form(&fields)
            .send()
    };
    let page = server.page("/dashboard/admin/meters", &cookie).await;
    assert!(page.contains("id=\"meter-table\""), "{page}");
    assert!(page.contains("<code>api_calls</code>"), "{page}");
    let csrf = hidden(&page, "csrf");

    let new_meter = |key: &str, aggregation: &str| {
        vec![
            ("csrf", csrf.clone()),
            ("key", key.to_owned()),
            ("name", "Tokens".to_owned()),
            ("unit", "token".to_owned()),
            ("aggregation", aggregation.to_owned()),
        ]
    };
    let res = post("/dashboard/admin/meters", new_meter("tokens", "sum"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    for (fields, named) in [
        (new_meter("tokens", "sum"), "already exists"),
        (new_meter("Tokens", "sum"), "key must be 1 to 40"),
        (new_meter("credits", "avg"), "aggregation must be one of"),
    ] {
        let res = post("/dashboard/admin/meters", fields).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let text = res.text().await.unwrap();
        assert!(text.contains(named), "{named} not in {text}");
    }
    let res = post(
        "/dashboard/admin/meters/tokens",
        vec![
            ("csrf", csrf.clone()),
            ("name", "Model tokens".into()),
            ("unit", "token".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let res = post(
        "/dashboard/admin/meters/nope",
        vec![
            ("csrf", csrf.clone()),
            ("name", "N".into()),
            ("unit", "n".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    let costs = r#"{"items": [{"route": "POST /v1/generate", "meter": "tokens", "quantity": 10}]}"#;
    let res = post(
        "/dashboard/admin/costs",
        vec![("csrf", csrf.clone()), ("costs", costs.into())],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let res = post(
        "/dashboard/admin/costs",
        vec![
            ("csrf", csrf.clone()),
            ("costs", costs.replace("tokens", "api_calls")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(res.text().await.unwrap().contains("items[0].meter"));
    let res = post("/dashboard/admin/costs", vec![("costs", costs.into())])
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "no CSRF token");

    let page = server.page("/dashboard/admin/meters", &cookie).await;
    assert!(page.contains("value=\"Model tokens\""), "{page}");
    assert!(page.contains("POST /v1/generate"), "{page}");

    // A plan's quote has a field for each meter it limits.
    let plan = r#"{"key": "growth", "name": "Growth", "price_cents": 9900,
      "limits": [{"meter": "api_calls", "included": 250000, "over_limit": "overage",
                  "overage": {"model": "per_unit", "unit_price_micros": 800}},
                 {"meter": "tokens", "included": 1000, "over_limit": "overage",
                  "overage": {"model": "per_unit", "unit_price_micros": 10000}}]}"#
        .to_owned();
    let res = post(
        "/dashboard/admin/plans",
        vec![("csrf", csrf.clone()), ("plan", plan)],
    )
    .await
    .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::SEE_OTHER,
        "{}",
        res.text().await.unwrap()
    );
    // 1,500 tokens past 1,000 at $0.01 = $5.00; no call past the included.
    let page = server
        .page(
            "/dashboard/admin/plans/growth?calls=1&usage.tokens=1500",
            &cookie,
        )
        .await;
    assert!(page.contains("id=\"quote-overage\">$5.00<"), "{page}");
    let (status, _) = server.stop();
    assert!(status.success());
}

on_both_backends!(
    plans_are_listed_created_quoted_revised_and_archived,
    meters_and_route_costs_are_edited_from_their_page,
);
