//! `/api/forward-auth`: a reverse proxy (nginx `auth_request`, Traefik `forwardAuth`,
//! Caddy `forward_auth`, Envoy `ext_authz`) asks before passing a call to an upstream in
//! any language. The decision and the recording are the [`Meter`]'s, as for `/api/v1`;
//! this only reads the original method and path from the proxy's headers.

use std::sync::Arc;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use usage_core::endpoint::EndpointPatterns;
use usage_core::meter::{Admission, Meter};
use usage_core::middleware::{insert_headers, refusal_response};

use crate::api_types::{ErrorResponse, QuotaExceeded, Registry};

/// The meter and how endpoints are named.
pub(crate) struct ForwardAuth {
    meter: Arc<Meter>,
    patterns: EndpointPatterns,
}

impl ForwardAuth {
    pub(crate) fn new(meter: Arc<Meter>, patterns: EndpointPatterns) -> Self {
        Self { meter, patterns }
    }
}

/// The refusal's JSON body, repeated as a header of forward-auth refusals.
static REFUSAL_BODY: header::HeaderName = header::HeaderName::from_static("x-usage-refusal");

/// Where the bare endpoint ends: `/api/forward-auth/<original path>` carries the path.
const PREFIX: &str = "/api/forward-auth";

pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    cfg.service(web::resource(registry.path::<__path_forward_auth>()).to(forward_auth));
    // The documented `{path}` is one segment; the route takes the rest of the path.
    registry.path::<__path_forward_auth_path>();
    cfg.service(web::resource(format!("{PREFIX}/{{path:.*}}")).to(forward_auth_path));
}

/// The rate-limit headers of metered answers, for the document.
macro_rules! decision_doc {
    ($path:literal, $summary:literal, [$($params:tt)*], $handler:item) => {
        #[doc = $summary]
        #[utoipa::path(method(get, post, put, patch, delete, head, options, trace), path = $path,
            tag = "forward-auth",
            security(("api_key" = []), ("api_key_header" = [])),
            params(
                ("X-Forwarded-Method" = Option<String>, Header, description = "The original method, set by the proxy (overwriting any the client sent); wins over `X-Original-Method`. Default: this request's."),
                ("X-Forwarded-Uri" = Option<String>, Header, description = "The original path and query, set by the proxy (overwriting any the client sent); wins over `X-Original-URI`. Default: the path after `/api/forward-auth`."),
                $($params)*
            ),
            responses(
                (status = 200, description = "Allowed: pass the call on. Empty body.", headers(
                    ("X-Usage-User-Id" = String, description = "The caller."),
                    ("X-Usage-Key-Id" = String, description = "The key used."),
                    ("X-Usage-Plan" = String, description = "`free`, `pro` or `enterprise`."),
                    ("X-RateLimit-Limit" = u64, description = "Monthly calls (limited plans)."),
                    ("X-RateLimit-Remaining" = u64, description = "Calls left this period, never negative."),
                    ("X-RateLimit-Reset" = u64, description = "Unix seconds when the period ends."),
                    ("RateLimit-Policy" = String, description = "IETF policies, e.g. `\"monthly\";q=1000;w=2592000`."),
                    ("RateLimit" = String, description = "IETF state, e.g. `\"monthly\";r=999;t=864000`."))),
                (status = 401, description = "Missing, unknown, revoked or expired API key.", body = ErrorResponse),
                (status = 429, description = "Over the monthly quota or the short window.", body = QuotaExceeded, headers(
                    ("Retry-After" = u64, description = "Seconds."),
                    ("RateLimit-Policy" = String), ("RateLimit" = String))),
                (status = 503, description = "The database did not answer and the key was not known.", body = ErrorResponse),
            ))]
        $handler
    };
}

decision_doc!(
    "/api/forward-auth",
    "Meter a call a proxy is about to pass on: 200 to allow, else the metered API's refusal.",
    [],
    async fn forward_auth(req: HttpRequest, auth: web::Data<ForwardAuth>) -> HttpResponse {
        decide(&req, &auth, None).await
    }
);

decision_doc!(
    "/api/forward-auth/{path}",
    "As `/api/forward-auth`, with the original path in the URL (when no header carries it).",
    [(
        "path" = String,
        Path,
        description = "The original path, without its leading `/`."
    ),],
    async fn forward_auth_path(
        req: HttpRequest,
        auth: web::Data<ForwardAuth>,
        path: web::Path<String>,
    ) -> HttpResponse {
        decide(&req, &auth, Some(path.into_inner())).await
    }
);

async fn decide(req: &HttpRequest, auth: &ForwardAuth, tail: Option<String>) -> HttpResponse {
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
        Some(uri) => auth.patterns.endpoint(uri),
        None => auth
            .patterns
            .endpoint(&format!("/{}", tail.unwrap_or_default())),
    };

    let admission = auth
        .meter
        .admit(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            headers.get("x-api-key").map(HeaderValue::as_bytes),
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
    auth.meter.record(call, &method, endpoint, 200).await;
    response
}
