//! Identifiers: `eco_usr_...` for users, `eco_key_...` for API keys.

use std::fmt;
use std::sync::Arc;

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};

use crate::DomainError;

/// Random base62 (`[A-Za-z0-9]`) text from the thread's CSPRNG.
pub fn random_base62(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

const ID_RANDOM_LEN: usize = 20;
const ID_MAX_LEN: usize = 64;

fn validate(value: &str, kind: &'static str, prefix: &'static str) -> Result<(), DomainError> {
    let rest = value.strip_prefix(prefix).unwrap_or_default();
    if rest.is_empty()
        || value.len() > ID_MAX_LEN
        || !rest.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(DomainError::InvalidId {
            kind,
            prefix,
            value: value.to_owned(),
        });
    }
    Ok(())
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $prefix:literal, $example:literal) => {
        $(#[$doc])*
        // Shared text: a clone (one per recorded call, on the hot path) copies a pointer,
        // not the id.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[cfg_attr(feature = "openapi", schema(value_type = String, example = $example))]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The prefix every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// A new random id.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, random_base62(ID_RANDOM_LEN)).into())
            }

            /// Checks the prefix and characters of an id given by a person or a client.
            pub fn parse(value: &str) -> Result<Self, DomainError> {
                validate(value, $kind, $prefix)?;
                Ok(Self(value.into()))
            }

            /// Wraps an id read back from a store, which only ever holds valid ids.
            pub fn from_stored(value: String) -> Self {
                Self(value.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

prefixed_id!(
    /// A user's id, `eco_usr_` followed by base62 characters.
    UserId,
    "user",
    "eco_usr_",
    "eco_usr_4fJk2q9XbLmN7pQr"
);
prefixed_id!(
    /// An API key's id (not the key itself), `eco_key_` followed by base62 characters.
    ApiKeyId,
    "API key",
    "eco_key_",
    "eco_key_8sTz3VwY1aBcD5eF"
);

/// Checks and normalises an email address: trimmed, lower-cased, `local@domain.tld`.
///
/// ```
/// assert_eq!(usage_core::ids::normalize_email(" Ada@Example.COM ").unwrap(), "ada@example.com");
/// assert!(usage_core::ids::normalize_email("not-an-email").is_err());
/// ```
pub fn normalize_email(raw: &str) -> Result<String, DomainError> {
    let email = raw.trim().to_lowercase();
    let invalid = || DomainError::InvalidEmail(raw.to_owned());
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
    let domain_ok = !domain.contains('@')
        && domain.contains('.')
        && domain
            .split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    if local.is_empty() || local.len() > 64 || !domain_ok {
        return Err(invalid());
    }
    Ok(email)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let id = UserId::generate();
        assert!(id.as_str().starts_with("eco_usr_"));
        assert_eq!(id.as_str().len(), "eco_usr_".len() + ID_RANDOM_LEN);
        assert_eq!(UserId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn ids_with_wrong_prefix_or_characters_are_rejected() {
        for bad in [
            "",
            "eco_usr_",
            "eco_key_abc",
            "eco_usr_a-b",
            "eco_usr_ä",
            "usr_abc",
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("eco_usr_{}", "a".repeat(80));
        assert!(UserId::parse(&long).is_err());
        assert!(ApiKeyId::parse("eco_key_abc123").is_ok());
    }

    #[test]
    fn emails_are_checked() {
        for bad in [
            "",
            "a",
            "a@b",
            "@b.com",
            "a@.com",
            "a@b..com",
            "a b@c.com",
            "a@b@c.com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            normalize_email("x.y+z@sub.example.org").unwrap(),
            "x.y+z@sub.example.org"
        );
    }
}
