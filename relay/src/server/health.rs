//! Outlets' reports of their targets' health (`Ctl::ServiceHealth`): recorded in the registry
//! (which then routes only to healthy outlets), and acted on at once. An outlet turning
//! unhealthy has its routes of that service retired (their inlets ask for a new route for the
//! next client connection, streams already open finish); one turning healthy again wakes the
//! inlets that were refused a route meanwhile.

use super::shared::{outlet_back, Shared};
use crate::registry::NodeId;
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_proto::fwd::RouteId;
use postern_proto::msg::Ctl;
use postern_proto::name::ServiceName;
use std::sync::Arc;

/// Applies outlet `id`'s report about `service`; the answer is `Ack`.
pub(super) fn report(
    shared: &Arc<Shared>,
    id: NodeId,
    service: ServiceName,
    healthy: bool,
    reason: String,
) -> Ctl {
    let reason = crate::registry::bounded(&reason);
    let (name, changed, routes) = {
        let mut reg = shared.registry();
        let name = reg.name(id).cloned();
        let (changed, routes) = reg.set_health(id, &service, healthy, &reason);
        (name, changed, routes)
    };
    let Some(name) = name else {
        return Ctl::Ack;
    };
    if !changed {
        return Ctl::Ack;
    }
    if healthy {
        tracing::info!(outlet = %name, %service, "outlet reports its target healthy again; routing to it");
        outlet_back(shared, std::slice::from_ref(&service));
    } else {
        tracing::warn!(outlet = %name, %service, %reason, routes = routes.len(), "outlet reports its target unhealthy; no new routes to it, its routes retired");
        let why = format!("outlet {name} cannot reach the target of {service}: {reason}");
        for (route, inlet) in routes {
            retire(shared, route, inlet, why.clone());
        }
    }
    Ctl::Ack
}

/// Tells `inlet` to stop using `route`; an inlet that does not know `RouteRetired` (an older
/// one) is told the route closed instead.
fn retire(shared: &Arc<Shared>, route: RouteId, inlet: NodeId, reason: String) {
    let Some(conn) = shared.conn(inlet) else {
        return;
    };
    tokio::spawn(async move {
        let msg = Ctl::RouteRetired {
            route,
            reason: reason.clone(),
        };
        match exchange::request(&conn, &msg, CTL_TIMEOUT).await {
            Ok(Ctl::Ack) => {}
            Ok(_) => {
                let msg = Ctl::RouteClosed { route, reason };
                if let Err(e) = exchange::request(&conn, &msg, CTL_TIMEOUT).await {
                    tracing::debug!(error = %e, "could not close a route to an unhealthy outlet");
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not retire a route to an unhealthy outlet")
            }
        }
    });
}
