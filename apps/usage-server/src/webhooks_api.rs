//! `POST /api/webhooks/stripe`: Stripe's events, verified and applied by
//! [`usage_billing::StripeWebhooks`]. 404 while `STRIPE_WEBHOOK_SECRET` is unset.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use usage_billing::WebhookOutcome;
use utoipa::ToSchema;

use crate::ApiError;
use crate::api_types::{ErrorResponse, Registry};
use crate::state::{AppState, read_body};

/// Largest event accepted (Stripe's are a few kilobytes).
const MAX_EVENT_BYTES: usize = 1 << 20;

pub(crate) fn routes(cfg: &mut web::ServiceConfig, registry: &mut Registry) {
    cfg.service(
        web::resource(registry.path::<__path_stripe>())
            .route(web::post().to(stripe))
            .default_service(web::to(other_method)),
    );
}

/// What a delivery did.
#[derive(Serialize, ToSchema)]
pub(crate) struct Acknowledged {
    /// Always true.
    received: bool,
    /// `applied`, `duplicate`, `stale`, `unknown_customer`, `unknown_price` or `ignored`.
    #[schema(example = "applied")]
    outcome: &'static str,
}

/// Stripe's events: subscriptions set plans (signature checked over the raw body).
#[utoipa::path(post, path = "/api/webhooks/stripe", tag = "stripe",
    security(("stripe_signature" = [])),
    request_body(content = Object, description = "A Stripe event.", content_type = "application/json"),
    responses(
        (status = 200, body = Acknowledged),
        (status = 400, description = "`invalid_signature` (missing, wrong or older than 300 s), or a signed body that is not an event.", body = ErrorResponse),
        (status = 404, description = "`STRIPE_WEBHOOK_SECRET` is not set.", body = ErrorResponse),
        (status = 413, description = "Body over 1 MiB.", body = ErrorResponse),
        (status = 503, description = "The database failed; Stripe delivers again.", body = ErrorResponse)))]
pub(crate) async fn stripe(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Some(webhooks) = &state.webhooks else {
        return Err(ApiError::not_found());
    };
    let body = read_body(body, MAX_EVENT_BYTES).await?;
    let signature = req
        .headers()
        .get("Stripe-Signature")
        .and_then(|v| v.to_str().ok());
    let handled = webhooks.handle(signature, &body).await;
    state.metrics.webhook(&handled);
    let outcome = handled?;
    if let WebhookOutcome::Applied { user_id, .. } = &outcome {
        // This instance follows at once; the others at their next poll.
        state.verifier.forget_user(user_id);
    }
    Ok(HttpResponse::Ok().json(Acknowledged {
        received: true,
        outcome: outcome.as_str(),
    }))
}

async fn other_method(state: web::Data<AppState>) -> HttpResponse {
    let error = if state.webhooks.is_none() {
        ApiError::not_found()
    } else {
        ApiError::method_not_allowed("POST")
    };
    actix_web::ResponseError::error_response(&error)
}
