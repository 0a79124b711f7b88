//! `POST /api/webhooks/stripe` against the real server on both backends, with events
//! signed by the tests' own HMAC-SHA256 (written here from its definition, checked
//! against RFC 4231): plans follow subscriptions, quota follows plans, replays, stale and
//! forged signatures change nothing, and one event delivered to two instances at once
//! takes effect once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, Db, Server, eventually};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use usage_core::{Plan, UserId};

const WEBHOOK_SECRET: &str = "whsec_test_0123456789abcdef0123456789abcdef";

/// HMAC-SHA256 (RFC 2104) from SHA-256 alone.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(block.map(|b| b ^ 0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(block.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[test]
fn the_tests_hmac_is_rfc_4231s() {
    // Test cases 2 and 6 of RFC 4231 (a short key, and a key longer than the block).
    assert_eq!(
        hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(
        hex::encode(hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First"
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `Stripe-Signature` for `body` signed at `t` with `secret`.
fn signature(secret: &str, t: i64, body: &str) -> String {
    let mac = hmac_sha256(secret.as_bytes(), format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac))
}

/// A subscription event as Stripe sends it (the fields we read, and some we do not).
fn subscription_event(
    id: &str,
    kind: &str,
    created: i64,
    customer: &str,
    status: &str,
    prices: &[&str],
) -> String {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "livemode": false,
        "type": format!("customer.subscription.{kind}"),
        "data": {"object": {
            "id": "sub_123",
            "object": "subscription",
            "customer": customer,
            "status": status,
            "items": {"object": "list", "data": prices.iter().map(|p| json!({
                "id": "si_1", "object": "subscription_item",
                "price": {"id": p, "object": "price", "unit_amount": 4900}
            })).collect::<Vec<_>>()}
        }}
    })
    .to_string()
}

async fn deliver(server: &Server, signature: Option<&str>, body: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(server.url("/api/webhooks/stripe"))
        .header("Content-Type", "application/json")
        .body(body.to_owned());
    if let Some(signature) = signature {
        req = req.header("Stripe-Signature", signature);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Delivers `body` signed now; returns the outcome of a 200.
async fn signed(server: &Server, body: &str) -> String {
    let (status, answer) =
        deliver(server, Some(&signature(WEBHOOK_SECRET, now(), body)), body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["received"], true);
    answer["outcome"].as_str().unwrap().to_owned()
}

async fn plan_of(db: &Db, user: &str) -> Plan {
    db.store()
        .await
        .user_by_id(&UserId::parse(user).unwrap())
        .await
        .unwrap()
        .unwrap()
        .plan
}

/// Ada, free, linked to `cus_ada`, and her key.
fn free_customer_with_key(db: &Db) -> (String, String) {
    let ada = db.create(&[
        "users",
        "create",
        "--email",
        "ada@example.com",
        "--plan",
        "free",
        "--stripe-customer-id",
        "cus_ada",
    ]);
    let key = db.create(&["keys", "create", "--user", &ada]);
    (ada, key)
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ("STRIPE_PRICE_PRO", "price_pro"),
        ("STRIPE_PRICE_ENTERPRISE", "price_ent"),
        ("FREE_MONTHLY_CALLS", "3"),
        ("PRO_MONTHLY_CALLS", "1000"),
        ("KEY_REVOCATION_POLL_MS", "200"),
        ("USAGE_FLUSH_INTERVAL_MS", "100"),
    ]
}

async fn subscriptions_set_plans_and_quota_follows(backend: Backend) {
    let db = Db::new(backend);
    let (ada, key) = free_customer_with_key(&db);
    let server = db.start(&env());

    // Free: 3 calls, then 429.
    for _ in 0..3 {
        assert_eq!(server.ping(&key).await.status(), 200);
    }
    assert_eq!(server.ping(&key).await.status(), 429);

    let t0 = now();
    let created = subscription_event("evt_1", "created", t0, "cus_ada", "active", &["price_pro"]);
    // Refused deliveries change nothing: no header, another secret, a stale or future
    // time, a body that is not the one signed, a malformed header.
    let stale = signature(WEBHOOK_SECRET, t0 - 301, &created);
    let future = signature(WEBHOOK_SECRET, t0 + 600, &created);
    let forged = signature("whsec_another_secret_0123456789abcdef", t0, &created);
    let other_body = signature(
        WEBHOOK_SECRET,
        t0,
        &created.replace("price_pro", "price_ent"),
    );
    for bad in [
        None,
        Some(forged.as_str()),
        Some(stale.as_str()),
        Some(future.as_str()),
        Some(other_body.as_str()),
        Some("t=,v1="),
        Some("garbage"),
    ] {
        let (status, answer) = deliver(&server, bad, &created).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("invalid_signature")),
            "{bad:?}: {answer}"
        );
        assert!(!answer["message"].as_str().unwrap().contains(WEBHOOK_SECRET));
    }
    assert_eq!(plan_of(&db, &ada).await, Plan::free());

    // Several v1 (a rolled secret): one match is enough.
    let good = signature(WEBHOOK_SECRET, t0, &created);
    let both = format!("{},v1={}", forged, good.split("v1=").nth(1).unwrap());
    let (status, answer) = deliver(&server, Some(&both), &created).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("applied")),
        "{answer}"
    );
    assert_eq!(plan_of(&db, &ada).await, Plan::pro());
    // This instance follows at once: the blocked customer calls again.
    assert_eq!(server.ping(&key).await.status(), 200);
    assert_eq!(server.ping(&key).await.status(), 200);

    // Stripe retries: the same event again takes no effect, even after a manual change.
    assert!(
        db.cli(
            &[],
            &["users", "set-plan", "--user", &ada, "--plan", "enterprise"]
        )
        .status
        .success()
    );
    assert_eq!(signed(&server, &created).await, "duplicate");
    assert_eq!(plan_of(&db, &ada).await, Plan::enterprise());

    // The highest of our prices wins; an unknown price or a status that means nothing
    // changes nothing; other events and customers are acknowledged.
    let upgrade = subscription_event(
        "evt_2",
        "updated",
        t0 + 1,
        "cus_ada",
        "trialing",
        &["price_x", "price_pro"],
    );
    assert_eq!(signed(&server, &upgrade).await, "applied");
    assert_eq!(plan_of(&db, &ada).await, Plan::pro());
    let unknown_price = subscription_event(
        "evt_3",
        "updated",
        t0 + 2,
        "cus_ada",
        "active",
        &["price_x"],
    );
    assert_eq!(signed(&server, &unknown_price).await, "unknown_price");
    let past_due = subscription_event(
        "evt_4",
        "updated",
        t0 + 2,
        "cus_ada",
        "past_due",
        &["price_ent"],
    );
    assert_eq!(signed(&server, &past_due).await, "ignored");
    let stranger = subscription_event(
        "evt_5",
        "created",
        t0 + 2,
        "cus_nobody",
        "active",
        &["price_ent"],
    );
    assert_eq!(signed(&server, &stranger).await, "unknown_customer");
    let invoice =
        json!({"id": "evt_6", "type": "invoice.paid", "created": t0, "data": {"object": {}}})
            .to_string();
    assert_eq!(signed(&server, &invoice).await, "ignored");
    assert_eq!(plan_of(&db, &ada).await, Plan::pro());
    // An id PostgreSQL could not store (NUL): refused as not an event, not a 503 for ever.
    let nul = subscription_event(
        "evt_\u{0}",
        "updated",
        t0 + 2,
        "cus_ada",
        "active",
        &["price_ent"],
    );
    let (status, answer) =
        deliver(&server, Some(&signature(WEBHOOK_SECRET, now(), &nul)), &nul).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_event")),
        "{answer}"
    );
    // Signed but not an event: a 400 that says so (Stripe would retry; nothing changed).
    let (status, answer) = deliver(
        &server,
        Some(&signature(WEBHOOK_SECRET, now(), "[1]")),
        "[1]",
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_event")),
        "{answer}"
    );

    // Cancelled: free again, judged on this month's 5 calls at once.
    let cancel = subscription_event(
        "evt_7",
        "deleted",
        t0 + 3,
        "cus_ada",
        "canceled",
        &["price_pro"],
    );
    assert_eq!(signed(&server, &cancel).await, "applied");
    assert_eq!(plan_of(&db, &ada).await, Plan::free());
    let res = server.ping(&key).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["X-RateLimit-Limit"], "3");
    // An update created before the cancellation arrives late: ignored.
    let late = subscription_event(
        "evt_8",
        "updated",
        t0 + 2,
        "cus_ada",
        "active",
        &["price_ent"],
    );
    assert_eq!(signed(&server, &late).await, "stale");
    assert_eq!(plan_of(&db, &ada).await, Plan::free());
    // Each delivery is counted under its outcome, refused ones included.
    for (outcome, deliveries) in [
        ("invalid_signature", 7.0),
        ("duplicate", 1.0),
        ("stale", 1.0),
    ] {
        let series = format!("usage_stripe_webhook_events_total{{outcome=\"{outcome}\"}}");
        assert_eq!(server.metric(&series).await, deliveries, "{series}");
    }
    assert!(
        server
            .metric("usage_stripe_webhook_events_total{outcome=\"applied\"}")
            .await
            >= 3.0
    );

    let res = reqwest::Client::new()
        .get(server.url("/api/webhooks/stripe"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    let (status, log) = server.stop();
    assert!(status.success());
    assert!(
        !log.iter().any(|l| l.contains(WEBHOOK_SECRET)),
        "the secret is never logged"
    );

    // Without STRIPE_WEBHOOK_SECRET the endpoint does not exist.
    let server = db.start(&[]);
    let (status, answer) = deliver(&server, Some(&good), &created).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")));
}

on_both_backends!(
    subscriptions_set_plans_and_quota_follows,
    the_end_of_an_old_subscription_keeps_the_new_ones_plan
);

/// An upgrade made as a new subscription, then the old one deleted (or cancelled): the
/// customer keeps the plan they pay for, and is not refused with 429s.
async fn the_end_of_an_old_subscription_keeps_the_new_ones_plan(backend: Backend) {
    let db = Db::new(backend);
    let (ada, key) = free_customer_with_key(&db);
    let server = db.start(&env());
    let of = |sub: &str, event: String| event.replace("sub_123", sub);
    let t0 = now();
    let old = of(
        "sub_OLD",
        subscription_event(
            "evt_o1",
            "created",
            t0 - 60,
            "cus_ada",
            "active",
            &["price_pro"],
        ),
    );
    assert_eq!(signed(&server, &old).await, "applied");
    let new = of(
        "sub_NEW",
        subscription_event(
            "evt_n1",
            "created",
            t0 - 30,
            "cus_ada",
            "active",
            &["price_ent"],
        ),
    );
    assert_eq!(signed(&server, &new).await, "applied");
    assert_eq!(plan_of(&db, &ada).await, Plan::enterprise());

    // The old one ends, both ways Stripe says it: nothing changes.
    let cancelled = of(
        "sub_OLD",
        subscription_event(
            "evt_o2",
            "updated",
            t0 - 20,
            "cus_ada",
            "canceled",
            &["price_pro"],
        ),
    );
    assert_eq!(signed(&server, &cancelled).await, "other_subscription");
    let deleted = of(
        "sub_OLD",
        subscription_event(
            "evt_o3",
            "deleted",
            t0 - 10,
            "cus_ada",
            "canceled",
            &["price_pro"],
        ),
    );
    assert_eq!(signed(&server, &deleted).await, "other_subscription");
    assert_eq!(signed(&server, &deleted).await, "duplicate");
    assert_eq!(plan_of(&db, &ada).await, Plan::enterprise());
    // Past the free plan's 3 calls: still admitted.
    for _ in 0..5 {
        assert_eq!(server.ping(&key).await.status(), 200);
    }

    // The subscription that set the plan ends: back to free, and the quota follows.
    let ended = of(
        "sub_NEW",
        subscription_event(
            "evt_n2",
            "deleted",
            t0,
            "cus_ada",
            "canceled",
            &["price_ent"],
        ),
    );
    assert_eq!(signed(&server, &ended).await, "applied");
    assert_eq!(plan_of(&db, &ada).await, Plan::free());
    eventually(
        "free again: over quota",
        Duration::from_secs(10),
        async || server.ping(&key).await.status() == 429,
    )
    .await;
    let (status, _) = server.stop();
    assert!(status.success());
}

/// Two instances on one PostgreSQL: each event, delivered to both at once, is applied by
/// exactly one; the plan change reaches the other instance's quota decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_on_two_instances_applies_once() {
    let db = Db::new(Backend::Postgres);
    let (ada, key) = free_customer_with_key(&db);
    let a = db.start(&env());
    let b = db.start(&env());
    assert_eq!(b.ping(&key).await.headers()["X-RateLimit-Limit"], "3");

    let t0 = now();
    for round in 0..6i64 {
        let (status, plan) = if round % 2 == 0 {
            ("active", "price_pro")
        } else {
            ("canceled", "price_pro")
        };
        let event = subscription_event(
            &format!("evt_race_{round}"),
            "updated",
            t0 + round,
            "cus_ada",
            status,
            &[plan],
        );
        let (x, y) = tokio::join!(signed(&a, &event), signed(&b, &event));
        let mut outcomes = [x, y];
        outcomes.sort();
        assert_eq!(
            outcomes,
            ["applied".to_owned(), "duplicate".to_owned()],
            "round {round}"
        );
    }
    // Last round cancelled: free. Then pro again through A; B follows by its poll.
    assert_eq!(plan_of(&db, &ada).await, Plan::free());
    let upgrade = subscription_event(
        "evt_up",
        "updated",
        t0 + 10,
        "cus_ada",
        "active",
        &["price_ent"],
    );
    assert_eq!(signed(&a, &upgrade).await, "applied");
    eventually(
        "instance B follows the plan change",
        Duration::from_secs(10),
        async || {
            let res = b.ping(&key).await;
            res.status() == 200 && !res.headers().contains_key("X-RateLimit-Limit")
        },
    )
    .await;
}
