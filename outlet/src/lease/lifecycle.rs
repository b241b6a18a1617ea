//! Making and revoking one lease, in the order that keeps a crash safe (see the module docs of
//! [`crate::lease`]): the record is written before the backend is asked and dropped only once
//! the backend confirms. Also the store access every other file goes through.

use super::backend::CreateRequest;
use super::error::LeaseError;
use super::fault::CrashPoint;
use super::shared::{lock, new_lease_id, Inner};
use super::store::{LeaseRecord, LeaseStore, RecordState, StoreError};
use postern_net::runtime::clock::now_ms;
use postern_proto::lease::Credential;
use postern_proto::name::NodeName;
use std::sync::Arc;
use std::time::Duration;

/// Longest a whole backend creation (several requests for v1) may take.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// so that closing the store waits for it.
    pub(super) async fn store_op<T, F>(self: &Arc<Self>, f: F) -> Result<T, LeaseError>
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

    pub(super) async fn put(self: &Arc<Self>, rec: LeaseRecord) -> Result<(), LeaseError> {
        self.store_op(move |s| s.put(&rec)).await
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
    pub(super) async fn create_lease(
        self: &Arc<Self>,
        client: &NodeName,
    ) -> Result<(LeaseRecord, Credential), LeaseError> {
        self.checkpoint(CrashPoint::CreateBeforeStore).await?;
        let now = now_ms();
        let rec = LeaseRecord {
            lease_id: new_lease_id(),
            client: client.to_string(),
            state: RecordState::Creating,
            created_at_ms: now,
            expires_at_ms: now + self.policy.ttl_ms,
        };
        self.put(rec.clone()).await?;
        self.checkpoint(CrashPoint::CreateAfterStore).await?;
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
        self.checkpoint(CrashPoint::CreateAfterBackend).await?;
        let active = LeaseRecord {
            state: RecordState::Active {
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
    pub(super) async fn revoke_lease(self: &Arc<Self>, lease_id: &str) -> Result<(), LeaseError> {
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
                self.store_op(move |s| s.remove(&id)).await?;
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
        self.store_op(move |s| s.remove(&id)).await
    }
}
