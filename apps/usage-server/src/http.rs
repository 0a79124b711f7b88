//! The HTTP server: the metered API under `/api/v1/` behind the usage middleware, and
//! the operations endpoints.

use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, ResponseError, web};
use serde_json::json;
use usage_auth::jwt::JwtKeys;
use usage_auth::verify::KeyVerifier;
use usage_core::middleware::{Metering, MeteringDeps, MeteringStats};
use usage_core::quota::QuotaBook;
use usage_core::rate::{PlanRateLimits, RateLimiter};
use usage_core::tracker::UsageTracker;
use usage_core::{Caller, Store};

use crate::config::Config;
use crate::metrics;
use crate::user_auth::AuthenticatedUser;
use crate::{ApiError, ServerError};
use crate::{admin_api, cron_api, keys_api, webhooks_api};
use usage_analytics::DailyAggregation;
use usage_analytics::UsageReports;
use usage_analytics::reports::{MAX_ENDPOINT_DAYS, MAX_HISTORY_DAYS, parse_days};
use usage_auth::keys::KeyIssuer;

/// What the handlers share.
pub(crate) struct AppState {
    pub store: Arc<dyn Store>,
    pub tracker: UsageTracker,
    pub metering: Arc<MeteringStats>,
    pub quota: Arc<QuotaBook>,
    pub reports: UsageReports,
    pub events: usage_analytics::events::UsageEvents,
    pub keys: KeyIssuer,
    pub verifier: Arc<KeyVerifier>,
    pub aggregation: DailyAggregation,
    pub billing: usage_billing::OverageService,
    pub admins: usage_auth::admin::AdminList,
    pub admin_rate: RateLimiter,
    pub admin_reports: usage_analytics::admin::AdminReports,
    pub clock: Arc<dyn usage_core::Clock>,
    pub cron_secret: Option<usage_auth::secret::SharedSecret>,
    /// Stripe's webhook, when `STRIPE_WEBHOOK_SECRET` is set.
    pub webhooks: Option<usage_billing::StripeWebhooks>,
}

/// Migrates, opens the pool, starts the usage tracker, and serves on `config.bind`
/// until SIGTERM or Ctrl-C. Then: stop accepting, finish in-flight requests, write every
/// recorded call, exit.
pub(crate) async fn serve(config: Config) -> Result<(), ServerError> {
    // Fail at start, not at the first request, when the JWT settings are unusable.
    let jwt = web::Data::new(JwtKeys::new(&config.jwt()?)?);
    let applied = usage_store::migrate(&config.database_url).await?;
    if applied > 0 {
        tracing::info!(applied, "database migrated");
    }
    let store = usage_store::open(&config.database_url, &config.pool).await?;
    tracing::info!(backend = store.backend_name(), "database ready");

    let clock = config.clock();
    if let Some(start) = config.clock_start {
        tracing::warn!(%start, "running on a shifted clock (USAGE_CLOCK_START)");
    }
    let (tracker, tracker_worker) = match &config.spool {
        Some(spool) => {
            tracing::info!(dir = %spool.dir.display(), "durable mode: admitted calls are spooled to disk");
            UsageTracker::start_durable(
                store.clone(),
                store.clone(),
                config.tracker.clone(),
                spool,
            )?
        }
        None if config.bench_discard_usage => {
            tracing::warn!("--bench-discard-usage: recorded calls are DROPPED, not written");
            UsageTracker::start(
                Arc::new(crate::bench::DiscardedUsage),
                store.clone(),
                config.tracker.clone(),
            )
        }
        None => UsageTracker::start(store.clone(), store.clone(), config.tracker.clone()),
    };
    let verifier = Arc::new(KeyVerifier::new(
        store.clone(),
        store.clone(),
        clock.clone(),
        config.key_cache,
    ));
    // Revocations and plan changes by the CLI or another instance reach this instance's
    // key cache.
    let access_watcher = verifier.watch_access_changes(config.revocation_poll);
    let quota = Arc::new(QuotaBook::new(
        store.clone(),
        config.plans.clone(),
        clock.clone(),
        config.quota,
    ));
    let quota_sync = quota.start_sync();
    let quota_at_exit = Arc::clone(&quota);
    let reports = UsageReports::new(store.clone(), Arc::clone(&quota), clock.clone());
    let rate = config
        .rate_limits
        .any()
        .then(|| Arc::new(RateLimiter::new(config.rate_limits, clock.clone())));
    let keys = KeyIssuer::new(store.clone(), clock.clone());
    let aggregation = DailyAggregation::new(store.clone(), clock.clone());
    let (store_for_billing, clock_for_billing) = (store.clone(), clock.clone());
    let schedule = config
        .daily_aggregation
        .then(|| cron_api::schedule_daily_aggregation(aggregation.clone(), clock.clone()));
    let admin_reports = usage_analytics::admin::AdminReports::new(
        store_for_billing.clone(),
        config.plans.clone(),
        clock_for_billing.clone(),
    );
    let events = usage_analytics::events::UsageEvents::new(store.clone(), clock.clone());
    let lifecycle = cron_api::schedule_usage_lifecycle(
        store.clone(),
        config.usage_retention_days.map(|days| {
            usage_analytics::retention::UsageRetention::new(store.clone(), clock.clone(), days)
        }),
        clock.clone(),
    );
    let audit_retention = config
        .admin_audit_retention_days
        .map(|days| cron_api::schedule_audit_retention(admin_reports.clone(), days));
    let webhooks = config.stripe_webhook_secret.as_ref().map(|secret| {
        usage_billing::StripeWebhooks::new(
            secret.expose(),
            config.stripe_prices.clone(),
            store.clone(),
            clock.clone(),
        )
    });
    let quota_for_metrics = Arc::clone(&quota);
    let metering = Metering::new(MeteringDeps {
        authenticator: verifier.clone(),
        quota,
        rate,
        tracker: tracker.clone(),
        clock,
    });
    let state = web::Data::new(AppState {
        store,
        tracker,
        metering: metering.stats(),
        quota: quota_for_metrics,
        reports,
        events,
        keys,
        verifier,
        aggregation,
        billing: config.billing(store_for_billing, clock_for_billing.clone())?,
        admins: config.admins.clone(),
        admin_rate: RateLimiter::new(
            PlanRateLimits {
                free: Some(config.admin_rate_limit),
                pro: Some(config.admin_rate_limit),
                enterprise: Some(config.admin_rate_limit),
            },
            clock_for_billing.clone(),
        ),
        admin_reports: admin_reports.clone(),
        clock: clock_for_billing,
        cron_secret: config.cron_secret.clone(),
        webhooks,
    });
    let unmetered = config.bench_unmetered;
    if unmetered {
        tracing::warn!(
            "--bench-unmetered: /api/v1/ping is served WITHOUT key check, quota or tracking"
        );
    }

    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(state.clone())
            .app_data(jwt.clone())
            .configure(operations_routes)
            .configure(user_routes)
            .configure(keys_api::routes)
            .configure(cron_api::routes)
            .configure(admin_api::routes)
            .configure(webhooks_api::routes)
            .default_service(web::to(not_found));
        if unmetered {
            app.service(web::scope("/api/v1").route("/ping", web::get().to(ping_unmetered)))
        } else {
            app.service(
                web::scope("/api/v1")
                    .wrap(metering.clone())
                    .configure(metered_routes),
            )
        }
    })
    .bind(config.bind)
    .map_err(|e| ServerError::Bind {
        addr: config.bind,
        reason: e.to_string(),
    })?;
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
    }
    let served = server.run().await;
    access_watcher.abort();
    quota_sync.abort();
    lifecycle.abort();
    for task in [schedule, audit_retention].into_iter().flatten() {
        task.abort();
    }

    // No request is in flight any more: write everything still queued.
    let report = tracker_worker.shutdown().await;
    tracing::info!(
        flushed_at_shutdown = report.flushed_at_shutdown,
        flushed_total = report.flushed_total,
        unwritten = report.unwritten,
        "usage tracker stopped: {} event(s) written at shutdown",
        report.flushed_at_shutdown
    );
    // Unspent quota leases go back for the other instances; counts not yet pushed go in.
    match quota_at_exit.sync(true).await {
        Ok(sync) => tracing::info!(
            released = sync.released,
            pushed = sync.pushed,
            "quota leases given back"
        ),
        Err(e) => tracing::warn!(error = %e, "giving quota leases back failed"),
    }
    served.map_err(ServerError::Http)?;
    tracing::info!("stopped");
    Ok(())
}

/// The metered sample API; a real service mounts its own routes here.
fn metered_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/ping")
            .route(web::get().to(ping))
            .default_service(web::to(method_not_allowed)),
    )
    .default_service(web::to(not_found));
}

/// The customer's own endpoints (user JWT).
fn user_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/usage/current")
            .route(web::get().to(current_usage))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/usage/overage")
            .route(web::get().to(overage))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/usage/events")
            .app_data(query_config())
            .route(web::get().to(events))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/usage/charges")
            .route(web::get().to(charges))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/usage/history")
            .app_data(query_config())
            .route(web::get().to(history))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/usage/endpoints")
            .app_data(query_config())
            .route(web::get().to(endpoints))
            .default_service(web::to(method_not_allowed)),
    );
}

/// Reads a body of at most `limit` bytes; stops reading past that (413).
pub(crate) async fn read_body(
    mut body: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt as _;
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::from(actix_web::error::JsonPayloadError::Payload(e)))?;
        if bytes.len() + chunk.len() > limit {
            return Err(actix_web::error::JsonPayloadError::Overflow { limit }.into());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.freeze())
}

/// Query strings that cannot be read at all are the contract's 400 too.
pub(crate) fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _| invalid_query(err).into())
}

/// A query string that does not parse.
pub(crate) fn invalid_query(err: actix_web::error::QueryPayloadError) -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::BAD_REQUEST,
        "invalid_parameter",
        format!("The query string is not valid: {err}."),
    )
}

type QueryParams = web::Query<std::collections::HashMap<String, String>>;

async fn history(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let days = parse_days(query.get("days").map(String::as_str), 30, MAX_HISTORY_DAYS)?;
    let items = state.reports.history(&user.0, days).await?;
    Ok(HttpResponse::Ok().json(json!({ "days": days, "items": items })))
}

async fn endpoints(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let days = parse_days(query.get("days").map(String::as_str), 7, MAX_ENDPOINT_DAYS)?;
    let items = state.reports.endpoints(&user.0, days).await?;
    Ok(HttpResponse::Ok().json(json!({ "days": days, "items": items })))
}

async fn overage(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.reports.overage(&user.0).await?))
}

async fn events(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let query = usage_analytics::events::parse_event_query(&query, state.events.now())?;
    Ok(HttpResponse::Ok().json(state.events.page(&user.0, &query).await?))
}

async fn charges(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let items = state.reports.charges(&user.0).await?;
    Ok(HttpResponse::Ok().json(json!({ "items": items })))
}

async fn current_usage(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.reports.current(&user.0).await?))
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
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics_text))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn ping(caller: web::ReqData<Caller>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "ok": true,
        "user_id": caller.user_id,
        "key_id": caller.api_key_id,
    }))
}

async fn ping_unmetered() -> HttpResponse {
    HttpResponse::Ok().json(json!({"ok": true, "user_id": null, "key_id": null}))
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

async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics::render(&metrics::Sources {
            metering: &state.metering,
            tracker: &state.tracker,
            quota: &state.quota,
            verifier: &state.verifier,
        }))
}

async fn not_found() -> HttpResponse {
    ApiError::not_found().error_response()
}

pub(crate) async fn method_not_allowed() -> HttpResponse {
    ApiError::method_not_allowed().error_response()
}
