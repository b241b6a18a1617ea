//! The state one lease manager's files share: [`Inner`], worked on by the public calls
//! (`manager.rs`), the background task (`driver.rs`), the steps of making and revoking a lease
//! (`lifecycle.rs`) and the start-up reconciliation (`reconcile.rs`), each adding its methods.

use super::backend::Backend;
use super::fault::Faults;
use super::health::StoreHealth;
use super::live::LiveCredentials;
use super::profile::Profile;
use super::schedule::Schedule;
use super::store::LeaseStore;
use postern_proto::lease::LeaseGrant;
use postern_proto::name::NodeName;
use postern_proto::policy::Attributes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// What the manager's tasks and calls share behind one lock: the schedule, the subscribers and
/// the live credentials.
pub(super) struct State {
    pub(super) schedule: Schedule,
    pub(super) watchers: BTreeMap<NodeName, watch::Sender<Option<LeaseGrant>>>,
    /// Every live credential, for the outlet's enforcement ([`LeaseManager::accepts`](super::LeaseManager::accepts)).
    pub(super) live: LiveCredentials,
    /// When to look for orphaned credentials again (the scan at start failed).
    pub(super) orphan_scan_at: Option<u64>,
    pub(super) orphan_scan_failures: u32,
    pub(super) orphan_scan_running: bool,
    pub(super) unrevoked_at_shutdown: usize,
    /// Whether the store can write; when to reopen it if not.
    pub(super) store_health: StoreHealth,
    /// The profiles, in the order they are tried (swapped whole by a reload).
    pub(super) profiles: Vec<Arc<Profile>>,
    /// Counts reloads of `profiles`: a lease being made across one is checked again.
    pub(super) profiles_generation: u64,
    /// The profile of each subscribed client, chosen by its attributes when it subscribed:
    /// its renewals are made with it.
    pub(super) client_profiles: BTreeMap<NodeName, Chosen>,
    /// The last lease handed out to each client (`postern-inlet lease create`), shown again
    /// by `lease show` until it is revoked or expires.
    pub(super) handed_out: BTreeMap<NodeName, HandedOut>,
    /// Streamed leases superseded by a renewal and still in their grace period, by lease id:
    /// a reload that changes their client's profile revokes them too.
    pub(super) superseded: BTreeMap<String, NodeName>,
}

/// A subscribed client's profile and the attributes that chose it (kept so that a reload can
/// choose again).
#[derive(Clone)]
pub(super) struct Chosen {
    pub(super) profile: Arc<Profile>,
    pub(super) attrs: Attributes,
}

/// A lease handed out to its client, with what a reload needs to check it again.
#[derive(Clone)]
pub(super) struct HandedOut {
    pub(super) grant: LeaseGrant,
    pub(super) profile: Arc<Profile>,
    pub(super) attrs: Attributes,
}

/// Everything one manager's public calls ([`LeaseManager`](super::LeaseManager)) and background
/// tasks work on.
pub(super) struct Inner {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) store: Mutex<Option<LeaseStore>>,
    pub(super) instance: String,
    pub(super) state: Mutex<State>,
    pub(super) wake: Notify,
    pub(super) shutdown: CancellationToken,
    pub(super) stopped: CancellationToken,
    /// Fault injection for crash-safety tests.
    pub(super) faults: Faults,
    /// Identities revoked while this manager runs: they get no lease (see `revoke_client`).
    pub(super) revoked_clients: Mutex<BTreeSet<NodeName>>,
}

/// A fresh lease id: 16 lowercase hex digits.
pub(super) fn new_lease_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Locks one of the manager's mutexes.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every update is a
    // single assignment or map operation), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
