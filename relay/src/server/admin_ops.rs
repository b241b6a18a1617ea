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
use postern_proto::name::NodeName;
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
        self.services()
            .into_iter()
            .map(|(name, outlets)| ServiceView { name, outlets })
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
                })
            })
            .collect()
    }

    /// Enrollment tickets without their secrets; `None` when this relay does not run the
    /// authority. Reads the state directory: call it off the async threads.
    pub fn ticket_views(&self) -> Option<Vec<TicketView>> {
        let authority = self.shared.authority.as_ref()?;
        let now = crate::authority::now_ms();
        let mut out: Vec<TicketView> = authority
            .tickets()
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
        Some(out)
    }

    /// Enrolled identities (with the authority) and every revoked name, and whether each is
    /// connected; the flag says whether this relay runs the authority. Reads the state
    /// directory: call it off the async threads.
    pub fn identity_views(&self) -> (bool, Vec<IdentityView>) {
        let shared = &self.shared;
        let mut by_name: BTreeMap<NodeName, IdentityView> = BTreeMap::new();
        if let Some(authority) = &shared.authority {
            for i in authority.identities() {
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
        let reg = shared.registry();
        for (name, view) in by_name.iter_mut() {
            view.connected = reg.by_name(name).is_some();
        }
        (shared.authority.is_some(), by_name.into_values().collect())
    }

    /// Revokes `name`: recorded by the authority when this relay runs it, and applied at once
    /// (the node's control connection and routes are dropped, outlets close its end-to-end
    /// connections, reconnections are refused). A name that is neither enrolled here, nor
    /// connected, nor already revoked is unknown.
    pub async fn revoke_identity(&self, name: &NodeName) -> Result<Revoked, AdminOpError> {
        let shared = self.shared.clone();
        let connected = shared.registry().by_name(name).is_some();
        let already = shared.revoked().contains(name);
        let persisted = match shared.authority.clone() {
            Some(authority) => {
                let n = name.clone();
                let recorded = tokio::task::spawn_blocking(move || {
                    let enrolled = authority.identities().iter().any(|i| i.name == n);
                    if !(enrolled || connected || already) {
                        return Ok(None);
                    }
                    authority.revoke(&n).map(Some).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| AdminOpError::Persist {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
                match recorded {
                    Ok(Some(_)) => true,
                    Ok(None) => return Err(AdminOpError::UnknownIdentity(name.clone())),
                    Err(message) => {
                        return Err(AdminOpError::Persist {
                            name: name.clone(),
                            message,
                        })
                    }
                }
            }
            None if connected || already => false,
            None => return Err(AdminOpError::UnknownIdentity(name.clone())),
        };
        // The revocation watcher may have applied it already from the authority's files.
        if shared.revoked().insert(name.clone()) {
            shared.admin.stats.revocations.fetch_add(1, Relaxed);
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
    /// closed with code `DRAINED`; reconnections are refused until [`undrain_node`].
    ///
    /// [`undrain_node`]: RelayHandle::undrain_node
    pub fn drain_node(&self, name: &NodeName, timeout: Duration) -> Result<Draining, AdminOpError> {
        let shared = &self.shared;
        let Some(id) = shared.registry().by_name(name) else {
            return Err(AdminOpError::NotConnected(name.clone()));
        };
        let services = shared.registry().services_of(id);
        let newly = {
            let mut drained = shared.admin.drained();
            let newly = drained.get(name).is_none_or(|d| d.id != id);
            if newly {
                drained.insert(
                    name.clone(),
                    Drain {
                        id,
                        services: services.clone(),
                    },
                );
            }
            newly
        };
        let open_routes = {
            let mut reg = shared.registry();
            reg.register(id, &[]);
            reg.routes_of(id)
        };
        let services = match shared.admin.drained().get(name) {
            Some(d) => d.services.clone(),
            None => services,
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
        Ok(Draining {
            draining: name.clone(),
            services,
            open_routes,
            timeout_ms: timeout.as_millis() as u64,
        })
    }

    /// Lets a drained node back in: it may reconnect, and if it is still connected it serves
    /// its services again.
    pub fn undrain_node(&self, name: &NodeName) -> Undrained {
        let shared = &self.shared;
        let Some(drain) = shared.admin.drained().remove(name) else {
            return Undrained {
                undrained: name.clone(),
                was_drained: false,
            };
        };
        {
            let mut reg = shared.registry();
            if reg.by_name(name) == Some(drain.id) {
                let mut services = reg.services_of(drain.id);
                services.extend(drain.services);
                services.sort();
                services.dedup();
                reg.register(drain.id, &services);
            }
        }
        tracing::info!(target: "postern::audit", event = "undrain", node = %name, "node let back in");
        Undrained {
            undrained: name.clone(),
            was_drained: true,
        }
    }
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
            .is_some_and(|d| d.id == id);
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
