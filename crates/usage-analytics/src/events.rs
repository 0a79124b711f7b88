//! A customer's recorded calls and the events other services sent for them, one by one:
//! `GET /api/usage/events` (keyset pages, newest first, both kinds in one order) and the
//! export (`usage-server export`), both constant in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use usage_core::clock::caller_instant;
use usage_core::repo::{
    EventsAfter, MeterEvent, MeterUsageRepository, UsageRepository, UserRepository,
};
use usage_core::{ApiKeyId, BillingPeriod, Clock, Store, UsageEvent, UserId};
use uuid::Uuid;

use crate::AnalyticsError;

/// Largest page of `GET /api/usage/events`.
pub const MAX_EVENTS_PAGE: u32 = 1_000;
/// Page size when `limit` is not given.
pub const DEFAULT_EVENTS_PAGE: u32 = 100;
/// Rows read per query by the export.
pub const EXPORT_PAGE: u32 = 5_000;

/// One item of the list: a recorded call, or an event another service sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum EventItem {
    /// A metered call.
    Call(CallItem),
    /// An event of `POST /api/events`.
    Event(IngestedItem),
}

/// An event other services sent, as the API and the export show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IngestedItem {
    /// Its sender's id (CloudEvents `id`).
    pub event_id: String,
    /// Its sender (CloudEvents `source`).
    pub source: String,
    /// The meter (CloudEvents `type`).
    pub meter: String,
    /// The quantity reported (1 for a unique_count meter's value).
    pub quantity: u64,
    /// The value a unique_count meter counts; absent for other meters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Its time (CloudEvents `time`).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<MeterEvent> for IngestedItem {
    fn from(e: MeterEvent) -> Self {
        Self {
            event_id: e.event_id,
            source: e.source,
            meter: e.meter,
            quantity: e.quantity,
            value: e.value,
            created_at: e.created_at,
        }
    }
}

/// One recorded call, as the API and the export show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallItem {
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
    /// What it took of meters other than `api_calls` (its route's costs, what its
    /// handler reported), by meter; empty for most calls.
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, u64>))]
    pub units: BTreeMap<String, u64>,
}

impl From<UsageEvent> for CallItem {
    fn from(e: UsageEvent) -> Self {
        Self {
            units: e.units.iter().map(|(m, q)| (m.to_string(), q)).collect(),
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
    /// The CSV header of [`Self::csv_row`]: a call's columns first (as before events
    /// were listed too), then the kind, a call's units (`tokens=1234;credits=10`) and an
    /// event's source, meter and quantity.
    pub const CSV_HEADER: &'static str = "event_id,key_id,endpoint,method,status_code,\
        response_time_ms,created_at,kind,units,source,meter,quantity";

    /// When it happened.
    pub fn created_at(&self) -> OffsetDateTime {
        match self {
            EventItem::Call(c) => c.created_at,
            EventItem::Event(e) => e.created_at,
        }
    }

    /// One CSV line (RFC 4180 quoting), without the line end; columns that do not apply
    /// to the kind are empty.
    pub fn csv_row(&self) -> String {
        match self {
            EventItem::Call(c) => {
                let units: Vec<String> = c.units.iter().map(|(m, q)| format!("{m}={q}")).collect();
                format!(
                    "{},{},{},{},{},{},{},call,{},,,",
                    c.event_id,
                    csv_field(c.key_id.as_str()),
                    csv_field(&c.endpoint),
                    csv_field(&c.method),
                    c.status_code,
                    c.response_time_ms,
                    rfc3339(c.created_at),
                    units.join(";")
                )
            }
            EventItem::Event(e) => format!(
                "{},,,,,,{},event,,{},{},{}",
                csv_field(&e.event_id),
                rfc3339(e.created_at),
                csv_field(&e.source),
                csv_field(&e.meter),
                e.quantity
            ),
        }
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
    /// The last item of the previous page.
    pub after: Option<After>,
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

/// Where a page starts: after this item of the order (newest first; at one instant,
/// calls before events, each kind by id descending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// After this call.
    Call(OffsetDateTime, Uuid),
    /// After this event (time, source, id).
    Event(OffsetDateTime, String, String),
}

/// The opaque cursor of the page after `item`: `<nanos>.<call id>` for a call (as before
/// events were listed), `<nanos>.e-<hex source>-<hex id>` for an event.
fn cursor(item: &EventItem) -> String {
    match item {
        EventItem::Call(c) => format!(
            "{}.{}",
            c.created_at.unix_timestamp_nanos(),
            c.event_id.simple()
        ),
        EventItem::Event(e) => format!(
            "{}.e-{}-{}",
            e.created_at.unix_timestamp_nanos(),
            hex(&e.source),
            hex(&e.event_id)
        ),
    }
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn parse_cursor(raw: &str) -> Result<After, AnalyticsError> {
    let parsed = raw.split_once('.').and_then(|(nanos, rest)| {
        let at = OffsetDateTime::from_unix_timestamp_nanos(nanos.parse().ok()?).ok()?;
        let at = caller_instant(at)?;
        match rest.strip_prefix("e-") {
            Some(event) => {
                let (source, id) = event.split_once('-')?;
                Some(After::Event(at, unhex(source)?, unhex(id)?))
            }
            None => Some(After::Call(at, Uuid::try_parse(rest).ok()?)),
        }
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

/// A user's recorded calls and events over a [`Store`].
#[derive(Clone)]
pub struct UsageEvents {
    users: Arc<dyn UserRepository>,
    usage: Arc<dyn UsageRepository>,
    meters: Arc<dyn MeterUsageRepository>,
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
            usage: store.clone(),
            meters: store,
            clock,
        }
    }

    /// The clock's now, for [`parse_event_query`].
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// One page of `user_id`'s calls and events.
    pub async fn page(
        &self,
        user_id: &UserId,
        query: &EventQuery,
    ) -> Result<EventsPage, AnalyticsError> {
        if self.users.user_by_id(user_id).await?.is_none() {
            return Err(AnalyticsError::UnknownUser(user_id.clone()));
        }
        let (items, more) = self
            .items(
                user_id,
                (query.from, query.to),
                query.after.clone(),
                query.limit,
            )
            .await?;
        let next_cursor = if more { items.last().map(cursor) } else { None };
        Ok(EventsPage { items, next_cursor })
    }

    /// The `limit` items after `after` with `from <= created_at < to`, and whether more
    /// follow: a page of each kind (one more than asked), merged in the list's order.
    async fn items(
        &self,
        user_id: &UserId,
        (from, to): (OffsetDateTime, OffsetDateTime),
        after: Option<After>,
        limit: u32,
    ) -> Result<(Vec<EventItem>, bool), AnalyticsError> {
        // At one instant calls come first: after an event, the calls of its instant were
        // shown; after a call, the events of its instant were not.
        let (calls_after, events_after) = match after {
            None => (None, None),
            Some(After::Call(at, id)) => (Some((at, id)), Some(EventsAfter::Through(at))),
            Some(After::Event(at, source, id)) => (
                Some((at, Uuid::nil())),
                Some(EventsAfter::Event(at, source, id)),
            ),
        };
        let calls = self
            .usage
            .usage_events_page(user_id, from, to, calls_after, limit + 1)
            .await?;
        let events = self
            .meters
            .meter_events_page(user_id, from, to, events_after, limit + 1)
            .await?;
        let mut items: Vec<EventItem> = calls
            .into_iter()
            .map(|c| EventItem::Call(c.into()))
            .chain(events.into_iter().map(|e| EventItem::Event(e.into())))
            .collect();
        items.sort_by_key(|item| std::cmp::Reverse(order(item)));
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        Ok((items, more))
    }

    /// Every call and event of `user_id` with `from <= created_at < to`, newest first,
    /// handed to `sink` one page at a time (memory stays at one page whatever the count).
    /// Stops at the first error of `sink`. Returns how many items were handed over.
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
            let (items, more) = self.items(user_id, (from, to), after, EXPORT_PAGE).await?;
            after = items.last().map(|last| match last {
                EventItem::Call(c) => After::Call(c.created_at, c.event_id),
                EventItem::Event(e) => {
                    After::Event(e.created_at, e.source.clone(), e.event_id.clone())
                }
            });
            total += items.len() as u64;
            if let Err(e) = sink(&items) {
                return Ok(Err(e));
            }
            if !more {
                return Ok(Ok(total));
            }
        }
    }
}

/// An item's place in the list, ascending (the list is this order reversed): by time;
/// at one instant events before calls (so that calls come first, newest first); then by
/// id.
fn order(item: &EventItem) -> (OffsetDateTime, u8, String, String) {
    match item {
        EventItem::Call(c) => (
            c.created_at,
            1,
            c.event_id.simple().to_string(),
            String::new(),
        ),
        EventItem::Event(e) => (e.created_at, 0, e.source.clone(), e.event_id.clone()),
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
        let mut call = CallItem {
            event_id: Uuid::from_u128(42),
            key_id: ApiKeyId::from_stored("eco_key_a".to_owned()),
            endpoint: "/api/v1/a,\"b\"".to_owned(),
            method: "GET".to_owned(),
            status_code: 200,
            response_time_ms: 3,
            created_at: datetime!(2026-12-01 10:00:00.123456 UTC),
            units: BTreeMap::new(),
        };
        let item = EventItem::Call(call.clone());
        assert_eq!(
            parse_cursor(&cursor(&item)).unwrap(),
            After::Call(call.created_at, call.event_id)
        );
        assert_eq!(
            item.csv_row(),
            "00000000-0000-0000-0000-00000000002a,eco_key_a,\"/api/v1/a,\"\"b\"\"\",GET,200,3,\
             2026-12-01T10:00:00.123456Z,call,,,,"
        );
        call.units = BTreeMap::from([("credits".to_owned(), 10), ("tokens".to_owned(), 1_234)]);
        assert!(
            EventItem::Call(call)
                .csv_row()
                .ends_with(",call,credits=10;tokens=1234,,,")
        );
        let event = EventItem::Event(IngestedItem {
            event_id: "req-1.2-3".to_owned(),
            source: "inference api, eu".to_owned(),
            meter: "tokens".to_owned(),
            quantity: 7,
            value: None,
            created_at: datetime!(2026-12-01 10:00 UTC),
        });
        assert_eq!(
            parse_cursor(&cursor(&event)).unwrap(),
            After::Event(
                datetime!(2026-12-01 10:00 UTC),
                "inference api, eu".to_owned(),
                "req-1.2-3".to_owned()
            )
        );
        assert_eq!(
            event.csv_row(),
            "req-1.2-3,,,,,,2026-12-01T10:00:00Z,event,,\"inference api, eu\",tokens,7"
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "event");
        assert!(json.get("value").is_none());
        for bad in ["1.e-zz-00", "1.e-6162", "1.e-6-62"] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }
}
