//! The ground every postern process stands on: ops endpoint, logs, drain, durations, files,
//! backoff, listener limits, signals and the admin socket.

pub mod admin_socket;
pub mod backoff;
pub mod clock;
pub mod drain;
pub mod duration;
pub mod files;
pub mod limit;
pub mod logging;
pub mod ops;
pub mod port_owner;
pub mod ratelog;
pub mod signal;
pub mod state_lock;
