//! The usage tracker: admitted calls go onto a bounded queue without blocking the
//! request; a background task writes them in batches, retrying failed batches (same
//! event ids, so a retry never counts twice) until they are stored.
//!
//! When the queue is full, [`UsageTracker::track`] waits for room: the request that
//! produced the call is held back (back-pressure) rather than its call being dropped.
//! Each such wait is counted ([`TrackerStats::queue_full_waits`]).
//!
//! With more than one writer ([`TrackerConfig::concurrency`]), the queue is split into
//! one lane per writer and each customer's calls go to one lane: batches written at the
//! same time then hold different customers, so each batch updates fewer counters for as
//! many calls (a quarter as many with four writers and many customers), and no writer
//! waits on another's counter rows. One
//! customer's burst still gets every writer: while its lane's writer is busy, its calls
//! go to a lane with nothing to do (never to another busy one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::counter::Counter;
use crate::repo::{ApiKeyRepository, DeadLetter, IncludedCalls, UsageRepository};
use crate::spool::{Spool, SpoolConfig, SpoolError};
use crate::{ApiKeyId, UsageEvent};

/// Tracker settings.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Write a batch as soon as this many calls wait (`USAGE_BATCH_SIZE`, default 100).
    pub batch_size: usize,
    /// Write whatever waits at least this often (`USAGE_FLUSH_INTERVAL_MS`, default 5 s).
    pub flush_interval: Duration,
    /// Calls the queue holds before `track` waits (`USAGE_QUEUE_CAPACITY`).
    pub queue_capacity: usize,
    /// First wait after a failed write; doubles up to `retry_max`.
    pub retry_initial: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
    /// At shutdown, how long to keep retrying a failing store before giving up.
    pub shutdown_retry_for: Duration,
    /// Batches written at once (`USAGE_FLUSH_CONCURRENCY`): more than one pays off on
    /// PostgreSQL; SQLite has a single writer anyway. Each writer has its lane of the
    /// queue (`queue_capacity` is shared between them).
    pub concurrency: usize,
    /// Largest batch written at once when more than `batch_size` calls wait (a burst,
    /// sustained load, the queue after an outage). Larger batches touch each customer's
    /// counter once for more calls.
    pub max_batch: usize,
    /// Told of every batch stored (for histograms kept elsewhere, e.g. the server's
    /// `/metrics`).
    pub observer: Option<Arc<dyn BatchObserver>>,
}

/// Told of every batch the tracker stores, from its writer task: keep it cheap.
pub trait BatchObserver: Send + Sync + std::fmt::Debug {
    /// `events` calls were stored in one write that took `took` (retries not included).
    fn batch_stored(&self, events: usize, took: Duration);
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            flush_interval: Duration::from_millis(5_000),
            queue_capacity: 100_000,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            shutdown_retry_for: Duration::from_secs(30),
            concurrency: 1,
            max_batch: 2_000,
            observer: None,
        }
    }
}

// Where it has always been imported from; it lives beside the event, so that the spool
// (which the tracker uses) does not use the tracker back.
pub use crate::event::TrackedCall;

/// Live figures of the tracker, for `/metrics`.
#[derive(Debug)]
pub struct TrackerStats {
    /// Calls handed to `track`.
    pub tracked: Counter,
    /// Times `track` found the queue full and waited.
    pub queue_full_waits: AtomicU64,
    /// Calls taken off the queue but not yet stored (held for a batch, or being written).
    pub in_batch: AtomicU64,
    /// Events newly stored.
    pub flushed: AtomicU64,
    /// Events the store already had (replays), not counted again.
    pub duplicates: AtomicU64,
    /// Failed batch writes (each retried).
    pub flush_failures: AtomicU64,
    /// Successful batch writes.
    pub flushes: AtomicU64,
    /// Total time of successful batch writes, in microseconds.
    pub flush_micros: AtomicU64,
    /// Calls the durable spool could not write (kept in memory only).
    pub spool_failures: AtomicU64,
    /// Calls the store refused for good, kept as dead letters.
    pub dead_letters: AtomicU64,
    /// Keys whose last use is remembered (those used in the last minute or two).
    pub keys_remembered: AtomicU64,
}

impl Default for TrackerStats {
    fn default() -> Self {
        Self {
            tracked: Counter::default(),
            queue_full_waits: AtomicU64::new(0),
            in_batch: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            flush_failures: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush_micros: AtomicU64::new(0),
            spool_failures: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            keys_remembered: AtomicU64::new(0),
        }
    }
}

/// What the tracker did by the time it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlushReport {
    /// Events stored during the final flush.
    pub flushed_at_shutdown: u64,
    /// Events stored over the tracker's life.
    pub flushed_total: u64,
    /// Events that could not be stored before the shutdown retry time ran out.
    pub unwritten: u64,
}

/// The tracker was shut down and takes no more calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the usage tracker has shut down")]
pub struct TrackerClosed;

/// A call in the queue, with the spool file it is in (durable mode).
#[derive(Debug)]
struct Queued {
    call: TrackedCall,
    spooled_in: Option<u64>,
    /// When it was handed over, for the age of the oldest waiting call.
    queued_at: Instant,
}

/// Where calls are handed over. Cheap to clone; every clone feeds the same queue.
#[derive(Debug, Clone)]
pub struct UsageTracker {
    /// One per writer. Only the trackers hold them: once every clone is gone, the
    /// writers see their lanes disconnected and stop.
    lanes: Arc<[mpsc::Sender<Queued>]>,
    /// What each lane's writer is doing, shared with the writers.
    lane_states: Arc<[LaneState]>,
    /// A lane with this many calls waiting has a batch ready.
    batch_size: usize,
    stats: Arc<TrackerStats>,
    spool: Option<Arc<Spool>>,
    /// What `LaneState::oldest_waiting_micros` counts from.
    started: Instant,
}

/// One lane's writer, as the callers see it.
#[derive(Debug)]
struct LaneState {
    /// A batch of this lane is being written (each lane writes one at a time).
    writing: AtomicBool,
    /// When the lane's oldest call not yet stored was handed over, in microseconds since
    /// the tracker started; `u64::MAX` when none waits. Updated by the writer every tick.
    oldest_waiting_micros: AtomicU64,
}

/// What a lane's writer has to do, as [`choose_lane`] sees it.
#[derive(Debug, Clone, Copy)]
struct LaneLoad {
    /// Its writer is writing a batch.
    writing: bool,
    /// A batch's worth of calls waits in it.
    batch_ready: bool,
}

/// The lane for a call whose customer's lane is `home`, of `lanes`: `home`, unless its
/// writer is busy with a batch ready behind it; then the next lane with nothing to do,
/// if any.
fn choose_lane(home: usize, lanes: usize, load: impl Fn(usize) -> LaneLoad) -> usize {
    let backed_up = |l: LaneLoad| l.writing && l.batch_ready;
    let idle = |l: LaneLoad| !l.writing && !l.batch_ready;
    if !backed_up(load(home)) {
        return home;
    }
    (1..lanes)
        .map(|i| (home + i) % lanes)
        .find(|&lane| idle(load(lane)))
        .unwrap_or(home)
}

/// Which lane a customer's calls go to: the same one for the process's life.
fn home_lane(user: &crate::UserId, lanes: usize) -> usize {
    use std::hash::BuildHasher;
    let hash = foldhash::fast::FixedState::with_seed(0x5eed).hash_one(user.as_str());
    // The remainder is below `lanes`, a usize.
    (hash % lanes as u64) as usize
}

/// Owns the background writers; [`TrackerWorker::shutdown`] drains and stops them.
#[derive(Debug)]
pub struct TrackerWorker {
    stop: watch::Sender<bool>,
    /// Joins the lanes' writers; returns the calls given up on.
    task: JoinHandle<u64>,
    stats: Arc<TrackerStats>,
}

impl UsageTracker {
    /// Starts the background writer on the current tokio runtime.
    pub fn start(
        usage: Arc<dyn UsageRepository>,
        keys: Arc<dyn ApiKeyRepository>,
        config: TrackerConfig,
    ) -> (Self, TrackerWorker) {
        Self::start_with(usage, keys, config, None)
    }

    /// Starts the background writer in durable mode: every call is in the spool on disk
    /// before [`UsageTracker::track`] returns, and calls a previous run left in the spool
    /// are stored again (once: they keep their ids).
    pub fn start_durable(
        usage: Arc<dyn UsageRepository>,
        keys: Arc<dyn ApiKeyRepository>,
        config: TrackerConfig,
        spool: &SpoolConfig,
    ) -> Result<(Self, TrackerWorker), SpoolError> {
        let (spool, replay) = Spool::open(spool)?;
        let (tracker, worker) = Self::start_with(usage, keys, config, Some(Arc::new(spool)));
        let replayer = tracker.clone();
        tokio::spawn(async move {
            for (file, call) in replay {
                let queued = Queued {
                    call,
                    spooled_in: Some(file),
                    queued_at: Instant::now(),
                };
                if replayer.enqueue(queued).await.is_err() {
                    break; // shut down first: the rest stays in the spool for next time
                }
            }
        });
        Ok((tracker, worker))
    }

    fn start_with(
        usage: Arc<dyn UsageRepository>,
        keys: Arc<dyn ApiKeyRepository>,
        config: TrackerConfig,
        spool: Option<Arc<Spool>>,
    ) -> (Self, TrackerWorker) {
        let lane_count = config.concurrency.max(1);
        let per_lane = config.queue_capacity.max(1).div_ceil(lane_count);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..lane_count).map(|_| mpsc::channel(per_lane)).unzip();
        let lane_states: Arc<[LaneState]> = (0..lane_count)
            .map(|_| LaneState {
                writing: AtomicBool::new(false),
                oldest_waiting_micros: AtomicU64::new(u64::MAX),
            })
            .collect();
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(TrackerStats::default());
        let started = Instant::now();
        let batch_size = config.batch_size.max(1);
        let shared = Arc::new(Shared {
            usage,
            keys,
            config,
            stats: Arc::clone(&stats),
            touched: Mutex::new(Touched::default()),
            spool: spool.clone(),
        });
        let mut writers = JoinSet::new();
        for (lane, rx) in receivers.into_iter().enumerate() {
            let writer = Writer {
                started,
                shared: Arc::clone(&shared),
                lanes: Arc::clone(&lane_states),
                lane,
            };
            writers.spawn(writer.run(rx, stop_rx.clone()));
        }
        // Dropping this task (an abort) drops the set, which aborts every writer.
        let task = tokio::spawn(async move {
            let mut unwritten = 0;
            while let Some(done) = writers.join_next().await {
                match done {
                    Ok(given_up) => unwritten += given_up,
                    Err(e) => tracing::error!(error = %e, "a usage writer failed"),
                }
            }
            if let Some(spool) = &shared.spool {
                spool.close();
            }
            if unwritten > 0 {
                tracing::error!(
                    unwritten,
                    "usage events could not be stored before shutdown"
                );
            }
            unwritten
        });
        let tracker = Self {
            lanes: senders.into(),
            lane_states,
            batch_size,
            stats: Arc::clone(&stats),
            spool,
            started,
        };
        (tracker, TrackerWorker { stop, task, stats })
    }

    /// Queues a finished call. Returns at once unless the queue is full, in which case it
    /// waits for room (never drops the call). In durable mode, first waits until the call
    /// is in the spool on disk.
    pub async fn track(&self, call: TrackedCall) -> Result<(), TrackerClosed> {
        self.stats.tracked.add(1);
        let mut spooled_in = None;
        if let Some(spool) = &self.spool {
            match spool.append(&call).await {
                Ok(file) => spooled_in = Some(file),
                Err(e) => {
                    // Still counted, from memory: a full disk must not refuse calls.
                    self.stats.spool_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "usage spool failed; this call is kept in memory only");
                }
            }
        }
        self.enqueue(Queued {
            call,
            spooled_in,
            queued_at: Instant::now(),
        })
        .await
    }

    /// Puts a call in its lane (see [`UsageTracker::lane_for`]); when that lane is full,
    /// in any lane with room; when every lane is full, waits for room in its lane.
    async fn enqueue(&self, queued: Queued) -> Result<(), TrackerClosed> {
        let lane = self.lane_for(&queued.call.event.user_id);
        let mut queued = match self.lanes[lane].try_send(queued) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(queued)) => queued,
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(TrackerClosed),
        };
        for other in (1..self.lanes.len()).map(|i| (lane + i) % self.lanes.len()) {
            match self.lanes[other].try_send(queued) {
                Ok(()) => return Ok(()),
                Err(
                    mpsc::error::TrySendError::Full(back) | mpsc::error::TrySendError::Closed(back),
                ) => queued = back,
            }
        }
        self.stats.queue_full_waits.fetch_add(1, Ordering::Relaxed);
        self.lanes[lane]
            .send(queued)
            .await
            .map_err(|_| TrackerClosed)
    }

    /// The customer's own lane, unless its writer is busy with a batch ready behind it:
    /// then a lane with nothing to do, if any. Under balanced load every lane is busy and
    /// each customer stays in its lane.
    fn lane_for(&self, user: &crate::UserId) -> usize {
        let n = self.lanes.len();
        if n == 1 {
            return 0;
        }
        choose_lane(home_lane(user, n), n, |lane| LaneLoad {
            writing: self.lane_states[lane].writing.load(Ordering::Relaxed),
            batch_ready: self.queued_in(lane) >= self.batch_size,
        })
    }

    fn queued_in(&self, lane: usize) -> usize {
        let tx = &self.lanes[lane];
        tx.max_capacity() - tx.capacity()
    }

    /// Calls waiting: in the queue, plus the batches being gathered and written.
    pub fn queue_depth(&self) -> u64 {
        let queued: usize = (0..self.lanes.len()).map(|lane| self.queued_in(lane)).sum();
        queued as u64 + self.stats.in_batch.load(Ordering::Relaxed)
    }

    /// Calls the queue holds before [`UsageTracker::track`] waits for room.
    pub fn queue_capacity(&self) -> u64 {
        self.lanes.iter().map(|tx| tx.max_capacity() as u64).sum()
    }

    /// How long the oldest call not yet stored has waited (as of the writers' last
    /// look, at most a few milliseconds ago); `None` when every call is stored.
    pub fn oldest_waiting(&self) -> Option<Duration> {
        let micros = self
            .lane_states
            .iter()
            .map(|lane| lane.oldest_waiting_micros.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX);
        (micros != u64::MAX).then(|| {
            let queued_at = self.started + Duration::from_micros(micros);
            Instant::now().saturating_duration_since(queued_at)
        })
    }

    /// Live figures.
    pub fn stats(&self) -> &TrackerStats {
        &self.stats
    }
}

impl TrackerWorker {
    /// Stops the writer at once, without writing what it holds, as a crash would. What
    /// the durable spool holds is stored at the next start; without a spool it is lost.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Stops taking calls, writes every call still queued, and reports. Call it after the
    /// HTTP server has finished its in-flight requests.
    pub async fn shutdown(self) -> FlushReport {
        let flushed_before = self.stats.flushed.load(Ordering::Relaxed);
        let _ = self.stop.send(true);
        let unwritten = self.task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "usage tracker task failed");
            0
        });
        let flushed_total = self.stats.flushed.load(Ordering::Relaxed);
        FlushReport {
            flushed_at_shutdown: flushed_total - flushed_before,
            flushed_total,
            unwritten,
        }
    }
}

/// The writer of one lane.
struct Writer {
    shared: Arc<Shared>,
    started: Instant,
    lanes: Arc<[LaneState]>,
    lane: usize,
}

/// What every batch write needs.
struct Shared {
    usage: Arc<dyn UsageRepository>,
    keys: Arc<dyn ApiKeyRepository>,
    config: TrackerConfig,
    stats: Arc<TrackerStats>,
    /// When each key's `last_used_at` was last written, to write it at most once a minute.
    touched: Mutex<Touched>,
    /// The durable spool, told when its calls are stored.
    spool: Option<Arc<Spool>>,
}

/// Keys whose `last_used_at` was written lately.
#[derive(Debug, Default)]
struct Touched {
    at: foldhash::HashMap<ApiKeyId, OffsetDateTime>,
    /// When entries older than [`TOUCH_EVERY`] are next dropped: such an entry decides
    /// nothing any more (the key is written again either way), so memory holds only the
    /// keys used in the last minute or two.
    next_prune: Option<OffsetDateTime>,
}

/// `last_used_at` is kept to this precision: one write per key per interval, not one per
/// batch.
const TOUCH_EVERY: time::Duration = time::Duration::MINUTE;

/// How often the writer looks at the queue.
const TICK: Duration = Duration::from_millis(10);

/// Moves calls from the queue into `batch` without waiting, up to `max` in the batch,
/// counting them as held. Returns whether every sender is gone (and the queue is empty).
fn take_waiting(
    rx: &mut mpsc::Receiver<Queued>,
    batch: &mut Vec<Queued>,
    max: usize,
    stats: &TrackerStats,
) -> bool {
    let before = batch.len();
    let mut disconnected = false;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(call) => batch.push(call),
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                disconnected = true;
                break;
            }
        }
    }
    stats
        .in_batch
        .fetch_add((batch.len() - before) as u64, Ordering::Relaxed);
    disconnected
}

impl Writer {
    /// Writes the lane's calls until a stop is requested or every tracker is gone, then
    /// drains the lane. Returns the number of calls given up on.
    async fn run(self, mut rx: mpsc::Receiver<Queued>, mut stop: watch::Receiver<bool>) -> u64 {
        let config = &self.shared.config;
        let batch_size = config.batch_size.max(1);
        // When more than a batch waits (a burst, or after an outage), write up to this many
        // at once.
        let max_batch = batch_size.max(config.max_batch);
        let writing = &self.lanes[self.lane].writing;
        // The writer looks at the queue on a short tick instead of being woken by every
        // call: at tens of thousands of calls a second, per-call wake-ups cost more than
        // the calls' own handling.
        let tick = config.flush_interval.min(TICK);
        let mut batch: Vec<Queued> = Vec::with_capacity(batch_size);
        // The batch being written (at most one), and when its oldest call was handed over.
        let mut in_flight: JoinSet<u64> = JoinSet::new();
        let mut oldest_in_flight: Option<Instant> = None;
        let mut unwritten = 0;
        let mut deadline = Instant::now() + config.flush_interval;
        loop {
            tokio::select! {
                biased;
                // A stop request, or the worker handle dropped.
                _ = stop.changed() => break,
                () = tokio::time::sleep(tick) => {}
            }
            if let Some(done) = in_flight.try_join_next() {
                oldest_in_flight = None;
                unwritten += done.unwrap_or(0);
            }
            writing.store(!in_flight.is_empty(), Ordering::Relaxed);
            if !in_flight.is_empty() {
                // One batch at a time per lane: calls wait in the queue (back-pressure).
                self.note_oldest(oldest_in_flight, &batch);
                continue;
            }
            let disconnected = take_waiting(&mut rx, &mut batch, max_batch, &self.shared.stats);
            let now = Instant::now();
            if let Some(first) = batch.first().map(|q| q.queued_at)
                && (batch.len() >= batch_size || now >= deadline)
            {
                let taken = self.shared.take(&mut batch);
                let shared = Arc::clone(&self.shared);
                let stop = stop.clone();
                oldest_in_flight = Some(first);
                in_flight.spawn(async move { shared.write(taken, stop, None).await });
                writing.store(true, Ordering::Relaxed);
            }
            self.note_oldest(oldest_in_flight, &batch);
            // The interval runs from a write, or from the first call after a quiet spell
            // (while the batch is empty the deadline keeps being moved to a tick from now;
            // pushing it further on every tick would let it run away while idle).
            if now >= deadline || batch.is_empty() {
                deadline = now + config.flush_interval;
            }
            if disconnected {
                break; // every sender is gone
            }
        }

        // Drain: no new calls are taken; what is being written finishes, then everything
        // still queued is written.
        rx.close();
        let give_up_at = Instant::now() + config.shutdown_retry_for;
        while let Some(done) = in_flight.join_next().await {
            unwritten += done.unwrap_or(0);
        }
        loop {
            let room = max_batch - batch.len();
            let received = rx.recv_many(&mut batch, room).await;
            self.shared
                .stats
                .in_batch
                .fetch_add(received as u64, Ordering::Relaxed);
            if batch.is_empty() {
                break;
            }
            if batch.len() >= max_batch || received == 0 {
                let taken = self.shared.take(&mut batch);
                unwritten += self
                    .shared
                    .write(taken, stop.clone(), Some(give_up_at))
                    .await;
            }
        }
        self.note_oldest(None, &[]);
        writing.store(false, Ordering::Relaxed);
        unwritten
    }
}

impl Writer {
    /// Publishes when the oldest call not yet stored was handed over: the first of the
    /// oldest batch being written, else the first of the batch being gathered.
    fn note_oldest(&self, in_flight: Option<Instant>, gathering: &[Queued]) {
        let oldest = in_flight.or_else(|| gathering.first().map(|q| q.queued_at));
        let micros = oldest.map_or(u64::MAX, |at| {
            let since = at.saturating_duration_since(self.started).as_micros();
            u64::try_from(since).unwrap_or(u64::MAX - 1)
        });
        self.lanes[self.lane]
            .oldest_waiting_micros
            .store(micros, Ordering::Relaxed);
    }
}

/// A batch ready to write.
struct Taken {
    events: Vec<UsageEvent>,
    /// The users' included calls.
    included: IncludedCalls,
    /// Calls per spool file, to tell the spool once they are stored.
    spooled: HashMap<u64, u64>,
}

impl Shared {
    /// Empties `batch` into what to write.
    fn take(&self, batch: &mut Vec<Queued>) -> Taken {
        let included: IncludedCalls = batch
            .iter()
            .filter_map(|q| {
                q.call
                    .included_calls
                    .map(|n| (q.call.event.user_id.clone(), n))
            })
            .collect();
        let mut spooled: HashMap<u64, u64> = HashMap::new();
        let events: Vec<UsageEvent> = batch
            .drain(..)
            .map(|q| {
                if let Some(file) = q.spooled_in {
                    *spooled.entry(file).or_default() += 1;
                }
                q.call.event
            })
            .collect();
        Taken {
            events,
            included,
            spooled,
        }
    }

    /// Writes `events` until they are stored. Once a stop is requested, retries only
    /// until `give_up_at` (set then if not given). Returns the number of events given up
    /// on. Retries send the same events (same ids): a retry never counts twice.
    ///
    /// A batch the store refuses for good (an unknown user or key) is split in halves
    /// until the refused calls stand alone; those are kept as dead letters and the rest is
    /// written, so one bad call never stops the others.
    async fn write(
        &self,
        taken: Taken,
        mut stop: watch::Receiver<bool>,
        mut give_up_at: Option<Instant>,
    ) -> u64 {
        let Taken {
            events,
            included,
            spooled,
        } = taken;
        let total = events.len() as u64;
        let mut given_up = 0;
        let mut parts = vec![events];
        while let Some(mut part) = parts.pop() {
            let mut backoff = self.config.retry_initial;
            // Lines logged while writing (a failure, each retry) say which batch.
            let span = tracing::info_span!("usage_batch_write", events = part.len());
            let written = tracing::Instrument::instrument(
                async {
                    loop {
                        let started = Instant::now();
                        match self.usage.record_usage(&part, &included).await {
                            Ok(outcome) => break Some(Ok((outcome, started.elapsed()))),
                            Err(e) if e.is_permanent() => break Some(Err(e)),
                            Err(e) => {
                                let retry = self.wait_to_retry(
                                    &e,
                                    "usage batch",
                                    &mut backoff,
                                    &mut stop,
                                    &mut give_up_at,
                                );
                                if !retry.await {
                                    break None;
                                }
                            }
                        }
                    }
                },
                span,
            )
            .await;
            match written {
                Some(Ok((outcome, took))) => {
                    let s = &self.stats;
                    s.flushed.fetch_add(outcome.inserted, Ordering::Relaxed);
                    s.duplicates
                        .fetch_add(outcome.duplicates, Ordering::Relaxed);
                    s.flushes.fetch_add(1, Ordering::Relaxed);
                    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                    s.flush_micros.fetch_add(micros, Ordering::Relaxed);
                    if let Some(observer) = &self.config.observer {
                        observer.batch_stored(part.len(), took);
                    }
                    self.touch_keys(&part).await;
                }
                Some(Err(_)) if part.len() > 1 => {
                    let second = part.split_off(part.len() / 2);
                    parts.push(second);
                    parts.push(part);
                }
                Some(Err(refused)) => {
                    if !self
                        .keep_dead_letter(&part, &included, &refused, &mut stop, &mut give_up_at)
                        .await
                    {
                        given_up += part.len() as u64;
                    }
                }
                None => {
                    given_up +=
                        part.len() as u64 + parts.iter().map(|p| p.len() as u64).sum::<u64>();
                    break;
                }
            }
        }
        // What was given up on stays in the spool for the next start (what was stored
        // of the same files is replayed too, and stored once: same event ids).
        if given_up == 0
            && let Some(spool) = &self.spool
        {
            for (file, calls) in &spooled {
                spool.stored(*file, *calls);
            }
        }
        self.stats.in_batch.fetch_sub(total, Ordering::Relaxed);
        given_up
    }

    /// Keeps a call the store refused for good as a dead letter (retried like a batch
    /// while the store is unavailable). Returns whether it is kept.
    async fn keep_dead_letter(
        &self,
        part: &[UsageEvent],
        included: &IncludedCalls,
        refused: &crate::RepoError,
        stop: &mut watch::Receiver<bool>,
        give_up_at: &mut Option<Instant>,
    ) -> bool {
        let letters: Vec<DeadLetter> = part
            .iter()
            .map(|event| {
                tracing::error!(
                    event_id = %event.event_id,
                    user_id = %event.user_id,
                    api_key_id = %event.api_key_id,
                    reason = %refused,
                    "usage event refused by the store; kept as a dead letter (usage-server dead-letters)"
                );
                DeadLetter {
                    event: event.clone(),
                    included_calls: included.get(&event.user_id).copied(),
                    reason: refused.to_string(),
                    failed_at: OffsetDateTime::now_utc(),
                }
            })
            .collect();
        let mut backoff = self.config.retry_initial;
        let kept = loop {
            match self.usage.record_dead_letters(&letters).await {
                Ok(()) => break Some(Ok(())),
                Err(e) if e.is_permanent() => break Some(Err(e)),
                Err(e) => {
                    if !self
                        .wait_to_retry(&e, "dead letter", &mut backoff, stop, give_up_at)
                        .await
                    {
                        break None;
                    }
                }
            }
        };
        match kept {
            Some(Ok(())) => {
                self.stats
                    .dead_letters
                    .fetch_add(letters.len() as u64, Ordering::Relaxed);
                true
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "a dead letter could not be kept");
                false
            }
            None => false,
        }
    }

    /// After a failed write that may pass later: waits `backoff` (doubling it up to the
    /// maximum) and returns true to try again, or false once a stop was requested and
    /// `give_up_at` (set then if not given) has passed.
    async fn wait_to_retry(
        &self,
        e: &crate::RepoError,
        what: &str,
        backoff: &mut Duration,
        stop: &mut watch::Receiver<bool>,
        give_up_at: &mut Option<Instant>,
    ) -> bool {
        self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
        // A stop request, or the worker handle dropped.
        let stopping = *stop.borrow() || stop.has_changed().is_err();
        if give_up_at.is_none() && stopping {
            *give_up_at = Some(Instant::now() + self.config.shutdown_retry_for);
        }
        if give_up_at.is_some_and(|at| Instant::now() + *backoff > at) {
            tracing::error!(error = %e, "giving up on writing a {what} at shutdown");
            return false;
        }
        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
            "writing a {what} failed; will retry");
        tokio::select! {
            () = tokio::time::sleep(*backoff) => {}
            // Wake early on a stop request to start the shutdown deadline.
            _ = stop.changed(), if give_up_at.is_none() => {}
        }
        *backoff = (*backoff * 2).min(self.config.retry_max);
        true
    }

    /// Moves `last_used_at` of the batch's keys forward, at most once a minute per key;
    /// best effort (not billable data).
    async fn touch_keys(&self, events: &[UsageEvent]) {
        // Per call of the batch: a fast hasher (our own ids as keys).
        let mut last: foldhash::HashMap<&ApiKeyId, OffsetDateTime> =
            foldhash::HashMap::with_capacity_and_hasher(events.len(), Default::default());
        for e in events {
            let at = last.entry(&e.api_key_id).or_insert(e.created_at);
            *at = (*at).max(e.created_at);
        }
        let mut used: Vec<(ApiKeyId, OffsetDateTime)> = Vec::new();
        {
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            let newest = last.values().max().copied();
            for (key, at) in last {
                if touched
                    .at
                    .get(key)
                    .is_none_or(|before| at - *before >= TOUCH_EVERY)
                {
                    touched.at.insert(key.clone(), at);
                    used.push((key.clone(), at));
                }
            }
            if let Some(newest) = newest
                && touched.next_prune.is_none_or(|next| newest >= next)
            {
                touched.at.retain(|_, at| newest - *at < TOUCH_EVERY);
                touched.next_prune = Some(newest + TOUCH_EVERY);
            }
            self.stats
                .keys_remembered
                .store(touched.at.len() as u64, Ordering::Relaxed);
        }
        if used.is_empty() {
            return;
        }
        if let Err(e) = self.keys.touch_api_keys(&used).await {
            tracing::warn!(error = %e, "updating last_used_at failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(writing: bool, batch_ready: bool) -> LaneLoad {
        LaneLoad {
            writing,
            batch_ready,
        }
    }

    #[test]
    fn a_call_leaves_its_lane_only_for_an_idle_one_while_its_writer_is_behind() {
        let lanes = |loads: [LaneLoad; 4]| move |lane: usize| loads[lane];
        let quiet = load(false, false);
        // Its writer free, or busy with no batch waiting: its own lane.
        assert_eq!(choose_lane(1, 4, lanes([quiet; 4])), 1);
        assert_eq!(
            choose_lane(1, 4, lanes([quiet, load(true, false), quiet, quiet])),
            1
        );
        assert_eq!(
            choose_lane(1, 4, lanes([quiet, load(false, true), quiet, quiet])),
            1
        );
        // Busy with a batch waiting: the next idle lane after it, wrapping around.
        let behind = load(true, true);
        assert_eq!(choose_lane(1, 4, lanes([quiet, behind, quiet, quiet])), 2);
        assert_eq!(
            choose_lane(1, 4, lanes([quiet, behind, behind, load(true, false)])),
            0
        );
        // Never to a lane that is writing or has a batch waiting: balanced load stays put.
        assert_eq!(
            choose_lane(
                1,
                4,
                lanes([load(true, false), behind, load(false, true), behind])
            ),
            1
        );
    }

    #[test]
    fn customers_spread_over_the_lanes_and_each_keeps_its_own() {
        let mut per_lane = [0; 4];
        for _ in 0..4_000 {
            let user = crate::UserId::generate();
            let lane = home_lane(&user, 4);
            assert_eq!(home_lane(&user, 4), lane, "always the same lane");
            per_lane[lane] += 1;
        }
        assert!(
            per_lane.iter().all(|&n| (800..1_200).contains(&n)),
            "{per_lane:?}"
        );
    }
}
