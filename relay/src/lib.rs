//! postern relay: rendezvous for outlets and inlets, and a packet forwarder for their
//! end-to-end connections that never holds their keys.
//!
//! - [`app`]: `run(config, shutdown)`, the one way a relay is started; [`cli`] the command line.
//! - [`server`]: nodes' control connections, registrations, routes, enrollment, revocation.
//! - [`forward`]: moving end-to-end packets (UDP, and TLS/TCP for nodes without UDP).
//! - [`public`]: the public hostname ingress (`https://<service>.<domain>`).
//! - [`admin`]: the admin HTTP API and its client; [`views`] the documents they exchange.
//! - [`registry`], [`policy`], [`admission`]: sans-IO decisions the server applies.
//! - [`authority`], [`state`]: enrollment tickets, identities and the CA on disk.
//! - [`fleet`]: the state relays share (tickets, identities, drains, membership), in the
//!   state directory or in etcd.
//! - [`config`], [`metrics`]: flags and files; `/metrics`.

pub mod admin;
pub mod admission;
pub mod app;
pub mod authority;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod forward;
pub mod metrics;
pub mod policy;
pub mod public;
pub mod registry;
pub mod reload;
pub mod server;
pub mod state;
pub mod views;

pub use server::{Relay, RelayHandle, RelayOptions};
