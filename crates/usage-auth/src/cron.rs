//! The cron secret: `Authorization: Bearer <CRON_SECRET>`, compared in constant time.

/// Whether `presented` equals `expected`, in time that depends only on their lengths.
///
/// ```
/// assert!(usage_auth::cron::secret_matches("s3cret-s3cret", "s3cret-s3cret"));
/// assert!(!usage_auth::cron::secret_matches("s3cret-s3cret", "s3cret-s3creT"));
/// ```
pub fn secret_matches(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_secret_matches() {
        assert!(secret_matches("abc", "abc"));
        for other in ["", "ab", "abcd", "abd", "ABC"] {
            assert!(!secret_matches("abc", other), "{other}");
        }
    }
}
