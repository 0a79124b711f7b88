//! An axum service metered by nexus-usage.
//!
//! ```sh
//! cargo run -p usage-embed --features axum --example axum_app
//! cargo run --release -p usage-server -- keys create --user <USER_ID>   # same database (users create --email .. --plan free)
//! curl -i -H 'X-API-Key: <key>' http://127.0.0.1:8091/v1/items/42
//! ```
//!
//! `DATABASE_URL` (default `sqlite://data/usage.db`) is the database `usage-server` uses:
//! users and keys made there work here. `BIND_ADDR` defaults to `127.0.0.1:8091`.

use axum::extract::{Extension, Path};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use usage_embed::{Caller, UsageMeter, UsageOptions};

async fn item(Path(id): Path<u32>, Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(json!({"item": id, "user_id": caller.user_id}))
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
        .layer(usage.layer());
    axum::serve(listener, app)
        .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
        .await?;
    usage.shutdown().await;
    Ok(())
}
