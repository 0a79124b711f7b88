//! Units a handler reports with its response: the tokens a model produced, the bytes a job
//! processed. The handler puts a [`Reported`] in its response's extensions (actix-web's
//! `HttpResponse`, `http::Response` for axum and any tower service); the door takes it out
//! and stores the units with the call, in the same event and batch write (no extra round
//! trip). The same meter reported twice adds up.
//!
//! ```
//! use usage_door::report::Reported;
//! let units = Reported::units("tokens", 1_234).and("requests_billed", 1);
//! assert_eq!(units.get("tokens"), 1_234);
//! ```
//!
//! With actix-web (feature `actix`), [`ReportUnits`] on the response:
//!
//! ```ignore
//! use usage_door::report::ReportUnits;
//! async fn generate() -> actix_web::HttpResponse {
//!     actix_web::HttpResponse::Ok().json(answer).report("tokens", 1_234)
//! }
//! ```
//!
//! With axum (feature `tower`), as a response part:
//!
//! ```ignore
//! async fn generate() -> impl IntoResponse {
//!     (Extension(Reported::units("tokens", 1_234)), Json(answer))
//! }
//! ```

use usage_core::event::Units;

/// Units of meters a response reports (a response extension the door reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported(Units);

impl Reported {
    /// `quantity` units of `meter`.
    pub fn units(meter: &str, quantity: u64) -> Self {
        Self::default().and(meter, quantity)
    }

    /// These units and `quantity` more of `meter`.
    pub fn and(mut self, meter: &str, quantity: u64) -> Self {
        self.0.add(meter, quantity);
        self
    }

    /// Adds every unit of `other`.
    pub fn merge(&mut self, other: &Reported) {
        self.0.extend(&other.0);
    }

    /// The quantity reported of `meter` (0 when none).
    pub fn get(&self, meter: &str) -> u64 {
        self.0.get(meter)
    }

    /// The units, as the call's event holds them.
    pub fn into_units(self) -> Units {
        self.0
    }
}

/// Reporting units on a response in one call, whatever the framework.
pub trait ReportUnits {
    /// This response, with `quantity` units of `meter` reported (added to any reported
    /// already).
    fn report(self, meter: &str, quantity: u64) -> Self;
}

#[cfg(feature = "actix")]
impl ReportUnits for actix_web::HttpResponse {
    fn report(self, meter: &str, quantity: u64) -> Self {
        let mut response = self;
        let mut extensions = response.extensions_mut();
        match extensions.get_mut::<Reported>() {
            Some(reported) => reported.0.add(meter, quantity),
            None => {
                extensions.insert(Reported::units(meter, quantity));
            }
        }
        drop(extensions);
        response
    }
}

#[cfg(feature = "tower")]
impl<B> ReportUnits for http::Response<B> {
    fn report(mut self, meter: &str, quantity: u64) -> Self {
        match self.extensions_mut().get_mut::<Reported>() {
            Some(reported) => reported.0.add(meter, quantity),
            None => {
                self.extensions_mut()
                    .insert(Reported::units(meter, quantity));
            }
        }
        self
    }
}
