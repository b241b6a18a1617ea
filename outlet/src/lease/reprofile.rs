//! Lease profiles changed by a reload (`SIGHUP`): new leases use the new profiles at once, and
//! every live lease — streamed to a subscribed client, or handed out — is checked again with
//! the attributes that chose its profile. A lease whose client now selects a profile of the
//! same name, permissions and lifetime keeps going untouched. Any other is revoked through the
//! normal path (the credential is removed from InfluxDB; the audit log says
//! `reason = "profile_changed"`): a subscribed client then gets a lease of its new profile
//! streamed at once, or, when no profile matches it any more, its subscription ends and its
//! next request is refused as for any client without a profile.

use super::error::LeaseError;
use super::manager::LeaseManager;
use super::profile::{select, Profile};
use super::shared::{lock, Chosen};
use postern_proto::name::NodeName;
use postern_proto::policy::Attributes;
use std::sync::Arc;

/// What putting new profiles in force did to the live leases.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reprofiled {
    /// Leases left as they were: their client's profile kept its terms.
    pub kept: usize,
    /// Leases revoked because their client's profile changed or no profile matches it.
    pub revoked: usize,
    /// Revocations that failed now: they stay recorded and the schedule retries them.
    pub failed: usize,
    /// Subscribed clients that no profile matches any more.
    pub refused: Vec<NodeName>,
}

/// The audit log's reason for a lease revoked by a profile reload.
pub const PROFILE_CHANGED: &str = "profile_changed";

impl LeaseManager {
    /// Puts `profiles` (validated as at start: see
    /// [`InfluxdbOutletConfig::validate`](super::InfluxdbOutletConfig::validate)) in force and
    /// checks every live lease against them (see the module docs).
    pub async fn set_profiles(&self, profiles: Vec<Arc<Profile>>) -> Reprofiled {
        let inner = &self.inner;
        let mut out = Reprofiled::default();
        let mut revoke: Vec<(String, NodeName)> = Vec::new();
        {
            let mut guard = lock(&inner.state);
            let st = &mut *guard;
            st.profiles = profiles.clone();
            st.profiles_generation += 1;
            let subscribed: Vec<(NodeName, Chosen)> = st
                .client_profiles
                .iter()
                .map(|(c, p)| (c.clone(), p.clone()))
                .collect();
            for (client, chosen) in subscribed {
                // The current lease and any still in its grace after a renewal.
                let streamed: Vec<String> = st
                    .schedule
                    .current(&client)
                    .map(str::to_owned)
                    .into_iter()
                    .chain(
                        st.superseded
                            .iter()
                            .filter(|(_, c)| **c == client)
                            .map(|(id, _)| id.clone()),
                    )
                    .collect();
                match choose(&profiles, &client, &chosen.attrs) {
                    Some(p) if p.same_terms(&chosen.profile) => {
                        out.kept += streamed.len();
                        st.client_profiles.insert(
                            client,
                            Chosen {
                                profile: p,
                                attrs: chosen.attrs,
                            },
                        );
                    }
                    Some(p) => {
                        tracing::info!(
                            %client, from = %chosen.profile.name, to = %p.name,
                            "lease profile changed by the reload: the client's lease is replaced"
                        );
                        st.client_profiles.insert(
                            client.clone(),
                            Chosen {
                                profile: p,
                                attrs: chosen.attrs,
                            },
                        );
                        revoke.extend(streamed.into_iter().map(|id| (id, client.clone())));
                    }
                    None => {
                        tracing::warn!(
                            %client, from = %chosen.profile.name,
                            "no lease profile matches this identity after the reload: its lease \
                             is revoked and it gets no new one"
                        );
                        tracing::info!(target: "postern::audit", event = "lease", action = "refuse", reason = "no_profile", %client);
                        st.client_profiles.remove(&client);
                        st.schedule.set_wanted(&client, false);
                        // Subscribers see `None`, then the channel close.
                        if let Some(tx) = st.watchers.remove(&client) {
                            tx.send_replace(None);
                        }
                        revoke.extend(streamed.into_iter().map(|id| (id, client.clone())));
                        out.refused.push(client);
                    }
                }
            }
            for (client, h) in &st.handed_out {
                // Handed out only while the profile says so.
                let keep = choose(&profiles, client, &h.attrs)
                    .is_some_and(|p| p.hand_out && p.same_terms(&h.profile));
                if keep {
                    out.kept += 1;
                } else {
                    revoke.push((h.grant.lease_id.clone(), client.clone()));
                }
            }
        }
        for (lease_id, client) in revoke {
            match inner.revoke_now(&lease_id, Some(PROFILE_CHANGED)).await {
                Ok(_) => out.revoked += 1,
                // Being revoked already, or gone meanwhile.
                Err(LeaseError::Busy(_) | LeaseError::NotFound(_)) => {}
                Err(e) => {
                    out.failed += 1;
                    tracing::error!(%lease_id, %client, error = %e, "could not revoke a lease whose profile changed; retrying");
                }
            }
        }
        inner.wake.notify_one();
        let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
        tracing::info!(
            profiles = ?names, kept = out.kept, revoked = out.revoked, failed = out.failed,
            refused = out.refused.len(), "lease profiles reloaded"
        );
        out
    }
}

/// The profile `client` with `attrs` selects (its name added as `name`), without the logging
/// of [`LeaseManager::profile_for`].
fn choose(
    profiles: &[Arc<Profile>],
    client: &NodeName,
    attrs: &Attributes,
) -> Option<Arc<Profile>> {
    let mut all = attrs.clone();
    all.insert("name".into(), client.to_string());
    select(profiles, &all).cloned()
}
