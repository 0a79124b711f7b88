//! The HTTP server: operations endpoints now; the metered API and user endpoints are
//! mounted here from their crates as they arrive.

use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, ResponseError, web};
use serde_json::json;
use usage_auth::jwt::JwtKeys;
use usage_core::Store;

use crate::config::Config;
use crate::{ApiError, ServerError};

/// What the handlers share.
struct AppState {
    store: Arc<dyn Store>,
}

/// Migrates, opens the pool, and serves on `config.bind` until SIGTERM or Ctrl-C
/// (actix-web finishes in-flight requests before it returns).
pub(crate) async fn serve(config: Config) -> Result<(), ServerError> {
    // Fail at start, not at the first request, when the JWT settings are unusable.
    JwtKeys::new(&config.jwt()?)?;
    let applied = usage_store::migrate(&config.database_url).await?;
    if applied > 0 {
        tracing::info!(applied, "database migrated");
    }
    let store = usage_store::open(&config.database_url, &config.pool).await?;
    tracing::info!(backend = store.backend_name(), "database ready");

    let state = web::Data::new(AppState { store });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(operations_routes)
            .default_service(web::to(not_found))
    })
    .bind(config.bind)
    .map_err(|e| ServerError::Bind {
        addr: config.bind,
        reason: e.to_string(),
    })?;
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
    }
    server.run().await.map_err(ServerError::Http)?;
    tracing::info!("stopped");
    Ok(())
}

fn operations_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/healthz")
            .route(web::get().to(healthz))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(readyz))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.store.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness check failed");
        ApiError::database_unavailable()
    })?;
    Ok(HttpResponse::Ok().json(json!({"status": "ready", "database": state.store.backend_name()})))
}

async fn not_found() -> HttpResponse {
    ApiError::not_found().error_response()
}

async fn method_not_allowed() -> HttpResponse {
    ApiError::method_not_allowed().error_response()
}
