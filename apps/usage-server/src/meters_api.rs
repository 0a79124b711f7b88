//! The meters' and route costs' admin endpoints: every meter, one meter, a new meter, a
//! meter renamed, and the route costs read and replaced whole. Each goes through
//! [`crate::admin_gate`] (audited with its body); the rules are `usage_core::plans`'.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use usage_analytics::admin::TopMeterUsers;
use usage_core::catalog::from_json;
use usage_core::meter::{Meter, MeterRevision, RouteCosts};

use crate::ApiError;
use crate::admin_gate::{admin_body_call, admin_call, no_parameters, not_allowed};
use crate::api_types::{AdminErrors, ErrorResponse, Registry, TopParams};
use crate::plans_api::{MAX_PLAN_BYTES, invalid};
use crate::state::AppState;

pub(crate) fn routes(cfg: &mut web::ServiceConfig, scope: &str, registry: &mut Registry) {
    let meters_path = registry.path_in::<__path_list>(scope);
    let created_path = registry.path_in::<__path_create>(scope);
    let meter_path = registry.path_in::<__path_meter>(scope);
    let updated_path = registry.path_in::<__path_update>(scope);
    let top_path = registry.path_in::<__path_top>(scope);
    let costs_path = registry.path_in::<__path_costs>(scope);
    let replaced_path = registry.path_in::<__path_replace_costs>(scope);
    debug_assert_eq!(
        meters_path, created_path,
        "GET and POST share their resource"
    );
    debug_assert_eq!(meter_path, updated_path, "GET and PUT share their resource");
    debug_assert_eq!(
        costs_path, replaced_path,
        "GET and PUT share their resource"
    );
    let allow = |path: &str| registry.allow(&format!("{scope}{path}"));
    cfg.service(
        web::resource(&meters_path)
            .route(web::get().to(list))
            .route(web::post().to(create))
            .default_service(not_allowed(allow(&meters_path))),
    )
    .service(
        web::resource(&meter_path)
            .route(web::get().to(meter))
            .route(web::put().to(update))
            .default_service(not_allowed(allow(&meter_path))),
    )
    .service(
        web::resource(&top_path)
            .route(web::get().to(top))
            .default_service(not_allowed(allow(&top_path))),
    )
    .service(
        web::resource(&costs_path)
            .route(web::get().to(costs))
            .route(web::put().to(replace_costs))
            .default_service(not_allowed(allow(&costs_path))),
    );
}

/// Every meter, `api_calls` included, by key.
#[utoipa::path(get, path = "/api/admin/meters", tag = "admin", security(("admin_jwt" = [])),
    responses((status = 200, body = Vec<Meter>), AdminErrors))]
pub(crate) async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_call(&req, &state, |query| async move {
        no_parameters(&query)?;
        let meters: Vec<Meter> = plans.meters().await?.iter().cloned().collect();
        Ok(HttpResponse::Ok().json(meters))
    })
    .await
}

/// One meter.
#[utoipa::path(get, path = "/api/admin/meters/{key}", tag = "admin", security(("admin_jwt" = [])),
    params(("key" = String, Path, description = "The meter's key.")),
    responses((status = 200, body = Meter),
              (status = 404, description = "No such meter.", body = ErrorResponse), AdminErrors))]
pub(crate) async fn meter(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_call(&req, &state, |query| async move {
        no_parameters(&query)?;
        let meters = plans.meters().await?;
        let meter = meters
            .get(&path)
            .ok_or_else(|| usage_core::plans::PlanError::UnknownMeter(path.clone()))?;
        Ok(HttpResponse::Ok().json(meter))
    })
    .await
}

/// The users with the most of a meter this period (`api_calls`: calls counted), most
/// first.
#[utoipa::path(get, path = "/api/admin/meters/{key}/top", tag = "admin", security(("admin_jwt" = [])),
    params(("key" = String, Path, description = "The meter's key."), TopParams),
    responses((status = 200, body = TopMeterUsers),
              (status = 404, description = "No such meter.", body = ErrorResponse), AdminErrors))]
pub(crate) async fn top(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (plans, reports) = (&state.plans, &state.admin_reports);
    admin_call(&req, &state, |query| async move {
        if let Some(unknown) = query.keys().find(|k| *k != "limit") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("unknown parameter {unknown:?}; allowed: limit"),
            ));
        }
        let limit = match query.get("limit") {
            None => 10,
            Some(raw) => raw
                .parse::<u32>()
                .ok()
                .filter(|l| (1..=100).contains(l))
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_parameter",
                        format!("limit must be a whole number from 1 to 100 (got {raw:?})"),
                    )
                })?,
        };
        if plans.meters().await?.get(&path).is_none() {
            return Err(usage_core::plans::PlanError::UnknownMeter(path.clone()).into());
        }
        Ok(HttpResponse::Ok().json(reports.top_by_meter(&path, limit).await?))
    })
    .await
}

/// A new meter. Invalid fields are a 400 naming the field; a key that exists is a 409.
#[utoipa::path(post, path = "/api/admin/meters", tag = "admin", security(("admin_jwt" = [])),
    request_body(content = Meter, content_type = "application/json"),
    responses((status = 201, body = Meter),
              (status = 409, description = "A meter has this key.", body = ErrorResponse),
              (status = 413, description = "Body over 64 KiB.", body = ErrorResponse),
              AdminErrors))]
pub(crate) async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_body_call(&req, &state, body, MAX_PLAN_BYTES, |body| async move {
        let meter: Meter = from_json(&body).map_err(invalid)?;
        Ok(HttpResponse::Created().json(plans.create_meter(&meter).await?))
    })
    .await
}

/// A meter's new name and unit. `aggregation` may change only while no usage of the meter
/// is stored (409 `aggregation_fixed`).
#[utoipa::path(put, path = "/api/admin/meters/{key}", tag = "admin", security(("admin_jwt" = [])),
    params(("key" = String, Path, description = "The meter's key.")),
    request_body(content = MeterRevision, content_type = "application/json"),
    responses((status = 200, body = Meter),
              (status = 404, description = "No such meter.", body = ErrorResponse),
              (status = 409, description = "The aggregation is fixed: usage is stored.",
               body = ErrorResponse),
              (status = 413, description = "Body over 64 KiB.", body = ErrorResponse),
              AdminErrors))]
pub(crate) async fn update(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_body_call(&req, &state, body, MAX_PLAN_BYTES, |body| async move {
        let revision: MeterRevision = from_json(&body).map_err(invalid)?;
        Ok(HttpResponse::Ok().json(plans.update_meter(&path, &revision).await?))
    })
    .await
}

/// Every route cost, by route then meter.
#[utoipa::path(get, path = "/api/admin/costs", tag = "admin", security(("admin_jwt" = [])),
    responses((status = 200, body = RouteCosts), AdminErrors))]
pub(crate) async fn costs(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_call(&req, &state, |query| async move {
        no_parameters(&query)?;
        Ok(HttpResponse::Ok().json(plans.costs().await?))
    })
    .await
}

/// Replaces every route cost: a call to a route takes its quantity of the meter at
/// admission. Invalid entries are a 400 naming `items[i].<field>`; nothing is changed.
#[utoipa::path(put, path = "/api/admin/costs", tag = "admin", security(("admin_jwt" = [])),
    request_body(content = RouteCosts, content_type = "application/json"),
    responses((status = 200, body = RouteCosts),
              (status = 413, description = "Body over 64 KiB.", body = ErrorResponse),
              AdminErrors))]
pub(crate) async fn replace_costs(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let plans = &state.plans;
    admin_body_call(&req, &state, body, MAX_PLAN_BYTES, |body| async move {
        let costs: RouteCosts = from_json(&body).map_err(invalid)?;
        Ok(HttpResponse::Ok().json(plans.replace_costs(costs).await?))
    })
    .await
}
