//! Answers one control message from a connected node: registrations (tunnel and public),
//! route requests (refused while the relay or the node drains, else [`super::route`]),
//! heartbeats and certificate renewals.

use super::route::grant_route;
use super::shared::{node_drained, outlet_back, Shared};
use crate::policy::Action;
use crate::registry::NodeId;
use postern_proto::msg::{Ctl, RefuseReason};
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
                return Ctl::Error {
                    message: "unknown node".into(),
                };
            };
            if shared.admin.is_drained(&name) {
                return Ctl::Error {
                    message: "this node is drained by the relay operator".into(),
                };
            }
            for svc in &services {
                let d = shared.policy.decide(Action::Register, svc, &name, &attrs);
                tracing::info!(target: "postern::audit", event = "policy", action = "register", node = %name, service = %svc, allowed = d.allowed, rule = %d.rule);
                if !d.allowed {
                    return Ctl::Error {
                        message: format!("not allowed to register {svc}: {}", d.rule),
                    };
                }
            }
            shared.registry().register(id, &services);
            tracing::info!(?services, "services registered");
            outlet_back(shared, &services);
            Ctl::Registered { services }
        }
        Ctl::RegisterPublic { services } => register_public(shared, id, services),
        Ctl::RouteRequest { .. } if shared.draining.load(Relaxed) => {
            shared.ctl.routes_refused.fetch_add(1, Relaxed);
            Ctl::Error {
                message: "the relay is shutting down".into(),
            }
        }
        Ctl::RouteRequest { .. } if node_drained(shared, id) => {
            shared.ctl.routes_refused.fetch_add(1, Relaxed);
            Ctl::Error {
                message: "this node is drained by the relay operator".into(),
            }
        }
        Ctl::RouteRequest { service } => {
            let answer = grant_route(shared, id, conn, service.clone()).await;
            match &answer {
                Ctl::RouteGranted { .. } => shared.ctl.routes_granted.fetch_add(1, Relaxed),
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
        Ctl::Heartbeat { seq } => Ctl::HeartbeatAck { seq },
        Ctl::Renew { csr_pem } => {
            let Some(authority) = shared.authority.clone() else {
                return Ctl::Error {
                    message: "this relay does not run the authority; renew there".into(),
                };
            };
            let (name, attrs) = {
                let reg = shared.registry();
                (reg.name(id).cloned(), reg.attrs(id))
            };
            let Some(name) = name else {
                return Ctl::Error {
                    message: "unknown node".into(),
                };
            };
            let signed =
                tokio::task::spawn_blocking(move || authority.renew(&name, &attrs, &csr_pem)).await;
            match signed {
                Ok(Ok(cert_pem)) => Ctl::Renewed { cert_pem },
                Ok(Err(message)) => Ctl::Error { message },
                Err(_) => Ctl::Error {
                    message: "renewal failed".into(),
                },
            }
        }
        other => {
            shared.ctl.bad_messages.fetch_add(1, Relaxed);
            tracing::warn!(message = ?std::mem::discriminant(&other), "unexpected control message from node");
            Ctl::Error {
                message: "unexpected message".into(),
            }
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
        return Ctl::Error {
            message: "unknown node".into(),
        };
    };
    for svc in &services {
        let d = shared.policy.decide(Action::Register, svc, &name, &attrs);
        tracing::info!(target: "postern::audit", event = "policy", action = "register_public", node = %name, service = %svc, allowed = d.allowed, rule = %d.rule);
        if !d.allowed {
            return Ctl::Error {
                message: format!("not allowed to register {svc}: {}", d.rule),
            };
        }
    }
    shared.public().register(id, &services);
    tracing::info!(?services, "public services registered");
    Ctl::Registered { services }
}
