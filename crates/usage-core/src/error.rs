use thiserror::Error;

/// Invalid domain input, with a message that names the parameter and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    /// A plan key that is not `[a-z0-9_-]{1,40}`.
    #[error("plan must be a plan key: 1 to 40 of a-z, 0-9, _ and - (got {0:?})")]
    InvalidPlanKey(String),
    /// A well-formed plan key the catalog has no plan for (or only an archived one, where a
    /// plan is being chosen).
    #[error("plan must be one of {known} (got {got:?})")]
    UnknownPlan {
        /// The plans that may be chosen, comma separated.
        known: String,
        /// The key given.
        got: String,
    },
    /// A plan that takes no new subscribers.
    #[error("plan {0:?} is archived: it takes no new subscribers")]
    PlanArchived(String),
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
