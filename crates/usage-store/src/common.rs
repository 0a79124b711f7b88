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

/// Dead letters as one JSON array of objects, for a single set-based insert on either
/// backend (`jsonb_to_recordset`, `json_each`); times as fixed-width UTC text, which both
/// read.
pub(crate) fn dead_letters_json(letters: &[usage_core::repo::DeadLetter]) -> String {
    let utc = |t: time::OffsetDateTime| {
        t.checked_to_offset(time::UtcOffset::UTC)
            .unwrap_or(t)
            .format(time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
            ))
            .unwrap_or_default()
    };
    serde_json::Value::Array(
        letters
            .iter()
            .map(|l| {
                let e = &l.event;
                serde_json::json!({
                    "event_id": e.event_id.to_string(),
                    "user_id": e.user_id.as_str(),
                    "api_key_id": e.api_key_id.as_str(),
                    "endpoint": e.endpoint,
                    "method": e.method,
                    "status_code": e.status_code,
                    "response_time_ms": e.response_time_ms,
                    "created_at": utc(e.created_at),
                    "included_calls": l.included_calls,
                    "reason": l.reason,
                    "failed_at": utc(l.failed_at),
                    "units": e.units.to_stored(),
                })
            })
            .collect(),
    )
    .to_string()
}

/// A day's figures counted from the raw events (no top endpoints).
pub(crate) fn raw_day(
    user_id: &usage_core::UserId,
    date: time::Date,
    calls: i64,
    errors: i64,
    total_ms: i64,
) -> usage_core::repo::DailyUsage {
    let api_calls = to_u64(calls);
    let total_response_time_ms = to_u64(total_ms);
    usage_core::repo::DailyUsage {
        user_id: user_id.clone(),
        date,
        api_calls,
        error_calls: to_u64(errors),
        total_response_time_ms,
        avg_response_time_ms: total_response_time_ms as f64 / api_calls.max(1) as f64,
        top_endpoints: Vec::new(),
    }
}

/// Why a transaction's work was not done (inside the transaction, so that it rolls back).
pub(crate) enum BatchError {
    /// A user or key it names does not exist.
    Missing(&'static str),
    /// A stored value did not read back.
    Repo(usage_core::RepoError),
    Db(diesel::result::Error),
}

impl BatchError {
    /// The repository error, `missing` naming what a foreign key refers to.
    pub(crate) fn into_repo(self, missing: &'static str) -> usage_core::RepoError {
        match self {
            Self::Missing(entity) => usage_core::RepoError::NotFound { entity },
            Self::Repo(e) => e,
            Self::Db(e) => crate::error::repo_error(e, missing),
        }
    }
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
        .map(|(plan, n)| (Plan::from_stored(plan), to_u64(n)))
        .collect::<Vec<_>>();
    counts.sort();
    Ok(counts)
}

/// Counters beside the charges of every user, period and meter with overage or charges:
/// calls from `eco_usage_records` (their overage), other meters from `eco_meter_usage`
/// (their whole quantity). Plain SQL understood by both backends (no FILTER, no GREATEST;
/// sums cast back to BIGINT, which PostgreSQL would otherwise widen to NUMERIC).
pub(crate) const LEDGER_SQL: &str = "
    SELECT k.user_id, k.period_start, k.meter, k.overage_calls, k.overage_invoiced_calls,
           CAST(COALESCE(SUM(CASE WHEN c.status = 'succeeded'
                                  THEN c.calls_to - c.calls_from END), 0) AS BIGINT)
               AS charged_calls,
           CAST(COALESCE(SUM(CASE WHEN c.status = 'succeeded' THEN c.amount_cents END), 0)
                AS BIGINT) AS charged_cents,
           COUNT(CASE WHEN c.status = 'pending' THEN 1 END) AS pending_charges,
           COUNT(CASE WHEN c.status = 'failed' THEN 1 END) AS failed_charges
    FROM (SELECT user_id, period_start, 'api_calls' AS meter, overage_calls,
                 overage_invoiced_calls
          FROM eco_usage_records
          UNION ALL
          SELECT user_id, period_start, meter, quantity, invoiced_quantity
          FROM eco_meter_usage) k
    LEFT JOIN eco_overage_charges c
           ON c.user_id = k.user_id AND c.period_start = k.period_start AND c.meter = k.meter
    GROUP BY k.user_id, k.period_start, k.meter, k.overage_calls, k.overage_invoiced_calls
    HAVING k.overage_calls > 0 OR COUNT(c.id) > 0
    ORDER BY 1, 2, 3";

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
        meter: String,
    ) -> usage_core::repo::OverageLedgerEntry {
        usage_core::repo::OverageLedgerEntry {
            user_id,
            period_start,
            meter,
            overage_calls: to_u64(self.overage_calls),
            overage_invoiced_calls: to_u64(self.overage_invoiced_calls),
            charged_calls: to_u64(self.charged_calls),
            charged_cents: self.charged_cents,
            pending_charges: to_u64(self.pending_charges),
            failed_charges: to_u64(self.failed_charges),
        }
    }
}

/// Admin queries, in plain SQL both backends understand. Parameters are written `$N`
/// (SQLite's store translates them). Nothing from a request is ever
/// interpolated: the only text spliced in is an ORDER BY chosen from constants by
/// [`order_by`].
pub(crate) mod admin_sql {
    use usage_core::repo::UserSort;

    pub(crate) const INSERT_AUDIT: &str = "
        INSERT INTO eco_admin_audit_log (admin_id, method, route, params, status, created_at)
        VALUES ($1, $2, $3, $4, $5, $6)";
    /// `$1`: remove entries before this time; `$2`: at most this many.
    pub(crate) const PRUNE_AUDIT: &str = "
        DELETE FROM eco_admin_audit_log WHERE id IN (
            SELECT id FROM eco_admin_audit_log WHERE created_at < $1 ORDER BY id LIMIT $2)";
    pub(crate) const COUNT_AUDIT: &str = "SELECT count(*) AS n FROM eco_admin_audit_log";
    pub(crate) const AUDIT_PAGE: &str = "
        SELECT id, admin_id, method, route, params, status, created_at
        FROM eco_admin_audit_log ORDER BY id DESC LIMIT $1 OFFSET $2";

    /// `$1`: plan or ''; `$2`: lower-case LIKE pattern or ''.
    pub(crate) const COUNT_USERS: &str = "
        SELECT count(*) AS n FROM eco_users u
        WHERE ($1 = '' OR u.plan = $1)
          AND ($2 = '' OR lower(u.email) LIKE $2 ESCAPE '\\' OR lower(u.id) LIKE $2 ESCAPE '\\')";

    /// The filters of the users list: `$2` plan or '', `$3` pattern or ''.
    const USER_FILTERS: &str = "($2 = '' OR u.plan = $2)
        AND ($3 = '' OR lower(u.email) LIKE $3 ESCAPE '\\' OR lower(u.id) LIKE $3 ESCAPE '\\')";

    /// The user columns of the users list's rows.
    const USER_COLUMNS: &str = "u.id, u.email, u.plan, u.stripe_customer_id, u.created_at,
        u.plan_subscription_id, u.blocked_at, u.plan_version, u.overrides";

    /// A page of the users list sorted by `sort` (not [`UserSort::ApiCalls`], which is
    /// paged from [`calls_page_with_records`] and [`calls_page_without_records`]): walks
    /// the (created_at, id) or (email) index, joining each user's record. Parameters: `$1`
    /// period start, `$2` plan or '', `$3` pattern or '', `$4` limit, `$5` offset.
    pub(crate) fn users_page(sort: UserSort, descending: bool) -> String {
        let dir = if descending { "DESC" } else { "ASC" };
        let key = if sort == UserSort::Email {
            "u.email"
        } else {
            "u.created_at"
        };
        format!(
            "SELECT {USER_COLUMNS},
                    CAST(COALESCE(r.api_calls, 0) AS BIGINT) AS api_calls,
                    CAST(COALESCE(r.overage_calls, 0) AS BIGINT) AS overage_calls
             FROM eco_users u
             LEFT JOIN eco_usage_records r ON r.user_id = u.id AND r.period_start = $1
             WHERE {USER_FILTERS}
             ORDER BY {key} {dir}, u.id {dir}
             LIMIT $4 OFFSET $5"
        )
    }

    /// Users with a record this period, by calls then id (walks the records' index in
    /// order). Same parameters as [`users_page`].
    pub(crate) fn calls_page_with_records(descending: bool) -> String {
        let dir = if descending { "DESC" } else { "ASC" };
        format!(
            "SELECT {USER_COLUMNS},
                    CAST(r.api_calls AS BIGINT) AS api_calls,
                    CAST(r.overage_calls AS BIGINT) AS overage_calls
             FROM eco_usage_records r JOIN eco_users u ON u.id = r.user_id
             WHERE r.period_start = $1 AND {USER_FILTERS}
             ORDER BY r.api_calls {dir}, r.user_id {dir}
             LIMIT $4 OFFSET $5"
        )
    }

    /// Users without calls this period, by id. Same parameters as [`users_page`].
    pub(crate) fn calls_page_without_records(descending: bool) -> String {
        let dir = if descending { "DESC" } else { "ASC" };
        format!(
            "SELECT {USER_COLUMNS},
                    CAST(0 AS BIGINT) AS api_calls, CAST(0 AS BIGINT) AS overage_calls
             FROM eco_users u
             WHERE {USER_FILTERS}
               AND NOT EXISTS (SELECT 1 FROM eco_usage_records r
                               WHERE r.user_id = u.id AND r.period_start = $1)
             ORDER BY u.id {dir}
             LIMIT $4 OFFSET $5"
        )
    }

    /// Users with a record this period among those the filters keep: `$1` period start,
    /// `$2` plan or '', `$3` pattern or ''.
    pub(crate) fn count_with_records() -> String {
        format!(
            "SELECT count(*) AS n
             FROM eco_usage_records r JOIN eco_users u ON u.id = r.user_id
             WHERE r.period_start = $1 AND {USER_FILTERS}"
        )
    }

    /// The users the filters keep who have their own terms or at least `$4` calls this
    /// period, with what they hold and their calls (0 without a record): those with their
    /// own terms (a scan of the few), then the others from the records with that many
    /// calls (an index range). Same `$1..$3` as [`users_page`].
    pub(crate) fn users_terms() -> String {
        format!(
            "SELECT u.id, u.plan, u.plan_version, u.overrides,
                    CAST(COALESCE(r.api_calls, 0) AS BIGINT) AS api_calls
             FROM eco_users u
             LEFT JOIN eco_usage_records r ON r.user_id = u.id AND r.period_start = $1
             WHERE {USER_FILTERS} AND u.overrides IS NOT NULL
             UNION ALL
             SELECT u.id, u.plan, u.plan_version, u.overrides,
                    CAST(r.api_calls AS BIGINT) AS api_calls
             FROM eco_usage_records r JOIN eco_users u ON u.id = r.user_id
             WHERE r.period_start = $1 AND r.api_calls >= $4 AND u.overrides IS NULL
               AND {USER_FILTERS}
             UNION ALL
             SELECT u.id, u.plan, u.plan_version, u.overrides, CAST(0 AS BIGINT) AS api_calls
             FROM eco_users u
             WHERE $4 = 0 AND u.overrides IS NULL AND {USER_FILTERS}
               AND NOT EXISTS (SELECT 1 FROM eco_usage_records r
                               WHERE r.user_id = u.id AND r.period_start = $1)"
        )
    }

    /// The users the filters keep without their own terms and with fewer than `$5` calls
    /// this period, by the price `prices` (a row set of plan, version, price) gives their
    /// plan and version, then id; the first `$6`. Same `$1..$3` as [`users_page`].
    pub(crate) fn users_by_price(prices: &str, descending: bool) -> String {
        let dir = if descending { "DESC" } else { "ASC" };
        format!(
            "SELECT u.id, CAST(COALESCE(d.price, 0) AS BIGINT) AS n
             FROM eco_users u
             LEFT JOIN {prices} ON d.plan = u.plan AND d.version = COALESCE(u.plan_version, 0)
             WHERE {USER_FILTERS} AND u.overrides IS NULL
               AND NOT EXISTS (SELECT 1 FROM eco_usage_records r
                               WHERE r.user_id = u.id AND r.period_start = $1
                                 AND r.api_calls >= $5)
             ORDER BY n {dir}, u.id {dir}
             LIMIT $6"
        )
    }

    /// Where the rows of a page sorted by calls come from: the users with a record this
    /// period (by calls) and the users without (0 calls, by id), in that order when
    /// descending and the other way round when ascending. `first_len` rows came from the
    /// first group's page at (`offset`, `limit`); `first_total`, the first group's size,
    /// is needed only when that page came back empty. Returns the offset and limit to
    /// read in the second group, if any.
    pub(crate) fn second_group(
        offset: u64,
        limit: u32,
        first_len: usize,
        first_total: Option<u64>,
    ) -> Option<(u64, u32)> {
        let got = u32::try_from(first_len).unwrap_or(u32::MAX);
        if got >= limit {
            return None;
        }
        // A partial page means the first group ended inside it.
        let skip = if got > 0 {
            0
        } else {
            offset.saturating_sub(first_total.unwrap_or(0))
        };
        Some((skip, limit - got))
    }

    /// `$1`, `$2`: today's bounds.
    pub(crate) const CALLS_BETWEEN: &str =
        "SELECT count(*) AS n FROM eco_api_usage WHERE created_at >= $1 AND created_at < $2";

    /// The period's calls, from the records' covering index alone. `$1` period start.
    pub(crate) const PERIOD_CALLS: &str = "
        SELECT CAST(COALESCE(SUM(api_calls), 0) AS BIGINT) AS n
        FROM eco_usage_records WHERE period_start = $1";

    /// Cents of the period's succeeded charges: of calls (`calls`) and of every other
    /// meter (`meters`). `$1` period start.
    pub(crate) const PERIOD_INVOICED_CENTS: &str = "
        SELECT CAST(COALESCE(SUM(CASE WHEN meter = 'api_calls' THEN amount_cents END), 0)
                    AS BIGINT) AS calls,
               CAST(COALESCE(SUM(CASE WHEN meter <> 'api_calls' THEN amount_cents END), 0)
                    AS BIGINT) AS meters
        FROM eco_overage_charges
        WHERE period_start = $1 AND status = 'succeeded'";

    /// The users with at least `$2` calls in the period starting `$1`, with what they hold:
    /// an index range on the records (period, calls).
    pub(crate) const HEAVY_USERS: &str = "
        SELECT u.id, u.plan, u.plan_version, u.overrides,
               CAST(r.api_calls AS BIGINT) AS api_calls
        FROM eco_usage_records r JOIN eco_users u ON u.id = r.user_id
        WHERE r.period_start = $1 AND r.api_calls >= $2";

    /// A LIKE pattern matching `text` literally anywhere, lower-cased; '' for none.
    pub(crate) fn contains_pattern(text: Option<&str>) -> String {
        match text.map(str::trim).filter(|t| !t.is_empty()) {
            None => String::new(),
            Some(t) => {
                let escaped = t
                    .to_lowercase()
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_");
                format!("%{escaped}%")
            }
        }
    }
}

/// `count(*)` of a query.
#[derive(diesel::QueryableByName)]
pub(crate) struct CountRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub n: i64,
}

/// The answer of a quota lease statement.
#[derive(diesel::QueryableByName)]
pub(crate) struct QuotaTakeRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub taken: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub n: i64,
}

impl QuotaTakeRow {
    pub(crate) fn into_domain(self) -> usage_core::repo::QuotaTake {
        usage_core::repo::QuotaTake {
            taken: to_u64(self.taken),
            count: to_u64(self.n),
        }
    }
}

/// The lease terms as bound to the lease statements: (max, cap, share, need), with no cap
/// as `i64::MAX` (the statements compute the same as [`usage_core::repo::lease_size`]).
pub(crate) fn lease_binds(lease: usage_core::repo::LeaseTerms) -> (i64, i64, i64, i64) {
    (
        to_i64(lease.max),
        lease.cap.map_or(i64::MAX, to_i64),
        to_i64(lease.share.max(1)),
        to_i64(lease.need.max(1)),
    )
}

/// A stored event's columns as both backends read them (`event_id` as each stores it).
pub(crate) type EventTuple<Id, At> = (
    Id,
    String,
    String,
    String,
    String,
    i32,
    i32,
    At,
    Option<String>,
);

/// An event from its stored columns; `event_id` and `created_at` already parsed.
pub(crate) fn event_from_columns(
    event_id: uuid::Uuid,
    (user_id, api_key_id, endpoint, method): (String, String, String, String),
    (status_code, response_time_ms): (i32, i32),
    created_at: time::OffsetDateTime,
    units: Option<&str>,
) -> usage_core::UsageEvent {
    usage_core::UsageEvent {
        event_id,
        user_id: usage_core::UserId::from_stored(user_id),
        api_key_id: usage_core::ApiKeyId::from_stored(api_key_id),
        endpoint,
        method,
        status_code: u16::try_from(status_code).unwrap_or(0),
        response_time_ms: u32::try_from(response_time_ms).unwrap_or(0),
        created_at,
        // The store wrote them: unreadable units cannot occur, and read as none.
        units: usage_core::event::Units::from_stored(units).unwrap_or_default(),
    }
}

/// Which of a pruned day's late calls may be folded into its aggregate (and removed): those
/// of users whose period (`$5` / `?5`, the period's start) has no overage left to invoice.
/// The others stay raw until it is invoiced: billing disputes need them.
pub(crate) fn foldable(param: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM eco_usage_records r
                     WHERE r.user_id = eco_api_usage.user_id AND r.period_start = {param}
                       AND r.overage_calls > r.overage_invoiced_calls)"
    )
}

/// How a day's late calls are added to a row already in `eco_usage_daily` (a day whose raw
/// events retention removed): counts and sums add up; the top endpoints stay as they were.
pub(crate) const FOLD_INTO_DAILY: &str = "\
ON CONFLICT (user_id, date) DO UPDATE SET
    api_calls = eco_usage_daily.api_calls + excluded.api_calls,
    error_calls = eco_usage_daily.error_calls + excluded.error_calls,
    total_response_time_ms = eco_usage_daily.total_response_time_ms
                             + excluded.total_response_time_ms,
    avg_response_time_ms = CAST(eco_usage_daily.total_response_time_ms
                                + excluded.total_response_time_ms AS DOUBLE PRECISION)
                           / (eco_usage_daily.api_calls + excluded.api_calls),
    updated_at = excluded.updated_at";

/// Keeps an ended day's calls over all users with the day (`$1`), after its aggregation.
pub(crate) const DAY_TOTALS: &str = "
    UPDATE eco_usage_days SET
        api_calls = (SELECT CAST(COALESCE(sum(api_calls), 0) AS BIGINT)
                     FROM eco_usage_daily WHERE date = $1),
        error_calls = (SELECT CAST(COALESCE(sum(error_calls), 0) AS BIGINT)
                       FROM eco_usage_daily WHERE date = $1)
    WHERE date = $1";

/// Aggregated days' totals from `$1` to `$2`.
pub(crate) const DAILY_TOTALS: &str = "
    SELECT date, api_calls, error_calls FROM eco_usage_days
    WHERE date >= $1 AND date <= $2 AND api_calls IS NOT NULL ORDER BY date";

/// Dashboard sessions and sign-in links. Times compare correctly on both backends:
/// `timestamptz` on PostgreSQL, fixed-width UTC text on SQLite.
pub(crate) mod session_sql {
    use diesel::QueryableByName;
    use diesel::sql_types::Text;

    /// The user a session or link belongs to.
    #[derive(QueryableByName)]
    pub(crate) struct UserIdRow {
        #[diesel(sql_type = Text)]
        pub(crate) user_id: String,
    }

    /// `$1` hash, `$2` user, `$3` created, `$4` expires.
    pub(crate) const INSERT_LINK: &str = "
        INSERT INTO eco_login_links (token_hash, user_id, created_at, expires_at)
        VALUES ($1, $2, $3, $4)";
    /// `$1` hash, `$2` now: one statement, so that of two uses at once one wins.
    pub(crate) const CONSUME_LINK: &str = "
        UPDATE eco_login_links SET used_at = $2
        WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2
        RETURNING user_id";
    /// `$1` hash, `$2` user, `$3` created, `$4` expires.
    pub(crate) const INSERT_SESSION: &str = "
        INSERT INTO eco_dashboard_sessions (token_hash, user_id, created_at, expires_at)
        VALUES ($1, $2, $3, $4)";
    /// `$1` hash, `$2` now.
    pub(crate) const SESSION_USER: &str = "
        SELECT user_id FROM eco_dashboard_sessions WHERE token_hash = $1 AND expires_at > $2";
    /// `$1` hash.
    pub(crate) const DELETE_SESSION: &str =
        "DELETE FROM eco_dashboard_sessions WHERE token_hash = $1";
    /// `$1` now.
    pub(crate) const PRUNE_SESSIONS: &str =
        "DELETE FROM eco_dashboard_sessions WHERE expires_at <= $1";
    /// `$1` now.
    pub(crate) const PRUNE_LINKS: &str =
        "DELETE FROM eco_login_links WHERE expires_at <= $1 OR used_at IS NOT NULL";
}

/// Deletions read from `eco_deleted_keys` (sequence, key id), in sequence order, as the
/// repository reports them.
pub(crate) fn deleted_keys(rows: Vec<(i64, String)>, after: i64) -> usage_core::repo::DeletedKeys {
    usage_core::repo::DeletedKeys {
        through: rows.last().map_or(after, |(seq, _)| *seq),
        keys: rows
            .into_iter()
            .map(|(_, id)| usage_core::ApiKeyId::from_stored(id))
            .collect(),
    }
}

/// Counters of a period and meter below the usage stored for their user (`$1`: the
/// period's start, `$2`: the meter; both backends number them so): calls for `api_calls`,
/// the meter's quantity for the others.
pub(crate) const COUNTERS_BELOW_STORED: &str = "\
SELECT s.user_id, s.n FROM (
    SELECT user_id, api_calls AS n FROM eco_usage_records
    WHERE period_start = $1 AND $2 = 'api_calls'
    UNION ALL
    SELECT user_id, quantity AS n FROM eco_meter_usage
    WHERE period_start = $1 AND meter = $2
) s
JOIN eco_quota_counters q ON q.user_id = s.user_id AND q.period_start = $1 AND q.meter = $2
WHERE q.admitted < s.n";

/// A user and a count read by [`COUNTERS_BELOW_STORED`].
#[derive(diesel::QueryableByName)]
pub(crate) struct StoredCallsRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    user_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

impl StoredCallsRow {
    pub(crate) fn into_pair(self) -> (usage_core::UserId, u64) {
        (
            usage_core::UserId::from_stored(self.user_id),
            to_u64(self.n),
        )
    }
}

/// Floors as one column of user ids and one of counts, in user order (one lock order).
pub(crate) fn floor_columns(floors: &[(usage_core::UserId, u64)]) -> (Vec<String>, Vec<i64>) {
    let mut sorted: Vec<&(usage_core::UserId, u64)> = floors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
        .into_iter()
        .map(|(user, floor)| (user.to_string(), to_i64(*floor)))
        .unzip()
}

/// Meter quantities to merge into a per-user table (`eco_meter_usage` by period,
/// `eco_meter_daily` by day), one vector per column: bound as arrays on PostgreSQL, as
/// one JSON array on SQLite (no row of JSON objects to build or parse).
pub(crate) struct MeterRows<'a, K> {
    pub users: Vec<&'a str>,
    pub meters: Vec<&'a str>,
    pub keys: Vec<K>,
    pub quantities: Vec<i64>,
}

impl<'a, K> MeterRows<'a, K> {
    pub(crate) const fn new() -> Self {
        Self {
            users: Vec::new(),
            meters: Vec::new(),
            keys: Vec::new(),
            quantities: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, user: &'a str, meter: &'a str, key: K, quantity: i64) {
        self.users.push(user);
        self.meters.push(meter);
        self.keys.push(key);
        self.quantities.push(quantity);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// The key of a [`MeterRows`] after user and meter: a period's start or a UTC day.
pub(crate) trait MeterKey: Copy {
    /// Its column.
    const COLUMN: &'static str;
    /// The keys, typed for binding.
    fn keys(keys: &[Self]) -> MeterKeys<'_>;
    /// As SQLite stores it.
    fn text(self) -> String;
}

/// [`MeterKey`]s by type.
pub(crate) enum MeterKeys<'a> {
    Periods(&'a [OffsetDateTime]),
    Days(&'a [time::Date]),
}

impl MeterKey for OffsetDateTime {
    const COLUMN: &'static str = "period_start";
    fn keys(keys: &[Self]) -> MeterKeys<'_> {
        MeterKeys::Periods(keys)
    }
    fn text(self) -> String {
        crate::types::utc_text(self)
    }
}

impl MeterKey for time::Date {
    const COLUMN: &'static str = "date";
    fn keys(keys: &[Self]) -> MeterKeys<'_> {
        MeterKeys::Days(keys)
    }
    fn text(self) -> String {
        self.to_string()
    }
}

/// One quantity reported to a meter: a unit a stored call took, an event, or a value a
/// unique_count meter sees for the first time in its period.
pub(crate) struct MeterReport<'a> {
    pub user_id: &'a str,
    pub meter: &'a str,
    pub at: OffsetDateTime,
    pub quantity: u64,
}

/// Reports added up three ways at once (the store picks the meter's): how many, their
/// sum and their largest, each saturating at the largest BIGINT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub reports: i64,
    pub total: i64,
    pub most: i64,
}

impl Tally {
    fn add(&mut self, quantity: u64) {
        let quantity = to_i64(quantity);
        self.reports = self.reports.saturating_add(1);
        self.total = self.total.saturating_add(quantity);
        self.most = self.most.max(quantity);
    }
}

/// Reports by (user, meter, period start) and by (user, meter, UTC day), sorted: one
/// row per counter, locked in one order by every writer.
#[allow(clippy::type_complexity)]
pub(crate) fn tally_reports<'a>(
    reports: &[MeterReport<'a>],
) -> (
    BTreeMap<(&'a str, &'a str, OffsetDateTime), Tally>,
    BTreeMap<(&'a str, &'a str, time::Date), Tally>,
) {
    // Keys borrow the reports' text: a batch of thousands of calls with units allocated
    // four strings a call here before.
    let mut periods: BTreeMap<(&str, &str, OffsetDateTime), Tally> = BTreeMap::new();
    let mut days: BTreeMap<(&str, &str, time::Date), Tally> = BTreeMap::new();
    for r in reports {
        let utc = r.at.checked_to_offset(time::UtcOffset::UTC).unwrap_or(r.at);
        periods
            .entry((r.user_id, r.meter, BillingPeriod::containing(utc).start()))
            .or_default()
            .add(r.quantity);
        days.entry((r.user_id, r.meter, utc.date()))
            .or_default()
            .add(r.quantity);
    }
    (periods, days)
}
