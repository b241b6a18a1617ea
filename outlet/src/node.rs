//! The outlet node: its uplink (socket, endpoint, one control connection per relay, see
//! [`postern_net::uplink`]), what it says on those connections (register services, take
//! routes), and the end-to-end listener that serves inlets' streams.

use crate::serve::{self, ExpectedRoute, Routes, Services};
use postern_net::control::connection::ControlHandler;
use postern_net::control::exchange::{self, CtlError, CTL_TIMEOUT};
use postern_net::runtime::drain::Drain;
use postern_net::transport::endpoint::EndpointError;
use postern_net::transport::node_socket::NodeSocket;
use postern_net::transport::relay_path::{RelayTarget, TransportSettings, TransportStatus};
use postern_net::uplink::{ControlWatch, Role, Uplink, UplinkError};
use postern_proto::msg::{Ctl, Refusal};
use postern_proto::name::ServiceName;
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why an outlet could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutletError {
    #[error(transparent)]
    Uplink(#[from] UplinkError),
}

/// What an outlet needs to run.
pub struct OutletOptions {
    pub relay: RelayTarget,
    pub identity: Identity,
    pub roots: Arc<RootCertStore>,
    /// Services offered: targets, and lease managers for those with leased credentials.
    pub services: Services,
}

/// A bound outlet, ready to [`run`](Outlet::run).
pub struct Outlet {
    uplink: Arc<Uplink>,
    routes: Arc<Routes>,
    services: Arc<Services>,
    /// The services in force (swapped on reload, see [`crate::reload`]).
    live: Arc<crate::reload::Live>,
    public: Option<Arc<crate::public::Public>>,
    /// How many relays of a fleet to attach to (see [`crate::homing`]).
    home_relays: usize,
    /// The outlet's name, which its home relays are chosen by.
    name: String,
    health: Arc<crate::health::Board>,
}

/// Inspect a running outlet (tests, bench, the metrics endpoint).
#[derive(Clone)]
pub struct OutletHandle {
    uplink: Arc<Uplink>,
    routes: Arc<Routes>,
    services: Arc<Services>,
    health: Arc<crate::health::Board>,
    live: Arc<crate::reload::Live>,
}

impl OutletHandle {
    /// The node's socket: its direct-path counters, and which routes run direct
    /// ([`NodeSocket::path_counts`](postern_net::transport::node_socket::NodeSocket::path_counts)).
    pub fn socket(&self) -> &Arc<postern_net::transport::node_socket::NodeSocket> {
        self.uplink.socket()
    }

    /// The services in force now.
    pub fn live_services(&self) -> Arc<Services> {
        self.live.get()
    }

    /// Puts `services` in force (see [`crate::reload`]): new streams and flows use them, every
    /// connected relay is told the new service list, and end-to-end connections the new
    /// services no longer allow are closed. Returns how many were closed.
    pub async fn reload(&self, services: Services) -> usize {
        let services = Arc::new(services);
        self.live.set(services.clone());
        let closed = self.routes.close_disallowed(&services);
        let names = services.names();
        for (relay, control) in self.uplink.relays() {
            let conn = control.borrow().clone();
            let Some(conn) = conn else { continue };
            let msg = Ctl::Register {
                services: names.clone(),
            };
            match exchange::request(&conn, &msg, CTL_TIMEOUT).await {
                Ok(Ctl::Registered { services }) => {
                    tracing::info!(%relay, ?services, "services registered with relay after reload")
                }
                Ok(Ctl::Refused { reason }) => {
                    tracing::error!(%relay, %reason, "the relay refused the reloaded service list")
                }
                Ok(_) => tracing::warn!(%relay, "unexpected answer to Register after reload"),
                Err(e) => {
                    tracing::warn!(%relay, error = %e, "could not register the reloaded services")
                }
            }
        }
        closed
    }

    /// The control connection, as it comes and goes.
    pub fn control(&self) -> ControlWatch {
        self.uplink.control()
    }

    /// Renews the certificate automatically when it was enrolled into `state_dir`; see
    /// [`Uplink::renew_automatically`].
    pub fn renew_automatically(
        &self,
        state_dir: &std::path::Path,
        cert: &std::path::Path,
        shutdown: CancellationToken,
    ) {
        self.uplink.renew_automatically(state_dir, cert, shutdown);
    }

    /// Uses a renewed identity for every connection made or accepted from now on.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), EndpointError> {
        self.uplink.set_identity(identity)
    }

    /// Waits until the outlet's control connection to every relay is up (and its services
    /// registered there).
    pub async fn wait_registered(&mut self, timeout: std::time::Duration) -> bool {
        self.uplink.wait_all_connected(timeout).await
    }

    /// Which transport (UDP or TLS/TCP) reaches each connected relay.
    pub fn transports(&self) -> &TransportStatus {
        self.uplink.transports()
    }

    /// Live end-to-end connections.
    pub fn connection_count(&self) -> usize {
        self.routes.connection_count()
    }

    /// Open data streams (client connections being forwarded to a target).
    pub fn open_streams(&self) -> usize {
        self.uplink.drain().streams.len()
    }

    /// True while a control connection to a relay is up.
    pub fn relay_connected(&self) -> bool {
        self.uplink.relay_connected()
    }

    /// Each checked service's target health, as reported to the relays.
    pub fn target_health(&self) -> Vec<(ServiceName, crate::health::Health)> {
        self.health.snapshot()
    }

    /// Whether the outlet can take streams (the `/readyz` answer): its relays, and the lease
    /// store of each leased service (a store that cannot write makes no lease, so that service's
    /// inlets can only get 503s).
    pub fn readiness(&self) -> Result<(), String> {
        self.uplink.readiness()?;
        let mut leased: Vec<_> = self.services.leases.iter().collect();
        leased.sort_by(|a, b| a.0.cmp(b.0));
        for (service, manager) in leased {
            manager
                .store_ready()
                .map_err(|why| format!("service {service}: {why}"))?;
        }
        Ok(())
    }
}

impl Outlet {
    /// Binds the outlet's socket and endpoint.
    pub fn bind(opts: OutletOptions) -> Result<Self, OutletError> {
        let uplink = Uplink::bind(opts.relay, &opts.identity, opts.roots, Role::Server)?;
        let services = Arc::new(opts.services);
        Ok(Self {
            uplink: Arc::new(uplink),
            routes: Arc::new(Routes::default()),
            live: Arc::new(crate::reload::Live::new(services.clone())),
            services,
            public: None,
            home_relays: postern_net::fleet::DEFAULT_HOME_RELAYS,
            name: opts
                .identity
                .certs
                .first()
                .and_then(|c| postern_proto::pki::cert_name(c).ok())
                .map(|n| n.to_string())
                .unwrap_or_default(),
            health: Arc::default(),
        })
    }

    /// In a fleet, attach to this many relays (default
    /// [`DEFAULT_HOME_RELAYS`](postern_net::fleet::DEFAULT_HOME_RELAYS)), chosen by rendezvous
    /// hashing, instead of to every relay. Without a fleet nothing changes. Call before
    /// [`run`](Self::run).
    pub fn set_home_relays(&mut self, n: usize) {
        self.home_relays = n.max(1);
    }

    /// Chooses how relays are reached: UDP, TLS/TCP, or UDP with fallback to TLS/TCP (the
    /// default). Call before [`run`](Self::run).
    pub fn set_transport(&mut self, transport: TransportSettings) {
        self.uplink.set_transport(transport);
    }

    /// Registers with `relay` too (as with the first: its own control connection, no state
    /// shared between relays), so inlets can use any of them. Call before [`run`](Self::run).
    pub fn add_relay(&mut self, relay: RelayTarget) {
        self.uplink.add_relay(relay);
    }

    /// After shutdown is asked for, let open streams finish for up to `timeout` (refusing new
    /// connections, routes and streams, and keeping the control connection up so the routes
    /// stay) before closing. Default: zero, close at once.
    pub fn set_drain_timeout(&mut self, timeout: Duration) {
        self.uplink.set_drain_timeout(timeout);
    }

    /// Also offers these services at the relay's public hostname ingress (each must be one of
    /// the outlet's services).
    pub fn set_public(&mut self, public: Arc<crate::public::Public>) {
        self.public = Some(public);
    }

    /// Keeps these services' end-to-end connections on the relay (`direct = "never"` on the
    /// service), whatever the node's own setting.
    pub fn set_direct_never(&mut self, services: std::collections::HashSet<ServiceName>) {
        self.routes.set_direct_never(services);
    }

    /// A handle for inspection.
    pub fn handle(&self) -> OutletHandle {
        OutletHandle {
            uplink: self.uplink.clone(),
            routes: self.routes.clone(),
            services: self.services.clone(),
            health: self.health.clone(),
            live: self.live.clone(),
        }
    }

    /// Runs until `shutdown`, then drains (see [`set_drain_timeout`](Self::set_drain_timeout)).
    pub async fn run(self, shutdown: CancellationToken) {
        // Cancelled once draining is over: closes the control connection.
        let close = CancellationToken::new();
        let keep_on_relay_loss = Arc::new(AtomicBool::new(self.uplink.several_relays()));
        let drain = self.uplink.drain().clone();
        crate::health::spawn_checks(&self.health, &self.services.targets, &shutdown);
        let (socket, routes, live, public, all, weak, keep) = (
            self.uplink.socket().clone(),
            self.routes.clone(),
            self.live.clone(),
            self.public.clone(),
            self.services.clone(),
            Arc::downgrade(&self.uplink),
            keep_on_relay_loss.clone(),
        );
        let health = self.health.clone();
        let handler_for = move |relay| {
            Arc::new(OutletControl {
                socket: socket.clone(),
                routes: routes.clone(),
                services: live.clone(),
                relay,
                draining: drain.draining.clone(),
                keep_on_relay_loss: keep.clone(),
                public: public.clone(),
                all: all.clone(),
                drain: drain.clone(),
                uplink: weak.clone(),
                health: health.clone(),
            })
        };
        let drain = self.uplink.drain().clone();
        tokio::spawn(crate::homing::run(
            self.uplink.clone(),
            self.name.clone(),
            self.home_relays,
            keep_on_relay_loss,
            close.clone(),
        ));
        let Some(uplink) = self
            .uplink
            .start(handler_for, shutdown.clone(), close, "streams")
        else {
            return;
        };
        let accept = serve::accept_loop(
            self.uplink.clone(),
            self.routes.clone(),
            self.live.clone(),
            shutdown.clone(),
            drain.clone(),
        );
        tokio::join!(accept, uplink);
        self.uplink.close(b"outlet shutting down").await;
    }
}

struct OutletControl {
    socket: Arc<NodeSocket>,
    routes: Arc<Routes>,
    /// The services in force: registered at each connect, checked at each route.
    services: Arc<crate::reload::Live>,
    relay: SocketAddr,
    draining: CancellationToken,
    /// With several relays (or in a fleet), end-to-end connections outlive the loss of one
    /// relay's routes: the inlet moves them to another relay's path (QUIC migration), and
    /// those that do not move end by idle timeout.
    keep_on_relay_loss: Arc<AtomicBool>,
    /// To record the fleet's relays when a relay tells them.
    uplink: Weak<Uplink>,
    /// Services offered at the relay's public hostname ingress.
    public: Option<Arc<crate::public::Public>>,
    all: Arc<Services>,
    drain: Drain,
    /// Target health, reported on each control connection.
    health: Arc<crate::health::Board>,
}

impl ControlHandler for OutletControl {
    async fn on_connect(&self, conn: &quinn::Connection) -> Result<(), CtlError> {
        let msg = Ctl::Register {
            services: self.services.get().names(),
        };
        match exchange::request(conn, &msg, CTL_TIMEOUT).await? {
            Ctl::Registered { services } => {
                tracing::info!(?services, "services registered with relay");
                if let Some(public) = &self.public {
                    register_public(conn, public.names()).await?;
                }
                tokio::spawn(crate::health::report(conn.clone(), self.health.clone()));
                Ok(())
            }
            Ctl::Refused { reason } => Err(CtlError::Refused(reason)),
            other => Err(CtlError::Codec(
                postern_proto::codec::CodecError::Malformed(format!(
                    "unexpected answer to Register: {:?}",
                    std::mem::discriminant(&other)
                )),
            )),
        }
    }

    async fn on_push(&self, msg: Ctl) -> Ctl {
        match msg {
            Ctl::RouteOpen {
                route,
                service,
                inlet,
            } => {
                if !self.services.get().names().contains(&service) {
                    return Ctl::Refused {
                        reason: Refusal::NotServed { service },
                    };
                }
                if self.draining.is_cancelled() {
                    // The relay tries another outlet of the service.
                    return Ctl::Refused {
                        reason: Refusal::ShuttingDown,
                    };
                }
                let virt = self.socket.add_route(route, self.relay);
                tracing::info!(%service, %inlet, "route opened");
                tracing::debug!(route = %route.short(), %service, "opened route");
                self.routes.expect(
                    virt,
                    ExpectedRoute {
                        route,
                        inlet,
                        service,
                    },
                );
                Ctl::Ack
            }
            Ctl::RouteClosed { route, reason } => {
                tracing::info!(%reason, "route closed by relay");
                tracing::debug!(route = %route.short(), "closed route");
                self.routes.close(route, b"route closed");
                self.socket.remove_route_after_close(route);
                Ctl::Ack
            }
            Ctl::Revoked { name } => {
                tracing::warn!(node = %name, "identity revoked; closing its connections and revoking its leases");
                self.routes.close_inlet(&name);
                revoke_leases(&self.all, &name);
                Ctl::Ack
            }
            Ctl::Heartbeat { seq } => Ctl::HeartbeatAck { seq },
            Ctl::Relays { relays } => {
                if let Some(u) = self.uplink.upgrade() {
                    u.learn_relays(relays);
                }
                Ctl::Ack
            }
            other => {
                tracing::warn!(message = ?std::mem::discriminant(&other), "unexpected push from the relay");
                Ctl::Refused {
                    reason: Refusal::Unexpected,
                }
            }
        }
    }

    fn on_stream(&self, open: Ctl, send: quinn::SendStream, recv: quinn::RecvStream) {
        match &self.public {
            Some(public) => crate::public::spawn_stream(
                public.clone(),
                self.all.clone(),
                self.drain.clone(),
                open,
                send,
                recv,
            ),
            None => {
                let c = quinn::VarInt::from_u32(postern_proto::msg::code::UNKNOWN_SERVICE);
                let (mut send, mut recv) = (send, recv);
                let _ = send.reset(c);
                let _ = recv.stop(c);
            }
        }
    }

    fn on_disconnect(&self, relay: SocketAddr, refused: bool) {
        for route in self.socket.remove_routes_via(relay, !refused) {
            if self.keep_on_relay_loss.load(Relaxed) {
                tracing::info!(%relay, "relay lost; the connection may move to another relay");
                tracing::debug!(route = %route.short(), "route of the lost relay");
            } else {
                self.routes.close(route, b"relay connection lost");
            }
        }
    }
}

/// Revokes every lease of a revoked identity in InfluxDB now, rather than when the leases
/// expire. Each lease manager works on its own task, so the relay's push is answered at once.
fn revoke_leases(services: &Services, name: &postern_proto::name::NodeName) {
    for (service, manager) in &services.leases {
        let (manager, name, service) = (manager.clone(), name.clone(), service.clone());
        tokio::spawn(async move {
            match manager.revoke_client(&name).await {
                Ok(n) => {
                    tracing::info!(node = %name, %service, leases = n, "leases of a revoked identity revoked")
                }
                Err(e) => {
                    tracing::error!(node = %name, %service, error = %e, "could not revoke every lease of a revoked identity")
                }
            }
        });
    }
}

/// Asks the relay to route `services` from its public hostname ingress. A relay that refuses
/// (no ingress, or policy) is logged, not fatal: the tunnel services still work.
async fn register_public(
    conn: &quinn::Connection,
    services: Vec<ServiceName>,
) -> Result<(), CtlError> {
    if services.is_empty() {
        return Ok(());
    }
    match exchange::request(conn, &Ctl::RegisterPublic { services }, CTL_TIMEOUT).await? {
        Ctl::Registered { services } => {
            tracing::info!(?services, "public services registered with relay");
        }
        Ctl::Refused { reason } => {
            tracing::error!(
                reason = reason.label(),
                "the relay refused our public services: {reason}"
            );
        }
        other => {
            tracing::error!(answer = ?std::mem::discriminant(&other), "unexpected answer to RegisterPublic");
        }
    }
    Ok(())
}
