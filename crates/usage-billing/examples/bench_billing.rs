//! Billing benchmark: USERS pro users with overage on a throwaway PostgreSQL, billed
//! against a local fake Stripe with bounded concurrency.
//!
//! Baseline, measured in the same run: the same number of invoice items sent straight to
//! the fake with the same HTTP client and concurrency, without the ledger. The billing
//! run's figure is printed beside it as a ratio.
//!
//! ```sh
//! cargo run --release -p usage-billing --example bench_billing   # USERS=10000 CONCURRENCY=16
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::macros::datetime;
use tokio::sync::Semaphore;
use usage_billing::stripe::{InvoiceItem, StripeClient};
use usage_billing::{BillingOptions, HttpStripeClient, OverageService, RunMode, StripeConfig};
use usage_core::{ManualClock, PlanCatalog, UserId};
use usage_fake_stripe::{FakeStripe, SECRET};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn client(stripe: &FakeStripe) -> Arc<HttpStripeClient> {
    Arc::new(
        HttpStripeClient::new(StripeConfig {
            api_base: stripe.uri(),
            secret_key: SECRET.to_owned(),
            timeout: Duration::from_secs(10),
            ..StripeConfig::new(SECRET)
        })
        .unwrap(),
    )
}

#[tokio::main]
async fn main() {
    let users = env("USERS", 10_000);
    let concurrency = env("CONCURRENCY", 16);
    let db = usage_testdb::fresh_database();
    usage_store::migrate(db.url()).await.unwrap();
    // Users, and a November with 100,000 included calls and some overage each.
    db.psql(&format!(
        "INSERT INTO eco_users (id, email, plan, stripe_customer_id, created_at)
         SELECT 'eco_usr_bench' || lpad(i::text, 6, '0'), 'user' || i || '@bench.example',
                'pro', 'cus_bench' || i, '2026-01-01Z'
         FROM generate_series(1, {users}) i;
         INSERT INTO eco_usage_records (user_id, period_start, period_end, api_calls,
                                        overage_calls, updated_at)
         SELECT 'eco_usr_bench' || lpad(i::text, 6, '0'), '2026-11-01Z', '2026-12-01Z',
                100000 + 5 + i * 7, 5 + i * 7, '2026-11-20Z'
         FROM generate_series(1, {users}) i;
         ANALYZE;"
    ))
    .unwrap();
    let options = usage_store::PoolOptions {
        max_connections: u32::try_from(concurrency + 2).unwrap_or(32),
        ..usage_store::PoolOptions::default()
    };
    let store = usage_store::open(db.url(), &options).await.unwrap();
    let variables = PlanCatalog::default();
    let expected_cents: i64 = (1..=users as u64)
        .map(|i| variables.overage_price.total_in_cents(5 + i * 7).0)
        .sum();
    let catalog = usage_testkit::seeded_catalog(store.clone(), &variables).await;

    // Baseline: the same number of items straight to the fake, same client, same
    // concurrency.
    let baseline_stripe = FakeStripe::start().await;
    let baseline_client = client(&baseline_stripe);
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..users {
        let (client, permits) = (baseline_client.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let item = InvoiceItem {
                customer: format!("cus_bench{i}"),
                amount_cents: 1,
                description: "baseline".to_owned(),
                user_id: UserId::generate(),
                period_start: datetime!(2026-11-01 00:00 UTC),
                period_end: datetime!(2026-12-01 00:00 UTC),
                meter: "api_calls".to_owned(),
                quantity: 5,
                overage_calls: 5,
                calls_from: 0,
                calls_to: 5,
            };
            client
                .create_invoice_item(&item, &format!("baseline-{i}"))
                .await
                .unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}
    let baseline = started.elapsed();

    let stripe = FakeStripe::start().await;
    let service = OverageService::new(
        store,
        Some(client(&stripe)),
        catalog,
        Arc::new(ManualClock::new(datetime!(2026-11-20 12:00 UTC))),
        BillingOptions {
            concurrency,
            ..BillingOptions::default()
        },
    );
    let started = Instant::now();
    let summary = service.process_all(RunMode::Live).await.unwrap();
    let billing = started.elapsed();
    let created = stripe.created();
    let second = service.process_all(RunMode::Live).await.unwrap();

    println!("users: {users}, concurrency: {concurrency}, PostgreSQL, fake Stripe on loopback");
    println!(
        "baseline (items straight to the fake): {:.2} s, {:.0} items/s",
        baseline.as_secs_f64(),
        users as f64 / baseline.as_secs_f64()
    );
    println!(
        "billing run (ledger + Stripe + commit): {:.2} s, {:.0} users/s, {:.2}x the baseline",
        billing.as_secs_f64(),
        users as f64 / billing.as_secs_f64(),
        billing.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "summary: processed {}, charged {}, failed {}, amount {} cents (expected {expected_cents})",
        summary.processed, summary.charged, summary.failed, summary.amount_cents
    );
    println!(
        "item creations received by the fake: {} (requests {}); second run charged {}",
        created.len(),
        stripe.received().len(),
        second.charged
    );
    assert_eq!(created.len(), users, "exactly one item per user");
    assert_eq!(summary.amount_cents, expected_cents);
    assert_eq!(second.charged, 0);
}
