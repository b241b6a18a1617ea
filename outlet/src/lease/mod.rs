//! The lease manager: per-client, short-lived, least-privilege InfluxDB credentials.
//!
//! Each client identity (an inlet's [`NodeName`](postern_proto::name::NodeName)) that
//! subscribes gets its own lease: a credential made by the backend ([`v2`]: an API token;
//! [`v1`]: a user) with the configured permissions, valid for `leased-token-expires-in`. While
//! anyone is subscribed, a new lease is pushed at two thirds of the old one's life and the old
//! one is revoked after a grace period (see [`schedule`]). When the last subscriber is gone the
//! lease is left to expire and then revoked. Leases can also be made, listed, shown and revoked
//! on the command line through the [`admin`] socket.
//!
//! ## Crash safety
//!
//! Every lease is recorded in the [`store`] (durably) *before* the backend is asked for a
//! credential, and every credential carries a marker naming its lease and this outlet (see
//! [`backend`]). On start the manager reconciles the store with the backend:
//!
//! | found at start                               | action                                 |
//! |----------------------------------------------|----------------------------------------|
//! | record `creating`                            | revoke whatever carries its marker, drop the record |
//! | record `active`, expired                     | revoke, drop the record                |
//! | record `active`, live                        | keep; revoke at expiry                 |
//! | record `revoking`                            | revoke, drop the record                |
//! | credential with our marker, no live record   | record it as `revoking`, revoke        |
//!
//! A revocation that fails is retried with backoff and logged at error level; its record is
//! never dropped until the backend confirms (a 404 counts as confirmation).
//!
//! ## Shutdown
//!
//! On shutdown (the token passed to [`LeaseManager::start`] is cancelled, or
//! [`LeaseManager::shutdown`] is called) every lease is revoked, including the ones made on the
//! command line: InfluxDB 2 tokens never expire by themselves, so once the outlet stops nothing
//! would enforce a lease's expiry, and the streamed ones are useless without the tunnel anyway.
//! Inlets get a fresh lease when they reconnect to the restarted outlet. Leases that cannot be
//! revoked in time stay in the store and are revoked by the next start.
//!
//! ## Testing crash safety
//!
//! [`StartOptions::crash_at`] makes the manager "crash" at a chosen [`CrashPoint`]: it stops on
//! the spot, closes the store without any clean-up and refuses every further call with
//! [`LeaseError::Crashed`], like a process killed at that point. A new manager started on the
//! same state directory then shows what a restart would do.
//!
//! ## Where things are
//!
//! [`LeaseManager`] and its options in `manager.rs`; a lease created and revoked in
//! `lifecycle.rs`, renewed (and everything else the schedule asks) in `driver.rs`, recovered at
//! start in `reconcile.rs`; the profile a client's attributes choose in `profile.rs` (and chosen again by a reload in
//! `reprofile.rs`); the state
//! they share in `shared.rs`; the live credentials checked for enforcement in `live.rs`; crash
//! points in `fault.rs`.

pub mod admin;
pub mod backend;
pub mod config;
mod driver;
mod error;
mod fault;
mod health;
mod lifecycle;
mod live;
mod manager;
pub mod profile;
mod reconcile;
mod reprofile;
pub mod schedule;
mod shared;
pub mod store;
#[cfg(test)]
mod tests;
pub mod v1;
pub mod v2;

pub use backend::{Backend, BackendError};
pub use config::{
    Api, ConfigError, InfluxdbOutletConfig, InjectAt, LeaseConfig, Secret, SecretRef,
};
pub use driver::{SHUTDOWN_DRAIN, SHUTDOWN_REVOKE};
pub use error::LeaseError;
pub use fault::{CrashAt, CrashPoint};
pub use lifecycle::{CREATE_TIMEOUT, STORE_FAILURES};
pub use manager::{HandOut, LeaseInfo, LeaseManager, StartOptions};
pub use profile::{Profile, ProfileConfig, DEFAULT_PROFILE};
pub use reprofile::{Reprofiled, PROFILE_CHANGED};
pub use store::{LeaseRecord, RecordState, StoreError};
