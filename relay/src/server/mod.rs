//! The relay: accepts nodes' control connections, keeps the registry, grants routes, and
//! (through [`RelaySocket`]) forwards end-to-end packets.
//!
//! This file binds and runs; the work is in its children, each with one job:
//! `shared` the state they all work on, `session` one node's connection,
//! `dispatch` its control messages, `route` granting routes, `enroll` enrollment connections,
//! `revoke` revocations, `admin_ops` what the admin API reads and does.

use crate::admission::{Admission, AdmissionStats, Decision, HandshakeLimits, Pending};
use crate::authority::Authority;
use crate::fleet::embedded::Embedded;
use crate::fleet::{FleetState, Load, Member, Snapshot};
use crate::forward::tcp::{TcpError, TcpFallback};
use crate::forward::udp::{ExtraSockets, ForwardStats, RelaySocket, RouteTable, Tap};
use crate::policy::PolicySet;
use postern_net::transport::endpoint::{self, EndpointError};
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod admin_ops;
mod dispatch;
mod enroll;
mod fleet_sync;
mod health;
pub mod public_cert;
mod revoke;
mod route;
mod session;
mod shared;

pub use admin_ops::AdminOpError;
use shared::{AdminState, Shared};
pub use shared::{AdminStats, ControlStats, PolicyApplied, PublicStats, RelayHandle};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The TLS/TCP fallback could not be set up or bound.
    #[error(transparent)]
    Tcp(#[from] TcpError),
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
    /// Sockets on the UDP port, each forwarding on its own task (`forward-threads`; 1: one
    /// socket, forwarding inside quinn's receive path). See [`crate::forward::udp`].
    pub forward_threads: usize,
}

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    endpoint: quinn::Endpoint,
    /// The UDP socket, which quinn's endpoint driver owns; gone once the port is free again.
    socket_alive: std::sync::Weak<RelaySocket>,
    /// The UDP port's other sockets, forwarding on their own tasks once the relay runs.
    extra_sockets: Option<ExtraSockets>,
    shared: Arc<Shared>,
    drain_timeout: Duration,
    /// The TLS/TCP fallback for nodes without UDP (see [`crate::forward::tcp`]).
    tcp: TcpFallback,
    /// Who may start a handshake (see [`crate::admission`]).
    admission: Admission,
    /// The shared state as read at start (see [`set_fleet`](Self::set_fleet)).
    snapshot: Snapshot,
    /// How this relay registers in the fleet.
    member: Option<Member>,
}

impl Relay {
    /// Binds the relay's UDP socket and QUIC endpoint.
    pub fn bind(opts: RelayOptions) -> Result<Self, RelayError> {
        let routes = Arc::new(RouteTable::default());
        let fwd = Arc::new(ForwardStats::new(opts.forward_threads));
        let (socket, extra_sockets) = RelaySocket::bind(
            opts.listen,
            opts.forward_threads,
            routes.clone(),
            fwd.clone(),
            opts.tap,
        )
        .map_err(|source| RelayError::Bind {
            addr: opts.listen,
            source,
        })?;
        let tcp = TcpFallback::new(&opts.identity, opts.roots.clone(), socket.links())?;
        let tcp_pending = tcp.pending();
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
            extra_sockets,
            shared: Arc::new(Shared {
                fleet: Mutex::new(Arc::new(Embedded::new(opts.authority.clone(), None))),
                revoked: Mutex::new(
                    opts.authority
                        .as_ref()
                        .map(|a| a.revoked())
                        .unwrap_or_default(),
                ),
                policy: std::sync::RwLock::new(Arc::new(opts.policy)),
                registry: Mutex::default(),
                conns: Mutex::default(),
                routes,
                fwd,
                ctl: ControlStats::default(),
                next_id: AtomicU64::new(1),
                listening: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                admin: AdminState::default(),
                public: Mutex::default(),
                public_stats: Arc::default(),
                admission: admission_stats.clone(),
                waiting: Mutex::default(),
                me: Mutex::default(),
                tcp_pending,
                member_name: Mutex::default(),
                view: Mutex::default(),
                presence_changed: tokio::sync::Notify::new(),
                public_certs: Mutex::default(),
            }),
            drain_timeout: Duration::ZERO,
            tcp,
            admission: Admission::new(HandshakeLimits::default(), admission_stats),
            snapshot: Snapshot::default(),
            member: None,
        })
    }

    /// Keeps the shared state in `fleet` instead of the default (the authority's state
    /// directory, or memory): `snapshot` is its state read at start, `member` how this relay
    /// registers in the fleet. Call before [`run`](Self::run).
    pub fn set_fleet(&mut self, fleet: Arc<dyn FleetState>, snapshot: Snapshot, member: Member) {
        *self.shared.fleet.lock().unwrap_or_else(|p| p.into_inner()) = fleet;
        self.shared
            .revoked()
            .extend(snapshot.revoked.iter().cloned());
        {
            let mut drained = self.shared.admin.drained();
            for (name, d) in &snapshot.drained {
                drained.insert(
                    name.clone(),
                    shared::Drain {
                        id: None,
                        services: d.services.clone(),
                    },
                );
            }
        }
        if !snapshot.drained.is_empty() {
            tracing::info!(
                drained = snapshot.drained.len(),
                "drained nodes stay drained"
            );
        }
        self.snapshot = snapshot;
        *self.shared.me.lock().unwrap_or_else(|p| p.into_inner()) = Some(member.clone());
        *self
            .shared
            .member_name
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(member.name.clone());
        self.member = Some(member);
    }

    /// Also accepts nodes over TLS/TCP on `addr` (for networks that block UDP); returns the
    /// bound address. Call before [`run`](Self::run).
    pub fn listen_tcp(&mut self, addr: SocketAddr) -> Result<SocketAddr, RelayError> {
        Ok(self.tcp.bind(addr)?)
    }

    /// After shutdown is asked for, keep forwarding existing routes for up to `timeout` (or
    /// until none is left) before closing, while refusing new nodes and routes. Default: zero,
    /// close at once.
    pub fn set_drain_timeout(&mut self, timeout: Duration) {
        self.drain_timeout = timeout;
    }

    /// Lets outlets ask this relay (when it holds the authority) for certificates for their
    /// public hostnames under `certs.domain` (see [`public_cert`]). Call before
    /// [`run`](Self::run).
    pub fn set_public_certs(&mut self, certs: public_cert::PublicCerts) {
        *self
            .shared
            .public_certs
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(certs);
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
        // The extra sockets forward until the very end (through a drain, and while quinn closes
        // its connections); the guard stops them should this future be dropped instead.
        let fwd_stop = CancellationToken::new();
        let _fwd_guard = fwd_stop.clone().drop_guard();
        let sockets = 1 + self.extra_sockets.as_ref().map_or(0, ExtraSockets::len);
        let fwd_tasks = self
            .extra_sockets
            .take()
            .map(|e| e.spawn(fwd_stop.clone()))
            .unwrap_or_default();
        tracing::info!(addr = %postern_net::runtime::logging::local_addr(self.endpoint.local_addr()), forward_threads = sockets, "relay listening");
        if self.shared.policy().is_empty() {
            tracing::warn!(
                "no [[policy]] configured: every registration and route will be refused"
            );
        }
        let fleet = self.shared.fleet();
        let (tx, rx) = tokio::sync::watch::channel(self.snapshot.clone());
        tokio::spawn(fleet.clone().follow(tx, shutdown.clone()));
        tokio::spawn(revoke::follow_fleet(
            self.shared.clone(),
            rx,
            shutdown.clone(),
        ));
        let (view_tx, view_rx) = tokio::sync::watch::channel(Default::default());
        tokio::spawn(fleet.clone().follow_fleet(view_tx, shutdown.clone()));
        tokio::spawn(fleet_sync::follow(
            self.shared.clone(),
            view_rx,
            shutdown.clone(),
        ));
        if self.member.is_some() {
            tokio::spawn(fleet_sync::publish_presence(
                self.shared.clone(),
                shutdown.clone(),
            ));
        }
        // Membership lasts until the relay has drained, so it is stopped after the loop.
        let membership_stop = CancellationToken::new();
        let membership = self.member.take().map(|me| {
            let shared = self.shared.clone();
            let load = Arc::new(move || Load {
                nodes: shared.conns().len() as u64,
                routes: shared.routes.len() as u64,
            });
            tokio::spawn(
                fleet
                    .clone()
                    .serve_membership(me, load, membership_stop.clone()),
            )
        });
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
                session::serve_node(shared, incoming, pending, timeout)
                    .instrument(tracing::info_span!("node", %remote)),
            );
        }
        self.shared.draining.store(true, Relaxed);
        if !self.drain_timeout.is_zero() {
            self.drain().await;
        }
        self.shared.listening.store(false, Relaxed);
        membership_stop.cancel();
        if let Some(m) = membership {
            let _ = tokio::time::timeout(Duration::from_secs(3), m).await;
        }
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
        fwd_stop.cancel();
        for t in fwd_tasks {
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
    /// new connections are refused meanwhile (and new routes, see `dispatch`).
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
