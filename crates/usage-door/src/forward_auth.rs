//! Forward auth: a reverse proxy (nginx `auth_request`, Traefik `forwardAuth`, Caddy
//! `forward_auth`, Envoy `ext_authz`) asks before passing a call on. The same meter as
//! the middleware decides and records; this reads the original method and path from the
//! proxy's headers and answers in the proxy's terms (docs/FORWARD_AUTH.md).

use std::sync::Arc;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};

use crate::endpoint::EndpointPatterns;
use crate::meter::header_names::X_API_KEY;
use crate::meter::{Admission, Meter};
use crate::middleware::{insert_headers, refusal_response};

/// The meter and how endpoints are named.
pub struct ForwardAuth {
    meter: Arc<Meter>,
    patterns: EndpointPatterns,
}

impl ForwardAuth {
    /// Decides with `meter`, naming endpoints by `patterns`.
    pub fn new(meter: Arc<Meter>, patterns: EndpointPatterns) -> Self {
        Self { meter, patterns }
    }
}

/// The refusal's JSON body, repeated as a header of forward-auth refusals.
pub static REFUSAL_BODY: header::HeaderName = header::HeaderName::from_static("x-usage-refusal");

impl ForwardAuth {
    /// The answer to a proxy's question about `req` (`tail`: the original path when the
    /// URL carries it): 200 with the caller's headers, or the meter's refusal with its
    /// body repeated in [`REFUSAL_BODY`]. The admitted call is recorded.
    pub async fn decide(&self, req: &HttpRequest, tail: Option<String>) -> HttpResponse {
        let headers = req.headers();
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let method = text("x-forwarded-method")
            .or_else(|| text("x-original-method"))
            .unwrap_or(req.method().as_str())
            .to_ascii_uppercase();
        let endpoint = match text("x-forwarded-uri").or_else(|| text("x-original-uri")) {
            Some(uri) => self.patterns.endpoint(uri),
            None => self
                .patterns
                .endpoint(&format!("/{}", tail.unwrap_or_default())),
        };

        let admission = self
            .meter
            .admit_route(
                headers
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes),
                headers.get(X_API_KEY).map(HeaderValue::as_bytes),
                &method,
                || Some(endpoint.clone()),
            )
            .await;
        let call = match admission {
            Admission::Admitted(call) => call,
            Admission::Refused(refusal) => {
                // nginx's `auth_request` keeps a refusal's headers but not its body: the body
                // also travels as a header, for the proxy to answer with (docs/FORWARD_AUTH.md).
                let body = HeaderValue::from_str(&refusal.body).ok();
                let mut response = refusal_response(refusal);
                if let Some(body) = body {
                    response.headers_mut().insert(REFUSAL_BODY.clone(), body);
                }
                return response;
            }
        };
        let mut response = HttpResponse::Ok();
        let caller = call.caller();
        response
            .insert_header(("x-usage-user-id", caller.user_id.to_string()))
            .insert_header(("x-usage-key-id", caller.api_key_id.to_string()))
            .insert_header(("x-usage-plan", caller.plan.as_str()));
        let mut response = response.finish();
        insert_headers(response.headers_mut(), call.headers());
        // The upstream's status is the proxy's to know; the call is recorded as admitted (200)
        // with the time the decision took.
        let method = if method.len() <= 16 && method.bytes().all(|b| b.is_ascii_alphabetic()) {
            method
        } else {
            "OTHER".to_owned()
        };
        self.meter.record(call, &method, endpoint, 200).await;
        response
    }
}
