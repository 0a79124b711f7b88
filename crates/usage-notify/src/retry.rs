//! When a delivery that failed is tried again.

use std::time::Duration;

/// The waits before the second to the eighth attempt: about 5 s, 5 min, 30 min, 2 h, 5 h,
/// 10 h and 10 h. After the eighth attempt the delivery is `failed`.
pub const RETRY_AFTER: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// How long after its `attempts_made`-th failed attempt a delivery is tried again; `None`
/// when that was the last attempt (the delivery is then `failed`).
pub fn next_attempt_after(attempts_made: u32) -> Option<Duration> {
    let index = usize::try_from(attempts_made.checked_sub(1)?).ok()?;
    RETRY_AFTER.get(index).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_attempts_on_the_contracts_schedule() {
        let waits: Vec<Option<u64>> = (0..=9)
            .map(|n| next_attempt_after(n).map(|d| d.as_secs()))
            .collect();
        assert_eq!(
            waits,
            [
                None, // nothing failed yet: not a retry
                Some(5),
                Some(300),
                Some(1_800),
                Some(7_200),
                Some(18_000),
                Some(36_000),
                Some(36_000),
                None, // the eighth attempt failed: given up
                None,
            ]
        );
        let total: u64 = RETRY_AFTER.iter().map(Duration::as_secs).sum();
        assert_eq!(total, 5 + 300 + 1_800 + 7_200 + 18_000 + 36_000 + 36_000);
    }
}
