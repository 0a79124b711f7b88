//! Every route of the server, in the order actix tries them, each path taken from its
//! handler's OpenAPI annotation through a [`Registry`].

use actix_web::web;
use usage_door::middleware::Metering;
use utoipa::Path as _;

use crate::api_types::Registry;
use crate::body_deadline::BodyDeadline;
use crate::ops_api::{__path_ping, ping, ping_reporting_units, ping_unmetered};
use crate::state::{method_not_allowed, not_found};
use crate::{
    admin_api, cron_api, events_api, forward_auth, keys_api, openapi, ops_api, user_api,
    webhooks_api,
};

/// How the sample route is served.
pub(crate) struct Sample {
    /// The middleware; `None`: the bare route of `--bench-unmetered`.
    pub(crate) metering: Option<Metering>,
    /// `--bench-report-units`: the route reports units with each response.
    pub(crate) report_units: bool,
}

/// Every route: the metered API under `/api/v1` (as `sample` says), the user, keys, admin,
/// cron and webhook endpoints, operations and the API description. Each path comes from
/// its handler's OpenAPI annotation, through `registry`.
pub(crate) fn routes(
    cfg: &mut web::ServiceConfig,
    registry: &mut Registry,
    sample: Sample,
    body_timeout: std::time::Duration,
) {
    // The metered API and forward auth first: they are the hot path, and actix tries the
    // routes in order (a regex for each one with a parameter).
    let ping_path = registry.path_in::<__path_ping>("/api/v1");
    let handler = if sample.report_units {
        web::get().to(ping_reporting_units)
    } else {
        web::get().to(ping)
    };
    match sample.metering {
        Some(metering) => cfg.service(
            web::scope("/api/v1")
                .wrap(metering)
                .service(
                    web::resource(ping_path)
                        .route(handler)
                        .default_service(method_not_allowed(registry.allow(&__path_ping::path()))),
                )
                .default_service(web::to(not_found)),
        ),
        None => cfg.service(web::scope("/api/v1").route(&ping_path, web::get().to(ping_unmetered))),
    };
    forward_auth::routes(cfg, registry);
    // Every other route, behind the body deadline (the two above read no body).
    let mut rest = web::scope("")
        .wrap(BodyDeadline::new(body_timeout))
        .default_service(web::to(not_found));
    rest = rest.configure(|cfg| {
        ops_api::routes(cfg, registry);
        user_api::routes(cfg, registry);
        keys_api::routes(cfg, registry);
        cron_api::routes(cfg, registry);
        admin_api::routes(cfg, registry);
        webhooks_api::routes(cfg, registry);
        events_api::routes(cfg, registry);
        openapi::routes(cfg, registry);
        usage_web::configure(cfg);
    });
    cfg.service(rest);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use utoipa::OpenApi as _;

    use super::*;
    use crate::openapi::ApiDoc;

    /// Every route registered is documented, and every operation documented is
    /// registered: the same set, read from the same registration code the server runs.
    #[test]
    fn registered_routes_and_documented_operations_are_the_same() {
        let mut registry = Registry::default();
        let _app = actix_web::App::new().configure(|cfg| {
            let sample = Sample {
                metering: None,
                report_units: false,
            };
            routes(
                cfg,
                &mut registry,
                sample,
                std::time::Duration::from_secs(10),
            );
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
            ("GET", "/api/admin/plans"),
            ("POST", "/api/admin/plans"),
            ("GET", "/api/admin/plans/{key}"),
            ("PUT", "/api/admin/plans/{key}"),
            ("POST", "/api/admin/plans/{key}/archive"),
            ("POST", "/api/admin/plans/{key}/quote"),
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
            "ingest_secret",
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
        // A plan is a catalog key, in a body or in the users list's filter.
        let plan = &doc["components"]["schemas"]["Plan"];
        assert_eq!(plan["pattern"], "^[a-z0-9_-]{1,40}$", "{plan}");
        let filter = doc["paths"]["/api/admin/analytics/users"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "plan")
            .unwrap()
            .clone();
        assert_eq!(
            filter["schema"]["pattern"], "^[a-z0-9_-]{1,40}$",
            "{filter}"
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
