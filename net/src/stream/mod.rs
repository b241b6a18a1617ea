//! One client stream's way through a node: splice, HTTP proxy, TLS termination.

pub mod http_proxy;
pub mod splice;
pub mod tls_server;
