//! Overage billing through the cron endpoint and the CLI against a local fake of Stripe,
//! on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use common::{Backend, Db};
use serde_json::Value;
use usage_fake_stripe::{FakeStripe, SECRET as STRIPE_KEY};

const CRON: &str = "cron-secret-cron-secret-cron-secret";

async fn bills_overage_through_cron_and_cli(backend: Backend) {
    let db = Db::new(backend);
    let stripe = FakeStripe::start().await;
    let ada = db.create(&[
        "users",
        "create",
        "--email",
        "ada@example.com",
        "--plan",
        "pro",
        "--stripe-customer-id",
        "cus_ada",
    ]);
    let ada_key = db.create(&["keys", "create", "--user", &ada]);
    let (bob, bob_key) = db.user_with_key("bob@example.com", "pro");
    let stripe_base = stripe.uri();
    let env = [
        ("CRON_SECRET", CRON),
        ("PRO_MONTHLY_CALLS", "3"),
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
        ("STRIPE_SECRET_KEY", STRIPE_KEY),
        ("STRIPE_API_BASE", stripe_base.as_str()),
    ];
    let server = db.start(&env);
    // Ada: 8 calls, 5 past the limit ($0.005: 1 cent). Bob: 1 past it, no Stripe customer.
    for _ in 0..8 {
        assert_eq!(server.ping(&ada_key).await.status(), 200);
    }
    for _ in 0..4 {
        assert_eq!(server.ping(&bob_key).await.status(), 200);
    }
    server.wait_flushed(12).await;

    let client = reqwest::Client::new();
    let post = |query: &str, auth: Option<&str>| {
        let mut req = client.post(server.url(&format!("/api/cron/process-overage{query}")));
        if let Some(auth) = auth {
            req = req.bearer_auth(auth);
        }
        req.send()
    };
    assert_eq!(post("", None).await.unwrap().status(), 401);
    assert_eq!(
        post("", Some("not-the-secret")).await.unwrap().status(),
        401
    );
    let res = post("?dry_run=maybe", Some(CRON)).await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("dry_run must be"),
        "{body}"
    );

    let dry: Value = post("?dry_run=true", Some(CRON))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (dry["dry_run"].as_bool(), dry["amount_cents"].as_i64()),
        (Some(true), Some(1))
    );
    assert!(stripe.received().is_empty(), "a dry run sends nothing");

    let res = post("", Some(CRON)).await.unwrap();
    assert_eq!(res.status(), 200);
    let summary: Value = res.json().await.unwrap();
    assert_eq!(summary["processed"], 2, "{summary}");
    assert_eq!(summary["charged"], 1, "{summary}");
    assert_eq!(summary["skipped"], 0, "{summary}");
    assert_eq!(summary["failed"], 1, "{summary}");
    assert_eq!(summary["amount_cents"], 1, "{summary}");
    assert_eq!(summary["errors"][0]["user_id"], bob.as_str());
    assert!(
        summary["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no Stripe customer id")
    );
    let created = stripe.created();
    assert_eq!(created.len(), 1);
    assert_eq!(
        (created[0].customer.as_str(), created[0].amount),
        ("cus_ada", 1)
    );
    assert_eq!(created[0].form["metadata[overage_calls]"], "5");
    // The runs as an operator sees them: one dry, one live with a charge and a failure.
    for (series, value) in [
        ("usage_billing_runs_total{outcome=\"dry_run\"}", 1.0),
        ("usage_billing_runs_total{outcome=\"completed\"}", 1.0),
        ("usage_billing_runs_total{outcome=\"failed\"}", 0.0),
        ("usage_billing_users_total{result=\"charged\"}", 1.0),
        ("usage_billing_users_total{result=\"failed\"}", 1.0),
        ("usage_billing_users_total{result=\"skipped\"}", 0.0),
        ("usage_billing_charged_cents_total", 1.0),
    ] {
        assert_eq!(server.metric(series).await, value, "{series}");
    }

    // Ada's own view shows it invoiced.
    let token = db.create(&["token", "--user", &ada]);
    let overage: Value = client
        .get(server.url("/api/usage/overage"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            overage["overage_calls"].as_u64(),
            overage["invoiced_calls"].as_u64(),
            overage["invoiced_cents"].as_i64()
        ),
        (Some(5), Some(5), Some(1)),
        "{overage}"
    );

    // And the charge itself.
    let charges = |token: String| {
        let client = client.clone();
        let url = server.url("/api/usage/charges");
        async move {
            let res = client.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()["items"].clone()
        }
    };
    let ada_charges = charges(token.clone()).await;
    assert_eq!(ada_charges.as_array().unwrap().len(), 1, "{ada_charges}");
    let charge = &ada_charges[0];
    assert_eq!(
        (
            charge["overage_calls"].as_u64(),
            charge["amount_cents"].as_i64(),
            charge["status"].as_str(),
            charge["stripe_invoice_item_id"].as_str(),
        ),
        (
            Some(5),
            Some(1),
            Some("invoiced"),
            Some(created[0].id.as_str())
        ),
        "{charge}"
    );
    assert_eq!(charge["period_start"], overage["period_start"]);
    assert!(
        charge["id"].is_i64() && charge["created_at"].is_string(),
        "{charge}"
    );
    let res = client
        .get(server.url("/api/usage/charges"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // The CLI, run again: nothing new to bill.
    let out = db.cli(&env, &["bill-overage"]);
    assert!(out.status.success(), "{out:?}");
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (again["charged"].as_u64(), again["amount_cents"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(stripe.created().len(), 1);

    // Bob is linked to a customer Stripe refuses: his charge is there, failed.
    let bob_token = db.create(&["token", "--user", &bob]);
    assert_eq!(charges(bob_token.clone()).await, serde_json::json!([]));
    let out = db.cli(
        &[],
        &[
            "users",
            "set-stripe-customer",
            "--user",
            &bob,
            "--customer",
            "cus_ada",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "a customer belongs to one user");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cus_ada"),
        "{out:?}"
    );
    let out = db.cli(
        &[],
        &[
            "users",
            "set-stripe-customer",
            "--user",
            &bob,
            "--customer",
            "cus_bob",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    stripe.refuse("cus_bob");
    // Five more calls: 6 past the limit, 1 cent (one alone rounds to nothing to bill).
    for _ in 0..5 {
        assert_eq!(server.ping(&bob_key).await.status(), 200);
    }
    server.wait_flushed(17).await;
    let out = db.cli(&env, &["bill-overage"]);
    assert!(out.status.success(), "{out:?}");
    let bob_charges = charges(bob_token).await;
    assert_eq!(
        (
            bob_charges[0]["status"].as_str(),
            bob_charges[0]["stripe_invoice_item_id"].is_null()
        ),
        (Some("failed"), true),
        "{bob_charges}"
    );
    assert_eq!(stripe.created().len(), 1);

    let out = db.cli(&env, &["reconcile-overage"]);
    assert!(out.status.success(), "{out:?}");
    let reconciliation: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reconciliation["drift"], 0);
    let statuses: Vec<(String, String)> = reconciliation["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["user_id"].as_str().unwrap().to_owned(),
                i["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        statuses.contains(&(ada.clone(), "ok".to_owned())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&(bob.clone(), "uninvoiced".to_owned())),
        "{statuses:?}"
    );
    let res = client
        .get(server.url("/api/cron/overage-reconciliation"))
        .bearer_auth(CRON)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(server.stop().0.success());
}

async fn billing_needs_its_configuration(backend: Backend) {
    let db = Db::new(backend);
    // No cron secret: the endpoint does not exist.
    let server = db.start(&[]);
    let res = reqwest::Client::new()
        .post(server.url("/api/cron/process-overage"))
        .bearer_auth(CRON)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert!(server.stop().0.success());
    // A cron secret but no Stripe key: 503 for a real run, a dry run works.
    let server = db.start(&[("CRON_SECRET", CRON)]);
    let client = reqwest::Client::new();
    let res = client
        .post(server.url("/api/cron/process-overage"))
        .bearer_auth(CRON)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "billing_unavailable");
    let res = client
        .post(server.url("/api/cron/process-overage?dry_run=true"))
        .bearer_auth(CRON)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(server.stop().0.success());
    let out = db.cli(&[], &["bill-overage"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("STRIPE_SECRET_KEY"), "{stderr}");
    let out = db.cli(&[], &["bill-overage", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    // Resolving by hand: an outcome is required, the key must exist.
    let out = db.cli(&[], &["resolve-charge", "--key", "overage_x"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = db.cli(
        &[],
        &[
            "resolve-charge",
            "--key",
            "overage_x",
            "--stripe-item",
            "ii_1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no overage charge with idempotency key")
    );
    let out = db.cli(
        &[("STRIPE_MAX_ATTEMPTS", "0")],
        &["bill-overage", "--dry-run"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stripe-max-attempts"));
}

on_both_backends!(
    bills_overage_through_cron_and_cli,
    billing_needs_its_configuration,
);
