//! The embedded backend: the relay's own state directory, as a single relay has always kept
//! it. Tickets and identities are the authority's files (when this relay holds the CA key);
//! drains are files under `drains/` so they outlive a restart; there is no fleet to join.
//! Revocations made by `postern-relay identity revoke` in another process are picked up by
//! reading the directory every 100 ms.

use super::{
    DrainRecord, FleetError, FleetState, FleetView, Fut, LoadFn, Member, Presence, Snapshot,
};
use crate::authority::{Authority, IdentityRecord, TicketRecord, TicketSpec};
use crate::state::StateDir;
use postern_net::runtime::files;
use postern_proto::msg::Refusal;
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::Attributes;
use postern_proto::ticket::EnrollRefusal;
use postern_proto::ticket::{EnrollRequest, EnrollResponse, Ticket};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// See the module docs.
pub struct Embedded {
    /// The authority, when this relay holds the CA key.
    authority: Option<Arc<Authority>>,
    /// Where drains are kept; without one (a relay built in a test) they live in memory.
    state: Option<StateDir>,
    /// Drains of a relay without a state directory.
    memory_drains: Mutex<BTreeMap<NodeName, DrainRecord>>,
}

impl Embedded {
    /// The state of a relay: `authority` when it runs one, `state` for its drains.
    pub fn new(authority: Option<Arc<Authority>>, state: Option<StateDir>) -> Self {
        let state = state.or_else(|| authority.as_ref().map(|a| a.state().clone()));
        Self {
            authority,
            state,
            memory_drains: Mutex::default(),
        }
    }

    fn drains_dir(&self) -> Option<PathBuf> {
        self.state.as_ref().map(|s| s.root().join("drains"))
    }

    fn read_drains(&self) -> BTreeMap<NodeName, DrainRecord> {
        let Some(dir) = self.drains_dir() else {
            return self
                .memory_drains
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
        };
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return out;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Some(name) = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<NodeName>().ok())
            else {
                continue;
            };
            if p.extension().is_some_and(|x| x == "json") {
                if let Some(r) = files::read(&p)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                {
                    out.insert(name, r);
                }
            }
        }
        out
    }

    fn read_snapshot(&self) -> Snapshot {
        Snapshot {
            revoked: self
                .authority
                .as_ref()
                .map(|a| a.revoked())
                .unwrap_or_default(),
            drained: self.read_drains(),
        }
    }

    fn write_drain(&self, name: &NodeName, drain: Option<&DrainRecord>) -> Result<(), FleetError> {
        let Some(dir) = self.drains_dir() else {
            let mut m = self.memory_drains.lock().unwrap_or_else(|p| p.into_inner());
            match drain {
                Some(d) => m.insert(name.clone(), d.clone()),
                None => m.remove(name),
            };
            return Ok(());
        };
        let path = dir.join(format!("{name}.json"));
        match drain {
            Some(d) => {
                files::private_dir(&dir).map_err(crate::state::StateError::from)?;
                let json = serde_json::to_vec_pretty(d)
                    .map_err(|e| FleetError::Internal(e.to_string()))?;
                files::write(&path, &json, true).map_err(crate::state::StateError::from)?;
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(FleetError::Internal(format!(
                        "cannot remove {}: {e}",
                        path.display()
                    )))
                }
            },
        }
        Ok(())
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FleetError> + Send + 'static,
) -> Result<T, FleetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))?
}

impl FleetState for Embedded {
    fn describe(&self) -> String {
        match &self.state {
            Some(s) => format!("state directory {}", s.root().display()),
            None => "memory".into(),
        }
    }

    fn connected(&self) -> Option<bool> {
        None
    }

    fn runs_authority(&self) -> bool {
        self.authority.is_some()
    }

    fn keeps_identities(&self) -> bool {
        self.authority.is_some()
    }

    fn create_ticket(&self, spec: TicketSpec) -> Fut<'_, Result<Ticket, FleetError>> {
        let authority = self.authority.clone();
        Box::pin(async move {
            let a = authority.ok_or(FleetError::NoAuthority)?;
            blocking(move || Ok(a.create_ticket(spec)?)).await
        })
    }

    fn enroll(&self, req: EnrollRequest) -> Fut<'_, EnrollResponse> {
        let authority = self.authority.clone();
        Box::pin(async move {
            let Some(a) = authority else {
                return EnrollResponse::Refused {
                    reason: EnrollRefusal::NotAuthority,
                };
            };
            tokio::task::spawn_blocking(move || a.enroll(&req))
                .await
                .unwrap_or(EnrollResponse::Refused {
                    reason: EnrollRefusal::Unavailable,
                })
        })
    }

    fn renew(
        &self,
        name: NodeName,
        attrs: Attributes,
        csr_pem: String,
    ) -> Fut<'_, Result<String, Refusal>> {
        let authority = self.authority.clone();
        Box::pin(async move {
            let a = authority.ok_or(Refusal::NoAuthority)?;
            tokio::task::spawn_blocking(move || a.renew(&name, &attrs, &csr_pem))
                .await
                .map_err(|_| Refusal::Internal)?
        })
    }

    fn issue_hostname(
        &self,
        name: NodeName,
        hostname: String,
        csr_pem: String,
        valid_for: std::time::Duration,
    ) -> Fut<'_, Result<String, Refusal>> {
        let authority = self.authority.clone();
        Box::pin(async move {
            let a = authority.ok_or(Refusal::NoAuthority)?;
            tokio::task::spawn_blocking(move || {
                a.issue_hostname(&name, &hostname, &csr_pem, valid_for)
            })
            .await
            .map_err(|_| Refusal::Internal)?
        })
    }

    fn tickets(&self) -> Fut<'_, Result<Vec<TicketRecord>, FleetError>> {
        let authority = self.authority.clone();
        Box::pin(async move {
            match authority {
                Some(a) => blocking(move || Ok(a.tickets())).await,
                None => Ok(Vec::new()),
            }
        })
    }

    fn identities(&self) -> Fut<'_, Result<Vec<IdentityRecord>, FleetError>> {
        let authority = self.authority.clone();
        Box::pin(async move {
            match authority {
                Some(a) => blocking(move || Ok(a.identities())).await,
                None => Ok(Vec::new()),
            }
        })
    }

    fn revoke(&self, name: NodeName) -> Fut<'_, Result<bool, FleetError>> {
        let authority = self.authority.clone();
        Box::pin(async move {
            let a = authority.ok_or(FleetError::NoAuthority)?;
            blocking(move || Ok(a.revoke(&name)?)).await
        })
    }

    fn set_drain(
        &self,
        name: NodeName,
        drain: Option<DrainRecord>,
    ) -> Fut<'_, Result<(), FleetError>> {
        // Small files: written in place rather than sent to another thread, so the drain is
        // recorded before the admin API answers.
        Box::pin(async move { self.write_drain(&name, drain.as_ref()) })
    }

    fn snapshot(&self) -> Fut<'_, Result<Snapshot, FleetError>> {
        Box::pin(async move { Ok(self.read_snapshot()) })
    }

    fn follow(
        self: Arc<Self>,
        tx: watch::Sender<Snapshot>,
        shutdown: CancellationToken,
    ) -> Fut<'static, ()> {
        Box::pin(async move {
            if self.state.is_none() {
                return;
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                let me = self.clone();
                let Ok(now) = tokio::task::spawn_blocking(move || me.read_snapshot()).await else {
                    continue;
                };
                tx.send_if_modified(|s| {
                    let changed = *s != now;
                    *s = now;
                    changed
                });
            }
        })
    }

    fn serve_membership(
        self: Arc<Self>,
        _me: Member,
        _load: LoadFn,
        _shutdown: CancellationToken,
    ) -> Fut<'static, ()> {
        Box::pin(async {})
    }

    fn members(&self) -> Fut<'_, Result<Vec<Member>, FleetError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn set_presence(
        &self,
        _outlet: NodeName,
        _services: Vec<ServiceName>,
    ) -> Fut<'_, Result<(), FleetError>> {
        Box::pin(async { Ok(()) })
    }

    fn presence(&self) -> Fut<'_, Result<Vec<Presence>, FleetError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn follow_fleet(
        self: Arc<Self>,
        _tx: watch::Sender<FleetView>,
        _shutdown: CancellationToken,
    ) -> Fut<'static, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_in_the_state_directory_outlive_the_relay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        let name: NodeName = "outlet-a".parse().expect("name");
        let drain = DrainRecord {
            services: vec!["echo".parse().expect("service")],
            drained_at_ms: 1,
            timeout_ms: 500,
        };
        let first = Embedded::new(None, Some(state.clone()));
        first
            .set_drain(name.clone(), Some(drain.clone()))
            .await
            .expect("drain");
        // A relay started later from the same directory.
        let again = Embedded::new(None, Some(state.clone()));
        let snap = again.snapshot().await.expect("snapshot");
        assert_eq!(snap.drained.get(&name), Some(&drain));
        again.set_drain(name.clone(), None).await.expect("undrain");
        let snap = Embedded::new(None, Some(state))
            .snapshot()
            .await
            .expect("snapshot");
        assert!(snap.drained.is_empty(), "{snap:?}");
    }

    #[tokio::test]
    async fn without_a_state_directory_drains_live_in_memory_and_nothing_is_followed() {
        let e = Arc::new(Embedded::new(None, None));
        let name: NodeName = "n".parse().expect("name");
        let drain = DrainRecord {
            services: vec![],
            drained_at_ms: 1,
            timeout_ms: 0,
        };
        e.set_drain(name.clone(), Some(drain)).await.expect("drain");
        assert!(e
            .snapshot()
            .await
            .expect("snap")
            .drained
            .contains_key(&name));
        assert!(!e.keeps_identities() && !e.runs_authority());
        let (tx, _rx) = watch::channel(Snapshot::default());
        // Returns at once: there is nothing to follow.
        tokio::time::timeout(
            Duration::from_secs(5),
            e.clone().follow(tx, CancellationToken::new()),
        )
        .await
        .expect("follow returns");
    }
}
