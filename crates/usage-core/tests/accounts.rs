//! Accounts: creating users, and the rules their input must pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;

use time::macros::datetime;
use usage_core::accounts::*;
use usage_core::{ManualClock, Plan, UserId};
use usage_testkit::memory::MemoryStore;

fn accounts() -> Accounts {
    Accounts::new(
        Arc::new(MemoryStore::new()),
        Arc::new(ManualClock::new(datetime!(2026-11-22 10:00 UTC))),
    )
}

#[tokio::test]
async fn creates_users_and_refuses_bad_input() {
    let accounts = accounts();
    let ada = accounts
        .create_user("ada@example.com", Plan::free(), Some("cus_Abc123"))
        .await
        .unwrap();
    assert_eq!(ada.created_at, datetime!(2026-11-22 10:00 UTC));
    assert_eq!(ada.stripe_customer_id.as_deref(), Some("cus_Abc123"));

    let taken = accounts
        .create_user("ADA@example.com", Plan::pro(), None)
        .await;
    assert!(matches!(taken, Err(AccountError::EmailTaken(e)) if e == "ada@example.com"));
    let bad_email = accounts
        .create_user("ada", Plan::pro(), None)
        .await
        .unwrap_err();
    assert!(
        bad_email.to_string().starts_with("email must look like"),
        "{bad_email}"
    );
    let bad_customer = accounts
        .create_user("bob@example.com", Plan::pro(), Some("acct_1"))
        .await;
    assert!(matches!(bad_customer, Err(AccountError::Invalid(_))));

    let pro = accounts.set_plan(&ada.id, Plan::pro()).await.unwrap();
    assert_eq!(pro.plan, Plan::pro());
    let missing = accounts.set_plan(&UserId::generate(), Plan::pro()).await;
    assert!(matches!(missing, Err(AccountError::UnknownUser(_))));

    let taken = accounts
        .create_user("carol@example.com", Plan::pro(), Some("cus_Abc123"))
        .await;
    assert!(matches!(taken, Err(AccountError::StripeCustomerTaken(c)) if c == "cus_Abc123"));
    let bob = accounts
        .create_user("bob@example.com", Plan::free(), None)
        .await
        .unwrap();
    let taken = accounts
        .set_stripe_customer(&bob.id, Some("cus_Abc123"))
        .await;
    assert!(matches!(taken, Err(AccountError::StripeCustomerTaken(c)) if c == "cus_Abc123"));
    let bad = accounts.set_stripe_customer(&bob.id, Some("cus_")).await;
    assert!(matches!(bad, Err(AccountError::Invalid(_))));
    let linked = accounts
        .set_stripe_customer(&bob.id, Some("cus_Bob1"))
        .await
        .unwrap();
    assert_eq!(linked.stripe_customer_id.as_deref(), Some("cus_Bob1"));
    let missing = accounts
        .set_stripe_customer(&UserId::generate(), Some("cus_X"))
        .await;
    assert!(matches!(missing, Err(AccountError::UnknownUser(_))));
}
