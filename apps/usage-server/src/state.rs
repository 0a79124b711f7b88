//! What the handlers share: the server's state, and the helpers every API module uses to
//! read bodies and queries and to answer 404 and 405.

use std::sync::Arc;

use actix_web::{HttpResponse, ResponseError, web};
use usage_analytics::{DailyAggregation, UsageReports};
use usage_auth::keys::KeyIssuer;
use usage_auth::verify::KeyVerifier;
use usage_core::Store;
use usage_core::rate::RateLimiter;

use crate::ApiError;
use crate::metrics;

/// What the handlers share.
pub(crate) struct AppState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<metrics::Metrics>,
    pub reports: UsageReports,
    pub events: usage_analytics::events::UsageEvents,
    pub keys: KeyIssuer,
    pub verifier: Arc<KeyVerifier>,
    pub aggregation: DailyAggregation,
    pub billing: usage_billing::OverageService,
    pub admins: usage_auth::admin::AdminList,
    pub admin_rate: RateLimiter,
    pub admin_rate_limit: usage_core::rate::RateLimit,
    pub admin_reports: usage_analytics::admin::AdminReports,
    pub plans: usage_core::plans::Plans,
    pub clock: Arc<dyn usage_core::Clock>,
    pub cron_secret: Option<usage_auth::secret::SharedSecret>,
    /// `POST /api/events`, when `INGEST_SECRET` is set.
    pub ingest: Option<(
        usage_auth::secret::SharedSecret,
        usage_core::ingest::EventIngest,
    )>,
    /// Stripe's webhook, when `STRIPE_WEBHOOK_SECRET` is set.
    pub webhooks: Option<usage_billing::StripeWebhooks>,
}

/// Reads a body of at most `limit` bytes; stops reading past that (413).
pub(crate) async fn read_body(
    mut body: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt as _;
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::from(actix_web::error::JsonPayloadError::Payload(e)))?;
        if bytes.len() + chunk.len() > limit {
            return Err(actix_web::error::JsonPayloadError::Overflow { limit }.into());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.freeze())
}

/// Query strings that cannot be read at all are the contract's 400 too.
pub(crate) fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _| invalid_query(err).into())
}

/// A query string that does not parse.
pub(crate) fn invalid_query(err: actix_web::error::QueryPayloadError) -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::BAD_REQUEST,
        "invalid_parameter",
        format!("The query string is not valid: {err}."),
    )
}

/// A query string as name to value.
pub(crate) type QueryParams = web::Query<std::collections::HashMap<String, String>>;

/// 404 in the contract's shape.
pub(crate) async fn not_found() -> HttpResponse {
    ApiError::not_found().error_response()
}

/// The default service of a resource: 405 with `Allow: <allow>`.
pub(crate) fn method_not_allowed(allow: String) -> actix_web::Route {
    web::to(move || {
        let allow = allow.clone();
        async move { ApiError::method_not_allowed(allow).error_response() }
    })
}
