//! The HTTP server: the metered API under `/api/v1/` behind the usage middleware, and
//! the operations endpoints.

use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, ResponseError, web};
use usage_auth::verify::KeyVerifier;
use usage_core::middleware::Metering;
use usage_core::rate::{PlanRateLimits, RateLimiter};
use usage_core::repo::UsageRepository;
use usage_core::{Caller, Store};
use usage_embed::{UsageMeter, UsageOptions};

use crate::body_deadline::BodyDeadline;
use crate::config::Config;
use crate::metrics;
use crate::openapi::{
    EndpointParams, ErrorResponse, EventParams, HistoryParams, QuotaExceeded, Registry, UserErrors,
};
use crate::user_auth::AuthenticatedUser;
use crate::{ApiError, ServerError};
use crate::{admin_api, cron_api, forward_auth, keys_api, openapi, webhooks_api};
use serde::Serialize;
use usage_analytics::CurrentUsage;
use usage_analytics::DailyAggregation;
use usage_analytics::UsageReports;
use usage_analytics::events::EventsPage;
use usage_analytics::reports::{ChargeItem, EndpointUsage, HistoryDay, OverageReport};
use usage_analytics::reports::{MAX_ENDPOINT_DAYS, MAX_HISTORY_DAYS, parse_days};
use usage_auth::keys::KeyIssuer;
use usage_core::{ApiKeyId, UserId};
use utoipa::Path as _;
use utoipa::ToSchema;

/// What the handlers share.
pub(crate) struct AppState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<metrics::Metrics>,
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
    let jwt = web::Data::new(config.jwt_keys()?);
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
    if config.bench_discard_usage {
        tracing::warn!("--bench-discard-usage: recorded calls are DROPPED, not written");
    }
    if let Some(spool) = &config.spool {
        tracing::info!(dir = %spool.dir.display(), "durable mode: admitted calls are spooled to disk");
    }
    let metrics = Arc::new(metrics::Metrics::new()?);
    // Key check, quota, short window and recording: the same engine an embedding service
    // starts (`usage-embed`), shared by the middleware and forward auth.
    let usage = UsageMeter::with_store(
        store.clone(),
        UsageOptions {
            migrate: false,
            pool: config.pool.clone(),
            tracker: usage_core::tracker::TrackerConfig {
                observer: Some(metrics.batch_observer()),
                ..config.tracker.clone()
            },
            spool: config.spool.clone(),
            key_cache: config.key_cache,
            access_poll: config.revocation_poll,
            plans: config.plans.clone(),
            quota: config.quota,
            rate_limits: config.rate_limits,
            clock: clock.clone(),
            record_to: config
                .bench_discard_usage
                .then(|| Arc::new(usage_core::memory::DiscardUsage) as Arc<dyn UsageRepository>),
            endpoint_patterns: config.forward_auth_routes.clone(),
        },
    )?;
    let (tracker, verifier, quota) = (usage.tracker().clone(), usage.verifier(), usage.quota());
    let reports = UsageReports::new(store.clone(), Arc::clone(&quota), clock.clone());
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
    let metering = usage.actix();
    let sessions = usage_auth::session::DashboardSessions::new(store.clone(), clock.clone());
    let dashboard = web::Data::new(usage_web::Dashboard {
        store: store.clone(),
        sessions: sessions.clone(),
        jwt: jwt.clone().into_inner(),
        reports: reports.clone(),
        admin: admin_reports.clone(),
        keys: keys.clone(),
        admins: config.admins.clone(),
        verifier: verifier.clone(),
        catalog: config.plans.clone(),
        clock: clock.clone(),
        secure_cookies: config.public_url.starts_with("https://"),
        public_origin: config.public_origin.clone(),
    });
    // Expired sessions and used or expired sign-in links go every hour.
    let session_pruning = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            match sessions.prune().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "dashboard sessions pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning dashboard sessions failed"),
            }
        }
    });
    let forward_auth = web::Data::new(forward_auth::ForwardAuth::new(
        usage.meter(),
        config.forward_auth_routes.clone(),
    ));
    metrics.watch(metrics::Sources {
        metering: metering.stats(),
        tracker,
        quota: Arc::clone(&quota),
        verifier: Arc::clone(&verifier),
        store: store.clone(),
    })?;
    let state = web::Data::new(AppState {
        store,
        metrics: Arc::clone(&metrics),
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
    let body_timeout = config.request_body_timeout;
    let unmetered = config.bench_unmetered;
    if unmetered {
        tracing::warn!(
            "--bench-unmetered: /api/v1/ping is served WITHOUT key check, quota or tracking"
        );
    }

    // Our own signal handlers, installed before the port opens: actix installs its own
    // only once the server runs, and a SIGTERM in between (a deploy right after a start)
    // would kill the process without the drain below.
    let stop_signals = StopSignals::install()?;
    // actix's own default, stated so that the connection limit can be divided among them.
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let connections = connection_limit(config.max_connections, config.pool.max_connections);
    tracing::info!(connections, workers, "connection limit");
    let server = HttpServer::new(move || {
        App::new()
            // The bare benchmark baseline is a route as the customer's own service would
            // serve it: without anything of ours.
            .wrap(actix_web::middleware::Condition::new(
                !unmetered,
                crate::observe::Observe::new(Arc::clone(&metrics)),
            ))
            .app_data(state.clone())
            .app_data(jwt.clone())
            .app_data(forward_auth.clone())
            .app_data(dashboard.clone())
            .configure(|cfg| {
                // One registry per worker, dropped once the routes are in: the test in
                // `openapi` reads the same registrations.
                let metering = (!unmetered).then(|| metering.clone());
                routes(cfg, &mut Registry::default(), metering, body_timeout)
            })
            .default_service(web::to(not_found))
    })
    .workers(workers)
    .max_connections(connections.div_ceil(workers))
    .bind(config.bind)
    .map_err(|e| ServerError::Bind {
        addr: config.bind,
        reason: e.to_string(),
    })?;
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
    }
    let server = server.disable_signals().run();
    let stopping = stop_signals.stop_on_signal(server.handle());
    let served = server.await;
    stopping.abort();
    lifecycle.abort();
    session_pruning.abort();
    for task in [schedule, audit_retention].into_iter().flatten() {
        task.abort();
    }

    // No request is in flight any more: write everything still queued, give quota
    // leases back.
    usage.shutdown().await;
    served.map_err(ServerError::Http)?;
    tracing::info!("stopped");
    Ok(())
}

/// Descriptors kept for the process's own files besides the pool's connections: the
/// SQLite database, its WAL and shared memory, the spool's segments, logs, the listener.
const RESERVED_FILES: u64 = 64;

/// Raises the soft open-file limit to the hard one, and returns how many connections may
/// be served at once: `configured`, or what the limit leaves past the pool and
/// [`RESERVED_FILES`], so that a flood of connections (slow ones included) never takes
/// the descriptors the database and the spool need.
fn connection_limit(configured: Option<usize>, pool: u32) -> usize {
    let files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let budget = files
        .saturating_sub(u64::from(pool) + RESERVED_FILES)
        .max(2);
    let budget = usize::try_from(budget).unwrap_or(usize::MAX);
    match configured {
        Some(n) if n > budget => {
            tracing::warn!(
                max_connections = n,
                open_files = files,
                "MAX_CONNECTIONS is above what the open-file limit leaves: accepting may fail for lack of descriptors"
            );
            n
        }
        Some(n) => n,
        None => budget,
    }
}

/// SIGTERM and SIGINT (Ctrl-C) stop gracefully: requests in flight finish (docs/OPERATIONS.md);
/// SIGQUIT at once. Either way the usage still queued is written after.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<Self, ServerError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install =
            |kind: SignalKind| signal(kind).map_err(|e| ServerError::Signals(e.to_string()));
        Ok(Self {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            quit: install(SignalKind::quit())?,
        })
    }

    /// Stops `server` at the first signal.
    fn stop_on_signal(
        mut self,
        server: actix_web::dev::ServerHandle,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let graceful = tokio::select! {
                _ = self.terminate.recv() => true,
                _ = self.interrupt.recv() => true,
                _ = self.quit.recv() => false,
            };
            tracing::info!(graceful, "stop signal received");
            server.stop(graceful).await;
        })
    }
}

/// Every route: the metered API under `/api/v1` (behind `metering`; without it, the bare
/// route of `--bench-unmetered`), the user, keys, admin, cron and webhook endpoints,
/// operations and the API description. Each path comes from its handler's OpenAPI
/// annotation, through `registry`.
pub(crate) fn routes(
    cfg: &mut web::ServiceConfig,
    registry: &mut Registry,
    metering: Option<Metering>,
    body_timeout: std::time::Duration,
) {
    // The metered API and forward auth first: they are the hot path, and actix tries the
    // routes in order (a regex for each one with a parameter).
    let ping_path = registry.path_in::<__path_ping>("/api/v1");
    match metering {
        Some(metering) => cfg.service(
            web::scope("/api/v1")
                .wrap(metering)
                .service(
                    web::resource(ping_path)
                        .route(web::get().to(ping))
                        .default_service(method_not_allowed(registry.allow(&__path_ping::path()))),
                )
                .default_service(web::to(not_found)),
        ),
        None => cfg.service(web::scope("/api/v1").route(&ping_path, web::get().to(ping_unmetered))),
    };
    forward_auth::routes(cfg, registry);
    // Every other route, behind the body deadline (the two above read no body).
    let mut rest = web::scope("")
        .wrap(BodyDeadline::new(body_timeout))
        .default_service(web::to(not_found));
    rest = rest.configure(|cfg| {
        operations_routes(cfg, registry);
        user_routes(cfg, registry);
        keys_api::routes(cfg, registry);
        cron_api::routes(cfg, registry);
        admin_api::routes(cfg, registry);
        webhooks_api::routes(cfg, registry);
        openapi::routes(cfg, registry);
        usage_web::configure(cfg);
    });
    cfg.service(rest);
}

/// The customer's own endpoints (user JWT).
fn user_routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    cfg.service(
        web::resource(registry.path::<__path_current_usage>())
            .route(web::get().to(current_usage))
            .default_service(method_not_allowed(
                registry.allow(&__path_current_usage::path()),
            )),
    )
    .service(
        web::resource(registry.path::<__path_overage>())
            .route(web::get().to(overage))
            .default_service(method_not_allowed(registry.allow(&__path_overage::path()))),
    )
    .service(
        web::resource(registry.path::<__path_events>())
            .app_data(query_config())
            .route(web::get().to(events))
            .default_service(method_not_allowed(registry.allow(&__path_events::path()))),
    )
    .service(
        web::resource(registry.path::<__path_charges>())
            .route(web::get().to(charges))
            .default_service(method_not_allowed(registry.allow(&__path_charges::path()))),
    )
    .service(
        web::resource(registry.path::<__path_history>())
            .app_data(query_config())
            .route(web::get().to(history))
            .default_service(method_not_allowed(registry.allow(&__path_history::path()))),
    )
    .service(
        web::resource(registry.path::<__path_endpoints>())
            .app_data(query_config())
            .route(web::get().to(endpoints))
            .default_service(method_not_allowed(
                registry.allow(&__path_endpoints::path()),
            )),
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

/// `GET /api/usage/history`.
#[derive(Serialize, ToSchema)]
pub(crate) struct History {
    /// The window, in days.
    days: u32,
    /// One item per day, oldest first, days without calls included.
    items: Vec<HistoryDay>,
}

/// `GET /api/usage/endpoints`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Endpoints {
    /// The window, in days.
    days: u32,
    /// Most calls first.
    items: Vec<EndpointUsage>,
}

/// `GET /api/usage/charges`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Charges {
    /// Newest first.
    items: Vec<ChargeItem>,
}

/// The caller's calls per day.
#[utoipa::path(get, path = "/api/usage/history", tag = "usage", params(HistoryParams),
    security(("user_jwt" = [])),
    responses((status = 200, body = History), UserErrors))]
pub(crate) async fn history(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let days = parse_days(query.get("days").map(String::as_str), 30, MAX_HISTORY_DAYS)?;
    let items = state.reports.history(&user.0, days).await?;
    Ok(HttpResponse::Ok().json(History { days, items }))
}

/// The caller's calls per route pattern and method.
#[utoipa::path(get, path = "/api/usage/endpoints", tag = "usage", params(EndpointParams),
    security(("user_jwt" = [])),
    responses((status = 200, body = Endpoints), UserErrors))]
pub(crate) async fn endpoints(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let days = parse_days(query.get("days").map(String::as_str), 7, MAX_ENDPOINT_DAYS)?;
    let items = state.reports.endpoints(&user.0, days).await?;
    Ok(HttpResponse::Ok().json(Endpoints { days, items }))
}

/// The caller's overage this period: calls, cost, what is invoiced.
#[utoipa::path(get, path = "/api/usage/overage", tag = "usage", security(("user_jwt" = [])),
    responses((status = 200, body = OverageReport), UserErrors))]
pub(crate) async fn overage(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.reports.overage(&user.0).await?))
}

/// The caller's recorded calls, newest first, by keyset pages.
#[utoipa::path(get, path = "/api/usage/events", tag = "usage", params(EventParams),
    security(("user_jwt" = [])),
    responses((status = 200, body = EventsPage), UserErrors))]
pub(crate) async fn events(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    query: QueryParams,
) -> Result<HttpResponse, ApiError> {
    let query = usage_analytics::events::parse_event_query(&query, state.events.now())?;
    Ok(HttpResponse::Ok().json(state.events.page(&user.0, &query).await?))
}

/// The caller's overage charges, newest first.
#[utoipa::path(get, path = "/api/usage/charges", tag = "usage", security(("user_jwt" = [])),
    responses((status = 200, body = Charges), UserErrors))]
pub(crate) async fn charges(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let items = state.reports.charges(&user.0).await?;
    Ok(HttpResponse::Ok().json(Charges { items }))
}

/// The caller's calls this period, live (admitted calls not yet written included).
#[utoipa::path(get, path = "/api/usage/current", tag = "usage", security(("user_jwt" = [])),
    responses((status = 200, body = CurrentUsage), UserErrors))]
pub(crate) async fn current_usage(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.reports.current(&user.0).await?))
}

fn operations_routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
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

async fn ping_unmetered() -> HttpResponse {
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

async fn not_found() -> HttpResponse {
    ApiError::not_found().error_response()
}

/// The default service of a resource: 405 with `Allow: <allow>`.
pub(crate) fn method_not_allowed(allow: String) -> actix_web::Route {
    web::to(move || {
        let allow = allow.clone();
        async move { ApiError::method_not_allowed(allow).error_response() }
    })
}
