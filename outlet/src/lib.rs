//! postern outlet: registers services with a relay, accepts end-to-end connections from inlets
//! and forwards their streams to targets; runs the lease manager for InfluxDB credentials.

pub mod admin_socket;
pub mod app;
pub mod cli;
pub mod config;
pub mod enforce;
pub mod health;
pub mod homing;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod public;
pub mod reload;
pub mod serve;
pub mod target;
#[cfg(all(test, unix))]
mod test_fs;
pub mod udp;

pub use node::{Outlet, OutletHandle, OutletOptions};
