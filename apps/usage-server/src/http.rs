//! The HTTP server: migrates, wires the crates together, serves every route
//! ([`crate::routes`]) until a stop signal, then writes what is left.

use std::sync::Arc;

use actix_web::{App, HttpServer, web};
use usage_core::rate::RateLimiter;
use usage_core::repo::UsageRepository;
use usage_embed::{UsageMeter, UsageOptions};

use crate::api_types::Registry;
use crate::config::Config;
use crate::jobs::Jobs;
use crate::state::{AppState, not_found};
use crate::{ServerError, forward_auth, jobs, metrics, routes};
use usage_analytics::{DailyAggregation, UsageReports};
use usage_auth::keys::KeyIssuer;

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
    let (plans, catalog) = crate::catalog::open(&config, store.clone(), clock.clone()).await?;
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
            catalog: Some(catalog.clone()),
            clock: clock.clone(),
            record_to: config
                .bench_discard_usage
                .then(|| Arc::new(usage_core::discard::DiscardUsage) as Arc<dyn UsageRepository>),
            endpoint_patterns: config.forward_auth_routes.clone(),
        },
    )
    .await?;
    let (tracker, verifier, quota) = (usage.tracker().clone(), usage.verifier(), usage.quota());
    let reports = UsageReports::new(
        store.clone(),
        Arc::clone(&quota),
        catalog.clone(),
        clock.clone(),
    );
    let keys = KeyIssuer::new(store.clone(), clock.clone());
    let aggregation = DailyAggregation::new(store.clone(), clock.clone());
    let (store_for_billing, clock_for_billing) = (store.clone(), clock.clone());
    let (store_for_ingest, clock_for_ingest) = (store.clone(), clock.clone());
    let mut jobs = Jobs::default();
    if config.daily_aggregation {
        jobs.start(jobs::schedule_daily_aggregation(
            aggregation.clone(),
            clock.clone(),
        ));
    }
    let admin_reports = usage_analytics::admin::AdminReports::new(
        store_for_billing.clone(),
        catalog.clone(),
        clock_for_billing.clone(),
    );
    let events = usage_analytics::events::UsageEvents::new(store.clone(), clock.clone());
    jobs.start(jobs::schedule_usage_lifecycle(
        store.clone(),
        config.usage_retention_days.map(|days| {
            usage_analytics::retention::UsageRetention::new(store.clone(), clock.clone(), days)
        }),
        clock.clone(),
    ));
    if let Some(days) = config.admin_audit_retention_days {
        jobs.start(jobs::schedule_audit_retention(admin_reports.clone(), days));
    }
    let webhooks = config.stripe_webhook_secret.as_ref().map(|secret| {
        usage_billing::StripeWebhooks::new(
            secret.expose(),
            catalog.clone(),
            usage_core::Plan::from_stored(config.default_plan.as_str()),
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
        catalog: catalog.clone(),
        plans: plans.clone(),
        clock: clock.clone(),
        secure_cookies: config.public_url.starts_with("https://"),
        public_origin: config.public_origin.clone(),
    });
    jobs.start(jobs::prune_sessions(sessions));
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
        billing: config.billing(
            store_for_billing,
            catalog.clone(),
            clock_for_billing.clone(),
        )?,
        admins: config.admins.clone(),
        admin_rate: RateLimiter::new(clock_for_billing.clone()),
        admin_rate_limit: config.admin_rate_limit,
        admin_reports: admin_reports.clone(),
        plans,
        clock: clock_for_billing,
        cron_secret: config.cron_secret.clone(),
        ingest: config.ingest_secret.clone().map(|secret| {
            let ingest = usage_core::ingest::EventIngest::new(
                store_for_ingest,
                catalog.clone(),
                clock_for_ingest,
                config.late_event_days,
            );
            (secret, ingest)
        }),
        webhooks,
    });
    let body_timeout = config.request_body_timeout;
    let unmetered = config.bench_unmetered;
    let report_units = config.bench_report_units;
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
                let sample = routes::Sample {
                    metering,
                    report_units,
                };
                routes::routes(cfg, &mut Registry::default(), sample, body_timeout)
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
    jobs.stop();

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
