//! The column types whose storage differs between the backends, each one Rust type on
//! both, so that one schema and one set of row structs serve PostgreSQL and SQLite.
//!
//! | SQL type | Rust type | PostgreSQL | SQLite |
//! |---|---|---|---|
//! | [`Stamp`] | `OffsetDateTime` | `timestamptz` | TEXT, fixed-width UTC (`2026-12-07T10:00:00.000000Z`), so text order is time order |
//! | [`EventId`] | `Uuid` | `uuid` | TEXT, hyphenated lower case (text order is byte order) |
//! | [`JsonText`] | `String` | `jsonb` | TEXT |
//!
//! Dates are diesel's `Date` on both (SQLite stores `YYYY-MM-DD`, diesel's own format).

use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::SqlType;
use diesel::sqlite::Sqlite;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};
use uuid::Uuid;

/// A point in time (`timestamptz` on PostgreSQL, UTC text on SQLite).
#[derive(Debug, Clone, Copy, Default, diesel::query_builder::QueryId, SqlType)]
#[diesel(postgres_type(oid = 1184, array_oid = 1185))]
#[diesel(sqlite_type(name = "Text"))]
pub struct Stamp;

/// An event id (`uuid` on PostgreSQL, text on SQLite).
#[derive(Debug, Clone, Copy, Default, diesel::query_builder::QueryId, SqlType)]
#[diesel(postgres_type(oid = 2950, array_oid = 2951))]
#[diesel(sqlite_type(name = "Text"))]
pub struct EventId;

/// A JSON document read as its text (`jsonb` on PostgreSQL, text on SQLite).
#[derive(Debug, Clone, Copy, Default, diesel::query_builder::QueryId, SqlType)]
#[diesel(postgres_type(oid = 3802, array_oid = 3807))]
#[diesel(sqlite_type(name = "Text"))]
pub struct JsonText;

impl diesel::sql_types::SqlOrd for Stamp {}
impl diesel::sql_types::SqlOrd for EventId {}

const UTC_TEXT: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// A time as SQLite stores it: fixed width and UTC. A time whose UTC form leaves the
/// years 0000 to 9999 (callers' times are checked before they get here) is kept as given.
pub(crate) fn utc_text(t: OffsetDateTime) -> String {
    t.checked_to_offset(UtcOffset::UTC)
        .unwrap_or(t)
        .format(UTC_TEXT)
        .unwrap_or_else(|_| String::from("0000-00-00T00:00:00.000000Z"))
}

/// Reads [`utc_text`] back.
pub(crate) fn parse_utc_text(s: &str) -> Result<OffsetDateTime, time::error::Parse> {
    PrimitiveDateTime::parse(s, UTC_TEXT).map(PrimitiveDateTime::assume_utc)
}

impl ToSql<Stamp, Pg> for OffsetDateTime {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        ToSql::<diesel::sql_types::Timestamptz, Pg>::to_sql(self, out)
    }
}

impl FromSql<Stamp, Pg> for OffsetDateTime {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        FromSql::<diesel::sql_types::Timestamptz, Pg>::from_sql(value)
    }
}

impl ToSql<Stamp, Sqlite> for OffsetDateTime {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(utc_text(*self));
        Ok(IsNull::No)
    }
}

impl FromSql<Stamp, Sqlite> for OffsetDateTime {
    fn from_sql(
        value: <Sqlite as diesel::backend::Backend>::RawValue<'_>,
    ) -> deserialize::Result<Self> {
        let s = <String as FromSql<diesel::sql_types::Text, Sqlite>>::from_sql(value)?;
        parse_utc_text(&s).map_err(|e| format!("bad stored time {s:?}: {e}").into())
    }
}

impl ToSql<EventId, Pg> for Uuid {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        ToSql::<diesel::sql_types::Uuid, Pg>::to_sql(self, out)
    }
}

impl FromSql<EventId, Pg> for Uuid {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        FromSql::<diesel::sql_types::Uuid, Pg>::from_sql(value)
    }
}

impl ToSql<EventId, Sqlite> for Uuid {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.hyphenated().to_string());
        Ok(IsNull::No)
    }
}

impl FromSql<EventId, Sqlite> for Uuid {
    fn from_sql(
        value: <Sqlite as diesel::backend::Backend>::RawValue<'_>,
    ) -> deserialize::Result<Self> {
        let s = <String as FromSql<diesel::sql_types::Text, Sqlite>>::from_sql(value)?;
        Uuid::parse_str(&s).map_err(|e| format!("bad stored event id {s:?}: {e}").into())
    }
}

impl FromSql<JsonText, Pg> for String {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        // jsonb's binary form: a version byte (1), then the document as text.
        match value.as_bytes().split_first() {
            Some((1, text)) => Ok(std::str::from_utf8(text)?.to_owned()),
            _ => Err("unsupported jsonb version".into()),
        }
    }
}

impl FromSql<JsonText, Sqlite> for String {
    fn from_sql(
        value: <Sqlite as diesel::backend::Backend>::RawValue<'_>,
    ) -> deserialize::Result<Self> {
        FromSql::<diesel::sql_types::Text, Sqlite>::from_sql(value)
    }
}

impl ToSql<JsonText, Pg> for str {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        use std::io::Write;
        // jsonb's binary form: a version byte (1), then the document as text.
        out.write_all(&[1])?;
        out.write_all(self.as_bytes())?;
        Ok(IsNull::No)
    }
}

impl ToSql<JsonText, Sqlite> for str {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self);
        Ok(IsNull::No)
    }
}

/// A JSON document in a query built with diesel's DSL (see [`At`]).
#[derive(Debug, Clone, Copy, diesel::expression::AsExpression)]
#[diesel(sql_type = JsonText)]
pub(crate) struct Json<'a>(pub(crate) &'a str);

impl<DB: diesel::backend::Backend> ToSql<JsonText, DB> for Json<'_>
where
    str: ToSql<JsonText, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
        self.0.to_sql(out)
    }
}

/// A time in a query built with diesel's DSL (`column.eq(At(t))`). Coherence forbids
/// making `OffsetDateTime` itself an expression of [`Stamp`] (diesel could one day make it
/// an expression of its own); binds and rows use `OffsetDateTime` directly.
#[derive(Debug, Clone, Copy, diesel::expression::AsExpression)]
#[diesel(sql_type = Stamp)]
pub(crate) struct At(pub(crate) OffsetDateTime);

impl<DB: diesel::backend::Backend> ToSql<Stamp, DB> for At
where
    OffsetDateTime: ToSql<Stamp, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
        self.0.to_sql(out)
    }
}

/// An event id in a query built with diesel's DSL (see [`At`]).
#[derive(Debug, Clone, Copy, diesel::expression::AsExpression)]
#[diesel(sql_type = EventId)]
pub(crate) struct Id(pub(crate) Uuid);

impl<DB: diesel::backend::Backend> ToSql<EventId, DB> for Id
where
    Uuid: ToSql<EventId, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
        self.0.to_sql(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn utc_text_is_fixed_width_utc_and_reads_back() {
        let t = datetime!(2026-12-07 11:00:00.5 +01:00);
        assert_eq!(utc_text(t), "2026-12-07T10:00:00.500000Z");
        assert_eq!(parse_utc_text(&utc_text(t)).unwrap(), t);
        // Text order is time order, whatever the offset given.
        let earlier = datetime!(2026-12-07 10:59:59.999999 +01:00);
        assert!(utc_text(earlier) < utc_text(t));
    }
}
