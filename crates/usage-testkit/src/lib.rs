//! What the tests of every nexus-usage crate share, taken as a dev-dependency:
//!
//! - [`memory::MemoryStore`]: every repository in one process-local map, following the
//!   same contract as the database stores;
//! - [`conformance`]: that contract, one set of cases every [`Store`](usage_core::Store)
//!   must pass, expanded per store by [`repository_conformance_tests!`].
#![warn(missing_docs)]

pub mod conformance;
pub mod memory;

#[doc(hidden)]
pub use usage_core::ManualClock;
