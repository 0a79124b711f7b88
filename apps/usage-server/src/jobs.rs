//! The background jobs of `serve`, in one place with one shutdown: the daily aggregation's
//! catch-up, the usage lifecycle (partitions, retention), the admin audit log's and the
//! dashboard sessions' pruning. (The tracker's flushes, the quota sync and the key
//! watcher belong to the meter, `usage_embed::UsageMeter`, which stops them itself.)

use std::sync::Arc;

use time::Duration;
use usage_analytics::DailyAggregation;
use usage_core::Clock;

/// How long after midnight UTC the built-in schedule aggregates the day that ended.
const AFTER_MIDNIGHT: Duration = Duration::minutes(5);

/// The jobs running; [`Jobs::stop`] ends them all.
#[derive(Default)]
pub(crate) struct Jobs {
    running: Vec<tokio::task::JoinHandle<()>>,
}

impl Jobs {
    /// Runs `job` until [`Jobs::stop`].
    pub(crate) fn start(&mut self, job: tokio::task::JoinHandle<()>) {
        self.running.push(job);
    }

    /// Ends every job (each is idempotent, so one cut anywhere is picked up next time).
    pub(crate) fn stop(self) {
        for job in self.running {
            job.abort();
        }
    }
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
    clock: Arc<dyn Clock>,
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
    store: Arc<dyn usage_core::Store>,
    retention: Option<usage_analytics::retention::UsageRetention>,
    clock: Arc<dyn Clock>,
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

/// Removes expired dashboard sessions and used or expired sign-in links every hour.
pub(crate) fn prune_sessions(
    sessions: usage_auth::session::DashboardSessions,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            match sessions.prune().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "dashboard sessions pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning dashboard sessions failed"),
            }
        }
    })
}
