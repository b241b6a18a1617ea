//! The relay: accepts nodes' control connections, keeps the registry, grants routes, and
//! (through [`RelaySocket`]) forwards end-to-end packets.

use crate::admission::{Admission, AdmissionStats, Decision, HandshakeLimits, Pending};
use crate::authority::Authority;
use crate::policy::{Action, PolicySet};
use crate::registry::{NodeId, Registry, RouteInfo};
use postern_net::control::exchange::{self, CTL_TIMEOUT};
use postern_net::relay_socket::{ForwardStats, RelaySocket, RouteTable, Tap};
use postern_net::transport::endpoint::{self, EndpointError};
use postern_proto::fwd::RouteId;
use postern_proto::msg::{Ctl, RefuseReason};
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod admin_ops;
pub use admin_ops::AdminOpError;

/// How long the relay waits for an outlet to accept a route.
const ROUTE_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How many outlets are tried for one route request.
const ROUTE_ATTEMPTS: usize = 3;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind TCP {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a relay needs to run.
pub struct RelayOptions {
    pub listen: SocketAddr,
    pub identity: Identity,
    pub roots: Arc<RootCertStore>,
    /// Key for stateless resets; keep it across restarts so peers learn of a restart at once.
    pub reset_key: Option<[u8; 32]>,
    /// Test hook that sees every forwarded packet.
    pub tap: Option<Tap>,
    /// Who may register and reach which service.
    pub policy: PolicySet,
    /// The enrollment authority, when this relay runs it (it needs the CA key).
    pub authority: Option<Arc<Authority>>,
}

/// Control-plane counters.
#[derive(Debug, Default)]
pub struct ControlStats {
    pub handshake_failures: AtomicU64,
    pub bad_messages: AtomicU64,
    pub routes_granted: AtomicU64,
    pub routes_refused: AtomicU64,
    pub nodes_connected: AtomicU64,
    /// Nodes enrolled by this relay's authority.
    pub enrollments: AtomicU64,
    /// Enrollment requests the authority refused.
    pub enrollments_refused: AtomicU64,
}

struct Shared {
    policy: PolicySet,
    authority: Option<Arc<Authority>>,
    revoked: Mutex<std::collections::BTreeSet<NodeName>>,
    registry: Mutex<Registry>,
    conns: Mutex<HashMap<NodeId, quinn::Connection>>,
    routes: Arc<RouteTable>,
    fwd: Arc<ForwardStats>,
    ctl: ControlStats,
    next_id: AtomicU64,
    /// The relay is serving (set by `run`).
    listening: AtomicBool,
    /// Shutdown has begun: no new nodes or routes, existing routes keep forwarding.
    draining: AtomicBool,
    /// What the admin API adds: connection times, drained nodes, its counters.
    admin: admin_ops::AdminState,
    /// Services outlets offer at the public hostname ingress.
    public: Mutex<crate::public::PublicRegistry>,
    /// The public ingress' counters (zero without one).
    public_stats: Arc<crate::public::PublicStats>,
    /// Handshake admission counters.
    admission: Arc<AdmissionStats>,
}

impl Shared {
    fn revoked(&self) -> MutexGuard<'_, std::collections::BTreeSet<NodeName>> {
        self.revoked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<NodeId, quinn::Connection>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conn(&self, id: NodeId) -> Option<quinn::Connection> {
        self.conns().get(&id).cloned()
    }

    fn public(&self) -> MutexGuard<'_, crate::public::PublicRegistry> {
        self.public.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A read-only view of a running relay, for tests, the bench and (later) the admin API.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
    /// The TLS/TCP fallback's counters and links.
    tcp: (
        Arc<postern_net::relay_tcp::TcpStats>,
        Arc<postern_net::transport::links::StreamLinks>,
    ),
}

impl RelayHandle {
    /// Counters of the TLS/TCP listener.
    pub fn tcp_stats(&self) -> &postern_net::relay_tcp::TcpStats {
        &self.tcp.0
    }

    /// The TLS/TCP links (their datagram counters).
    pub fn tcp_links(&self) -> &postern_net::transport::links::StreamLinks {
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

    /// Which outlets offer which services at the public ingress.
    pub(crate) fn public_registry(&self) -> MutexGuard<'_, crate::public::PublicRegistry> {
        self.shared.public()
    }

    /// The public ingress' counters.
    pub fn public_stats(&self) -> &crate::public::PublicStats {
        &self.shared.public_stats
    }

    pub(crate) fn public_stats_arc(&self) -> Arc<crate::public::PublicStats> {
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

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    endpoint: quinn::Endpoint,
    /// The UDP socket, which quinn's endpoint driver owns; gone once the port is free again.
    socket_alive: std::sync::Weak<RelaySocket>,
    shared: Arc<Shared>,
    drain_timeout: Duration,
    /// The TLS/TCP fallback for nodes without UDP (see [`crate::tcp`]).
    tcp: crate::tcp::TcpFallback,
    /// Who may start a handshake (see [`crate::admission`]).
    admission: Admission,
}

impl Relay {
    /// Binds the relay's UDP socket and QUIC endpoint.
    pub fn bind(opts: RelayOptions) -> Result<Self, RelayError> {
        let routes = Arc::new(RouteTable::default());
        let fwd = Arc::new(ForwardStats::default());
        let socket = RelaySocket::bind(opts.listen, routes.clone(), fwd.clone(), opts.tap)
            .map_err(|source| RelayError::Bind {
                addr: opts.listen,
                source,
            })?;
        let tcp = crate::tcp::TcpFallback::new(&opts.identity, opts.roots.clone(), socket.links())?;
        let server = endpoint::relay_server(&opts.identity, opts.roots)?;
        let socket = Arc::new(socket);
        let socket_alive = Arc::downgrade(&socket);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint::endpoint_config(opts.reset_key.as_ref()),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| RelayError::Bind {
            addr: opts.listen,
            source,
        })?;
        let admission_stats = Arc::new(AdmissionStats::default());
        Ok(Self {
            endpoint,
            socket_alive,
            shared: Arc::new(Shared {
                revoked: Mutex::new(
                    opts.authority
                        .as_ref()
                        .map(|a| a.revoked())
                        .unwrap_or_default(),
                ),
                policy: opts.policy,
                authority: opts.authority,
                registry: Mutex::default(),
                conns: Mutex::default(),
                routes,
                fwd,
                ctl: ControlStats::default(),
                next_id: AtomicU64::new(1),
                listening: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                admin: admin_ops::AdminState::default(),
                public: Mutex::default(),
                public_stats: Arc::default(),
                admission: admission_stats.clone(),
            }),
            drain_timeout: Duration::ZERO,
            tcp,
            admission: Admission::new(HandshakeLimits::default(), admission_stats),
        })
    }

    /// Also accepts nodes over TLS/TCP on `addr` (for networks that block UDP); returns the
    /// bound address. Call before [`run`](Self::run).
    pub fn listen_tcp(&mut self, addr: SocketAddr) -> Result<SocketAddr, RelayError> {
        self.tcp.bind(addr)
    }

    /// After shutdown is asked for, keep forwarding existing routes for up to `timeout` (or
    /// until none is left) before closing, while refusing new nodes and routes. Default: zero,
    /// close at once.
    pub fn set_drain_timeout(&mut self, timeout: Duration) {
        self.drain_timeout = timeout;
    }

    /// Replaces the default bounds on QUIC handshakes. Call before [`run`](Self::run).
    pub fn set_handshake_limits(&mut self, limits: HandshakeLimits) {
        self.admission = Admission::new(limits, self.shared.admission.clone());
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// A handle for inspecting the running relay.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            shared: self.shared.clone(),
            tcp: (self.tcp.stats(), self.tcp.links()),
        }
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(addr = ?self.endpoint.local_addr().ok(), "relay listening");
        if self.shared.policy.is_empty() {
            tracing::warn!(
                "no [[policy]] configured: every registration and route will be refused"
            );
        }
        if let Some(authority) = self.shared.authority.clone() {
            tokio::spawn(watch_revocations(
                self.shared.clone(),
                authority,
                shutdown.clone(),
            ));
        }
        let links_stop = CancellationToken::new();
        let tcp_task = self.tcp.spawn(links_stop.clone());
        postern_net::runtime::ratelog::spawn_flusher(links_stop.clone());
        self.shared.listening.store(true, Relaxed);
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = self.endpoint.accept() => i,
            };
            let Some(incoming) = incoming else { break };
            let Some((incoming, pending)) = self.admit(incoming) else {
                continue;
            };
            let shared = self.shared.clone();
            let remote = incoming.remote_address();
            let timeout = self.admission.limits().timeout;
            tokio::spawn(
                serve_node(shared, incoming, pending, timeout)
                    .instrument(tracing::info_span!("node", %remote)),
            );
        }
        self.shared.draining.store(true, Relaxed);
        if !self.drain_timeout.is_zero() {
            self.drain().await;
        }
        self.shared.listening.store(false, Relaxed);
        self.endpoint.close(
            postern_proto::msg::code::SHUTDOWN.into(),
            b"relay shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        // TLS/TCP nodes got the close above through their links; now the links go.
        links_stop.cancel();
        if let Some(t) = tcp_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        // Return only once the UDP port is released, so a relay started right after (a restart
        // in place) can bind it: quinn's driver task drops the socket once the last endpoint
        // and connection handles are gone.
        self.shared.conns().clear();
        let Relay {
            endpoint,
            socket_alive,
            ..
        } = self;
        drop(endpoint);
        let released = async {
            while socket_alive.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), released)
            .await
            .is_err()
        {
            tracing::warn!("the relay's UDP socket is still open after shutdown");
        }
        tracing::info!("relay stopped");
    }
}

impl Relay {
    /// Applies handshake admission to one attempt; a pending slot when it may go on. Nothing
    /// here allocates per attempt: a Retry and a drop leave no state behind.
    fn admit(&self, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Pending)> {
        let remote = postern_net::transport::udp::canonical(incoming.remote_address());
        let d = self.admission.decide(
            remote.ip(),
            incoming.remote_address_validated(),
            incoming.may_retry(),
            std::time::Instant::now(),
        );
        self.admission.count(d);
        match d {
            Decision::Accept => Some((incoming, self.admission.admit())),
            Decision::Retry => {
                // `decide` only asks for a Retry where one is allowed; if quinn disagrees,
                // drop the attempt rather than keep state for it.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                None
            }
            Decision::Ignore(reason) => {
                incoming.ignore();
                postern_net::refusal!(
                    warn,
                    reason,
                    "QUIC handshakes refused before any state was kept",
                    src = %remote
                );
                None
            }
        }
    }

    /// Keeps forwarding the routes in place until they are gone or the drain deadline passes;
    /// new connections are refused meanwhile (and new routes, see `handle`).
    async fn drain(&self) {
        self.endpoint.set_server_config(None);
        let routes = self.shared.routes.len();
        if routes == 0 {
            return;
        }
        tracing::info!(routes, deadline = ?self.drain_timeout, "draining: forwarding existing routes, refusing new nodes and routes");
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        while !self.shared.routes.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match self.shared.routes.len() {
            0 => tracing::info!("drained: no route left"),
            left => tracing::warn!(left, "drain deadline passed; closing the routes still open"),
        }
    }
}

async fn serve_node(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    pending: Pending,
    timeout: Duration,
) {
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared.ctl.handshake_failures.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "handshake_failed", "control handshakes failed", error = %e);
            return;
        }
        Err(_) => {
            shared.ctl.handshake_failures.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "handshake_timeout", "control handshakes timed out");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() == Some(postern_proto::ticket::ALPN_ENROLL) {
        // Unauthenticated until the ticket is checked: the exchange keeps its pending slot.
        serve_enrollment(&shared, conn, timeout).await;
        drop(pending);
        return;
    }
    let name = match postern_net::transport::endpoint::peer_name(&conn) {
        Ok(n) => n,
        Err(e) => {
            shared.ctl.handshake_failures.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "no_node_name", "node certificates naming no node", error = %e);
            conn.close(
                postern_proto::msg::code::NOT_ALLOWED.into(),
                b"no node name",
            );
            return;
        }
    };
    if shared.revoked().contains(&name) {
        shared.ctl.handshake_failures.fetch_add(1, Relaxed);
        postern_net::refusal!(warn, "revoked_identity", "refusing revoked identities", node = %name);
        conn.close(
            postern_proto::msg::code::NOT_ALLOWED.into(),
            b"identity revoked",
        );
        return;
    }
    if shared.admin.is_drained(&name) {
        tracing::debug!(node = %name, "refusing a drained node");
        conn.close(
            postern_proto::msg::code::DRAINED.into(),
            b"node drained by the relay operator",
        );
        return;
    }
    // Authenticated: the slot is for handshakes, not for connected nodes.
    drop(pending);
    let attrs = postern_net::transport::endpoint::peer_attributes(&conn);
    let id = shared.next_id.fetch_add(1, Relaxed);
    let replaced = {
        let mut reg = shared.registry();
        let old = reg.by_name(&name);
        reg.connect(id, name.clone());
        reg.set_attrs(id, attrs.clone());
        old
    };
    if let Some(old) = replaced {
        // The same node reconnected before its old connection timed out.
        if let Some(c) = shared.conn(old) {
            c.close(
                postern_proto::msg::code::OK.into(),
                b"replaced by a newer connection",
            );
        }
        forget_node(&shared, old);
    }
    shared.conns().insert(id, conn.clone());
    shared.admin.connected(id);
    shared.ctl.nodes_connected.fetch_add(1, Relaxed);
    tracing::info!(node = %name, ?attrs, "node connected");

    let reason = loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => break e,
        };
        let shared = shared.clone();
        let conn = conn.clone();
        tokio::spawn(
            async move {
                let answer =
                    match tokio::time::timeout(CTL_TIMEOUT, exchange::read_message::<Ctl>(&mut recv))
                        .await
                    {
                        Ok(Ok(msg)) => handle(&shared, id, &conn, msg).await,
                        Ok(Err(e)) => {
                            shared.ctl.bad_messages.fetch_add(1, Relaxed);
                            postern_net::refusal!(warn, "bad_control_message", "bad control messages", error = %e);
                            Ctl::Error {
                                message: e.to_string(),
                            }
                        }
                        Err(_) => {
                            shared.ctl.bad_messages.fetch_add(1, Relaxed);
                            postern_net::refusal!(warn, "control_message_timeout", "control streams opened but no message arrived in time");
                            Ctl::Error {
                                message: "timed out waiting for a message".into(),
                            }
                        }
                    };
                if let Err(e) = exchange::write_message(&mut send, &answer).await {
                    tracing::debug!(error = %e, "could not answer control message");
                }
            }
            .in_current_span(),
        );
    };
    tracing::info!(node = %name, reason = %reason, "node disconnected");
    shared.ctl.nodes_connected.fetch_sub(1, Relaxed);
    shared.conns().remove(&id);
    shared.admin.disconnected(id);
    forget_node(&shared, id);
}

/// Drops a node's registrations and routes, and tells the other end of each route.
fn forget_node(shared: &Arc<Shared>, id: NodeId) {
    shared.public().remove_node(id);
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

async fn handle(shared: &Arc<Shared>, id: NodeId, conn: &quinn::Connection, msg: Ctl) -> Ctl {
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
            Ctl::Registered { services }
        }
        Ctl::RegisterPublic { services } => register_public(shared, id, services),
        Ctl::RouteRequest { .. } if shared.draining.load(Relaxed) => {
            shared.ctl.routes_refused.fetch_add(1, Relaxed);
            Ctl::Error {
                message: "the relay is shutting down".into(),
            }
        }
        Ctl::RouteRequest { .. } if admin_ops::node_drained(shared, id) => {
            shared.ctl.routes_refused.fetch_add(1, Relaxed);
            Ctl::Error {
                message: "this node is drained by the relay operator".into(),
            }
        }
        Ctl::RouteRequest { service } => {
            let answer = grant_route(shared, id, conn, service).await;
            match &answer {
                Ctl::RouteGranted { .. } => shared.ctl.routes_granted.fetch_add(1, Relaxed),
                _ => shared.ctl.routes_refused.fetch_add(1, Relaxed),
            };
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

async fn grant_route(
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
            .policy
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
    let mut last_error = String::from("no outlet answered");
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
                tracing::info!(%service, inlet = %inlet_name, outlet = %outlet_name, "route granted");
                tracing::debug!(route = %route.short(), %service, "granted route");
                return Ctl::RouteGranted {
                    route,
                    service,
                    outlet: outlet_name,
                };
            }
            Ok(Ctl::Error { message }) => last_error = message,
            Ok(other) => last_error = format!("unexpected answer {other:?}"),
            Err(e) => last_error = e.to_string(),
        }
        tracing::warn!(%service, outlet = %outlet_name, error = %last_error, "outlet did not accept route");
    }
    refuse(RefuseReason::OutletRefused(last_error))
}

/// Serves one enrollment connection: one request, one answer.
async fn serve_enrollment(shared: &Arc<Shared>, conn: quinn::Connection, timeout: Duration) {
    let Some(authority) = shared.authority.clone() else {
        postern_net::refusal!(
            warn,
            "enroll_no_authority",
            "enrollment attempts, but this relay does not run the authority"
        );
        conn.close(
            postern_proto::msg::code::NOT_ALLOWED.into(),
            b"no authority here",
        );
        return;
    };
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let req: postern_proto::ticket::EnrollRequest = exchange::read_message(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        let answer = tokio::task::spawn_blocking(move || authority.enroll(&req))
            .await
            .map_err(|e| e.to_string())?;
        match &answer {
            postern_proto::ticket::EnrollResponse::Enrolled { .. } => {
                shared.ctl.enrollments.fetch_add(1, Relaxed)
            }
            postern_proto::ticket::EnrollResponse::Refused { .. } => {
                shared.ctl.enrollments_refused.fetch_add(1, Relaxed)
            }
        };
        exchange::write_message(&mut send, &answer)
            .await
            .map_err(|e| e.to_string())?;
        // Let the answer reach the node before the connection goes away.
        let _ = tokio::time::timeout(timeout, conn.closed()).await;
        Ok::<_, String>(())
    };
    // The request must come within the handshake timeout; signing and the answer's delivery
    // get as long again.
    match tokio::time::timeout(timeout * 3, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            shared.ctl.bad_messages.fetch_add(1, Relaxed);
            postern_net::refusal!(warn, "enroll_failed", "enrollment exchanges failed", error = %e);
        }
        Err(_) => {
            conn.close(postern_proto::msg::code::NOT_ALLOWED.into(), b"too slow");
            postern_net::refusal!(warn, "enroll_timeout", "enrollment exchanges timed out");
        }
    }
}

/// Applies revocations made with `postern-relay identity revoke` within a fraction of a second:
/// the node's control connection and routes are dropped, and outlets are told so they close
/// the node's end-to-end connections.
async fn watch_revocations(
    shared: Arc<Shared>,
    authority: Arc<Authority>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let a = authority.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || a.revoked()).await else {
            continue;
        };
        let newly: Vec<NodeName> = {
            let mut known = shared.revoked();
            let newly = now.difference(&known).cloned().collect();
            *known = now;
            newly
        };
        for name in newly {
            apply_revocation(&shared, &name);
        }
    }
}

/// Cuts a newly revoked identity off: its control connection and routes are dropped, and the
/// other nodes are told so they close its end-to-end connections. Returns whether it was
/// connected.
fn apply_revocation(shared: &Arc<Shared>, name: &NodeName) -> bool {
    tracing::info!(target: "postern::audit", event = "revocation", node = %name, "identity revoked");
    let (victim, outlets) = {
        let reg = shared.registry();
        let victim = reg.by_name(name);
        let outlets: Vec<NodeId> = reg.ids();
        (victim, outlets)
    };
    if let Some(id) = victim {
        if let Some(c) = shared.conn(id) {
            c.close(
                postern_proto::msg::code::NOT_ALLOWED.into(),
                b"identity revoked",
            );
        }
        forget_node(shared, id);
    }
    for id in outlets {
        if Some(id) == victim {
            continue;
        }
        if let Some(c) = shared.conn(id) {
            let msg = Ctl::Revoked { name: name.clone() };
            tokio::spawn(async move {
                let _ = exchange::request(&c, &msg, CTL_TIMEOUT).await;
            });
        }
    }
    victim.is_some()
}
