//! nexus-usage inside your own service, in five lines: one [`UsageMeter`] starts
//! everything metering needs from a database URL (migrations, pool, key verifier and its
//! revocation watcher, shared quotas and their sync, the batched usage writer), hands out
//! the actix middleware ([`UsageMeter::actix`], feature `actix`) and the tower layer
//! ([`UsageMeter::layer`], feature `tower`/`axum`), and stops in the right order with one
//! call ([`UsageMeter::shutdown`]: every admitted call written, quota leases given back).
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn demo(app: axum::Router, listener: tokio::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
//! use usage_embed::{UsageMeter, UsageOptions};
//!
//! let usage = UsageMeter::start("sqlite://data/usage.db", UsageOptions::default()).await?;
//! let app = app.layer(usage.layer());
//! axum::serve(listener, app).await?;
//! usage.shutdown().await;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use usage_auth::verify::{KeyCacheConfig, KeyVerifier};
use usage_core::catalog::PlanDefinition;
use usage_core::quota::{QuotaBook, QuotaSettings, SyncReport};
use usage_core::rate::{PlanRateLimits, RateLimiter};
use usage_core::repo::UsageRepository;
use usage_core::spool::{SpoolConfig, SpoolError};
use usage_core::terms::LiveCatalog;
use usage_core::tracker::{FlushReport, TrackerConfig, TrackerWorker, UsageTracker};
use usage_core::{Clock, Plan, PlanCatalog, Store, SystemClock};
use usage_door::meter::{Meter, MeterDeps};
use usage_store::{PoolOptions, StoreError};

pub use usage_core::Caller;
pub use usage_door::endpoint::EndpointPatterns;
pub use usage_door::report::{ReportUnits, Reported};

/// What can stop metering from starting.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The database could not be reached, opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The durable spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The plan catalog could not be seeded or read.
    #[error("the plan catalog: {0}")]
    Catalog(#[from] usage_core::RepoError),
}

/// Settings; `UsageOptions::default()` is what `usage-server` runs with by default.
#[derive(Clone)]
pub struct UsageOptions {
    /// Apply pending migrations at start (default on).
    pub migrate: bool,
    /// Connection pool (its clock is replaced by [`UsageOptions::clock`]).
    pub pool: PoolOptions,
    /// The usage writer: batch size, flush interval, queue.
    pub tracker: TrackerConfig,
    /// Durable mode: every admitted call is on disk before its response.
    pub spool: Option<SpoolConfig>,
    /// The API key cache.
    pub key_cache: KeyCacheConfig,
    /// How often revocations and plan changes made elsewhere are looked for.
    pub access_poll: Duration,
    /// The built-in plans' terms (monthly calls, overage, prices), stored in the catalog
    /// the first time (a catalog that has them is the truth afterwards).
    pub plans: PlanCatalog,
    /// How instances share quota counters.
    pub quota: QuotaSettings,
    /// The built-in plans' short-window limits (none by default), stored as `plans` are.
    pub rate_limits: PlanRateLimits,
    /// The plan catalog, when the service already holds it (`usage-server` does); else
    /// the meter seeds the built-in plans and loads it.
    pub catalog: Option<Arc<LiveCatalog>>,
    /// The time source (tests shift it).
    pub clock: Arc<dyn Clock>,
    /// Where admitted calls are written; `None` is the database (benchmarks swap it).
    pub record_to: Option<Arc<dyn UsageRepository>>,
    /// Route templates for doors that see no router (the tower layer outside axum).
    pub endpoint_patterns: EndpointPatterns,
}

impl Default for UsageOptions {
    fn default() -> Self {
        Self {
            migrate: true,
            pool: PoolOptions::default(),
            tracker: TrackerConfig::default(),
            spool: None,
            key_cache: KeyCacheConfig::default(),
            access_poll: Duration::from_millis(500),
            plans: PlanCatalog::default(),
            quota: QuotaSettings::default(),
            rate_limits: PlanRateLimits::default(),
            catalog: None,
            clock: Arc::new(SystemClock),
            record_to: None,
            endpoint_patterns: EndpointPatterns::default(),
        }
    }
}

/// Metering, running. Hand its middleware or layer to your server; call
/// [`UsageMeter::shutdown`] once the server stopped.
pub struct UsageMeter {
    meter: Arc<Meter>,
    store: Arc<dyn Store>,
    verifier: Arc<KeyVerifier>,
    quota: Arc<QuotaBook>,
    catalog: Arc<LiveCatalog>,
    tracker: UsageTracker,
    worker: TrackerWorker,
    tasks: Vec<JoinHandle<()>>,
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    patterns: EndpointPatterns,
}

/// What [`UsageMeter::shutdown`] did.
#[derive(Debug)]
pub struct ShutdownReport {
    /// Calls written: at shutdown, in all, and any that could not be.
    pub usage: FlushReport,
    /// Quota leases given back and counts pushed; the error if the database refused.
    pub quota: Result<SyncReport, usage_core::RepoError>,
}

impl UsageMeter {
    /// Migrates (unless `options.migrate` is off), opens the database at `database_url`
    /// (`sqlite://PATH` or `postgres://...`) and starts metering on it.
    pub async fn start(database_url: &str, options: UsageOptions) -> Result<Self, EmbedError> {
        if options.migrate {
            let applied = usage_store::migrate(database_url).await?;
            if applied > 0 {
                tracing::info!(applied, "usage database migrated");
            }
        }
        // The store's rules of time read the same clock as the meter.
        let pool = PoolOptions {
            clock: options.clock.clone(),
            ..options.pool.clone()
        };
        let store = usage_store::open(database_url, &pool).await?;
        Self::with_store(store, options).await
    }

    /// Starts metering on an open store (the pool and migrations are the caller's).
    pub async fn with_store(
        store: Arc<dyn Store>,
        options: UsageOptions,
    ) -> Result<Self, EmbedError> {
        let clock = options.clock;
        let catalog = match options.catalog {
            Some(catalog) => catalog,
            None => {
                let builtin: Vec<PlanDefinition> = Plan::builtin()
                    .iter()
                    .filter_map(|p| {
                        PlanDefinition::builtin(p, &options.plans, &options.rate_limits, None)
                    })
                    .collect();
                store.seed_plans(&builtin, clock.now()).await?;
                LiveCatalog::load(store.clone()).await?
            }
        };
        let usage = options.record_to.unwrap_or_else(|| store.clone());
        let (tracker, worker) = match &options.spool {
            Some(spool) => {
                UsageTracker::start_durable(usage, store.clone(), options.tracker, spool)?
            }
            None => UsageTracker::start(usage, store.clone(), options.tracker),
        };
        let verifier = Arc::new(KeyVerifier::new(
            store.clone(),
            store.clone(),
            catalog.clone(),
            clock.clone(),
            options.key_cache,
        ));
        let quota = Arc::new(QuotaBook::new(store.clone(), clock.clone(), options.quota));
        // Revocations, plan changes and catalog edits made by another process reach this
        // one; quota counts and leases are shared with every instance on this database.
        let tasks = vec![
            verifier.watch_access_changes(options.access_poll),
            catalog.watch(options.access_poll),
            quota.start_sync(),
        ];
        // Checked on every call: a plan without a burst limit costs one branch.
        let rate = Some(Arc::new(RateLimiter::new(clock.clone())));
        let meter = Arc::new(Meter::new(MeterDeps {
            authenticator: verifier.clone(),
            quota: quota.clone(),
            rate,
            tracker: tracker.clone(),
            clock,
            catalog: Some(catalog.clone()),
        }));
        Ok(Self {
            meter,
            store,
            verifier,
            quota,
            catalog,
            tracker,
            worker,
            tasks,
            patterns: options.endpoint_patterns,
        })
    }

    /// The metering engine, for a door of your own (see `usage_door::meter`).
    pub fn meter(&self) -> Arc<Meter> {
        Arc::clone(&self.meter)
    }

    /// The actix-web middleware: `.wrap(usage.actix())` on an app or scope. Handlers
    /// read the caller with `web::ReqData<Caller>`.
    #[cfg(feature = "actix")]
    pub fn actix(&self) -> usage_door::middleware::Metering {
        usage_door::middleware::Metering::from_meter(self.meter())
    }

    /// The tower layer: `.layer(usage.layer())` on an axum `Router`. Handlers read the
    /// caller with `Extension<Caller>`.
    #[cfg(feature = "tower")]
    pub fn layer(&self) -> usage_door::layer::MeteringLayer {
        usage_door::layer::MeteringLayer::new(self.meter()).with_patterns(self.patterns.clone())
    }

    /// The database metering runs on.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The key verifier (its cache is the one the meter reads; forget keys through it).
    pub fn verifier(&self) -> Arc<KeyVerifier> {
        Arc::clone(&self.verifier)
    }

    /// The quota book.
    pub fn quota(&self) -> Arc<QuotaBook> {
        Arc::clone(&self.quota)
    }

    /// The plan catalog the meter reads users' terms from.
    pub fn catalog(&self) -> Arc<LiveCatalog> {
        Arc::clone(&self.catalog)
    }

    /// The usage writer's handle (queue depth, stats).
    pub fn tracker(&self) -> &UsageTracker {
        &self.tracker
    }

    /// Stops in order, after your server stopped serving: background tasks, then every
    /// call still queued is written, then unspent quota leases go back for the other
    /// instances and counts not yet pushed go in.
    pub async fn shutdown(self) -> ShutdownReport {
        for task in self.tasks {
            task.abort();
        }
        let usage = self.worker.shutdown().await;
        tracing::info!(
            flushed_at_shutdown = usage.flushed_at_shutdown,
            flushed_total = usage.flushed_total,
            unwritten = usage.unwritten,
            "usage tracker stopped: {} event(s) written at shutdown",
            usage.flushed_at_shutdown
        );
        let quota = self.quota.sync(true).await;
        match &quota {
            Ok(sync) => tracing::info!(
                released = sync.released,
                pushed = sync.pushed,
                "quota leases given back"
            ),
            Err(e) => tracing::warn!(error = %e, "giving quota leases back failed"),
        }
        ShutdownReport { usage, quota }
    }
}
