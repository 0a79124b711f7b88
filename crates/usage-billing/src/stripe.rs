//! Stripe invoice items: the [`StripeClient`] trait and its HTTP implementation.
//!
//! One call matters to nexus-usage: `POST /v1/invoiceitems`, form-encoded, with an
//! `Idempotency-Key` that stays the same on every retry of one charge, so that Stripe
//! creates the item once however often it is sent.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use usage_core::UserId;

/// Stripe's public API.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";

/// One invoice item to create: an overage charge of one user and period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceItem {
    /// Stripe customer id (`cus_...`).
    pub customer: String,
    /// Amount in cents (USD).
    pub amount_cents: i64,
    /// What the customer reads on the invoice.
    pub description: String,
    /// Whose overage (`metadata[user_id]`).
    pub user_id: UserId,
    /// Which period (`metadata[period_start]`, RFC 3339; `period[start]`, Unix seconds).
    pub period_start: OffsetDateTime,
    /// When the billed calls end (`period[end]`, Unix seconds): the period's end, or the
    /// charge's creation for a period still running.
    pub period_end: OffsetDateTime,
    /// The meter billed (`metadata[meter]`): `api_calls`, or another.
    pub meter: String,
    /// Units past the limit this item bills (`metadata[quantity]`): overage calls, or
    /// the meter's units.
    pub quantity: u64,
    /// Overage calls billed by this item (`metadata[overage_calls]`; 0 for another meter).
    pub overage_calls: u64,
    /// The range billed: overage calls after `calls_from` up to `calls_to` (another
    /// meter: its quantity), in the metadata too, so that an item found in Stripe can be
    /// matched to the ledger.
    pub calls_from: u64,
    /// See `calls_from`.
    pub calls_to: u64,
}

impl InvoiceItem {
    /// The form fields of `POST /v1/invoiceitems`.
    pub fn form(&self) -> Vec<(&'static str, String)> {
        vec![
            ("customer", self.customer.clone()),
            ("amount", self.amount_cents.to_string()),
            ("currency", "usd".to_owned()),
            ("description", self.description.clone()),
            ("metadata[user_id]", self.user_id.to_string()),
            (
                "metadata[period_start]",
                self.period_start
                    .format(&Rfc3339)
                    .unwrap_or_else(|_| self.period_start.to_string()),
            ),
            ("metadata[meter]", self.meter.clone()),
            ("metadata[quantity]", self.quantity.to_string()),
            ("metadata[overage_calls]", self.overage_calls.to_string()),
            ("metadata[calls_from]", self.calls_from.to_string()),
            ("metadata[calls_to]", self.calls_to.to_string()),
            (
                "period[start]",
                self.period_start.unix_timestamp().to_string(),
            ),
            ("period[end]", self.period_end.unix_timestamp().to_string()),
        ]
    }
}

/// What Stripe answered for a created (or, for a repeated key, the same) item.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CreatedInvoiceItem {
    /// Stripe's id (`ii_...`).
    pub id: String,
}

/// Why an invoice item was not created. Never carries the secret key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StripeError {
    /// Stripe answered and refused (a 4xx other than 409/429): sending it again would be
    /// refused again.
    #[error("Stripe refused the invoice item (HTTP {status}{}): {message}",
            code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stripe's error code (`resource_missing`, `card_declined`...).
        code: Option<String>,
        /// Stripe's message.
        message: String,
    },
    /// No definitive answer after every attempt (network errors, timeouts, 429, 5xx):
    /// the item may or may not exist; send it again later with the same key.
    #[error("Stripe did not answer definitively after {attempts} attempt(s): {reason}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// The client could not be set up.
    #[error("Stripe client configuration: {0}")]
    Config(String),
}

impl StripeError {
    /// Whether Stripe definitively refused this item, so that sending it again would be
    /// refused again. A 401 or 403 refuses our credentials, not the item: it is not a
    /// refusal of the charge, which can go once the key is fixed.
    pub fn is_refusal(&self) -> bool {
        matches!(self, StripeError::Refused { status, .. } if *status != 401 && *status != 403)
    }
}

/// Creates invoice items. The real one is [`HttpStripeClient`].
#[async_trait]
pub trait StripeClient: Send + Sync {
    /// Creates `item`; sending the same `idempotency_key` again returns the same item.
    async fn create_invoice_item(
        &self,
        item: &InvoiceItem,
        idempotency_key: &str,
    ) -> Result<CreatedInvoiceItem, StripeError>;
}

/// How the HTTP client reaches Stripe.
#[derive(Clone)]
pub struct StripeConfig {
    /// `STRIPE_API_BASE`, e.g. [`DEFAULT_API_BASE`] or a local mock.
    pub api_base: String,
    /// `STRIPE_SECRET_KEY`.
    pub secret_key: String,
    /// Per request, connection included.
    pub timeout: Duration,
    /// Attempts per item, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time, with jitter.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (also caps `Retry-After`).
    pub max_backoff: Duration,
}

impl StripeConfig {
    /// Defaults for everything but the key: Stripe's API, 10 s timeout, 4 attempts,
    /// backoff from 250 ms up to 5 s.
    pub fn new(secret_key: impl Into<String>) -> Self {
        Self {
            api_base: DEFAULT_API_BASE.to_owned(),
            secret_key: secret_key.into(),
            timeout: Duration::from_secs(10),
            max_attempts: 4,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig")
            .field("api_base", &self.api_base)
            .field("secret_key", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// [`StripeClient`] over HTTPS with reqwest: timeouts, retries with backoff and jitter on
/// network errors, 409, 429 and 5xx (honouring `Retry-After` and `Stripe-Should-Retry`),
/// the same idempotency key on every attempt.
#[derive(Debug, Clone)]
pub struct HttpStripeClient {
    http: reqwest::Client,
    url: String,
    config: StripeConfig,
}

/// Stripe's error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
}

impl HttpStripeClient {
    /// A client for `config`.
    ///
    /// ```
    /// use usage_billing::stripe::{HttpStripeClient, StripeConfig};
    /// let client = HttpStripeClient::new(StripeConfig::new("sk_test_123")).unwrap();
    /// assert!(!format!("{client:?}").contains("sk_test_123"));
    /// ```
    pub fn new(config: StripeConfig) -> Result<Self, StripeError> {
        if config.secret_key.trim().is_empty() {
            return Err(StripeError::Config("STRIPE_SECRET_KEY is empty".to_owned()));
        }
        if config.max_attempts == 0 {
            return Err(StripeError::Config(
                "max_attempts must be at least 1".to_owned(),
            ));
        }
        let base = config.api_base.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(StripeError::Config(format!(
                "STRIPE_API_BASE must be an http(s) address, got {base:?}"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| StripeError::Config(e.to_string()))?;
        Ok(Self {
            http,
            url: format!("{base}/v1/invoiceitems"),
            config,
        })
    }

    /// The wait before attempt `attempt + 1`: exponential with jitter (half to all of
    /// it), or Stripe's `Retry-After` when longer, capped at `max_backoff`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .config
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.config.max_backoff);
        let jittered = exp.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        retry_after
            .map_or(jittered, |r| r.max(jittered))
            .min(self.config.max_backoff)
    }
}

/// One attempt's outcome.
enum Attempt {
    Done(Result<CreatedInvoiceItem, StripeError>),
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl HttpStripeClient {
    async fn attempt(&self, item: &InvoiceItem, idempotency_key: &str) -> Attempt {
        let sent = self
            .http
            .post(&self.url)
            .bearer_auth(&self.config.secret_key)
            .header("Idempotency-Key", idempotency_key)
            .form(&item.form())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                // reqwest's message names the URL (no secret in it), not the headers.
                let kind = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                return Attempt::Retry {
                    reason: format!("request {kind}: {e}"),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let headers = response.headers();
        let should_retry = headers
            .get("stripe-should-retry")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.eq_ignore_ascii_case("true"));
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => {
                return Attempt::Retry {
                    reason: format!("reading the answer failed: {e}"),
                    retry_after: None,
                };
            }
        };
        if status.is_success() {
            return Attempt::Done(serde_json::from_slice::<CreatedInvoiceItem>(&body).map_err(
                |e| StripeError::Unavailable {
                    attempts: 1,
                    reason: format!("HTTP {status} with an unreadable body: {e}"),
                },
            ));
        }
        let detail = serde_json::from_slice::<ErrorBody>(&body)
            .ok()
            .map(|b| b.error);
        let message = detail
            .as_ref()
            .and_then(|d| d.message.clone())
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        let retryable = should_retry.unwrap_or(
            status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::CONFLICT,
        );
        if retryable {
            Attempt::Retry {
                reason: format!("HTTP {status}: {message}"),
                retry_after,
            }
        } else {
            Attempt::Done(Err(StripeError::Refused {
                status: status.as_u16(),
                code: detail.and_then(|d| d.code),
                message,
            }))
        }
    }
}

#[async_trait]
impl StripeClient for HttpStripeClient {
    async fn create_invoice_item(
        &self,
        item: &InvoiceItem,
        idempotency_key: &str,
    ) -> Result<CreatedInvoiceItem, StripeError> {
        let mut last = String::new();
        // Set by a failed attempt, waited before the next one: none after the last.
        let mut wait = None;
        for attempt in 1..=self.config.max_attempts {
            if let Some(wait) = wait.take() {
                tokio::time::sleep(wait).await;
            }
            match self.attempt(item, idempotency_key).await {
                Attempt::Done(Err(StripeError::Unavailable { reason, .. })) => {
                    return Err(StripeError::Unavailable {
                        attempts: attempt,
                        reason,
                    });
                }
                Attempt::Done(result) => return result,
                Attempt::Retry {
                    reason,
                    retry_after,
                } => {
                    tracing::warn!(
                        idempotency_key,
                        attempt,
                        reason = %reason,
                        "Stripe invoice item not created yet"
                    );
                    last = reason;
                    wait = Some(self.backoff(attempt, retry_after));
                }
            }
        }
        Err(StripeError::Unavailable {
            attempts: self.config.max_attempts,
            reason: last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_respects_caps() {
        let mut config = StripeConfig::new("sk_test_x");
        config.initial_backoff = Duration::from_millis(100);
        config.max_backoff = Duration::from_secs(1);
        let client = HttpStripeClient::new(config).unwrap();
        for attempt in 1..=10 {
            let exp = Duration::from_millis(100 * (1 << (attempt - 1))).min(Duration::from_secs(1));
            let wait = client.backoff(attempt, None);
            assert!(wait >= exp / 2 && wait <= exp, "{attempt}: {wait:?}");
        }
        assert_eq!(
            client.backoff(1, Some(Duration::from_secs(30))),
            Duration::from_secs(1),
            "Retry-After is honoured up to the cap"
        );
        assert!(client.backoff(1, Some(Duration::from_millis(700))) >= Duration::from_millis(700));
    }

    #[test]
    fn bad_configuration_is_refused_without_the_key() {
        let err = HttpStripeClient::new(StripeConfig {
            api_base: "ftp://nope".to_owned(),
            ..StripeConfig::new("sk_live_secret")
        })
        .unwrap_err();
        assert!(err.to_string().contains("STRIPE_API_BASE"));
        assert!(!err.to_string().contains("sk_live_secret"));
        assert!(HttpStripeClient::new(StripeConfig::new(" ")).is_err());
    }
}
