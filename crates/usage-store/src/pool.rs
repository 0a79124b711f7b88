//! What a store is on either backend: a bb8 pool of diesel-async connections, and the
//! clock its rules of time read.

use std::sync::Arc;

use bb8::{ManageConnection, Pool, PooledConnection};
use usage_core::{Clock, RepoError};

/// All repositories on one database, through the connections `M` manages
/// ([`PgStore`](crate::PgStore), [`SqliteStore`](crate::SqliteStore)).
pub struct SqlStore<M: ManageConnection> {
    pub(crate) pool: Pool<M>,
    /// The pool's size (bb8 does not tell it back).
    pub(crate) max_connections: u32,
    /// What the store's rules of time read (which calls are late for their day).
    pub(crate) clock: Arc<dyn Clock>,
}

impl<M: ManageConnection> std::fmt::Debug for SqlStore<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("pool", &self.pool.state())
            .finish()
    }
}

impl<M: ManageConnection> SqlStore<M>
where
    M::Error: std::error::Error + 'static,
{
    /// A connection of the pool.
    pub(crate) async fn conn(&self) -> Result<PooledConnection<'_, M>, RepoError> {
        self.pool
            .get()
            .await
            .map_err(|e| RepoError::Unavailable(e.to_string()))
    }
}
