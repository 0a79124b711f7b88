//! A counter that every request worker adds to without sharing a cache line.
//!
//! One `AtomicU64` added to by every call makes the two (or more) cores serving calls
//! pass its cache line back and forth on every increment. A [`Counter`] keeps one
//! padded cell per thread slot: a thread adds to its own cell, and a reader (a
//! `/metrics` scrape, a test) sums them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Cells per counter; threads beyond it share cells (still correct, only slower).
const CELLS: usize = 16;

/// One cell on its own cache line (128 bytes: adjacent-line prefetch pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Cell(AtomicU64);

/// A monotonic count added to from many threads.
///
/// ```
/// use usage_core::counter::Counter;
///
/// let calls = Counter::default();
/// std::thread::scope(|s| {
///     for _ in 0..4 {
///         s.spawn(|| (0..1000).for_each(|_| calls.add(1)));
///     }
/// });
/// assert_eq!(calls.get(), 4000);
/// ```
#[derive(Debug, Default)]
pub struct Counter {
    cells: [Cell; CELLS],
}

/// The cell of the current thread: threads take slots in turn as they first count.
fn slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % CELLS;
    }
    SLOT.with(|slot| *slot)
}

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.cells[slot()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count (an addition racing with this read may or may not be in it).
    pub fn get(&self) -> u64 {
        self.cells
            .iter()
            .map(|cell| cell.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}
