//! Answers one control message from a connected node: registrations (tunnel and public),
//! route requests (refused while the relay or the node drains, else [`super::route`]),
//! outlets' health reports ([`super::health`]), heartbeats and certificate renewals.

use super::route::grant_route;
use super::shared::{node_drained, outlet_back, Shared};
use crate::policy::Action;
use crate::registry::NodeId;
use postern_proto::msg::{Ctl, Refusal, RefuseReason};
use postern_proto::name::ServiceName;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// The answer to `msg` from node `id` (on control connection `conn`).
pub(super) async fn handle(
    shared: &Arc<Shared>,
    id: NodeId,
    conn: &quinn::Connection,
    msg: Ctl,
) -> Ctl {
    match msg {
        Ctl::Register { services } => {
            let (name, attrs) = {
                let reg = shared.registry();
                (reg.name(id).cloned(), reg.attrs(id))
            };
            let Some(name) = name else {
                return refused(Refusal::UnknownNode);
            };
            if shared.admin.is_drained(&name) {
                return refused(Refusal::Drained);
            }
            for svc in &services {
                let d = shared.policy().decide(Action::Register, svc, &name, &attrs);
                tracing::info!(target: "postern::audit", event = "policy", action = "register", node = %name, service = %svc, allowed = d.allowed, rule = %d.rule);
                if !d.allowed {
                    return refused(Refusal::NotAllowed {
                        action: "register".into(),
                        service: svc.clone(),
                        attrs,
                        rule: d.rule,
                    });
                }
            }
            shared.registry().register(id, &services);
            shared.presence_changed.notify_one();
            tracing::info!(?services, "services registered");
            outlet_back(shared, &services);
            Ctl::Registered { services }
        }
        Ctl::RegisterPublic { services } => register_public(shared, id, services),
        Ctl::RouteRequest { .. } if shared.draining.load(Relaxed) => {
            shared.ctl.routes_refused.fetch_add(1, Relaxed);
            refused(Refusal::ShuttingDown)
        }
        Ctl::RouteRequest { .. } if node_drained(shared, id) => {
            shared.ctl.routes_refused.fetch_add(1, Relaxed);
            refused(Refusal::Drained)
        }
        Ctl::RouteRequest { service } => {
            let answer = grant_route(shared, id, conn, service.clone()).await;
            match &answer {
                Ctl::RouteGranted { .. } => shared.ctl.routes_granted.fetch_add(1, Relaxed),
                Ctl::RouteRedirect { .. } => shared.ctl.routes_redirected.fetch_add(1, Relaxed),
                _ => shared.ctl.routes_refused.fetch_add(1, Relaxed),
            };
            // Refused for want of a live outlet: told when one registers the service.
            if let Ctl::RouteRefused { reason, .. } = &answer {
                if *reason != RefuseReason::NotAllowed {
                    shared.waits_for_outlet(&service, id);
                }
            }
            answer
        }
        Ctl::ServiceHealth {
            service,
            healthy,
            reason,
        } => super::health::report(shared, id, service, healthy, reason),
        Ctl::Heartbeat { seq } => Ctl::HeartbeatAck { seq },
        Ctl::LocalCandidates { addrs } => {
            shared.registry().set_local_candidates(id, &addrs);
            Ctl::Ack
        }
        Ctl::RoutePath { route, direct } => {
            if shared.registry().set_route_path(route, id, direct) {
                let path = if direct { "direct" } else { "relayed" };
                tracing::info!(route = %route.short(), path, "the inlet reports the route's path");
            } else {
                tracing::debug!(route = %route.short(), "path report for a route this node is no inlet of: ignored");
            }
            Ctl::Ack
        }
        Ctl::Renew { csr_pem } => {
            let fleet = shared.fleet();
            if !fleet.runs_authority() {
                return refused(Refusal::NoAuthority);
            }
            let (name, attrs) = {
                let reg = shared.registry();
                (reg.name(id).cloned(), reg.attrs(id))
            };
            let Some(name) = name else {
                return refused(Refusal::UnknownNode);
            };
            match fleet.renew(name, attrs, csr_pem).await {
                Ok(cert_pem) => Ctl::Renewed { cert_pem },
                Err(reason) => refused(reason),
            }
        }
        Ctl::PublicCertRequest {
            service,
            hostname,
            csr_pem,
        } => super::public_cert::issue(shared, id, service, hostname, csr_pem).await,
        other => {
            shared.ctl.bad_messages.fetch_add(1, Relaxed);
            tracing::warn!(message = ?std::mem::discriminant(&other), "unexpected control message from node");
            refused(Refusal::Unexpected)
        }
    }
}

/// Offers `services` at the public ingress, for a node allowed to register them.
fn register_public(shared: &Arc<Shared>, id: NodeId, services: Vec<ServiceName>) -> Ctl {
    let (name, attrs) = {
        let reg = shared.registry();
        (reg.name(id).cloned(), reg.attrs(id))
    };
    let Some(name) = name else {
        return refused(Refusal::UnknownNode);
    };
    for svc in &services {
        let d = shared.policy().decide(Action::Register, svc, &name, &attrs);
        tracing::info!(target: "postern::audit", event = "policy", action = "register_public", node = %name, service = %svc, allowed = d.allowed, rule = %d.rule);
        if !d.allowed {
            return refused(Refusal::NotAllowed {
                action: "register_public".into(),
                service: svc.clone(),
                attrs,
                rule: d.rule,
            });
        }
    }
    shared.public().register(id, &services);
    tracing::info!(?services, "public services registered");
    Ctl::Registered { services }
}

/// The answer refusing a request for `reason` (counted by reason where the answer is sent).
pub(super) fn refused(reason: Refusal) -> Ctl {
    Ctl::Refused { reason }
}
