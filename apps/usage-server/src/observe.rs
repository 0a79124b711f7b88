//! Around every request: an `X-Request-Id` (the caller's when well-formed, else a new
//! one) echoed in the response and carried by the `request` span every log line of the
//! call is in, and the request's latency in `/metrics` by route pattern, method and
//! status.

use foldhash::HashMap;
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::future::{Ready, ready};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::Error;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::Method;
use actix_web::http::header::{HeaderName, HeaderValue};
use futures_util::future::LocalBoxFuture;
use prometheus::Histogram;
use tracing::Instrument;

use crate::metrics::Metrics;

/// The header, both ways.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The route label of a request no route matched.
const UNMATCHED: &str = "unmatched";

/// Longest id taken from a caller.
const MAX_ID_LEN: usize = 128;

/// The caller's id when it is 1 to 128 of `A-Z a-z 0-9 . _ -` (a UUID, a ULID, a
/// proxy's token), else a new random UUID: nothing else reaches the logs or the
/// response.
pub(crate) fn request_id(presented: Option<&HeaderValue>) -> HeaderValue {
    let well_formed = |id: &[u8]| {
        !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if let Some(id) = presented.filter(|v| well_formed(v.as_bytes())) {
        return id.clone();
    }
    // From the thread's generator, not the OS: no system call per request.
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut text))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The method as a label: the standard ones by name, any other as `OTHER` (a client
/// choosing methods must not choose how many series there are).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

/// The middleware (`App::wrap`).
#[derive(Clone)]
pub(crate) struct Observe {
    metrics: Arc<Metrics>,
}

impl Observe {
    /// Observing into `metrics`.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S, B> Transform<S, ServiceRequest> for Observe
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Transform = ObserveService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ObserveService {
            service: Rc::new(service),
            metrics: Arc::clone(&self.metrics),
            histograms: Rc::default(),
        }))
    }
}

/// [`Observe`] around one service (one per worker thread).
pub(crate) struct ObserveService<S> {
    service: Rc<S>,
    metrics: Arc<Metrics>,
    /// This worker's handles on the latency histogram's series: the shared family is
    /// looked up (label hashing under its lock) once per series, not once per request.
    /// Bounded: routes are patterns, methods and statuses come from short lists.
    histograms: Rc<RefCell<HashMap<Series, Histogram>>>,
}

impl<S, B> Service<ServiceRequest> for ObserveService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let started = Instant::now();
        let id = request_id(req.headers().get(&X_REQUEST_ID));
        // `%`: written as it is; a `&str` field would be escaped character by character
        // (it is only ever letters, digits, `.`, `_` and `-`).
        let span = tracing::info_span!("request", request_id = %id.to_str().unwrap_or_default());
        let method = method_label(req.method());
        let call = span.in_scope(|| self.service.call(req));
        let metrics = Arc::clone(&self.metrics);
        let histograms = Rc::clone(&self.histograms);
        Box::pin(async move {
            let mut res = call.instrument(span).await?;
            let took = started.elapsed();
            let route = res
                .request()
                .match_pattern()
                .unwrap_or_else(|| UNMATCHED.to_owned());
            let series = (route, method, res.status().as_u16());
            observe_latency(&metrics, &mut histograms.borrow_mut(), series, took);
            res.headers_mut().insert(X_REQUEST_ID, id);
            Ok(res)
        })
    }
}

/// A route pattern, method label and status: one series of the latency histogram.
type Series = (String, &'static str, u16);

/// Adds `took` to its series, through this worker's handle on it.
fn observe_latency(
    metrics: &Metrics,
    handles: &mut HashMap<Series, Histogram>,
    series: Series,
    took: std::time::Duration,
) {
    let handle = match handles.entry(series) {
        Entry::Occupied(known) => known.into_mut(),
        Entry::Vacant(new) => {
            let (route, method, status) = new.key();
            match metrics.request_histogram(route, method, &status.to_string()) {
                Some(handle) => new.insert(handle),
                None => return,
            }
        }
    };
    handle.observe(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids_are_kept_and_others_replaced() {
        let id = |s: &str| request_id(Some(&HeaderValue::from_str(s).unwrap()));
        let uuid = "3f2b9c1e-7d4a-4b8e-9f00-1a2b3c4d5e6f";
        assert_eq!(id(uuid), uuid);
        assert_eq!(id("req_01HX.abc-DEF"), "req_01HX.abc-DEF");
        assert_eq!(id(&"a".repeat(128)), "a".repeat(128).as_str());
        for bad in [
            "",
            "has space",
            "semi;colon",
            "quote\"",
            "a/b",
            &"a".repeat(129),
        ] {
            let new = id(bad);
            assert_ne!(new, bad);
            let parsed = uuid::Uuid::parse_str(new.to_str().unwrap()).unwrap();
            assert_eq!(parsed.get_version_num(), 4, "{new:?}");
        }
        let (a, b) = (request_id(None), request_id(None));
        assert_ne!(a, b, "each new id is new");
    }

    #[test]
    fn methods_outside_the_standard_set_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::TRACE), "TRACE");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "OTHER");
    }
}
