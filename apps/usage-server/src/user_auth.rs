//! The user behind a request's JWT, as an actix extractor.

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use usage_auth::jwt::JwtKeys;
use usage_core::UserId;
use usage_core::middleware::bearer_credential;

use crate::ApiError;

/// The user a valid `Authorization: Bearer <jwt>` names. Any fault answers 401 with
/// `WWW-Authenticate: Bearer`; the reason goes to the log only.
#[derive(Debug, Clone)]
pub(crate) struct AuthenticatedUser(pub UserId);

impl FromRequest for AuthenticatedUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticated_user(req).map(AuthenticatedUser))
    }
}

/// The user of the request's JWT, or 401 (the reason logged).
pub(crate) fn authenticated_user(req: &HttpRequest) -> Result<UserId, ApiError> {
    authenticate(req).map_err(|reason| {
        tracing::info!(path = req.path(), %reason, "user token refused");
        ApiError::unauthorized()
    })
}

fn authenticate(req: &HttpRequest) -> Result<UserId, String> {
    let keys = req
        .app_data::<web::Data<JwtKeys>>()
        .ok_or("JWT keys are not configured")?;
    let token = bearer_credential(req.headers())?;
    keys.verify(token).map_err(|e| e.to_string())
}
