//! The OpenAPI 3.1 document (`GET /api/openapi.json`) and the interactive docs
//! (`GET /api/docs`, Swagger UI served from the binary).
//!
//! Each handler carries its own `#[utoipa::path]`; routes are registered with the path
//! that annotation declares ([`Registry::path`]), so a registered route and its
//! documentation cannot drift apart, and the test in this module checks that the routes
//! registered and the operations documented are the same set.

use std::collections::BTreeSet;

use actix_web::web;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

/// The routes registered, as (method, path), collected while the routes are configured.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    routes: BTreeSet<(String, String)>,
}

impl Registry {
    /// The full path of the operation `P` documents, noting its methods as registered.
    pub(crate) fn path<P: utoipa::Path>(&mut self) -> String {
        let path = P::path();
        for method in P::methods() {
            let name = serde_json::to_value(method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_uppercase))
                .unwrap_or_default();
            self.routes.insert((name, path.clone()));
        }
        path
    }

    /// As [`Self::path`], relative to the scope `prefix` it is registered in.
    pub(crate) fn path_in<P: utoipa::Path>(&mut self, prefix: &str) -> String {
        let path = self.path::<P>();
        path.strip_prefix(prefix)
            .map_or(path.clone(), str::to_owned)
    }

    /// The methods registered at `path` (a full path), for `Allow`.
    pub(crate) fn allow(&self, path: &str) -> String {
        self.routes
            .iter()
            .filter(|(_, p)| p == path)
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What was registered.
    #[cfg(test)]
    pub(crate) fn routes(&self) -> &BTreeSet<(String, String)> {
        &self.routes
    }
}

/// The contract's error body.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorResponse {
    /// snake_case code, e.g. `invalid_parameter`.
    #[schema(example = "invalid_parameter")]
    pub error: String,
    /// A sentence for a person; a bad parameter is named with its allowed range.
    #[schema(example = "days must be a whole number from 1 to 365 (got \"0\")")]
    pub message: String,
}

/// The 429 of a metered call over its monthly quota.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QuotaExceeded {
    /// `quota_exceeded`, or `rate_limited` for the short window.
    #[schema(example = "quota_exceeded")]
    pub error: String,
    /// What happened and what to do.
    pub message: String,
    /// The monthly limit.
    pub limit: Option<u64>,
    /// When the period ends (RFC 3339).
    pub reset_at: Option<String>,
}

/// Errors of every endpoint with a user JWT.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum UserErrors {
    /// The body or a parameter is not valid; the message names it and its range.
    #[response(status = 400)]
    Invalid(ErrorResponse),
    /// Missing or bad user token (`WWW-Authenticate: Bearer`).
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// The database did not answer; try again (`Retry-After`).
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// Errors of every admin endpoint.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum AdminErrors {
    /// A parameter is not valid; the message names it and its range.
    #[response(status = 400)]
    Invalid(ErrorResponse),
    /// Missing or bad user token.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// A valid token of someone not in `ADMIN_ECO_IDS`.
    #[response(status = 403)]
    Forbidden(ErrorResponse),
    /// Too many admin requests (`Retry-After`).
    #[response(status = 429)]
    RateLimited(ErrorResponse),
    /// The database did not answer.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// Errors of every cron endpoint.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum CronErrors {
    /// A parameter is not valid.
    #[response(status = 400)]
    Invalid(ErrorResponse),
    /// Missing or wrong cron secret.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// `CRON_SECRET` is not set: the cron endpoints do not exist.
    #[response(status = 404)]
    NotConfigured(ErrorResponse),
    /// The database (or Stripe, for billing) is unavailable.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// `days` of the history.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct HistoryParams {
    /// Days back, today included.
    #[param(minimum = 1, maximum = 365, default = 30)]
    days: Option<u32>,
}

/// `days` of the endpoint statistics.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct EndpointParams {
    /// Days back, today included.
    #[param(minimum = 1, maximum = 90, default = 7)]
    days: Option<u32>,
}

/// The range and page of `GET /api/usage/events`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct EventParams {
    /// First instant included (RFC 3339); default: the period's start. Before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// First instant excluded (RFC 3339); default: now.
    #[param(format = DateTime)]
    to: Option<String>,
    /// Calls per page.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page, as it was returned.
    #[param(pattern = r"^-?[0-9]{1,19}\.[0-9a-f]{32}$")]
    cursor: Option<String>,
}

/// A page of an admin list.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct PageParams {
    /// 1-based page.
    #[param(minimum = 1, maximum = 1000000, default = 1)]
    page: Option<u64>,
    /// Items per page.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<u32>,
}

/// What the users list can be sorted by.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub(crate) enum UserSortParam {
    /// Calls this period.
    ApiCalls,
    /// Sign-up time.
    CreatedAt,
    /// Email.
    Email,
    /// Plan price plus this period's overage.
    Revenue,
}

/// Sort direction.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum OrderParam {
    /// Smallest first.
    Asc,
    /// Largest first.
    Desc,
}

/// The users list's filters, sort and page.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct UserListParams {
    /// 1-based page.
    #[param(minimum = 1, maximum = 1000000, default = 1)]
    page: Option<u64>,
    /// Items per page.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<u32>,
    /// Only users of this plan.
    #[param(inline)]
    plan: Option<usage_core::Plan>,
    /// Sort key.
    #[param(inline)]
    sort: Option<UserSortParam>,
    /// Direction.
    #[param(inline)]
    order: Option<OrderParam>,
    /// Matches email or id (up to 100 characters, no control characters).
    #[param(max_length = 100, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    q: Option<String>,
}

/// A billing run.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct BillingParams {
    /// Say what would be billed; record and send nothing.
    dry_run: Option<bool>,
}

/// The day to aggregate.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct AggregateParams {
    /// `YYYY-MM-DD`, not in the future; default: yesterday (UTC).
    #[param(format = Date)]
    date: Option<String>,
}

/// `PATCH /api/admin/users/{id}`: at least one of the two.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
#[allow(dead_code)]
pub(crate) struct UserPatchBody {
    /// The new plan.
    #[schema(required = false)]
    plan: usage_core::Plan,
    /// `cus_` then letters and digits; null unlinks.
    #[schema(pattern = "^cus_[A-Za-z0-9]{1,250}$")]
    stripe_customer_id: Option<String>,
}

/// The security schemes: API keys (two headers), user and admin JWTs, the cron secret,
/// Stripe's signature.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str, format: Option<&str>| {
            let mut http = HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(description));
            if let Some(format) = format {
                http = http.bearer_format(format);
            }
            SecurityScheme::Http(http.build())
        };
        components.add_security_scheme(
            "api_key",
            bearer("An API key, `eco_live_...`, as a bearer token.", None),
        );
        components.add_security_scheme(
            "api_key_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "An API key, `eco_live_...`.",
            ))),
        );
        components.add_security_scheme(
            "user_jwt",
            bearer(
                "A user JWT (HS256, `aud` JWT_AUDIENCE, `exp` required).",
                Some("JWT"),
            ),
        );
        components.add_security_scheme(
            "admin_jwt",
            bearer(
                "A user JWT whose `sub` is listed in ADMIN_ECO_IDS.",
                Some("JWT"),
            ),
        );
        components.add_security_scheme(
            "cron_secret",
            bearer("CRON_SECRET, compared in constant time.", None),
        );
        components.add_security_scheme(
            "stripe_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Stripe-Signature",
                "`t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<raw body>\">`",
            ))),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "nexus-usage",
        description = "Usage metering, API keys, monthly quotas and overage billing. \
                       The prose contract is docs/API.md.",
    ),
    modifiers(&SecuritySchemes),
    paths(
        crate::http::ping,
        crate::http::healthz,
        crate::http::readyz,
        crate::http::metrics_text,
        crate::http::current_usage,
        crate::http::overage,
        crate::http::charges,
        crate::http::events,
        crate::http::history,
        crate::http::endpoints,
        crate::keys_api::create,
        crate::keys_api::list,
        crate::keys_api::revoke,
        crate::keys_api::rotate,
        crate::admin_api::overview,
        crate::admin_api::users,
        crate::admin_api::user,
        crate::admin_api::update_user,
        crate::admin_api::audit,
        crate::cron_api::process_overage,
        crate::cron_api::aggregate_daily,
        crate::cron_api::overage_reconciliation,
        crate::webhooks_api::stripe,
        crate::forward_auth::forward_auth,
        crate::forward_auth::forward_auth_path,
        openapi_json,
        docs,
    ),
    tags(
        (name = "metered", description = "Behind the usage middleware (API key)."),
        (name = "usage", description = "The caller's own figures and calls (user JWT)."),
        (name = "keys", description = "The caller's API keys (user JWT)."),
        (name = "admin", description = "Business figures and users (admin JWT), audited."),
        (name = "cron", description = "Jobs for a scheduler (cron secret)."),
        (name = "stripe", description = "Stripe's webhook."),
        (name = "forward-auth", description = "Metering for any upstream behind a reverse proxy (API key)."),
        (name = "operations", description = "Health, readiness, metrics, this document."),
    )
)]
pub(crate) struct ApiDoc;

/// The document itself.
#[utoipa::path(get, path = "/api/openapi.json", tag = "operations",
    responses((status = 200, description = "This OpenAPI 3.1 document.", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> actix_web::HttpResponse {
    // Built once: the document only changes with the binary.
    static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        serde_json::to_string(&ApiDoc::openapi()).unwrap_or_else(|_| "{}".to_owned())
    });
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT.as_str())
}

/// The interactive docs: a redirect to Swagger UI, served from the binary under
/// `/api/docs/` (its files are not API operations, and are not in the document).
#[utoipa::path(get, path = "/api/docs", tag = "operations",
    responses((status = 302, description = "To the interactive docs at `/api/docs/`.",
               headers(("Location" = String, description = "`/api/docs/`")))))]
pub(crate) async fn docs() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Found()
        .insert_header(("Location", "/api/docs/"))
        .finish()
}

/// `GET /api/openapi.json`, `GET /api/docs` and the Swagger UI under `/api/docs/`.
pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    use crate::http::method_not_allowed;
    let json = registry.path::<__path_openapi_json>();
    let docs_path = registry.path::<__path_docs>();
    cfg.service(
        web::resource(&json)
            .route(web::get().to(openapi_json))
            .default_service(method_not_allowed(registry.allow(&json))),
    )
    .service(
        web::resource(&docs_path)
            .route(web::get().to(docs))
            .default_service(method_not_allowed(registry.allow(&docs_path))),
    )
    .service(
        utoipa_swagger_ui::SwaggerUi::new("/api/docs/{_:.*}")
            .config(utoipa_swagger_ui::Config::new(["/api/openapi.json"])),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route registered is documented, and every operation documented is
    /// registered: the same set, read from the same registration code the server runs.
    #[test]
    fn registered_routes_and_documented_operations_are_the_same() {
        let mut registry = Registry::default();
        let _app = actix_web::App::new().configure(|cfg| {
            crate::http::routes(cfg, &mut registry, None, std::time::Duration::from_secs(10));
        });
        let doc = ApiDoc::openapi();
        let mut documented = BTreeSet::new();
        for (path, item) in &doc.paths.paths {
            let json = serde_json::to_value(item).unwrap_or_default();
            for method in [
                "get", "post", "put", "patch", "delete", "head", "options", "trace",
            ] {
                if json.get(method).is_some() {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        assert_eq!(registry.routes(), &documented);
        // The contract's endpoints are all there (a registration dropped by mistake would
        // leave both sets smaller and equal).
        for (method, path) in [
            ("GET", "/api/v1/ping"),
            ("GET", "/api/usage/current"),
            ("GET", "/api/usage/history"),
            ("GET", "/api/usage/endpoints"),
            ("GET", "/api/usage/overage"),
            ("GET", "/api/usage/charges"),
            ("GET", "/api/usage/events"),
            ("POST", "/api/keys"),
            ("GET", "/api/keys"),
            ("DELETE", "/api/keys/{id}"),
            ("POST", "/api/keys/{id}/rotate"),
            ("GET", "/api/admin/analytics/overview"),
            ("GET", "/api/admin/analytics/users"),
            ("GET", "/api/admin/users/{id}"),
            ("PATCH", "/api/admin/users/{id}"),
            ("POST", "/api/cron/process-overage"),
            ("POST", "/api/cron/aggregate-daily"),
            ("POST", "/api/webhooks/stripe"),
            ("GET", "/api/openapi.json"),
            ("GET", "/api/docs"),
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/metrics"),
        ] {
            assert!(
                documented.contains(&(method.to_owned(), path.to_owned())),
                "{method} {path} is not documented"
            );
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_security_and_errors() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
        for scheme in [
            "api_key",
            "api_key_header",
            "user_jwt",
            "admin_jwt",
            "cron_secret",
            "stripe_signature",
        ] {
            assert!(schemes.contains_key(scheme), "{scheme}");
        }
        // Every operation but the public ones needs credentials and documents its errors.
        let public = [
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/openapi.json",
            "/api/docs",
        ];
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if public.contains(&path.as_str()) {
                    continue;
                }
                assert!(op["security"].is_array(), "{method} {path} has no security");
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('4')),
                    "{method} {path} documents no error"
                );
            }
        }
        // What Schemathesis found the schema did not say (each a 400 for schema-valid
        // input before): the patch needs a field and its plan is never null; a key name
        // has no control characters; a cursor has its own shape.
        let patch = &doc["components"]["schemas"]["UserPatchBody"];
        assert_eq!(patch["minProperties"], 1, "{patch}");
        assert_eq!(
            patch["properties"]["plan"]["$ref"], "#/components/schemas/Plan",
            "{patch}"
        );
        let name = &doc["components"]["schemas"]["CreateKey"]["properties"]["name"];
        assert!(
            name["pattern"]
                .as_str()
                .unwrap()
                .contains("\\u0000-\\u001F"),
            "{name}"
        );
        let cursor = doc["paths"]["/api/usage/events"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "cursor")
            .unwrap()
            .clone();
        assert!(cursor["schema"]["pattern"].is_string(), "{cursor}");
        let days = &doc["paths"]["/api/usage/history"]["get"]["parameters"][0];
        assert_eq!(
            (days["name"].as_str(), days["schema"]["maximum"].as_u64()),
            (Some("days"), Some(365))
        );
    }
}
