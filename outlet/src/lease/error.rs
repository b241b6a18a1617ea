//! Why a lease operation failed: one error type for the manager's public calls, wrapping the
//! config's, the store's and the backend's.

use super::backend::BackendError;
use super::config::ConfigError;
use super::fault::CrashPoint;
use super::store::StoreError;
use postern_proto::name::NodeName;
use std::time::Duration;

/// Why a lease operation failed. Never contains a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("InfluxDB did not finish making a credential within {0:?}")]
    Timeout(Duration),
    #[error("lease {0} not found")]
    NotFound(String),
    #[error("lease {0} is being created or revoked right now; try again")]
    Busy(String),
    #[error("the lease manager is shut down")]
    Closed,
    #[error("the lease manager crashed at the injected fault {0:?}")]
    Crashed(CrashPoint),
    #[error("{0} lease(s) could not be revoked at shutdown; they stay in the store and are revoked at the next start")]
    Unrevoked(usize),
    #[error("identity {0} is revoked: it gets no lease")]
    ClientRevoked(NodeName),
    #[error("{0} lease(s) of a revoked identity could not be revoked now; they are retried")]
    RevokeClient(usize),
    /// No lease profile's `when` holds for the client: it gets no lease.
    #[error("no lease profile matches identity {0}, so it gets no credential (the outlet's `[[influxdb-outlet.profile]]` tables decide by the identity's attributes)")]
    NoProfile(NodeName),
    /// The client's profile does not hand credentials out.
    #[error("lease profile {profile:?} of identity {client} does not hand credentials out (set `hand-out = true` in the profile to allow `postern-inlet lease create`)")]
    HandOutOff { client: NodeName, profile: String },
    /// `lease show` with no live handed-out lease.
    #[error("no lease is handed out to identity {0} now (none was, or it expired or was revoked); `postern-inlet lease create` makes one")]
    NoHandOut(NodeName),
}

impl LeaseError {
    /// True when the client is refused a lease for who it is (no profile, hand-out off), as
    /// opposed to a lease that cannot be made now: clients get a 403, not a 503.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            LeaseError::NoProfile(_) | LeaseError::HandOutOff { .. }
        )
    }
}
