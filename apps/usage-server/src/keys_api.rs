//! The caller's API keys (user JWT): create, list, revoke, rotate. Thin: the logic is
//! `usage_auth::keys::KeyIssuer`; revocations also leave this instance's key cache at once.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use usage_auth::keys::{IssuedKey, MAX_ROTATION_GRACE_SECS};
use usage_core::ApiKeyId;
use usage_core::repo::ApiKeyRecord;

use crate::ApiError;
use crate::api_types::{ErrorResponse, Registry, UserErrors};
use crate::state::method_not_allowed;
use crate::state::{AppState, read_body};
use crate::user_auth::AuthenticatedUser;
use utoipa::ToSchema;

/// Largest accepted request body.
const MAX_BODY: usize = 4 * 1024;

pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    // Noted outside the assertion: in a release build `debug_assert!` does not run, and
    // `Allow` would miss GET.
    let keys = registry.path::<__path_create>();
    let list_path = registry.path::<__path_list>();
    debug_assert_eq!(keys, list_path, "create and list share their resource");
    let key = registry.path::<__path_revoke>();
    let rotate_path = registry.path::<__path_rotate>();
    cfg.service(
        web::resource(&keys)
            .app_data(json_config())
            .route(web::post().to(create))
            .route(web::get().to(list))
            .default_service(method_not_allowed(registry.allow(&keys))),
    )
    .service(
        web::resource(&key)
            .route(web::delete().to(revoke))
            .default_service(method_not_allowed(registry.allow(&key))),
    )
    .service(
        web::resource(&rotate_path)
            .route(web::post().to(rotate))
            .default_service(method_not_allowed(registry.allow(&rotate_path))),
    );
}

/// Bodies are small and strictly parsed; every fault is the contract's JSON error.
fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_BODY)
        .error_handler(|err, _req| ApiError::from(err).into())
}

/// A JSON body that must be an object: serde reads a struct from an array as well
/// (`[null]` was a key named `default`).
pub(crate) struct Object<T>(T);

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        T::deserialize(serde_json::Value::Object(map))
            .map(Object)
            .map_err(D::Error::custom)
    }
}

/// `POST /api/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    /// 1 to 64 characters once trimmed, no control characters; default `default`.
    #[schema(
        min_length = 1,
        max_length = 64,
        example = "ci",
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    name: Option<String>,
}

/// `POST /api/keys/{id}/rotate` (the body is optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct RotateKey {
    /// Seconds the old key keeps working; default 0 (it stops at once).
    #[schema(minimum = 0, maximum = 86400)]
    grace_secs: Option<u64>,
}

/// A new key: the only time `key` is shown.
#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedKey {
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
#[derive(Serialize, ToSchema)]
pub(crate) struct ListedKey {
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

/// `GET /api/keys`.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyList {
    /// Every key of the caller, revoked ones included.
    items: Vec<ListedKey>,
}

/// Issues a key (at most 20 active per user).
#[utoipa::path(post, path = "/api/keys", tag = "keys", security(("user_jwt" = [])),
    request_body(content = CreateKey, content_type = "application/json"),
    responses(
        (status = 201, body = CreatedKey),
        (status = 400, description = "Bad name or body, or `key_limit_reached`.", body = ErrorResponse),
        (status = 401, body = ErrorResponse),
        (status = 413, description = "Body over 4 KiB.", body = ErrorResponse),
        (status = 503, body = ErrorResponse)))]
pub(crate) async fn create(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    body: web::Json<Object<CreateKey>>,
) -> Result<HttpResponse, ApiError> {
    let name = body
        .into_inner()
        .0
        .name
        .unwrap_or_else(|| "default".to_owned());
    let issued = state.keys.issue(&user.0, &name).await?;
    Ok(HttpResponse::Created().json(CreatedKey::from(issued)))
}

/// The caller's keys.
#[utoipa::path(get, path = "/api/keys", tag = "keys", security(("user_jwt" = [])),
    responses((status = 200, body = KeyList), UserErrors))]
pub(crate) async fn list(
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
    Ok(HttpResponse::Ok().json(KeyList { items }))
}

/// A key id from the path; a malformed one cannot name a key.
fn key_id(raw: &str) -> Result<ApiKeyId, ApiError> {
    ApiKeyId::parse(raw).map_err(|_| ApiError::not_found())
}

/// Revokes one of the caller's keys; it stops working at once on this instance.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "keys", security(("user_jwt" = [])),
    params(("id" = String, Path, description = "The key id, `eco_key_...`.")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 401, body = ErrorResponse),
        (status = 404, description = "Not one of the caller's keys.", body = ErrorResponse),
        (status = 503, body = ErrorResponse)))]
pub(crate) async fn revoke(
    user: AuthenticatedUser,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = key_id(&path)?;
    state.keys.revoke(&user.0, &id).await?;
    state.verifier.forget_key(&id);
    Ok(HttpResponse::NoContent().finish())
}

/// Issues a new key and retires this one, together or not at all.
#[utoipa::path(post, path = "/api/keys/{id}/rotate", tag = "keys", security(("user_jwt" = [])),
    params(("id" = String, Path, description = "The key id, `eco_key_...`.")),
    request_body(content = Option<RotateKey>, content_type = "application/json"),
    responses(
        (status = 201, body = CreatedKey),
        (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse),
        (status = 404, description = "Not one of the caller's keys.", body = ErrorResponse),
        (status = 413, body = ErrorResponse),
        (status = 503, body = ErrorResponse)))]
pub(crate) async fn rotate(
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
    // `null` is no body too (the body is optional).
    let parsed: Option<Object<RotateKey>> = serde_json::from_slice(body)
        .map_err(|e| ApiError::from(actix_web::error::JsonPayloadError::Deserialize(e)))?;
    match parsed.and_then(|p| p.0.grace_secs) {
        None => Ok(0),
        Some(value) => value.as_u64().ok_or_else(|| {
            ApiError::from(usage_auth::AuthError::InvalidGrace {
                max: MAX_ROTATION_GRACE_SECS,
                got: value.to_string(),
            })
        }),
    }
}
