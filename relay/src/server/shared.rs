//! The state every server file works on: [`Shared`] (registry, control connections, route
//! table, counters, what the admin API adds), the [`RelayHandle`] that lets tests, metrics, the
//! admin API and the public ingress look at it, and [`forget_node`], which every way a node
//! leaves (disconnection, replacement, revocation, drain) ends in.
//!
//! It imports nothing else from the server, so every other server file can import it.

use crate::admission::AdmissionStats;
use crate::fleet::{FleetState, FleetView};
use crate::forward::tcp::TcpStats;
use crate::forward::udp::{ForwardStats, RouteTable};
use crate::policy::PolicySet;
use crate::registry::{NodeId, PublicRegistry, Registry};
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_net::transport::links::StreamLinks;
use postern_proto::msg::{Ctl, Refusal};
use postern_proto::name::{NodeName, ServiceName};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// Control-plane counters.
#[derive(Debug, Default)]
pub struct ControlStats {
    pub handshake_failures: AtomicU64,
    pub bad_messages: AtomicU64,
    pub routes_granted: AtomicU64,
    pub routes_refused: AtomicU64,
    /// Route requests answered with a redirect to the relays of the fleet holding an outlet.
    pub routes_redirected: AtomicU64,
    /// Live routes closed because a reloaded policy no longer allows them.
    pub routes_closed_by_policy: AtomicU64,
    pub nodes_connected: AtomicU64,
    /// Nodes enrolled by this relay's authority.
    pub enrollments: AtomicU64,
    /// Enrollment requests the authority refused.
    pub enrollments_refused: AtomicU64,
    /// Control requests answered with a refusal, by [`Refusal::label`].
    refusals: Mutex<BTreeMap<&'static str, u64>>,
}

impl ControlStats {
    /// Counts one control request refused for `reason`.
    pub fn refused(&self, reason: &Refusal) {
        let mut map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(reason.label()).or_default() += 1;
    }

    /// Refused control requests so far, by reason label (only reasons seen at least once).
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        let map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// The admin API's counters (see the relay's `/metrics`).
#[derive(Debug, Default)]
pub struct AdminStats {
    /// Requests answered with a 2xx.
    pub requests_ok: AtomicU64,
    /// Requests without the right token.
    pub requests_unauthorized: AtomicU64,
    /// Other refused or failed requests (404, 405, 400, 500).
    pub requests_failed: AtomicU64,
    /// Identities revoked through the API.
    pub revocations: AtomicU64,
    /// Nodes drained through the API.
    pub drains: AtomicU64,
}

/// Counters of the public ingress.
#[derive(Debug, Default)]
pub struct PublicStats {
    /// Connections forwarded to an outlet.
    pub forwarded: AtomicU64,
    /// Connections refused, all reasons.
    pub refused: AtomicU64,
    /// Refused because the name routes nowhere (or no name was sent).
    pub refused_unknown_name: AtomicU64,
    /// Closed at once because [`MAX_CONNECTIONS`](crate::public::MAX_CONNECTIONS) were open
    /// (and none was silent).
    pub refused_cap: AtomicU64,
    /// Connections whose ClientHello was not complete yet, closed to make room for a new one.
    pub evicted_pending: AtomicU64,
    /// Connections whose ClientHello was not complete yet, closed because their source opened
    /// more than [`MAX_PENDING_PER_SOURCE`](crate::public::MAX_PENDING_PER_SOURCE).
    pub evicted_source: AtomicU64,
    /// Connections closed because their ClientHello was not complete in time.
    pub preauth_timeout: AtomicU64,
}

/// What every task of one relay works on: who is connected, what they registered, the routes
/// the socket forwards, and the counters.
pub(super) struct Shared {
    /// The policy in force; swapped whole by a reload (see `RelayHandle::set_policy`).
    pub(super) policy: std::sync::RwLock<Arc<PolicySet>>,
    /// The state relays share (tickets, identities, drains), wherever it is kept.
    pub(super) fleet: Mutex<Arc<dyn FleetState>>,
    pub(super) revoked: Mutex<std::collections::BTreeSet<NodeName>>,
    pub(super) registry: Mutex<Registry>,
    pub(super) conns: Mutex<HashMap<NodeId, quinn::Connection>>,
    pub(super) routes: Arc<RouteTable>,
    pub(super) fwd: Arc<ForwardStats>,
    pub(super) ctl: ControlStats,
    pub(super) next_id: AtomicU64,
    /// The relay is serving (set by `run`).
    pub(super) listening: AtomicBool,
    /// Shutdown has begun: no new nodes or routes, existing routes keep forwarding.
    pub(super) draining: AtomicBool,
    /// What the admin API adds: connection times, drained nodes, its counters.
    pub(super) admin: AdminState,
    /// Services outlets offer at the public hostname ingress.
    pub(super) public: Mutex<PublicRegistry>,
    /// The public ingress' counters (zero without one).
    pub(super) public_stats: Arc<PublicStats>,
    /// Handshake admission counters.
    pub(super) admission: Arc<AdmissionStats>,
    /// TLS/TCP links whose node has not authenticated yet (marked once one does), and where
    /// each link comes from.
    pub(super) tcp_pending: Arc<crate::forward::tcp::PendingLinks>,
    /// Per service, the nodes refused a route to it for want of a live outlet: told
    /// (`OutletBack`) as soon as an outlet registers it, then forgotten.
    pub(super) waiting: Mutex<HashMap<ServiceName, std::collections::BTreeSet<NodeId>>>,
    /// How this relay registers in the fleet (its name and addresses), for the fleet view.
    pub(super) me: Mutex<Option<crate::fleet::Member>>,
    /// This relay's name in its fleet (none without a cluster).
    pub(super) member_name: Mutex<Option<String>>,
    /// The fleet as last seen (members, outlets' presence); empty without a cluster.
    pub(super) view: Mutex<Arc<FleetView>>,
    /// Woken when the outlets registered here change (their presence is written to the fleet).
    pub(super) presence_changed: tokio::sync::Notify,
    /// What outlets' public hostname certificates are signed for (none without an ingress).
    pub(super) public_certs: Mutex<Option<super::public_cert::PublicCerts>>,
}

impl Shared {
    /// The policy in force now.
    pub(super) fn policy(&self) -> Arc<PolicySet> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn fleet(&self) -> Arc<dyn FleetState> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn revoked(&self) -> MutexGuard<'_, std::collections::BTreeSet<NodeName>> {
        self.revoked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn conns(&self) -> MutexGuard<'_, HashMap<NodeId, quinn::Connection>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn conn(&self, id: NodeId) -> Option<quinn::Connection> {
        self.conns().get(&id).cloned()
    }

    pub(super) fn public(&self) -> MutexGuard<'_, PublicRegistry> {
        self.public.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn view(&self) -> Arc<FleetView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn set_view(&self, view: FleetView) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }

    pub(super) fn member_name(&self) -> Option<String> {
        self.member_name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<ServiceName, std::collections::BTreeSet<NodeId>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that node `id` was refused a route to `service` for want of a live outlet.
    pub(super) fn waits_for_outlet(&self, service: &ServiceName, id: NodeId) {
        note_waiting(&mut self.waiting(), service, id);
    }
}

/// Most service names the relay remembers nodes waiting for. A node may ask for any name the
/// policy lets through (a wildcard rule lets through all of them), so without a bound one
/// enrolled client could grow this map for as long as it stays connected. Past the bound a
/// waiting node is simply not told early: it retries on its own back-off, as before
/// `OutletBack` existed.
const MAX_WAITING_SERVICES: usize = 4096;

fn note_waiting(
    waiting: &mut HashMap<ServiceName, std::collections::BTreeSet<NodeId>>,
    service: &ServiceName,
    id: NodeId,
) {
    if !waiting.contains_key(service) && waiting.len() >= MAX_WAITING_SERVICES {
        return;
    }
    waiting.entry(service.clone()).or_default().insert(id);
}

/// An outlet (re)registered `services`: tells each node waiting for one of them, so that it asks
/// for its route again now rather than after its back-off.
pub(super) fn outlet_back(shared: &Arc<Shared>, services: &[ServiceName]) {
    let told: Vec<(ServiceName, NodeId)> = {
        let mut waiting = shared.waiting();
        services
            .iter()
            .filter_map(|s| waiting.remove(s).map(|ids| (s, ids)))
            .flat_map(|(s, ids)| ids.into_iter().map(move |id| (s.clone(), id)))
            .collect()
    };
    for (service, id) in told {
        let Some(c) = shared.conn(id) else { continue };
        tokio::spawn(async move {
            let msg = Ctl::OutletBack { service };
            if let Err(e) = exchange::request(&c, &msg, CTL_TIMEOUT).await {
                tracing::debug!(error = %e, "could not tell a node that an outlet is back");
            }
        });
    }
}

/// A read-only view of a running relay, for tests, the bench, the admin API and metrics.
#[derive(Clone)]
pub struct RelayHandle {
    pub(super) shared: Arc<Shared>,
    /// The TLS/TCP fallback's counters and links.
    pub(super) tcp: (Arc<TcpStats>, Arc<StreamLinks>),
}

impl RelayHandle {
    /// Puts `policy` in force (a reload): every registration and route decided from now on,
    /// and the live ones too. A registration it no longer allows is withdrawn, and a live
    /// route it no longer allows (its inlet may not reach the service any more, or its
    /// outlet may not serve it) is closed at both ends; the others keep going.
    pub fn set_policy(&self, policy: PolicySet) -> PolicyApplied {
        let empty = policy.is_empty();
        let policy = Arc::new(policy);
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|p| p.into_inner()) = policy.clone();
        let applied = enforce_policy(&self.shared, &policy);
        tracing::info!(
            empty,
            routes_closed = applied.routes_closed,
            registrations_withdrawn = applied.registrations_withdrawn,
            "policy reloaded"
        );
        applied
    }

    /// Counters of the TLS/TCP listener.
    pub fn tcp_stats(&self) -> &TcpStats {
        &self.tcp.0
    }

    /// The TLS/TCP links (their datagram counters).
    pub fn tcp_links(&self) -> &StreamLinks {
        &self.tcp.1
    }

    /// Forwarding counters.
    pub fn forward_stats(&self) -> &ForwardStats {
        &self.shared.fwd
    }

    /// Control-plane counters.
    pub fn control_stats(&self) -> &ControlStats {
        &self.shared.ctl
    }

    /// Handshake admission counters (Retries, refusals, pending handshakes).
    pub fn admission_stats(&self) -> &AdmissionStats {
        &self.shared.admission
    }

    /// The route table.
    pub fn routes(&self) -> &RouteTable {
        &self.shared.routes
    }

    /// Registered services and their connected outlets.
    pub fn services(&self) -> Vec<(ServiceName, Vec<NodeName>)> {
        self.shared.registry().services()
    }

    /// Per service, each live outlet and why its target is unhealthy (`None`: healthy, or it
    /// does not report).
    pub fn service_health(&self) -> Vec<(ServiceName, Vec<crate::registry::OutletHealth>)> {
        self.shared.registry().service_health()
    }

    /// Whether the relay is serving and not shutting down (the `/readyz` answer).
    pub fn readiness(&self) -> Result<(), String> {
        if self.shared.draining.load(Relaxed) {
            Err("shutting down".into())
        } else if !self.shared.listening.load(Relaxed) {
            Err("not listening yet".into())
        } else {
            Ok(())
        }
    }

    /// Whether the fleet's shared state (etcd) answers; `None` without a cluster. Not part of
    /// readiness: routes and connections go on without etcd, so a load balancer must not pull
    /// a relay because etcd is down.
    pub fn fleet_connected(&self) -> Option<bool> {
        self.shared.fleet().connected()
    }

    /// The shared state's member count and failures by operation; `None` without a cluster.
    pub fn fleet_health(&self) -> Option<crate::fleet::health::HealthView> {
        self.shared.fleet().health()
    }

    /// What `/readyz` says about the cluster: `None` without one.
    ///
    /// etcd being unreachable does not make the relay unready (no 503): routes already set
    /// up and new routes between connected nodes never touch etcd, so a load balancer or an
    /// orchestrator that pulled (or restarted) every relay while etcd is down would turn an
    /// etcd outage into a traffic outage. The body says it instead, naming etcd, and
    /// `postern_relay_fleet_connected` is 0, for alerts.
    pub fn fleet_readiness(&self) -> Option<String> {
        let fleet = self.shared.fleet();
        let up = fleet.connected()?;
        let members = fleet
            .health()
            .and_then(|h| h.members)
            .map(|n| format!(", {n} relay(s) in the fleet"))
            .unwrap_or_default();
        if up {
            Some(format!("cluster: etcd connected{members}"))
        } else {
            let why = fleet
                .health()
                .and_then(|h| h.last_error)
                .map(|(_, e)| format!(" ({e})"))
                .unwrap_or_default();
            Some(format!(
                "cluster: etcd NOT connected{why}; routes keep forwarding, enrollment, \
                 revocations and drains wait for etcd"
            ))
        }
    }

    /// Which outlets offer which services at the public ingress.
    pub(crate) fn public_registry(&self) -> MutexGuard<'_, PublicRegistry> {
        self.shared.public()
    }

    /// The public ingress' counters.
    pub fn public_stats(&self) -> &PublicStats {
        &self.shared.public_stats
    }

    pub(crate) fn public_stats_arc(&self) -> Arc<PublicStats> {
        self.shared.public_stats.clone()
    }

    /// A connected node's control connection.
    pub(crate) fn node_conn(&self, id: NodeId) -> Option<quinn::Connection> {
        self.shared.conn(id)
    }

    /// Names of connected nodes.
    pub fn nodes(&self) -> Vec<NodeName> {
        let reg = self.shared.registry();
        let conns = self.shared.conns();
        let mut names: Vec<NodeName> = conns
            .keys()
            .filter_map(|id| reg.name(*id).cloned())
            .collect();
        names.sort();
        names
    }
}

/// What putting a new policy in force changed in what was live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyApplied {
    /// Live routes closed because the policy no longer allows them.
    pub routes_closed: usize,
    /// Outlets' registrations of a service withdrawn because the policy no longer allows them.
    pub registrations_withdrawn: usize,
}

/// Re-decides every live registration and route under `policy`: withdraws and closes those
/// it refuses (see [`RelayHandle::set_policy`]).
fn enforce_policy(shared: &Arc<Shared>, policy: &PolicySet) -> PolicyApplied {
    use crate::policy::Action;
    let (withdrawn, closed) = {
        let mut reg = shared.registry();
        let mut withdrawn = Vec::new();
        for id in reg.ids() {
            let Some(name) = reg.name(id).cloned() else {
                continue;
            };
            let attrs = reg.attrs(id);
            for service in reg.services_of(id) {
                let d = policy.decide(Action::Register, &service, &name, &attrs);
                if !d.allowed {
                    withdrawn.push((id, name.clone(), service, d.rule));
                }
            }
        }
        for (id, _, service, _) in &withdrawn {
            reg.withdraw(*id, service);
        }
        let mut closed = Vec::new();
        for (route, info) in reg.routes() {
            let outlet_withdrawn = withdrawn
                .iter()
                .any(|(id, _, s, _)| *id == info.outlet && *s == info.service);
            let Some(inlet) = reg.name(info.inlet).cloned() else {
                continue;
            };
            let d = policy.decide(Action::Route, &info.service, &inlet, &reg.attrs(info.inlet));
            if !d.allowed || outlet_withdrawn {
                closed.push((route, info, inlet, d));
            }
        }
        for (route, ..) in &closed {
            reg.remove_route(*route);
        }
        (withdrawn, closed)
    };
    for (_, outlet, service, rule) in &withdrawn {
        tracing::warn!(%outlet, %service, "registration withdrawn: the reloaded policy no longer allows the outlet to serve the service");
        tracing::info!(target: "postern::audit", event = "policy", action = "register", reload = true, node = %outlet, service = %service, allowed = false, rule = %rule);
    }
    if !withdrawn.is_empty() {
        shared.presence_changed.notify_one();
    }
    for (route, info, inlet, d) in &closed {
        shared.routes.remove(*route);
        shared.ctl.routes_closed_by_policy.fetch_add(1, Relaxed);
        let reason = if d.allowed {
            format!(
                "the relay's reloaded policy no longer allows the outlet to serve {}",
                info.service
            )
        } else {
            format!(
                "the relay's reloaded policy no longer allows {inlet} to reach {}",
                info.service
            )
        };
        tracing::warn!(route = %route.short(), service = %info.service, %inlet, %reason, "route closed by the reloaded policy");
        if !d.allowed {
            tracing::info!(target: "postern::audit", event = "policy", action = "route", reload = true, node = %inlet, service = %info.service, allowed = false, rule = %d.rule);
        }
        for end in [info.inlet, info.outlet] {
            let Some(c) = shared.conn(end) else { continue };
            let msg = Ctl::RouteClosed {
                route: *route,
                reason: reason.clone(),
            };
            let route = *route;
            tokio::spawn(async move {
                if let Err(e) = exchange::request(&c, &msg, CTL_TIMEOUT).await {
                    tracing::debug!(route = %route.short(), error = %e, "could not tell a node that the reloaded policy closed its route");
                }
            });
        }
    }
    PolicyApplied {
        routes_closed: closed.len(),
        registrations_withdrawn: withdrawn.len(),
    }
}

/// A drained node: which connection (none when it was not connected here when the drain
/// was made or read at start), and what it served (restored by undrain while it is still
/// connected).
#[derive(Debug, Clone)]
pub(super) struct Drain {
    pub(super) id: Option<NodeId>,
    pub(super) services: Vec<ServiceName>,
}

/// The relay state only the admin API needs.
#[derive(Debug, Default)]
pub(super) struct AdminState {
    connected_at: Mutex<HashMap<NodeId, SystemTime>>,
    /// Drained node names: refused at connection and for routes until undrained. Recorded in
    /// the fleet's state too, so a restart keeps them.
    drained: Mutex<BTreeMap<NodeName, Drain>>,
    pub(super) stats: AdminStats,
}

impl AdminState {
    pub(super) fn connected_at_map(&self) -> MutexGuard<'_, HashMap<NodeId, SystemTime>> {
        self.connected_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn drained(&self) -> MutexGuard<'_, BTreeMap<NodeName, Drain>> {
        self.drained.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records when a node's control connection came up.
    pub(super) fn connected(&self, id: NodeId) {
        self.connected_at_map().insert(id, SystemTime::now());
    }

    /// Forgets a node's connection time.
    pub(super) fn disconnected(&self, id: NodeId) {
        self.connected_at_map().remove(&id);
    }

    /// Whether the operator drained `name`.
    pub(super) fn is_drained(&self, name: &NodeName) -> bool {
        self.drained().contains_key(name)
    }
}

/// Whether the node behind connection `id` is drained.
pub(super) fn node_drained(shared: &Shared, id: NodeId) -> bool {
    let name = shared.registry().name(id).cloned();
    name.is_some_and(|n| shared.admin.is_drained(&n))
}

/// Drops a node's registrations and routes, and tells the other end of each route.
pub(super) fn forget_node(shared: &Arc<Shared>, id: NodeId) {
    shared.presence_changed.notify_one();
    shared.public().remove_node(id);
    shared.waiting().retain(|_, ids| {
        ids.remove(&id);
        !ids.is_empty()
    });
    let gone = shared.registry().disconnect(id);
    for (route, other) in gone {
        shared.routes.remove(route);
        if let Some(c) = shared.conn(other) {
            tokio::spawn(async move {
                let msg = Ctl::RouteClosed {
                    route,
                    reason: "the other end disconnected".into(),
                };
                if let Err(e) = exchange::request(&c, &msg, CTL_TIMEOUT).await {
                    tracing::debug!(route = %route.short(), error = %e, "could not tell node that its route closed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_nodes_are_remembered_up_to_a_bound_on_service_names() {
        let mut waiting = HashMap::new();
        for i in 0..MAX_WAITING_SERVICES + 100 {
            let svc = ServiceName::new(&format!("svc{i}")).expect("name");
            note_waiting(&mut waiting, &svc, 1);
        }
        assert_eq!(waiting.len(), MAX_WAITING_SERVICES);
        // A service already remembered still takes more waiting nodes past the bound.
        let first = ServiceName::new("svc0").expect("name");
        note_waiting(&mut waiting, &first, 2);
        assert_eq!(waiting.get(&first).map(|ids| ids.len()), Some(2));
        let late = ServiceName::new(&format!("svc{}", MAX_WAITING_SERVICES + 1)).expect("name");
        assert!(!waiting.contains_key(&late));
    }
}
