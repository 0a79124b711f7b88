//! Configuration, read once from the command line and environment, typed, passed in.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use usage_auth::jwt::JwtConfig;
use usage_auth::secret::{SecretString, SharedSecret};
use usage_auth::verify::KeyCacheConfig;
use usage_billing::{BillingOptions, HttpStripeClient, OverageService, PlanPrices, StripeConfig};
use usage_core::plan::{OverLimit, PlanTerms};
use usage_core::quota::QuotaSettings;
use usage_core::rate::{PlanRateLimits, RateLimit};
use usage_core::spool::SpoolConfig;
use usage_core::tracker::TrackerConfig;
use usage_core::{Cents, Clock, MicroUsd, PlanCatalog, ShiftedClock, Store, SystemClock};
use usage_store::{DatabaseUrl, PoolOptions};

use crate::ServerError;
use crate::cli::GlobalOptions;

/// Name of the generated secret kept beside a SQLite database.
const SECRET_FILE: &str = "jwt_secret";

/// Everything the commands need, resolved from [`GlobalOptions`].
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// Pool settings.
    pub pool: PoolOptions,
    /// Plans and prices.
    pub plans: PlanCatalog,
    /// `DEFAULT_PLAN`: the plan of new users and cancelled subscriptions.
    pub default_plan: String,
    /// `BIND_ADDR`.
    pub bind: std::net::SocketAddr,
    /// `PUBLIC_URL`: where users reach this server (default `http://{BIND_ADDR}`).
    pub public_url: String,
    /// The origin of `PUBLIC_URL` when it is configured: dashboard forms must come from
    /// it (unset: `http://` and the request's `Host`).
    pub public_origin: Option<String>,
    /// The usage tracker.
    pub tracker: TrackerConfig,
    /// The API key verification cache.
    pub key_cache: KeyCacheConfig,
    /// How often revocations made elsewhere are looked for.
    pub revocation_poll: Duration,
    /// `REQUEST_BODY_TIMEOUT_SECS`.
    pub request_body_timeout: Duration,
    /// `MAX_CONNECTIONS`, when set.
    pub max_connections: Option<usize>,
    /// How instances share quota counters.
    pub quota: QuotaSettings,
    /// Durable mode: the spool of admitted calls.
    pub spool: Option<SpoolConfig>,
    /// Short-window limits per plan (none by default).
    pub rate_limits: PlanRateLimits,
    /// Benchmark baseline: the sample route without the middleware.
    pub bench_unmetered: bool,
    /// Benchmark baseline: recorded calls are dropped, not written.
    pub bench_discard_usage: bool,
    /// Benchmark: the sample route reports units of `tokens` with each response.
    pub bench_report_units: bool,
    /// `CRON_SECRET`; the cron endpoints answer 404 without it.
    pub cron_secret: Option<SharedSecret>,
    /// `INGEST_SECRET`; `POST /api/events` answers 404 without it.
    pub ingest_secret: Option<SharedSecret>,
    /// `LATE_EVENT_DAYS`: how late an event may arrive.
    pub late_event_days: u32,
    /// `STRIPE_WEBHOOK_SECRET`: signs the events Stripe sends.
    pub stripe_webhook_secret: Option<SharedSecret>,
    /// Whether the server runs the daily aggregation itself.
    pub daily_aggregation: bool,
    /// `USAGE_RETENTION_DAYS`; `None` keeps raw calls for ever.
    pub usage_retention_days: Option<u32>,
    /// `FORWARD_AUTH_ROUTES`: how forward auth names endpoints.
    pub forward_auth_routes: usage_door::endpoint::EndpointPatterns,
    /// `ADMIN_AUDIT_RETENTION_DAYS`; `None` keeps the audit log for ever.
    pub admin_audit_retention_days: Option<u32>,
    /// Hidden `USAGE_CLOCK_START`: run on a shifted clock (tests and demos).
    pub clock_start: Option<time::OffsetDateTime>,
    /// `ADMIN_ECO_IDS`.
    pub admins: usage_auth::admin::AdminList,
    /// Short-window limit of each admin on the admin endpoints.
    pub admin_rate_limit: RateLimit,
    /// Which Stripe prices sell which plan (`STRIPE_PRICE_PRO`, `STRIPE_PRICE_ENTERPRISE`).
    pub stripe_prices: PlanPrices,
    /// Stripe, when `STRIPE_SECRET_KEY` is set.
    pub stripe: Option<StripeConfig>,
    /// How billing runs behave.
    pub billing: BillingOptions,
    jwt_secret: Option<SecretString>,
    jwt_audience: String,
    jwt_issuer: Option<String>,
    jwt_max_ttl_secs: u64,
}

impl Config {
    /// Resolves the options; refuses shared secrets too short to be safe.
    pub fn from_options(options: &GlobalOptions) -> Result<Self, ServerError> {
        let shared = |name, secret: &Option<SecretString>| {
            secret
                .clone()
                .filter(|s| !s.is_empty())
                .map(|s| SharedSecret::new(name, s))
                .transpose()
        };
        Ok(Self {
            database_url: options.database_url.clone(),
            pool: PoolOptions {
                max_connections: options.database_max_connections,
                connect_timeout: Duration::from_secs(options.database_connect_timeout_secs),
                clock: match options.clock_start {
                    Some(start) => Arc::new(ShiftedClock::starting_at(start)),
                    None => Arc::new(SystemClock),
                },
                ..PoolOptions::default()
            },
            default_plan: options.default_plan.clone(),
            plans: PlanCatalog {
                free: PlanTerms {
                    monthly_calls: Some(options.free_monthly_calls),
                    price: Cents(0),
                    over_limit: OverLimit::Block,
                },
                pro: PlanTerms {
                    monthly_calls: Some(options.pro_monthly_calls),
                    price: Cents(options.pro_price_cents),
                    over_limit: OverLimit::Overage,
                },
                enterprise: PlanTerms {
                    monthly_calls: None,
                    price: Cents(options.enterprise_price_cents),
                    over_limit: OverLimit::Overage,
                },
                overage_price: MicroUsd(options.overage_price_microusd),
            },
            bind: options.bind,
            public_url: options
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", options.bind)),
            public_origin: options.public_url.as_deref().and_then(usage_web::origin_of),
            tracker: TrackerConfig {
                batch_size: usize::try_from(options.usage_batch_size).unwrap_or(usize::MAX),
                flush_interval: Duration::from_millis(options.usage_flush_interval_ms),
                queue_capacity: usize::try_from(options.usage_queue_capacity).unwrap_or(usize::MAX),
                retry_max: Duration::from_millis(options.usage_retry_max_ms),
                concurrency: match (
                    options.usage_flush_concurrency,
                    options.database_url.starts_with("sqlite"),
                ) {
                    (0, true) => 1,
                    (0, false) => 4,
                    (n, _) => usize::try_from(n).unwrap_or(1),
                },
                max_batch: match (
                    options.usage_max_batch,
                    options.database_url.starts_with("sqlite"),
                ) {
                    (0, true) => 50_000,
                    (0, false) => 20_000,
                    (n, _) => usize::try_from(n).unwrap_or(20_000),
                },
                retry_initial: Duration::from_millis(options.usage_retry_max_ms.min(100)),
                ..TrackerConfig::default()
            },
            key_cache: KeyCacheConfig {
                ttl: Duration::from_millis(options.api_key_cache_ttl_ms),
                capacity: usize::try_from(options.api_key_cache_capacity).unwrap_or(usize::MAX),
                // Unknown keys get a tenth of the room, in a cache of their own.
                negative_capacity: usize::try_from(options.api_key_cache_capacity / 10)
                    .unwrap_or(usize::MAX)
                    .max(1_000),
                stale_if_error: Duration::from_millis(options.api_key_cache_stale_if_error_ms),
            },
            revocation_poll: Duration::from_millis(options.key_revocation_poll_ms),
            request_body_timeout: Duration::from_secs(options.request_body_timeout_secs),
            max_connections: options
                .max_connections
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            spool: options.usage_spool_dir.clone().map(SpoolConfig::new),
            quota: QuotaSettings {
                sync_every: Duration::from_millis(options.quota_sync_ms),
                lease_max: options.quota_lease_max,
                lease_share: options.quota_lease_share,
                forget_idle_after: Duration::from_millis(options.quota_forget_idle_ms),
                push_within: Duration::from_millis(options.quota_push_within_ms),
                heal_every: Duration::from_millis(options.quota_heal_ms),
            },
            rate_limits: PlanRateLimits {
                free: rate(
                    options.rate_limit_free_per_sec,
                    options.rate_limit_free_burst,
                ),
                pro: rate(options.rate_limit_pro_per_sec, options.rate_limit_pro_burst),
                enterprise: rate(
                    options.rate_limit_enterprise_per_sec,
                    options.rate_limit_enterprise_burst,
                ),
            },
            bench_unmetered: options.bench_unmetered,
            bench_discard_usage: options.bench_discard_usage,
            bench_report_units: options.bench_report_units,
            cron_secret: shared("CRON_SECRET", &options.cron_secret)?,
            ingest_secret: shared("INGEST_SECRET", &options.ingest_secret)?,
            late_event_days: options.late_event_days,
            stripe_webhook_secret: shared("STRIPE_WEBHOOK_SECRET", &options.stripe_webhook_secret)?,
            daily_aggregation: options.daily_aggregation,
            usage_retention_days: options.usage_retention_days,
            forward_auth_routes: options.forward_auth_routes.clone().unwrap_or_default(),
            admin_audit_retention_days: Some(options.admin_audit_retention_days)
                .filter(|days| *days > 0),
            clock_start: options.clock_start,
            admins: options.admin_eco_ids.clone(),
            admin_rate_limit: RateLimit {
                per_second: options.admin_rate_limit_per_sec,
                burst: options.admin_rate_limit_burst,
            },
            stripe_prices: PlanPrices {
                pro: options.stripe_price_pro.clone().filter(|p| !p.is_empty()),
                enterprise: options
                    .stripe_price_enterprise
                    .clone()
                    .filter(|p| !p.is_empty()),
            },
            stripe: options
                .stripe_secret_key
                .clone()
                .filter(|k| !k.expose().trim().is_empty())
                .map(|key| StripeConfig {
                    api_base: options.stripe_api_base.clone(),
                    timeout: Duration::from_millis(options.stripe_timeout_ms),
                    max_attempts: options.stripe_max_attempts,
                    ..StripeConfig::new(key.expose())
                }),
            billing: BillingOptions {
                concurrency: usize::try_from(options.overage_billing_concurrency).unwrap_or(16),
                // Longer than one item's worst case (every attempt timing out, waits between),
                // so that a charge being sent is never resumed by another run meanwhile.
                in_flight_grace: time::Duration::minutes(5).max(time::Duration::milliseconds(
                    i64::try_from(
                        (options.stripe_timeout_ms + 5_000)
                            .saturating_mul(u64::from(options.stripe_max_attempts))
                            .saturating_add(60_000),
                    )
                    .unwrap_or(i64::MAX),
                )),
                ..BillingOptions::default()
            },
            jwt_secret: options.jwt_secret.clone().filter(|s| !s.is_empty()),
            jwt_audience: options.jwt_audience.clone(),
            jwt_issuer: options.jwt_issuer.clone().filter(|s| !s.is_empty()),
            jwt_max_ttl_secs: options.jwt_max_ttl_secs,
        })
    }

    /// The overage billing service on `store`: live runs when Stripe is configured, dry
    /// runs and reconciliation always.
    pub fn billing(
        &self,
        store: Arc<dyn Store>,
        catalog: Arc<usage_core::terms::LiveCatalog>,
        clock: Arc<dyn Clock>,
    ) -> Result<OverageService, ServerError> {
        let stripe = match &self.stripe {
            Some(config) => Some(Arc::new(HttpStripeClient::new(config.clone())?)
                as Arc<dyn usage_billing::StripeClient>),
            None => None,
        };
        Ok(OverageService::new(
            store,
            stripe,
            catalog,
            clock,
            self.billing,
        ))
    }

    /// The built-in plans as the plan variables define them: the catalog's first terms.
    pub fn builtin_plans(&self) -> Vec<usage_core::catalog::PlanDefinition> {
        usage_core::Plan::builtin()
            .iter()
            .filter_map(|plan| {
                let price = match plan.as_str() {
                    "pro" => self.stripe_prices.pro.clone(),
                    "enterprise" => self.stripe_prices.enterprise.clone(),
                    _ => None,
                };
                usage_core::catalog::PlanDefinition::builtin(
                    plan,
                    &self.plans,
                    &self.rate_limits,
                    price,
                )
            })
            .collect()
    }

    /// The clock: the system's, or the shifted one of `USAGE_CLOCK_START` (the store's).
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.pool.clock.clone()
    }

    /// The keys of user tokens. Without `JWT_SECRET`, a SQLite deployment uses (and on first use
    /// creates, mode 0600) a random secret beside its database file, so that `serve` and
    /// `token` agree; PostgreSQL deployments must configure one.
    pub fn jwt_keys(&self) -> Result<usage_auth::jwt::JwtKeys, ServerError> {
        Ok(usage_auth::jwt::JwtKeys::new(&self.jwt()?)?.with_max_ttl(self.jwt_max_ttl_secs)?)
    }

    /// The JWT settings (see [`Config::jwt_keys`]).
    fn jwt(&self) -> Result<JwtConfig, ServerError> {
        let secret = match (&self.jwt_secret, DatabaseUrl::parse(&self.database_url)?) {
            (Some(secret), _) => secret.expose().to_owned(),
            (None, DatabaseUrl::Sqlite(db_path)) => read_or_create_secret(&secret_path(&db_path))?,
            (None, DatabaseUrl::Postgres(_)) => return Err(ServerError::MissingJwtSecret),
        };
        Ok(JwtConfig {
            secret: secret.into_bytes(),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
        })
    }
}

/// A limit when a rate is set; the burst defaults to one second's worth.
fn rate(per_second: Option<u32>, burst: Option<u32>) -> Option<RateLimit> {
    per_second.map(|per_second| RateLimit {
        per_second,
        burst: burst.unwrap_or(per_second),
    })
}

fn secret_path(db_path: &Path) -> PathBuf {
    db_path.parent().unwrap_or(Path::new(".")).join(SECRET_FILE)
}

fn read_or_create_secret(path: &Path) -> Result<String, ServerError> {
    let failed = |e: std::io::Error| ServerError::SecretFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(failed)?;
    }
    // create_new: of two processes starting at once, one writes and the other reads.
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            let secret = usage_core::ids::random_base62(64);
            file.write_all(secret.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(failed)?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // The writer may not have finished; a short wait covers it.
            for _ in 0..50 {
                let secret = fs::read_to_string(path).map_err(failed)?.trim().to_owned();
                if !secret.is_empty() {
                    return Ok(secret);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(ServerError::SecretFile {
                path: path.display().to_string(),
                reason: "the file is empty".to_owned(),
            })
        }
        Err(e) => Err(failed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn debug_output_never_shows_a_secret() {
        use clap::Parser as _;
        let secrets = [
            "jwt-secret-jwt-secret-jwt-secret-jwt",
            "sk_test_stripe_stripe_stripe_stripe",
            "cron-secret-cron-secret-cron-secret",
            "whsec_webhook_webhook_webhook_webhook",
        ];
        let cli = crate::cli::Cli::try_parse_from([
            "usage-server",
            "--database-url",
            "sqlite://data/usage.db",
            "--jwt-secret",
            secrets[0],
            "--stripe-secret-key",
            secrets[1],
            "--cron-secret",
            secrets[2],
            "--stripe-webhook-secret",
            secrets[3],
        ])
        .unwrap();
        let config = Config::from_options(&cli.global).unwrap();
        assert!(config.cron_secret.is_some() && config.stripe.is_some());
        assert_eq!(config.jwt().unwrap().secret, secrets[0].as_bytes());
        for shown in [format!("{cli:?}"), format!("{config:?}")] {
            for secret in secrets {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
    }

    #[test]
    fn secret_is_created_once_with_mode_0600_and_reused() {
        let dir = std::env::temp_dir().join(format!("usage-secret-{}", std::process::id()));
        let path = dir.join("nested").join(SECRET_FILE);
        let first = read_or_create_secret(&path).unwrap();
        let second = read_or_create_secret(&path).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.len(), 64);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(dir).unwrap();
    }
}
