//! The HTTP Stripe client against a local fake of Stripe: request shape, retries with one
//! idempotency key, what is and is not retried, and errors that never carry the key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use time::macros::datetime;
use usage_billing::stripe::{InvoiceItem, StripeClient, StripeError};
use usage_billing::{HttpStripeClient, StripeConfig};
use usage_core::UserId;
use usage_fake_stripe::{FakeStripe, SECRET, Scripted};

fn client(stripe: &FakeStripe, max_attempts: u32, timeout: Duration) -> HttpStripeClient {
    HttpStripeClient::new(StripeConfig {
        api_base: stripe.uri(),
        secret_key: SECRET.to_owned(),
        timeout,
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(200),
    })
    .unwrap()
}

fn item(customer: &str) -> InvoiceItem {
    InvoiceItem {
        customer: customer.to_owned(),
        amount_cents: 500,
        description: "API overage 2026-11: 5000 call(s)".to_owned(),
        user_id: UserId::parse("eco_usr_abcdefghijklmnop").unwrap(),
        period_start: datetime!(2026-11-01 00:00 UTC),
        period_end: datetime!(2026-12-01 00:00 UTC),
        meter: "api_calls".to_owned(),
        quantity: 5000,
        overage_calls: 5000,
        calls_from: 0,
        calls_to: 5000,
    }
}

#[tokio::test]
async fn sends_the_contracts_form_with_key_and_secret() {
    let stripe = FakeStripe::start().await;
    let created = client(&stripe, 3, Duration::from_secs(5))
        .create_invoice_item(&item("cus_1"), "key-1")
        .await
        .unwrap();
    assert_eq!(created.id, "ii_fake1");
    let received = stripe.received();
    assert_eq!(received.len(), 1);
    let req = &received[0];
    assert_eq!(
        req.authorization.as_deref(),
        Some(&*format!("Bearer {SECRET}"))
    );
    assert_eq!(req.idempotency_key.as_deref(), Some("key-1"));
    assert_eq!(
        req.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    let field = |name: &str| req.form.get(name).map(String::as_str);
    assert_eq!(field("customer"), Some("cus_1"));
    assert_eq!(field("amount"), Some("500"));
    assert_eq!(field("currency"), Some("usd"));
    assert_eq!(
        field("description"),
        Some("API overage 2026-11: 5000 call(s)")
    );
    assert_eq!(field("metadata[user_id]"), Some("eco_usr_abcdefghijklmnop"));
    assert_eq!(
        field("metadata[period_start]"),
        Some("2026-11-01T00:00:00Z")
    );
    assert_eq!(field("metadata[overage_calls]"), Some("5000"));
    assert_eq!(field("metadata[meter]"), Some("api_calls"));
    assert_eq!(field("metadata[quantity]"), Some("5000"));
    // 2026-11-01T00:00:00Z and 2026-12-01T00:00:00Z.
    assert_eq!(field("period[start]"), Some("1793491200"));
    assert_eq!(field("period[end]"), Some("1796083200"));
}

#[tokio::test]
async fn server_errors_and_429_are_retried_with_the_same_key() {
    let stripe = FakeStripe::start().await;
    stripe.script([
        Scripted::Fail {
            status: 500,
            headers: vec![],
        },
        Scripted::Fail {
            status: 429,
            headers: vec![("retry-after", "0".to_owned())],
        },
        Scripted::Fail {
            status: 503,
            headers: vec![],
        },
    ]);
    let created = client(&stripe, 4, Duration::from_secs(5))
        .create_invoice_item(&item("cus_1"), "key-retry")
        .await
        .unwrap();
    assert_eq!(created.id, "ii_fake1");
    let keys = stripe.idempotency_keys();
    assert_eq!(keys, vec!["key-retry"; 4]);
    assert_eq!(stripe.created().len(), 1);
}

#[tokio::test]
async fn a_retry_waits_as_long_as_stripe_asks() {
    let stripe = FakeStripe::start().await;
    let busy = || Scripted::Fail {
        status: 503,
        headers: vec![("retry-after", "1".to_owned())],
    };
    stripe.script([busy(), busy(), busy()]);
    let client = HttpStripeClient::new(StripeConfig {
        api_base: stripe.uri(),
        secret_key: SECRET.to_owned(),
        timeout: Duration::from_secs(5),
        max_attempts: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_secs(5),
    })
    .unwrap();
    let err = client
        .create_invoice_item(&item("cus_1"), "key-busy")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StripeError::Unavailable { attempts: 2, .. }),
        "{err}"
    );
    let received = stripe.received();
    assert_eq!(received.len(), 2, "two attempts, as configured");
    let gap = received[1].at - received[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "Retry-After: 1 is honoured, waited {gap:?}"
    );
}

#[test]
fn the_configuration_debugs_without_the_secret_key() {
    let config = StripeConfig::new("sk_live_very_secret");
    let text = format!("{config:?}");
    assert!(text.starts_with("StripeConfig {"), "{text}");
    assert!(text.contains("api.stripe.com"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(!text.contains("sk_live"), "{text}");
}

#[tokio::test]
async fn a_timeout_after_stripe_applied_the_item_is_retried_into_the_same_item() {
    let stripe = FakeStripe::start().await;
    stripe.script([Scripted::ApplyThenStall(Duration::from_secs(2))]);
    let created = client(&stripe, 3, Duration::from_millis(300))
        .create_invoice_item(&item("cus_1"), "key-stall")
        .await
        .unwrap();
    assert_eq!(created.id, "ii_fake1", "the second try gets the first item");
    assert_eq!(stripe.received().len(), 2);
    assert_eq!(stripe.created().len(), 1);
}

#[tokio::test]
async fn refusals_are_not_retried() {
    let stripe = FakeStripe::start().await;
    stripe.refuse("cus_declined");
    let err = client(&stripe, 4, Duration::from_secs(5))
        .create_invoice_item(&item("cus_declined"), "key-402")
        .await
        .unwrap_err();
    assert!(err.is_refusal());
    assert_eq!(
        err,
        StripeError::Refused {
            status: 402,
            code: Some("card_declined".to_owned()),
            message: "Your card was declined.".to_owned()
        }
    );
    assert_eq!(stripe.received().len(), 1);

    // Stripe-Should-Retry: false wins over a 5xx status.
    stripe.script([Scripted::Fail {
        status: 500,
        headers: vec![("stripe-should-retry", "false".to_owned())],
    }]);
    let err = client(&stripe, 4, Duration::from_secs(5))
        .create_invoice_item(&item("cus_1"), "key-no-retry")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StripeError::Refused { status: 500, .. }),
        "{err}"
    );
    assert_eq!(stripe.received().len(), 2);
}

#[tokio::test]
async fn giving_up_says_so_without_the_secret() {
    let stripe = FakeStripe::start().await;
    stripe.script((0..3).map(|_| Scripted::Fail {
        status: 502,
        headers: vec![],
    }));
    let err = client(&stripe, 3, Duration::from_secs(5))
        .create_invoice_item(&item("cus_1"), "key-down")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StripeError::Unavailable { attempts: 3, .. }),
        "{err}"
    );
    assert!(!err.is_refusal());
    assert!(!format!("{err} {err:?}").contains(SECRET));

    // Nothing listening at all.
    let unreachable = HttpStripeClient::new(StripeConfig {
        api_base: "http://127.0.0.1:9".to_owned(),
        secret_key: SECRET.to_owned(),
        timeout: Duration::from_secs(2),
        max_attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    })
    .unwrap();
    let err = unreachable
        .create_invoice_item(&item("cus_1"), "key-x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StripeError::Unavailable { attempts: 2, .. }),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains(SECRET));

    // A wrong key is a refusal (401), not retried.
    let wrong = HttpStripeClient::new(StripeConfig {
        api_base: stripe.uri(),
        ..StripeConfig::new("sk_test_wrong")
    })
    .unwrap();
    let err = wrong
        .create_invoice_item(&item("cus_1"), "key-401")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StripeError::Refused { status: 401, .. }),
        "{err}"
    );
    assert!(!err.to_string().contains("sk_test_wrong"));
}
