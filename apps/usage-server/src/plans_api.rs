//! The plan catalog's admin endpoints: every plan, one plan with its versions, a new plan,
//! a new version, archiving, and the quote of a period's usage. Each goes through
//! [`crate::admin_gate`] (audited with its body); the rules are `usage_core::plans`'.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use usage_core::catalog::{
    CatalogError, PlanDefinition, PlanMove, Quote, from_json, revision_from_json,
};
use usage_core::plans::{PlanDetail, PlanSummary};

use crate::ApiError;
use crate::admin_gate::{admin_body_call, admin_call, no_parameters, not_allowed};
use crate::api_types::{AdminErrors, ErrorResponse, Registry};
use crate::state::AppState;

/// Largest plan, quote, meter or costs body.
pub(crate) const MAX_PLAN_BYTES: usize = 64 * 1024;

pub(crate) fn routes(cfg: &mut web::ServiceConfig, scope: &str, registry: &mut Registry) {
    let plans_path = registry.path_in::<__path_list>(scope);
    let created_path = registry.path_in::<__path_create>(scope);
    let plan_path = registry.path_in::<__path_plan>(scope);
    let revised_path = registry.path_in::<__path_revise>(scope);
    let archive_path = registry.path_in::<__path_archive>(scope);
    let quote_path = registry.path_in::<__path_quote>(scope);
    // Noted outside an assertion: in a release build `debug_assert!` does not run.
    debug_assert_eq!(
        plans_path, created_path,
        "GET and POST share their resource"
    );
    debug_assert_eq!(plan_path, revised_path, "GET and PUT share their resource");
    let allow = |path: &str| registry.allow(&format!("{scope}{path}"));
    cfg.service(
        web::resource(&plans_path)
            .route(web::get().to(list))
            .route(web::post().to(create))
            .default_service(not_allowed(allow(&plans_path))),
    )
    .service(
        web::resource(&plan_path)
            .route(web::get().to(plan))
            .route(web::put().to(revise))
            .default_service(not_allowed(allow(&plan_path))),
    )
    .service(
        web::resource(&archive_path)
            .route(web::post().to(archive))
            .default_service(not_allowed(allow(&archive_path))),
    )
    .service(
        web::resource(&quote_path)
            .route(web::post().to(quote))
            .default_service(not_allowed(allow(&quote_path))),
    );
}

/// A refused body: which field, and what it accepts.
pub(crate) fn invalid(e: CatalogError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", e.to_string())
}

/// Every plan's newest version, with its subscribers.
#[utoipa::path(get, path = "/api/admin/plans", tag = "admin", security(("admin_jwt" = [])),
    responses((status = 200, body = Vec<PlanSummary>), AdminErrors))]
pub(crate) async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_call(&req, &state, |query| async move {
        no_parameters(&query)?;
        Ok(HttpResponse::Ok().json(plans.list().await?))
    })
    .await
}

/// One plan: its newest version, subscribers, and every version.
#[utoipa::path(get, path = "/api/admin/plans/{key}", tag = "admin", security(("admin_jwt" = [])),
    params(("key" = String, Path, description = "The plan's key.")),
    responses((status = 200, body = PlanDetail),
              (status = 404, description = "No such plan.", body = ErrorResponse), AdminErrors))]
pub(crate) async fn plan(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_call(&req, &state, |query| async move {
        no_parameters(&query)?;
        Ok(HttpResponse::Ok().json(plans.get(&path).await?))
    })
    .await
}

/// A new plan (version 1). Invalid terms are a 400 naming the field; a key that exists is
/// a 409.
#[utoipa::path(post, path = "/api/admin/plans", tag = "admin", security(("admin_jwt" = [])),
    request_body(content = PlanDefinition, content_type = "application/json"),
    responses((status = 201, body = PlanDefinition),
              (status = 409, description = "A plan has this key.", body = ErrorResponse),
              (status = 413, description = "Body over 64 KiB.", body = ErrorResponse),
              AdminErrors))]
pub(crate) async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_body_call(&req, &state, body, MAX_PLAN_BYTES, |body| async move {
        let plan: PlanDefinition = from_json(&body).map_err(invalid)?;
        let created = plans.create(&plan).await?;
        Ok(HttpResponse::Created().json(created.plan))
    })
    .await
}

/// The body of `PUT /api/admin/plans/{key}` in the API description: the plan's terms as
/// `POST` takes them (`key` may be left out; `version` is not read), and `existing`, how
/// its users move (read by `usage_core::catalog::revision_from_json`).
pub(crate) struct PlanRevision;

impl utoipa::PartialSchema for PlanRevision {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::Schema;
        use utoipa::openapi::{Ref, RefOr};
        let mut schema = <PlanDefinition as utoipa::PartialSchema>::schema();
        if let RefOr::T(Schema::Object(object)) = &mut schema {
            object.required.retain(|field| field != "key");
            object.properties.insert(
                "existing".to_owned(),
                RefOr::Ref(Ref::from_schema_name("PlanMove")),
            );
            object.description = Some(
                "The plan's terms as `POST` takes them (`key` may be left out), and how users \
                 of earlier versions move: `existing`, `next_period` by default."
                    .to_owned(),
            );
        }
        schema
    }
}

impl utoipa::ToSchema for PlanRevision {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        <PlanDefinition as utoipa::ToSchema>::schemas(schemas);
        schemas.push((
            "PlanMove".to_owned(),
            <PlanMove as utoipa::PartialSchema>::schema(),
        ));
    }
}

/// A new version of a plan: its terms replaced. Users on earlier versions move at their
/// next period, now, or never (`existing`).
#[utoipa::path(put, path = "/api/admin/plans/{key}", tag = "admin", security(("admin_jwt" = [])),
    params(("key" = String, Path, description = "The plan's key.")),
    request_body(content = PlanRevision, content_type = "application/json"),
    responses((status = 200, body = PlanDefinition),
              (status = 404, description = "No such plan.", body = ErrorResponse),
              (status = 413, description = "Body over 64 KiB.", body = ErrorResponse),
              AdminErrors))]
pub(crate) async fn revise(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_body_call(&req, &state, body, MAX_PLAN_BYTES, |body| async move {
        let (plan, existing) = revision_from_json(&path, &body).map_err(invalid)?;
        let revised = plans.revise(&plan, existing.unwrap_or_default()).await?;
        Ok(HttpResponse::Ok().json(revised.plan))
    })
    .await
}

/// Archives a plan: it takes no new subscribers; its users keep it, and its Stripe price
/// still maps to it. The default plan cannot be archived (400 `default_plan`).
#[utoipa::path(post, path = "/api/admin/plans/{key}/archive", tag = "admin",
    security(("admin_jwt" = [])),
    params(("key" = String, Path, description = "The plan's key.")),
    responses((status = 200, body = PlanDefinition),
              (status = 404, description = "No such plan.", body = ErrorResponse), AdminErrors))]
pub(crate) async fn archive(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_call(&req, &state, |query| async move {
        no_parameters(&query)?;
        Ok(HttpResponse::Ok().json(plans.set_archived(&path, true).await?.plan))
    })
    .await
}

/// The body of a quote: units used by meter.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuoteRequest {
    /// Units used in the period, by meter (`{"api_calls": 1234567}`).
    usage: BTreeMap<String, u64>,
}

/// What a period with this usage costs under the plan's newest version, line by line.
#[utoipa::path(post, path = "/api/admin/plans/{key}/quote", tag = "admin",
    security(("admin_jwt" = [])),
    params(("key" = String, Path, description = "The plan's key.")),
    request_body(content = QuoteRequest, content_type = "application/json"),
    responses((status = 200, body = Quote),
              (status = 404, description = "No such plan.", body = ErrorResponse), AdminErrors))]
pub(crate) async fn quote(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_body_call(&req, &state, body, MAX_PLAN_BYTES, |body| async move {
        let request: QuoteRequest = from_json(&body).map_err(invalid)?;
        Ok(HttpResponse::Ok().json(plans.quote(&path, &request.usage).await?))
    })
    .await
}
