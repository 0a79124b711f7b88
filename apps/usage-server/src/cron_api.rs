//! Cron endpoints (`Authorization: Bearer <CRON_SECRET>`), and the built-in daily schedule.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use time::Duration;
use usage_analytics::DailyAggregation;
use usage_billing::RunMode;
use usage_core::Clock;
use usage_core::middleware::bearer_credential;

use crate::ApiError;
use crate::http::{AppState, invalid_query, method_not_allowed};
use crate::openapi::{AggregateParams, BillingParams, CronErrors, Registry};
use serde::Serialize;
use usage_analytics::AggregationReport;
use usage_billing::{BillingSummary, Reconciliation};
use utoipa::Path as _;
use utoipa::ToSchema;

/// How long after midnight UTC the built-in schedule aggregates the day that ended.
const AFTER_MIDNIGHT: Duration = Duration::minutes(5);

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

/// Days the catch-up looks back for days never aggregated.
const CATCH_UP_LOOKBACK_DAYS: u32 = 400;
/// How often the catch-up runs besides shortly after midnight: days with calls stored
/// late are aggregated again within this time (their history is exact meanwhile).
const CATCH_UP_EVERY: Duration = Duration::hours(1);

/// Aggregates, at start, shortly after every UTC midnight and every hour, every past day
/// whose aggregate is missing or no longer current, until aborted.
pub(crate) fn schedule_daily_aggregation(
    job: DailyAggregation,
    clock: std::sync::Arc<dyn Clock>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match job.catch_up(CATCH_UP_LOOKBACK_DAYS).await {
                Ok(done) => {
                    for r in done {
                        tracing::info!(date = %r.date, users = r.users, "daily aggregation (schedule)");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "daily aggregation failed; the next run goes on from there")
                }
            }
            let now = clock.now();
            let next = DailyAggregation::next_run(now, AFTER_MIDNIGHT).min(now + CATCH_UP_EVERY);
            let wait = std::time::Duration::try_from(next - now).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
    })
}

/// Removes audit entries older than the retention, at start and every day, until aborted.
pub(crate) fn schedule_audit_retention(
    reports: usage_analytics::admin::AdminReports,
    retention_days: u32,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match reports.prune_audit(retention_days).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(removed, retention_days, "old admin audit entries removed")
                }
                Err(e) => tracing::warn!(error = %e, "pruning the admin audit log failed"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(24 * 3600)).await;
        }
    })
}

/// Months of usage storage readied ahead of the current one (PostgreSQL partitions).
const MONTHS_AHEAD: u32 = 2;

/// At start and every day: readies the usage storage of this month and the next ones
/// (PostgreSQL partitions), and, with a retention, removes the calls past it.
pub(crate) fn schedule_usage_lifecycle(
    store: std::sync::Arc<dyn usage_core::Store>,
    retention: Option<usage_analytics::retention::UsageRetention>,
    clock: std::sync::Arc<dyn Clock>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match store.prepare_usage_storage(clock.now(), MONTHS_AHEAD).await {
                Ok(created) if created.is_empty() => {}
                Ok(created) => tracing::info!(?created, "usage partitions created"),
                Err(e) => tracing::error!(error = %e,
                    "creating usage partitions failed; calls go to the default partition meanwhile"),
            }
            if let Some(retention) = &retention {
                match retention.run(false).await {
                    Ok(report) => {
                        if !report.held_back.is_empty() {
                            tracing::warn!(held_back = ?report.held_back, before = %report.before,
                                "usage retention held back");
                        }
                        if report.rows > 0 || !report.partitions.is_empty() {
                            tracing::info!(rows = report.rows, partitions = ?report.partitions,
                                before = %report.before, "old usage removed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "usage retention failed; retried tomorrow")
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(24 * 3600)).await;
        }
    })
}
