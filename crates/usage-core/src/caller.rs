//! Who is calling the metered API, what their plan lets them do, and the trait that finds
//! out from an API key.

use async_trait::async_trait;

use crate::catalog::{API_CALLS, PlanDefinition};
use crate::rate::RateLimit;
use crate::{ApiKeyId, OverLimit, Plan, RepoError, UserId};

/// The owner of a valid API key, as the metered handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user.
    pub user_id: UserId,
    /// The key used.
    pub api_key_id: ApiKeyId,
    /// The user's plan.
    pub plan: Plan,
    /// What the door enforces on the user's calls now.
    pub limits: CallLimits,
}

/// What the door enforces on a user's calls: the `api_calls` limit and the burst limit of
/// the plan version the user holds, with the user's own terms over it. Resolved from the
/// catalog in memory, never read from the database per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// Calls included per billing period; `None`: unlimited.
    pub included: Option<u64>,
    /// What happens to calls past `included`.
    pub over_limit: OverLimit,
    /// The short-window limit; `None`: none.
    pub burst: Option<RateLimit>,
}

impl CallLimits {
    /// No limit of any kind.
    pub const UNLIMITED: CallLimits = CallLimits {
        included: None,
        over_limit: OverLimit::Overage,
        burst: None,
    };

    /// The limits of `plan` (its effective terms: overrides already applied). A plan
    /// without an `api_calls` limit leaves calls unlimited.
    pub fn of(plan: &PlanDefinition) -> Self {
        let (included, over_limit) = plan
            .limit(API_CALLS)
            .map_or((None, OverLimit::Overage), |l| (l.included, l.over_limit));
        Self {
            included,
            over_limit,
            burst: plan.burst,
        }
    }

    /// The included calls past which calls are billed as overage; `None` when no call is
    /// (unlimited, or blocked at the limit).
    pub fn billed_from(&self) -> Option<u64> {
        match self.over_limit {
            OverLimit::Overage => self.included,
            OverLimit::Block => None,
        }
    }
}

/// Turns a presented API key into a [`Caller`]. Implemented by `usage-auth`'s verifier;
/// the middleware only knows this trait.
#[async_trait]
pub trait ApiKeyAuthenticator: Send + Sync {
    /// The caller the key belongs to; `None` for unknown, revoked and expired keys alike.
    async fn authenticate(&self, presented_key: &str) -> Result<Option<Caller>, RepoError>;
}
