//! Fault injection for the crash-safety tests: the points in making and revoking a lease where
//! a manager can be told to "crash" ([`CrashPoint`], [`CrashAt`]), and the counting that
//! decides when it does ([`Faults`]). What a crash does to the manager (stop on the spot, close
//! the store, refuse every further call) is in `lifecycle.rs`, where the points are passed.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Points in making and revoking a lease where [`StartOptions::crash_at`] can stop the manager.
///
/// [`StartOptions::crash_at`]: super::StartOptions::crash_at
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CrashPoint {
    /// Before the `creating` record is written.
    CreateBeforeStore,
    /// After the `creating` record is written, before the backend is asked.
    CreateAfterStore,
    /// After the backend made the credential, before the record says `active`.
    CreateAfterBackend,
    /// After the record says `active`, before the grant is handed out.
    CreateAfterActivate,
    /// Before the record is changed to `revoking`.
    RevokeBeforeStore,
    /// After the record says `revoking`, before the backend is asked.
    RevokeAfterStore,
    /// After the backend deleted the credential, before the record is dropped.
    RevokeAfterBackend,
}

/// Crash when `point` is reached for the `occurrence`-th time (1 = the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashAt {
    pub point: CrashPoint,
    pub occurrence: u32,
}

/// One manager's fault injection: where to crash, how often that point was passed, and
/// whether the manager has crashed.
pub(super) struct Faults {
    crash_at: Option<CrashAt>,
    passes: AtomicU32,
    crashed: AtomicBool,
}

impl Faults {
    pub(super) fn new(crash_at: Option<CrashAt>) -> Self {
        Faults {
            crash_at,
            passes: AtomicU32::new(0),
            crashed: AtomicBool::new(false),
        }
    }

    /// True once the manager crashed at its injected fault.
    pub(super) fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Counts a pass through `point`. True when this pass is the one to crash at; the manager
    /// counts as crashed from then on.
    pub(super) fn reached(&self, point: CrashPoint) -> bool {
        let Some(at) = self.crash_at else {
            return false;
        };
        if at.point != point {
            return false;
        }
        let hit = self.passes.fetch_add(1, Ordering::SeqCst).saturating_add(1) == at.occurrence;
        if hit {
            self.crashed.store(true, Ordering::SeqCst);
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_at_the_chosen_pass_of_the_chosen_point_only() {
        let f = Faults::new(Some(CrashAt {
            point: CrashPoint::RevokeAfterStore,
            occurrence: 2,
        }));
        assert!(!f.reached(CrashPoint::CreateAfterStore));
        assert!(!f.reached(CrashPoint::RevokeAfterStore));
        assert!(!f.crashed());
        assert!(!f.reached(CrashPoint::CreateAfterStore));
        assert!(f.reached(CrashPoint::RevokeAfterStore));
        assert!(f.crashed());
        let never = Faults::new(None);
        assert!(!never.reached(CrashPoint::CreateBeforeStore));
        assert!(!never.crashed());
    }
}
