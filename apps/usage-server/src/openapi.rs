//! The OpenAPI 3.1 document (`GET /api/openapi.json`) and the interactive docs
//! (`GET /api/docs`, Swagger UI served from the binary).
//!
//! Each handler carries its own `#[utoipa::path]`; routes are registered with the path
//! that annotation declares ([`Registry::path`]), so a registered route and its
//! documentation cannot drift apart, and the test in this module checks that the routes
//! registered and the operations documented are the same set.

use actix_web::web;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api_types::Registry;
use crate::state::method_not_allowed;

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
            "ingest_secret",
            bearer("INGEST_SECRET, compared in constant time.", None),
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
        crate::ops_api::ping,
        crate::ops_api::healthz,
        crate::ops_api::readyz,
        crate::ops_api::metrics_text,
        crate::user_api::current_usage,
        crate::user_api::overage,
        crate::user_api::charges,
        crate::user_api::events,
        crate::user_api::history,
        crate::user_api::endpoints,
        crate::keys_api::create,
        crate::keys_api::list,
        crate::keys_api::revoke,
        crate::keys_api::rotate,
        crate::admin_api::overview,
        crate::admin_api::users,
        crate::admin_api::user,
        crate::admin_api::update_user,
        crate::admin_api::audit,
        crate::plans_api::list,
        crate::plans_api::plan,
        crate::plans_api::create,
        crate::plans_api::revise,
        crate::plans_api::archive,
        crate::plans_api::quote,
        crate::meters_api::list,
        crate::meters_api::meter,
        crate::meters_api::create,
        crate::meters_api::update,
        crate::meters_api::top,
        crate::meters_api::costs,
        crate::meters_api::replace_costs,
        crate::cron_api::process_overage,
        crate::cron_api::aggregate_daily,
        crate::cron_api::overage_reconciliation,
        crate::webhooks_api::stripe,
        crate::events_api::ingest,
        crate::forward_auth::forward_auth,
        crate::forward_auth::forward_auth_path,
        openapi_json,
        docs,
    ),
    tags(
        (name = "metered", description = "Behind the usage middleware (API key)."),
        (name = "usage", description = "The caller's own figures and calls (user JWT)."),
        (name = "keys", description = "The caller's API keys (user JWT)."),
        (name = "admin", description = "Business figures, users and the plan catalog (admin JWT), audited."),
        (name = "cron", description = "Jobs for a scheduler (cron secret)."),
        (name = "stripe", description = "Stripe's webhook."),
        (name = "events", description = "Usage any service sends, as CloudEvents (ingest secret)."),
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
