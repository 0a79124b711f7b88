//! Dashboard sign-in: one-time sign-in links, sessions, and the CSRF token of a session.
//!
//! Tokens are 43 random base62 characters (256 bits); the store keeps only their SHA-256, so reading the
//! database never yields a usable link or session. Any instance serves any session.
//!
//! ```
//! use usage_auth::session::DashboardSessions;
//!
//! let csrf = DashboardSessions::csrf_token("a-session-token");
//! assert!(DashboardSessions::csrf_matches("a-session-token", &csrf));
//! assert!(!DashboardSessions::csrf_matches("another-session", &csrf));
//! ```

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::{Duration, OffsetDateTime};
use usage_core::ids::random_base62;
use usage_core::repo::SessionRepository;
use usage_core::{ApiKeyId, Clock, RepoError, UserId};

use crate::AuthError;

/// How long a session lasts from sign-in.
pub const SESSION_TTL: Duration = Duration::hours(12);
/// Default and longest lifetime of a sign-in link, in seconds.
pub const LINK_TTL_DEFAULT_SECS: u64 = 900;
/// Longest lifetime of a sign-in link, in seconds (a day).
pub const LINK_TTL_MAX_SECS: u64 = 86_400;

/// A session just opened: the cookie's value and when it ends.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The session token (the cookie's value).
    pub token: String,
    /// Who signed in.
    pub user_id: UserId,
    /// When the session ends.
    pub expires_at: OffsetDateTime,
}

/// Sign-in links and sessions over a [`SessionRepository`].
#[derive(Clone)]
pub struct DashboardSessions {
    sessions: Arc<dyn SessionRepository>,
    clock: Arc<dyn Clock>,
}

impl DashboardSessions {
    /// Sessions stored in `sessions`.
    pub fn new(sessions: Arc<dyn SessionRepository>, clock: Arc<dyn Clock>) -> Self {
        Self { sessions, clock }
    }

    /// A one-time sign-in token for `user_id`, valid `ttl_secs` (1 to a day).
    pub async fn issue_login_link(
        &self,
        user_id: &UserId,
        ttl_secs: u64,
    ) -> Result<String, AuthError> {
        if !(1..=LINK_TTL_MAX_SECS).contains(&ttl_secs) {
            return Err(AuthError::InvalidTtl {
                max: LINK_TTL_MAX_SECS,
                got: ttl_secs,
            });
        }
        let now = self.clock.now();
        let token = new_token();
        let expires_at = now + Duration::seconds(i64::try_from(ttl_secs).unwrap_or(i64::MAX));
        match self
            .sessions
            .create_login_link(&hash(&token), user_id, now, expires_at)
            .await
        {
            Err(RepoError::NotFound { .. }) => Err(AuthError::UnknownUser(user_id.clone())),
            other => other.map(|()| token).map_err(AuthError::from),
        }
    }

    /// Uses a sign-in link: a new session, or `None` when the link is unknown, used or
    /// expired (all alike).
    pub async fn sign_in_with_link(&self, token: &str) -> Result<Option<SignedIn>, AuthError> {
        if !well_formed(token) {
            return Ok(None);
        }
        match self
            .sessions
            .consume_login_link(&hash(token), self.clock.now())
            .await?
        {
            Some(user_id) => Ok(Some(self.sign_in(&user_id).await?)),
            None => Ok(None),
        }
    }

    /// A new session for `user_id`, whose identity the caller established (a verified
    /// user JWT).
    pub async fn sign_in(&self, user_id: &UserId) -> Result<SignedIn, AuthError> {
        let now = self.clock.now();
        let token = new_token();
        let expires_at = now + SESSION_TTL;
        match self
            .sessions
            .create_session(&hash(&token), user_id, now, expires_at)
            .await
        {
            Err(RepoError::NotFound { .. }) => return Err(AuthError::UnknownUser(user_id.clone())),
            other => other?,
        }
        Ok(SignedIn {
            token,
            user_id: user_id.clone(),
            expires_at,
        })
    }

    /// The user of a live session; `None` for unknown or expired ones (a user's sessions
    /// go with the user: the foreign key cascades).
    pub async fn user(&self, token: &str) -> Result<Option<UserId>, AuthError> {
        if !well_formed(token) {
            return Ok(None);
        }
        Ok(self
            .sessions
            .session_user(&hash(token), self.clock.now())
            .await?)
    }

    /// Ends a session (nothing happens for an unknown one).
    pub async fn sign_out(&self, token: &str) -> Result<(), AuthError> {
        if well_formed(token) {
            self.sessions.delete_session(&hash(token)).await?;
        }
        Ok(())
    }

    /// Removes expired sessions and used or expired links; how many went.
    pub async fn prune(&self) -> Result<u64, AuthError> {
        Ok(self.sessions.prune_sessions(self.clock.now()).await?)
    }

    /// The CSRF token of a session: derived from the session token, which only the
    /// browser holds (an `HttpOnly`, `SameSite=Strict` cookie), so a page of another site
    /// can neither read nor compute it.
    pub fn csrf_token(session_token: &str) -> String {
        let mut digest = Sha256::new();
        digest.update(b"nexus-usage dashboard csrf\0");
        digest.update(session_token.as_bytes());
        hex::encode(digest.finalize())
    }

    /// The id of the key a dashboard form creates: the same for the same session and form
    /// (a form posted twice makes one key, [`crate::keys::KeyIssuer::issue_once`]),
    /// different for any other, and not chosen by the browser.
    pub fn form_key_id(session_token: &str, form_id: &str) -> ApiKeyId {
        const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut digest = Sha256::new();
        digest.update(b"nexus-usage dashboard key form\0");
        digest.update(session_token.as_bytes());
        digest.update(b"\0");
        digest.update(form_id.as_bytes());
        let text: String = digest.finalize()[..20]
            .iter()
            .map(|b| char::from(BASE62[usize::from(*b) % BASE62.len()]))
            .collect();
        ApiKeyId::from_stored(format!("{}{text}", ApiKeyId::PREFIX))
    }

    /// Whether `presented` is the CSRF token of the session (constant time).
    pub fn csrf_matches(session_token: &str, presented: &str) -> bool {
        let expected = Self::csrf_token(session_token);
        expected.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

/// Length of a token: 43 base62 characters carry 256 bits.
const TOKEN_LEN: usize = 43;

fn new_token() -> String {
    random_base62(TOKEN_LEN)
}

/// 43 base62 characters: anything else never reaches the database.
fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN && token.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use usage_core::repo::{User, UserRepository};
    use usage_core::{ManualClock, Plan};
    use usage_testkit::memory::MemoryStore;

    async fn fixture() -> (DashboardSessions, Arc<ManualClock>, UserId) {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(datetime!(2026-12-01 10:00 UTC)));
        let user = User {
            id: UserId::generate(),
            email: "ada@example.com".into(),
            plan: Plan::free(),
            stripe_customer_id: None,
            created_at: clock.now(),
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await.unwrap();
        (DashboardSessions::new(store, clock.clone()), clock, user.id)
    }

    #[tokio::test]
    async fn a_link_signs_in_once_and_the_session_lasts_twelve_hours() {
        let (sessions, clock, user) = fixture().await;
        let link = sessions.issue_login_link(&user, 900).await.unwrap();
        let signed_in = sessions.sign_in_with_link(&link).await.unwrap().unwrap();
        assert_eq!(signed_in.user_id, user);
        assert!(sessions.sign_in_with_link(&link).await.unwrap().is_none());
        assert_eq!(
            sessions.user(&signed_in.token).await.unwrap(),
            Some(user.clone())
        );
        clock.advance(SESSION_TTL - Duration::seconds(1));
        assert!(sessions.user(&signed_in.token).await.unwrap().is_some());
        clock.advance(Duration::seconds(1));
        assert!(sessions.user(&signed_in.token).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn expired_links_unknown_users_and_bad_lifetimes_are_refused() {
        let (sessions, clock, user) = fixture().await;
        let link = sessions.issue_login_link(&user, 60).await.unwrap();
        clock.advance(Duration::seconds(60));
        assert!(sessions.sign_in_with_link(&link).await.unwrap().is_none());
        assert!(matches!(
            sessions.issue_login_link(&UserId::generate(), 60).await,
            Err(AuthError::UnknownUser(_))
        ));
        for ttl in [0, LINK_TTL_MAX_SECS + 1] {
            let error = sessions.issue_login_link(&user, ttl).await.unwrap_err();
            assert!(error.to_string().contains("ttl-secs"), "{error}");
        }
        // Junk never reaches the store, and is no session.
        assert!(sessions.sign_in_with_link("x").await.unwrap().is_none());
        assert!(
            sessions
                .user("'; DROP TABLE x; --")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn signing_out_ends_the_session() {
        let (sessions, _, user) = fixture().await;
        let signed_in = sessions.sign_in(&user).await.unwrap();
        sessions.sign_out(&signed_in.token).await.unwrap();
        assert!(sessions.user(&signed_in.token).await.unwrap().is_none());
    }
}
