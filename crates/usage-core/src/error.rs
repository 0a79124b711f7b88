use thiserror::Error;

/// Invalid domain input, with a message that names the parameter and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    /// A plan name that is not one of the known plans.
    #[error("plan must be one of free, pro, enterprise (got {0:?})")]
    UnknownPlan(String),
    /// An email address that does not look like `local@domain.tld`.
    #[error("email must look like name@example.com (got {0:?})")]
    InvalidEmail(String),
    /// A Stripe customer id that is not `cus_` followed by letters and digits.
    #[error("stripe customer id must look like cus_<letters and digits> (got {0:?})")]
    InvalidStripeCustomerId(String),
    /// An id without the expected prefix or with characters outside base62.
    #[error("{kind} id must look like {prefix}<letters and digits> (got {value:?})")]
    InvalidId {
        /// What the id names ("user", "API key").
        kind: &'static str,
        /// The prefix the id must start with.
        prefix: &'static str,
        /// The rejected value.
        value: String,
    },
}

/// A refused catalog entry: which field, and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field} {message}")]
pub struct CatalogError {
    /// Where the problem is, as a path into the plan (`limits[0].overage.tiers[1].up_to`).
    pub field: String,
    /// What the field accepts, and what it got.
    pub message: String,
}

impl CatalogError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}
