//! `POST /api/webhooks/stripe`: Stripe's events, verified and applied by
//! [`usage_billing::StripeWebhooks`]. 404 while `STRIPE_WEBHOOK_SECRET` is unset.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;
use usage_billing::WebhookOutcome;

use crate::ApiError;
use crate::http::{AppState, method_not_allowed, read_body};

/// Largest event accepted (Stripe's are a few kilobytes).
const MAX_EVENT_BYTES: usize = 1 << 20;

pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/webhooks/stripe")
            .route(web::post().to(stripe))
            .default_service(web::to(other_method)),
    );
}

async fn stripe(
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
    let outcome = webhooks.handle(signature, &body).await?;
    if let WebhookOutcome::Applied { user_id, .. } = &outcome {
        // This instance follows at once; the others at their next poll.
        state.verifier.forget_user(user_id);
    }
    Ok(HttpResponse::Ok().json(json!({"received": true, "outcome": outcome.as_str()})))
}

async fn other_method(state: web::Data<AppState>) -> HttpResponse {
    if state.webhooks.is_none() {
        return actix_web::ResponseError::error_response(&ApiError::not_found());
    }
    method_not_allowed().await
}
