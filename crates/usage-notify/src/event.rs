//! The events a notification can be about.

use std::fmt;
use std::str::FromStr;

use crate::NotifyError;

/// The type of a notification, as its body's `type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    /// A user's usage of a meter reached one of its limit's thresholds (80 %, 100 %, ...).
    ThresholdReached,
    /// A user was first refused for a meter's quota in a period.
    QuotaExceeded,
    /// A user's plan changed (admin, Stripe or command line).
    PlanChanged,
    /// An overage charge became an invoice item.
    ChargeInvoiced,
    /// An overage charge was given up.
    ChargeFailed,
    /// An API key was created.
    KeyCreated,
    /// An API key was revoked.
    KeyRevoked,
}

impl EventType {
    /// Every type, in the contract's order.
    pub const ALL: [EventType; 7] = [
        EventType::ThresholdReached,
        EventType::QuotaExceeded,
        EventType::PlanChanged,
        EventType::ChargeInvoiced,
        EventType::ChargeFailed,
        EventType::KeyCreated,
        EventType::KeyRevoked,
    ];

    /// The name in bodies, subscriptions and the database (`usage.threshold_reached`).
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::ThresholdReached => "usage.threshold_reached",
            EventType::QuotaExceeded => "usage.quota_exceeded",
            EventType::PlanChanged => "plan.changed",
            EventType::ChargeInvoiced => "charge.invoiced",
            EventType::ChargeFailed => "charge.failed",
            EventType::KeyCreated => "key.created",
            EventType::KeyRevoked => "key.revoked",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = NotifyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| NotifyError::UnknownEventType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_unknown_ones_are_refused() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
        }
        assert_eq!(
            "usage.threshold".parse::<EventType>(),
            Err(NotifyError::UnknownEventType("usage.threshold".into()))
        );
        assert_eq!(EventType::KeyRevoked.to_string(), "key.revoked");
    }
}
