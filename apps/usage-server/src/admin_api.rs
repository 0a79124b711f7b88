//! Admin endpoints (a user JWT whose `sub` is in `ADMIN_ECO_IDS`): business figures and
//! the audit log. Every request with a valid token is written to the audit log, refused
//! ones included; without a valid token it is a 401 and there is nobody to log.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use usage_analytics::admin::{parse_page, parse_user_list, parse_user_patch};
use usage_core::rate::RateDecision;
use usage_core::repo::AdminAuditEntry;
use usage_core::{Plan, UserId};

use crate::ApiError;
use crate::api_types::{
    AdminErrors, ErrorResponse, PageParams, Registry, UserListParams, UserPatchBody,
};
use crate::state::{AppState, read_body};
use crate::user_auth::{current_user, token_user};
use usage_analytics::admin::{AdminOverview, AdminUserDetail, AdminUserRow, Page};

/// Longest query string kept in the audit log.
const MAX_LOGGED_PARAMS: usize = 2_000;

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
            .default_service(web::to(unknown)),
    );
}

/// Checks the caller (401 without a valid token, 429 past the admin rate, 403 when not
/// an admin), runs `handler`, and writes the audit entry with the status answered.
async fn admin_call<F, Fut>(
    req: &HttpRequest,
    state: &AppState,
    handler: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce(HashMap<String, String>) -> Fut,
    Fut: Future<Output = Result<HttpResponse, ApiError>>,
{
    admin_call_noted(req, state, &RefCell::new(String::new()), handler).await
}

/// [`admin_call`], with what the handler writes into `note` (a request body) appended to
/// the audit entry's parameters.
async fn admin_call_noted<F, Fut>(
    req: &HttpRequest,
    state: &AppState,
    note: &RefCell<String>,
    handler: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce(HashMap<String, String>) -> Fut,
    Fut: Future<Output = Result<HttpResponse, ApiError>>,
{
    let user = token_user(req)?;
    // The rate limit comes first and applies to every token holder, so that refused
    // requests (each one audited) are bounded too.
    let result = if let RateDecision::Limited { retry_after, .. } =
        // One limit for everyone: the limiter is keyed by user, the plan is a placeholder
        // with the admin rate.
        state.admin_rate.check(&user, Plan::Enterprise)
    {
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many admin requests; slow down.",
        )
        .with_retry_after(retry_after.as_secs().max(1)))
    } else if !state.admins.is_admin(&user) {
        tracing::warn!(user = %user, path = req.path(), "admin route refused to a non-admin");
        Err(ApiError::forbidden(
            "This endpoint is for admins (ADMIN_ECO_IDS).",
        ))
    } else if let Err(gone) = current_user(req, state, &user).await {
        Err(gone)
    } else {
        // Parsed after the checks, so that a non-admin learns nothing from a 400.
        match web::Query::<HashMap<String, String>>::from_query(req.query_string()) {
            Ok(query) => handler(query.into_inner()).await,
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("The query string is not valid: {e}."),
            )),
        }
    };
    let status = match &result {
        Ok(response) => response.status(),
        Err(e) => e.status_code(),
    };
    let entry = AdminAuditEntry {
        id: 0,
        admin_id: user,
        method: req.method().to_string(),
        route: req.path().chars().take(MAX_LOGGED_PARAMS).collect(),
        params: audit_params(req.query_string(), &note.borrow()),
        status: status.as_u16(),
        created_at: state.clock.now(),
    };
    if let Err(e) = state.admin_reports.record(&entry).await {
        tracing::error!(error = %e, admin = %entry.admin_id, route = %entry.route,
                        status = entry.status, "could not write the admin audit log");
    }
    result
}

/// The query string, then the noted body, bounded. NUL (which PostgreSQL text cannot
/// hold: the entry would be lost) becomes U+FFFD.
fn audit_params(query: &str, note: &str) -> String {
    let joined = match (query.is_empty(), note.is_empty()) {
        (_, true) => query.to_owned(),
        (true, false) => note.to_owned(),
        (false, false) => format!("{query} {note}"),
    };
    joined
        .chars()
        .take(MAX_LOGGED_PARAMS)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect()
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
    let note = RefCell::new(String::new());
    let body_note = &note;
    admin_call_noted(&req, &state, &note, |query| async move {
        // Read after the checks: a non-admin's body is never read.
        let body = read_body(body, MAX_PATCH_BYTES).await?;
        *body_note.borrow_mut() = String::from_utf8_lossy(&body).into_owned();
        no_parameters(&query)?;
        let id = path_user_id(&path)?;
        let patch = parse_user_patch(&body)?;
        let updated = reports.update_user(&id, &patch).await?;
        // This instance follows a plan change at once; the others at their next poll.
        verifier.forget_user(&id);
        Ok(HttpResponse::Ok().json(updated))
    })
    .await
}

fn no_parameters(query: &HashMap<String, String>) -> Result<(), ApiError> {
    match query.keys().next() {
        Some(unknown) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("unknown parameter {unknown:?}; this endpoint takes none"),
        )),
        None => Ok(()),
    }
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

/// 405 with `Allow: <allow>`, audited like every admin request.
fn not_allowed(allow: String) -> actix_web::Route {
    web::to(move |req: HttpRequest, state: web::Data<AppState>| {
        let allow = allow.clone();
        async move {
            admin_call(&req, &state, |_| async {
                Err(ApiError::method_not_allowed(allow))
            })
            .await
        }
    })
}

async fn unknown(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    admin_call(&req, &state, |_| async { Err(ApiError::not_found()) }).await
}
