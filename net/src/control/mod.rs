//! The control plane between a node and its relays.

pub mod connection;
pub mod enroll;
pub mod exchange;
pub mod renew;
