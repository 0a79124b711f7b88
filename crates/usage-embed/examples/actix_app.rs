//! An actix-web service metered by nexus-usage.
//!
//! ```sh
//! cargo run -p usage-embed --features actix --example actix_app
//! cargo run --release -p usage-server -- keys create --user <USER_ID>   # same database (users create --email .. --plan free)
//! curl -i -H 'X-API-Key: <key>' http://127.0.0.1:8092/v1/items/42
//! curl -i -X POST -H 'X-API-Key: <key>' http://127.0.0.1:8092/v1/generate   # reports 1,234 tokens
//! ```
//!
//! Reporting units needs a `tokens` meter in the catalog (`usage-server plans apply
//! examples/catalog.toml`); a unit of a meter the catalog does not have is left out.
//!
//! `DATABASE_URL` (default `sqlite://data/usage.db`) is the database `usage-server` uses:
//! users and keys made there work here. `BIND_ADDR` defaults to `127.0.0.1:8092`.

use actix_web::{App, HttpResponse, HttpServer, web};
use usage_embed::{Caller, ReportUnits, UsageMeter, UsageOptions};

async fn item(path: web::Path<u32>, caller: web::ReqData<Caller>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"item": *path, "user_id": caller.user_id}))
}

/// A handler that reports what it used: 1,234 tokens, stored with the call.
async fn generate() -> HttpResponse {
    let tokens = 1_234; // what the model used for this answer
    HttpResponse::Ok()
        .json(serde_json::json!({"text": "..."}))
        .report("tokens", tokens)
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://data/usage.db".into());
    let bind = std::env::var("BIND_ADDR").unwrap_or_else(|_| "127.0.0.1:8092".into());

    // The five lines: start, wrap, serve, shut down.
    let usage = UsageMeter::start(&url, UsageOptions::default()).await?;
    let metering = usage.actix();
    HttpServer::new(move || {
        App::new()
            .wrap(metering.clone())
            .route("/v1/items/{id}", web::get().to(item))
            .route("/v1/generate", web::post().to(generate))
    })
    .bind(&bind)?
    .run()
    .await?;
    usage.shutdown().await;
    Ok(())
}
