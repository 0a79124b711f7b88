//! Notifications of nexus-usage: what leaves the system on its own.
//!
//! This crate holds the rules every delivery follows, with no database and no HTTP client:
//! the event types ([`EventType`]), Standard Webhooks secrets and signatures
//! ([`WebhookSecret`], [`sign`]), the retry schedule ([`next_attempt_after`]) and which
//! addresses a webhook may reach ([`address_allowed`]).

mod address;
mod event;
mod retry;
mod signing;

pub use address::address_allowed;
pub use event::EventType;
pub use retry::{RETRY_AFTER, next_attempt_after};
pub use signing::{WebhookSecret, sign};

use thiserror::Error;

/// Errors of this crate.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NotifyError {
    /// A secret not of the form `whsec_<base64>` (of 24 to 64 bytes).
    #[error("a webhook secret must be whsec_ followed by base64 of 24 to 64 bytes")]
    BadSecret,
    /// An event type this system does not send.
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
}
