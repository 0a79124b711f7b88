//! The metering decision, once, for every door: given the presented credential, admit
//! the call (with its rate-limit headers) or refuse it (status, headers and JSON body);
//! when an admitted call finishes, record it.
//!
//! It knows no web framework. The actix middleware (`middleware`, feature `actix`), the
//! tower layer (`layer`, feature `tower`) and the server's forward-auth endpoint only
//! translate requests into [`Meter::admit`] and [`Meter::record`], and [`Admitted`] /
//! [`Refusal`] back into responses.
//!
//! ```
//! # use std::sync::Arc;
//! # use usage_door::meter::{Admission, Meter, MeterDeps};
//! # async fn demo(meter: Arc<Meter>) {
//! match meter.admit(Some(b"Bearer eco_live_..."), None).await {
//!     Admission::Admitted(call) => {
//!         let user = &call.caller().user_id; // ... serve the call ...
//!         meter.record(call, "GET", "/v1/items/{id}".into(), 200).await;
//!     }
//!     Admission::Refused(refusal) => {
//!         let _ = (refusal.status, &refusal.headers, &refusal.body); // ... answer with it ...
//!     }
//! }
//! # }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sfv::{ListSerializer, key_ref, string_ref};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use usage_core::caller::{ApiKeyAuthenticator, UnitLimit};
use usage_core::catalog::API_CALLS;
use usage_core::counter::Counter;
use usage_core::event::{Units, new_event_id};
use usage_core::quota::{QuotaBook, QuotaDecision, QuotaStatus};
use usage_core::rate::{RateDecision, RateLimit, RateLimiter};
use usage_core::terms::LiveCatalog;
use usage_core::tracker::{TrackedCall, UsageTracker};
use usage_core::{Caller, Clock, UsageEvent};

/// Route pattern recorded for calls that matched no route.
pub const UNMATCHED_ROUTE: &str = "<unmatched>";

/// What the meter needs.
#[derive(Clone)]
pub struct MeterDeps {
    /// Finds the caller from the API key.
    pub authenticator: Arc<dyn ApiKeyAuthenticator>,
    /// Monthly quotas.
    pub quota: Arc<QuotaBook>,
    /// Short-window limits, when configured.
    pub rate: Option<Arc<RateLimiter>>,
    /// Where admitted calls are recorded.
    pub tracker: UsageTracker,
    /// Time of calls.
    pub clock: Arc<dyn Clock>,
    /// The plan catalog, read only for a refusal: a 429 names the plan to upgrade to.
    /// Without it, the message names none.
    pub catalog: Option<Arc<LiveCatalog>>,
}

/// Counts of what the meter answered, for `/metrics`.
#[derive(Debug, Default)]
pub struct MeteringStats {
    /// Calls admitted and passed to the handler.
    pub admitted: Counter,
    /// Calls without a valid key (401).
    pub unauthorized: Counter,
    /// Calls refused by the monthly quota (429 quota_exceeded).
    pub quota_rejected: Counter,
    /// Calls refused by the short-window limit (429 rate_limited).
    pub rate_limited: Counter,
    /// Calls answered 503 because the database did not answer.
    pub unavailable: Counter,
}

/// Response header names the meter sets (lower case, as HTTP/2 sends them).
pub mod header_names {
    /// The request header that carries an API key, beside `Authorization: Bearer`.
    pub const X_API_KEY: &str = "x-api-key";
    /// Monthly limit.
    pub const X_RATELIMIT_LIMIT: &str = "x-ratelimit-limit";
    /// Monthly calls left.
    pub const X_RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";
    /// Unix seconds when the period ends.
    pub const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";
    /// Burst size of the short window.
    pub const X_RATELIMIT_BURST_LIMIT: &str = "x-ratelimit-burst-limit";
    /// Calls that could still go at once.
    pub const X_RATELIMIT_BURST_REMAINING: &str = "x-ratelimit-burst-remaining";
    /// IETF policies (draft-ietf-httpapi-ratelimit-headers-11).
    pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
    /// IETF current state of each policy.
    pub const RATELIMIT: &str = "ratelimit";
    /// Seconds to wait.
    pub const RETRY_AFTER: &str = "retry-after";
    /// The scheme a 401 asks for.
    pub const WWW_AUTHENTICATE: &str = "www-authenticate";
}
use header_names::*;

/// Headers as (lower-case name, value) pairs; values are visible ASCII.
pub type Headers = Vec<(&'static str, String)>;

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// No key, or an unknown, revoked or expired one (401).
    Unauthorized,
    /// The short-window limit (429 `rate_limited`).
    RateLimited,
    /// The monthly quota (429 `quota_exceeded`).
    QuotaExceeded,
    /// The database did not answer (503).
    Unavailable,
}

/// A refused call: what to answer, whatever the door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: RefusalReason,
    /// HTTP status: 401, 429 or 503.
    pub status: u16,
    /// Response headers (rate-limit fields, `Retry-After`, `WWW-Authenticate`).
    pub headers: Headers,
    /// The JSON body (`{"error": ..., "message": ...}`).
    pub body: String,
}

/// An admitted call: the caller, and what the meter needs to record it.
#[derive(Debug)]
pub struct Admitted {
    caller: Caller,
    at: OffsetDateTime,
    started: Instant,
    quota: QuotaStatus,
    burst: Option<BurstStatus>,
    /// Limited meters and route costs; `None` for most calls (no allocation).
    units: Option<Box<CallUnits>>,
}

/// What an admitted call took of meters other than `api_calls`.
#[derive(Debug, Default)]
struct CallUnits {
    /// Where the call left each limited meter of the caller's plan.
    meters: Vec<MeterStatus>,
    /// What the route cost, by meter: taken at admission, stored with the call.
    cost: Units,
}

/// Where an admitted or refused call leaves a limited meter other than `api_calls`.
#[derive(Debug, Clone)]
struct MeterStatus {
    meter: Arc<str>,
    quota: QuotaStatus,
}

/// The short-window state after an admitted or refused call.
#[derive(Debug, Clone, Copy)]
struct BurstStatus {
    rate: RateLimit,
    remaining: u32,
    /// Until the whole burst is back (allowed) or the next call fits (refused).
    reset_in: Duration,
}

impl Admitted {
    /// Who is calling.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The rate-limit headers of the response: `X-RateLimit-*` and the IETF fields.
    pub fn headers(&self) -> Headers {
        let meters = self.units.as_ref().map_or(&[][..], |u| &u.meters[..]);
        rate_limit_headers(Some(&self.quota), self.burst.as_ref(), meters, self.at)
    }

    /// What the call's route cost, by meter (empty for most routes).
    pub fn cost(&self) -> &Units {
        const NONE: &Units = &Units::new();
        self.units.as_ref().map_or(NONE, |u| &u.cost)
    }
}

/// Why a call's units were not taken.
enum Untaken {
    /// The database did not answer.
    Unavailable,
    /// `limit` is reached; `meters` ends with its status.
    Refused {
        limit: UnitLimit,
        meters: Vec<MeterStatus>,
    },
}

/// The meter's answer to a call.
#[derive(Debug)]
pub enum Admission {
    /// Serve it, then [`Meter::record`] it.
    Admitted(Admitted),
    /// Answer with this instead.
    Refused(Refusal),
}

/// The metering engine: key check, short-window limit, monthly quota, recording.
pub struct Meter {
    deps: MeterDeps,
    stats: Arc<MeteringStats>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").field("stats", &self.stats).finish()
    }
}

impl Meter {
    /// A meter over `deps`.
    pub fn new(deps: MeterDeps) -> Self {
        Self {
            deps,
            stats: Arc::new(MeteringStats::default()),
        }
    }

    /// Its live counts.
    pub fn stats(&self) -> Arc<MeteringStats> {
        Arc::clone(&self.stats)
    }

    /// Decides a call from its `Authorization` and `X-API-Key` header values (raw bytes,
    /// as any framework has them): the key from `Authorization: Bearer <key>` or, without
    /// an `Authorization` header, `X-API-Key: <key>`. No route cost is taken: doors that
    /// know the route use [`Meter::admit_route`].
    pub async fn admit(&self, authorization: Option<&[u8]>, api_key: Option<&[u8]>) -> Admission {
        self.admit_route(authorization, api_key, "", || None).await
    }

    /// [`Meter::admit`] for a call of `method` on the route `endpoint` gives (its pattern,
    /// as recorded; asked only when the catalog has route costs): the route's cost is
    /// taken at admission, and a call that would take a blocking meter past its limit is
    /// refused before its handler runs.
    pub async fn admit_route(
        &self,
        authorization: Option<&[u8]>,
        api_key: Option<&[u8]>,
        method: &str,
        endpoint: impl FnOnce() -> Option<String>,
    ) -> Admission {
        let key = match authorization {
            Some(value) => bearer_credential(value).ok(),
            None => api_key
                .and_then(|value| std::str::from_utf8(value).ok())
                .map(str::trim),
        };
        let cost = match &self.deps.catalog {
            Some(catalog) if catalog.has_route_costs() => endpoint()
                .and_then(|endpoint| catalog.route_cost(method, &endpoint))
                .unwrap_or_default(),
            _ => Units::new(),
        };
        self.decide(key, cost).await
    }

    /// Decides a call that presented `key` (`None`: no credential).
    pub async fn admit_key(&self, key: Option<&str>) -> Admission {
        self.decide(key, Units::new()).await
    }

    /// Decides a call that presented `key` and whose route costs `cost`.
    async fn decide(&self, key: Option<&str>, cost: Units) -> Admission {
        let started = Instant::now();
        let deps = &self.deps;
        let stats = &self.stats;
        let at = deps.clock.now();

        let caller = match key {
            None | Some("") => None,
            Some(key) => match deps.authenticator.authenticate(key).await {
                Ok(caller) => caller,
                Err(e) => {
                    tracing::warn!(error = %e, "API key lookup failed");
                    stats.unavailable.add(1);
                    return Admission::Refused(unavailable());
                }
            },
        };
        let Some(caller) = caller else {
            stats.unauthorized.add(1);
            return Admission::Refused(unauthorized());
        };

        let mut burst = None;
        if let Some(limiter) = &deps.rate {
            match limiter.check(&caller.user_id, caller.limits.burst) {
                RateDecision::Unlimited => {}
                RateDecision::Allowed {
                    rate,
                    remaining,
                    full_in,
                } => {
                    burst = Some(BurstStatus {
                        rate,
                        remaining,
                        reset_in: full_in,
                    })
                }
                RateDecision::Limited { rate, retry_after } => {
                    stats.rate_limited.add(1);
                    return Admission::Refused(rate_limited(rate, retry_after, at));
                }
            }
        }

        let quota = match deps
            .quota
            .admit_at(&caller.user_id, &caller.limits, at)
            .await
        {
            Ok(QuotaDecision::Admitted(quota)) => quota,
            Ok(QuotaDecision::Rejected(quota)) => {
                stats.quota_rejected.add(1);
                let upgrade = self.upgrade(&caller, quota.limit, API_CALLS);
                return Admission::Refused(quota_exceeded(
                    &quota,
                    None,
                    Some(&quota),
                    burst.as_ref(),
                    &[],
                    upgrade,
                    at,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "loading the quota counter failed");
                stats.unavailable.add(1);
                return Admission::Refused(unavailable());
            }
        };
        let meters = match self.take_units(&caller, &cost, at).await {
            Ok(meters) => meters,
            Err(refused) => {
                // Refused after all: the call's count goes back.
                deps.quota.give_back(
                    &caller.user_id,
                    caller.limits.included,
                    caller.limits.over_limit,
                    at,
                    1,
                );
                return Admission::Refused(match refused {
                    Untaken::Unavailable => {
                        stats.unavailable.add(1);
                        unavailable()
                    }
                    Untaken::Refused { limit, meters } => {
                        stats.quota_rejected.add(1);
                        let refused = meters.last().map(|m| m.quota);
                        let upgrade =
                            self.upgrade(&caller, refused.and_then(|q| q.limit), &limit.meter);
                        quota_exceeded(
                            &refused.unwrap_or(quota),
                            Some(&limit.meter),
                            Some(&quota),
                            burst.as_ref(),
                            &meters,
                            upgrade,
                            at,
                        )
                    }
                });
            }
        };
        stats.admitted.add(1);
        let units =
            (!meters.is_empty() || !cost.is_empty()).then(|| Box::new(CallUnits { meters, cost }));
        Admission::Admitted(Admitted {
            caller,
            at,
            started,
            quota,
            burst,
            units,
        })
    }

    /// Takes the route's `cost` on each meter the caller's plan limits (0 where it costs
    /// nothing: the check that the meter is not used up). A refusal gives back what the
    /// meters before it took, and carries every status up to the refused one.
    async fn take_units(
        &self,
        caller: &Caller,
        cost: &Units,
        at: OffsetDateTime,
    ) -> Result<Vec<MeterStatus>, Untaken> {
        let limits = caller.limits.unit_limits();
        let mut meters = Vec::with_capacity(limits.len());
        for (i, limit) in limits.iter().enumerate() {
            let units = cost.get(&limit.meter);
            let book = self.deps.quota.meter(&limit.meter);
            let decision = book
                .take_at(
                    &caller.user_id,
                    Some(limit.included),
                    limit.over_limit,
                    at,
                    units,
                )
                .await;
            let (quota, admitted) = match decision {
                Ok(QuotaDecision::Admitted(quota)) => (quota, true),
                Ok(QuotaDecision::Rejected(quota)) => (quota, false),
                Err(e) => {
                    tracing::warn!(error = %e, meter = %limit.meter, "loading a meter's quota counter failed");
                    self.give_back(caller, &limits[..i], cost, at);
                    return Err(Untaken::Unavailable);
                }
            };
            meters.push(MeterStatus {
                meter: Arc::clone(&limit.meter),
                quota,
            });
            if !admitted {
                self.give_back(caller, &limits[..i], cost, at);
                return Err(Untaken::Refused {
                    limit: limit.clone(),
                    meters,
                });
            }
        }
        Ok(meters)
    }

    /// Gives back what `limits`' meters took of `cost` for a call refused after all.
    fn give_back(&self, caller: &Caller, limits: &[UnitLimit], cost: &Units, at: OffsetDateTime) {
        for limit in limits {
            let units = cost.get(&limit.meter);
            if units > 0 {
                self.deps.quota.meter(&limit.meter).give_back(
                    &caller.user_id,
                    Some(limit.included),
                    limit.over_limit,
                    at,
                    units,
                );
            }
        }
    }

    /// The plan a caller refused at `limit` of `meter` could upgrade to, if any.
    fn upgrade(&self, caller: &Caller, limit: Option<u64>, meter: &str) -> Option<String> {
        let catalog = self.deps.catalog.as_ref()?;
        let limit = limit?;
        catalog
            .current()
            .upgrade_for(caller.plan.as_str(), limit, meter)
            .map(|plan| plan.name.clone())
    }

    /// Records an admitted call once it finished: its `method`, its route `endpoint` (a
    /// pattern such as `/v1/items/{id}`, never the raw path) and the response `status`.
    pub async fn record(&self, call: Admitted, method: &str, endpoint: String, status: u16) {
        self.record_units(call, method, endpoint, status, Units::new())
            .await;
    }

    /// [`Meter::record`], with the units its handler reported ([`crate::report`]). A unit
    /// of a meter that cannot take it (unknown, `api_calls`, `unique_count`) is left out
    /// with a warning naming it; a quantity over 2^53 counts as 2^53.
    pub async fn record_units(
        &self,
        call: Admitted,
        method: &str,
        endpoint: String,
        status: u16,
        units: Units,
    ) {
        let mut units = if units.is_empty() {
            units
        } else {
            self.checked(units)
        };
        // The handler's units count against the meters the plan limits (the route's cost
        // was taken at admission); both are stored with the call.
        for limit in call.caller.limits.unit_limits() {
            let quantity = units.get(&limit.meter);
            if quantity > 0 {
                self.deps
                    .quota
                    .meter(&limit.meter)
                    .add(&call.caller.user_id, call.at, quantity);
            }
        }
        units.extend(call.cost());
        let included_calls = call.caller.limits.billed_from();
        let tracked = TrackedCall {
            event: UsageEvent {
                event_id: new_event_id(call.at),
                user_id: call.caller.user_id,
                api_key_id: call.caller.api_key_id,
                endpoint,
                method: method.to_owned(),
                status_code: status,
                response_time_ms: u32::try_from(call.started.elapsed().as_millis())
                    .unwrap_or(u32::MAX),
                created_at: call.at,
                units,
            },
            included_calls,
        };
        if self.deps.tracker.track(tracked).await.is_err() {
            // Only after shutdown, when no request should still be running.
            tracing::error!("usage tracker closed; an admitted call was not recorded");
        }
    }
}

impl Meter {
    /// The units a handler reported that its meters can take (in place: no copy).
    fn checked(&self, mut units: Units) -> Units {
        let catalog = self.deps.catalog.as_ref().map(|c| c.current());
        units.retain(|meter, quantity| {
            let takes = match &catalog {
                // Without the catalog, the store drops units of meters it does not have.
                None => true,
                Some(catalog) => catalog.meters().get(meter).is_some_and(|m| {
                    m.key != API_CALLS
                        && m.aggregation != usage_core::meter::Aggregation::UniqueCount
                }),
            };
            if takes {
                *quantity = (*quantity).min(usage_core::meter::MAX_QUANTITY);
            } else {
                tracing::warn!(
                    meter = %meter,
                    quantity = *quantity,
                    "a handler reported units of a meter that takes none (unknown, api_calls or unique_count): left out"
                );
            }
            takes
        });
        units
    }
}

/// The credential of an `Authorization: Bearer <credential>` value (scheme in any case,
/// spaces around the credential ignored). The error says what is wrong, for the log.
///
/// ```
/// use usage_door::meter::bearer_credential;
///
/// assert_eq!(bearer_credential(b"bearer  eco_live_abc "), Ok("eco_live_abc"));
/// assert!(bearer_credential(b"Basic dXNlcjpwYXNz").is_err());
/// ```
pub fn bearer_credential(value: &[u8]) -> Result<&str, &'static str> {
    let value = std::str::from_utf8(value)
        .ok()
        .filter(|v| v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .ok_or("the Authorization header is not visible ASCII")?;
    let (scheme, credential) = value
        .split_once(' ')
        .ok_or("the Authorization header is not `Bearer <credential>`")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("the Authorization scheme is not Bearer");
    }
    match credential.trim() {
        "" => Err("the bearer credential is empty"),
        credential => Ok(credential),
    }
}

/// Largest integer a structured field carries (RFC 9651: 15 digits).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Whole seconds in `d`, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The rate-limit headers for a quota state, a short-window state and the limited meters'
/// states: `X-RateLimit-*` for the monthly quota (limited plans only), the burst ones, and
/// the IETF fields listing the `"monthly"`, `"burst"` and each meter's policy that apply.
fn rate_limit_headers(
    quota: Option<&QuotaStatus>,
    burst: Option<&BurstStatus>,
    meters: &[MeterStatus],
    now: OffsetDateTime,
) -> Headers {
    let monthly = quota.and_then(|q| Some((q, q.limit?, q.remaining()?)));
    if monthly.is_none() && burst.is_none() && meters.is_empty() {
        return Headers::new(); // unlimited, no burst limit: no allocation
    }
    let mut headers = Headers::with_capacity(7);
    let mut policy = ListSerializer::new();
    let mut state = ListSerializer::new();
    let mut period_item = |name: &str, status: &QuotaStatus, limit: u64, remaining: u64| {
        let window = status.reset_at - status.period_start;
        let left = (status.reset_at - now).max(time::Duration::ZERO);
        sf_item(
            &mut policy,
            name,
            ("q", limit),
            ("w", u64::try_from(window.whole_seconds()).unwrap_or(0)),
        );
        sf_item(
            &mut state,
            name,
            ("r", remaining),
            ("t", u64::try_from(left.whole_seconds()).unwrap_or(0)),
        );
    };
    if let Some((status, limit, remaining)) = monthly {
        headers.push((X_RATELIMIT_LIMIT, limit.to_string()));
        headers.push((X_RATELIMIT_REMAINING, remaining.to_string()));
        headers.push((
            X_RATELIMIT_RESET,
            status.reset_at.unix_timestamp().to_string(),
        ));
        period_item("monthly", status, limit, remaining);
    }
    for meter in meters {
        if let (Some(limit), Some(remaining)) = (meter.quota.limit, meter.quota.remaining()) {
            period_item(&meter.meter, &meter.quota, limit, remaining);
        }
    }
    if let Some(burst) = burst {
        headers.push((X_RATELIMIT_BURST_LIMIT, burst.rate.burst.to_string()));
        headers.push((X_RATELIMIT_BURST_REMAINING, burst.remaining.to_string()));
        let per_second = u64::from(burst.rate.per_second.max(1));
        let window = u64::from(burst.rate.burst).div_ceil(per_second).max(1);
        sf_item(
            &mut policy,
            "burst",
            ("q", u64::from(burst.rate.burst)),
            ("w", window),
        );
        sf_item(
            &mut state,
            "burst",
            ("r", u64::from(burst.remaining)),
            ("t", ceil_secs(burst.reset_in)),
        );
    }
    if let (Some(policy), Some(state)) = (policy.finish(), state.finish()) {
        headers.push((RATELIMIT_POLICY, policy));
        headers.push((RATELIMIT, state));
    }
    headers
}

/// Appends `"name";a=..;b=..` to a structured-field list.
fn sf_item(list: &mut ListSerializer<String>, name: &str, a: (&str, u64), b: (&str, u64)) {
    let value = |v: u64| sfv::Integer::try_from(v.min(SF_INTEGER_MAX)).unwrap_or(sfv::integer(0));
    let _ = list
        .bare_item(string_ref(name))
        .parameter(key_ref(a.0), value(a.1))
        .parameter(key_ref(b.0), value(b.1));
}

fn refusal(
    reason: RefusalReason,
    status: u16,
    headers: Headers,
    body: serde_json::Value,
) -> Refusal {
    Refusal {
        reason,
        status,
        headers,
        body: body.to_string(),
    }
}

fn unauthorized() -> Refusal {
    refusal(
        RefusalReason::Unauthorized,
        401,
        vec![(WWW_AUTHENTICATE, "Bearer".to_owned())],
        json!({
            "error": "unauthorized",
            "message": "A valid API key is required: Authorization: Bearer <key> or X-API-Key: <key>.",
        }),
    )
}

fn unavailable() -> Refusal {
    refusal(
        RefusalReason::Unavailable,
        503,
        vec![(RETRY_AFTER, "5".to_owned())],
        json!({
            "error": "database_unavailable",
            "message": "The database is unavailable; try again shortly.",
        }),
    )
}

fn rate_limited(rate: RateLimit, retry_after: Duration, now: OffsetDateTime) -> Refusal {
    let secs = ceil_secs(retry_after).max(1);
    let burst = BurstStatus {
        rate,
        remaining: 0,
        reset_in: retry_after,
    };
    let mut headers = vec![(RETRY_AFTER, secs.to_string())];
    headers.extend(rate_limit_headers(None, Some(&burst), &[], now));
    refusal(
        RefusalReason::RateLimited,
        429,
        headers,
        json!({
            "error": "rate_limited",
            "message": format!(
                "Too many requests: at most {} per second with bursts of {}. Retry in {secs} s.",
                rate.per_second, rate.burst
            ),
        }),
    )
}

/// The 429 of a used-up quota: the calls' (`meter` `None`) or a meter's, whose `status`
/// it is; `calls` and `meters` are the states to show in the rate-limit headers (the
/// refused meter's last);
/// `upgrade` names the plan that allows more, if any.
fn quota_exceeded(
    status: &QuotaStatus,
    meter: Option<&str>,
    calls: Option<&QuotaStatus>,
    burst: Option<&BurstStatus>,
    meters: &[MeterStatus],
    upgrade: Option<String>,
    now: OffsetDateTime,
) -> Refusal {
    let limit = status.limit.unwrap_or_default();
    let reset_at = status.reset_at.format(&Rfc3339).unwrap_or_default();
    let retry_after = (status.reset_at - now).whole_seconds().max(1);
    let mut headers = vec![(RETRY_AFTER, retry_after.to_string())];
    headers.extend(rate_limit_headers(calls, burst, meters, now));
    let units = meter.unwrap_or("calls");
    let upgrade = upgrade.map_or_else(String::new, |plan| {
        format!(" Upgrade to {plan} for more {units}.")
    });
    let message = match status.remaining() {
        Some(left) if left > 0 => format!(
            "The monthly quota of {limit} {units} has {left} left until {reset_at}, fewer than \
             this call takes.{upgrade}"
        ),
        _ => format!("The monthly quota of {limit} {units} is used up until {reset_at}.{upgrade}"),
    };
    let body = match meter {
        None => json!({
            "error": "quota_exceeded",
            "message": message,
            "limit": limit,
            "reset_at": reset_at,
        }),
        Some(meter) => json!({
            "error": "quota_exceeded",
            "message": message,
            "meter": meter,
            "limit": limit,
            "used": status.used,
            "reset_at": reset_at,
        }),
    };
    refusal(RefusalReason::QuotaExceeded, 429, headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn ietf_fields_list_the_monthly_and_burst_policies() {
        let now = datetime!(2026-11-20 00:00 UTC);
        let quota = QuotaStatus {
            limit: Some(1000),
            used: 1,
            period_start: datetime!(2026-11-01 00:00 UTC),
            reset_at: datetime!(2026-12-01 00:00 UTC),
        };
        let burst = BurstStatus {
            rate: RateLimit {
                per_second: 2,
                burst: 5,
            },
            remaining: 4,
            reset_in: Duration::from_millis(500),
        };
        let headers = rate_limit_headers(Some(&quota), Some(&burst), &[], now);
        let get = |name| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get(RATELIMIT_POLICY),
            Some(r#""monthly";q=1000;w=2592000, "burst";q=5;w=3"#)
        );
        assert_eq!(
            get(RATELIMIT),
            Some(r#""monthly";r=999;t=950400, "burst";r=4;t=1"#)
        );
        assert_eq!(get(X_RATELIMIT_RESET), Some("1796083200"));
    }

    #[test]
    fn unlimited_plans_without_a_burst_carry_no_rate_limit_fields() {
        let now = datetime!(2026-11-20 00:00 UTC);
        let quota = QuotaStatus {
            limit: None,
            used: 7,
            period_start: datetime!(2026-11-01 00:00 UTC),
            reset_at: datetime!(2026-12-01 00:00 UTC),
        };
        assert!(rate_limit_headers(Some(&quota), None, &[], now).is_empty());
    }

    #[test]
    fn huge_numbers_stay_within_a_structured_field_integer() {
        let now = datetime!(2026-11-20 00:00 UTC);
        let quota = QuotaStatus {
            limit: Some(u64::MAX),
            used: 0,
            period_start: datetime!(2026-11-01 00:00 UTC),
            reset_at: datetime!(2026-12-01 00:00 UTC),
        };
        let headers = rate_limit_headers(Some(&quota), None, &[], now);
        let policy = &headers
            .iter()
            .find(|(n, _)| *n == RATELIMIT_POLICY)
            .unwrap()
            .1;
        assert_eq!(policy, r#""monthly";q=999999999999999;w=2592000"#);
    }
}
