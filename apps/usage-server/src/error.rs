//! Errors of the server, and their mapping to the contract's JSON errors, in one place.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use thiserror::Error;
use usage_auth::AuthError;
use usage_core::RepoError;
use usage_core::accounts::AccountError;
use usage_store::StoreError;

/// Why a command or the server failed. Shown to the operator as one line.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Opening or migrating the database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A user operation.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// A plan catalog operation.
    #[error(transparent)]
    Plan(#[from] usage_core::plans::PlanError),
    /// A catalog file that cannot be read.
    #[error("cannot read the catalog file {path}: {reason}")]
    CatalogFile {
        /// The file.
        path: String,
        /// Why (I/O, or the TOML's first error).
        reason: String,
    },
    /// `DEFAULT_PLAN` names no plan of the catalog.
    #[error(
        "DEFAULT_PLAN is {0:?}, which is no plan of the catalog (see `usage-server plans list`)"
    )]
    UnknownDefaultPlan(String),
    /// A key or token operation.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A repository operation.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A report or job.
    #[error(transparent)]
    Analytics(#[from] usage_analytics::AnalyticsError),
    /// Overage billing.
    #[error(transparent)]
    Billing(#[from] usage_billing::BillingError),
    /// The Stripe client could not be set up.
    #[error(transparent)]
    Stripe(#[from] usage_billing::StripeError),
    /// The durable spool could not be opened.
    #[error(transparent)]
    Spool(#[from] usage_core::spool::SpoolError),
    /// Metering could not start.
    #[error(transparent)]
    Embed(#[from] usage_embed::EmbedError),
    /// The metrics registry refused a metric (two of the same name).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Reconciliation found periods that do not add up.
    #[error(
        "{0} period(s) where overage, invoiced calls and charges do not add up (status \"drift\")"
    )]
    BillingDrift(usize),
    /// PostgreSQL deployments must share one configured secret.
    #[error(
        "JWT_SECRET is required with PostgreSQL (every instance must sign and verify with the same secret)"
    )]
    MissingJwtSecret,
    /// The generated secret beside the SQLite file could not be kept.
    #[error("cannot use the JWT secret file {path}: {reason}")]
    SecretFile {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The listen address is taken or not allowed.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        reason: String,
    },
    /// The stop signals' handlers could not be installed.
    #[error("cannot handle stop signals: {0}")]
    Signals(String),
    /// `prune-usage` without a retention.
    #[error("USAGE_RETENTION_DAYS is not set: raw calls are kept for ever, nothing to prune")]
    NoRetention,
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    /// The HTTP server stopped with an error.
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// The contract's error body.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

/// An error answered to an HTTP client: a status, a snake_case code and a sentence.
/// Internal causes are logged where they happen, never sent.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
    allow: Option<String>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
            allow: None,
        }
    }

    /// Adds `Retry-After` (seconds) to the answer.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 403: authenticated, not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "No such resource.")
    }

    /// 405, with the `Allow` header listing the resource's methods (RFC 9110).
    pub fn method_not_allowed(allow: impl Into<String>) -> Self {
        let allow = allow.into();
        Self {
            allow: Some(allow.clone()),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("This method is not allowed on this resource (allowed: {allow})."),
            )
        }
    }

    /// 401 for a missing or bad user token (`WWW-Authenticate: Bearer` is added).
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid user token is required: Authorization: Bearer <token>.",
        )
    }

    /// 401 for a missing or wrong cron secret.
    pub fn cron_unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "The cron secret is required: Authorization: Bearer <CRON_SECRET>.",
        )
    }

    /// 503 for a database that does not answer.
    pub fn database_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "The database is unavailable; try again shortly.",
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after_secs {
            response.insert_header(("Retry-After", secs.to_string()));
        } else if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header(("Retry-After", "5"));
        }
        if let Some(allow) = &self.allow {
            response.insert_header(("Allow", allow.as_str()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        response.json(ErrorBody {
            error: self.code,
            message: &self.message,
        })
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::UnknownKey(_) => ApiError::not_found(),
            AuthError::UnknownUser(_) => ApiError::unauthorized(),
            AuthError::Blocked(_) => ApiError::forbidden("This account is blocked."),
            AuthError::InvalidKeyName { .. }
            | AuthError::InvalidTtl { .. }
            | AuthError::InvalidGrace { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                err.to_string(),
            ),
            AuthError::KeyLimit { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "key_limit_reached",
                err.to_string(),
            ),
            AuthError::InvalidToken(_) => ApiError::unauthorized(),
            AuthError::Repo(e) => e.into(),
            AuthError::WeakSecret { .. } | AuthError::Signing(_) => {
                tracing::error!(error = %err, "token configuration error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "The service cannot sign or verify tokens right now.",
                )
            }
        }
    }
}

impl From<actix_web::error::JsonPayloadError> for ApiError {
    fn from(err: actix_web::error::JsonPayloadError) -> Self {
        use actix_web::error::JsonPayloadError as E;
        match err {
            E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("The request body must be at most {limit} bytes."),
            ),
            E::ContentType => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "The request body must be JSON (Content-Type: application/json).",
            ),
            E::Deserialize(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("The request body is not valid: {e}."),
            ),
            other => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("The request body could not be read: {other}."),
            ),
        }
    }
}

impl From<usage_analytics::AnalyticsError> for ApiError {
    fn from(err: usage_analytics::AnalyticsError) -> Self {
        match err {
            // A valid token for a user that does not exist (any more): bad credentials.
            usage_analytics::AnalyticsError::UnknownUser(_) => ApiError::unauthorized(),
            usage_analytics::AnalyticsError::NoSuchUser(_) => ApiError::not_found(),
            usage_analytics::AnalyticsError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            usage_analytics::AnalyticsError::InvalidParameter { message, .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", message)
            }
            usage_analytics::AnalyticsError::PlanArchived(message) => {
                ApiError::new(StatusCode::BAD_REQUEST, "plan_archived", message)
            }
            usage_analytics::AnalyticsError::Repo(e) => e.into(),
        }
    }
}

impl From<usage_core::plans::PlanError> for ApiError {
    fn from(err: usage_core::plans::PlanError) -> Self {
        use usage_core::plans::PlanError as E;
        match err {
            E::Invalid(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                err.to_string(),
            ),
            E::UnknownPlan(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", err.to_string()),
            E::KeyTaken(_) | E::MeterTaken(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", err.to_string())
            }
            E::UnknownMeter(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", err.to_string())
            }
            E::AggregationFixed(_) => {
                ApiError::new(StatusCode::CONFLICT, "aggregation_fixed", err.to_string())
            }
            E::DefaultPlan(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "default_plan", err.to_string())
            }
            E::Repo(e) => e.into(),
        }
    }
}

impl From<RepoError> for ApiError {
    fn from(err: RepoError) -> Self {
        match err {
            RepoError::NotFound { .. } => ApiError::not_found(),
            RepoError::Unavailable(_) => {
                tracing::warn!(error = %err, "database unavailable");
                ApiError::database_unavailable()
            }
            RepoError::Conflict { entity, field } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("A {entity} with this {field} already exists."),
            ),
            RepoError::Backend(_) => {
                tracing::error!(error = %err, "database error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_error",
                    "The database could not complete the request; try again shortly.",
                )
            }
        }
    }
}

impl From<usage_billing::WebhookError> for ApiError {
    fn from(err: usage_billing::WebhookError) -> Self {
        use usage_billing::WebhookError as E;
        match err {
            E::InvalidSignature(reason) => {
                tracing::warn!(reason, "Stripe webhook refused: bad signature");
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_signature",
                    "The Stripe-Signature header is missing, wrong or too old.",
                )
            }
            E::InvalidEvent(reason) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_event",
                format!("The body is not a Stripe event: {reason}."),
            ),
            // Not acknowledged: Stripe delivers it again later.
            E::Repo(e) => e.into(),
        }
    }
}

impl From<usage_billing::BillingError> for ApiError {
    fn from(err: usage_billing::BillingError) -> Self {
        use usage_billing::BillingError as E;
        match err {
            E::StripeNotConfigured => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "billing_unavailable",
                "Stripe is not configured on this server (STRIPE_SECRET_KEY); a dry run \
                 (?dry_run=true) works without it.",
            ),
            E::UnknownUser(_) | E::UnknownCharge(_) => ApiError::not_found(),
            E::NotPending { .. } => {
                ApiError::new(StatusCode::CONFLICT, "charge_not_pending", err.to_string())
            }
            E::Repo(e) => e.into(),
        }
    }
}
