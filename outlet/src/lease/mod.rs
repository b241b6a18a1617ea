//! The lease manager: per-client, short-lived, least-privilege InfluxDB credentials.
//!
//! Each client identity (an inlet's [`NodeName`]) that subscribes gets its own lease: a
//! credential made by the backend ([`v2`]: an API token; [`v1`]: a user) with the configured
//! permissions, valid for `leased-token-expires-in`. While anyone is subscribed, a new lease is
//! pushed at two thirds of the old one's life and the old one is revoked after a grace period
//! (see [`schedule`]). When the last subscriber is gone the lease is left to expire and then
//! revoked. Leases can also be made, listed, shown and revoked on the command line through the
//! [`admin`] socket.
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
//! [`StartOptions::crash_at`] makes the manager "crash" at a chosen [`Step`]: it stops on the
//! spot, closes the store without any clean-up and refuses every further call with
//! [`LeaseError::Crashed`], like a process killed at that point. A new manager started on the
//! same state directory then shows what a restart would do.

pub mod admin;
pub mod backend;
pub mod config;
pub mod schedule;
pub mod store;
pub mod v1;
pub mod v2;

pub use backend::{Backend, BackendError};
pub use config::{
    Api, ConfigError, InfluxdbOutletConfig, InjectAt, LeaseConfig, Secret, SecretRef,
};
pub use store::{LeaseRecord, LeaseState, StoreError};

use backend::CreateRequest;
use postern_net::runtime::clock::now_ms;
use postern_proto::lease::{Credential, LeaseGrant};
use postern_proto::name::NodeName;
use schedule::{Action, Policy, Schedule};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use store::LeaseStore;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Longest a whole backend creation (several requests for v1) may take.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for in-flight work before cutting it off.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
/// How long shutdown spends revoking leases.
pub const SHUTDOWN_REVOKE: Duration = Duration::from_secs(15);
/// Longest the manager's task sleeps without looking at the clock again.
const MAX_IDLE: Duration = Duration::from_secs(10);

/// Why a lease operation failed. Never contains a secret.
#[derive(Debug, thiserror::Error)]
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
    Crashed(Step),
    #[error("{0} lease(s) could not be revoked at shutdown; they stay in the store and are revoked at the next start")]
    Unrevoked(usize),
    #[error("identity {0} is revoked: it gets no lease")]
    ClientRevoked(NodeName),
    #[error("{0} lease(s) of a revoked identity could not be revoked now; they are retried")]
    RevokeClient(usize),
}

/// Points in making and revoking a lease where [`StartOptions::crash_at`] can stop the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Step {
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

/// Crash when `step` is reached for the `occurrence`-th time (1 = the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashAt {
    pub step: Step,
    pub occurrence: u32,
}

/// Options for [`LeaseManager::start_with`].
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Use this backend instead of the one `config.api` selects.
    pub backend: Option<Arc<dyn Backend>>,
    /// Fault injection for crash-safety tests.
    pub crash_at: Option<CrashAt>,
}

/// A lease as shown by `lease list` / `lease show`. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub lease_id: String,
    pub client: String,
    /// `creating`, `active` or `revoking`.
    pub state: String,
    /// The backend's id for the credential (v2 authorization id, v1 user name).
    pub backend_id: Option<String>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// It is the lease currently streamed to its client.
    pub current: bool,
    /// Consecutive failed revocations.
    pub revoke_failures: u32,
}

struct State {
    schedule: Schedule,
    watchers: BTreeMap<NodeName, watch::Sender<Option<LeaseGrant>>>,
    /// Every live credential, for the outlet's enforcement ([`LeaseManager::accepts`]).
    live: LiveCredentials,
    /// When to look for orphaned credentials again (the scan at start failed).
    orphan_scan_at: Option<u64>,
    orphan_scan_failures: u32,
    orphan_scan_running: bool,
    unrevoked_at_shutdown: usize,
}

struct Inner {
    backend: Arc<dyn Backend>,
    store: Mutex<Option<LeaseStore>>,
    instance: String,
    policy: Policy,
    state: Mutex<State>,
    wake: Notify,
    shutdown: CancellationToken,
    stopped: CancellationToken,
    crash_at: Option<CrashAt>,
    crash_counts: Mutex<HashMap<Step, u32>>,
    crashed: AtomicBool,
    /// Identities revoked while this manager runs: they get no lease (see `revoke_client`).
    revoked_clients: Mutex<std::collections::BTreeSet<NodeName>>,
}

/// The lease manager. Cheap to share (`Arc`); all methods take `&self`.
pub struct LeaseManager {
    inner: Arc<Inner>,
}

/// The live credentials by digest (SHA-256 of the `Authorization` value), so that a request's
/// credential is checked in one look-up and no plaintext credential is kept for it.
#[derive(Default)]
struct LiveCredentials {
    by_digest: HashMap<[u8; 32], LiveCredential>,
    digest_of: HashMap<String, [u8; 32]>,
}

struct LiveCredential {
    client: NodeName,
    expires_at_ms: u64,
}

fn digest(authorization: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(authorization).into()
}

impl LiveCredentials {
    fn insert(&mut self, lease_id: &str, client: &NodeName, c: &Credential, expires_at_ms: u64) {
        let d = digest(c.authorization().as_bytes());
        self.by_digest.insert(
            d,
            LiveCredential {
                client: client.clone(),
                expires_at_ms,
            },
        );
        self.digest_of.insert(lease_id.to_owned(), d);
    }

    fn remove(&mut self, lease_id: &str) {
        if let Some(d) = self.digest_of.remove(lease_id) {
            self.by_digest.remove(&d);
        }
    }

    fn accepts(&self, client: &NodeName, authorization: &[u8], now_ms: u64) -> bool {
        self.by_digest
            .get(&digest(authorization))
            .is_some_and(|l| &l.client == client && now_ms < l.expires_at_ms)
    }
}

fn new_lease_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every update is a
    // single assignment or map operation), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LeaseManager {
    /// Opens the store in `state_dir`, reconciles it with the backend, and starts the task that
    /// renews and revokes leases. The manager stops (revoking its leases) when `shutdown` is
    /// cancelled.
    pub async fn start(
        config: LeaseConfig,
        state_dir: &Path,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, LeaseError> {
        Self::start_with(config, state_dir, shutdown, StartOptions::default()).await
    }

    /// [`start`](Self::start) with a custom backend or fault injection.
    pub async fn start_with(
        config: LeaseConfig,
        state_dir: &Path,
        shutdown: CancellationToken,
        options: StartOptions,
    ) -> Result<Arc<Self>, LeaseError> {
        let dir = state_dir.to_owned();
        let store = tokio::task::spawn_blocking(move || LeaseStore::open(&dir))
            .await
            .map_err(|_| LeaseError::Closed)??;
        let instance = store.instance_id().to_owned();
        let backend = match options.backend {
            Some(b) => b,
            None => backend::from_config(&config, &instance)?,
        };
        backend.check().await?;
        let policy = Policy::new(config.ttl);
        let inner = Arc::new(Inner {
            backend,
            store: Mutex::new(Some(store)),
            instance,
            policy,
            state: Mutex::new(State {
                schedule: Schedule::new(policy),
                watchers: BTreeMap::new(),
                live: LiveCredentials::default(),
                orphan_scan_at: None,
                orphan_scan_failures: 0,
                orphan_scan_running: false,
                unrevoked_at_shutdown: 0,
            }),
            wake: Notify::new(),
            shutdown: shutdown.child_token(),
            stopped: CancellationToken::new(),
            crash_at: options.crash_at,
            crash_counts: Mutex::new(HashMap::new()),
            crashed: AtomicBool::new(false),
            revoked_clients: Mutex::default(),
        });
        if let Err(e) = inner.reconcile_at_start().await {
            inner.close_store().await;
            inner.stopped.cancel();
            return Err(e);
        }
        tracing::info!(
            instance = %inner.instance,
            ttl_s = config.ttl.as_secs(),
            api = ?config.api,
            "lease manager started"
        );
        tokio::spawn(inner.clone().run());
        Ok(Arc::new(LeaseManager { inner }))
    }

    /// This outlet's instance id, part of every credential's marker.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    /// Subscribes to `client`'s lease. The receiver holds `None` until the first lease is
    /// made, then each new grant; `None` again if the lease expired without a successor (the
    /// backend failing). Read the current value with `borrow()` first: a receiver made while a
    /// lease is current sees it as already seen. The channel closes (`changed()` fails) when the
    /// manager stops, after a last `None`.
    pub fn subscribe(
        &self,
        client: &NodeName,
    ) -> Result<watch::Receiver<Option<LeaseGrant>>, LeaseError> {
        self.inner.check_open()?;
        self.inner.check_not_revoked(client)?;
        let rx = {
            let mut st = lock(&self.inner.state);
            let tx = st
                .watchers
                .entry(client.clone())
                .or_insert_with(|| watch::channel(None).0);
            let rx = tx.subscribe();
            st.schedule.set_wanted(client, true);
            rx
        };
        self.inner.wake.notify_one();
        Ok(rx)
    }

    /// Whether `authorization` (an `Authorization` header value as a client presented it) is
    /// the credential of a live lease of `client`: made by this manager for that identity, not
    /// expired, not revoked. The current lease and the previous one during its grace period both
    /// count, so a request sent just before a rotation is not refused.
    pub fn accepts(&self, client: &NodeName, authorization: &[u8]) -> bool {
        lock(&self.inner.state)
            .live
            .accepts(client, authorization, now_ms())
    }

    /// Makes a lease for `client` that is not streamed nor renewed (the command line's
    /// `lease create`); it is revoked at expiry.
    pub async fn create(&self, client: &NodeName) -> Result<LeaseGrant, LeaseError> {
        self.inner.check_open()?;
        self.inner.check_not_revoked(client)?;
        let (rec, credential) = self.inner.create_lease(client).await?;
        lock(&self.inner.state).schedule.track(
            &rec.lease_id,
            &rec.client,
            rec.expires_at_ms,
            rec.expires_at_ms,
        );
        self.inner.wake.notify_one();
        tracing::info!(lease_id = %rec.lease_id, client = %client, "lease created on request");
        tracing::info!(target: "postern::audit", event = "lease", action = "create", via = "admin", lease_id = %rec.lease_id, client = %client, expires_at_ms = rec.expires_at_ms);
        Ok(LeaseGrant {
            lease_id: rec.lease_id,
            credential,
            expires_at_ms: rec.expires_at_ms,
        })
    }

    /// Every lease in the store.
    pub async fn list(&self) -> Result<Vec<LeaseInfo>, LeaseError> {
        self.inner.check_open()?;
        let records = self.inner.store_op(|s| s.all()).await?;
        let st = lock(&self.inner.state);
        Ok(records.into_iter().map(|r| info(&st.schedule, r)).collect())
    }

    /// One lease.
    pub async fn show(&self, lease_id: &str) -> Result<LeaseInfo, LeaseError> {
        self.inner.check_open()?;
        let id = lease_id.to_owned();
        let rec = self.inner.store_op(move |s| s.get(&id)).await?;
        let rec = rec.ok_or_else(|| LeaseError::NotFound(lease_id.to_owned()))?;
        let st = lock(&self.inner.state);
        Ok(info(&st.schedule, rec))
    }

    /// Revokes a lease now. If it is streamed to a client, the client's subscribers see `None`
    /// and, while still subscribed, get a new lease right away.
    pub async fn revoke(&self, lease_id: &str) -> Result<(), LeaseError> {
        self.inner.check_open()?;
        let id = lease_id.to_owned();
        let rec = self.inner.store_op(move |s| s.get(&id)).await?;
        let Some(rec) = rec else {
            return Err(LeaseError::NotFound(lease_id.to_owned()));
        };
        {
            let mut st = lock(&self.inner.state);
            let tracked = st.schedule.lease(lease_id);
            // A `creating` record the schedule does not track is a creation in flight: let it
            // finish (or fail and clean up) rather than race it.
            if rec.state == LeaseState::Creating && tracked.is_none() {
                return Err(LeaseError::Busy(lease_id.to_owned()));
            }
            if !st.schedule.begin_revoke(lease_id) {
                return Err(LeaseError::Busy(lease_id.to_owned()));
            }
            if let Some(t) = tracked.filter(|t| t.current) {
                if let Some(tx) = NodeName::new(&t.client)
                    .ok()
                    .and_then(|c| st.watchers.get(&c))
                {
                    tx.send_replace(None);
                }
            }
        }
        let result = self.inner.revoke_lease(lease_id).await;
        {
            let mut st = lock(&self.inner.state);
            match &result {
                Ok(()) => st.schedule.revoked(lease_id),
                Err(LeaseError::Crashed(_)) => {}
                Err(e) => {
                    let n = st.schedule.revoke_failed(lease_id, &rec.client, now_ms());
                    tracing::error!(
                        lease_id, client = %rec.client, failures = n, error = %e,
                        "could not revoke a leased credential; it stays recorded and will be retried"
                    );
                }
            }
        }
        self.inner.wake.notify_one();
        if result.is_ok() {
            tracing::info!(lease_id, client = %rec.client, "lease revoked on request");
        }
        result
    }

    /// The identity `client` was revoked (the relay said so): every live lease of it is revoked
    /// now, its subscribers see `None` and then the channel close, nothing is renewed for it,
    /// and it gets no new lease from this manager. Without this its credential would stay
    /// usable in InfluxDB until the lease expired. Returns how many leases were revoked; a
    /// lease that cannot be revoked now stays recorded and is retried with backoff
    /// ([`LeaseError::RevokeClient`]).
    pub async fn revoke_client(&self, client: &NodeName) -> Result<usize, LeaseError> {
        self.inner.check_open()?;
        lock(&self.inner.revoked_clients).insert(client.clone());
        {
            let mut st = lock(&self.inner.state);
            st.schedule.set_wanted(client, false);
            if let Some(tx) = st.watchers.remove(client) {
                tx.send_replace(None);
            }
        }
        tracing::info!(target: "postern::audit", event = "lease", action = "revoke_client", %client);
        let name = client.to_string();
        let records = self.inner.store_op(|s| s.all()).await?;
        let (mut revoked, mut failed) = (0usize, 0usize);
        for rec in records.into_iter().filter(|r| r.client == name) {
            match self.revoke(&rec.lease_id).await {
                Ok(()) => revoked += 1,
                // Being made right now (`renew` revokes it as soon as it is made) or already
                // being revoked.
                Err(LeaseError::Busy(_) | LeaseError::NotFound(_)) => {}
                Err(e) => {
                    failed += 1;
                    tracing::error!(lease_id = %rec.lease_id, %client, error = %e, "could not revoke a lease of a revoked identity; retrying");
                }
            }
        }
        tracing::info!(%client, revoked, failed, "identity revoked: its leases are revoked");
        match failed {
            0 => Ok(revoked),
            n => Err(LeaseError::RevokeClient(n)),
        }
    }

    /// Stops the manager: revokes every lease (see the module docs) and closes the store.
    /// Returns [`LeaseError::Unrevoked`] if some could not be revoked in time.
    pub async fn shutdown(&self) -> Result<(), LeaseError> {
        self.inner.shutdown.cancel();
        self.inner.stopped.cancelled().await;
        if self.inner.crashed.load(Ordering::SeqCst) {
            return Err(LeaseError::Closed);
        }
        match lock(&self.inner.state).unrevoked_at_shutdown {
            0 => Ok(()),
            n => Err(LeaseError::Unrevoked(n)),
        }
    }

    /// Resolves once the manager has stopped (shut down or crashed) and its store is closed.
    pub async fn closed(&self) {
        self.inner.stopped.cancelled().await;
    }

    /// True once the manager crashed at an injected fault.
    pub fn is_crashed(&self) -> bool {
        self.inner.crashed.load(Ordering::SeqCst)
    }
}

fn info(schedule: &Schedule, r: LeaseRecord) -> LeaseInfo {
    let tracked = schedule.lease(&r.lease_id);
    LeaseInfo {
        state: r.state.name().to_owned(),
        backend_id: r.state.backend_id().map(str::to_owned),
        current: tracked.as_ref().is_some_and(|t| t.current),
        revoke_failures: tracked.map(|t| t.failures).unwrap_or(0),
        lease_id: r.lease_id,
        client: r.client,
        created_at_ms: r.created_at_ms,
        expires_at_ms: r.expires_at_ms,
    }
}

impl Inner {
    fn check_not_revoked(&self, client: &NodeName) -> Result<(), LeaseError> {
        if lock(&self.revoked_clients).contains(client) {
            return Err(LeaseError::ClientRevoked(client.clone()));
        }
        Ok(())
    }

    fn check_open(&self) -> Result<(), LeaseError> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(LeaseError::Closed);
        }
        if self.shutdown.is_cancelled() {
            return Err(LeaseError::Closed);
        }
        Ok(())
    }

    /// Runs a store operation on the blocking pool, holding the store's lock for its duration
    /// so that closing the store waits for it.
    async fn store_op<T, F>(self: &Arc<Self>, f: F) -> Result<T, LeaseError>
    where
        T: Send + 'static,
        F: FnOnce(&LeaseStore) -> Result<T, StoreError> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let guard = lock(&me.store);
            match guard.as_ref() {
                Some(s) => f(s).map_err(LeaseError::Store),
                None => Err(LeaseError::Closed),
            }
        })
        .await
        .map_err(|_| LeaseError::Closed)?
    }

    async fn put(self: &Arc<Self>, rec: LeaseRecord) -> Result<(), LeaseError> {
        self.store_op(move |s| s.put(&rec)).await
    }

    async fn close_store(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let taken = lock(&me.store).take();
            drop(taken);
        })
        .await;
    }

    /// Fault injection: crash here if told to.
    async fn checkpoint(self: &Arc<Self>, step: Step) -> Result<(), LeaseError> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(LeaseError::Crashed(step));
        }
        let Some(at) = self.crash_at else {
            return Ok(());
        };
        if at.step != step {
            return Ok(());
        }
        let hit = {
            let mut counts = lock(&self.crash_counts);
            let n = counts.entry(step).or_insert(0);
            *n += 1;
            *n == at.occurrence
        };
        if !hit {
            return Ok(());
        }
        tracing::warn!(?step, "injected crash");
        self.crashed.store(true, Ordering::SeqCst);
        // Finish the crash in a task of its own: the caller may be one of the manager's tasks,
        // which are aborted as soon as the manager's loop sees the shutdown.
        let me = self.clone();
        let finish = tokio::spawn(async move {
            me.close_store().await;
            me.stopped.cancel();
        });
        self.shutdown.cancel();
        let _ = finish.await;
        Err(LeaseError::Crashed(step))
    }

    /// Makes one lease: record, backend, record. Returns the active record and the credential.
    async fn create_lease(
        self: &Arc<Self>,
        client: &NodeName,
    ) -> Result<(LeaseRecord, Credential), LeaseError> {
        self.checkpoint(Step::CreateBeforeStore).await?;
        let now = now_ms();
        let rec = LeaseRecord {
            lease_id: new_lease_id(),
            client: client.to_string(),
            state: LeaseState::Creating,
            created_at_ms: now,
            expires_at_ms: now + self.policy.ttl_ms,
        };
        self.put(rec.clone()).await?;
        self.checkpoint(Step::CreateAfterStore).await?;
        let req = CreateRequest {
            lease_id: rec.lease_id.clone(),
            client: client.clone(),
            expires_at_ms: rec.expires_at_ms,
        };
        let outcome = tokio::time::timeout(CREATE_TIMEOUT, self.backend.create(&req)).await;
        let created = match outcome {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.clean_up_failed_create(&rec, e.nothing_made()).await?;
                return Err(e.into());
            }
            Err(_) => {
                self.clean_up_failed_create(&rec, false).await?;
                return Err(LeaseError::Timeout(CREATE_TIMEOUT));
            }
        };
        self.checkpoint(Step::CreateAfterBackend).await?;
        let active = LeaseRecord {
            state: LeaseState::Active {
                backend_id: created.backend_id.clone(),
            },
            ..rec.clone()
        };
        if let Err(e) = self.put(active.clone()).await {
            // The record still says `creating`: revoke now, and if that fails too the next
            // start finds the credential by its marker.
            if let Err(re) = self.backend.revoke(&created.backend_id).await {
                tracing::error!(
                    lease_id = %rec.lease_id, error = %re,
                    "could not revoke a credential whose lease could not be recorded; the next start revokes it"
                );
            }
            return Err(e);
        }
        self.checkpoint(Step::CreateAfterActivate).await?;
        lock(&self.state).live.insert(
            &rec.lease_id,
            client,
            &created.credential,
            rec.expires_at_ms,
        );
        metrics::counter!("postern_outlet_leases_issued_total").increment(1);
        Ok((active, created.credential))
    }

    /// After a failed creation: drop the record if the backend surely made nothing (it refused
    /// with an error answer), otherwise revoke by marker; if that fails, keep the record and
    /// retry later.
    async fn clean_up_failed_create(
        self: &Arc<Self>,
        rec: &LeaseRecord,
        nothing_made: bool,
    ) -> Result<(), LeaseError> {
        let id = rec.lease_id.clone();
        let result = if nothing_made {
            self.store_op(move |s| s.remove(&id)).await
        } else {
            self.revoke_lease(&id).await
        };
        match result {
            Ok(()) => Ok(()),
            Err(LeaseError::Crashed(s)) => Err(LeaseError::Crashed(s)),
            Err(e) => {
                let n =
                    lock(&self.state)
                        .schedule
                        .revoke_failed(&rec.lease_id, &rec.client, now_ms());
                tracing::error!(
                    lease_id = %rec.lease_id, client = %rec.client, failures = n, error = %e,
                    "could not clean up after a failed lease creation; will retry"
                );
                self.wake.notify_one();
                Ok(())
            }
        }
    }

    /// Revokes one lease according to its record. A lease with no record is done. Counts and
    /// audits the outcome.
    async fn revoke_lease(self: &Arc<Self>, lease_id: &str) -> Result<(), LeaseError> {
        // No longer accepted from this moment, whatever the backend says.
        lock(&self.state).live.remove(lease_id);
        let id = lease_id.to_owned();
        let Some(rec) = self.store_op(move |s| s.get(&id)).await? else {
            return Ok(());
        };
        let client = rec.client.clone();
        let result = self.revoke_record(rec).await;
        match &result {
            Ok(()) => {
                metrics::counter!("postern_outlet_leases_revoked_total").increment(1);
                tracing::info!(target: "postern::audit", event = "lease", action = "revoke", lease_id, %client);
            }
            Err(LeaseError::Crashed(_)) => {}
            Err(_) => {
                metrics::counter!("postern_outlet_leases_failed_total", "operation" => "revoke")
                    .increment(1);
                tracing::info!(target: "postern::audit", event = "lease", action = "revoke", outcome = "failed", lease_id, %client);
            }
        }
        result
    }

    /// The steps of [`revoke_lease`](Self::revoke_lease) for a recorded lease.
    async fn revoke_record(self: &Arc<Self>, rec: LeaseRecord) -> Result<(), LeaseError> {
        let lease_id = rec.lease_id.as_str();
        let backend_id = match &rec.state {
            LeaseState::Creating => {
                let found = self.backend.list_ours().await?;
                for f in found.iter().filter(|f| f.lease_id == rec.lease_id) {
                    self.backend.revoke(&f.backend_id).await?;
                }
                let id = lease_id.to_owned();
                self.store_op(move |s| s.remove(&id)).await?;
                return Ok(());
            }
            LeaseState::Active { backend_id } => {
                self.checkpoint(Step::RevokeBeforeStore).await?;
                self.put(LeaseRecord {
                    state: LeaseState::Revoking {
                        backend_id: backend_id.clone(),
                    },
                    ..rec.clone()
                })
                .await?;
                self.checkpoint(Step::RevokeAfterStore).await?;
                backend_id.clone()
            }
            LeaseState::Revoking { backend_id } => backend_id.clone(),
        };
        self.backend.revoke(&backend_id).await?;
        self.checkpoint(Step::RevokeAfterBackend).await?;
        let id = lease_id.to_owned();
        self.store_op(move |s| s.remove(&id)).await
    }

    /// Start-up reconciliation (see the module docs). Fails only if the store fails or an
    /// injected crash hits; backend failures are logged and retried in the background.
    async fn reconcile_at_start(self: &Arc<Self>) -> Result<(), LeaseError> {
        // List the backend before reading the store: every credential is made after its record
        // is written, so one found in the backend without a record is truly orphaned.
        let found = self.backend.list_ours().await;
        let records = self.store_op(|s| s.all()).await?;
        let now = now_ms();
        let mut to_revoke: Vec<(String, String)> = Vec::new();
        {
            let mut st = lock(&self.state);
            for r in &records {
                match &r.state {
                    LeaseState::Active { .. } if r.expires_at_ms > now => {
                        st.schedule
                            .track(&r.lease_id, &r.client, r.expires_at_ms, r.expires_at_ms);
                    }
                    _ => to_revoke.push((r.lease_id.clone(), r.client.clone())),
                }
            }
        }
        match found {
            Ok(found) => {
                for (lease_id, client) in self.record_orphans(&records, found).await? {
                    to_revoke.push((lease_id, client));
                }
            }
            Err(e) => {
                let mut st = lock(&self.state);
                st.orphan_scan_failures = 1;
                st.orphan_scan_at = Some(now + schedule::backoff(1).as_millis() as u64);
                tracing::error!(
                    error = %e,
                    "cannot list credentials in InfluxDB to reconcile leases; will retry"
                );
            }
        }
        let kept = records
            .iter()
            .filter(|r| matches!(r.state, LeaseState::Active { .. }) && r.expires_at_ms > now)
            .count();
        for (lease_id, client) in &to_revoke {
            match self.revoke_lease(lease_id).await {
                Ok(()) => {
                    tracing::info!(lease_id = %lease_id, client = %client, "revoked a leftover lease at start-up")
                }
                Err(LeaseError::Crashed(s)) => return Err(LeaseError::Crashed(s)),
                Err(e) => {
                    lock(&self.state)
                        .schedule
                        .track_failed(lease_id, client, 1, now_ms());
                    tracing::error!(
                        lease_id = %lease_id, client = %client, error = %e,
                        "could not revoke a leftover lease at start-up; it stays recorded and will be retried"
                    );
                }
            }
        }
        tracing::info!(
            kept,
            revoked_or_retrying = to_revoke.len(),
            "lease store reconciled"
        );
        Ok(())
    }

    /// Credentials in the backend with our marker and no record that covers them get a
    /// `revoking` record (so they are never forgotten). Returns those to revoke.
    async fn record_orphans(
        self: &Arc<Self>,
        records: &[LeaseRecord],
        found: Vec<backend::Found>,
    ) -> Result<Vec<(String, String)>, LeaseError> {
        let mut out = Vec::new();
        for f in found {
            let rec = records.iter().find(|r| r.lease_id == f.lease_id);
            match rec {
                // A `creating` record is revoked by marker; one with this backend id is
                // handled by its own state.
                Some(r)
                    if r.state == LeaseState::Creating
                        || r.state.backend_id() == Some(f.backend_id.as_str()) => {}
                Some(_) => {
                    tracing::warn!(
                        lease_id = %f.lease_id, backend_id = %f.backend_id,
                        "a credential carries the marker of a lease recorded with another credential; revoking it"
                    );
                    if let Err(e) = self.backend.revoke(&f.backend_id).await {
                        tracing::error!(backend_id = %f.backend_id, error = %e, "could not revoke a stray credential; the next scan retries");
                    }
                }
                None => {
                    let client = marker_client(&f.marker).unwrap_or("(unknown)").to_owned();
                    let now = now_ms();
                    self.put(LeaseRecord {
                        lease_id: f.lease_id.clone(),
                        client: client.clone(),
                        state: LeaseState::Revoking {
                            backend_id: f.backend_id.clone(),
                        },
                        created_at_ms: now,
                        expires_at_ms: now,
                    })
                    .await?;
                    tracing::warn!(
                        lease_id = %f.lease_id, backend_id = %f.backend_id, client = %client,
                        "found a credential with our marker and no live lease; revoking it"
                    );
                    out.push((f.lease_id, client));
                }
            }
        }
        Ok(out)
    }

    /// The background task: carries out the schedule until shutdown.
    async fn run(self: Arc<Self>) {
        let mut tasks: JoinSet<()> = JoinSet::new();
        loop {
            let now = now_ms();
            let (actions, next, scan) = {
                let mut guard = lock(&self.state);
                let st = &mut *guard;
                for (client, tx) in &st.watchers {
                    st.schedule.set_wanted(client, tx.receiver_count() > 0);
                }
                let actions = st.schedule.poll(now);
                st.watchers
                    .retain(|c, tx| tx.receiver_count() > 0 || st.schedule.knows_client(c));
                let scan = match st.orphan_scan_at {
                    Some(at) if at <= now && !st.orphan_scan_running => {
                        st.orphan_scan_running = true;
                        true
                    }
                    _ => false,
                };
                let mut next = st.schedule.next_deadline();
                if let Some(at) = st.orphan_scan_at.filter(|_| !st.orphan_scan_running) {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                (actions, next, scan)
            };
            for a in actions {
                match a {
                    Action::Withdraw { client, lease_id } => {
                        if let Some(tx) = lock(&self.state).watchers.get(&client) {
                            tx.send_replace(None);
                        }
                        tracing::warn!(client = %client, lease_id = %lease_id, "lease expired with no successor");
                    }
                    Action::Create { client } => {
                        tasks.spawn(self.clone().renew(client));
                    }
                    Action::Revoke { lease_id } => {
                        tasks.spawn(self.clone().scheduled_revoke(lease_id));
                    }
                }
            }
            if scan {
                tasks.spawn(self.clone().orphan_scan());
            }
            let wait = next
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
                .unwrap_or(MAX_IDLE)
                .min(MAX_IDLE);
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        if self.crashed.load(Ordering::SeqCst) {
            tasks.abort_all();
            // Like a dead process: subscribers see the channel close.
            lock(&self.state).watchers.clear();
            return;
        }
        // Graceful stop: let in-flight work finish briefly, then revoke everything.
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_DRAIN, drain).await.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let unrevoked = self.revoke_all().await;
        {
            let mut st = lock(&self.state);
            st.unrevoked_at_shutdown = unrevoked;
            // Subscribers see `None`, then the channel close.
            for tx in st.watchers.values() {
                tx.send_replace(None);
            }
            st.watchers.clear();
        }
        if !self.crashed.load(Ordering::SeqCst) {
            self.close_store().await;
            self.stopped.cancel();
        }
        tracing::info!(unrevoked, "lease manager stopped");
    }

    /// Revokes every lease in the store (shutdown). Returns how many could not be revoked.
    async fn revoke_all(self: &Arc<Self>) -> usize {
        let records = match self.store_op(|s| s.all()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the lease store at shutdown; leases are revoked at the next start");
                return 0;
            }
        };
        let total = records.len();
        let mut set = JoinSet::new();
        for r in records {
            let me = self.clone();
            set.spawn(async move {
                let res = me.revoke_lease(&r.lease_id).await;
                (r, res)
            });
        }
        let mut done = 0usize;
        let collect = async {
            while let Some(joined) = set.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => done += 1,
                    Ok((r, Err(e))) => tracing::error!(
                        lease_id = %r.lease_id, client = %r.client, error = %e,
                        "could not revoke a lease at shutdown; it stays recorded and is revoked at the next start"
                    ),
                    Err(_) => {}
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_REVOKE, collect)
            .await
            .is_err()
        {
            tracing::error!(
                "revoking leases at shutdown took too long; the rest are revoked at the next start"
            );
        }
        total - done
    }

    /// Carries out [`Action::Create`].
    async fn renew(self: Arc<Self>, client: NodeName) {
        let result = self.create_lease(&client).await;
        let now = now_ms();
        let mut st = lock(&self.state);
        match result {
            Ok((rec, _)) if lock(&self.revoked_clients).contains(&client) => {
                // Revoked while this lease was being made: never hand it out, revoke it now.
                st.schedule.created(
                    &client,
                    &rec.lease_id,
                    rec.created_at_ms,
                    rec.expires_at_ms,
                    now,
                );
                st.schedule
                    .track(&rec.lease_id, &rec.client, rec.expires_at_ms, now);
                tracing::info!(client = %client, lease_id = %rec.lease_id, "lease made for an identity revoked meanwhile; revoking it");
            }
            Ok((rec, credential)) => {
                let old = st.schedule.created(
                    &client,
                    &rec.lease_id,
                    rec.created_at_ms,
                    rec.expires_at_ms,
                    now,
                );
                let grant = LeaseGrant {
                    lease_id: rec.lease_id.clone(),
                    credential,
                    expires_at_ms: rec.expires_at_ms,
                };
                st.watchers
                    .entry(client.clone())
                    .or_insert_with(|| watch::channel(None).0)
                    .send_replace(Some(grant));
                tracing::info!(
                    client = %client, lease_id = %rec.lease_id, replaces = ?old,
                    expires_at_ms = rec.expires_at_ms, "lease issued"
                );
                let action = if old.is_some() { "renew" } else { "create" };
                if old.is_some() {
                    metrics::counter!("postern_outlet_leases_renewed_total").increment(1);
                }
                tracing::info!(target: "postern::audit", event = "lease", action, lease_id = %rec.lease_id, %client, replaces = ?old, expires_at_ms = rec.expires_at_ms);
            }
            Err(LeaseError::Crashed(_)) => return,
            Err(e) => {
                metrics::counter!("postern_outlet_leases_failed_total", "operation" => "create")
                    .increment(1);
                tracing::info!(target: "postern::audit", event = "lease", action = "create", outcome = "failed", %client);
                let n = st.schedule.create_failed(&client, now);
                tracing::error!(
                    client = %client, failures = n, error = %e,
                    retry_in_s = schedule::backoff(n).as_secs(),
                    "could not make a lease"
                );
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Carries out [`Action::Revoke`].
    async fn scheduled_revoke(self: Arc<Self>, lease_id: String) {
        let result = self.revoke_lease(&lease_id).await;
        let mut st = lock(&self.state);
        match result {
            Ok(()) => {
                st.schedule.revoked(&lease_id);
                tracing::info!(lease_id = %lease_id, "lease revoked");
            }
            Err(LeaseError::Crashed(_)) => return,
            Err(e) => {
                let client = st
                    .schedule
                    .lease(&lease_id)
                    .map(|l| l.client)
                    .unwrap_or_default();
                let n = st.schedule.revoke_failed(&lease_id, &client, now_ms());
                tracing::error!(
                    lease_id = %lease_id, client = %client, failures = n, error = %e,
                    retry_in_s = schedule::backoff(n).as_secs(),
                    "could not revoke a leased credential; it stays recorded and will be retried"
                );
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Retries the start-up search for orphaned credentials.
    async fn orphan_scan(self: Arc<Self>) {
        let result = async {
            let found = self.backend.list_ours().await?;
            let records = self.store_op(|s| s.all()).await?;
            self.record_orphans(&records, found).await
        }
        .await;
        let now = now_ms();
        let mut st = lock(&self.state);
        st.orphan_scan_running = false;
        match result {
            Ok(orphans) => {
                st.orphan_scan_at = None;
                st.orphan_scan_failures = 0;
                for (lease_id, client) in orphans {
                    st.schedule.track(&lease_id, &client, now, now);
                }
                tracing::info!("reconciled credentials in InfluxDB with the lease store");
            }
            Err(LeaseError::Crashed(_)) => return,
            Err(e) => {
                st.orphan_scan_failures = st.orphan_scan_failures.saturating_add(1);
                let delay = schedule::backoff(st.orphan_scan_failures);
                st.orphan_scan_at = Some(now + delay.as_millis() as u64);
                tracing::error!(
                    error = %e, failures = st.orphan_scan_failures, retry_in_s = delay.as_secs(),
                    "cannot list credentials in InfluxDB to reconcile leases; will retry"
                );
            }
        }
        drop(st);
        self.wake.notify_one();
    }
}

/// The `client=` field of a v2 marker.
fn marker_client(marker: &str) -> Option<&str> {
    marker
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("client="))
        .filter(|c| NodeName::new(c).is_ok())
}

#[cfg(test)]
mod tests {
    use super::backend::{BoxFuture, Created, Found};
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// An in-memory backend whose revocations can be made to fail.
    #[derive(Default)]
    struct Fake {
        creds: Mutex<BTreeMap<String, String>>,
        fail_revoke: AtomicBool,
        revoke_attempts: AtomicU32,
        attempted: Notify,
    }

    impl Backend for Fake {
        fn create<'a>(
            &'a self,
            req: &'a CreateRequest,
        ) -> BoxFuture<'a, Result<Created, BackendError>> {
            Box::pin(async move {
                let id = format!("b-{}", req.lease_id);
                lock(&self.creds).insert(id.clone(), req.lease_id.clone());
                Ok(Created {
                    backend_id: id,
                    credential: Credential::Token(format!("tok-{}", req.lease_id)),
                })
            })
        }

        fn revoke<'a>(&'a self, backend_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
            Box::pin(async move {
                self.revoke_attempts.fetch_add(1, Ordering::SeqCst);
                self.attempted.notify_waiters();
                if self.fail_revoke.load(Ordering::SeqCst) {
                    return Err(BackendError::Protocol {
                        op: "delete",
                        detail: "injected failure".into(),
                    });
                }
                lock(&self.creds).remove(backend_id);
                Ok(())
            })
        }

        fn list_ours(&self) -> BoxFuture<'_, Result<Vec<Found>, BackendError>> {
            Box::pin(async move {
                Ok(lock(&self.creds)
                    .iter()
                    .map(|(id, lease)| Found {
                        backend_id: id.clone(),
                        lease_id: lease.clone(),
                        marker: String::new(),
                    })
                    .collect())
            })
        }
    }

    fn config(ttl_s: u64) -> LeaseConfig {
        LeaseConfig {
            url: reqwest::Url::parse("http://127.0.0.1:1").expect("url"),
            tls_ca: None,
            allow: None,
            org_id: Some("0123456789abcdef".into()),
            admin: Secret::new("unused".into()),
            ttl: Duration::from_secs(ttl_s),
            permissions: Vec::new(),
            api: Api::V2,
        }
    }

    async fn start(dir: &Path, fake: &Arc<Fake>, ttl_s: u64) -> Arc<LeaseManager> {
        LeaseManager::start_with(
            config(ttl_s),
            dir,
            CancellationToken::new(),
            StartOptions {
                backend: Some(fake.clone()),
                crash_at: None,
            },
        )
        .await
        .expect("start")
    }

    fn client() -> NodeName {
        NodeName::new("inlet-x").expect("name")
    }

    #[tokio::test]
    async fn lease_lifecycle_is_audited_without_credentials() {
        use tracing_subscriber::layer::SubscriberExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit.jsonl");
        let layer = postern_net::runtime::logging::audit_layer(&audit).expect("audit layer");
        // A current-thread runtime: every task logs through this thread's subscriber.
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        // With a single scoped subscriber alive, tracing computes a callsite's interest from
        // the default of whichever thread hits it first, so a test running in parallel could
        // switch these events off for good; a second live dispatcher makes it ask every one.
        let _second = tracing::Dispatch::new(tracing_subscriber::registry());
        let fake = Arc::new(Fake::default());
        let mgr = start(dir.path(), &fake, 3600).await;
        let mut streamed = mgr.subscribe(&client()).expect("subscribe");
        tokio::time::timeout(Duration::from_secs(10), streamed.wait_for(|g| g.is_some()))
            .await
            .expect("lease in time")
            .expect("lease");
        let other = NodeName::new("inlet-y").expect("name");
        let by_hand = mgr.create(&other).await.expect("create");
        mgr.revoke(&by_hand.lease_id).await.expect("revoke");
        drop(streamed);
        mgr.shutdown().await.expect("shutdown revokes the rest");

        let text = std::fs::read_to_string(&audit).expect("audit log");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        let count = |action: &str, client: &str| {
            lines
                .iter()
                .filter(|l| l["event"] == "lease" && l["action"] == action && l["client"] == client)
                .count()
        };
        assert_eq!(count("create", "inlet-x"), 1, "{text}");
        assert_eq!(count("create", "inlet-y"), 1, "{text}");
        assert_eq!(count("revoke", "inlet-x"), 1, "{text}");
        assert_eq!(count("revoke", "inlet-y"), 1, "{text}");
        assert!(
            !text.contains("tok-"),
            "a credential is in the audit log: {text}"
        );
    }

    #[tokio::test]
    async fn failed_revocations_are_retried_and_never_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        fake.fail_revoke.store(true, Ordering::SeqCst);
        let mgr = start(dir.path(), &fake, 2).await;
        let g = mgr.create(&client()).await.expect("create");
        // Wait for the revocation at expiry to fail, and for at least one retry.
        let wait = async {
            loop {
                let notified = fake.attempted.notified();
                if fake.revoke_attempts.load(Ordering::SeqCst) >= 2 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .expect("revocation retried");
        let info = mgr.show(&g.lease_id).await.expect("still recorded");
        assert_eq!(info.state, "revoking");
        assert!(info.revoke_failures >= 1, "{info:?}");
        assert_eq!(lock(&fake.creds).len(), 1);

        fake.fail_revoke.store(false, Ordering::SeqCst);
        let wait = async {
            loop {
                let notified = fake.attempted.notified();
                if lock(&fake.creds).is_empty() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .expect("revoked once the backend recovers");
        mgr.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn leases_not_revoked_at_shutdown_are_revoked_by_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        let mgr = start(dir.path(), &fake, 3600).await;
        mgr.create(&client()).await.expect("create");
        let mut rx = mgr.subscribe(&client()).expect("subscribe");
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(Option::is_some))
            .await
            .expect("subscribed lease made")
            .expect("alive");
        assert_eq!(lock(&fake.creds).len(), 2);
        fake.fail_revoke.store(true, Ordering::SeqCst);
        match mgr.shutdown().await {
            Err(LeaseError::Unrevoked(2)) => {}
            other => panic!("expected 2 unrevoked leases, got {other:?}"),
        }
        assert_eq!(lock(&fake.creds).len(), 2);

        fake.fail_revoke.store(false, Ordering::SeqCst);
        let mgr = start(dir.path(), &fake, 3600).await;
        // Both were live and recorded `revoking` (shutdown marked them before failing): the
        // start-up reconciliation revokes them.
        assert!(lock(&fake.creds).is_empty());
        assert!(mgr.list().await.expect("list").is_empty());
        mgr.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn orphaned_credentials_are_revoked_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Fake::default());
        lock(&fake.creds).insert("b-orphan".into(), "00000000000000aa".into());
        let mgr = start(dir.path(), &fake, 3600).await;
        assert!(lock(&fake.creds).is_empty());
        assert!(mgr.list().await.expect("list").is_empty());
        mgr.shutdown().await.expect("shutdown");
    }
}
