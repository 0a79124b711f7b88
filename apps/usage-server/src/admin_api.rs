//! Admin endpoints (a user JWT whose `sub` is in `ADMIN_ECO_IDS`): business figures, users,
//! the plan catalog ([`crate::plans_api`], [`crate::meters_api`]) and the audit log, each through
//! [`crate::admin_gate`].

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use usage_analytics::admin::{parse_page, parse_user_list, parse_user_patch};
use usage_core::UserId;
use usage_core::repo::AdminAuditEntry;

use crate::ApiError;
use crate::admin_gate::{admin_body_call, admin_call, no_parameters, not_allowed, unknown};
use crate::api_types::{
    AdminErrors, ErrorResponse, PageParams, Registry, UserListParams, UserPatchBody,
};
use crate::state::AppState;
use usage_analytics::admin::{AdminOverview, AdminUserDetail, AdminUserRow, Page};

pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    const SCOPE: &str = "/api/admin";
    let overview_path = registry.path_in::<__path_overview>(SCOPE);
    let users_path = registry.path_in::<__path_users>(SCOPE);
    // Noted outside the assertion: in a release build `debug_assert!` does not run, and
    // `Allow` would miss PATCH.
    let user_path = registry.path_in::<__path_user>(SCOPE);
    let update_path = registry.path_in::<__path_update_user>(SCOPE);
    debug_assert_eq!(user_path, update_path, "GET and PATCH share their resource");
    let audit_path = registry.path_in::<__path_audit>(SCOPE);
    let allow = |path: &str| registry.allow(&format!("{SCOPE}{path}"));
    cfg.service(
        web::scope(SCOPE)
            .service(
                web::resource(&overview_path)
                    .route(web::get().to(overview))
                    .default_service(not_allowed(allow(&overview_path))),
            )
            .service(
                web::resource(&users_path)
                    .route(web::get().to(users))
                    .default_service(not_allowed(allow(&users_path))),
            )
            .service(
                web::resource(&user_path)
                    .route(web::get().to(user))
                    .route(web::patch().to(update_user))
                    .default_service(not_allowed(allow(&user_path))),
            )
            .service(
                web::resource(&audit_path)
                    .route(web::get().to(audit))
                    .default_service(not_allowed(allow(&audit_path))),
            )
            .configure(|scope| crate::plans_api::routes(scope, SCOPE, registry))
            .configure(|scope| crate::meters_api::routes(scope, SCOPE, registry))
            .default_service(web::to(unknown)),
    );
}

/// Largest `PATCH` body.
const MAX_PATCH_BYTES: usize = 16 * 1024;

fn path_user_id(raw: &str) -> Result<UserId, ApiError> {
    // An id that cannot exist is a user that does not exist.
    UserId::parse(raw).map_err(|_| ApiError::not_found())
}

/// A user and this period's figures.
#[utoipa::path(get, path = "/api/admin/users/{id}", tag = "admin", security(("admin_jwt" = [])),
    params(("id" = String, Path, description = "The user id, `eco_usr_...`.")),
    responses((status = 200, body = AdminUserDetail),
              (status = 404, description = "No such user.", body = ErrorResponse), AdminErrors))]
pub(crate) async fn user(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let reports = &state.admin_reports;
    admin_call(&req, &state, |query| async move {
        no_parameters(&query)?;
        let id = path_user_id(&path)?;
        Ok(HttpResponse::Ok().json(reports.user(&id).await?))
    })
    .await
}

/// Changes a user's plan and/or Stripe customer (audited with the body).
#[utoipa::path(patch, path = "/api/admin/users/{id}", tag = "admin", security(("admin_jwt" = [])),
    params(("id" = String, Path, description = "The user id, `eco_usr_...`.")),
    request_body(content = UserPatchBody, content_type = "application/json"),
    responses((status = 200, body = AdminUserDetail),
              (status = 404, description = "No such user.", body = ErrorResponse),
              (status = 409, description = "The Stripe customer is linked to another user.", body = ErrorResponse),
              (status = 413, description = "Body over 16 KiB.", body = ErrorResponse),
              AdminErrors))]
pub(crate) async fn update_user(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let reports = &state.admin_reports;
    let verifier = &state.verifier;
    admin_body_call(&req, &state, body, MAX_PATCH_BYTES, |body| async move {
        let id = path_user_id(&path)?;
        let patch = parse_user_patch(&body)?;
        let updated = reports.update_user(&id, &patch).await?;
        // This instance follows a plan change at once; the others at their next poll.
        verifier.forget_user(&id);
        Ok(HttpResponse::Ok().json(updated))
    })
    .await
}

/// Users per plan, MRR, overage revenue, calls today and this month, top users.
#[utoipa::path(get, path = "/api/admin/analytics/overview", tag = "admin",
    security(("admin_jwt" = [])), responses((status = 200, body = AdminOverview), AdminErrors))]
pub(crate) async fn overview(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_call(&req, &state, |_| async {
        Ok(HttpResponse::Ok().json(state.admin_reports.overview().await?))
    })
    .await
}

/// Users with this period's figures: filter, search, sort, page.
#[utoipa::path(get, path = "/api/admin/analytics/users", tag = "admin", params(UserListParams),
    security(("admin_jwt" = [])), responses((status = 200, body = Page<AdminUserRow>), AdminErrors))]
pub(crate) async fn users(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let reports = &state.admin_reports;
    admin_call(&req, &state, |query| async move {
        let params = parse_user_list(&query)?;
        Ok(HttpResponse::Ok().json(reports.users(&params).await?))
    })
    .await
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/api/admin/audit", tag = "admin", params(PageParams),
    security(("admin_jwt" = [])), responses((status = 200, body = Page<AdminAuditEntry>), AdminErrors))]
pub(crate) async fn audit(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let reports = &state.admin_reports;
    admin_call(&req, &state, |query| async move {
        if let Some(unknown) = query.keys().find(|k| *k != "page" && *k != "limit") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("unknown parameter {unknown:?}; allowed: page, limit"),
            ));
        }
        let (page, limit) = parse_page(&query)?;
        Ok(HttpResponse::Ok().json(reports.audit(page, limit).await?))
    })
    .await
}
