//! Moving end-to-end connections to another relay: when a relay closes a route or goes away,
//! the connection over it gets a new route to the same outlet through another relay, bound to
//! the same virtual address, so the QUIC connection carries on (the outlet sees a peer
//! migration). Also the inlet's side of the control connection, which notices those losses.

use crate::pool::Pool;
use postern_net::control::connection::ControlHandler;
use postern_net::control::exchange::CtlError;
use postern_proto::fwd::RouteId;
use postern_proto::msg::Ctl;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a connection whose relay went away waits for another relay to move to.
pub const MIGRATE_WAIT: Duration = Duration::from_secs(5);

impl Pool {
    /// Moves the end-to-end connection that used `route` (through `lost`, which is gone) to
    /// another relay: a new route to the same outlet there, bound to the same virtual address,
    /// so the QUIC connection carries on and the outlet sees a peer migration. Open streams
    /// survive; if no relay can route to the same outlet, the connection is closed and the
    /// next client connection makes a new one.
    pub(crate) async fn migrate(self: Arc<Self>, route: RouteId, lost: SocketAddr) {
        for (service, slot) in self.slots() {
            let mut guard = slot.lock().await;
            let Some(e) = guard.as_mut().filter(|e| e.route == route) else {
                continue;
            };
            if !e.prune() {
                *guard = None;
                return;
            }
            let moved = self
                .router()
                .route_via_any(&service, Some(lost), MIGRATE_WAIT, Some(&e.outlet))
                .await;
            match moved {
                Ok((relay, new_route, _)) => {
                    self.uplink()
                        .socket()
                        .rebind_route(e.virt, new_route, relay);
                    tracing::info!(%service, from = %e.relay, to = %relay, "end-to-end connection moved to another relay");
                    tracing::debug!(old_route = %route.short(), route = %new_route.short(), "end-to-end connection moved");
                    e.route = new_route;
                    e.relay = relay;
                    self.migrated();
                }
                Err(why) => {
                    tracing::warn!(%service, relay = %lost, reason = %why, "cannot move the end-to-end connection; closing it");
                    e.close();
                    *guard = None;
                }
            }
            return;
        }
    }
}

/// The inlet's side of each control connection: notes when it came up (for the routes'
/// grace), and moves or drops end-to-end connections whose route or relay goes away.
pub(crate) struct InletControl {
    pub(crate) pool: Arc<Pool>,
}

impl ControlHandler for InletControl {
    async fn on_connect(&self, conn: &quinn::Connection) -> Result<(), CtlError> {
        self.pool.router().connected(conn);
        Ok(())
    }

    async fn on_push(&self, msg: Ctl) -> Ctl {
        match msg {
            Ctl::RouteClosed { route, reason } => {
                tracing::info!(%reason, "route closed by relay");
                tracing::debug!(route = %route.short(), "closed route");
                // A handshake over the route cannot finish: end it now, not at its timeout.
                self.pool.abort_handshakes(route);
                let uplink = self.pool.uplink();
                let relay = uplink.socket().relay_of(route);
                match relay {
                    Some(relay) if uplink.several_relays() => {
                        uplink.socket().remove_route(route);
                        tokio::spawn(self.pool.clone().migrate(route, relay));
                    }
                    _ => self.pool.route_closed(route),
                }
                Ctl::Ack
            }
            Ctl::RouteRetired { route, reason } => {
                tracing::info!(%reason, "route retired by the relay; new client connections get a new route");
                tracing::debug!(route = %route.short(), "retired route");
                self.pool.route_retired(route);
                Ctl::Ack
            }
            Ctl::OutletBack { service } => {
                tracing::info!(%service, "the relay says an outlet of the service is back");
                self.pool.retry_now();
                Ctl::Ack
            }
            Ctl::Heartbeat { seq } => Ctl::HeartbeatAck { seq },
            Ctl::Relays { relays } => {
                // Connections over a relay left behind move as if it had gone away.
                for gone in self.pool.router().fleet_changed(&relays) {
                    self.on_disconnect(gone, false);
                }
                self.pool.uplink().learn_relays(relays);
                Ctl::Ack
            }
            other => {
                tracing::warn!(message = ?std::mem::discriminant(&other), "unexpected push from the relay");
                Ctl::Refused {
                    reason: postern_proto::msg::Refusal::Unexpected,
                }
            }
        }
    }

    fn on_disconnect(&self, relay: SocketAddr, refused: bool) {
        let uplink = self.pool.uplink();
        for route in uplink.socket().remove_routes_via(relay, !refused) {
            self.pool.abort_handshakes(route);
            if uplink.several_relays() {
                tokio::spawn(self.pool.clone().migrate(route, relay));
            } else {
                self.pool.route_closed(route);
            }
        }
    }
}
