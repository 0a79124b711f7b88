//! The monthly partitions of `eco_api_usage` (migration `..._usage_partitions`): listed
//! from the catalog, created ahead, and dropped whole by retention. The legacy partition
//! (the table as it was before partitioning) and the DEFAULT partition are pruned row by
//! row, in bounded batches.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use usage_core::BillingPeriod;
use usage_core::repo::UsagePrune;

/// Rows deleted per statement from the legacy and default partitions.
const DELETE_BATCH: i64 = 10_000;

/// How long creating or dropping a partition waits for the table's lock before giving up
/// (the next run retries): it must not queue every writer behind a long query.
const LOCK_TIMEOUT: &str = "5s";

/// One partition of `eco_api_usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Partition {
    pub name: String,
    /// Lower bound; `None` for MINVALUE (the legacy partition) and the default one.
    pub from: Option<OffsetDateTime>,
    /// Upper bound (exclusive); `None` for the default partition.
    pub to: Option<OffsetDateTime>,
    pub is_default: bool,
}

impl Partition {
    /// A partition of one month, created by [`ensure`]: dropped whole by retention.
    fn is_monthly(&self) -> bool {
        self.from.is_some() && self.to.is_some()
    }

    fn overlaps(&self, from: OffsetDateTime, to: OffsetDateTime) -> bool {
        !self.is_default && self.from.is_none_or(|f| f < to) && self.to.is_none_or(|t| t > from)
    }
}

#[derive(QueryableByName)]
struct PartitionRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Bool)]
    is_default: bool,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    lower: Option<OffsetDateTime>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    upper: Option<OffsetDateTime>,
}

/// The partitions with their bounds, read from the catalog. The bound expression reads
/// `FOR VALUES FROM (<lower>) TO (<upper>)`, each a quoted timestamp or MINVALUE/MAXVALUE;
/// PostgreSQL itself casts the quoted ones back.
const LIST_PARTITIONS: &str = "\
SELECT c.relname::text AS name,
       pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
       CASE WHEN b.lower LIKE '''%' THEN trim(both '''' from b.lower)::timestamptz END AS lower,
       CASE WHEN b.upper LIKE '''%' THEN trim(both '''' from b.upper)::timestamptz END AS upper
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT substring(pg_get_expr(c.relpartbound, c.oid) from 'FROM \\((.*)\\) TO') AS lower,
           substring(pg_get_expr(c.relpartbound, c.oid) from 'TO \\((.*)\\)$') AS upper
) b
WHERE i.inhparent = 'eco_api_usage'::regclass
ORDER BY lower NULLS FIRST, c.relname";

pub(crate) async fn list(
    conn: &mut AsyncPgConnection,
) -> Result<Vec<Partition>, diesel::result::Error> {
    let rows: Vec<PartitionRow> = diesel::sql_query(LIST_PARTITIONS).load(conn).await?;
    Ok(rows
        .into_iter()
        .map(|r| Partition {
            name: r.name,
            from: r.lower,
            to: r.upper,
            is_default: r.is_default,
        })
        .collect())
}

const LITERAL: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second]+00");

/// A timestamp as an SQL literal (UTC); only ever month starts computed here.
fn literal(t: OffsetDateTime) -> String {
    t.checked_to_offset(time::UtcOffset::UTC)
        .unwrap_or(t)
        .format(LITERAL)
        .unwrap_or_else(|_| "1970-01-01 00:00:00+00".to_owned())
}

/// `eco_api_usage_pYYYY_MM`.
fn monthly_name(month: BillingPeriod) -> String {
    let start = month.start();
    format!(
        "eco_api_usage_p{:04}_{:02}",
        start.year(),
        u8::from(start.month())
    )
}

/// Creates the partitions of the month of `now` and the `months_ahead` after it that no
/// partition covers yet (months inside the legacy partition are skipped); returns the
/// names created. Fails if the DEFAULT partition already holds calls of such a month
/// (they stay there, still counted and read).
pub(crate) async fn ensure(
    conn: &mut AsyncPgConnection,
    now: OffsetDateTime,
    months_ahead: u32,
) -> Result<Vec<String>, diesel::result::Error> {
    let existing = list(conn).await?;
    let mut month = BillingPeriod::containing(now);
    let mut created = Vec::new();
    for _ in 0..=months_ahead {
        if !existing
            .iter()
            .any(|p| p.overlaps(month.start(), month.end()))
        {
            let name = monthly_name(month);
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF eco_api_usage \
                 FOR VALUES FROM ('{}') TO ('{}')",
                literal(month.start()),
                literal(month.end())
            );
            // Creating a partition locks the table: never queue the writers behind a long
            // query for more than a moment (months are created ahead: the next run retries).
            conn.transaction(async |conn| {
                diesel::sql_query(format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                    .execute(conn)
                    .await?;
                diesel::sql_query(&create).execute(conn).await
            })
            .await?;
            created.push(name);
        }
        month = BillingPeriod::containing(month.end());
    }
    Ok(created)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count_before(
    conn: &mut AsyncPgConnection,
    partition: &str,
    before: Option<OffsetDateTime>,
) -> Result<u64, diesel::result::Error> {
    let count: Count = match before {
        Some(before) => {
            diesel::sql_query(format!(
                "SELECT count(*) AS n FROM {partition} WHERE created_at < $1"
            ))
            .bind::<Timestamptz, _>(before)
            .get_result(conn)
            .await?
        }
        None => {
            diesel::sql_query(format!("SELECT count(*) AS n FROM {partition}"))
                .get_result(conn)
                .await?
        }
    };
    Ok(u64::try_from(count.n).unwrap_or(0))
}

/// Removes the calls before a bound: `before`, or the start of the monthly partition that
/// `before` falls in (that month is kept whole until all of it has expired). Partitions
/// wholly before the bound are dropped (monthly ones, and the legacy one once all of it has
/// expired); rows before it in the legacy and default partitions are deleted in batches.
/// The caller records the bound as retention's once this returns.
pub(crate) async fn prune(
    conn: &mut AsyncPgConnection,
    before: OffsetDateTime,
    dry_run: bool,
) -> Result<UsagePrune, diesel::result::Error> {
    let partitions = list(conn).await?;
    let bound = partitions
        .iter()
        .filter(|p| p.is_monthly())
        .filter_map(|p| {
            p.from
                .filter(|from| *from < before && p.to.is_some_and(|to| to > before))
        })
        .fold(before, OffsetDateTime::min);
    let mut outcome = UsagePrune {
        meter_events: 0,
        before: bound,
        rows: 0,
        partitions: Vec::new(),
    };
    for partition in partitions {
        let name = &partition.name;
        if !partition.is_default && partition.to.is_some_and(|to| to <= bound) {
            outcome.rows += count_before(conn, name, None).await?;
            if !dry_run {
                conn.transaction(async |conn| {
                    diesel::sql_query(format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                        .execute(conn)
                        .await?;
                    diesel::sql_query(format!("DROP TABLE {name}"))
                        .execute(conn)
                        .await
                })
                .await?;
            }
            outcome.partitions.push(name.clone());
        } else if !partition.is_monthly() && partition.from.is_none_or(|from| from < bound) {
            if dry_run {
                outcome.rows += count_before(conn, name, Some(bound)).await?;
                continue;
            }
            loop {
                let deleted = diesel::sql_query(format!(
                    "DELETE FROM {name} WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM {name} WHERE created_at < $1 LIMIT $2))"
                ))
                .bind::<Timestamptz, _>(bound)
                .bind::<BigInt, _>(DELETE_BATCH)
                .execute(conn)
                .await?;
                outcome.rows += deleted as u64;
                if (deleted as i64) < DELETE_BATCH {
                    break;
                }
            }
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn months_are_named_and_written_in_utc() {
        let month = BillingPeriod::containing(datetime!(2026-12-15 10:00 +02:00));
        assert_eq!(monthly_name(month), "eco_api_usage_p2026_12");
        assert_eq!(literal(month.end()), "2027-01-01 00:00:00+00");
    }

    #[test]
    fn overlap_ignores_the_default_partition() {
        let dec = BillingPeriod::containing(datetime!(2026-12-15 10:00 UTC));
        let legacy = Partition {
            name: "legacy".into(),
            from: None,
            to: Some(dec.end()),
            is_default: false,
        };
        assert!(legacy.overlaps(dec.start(), dec.end()));
        assert!(!legacy.overlaps(dec.end(), dec.end() + time::Duration::days(31)));
        let default = Partition {
            name: "default".into(),
            from: None,
            to: None,
            is_default: true,
        };
        assert!(!default.overlaps(dec.start(), dec.end()));
        assert!(!legacy.is_monthly() && !default.is_monthly());
    }
}
