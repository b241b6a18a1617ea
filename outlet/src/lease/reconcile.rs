//! Start-up reconciliation of the lease store with the backend (the table in the module docs of
//! [`crate::lease`]), and the retried search for credentials carrying this outlet's marker with
//! no record.

use super::backend::Found;
use super::error::LeaseError;
use super::schedule;
use super::shared::{lock, Inner};
use super::store::{LeaseRecord, RecordState};
use super::v2::marker_client;
use postern_net::runtime::clock::now_ms;
use std::sync::Arc;

impl Inner {
    /// Start-up reconciliation (the table in [`crate::lease`]). Fails only if the store fails or an
    /// injected crash hits; backend failures are logged and retried in the background.
    pub(super) async fn reconcile_at_start(self: &Arc<Self>) -> Result<(), LeaseError> {
        // List the backend before reading the store: every credential is made after its record
        // is written, so one found in the backend without a record is truly orphaned.
        let found = self.backend.list_ours().await;
        let records = self.store_op("list", |s| s.all()).await?;
        let now = now_ms();
        let mut to_revoke: Vec<(String, String)> = Vec::new();
        {
            let mut st = lock(&self.state);
            for r in &records {
                match &r.state {
                    RecordState::Active { .. } if r.expires_at_ms > now => {
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
            .filter(|r| matches!(r.state, RecordState::Active { .. }) && r.expires_at_ms > now)
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
    pub(super) async fn record_orphans(
        self: &Arc<Self>,
        records: &[LeaseRecord],
        found: Vec<Found>,
    ) -> Result<Vec<(String, String)>, LeaseError> {
        let mut out = Vec::new();
        for f in found {
            let rec = records.iter().find(|r| r.lease_id == f.lease_id);
            match rec {
                // A `creating` record is revoked by marker; one with this backend id is
                // handled by its own state.
                Some(r)
                    if r.state == RecordState::Creating
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
                        state: RecordState::Revoking {
                            backend_id: f.backend_id.clone(),
                        },
                        created_at_ms: now,
                        expires_at_ms: now,
                        profile: None,
                        handed_out: false,
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

    /// Retries the start-up search for orphaned credentials.
    pub(super) async fn orphan_scan(self: Arc<Self>) {
        let result = async {
            let found = self.backend.list_ours().await?;
            let records = self.store_op("list", |s| s.all()).await?;
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
