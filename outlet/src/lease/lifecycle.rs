//! Making and revoking one lease, in the order that keeps a crash safe (see the module docs of
//! [`crate::lease`]): the record is written before the backend is asked and dropped only once
//! the backend confirms. Also the store access every other file goes through.

use super::backend::CreateRequest;
use super::error::LeaseError;
use super::fault::CrashPoint;
use super::profile::Profile;
use super::schedule::Policy;
use super::shared::{lock, new_lease_id, Inner};
use super::store::{LeaseRecord, LeaseStore, RecordState, StoreError};
use postern_net::runtime::clock::now_ms;
use postern_proto::lease::Credential;
use postern_proto::name::NodeName;
use std::sync::Arc;
use std::time::Duration;

/// Longest a whole backend creation (several requests for v1) may take.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Failed operations on the lease store, by operation (`put`, `remove`, `get`, `list`,
/// `reopen`).
pub const STORE_FAILURES: &str = "postern_outlet_lease_store_failures_total";

impl Inner {
    pub(super) fn check_not_revoked(&self, client: &NodeName) -> Result<(), LeaseError> {
        if lock(&self.revoked_clients).contains(client) {
            return Err(LeaseError::ClientRevoked(client.clone()));
        }
        Ok(())
    }

    pub(super) fn check_open(&self) -> Result<(), LeaseError> {
        if self.faults.crashed() {
            return Err(LeaseError::Closed);
        }
        if self.shutdown.is_cancelled() {
            return Err(LeaseError::Closed);
        }
        Ok(())
    }

    /// Runs a store operation on the blocking pool, holding the store's lock for its duration
    /// so that closing the store waits for it. A failure is counted by `op`; one that leaves
    /// the store unable to write closes its database, marks the store broken (readiness fails,
    /// the manager's task reopens it with backoff) and is answered as
    /// [`StoreError::Unwritable`].
    pub(super) async fn store_op<T, F>(
        self: &Arc<Self>,
        op: &'static str,
        f: F,
    ) -> Result<T, LeaseError>
    where
        T: Send + 'static,
        F: FnOnce(&LeaseStore) -> Result<T, StoreError> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&me.store);
            let Some(s) = guard.as_mut() else {
                return Err(LeaseError::Closed);
            };
            let e = match f(s) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            metrics::counter!(STORE_FAILURES, "operation" => op).increment(1);
            if !s.close_after(&e) {
                return Err(LeaseError::Store(e));
            }
            let reason = e.write_reason();
            // Marked while the store's lock is held, so that a reopening (which holds it too)
            // cannot be overtaken by the news of a failure from before it.
            if lock(&me.state)
                .store_health
                .failed(reason.clone(), now_ms())
            {
                tracing::error!(
                    operation = op, error = %e,
                    "the lease store cannot write; leases are neither made nor revoked until it \
                     is reopened (retried with backoff)"
                );
                me.wake.notify_one();
            }
            Err(LeaseError::Store(StoreError::Unwritable { reason }))
        })
        .await
        .map_err(|_| LeaseError::Closed)?
    }

    /// Why the store cannot write now, if it cannot.
    pub(super) fn store_problem(&self) -> Option<String> {
        lock(&self.state).store_health.problem(now_ms())
    }

    /// Closes and reopens a store that failed to write (the manager's task calls this when
    /// [`StoreHealth`](super::health::StoreHealth) says it is time). Once it writes again,
    /// everything that failed meanwhile (revocations above all: their credentials are past
    /// expiry) is retried at once.
    pub(super) async fn reopen_store(self: Arc<Self>) {
        let me = self.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut guard = lock(&me.store);
            let s = guard.as_mut()?;
            let result = s.reopen();
            let now = now_ms();
            let mut st = lock(&me.state);
            Some(match result {
                Ok(()) => {
                    st.schedule.retry_failed_now(now);
                    Ok(st
                        .store_health
                        .reopened()
                        .map(|since| now.saturating_sub(since)))
                }
                Err(e) => {
                    let n = st.store_health.reopen_failed(e.write_reason(), now);
                    Err((e, n))
                }
            })
        })
        .await
        .ok()
        .flatten();
        match outcome {
            Some(Ok(down_ms)) => {
                tracing::info!(
                    unwritable_for_ms = down_ms,
                    "the lease store was reopened and writes again; retrying what failed meanwhile"
                );
            }
            Some(Err((e, attempts))) => {
                metrics::counter!(STORE_FAILURES, "operation" => "reopen").increment(1);
                let log = attempts == 1 || attempts % 30 == 0;
                if log {
                    tracing::error!(
                        error = %e, attempts,
                        "cannot reopen the lease store; retrying"
                    );
                } else {
                    tracing::debug!(error = %e, attempts, "cannot reopen the lease store; retrying");
                }
            }
            // The store is closed (shutdown) or the task was cut off.
            None => {}
        }
        self.wake.notify_one();
    }

    pub(super) async fn put(self: &Arc<Self>, rec: LeaseRecord) -> Result<(), LeaseError> {
        self.store_op("put", move |s| s.put(&rec)).await
    }

    pub(super) async fn close_store(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let taken = lock(&me.store).take();
            drop(taken);
        })
        .await;
    }

    /// Fault injection: crash here if told to (see [`CrashAt`](super::CrashAt)).
    async fn checkpoint(self: &Arc<Self>, point: CrashPoint) -> Result<(), LeaseError> {
        if self.faults.crashed() {
            return Err(LeaseError::Crashed(point));
        }
        if !self.faults.reached(point) {
            return Ok(());
        }
        tracing::warn!(?point, "injected crash");
        // Finish the crash in a task of its own: the caller may be one of the manager's tasks,
        // which are aborted as soon as the manager's loop sees the shutdown.
        let me = self.clone();
        let finish = tokio::spawn(async move {
            me.close_store().await;
            me.stopped.cancel();
        });
        self.shutdown.cancel();
        let _ = finish.await;
        Err(LeaseError::Crashed(point))
    }

    /// Makes one lease: record, backend, record. Returns the active record and the credential.
    /// A failure (other than an injected crash) is counted, whoever asked (the schedule or the
    /// command line).
    pub(super) async fn create_lease(
        self: &Arc<Self>,
        client: &NodeName,
        profile: Arc<Profile>,
        handed_out: bool,
    ) -> Result<(LeaseRecord, Credential), LeaseError> {
        let result = self.create_steps(client, profile, handed_out).await;
        if let Err(e) = &result {
            if !matches!(e, LeaseError::Crashed(_)) {
                metrics::counter!("postern_outlet_leases_failed_total", "operation" => "create")
                    .increment(1);
            }
        }
        result
    }

    /// The steps of [`create_lease`](Self::create_lease).
    async fn create_steps(
        self: &Arc<Self>,
        client: &NodeName,
        profile: Arc<Profile>,
        handed_out: bool,
    ) -> Result<(LeaseRecord, Credential), LeaseError> {
        self.checkpoint(CrashPoint::CreateBeforeStore).await?;
        let now = now_ms();
        let rec = LeaseRecord {
            lease_id: new_lease_id(),
            client: client.to_string(),
            state: RecordState::Creating,
            created_at_ms: now,
            expires_at_ms: now + Policy::new(profile.ttl).ttl_ms,
            profile: Some(profile.name.clone()),
            handed_out,
        };
        if let Err(e) = self.put(rec.clone()).await {
            if matches!(&e, LeaseError::Store(se) if se.cannot_write()) {
                // A write that failed may still turn up once the store is reopened: look again
                // then (a record that is not there is simply forgotten).
                lock(&self.state)
                    .schedule
                    .revoke_failed(&rec.lease_id, &rec.client, now_ms());
            }
            return Err(e);
        }
        self.checkpoint(CrashPoint::CreateAfterStore).await?;
        let req = CreateRequest {
            lease_id: rec.lease_id.clone(),
            client: client.clone(),
            expires_at_ms: rec.expires_at_ms,
            profile,
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
        self.checkpoint(CrashPoint::CreateAfterBackend).await?;
        let active = LeaseRecord {
            state: RecordState::Active {
                backend_id: created.backend_id.clone(),
            },
            ..rec.clone()
        };
        if let Err(e) = self.put(active.clone()).await {
            // The record still says `creating`: revoke now (the store may not be able to
            // write, but the backend can), and leave the record to the retried clean-up, which
            // revokes by marker whatever this missed and then drops it.
            if let Err(re) = self.backend.revoke(&created.backend_id).await {
                tracing::error!(
                    lease_id = %rec.lease_id, error = %re,
                    "could not revoke a credential whose lease could not be recorded; retrying"
                );
            }
            let n = lock(&self.state)
                .schedule
                .revoke_failed(&rec.lease_id, &rec.client, now_ms());
            tracing::error!(
                lease_id = %rec.lease_id, client = %rec.client, failures = n, error = %e,
                "could not record a lease as made; its record is cleaned up when the store writes again"
            );
            self.wake.notify_one();
            return Err(e);
        }
        self.checkpoint(CrashPoint::CreateAfterActivate).await?;
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
    pub(super) async fn clean_up_failed_create(
        self: &Arc<Self>,
        rec: &LeaseRecord,
        nothing_made: bool,
    ) -> Result<(), LeaseError> {
        let id = rec.lease_id.clone();
        let result = if nothing_made {
            self.store_op("remove", move |s| s.remove(&id)).await
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

    /// Revokes a lease now, outside the schedule (the command line, a reload that changed its
    /// client's profile): claims it in the schedule, withdraws it from its subscribers if it is
    /// the one streamed (they get a new lease right away while still wanted), revokes it and
    /// tells the schedule how that went. `reason` goes into the audit log. Returns its record.
    pub(super) async fn revoke_now(
        self: &Arc<Self>,
        lease_id: &str,
        reason: Option<&'static str>,
    ) -> Result<LeaseRecord, LeaseError> {
        let id = lease_id.to_owned();
        let rec = self.store_op("get", move |s| s.get(&id)).await?;
        let Some(rec) = rec else {
            return Err(LeaseError::NotFound(lease_id.to_owned()));
        };
        {
            let mut st = lock(&self.state);
            let tracked = st.schedule.lease(lease_id);
            // A `creating` record the schedule does not track is a creation in flight: let it
            // finish (or fail and clean up) rather than race it.
            if rec.state == RecordState::Creating && tracked.is_none() {
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
        let result = self.revoke_lease_for(lease_id, reason).await;
        {
            let mut st = lock(&self.state);
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
        self.wake.notify_one();
        result.map(|()| rec)
    }

    /// Revokes one lease according to its record. A lease with no record is done. Counts and
    /// audits the outcome.
    pub(super) async fn revoke_lease(self: &Arc<Self>, lease_id: &str) -> Result<(), LeaseError> {
        self.revoke_lease_for(lease_id, None).await
    }

    /// [`revoke_lease`](Self::revoke_lease), with why it is revoked for the audit log.
    pub(super) async fn revoke_lease_for(
        self: &Arc<Self>,
        lease_id: &str,
        reason: Option<&'static str>,
    ) -> Result<(), LeaseError> {
        // No longer accepted from this moment, whatever the backend says.
        {
            let mut st = lock(&self.state);
            st.live.remove(lease_id);
            st.handed_out.retain(|_, h| h.grant.lease_id != lease_id);
        }
        let id = lease_id.to_owned();
        let (client, result) = match self.store_op("get", move |s| s.get(&id)).await {
            Ok(None) => return Ok(()),
            Ok(Some(rec)) => (rec.client.clone(), self.revoke_record(rec).await),
            Err(e) => ("(unknown: the store cannot be read)".to_owned(), Err(e)),
        };
        match &result {
            Ok(()) => {
                metrics::counter!("postern_outlet_leases_revoked_total").increment(1);
                match reason {
                    Some(reason) => {
                        tracing::info!(target: "postern::audit", event = "lease", action = "revoke", reason, lease_id, %client)
                    }
                    None => {
                        tracing::info!(target: "postern::audit", event = "lease", action = "revoke", lease_id, %client)
                    }
                }
            }
            Err(LeaseError::Crashed(_)) => {}
            Err(_) => {
                metrics::counter!("postern_outlet_leases_failed_total", "operation" => "revoke")
                    .increment(1);
                tracing::info!(target: "postern::audit", event = "lease", action = "revoke", outcome = "failed", reason = reason.unwrap_or("-"), lease_id, %client);
            }
        }
        result
    }

    /// The steps of [`revoke_lease`](Self::revoke_lease) for a recorded lease.
    pub(super) async fn revoke_record(
        self: &Arc<Self>,
        rec: LeaseRecord,
    ) -> Result<(), LeaseError> {
        let lease_id = rec.lease_id.as_str();
        let backend_id = match &rec.state {
            RecordState::Creating => {
                let found = self.backend.list_ours().await?;
                for f in found.iter().filter(|f| f.lease_id == rec.lease_id) {
                    self.backend.revoke(&f.backend_id).await?;
                }
                let id = lease_id.to_owned();
                self.store_op("remove", move |s| s.remove(&id)).await?;
                return Ok(());
            }
            RecordState::Active { backend_id } => {
                self.checkpoint(CrashPoint::RevokeBeforeStore).await?;
                self.put(LeaseRecord {
                    state: RecordState::Revoking {
                        backend_id: backend_id.clone(),
                    },
                    ..rec.clone()
                })
                .await?;
                self.checkpoint(CrashPoint::RevokeAfterStore).await?;
                backend_id.clone()
            }
            RecordState::Revoking { backend_id } => backend_id.clone(),
        };
        self.backend.revoke(&backend_id).await?;
        self.checkpoint(CrashPoint::RevokeAfterBackend).await?;
        let id = lease_id.to_owned();
        self.store_op("remove", move |s| s.remove(&id)).await
    }
}
