//! postern inlet: local listeners whose client connections become streams of an end-to-end QUIC
//! connection to an outlet, through a relay.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod error;
pub mod lease;
pub mod listen;
pub mod metrics;
mod migrate;
pub mod node;
mod pool;
mod route;
mod stream;
pub mod tls;
pub mod udp;

pub use error::InletError;
pub use listen::{InletService, ServiceKind};
pub use node::{Inlet, InletHandle, InletOptions};
