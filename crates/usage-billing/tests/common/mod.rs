pub mod fake_stripe;
pub mod stores;
