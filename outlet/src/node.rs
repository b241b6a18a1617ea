//! The outlet node: one socket, one control connection to the relay, end-to-end listener.

use crate::serve::{self as forward, Drain, ExpectedRoute, Routes, Services};
use postern_net::control::connection::{self, ControlHandler, SharedClientConfig};
use postern_net::control::exchange::{self, CtlError, CTL_TIMEOUT};
use postern_net::transport::endpoint::{self, EndpointError};
use postern_net::transport::node_socket::NodeSocket;
use postern_net::transport::relay_path::RelayTarget;
use postern_net::transport::relay_path::{RelayPath, TransportSettings, TransportStatus};
use postern_proto::msg::Ctl;
use postern_proto::name::ServiceName;
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why an outlet could not start.
#[derive(Debug, thiserror::Error)]
pub enum OutletError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot bind UDP socket: {0}")]
    Bind(std::io::Error),
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
    endpoint: quinn::Endpoint,
    socket: Arc<NodeSocket>,
    client: SharedClientConfig,
    roots: Arc<RootCertStore>,
    relay: RelayTarget,
    routes: Arc<Routes>,
    services: Arc<Services>,
    control: watch::Sender<Option<quinn::Connection>>,
    /// Relays beyond the first, each with its own control connection (see `add_relay`).
    more_relays: Vec<(RelayTarget, watch::Sender<Option<quinn::Connection>>)>,
    transport: TransportSettings,
    transport_status: Arc<TransportStatus>,
    drain: Drain,
    drain_timeout: Duration,
    public: Option<Arc<crate::public::Public>>,
}

/// Inspect a running outlet (tests, bench, the metrics endpoint).
#[derive(Clone)]
pub struct OutletHandle {
    routes: Arc<Routes>,
    control: watch::Receiver<Option<quinn::Connection>>,
    more_controls: Vec<watch::Receiver<Option<quinn::Connection>>>,
    transport_status: Arc<TransportStatus>,
    drain: Drain,
    endpoint: quinn::Endpoint,
    client: SharedClientConfig,
    roots: Arc<RootCertStore>,
}

impl OutletHandle {
    /// The control connection, as it comes and goes.
    pub fn control(&self) -> watch::Receiver<Option<quinn::Connection>> {
        self.control.clone()
    }

    /// Uses a renewed identity for every connection made or accepted from now on.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), EndpointError> {
        let control = endpoint::control_client(identity, self.roots.clone())?;
        let server = endpoint::e2e_server(identity, self.roots.clone())?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = control;
        self.endpoint.set_server_config(Some(server));
        Ok(())
    }

    /// Waits until the outlet's control connection to every relay is up (and its services
    /// registered there).
    pub async fn wait_registered(&mut self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for rx in std::iter::once(&mut self.control).chain(self.more_controls.iter_mut()) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if connection::wait_connected(rx, left).await.is_none() {
                return false;
            }
        }
        true
    }

    /// Which transport (UDP or TLS/TCP) reaches each connected relay.
    pub fn transports(&self) -> &TransportStatus {
        &self.transport_status
    }

    /// Live end-to-end connections.
    pub fn connection_count(&self) -> usize {
        self.routes.connection_count()
    }

    /// Open data streams (client connections being forwarded to a target).
    pub fn open_streams(&self) -> usize {
        self.drain.streams.len()
    }

    /// True while a control connection to a relay is up.
    pub fn relay_connected(&self) -> bool {
        std::iter::once(&self.control)
            .chain(self.more_controls.iter())
            .any(|rx| {
                rx.borrow()
                    .as_ref()
                    .is_some_and(|c| c.close_reason().is_none())
            })
    }

    /// Whether the outlet can take streams (the `/readyz` answer).
    pub fn readiness(&self) -> Result<(), String> {
        if self.drain.draining.is_cancelled() {
            Err("shutting down".into())
        } else if !self.relay_connected() {
            Err(self
                .transport_status
                .not_ready_reason("no control connection to the relay"))
        } else {
            Ok(())
        }
    }
}

impl Outlet {
    /// Binds the outlet's socket and endpoint.
    pub fn bind(opts: OutletOptions) -> Result<Self, OutletError> {
        let socket = Arc::new(NodeSocket::bind_for(opts.relay.addr).map_err(OutletError::Bind)?);
        let server = endpoint::e2e_server(&opts.identity, opts.roots.clone())?;
        let client = Arc::new(std::sync::RwLock::new(endpoint::control_client(
            &opts.identity,
            opts.roots.clone(),
        )?));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint::endpoint_config(None),
            Some(server),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(OutletError::Bind)?;
        Ok(Self {
            endpoint,
            socket,
            client,
            roots: opts.roots,
            relay: opts.relay,
            routes: Arc::new(Routes::default()),
            services: Arc::new(opts.services),
            control: watch::channel(None).0,
            more_relays: Vec::new(),
            transport: TransportSettings::default(),
            transport_status: Arc::default(),
            drain: Drain::default(),
            drain_timeout: Duration::ZERO,
            public: None,
        })
    }

    /// Chooses how relays are reached: UDP, TLS/TCP, or UDP with fallback to TLS/TCP (the
    /// default). Call before [`run`](Self::run).
    pub fn set_transport(&mut self, transport: TransportSettings) {
        self.transport = transport;
    }

    /// Registers with `relay` too (as with the first: its own control connection, no state
    /// shared between relays), so inlets can use any of them. Call before
    /// [`handle`](Self::handle) and [`run`](Self::run).
    pub fn add_relay(&mut self, relay: RelayTarget) {
        self.more_relays.push((relay, watch::channel(None).0));
    }

    /// After shutdown is asked for, let open streams finish for up to `timeout` (refusing new
    /// connections, routes and streams, and keeping the control connection up so the routes
    /// stay) before closing. Default: zero, close at once.
    pub fn set_drain_timeout(&mut self, timeout: Duration) {
        self.drain_timeout = timeout;
    }

    /// Also offers these services at the relay's public hostname ingress (each must be one of
    /// the outlet's services).
    pub fn set_public(&mut self, public: Arc<crate::public::Public>) {
        self.public = Some(public);
    }

    /// A handle for inspection.
    pub fn handle(&self) -> OutletHandle {
        OutletHandle {
            routes: self.routes.clone(),
            control: self.control.subscribe(),
            more_controls: self
                .more_relays
                .iter()
                .map(|(_, c)| c.subscribe())
                .collect(),
            transport_status: self.transport_status.clone(),
            drain: self.drain.clone(),
            endpoint: self.endpoint.clone(),
            client: self.client.clone(),
            roots: self.roots.clone(),
        }
    }

    /// Runs until `shutdown`, then drains (see [`set_drain_timeout`](Self::set_drain_timeout)).
    pub async fn run(self, shutdown: CancellationToken) {
        // Cancelled once draining is over: closes the control connection.
        let close = CancellationToken::new();
        let several = !self.more_relays.is_empty();
        let mut controls = tokio::task::JoinSet::new();
        for (relay, current) in std::iter::once((self.relay, self.control)).chain(self.more_relays)
        {
            let handler = Arc::new(OutletControl {
                socket: self.socket.clone(),
                routes: self.routes.clone(),
                services: self.services.names(),
                relay: relay.addr,
                draining: self.drain.draining.clone(),
                keep_on_relay_loss: several,
                public: self.public.clone(),
                all: self.services.clone(),
                drain: self.drain.clone(),
            });
            let path = match RelayPath::new(
                self.socket.clone(),
                relay,
                self.roots.clone(),
                self.transport.clone(),
                self.transport_status.clone(),
            ) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up the path to the relay");
                    return;
                }
            };
            controls.spawn(connection::run(
                self.endpoint.clone(),
                self.client.clone(),
                path,
                handler,
                current,
                close.clone(),
            ));
        }
        let ctl = async move { while controls.join_next().await.is_some() {} };
        let accept = forward::accept_loop(
            self.endpoint.clone(),
            self.routes.clone(),
            self.services.clone(),
            shutdown.clone(),
            self.drain.clone(),
        );
        let (endpoint, state, timeout) = (&self.endpoint, &self.drain, self.drain_timeout);
        let drain = async {
            shutdown.cancelled().await;
            state.draining.cancel();
            // New end-to-end connections are refused from now on.
            endpoint.set_server_config(None);
            if !timeout.is_zero() {
                postern_net::runtime::drain::drain(&state.streams, timeout, "streams").await;
            }
            close.cancel();
        };
        tokio::join!(accept, ctl, drain);
        self.endpoint.close(
            postern_proto::msg::code::SHUTDOWN.into(),
            b"outlet shutting down",
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle())
            .await;
    }
}

struct OutletControl {
    socket: Arc<NodeSocket>,
    routes: Arc<Routes>,
    services: Vec<ServiceName>,
    relay: SocketAddr,
    draining: CancellationToken,
    /// With several relays, end-to-end connections outlive the loss of one relay's routes:
    /// the inlet moves them to another relay's path (QUIC migration), and those that do not
    /// move end by idle timeout.
    keep_on_relay_loss: bool,
    /// Services offered at the relay's public hostname ingress.
    public: Option<Arc<crate::public::Public>>,
    all: Arc<Services>,
    drain: Drain,
}

impl ControlHandler for OutletControl {
    async fn on_connect(&self, conn: &quinn::Connection) -> Result<(), CtlError> {
        let msg = Ctl::Register {
            services: self.services.clone(),
        };
        match exchange::request(conn, &msg, CTL_TIMEOUT).await? {
            Ctl::Registered { services } => {
                tracing::info!(?services, "services registered with relay");
                if let Some(public) = &self.public {
                    register_public(conn, public.names()).await?;
                }
                Ok(())
            }
            other => Err(CtlError::Codec(
                postern_proto::codec::CodecError::Malformed(format!(
                    "unexpected answer to Register: {other:?}"
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
                if !self.services.contains(&service) {
                    return Ctl::Error {
                        message: format!("this outlet does not serve {service}"),
                    };
                }
                if self.draining.is_cancelled() {
                    // The relay tries another outlet of the service.
                    return Ctl::Error {
                        message: "this outlet is shutting down".into(),
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
                self.socket.remove_route(route);
                Ctl::Ack
            }
            Ctl::Revoked { name } => {
                tracing::warn!(node = %name, "identity revoked; closing its connections and revoking its leases");
                self.routes.close_inlet(&name);
                revoke_leases(&self.all, &name);
                Ctl::Ack
            }
            Ctl::Heartbeat { seq } => Ctl::HeartbeatAck { seq },
            other => Ctl::Error {
                message: format!("unexpected push {other:?}"),
            },
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

    fn on_disconnect(&self, relay: SocketAddr) {
        for route in self.socket.remove_routes_via(relay) {
            if self.keep_on_relay_loss {
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
        Ctl::Error { message } => {
            tracing::error!(%message, "the relay refused our public services");
        }
        other => {
            tracing::error!(answer = ?std::mem::discriminant(&other), "unexpected answer to RegisterPublic");
        }
    }
    Ok(())
}
