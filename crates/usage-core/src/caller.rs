//! Who is calling the metered API, what their plan lets them do, and the trait that finds
//! out from an API key.

use std::sync::Arc;

use async_trait::async_trait;

use crate::catalog::{API_CALLS, PlanDefinition};
use crate::meter::{Aggregation, Meters};
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

/// What the door enforces on a user's calls: the `api_calls` limit, the limits on other
/// `count` and `sum` meters and the burst limit of the plan version the user holds, with
/// the user's own terms over it. Resolved from the catalog in memory, never read from the
/// database per call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallLimits {
    /// Calls included per billing period; `None`: unlimited.
    pub included: Option<u64>,
    /// What happens to calls past `included`.
    pub over_limit: OverLimit,
    /// The short-window limit; `None`: none.
    pub burst: Option<RateLimit>,
    /// The plan's limits with an `included` amount on `count` and `sum` meters other than
    /// `api_calls`, by meter key; `None` when there is none (most plans: no allocation).
    pub units: Option<Arc<[UnitLimit]>>,
}

/// A limit on a meter other than `api_calls`, as the door enforces it and the rate-limit
/// headers show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitLimit {
    /// The meter's key.
    pub meter: Arc<str>,
    /// Units included per billing period.
    pub included: u64,
    /// What happens past `included`: `Block` refuses calls once it is reached.
    pub over_limit: OverLimit,
}

impl UnitLimit {
    /// Whether calls are refused once `included` is reached.
    pub fn blocks(&self) -> bool {
        self.over_limit == OverLimit::Block
    }
}

impl CallLimits {
    /// No limit of any kind.
    pub const UNLIMITED: CallLimits = CallLimits {
        included: None,
        over_limit: OverLimit::Overage,
        burst: None,
        units: None,
    };

    /// The `api_calls` and burst limits of `plan` (its effective terms: overrides already
    /// applied). A plan without an `api_calls` limit leaves calls unlimited.
    pub fn of(plan: &PlanDefinition) -> Self {
        let (included, over_limit) = plan
            .limit(API_CALLS)
            .map_or((None, OverLimit::Overage), |l| (l.included, l.over_limit));
        Self {
            included,
            over_limit,
            burst: plan.burst,
            units: None,
        }
    }

    /// [`CallLimits::of`], with the plan's limits on the other `count` and `sum` meters
    /// of `meters` (a limit on a meter `meters` lacks, or on a `max` or `unique_count`
    /// meter, is priced, never enforced).
    pub fn with_units(plan: &PlanDefinition, meters: &Meters) -> Self {
        let units: Vec<UnitLimit> = plan
            .limits
            .iter()
            .filter(|l| l.meter != API_CALLS)
            .filter_map(|l| {
                let meter = meters.get(&l.meter)?;
                let counted = matches!(meter.aggregation, Aggregation::Count | Aggregation::Sum);
                Some(UnitLimit {
                    meter: Arc::from(l.meter.as_str()),
                    included: l.included.filter(|_| counted)?,
                    over_limit: l.over_limit,
                })
            })
            .collect();
        Self {
            units: (!units.is_empty()).then(|| units.into()),
            ..Self::of(plan)
        }
    }

    /// The limits on other meters (empty for most plans).
    pub fn unit_limits(&self) -> &[UnitLimit] {
        self.units.as_deref().unwrap_or_default()
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
