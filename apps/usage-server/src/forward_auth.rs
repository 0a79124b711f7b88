//! `/api/forward-auth`: a reverse proxy (nginx `auth_request`, Traefik `forwardAuth`,
//! Caddy `forward_auth`, Envoy `ext_authz`) asks before passing a call to an upstream in
//! any language. The decision and the recording are the meter's, as for `/api/v1`, and
//! the translation is `usage_door::forward_auth`'s; this module routes and documents.

use actix_web::{HttpRequest, HttpResponse, web};
pub(crate) use usage_door::forward_auth::ForwardAuth;

use crate::api_types::{ErrorResponse, QuotaExceeded, Registry};

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
        auth.decide(&req, None).await
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
        auth.decide(&req, Some(path.into_inner())).await
    }
);
