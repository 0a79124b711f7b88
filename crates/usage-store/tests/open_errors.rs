//! Opening a database that is not there fails with a clear, password-free error.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use usage_store::{PoolOptions, StoreError};

#[tokio::test]
async fn unreachable_postgres_is_a_connect_error_without_the_password() {
    // Port 1 on loopback: nothing listens there.
    let url = "postgres://app:hunter2@127.0.0.1:1/usage";
    let options = PoolOptions {
        connect_timeout: Duration::from_secs(2),
        ..PoolOptions::default()
    };
    let err = usage_store::open(url, &options)
        .await
        .err()
        .expect("must fail");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Connect { .. }), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let err = usage_store::migrate(url).await.expect_err("must fail");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test]
async fn unsupported_scheme_is_named() {
    let err = usage_store::migrate("mysql://localhost/x")
        .await
        .expect_err("must fail");
    assert!(matches!(err, StoreError::UnsupportedUrl(_)));
    assert!(
        err.to_string().contains("postgres:// or sqlite://"),
        "{err}"
    );
}

#[tokio::test]
async fn sqlite_in_a_directory_that_cannot_be_created_fails_clearly() {
    let err = usage_store::migrate("sqlite:///proc/no/such/dir/usage.db")
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains("cannot create directory"), "{err}");
}
