//! postern inlet: local listeners whose client connections become streams of an end-to-end QUIC
//! connection to an outlet, through a relay.

pub mod config;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod tls;

pub use node::{Inlet, InletHandle, InletOptions, InletService, ServiceKind};
