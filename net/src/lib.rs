//! postern transport: the pieces every node shares, grouped by concern.
//!
//! - [`transport`]: how packets move. The UDP socket every process binds ([`transport::udp`]),
//!   a node's socket that carries both the control connection and end-to-end connections
//!   ([`transport::node_socket`]), the TLS/TCP fallback where UDP is blocked
//!   ([`transport::links`], [`transport::relay_path`]), QUIC endpoint settings
//!   ([`transport::endpoint`]) and end-to-end key rotation ([`transport::rekey`]).
//! - [`control`]: the control plane. One-frame request/answer exchanges
//!   ([`control::exchange`]), a node's long-lived control connection to a relay
//!   ([`control::connection`]), enrollment and certificate renewal.
//! - [`stream`]: what happens to one client stream: splicing TCP to QUIC, the HTTP proxy with
//!   its credential gate, the TLS server for public hostnames.
//! - [`runtime`]: the ground every process stands on: the ops endpoint, logging, drain,
//!   durations, files and state locks, backoff, listener limits, signals.
//! - [`uplink`]: a node's socket, endpoint and control connections to its relays, identity,
//!   readiness and drain, shared by the inlet and the outlet.
//! - [`node_config`]: the flags and files both nodes (inlet and outlet) share.

pub mod control;
pub mod fleet;
pub mod node_config;
pub mod runtime;
pub mod stream;
pub mod transport;
pub mod uplink;
