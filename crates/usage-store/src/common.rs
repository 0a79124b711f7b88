//! Logic both backends share: turning inserted events into counter increments, and
//! converting between domain and column types.

use std::collections::{BTreeMap, BTreeSet};

use time::OffsetDateTime;
use usage_core::repo::{EndpointCount, IncludedCalls};
use usage_core::{BillingPeriod, Plan, RepoError, UsageEvent, UserId};

/// How many times a transaction that hit a deadlock or serialization failure is retried.
pub(crate) const TRANSACTION_ATTEMPTS: usize = 5;

/// One (user, period) counter increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CounterDelta {
    pub user_id: UserId,
    pub period: BillingPeriod,
    pub calls: i64,
    /// Calls the user's plan includes; `None` is unlimited.
    pub included: Option<i64>,
}

/// Groups the (user, time) of newly inserted events into one increment per (user, period),
/// sorted so that concurrent transactions lock counter rows in the same order.
pub(crate) fn counter_deltas(
    inserted: impl IntoIterator<Item = (UserId, OffsetDateTime)>,
    included: &IncludedCalls,
) -> Vec<CounterDelta> {
    let mut grouped: BTreeMap<(UserId, BillingPeriod), i64> = BTreeMap::new();
    for (user_id, at) in inserted {
        *grouped
            .entry((user_id, BillingPeriod::containing(at)))
            .or_default() += 1;
    }
    grouped
        .into_iter()
        .map(|((user_id, period), calls)| CounterDelta {
            included: included.get(&user_id).map(|&n| to_i64(n)),
            user_id,
            period,
            calls,
        })
        .collect()
}

/// The distinct user ids and key ids a batch names, sorted.
pub(crate) fn distinct_references(events: &[UsageEvent]) -> (Vec<String>, Vec<String>) {
    let users: BTreeSet<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
    let keys: BTreeSet<&str> = events.iter().map(|e| e.api_key_id.as_str()).collect();
    (
        users.into_iter().map(str::to_owned).collect(),
        keys.into_iter().map(str::to_owned).collect(),
    )
}

/// Why a usage batch was not stored (inside its transaction).
pub(crate) enum BatchError {
    /// A user or key of the batch does not exist.
    Missing(&'static str),
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for BatchError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Db(e)
    }
}

/// A row of the per-endpoint statistics query (same SQL shape on both backends).
#[derive(diesel::QueryableByName)]
pub(crate) struct EndpointStatsRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    endpoint: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    method: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    calls: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    error_calls: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    total_ms: i64,
}

impl EndpointStatsRow {
    pub(crate) fn into_domain(self) -> usage_core::repo::EndpointStats {
        usage_core::repo::EndpointStats {
            endpoint: self.endpoint,
            method: self.method,
            calls: to_u64(self.calls),
            error_calls: to_u64(self.error_calls),
            total_response_time_ms: to_u64(self.total_ms),
        }
    }
}

/// A stored plan name.
pub(crate) fn parse_plan(stored: &str) -> Result<Plan, RepoError> {
    stored
        .parse()
        .map_err(|_| RepoError::Backend(format!("unknown plan {stored:?} in eco_users")))
}

/// A count for a BIGINT column (saturating: counts never come near i64::MAX).
pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A count read from a BIGINT column (the schema's CHECKs keep them non-negative).
pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Parses the JSON of `top_endpoints`.
pub(crate) fn parse_top_endpoints(json: &str) -> Result<Vec<EndpointCount>, RepoError> {
    serde_json::from_str(json)
        .map_err(|e| RepoError::Backend(format!("top_endpoints is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn deltas_are_grouped_per_user_and_period_and_sorted() {
        let (a, b) = (
            UserId::parse("eco_usr_a").unwrap(),
            UserId::parse("eco_usr_b").unwrap(),
        );
        let nov = datetime!(2026-11-30 23:59:59.999 UTC);
        let dec = datetime!(2026-12-01 00:00 UTC);
        let included = IncludedCalls::from([(a.clone(), 10)]);
        let deltas = counter_deltas(
            [
                (b.clone(), nov),
                (a.clone(), dec),
                (a.clone(), nov),
                (a.clone(), nov),
            ],
            &included,
        );
        let summary: Vec<_> = deltas
            .iter()
            .map(|d| (d.user_id.as_str(), d.period.start(), d.calls, d.included))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("eco_usr_a", datetime!(2026-11-01 00:00 UTC), 2, Some(10)),
                ("eco_usr_a", datetime!(2026-12-01 00:00 UTC), 1, Some(10)),
                ("eco_usr_b", datetime!(2026-11-01 00:00 UTC), 1, None),
            ]
        );
    }
}

/// How many users each plan has, from `(plan, count)` rows.
pub(crate) fn plan_counts(rows: Vec<(String, i64)>) -> Result<Vec<(Plan, u64)>, RepoError> {
    let mut counts = rows
        .into_iter()
        .map(|(plan, n)| Ok((parse_plan(&plan)?, to_u64(n))))
        .collect::<Result<Vec<_>, RepoError>>()?;
    counts.sort_by_key(|(plan, _)| Plan::ALL.iter().position(|p| p == plan));
    Ok(counts)
}

/// Counters beside the charges of every user and period with overage or charges. Plain
/// SQL understood by both backends (no FILTER, no GREATEST; sums cast back to BIGINT,
/// which PostgreSQL would otherwise widen to NUMERIC).
pub(crate) const LEDGER_SQL: &str = "
    SELECT r.user_id, r.period_start, r.overage_calls, r.overage_invoiced_calls,
           CAST(COALESCE(SUM(CASE WHEN c.status = 'succeeded'
                                  THEN c.calls_to - c.calls_from END), 0) AS BIGINT)
               AS charged_calls,
           CAST(COALESCE(SUM(CASE WHEN c.status = 'succeeded' THEN c.amount_cents END), 0)
                AS BIGINT) AS charged_cents,
           COUNT(CASE WHEN c.status = 'pending' THEN 1 END) AS pending_charges,
           COUNT(CASE WHEN c.status = 'failed' THEN 1 END) AS failed_charges
    FROM eco_usage_records r
    LEFT JOIN eco_overage_charges c
           ON c.user_id = r.user_id AND c.period_start = r.period_start
    GROUP BY r.user_id, r.period_start, r.overage_calls, r.overage_invoiced_calls
    HAVING r.overage_calls > 0 OR COUNT(c.id) > 0
    ORDER BY r.user_id, r.period_start";

/// The numeric columns of [`LEDGER_SQL`].
#[derive(diesel::QueryableByName)]
pub(crate) struct LedgerCounts {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    overage_calls: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    overage_invoiced_calls: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    charged_calls: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    charged_cents: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pending_charges: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    failed_charges: i64,
}

impl LedgerCounts {
    pub(crate) fn into_entry(
        self,
        user_id: UserId,
        period_start: time::OffsetDateTime,
    ) -> usage_core::repo::OverageLedgerEntry {
        usage_core::repo::OverageLedgerEntry {
            user_id,
            period_start,
            overage_calls: to_u64(self.overage_calls),
            overage_invoiced_calls: to_u64(self.overage_invoiced_calls),
            charged_calls: to_u64(self.charged_calls),
            charged_cents: self.charged_cents,
            pending_charges: to_u64(self.pending_charges),
            failed_charges: to_u64(self.failed_charges),
        }
    }
}
