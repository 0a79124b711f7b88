//! The tower adapter: a [`MeteringLayer`] for axum 0.8 and any other tower (`http` 1.x)
//! service, over the same [`Meter`] as the actix middleware. It only translates.
//!
//! ```ignore
//! let app = Router::new()
//!     .route("/v1/items/{id}", get(item))
//!     .layer(MeteringLayer::new(meter));
//! // In a handler: `Extension(caller): Extension<Caller>`.
//! ```
//!
//! The endpoint recorded is, in order: an [`Endpoint`] a layer inside put in the request's
//! extensions; axum's `MatchedPath` (feature `axum`); else the path through
//! [`EndpointPatterns`] (templates you give, id-like segments as `{id}`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::endpoint::EndpointPatterns;
use crate::meter::{Admission, Headers, Meter, Refusal};
use crate::report::Reported;

/// The route pattern of a request, for services that know it better than its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint(pub String);

/// Meters every request through the services it wraps.
#[derive(Clone)]
pub struct MeteringLayer {
    meter: Arc<Meter>,
    patterns: Arc<EndpointPatterns>,
}

impl MeteringLayer {
    /// A layer over `meter`.
    pub fn new(meter: Arc<Meter>) -> Self {
        Self {
            meter,
            patterns: Arc::new(EndpointPatterns::default()),
        }
    }

    /// Route templates for requests without a known route pattern.
    pub fn with_patterns(mut self, patterns: EndpointPatterns) -> Self {
        self.patterns = Arc::new(patterns);
        self
    }
}

impl<S> Layer<S> for MeteringLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            meter: Arc::clone(&self.meter),
            patterns: Arc::clone(&self.patterns),
        }
    }
}

/// A service behind the meter.
#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
    patterns: Arc<EndpointPatterns>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Metered<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let meter = Arc::clone(&self.meter);
        let patterns = Arc::clone(&self.patterns);
        Box::pin(async move {
            let endpoint = endpoint_of(&req, &patterns);
            let method = req.method().clone();
            let headers = req.headers();
            let admission = meter
                .admit_route(
                    headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
                    headers.get(&API_KEY).map(HeaderValue::as_bytes),
                    method.as_str(),
                    || Some(endpoint.clone()),
                )
                .await;
            let call = match admission {
                Admission::Admitted(call) => call,
                Admission::Refused(refusal) => return Ok(refusal_response(refusal)),
            };
            req.extensions_mut().insert(call.caller().clone());

            let mut result = inner.call(req).await;
            // A service error has no response: it is recorded as a 500.
            let (status, reported) = match &mut result {
                Ok(res) => (res.status(), res.extensions_mut().remove::<Reported>()),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
            };
            let rate_headers = call.headers();
            let units = reported.map(Reported::into_units).unwrap_or_default();
            meter
                .record_units(call, method.as_str(), endpoint, status.as_u16(), units)
                .await;
            let mut res = result?;
            insert_headers(res.headers_mut(), rate_headers);
            Ok(res)
        })
    }
}

static API_KEY: HeaderName = HeaderName::from_static(crate::meter::header_names::X_API_KEY);

fn endpoint_of<B>(req: &Request<B>, patterns: &EndpointPatterns) -> String {
    if let Some(Endpoint(endpoint)) = req.extensions().get::<Endpoint>() {
        return endpoint.clone();
    }
    #[cfg(feature = "axum")]
    if let Some(matched) = req.extensions().get::<axum::extract::MatchedPath>() {
        return matched.as_str().to_owned();
    }
    patterns.endpoint(req.uri().path())
}

/// The response for a refusal: its status, headers and JSON body.
pub fn refusal_response<B: From<String>>(refusal: Refusal) -> Response<B> {
    let mut response = Response::new(B::from(refusal.body));
    *response.status_mut() =
        StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    insert_headers(response.headers_mut(), refusal.headers);
    response
}

/// Adds the meter's headers to `map`.
pub fn insert_headers(map: &mut http::HeaderMap, headers: Headers) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::try_from(value) {
            map.insert(HeaderName::from_static(name), value);
        }
    }
}
