//! Granting a route: policy first, then up to [`ROUTE_ATTEMPTS`] live outlets of the service
//! asked to accept it; the first that acks gets the route in the forwarding table and the
//! registry. A refusal names why (not allowed, unknown service, no live outlet, every outlet
//! refused). In a fleet, a service with no outlet attached here but some attached to other
//! relays (by the fleet's presence records) is answered with a redirect to those relays.

use super::shared::Shared;
use crate::policy::Action;
use crate::registry::{NodeId, RouteInfo};
use postern_net::control::exchange;
use postern_proto::fwd::RouteId;
use postern_proto::msg::{Ctl, Refusal, RefuseReason};
use postern_proto::name::ServiceName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long the relay waits for an outlet to accept a route.
const ROUTE_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How many outlets are tried for one route request.
const ROUTE_ATTEMPTS: usize = 3;

/// Finds an outlet of `service` for `inlet` and opens a route between them; the answer is a
/// `RouteGranted` or a `RouteRefused`.
pub(super) async fn grant_route(
    shared: &Arc<Shared>,
    inlet: NodeId,
    inlet_conn: &quinn::Connection,
    service: ServiceName,
) -> Ctl {
    let refuse = |reason: RefuseReason| {
        tracing::info!(%service, %reason, "route refused");
        Ctl::RouteRefused {
            service: service.clone(),
            reason,
        }
    };
    let (first, inlet_name) = {
        let mut reg = shared.registry();
        let Some(inlet_name) = reg.name(inlet).cloned() else {
            return refuse(RefuseReason::NotAllowed);
        };
        let d = shared
            .policy()
            .decide(Action::Route, &service, &inlet_name, &reg.attrs(inlet));
        tracing::info!(target: "postern::audit", event = "policy", action = "route", node = %inlet_name, service = %service, allowed = d.allowed, rule = %d.rule);
        if !d.allowed {
            drop(reg);
            return refuse(RefuseReason::NotAllowed);
        }
        match reg.pick_outlet(&service) {
            Ok(o) => (o, inlet_name),
            Err(reason) => {
                drop(reg);
                // Not attached here: another relay of the fleet may hold one.
                if let Some(me) = shared.member_name() {
                    let relays = shared.view().holders(&service, &me);
                    if !relays.is_empty() {
                        tracing::info!(%service, ?relays, "route redirected to the relays holding the service's outlets");
                        return Ctl::RouteRedirect { service, relays };
                    }
                }
                return refuse(reason);
            }
        }
    };
    let mut candidates = vec![first];
    candidates.extend(
        shared
            .registry()
            .outlets_of(&service)
            .into_iter()
            .filter(|o| *o != first),
    );
    let mut last_refusal: Option<Refusal> = None;
    for outlet in candidates.into_iter().take(ROUTE_ATTEMPTS) {
        let (Some(outlet_conn), Some(outlet_name)) =
            (shared.conn(outlet), shared.registry().name(outlet).cloned())
        else {
            continue;
        };
        let route = RouteId(rand::random());
        let open = Ctl::RouteOpen {
            route,
            service: service.clone(),
            inlet: inlet_name.clone(),
        };
        match exchange::request(&outlet_conn, &open, ROUTE_OPEN_TIMEOUT).await {
            Ok(Ctl::Ack) => {
                shared.routes.insert(
                    route,
                    inlet_conn.remote_address(),
                    outlet_conn.remote_address(),
                );
                shared.registry().add_route(
                    route,
                    RouteInfo {
                        inlet,
                        outlet,
                        service: service.clone(),
                    },
                );
                let locals = {
                    let reg = shared.registry();
                    (reg.local_candidates(inlet), reg.local_candidates(outlet))
                };
                tell_candidates(
                    shared,
                    route,
                    inlet_conn.clone(),
                    outlet_conn.clone(),
                    locals,
                );
                tracing::info!(%service, inlet = %inlet_name, outlet = %outlet_name, "route granted");
                tracing::debug!(route = %route.short(), %service, "granted route");
                return Ctl::RouteGranted {
                    route,
                    service,
                    outlet: outlet_name,
                };
            }
            Ok(Ctl::Refused { reason }) => {
                tracing::warn!(%service, outlet = %outlet_name, %reason, "outlet refused the route");
                last_refusal = Some(reason);
            }
            Ok(other) => {
                tracing::warn!(%service, outlet = %outlet_name, answer = ?std::mem::discriminant(&other), "outlet answered the route opening with something else");
            }
            Err(e) => {
                tracing::warn!(%service, outlet = %outlet_name, error = %e, "outlet did not answer the route opening");
            }
        }
    }
    refuse(match last_refusal {
        Some(reason) => RefuseReason::OutletRefused(reason),
        None => RefuseReason::OutletUnresponsive,
    })
}

/// Tells each end of a new route where the relay sees the other one (its reflexive address),
/// and, when both are behind the same public IP, the addresses the other announced on its own
/// network (`locals`: the inlet's, the outlet's; see [`crate::registry::candidates_for`]),
/// for the direct path. A node on the TLS/TCP fallback is announced by its public IP (its
/// link's TCP source) and its UDP socket's port, never by its link's (virtual or TCP)
/// address, which no UDP reaches. Sent after the grant, on the push streams; a node that is
/// gone or does not know the message (older versions refuse it) costs nothing but a debug line.
fn tell_candidates(
    shared: &Shared,
    route: RouteId,
    inlet: quinn::Connection,
    outlet: quinn::Connection,
    locals: (Vec<SocketAddr>, Vec<SocketAddr>),
) {
    let (Some(inlet_at), Some(outlet_at)) = (
        sighting(shared, &inlet, &locals.0),
        sighting(shared, &outlet, &locals.1),
    ) else {
        return;
    };
    let to_inlet = crate::registry::candidates_for(inlet_at, outlet_at, &locals.1);
    let to_outlet = crate::registry::candidates_for(outlet_at, inlet_at, &locals.0);
    for (conn, candidates) in [(inlet, to_inlet), (outlet, to_outlet)] {
        tokio::spawn(async move {
            let msg = Ctl::PeerCandidates { route, candidates };
            if let Err(e) = exchange::request(&conn, &msg, ROUTE_OPEN_TIMEOUT).await {
                tracing::debug!(error = %e, "could not tell a node its peer's candidates");
            }
        });
    }
}

/// Where the relay sees the node on `conn` (with its announced local addresses `local`):
/// over UDP, its reflexive address; over a TLS/TCP link, the link's source IP (None if the
/// link is gone already).
fn sighting(
    shared: &Shared,
    conn: &quinn::Connection,
    local: &[SocketAddr],
) -> Option<crate::registry::Sighting> {
    let remote = postern_net::transport::udp::canonical(conn.remote_address());
    if let Some(source) = shared.tcp_pending.source_of(remote) {
        return Some(crate::registry::Sighting::tcp(source, local));
    }
    // A link's virtual address (240.0.0.0/8) whose link is gone: no UDP reaches it.
    if matches!(remote.ip(), std::net::IpAddr::V4(v4) if v4.octets()[0] == 240) {
        return None;
    }
    Some(crate::registry::Sighting::udp(remote))
}
