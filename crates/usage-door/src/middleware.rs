//! The actix-web middleware: a thin adapter over [`crate::meter::Meter`], which decides
//! (key, short window, monthly quota), sets the rate-limit headers and records each call.
//!
//! Dependencies are given at construction; any actix app adds it in a few lines (see
//! `examples/metered_app.rs`):
//!
//! ```ignore
//! let metering = Metering::new(MeteringDeps { authenticator, quota, rate: None, tracker, clock, catalog: None });
//! App::new().service(web::scope("/api/v1").wrap(metering.clone()).route("/ping", web::get().to(ping)))
//! ```
//!
//! Handlers read the caller with `web::ReqData<Caller>`.

use std::future::{Ready, ready};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::{Error, HttpMessage, HttpResponse};

use crate::meter::{Admission, Meter, Refusal};
pub use crate::meter::{MeterDeps as MeteringDeps, MeteringStats, UNMATCHED_ROUTE};
use crate::report::Reported;

/// The middleware factory. Cheap to clone: one per worker shares the same [`Meter`].
#[derive(Clone)]
pub struct Metering {
    meter: Arc<Meter>,
}

impl Metering {
    /// A middleware over a new meter on `deps`.
    pub fn new(deps: MeteringDeps) -> Self {
        Self::from_meter(Arc::new(Meter::new(deps)))
    }

    /// A middleware over `meter`, which other doors may share.
    pub fn from_meter(meter: Arc<Meter>) -> Self {
        Self { meter }
    }

    /// Its live counts.
    pub fn stats(&self) -> Arc<MeteringStats> {
        self.meter.stats()
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
            meter: Arc::clone(&self.meter),
        }))
    }
}

/// The middleware around one worker's service.
pub struct MeteringService<S> {
    service: Rc<S>,
    meter: Arc<Meter>,
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
        let meter = Arc::clone(&self.meter);
        Box::pin(async move { handle(&meter, req, service).await })
    }
}

async fn handle<S, B>(
    meter: &Meter,
    req: ServiceRequest,
    service: Rc<S>,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error>,
    B: MessageBody,
{
    let headers = req.headers();
    // The route's pattern before routing (for its cost) matches the path against the
    // app's patterns: asked only when some route has a cost.
    let admission = meter
        .admit_route(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            headers.get(&API_KEY).map(HeaderValue::as_bytes),
            req.method().as_str(),
            || req.match_pattern(),
        )
        .await;
    let call = match admission {
        Admission::Admitted(call) => call,
        Admission::Refused(refusal) => {
            return Ok(req
                .into_response(refusal_response(refusal))
                .map_into_right_body());
        }
    };
    let method = req.method().clone();
    req.extensions_mut().insert(call.caller().clone());

    let mut result = service.call(req).await;
    // The pattern once routed: actix then reads it from the matched resource's ids;
    // asked before, it matches the path against every pattern again (regex per route).
    // A service that fails with an error instead of a response is one in front of the
    // routing (handlers' errors are responses by now): no route to name.
    let (status, endpoint, reported) = match &mut result {
        Ok(res) => (
            res.status(),
            res.request().match_pattern(),
            res.response_mut().extensions_mut().remove::<Reported>(),
        ),
        Err(e) => (e.as_response_error().status_code(), None, None),
    };
    let endpoint = endpoint.unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let rate_headers = call.headers();
    let units = reported.map(Reported::into_units).unwrap_or_default();
    meter
        .record_units(call, method.as_str(), endpoint, status.as_u16(), units)
        .await;

    let mut res = result?;
    insert_headers(res.headers_mut(), rate_headers);
    Ok(res.map_into_left_body())
}

/// The actix response for a refusal: its status, headers and JSON body.
pub fn refusal_response(refusal: Refusal) -> HttpResponse {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status)
        .content_type("application/json")
        .body(refusal.body);
    insert_headers(response.headers_mut(), refusal.headers);
    response
}

/// Adds the meter's headers to `map`.
pub fn insert_headers(map: &mut HeaderMap, headers: crate::meter::Headers) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::try_from(value) {
            map.insert(HeaderName::from_static(name), value);
        }
    }
}

static API_KEY: HeaderName = HeaderName::from_static(crate::meter::header_names::X_API_KEY);

/// The credential of `Authorization: Bearer <credential>` (scheme in any case, spaces
/// around the credential ignored). Every route that takes a bearer credential (API
/// keys, user tokens, the cron secret) reads it here; the error says what is wrong, for
/// the log.
///
/// ```
/// use actix_web::http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
/// use usage_door::middleware::bearer_credential;
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
        .ok_or("no Authorization header")?;
    crate::meter::bearer_credential(value.as_bytes())
}
