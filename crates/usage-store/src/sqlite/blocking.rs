//! Where the SQLite connection's blocking calls run: tokio's blocking pool, like
//! diesel-async's own spawner, except when the caller gives up on a call.
//!
//! diesel-async's spawner waits for an abandoned call with `block_in_place`, which panics
//! on a current-thread runtime (actix-web's workers, `#[tokio::test]`). Waiting is needed
//! (the connection must not be shared when it goes back to the pool), so this one waits
//! plainly: the call is one SQLite statement, bounded by the busy timeout.

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};

use diesel_async::sync_connection_wrapper::SpawnBlocking;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::task::JoinHandle;

/// A boxed error of a blocking call that did not finish (it panicked).
type CallError = Box<dyn Error + Send + Sync + 'static>;

/// Runs a connection's calls on the blocking pool of the runtime it was opened on.
pub struct BlockingPool(Handle);

impl BlockingPool {
    /// The blocking pool of `runtime`.
    pub(crate) fn new(runtime: Handle) -> Self {
        Self(runtime)
    }
}

impl SpawnBlocking for BlockingPool {
    fn spawn_blocking<'a, R>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> Pin<Box<dyn Future<Output = Result<R, CallError>> + Send + 'a>>
    where
        R: Send + 'static,
    {
        let finished = Arc::new(Finished::default());
        let mark = FinishOnDrop(finished.clone());
        let handle = self.0.spawn_blocking(move || {
            let _mark = mark;
            task()
        });
        Box::pin(Call { handle, finished })
    }

    fn get_runtime() -> Self {
        // Only diesel-async's own constructors call this; the store passes its runtime.
        Self(Handle::current())
    }
}

/// Set once a call has returned or unwound.
#[derive(Default)]
struct Finished {
    done: Mutex<bool>,
    changed: Condvar,
}

impl Finished {
    fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.changed.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Marks its call finished when dropped: on return and on a panic alike.
struct FinishOnDrop(Arc<Finished>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        *self.0.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0.changed.notify_all();
    }
}

/// A call in flight; dropping it waits for the call to finish.
struct Call<R> {
    handle: JoinHandle<R>,
    finished: Arc<Finished>,
}

impl<R> Future for Call<R> {
    type Output = Result<R, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle).poll(cx).map_err(Into::into)
    }
}

impl<R> Drop for Call<R> {
    fn drop(&mut self) {
        if self.handle.is_finished() {
            return;
        }
        // The flavor of the runtime this is dropped on, not of the one that runs the call.
        let finished = &self.finished;
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| finished.wait()),
            _ => finished.wait(),
        }
    }
}
