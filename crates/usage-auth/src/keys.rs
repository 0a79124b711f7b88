//! API keys: `eco_live_` followed by 40 random base62 characters. Only the SHA-256 of a
//! key is stored; the key itself is shown once, at creation.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use usage_core::ids::random_base62;
use usage_core::repo::{ApiKeyRecord, ApiKeyRepository, KeyIssue, KeyRetirement};
use usage_core::{ApiKeyId, Clock, RepoError, UserId};

use crate::AuthError;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "eco_live_";
/// Random characters after the prefix (about 238 bits).
pub const KEY_RANDOM_LEN: usize = 40;
/// Characters of the key kept for display: the prefix and four random ones.
pub const DISPLAY_PREFIX_LEN: usize = KEY_PREFIX.len() + 4;
/// Longest key name.
pub const MAX_KEY_NAME_LEN: usize = 64;

/// A freshly generated key and what is stored of it.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// The key itself, to show once.
    pub plaintext: String,
    /// Its first characters, for display.
    pub prefix: String,
    /// Lower-case hex SHA-256 of the key.
    pub hash: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.debug_struct("GeneratedKey")
            .field("prefix", &self.prefix)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// Generates a new key from the thread's CSPRNG.
///
/// ```
/// let key = usage_auth::keys::generate_api_key();
/// assert!(key.plaintext.starts_with("eco_live_"));
/// assert_eq!(key.hash, usage_auth::keys::hash_api_key(&key.plaintext));
/// ```
pub fn generate_api_key() -> GeneratedKey {
    let plaintext = format!("{KEY_PREFIX}{}", random_base62(KEY_RANDOM_LEN));
    GeneratedKey {
        prefix: plaintext[..DISPLAY_PREFIX_LEN].to_owned(),
        hash: hash_api_key(&plaintext),
        plaintext,
    }
}

/// Lower-case hex SHA-256 of a key, as stored in `eco_api_keys.key_hash`.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Whether `candidate` has the shape of an API key (prefix, then at least 32 base62
/// characters), so that JWTs and junk are told apart without a lookup.
pub fn looks_like_api_key(candidate: &str) -> bool {
    candidate.strip_prefix(KEY_PREFIX).is_some_and(|rest| {
        (32..=128).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Checks a key name: 1 to 64 characters, no control characters; trims spaces.
pub fn validate_key_name(name: &str) -> Result<String, AuthError> {
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 || len > MAX_KEY_NAME_LEN || name.chars().any(char::is_control) {
        return Err(AuthError::InvalidKeyName {
            max: MAX_KEY_NAME_LEN,
            len,
        });
    }
    Ok(name.to_owned())
}

/// A key just issued: its record and the plaintext to show once.
#[derive(Clone)]
pub struct IssuedKey {
    /// What is stored.
    pub record: ApiKeyRecord,
    /// The key itself.
    pub plaintext: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key itself.
        f.debug_struct("IssuedKey")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// Longest grace period of a rotation, during which the old key still works: one day.
pub const MAX_ROTATION_GRACE_SECS: u64 = 24 * 3600;

/// Active keys a user may hold by default.
pub const DEFAULT_KEY_LIMIT: usize = 20;

/// Issues keys to users and stores them.
#[derive(Clone)]
pub struct KeyIssuer {
    keys: Arc<dyn ApiKeyRepository>,
    clock: Arc<dyn Clock>,
    key_limit: usize,
}

impl KeyIssuer {
    /// An issuer over these repositories.
    pub fn new(keys: Arc<dyn ApiKeyRepository>, clock: Arc<dyn Clock>) -> Self {
        Self {
            keys,
            clock,
            key_limit: DEFAULT_KEY_LIMIT,
        }
    }

    /// The same issuer with another limit of active keys per user.
    pub fn with_key_limit(mut self, key_limit: usize) -> Self {
        self.key_limit = key_limit;
        self
    }

    /// Creates and stores a new key for `user_id`, within the user's key limit (checked
    /// and written in one transaction: concurrent creations never pass it).
    pub async fn issue(&self, user_id: &UserId, name: &str) -> Result<IssuedKey, AuthError> {
        let name = validate_key_name(name)?;
        self.store_new(user_id, name, None, ApiKeyId::generate())
            .await
            .map(|(issued, _)| issued)
    }

    /// As [`KeyIssuer::issue`], with the new key's id given: `None` when a key of that id
    /// exists already, so that a request sent twice (a form posted again by a reload)
    /// creates one key.
    pub async fn issue_once(
        &self,
        user_id: &UserId,
        name: &str,
        id: ApiKeyId,
    ) -> Result<Option<IssuedKey>, AuthError> {
        let name = validate_key_name(name)?;
        match self.store_new(user_id, name, None, id).await {
            Ok((issued, _)) => Ok(Some(issued)),
            Err(AuthError::Repo(RepoError::Conflict { field: "id", .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Generates a key and stores it under `id`, retiring `retire` in the same transaction.
    async fn store_new(
        &self,
        user_id: &UserId,
        name: String,
        retire: Option<KeyRetirement>,
        id: ApiKeyId,
    ) -> Result<(IssuedKey, Option<ApiKeyRecord>), AuthError> {
        let key = generate_api_key();
        let record = ApiKeyRecord {
            id,
            user_id: user_id.clone(),
            name,
            prefix: key.prefix,
            key_hash: key.hash,
            created_at: self.clock.now(),
            last_used_at: None,
            revoked_at: None,
            expires_at: None,
        };
        let outcome = match self
            .keys
            .issue_api_key(&record, self.key_limit, retire.as_ref())
            .await
        {
            Ok(outcome) => outcome,
            Err(RepoError::NotFound { entity: "user" }) => {
                return Err(AuthError::UnknownUser(user_id.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        match (outcome, retire) {
            (KeyIssue::Issued { retired }, _) => Ok((
                IssuedKey {
                    record,
                    plaintext: key.plaintext,
                },
                retired,
            )),
            (KeyIssue::LimitReached, _) => Err(AuthError::KeyLimit {
                max: self.key_limit,
            }),
            (KeyIssue::RetiredKeyNotFound, Some(r)) => Err(AuthError::UnknownKey(r.key_id)),
            (KeyIssue::RetiredKeyNotFound, None) => Err(AuthError::Repo(RepoError::Backend(
                "a key was retired that was not asked for".to_owned(),
            ))),
        }
    }
}

impl KeyIssuer {
    /// A user's keys, newest first (revoked ones included).
    pub async fn list(&self, user_id: &UserId) -> Result<Vec<ApiKeyRecord>, AuthError> {
        Ok(self.keys.api_keys_for_user(user_id).await?)
    }

    /// Replaces one of `user_id`'s keys with a new one of the same name, in one
    /// transaction: the old key stops working after `grace_secs` (0 to
    /// [`MAX_ROTATION_GRACE_SECS`]; at once with 0). Returns the old key as it now is, and
    /// the new one.
    pub async fn rotate(
        &self,
        user_id: &UserId,
        key_id: &ApiKeyId,
        grace_secs: u64,
    ) -> Result<(ApiKeyRecord, IssuedKey), AuthError> {
        if grace_secs > MAX_ROTATION_GRACE_SECS {
            return Err(AuthError::InvalidGrace {
                max: MAX_ROTATION_GRACE_SECS,
                got: grace_secs.to_string(),
            });
        }
        // A revoked or expired key is not replaced: there is nothing left to rotate.
        let now = self.clock.now();
        let old = self
            .keys
            .api_keys_for_user(user_id)
            .await?
            .into_iter()
            .find(|k| &k.id == key_id && k.is_active(now))
            .ok_or_else(|| AuthError::UnknownKey(key_id.clone()))?;
        let retire = KeyRetirement {
            key_id: key_id.clone(),
            // Whole seconds within the checked range: no overflow.
            at: now + time::Duration::seconds(grace_secs as i64),
        };
        let (new, retired) = self
            .store_new(user_id, old.name, Some(retire), ApiKeyId::generate())
            .await?;
        let retired = retired.ok_or_else(|| AuthError::UnknownKey(key_id.clone()))?;
        Ok((retired, new))
    }

    /// Revokes every key of `user_id` still active (before blocking or deleting the user);
    /// returns the keys revoked.
    pub async fn revoke_all(&self, user_id: &UserId) -> Result<Vec<ApiKeyRecord>, AuthError> {
        let now = self.clock.now();
        let mut revoked = Vec::new();
        for key in self.keys.api_keys_for_user(user_id).await? {
            if key.revoked_at.is_none() {
                revoked.extend(self.keys.revoke_api_key(user_id, &key.id, now).await?);
            }
        }
        Ok(revoked)
    }

    /// Revokes one of `user_id`'s keys, then deletes its row. Running servers drop it at
    /// their next poll either way.
    pub async fn delete(&self, user_id: &UserId, key_id: &ApiKeyId) -> Result<(), AuthError> {
        self.revoke(user_id, key_id).await?;
        if self.keys.delete_api_key(user_id, key_id).await? {
            Ok(())
        } else {
            Err(AuthError::UnknownKey(key_id.clone()))
        }
    }

    /// Revokes one of `user_id`'s keys (kept revoked at its first revocation time).
    /// Running servers drop it from their verification caches when they next poll for
    /// revocations ([`crate::verify::KeyVerifier::watch_access_changes`]).
    pub async fn revoke(
        &self,
        user_id: &UserId,
        key_id: &ApiKeyId,
    ) -> Result<ApiKeyRecord, AuthError> {
        self.keys
            .revoke_api_key(user_id, key_id, self.clock.now())
            .await?
            .ok_or_else(|| AuthError::UnknownKey(key_id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usage_core::repo::{User, UserRepository};
    use usage_core::{Plan, SystemClock};
    use usage_testkit::memory::MemoryStore;

    #[test]
    fn generated_keys_have_the_contract_shape_and_differ() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_ne!(a.plaintext, b.plaintext);
        assert!(looks_like_api_key(&a.plaintext));
        assert_eq!(a.plaintext.len(), KEY_PREFIX.len() + KEY_RANDOM_LEN);
        assert!(a.plaintext.starts_with(&a.prefix));
        assert_eq!(a.hash.len(), 64);
        assert!(
            !format!("{a:?}").contains(&a.plaintext),
            "Debug must not print the key"
        );
        // Shown for display: the prefix and four random characters.
        assert_eq!(a.prefix, a.plaintext[..13]);
        assert_eq!(DISPLAY_PREFIX_LEN, 13);
        let debug = format!("{a:?}");
        assert!(debug.starts_with("GeneratedKey {"), "{debug}");
        assert!(
            debug.contains(&a.prefix) && debug.contains(&a.hash),
            "{debug}"
        );
    }

    #[test]
    fn hash_is_sha256_hex() {
        // Known SHA-256 of "abc".
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn shapes_that_are_not_keys() {
        for bad in [
            "",
            "eco_live_",
            "eco_live_short",
            "eyJhbGciOi.x.y",
            "eco_test_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(!looks_like_api_key(bad), "{bad}");
        }
        assert!(!looks_like_api_key(&format!(
            "eco_live_{}-",
            "a".repeat(40)
        )));
    }

    #[test]
    fn key_names_are_checked() {
        assert_eq!(validate_key_name("  ci  ").unwrap(), "ci");
        assert!(validate_key_name("").is_err());
        assert!(validate_key_name("a\nb").is_err());
        assert!(validate_key_name(&"x".repeat(65)).is_err());
        assert!(validate_key_name(&"é".repeat(64)).is_ok());
    }

    #[tokio::test]
    async fn issues_keys_only_to_known_users() {
        let store = Arc::new(MemoryStore::new());
        let issuer = KeyIssuer::new(store.clone(), Arc::new(SystemClock));
        let user = User {
            id: UserId::generate(),
            email: "ada@example.com".into(),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: SystemClock.now(),
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await.unwrap();

        let issued = issuer.issue(&user.id, "ci").await.unwrap();
        let stored = store
            .api_key_by_hash(&hash_api_key(&issued.plaintext))
            .await
            .unwrap();
        assert_eq!(stored, Some(issued.record.clone()));
        assert_eq!(issued.record.name, "ci");

        let debug = format!("{issued:?}");
        assert!(debug.starts_with("IssuedKey {"), "{debug}");
        assert!(debug.contains(issued.record.id.as_str()), "{debug}");
        assert!(!debug.contains(&issued.plaintext), "{debug}");

        let missing = issuer.issue(&UserId::generate(), "ci").await;
        assert!(matches!(missing, Err(AuthError::UnknownUser(_))));

        // The limit counts active keys only; rotation keeps the count.
        let issuer = issuer.with_key_limit(2);
        let second = issuer.issue(&user.id, "second").await.unwrap();
        assert!(matches!(
            issuer.issue(&user.id, "third").await,
            Err(AuthError::KeyLimit { max: 2 })
        ));
        let (old, new) = issuer.rotate(&user.id, &second.record.id, 0).await.unwrap();
        assert!(old.revoked_at.is_some());
        assert_eq!(new.record.name, "second");
        assert_eq!(issuer.list(&user.id).await.unwrap().len(), 3);
        issuer.revoke(&user.id, &issued.record.id).await.unwrap();
        issuer.issue(&user.id, "fourth").await.unwrap();
        let other = UserId::generate();
        assert!(matches!(
            issuer.rotate(&other, &new.record.id, 0).await,
            Err(AuthError::UnknownKey(_))
        ));
    }

    #[tokio::test]
    async fn a_rotated_key_works_for_its_grace_period_of_at_most_a_day() {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(usage_core::ManualClock::new(time::macros::datetime!(
            2026-11-22 10:00 UTC
        )));
        let issuer = KeyIssuer::new(store.clone(), clock.clone());
        let user = User {
            id: UserId::generate(),
            email: "ada@example.com".into(),
            plan: Plan::pro(),
            stripe_customer_id: None,
            created_at: clock.now(),
            plan_subscription_id: None,
            blocked_at: None,
            plan_version: None,
            overrides: None,
        };
        store.create_user(&user).await.unwrap();
        let key = issuer.issue(&user.id, "ci").await.unwrap();
        const DAY: u64 = 86_400;
        assert!(matches!(
            issuer.rotate(&user.id, &key.record.id, DAY + 1).await,
            Err(AuthError::InvalidGrace { max: DAY, .. })
        ));
        let (old, _) = issuer.rotate(&user.id, &key.record.id, DAY).await.unwrap();
        assert_eq!(
            (old.revoked_at, old.expires_at),
            (None, Some(clock.now() + time::Duration::days(1))),
            "expires a day from now"
        );
        assert!(old.is_active(clock.now()));
    }
}
