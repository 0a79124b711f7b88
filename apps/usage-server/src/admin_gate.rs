//! The door of every admin endpoint: the caller checked (token, admin rate, admin list,
//! account still there), the request written to the audit log with the status answered,
//! refused ones included. Without a valid token it is a 401 and there is nobody to log.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use usage_core::rate::RateDecision;
use usage_core::repo::AdminAuditEntry;

use crate::ApiError;
use crate::state::{AppState, read_body};
use crate::user_auth::{current_user, token_user};

/// Longest query string kept in the audit log.
const MAX_LOGGED_PARAMS: usize = 2_000;

/// Checks the caller (401 without a valid token, 429 past the admin rate, 403 when not
/// an admin), runs `handler`, and writes the audit entry with the status answered.
pub(crate) async fn admin_call<F, Fut>(
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

/// [`admin_call`] for a request with a body of at most `limit` bytes: the body is read
/// only once the caller is checked (a non-admin's is never read), kept in the audit entry,
/// and handed to `handler`; the query string must be empty.
pub(crate) async fn admin_body_call<F, Fut>(
    req: &HttpRequest,
    state: &AppState,
    body: web::Payload,
    limit: usize,
    handler: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce(web::Bytes) -> Fut,
    Fut: Future<Output = Result<HttpResponse, ApiError>>,
{
    let note = RefCell::new(String::new());
    let body_note = &note;
    admin_call_noted(req, state, &note, |query| async move {
        let body = read_body(body, limit).await?;
        *body_note.borrow_mut() = String::from_utf8_lossy(&body).into_owned();
        no_parameters(&query)?;
        handler(body).await
    })
    .await
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
        state.admin_rate.check(&user, Some(state.admin_rate_limit))
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

pub(crate) fn no_parameters(query: &HashMap<String, String>) -> Result<(), ApiError> {
    match query.keys().next() {
        Some(unknown) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("unknown parameter {unknown:?}; this endpoint takes none"),
        )),
        None => Ok(()),
    }
}

/// 405 with `Allow: <allow>`, audited like every admin request.
pub(crate) fn not_allowed(allow: String) -> actix_web::Route {
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

pub(crate) async fn unknown(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    admin_call(&req, &state, |_| async { Err(ApiError::not_found()) }).await
}
