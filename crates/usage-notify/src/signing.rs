//! Standard Webhooks secrets and signatures.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::NotifyError;

/// The prefix of a secret as shown to its owner.
const PREFIX: &str = "whsec_";

/// The key of one webhook endpoint: shown once as `whsec_<base64>`, then only used to sign.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl WebhookSecret {
    /// A new secret of 32 random bytes.
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        rand::fill(&mut key[..]);
        Self { key }
    }

    /// Reads `whsec_<base64>` (24 to 64 bytes once decoded).
    pub fn parse(text: &str) -> Result<Self, NotifyError> {
        let encoded = text.strip_prefix(PREFIX).ok_or(NotifyError::BadSecret)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| NotifyError::BadSecret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(NotifyError::BadSecret);
        }
        Ok(Self { key })
    }

    /// The secret as its owner sees it and the store keeps it: `whsec_<base64>`.
    pub fn expose(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.key))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`; `None` only if HMAC
    /// refused the key, which it does for no length.
    fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        Some(format!(
            "v1,{}",
            STANDARD.encode(mac.finalize().into_bytes())
        ))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(redacted)")
    }
}

/// The `webhook-signature` value of a delivery: one `v1,<base64>` per secret, separated by
/// spaces (an endpoint rotating its secret is signed with the new one and the old one).
/// `timestamp` is the attempt's, in Unix seconds, as sent in `webhook-timestamp`.
pub fn sign(secrets: &[&WebhookSecret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|secret| secret.signature(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivery's headers as a receiver gets them.
    fn headers(id: &str, timestamp: i64, signature: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        headers.insert("webhook-signature", signature.parse().unwrap());
        headers
    }

    #[test]
    fn the_specifications_example_signs_as_published() {
        // The example of the Standard Webhooks specification.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &[&secret],
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn an_independent_implementation_verifies_what_we_sign() {
        let secret = WebhookSecret::generate();
        let other = WebhookSecret::generate();
        let body = br#"{"type":"key.created","timestamp":"2026-12-08T10:00:00Z","data":{}}"#;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let id = "msg_2n9xQ";
        let receiver = standardwebhooks::Webhook::new(&secret.expose()).unwrap();
        let signature = sign(&[&secret], id, now, body);
        assert!(receiver.verify(body, &headers(id, now, &signature)).is_ok());
        // Another body, id or secret does not verify.
        assert!(
            receiver
                .verify(b"{}", &headers(id, now, &signature))
                .is_err()
        );
        assert!(
            receiver
                .verify(body, &headers("msg_other", now, &signature))
                .is_err()
        );
        let foreign = sign(&[&other], id, now, body);
        assert!(receiver.verify(body, &headers(id, now, &foreign)).is_err());
        // During a rotation both secrets sign: a receiver holding either verifies.
        let both = sign(&[&other, &secret], id, now, body);
        assert_eq!(both.split(' ').count(), 2);
        assert!(receiver.verify(body, &headers(id, now, &both)).is_ok());
        let old_receiver = standardwebhooks::Webhook::new(&other.expose()).unwrap();
        assert!(old_receiver.verify(body, &headers(id, now, &both)).is_ok());
    }

    #[test]
    fn secrets_read_back_and_bad_ones_are_refused() {
        let secret = WebhookSecret::generate();
        let shown = secret.expose();
        assert!(shown.starts_with("whsec_"));
        assert_eq!(WebhookSecret::parse(&shown), Ok(secret.clone()));
        assert_ne!(WebhookSecret::generate(), secret, "random");
        for bad in [
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_",
            "whsec_not base64!",
            "whsec_c2hvcnQ=",
        ] {
            assert_eq!(
                WebhookSecret::parse(bad),
                Err(NotifyError::BadSecret),
                "{bad}"
            );
        }
        assert_eq!(format!("{secret:?}"), "WebhookSecret(redacted)");
    }
}
