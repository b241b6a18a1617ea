//! The outlet's admin sockets (leases, access grants) are served by the admin socket every
//! node shares, [`postern_net::runtime::admin_socket`]; re-exported here for the outlet's
//! channels and their callers.

pub use postern_net::runtime::admin_socket::*;
