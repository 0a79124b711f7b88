//! Cron endpoints (`Authorization: Bearer <CRON_SECRET>`); the built-in schedules are in
//! [`crate::jobs`].

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use usage_billing::RunMode;
use usage_door::middleware::bearer_credential;

use crate::ApiError;
use crate::api_types::{AggregateParams, BillingParams, CronErrors, Registry};
use crate::state::{AppState, invalid_query, method_not_allowed};
use serde::Serialize;
use usage_analytics::AggregationReport;
use usage_billing::{BillingSummary, Reconciliation};
use utoipa::Path as _;
use utoipa::ToSchema;

pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    cfg.service(
        web::resource(registry.path::<__path_aggregate_daily>())
            .route(web::post().to(aggregate_daily))
            .default_service(method_not_allowed(
                registry.allow(&__path_aggregate_daily::path()),
            )),
    );
    cfg.service(
        web::resource(registry.path::<__path_process_overage>())
            .route(web::post().to(process_overage))
            .default_service(method_not_allowed(
                registry.allow(&__path_process_overage::path()),
            )),
    );
    cfg.service(
        web::resource(registry.path::<__path_overage_reconciliation>())
            .route(web::get().to(overage_reconciliation))
            .default_service(method_not_allowed(
                registry.allow(&__path_overage_reconciliation::path()),
            )),
    );
}

/// `GET /api/cron/overage-reconciliation`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ReconciliationReport {
    /// Periods that do not add up.
    drift: usize,
    /// Every user and period with overage or charges.
    items: Vec<Reconciliation>,
}

#[derive(Deserialize)]
struct ProcessOverageQuery {
    dry_run: Option<String>,
}

/// Bills the overage not invoiced yet as Stripe invoice items (never a call twice).
#[utoipa::path(post, path = "/api/cron/process-overage", tag = "cron", params(BillingParams),
    security(("cron_secret" = [])),
    responses((status = 200, body = BillingSummary), CronErrors))]
pub(crate) async fn process_overage(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let query: ProcessOverageQuery = cron_query(&req, &state)?;
    let mode = match query.dry_run.as_deref() {
        None | Some("false") | Some("0") => RunMode::Live,
        Some("true") | Some("1") => RunMode::DryRun,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("dry_run must be true or false, got {other:?}."),
            ));
        }
    };
    let run = state.billing.process_all(mode).await;
    state.metrics.billing_run(&run);
    Ok(HttpResponse::Ok().json(run?))
}

/// Every user and period with overage or charges, and what does not add up.
#[utoipa::path(get, path = "/api/cron/overage-reconciliation", tag = "cron",
    security(("cron_secret" = [])),
    responses((status = 200, body = ReconciliationReport), CronErrors))]
pub(crate) async fn overage_reconciliation(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_cron_secret(&req, &state)?;
    let items = state.billing.reconcile().await?;
    let drift = items.iter().filter(|r| r.status == "drift").count();
    Ok(HttpResponse::Ok().json(ReconciliationReport { drift, items }))
}

/// The secret first, then the query string: without a secret configured every request is
/// a 404, whatever its parameters.
fn cron_query<T: DeserializeOwned>(req: &HttpRequest, state: &AppState) -> Result<T, ApiError> {
    check_cron_secret(req, state)?;
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(invalid_query)
}

/// 404 when no secret is configured (the endpoints do not exist then), 401 for a wrong one.
fn check_cron_secret(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(expected) = &state.cron_secret else {
        return Err(ApiError::not_found());
    };
    let presented = bearer_credential(req.headers()).unwrap_or_default();
    if expected.matches(presented) {
        Ok(())
    } else {
        tracing::warn!(
            path = req.path(),
            "cron call with a wrong or missing secret"
        );
        Err(ApiError::cron_unauthorized())
    }
}

#[derive(Deserialize)]
struct AggregateQuery {
    date: Option<String>,
}

/// Rebuilds one day's rows of the daily aggregate (idempotent).
#[utoipa::path(post, path = "/api/cron/aggregate-daily", tag = "cron", params(AggregateParams),
    security(("cron_secret" = [])),
    responses((status = 200, body = AggregationReport), CronErrors))]
pub(crate) async fn aggregate_daily(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let query: AggregateQuery = cron_query(&req, &state)?;
    let date = query
        .date
        .as_deref()
        .map(usage_analytics::daily::parse_day)
        .transpose()?;
    let report = state.aggregation.run(date).await?;
    tracing::info!(date = %report.date, users = report.users, "daily aggregation (cron)");
    Ok(HttpResponse::Ok().json(report))
}
