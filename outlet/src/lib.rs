//! postern outlet: registers services with a relay, accepts end-to-end connections from inlets
//! and forwards their streams to targets; runs the lease manager for InfluxDB credentials.

pub mod lease;
