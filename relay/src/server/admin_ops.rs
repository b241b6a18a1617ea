//! What the admin API reads from and does to a running relay: views of its nodes, services,
//! routes, tickets and identities, revoking an identity and draining a node. A child of the
//! server module so it can reach the relay's shared state ([`super::shared`]) without widening
//! its visibility.

use super::revoke::apply_revocation;
use super::shared::{forget_node, AdminStats, Drain, RelayHandle, Shared};
use crate::registry::NodeId;
use crate::views::{
    Draining, IdentityView, NodeView, Revoked, RouteView, ServiceView, TicketView, Undrained,
};
use postern_proto::name::{NodeName, ServiceName};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why an admin action could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminOpError {
    #[error("no node named {0} is connected")]
    NotConnected(NodeName),
    #[error("no identity named {0} is enrolled here or connected")]
    UnknownIdentity(NodeName),
    #[error("cannot record the revocation of {name}: {message}")]
    Persist { name: NodeName, message: String },
    /// The shared state could not be read or changed (etcd down, say); nothing was done.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// SHA-256 of the peer's certificate.
fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs
        .first()
        .map(|c| postern_proto::pki::fingerprint(c.as_ref()))
}

impl RelayHandle {
    /// The admin API's counters.
    pub fn admin_stats(&self) -> &AdminStats {
        &self.shared.admin.stats
    }

    /// Nodes with a live control connection, by name.
    pub fn node_views(&self) -> Vec<NodeView> {
        let shared = &self.shared;
        let conns: Vec<(NodeId, quinn::Connection)> = shared
            .conns()
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        let since = shared.admin.connected_at_map().clone();
        let now = SystemTime::now();
        let mut out = Vec::new();
        {
            let reg = shared.registry();
            for (id, conn) in conns {
                let Some(name) = reg.name(id).cloned() else {
                    continue;
                };
                let attributes = reg.attrs(id);
                let at = since.get(&id).copied().unwrap_or(now);
                out.push(NodeView {
                    role: attributes.get("role").cloned(),
                    attributes,
                    fingerprint: peer_fingerprint(&conn),
                    remote_addr: conn.remote_address(),
                    connected_at_ms: unix_ms(at),
                    connected_for_s: now.duration_since(at).unwrap_or_default().as_secs(),
                    services: reg.services_of(id),
                    routes: reg.routes_of(id),
                    drained: false,
                    name,
                });
            }
        }
        for n in &mut out {
            n.drained = shared.admin.is_drained(&n.name);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Services ever registered and their live outlets.
    pub fn service_views(&self) -> Vec<ServiceView> {
        let health: std::collections::HashMap<_, _> = self.service_health().into_iter().collect();
        self.services()
            .into_iter()
            .map(|(name, outlets)| {
                let health = health
                    .get(&name)
                    .map(|list| {
                        list.iter()
                            .map(|(outlet, why)| crate::views::OutletHealthView {
                                outlet: outlet.clone(),
                                healthy: why.is_none(),
                                reason: why.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                ServiceView {
                    name,
                    outlets,
                    health,
                }
            })
            .collect()
    }

    /// Routes with their ends and traffic.
    pub fn route_views(&self) -> Vec<RouteView> {
        let shared = &self.shared;
        let reg = shared.registry();
        reg.routes()
            .into_iter()
            .filter_map(|(id, info)| {
                let inlet = reg.name(info.inlet)?.clone();
                let outlet = reg.name(info.outlet)?.clone();
                let fwd = shared.routes.get(id)?;
                let bytes = fwd.bytes.load(Relaxed);
                let from_inlet = fwd.bytes_from_a.load(Relaxed).min(bytes);
                Some(RouteView {
                    id: id.to_string(),
                    service: info.service,
                    inlet,
                    outlet,
                    bytes_from_inlet: from_inlet,
                    bytes_from_outlet: bytes - from_inlet,
                    packets: fwd.packets.load(Relaxed),
                    age_s: fwd.opened.elapsed().as_secs(),
                    direct: reg.route_is_direct(id),
                })
            })
            .collect()
    }

    /// The fleet: its relays with their load, where outlets are attached, the connection to
    /// etcd. Never fails: when etcd cannot list the relays the view says why and keeps the
    /// rest, since that is when an operator looks.
    pub async fn fleet_view(&self) -> crate::views::FleetView {
        use crate::fleet::view::{fleet_view, Attachments};
        let shared = &self.shared;
        let mut me = shared
            .me
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| crate::fleet::Member {
                name: "this-relay".into(),
                addresses: Vec::new(),
                load: Default::default(),
                updated_at_ms: 0,
            });
        me.load = crate::fleet::Load {
            nodes: shared.conns().len() as u64,
            routes: shared.routes.len() as u64,
        };
        me.updated_at_ms = crate::authority::now_ms();
        let attachments = self.local_attachments(&me.name);
        fleet_view(
            shared.fleet().as_ref(),
            Some(&me),
            Attachments::ThisRelay(attachments),
        )
        .await
    }

    /// The outlets connected here (nodes serving at least one service), attached to `me`.
    /// With a cluster, the fleet's presence records replace this when etcd answers.
    fn local_attachments(&self, me: &str) -> Vec<crate::views::AttachmentView> {
        crate::fleet::view::group_attachments(
            self.node_views()
                .into_iter()
                .filter(|n| !n.services.is_empty())
                .map(|n| (n.name, me.to_owned(), n.services)),
        )
    }

    /// Enrollment tickets without their secrets; `None` when this relay does not run the
    /// authority.
    pub async fn ticket_views(&self) -> Result<Option<Vec<TicketView>>, AdminOpError> {
        let fleet = self.shared.fleet();
        if !fleet.runs_authority() {
            return Ok(None);
        }
        let now = crate::authority::now_ms();
        let mut out: Vec<TicketView> = fleet
            .tickets()
            .await?
            .into_iter()
            .map(|t| TicketView {
                status: if t.uses_left == 0 {
                    "used"
                } else if now >= t.expires_at_ms {
                    "expired"
                } else {
                    "valid"
                }
                .into(),
                id: t.id,
                attributes: t.attrs,
                name: t.name,
                created_at_ms: t.created_at_ms,
                expires_at_ms: t.expires_at_ms,
                uses_left: t.uses_left,
                used_by: t.used_by,
            })
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(Some(out))
    }

    /// Enrolled identities (where they are recorded) and every revoked name, and whether each
    /// is connected; the flag says whether this relay runs the authority.
    pub async fn identity_views(&self) -> Result<(bool, Vec<IdentityView>), AdminOpError> {
        let shared = &self.shared;
        let fleet = shared.fleet();
        let mut by_name: BTreeMap<NodeName, IdentityView> = BTreeMap::new();
        for i in fleet.identities().await? {
            by_name.insert(
                i.name.clone(),
                IdentityView {
                    name: i.name,
                    attributes: i.attrs,
                    enrolled_at_ms: (i.enrolled_at_ms > 0).then_some(i.enrolled_at_ms),
                    revoked: i.revoked,
                    connected: false,
                },
            );
        }
        for name in shared.revoked().iter() {
            by_name
                .entry(name.clone())
                .or_insert_with(|| IdentityView {
                    name: name.clone(),
                    attributes: Default::default(),
                    enrolled_at_ms: None,
                    revoked: true,
                    connected: false,
                })
                .revoked = true;
        }
        {
            let reg = shared.registry();
            for (name, view) in by_name.iter_mut() {
                view.connected = reg.by_name(name).is_some();
            }
        }
        Ok((fleet.runs_authority(), by_name.into_values().collect()))
    }

    /// Revokes `name`: recorded by the authority when this relay runs it, and applied at once
    /// (the node's control connection and routes are dropped, outlets close its end-to-end
    /// connections, reconnections are refused). A name that is neither enrolled here, nor
    /// connected, nor already revoked is unknown.
    pub async fn revoke_identity(&self, name: &NodeName) -> Result<Revoked, AdminOpError> {
        let shared = self.shared.clone();
        let connected = shared.registry().by_name(name).is_some();
        let already = shared.revoked().contains(name);
        let fleet = shared.fleet();
        let persisted = if fleet.keeps_identities() {
            let enrolled = fleet.identities().await?.iter().any(|i| &i.name == name);
            if !(enrolled || connected || already) {
                return Err(AdminOpError::UnknownIdentity(name.clone()));
            }
            fleet.revoke(name.clone()).await.map_err(|e| match e {
                e @ crate::fleet::FleetError::Etcd(_) => AdminOpError::Fleet(e),
                e => AdminOpError::Persist {
                    name: name.clone(),
                    message: e.to_string(),
                },
            })?;
            true
        } else if connected || already {
            false
        } else {
            return Err(AdminOpError::UnknownIdentity(name.clone()));
        };
        if !already {
            shared.admin.stats.revocations.fetch_add(1, Relaxed);
        }
        // The fleet follower may have applied it already, from the record just made.
        if shared.revoked().insert(name.clone()) {
            apply_revocation(&shared, name);
        }
        if !persisted {
            tracing::warn!(node = %name, "revoked in memory only: this relay does not run the authority, so revoke there too or the node is let back in after a restart");
        }
        Ok(Revoked {
            revoked: name.clone(),
            persisted,
            was_connected: connected,
        })
    }

    /// Drains the connected node `name`: it gets no new routes (as an outlet it leaves its
    /// services' rotation, as an inlet its route requests are refused), its routes keep
    /// forwarding until they are gone or `timeout` passes, then its control connection is
    /// closed with code `DRAINED`; reconnections are refused until [`undrain_node`]. The drain
    /// is recorded in the fleet's state first (so it outlives a restart, and in a fleet every
    /// relay applies it); when that fails nothing is drained.
    ///
    /// [`undrain_node`]: RelayHandle::undrain_node
    pub async fn drain_node(
        &self,
        name: &NodeName,
        timeout: Duration,
    ) -> Result<Draining, AdminOpError> {
        let shared = &self.shared;
        let Some(id) = shared.registry().by_name(name) else {
            return Err(AdminOpError::NotConnected(name.clone()));
        };
        let services = match shared.admin.drained().get(name) {
            Some(d) => d.services.clone(),
            None => shared.registry().services_of(id),
        };
        let record = crate::fleet::DrainRecord {
            services,
            drained_at_ms: crate::authority::now_ms(),
            timeout_ms: timeout.as_millis() as u64,
        };
        shared
            .fleet()
            .set_drain(name.clone(), Some(record.clone()))
            .await?;
        let (open_routes, services) = apply_drain(shared, name, record.services, timeout);
        Ok(Draining {
            draining: name.clone(),
            services,
            open_routes,
            timeout_ms: timeout.as_millis() as u64,
        })
    }

    /// Lets a drained node back in: it may reconnect, and if it is still connected it serves
    /// its services again. The end of the drain is recorded in the fleet's state first.
    pub async fn undrain_node(&self, name: &NodeName) -> Result<Undrained, AdminOpError> {
        self.shared.fleet().set_drain(name.clone(), None).await?;
        Ok(Undrained {
            undrained: name.clone(),
            was_drained: undrain_local(&self.shared, name),
        })
    }
}

/// Drains `name` on this relay (see [`RelayHandle::drain_node`]), whether the drain was made
/// here or read from the fleet's state; returns its open routes and the services it served.
pub(super) fn apply_drain(
    shared: &Arc<Shared>,
    name: &NodeName,
    services: Vec<ServiceName>,
    timeout: Duration,
) -> (usize, Vec<ServiceName>) {
    let id = shared.registry().by_name(name);
    let (newly, services) = {
        let mut drained = shared.admin.drained();
        let newly = drained.get(name).is_none_or(|d| d.id != id);
        let services = match drained.get(name) {
            Some(d) if !newly => d.services.clone(),
            _ => services,
        };
        if newly {
            drained.insert(
                name.clone(),
                Drain {
                    id,
                    services: services.clone(),
                },
            );
        }
        (newly, services)
    };
    let Some(id) = id else {
        if newly {
            tracing::info!(target: "postern::audit", event = "drain", node = %name, routes = 0, ?services, "node drained");
        }
        return (0, services);
    };
    let open_routes = {
        let mut reg = shared.registry();
        reg.register(id, &[]);
        reg.routes_of(id)
    };
    if newly {
        shared.admin.stats.drains.fetch_add(1, Relaxed);
        tracing::info!(target: "postern::audit", event = "drain", node = %name, routes = open_routes, ?services, "node drained");
        tokio::spawn(close_when_drained(
            shared.clone(),
            id,
            name.clone(),
            timeout,
        ));
    }
    (open_routes, services)
}

/// Ends `name`'s drain on this relay; whether it was drained.
pub(super) fn undrain_local(shared: &Arc<Shared>, name: &NodeName) -> bool {
    let Some(drain) = shared.admin.drained().remove(name) else {
        return false;
    };
    {
        let mut reg = shared.registry();
        if let Some(id) = drain.id.filter(|id| reg.by_name(name) == Some(*id)) {
            let mut services = reg.services_of(id);
            services.extend(drain.services);
            services.sort();
            services.dedup();
            reg.register(id, &services);
        }
    }
    tracing::info!(target: "postern::audit", event = "undrain", node = %name, "node let back in");
    true
}

/// Closes a drained node's control connection once its routes are gone or `timeout` passed
/// (unless it was let back in meanwhile or left by itself).
async fn close_when_drained(shared: Arc<Shared>, id: NodeId, name: NodeName, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let left = loop {
        let still_drained = shared
            .admin
            .drained()
            .get(&name)
            .is_some_and(|d| d.id == Some(id));
        if !still_drained || shared.conn(id).is_none() {
            return;
        }
        let left = shared.registry().routes_of(id);
        if left == 0 || tokio::time::Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(c) = shared.conn(id) {
        c.close(
            postern_proto::msg::code::DRAINED.into(),
            b"node drained by the relay operator",
        );
    }
    forget_node(&shared, id);
    if left > 0 {
        tracing::info!(node = %name, routes_closed = left, "drain timeout passed: closed the drained node with its routes");
    } else {
        tracing::info!(node = %name, "drained node has no route left: closed it");
    }
}
