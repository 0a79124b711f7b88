pub mod stores;
