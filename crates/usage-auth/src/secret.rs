//! Secrets from configuration: kept out of `Debug` output, and shared secrets (the cron
//! secret, Stripe's webhook secret) compared in constant time.

use subtle::ConstantTimeEq;

use crate::AuthError;

/// Shortest shared secret accepted (`CRON_SECRET`, `STRIPE_WEBHOOK_SECRET`): 256 bits.
pub const MIN_SHARED_SECRET_LEN: usize = 32;

/// A secret string read from configuration. Its `Debug` output never shows it.
///
/// ```
/// let s = usage_auth::secret::SecretString::from("hunter2-hunter2");
/// assert_eq!(format!("{s:?}"), "SecretString(<redacted>)");
/// assert_eq!(s.expose(), "hunter2-hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty (an empty variable counts as unset).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses a command-line or environment value (never fails; for clap).
    pub fn parse(raw: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(raw.to_owned()))
    }
}

impl From<&str> for SecretString {
    fn from(raw: &str) -> Self {
        Self(raw.to_owned())
    }
}

impl From<String> for SecretString {
    fn from(raw: String) -> Self {
        Self(raw)
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

/// A secret that callers present verbatim (`Authorization: Bearer <CRON_SECRET>`),
/// at least [`MIN_SHARED_SECRET_LEN`] bytes long.
#[derive(Clone)]
pub struct SharedSecret {
    secret: SecretString,
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

impl SharedSecret {
    /// The secret configured as `name`; refuses one shorter than [`MIN_SHARED_SECRET_LEN`]
    /// bytes, naming the variable.
    pub fn new(name: &'static str, secret: SecretString) -> Result<Self, AuthError> {
        if secret.expose().len() < MIN_SHARED_SECRET_LEN {
            return Err(AuthError::WeakSecret {
                name,
                min: MIN_SHARED_SECRET_LEN,
            });
        }
        Ok(Self { secret })
    }

    /// Whether `presented` is the secret, in time that depends only on the lengths.
    ///
    /// ```
    /// use usage_auth::secret::SharedSecret;
    /// let s = SharedSecret::new("CRON_SECRET", "0123456789abcdef0123456789abcdef".into()).unwrap();
    /// assert!(s.matches("0123456789abcdef0123456789abcdef"));
    /// assert!(!s.matches("0123456789abcdef0123456789abcdeF"));
    /// ```
    pub fn matches(&self, presented: &str) -> bool {
        self.secret
            .expose()
            .as_bytes()
            .ct_eq(presented.as_bytes())
            .into()
    }

    /// The secret's bytes, for computing signatures with it.
    pub fn expose(&self) -> &[u8] {
        self.secret.expose().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn only_the_exact_secret_matches() {
        let s = SharedSecret::new("CRON_SECRET", GOOD.into()).unwrap();
        assert!(s.matches(GOOD));
        let longer = format!("{GOOD}x");
        for other in ["", &GOOD[..31], &longer, "0123456789abcdef0123456789abcdeF"] {
            assert!(!s.matches(other), "{other}");
        }
    }

    #[test]
    fn short_secrets_are_refused_naming_the_variable() {
        let err = SharedSecret::new("STRIPE_WEBHOOK_SECRET", GOOD[..31].into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "STRIPE_WEBHOOK_SECRET must be at least 32 bytes long"
        );
        assert!(SharedSecret::new("CRON_SECRET", GOOD.into()).is_ok());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let s = SharedSecret::new("CRON_SECRET", GOOD.into()).unwrap();
        assert!(!format!("{s:?}").contains(GOOD));
        assert!(!format!("{:?}", SecretString::from(GOOD)).contains(GOOD));
    }
}
