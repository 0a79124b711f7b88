//! The doors of nexus-usage: where an HTTP call is authenticated, admitted or refused,
//! and recorded.
//!
//! - [`meter`]: the decision itself, framework-free: credentials in, an admission or a
//!   refusal (status, headers, JSON body) out, and the call recorded after the response.
//!   The header names (`x-api-key`, the rate-limit fields) and the bearer parsing live
//!   here once.
//! - [`middleware`] (feature `actix`) and [`layer`] (feature `tower`): thin adapters that
//!   translate requests and responses for the meter; [`forward_auth`] (feature `actix`)
//!   is the third, answering a reverse proxy's question (the server's
//!   `/api/forward-auth`).
//! - [`endpoint`]: the route patterns calls are recorded under.
//! - [`report`]: the units a handler reports with its response (tokens, bytes), stored
//!   with the call.
#![warn(missing_docs)]

pub mod endpoint;
#[cfg(feature = "actix")]
pub mod forward_auth;
#[cfg(feature = "tower")]
pub mod layer;
pub mod meter;
#[cfg(feature = "actix")]
pub mod middleware;
pub mod report;
