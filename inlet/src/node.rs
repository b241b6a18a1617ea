//! The inlet node: local listeners, one control connection to the relay, and one end-to-end
//! connection per service's outlet, created on demand and replaced when its route goes away.

use crate::lease::{CredentialSource, LeaseState};
use crate::tls::{ClientStream, TlsAcceptor};
use postern_net::control::connection::{self, current_config, ControlHandler, SharedClientConfig};
use postern_net::control::exchange::{self, CtlError, CTL_TIMEOUT};
use postern_net::stream::http_proxy;
use postern_net::stream::splice;
use postern_net::transport::endpoint::{self, EndpointError};
use postern_net::transport::node_socket::NodeSocket;
use postern_net::transport::relay_path::RelayTarget;
use postern_net::transport::relay_path::{RelayPath, TransportSettings, TransportStatus};
use postern_proto::fwd::RouteId;
use postern_proto::http::FilterConfig;
use postern_proto::msg::{code, Ctl, RefuseReason, StreamOpen};
use postern_proto::name::{NodeName, ServiceName};
use postern_proto::tls::Identity;
use rustls::RootCertStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How long a client connection waits for the relay to be reachable before it is closed.
pub const RELAY_WAIT: Duration = Duration::from_secs(5);
/// How long setting up an end-to-end connection may take.
pub const E2E_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an inlet could not start.
#[derive(Debug, thiserror::Error)]
pub enum InletError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot bind UDP socket: {0}")]
    Bind(std::io::Error),
    #[error("cannot listen on {addr} for {service}: {source}")]
    Listen {
        service: ServiceName,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a client connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the relay is not reachable")]
    NoRelay,
    #[error("route refused by the relay: {0}")]
    Refused(postern_proto::msg::RefuseReason),
    #[error("control request failed: {0}")]
    Control(#[from] CtlError),
    #[error("unexpected answer from the relay")]
    Unexpected,
    #[error("end-to-end connection to outlet {outlet} failed: {reason}")]
    E2e { outlet: String, reason: String },
    #[error("cannot open a stream: {0}")]
    Stream(String),
    #[error("relay {relay} routes to another outlet ({outlet}) than the connection's")]
    OtherOutlet { relay: SocketAddr, outlet: NodeName },
}

/// What a local listener carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// Any TCP protocol, passed through untouched.
    #[default]
    Tcp,
    /// InfluxDB's HTTP API: requests go through the HTTP filter, which puts the leased
    /// credential streamed from the outlet in place of whatever the client sent.
    Influxdb,
}

/// One local listener.
#[derive(Debug, Clone)]
pub struct InletService {
    pub name: ServiceName,
    pub listen: SocketAddr,
    pub kind: ServiceKind,
}

/// What an inlet needs to run.
pub struct InletOptions {
    pub relay: RelayTarget,
    pub identity: Identity,
    pub roots: Arc<RootCertStore>,
    pub services: Vec<InletService>,
}

/// How long after connecting to a relay a refusal for an unknown service, or one with no outlet
/// connected, is taken as "the outlets have not re-registered yet" and the route asked for again.
/// A relay that restarts forgets every registration, and outlets take a moment to come back.
pub const OUTLET_GRACE: Duration = Duration::from_secs(3);

/// How long a connection whose relay went away waits for another relay to move to.
pub const MIGRATE_WAIT: Duration = Duration::from_secs(5);

struct E2e {
    route: RouteId,
    /// The relay the route goes through.
    relay: SocketAddr,
    /// The address the connection was made to; it stays while the route under it changes.
    virt: SocketAddr,
    outlet: NodeName,
    /// Up to [`pool_size`] QUIC connections over the route: they share its addresses (the
    /// relay tells them apart by nothing, quinn by connection ID), so a move takes them all.
    conns: Vec<Pooled>,
}

impl E2e {
    /// Drops connections that have closed; false when none is left.
    fn prune(&mut self) -> bool {
        self.conns.retain(|p| p.conn.close_reason().is_none());
        !self.conns.is_empty()
    }

    /// Closes every connection of the pool (their route is gone).
    fn close(&self) {
        for p in &self.conns {
            p.conn.close(code::ROUTE_CLOSED.into(), b"route closed");
        }
    }
}

/// One end-to-end connection and the number of client streams it carries now.
struct Pooled {
    conn: quinn::Connection,
    active: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pooled {
    fn new(conn: quinn::Connection) -> Self {
        Self {
            conn,
            active: Arc::default(),
        }
    }

    fn load(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Counts a client stream on its connection while it lives.
pub(crate) struct ActiveStream(Arc<std::sync::atomic::AtomicUsize>);

impl ActiveStream {
    fn on(p: &Pooled) -> Self {
        p.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(p.active.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Most end-to-end connections per service. quinn drives each connection from one task, so one
/// connection's packet work (crypto, ACKs, stream bookkeeping) runs on one core at a time: the
/// bench on 16 cores showed 8 to 1,000 concurrent streams stuck at the 1-stream rate. More
/// connections spread that work; they are opened only while every existing one carries a
/// stream, so a single client or an idle fleet still uses one. Half the cores (the other half
/// is the splice tasks' and the outlet's), at most 8; 1 on a 2-core machine.
fn pool_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() / 2)
            .unwrap_or(1)
            .clamp(1, 8)
    })
}

/// A relay and its control connection, as it comes and goes.
type RelayControl = (SocketAddr, watch::Receiver<Option<quinn::Connection>>);

fn healthy(c: &Option<quinn::Connection>) -> bool {
    c.as_ref().is_some_and(|c| c.close_reason().is_none())
}

pub(crate) struct Shared {
    socket: Arc<NodeSocket>,
    endpoint: quinn::Endpoint,
    e2e_client: SharedClientConfig,
    key_budget: Mutex<postern_net::transport::rekey::KeyBudget>,
    /// Most end-to-end connections per service (see [`pool_size`]).
    pool: std::sync::atomic::AtomicUsize,
    key_updates: Arc<std::sync::atomic::AtomicU64>,
    /// Every relay in configured order (the first healthy one is used for new routes).
    relays: std::sync::RwLock<Vec<RelayControl>>,
    /// End-to-end connections moved to another relay's path.
    migrations: Arc<std::sync::atomic::AtomicU64>,
    /// When each control connection (by `stable_id`) came up, for [`OUTLET_GRACE`].
    control_since: Mutex<HashMap<usize, std::time::Instant>>,
    /// Per service: the current end-to-end connection. The async mutex makes concurrent client
    /// connections wait for one route set-up instead of each asking for a route.
    e2e: Mutex<HashMap<ServiceName, Arc<tokio::sync::Mutex<Option<E2e>>>>>,
    /// Relays' permanent refusals of this node, so that a client can be told its identity is
    /// revoked rather than that the relay is merely unreachable.
    transport_status: Arc<TransportStatus>,
    /// Per service: when a failed client connection was last logged, and how many were not.
    failure_log: Mutex<HashMap<ServiceName, (Option<std::time::Instant>, u64)>>,
}

/// At most one log line per service this often for failed plain TCP client connections.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

impl Shared {
    /// Whether a failed client connection to `service` is to be logged: `Some(n)` for the first
    /// of a burst (with `n` failures not logged since the last line), `None` within
    /// [`FAILURE_LOG_EVERY`] of the last line, so that a client retrying in a loop does not
    /// flood the log but its cause is still said.
    fn failure_burst(&self, service: &ServiceName) -> Option<u64> {
        let mut map = self.failure_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let entry = map.entry(service.clone()).or_insert((None, 0));
        match entry.0 {
            Some(last) if now.duration_since(last) < FAILURE_LOG_EVERY => {
                entry.1 += 1;
                None
            }
            _ => {
                let more = entry.1;
                *entry = (Some(now), 0);
                Some(more)
            }
        }
    }

    /// Why `service` cannot be reached, worded for the client (the 503 body) and the log: the
    /// cause and what to check next. Never contains a secret.
    pub(crate) fn explain(&self, service: &ServiceName, e: &ServeError) -> String {
        match e {
            ServeError::NoRelay => match self.transport_status.refusals().first() {
                Some((relay, why)) => format!(
                    "the relay {relay} refuses this inlet ({why}); its identity must be \
                     enrolled again"
                ),
                None => "the relay is not reachable from this inlet".to_owned(),
            },
            ServeError::Refused(RefuseReason::NotAllowed) => {
                format!("the relay's policy does not allow this inlet to reach service {service}")
            }
            ServeError::Refused(RefuseReason::UnknownService) => format!(
                "no outlet serves service {service} (check the service name in the inlet's \
                 and the outlet's configuration)"
            ),
            ServeError::Refused(RefuseReason::NoLiveOutlet) => {
                format!("no outlet for service {service} is connected to the relay")
            }
            other => format!("service {service} cannot be reached: {other}"),
        }
    }

    fn slot(&self, service: &ServiceName) -> Arc<tokio::sync::Mutex<Option<E2e>>> {
        self.e2e_map().entry(service.clone()).or_default().clone()
    }

    fn e2e_map(
        &self,
    ) -> MutexGuard<'_, HashMap<ServiceName, Arc<tokio::sync::Mutex<Option<E2e>>>>> {
        self.e2e.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn relays(&self) -> Vec<RelayControl> {
        self.relays
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `ctl_conn` came up less than [`OUTLET_GRACE`] ago.
    fn connected_recently(&self, ctl_conn: &quinn::Connection) -> bool {
        let mut since = self.control_since.lock().unwrap_or_else(|p| p.into_inner());
        since.retain(|_, t| t.elapsed() < OUTLET_GRACE);
        since.contains_key(&ctl_conn.stable_id())
    }

    /// More than one relay is configured (connections can move between them).
    fn several_relays(&self) -> bool {
        self.relays.read().unwrap_or_else(|p| p.into_inner()).len() > 1
    }

    /// The first relay (in configured order) whose control connection is up, other than
    /// `avoid`; waits up to `timeout` for one to come up.
    async fn healthy_relay(
        &self,
        avoid: Option<SocketAddr>,
        timeout: Duration,
    ) -> Option<(SocketAddr, quinn::Connection)> {
        let relays: Vec<RelayControl> = self
            .relays()
            .into_iter()
            .filter(|(a, _)| Some(*a) != avoid)
            .collect();
        for (addr, rx) in &relays {
            if let Some(c) = rx.borrow().as_ref().filter(|c| c.close_reason().is_none()) {
                return Some((*addr, c.clone()));
            }
        }
        let mut waits = tokio::task::JoinSet::new();
        for (addr, mut rx) in relays {
            waits.spawn(async move {
                let c = rx.wait_for(healthy).await.ok()?.clone()?;
                Some((addr, c))
            });
        }
        let first = async {
            while let Some(r) = waits.join_next().await {
                if let Ok(Some(found)) = r {
                    return Some(found);
                }
            }
            None
        };
        tokio::time::timeout(timeout, first).await.ok().flatten()
    }

    /// Relays whose control connection is up now, in configured order, other than `avoid`.
    fn healthy_now(&self, avoid: Option<SocketAddr>) -> Vec<(SocketAddr, quinn::Connection)> {
        self.relays()
            .into_iter()
            .filter(|(a, _)| Some(*a) != avoid)
            .filter_map(|(a, rx)| {
                let c = rx.borrow().clone()?;
                c.close_reason().is_none().then_some((a, c))
            })
            .collect()
    }

    /// Asks the relays that are up (in configured order, other than `avoid`) for a route to
    /// `service` until one grants it (to `outlet`, when given): a relay the outlet is not
    /// connected to refuses, and the next one is asked. Waits up to `wait` for a relay to come
    /// up when none is. A policy refusal is final (relays share policies in practice).
    async fn route_via_any(
        &self,
        service: &ServiceName,
        avoid: Option<SocketAddr>,
        wait: Duration,
        outlet: Option<&NodeName>,
    ) -> Result<(SocketAddr, RouteId, NodeName), ServeError> {
        let grace_end = tokio::time::Instant::now() + OUTLET_GRACE;
        loop {
            let (result, young) = self.route_once(service, avoid, wait, outlet).await;
            match result {
                // A relay that has just (re)started has not heard from every outlet yet: ask
                // again for a little while rather than fail the client at once.
                Err(ServeError::Refused(
                    RefuseReason::UnknownService | RefuseReason::NoLiveOutlet,
                )) if young && tokio::time::Instant::now() < grace_end => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// One pass of [`route_via_any`]; also says whether the last relay asked was connected
    /// only recently (less than [`OUTLET_GRACE`] ago).
    async fn route_once(
        &self,
        service: &ServiceName,
        avoid: Option<SocketAddr>,
        wait: Duration,
        outlet: Option<&NodeName>,
    ) -> (Result<(SocketAddr, RouteId, NodeName), ServeError>, bool) {
        let mut candidates = self.healthy_now(avoid);
        if candidates.is_empty() {
            candidates.extend(self.healthy_relay(avoid, wait).await);
        }
        let mut last = ServeError::NoRelay;
        let mut young = false;
        for (relay, ctl_conn) in candidates {
            young = self.connected_recently(&ctl_conn);
            match Self::request_route(&ctl_conn, service).await {
                Ok((route, granted)) if outlet.is_none_or(|want| *want == granted) => {
                    return (Ok((relay, route, granted)), young);
                }
                // The connection's keys live with the outlet it was made to, so it cannot
                // move to another one. (The unused route goes when this node disconnects.)
                Ok((_, granted)) => {
                    last = ServeError::OtherOutlet {
                        relay,
                        outlet: granted,
                    }
                }
                Err(e @ ServeError::Refused(RefuseReason::NotAllowed)) => return (Err(e), young),
                Err(e) => {
                    tracing::debug!(%relay, error = %e, "relay cannot route; asking the next");
                    last = e;
                }
            }
        }
        (Err(last), young)
    }

    /// Asks a relay for a route to `service`.
    async fn request_route(
        ctl_conn: &quinn::Connection,
        service: &ServiceName,
    ) -> Result<(RouteId, NodeName), ServeError> {
        let answer = exchange::request(
            ctl_conn,
            &Ctl::RouteRequest {
                service: service.clone(),
            },
            CTL_TIMEOUT,
        )
        .await?;
        match answer {
            Ctl::RouteGranted { route, outlet, .. } => Ok((route, outlet)),
            Ctl::RouteRefused { reason, .. } => Err(ServeError::Refused(reason)),
            _ => Err(ServeError::Unexpected),
        }
    }

    /// A live end-to-end connection for `service`, set up if needed (lease streams).
    pub(crate) async fn connection(
        &self,
        service: &ServiceName,
    ) -> Result<quinn::Connection, ServeError> {
        self.stream_connection(service).await.map(|(c, _)| c)
    }

    /// The least busy end-to-end connection for `service` and a count of one more stream on it;
    /// opens another connection over the same route while all are busy and the pool has room.
    pub(crate) async fn stream_connection(
        &self,
        service: &ServiceName,
    ) -> Result<(quinn::Connection, ActiveStream), ServeError> {
        let slot = self.slot(service);
        let mut guard = slot.lock().await;
        if let Some(e) = guard.as_mut() {
            if !e.prune() {
                self.socket.remove_route(e.route);
                *guard = None;
            }
        }
        if let Some(e) = guard.as_mut() {
            let pool = self.pool.load(std::sync::atomic::Ordering::Relaxed);
            if e.conns.len() < pool && e.conns.iter().all(|p| p.load() > 0) {
                // Every connection carries a stream: add one over the same route.
                match self.connect_e2e(e.virt, e.outlet.as_str()).await {
                    Ok(conn) => {
                        tracing::debug!(%service, route = %e.route.short(), pool = e.conns.len() + 1, "extra end-to-end connection up");
                        e.conns.push(Pooled::new(conn));
                    }
                    Err(reason) => {
                        tracing::debug!(%service, %reason, "extra end-to-end connection failed; sharing one");
                    }
                }
            }
            let p = e
                .conns
                .iter()
                .min_by_key(|p| p.load())
                .ok_or(ServeError::Unexpected)?;
            return Ok((p.conn.clone(), ActiveStream::on(p)));
        }
        let (relay, route, outlet) = self.route_via_any(service, None, RELAY_WAIT, None).await?;
        let virt = self.socket.add_route(route, relay);
        let conn = match self.connect_e2e(virt, outlet.as_str()).await {
            Ok(c) => c,
            Err(reason) => {
                self.socket.remove_route(route);
                return Err(ServeError::E2e {
                    outlet: outlet.to_string(),
                    reason,
                });
            }
        };
        tracing::info!(%service, %outlet, "end-to-end connection up");
        tracing::debug!(%service, route = %route.short(), "end-to-end connection route");
        let pooled = Pooled::new(conn.clone());
        let active = ActiveStream::on(&pooled);
        *guard = Some(E2e {
            route,
            relay,
            virt,
            outlet,
            conns: vec![pooled],
        });
        Ok((conn, active))
    }

    /// One end-to-end QUIC connection to the outlet behind `virt`, with its key-update task.
    async fn connect_e2e(
        &self,
        virt: SocketAddr,
        outlet: &str,
    ) -> Result<quinn::Connection, String> {
        let connecting = self
            .endpoint
            .connect_with(current_config(&self.e2e_client), virt, outlet)
            .map_err(|e| e.to_string())?;
        let conn = match tokio::time::timeout(E2E_CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let budget = *self.key_budget.lock().unwrap_or_else(|p| p.into_inner());
        tokio::spawn(postern_net::transport::rekey::run(
            conn.clone(),
            budget,
            self.key_updates.clone(),
        ));
        Ok(conn)
    }

    /// Moves the end-to-end connection that used `route` (through `lost`, which is gone) to
    /// another relay: a new route to the same outlet there, bound to the same virtual address,
    /// so the QUIC connection carries on and the outlet sees a peer migration. Open streams
    /// survive; if no relay can route to the same outlet, the connection is closed and the
    /// next client connection makes a new one.
    async fn migrate(self: Arc<Self>, route: RouteId, lost: SocketAddr) {
        let slots: Vec<_> = self
            .e2e_map()
            .iter()
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect();
        for (service, slot) in slots {
            let mut guard = slot.lock().await;
            let Some(e) = guard.as_mut().filter(|e| e.route == route) else {
                continue;
            };
            if !e.prune() {
                *guard = None;
                return;
            }
            let moved = self
                .route_via_any(&service, Some(lost), MIGRATE_WAIT, Some(&e.outlet))
                .await;
            match moved {
                Ok((relay, new_route, _)) => {
                    self.socket.rebind_route(e.virt, new_route, relay);
                    tracing::info!(%service, from = %e.relay, to = %relay, "end-to-end connection moved to another relay");
                    tracing::debug!(old_route = %route.short(), route = %new_route.short(), "end-to-end connection moved");
                    e.route = new_route;
                    e.relay = relay;
                    self.migrations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// Drops the end-to-end connection using `route` (its relay route is gone).
    fn route_closed(&self, route: RouteId) {
        self.socket.remove_route(route);
        let slots: Vec<_> = self.e2e_map().values().cloned().collect();
        for slot in slots {
            if let Ok(mut guard) = slot.try_lock() {
                if guard.as_ref().is_some_and(|e| e.route == route) {
                    if let Some(e) = guard.take() {
                        e.close();
                    }
                }
            } else {
                // A set-up is in progress on this slot; a closed connection found there later
                // is replaced on next use.
                let s = slot.clone();
                tokio::spawn(async move {
                    let mut guard = s.lock().await;
                    if guard.as_ref().is_some_and(|e| e.route == route) {
                        if let Some(e) = guard.take() {
                            e.close();
                        }
                    }
                });
            }
        }
    }
}

/// A bound inlet, ready to [`run`](Inlet::run).
pub struct Inlet {
    shared: Arc<Shared>,
    client: SharedClientConfig,
    roots: Arc<RootCertStore>,
    relay: RelayTarget,
    control: watch::Sender<Option<quinn::Connection>>,
    /// Relays beyond the first (see `add_relay`).
    more_relays: Vec<(RelayTarget, watch::Sender<Option<quinn::Connection>>)>,
    transport: TransportSettings,
    transport_status: Arc<TransportStatus>,
    listeners: Vec<(ServiceName, ServiceKind, TcpListener)>,
    leases: Vec<(ServiceName, watch::Sender<LeaseState>)>,
    tls: HashMap<ServiceName, TlsAcceptor>,
    drain: Drain,
    drain_timeout: Duration,
    /// Most client connections per listener (`None`: the default, fitted to the fd limit).
    max_connections: Option<usize>,
}

/// Graceful-shutdown state: whether it has begun, and the open client connections.
#[derive(Clone, Default)]
struct Drain {
    draining: CancellationToken,
    clients: TaskTracker,
}

/// Inspect a running inlet (tests, the metrics endpoint).
#[derive(Clone)]
pub struct InletHandle {
    control: watch::Receiver<Option<quinn::Connection>>,
    shared: Arc<Shared>,
    transport_status: Arc<TransportStatus>,
    key_updates: Arc<std::sync::atomic::AtomicU64>,
    drain: Drain,
    client: SharedClientConfig,
    e2e_client: SharedClientConfig,
    roots: Arc<RootCertStore>,
}

impl InletHandle {
    /// The control connection, as it comes and goes.
    pub fn control(&self) -> watch::Receiver<Option<quinn::Connection>> {
        self.control.clone()
    }

    /// Uses a renewed identity for every connection made from now on.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), EndpointError> {
        let control = endpoint::control_client(identity, self.roots.clone())?;
        let e2e = endpoint::e2e_client(identity, self.roots.clone())?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = control;
        *self.e2e_client.write().unwrap_or_else(|p| p.into_inner()) = e2e;
        Ok(())
    }

    /// Caps the end-to-end connections per service (default: half the cores, at most 8); takes
    /// effect for the next stream.
    pub fn set_pool_size(&self, connections: usize) {
        self.shared
            .pool
            .store(connections.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Key updates made on end-to-end connections so far.
    pub fn key_updates(&self) -> u64 {
        self.key_updates.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until the control connection to the relay is up.
    pub async fn wait_connected(&mut self, timeout: Duration) -> bool {
        connection::wait_connected(&mut self.control, timeout)
            .await
            .is_some()
    }

    /// Open client connections.
    pub fn open_streams(&self) -> usize {
        self.drain.clients.len()
    }

    /// True while a control connection to a relay is up.
    pub fn relay_connected(&self) -> bool {
        self.shared
            .relays()
            .iter()
            .any(|(_, rx)| healthy(&rx.borrow()))
    }

    /// Which transport (UDP or TLS/TCP) reaches each connected relay.
    pub fn transports(&self) -> &TransportStatus {
        &self.transport_status
    }

    /// End-to-end connections moved to another relay's path so far.
    pub fn migrations(&self) -> u64 {
        self.shared
            .migrations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the inlet can serve clients (the `/readyz` answer).
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

impl Inlet {
    /// Binds the socket, endpoint and the local listeners.
    pub async fn bind(opts: InletOptions) -> Result<Self, InletError> {
        let socket = Arc::new(NodeSocket::bind_for(opts.relay.addr).map_err(InletError::Bind)?);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint::endpoint_config(None),
            None,
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(InletError::Bind)?;
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
        let (control, control_rx) = watch::channel(None);
        let transport_status = Arc::<TransportStatus>::default();
        Ok(Self {
            shared: Arc::new(Shared {
                socket,
                endpoint,
                e2e_client: Arc::new(std::sync::RwLock::new(endpoint::e2e_client(
                    &opts.identity,
                    opts.roots.clone(),
                )?)),
                key_budget: Mutex::default(),
                pool: pool_size().into(),
                key_updates: Arc::default(),
                relays: std::sync::RwLock::new(vec![(opts.relay.addr, control_rx)]),
                migrations: Arc::default(),
                control_since: Mutex::default(),
                e2e: Mutex::default(),
                transport_status: transport_status.clone(),
                failure_log: Mutex::default(),
            }),
            client: Arc::new(std::sync::RwLock::new(endpoint::control_client(
                &opts.identity,
                opts.roots.clone(),
            )?)),
            roots: opts.roots,
            relay: opts.relay,
            control,
            more_relays: Vec::new(),
            transport: TransportSettings::default(),
            transport_status,
            listeners,
            leases,
            tls: HashMap::new(),
            drain: Drain::default(),
            drain_timeout: Duration::ZERO,
            max_connections: None,
        })
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
        self.drain_timeout = timeout;
    }

    /// Chooses how relays are reached: UDP, TLS/TCP, or UDP with fallback to TLS/TCP (the
    /// default). Call before [`run`](Self::run).
    pub fn set_transport(&mut self, transport: TransportSettings) {
        self.transport = transport;
    }

    /// Uses `relay` too: new end-to-end connections go through the first relay (in the order
    /// given) whose control connection is up, and a connection whose relay goes away moves to
    /// another one. Call before [`run`](Self::run).
    pub fn add_relay(&mut self, relay: RelayTarget) {
        let (tx, rx) = watch::channel(None);
        self.shared
            .relays
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((relay.addr, rx));
        self.more_relays.push((relay, tx));
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
        *self
            .shared
            .key_budget
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = budget;
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
            control: self.control.subscribe(),
            shared: self.shared.clone(),
            transport_status: self.transport_status.clone(),
            key_updates: self.shared.key_updates.clone(),
            drain: self.drain.clone(),
            client: self.client.clone(),
            e2e_client: self.shared.e2e_client.clone(),
            roots: self.roots.clone(),
        }
    }

    /// Runs until `shutdown`, then drains (see [`set_drain_timeout`](Self::set_drain_timeout)).
    pub async fn run(self, shutdown: CancellationToken) {
        // Cancelled once draining is over: closes the relay connection and the lease clients.
        let close = CancellationToken::new();
        let handler = Arc::new(InletControl {
            shared: self.shared.clone(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        let mut lease_rx = std::collections::HashMap::new();
        for (service, tx) in self.leases {
            lease_rx.insert(service.clone(), tx.subscribe());
            tasks.spawn(crate::lease::run(
                self.shared.clone(),
                service,
                tx,
                close.clone(),
            ));
        }
        for (service, kind, listener) in self.listeners {
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            let mode = match kind {
                ServiceKind::Tcp => Mode::Tcp,
                ServiceKind::Influxdb => match lease_rx.get(&service) {
                    Some(rx) => Mode::Http(rx.clone()),
                    None => Mode::Tcp,
                },
            };
            let clients = self.drain.clients.clone();
            let tls = self.tls.get(&service).cloned();
            let limit = postern_net::runtime::limit::ConnLimit::new(
                format!("inlet service {service}"),
                postern_net::runtime::limit::default_cap(self.max_connections),
            );
            tasks.spawn(accept_loop(
                service, mode, listener, shared, shutdown, clients, tls, limit,
            ));
        }
        let mut controls = tokio::task::JoinSet::new();
        for (relay, current) in std::iter::once((self.relay, self.control)).chain(self.more_relays)
        {
            let path = match RelayPath::new(
                self.shared.socket.clone(),
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
                self.shared.endpoint.clone(),
                self.client.clone(),
                path,
                handler.clone(),
                current,
                close.clone(),
            ));
        }
        let ctl = async move { while controls.join_next().await.is_some() {} };
        let (state, timeout) = (&self.drain, self.drain_timeout);
        let drain = async {
            shutdown.cancelled().await;
            // The accept loops return now, closing the listeners.
            state.draining.cancel();
            if !timeout.is_zero() {
                postern_net::runtime::drain::drain(&state.clients, timeout, "client connections")
                    .await;
            }
            close.cancel();
        };
        tokio::join!(ctl, drain);
        while tasks.join_next().await.is_some() {}
        self.shared
            .endpoint
            .close(code::SHUTDOWN.into(), b"inlet shutting down");
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.shared.endpoint.wait_idle()).await;
    }
}

/// How a listener's client connections are served.
#[derive(Clone)]
enum Mode {
    Tcp,
    Http(CredentialSource),
}

/// Counts a client connection closed by the listener's cap (`reason`: `cap`, or
/// `evicted_silent` for one closed before its first byte to make room for a newer one).
fn refused(service: &ServiceName, reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "service" => service.as_str().to_owned(), "reason" => reason)
        .increment(1);
}

/// Client connections closed by a listener's cap, by service and reason.
pub const CONNECTIONS_REFUSED: &str = "postern_inlet_connections_refused_total";

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    service: ServiceName,
    mode: Mode,
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    clients: TaskTracker,
    tls: Option<TlsAcceptor>,
    limit: Arc<postern_net::runtime::limit::ConnLimit>,
) {
    tracing::info!(%service, addr = ?listener.local_addr().ok(), tls = tls.is_some(), max_connections = limit.max(), "listening");
    // HTTP and TLS clients speak first: one that has sent nothing yet can make room for another.
    let client_speaks_first = tls.is_some() || matches!(mode, Mode::Http(_));
    let mut backoff =
        postern_net::runtime::limit::AcceptBackoff::new(format!("inlet service {service}"));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning; open connections are still served.
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.succeeded();
        let evicted_before = limit.evicted();
        let slot = match limit.admit(client_speaks_first).await {
            Ok(s) => s,
            Err(_) => {
                refused(&service, "cap");
                // Closed at once (dropped here): its descriptor is free again.
                splice::set_reset_on_close(&tcp);
                continue;
            }
        };
        if limit.evicted() > evicted_before {
            refused(&service, "evicted_silent");
        }
        let shared = shared.clone();
        let service = service.clone();
        let span = tracing::info_span!("client", %service, %peer);
        metrics::counter!("postern_inlet_streams_total", "service" => service.as_str().to_owned())
            .increment(1);
        let (mode, tls) = (mode.clone(), tls.clone());
        let serve = async move {
            if client_speaks_first {
                // The first bytes must come within the TLS handshake's time limit.
                match tokio::time::timeout(
                    crate::tls::HANDSHAKE_TIMEOUT,
                    slot.wait_first_bytes(&tcp),
                )
                .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!("closing a silent client connection to make room");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("client sent nothing in time; closing");
                        return;
                    }
                }
            }
            let client = match ClientStream::accept(tcp, tls.as_ref()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(error = %e, "TLS handshake failed");
                    return;
                }
            };
            match mode {
                Mode::Tcp => serve_client(client, service, shared).await,
                Mode::Http(cred) => serve_http_client(client, service, shared, cred).await,
            }
            drop(slot);
        };
        clients.spawn(serve.instrument(span));
    }
}

async fn open_stream(
    shared: &Shared,
    service: &ServiceName,
) -> Result<(quinn::SendStream, quinn::RecvStream, ActiveStream), ServeError> {
    // One retry: a cached connection may have died since it was last checked.
    for attempt in 0..2 {
        let (conn, active) = shared.stream_connection(service).await?;
        match conn.open_bi().await {
            Ok((send, recv)) => return Ok((send, recv, active)),
            Err(e) if attempt == 0 => {
                tracing::debug!(error = %e, "cached end-to-end connection is gone; reconnecting");
            }
            Err(e) => return Err(ServeError::Stream(e.to_string())),
        }
    }
    Err(ServeError::Stream("no connection".into()))
}

/// Bytes through the inlet's client connections, by service and direction (`up`: client to
/// service, `down`: service to client).
const STREAM_BYTES: &str = "postern_inlet_stream_bytes_total";

fn byte_counter(service: &ServiceName, direction: &'static str) -> metrics::Counter {
    metrics::counter!(STREAM_BYTES, "service" => service.as_str().to_owned(), "direction" => direction)
}

/// Counts a client connection that could not be served.
fn failed(service: &ServiceName, e: &ServeError) {
    let reason = match e {
        ServeError::NoRelay => "no_relay",
        ServeError::Refused(_) | ServeError::OtherOutlet { .. } => "route_refused",
        ServeError::Control(_) | ServeError::Unexpected => "control",
        ServeError::E2e { .. } => "e2e_connect",
        ServeError::Stream(_) => "stream",
    };
    metrics::counter!("postern_inlet_stream_failures_total", "service" => service.as_str().to_owned(), "reason" => reason)
        .increment(1);
}

async fn serve_client(tcp: ClientStream, service: ServiceName, shared: Arc<Shared>) {
    let (mut send, recv, _active) = match open_stream(&shared, &service).await {
        Ok(s) => s,
        Err(e) => {
            failed(&service, &e);
            let why = shared.explain(&service, &e);
            match shared.failure_burst(&service) {
                Some(0) => tracing::warn!(%service, cause = %why, "closing client connection"),
                Some(more) => tracing::warn!(
                    %service,
                    cause = %why,
                    earlier = more,
                    "closing client connection (and {more} more since the last such line)"
                ),
                None => tracing::debug!(%service, cause = %why, "closing client connection"),
            }
            splice::set_reset_on_close(tcp.tcp());
            return;
        }
    };
    if let Err(e) = exchange::write_frame(
        &mut send,
        &StreamOpen::Connect {
            service: service.clone(),
        },
    )
    .await
    {
        tracing::warn!(error = %e, "closing client connection: cannot start stream");
        splice::set_reset_on_close(tcp.tcp());
        return;
    }
    let counters = splice::ByteCounters {
        tcp_to_stream: byte_counter(&service, "up"),
        stream_to_tcp: byte_counter(&service, "down"),
    };
    let outcome = tcp.splice(send, recv, &counters).await;
    match outcome.peer_reset {
        Some(c) if c != u64::from(code::RESET) => {
            tracing::warn!(
                code = c,
                reason = code::describe(c),
                "outlet refused the stream; client connection closed"
            );
        }
        _ => tracing::debug!(
            up = outcome.up,
            down = outcome.down,
            "client connection done"
        ),
    }
}

/// Serves an InfluxDB client through the HTTP filter; the stream is opened only once a first
/// well-formed request with a credential is ready.
async fn serve_http_client(
    tcp: ClientStream,
    service: ServiceName,
    shared: Arc<Shared>,
    credential: CredentialSource,
) {
    let _ = tcp.tcp().set_nodelay(true);
    let open = || async {
        let (mut send, recv, active) = open_stream(&shared, &service).await.map_err(|e| {
            failed(&service, &e);
            std::io::Error::other(e.to_string())
        })?;
        exchange::write_frame(
            &mut send,
            &StreamOpen::Connect {
                service: service.clone(),
            },
        )
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Holding {
            io: splice::Counted::new(
                tokio::io::join(recv, send),
                byte_counter(&service, "down"),
                byte_counter(&service, "up"),
            ),
            _active: active,
        })
    };
    let cfg = FilterConfig {
        strip_query_credentials: true,
        ..FilterConfig::default()
    };
    let opts = http_proxy::ProxyOptions::new("postern inlet", cfg);
    match http_proxy::proxy(tcp, open, crate::lease::LeaseGate(credential), opts).await {
        Ok(stats) => tracing::debug!(
            requests = stats.requests,
            up = stats.bytes_up,
            down = stats.bytes_down,
            "client connection done"
        ),
        Err(e) => tracing::warn!(error = %e, "client connection ended with an error"),
    }
}

struct InletControl {
    shared: Arc<Shared>,
}

impl ControlHandler for InletControl {
    async fn on_connect(&self, conn: &quinn::Connection) -> Result<(), CtlError> {
        self.shared
            .control_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn.stable_id(), std::time::Instant::now());
        Ok(())
    }

    async fn on_push(&self, msg: Ctl) -> Ctl {
        match msg {
            Ctl::RouteClosed { route, reason } => {
                tracing::info!(%reason, "route closed by relay");
                tracing::debug!(route = %route.short(), "closed route");
                let relay = self.shared.socket.relay_of(route);
                match relay {
                    Some(relay) if self.shared.several_relays() => {
                        self.shared.socket.remove_route(route);
                        tokio::spawn(self.shared.clone().migrate(route, relay));
                    }
                    _ => self.shared.route_closed(route),
                }
                Ctl::Ack
            }
            Ctl::Heartbeat { seq } => Ctl::HeartbeatAck { seq },
            other => Ctl::Error {
                message: format!("unexpected push {other:?}"),
            },
        }
    }

    fn on_disconnect(&self, relay: SocketAddr) {
        for route in self.shared.socket.remove_routes_via(relay) {
            if self.shared.several_relays() {
                tokio::spawn(self.shared.clone().migrate(route, relay));
            } else {
                self.shared.route_closed(route);
            }
        }
    }
}

/// A stream that keeps its connection's [`ActiveStream`] count while it lives.
struct Holding<T> {
    io: T,
    _active: ActiveStream,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Holding<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Holding<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
