//! An axum service metered by nexus-usage.
//!
//! ```sh
//! cargo run -p usage-embed --features axum --example axum_app
//! cargo run --release -p usage-server -- keys create --user <USER_ID>   # same database (users create --email .. --plan free)
//! curl -i -H 'X-API-Key: <key>' http://127.0.0.1:8091/v1/items/42
//! curl -i -X POST -H 'X-API-Key: <key>' http://127.0.0.1:8091/v1/generate   # reports 1,234 tokens
//! ```
//!
//! Reporting units needs a `tokens` meter in the catalog (`usage-server plans apply
//! examples/catalog.toml`); a unit of a meter the catalog does not have is left out.
//!
//! `DATABASE_URL` (default `sqlite://data/usage.db`) is the database `usage-server` uses:
//! users and keys made there work here. `BIND_ADDR` defaults to `127.0.0.1:8091`.

use axum::extract::{Extension, Path};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use usage_embed::{Caller, Reported, UsageMeter, UsageOptions};

async fn item(Path(id): Path<u32>, Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(json!({"item": id, "user_id": caller.user_id}))
}

/// A handler that reports what it used: 1,234 tokens, stored with the call.
async fn generate() -> impl IntoResponse {
    let tokens = 1_234; // what the model used for this answer
    (
        Extension(Reported::units("tokens", tokens)),
        Json(json!({"text": "..."})),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://data/usage.db".into());
    let bind = std::env::var("BIND_ADDR").unwrap_or_else(|_| "127.0.0.1:8091".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);

    // The five lines: start, layer, serve, shut down.
    let usage = UsageMeter::start(&url, UsageOptions::default()).await?;
    let app = Router::new()
        .route("/v1/items/{id}", get(item))
        .route("/v1/generate", post(generate))
        .layer(usage.layer());
    axum::serve(listener, app)
        .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
        .await?;
    usage.shutdown().await;
    Ok(())
}
