//! The actix-web middleware: API key check, optional short-window rate limit, monthly
//! quota, rate-limit headers, and a usage record for every admitted call.
//!
//! Dependencies are given at construction; any actix app adds it in a few lines (see
//! `examples/metered_app.rs`):
//!
//! ```ignore
//! let metering = Metering::new(MeteringDeps { authenticator, quota, rate: None, tracker, clock });
//! App::new().service(web::scope("/api/v1").wrap(metering.clone()).route("/ping", web::get().to(ping)))
//! ```
//!
//! Handlers read the caller with `web::ReqData<Caller>`.

use std::future::{Ready, ready};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::{Error, HttpMessage, HttpResponse, HttpResponseBuilder};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::caller::ApiKeyAuthenticator;
use crate::event::new_event_id;
use crate::quota::{QuotaBook, QuotaDecision, QuotaStatus};
use crate::rate::{RateDecision, RateLimiter};
use crate::tracker::{TrackedCall, UsageTracker};
use crate::{Clock, UsageEvent};

/// Route pattern recorded for calls that matched no route.
pub const UNMATCHED_ROUTE: &str = "<unmatched>";

/// What the middleware needs.
#[derive(Clone)]
pub struct MeteringDeps {
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
}

/// Counts of what the middleware answered, for `/metrics`.
#[derive(Debug, Default)]
pub struct MeteringStats {
    /// Calls admitted and passed to the handler.
    pub admitted: AtomicU64,
    /// Calls without a valid key (401).
    pub unauthorized: AtomicU64,
    /// Calls refused by the monthly quota (429 quota_exceeded).
    pub quota_rejected: AtomicU64,
    /// Calls refused by the short-window limit (429 rate_limited).
    pub rate_limited: AtomicU64,
    /// Calls answered 503 because the database did not answer.
    pub unavailable: AtomicU64,
}

/// The middleware factory. Cheap to clone: one per worker shares the same state.
#[derive(Clone)]
pub struct Metering {
    inner: Arc<Inner>,
}

struct Inner {
    deps: MeteringDeps,
    stats: Arc<MeteringStats>,
}

impl Metering {
    /// A middleware over `deps`.
    pub fn new(deps: MeteringDeps) -> Self {
        Self {
            inner: Arc::new(Inner {
                deps,
                stats: Arc::new(MeteringStats::default()),
            }),
        }
    }

    /// Its live counts.
    pub fn stats(&self) -> Arc<MeteringStats> {
        Arc::clone(&self.inner.stats)
    }
}

impl<S, B> Transform<S, ServiceRequest> for Metering
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = MeteringService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(MeteringService {
            service: Rc::new(service),
            inner: Arc::clone(&self.inner),
        }))
    }
}

/// The middleware around one worker's service.
pub struct MeteringService<S> {
    service: Rc<S>,
    inner: Arc<Inner>,
}

type LocalBoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T>>>;

impl<S, B> Service<ServiceRequest> for MeteringService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = LocalBoxFuture<Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let service = Rc::clone(&self.service);
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.handle(req, service).await })
    }
}

impl Inner {
    async fn handle<S, B>(
        &self,
        req: ServiceRequest,
        service: Rc<S>,
    ) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error>,
        B: MessageBody,
    {
        let started = Instant::now();
        let deps = &self.deps;
        let stats = &self.stats;
        let at = deps.clock.now();

        let caller = match presented_key(req.headers()) {
            None => None,
            Some(key) => match deps.authenticator.authenticate(key).await {
                Ok(caller) => caller,
                Err(e) => {
                    tracing::warn!(error = %e, "API key lookup failed");
                    stats.unavailable.fetch_add(1, Ordering::Relaxed);
                    return Ok(reject(req, unavailable()));
                }
            },
        };
        let Some(caller) = caller else {
            stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            return Ok(reject(req, unauthorized()));
        };

        let mut burst = None;
        if let Some(rate) = &deps.rate {
            match rate.check(&caller.user_id, caller.plan) {
                RateDecision::Unlimited => {}
                RateDecision::Allowed { limit, remaining } => burst = Some((limit, remaining)),
                RateDecision::Limited { rate, retry_after } => {
                    stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                    let mut response = HttpResponse::TooManyRequests();
                    response.insert_header((header::RETRY_AFTER, secs.max(1)));
                    response.insert_header((BURST_LIMIT.clone(), rate.burst));
                    response.insert_header((BURST_REMAINING.clone(), 0));
                    return Ok(reject(
                        req,
                        response.json(json!({
                            "error": "rate_limited",
                            "message": format!(
                                "Too many requests: at most {} per second with bursts of {}. Retry in {} s.",
                                rate.per_second, rate.burst, secs.max(1)
                            ),
                        })),
                    ));
                }
            }
        }

        let status = match deps.quota.admit_at(&caller.user_id, caller.plan, at).await {
            Ok(QuotaDecision::Admitted(status)) => status,
            Ok(QuotaDecision::Rejected(status)) => {
                stats.quota_rejected.fetch_add(1, Ordering::Relaxed);
                return Ok(reject(req, quota_exceeded(&status, at)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "loading the quota counter failed");
                stats.unavailable.fetch_add(1, Ordering::Relaxed);
                return Ok(reject(req, unavailable()));
            }
        };
        stats.admitted.fetch_add(1, Ordering::Relaxed);

        let endpoint = req
            .match_pattern()
            .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
        let method = req.method().as_str().to_owned();
        req.extensions_mut().insert(caller.clone());

        let result = service.call(req).await;
        let status_code = match &result {
            Ok(res) => res.status(),
            Err(e) => e.as_response_error().status_code(),
        };
        let call = TrackedCall {
            event: UsageEvent {
                event_id: new_event_id(at),
                user_id: caller.user_id,
                api_key_id: caller.api_key_id,
                endpoint,
                method,
                status_code: status_code.as_u16(),
                response_time_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
                created_at: at,
            },
            included_calls: deps.quota.catalog().included_calls_if_billed(caller.plan),
        };
        if deps.tracker.track(call).await.is_err() {
            // Only after shutdown, when no request should still be running.
            tracing::error!("usage tracker closed; an admitted call was not recorded");
        }

        let mut res = result?;
        let headers = res.headers_mut();
        quota_headers(headers, &status);
        if let Some((limit, remaining)) = burst {
            headers.insert(BURST_LIMIT.clone(), HeaderValue::from(limit));
            headers.insert(BURST_REMAINING.clone(), HeaderValue::from(remaining));
        }
        Ok(res.map_into_left_body())
    }
}

static BURST_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-burst-limit");
static BURST_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-burst-remaining");
static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The key from `Authorization: Bearer <key>` or, without an `Authorization` header,
/// `X-API-Key: <key>`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if headers.contains_key(header::AUTHORIZATION) {
        return bearer_credential(headers).ok();
    }
    headers.get(&API_KEY)?.to_str().ok().map(str::trim)
}

/// The credential of `Authorization: Bearer <credential>` (scheme in any case, spaces
/// around the credential ignored). Every route that takes a bearer credential (API
/// keys, user tokens, the cron secret) reads it here; the error says what is wrong, for
/// the log.
///
/// ```
/// use actix_web::http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
/// use usage_core::middleware::bearer_credential;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  eco_live_abc "));
/// assert_eq!(bearer_credential(&headers), Ok("eco_live_abc"));
/// headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
/// assert!(bearer_credential(&headers).is_err());
/// ```
pub fn bearer_credential(headers: &HeaderMap) -> Result<&str, &'static str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("no Authorization header")?
        .to_str()
        .map_err(|_| "the Authorization header is not visible ASCII")?;
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

fn quota_headers(headers: &mut HeaderMap, status: &QuotaStatus) {
    let (Some(limit), Some(remaining)) = (status.limit, status.remaining()) else {
        return; // unlimited plans carry no quota headers
    };
    headers.insert(LIMIT.clone(), HeaderValue::from(limit));
    headers.insert(REMAINING.clone(), HeaderValue::from(remaining));
    headers.insert(
        RESET.clone(),
        HeaderValue::from(status.reset_at.unix_timestamp()),
    );
}

fn reject<B>(req: ServiceRequest, response: HttpResponse) -> ServiceResponse<EitherBody<B>> {
    req.into_response(response).map_into_right_body()
}

fn unauthorized() -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
        .json(json!({
            "error": "unauthorized",
            "message": "A valid API key is required: Authorization: Bearer <key> or X-API-Key: <key>.",
        }))
}

fn unavailable() -> HttpResponse {
    HttpResponseBuilder::new(StatusCode::SERVICE_UNAVAILABLE)
        .insert_header((header::RETRY_AFTER, 5))
        .json(json!({
            "error": "database_unavailable",
            "message": "The database is unavailable; try again shortly.",
        }))
}

fn quota_exceeded(status: &QuotaStatus, now: OffsetDateTime) -> HttpResponse {
    let limit = status.limit.unwrap_or_default();
    let reset_at = status.reset_at.format(&Rfc3339).unwrap_or_default();
    let retry_after = (status.reset_at - now).whole_seconds().max(1);
    let mut response = HttpResponse::TooManyRequests()
        .insert_header((header::RETRY_AFTER, retry_after))
        .json(json!({
        "error": "quota_exceeded",
        "message": format!(
            "The monthly quota of {limit} calls is used up until {reset_at}. Upgrade to Pro for more calls."
        ),
        "limit": limit,
        "reset_at": reset_at,
    }));
    quota_headers(response.headers_mut(), status);
    response
}
