//! Who is calling the metered API, and the trait that finds out from an API key.

use async_trait::async_trait;

use crate::{ApiKeyId, Plan, RepoError, UserId};

/// The owner of a valid API key, as the metered handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user.
    pub user_id: UserId,
    /// The key used.
    pub api_key_id: ApiKeyId,
    /// The user's plan.
    pub plan: Plan,
}

/// Turns a presented API key into a [`Caller`]. Implemented by `usage-auth`'s verifier;
/// the middleware only knows this trait.
#[async_trait]
pub trait ApiKeyAuthenticator: Send + Sync {
    /// The caller the key belongs to; `None` for unknown, revoked and expired keys alike.
    async fn authenticate(&self, presented_key: &str) -> Result<Option<Caller>, RepoError>;
}
