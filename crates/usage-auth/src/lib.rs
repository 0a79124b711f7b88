//! Credentials of nexus-usage: API keys and user JWTs.
//!
//! - [`keys`]: generating `eco_live_` keys, storing only their SHA-256, issuing and
//!   revoking them through [`usage_core::repo::ApiKeyRepository`].
//! - [`jwt`]: minting and verifying HS256 user tokens with a pinned algorithm.
//! - [`admin`]: which users are admins (`ADMIN_ECO_IDS`).
//! - [`access`]: whether a user may still sign in; blocking and deleting users.
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod jwt;
pub mod keys;
pub mod secret;
pub mod session;
pub mod verify;

use thiserror::Error;
use usage_core::{RepoError, UserId};

/// Why a credential operation failed.
#[derive(Debug, Error)]
pub enum AuthError {
    /// No user has this id.
    #[error("no user with id {0}")]
    UnknownUser(UserId),
    /// The user is blocked (`users unblock` lifts it).
    #[error("user {0} is blocked")]
    Blocked(UserId),
    /// The user has no key with this id.
    #[error("no API key with id {0} for this user")]
    UnknownKey(usage_core::ApiKeyId),
    /// A key name outside the allowed form.
    #[error("name must be 1 to {max} printable characters (got {len} characters)")]
    InvalidKeyName {
        /// Longest name allowed.
        max: usize,
        /// Length given.
        len: usize,
    },
    /// A rotation's grace period outside the allowed range.
    #[error("grace_secs must be between 0 and {max} (got {got})")]
    InvalidGrace {
        /// Longest grace period, in seconds.
        max: u64,
        /// Grace period given, as written.
        got: String,
    },
    /// The user already holds as many active keys as allowed.
    #[error("a user may hold at most {max} active API keys; revoke one first")]
    KeyLimit {
        /// The limit.
        max: usize,
    },
    /// A token lifetime outside the allowed range.
    #[error("ttl-secs must be between 1 and {max} (got {got})")]
    InvalidTtl {
        /// Longest lifetime allowed, in seconds.
        max: u64,
        /// Lifetime given.
        got: u64,
    },
    /// A configured secret is too short to be safe.
    #[error("{name} must be at least {min} bytes long")]
    WeakSecret {
        /// The variable that holds it.
        name: &'static str,
        /// Shortest secret accepted.
        min: usize,
    },
    /// A token could not be signed.
    #[error("cannot sign the token: {0}")]
    Signing(String),
    /// A token was refused. The reason is for logs only, never for the client.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The store failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
}
