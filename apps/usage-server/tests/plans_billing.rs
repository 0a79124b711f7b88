//! Terms of the catalog end to end, on both backends: the contract's `growth` plan and a
//! pro user with their own terms are metered and admitted by those terms at the door, shown
//! by them, and billed by them: one Stripe invoice item of the exact amount each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db, token};
use serde_json::{Value, json};
use time::OffsetDateTime;
use usage_core::BillingPeriod;
use usage_fake_stripe::{FakeStripe, SECRET as STRIPE_KEY};

const CRON: &str = "cron-secret-cron-secret-cron-secret";

/// Text both databases read as an instant (the stores' own fixed-width UTC form).
fn stamp(t: OffsetDateTime) -> String {
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    ))
    .unwrap()
}

async fn send(
    server: &common::Server,
    token: &str,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let res = reqwest::Client::new()
        .request(method.parse().unwrap(), server.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// The overview's overage figures: invoiced, not invoiced yet, forecast (cents).
async fn overview_overage(server: &common::Server, admin: &str) -> (i64, i64, i64) {
    let overview = server
        .get_json("/api/admin/analytics/overview", admin)
        .await;
    let cents = |field: &str| {
        overview[field]
            .as_i64()
            .unwrap_or_else(|| panic!("{field} in {overview}"))
    };
    (
        cents("overage_revenue_cents"),
        cents("overage_uninvoiced_cents"),
        cents("overage_forecast_cents"),
    )
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn growth_and_own_terms_are_metered_shown_and_billed_exactly(backend: Backend) {
    let db = Db::new(backend);
    let stripe = FakeStripe::start().await;
    let admin = db.create(&[
        "users",
        "create",
        "--email",
        "admin@example.com",
        "--plan",
        "free",
    ]);
    let stripe_base = stripe.uri();
    let server = db.start(&[
        ("ADMIN_ECO_IDS", admin.as_str()),
        ("CRON_SECRET", CRON),
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
        ("STRIPE_SECRET_KEY", STRIPE_KEY),
        ("STRIPE_API_BASE", stripe_base.as_str()),
    ]);
    let admin = token(&admin);
    // The contract's growth plan: 250,000 calls included; the first 750,000 overage calls
    // at 0.08 ¢ (800 µ$), the rest at 0.05 ¢.
    let (status, created) = send(
        &server,
        &admin,
        "POST",
        "/api/admin/plans",
        json!({
            "key": "growth", "name": "Growth", "price_cents": 9900, "currency": "usd",
            "burst": {"per_second": 50, "burst": 100},
            "limits": [{"meter": "api_calls", "included": 250000, "over_limit": "overage",
                        "overage": {"model": "graduated",
                                    "tiers": [{"up_to": 750000, "unit_price_micros": 800},
                                              {"up_to": null, "unit_price_micros": 500}]}}]
        }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let gina = db.create(&[
        "users",
        "create",
        "--email",
        "gina@example.com",
        "--plan",
        "growth",
        "--stripe-customer-id",
        "cus_gina",
    ]);
    let gina_key = db.create(&["keys", "create", "--user", &gina]);
    let olga = db.create(&[
        "users",
        "create",
        "--email",
        "olga@example.com",
        "--plan",
        "pro",
        "--stripe-customer-id",
        "cus_olga",
    ]);
    let olga_key = db.create(&["keys", "create", "--user", &olga]);
    // Olga's own terms: 5 calls included, then packages of 3 calls at 1 ¢.
    let (status, patched) = send(
        &server,
        &admin,
        "PATCH",
        &format!("/api/admin/users/{olga}"),
        json!({"overrides": {"price_cents": 2900, "limits": [
            {"meter": "api_calls", "included": 5, "over_limit": "overage",
             "overage": {"model": "package", "package_size": 3, "package_price_micros": 10000}}]}}),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["effective_terms"]["limits"][0]["included"], 5,
        "{patched}"
    );
    assert_eq!(patched["effective_terms"]["price_cents"], 2900, "{patched}");

    // Gina's month so far, as a fixture: 999,990 calls admitted and stored (making them
    // one by one would take minutes), in the period counters the door and the ledger keep.
    let period = BillingPeriod::containing(OffsetDateTime::now_utc());
    let (start, end) = (stamp(period.start()), stamp(period.end()));
    db.sql(&format!(
        "INSERT INTO eco_usage_records (user_id, period_start, period_end, api_calls,
                                        overage_calls, included_calls, updated_at)
         VALUES ('{gina}', '{start}', '{end}', 999990, 749990, 250000, '{start}');
         INSERT INTO eco_quota_counters (user_id, period_start, meter, admitted)
         VALUES ('{gina}', '{start}', 'api_calls', 999990);"
    ));

    // Metered and admitted past the limit (overage), by the growth plan's terms.
    for _ in 0..20 {
        let res = server.ping(&gina_key).await;
        assert_eq!(res.status(), 200);
        let policy = header(&res, "ratelimit-policy");
        assert!(policy.contains("250000"), "{policy}");
    }
    for _ in 0..12 {
        let res = server.ping(&olga_key).await;
        assert_eq!(res.status(), 200);
        let policy = header(&res, "ratelimit-policy");
        assert!(policy.contains("\"monthly\";q=5;"), "{policy}");
    }
    server.wait_flushed(32).await;

    // Shown by those terms.
    let current = server.get_json("/api/usage/current", &token(&gina)).await;
    assert_eq!(
        (
            current["plan"].as_str(),
            current["api_calls"].as_u64(),
            current["limit"].as_u64(),
            current["overage_calls"].as_u64(),
        ),
        (
            Some("growth"),
            Some(1_000_010),
            Some(250_000),
            Some(750_010)
        ),
        "{current}"
    );
    // 750,000 × 800 µ$ + 10 × 500 µ$ = 600,005,000 µ$ = 60,000.5 ¢, rounded half-up once.
    assert_eq!(current["overage_cost_cents"], 60_001, "{current}");
    let current = server.get_json("/api/usage/current", &token(&olga)).await;
    // 7 calls past 5: three packages of 3 at 1 ¢.
    assert_eq!(
        (
            current["limit"].as_u64(),
            current["overage_calls"].as_u64(),
            current["overage_cost_cents"].as_i64()
        ),
        (Some(5), Some(7), Some(3)),
        "{current}"
    );

    // The overview prices the period by each user's terms, as their items will be.
    let (invoiced, uninvoiced, forecast) = overview_overage(&server, &admin).await;
    assert_eq!((invoiced, uninvoiced), (0, 60_004));
    assert!(forecast >= 60_004, "{forecast}");

    // Billed by them: one item each, of the exact amount.
    let (status, run) = send(
        &server,
        CRON,
        "POST",
        "/api/cron/process-overage",
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(
        (
            run["charged"].as_u64(),
            run["failed"].as_u64(),
            run["amount_cents"].as_i64()
        ),
        (Some(2), Some(0), Some(60_004)),
        "{run}"
    );
    let mut items: Vec<(String, i64, String)> = stripe
        .created()
        .iter()
        .map(|c| {
            (
                c.customer.clone(),
                c.amount,
                c.form["metadata[overage_calls]"].clone(),
            )
        })
        .collect();
    items.sort();
    assert_eq!(
        items,
        vec![
            ("cus_gina".to_owned(), 60_001, "750010".to_owned()),
            ("cus_olga".to_owned(), 3, "7".to_owned()),
        ]
    );
    let overage = server.get_json("/api/usage/overage", &token(&gina)).await;
    assert_eq!(
        (
            overage["invoiced_calls"].as_u64(),
            overage["invoiced_cents"].as_i64()
        ),
        (Some(750_010), Some(60_001)),
        "{overage}"
    );
    let (invoiced, uninvoiced, _) = overview_overage(&server, &admin).await;
    assert_eq!((invoiced, uninvoiced), (60_004, 0));
    // A second run finds nothing more to bill.
    let (_, again) = send(
        &server,
        CRON,
        "POST",
        "/api/cron/process-overage",
        json!({}),
    )
    .await;
    assert_eq!(again["amount_cents"], 0, "{again}");
    assert_eq!(stripe.created().len(), 2);
}

/// A 429 names the cheapest public plan of the catalog that allows more calls.
async fn a_refusal_names_the_cheapest_plan_that_allows_more(backend: Backend) {
    let db = Db::new(backend);
    let admin = db.create(&[
        "users",
        "create",
        "--email",
        "admin@example.com",
        "--plan",
        "pro",
    ]);
    let (_, key) = db.user_with_key("fay@example.com", "free");
    let server = db.start(&[
        ("ADMIN_ECO_IDS", admin.as_str()),
        ("FREE_MONTHLY_CALLS", "2"),
    ]);
    let admin = token(&admin);
    let starter = json!({
        "key": "starter", "name": "Starter", "price_cents": 900, "currency": "usd",
        "limits": [{"meter": "api_calls", "included": 100, "over_limit": "block"}]
    });
    let (status, body) = send(&server, &admin, "POST", "/api/admin/plans", starter).await;
    assert_eq!(status, 201, "{body}");
    for _ in 0..2 {
        assert_eq!(server.ping(&key).await.status(), 200);
    }
    let refused = |res: reqwest::Response| async move {
        assert_eq!(res.status(), 429);
        let body: Value = res.json().await.unwrap();
        body["message"].as_str().unwrap().to_owned()
    };
    let message = refused(server.ping(&key).await).await;
    assert!(
        message.ends_with(" Upgrade to Starter for more calls."),
        "{message}"
    );
    let (status, body) = send(
        &server,
        &admin,
        "POST",
        "/api/admin/plans/starter/archive",
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let message = refused(server.ping(&key).await).await;
    assert!(
        message.ends_with(" Upgrade to Pro for more calls."),
        "{message}"
    );
}

on_both_backends!(
    growth_and_own_terms_are_metered_shown_and_billed_exactly,
    a_refusal_names_the_cheapest_plan_that_allows_more,
);
