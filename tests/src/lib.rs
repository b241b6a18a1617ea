//! Shared helpers for end-to-end tests.
pub mod flood;
pub mod harness;
pub mod influx2;
pub mod influxd;
pub mod openapi;
