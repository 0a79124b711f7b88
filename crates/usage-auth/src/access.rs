//! Who may still use the service: the check every door makes of a signed-in user, and
//! taking access away (blocking, unblocking, deleting a user, their keys revoked first so
//! that every running instance drops them at its next poll).

use std::sync::Arc;

use usage_core::repo::{ApiKeyRecord, User, UserRepository};
use usage_core::{Clock, RepoError, Store, UserId};

use crate::AuthError;
use crate::keys::{IssuedKey, KeyIssuer};

/// The user `id` names, when they exist and are not blocked: [`AuthError::UnknownUser`]
/// for a user that is gone (a token outlives its user), [`AuthError::Blocked`] for a
/// blocked one.
pub async fn active_user(users: &dyn UserRepository, id: &UserId) -> Result<User, AuthError> {
    match users.user_by_id(id).await? {
        None => Err(AuthError::UnknownUser(id.clone())),
        Some(user) if user.blocked_at.is_some() => Err(AuthError::Blocked(id.clone())),
        Some(user) => Ok(user),
    }
}

/// Blocking, unblocking and deleting users, and issuing keys only to active ones.
#[derive(Clone)]
pub struct UserAccess {
    users: Arc<dyn UserRepository>,
    keys: KeyIssuer,
    clock: Arc<dyn Clock>,
}

impl UserAccess {
    /// Access to the users and keys of `store`, timestamped by `clock`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self {
            users: store.clone(),
            keys: KeyIssuer::new(store, clock.clone()),
            clock,
        }
    }

    /// Revokes every key of the user, then blocks them: their tokens and dashboard
    /// sessions are refused and they get no new key. Returns the user and the keys
    /// revoked.
    pub async fn block(&self, id: &UserId) -> Result<(User, Vec<ApiKeyRecord>), AuthError> {
        let revoked = self.keys.revoke_all(id).await?;
        let user = self.set_blocked(id, Some(self.clock.now())).await?;
        Ok((user, revoked))
    }

    /// Lifts a block; revoked keys stay revoked.
    pub async fn unblock(&self, id: &UserId) -> Result<User, AuthError> {
        self.set_blocked(id, None).await
    }

    /// Revokes every key of the user, then deletes the user with everything stored of
    /// them. Returns the keys revoked.
    pub async fn delete(&self, id: &UserId) -> Result<Vec<ApiKeyRecord>, AuthError> {
        let revoked = self.keys.revoke_all(id).await?;
        if self.users.delete_user(id).await? {
            Ok(revoked)
        } else {
            Err(AuthError::UnknownUser(id.clone()))
        }
    }

    /// A new key for an active user ([`KeyIssuer::issue`]); the name is checked first, as
    /// the issuer does, so a bad one is reported whoever the user is.
    pub async fn issue_key(&self, id: &UserId, name: &str) -> Result<IssuedKey, AuthError> {
        crate::keys::validate_key_name(name)?;
        active_user(self.users.as_ref(), id).await?;
        self.keys.issue(id, name).await
    }

    async fn set_blocked(
        &self,
        id: &UserId,
        at: Option<time::OffsetDateTime>,
    ) -> Result<User, AuthError> {
        match self.users.set_user_blocked(id, at).await {
            Err(RepoError::NotFound { .. }) => Err(AuthError::UnknownUser(id.clone())),
            other => Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usage_core::{Plan, SystemClock};
    use usage_testkit::memory::MemoryStore;

    #[tokio::test]
    async fn blocked_and_deleted_users_lose_their_keys_and_get_no_new_one() {
        let store = Arc::new(MemoryStore::new());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let accounts = usage_core::accounts::Accounts::new(store.clone(), clock.clone());
        let ada = accounts
            .create_user("ada@example.com", Plan::pro(), None)
            .await
            .unwrap();
        let access = UserAccess::new(store.clone(), clock);
        let key = access.issue_key(&ada.id, "k").await.unwrap();

        let (blocked, revoked) = access.block(&ada.id).await.unwrap();
        assert!(blocked.blocked_at.is_some());
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].id, key.record.id);
        assert!(matches!(
            active_user(store.as_ref(), &ada.id).await,
            Err(AuthError::Blocked(_))
        ));
        assert!(matches!(
            access.issue_key(&ada.id, "k2").await,
            Err(AuthError::Blocked(_))
        ));

        access.unblock(&ada.id).await.unwrap();
        assert!(active_user(store.as_ref(), &ada.id).await.is_ok());
        access.issue_key(&ada.id, "k3").await.unwrap();

        assert_eq!(
            access.delete(&ada.id).await.unwrap().len(),
            1,
            "k3 revoked first"
        );
        assert!(matches!(
            active_user(store.as_ref(), &ada.id).await,
            Err(AuthError::UnknownUser(_))
        ));
        assert!(matches!(
            access.delete(&ada.id).await,
            Err(AuthError::UnknownUser(_))
        ));
        assert!(matches!(
            access.block(&ada.id).await,
            Err(AuthError::UnknownUser(_))
        ));
    }
}
