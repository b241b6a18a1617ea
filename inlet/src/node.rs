//! The inlet node and its handle: the uplink (socket, endpoint, one control connection per
//! relay, see [`postern_net::uplink`]), the local listeners ([`crate::listen`]), the pool of
//! end-to-end connections ([`crate::pool`]) and the lease clients ([`crate::lease`]), started
//! together and drained together.

use crate::error::InletError;
use crate::lease::LeaseState;
use crate::listen::{accept_loop, FailureLog, InletService, Mode, ServiceKind};
use crate::migrate::InletControl;
use crate::pool::Pool;
use crate::tls::TlsAcceptor;
use postern_net::control::exchange;
use postern_net::transport::endpoint::EndpointError;
use postern_net::transport::relay_path::{RelayTarget, TransportSettings, TransportStatus};
use postern_net::uplink::{ControlWatch, Role, Uplink};
use postern_proto::lease::LeaseGrant;
use postern_proto::msg::{HandOutMsg, StreamOpen};
use postern_proto::name::ServiceName;
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What an inlet needs to run.
pub struct InletOptions {
    pub relay: RelayTarget,
    pub identity: Identity,
    pub roots: Arc<RootCertStore>,
    pub services: Vec<InletService>,
}

/// A bound inlet, ready to [`run`](Inlet::run).
pub struct Inlet {
    uplink: Arc<Uplink>,
    pool: Arc<Pool>,
    listeners: Vec<(ServiceName, ServiceKind, TcpListener)>,
    leases: Vec<(ServiceName, watch::Sender<LeaseState>)>,
    tls: HashMap<ServiceName, TlsAcceptor>,
    /// Most client connections per listener (`None`: the default, fitted to the fd limit).
    max_connections: Option<usize>,
    /// UDP listeners (see [`crate::udp`]) and their flows' idle timeout.
    udp: Vec<(ServiceName, tokio::net::UdpSocket, Duration)>,
    /// New listener lists to put in force while running (see [`Inlet::set_reloads`]).
    reloads: Option<tokio::sync::mpsc::Receiver<Vec<ListenerSpec>>>,
}

/// One listener as a reload asks for it.
#[derive(Clone)]
pub struct ListenerSpec {
    pub service: InletService,
    /// `Some(idle timeout)` for a UDP listener.
    pub udp_idle: Option<Duration>,
    pub tls: Option<TlsAcceptor>,
}

impl ListenerSpec {
    /// What identifies a listener across reloads: its address and protocol.
    fn key(&self) -> (SocketAddr, bool) {
        (self.service.listen, self.udp_idle.is_some())
    }

    /// What must not change under one key without a restart.
    fn shape(&self) -> (ServiceName, ServiceKind, bool) {
        (
            self.service.name.clone(),
            self.service.kind,
            self.tls.is_some(),
        )
    }
}

/// Inspect a running inlet (tests, the metrics endpoint).
#[derive(Clone)]
pub struct InletHandle {
    uplink: Arc<Uplink>,
    pool: Arc<Pool>,
    /// Each leased service's lease, as its clients' requests see it.
    leases: Vec<(ServiceName, watch::Receiver<LeaseState>)>,
    /// Every service this inlet offers.
    services: Vec<ServiceName>,
}

/// How long a hand-out waits for the outlet's answer (within the admin socket's 30 s).
const HAND_OUT_TIMEOUT: Duration = Duration::from_secs(25);

impl InletHandle {
    /// The node's socket: its direct-path counters, and which routes run direct
    /// ([`NodeSocket::path_counts`](postern_net::transport::node_socket::NodeSocket::path_counts)).
    pub fn socket(&self) -> &Arc<postern_net::transport::node_socket::NodeSocket> {
        self.uplink.socket()
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

    /// Uses a renewed identity for every connection made from now on.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), EndpointError> {
        self.uplink.set_identity(identity)
    }

    /// Caps the end-to-end connections per service (default: half the cores, at most 8); takes
    /// effect for the next stream.
    pub fn set_pool_size(&self, connections: usize) {
        self.pool.set_size(connections);
    }

    /// Key updates made on end-to-end connections so far.
    pub fn key_updates(&self) -> u64 {
        self.pool.key_updates()
    }

    /// Waits until the control connection to the relay is up.
    pub async fn wait_connected(&mut self, timeout: Duration) -> bool {
        self.uplink.wait_connected(timeout).await
    }

    /// Open client connections.
    pub fn open_streams(&self) -> usize {
        self.uplink.drain().streams.len()
    }

    /// True while a control connection to a relay is up.
    pub fn relay_connected(&self) -> bool {
        self.uplink.relay_connected()
    }

    /// Which transport (UDP or TLS/TCP) reaches each connected relay.
    pub fn transports(&self) -> &TransportStatus {
        self.uplink.transports()
    }

    /// End-to-end connections moved to another relay's path so far.
    pub fn migrations(&self) -> u64 {
        self.pool.migrations()
    }

    /// Asks `service`'s outlet (default: this inlet's only `kind = "influxdb"` service, or its
    /// only service) for this
    /// identity's own credential over the end-to-end connection (see [`crate::admin`]): with
    /// `fresh` a new lease, without the one last handed out. Returns the service, the lease
    /// profile and the grant, or why not (never a secret).
    pub async fn hand_out(
        &self,
        service: Option<&ServiceName>,
        fresh: bool,
    ) -> Result<(ServiceName, String, LeaseGrant), String> {
        let service = self.hand_out_service(service)?;
        let conn = self
            .pool
            .connection(&service)
            .await
            .map_err(|e| e.explain(&service, self.uplink.transports()))?;
        let ask = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let open = StreamOpen::HandOut {
                service: service.clone(),
                fresh,
            };
            exchange::write_message(&mut send, &open)
                .await
                .map_err(|e| e.to_string())?;
            exchange::read_frame::<HandOutMsg>(&mut recv)
                .await
                .map_err(|e| {
                    format!(
                        "the outlet refused the request or closed the stream ({e}); an outlet                          that predates `lease create`, or whose `allow` refuses this identity,                          does this"
                    )
                })
        };
        let msg = tokio::time::timeout(HAND_OUT_TIMEOUT, ask)
            .await
            .map_err(|_| {
                format!(
                    "the outlet did not answer within {} s",
                    HAND_OUT_TIMEOUT.as_secs()
                )
            })??;
        match msg {
            HandOutMsg::Granted { grant, profile } => {
                tracing::info!(%service, %profile, lease = %grant.lease_id, "own lease handed out by the outlet");
                Ok((service, profile, grant))
            }
            HandOutMsg::Refused { reason } => Err(format!("the outlet refused: {reason}")),
        }
    }

    fn hand_out_service(&self, service: Option<&ServiceName>) -> Result<ServiceName, String> {
        let names = |list: &mut dyn Iterator<Item = &ServiceName>| {
            list.map(ServiceName::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match service {
            Some(s) if self.services.contains(s) => Ok(s.clone()),
            Some(s) => Err(format!(
                "this inlet has no service {s} (it has: {})",
                names(&mut self.services.iter())
            )),
            None => match (self.leases.as_slice(), self.services.as_slice()) {
                ([(one, _)], _) | ([], [one]) => Ok(one.clone()),
                ([], _) => Err(format!(
                    "this inlet has no `kind = \"influxdb\"` service; name one of its services \
                     ({}) with --service",
                    names(&mut self.services.iter())
                )),
                (many, _) => Err(format!(
                    "this inlet has several `kind = \"influxdb\"` services ({}); name one with \
                     --service",
                    names(&mut many.iter().map(|(s, _)| s))
                )),
            },
        }
    }

    /// Whether the inlet can serve clients (the `/readyz` answer): not while the uplink is not
    /// ready, nor while a leased service holds no lease (every request to it gets a 503 then;
    /// the reason says which service and why).
    pub fn readiness(&self) -> Result<(), String> {
        self.uplink.readiness()?;
        for (service, lease) in &self.leases {
            match &*lease.borrow() {
                LeaseState::Missing { reason } => {
                    return Err(format!(
                        "service {service} can only answer 503 (no lease): {reason}"
                    ))
                }
                LeaseState::Refused { reason } => {
                    return Err(format!(
                        "service {service} can only answer 403 (no lease for this client): {reason}"
                    ))
                }
                LeaseState::Held(_) | LeaseState::AtOutlet => {}
            }
        }
        Ok(())
    }
}

impl Inlet {
    /// Binds the socket, endpoint and the local listeners.
    pub async fn bind(opts: InletOptions) -> Result<Self, InletError> {
        let uplink = Arc::new(Uplink::bind(
            opts.relay,
            &opts.identity,
            opts.roots,
            Role::Client,
        )?);
        let mut listeners = Vec::new();
        for svc in &opts.services {
            let l = TcpListener::bind(svc.listen)
                .await
                .map_err(|source| InletError::Listen {
                    service: svc.name.clone(),
                    addr: svc.listen,
                    source,
                })?;
            listeners.push((svc.name.clone(), svc.kind, l));
        }
        let leases = opts
            .services
            .iter()
            .filter(|s| s.kind == ServiceKind::Influxdb)
            .map(|s| (s.name.clone(), watch::channel(LeaseState::waiting()).0))
            .collect();
        Ok(Self {
            pool: Arc::new(Pool::new(uplink.clone())),
            uplink,
            listeners,
            leases,
            tls: HashMap::new(),
            max_connections: None,
            udp: Vec::new(),
            reloads: None,
        })
    }

    /// Adds a UDP listener for `service` on `listen` (see [`crate::udp`]): each client
    /// address is a flow, ended after `idle` without a datagram either way. The outlet must
    /// offer the service with `protocol = "udp"`. Call before [`run`](Self::run).
    pub async fn bind_udp(
        &mut self,
        service: ServiceName,
        listen: SocketAddr,
        idle: Duration,
    ) -> Result<(), InletError> {
        let socket = tokio::net::UdpSocket::bind(listen)
            .await
            .map_err(|source| InletError::Listen {
                service: service.clone(),
                addr: listen,
                source,
            })?;
        self.udp.push((service, socket, idle));
        Ok(())
    }

    /// Takes new listener lists from `rx` while running: listeners that are new are bound and
    /// served, those no longer listed stop accepting (connections open on them finish as they
    /// would), the others are untouched. A listener whose service, kind or TLS changed under
    /// the same address, or a new `kind = "influxdb"` one (it needs a lease), is refused with
    /// an error in the log; so is one that cannot be bound. Call before [`run`](Self::run).
    pub fn set_reloads(&mut self, rx: tokio::sync::mpsc::Receiver<Vec<ListenerSpec>>) {
        self.reloads = Some(rx);
    }

    /// The local address of a service's UDP listener.
    pub fn udp_addr(&self, service: &ServiceName) -> Option<SocketAddr> {
        self.udp
            .iter()
            .find(|(s, _, _)| s == service)
            .and_then(|(_, sock, _)| sock.local_addr().ok())
    }

    /// Caps each listener's open client connections (default
    /// [`DEFAULT_MAX_CONNECTIONS`](postern_net::runtime::limit::DEFAULT_MAX_CONNECTIONS); either is
    /// lowered to fit the open-file limit). Connections over the cap are closed at once, or,
    /// where the client speaks first (`kind = "influxdb"`, TLS), make room by closing the
    /// oldest connection that has not sent a byte yet. Call before [`run`](Self::run).
    pub fn set_max_connections(&mut self, max: usize) {
        self.max_connections = Some(max);
    }

    /// After shutdown is asked for, stop accepting client connections and let open ones finish
    /// for up to `timeout` (keeping the relay connection and leases up meanwhile) before
    /// closing. Default: zero, close at once.
    pub fn set_drain_timeout(&mut self, timeout: Duration) {
        self.uplink.set_drain_timeout(timeout);
    }

    /// Chooses how relays are reached: UDP, TLS/TCP, or UDP with fallback to TLS/TCP (the
    /// default). Call before [`run`](Self::run).
    pub fn set_transport(&mut self, transport: TransportSettings) {
        self.uplink.set_transport(transport);
    }

    /// Uses `relay` too: new end-to-end connections go through the first relay (in the order
    /// given) whose control connection is up, and a connection whose relay goes away moves to
    /// another one. Call before [`run`](Self::run).
    pub fn add_relay(&mut self, relay: RelayTarget) {
        self.uplink.add_relay(relay);
    }

    /// Serves `service`'s listener with TLS (see [`crate::tls`]): each accepted connection is
    /// handshaken first, then served as a plain one. False if there is no such service.
    pub fn set_tls(&mut self, service: &ServiceName, acceptor: TlsAcceptor) -> bool {
        let known = self.listeners.iter().any(|(s, _, _)| s == service);
        if known {
            self.tls.insert(service.clone(), acceptor);
        }
        known
    }

    /// Sets when end-to-end traffic keys are rotated (default: every GiB or hour).
    pub fn set_key_budget(&self, budget: postern_net::transport::rekey::KeyBudget) {
        self.pool.set_key_budget(budget);
    }

    /// The local address of a service's listener.
    pub fn listen_addr(&self, service: &ServiceName) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(s, _, _)| s == service)
            .and_then(|(_, _, l)| l.local_addr().ok())
    }

    /// A handle for inspection.
    pub fn handle(&self) -> InletHandle {
        InletHandle {
            uplink: self.uplink.clone(),
            pool: self.pool.clone(),
            leases: self
                .leases
                .iter()
                .map(|(s, tx)| (s.clone(), tx.subscribe()))
                .collect(),
            services: self.listeners.iter().map(|(s, _, _)| s.clone()).collect(),
        }
    }

    /// Runs until `shutdown`, then drains (see [`set_drain_timeout`](Self::set_drain_timeout)).
    pub async fn run(self, shutdown: CancellationToken) {
        // Cancelled once draining is over: closes the relay connection and the lease clients.
        let close = CancellationToken::new();
        let handler = Arc::new(InletControl {
            pool: self.pool.clone(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        let mut lease_rx = HashMap::new();
        for (service, tx) in self.leases {
            lease_rx.insert(service.clone(), tx.subscribe());
            tasks.spawn(crate::lease::run(
                self.pool.clone(),
                service,
                tx,
                close.clone(),
            ));
        }
        let failures = Arc::new(FailureLog::default());
        // Per listener, by (address, UDP?): its shape and the token that stops it.
        let mut running: Running = HashMap::new();
        for (service, kind, listener) in self.listeners {
            let stop = shutdown.child_token();
            // Not a child of `shutdown`: the drain lets open connections finish.
            let conns = CancellationToken::new();
            if let Ok(addr) = listener.local_addr() {
                running.insert(
                    (addr, false),
                    Listening {
                        shape: (service.clone(), kind, self.tls.contains_key(&service)),
                        stop: stop.clone(),
                        conns: conns.clone(),
                    },
                );
            }
            let mode = match kind {
                ServiceKind::Tcp => Mode::Tcp,
                ServiceKind::Influxdb => match lease_rx.get(&service) {
                    Some(rx) => Mode::Http(rx.clone()),
                    None => Mode::Tcp,
                },
            };
            let tls = self.tls.get(&service).cloned();
            let limit = postern_net::runtime::limit::ConnLimit::new(
                format!("inlet service {service}"),
                postern_net::runtime::limit::default_cap(self.max_connections),
            );
            tasks.spawn(accept_loop(
                service,
                mode,
                listener,
                self.pool.clone(),
                failures.clone(),
                stop,
                conns,
                self.uplink.drain().streams.clone(),
                tls,
                limit,
            ));
        }
        for (service, socket, idle) in self.udp {
            let stop = shutdown.child_token();
            if let Ok(addr) = socket.local_addr() {
                // A UDP listener's flows end with it.
                running.insert(
                    (addr, true),
                    Listening {
                        shape: (service.clone(), ServiceKind::Tcp, false),
                        stop: stop.clone(),
                        conns: stop.clone(),
                    },
                );
            }
            tasks.spawn(crate::udp::serve(
                service,
                socket,
                self.pool.clone(),
                idle,
                stop,
            ));
        }
        if let Some(rx) = self.reloads {
            let ctx = ReloadCtx {
                pool: self.pool.clone(),
                failures: failures.clone(),
                shutdown: shutdown.clone(),
                streams: self.uplink.drain().streams.clone(),
                max_connections: self.max_connections,
            };
            tokio::spawn(reload_listeners(rx, running, ctx));
        }
        // Once shutdown is asked for, the accept loops return, closing the listeners; the
        // uplink drains the open client connections, then closes the relay connections.
        let Some(uplink) = self.uplink.start(
            move |_| handler.clone(),
            shutdown,
            close,
            "client connections",
        ) else {
            return;
        };
        uplink.await;
        while tasks.join_next().await.is_some() {}
        self.uplink.close(b"inlet shutting down").await;
    }
}

/// What a reload needs to start listeners.
struct ReloadCtx {
    pool: Arc<Pool>,
    failures: Arc<FailureLog>,
    shutdown: CancellationToken,
    streams: tokio_util::task::TaskTracker,
    max_connections: Option<usize>,
}

/// A listener running: its service, kind and TLS, what stops its accepting (a reload removing
/// it, or shutdown), and what closes its open connections (a reload removing it only).
struct Listening {
    shape: (ServiceName, ServiceKind, bool),
    stop: CancellationToken,
    conns: CancellationToken,
}

/// Per listener, by (address, UDP?).
type Running = HashMap<(SocketAddr, bool), Listening>;

/// Puts each listener list received in force (see [`Inlet::set_reloads`]).
async fn reload_listeners(
    mut rx: tokio::sync::mpsc::Receiver<Vec<ListenerSpec>>,
    mut running: Running,
    ctx: ReloadCtx,
) {
    loop {
        let specs = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            s = rx.recv() => match s { Some(s) => s, None => return },
        };
        let wanted: HashMap<(SocketAddr, bool), &ListenerSpec> =
            specs.iter().map(|s| (s.key(), s)).collect();
        running.retain(|key, listening| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::info!(service = %listening.shape.0, addr = %key.0, udp = key.1, "listener removed by reload; closing its open connections");
                listening.stop.cancel();
                listening.conns.cancel();
            }
            keep
        });
        for (key, spec) in wanted {
            if let Some(Listening { shape, .. }) = running.get(&key) {
                if *shape != spec.shape() {
                    tracing::error!(addr = %key.0, was = %shape.0, now = %spec.service.name, "reload: a listener's service, kind or TLS changed under the same address; that takes a restart (or remove it in one reload and add it in the next)");
                }
                continue;
            }
            if spec.service.kind == ServiceKind::Influxdb {
                tracing::error!(service = %spec.service.name, "reload: a new kind = \"influxdb\" listener needs a lease client; that takes a restart");
                continue;
            }
            let stop = ctx.shutdown.child_token();
            let conns = match spec.udp_idle {
                Some(_) => stop.clone(),
                None => CancellationToken::new(),
            };
            let service = spec.service.name.clone();
            let started = match spec.udp_idle {
                Some(idle) => match tokio::net::UdpSocket::bind(spec.service.listen).await {
                    Ok(socket) => {
                        tokio::spawn(crate::udp::serve(
                            service.clone(),
                            socket,
                            ctx.pool.clone(),
                            idle,
                            stop.clone(),
                        ));
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                None => match TcpListener::bind(spec.service.listen).await {
                    Ok(listener) => {
                        let limit = postern_net::runtime::limit::ConnLimit::new(
                            format!("inlet service {service}"),
                            postern_net::runtime::limit::default_cap(ctx.max_connections),
                        );
                        tokio::spawn(accept_loop(
                            service.clone(),
                            Mode::Tcp,
                            listener,
                            ctx.pool.clone(),
                            ctx.failures.clone(),
                            stop.clone(),
                            conns.clone(),
                            ctx.streams.clone(),
                            spec.tls.clone(),
                            limit,
                        ));
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            match started {
                Ok(()) => {
                    tracing::info!(%service, addr = %key.0, udp = key.1, "listener added by reload");
                    running.insert(
                        key,
                        Listening {
                            shape: spec.shape(),
                            stop,
                            conns,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(%service, addr = %key.0, error = %e, "reload: cannot bind the new listener")
                }
            }
        }
    }
}
