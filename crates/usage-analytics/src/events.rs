//! A customer's recorded calls, one by one: `GET /api/usage/events` (keyset pages, newest
//! first) and the export (`usage-server export`), both constant in memory.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use usage_core::clock::caller_instant;
use usage_core::repo::{UsageRepository, UserRepository};
use usage_core::{ApiKeyId, BillingPeriod, Clock, Store, UsageEvent, UserId};
use uuid::Uuid;

use crate::AnalyticsError;

/// Largest page of `GET /api/usage/events`.
pub const MAX_EVENTS_PAGE: u32 = 1_000;
/// Page size when `limit` is not given.
pub const DEFAULT_EVENTS_PAGE: u32 = 100;
/// Rows read per query by the export.
pub const EXPORT_PAGE: u32 = 5_000;

/// One recorded call, as the API and the export show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventItem {
    /// Unique id of the call.
    pub event_id: Uuid,
    /// The key it came with.
    pub key_id: ApiKeyId,
    /// Route pattern.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Status answered.
    pub status_code: u16,
    /// Time to answer.
    pub response_time_ms: u32,
    /// When it arrived.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<UsageEvent> for EventItem {
    fn from(e: UsageEvent) -> Self {
        Self {
            event_id: e.event_id,
            key_id: e.api_key_id,
            endpoint: e.endpoint,
            method: e.method,
            status_code: e.status_code,
            response_time_ms: e.response_time_ms,
            created_at: e.created_at,
        }
    }
}

impl EventItem {
    /// The CSV header of [`Self::csv_row`].
    pub const CSV_HEADER: &'static str =
        "event_id,key_id,endpoint,method,status_code,response_time_ms,created_at";

    /// One CSV line (RFC 4180 quoting), without the line end.
    pub fn csv_row(&self) -> String {
        format!(
            "{},{},{},{},{},{},{}",
            self.event_id,
            csv_field(self.key_id.as_str()),
            csv_field(&self.endpoint),
            csv_field(&self.method),
            self.status_code,
            self.response_time_ms,
            rfc3339(self.created_at)
        )
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// A field quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `GET /api/usage/events`: one page and the cursor of the next (`None` at the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventsPage {
    /// The calls, newest first.
    pub items: Vec<EventItem>,
    /// Pass as `cursor` for the next page; null when this page is the last.
    pub next_cursor: Option<String>,
}

/// The parsed query of `GET /api/usage/events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventQuery {
    /// Inclusive lower bound.
    pub from: OffsetDateTime,
    /// Exclusive upper bound.
    pub to: OffsetDateTime,
    /// Page size.
    pub limit: u32,
    /// The last call of the previous page.
    pub after: Option<(OffsetDateTime, Uuid)>,
}

fn invalid(name: &'static str, message: String) -> AnalyticsError {
    AnalyticsError::InvalidParameter { name, message }
}

/// Parses an RFC 3339 time parameter into UTC, naming it in the error; a time outside
/// the years 0000 to 9999 once in UTC is refused ([`usage_core::clock::caller_instant`]).
pub fn parse_time(name: &'static str, raw: &str) -> Result<OffsetDateTime, AnalyticsError> {
    OffsetDateTime::parse(raw, &Rfc3339)
        .ok()
        .and_then(caller_instant)
        .ok_or_else(|| {
            invalid(
                name,
                format!(
                    "{name} must be an RFC 3339 time such as 2026-11-01T00:00:00Z, from \
                     0000-01-01T00:00:00Z to 9999-12-31T23:59:59Z (got {raw:?})"
                ),
            )
        })
}

/// The opaque cursor of the page after `event`.
fn cursor(event: &EventItem) -> String {
    format!(
        "{}.{}",
        event.created_at.unix_timestamp_nanos(),
        event.event_id.simple()
    )
}

fn parse_cursor(raw: &str) -> Result<(OffsetDateTime, Uuid), AnalyticsError> {
    let parsed = raw.split_once('.').and_then(|(nanos, id)| {
        let at = OffsetDateTime::from_unix_timestamp_nanos(nanos.parse().ok()?).ok()?;
        let at = caller_instant(at)?;
        Some((at, Uuid::try_parse(id).ok()?))
    });
    parsed.ok_or_else(|| {
        invalid(
            "cursor",
            "cursor is not valid: pass next_cursor exactly as a previous page returned it"
                .to_owned(),
        )
    })
}

/// Parses `from`, `to` (RFC 3339; defaults: the period's start and now; `from` before
/// `to`), `limit` (1 to [`MAX_EVENTS_PAGE`], default [`DEFAULT_EVENTS_PAGE`]) and `cursor`;
/// any other parameter is an error.
pub fn parse_event_query(
    params: &HashMap<String, String>,
    now: OffsetDateTime,
) -> Result<EventQuery, AnalyticsError> {
    if let Some(unknown) = params
        .keys()
        .find(|k| !["from", "to", "limit", "cursor"].contains(&k.as_str()))
    {
        return Err(invalid(
            "query",
            format!("unknown parameter {unknown:?}; allowed: from, to, limit, cursor"),
        ));
    }
    let from = match params.get("from") {
        Some(raw) => parse_time("from", raw)?,
        None => BillingPeriod::containing(now).start(),
    };
    let to = match params.get("to") {
        Some(raw) => parse_time("to", raw)?,
        None => now,
    };
    if from >= to {
        return Err(invalid(
            "from",
            format!(
                "from must be before to (from {}, to {})",
                rfc3339(from),
                rfc3339(to)
            ),
        ));
    }
    let limit = match params.get("limit") {
        None => DEFAULT_EVENTS_PAGE,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_EVENTS_PAGE).contains(l))
            .ok_or_else(|| {
                invalid(
                    "limit",
                    format!(
                        "limit must be a whole number from 1 to {MAX_EVENTS_PAGE} (got {raw:?})"
                    ),
                )
            })?,
    };
    let after = params.get("cursor").map(|c| parse_cursor(c)).transpose()?;
    Ok(EventQuery {
        from,
        to,
        limit,
        after,
    })
}

/// A user's recorded calls over a [`Store`].
#[derive(Clone)]
pub struct UsageEvents {
    users: Arc<dyn UserRepository>,
    usage: Arc<dyn UsageRepository>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for UsageEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageEvents").finish_non_exhaustive()
    }
}

impl UsageEvents {
    /// Events stored in `store`; `clock` gives the default `to`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self {
            users: store.clone(),
            usage: store,
            clock,
        }
    }

    /// The clock's now, for [`parse_event_query`].
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// One page of `user_id`'s calls.
    pub async fn page(
        &self,
        user_id: &UserId,
        query: &EventQuery,
    ) -> Result<EventsPage, AnalyticsError> {
        if self.users.user_by_id(user_id).await?.is_none() {
            return Err(AnalyticsError::UnknownUser(user_id.clone()));
        }
        // One more than asked: a full page says whether another follows.
        let mut events = self
            .usage
            .usage_events_page(user_id, query.from, query.to, query.after, query.limit + 1)
            .await?;
        let more = events.len() > query.limit as usize;
        events.truncate(query.limit as usize);
        let items: Vec<EventItem> = events.into_iter().map(EventItem::from).collect();
        let next_cursor = if more { items.last().map(cursor) } else { None };
        Ok(EventsPage { items, next_cursor })
    }

    /// Every call of `user_id` with `from <= created_at < to`, newest first, handed to
    /// `sink` one page at a time (memory stays at one page whatever the count). Stops at
    /// the first error of `sink`. Returns how many calls were handed over.
    pub async fn export<E>(
        &self,
        user_id: &UserId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        mut sink: impl FnMut(&[EventItem]) -> Result<(), E>,
    ) -> Result<Result<u64, E>, AnalyticsError> {
        if self.users.user_by_id(user_id).await?.is_none() {
            return Err(AnalyticsError::NoSuchUser(user_id.clone()));
        }
        let mut after = None;
        let mut total = 0;
        loop {
            let page = self
                .usage
                .usage_events_page(user_id, from, to, after, EXPORT_PAGE)
                .await?;
            let Some(last) = page.last() else {
                return Ok(Ok(total));
            };
            after = Some((last.created_at, last.event_id));
            let full = page.len() == EXPORT_PAGE as usize;
            let items: Vec<EventItem> = page.into_iter().map(EventItem::from).collect();
            total += items.len() as u64;
            if let Err(e) = sink(&items) {
                return Ok(Err(e));
            }
            if !full {
                return Ok(Ok(total));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-10 12:00 UTC);

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn queries_default_to_this_period_and_name_what_is_wrong() {
        let q = parse_event_query(&params(&[]), NOW).unwrap();
        assert_eq!(
            (q.from, q.to, q.limit, q.after),
            (datetime!(2026-12-01 00:00 UTC), NOW, 100, None)
        );
        let q = parse_event_query(
            &params(&[("from", "2026-11-01T00:00:00+01:00"), ("limit", "1000")]),
            NOW,
        )
        .unwrap();
        assert_eq!((q.from, q.limit), (datetime!(2026-10-31 23:00 UTC), 1000));
        let err = |pairs: &[(&str, &str)]| {
            parse_event_query(&params(pairs), NOW)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[("from", "yesterday")]).starts_with("from must be an RFC 3339"));
        assert!(err(&[("to", "2026-13-01T00:00:00Z")]).starts_with("to must be an RFC 3339"));
        assert!(err(&[("from", "2026-12-10T12:00:00Z")]).starts_with("from must be before to"));
        for bad in ["0", "1001", "-1", "ten", ""] {
            assert!(err(&[("limit", bad)]).starts_with("limit must be"), "{bad}");
        }
        for bad in ["", "x", "1.zz", "99999999999999999999999999.0", "."] {
            assert!(
                err(&[("cursor", bad)]).starts_with("cursor is not valid"),
                "{bad}"
            );
        }
        assert!(err(&[("sort", "asc")]).contains("unknown parameter \"sort\""));
    }

    #[test]
    fn cursors_and_csv_round_trip() {
        let item = EventItem {
            event_id: Uuid::from_u128(42),
            key_id: ApiKeyId::from_stored("eco_key_a".to_owned()),
            endpoint: "/api/v1/a,\"b\"".to_owned(),
            method: "GET".to_owned(),
            status_code: 200,
            response_time_ms: 3,
            created_at: datetime!(2026-12-01 10:00:00.123456 UTC),
        };
        let (at, id) = parse_cursor(&cursor(&item)).unwrap();
        assert_eq!((at, id), (item.created_at, item.event_id));
        assert_eq!(
            item.csv_row(),
            "00000000-0000-0000-0000-00000000002a,eco_key_a,\"/api/v1/a,\"\"b\"\"\",GET,200,3,\
             2026-12-01T10:00:00.123456Z"
        );
    }
}
