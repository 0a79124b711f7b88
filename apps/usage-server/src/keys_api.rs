//! The caller's API keys (user JWT): create, list, revoke, rotate. Thin: the logic is
//! `usage_auth::keys::KeyIssuer`; revocations also leave this instance's key cache at once.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use usage_auth::keys::{IssuedKey, MAX_ROTATION_GRACE_SECS};
use usage_core::ApiKeyId;
use usage_core::repo::ApiKeyRecord;

use crate::http::{AppState, read_body};
use crate::user_auth::AuthenticatedUser;
use crate::{ApiError, http::method_not_allowed};

/// Largest accepted request body.
const MAX_BODY: usize = 4 * 1024;

pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/keys")
            .app_data(json_config())
            .route(web::post().to(create))
            .route(web::get().to(list))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/keys/{id}")
            .route(web::delete().to(revoke))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/keys/{id}/rotate")
            .route(web::post().to(rotate))
            .default_service(web::to(method_not_allowed)),
    );
}

/// Bodies are small and strictly parsed; every fault is the contract's JSON error.
fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_BODY)
        .error_handler(|err, _req| ApiError::from(err).into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: Option<String>,
}

#[derive(Serialize)]
struct CreatedKey {
    id: ApiKeyId,
    name: String,
    prefix: String,
    key: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

impl From<IssuedKey> for CreatedKey {
    fn from(issued: IssuedKey) -> Self {
        Self {
            id: issued.record.id,
            name: issued.record.name,
            prefix: issued.record.prefix,
            key: issued.plaintext,
            created_at: issued.record.created_at,
        }
    }
}

/// A key as listed: never the key or its hash.
#[derive(Serialize)]
struct ListedKey {
    id: ApiKeyId,
    name: String,
    prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    revoked_at: Option<OffsetDateTime>,
    /// When the key stops working by itself (the end of a rotation's grace period).
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
}

impl From<ApiKeyRecord> for ListedKey {
    fn from(k: ApiKeyRecord) -> Self {
        Self {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            revoked_at: k.revoked_at,
            expires_at: k.expires_at,
        }
    }
}

async fn create(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    body: web::Json<CreateKey>,
) -> Result<HttpResponse, ApiError> {
    let name = body
        .into_inner()
        .name
        .unwrap_or_else(|| "default".to_owned());
    let issued = state.keys.issue(&user.0, &name).await?;
    Ok(HttpResponse::Created().json(CreatedKey::from(issued)))
}

async fn list(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let items: Vec<ListedKey> = state
        .keys
        .list(&user.0)
        .await?
        .into_iter()
        .map(ListedKey::from)
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "items": items })))
}

/// A key id from the path; a malformed one cannot name a key.
fn key_id(raw: &str) -> Result<ApiKeyId, ApiError> {
    ApiKeyId::parse(raw).map_err(|_| ApiError::not_found())
}

async fn revoke(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = key_id(&path)?;
    state.keys.revoke(&user.0, &id).await?;
    state.verifier.forget_key(&id);
    Ok(HttpResponse::NoContent().finish())
}

async fn rotate(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = key_id(&path)?;
    let grace_secs = rotation_grace(&read_body(body, MAX_BODY).await?)?;
    let (old, new) = state.keys.rotate(&user.0, &id, grace_secs).await?;
    // The next call with the old key looks it up again: refused at once without a grace
    // period, accepted until its new expiry with one.
    state.verifier.forget_key(&old.id);
    Ok(HttpResponse::Created().json(CreatedKey::from(new)))
}

/// `grace_secs` of an optional `{"grace_secs": N}` body (0 when there is no body).
fn rotation_grace(body: &[u8]) -> Result<u64, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RotateKey {
        grace_secs: Option<serde_json::Value>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(0);
    }
    let parsed: RotateKey = serde_json::from_slice(body)
        .map_err(|e| ApiError::from(actix_web::error::JsonPayloadError::Deserialize(e)))?;
    match parsed.grace_secs {
        None => Ok(0),
        Some(value) => value.as_u64().ok_or_else(|| {
            ApiError::from(usage_auth::AuthError::InvalidGrace {
                max: MAX_ROTATION_GRACE_SECS,
                got: value.to_string(),
            })
        }),
    }
}
