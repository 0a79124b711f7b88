//! Usage other services send (`POST /api/events`): a batch of CloudEvents 1.0 in
//! structured JSON, each checked on its own (one bad event does not stop the others),
//! its subject resolved to a user, and the good ones stored once per `(source, id)`, ever.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::meter::{API_CALLS, Aggregation, MAX_QUANTITY, Meters};
use crate::repo::{MeterEvent, MeterUsageRepository};
use crate::terms::LiveCatalog;
use crate::{ApiKeyId, Clock, RepoError, UserId};

/// Most events in one batch (more: 413 `too_many_events`).
pub const MAX_EVENTS: usize = 1_000;

/// Largest body of a batch, in bytes.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// How far back an event's `time` may be by default (`LATE_EVENT_DAYS`).
pub const LATE_EVENT_DAYS: u32 = 35;

/// How far ahead of the server's clock an event's `time` may be (clocks drift).
pub const MAX_AHEAD: time::Duration = time::Duration::minutes(5);

/// Longest `id`, `source` or `data.value`, in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

/// Whether `text` may be an `id`, a `source` or a `data.value`: 1 to [`MAX_TEXT_BYTES`]
/// bytes without control characters (a NUL could not even be stored).
fn fits(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_TEXT_BYTES && !text.chars().any(char::is_control)
}

/// Why one event of a batch was refused; the code is the answer's `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventProblem {
    /// A field missing or of the wrong type.
    InvalidEvent,
    /// `type` names no meter that takes events.
    UnknownMeter,
    /// `subject` names no user or API key.
    UnknownSubject,
    /// `data.quantity` is not an integer from 0 to 2^53.
    InvalidQuantity,
    /// `time` is too far back (`LATE_EVENT_DAYS`) or ahead (5 minutes).
    TimeOutOfRange,
}

impl EventProblem {
    /// The code the answer gives.
    pub fn code(self) -> &'static str {
        match self {
            EventProblem::InvalidEvent => "invalid_event",
            EventProblem::UnknownMeter => "unknown_meter",
            EventProblem::UnknownSubject => "unknown_subject",
            EventProblem::InvalidQuantity => "invalid_quantity",
            EventProblem::TimeOutOfRange => "time_out_of_range",
        }
    }
}

/// One refused event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rejected {
    /// Its position in the batch, from 0.
    pub index: usize,
    /// `invalid_event`, `unknown_meter`, `unknown_subject`, `invalid_quantity` or
    /// `time_out_of_range`.
    pub error: &'static str,
    /// What is wrong, naming the field.
    pub message: String,
}

/// What a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IngestAnswer {
    /// Events stored now.
    pub accepted: u64,
    /// Events whose `(source, id)` was stored before (or earlier in the batch): not
    /// stored again.
    pub duplicates: u64,
    /// Events refused, each with why.
    pub rejected: Vec<Rejected>,
}

/// Why a whole batch was refused.
#[derive(Debug, Error)]
pub enum IngestError {
    /// The body is not a JSON array.
    #[error("the body must be a JSON array of CloudEvents: {0}")]
    NotABatch(String),
    /// More than [`MAX_EVENTS`] events.
    #[error("a batch holds at most {MAX_EVENTS} events (got {0}); send the rest in another")]
    TooManyEvents(usize),
    /// The store failed; nothing of the batch was stored.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Who an event is about, as its `subject` names them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Subject {
    User(UserId),
    Key(ApiKeyId),
}

/// An event that passed every check but its subject's existence.
struct Checked {
    index: usize,
    subject: Subject,
    event: Parsed,
}

/// What an event says, but whose it is.
struct Parsed {
    source: String,
    event_id: String,
    meter: String,
    quantity: u64,
    value: Option<String>,
    created_at: OffsetDateTime,
}

impl Parsed {
    fn of(self, user_id: UserId) -> MeterEvent {
        MeterEvent {
            source: self.source,
            event_id: self.event_id,
            user_id,
            meter: self.meter,
            quantity: self.quantity,
            value: self.value,
            created_at: self.created_at,
        }
    }
}

/// Takes batches of events for a store, checked against the catalog's meters.
#[derive(Clone)]
pub struct EventIngest {
    store: Arc<dyn MeterUsageRepository>,
    catalog: Arc<LiveCatalog>,
    clock: Arc<dyn Clock>,
    late: time::Duration,
}

impl EventIngest {
    /// Events for `store`, their meters from `catalog`, at most `late_event_days` late.
    pub fn new(
        store: Arc<dyn MeterUsageRepository>,
        catalog: Arc<LiveCatalog>,
        clock: Arc<dyn Clock>,
        late_event_days: u32,
    ) -> Self {
        Self {
            store,
            catalog,
            clock,
            late: time::Duration::days(i64::from(late_event_days)),
        }
    }

    /// Checks each event of `body` (a JSON array), stores the good ones in one
    /// transaction, and says what became of each.
    pub async fn ingest(&self, body: &[u8]) -> Result<IngestAnswer, IngestError> {
        let batch: Vec<Value> =
            serde_json::from_slice(body).map_err(|e| IngestError::NotABatch(e.to_string()))?;
        if batch.len() > MAX_EVENTS {
            return Err(IngestError::TooManyEvents(batch.len()));
        }
        let now = self.clock.now();
        let mut meters = self.catalog.current().meters().clone();
        // A meter made a moment ago on another instance: read the catalog once more.
        let unknown = |meters: &Meters| {
            batch.iter().any(|e| {
                e.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| meters.get(t).is_none())
            })
        };
        if unknown(&meters) {
            self.catalog.refresh().await?;
            meters = self.catalog.current().meters().clone();
        }
        let mut answer = IngestAnswer::default();
        let mut checked = Vec::with_capacity(batch.len());
        for (index, value) in batch.iter().enumerate() {
            match self.check(value, &meters, now) {
                Ok((subject, event)) => checked.push(Checked {
                    index,
                    subject,
                    event,
                }),
                Err((problem, message)) => answer.rejected.push(Rejected {
                    index,
                    error: problem.code(),
                    message,
                }),
            }
        }
        let owners = self.owners(&checked).await?;
        let mut events = Vec::with_capacity(checked.len());
        for Checked {
            index,
            subject,
            event,
        } in checked
        {
            match owners.get(&subject) {
                Some(user_id) => events.push(event.of(user_id.clone())),
                None => answer.rejected.push(Rejected {
                    index,
                    error: EventProblem::UnknownSubject.code(),
                    message: format!(
                        "subject {} names no user or API key",
                        match &subject {
                            Subject::User(id) => id.to_string(),
                            Subject::Key(id) => id.to_string(),
                        }
                    ),
                }),
            }
        }
        answer.rejected.sort_by_key(|r| r.index);
        let outcome = self.store.record_meter_events(&events, now).await?;
        answer.accepted = outcome.accepted;
        answer.duplicates = outcome.duplicates;
        Ok(answer)
    }

    /// The user each subject of `checked` names, for those that exist.
    async fn owners(&self, checked: &[Checked]) -> Result<HashMap<Subject, UserId>, RepoError> {
        let subjects: BTreeSet<&Subject> = checked.iter().map(|c| &c.subject).collect();
        let users: Vec<UserId> = subjects
            .iter()
            .filter_map(|s| match s {
                Subject::User(id) => Some(id.clone()),
                Subject::Key(_) => None,
            })
            .collect();
        let keys: Vec<ApiKeyId> = subjects
            .iter()
            .filter_map(|s| match s {
                Subject::Key(id) => Some(id.clone()),
                Subject::User(_) => None,
            })
            .collect();
        let (users, keys) = self.store.event_subjects(&users, &keys).await?;
        Ok(users
            .into_iter()
            .map(|u| (Subject::User(u.clone()), u))
            .chain(keys.into_iter().map(|(k, u)| (Subject::Key(k), u)))
            .collect())
    }

    /// One event's checks, in the order a person fixing it would want them.
    fn check(
        &self,
        value: &Value,
        meters: &Meters,
        now: OffsetDateTime,
    ) -> Result<(Subject, Parsed), (EventProblem, String)> {
        use EventProblem::*;
        let invalid = |message: String| (InvalidEvent, message);
        let Value::Object(event) = value else {
            return Err(invalid(format!(
                "an event must be a JSON object (got {value})"
            )));
        };
        match event.get("specversion") {
            Some(Value::String(v)) if v == "1.0" => {}
            other => {
                return Err(invalid(format!(
                    "specversion must be \"1.0\" (got {})",
                    shown(other)
                )));
            }
        }
        let id = text(event, "id")?;
        let source = text(event, "source")?;
        let meter_key = match event.get("type") {
            Some(Value::String(t)) => t.as_str(),
            other => {
                return Err(invalid(format!(
                    "type must be a string naming a meter (got {})",
                    shown(other)
                )));
            }
        };
        let subject = match event.get("subject") {
            Some(Value::String(s)) => {
                if let Ok(user) = UserId::parse(s) {
                    Subject::User(user)
                } else if let Ok(key) = ApiKeyId::parse(s) {
                    Subject::Key(key)
                } else {
                    return Err((
                        UnknownSubject,
                        format!(
                            "subject must be a user id (eco_usr_...) or an API key id (eco_key_...) (got {s:?})"
                        ),
                    ));
                }
            }
            other => {
                return Err(invalid(format!(
                    "subject must be a user id (eco_usr_...) or an API key id (eco_key_...) (got {})",
                    shown(other)
                )));
            }
        };
        let created_at = match event.get("time") {
            None | Some(Value::Null) => now,
            Some(Value::String(t)) => OffsetDateTime::parse(t, &Rfc3339)
                .map_err(|e| invalid(format!("time must be an RFC 3339 time ({e}; got {t:?})")))?
                .checked_to_offset(time::UtcOffset::UTC)
                .ok_or_else(|| (TimeOutOfRange, format!("time {t:?} is out of range")))?,
            Some(other) => {
                return Err(invalid(format!(
                    "time must be an RFC 3339 time (got {other})"
                )));
            }
        };
        let earliest = now.checked_sub(self.late).unwrap_or(created_at);
        let latest = now.checked_add(MAX_AHEAD).unwrap_or(created_at);
        if created_at < earliest || created_at > latest {
            return Err((
                TimeOutOfRange,
                format!(
                    "time must be within {} days before now and 5 minutes after (got {})",
                    self.late.whole_days(),
                    created_at.format(&Rfc3339).unwrap_or_default()
                ),
            ));
        }
        let meter = meters
            .get(meter_key)
            .filter(|m| m.key != API_CALLS)
            .ok_or_else(|| {
                (
                    UnknownMeter,
                    if meter_key == API_CALLS {
                        "type api_calls counts the calls the meter admits; it takes no events"
                            .to_owned()
                    } else {
                        format!("type names no meter (got {meter_key:?})")
                    },
                )
            })?;
        let data = match event.get("data") {
            None | Some(Value::Null) => None,
            Some(Value::Object(data)) => Some(data),
            Some(other) => {
                return Err(invalid(format!("data must be a JSON object (got {other})")));
            }
        };
        let field = |name: &str| data.and_then(|d| d.get(name));
        let (quantity, value) = match meter.aggregation {
            Aggregation::UniqueCount => match field("value") {
                Some(Value::String(v)) if fits(v) => (1, Some(v.clone())),
                other => {
                    return Err(invalid(format!(
                        "data.value must be a string of 1 to {MAX_TEXT_BYTES} bytes without \
                         control characters: {:?} counts distinct values (got {})",
                        meter.key,
                        shown(other)
                    )));
                }
            },
            Aggregation::Count => match field("quantity") {
                None | Some(Value::Null) => (1, None),
                Some(q) => (quantity(q)?, None),
            },
            Aggregation::Sum | Aggregation::Max => match field("quantity") {
                Some(q) if !q.is_null() => (quantity(q)?, None),
                _ => {
                    return Err(invalid(format!(
                        "data.quantity is required: {:?} adds up quantities",
                        meter.key
                    )));
                }
            },
        };
        Ok((
            subject,
            Parsed {
                source,
                event_id: id,
                meter: meter.key.clone(),
                quantity,
                value,
                created_at,
            },
        ))
    }
}

/// A required string attribute of 1 to [`MAX_TEXT_BYTES`] bytes.
fn text(event: &Map<String, Value>, name: &str) -> Result<String, (EventProblem, String)> {
    match event.get(name) {
        Some(Value::String(s)) if fits(s) => Ok(s.clone()),
        other => Err((
            EventProblem::InvalidEvent,
            format!(
                "{name} must be a string of 1 to {MAX_TEXT_BYTES} bytes without control \
                 characters (got {})",
                shown(other)
            ),
        )),
    }
}

/// `data.quantity`: an integer from 0 to 2^53 (a JSON number written with a fraction or
/// an exponent counts when its value is whole).
fn quantity(q: &Value) -> Result<u64, (EventProblem, String)> {
    let refused = || {
        (
            EventProblem::InvalidQuantity,
            format!("data.quantity must be an integer from 0 to 2^53 (got {q})"),
        )
    };
    let Value::Number(n) = q else {
        return Err((
            EventProblem::InvalidEvent,
            format!("data.quantity must be a number (got {q})"),
        ));
    };
    let whole = match (n.as_u64(), n.as_f64()) {
        (Some(n), _) => n,
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=MAX_QUANTITY as f64).contains(&f) => f as u64,
        _ => return Err(refused()),
    };
    if whole > MAX_QUANTITY {
        return Err(refused());
    }
    Ok(whole)
}

/// A field's value for a message, `nothing` when absent.
fn shown(value: Option<&Value>) -> String {
    value.map_or_else(|| "nothing".to_owned(), Value::to_string)
}
