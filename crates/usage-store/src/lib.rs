//! The diesel repositories of nexus-usage.
//!
//! - PostgreSQL through diesel-async and a bb8 pool: production, any number of instances.
//! - SQLite through diesel (bundled, WAL, busy timeout, foreign keys) and diesel-async's
//!   `SyncConnectionWrapper`: the embedded default.
//!
//! Each repository method is written once, in `repositories.rs`, and compiled for each
//! backend; what differs between them is named in the table at its top.
//!
//! The backend is chosen at run time from the database URL, and both implement
//! [`usage_core::Store`]. Migrations are embedded in the binary.
//!
//! ```no_run
//! # async fn demo() -> Result<(), usage_store::StoreError> {
//! let url = "sqlite://data/usage.db";
//! usage_store::migrate(url).await?;
//! let store = usage_store::open(url, &usage_store::PoolOptions::default()).await?;
//! store.ping().await.expect("database answers");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod common;
mod error;
mod pool;
mod postgres;
mod schema;
mod sqlite;
mod types;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use usage_core::{Clock, Store, SystemClock};

pub use pool::SqlStore;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Failures to reach or prepare a database (repository operations report
/// [`usage_core::RepoError`] instead).
#[derive(Debug, Error)]
pub enum StoreError {
    /// The URL is neither `postgres://...` nor `sqlite://PATH`.
    #[error("DATABASE_URL must start with postgres:// or sqlite:// (got {0:?})")]
    UnsupportedUrl(String),
    /// The database could not be reached or opened.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// What the driver said.
        reason: String,
    },
    /// Applying migrations failed.
    #[error("migrating {url} failed: {reason}")]
    Migration {
        /// The URL, password removed.
        url: String,
        /// What failed.
        reason: String,
    },
}

/// Connection pool settings, explicit on both backends, and the store's clock.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Most connections open at once.
    pub max_connections: u32,
    /// How long to wait for a connection (to open one, or for one to be free).
    pub connect_timeout: Duration,
    /// Longest a single statement may run (PostgreSQL `statement_timeout`; SQLite waits
    /// this long for a locked database).
    pub statement_timeout: Duration,
    /// What the store's rules of time read (which calls are late for their day): the
    /// server's clock, so that a fake one in tests holds for the database too.
    pub clock: Arc<dyn Clock>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
        }
    }
}

/// A parsed database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `postgres://` or `postgresql://`, kept whole for the driver.
    Postgres(String),
    /// `sqlite://PATH`: a relative or (with a third slash) absolute file path.
    Sqlite(PathBuf),
}

impl DatabaseUrl {
    /// Recognises the backend from the scheme.
    ///
    /// ```
    /// use usage_store::DatabaseUrl;
    /// assert_eq!(DatabaseUrl::parse("sqlite://data/usage.db").unwrap(),
    ///            DatabaseUrl::Sqlite("data/usage.db".into()));
    /// assert_eq!(DatabaseUrl::parse("sqlite:///var/lib/usage.db").unwrap(),
    ///            DatabaseUrl::Sqlite("/var/lib/usage.db".into()));
    /// assert!(DatabaseUrl::parse("mysql://x").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        match url.strip_prefix("sqlite://") {
            Some(path) if !path.is_empty() => Ok(Self::Sqlite(PathBuf::from(path))),
            _ => Err(StoreError::UnsupportedUrl(redact(url))),
        }
    }
}

/// The URL without its password, for messages and logs.
///
/// ```
/// assert_eq!(usage_store::redact("postgres://app:s3cret@db:5432/usage"),
///            "postgres://app:***@db:5432/usage");
/// ```
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// Opens a pool on the database at `url` and checks that it answers. Does not migrate.
pub async fn open(url: &str, options: &PoolOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match DatabaseUrl::parse(url)? {
        DatabaseUrl::Postgres(url) => Arc::new(PgStore::open(&url, options).await?),
        DatabaseUrl::Sqlite(path) => Arc::new(SqliteStore::open(&path, options).await?),
    })
}

/// Applies the pending embedded migrations of the backend of `url`; returns how many ran.
/// A SQLite file (and its directory) is created when missing.
pub async fn migrate(url: &str) -> Result<usize, StoreError> {
    match DatabaseUrl::parse(url)? {
        DatabaseUrl::Postgres(url) => postgres::migrate(&url).await,
        DatabaseUrl::Sqlite(path) => sqlite::migrate(&path).await,
    }
}
