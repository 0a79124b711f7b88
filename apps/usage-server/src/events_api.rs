//! `POST /api/events`: usage other services send, as a batch of CloudEvents
//! (`Authorization: Bearer <INGEST_SECRET>`; 404 while it is unset). The checks and the
//! storing are [`usage_core::ingest::EventIngest`]'s; this module reads the request and
//! writes the answer.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use usage_core::ingest::{IngestAnswer, IngestError, MAX_BATCH_BYTES};
use usage_door::middleware::bearer_credential;

use crate::ApiError;
use crate::api_types::{ErrorResponse, Registry};
use crate::state::{AppState, method_not_allowed, read_body};

pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    let path = registry.path::<__path_ingest>();
    cfg.service(
        web::resource(&path)
            .route(web::post().to(ingest))
            .default_service(method_not_allowed(registry.allow(&path))),
    );
}

/// The media types a batch may come as.
const BATCH_TYPES: [&str; 2] = ["application/json", "application/cloudevents-batch+json"];

/// Usage from any service: a JSON array of at most 1,000 CloudEvents 1.0 (structured),
/// each naming a meter (`type`), a user or API key (`subject`) and a quantity
/// (`data.quantity`, or `data.value` for unique_count meters). Each event is accepted,
/// a duplicate (its `(source, id)` was stored before), or rejected with its own error;
/// one bad event does not stop the others (an item that is not an event object at all is
/// rejected `invalid_event` too, so the schema takes any item).
#[utoipa::path(post, path = "/api/events", tag = "events",
    security(("ingest_secret" = [])),
    request_body(content = Vec<serde_json::Value>,
                 description = "CloudEvents 1.0, structured JSON (also taken as `application/cloudevents-batch+json`).",
                 content_type = "application/json"),
    responses(
        (status = 200, body = IngestAnswer),
        (status = 400, description = "The body is not a JSON array, or not JSON.", body = ErrorResponse),
        (status = 401, description = "Missing or wrong ingest secret.", body = ErrorResponse),
        (status = 404, description = "`INGEST_SECRET` is not set.", body = ErrorResponse),
        (status = 413, description = "More than 1,000 events (`too_many_events`), or a body over 1 MiB.", body = ErrorResponse),
        (status = 503, description = "The database failed; nothing of the batch was stored.", body = ErrorResponse)))]
pub(crate) async fn ingest(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Some((secret, ingest)) = &state.ingest else {
        return Err(ApiError::not_found());
    };
    let presented = bearer_credential(req.headers()).unwrap_or_default();
    if !secret.matches(presented) {
        tracing::warn!("events sent with a wrong or missing ingest secret");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "The ingest secret is required: Authorization: Bearer <INGEST_SECRET>.",
        ));
    }
    let media_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if !media_type
        .as_deref()
        .is_some_and(|t| BATCH_TYPES.contains(&t))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!(
                "Content-Type must be application/json or application/cloudevents-batch+json (got {})",
                media_type.as_deref().unwrap_or("none")
            ),
        ));
    }
    let body = read_body(body, MAX_BATCH_BYTES).await?;
    let answer = ingest.ingest(&body).await.map_err(|e| match e {
        IngestError::NotABatch(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", e.to_string())
        }
        IngestError::TooManyEvents(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            e.to_string(),
        ),
        IngestError::Repo(e) => e.into(),
    })?;
    state.metrics.events_ingested(&answer);
    Ok(HttpResponse::Ok().json(answer))
}
