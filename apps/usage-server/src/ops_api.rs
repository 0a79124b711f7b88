//! The sample metered route and the operations endpoints (health, readiness, metrics).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use usage_core::{ApiKeyId, Caller, UserId};
use utoipa::Path as _;
use utoipa::ToSchema;

use crate::ApiError;
use crate::api_types::{ErrorResponse, QuotaExceeded, Registry};
use crate::state::{AppState, method_not_allowed};

/// Health, readiness and metrics.
pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    cfg.service(
        web::resource(registry.path::<__path_healthz>())
            .route(web::get().to(healthz))
            .default_service(method_not_allowed(registry.allow(&__path_healthz::path()))),
    )
    .service(
        web::resource(registry.path::<__path_readyz>())
            .route(web::get().to(readyz))
            .default_service(method_not_allowed(registry.allow(&__path_readyz::path()))),
    )
    .service(
        web::resource(registry.path::<__path_metrics_text>())
            .route(web::get().to(metrics_text))
            .default_service(method_not_allowed(
                registry.allow(&__path_metrics_text::path()),
            )),
    );
}

/// The sample metered route's answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct Ping {
    /// Always true.
    ok: bool,
    /// The caller (null only in the unmetered benchmark mode).
    user_id: Option<UserId>,
    /// The key used.
    key_id: Option<ApiKeyId>,
}

/// The sample metered route: key check, quota, short window, tracking.
#[utoipa::path(get, path = "/api/v1/ping", tag = "metered",
    security(("api_key" = []), ("api_key_header" = [])),
    responses(
        (status = 200, body = Ping, headers(
            ("X-RateLimit-Limit" = u64, description = "Monthly calls (limited plans)."),
            ("X-RateLimit-Remaining" = u64, description = "Calls left this period, never negative."),
            ("X-RateLimit-Reset" = u64, description = "Unix seconds when the period ends."),
            ("RateLimit-Policy" = String, description = "IETF policies (draft-11), e.g. `\"monthly\";q=1000;w=2592000`, and `\"burst\";q=..;w=..` with a short window."),
            ("RateLimit" = String, description = "IETF state of each policy, e.g. `\"monthly\";r=999;t=864000`."))),
        (status = 401, description = "Missing, unknown, revoked or expired API key.", body = ErrorResponse),
        (status = 429, description = "Over the monthly quota (free plan) or the short window.",
         body = QuotaExceeded, headers(
            ("Retry-After" = u64, description = "Seconds."),
            ("X-RateLimit-Limit" = u64), ("X-RateLimit-Remaining" = u64), ("X-RateLimit-Reset" = u64),
            ("RateLimit-Policy" = String), ("RateLimit" = String))),
        (status = 503, description = "The database did not answer and the key was not known.", body = ErrorResponse),
    ))]
pub(crate) async fn ping(caller: web::ReqData<Caller>) -> HttpResponse {
    HttpResponse::Ok().json(Ping {
        ok: true,
        user_id: Some(caller.user_id.clone()),
        key_id: Some(caller.api_key_id.clone()),
    })
}

/// [`ping`], reporting 1,234 `tokens` with its response (`--bench-report-units`).
pub(crate) async fn ping_reporting_units(caller: web::ReqData<Caller>) -> HttpResponse {
    use usage_door::report::ReportUnits;
    ping(caller).await.report("tokens", 1_234)
}

pub(crate) async fn ping_unmetered() -> HttpResponse {
    HttpResponse::Ok().json(Ping {
        ok: true,
        user_id: None,
        key_id: None,
    })
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`.
    status: &'static str,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Ready {
    /// `ready`.
    status: &'static str,
    /// `postgres` or `sqlite`.
    database: &'static str,
}

/// The process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// The database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Ready), (status = 503, body = ErrorResponse)))]
pub(crate) async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.store.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness check failed");
        ApiError::database_unavailable()
    })?;
    Ok(HttpResponse::Ok().json(Ready {
        status: "ready",
        database: state.store.backend_name(),
    }))
}

/// Prometheus text: requests, rejections, tracker queue and flushes, caches.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4.", body = String,
               content_type = "text/plain; version=0.0.4; charset=utf-8")))]
pub(crate) async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
