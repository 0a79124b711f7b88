//! The user behind a request's JWT, as an actix extractor.

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use futures_util::future::LocalBoxFuture;
use usage_auth::jwt::JwtKeys;
use usage_core::UserId;
use usage_door::middleware::bearer_credential;

use crate::ApiError;
use crate::state::AppState;

/// The user a valid `Authorization: Bearer <jwt>` names, who exists and is not blocked.
/// A bad token or a user that no longer exists answers 401 with
/// `WWW-Authenticate: Bearer`, a blocked user 403; the reason goes to the log only.
#[derive(Debug, Clone)]
pub(crate) struct AuthenticatedUser(pub UserId);

impl FromRequest for AuthenticatedUser {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let user = token_user(&req)?;
            let state = req
                .app_data::<web::Data<AppState>>()
                .ok_or_else(ApiError::unauthorized)?;
            current_user(&req, state, &user).await?;
            Ok(AuthenticatedUser(user))
        })
    }
}

/// The user of the request's JWT, or 401 (the reason logged). The signature only: see
/// [`current_user`] for whether the user still exists.
pub(crate) fn token_user(req: &HttpRequest) -> Result<UserId, ApiError> {
    authenticate(req).map_err(|reason| {
        tracing::info!(path = req.path(), %reason, "user token refused");
        ApiError::unauthorized()
    })
}

/// A signed token outlives its user: 401 when the user is gone, 403 when blocked.
pub(crate) async fn current_user(
    req: &HttpRequest,
    state: &AppState,
    user: &UserId,
) -> Result<(), ApiError> {
    match usage_auth::access::active_user(state.store.as_ref(), user).await {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::info!(path = req.path(), %user, reason = %e, "user token refused");
            Err(e.into())
        }
    }
}

fn authenticate(req: &HttpRequest) -> Result<UserId, String> {
    let keys = req
        .app_data::<web::Data<JwtKeys>>()
        .ok_or("JWT keys are not configured")?;
    let token = bearer_credential(req.headers())?;
    keys.verify(token).map_err(|e| e.to_string())
}
