//! Stripe's webhook: the `Stripe-Signature` check, and subscription events turned into
//! plan changes ([`StripeWebhooks`]).
//!
//! The signature is checked over the raw body before anything is parsed. Each event id
//! takes effect once and an event older than one already applied to the same customer is
//! ignored (Stripe delivers in any order and retries): the store decides both in one
//! transaction ([`UserRepository::apply_subscription_change`]).

use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use thiserror::Error;
use time::{Duration, OffsetDateTime};
use usage_core::repo::{SubscriptionChange, SubscriptionOutcome, UserRepository};
use usage_core::terms::{Catalog, LiveCatalog};
use usage_core::{Clock, Plan, RepoError, UserId};

/// How far the signed time `t` may be from now (either way).
pub const SIGNATURE_TOLERANCE: Duration = Duration::seconds(300);

/// Why a delivery was refused.
#[derive(Debug, Error)]
pub enum WebhookError {
    /// The `Stripe-Signature` header is missing, malformed, wrong or stale; the reason is
    /// for the log.
    #[error("invalid Stripe signature: {0}")]
    InvalidSignature(&'static str),
    /// The signed body is not a Stripe event; the reason is for the client.
    #[error("the event is not valid: {0}")]
    InvalidEvent(String),
    /// The store failed; the event was not applied (Stripe retries).
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Checks `Stripe-Signature` (`t=<unix seconds>,v1=<hex>[,v1=<hex>...]`) over the raw
/// `body`: one `v1` must be the HMAC-SHA256 of `"<t>.<body>"` keyed with `secret`
/// (compared in constant time), and `t` within [`SIGNATURE_TOLERANCE`] of `now`.
pub fn verify_signature(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now: OffsetDateTime,
) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::InvalidSignature("no Stripe-Signature header"))?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) if timestamp.is_none() => timestamp = Some(t),
            // A `v1` that is not hex cannot match; the others may.
            Some(("v1", sig)) => signatures.extend(hex::decode(sig).ok()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(WebhookError::InvalidSignature("no timestamp"))?;
    if signatures.is_empty() {
        return Err(WebhookError::InvalidSignature("no v1 signature"));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .map_err(|_| WebhookError::InvalidSignature("unusable secret"))?;
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    if !signatures
        .iter()
        .any(|sig| mac.clone().verify_slice(sig).is_ok())
    {
        return Err(WebhookError::InvalidSignature("no v1 signature matches"));
    }
    let signed_at = timestamp
        .parse::<i64>()
        .ok()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .ok_or(WebhookError::InvalidSignature(
            "timestamp is not Unix seconds",
        ))?;
    if (now - signed_at).abs() > SIGNATURE_TOLERANCE {
        return Err(WebhookError::InvalidSignature(
            "timestamp outside the tolerance",
        ));
    }
    Ok(())
}

/// The Stripe price ids of the built-in plans (`STRIPE_PRICE_PRO`,
/// `STRIPE_PRICE_ENTERPRISE`): stored in the catalog with them the first time; the catalog
/// maps prices to plans afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanPrices {
    /// Price id of the pro plan.
    pub pro: Option<String>,
    /// Price id of the enterprise plan.
    pub enterprise: Option<String>,
}

/// What a subscription event asks for, before any user is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanDecision {
    /// Set this plan.
    Set(Plan),
    /// The subscription ended: back to the default plan, if it is the one that set the plan.
    End,
    /// The subscription is live but sells none of our prices: no change.
    UnknownPrice,
    /// A status that changes nothing (`incomplete`, `past_due`, `paused`).
    NoChange,
}

/// The plan a `customer.subscription.*` event gives: deleted, `canceled`, `unpaid` or
/// `incomplete_expired` → its end (the default plan, when it set the plan); `active` or
/// `trialing` → the plan the catalog sells the items' prices for (the dearest of several);
/// any other status changes nothing.
pub fn subscription_plan(
    event_type: &str,
    status: &str,
    price_ids: &[&str],
    catalog: &Catalog,
) -> PlanDecision {
    if event_type == "customer.subscription.deleted" {
        return PlanDecision::End;
    }
    match status {
        "canceled" | "unpaid" | "incomplete_expired" => PlanDecision::End,
        "active" | "trialing" => price_ids
            .iter()
            .filter_map(|id| catalog.plan_for_price(id))
            .max_by_key(|v| v.plan.price_cents)
            .map_or(PlanDecision::UnknownPrice, |v| {
                PlanDecision::Set(Plan::from_stored(v.plan.key.as_str()))
            }),
        _ => PlanDecision::NoChange,
    }
}

/// What a verified delivery did. Every outcome is acknowledged with a 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// The user's plan is now `plan`.
    Applied {
        /// Whose plan changed.
        user_id: UserId,
        /// The new plan.
        plan: Plan,
    },
    /// This event took effect before.
    Duplicate,
    /// A later event of the customer was applied already.
    Stale,
    /// The end of a subscription that did not set the user's plan.
    OtherSubscription,
    /// No user is linked to the customer.
    UnknownCustomer,
    /// A live subscription to none of the configured prices.
    UnknownPrice,
    /// Not an event that changes plans, or a status that changes nothing.
    Ignored,
}

impl WebhookOutcome {
    /// Short name for the answer and the log.
    pub fn as_str(&self) -> &'static str {
        match self {
            WebhookOutcome::Applied { .. } => "applied",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::Stale => "stale",
            WebhookOutcome::OtherSubscription => "other_subscription",
            WebhookOutcome::UnknownCustomer => "unknown_customer",
            WebhookOutcome::UnknownPrice => "unknown_price",
            WebhookOutcome::Ignored => "ignored",
        }
    }
}

/// The subscription event types that change plans.
const SUBSCRIPTION_EVENTS: [&str; 3] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
];

/// Stripe's webhook over the users' store.
pub struct StripeWebhooks {
    secret: Vec<u8>,
    catalog: Arc<LiveCatalog>,
    default_plan: Plan,
    users: Arc<dyn UserRepository>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for StripeWebhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeWebhooks")
            .field("default_plan", &self.default_plan)
            .finish_non_exhaustive()
    }
}

impl StripeWebhooks {
    /// Deliveries signed with `secret` (`STRIPE_WEBHOOK_SECRET`); prices map to plans
    /// through `catalog`, and an ended subscription gives `default_plan` (`DEFAULT_PLAN`).
    pub fn new(
        secret: &[u8],
        catalog: Arc<LiveCatalog>,
        default_plan: Plan,
        users: Arc<dyn UserRepository>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            secret: secret.to_vec(),
            catalog,
            default_plan,
            users,
            clock,
        }
    }

    /// Verifies one delivery and applies it.
    pub async fn handle(
        &self,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<WebhookOutcome, WebhookError> {
        let now = self.clock.now();
        verify_signature(&self.secret, signature, body, now)?;
        let event: Value = serde_json::from_slice(body)
            .map_err(|e| WebhookError::InvalidEvent(format!("not JSON ({e})")))?;
        // Ids and names never hold control characters (and PostgreSQL text cannot hold
        // NUL): such an event is refused, not retried for ever.
        let text = |v: &Value| {
            v.as_str()
                .filter(|s| !s.chars().any(char::is_control))
                .map(str::to_owned)
        };
        let id = text(&event["id"])
            .filter(|id| !id.is_empty() && id.len() <= 255)
            .ok_or_else(|| WebhookError::InvalidEvent("no event id".to_owned()))?;
        let event_type = text(&event["type"])
            .ok_or_else(|| WebhookError::InvalidEvent("no event type".to_owned()))?;
        if !SUBSCRIPTION_EVENTS.contains(&event_type.as_str()) {
            tracing::info!(event = %id, %event_type, "Stripe event ignored");
            return Ok(WebhookOutcome::Ignored);
        }
        let object = &event["data"]["object"];
        // `customer` is an id, or the customer object when the event was expanded.
        let customer = text(&object["customer"])
            .or_else(|| text(&object["customer"]["id"]))
            .ok_or_else(|| WebhookError::InvalidEvent("no data.object.customer".to_owned()))?;
        let created = event["created"]
            .as_i64()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(usage_core::clock::caller_instant)
            .ok_or_else(|| WebhookError::InvalidEvent("no created time".to_owned()))?;
        let status = object["status"].as_str().unwrap_or_default();
        let price_ids: Vec<&str> = object["items"]["data"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item["price"]["id"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let mut decision =
            subscription_plan(&event_type, status, &price_ids, &self.catalog.current());
        if decision == PlanDecision::UnknownPrice {
            // A plan made a moment ago on another instance: read the catalog again once.
            self.catalog.refresh().await?;
            decision = subscription_plan(&event_type, status, &price_ids, &self.catalog.current());
        }
        let (plan, ends) = match decision {
            PlanDecision::Set(plan) => (plan, false),
            PlanDecision::End => (self.default_plan.clone(), true),
            PlanDecision::UnknownPrice => {
                tracing::warn!(event = %id, %customer, prices = ?price_ids,
                    "Stripe subscription to a price no plan of the catalog names (stripe_price_id): plan unchanged");
                return Ok(WebhookOutcome::UnknownPrice);
            }
            PlanDecision::NoChange => {
                tracing::info!(event = %id, %customer, status, "Stripe subscription status changes no plan");
                return Ok(WebhookOutcome::Ignored);
            }
        };
        let change = SubscriptionChange {
            event_id: id.clone(),
            event_type,
            customer: customer.clone(),
            plan,
            created,
            subscription: text(&object["id"]).filter(|id| !id.is_empty() && id.len() <= 255),
            ends,
        };
        let outcome = match self.users.apply_subscription_change(&change, now).await? {
            SubscriptionOutcome::Applied(user) => {
                tracing::info!(event = %id, user = %user.id, plan = %user.plan,
                    "plan set by a Stripe subscription event");
                WebhookOutcome::Applied {
                    user_id: user.id,
                    plan: user.plan.clone(),
                }
            }
            SubscriptionOutcome::Duplicate => WebhookOutcome::Duplicate,
            SubscriptionOutcome::Stale => {
                tracing::info!(event = %id, %customer, "Stripe event older than one applied: ignored");
                WebhookOutcome::Stale
            }
            SubscriptionOutcome::OtherSubscription => {
                tracing::info!(event = %id, %customer,
                    "the end of a subscription that did not set the plan: plan unchanged");
                WebhookOutcome::OtherSubscription
            }
            SubscriptionOutcome::UnknownCustomer => {
                tracing::warn!(event = %id, %customer,
                    "Stripe event for a customer no user is linked to (users set-stripe-customer): plan unchanged");
                WebhookOutcome::UnknownCustomer
            }
        };
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const SECRET: &[u8] = b"whsec_0123456789abcdef0123456789abcdef";
    const NOW: OffsetDateTime = datetime!(2026-12-01 12:00 UTC);

    fn sign(t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn signatures_are_checked_over_time_and_body() {
        let body = br#"{"id":"evt_1"}"#;
        let t = NOW.unix_timestamp();
        let good = sign(t, body);
        let ok = |h: &str| verify_signature(SECRET, Some(h), body, NOW).is_ok();
        assert!(ok(&format!("t={t},v1={good}")));
        // Several v1 (secret rolling), v0 and unknown parts, spaces: one match is enough.
        assert!(ok(&format!(
            "t={t}, v0=abc, v1={}, v1={good}, x=1",
            "00".repeat(32)
        )));
        assert!(ok(&format!("t={t},v1=zz,v1={good}")));
        assert!(!ok(&format!("t={t},v1={}", sign(t + 1, body))));
        assert!(!ok(&format!("t={},v1={good}", t + 1)));
        assert!(!ok(&format!("v1={good}")));
        assert!(!ok(&format!("t={t}")));
        assert!(!ok(""));
        assert!(verify_signature(SECRET, None, body, NOW).is_err());
        let other = br#"{"id":"evt_2"}"#;
        assert!(verify_signature(SECRET, Some(&format!("t={t},v1={good}")), other, NOW).is_err());
        // 300 s either way is accepted, one more is not.
        for (dt, accepted) in [(300, true), (-300, true), (301, false), (-301, false)] {
            let ts = t + dt;
            let header = format!("t={ts},v1={}", sign(ts, body));
            assert_eq!(ok(&header), accepted, "{dt}");
        }
        let header = format!("t=soon,v1={}", {
            let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
            mac.update(b"soon.");
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        });
        assert!(!ok(&header));
    }

    #[test]
    fn subscriptions_map_to_plans() {
        let version = |plan: Plan, price: &str| usage_core::repo::PlanVersion {
            plan: usage_core::catalog::PlanDefinition::builtin(
                &plan,
                &usage_core::PlanCatalog::default(),
                &usage_core::rate::PlanRateLimits::default(),
                Some(price.to_owned()),
            )
            .unwrap(),
            existing: usage_core::catalog::PlanMove::NextPeriod,
            created_at: NOW,
        };
        let prices = Catalog::new([
            version(Plan::pro(), "price_pro"),
            version(Plan::enterprise(), "price_ent"),
        ]);
        let updated = "customer.subscription.updated";
        let set = PlanDecision::Set;
        assert_eq!(
            subscription_plan(updated, "active", &["price_pro"], &prices),
            set(Plan::pro())
        );
        assert_eq!(
            subscription_plan(
                updated,
                "trialing",
                &["price_x", "price_ent", "price_pro"],
                &prices
            ),
            set(Plan::enterprise())
        );
        assert_eq!(
            subscription_plan(updated, "active", &["price_x"], &prices),
            PlanDecision::UnknownPrice
        );
        assert_eq!(
            subscription_plan(updated, "active", &[], &prices),
            PlanDecision::UnknownPrice
        );
        for status in ["canceled", "unpaid", "incomplete_expired"] {
            assert_eq!(
                subscription_plan(updated, status, &["price_pro"], &prices),
                PlanDecision::End
            );
        }
        for status in ["past_due", "incomplete", "paused", ""] {
            assert_eq!(
                subscription_plan(updated, status, &["price_pro"], &prices),
                PlanDecision::NoChange
            );
        }
        assert_eq!(
            subscription_plan(
                "customer.subscription.deleted",
                "active",
                &["price_pro"],
                &prices
            ),
            PlanDecision::End
        );
        assert_eq!(
            subscription_plan(updated, "active", &["price_pro"], &Catalog::default()),
            PlanDecision::UnknownPrice
        );
    }
}
