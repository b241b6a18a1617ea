//! The lease manager's public face: [`LeaseManager`] (start, subscribe, check, and the admin
//! calls), the options it starts with, the view of a lease it shows, and the choice of
//! backend by API version.

use super::backend::{Backend, BackendError};
use super::config::{Api, LeaseConfig};
use super::error::LeaseError;
use super::fault::{CrashAt, Faults};
use super::live::LiveCredentials;
use super::profile::{select, Profile};
use super::schedule::{Policy, Schedule};
use super::shared::{lock, Chosen, HandedOut, Inner, State};
use super::store::{LeaseRecord, LeaseStore};
use super::v1::V1Backend;
use super::v2::V2Backend;
use postern_net::runtime::clock::now_ms;
use postern_proto::lease::LeaseGrant;
use postern_proto::name::NodeName;
use postern_proto::policy::Attributes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

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
    /// The lease profile it was made with (none for leases made before profiles).
    #[serde(default)]
    pub profile: Option<String>,
    /// It was handed out to its client (`postern-inlet lease create`).
    #[serde(default)]
    pub handed_out: bool,
}

/// A lease handed out to its own client, with the profile it was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOut {
    pub grant: LeaseGrant,
    pub profile: String,
}

/// The lease manager. Cheap to share (`Arc`); all methods take `&self`.
pub struct LeaseManager {
    pub(super) inner: Arc<Inner>,
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
            None => from_config(&config, &instance)?,
        };
        backend.check().await?;
        let policy = Policy::new(config.ttl);
        let profiles = config.profiles();
        let inner = Arc::new(Inner {
            backend,
            store: Mutex::new(Some(store)),
            instance,
            state: Mutex::new(State {
                profiles: profiles.clone(),
                profiles_generation: 0,
                schedule: Schedule::new(policy),
                watchers: BTreeMap::new(),
                live: LiveCredentials::default(),
                orphan_scan_at: None,
                orphan_scan_failures: 0,
                orphan_scan_running: false,
                unrevoked_at_shutdown: 0,
                store_health: Default::default(),
                client_profiles: BTreeMap::new(),
                handed_out: BTreeMap::new(),
                superseded: BTreeMap::new(),
            }),
            wake: Notify::new(),
            shutdown: shutdown.child_token(),
            stopped: CancellationToken::new(),
            faults: Faults::new(options.crash_at),
            revoked_clients: Mutex::default(),
        });
        if let Err(e) = inner.reconcile_at_start().await {
            inner.close_store().await;
            inner.stopped.cancel();
            return Err(e);
        }
        let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
        tracing::info!(
            instance = %inner.instance,
            ttl_s = config.ttl.as_secs(),
            api = ?config.api,
            profiles = ?names,
            "lease manager started"
        );
        tokio::spawn(inner.clone().run());
        Ok(Arc::new(LeaseManager { inner }))
    }

    /// This outlet's instance id, part of every credential's marker.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    /// Subscribes to `client`'s lease, made with the profile its name alone selects (see
    /// [`subscribe_as`](Self::subscribe_as)).
    pub fn subscribe(
        &self,
        client: &NodeName,
    ) -> Result<watch::Receiver<Option<LeaseGrant>>, LeaseError> {
        self.subscribe_as(client, &Attributes::new())
    }

    /// Subscribes to `client`'s lease, made with the first profile whose `when` holds for
    /// `attrs` (the client's certificate attributes; its name is added as `name`). The
    /// receiver holds `None` until the first lease is made, then each new grant; `None` again
    /// if the lease expired without a successor (the backend failing). Read the current value
    /// with `borrow()` first: a receiver made while a lease is current sees it as already seen.
    /// The channel closes (`changed()` fails) when the manager stops, after a last `None`.
    /// A client that matches no profile is refused ([`LeaseError::NoProfile`]).
    pub fn subscribe_as(
        &self,
        client: &NodeName,
        attrs: &Attributes,
    ) -> Result<watch::Receiver<Option<LeaseGrant>>, LeaseError> {
        self.inner.check_open()?;
        self.inner.check_not_revoked(client)?;
        let profile = self.profile_for(client, attrs)?;
        let rx = {
            let mut st = lock(&self.inner.state);
            st.client_profiles.insert(
                client.clone(),
                Chosen {
                    profile,
                    attrs: attrs.clone(),
                },
            );
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

    /// The profile `client` with `attrs` gets, or [`LeaseError::NoProfile`], logged with the
    /// identity so that an operator sees who was turned away.
    pub fn profile_for(
        &self,
        client: &NodeName,
        attrs: &Attributes,
    ) -> Result<Arc<Profile>, LeaseError> {
        let mut all = attrs.clone();
        all.insert("name".into(), client.to_string());
        let profiles = lock(&self.inner.state).profiles.clone();
        match select(&profiles, &all) {
            Some(p) => Ok(p.clone()),
            None => {
                tracing::warn!(
                    %client, attributes = ?attrs,
                    "no lease profile matched this identity: it gets no lease"
                );
                tracing::info!(target: "postern::audit", event = "lease", action = "refuse", reason = "no_profile", %client);
                Err(LeaseError::NoProfile(client.clone()))
            }
        }
    }

    /// Hands `client` its own credential (`postern-inlet lease create|show`): with `fresh`, a
    /// new lease of its profile (not streamed, not renewed, revoked at expiry like any other);
    /// without, the one last handed out if it is still live. Refused unless the profile says
    /// `hand-out = true`. Every hand-out is in the audit log, without the secret.
    pub async fn hand_out(
        &self,
        client: &NodeName,
        attrs: &Attributes,
        fresh: bool,
    ) -> Result<HandOut, LeaseError> {
        self.inner.check_open()?;
        self.inner.check_not_revoked(client)?;
        let profile = self.profile_for(client, attrs)?;
        if !profile.hand_out {
            tracing::warn!(%client, profile = %profile.name, "hand-out refused: the profile does not hand credentials out");
            tracing::info!(target: "postern::audit", event = "lease", action = "hand_out", outcome = "refused", %client, profile = %profile.name);
            return Err(LeaseError::HandOutOff {
                client: client.clone(),
                profile: profile.name.clone(),
            });
        }
        if !fresh {
            let kept = lock(&self.inner.state)
                .handed_out
                .get(client)
                .map(|h| h.grant.clone());
            return match kept.filter(|g| g.expires_at_ms > now_ms()) {
                Some(grant) => {
                    tracing::info!(target: "postern::audit", event = "lease", action = "hand_out", via = "show", lease_id = %grant.lease_id, %client, profile = %profile.name);
                    Ok(HandOut {
                        grant,
                        profile: profile.name.clone(),
                    })
                }
                None => Err(LeaseError::NoHandOut(client.clone())),
            };
        }
        let (rec, credential) = self
            .inner
            .create_lease(client, profile.clone(), true)
            .await?;
        let grant = LeaseGrant {
            lease_id: rec.lease_id.clone(),
            credential,
            expires_at_ms: rec.expires_at_ms,
        };
        {
            let mut st = lock(&self.inner.state);
            st.schedule.track(
                &rec.lease_id,
                &rec.client,
                rec.expires_at_ms,
                rec.expires_at_ms,
            );
            st.handed_out.insert(
                client.clone(),
                HandedOut {
                    grant: grant.clone(),
                    profile: profile.clone(),
                    attrs: attrs.clone(),
                },
            );
        }
        self.inner.wake.notify_one();
        tracing::info!(lease_id = %rec.lease_id, %client, profile = %profile.name, "lease handed out to its client");
        tracing::info!(target: "postern::audit", event = "lease", action = "hand_out", via = "create", lease_id = %rec.lease_id, %client, profile = %profile.name, expires_at_ms = rec.expires_at_ms);
        Ok(HandOut {
            grant,
            profile: profile.name.clone(),
        })
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
        self.create_as(client, &Attributes::new()).await
    }

    /// [`create`](Self::create) with the profile `attrs` select (as for
    /// [`subscribe_as`](Self::subscribe_as)).
    pub async fn create_as(
        &self,
        client: &NodeName,
        attrs: &Attributes,
    ) -> Result<LeaseGrant, LeaseError> {
        self.inner.check_open()?;
        self.inner.check_not_revoked(client)?;
        let profile = self.profile_for(client, attrs)?;
        let (rec, credential) = self.inner.create_lease(client, profile, false).await?;
        lock(&self.inner.state).schedule.track(
            &rec.lease_id,
            &rec.client,
            rec.expires_at_ms,
            rec.expires_at_ms,
        );
        self.inner.wake.notify_one();
        tracing::info!(lease_id = %rec.lease_id, client = %client, "lease created on request");
        tracing::info!(target: "postern::audit", event = "lease", action = "create", via = "admin", lease_id = %rec.lease_id, client = %client, profile = ?rec.profile, expires_at_ms = rec.expires_at_ms);
        Ok(LeaseGrant {
            lease_id: rec.lease_id,
            credential,
            expires_at_ms: rec.expires_at_ms,
        })
    }

    /// Every lease in the store.
    pub async fn list(&self) -> Result<Vec<LeaseInfo>, LeaseError> {
        self.inner.check_open()?;
        let records = self.inner.store_op("list", |s| s.all()).await?;
        let st = lock(&self.inner.state);
        Ok(records.into_iter().map(|r| info(&st.schedule, r)).collect())
    }

    /// One lease.
    pub async fn show(&self, lease_id: &str) -> Result<LeaseInfo, LeaseError> {
        self.inner.check_open()?;
        let id = lease_id.to_owned();
        let rec = self.inner.store_op("get", move |s| s.get(&id)).await?;
        let rec = rec.ok_or_else(|| LeaseError::NotFound(lease_id.to_owned()))?;
        let st = lock(&self.inner.state);
        Ok(info(&st.schedule, rec))
    }

    /// Revokes a lease now. If it is streamed to a client, the client's subscribers see `None`
    /// and, while still subscribed, get a new lease right away.
    pub async fn revoke(&self, lease_id: &str) -> Result<(), LeaseError> {
        self.inner.check_open()?;
        let rec = self.inner.revoke_now(lease_id, None).await?;
        tracing::info!(lease_id, client = %rec.client, "lease revoked on request");
        Ok(())
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
        let records = self.inner.store_op("list", |s| s.all()).await?;
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

    /// Stops the manager: revokes every lease (see the module docs of [`crate::lease`]) and closes the store.
    /// Returns [`LeaseError::Unrevoked`] if some could not be revoked in time.
    pub async fn shutdown(&self) -> Result<(), LeaseError> {
        self.inner.shutdown.cancel();
        self.inner.stopped.cancelled().await;
        if self.inner.faults.crashed() {
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

    /// Whether the lease store can write. `Err` says why not: no lease can be made or revoked
    /// then (the store is being reopened with backoff), so the outlet's `/readyz` answers 503
    /// with it and inlets waiting for a lease are told it.
    pub fn store_ready(&self) -> Result<(), String> {
        match self.inner.store_problem() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// True once the manager crashed at an injected fault.
    pub fn is_crashed(&self) -> bool {
        self.inner.faults.crashed()
    }
}

/// The view of a record that `lease list` / `lease show` print.
pub(super) fn info(schedule: &Schedule, r: LeaseRecord) -> LeaseInfo {
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
        profile: r.profile,
        handed_out: r.handed_out,
    }
}

/// Builds the backend selected by `cfg.api`.
pub(super) fn from_config(
    cfg: &LeaseConfig,
    instance: &str,
) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(match cfg.api {
        Api::V2 => Arc::new(V2Backend::new(cfg, instance)?),
        Api::V1 => Arc::new(V1Backend::new(cfg, instance)?),
    })
}
