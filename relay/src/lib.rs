//! postern relay: rendezvous for outlets and inlets, and a packet forwarder for their
//! end-to-end connections that never holds their keys.

pub mod admin;
pub mod admission;
pub mod authority;
pub mod config;
pub mod metrics;
pub mod policy;
pub mod public;
pub mod registry;
pub mod server;
pub mod state;
pub mod tcp;

pub use server::{Relay, RelayHandle, RelayOptions};
