//! The command line. Every option can also come from the environment variable named
//! in its help.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use usage_auth::secret::SecretString;
use usage_core::{ApiKeyId, Plan, UserId};
use usage_door::endpoint::EndpointPatterns;

/// Usage metering, API keys, monthly quotas and overage billing for SaaS APIs.
///
/// With no command, serves HTTP (as `serve`). Commands that create something print only
/// its id, key or token on stdout, so they compose in scripts.
#[derive(Debug, Parser)]
#[command(name = "usage-server", version, propagate_version = true)]
pub struct Cli {
    /// Options every command reads.
    #[command(flatten)]
    pub global: GlobalOptions,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct GlobalOptions {
    /// Database: sqlite://PATH (created on first start) or postgres://USER:PASS@HOST/DB.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://data/usage.db",
        global = true
    )]
    pub database_url: String,

    /// Secret for signing user JWTs (HS256, at least 32 bytes). Unset on SQLite: generated
    /// once and kept beside the database file. Required with PostgreSQL.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, global = true,
          value_parser = SecretString::parse)]
    pub jwt_secret: Option<SecretString>,

    /// Audience (`aud`) user tokens are minted for and must carry.
    #[arg(
        long,
        env = "JWT_AUDIENCE",
        default_value = "authenticated",
        global = true
    )]
    pub jwt_audience: String,

    /// Issuer (`iss`) user tokens are minted with and, when set, must carry.
    #[arg(long, env = "JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,

    /// Longest lifetime of a user token, in seconds (1 to 31536000): a token whose `exp`
    /// lies further ahead is refused, and `token --ttl-secs` may not ask for more.
    #[arg(long, env = "JWT_MAX_TTL_SECS", global = true,
          default_value_t = usage_auth::jwt::DEFAULT_MAX_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=usage_auth::jwt::MAX_TTL_SECS))]
    pub jwt_max_ttl_secs: u64,

    /// The plan of new users and of cancelled subscriptions; it cannot be archived.
    #[arg(long, env = "DEFAULT_PLAN", default_value = "free", global = true,
          value_parser = parse_plan_key)]
    pub default_plan: String,

    /// Monthly calls of the free plan.
    #[arg(long, env = "FREE_MONTHLY_CALLS", default_value_t = 1_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub free_monthly_calls: u64,

    /// Monthly calls included in the pro plan.
    #[arg(long, env = "PRO_MONTHLY_CALLS", default_value_t = 100_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub pro_monthly_calls: u64,

    /// Monthly price of the pro plan, in cents.
    #[arg(long, env = "PRO_PRICE_CENTS", default_value_t = 4_900, global = true,
          value_parser = clap::value_parser!(i64).range(0..=100_000_000))]
    pub pro_price_cents: i64,

    /// Monthly price of the enterprise plan, in cents.
    #[arg(long, env = "ENTERPRISE_PRICE_CENTS", default_value_t = 50_000, global = true,
          value_parser = clap::value_parser!(i64).range(0..=100_000_000))]
    pub enterprise_price_cents: i64,

    /// Price of one overage call, in micro-dollars (1,000 = $0.001).
    #[arg(long, env = "OVERAGE_PRICE_MICROUSD", default_value_t = 1_000, global = true,
          value_parser = clap::value_parser!(i64).range(0..=100_000_000))]
    pub overage_price_microusd: i64,

    /// Most database connections open at once.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16, global = true,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub database_max_connections: u32,

    /// Seconds to wait for a database connection before answering 503.
    #[arg(long, env = "DATABASE_CONNECT_TIMEOUT_SECS", default_value_t = 5, global = true,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub database_connect_timeout_secs: u64,

    /// Address `serve` listens on.
    #[arg(
        long,
        env = "BIND_ADDR",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub bind: SocketAddr,

    /// The address users reach this server at, for dashboard sign-in links
    /// (default `http://{BIND_ADDR}`); `https://...` makes the session cookie `Secure`.
    #[arg(long, env = "PUBLIC_URL", global = true, value_parser = parse_public_url)]
    pub public_url: Option<String>,

    /// Write a batch of usage events once this many are waiting.
    #[arg(long, env = "USAGE_BATCH_SIZE", default_value_t = 100, global = true,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub usage_batch_size: u64,

    /// Write waiting usage events at least this often (milliseconds).
    #[arg(long, env = "USAGE_FLUSH_INTERVAL_MS", default_value_t = 5_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub usage_flush_interval_ms: u64,

    /// Usage events the in-memory queue holds; past it, requests wait for room.
    #[arg(long, env = "USAGE_QUEUE_CAPACITY", default_value_t = 100_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub usage_queue_capacity: u64,

    /// Usage batches written at once; 0 picks for the backend (4 on PostgreSQL, 1 on
    /// SQLite, which has a single writer). Each writer has its lane of the queue and its
    /// share of the customers.
    #[arg(long, env = "USAGE_FLUSH_CONCURRENCY", default_value_t = 0, global = true,
          value_parser = clap::value_parser!(u64).range(0..=64))]
    pub usage_flush_concurrency: u64,

    /// Largest batch written at once under load (0: 20000 on PostgreSQL, 50000 on
    /// SQLite; at most 100000). Larger batches touch each customer's counter and index
    /// pages once for more calls; on SQLite a batch holds the write lock while it is
    /// written (about a second for 50000 calls of 10000 customers).
    #[arg(long, env = "USAGE_MAX_BATCH", default_value_t = 0, global = true,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub usage_max_batch: u64,

    /// Durable mode: every admitted call is written to a spool file in this directory and
    /// synced to disk before its response goes out, and calls left there by a crash are
    /// stored at the next start (one directory per instance; see docs/SCALING.md).
    #[arg(long, env = "USAGE_SPOOL_DIR", global = true)]
    pub usage_spool_dir: Option<std::path::PathBuf>,

    /// Longest wait between retries of a failed usage write (milliseconds).
    #[arg(long, env = "USAGE_RETRY_MAX_MS", default_value_t = 30_000, global = true,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub usage_retry_max_ms: u64,

    /// How long a verified (or unknown) API key is remembered (milliseconds). Revocations,
    /// plan changes and ended rotations made by another process reach this one through the
    /// poll (`KEY_REVOCATION_POLL_MS`), not this: it bounds an answer's life if the poll
    /// stops; each key is read again this often.
    #[arg(long, env = "API_KEY_CACHE_TTL_MS", default_value_t = 60_000, global = true,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub api_key_cache_ttl_ms: u64,

    /// A request body must arrive whole within this many seconds of the request's start,
    /// else 408 and the connection closes (1 to 300).
    #[arg(long, env = "REQUEST_BODY_TIMEOUT_SECS", default_value_t = 10, global = true,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_body_timeout_secs: u64,

    /// Connections served at once, in all (more wait in the listen queue). Default: what
    /// the open-file limit leaves once the database pool and the process's own files are
    /// counted, so that a flood of connections never takes the descriptors the database
    /// and the spool need. The soft open-file limit is raised to the hard one at start.
    #[arg(long, env = "MAX_CONNECTIONS", global = true,
          value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    pub max_connections: Option<u64>,

    /// How often to look for keys revoked or deleted and plans changed by another process
    /// (the CLI, another instance, a row deleted by hand) and drop them from the cache
    /// (milliseconds).
    #[arg(long, env = "KEY_REVOCATION_POLL_MS", default_value_t = 500, global = true,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub key_revocation_poll_ms: u64,

    /// How often quota counts are pushed to the shared counters and idle leases given
    /// back (milliseconds); see docs/SCALING.md.
    #[arg(long, env = "QUOTA_SYNC_MS", default_value_t = 500, global = true,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub quota_sync_ms: u64,

    /// Largest block of calls an instance leases from a blocking plan's quota at once.
    #[arg(long, env = "QUOTA_LEASE_MAX", default_value_t = 1_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub quota_lease_max: u64,

    /// A lease takes at most 1/QUOTA_LEASE_SHARE of what is left of the quota.
    #[arg(long, env = "QUOTA_LEASE_SHARE", default_value_t = 16, global = true,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub quota_lease_share: u64,

    /// Longest a user's calls on a plan that never blocks (pro, enterprise) wait before a
    /// quota sync pushes them to the shared counter (milliseconds); 16 waiting calls are
    /// pushed at the next sync.
    #[arg(long, env = "QUOTA_PUSH_WITHIN_MS", default_value_t = 10_000, global = true,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub quota_push_within_ms: u64,

    /// How often counters that lost counts (an instance killed before pushing them) are
    /// brought up to the calls stored (milliseconds). A shortfall is raised only once it
    /// has lasted QUOTA_PUSH_WITHIN_MS and two syncs, so no call is counted twice.
    #[arg(long, env = "QUOTA_HEAL_MS", default_value_t = 60_000, global = true,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub quota_heal_ms: u64,

    /// Forget a user's quota state after this many milliseconds without a call (1000 to
    /// 86400000); their next call reads the shared counter again.
    #[arg(long, env = "QUOTA_FORGET_IDLE_MS", default_value_t = 300_000, global = true,
          value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub quota_forget_idle_ms: u64,

    /// While the database does not answer, keep using a remembered key this long past
    /// its cache TTL (milliseconds; 0: answer 503 instead).
    #[arg(long, env = "API_KEY_CACHE_STALE_IF_ERROR_MS", default_value_t = 300_000, global = true,
          value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub api_key_cache_stale_if_error_ms: u64,

    /// Most API keys remembered.
    #[arg(long, env = "API_KEY_CACHE_CAPACITY", default_value_t = 100_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub api_key_cache_capacity: u64,

    /// Short-window limit of the free plan: requests per second (off when unset).
    #[arg(long, env = "RATE_LIMIT_FREE_PER_SEC", global = true,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_free_per_sec: Option<u32>,

    /// Burst of the free plan's short-window limit (default: one second's worth).
    #[arg(long, env = "RATE_LIMIT_FREE_BURST", global = true,
          requires = "rate_limit_free_per_sec",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_free_burst: Option<u32>,

    /// Short-window limit of the pro plan: requests per second (off when unset).
    #[arg(long, env = "RATE_LIMIT_PRO_PER_SEC", global = true,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_pro_per_sec: Option<u32>,

    /// Burst of the pro plan's short-window limit (default: one second's worth).
    #[arg(long, env = "RATE_LIMIT_PRO_BURST", global = true,
          requires = "rate_limit_pro_per_sec",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_pro_burst: Option<u32>,

    /// Short-window limit of the enterprise plan: requests per second (off when unset).
    #[arg(long, env = "RATE_LIMIT_ENTERPRISE_PER_SEC", global = true,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_enterprise_per_sec: Option<u32>,

    /// Burst of the enterprise plan's short-window limit (default: one second's worth).
    #[arg(long, env = "RATE_LIMIT_ENTERPRISE_BURST", global = true,
          requires = "rate_limit_enterprise_per_sec",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_enterprise_burst: Option<u32>,

    /// Benchmark baseline only: serve /api/v1/ping WITHOUT the usage middleware (no key
    /// check, no quota, nothing recorded).
    #[arg(long, hide = true, global = true)]
    pub bench_unmetered: bool,

    /// Benchmark baseline only: the full middleware, but every recorded call is dropped
    /// instead of written (the middleware's own cost, without the database writes).
    #[arg(long, hide = true, global = true)]
    pub bench_discard_usage: bool,

    /// Benchmark only: the sample route reports 1,234 units of the meter `tokens` with
    /// each response, as a handler of a metered AI API would (the meter must exist).
    #[arg(long, hide = true, global = true)]
    pub bench_report_units: bool,

    /// User ids allowed on the admin endpoints, comma-separated (eco_usr_...).
    #[arg(long, env = "ADMIN_ECO_IDS", default_value = "", global = true,
          value_parser = parse_admin_list)]
    pub admin_eco_ids: usage_auth::admin::AdminList,

    /// Admin requests per second allowed to each admin (1 to 10000).
    #[arg(long, env = "ADMIN_RATE_LIMIT_PER_SEC", default_value_t = 5, global = true,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub admin_rate_limit_per_sec: u32,

    /// Admin requests an admin may make at once (1 to 10000).
    #[arg(long, env = "ADMIN_RATE_LIMIT_BURST", default_value_t = 20, global = true,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub admin_rate_limit_burst: u32,

    /// Stripe secret key for overage invoice items; unset, billing runs only as --dry-run.
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true, global = true,
          value_parser = SecretString::parse)]
    pub stripe_secret_key: Option<SecretString>,

    /// Signing secret of the Stripe webhook endpoint (`whsec_...`, at least 32 bytes).
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true, global = true,
          value_parser = SecretString::parse)]
    pub stripe_webhook_secret: Option<SecretString>,

    /// Stripe price id of the pro plan: subscriptions to it set the pro plan (webhook).
    #[arg(long, env = "STRIPE_PRICE_PRO", global = true)]
    pub stripe_price_pro: Option<String>,

    /// Stripe price id of the enterprise plan (webhook).
    #[arg(long, env = "STRIPE_PRICE_ENTERPRISE", global = true)]
    pub stripe_price_enterprise: Option<String>,

    /// Stripe's API address (a local mock in tests).
    #[arg(long, env = "STRIPE_API_BASE", default_value = usage_billing::stripe::DEFAULT_API_BASE,
          global = true)]
    pub stripe_api_base: String,

    /// Timeout of one request to Stripe, in milliseconds (100 to 120000).
    #[arg(long, env = "STRIPE_TIMEOUT_MS", default_value_t = 10_000, global = true,
          value_parser = clap::value_parser!(u64).range(100..=120_000))]
    pub stripe_timeout_ms: u64,

    /// Attempts per invoice item, the first included (1 to 10).
    #[arg(long, env = "STRIPE_MAX_ATTEMPTS", default_value_t = 4, global = true,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub stripe_max_attempts: u32,

    /// Users billed at once by an overage billing run (1 to 256).
    #[arg(long, env = "OVERAGE_BILLING_CONCURRENCY", default_value_t = 16, global = true,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub overage_billing_concurrency: u32,

    /// Tests and demos only: run as if the clock read this RFC 3339 instant at start (the
    /// server then lives on another day, e.g. across a month boundary). User tokens are
    /// still minted and checked on the real clock.
    #[arg(long, env = "USAGE_CLOCK_START", hide = true, global = true,
          value_parser = parse_time)]
    pub clock_start: Option<time::OffsetDateTime>,

    /// Secret for the cron endpoints (`Authorization: Bearer <secret>`); unset, they
    /// answer 404. At least 32 bytes.
    #[arg(long, env = "CRON_SECRET", hide_env_values = true, global = true,
          value_parser = SecretString::parse)]
    pub cron_secret: Option<SecretString>,

    /// Run the daily aggregation inside the server, shortly after midnight UTC. Turn it
    /// off when an external scheduler calls the cron endpoint instead.
    #[arg(long, env = "DAILY_AGGREGATION", default_value_t = true, global = true,
          action = clap::ArgAction::Set)]
    pub daily_aggregation: bool,

    /// Days the admin audit log is kept (0 keeps it for ever); older entries are removed
    /// at start and every day.
    #[arg(long, env = "ADMIN_AUDIT_RETENTION_DAYS", default_value_t = 90, global = true,
          value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub admin_audit_retention_days: u32,

    /// Secret of `POST /api/events`, where other services send usage
    /// (`Authorization: Bearer <secret>`); unset, it answers 404. At least 32 bytes.
    #[arg(long, env = "INGEST_SECRET", hide_env_values = true, global = true,
          value_parser = SecretString::parse)]
    pub ingest_secret: Option<SecretString>,

    /// How many days back an event sent to `POST /api/events` may be (1 to 366); older
    /// ones are refused (`time_out_of_range`).
    #[arg(long, env = "LATE_EVENT_DAYS", global = true, default_value_t = usage_core::ingest::LATE_EVENT_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=366))]
    pub late_event_days: u32,

    /// Days raw calls are kept (1 to 36500; unset: for ever). Older calls are removed at
    /// start and every day, never before their day is aggregated and their period's
    /// overage invoiced; the daily aggregate keeps their history.
    #[arg(long, env = "USAGE_RETENTION_DAYS", global = true,
          value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub usage_retention_days: Option<u32>,

    /// Route templates for forward auth (comma-separated, e.g.
    /// `/v1/items/{id},/v1/users/{id}/orders`): a path matching one is recorded as it;
    /// others with each id-like segment as `{id}`.
    #[arg(long, env = "FORWARD_AUTH_ROUTES", global = true, value_parser = parse_route_templates)]
    pub forward_auth_routes: Option<EndpointPatterns>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How logs are written (always to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrate the database if needed, then serve HTTP on --bind.
    Serve,
    /// Apply pending database migrations.
    Migrate,
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage the plan catalog (a TOML file kept in git: see examples/catalog.toml).
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Print a user JWT signed with the configured secret.
    Token(TokenArgs),
    /// Print a one-time dashboard sign-in URL for a user.
    LoginLink(LoginLinkArgs),
    /// Rebuild one UTC day's rows of the daily aggregate; prints the JSON summary.
    Aggregate {
        /// The day, YYYY-MM-DD (default: yesterday, UTC).
        #[arg(long)]
        date: Option<String>,
    },
    /// Bill un-invoiced overage as Stripe invoice items (as the cron endpoint); prints the
    /// JSON summary.
    BillOverage {
        /// Say what would be billed; record and send nothing (no Stripe key needed).
        #[arg(long)]
        dry_run: bool,
    },
    /// Settle by hand a charge left pending longer than Stripe keeps idempotency keys,
    /// after looking in Stripe for an item with its key's range in the metadata.
    #[command(group(clap::ArgGroup::new("outcome").required(true).args(["stripe_item", "not_created"])))]
    ResolveCharge {
        /// The charge's idempotency key (as the billing run reported it).
        #[arg(long)]
        key: String,
        /// Stripe has the item: its id (ii_...). The charge succeeds.
        #[arg(long)]
        stripe_item: Option<String>,
        /// Stripe has no such item: why. The charge fails; the next run bills its range.
        #[arg(long)]
        not_created: Option<String>,
    },
    /// List the calls the store refused for good (unknown user or key), kept as dead
    /// letters; with --replay, store those it now takes (JSON on stdout).
    DeadLetters {
        /// Store every letter the store now takes, and forget those.
        #[arg(long)]
        replay: bool,
    },
    /// Remove raw calls older than USAGE_RETENTION_DAYS (aggregated and invoiced ones
    /// only); prints what it removed as JSON.
    PruneUsage {
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stream a user's recorded calls to stdout, newest first.
    Export {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
        /// First instant included (RFC 3339); default: the oldest call.
        #[arg(long, value_parser = parse_time)]
        from: Option<time::OffsetDateTime>,
        /// First instant excluded (RFC 3339); default: now.
        #[arg(long, value_parser = parse_time)]
        to: Option<time::OffsetDateTime>,
        /// One JSON object per line, or CSV with a header line.
        #[arg(long, value_enum, default_value_t = ExportFormat::Ndjson)]
        format: ExportFormat,
    },
    /// Compare, per user and period, overage calls, invoiced calls and recorded charges;
    /// prints JSON and exits non-zero when something does not add up.
    ReconcileOverage {
        /// Only the periods that need attention (not `ok`).
        #[arg(long)]
        attention_only: bool,
    },
}

/// `users ...`
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user; prints the new user id.
    Create {
        /// The user's email address.
        #[arg(long)]
        email: String,
        /// Plan: free, pro or enterprise.
        #[arg(long, value_parser = parse_plan)]
        plan: Plan,
        /// Stripe customer to bill overage to (cus_...).
        #[arg(long)]
        stripe_customer_id: Option<String>,
    },
    /// Change a user's plan.
    SetPlan {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
        /// Plan: free, pro or enterprise.
        #[arg(long, value_parser = parse_plan)]
        plan: Plan,
    },
    /// Block a user: revokes every key (running servers refuse them within
    /// KEY_REVOCATION_POLL_MS), then refuses the user's tokens and dashboard sign-ins.
    Block {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
    },
    /// Lift a block: the user may sign in and create keys again (revoked keys stay revoked).
    Unblock {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
    },
    /// Delete a user and everything stored of them (keys, usage counters, charges,
    /// sessions): revokes every key first. Recorded calls stay until retention removes them.
    Delete {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
    },
    /// Link a user to a Stripe customer: overage is invoiced to it, and its subscription
    /// events (webhook) set the user's plan.
    SetStripeCustomer {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
        /// The Stripe customer id (cus_...).
        #[arg(long)]
        customer: String,
    },
}

/// `plans ...`
#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Print every plan's newest version: key, version, name, price, subscribers.
    List,
    /// Make the catalog what a catalog file (TOML, or JSON) says: its meters, then its
    /// plans (new keys created, changed terms a new version that users move to at their
    /// next period, `archived` followed), then its route costs (replaced whole when the
    /// file has them); meters and plans the file leaves out stay as they are. Prints what
    /// changed; idempotent.
    Apply {
        /// The catalog file.
        file: std::path::PathBuf,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the catalog (meters, every plan's newest version, route costs) as a catalog
    /// file `apply` reads.
    Export {
        /// TOML (the default) or JSON.
        #[arg(long, value_enum, default_value_t = CatalogFormat::Toml)]
        format: CatalogFormat,
    },
}

/// `keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key for a user; prints the key (shown only this once).
    Create {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
        /// A name to recognise the key by.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Revoke a user's API key. Running servers stop accepting it within
    /// KEY_REVOCATION_POLL_MS.
    Revoke {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
        /// The key id (eco_key_...), not the key itself.
        #[arg(long, value_parser = parse_key_id)]
        key: ApiKeyId,
    },
    /// Delete a user's API key: revokes it, then removes its row. Running servers stop
    /// accepting it within KEY_REVOCATION_POLL_MS.
    Delete {
        /// The user id (eco_usr_...).
        #[arg(long, value_parser = parse_user_id)]
        user: UserId,
        /// The key id (eco_key_...), not the key itself.
        #[arg(long, value_parser = parse_key_id)]
        key: ApiKeyId,
    },
}

/// Options of `token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (eco_usr_...) the token is for.
    #[arg(long, value_parser = parse_user_id)]
    pub user: UserId,
    /// Lifetime in seconds (1 to `JWT_MAX_TTL_SECS`, 30 days by default).
    #[arg(long, default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=usage_auth::jwt::MAX_TTL_SECS))]
    pub ttl_secs: u64,
}

/// Options of `login-link`.
#[derive(Debug, Args)]
pub struct LoginLinkArgs {
    /// The user id (eco_usr_...) the link signs in.
    #[arg(long, value_parser = parse_user_id)]
    pub user: UserId,
    /// Seconds the link stays usable (1 to 86400); it works once.
    #[arg(long, default_value_t = usage_auth::session::LINK_TTL_DEFAULT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=usage_auth::session::LINK_TTL_MAX_SECS))]
    pub ttl_secs: u64,
}

/// `http://` or `https://` and a host, without a path's trailing slash.
fn parse_public_url(raw: &str) -> Result<String, String> {
    let url = raw.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("PUBLIC_URL must start with http:// or https:// (got {raw:?})"))?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("PUBLIC_URL must name a host (got {raw:?})"));
    }
    Ok(url.to_owned())
}

fn parse_plan(s: &str) -> Result<Plan, String> {
    s.parse()
        .map_err(|e: usage_core::DomainError| e.to_string())
}

fn parse_plan_key(s: &str) -> Result<String, String> {
    if usage_core::catalog::is_valid_key(s) {
        Ok(s.to_owned())
    } else {
        Err("a plan key is 1 to 40 of a-z, 0-9, _ and -".to_owned())
    }
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
    usage_analytics::events::parse_time("time", s).map_err(|e| e.to_string())
}

/// The form of a catalog file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CatalogFormat {
    /// TOML, as `examples/catalog.toml`.
    Toml,
    /// JSON: the same fields.
    Json,
}

/// Output of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Ndjson,
    /// Comma-separated values with a header line.
    Csv,
}

fn parse_user_id(s: &str) -> Result<UserId, String> {
    UserId::parse(s).map_err(|e| e.to_string())
}

fn parse_key_id(s: &str) -> Result<ApiKeyId, String> {
    ApiKeyId::parse(s).map_err(|e| e.to_string())
}

fn parse_admin_list(value: &str) -> Result<usage_auth::admin::AdminList, String> {
    usage_auth::admin::AdminList::parse(value)
}

fn parse_route_templates(list: &str) -> Result<EndpointPatterns, String> {
    EndpointPatterns::parse(list).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn no_command_means_serve_with_defaults() {
        let cli = Cli::try_parse_from(["usage-server"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.global.free_monthly_calls, 1_000);
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let err = Cli::try_parse_from([
            "usage-server",
            "users",
            "create",
            "--email",
            "a@b.co",
            "--plan",
            "Gold",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("plan must be a plan key"), "{err}");
        let err = Cli::try_parse_from(["usage-server", "token", "--user", "bob"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("user id must look like eco_usr_"), "{err}");
        let err = Cli::try_parse_from([
            "usage-server",
            "token",
            "--user",
            "eco_usr_a",
            "--ttl-secs",
            "0",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--ttl-secs"), "{err}");
    }
}
